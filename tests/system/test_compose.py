"""docker-compose.yml: loopback-only ports, no committed secrets, and settings the stages rely on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from docpipe.config import load_pipeline_config
from docpipe.loader import ConfigError
from tests.helpers import LOCAL_BASE, PIPELINE, ROOT, free_port, wait_for_http
from toolkit import env_file

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_published_ports_are_bound_to_loopback():
    published = [port for service in SERVICES.values() for port in service.get("ports", [])]
    assert published, "expected MinIO and MLflow to publish ports"
    assert all(str(port).startswith("127.0.0.1:") for port in published), published


def test_no_secret_is_written_into_the_file():
    text = (ROOT / "docker-compose.yml").read_text()
    secret_keys = list(re.finditer(r"^\s*(\w*(?:PASSWORD|SECRET)\w*)\s*:\s*(.+)$", text, re.MULTILINE))
    assert len(secret_keys) >= 4
    for match in secret_keys:
        assert match.group(2).startswith("${"), f"literal secret for {match.group(1)}"
    variables = set(re.findall(r"\$\{(\w+)", text))
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert variables <= set(example), f"variables missing from .env.example: {variables - set(example)}"
    assert all(not value for key, value in example.items() if "PASSWORD" in key)
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_make_env_writes_random_passwords(tmp_path):
    for name in ("Makefile", ".env.example"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    subprocess.run(["make", "-s", ".env", f"PY={sys.executable}"], cwd=tmp_path, check=True, capture_output=True)
    env = dict(
        line.split("=", 1)
        for line in (tmp_path / ".env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert len(env["POSTGRES_PASSWORD"]) == 48 and len(env["MINIO_ROOT_PASSWORD"]) == 48
    assert env["POSTGRES_PASSWORD"] != env["MINIO_ROOT_PASSWORD"]
    assert len(env["LABEL_STUDIO_PASSWORD"]) == 32 and len(env["LABEL_STUDIO_API_KEY"]) == 40
    assert oct((tmp_path / ".env").stat().st_mode & 0o777) == "0o600"
    assert list(env) == list(env_file.example_settings(ROOT / ".env.example"))  # every key, in order
    again = subprocess.run(["make", "-s", ".env", f"PY={sys.executable}"], cwd=tmp_path, capture_output=True)
    assert again.returncode == 0 and (tmp_path / ".env").read_text().count("POSTGRES_PASSWORD") == 1  # kept


def test_an_existing_env_file_is_never_replaced(tmp_path, capsys):
    (tmp_path / ".env").write_text("POSTGRES_PASSWORD=mine\n")
    code = env_file.main(["--output", str(tmp_path / ".env"), "--example", str(ROOT / ".env.example")])
    assert code == 2 and "exists" in capsys.readouterr().err
    assert (tmp_path / ".env").read_text() == "POSTGRES_PASSWORD=mine\n"


def compose(env: Path, *args: str) -> subprocess.CompletedProcess:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed: `make containers` installs Debian's")
    command = ["docker-compose", "-p", "t", "--project-directory", str(ROOT), "--env-file", str(env)]
    return subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), *args], capture_output=True, text=True)


def test_the_stack_needs_no_label_studio_secrets_unless_its_profile_is_asked_for(tmp_path):
    """An .env from before the labelling loop (no Label Studio keys) is accepted; asked for with its
    profile, the service refuses to start naming the key .env lacks."""
    env = tmp_path / "old.env"
    settings = {k: v for k, v in env_file.settings(example=ROOT / ".env.example").items() if "LABEL_STUDIO" not in k}
    env_file.write(env, settings)
    assert compose(env, "config", "--quiet").returncode == 0, compose(env, "config").stderr
    rendered = compose(env, "--profile", "labelling", "config")
    assert rendered.returncode == 0, rendered.stderr
    service = yaml.safe_load(rendered.stdout)["services"]["label-studio"]
    entrypoint = [part.replace("$$", "$") for part in service["entrypoint"]]  # `config` prints $ escaped
    started = [*entrypoint, *service["command"]]
    bare = {"PATH": "/usr/bin:/bin", **{k: v for k, v in service["environment"].items() if v}}
    refused = subprocess.run(started, env=bare, capture_output=True, text=True)
    assert refused.returncode == 1 and "set LABEL_STUDIO_PASSWORD in .env" in refused.stderr
    half = subprocess.run(started, env={**bare, "LABEL_STUDIO_PASSWORD": "p"}, capture_output=True, text=True)
    assert half.returncode == 1 and "set LABEL_STUDIO_API_KEY in .env" in half.stderr


def allowed_hosts() -> list[str]:
    (flag,) = [arg for arg in SERVICES["mlflow"]["command"] if arg.startswith("--allowed-hosts=")]
    return flag.split("=", 1)[1].split(",")


def test_compose_overlay_points_at_these_services():
    config = load_pipeline_config([PIPELINE, ROOT / "configs" / "overlays" / "compose.yaml"])
    assert config.tracking.tracking_uri == "http://mlflow:5000" and "mlflow:5000" in allowed_hosts()
    assert config.storage.s3.endpoint_url == "http://minio:9000" and "minio" in SERVICES
    bucket = config.storage.landing_uri.removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in " ".join(SERVICES["minio-init"]["entrypoint"])


def test_mlflow_keeps_the_database_password_off_its_command_line():
    mlflow = SERVICES["mlflow"]
    assert "MLFLOW_BACKEND_STORE_URI" in mlflow["environment"]
    assert not any("postgresql" in arg for arg in mlflow["command"])
    assert (ROOT / mlflow["build"]["dockerfile"]).is_file()


def http_status(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.integration
@pytest.mark.container
def test_mlflow_image_serves_compose_hostnames_and_refuses_others(docker_client):
    """The compose MLflow image, built here, answers Host: mlflow:5000 and refuses a stranger's host."""
    image = "localhost/doc-extraction/mlflow:test"
    docker_client.images.build(
        path=str(ROOT), dockerfile="docker/mlflow.Dockerfile", tag=image, buildargs={"BASE_IMAGE": LOCAL_BASE}, rm=True
    )
    port = free_port()
    command = [arg for arg in SERVICES["mlflow"]["command"] if not arg.startswith(("--host", "--port", "--artifacts"))]
    container = docker_client.containers.run(
        image,
        [*command, "--host=127.0.0.1", f"--port={port}", "--backend-store-uri=sqlite:////tmp/mlflow.db"],
        network_mode="host",
        detach=True,
        remove=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", lambda: container.reload() or container.status == "running")
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"  # /health answers any host
        assert http_status(api, "mlflow:5000") == 200
        assert http_status(api, "localhost") == 200
        assert http_status(api, "evil.example.com") == 403
        probe = docker_client.containers.run(
            image, [], entrypoint=["python", "-c", "import psycopg, boto3"], network_mode="none", remove=True
        )
        assert probe == b""
    finally:
        container.stop(timeout=5)


@pytest.mark.integration
@pytest.mark.container
@pytest.mark.compose  # installing Label Studio into the image takes 3-4 minutes: `make test-compose`, not CI
def test_label_studio_image_starts_with_the_first_user_and_token_compose_gives_it(docker_client):
    """The compose Label Studio, built here, started with the service's settings: healthy, and its API
    answers the token from .env (as the stages send it)."""
    image = "localhost/doc-extraction/label-studio:test"
    docker_client.images.build(
        path=str(ROOT),
        dockerfile="docker/label-studio.Dockerfile",
        tag=image,
        buildargs={"BASE_IMAGE": LOCAL_BASE},
        rm=True,
    )
    service, port, token = SERVICES["label-studio"], free_port(), "f" * 40
    environment = {
        "LABEL_STUDIO_USERNAME": "reviewer@example.com",
        "LABEL_STUDIO_PASSWORD": "not-a-secret-2",
        "LABEL_STUDIO_USER_TOKEN": token,
    }
    assert set(environment) == set(service["environment"])
    container = docker_client.containers.run(
        image,
        [*service["command"], "--internal-host", "127.0.0.1", "--port", str(port)],
        entrypoint=[part.replace("$$", "$") for part in service["entrypoint"]],  # as compose starts it
        environment=environment,
        network_mode="host",
        detach=True,
        remove=True,
    )
    try:
        wait_for_http(
            f"http://127.0.0.1:{port}/health", lambda: container.reload() or container.status == "running", timeout=300
        )
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/projects", headers={"Authorization": f"Token {token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
        stranger = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/projects", headers={"Authorization": "Token " + "0" * 40}
        )
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(stranger, timeout=30)
    finally:
        container.stop(timeout=5)


AIRFLOW_SERVICES = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
}


