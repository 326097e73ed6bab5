"""The docker-compose deployment as a whole, in ``make test`` (and CI): it shares the session's images
(the stage and training images, the Airflow and MLflow builds) with the container tests.

docker-compose.yml is brought up as the README says (docker-compose with an ``.env`` of random
secrets, ``configs/overlays/compose-cpu.yaml`` selected in it for a host without GPUs), a batch
lands in the stack's S3, and the stack's own scheduler (not ``airflow dags test``) runs the
pipeline: its watcher announces the batch, every stage runs as a DockerOperator container of the
project's images on the compose network, tracking into the compose MLflow server with artifacts
in S3. Then MLflow is stopped and a run triggered from the REST API fails at its plan, naming
the server. The stack is torn down, volumes included.

What stands in for what: podman's Docker API for the Docker engine (Debian's docker-compose 1.29
drives it); for the three public images that cannot be pulled here, the stand-ins of
``docker/local/compose.yml`` (Debian's PostgreSQL, moto's S3 server for MinIO); and, because
podman runs health checks from systemd timers that this sandbox does not have, a thread that
runs ``podman healthcheck run`` for the stack's containers as Docker's engine would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest

from docpipe.config import S3Config
from tests.helpers import LOCAL_BASE, ROOT, land_synthetic
from toolkit import env_file

pytestmark = [pytest.mark.integration, pytest.mark.container]

PROJECT = "doc-extraction"
CPU_CONFIG = "configs/pipeline.yaml:configs/overlays/compose.yaml:configs/overlays/compose-cpu.yaml"
API = "http://127.0.0.1:8080"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "docker" / "podman" / "containers.conf")}


def build(client, dockerfile: str, tag: str) -> None:
    client.images.build(path=str(ROOT), dockerfile=dockerfile, tag=tag, buildargs={"BASE_IMAGE": LOCAL_BASE}, rm=True)


def tag_as_compose_names_it(client, image: str, name: str) -> None:
    """Under the name compose (and the compose overlay) use, as podman resolves it: a short name is
    docker.io's through the Docker API, and localhost's through podman's own."""
    repository, tag = name.split(":")
    for registry in ("docker.io", "localhost"):
        client.images.get(image).tag(f"{registry}/{repository}", tag)


def run_health_checks(stop: threading.Event) -> None:
    """What Docker's engine does by itself: run each container's health check every few seconds."""
    while not stop.wait(3):
        names = subprocess.run(
            ["podman", "ps", "--filter", f"label=com.docker.compose.project={PROJECT}", "--format", "{{.Names}}"],
            env=PODMAN_ENV,
            capture_output=True,
            text=True,
        ).stdout
        for name in names.split():
            subprocess.run(["podman", "healthcheck", "run", name], env=PODMAN_ENV, capture_output=True)


def api(path: str, token: str | None = None, body: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(f"{API}{path}", data=data, headers=headers), timeout=20) as r:
        return json.loads(r.read())


def wait_for(condition, timeout_s: float, what: str, every: float = 5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if result := condition():
                return result
        except OSError:
            pass
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout_s} s")


