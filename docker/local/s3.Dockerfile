# Stand-in for MinIO where no image can be pulled (docker/local/compose.yml): moto's S3 server,
# the same S3 API on port 9000 (in memory, any keys accepted), and boto3 for creating buckets.
# Local tests only.
ARG BASE_IMAGE=localhost/debian-base:bookworm
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
COPY constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/venv \
    && pip install -c /tmp/constraints.txt "moto[server]" boto3 \
    && useradd --uid 1000 --create-home s3
USER 1000:1000
EXPOSE 9000
ENTRYPOINT ["moto_server", "--host", "0.0.0.0", "--port", "9000"]