def test_airflow_services_share_one_image_and_database():
    for service, command in AIRFLOW_SERVICES.items():
        settings = SERVICES[service]
        assert settings["command"] == [command] and settings["image"] == "doc-extraction/airflow:3.3.2"
        assert settings["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
        assert settings["environment"]["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert "airflow db migrate" in " ".join(SERVICES["airflow-init"]["command"])
    assert (ROOT / SERVICES["airflow-scheduler"]["build"]["dockerfile"]).is_file()
    init_sql = (ROOT / "docker" / "postgres" / "airflow-db.sql").read_text()
    assert "CREATE DATABASE airflow" in init_sql
    assert "./docker/postgres:/docker-entrypoint-initdb.d:ro" in SERVICES["postgres"]["volumes"][1]


def compose_default(value: str) -> str:
    """A compose value as it reads with nothing set in .env: ``${VAR:-default}`` is its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


@pytest.mark.parametrize("overlays", [["compose.yaml"], ["compose.yaml", "compose-cpu.yaml"]])
def test_the_scheduler_starts_stage_containers_on_the_compose_network(overlays, monkeypatch):
    """The compose overlay's docker launcher reaches the engine through the mounted socket, puts
    stages on this compose project's network and mounts the run folders the DAG reads too, at
    the host folder compose names (DOC_EXTRACTION_DATA); on a host without GPUs as well."""
    from docpipe.orchestration.launchers import host_path

    config = load_pipeline_config([PIPELINE, *(ROOT / "configs" / "overlays" / name for name in overlays)])
    settings = config.orchestration
    assert settings.launcher == "docker" and settings.docker_url == "unix://var/run/docker.sock"
    scheduler = SERVICES["airflow-scheduler"]
    assert any(compose_default(v).startswith("/var/run/docker.sock:") for v in scheduler["volumes"])
    assert settings.network_mode == COMPOSE["networks"]["default"]["name"]
    environment = {key: compose_default(value) for key, value in scheduler["environment"].items()}
    monkeypatch.setenv("DOC_EXTRACTION_DATA", environment["DOC_EXTRACTION_DATA"])
    runs = config.storage.runs_uri
    host = host_path(next(source for source, target in settings.mounts.items() if target == runs))
    assert f"{host}:{runs}" in map(compose_default, scheduler["volumes"])
    if overlays == ["compose.yaml"]:
        assert environment["DOC_EXTRACTION_CONFIG"].split(":") == settings.container_configs
    assert all((ROOT / path).is_file() for path in settings.container_configs)
    assert f"configs/overlays/{overlays[-1]}" == settings.container_configs[-1]
    assert set(settings.pass_environment) <= set(environment)  # keys reach the stages privately, never as config
    monkeypatch.delenv("DOC_EXTRACTION_DATA")
    with pytest.raises(ConfigError, match="DOC_EXTRACTION_DATA not set in the scheduler's environment"):
        host_path(next(iter(settings.mounts)))