@pytest.fixture(scope="module")
def stack(docker_client, stage_image, train_image, tiny_model, tmp_path_factory):
    """The compose stack up, with this machine's images under the names compose uses; torn down after."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed: `make test-compose` installs Debian's")
    build(docker_client, "docker/airflow.Dockerfile", "localhost/doc-extraction/airflow:test")
    build(docker_client, "docker/mlflow.Dockerfile", "localhost/doc-extraction/mlflow:test")
    for image, name in (
        (stage_image, "doc-extraction/stages:latest"),
        (train_image, "doc-extraction/train:latest"),
        ("localhost/doc-extraction/airflow:test", "doc-extraction/airflow:3.3.2"),
        ("localhost/doc-extraction/mlflow:test", "doc-extraction/mlflow:3.17.2"),
    ):
        tag_as_compose_names_it(docker_client, image, name)
    build(docker_client, "docker/local/postgres.Dockerfile", "localhost/doc-extraction/postgres-standin:15")
    build(docker_client, "docker/local/s3.Dockerfile", "localhost/doc-extraction/s3-standin:moto")

    work = tmp_path_factory.mktemp("compose")
    data = work / "data"
    shutil.copytree(tiny_model, data / "models" / "tiny-minicpmv4_6")
    (data / "runs").mkdir()
    for path in [data, *data.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)  # stage containers run as uid 1000, Airflow as 50000
    keys = {  # what this machine differs in; the secrets are random, as make .env writes them
        "DOCKER_GID": "0",
        "DOC_EXTRACTION_DATA": str(data),
        "DOC_EXTRACTION_CONFIG": CPU_CONFIG,
        "DOCKER_SOCKET": docker_client.docker_host.removeprefix("unix://"),
    }
    settings = env_file.settings(keys, ROOT / ".env.example")
    Path(keys["DOCKER_SOCKET"]).chmod(0o660)  # as Docker's: the scheduler's user reaches it through DOCKER_GID
    env_file_path = work / ".env"
    env_file.write(env_file_path, settings)
    compose = [
        "docker-compose",
        "-p",
        PROJECT,
        "--project-directory",
        str(ROOT),
        "--env-file",
        str(env_file_path),
        "-f",
        str(ROOT / "docker-compose.yml"),
        "-f",
        str(ROOT / "docker/local/compose.yml"),
    ]
    env = {**os.environ, "DOCKER_HOST": docker_client.docker_host}
    stop = threading.Event()
    checker = threading.Thread(target=run_health_checks, args=(stop,), daemon=True)
    checker.start()
    started = time.monotonic()
    try:
        up = subprocess.run([*compose, "up", "-d", "--no-build"], env=env, capture_output=True, text=True, timeout=900)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        wait_for(lambda: api("/api/v2/version"), 300, "the Airflow API server")
        print(f"\ncompose stack up in {time.monotonic() - started:.0f} s")
        yield {"compose": compose, "env": env, "data": data, "settings": settings, "client": docker_client}
    finally:
        logs = subprocess.run([*compose, "logs", "--no-color"], env=env, capture_output=True, text=True, timeout=300)
        (work / "compose.log").write_text(logs.stdout + logs.stderr)
        stop.set()
        subprocess.run([*compose, "down", "-v", "-t", "10"], env=env, capture_output=True, timeout=600)


def admin_token(stack) -> str:
    apiserver = stack["client"].containers.get(f"{PROJECT}_airflow-apiserver_1")
    path = "/opt/airflow/simple_auth_manager_passwords.json.generated"
    password = json.loads(apiserver.exec_run(["cat", path]).output)["admin"]
    return api("/auth/token", body={"username": "admin", "password": password})["access_token"]


def finished_run(token: str, run_id: str | None = None) -> dict | None:
    runs = api("/api/v2/dags/doc_extraction/dagRuns?order_by=-run_after", token)["dag_runs"]
    runs = [run for run in runs if run_id in (None, run["dag_run_id"])]
    return runs[0] if runs and runs[0]["state"] in ("success", "failed") else None


def test_the_scheduler_runs_a_landed_batch_through_every_stage_container(stack):
    settings = stack["settings"]
    keys = {"AWS_ACCESS_KEY_ID": settings["MINIO_ROOT_USER"], "AWS_SECRET_ACCESS_KEY": settings["MINIO_ROOT_PASSWORD"]}
    os.environ.update(keys)
    landed = time.monotonic()
    land_synthetic("s3://doc-extraction/landing/batch-1", 32, seed=3, s3=S3Config(endpoint_url="http://127.0.0.1:9000"))
    token = wait_for(lambda: admin_token(stack), 120, "the admin password")
    run = wait_for(lambda: finished_run(token), 1500, "the pipeline run", every=10)
    print(f"landed -> pipeline run finished ({run['state']}): {time.monotonic() - landed:.0f} s")
    assert run["state"] == "success" and run["run_type"] == "asset_triggered", run
    run_id = urllib.parse.quote(run["dag_run_id"], safe="")
    tasks = {
        t["task_id"]: t["state"]
        for t in api(f"/api/v2/dags/doc_extraction/dagRuns/{run_id}/taskInstances", token)["task_instances"]
    }
    assert {stage: tasks[stage] for stage in ("ingest", "export", "finetune", "patch", "evaluate")} == dict.fromkeys(
        ("ingest", "export", "finetune", "patch", "evaluate"), "success"
    )
    (folder,) = (stack["data"] / "runs").iterdir()
    assert json.loads((folder / "finetune" / "result.json").read_text())["status"] == "succeeded"
    assert (folder / "model" / "model.safetensors").is_file()
    client = mlflow.MlflowClient("http://127.0.0.1:5000")
    runs = client.search_runs([client.get_experiment_by_name("doc-extraction").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("pipeline.role") == "parent"]
    children = {r.data.tags.get("pipeline.stage") for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert parent.info.status == "FINISHED" and {"ingest", "export", "finetune", "patch", "evaluate"} <= children
    assert client.list_artifacts(parent.info.run_id) or any(
        client.list_artifacts(r.info.run_id) for r in runs if r.info.run_id != parent.info.run_id
    )  # artifacts in S3


def test_a_missing_service_fails_the_run_naming_it(stack):
    token = admin_token(stack)
    stopped = subprocess.run([*stack["compose"], "stop", "mlflow"], env=stack["env"], capture_output=True, timeout=120)
    assert stopped.returncode == 0
    started = time.monotonic()
    triggered = api("/api/v2/dags/doc_extraction/dagRuns", token, {"logical_date": None, "conf": {"gpus": 0}})
    run = wait_for(lambda: finished_run(token, triggered["dag_run_id"]), 600, "the run without MLflow")
    print(f"run without MLflow failed in {time.monotonic() - started:.0f} s")
    assert run["state"] == "failed"
    run_id = urllib.parse.quote(run["dag_run_id"], safe="")
    log = api(f"/api/v2/dags/doc_extraction/dagRuns/{run_id}/taskInstances/plan/logs/1", token)
    assert "mlflow:5000" in json.dumps(log), json.dumps(log)[-3000:]
