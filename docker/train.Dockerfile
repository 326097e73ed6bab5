# GPU training image: finetune (torchrun, HF Trainer, DeepSpeed), patch, and evaluation on GPU.
# Build from the repository root:  docker build -f docker/train.Dockerfile -t doc-extraction/train .
# BASE_IMAGE: a CUDA *devel* image with Python 3.11 or 3.12; DeepSpeed compiles its ops (fused and
# CPU Adam, shared-memory comms) with the CUDA toolkit and g++ when a run first needs them.
# Where nothing can be pulled, docker/local-base.sh builds a Debian stand-in (CPU only).
# How the container must run (shm size, IPC, ulimits, NCCL variables): `gpu_container:` in
# configs/pipeline.yaml, applied by docpipe/orchestration/containers.py.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${BASE_IMAGE}

# Python, a compiler for DeepSpeed's JIT-built ops, CJK glyphs for reports, libGL/GLib for OpenCV.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv python3-dev g++ fonts-wqy-microhei libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/opt/torch-extensions \
    HF_HUB_OFFLINE=1

WORKDIR /app
# torch first and pinned (a wheel in docker/wheels/ wins over the registry), then the lock CI
# tested; the lock's own torch line names the CPU build, so it is left out here.
COPY docker/wheels/ /tmp/wheels/
COPY pyproject.toml constraints.txt README.md ./
RUN python3 -m venv /opt/venv \
    && pip install --find-links /tmp/wheels torch==2.13.0 \
    && grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
    && mkdir stages docpipe toolkit && touch stages/__init__.py docpipe/__init__.py toolkit/__init__.py \
    && pip install -c /tmp/constraints.txt ".[stages,train]" \
    && rm -rf stages docpipe toolkit /tmp/wheels
# flash-attn is optional (FLASH_ATTN=1): it compiles against the CUDA toolkit for a long while,
# and the models train without it (the default attention is PyTorch's SDPA).
ARG FLASH_ATTN=0
RUN if [ "$FLASH_ATTN" = 1 ]; then pip install --no-build-isolation flash-attn==2.8.3.post2; fi
COPY docpipe ./docpipe
COPY stages ./stages
COPY toolkit ./toolkit
COPY configs ./configs
RUN pip install --no-deps -c /tmp/constraints.txt .

# The commit the image was built from, recorded in every result.json and MLflow run.
ARG GIT_COMMIT=unknown
ENV GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.revision=${GIT_COMMIT}
# A RUN after the ARG: podman's Docker-API builds reuse cached ENV/LABEL layers across build-arg values.
RUN if id 1000 >/dev/null 2>&1; then userdel --remove "$(id -nu 1000)"; fi \
    && useradd --uid 1000 --create-home stage \
    && mkdir -p /opt/torch-extensions && chown stage /opt/torch-extensions
USER 1000:1000
CMD ["python", "-m", "stages.finetune", "--help"]
