# Label Studio for docker-compose: where people review the documents the model pre-filled
# (stages.prelabel, stages.collect_labels). Its own environment: label-studio pins packages below
# the stack's (docker/label-studio/constraints.txt says which). Data (SQLite, uploads) in /data.
# Build from the repository root: docker build -f docker/label-studio.Dockerfile -t doc-extraction/label-studio .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    LABEL_STUDIO_BASE_DATA_DIR=/data \
    LATEST_VERSION_CHECK=false

COPY docker/label-studio/constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/venv \
    && pip install -c /tmp/constraints.txt label-studio==1.23.2 \
    && useradd --uid 1001 --create-home labelstudio \
    && install -d -o 1001 -g 1001 /data

USER 1001:1001
EXPOSE 8080
ENTRYPOINT ["label-studio", "start", "--no-browser", "--internal-host", "0.0.0.0", "--port", "8080"]
