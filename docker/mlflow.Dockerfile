# MLflow tracking server for docker-compose: Postgres backend store, artifacts on S3 (MinIO),
# served through the server's artifact proxy so stage containers need no S3 keys for MLflow.
# Build from the repository root: docker build -f docker/mlflow.Dockerfile -t doc-extraction/mlflow .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

COPY constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/venv \
    && pip install -c /tmp/constraints.txt mlflow==3.17.2 boto3==1.43.117 "psycopg[binary]==3.3.9" \
    && useradd --uid 1000 --create-home mlflow

USER 1000:1000
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
