"""Shared fixtures: a real S3 API server on loopback, MLflow and registry servers, the images, tiny
models, per-test config overlays. Helpers a test imports are in ``helpers.py``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

import docker
from docpipe.config import S3Config
from tests.helpers import (
    LOCAL_BASE,
    ROOT,
    SMOKE,
    STAGE_IMAGE,
    TRAIN_IMAGE,
    build_remote_code_model,
    embedded_configs,
    free_port,
    land_synthetic,
    run_stage,
    wait_for_http,
    write_overlay,
)


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto in server mode, as its own process on loopback: a real S3 API over HTTP."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"moto_server did not start on {endpoint}")
            time.sleep(0.1)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(autouse=True)
def fake_aws_credentials(monkeypatch):
    """Credentials for the loopback S3 server; never real ones."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)


@pytest.fixture
def s3_config(s3_endpoint) -> S3Config:
    return S3Config(endpoint_url=s3_endpoint, max_attempts=2)


@pytest.fixture
def bucket(s3_config) -> str:
    """A fresh, empty bucket on the loopback S3 server."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_config.endpoint_url, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def embedded(tmp_path) -> list[Path]:
    """Config files for the embedded default as shipped, redirected into this test's temporary folder."""
    return embedded_configs(tmp_path)


@pytest.fixture
def overlay(embedded) -> list[Path]:
    """The embedded default in this test's folder, trained and gated for a machinery test (``SMOKE``)."""
    return [*embedded, SMOKE]


@pytest.fixture
def doctypes_copy(tmp_path) -> Path:
    """A writable copy of the shipped document types, for tests that break one."""
    target = tmp_path / "doctypes"
    shutil.copytree(ROOT / "configs" / "doctypes", target)
    return target


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server on loopback, proxying artifacts, as compose runs it."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", lambda: server.poll() is None)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.fixture(scope="session")
def local_registry(tmp_path_factory) -> str:
    """A container registry on loopback (Debian's docker-registry), standing in for the real one."""
    if shutil.which("docker-registry") is None:
        pytest.fail("docker-registry is not installed: run `make containers` (it installs it from Debian's packages)")
    root = tmp_path_factory.mktemp("registry")
    address = f"127.0.0.1:{free_port()}"
    (root / "config.yml").write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "log": {"level": "warn"},
                "http": {"addr": address},
                "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
            }
        )
    )
    server = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stderr=subprocess.DEVNULL)
    wait_for_http(f"http://{address}/v2/", lambda: server.poll() is None, timeout=30)
    yield address
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(scope="session")
def docker_client(tmp_path_factory, local_registry):
    """A docker-py client talking to podman's Docker-compatible API on a private socket; the
    loopback registry is reachable over plain HTTP."""
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run `make containers` (it installs it from Debian's packages)")
    socket_path = tmp_path_factory.mktemp("podman") / "podman.sock"
    registries = socket_path.parent / "registries.conf"
    registries.write_text(f'[[registry]]\nlocation = "{local_registry}"\ninsecure = true\n')
    env = {
        **os.environ,
        "CONTAINERS_CONF": str(ROOT / "docker" / "podman" / "containers.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(registries),
    }
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket_path}"], env=env, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        if service.poll() is not None or time.monotonic() > deadline:
            pytest.fail("podman system service did not start")
        time.sleep(0.1)
    client = docker.DockerClient(base_url=f"unix://{socket_path}", timeout=600)
    client.docker_host = f"unix://{socket_path}"  # for code that finds the engine through DOCKER_HOST
    yield client
    client.close()
    service.terminate()
    service.wait(timeout=10)


@pytest.fixture(scope="session")
def stage_image(docker_client) -> str:
    """docker/stages.Dockerfile built from the working tree."""
    from docpipe.manifest import git_commit

    try:
        docker_client.images.get(LOCAL_BASE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{LOCAL_BASE} is missing: run `make containers` (docker/local-base.sh builds it)")
    image, _ = docker_client.images.build(
        path=str(ROOT),
        dockerfile="docker/stages.Dockerfile",
        tag=STAGE_IMAGE,
        buildargs={"BASE_IMAGE": LOCAL_BASE, "GIT_COMMIT": git_commit()},
        rm=True,
    )
    assert image.labels["org.opencontainers.image.revision"] == git_commit()
    return STAGE_IMAGE


@pytest.fixture(scope="session")
def train_image(docker_client) -> str:
    """docker/train.Dockerfile from the local base (for the CUDA devel image) and CPU torch (for CUDA torch)."""
    from docpipe.manifest import git_commit

    if not list((ROOT / "docker" / "wheels").glob("torch-2.13.0*.whl")):
        pytest.fail("docker/wheels/ has no torch wheel: run `make train-wheels`")
    docker_client.images.build(
        path=str(ROOT),
        dockerfile="docker/train.Dockerfile",
        tag=TRAIN_IMAGE,
        buildargs={"BASE_IMAGE": LOCAL_BASE, "GIT_COMMIT": git_commit()},
        rm=True,
    )
    return TRAIN_IMAGE


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random MiniCPM-V 4.6 the demo uses, built offline (toolkit/tiny_model.py)."""
    from toolkit.tiny_model import build

    return build(tmp_path_factory.mktemp("models") / "tiny-minicpmv4_6", ROOT / "configs" / "doctypes")


@pytest.fixture(scope="session")
def remote_code_model(tmp_path_factory) -> Path:
    return build_remote_code_model(tmp_path_factory.mktemp("models") / "tiny-remote-code")


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Path:
    """An export of 24 synthetic documents (ingest and export run for real)."""
    root = tmp_path_factory.mktemp("exported")
    land_synthetic(root / "landing", 24, seed=4)
    overlay = write_overlay(
        root,
        "o.yaml",
        json.dumps(
            {
                "doctypes_dir": str(ROOT / "configs" / "doctypes"),
                "storage": {"landing_uri": str(root), "datasets_uri": str(root / "ds"), "runs_uri": str(root)},
                "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db"},
            }
        ),
    )
    configs = [ROOT / "configs" / "pipeline.yaml", ROOT / "configs" / "overlays" / "embedded.yaml", overlay]
    assert run_stage("ingest", configs, "--output", str(root / "ds"), "--batch", str(root / "landing")) == 0
    assert run_stage("export", configs, "--output", str(root / "export")) == 0
    return root / "export"


@pytest.fixture
def finetune_config(overlay, tiny_model, tmp_path) -> list[Path]:
    return [*overlay, write_overlay(tmp_path, "model.yaml", f"model: {{base: {tiny_model}}}\n")]
