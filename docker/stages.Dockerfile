# CPU stage image: every stage that needs no GPU (synthetic, ingest, export, evaluate on CPU, publish).
# Build from the repository root:  docker build -f docker/stages.Dockerfile -t doc-extraction/stages .
# BASE_IMAGE must provide python3 (3.11) with venv; where nothing can be pulled, docker/local-base.sh
# builds a stand-in from Debian's packages.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# CJK glyphs for the synthetic generator and reports; libGL and GLib for OpenCV (the OCR baseline).
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-wqy-microhei libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Dependencies first (cached while only code changes), pinned by the same lock CI tests.
COPY pyproject.toml constraints.txt README.md ./
RUN python3 -m venv /opt/venv \
    && mkdir stages docpipe toolkit && touch stages/__init__.py docpipe/__init__.py toolkit/__init__.py \
    && pip install -c constraints.txt ".[stages]" \
    && rm -rf stages docpipe toolkit
COPY docpipe ./docpipe
COPY stages ./stages
COPY toolkit ./toolkit
COPY configs ./configs
RUN pip install --no-deps -c constraints.txt .

# The commit the image was built from, recorded in every result.json and MLflow run.
ARG GIT_COMMIT=unknown
ENV GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.revision=${GIT_COMMIT}
# A RUN after the ARG: podman's Docker-API builds reuse cached ENV/LABEL layers across
# different build-arg values, but not a RUN's (seen with podman 4.3).
RUN useradd --uid 1000 --create-home stage
USER 1000:1000
CMD ["python", "-m", "toolkit.synthetic", "--help"]
