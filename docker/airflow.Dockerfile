# Airflow image for docker-compose (and any Airflow deployment): api-server, scheduler,
# dag-processor and triggerer, with the DAG, its providers (docker, amazon with the async SQS
# trigger, cncf-kubernetes, standard, common-messaging) and the library the DAG imports
# (docpipe: configuration, planning, launchers). No torch or transformers: stages run in their
# own images (stages.Dockerfile, train.Dockerfile), started through the Docker socket or as pods.
# Build from the repository root:  docker build -f docker/airflow.Dockerfile -t doc-extraction/airflow .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/app/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    DOC_EXTRACTION_HOME=/app

WORKDIR /app
# Dependencies first (cached while only code changes), pinned by the same lock CI tests;
# psycopg2 and asyncpg (Airflow 3 also opens the metadata database asynchronously) for Postgres.
COPY pyproject.toml constraints.txt README.md ./
RUN python3 -m venv /opt/venv \
    && mkdir docpipe && touch docpipe/__init__.py \
    && pip install -c constraints.txt ".[airflow]" "psycopg2-binary==2.9.13" "asyncpg==0.32.0" \
    && rm -rf docpipe
COPY docpipe ./docpipe
COPY configs ./configs
COPY dags ./dags
RUN pip install --no-deps -c constraints.txt .

# The commit the image was built from (a RUN after the ARG: podman reuses cached ENV/LABEL layers).
ARG GIT_COMMIT=unknown
ENV GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.revision=${GIT_COMMIT}
RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home airflow
USER 50000:0
EXPOSE 8080
ENTRYPOINT ["airflow"]
CMD ["api-server"]
