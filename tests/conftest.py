"""Shared fixtures: repository paths, a real S3 API server on loopback, per-test config overlays."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import yaml

import docker
from docpipe.config import S3Config
from docpipe.contract import config_flags

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "configs" / "pipeline.yaml"
EMBEDDED = ROOT / "configs" / "overlays" / "embedded.yaml"
SMOKE = ROOT / "tests" / "fixtures" / "smoke.yaml"  # machinery tests: a few steps, no fit gate
SHARED = Path(os.environ.get("SHARED_DIR", ROOT.parent / "shared"))  # CI clones with shared/ beside the repo
SROIE = SHARED / "data" / "sroie-sample"
LOCAL_BASE = "localhost/debian-base:bookworm"  # docker/local-base.sh; stands in for python:3.11-slim-bookworm


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    path = tmp_path / "test-overlay.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "doctypes_dir": str(ROOT / "configs" / "doctypes"),
                "storage": {
                    "landing_uri": str(tmp_path / "landing"),
                    "datasets_uri": str(tmp_path / "datasets"),
                    "runs_uri": str(tmp_path / "runs"),
                },
                "tracking": {
                    "tracking_uri": f"sqlite:///{tmp_path}/mlflow/mlflow.db",
                    "artifact_location": str(tmp_path / "mlflow" / "artifacts"),
                },
                "model": {"base": str(tmp_path / "models" / "tiny-minicpmv4_6")},  # the demo builds it there
            }
        )
    )
    return [PIPELINE, EMBEDDED, path]


@pytest.fixture
def overlay(embedded) -> list[Path]:
    """The embedded default in this test's folder, trained and gated for a machinery test (``SMOKE``)."""
    return [*embedded, SMOKE]


def _environ_without_mlflow() -> dict[str, str]:
    """This process's environment minus MLFLOW_*: mlflow.set_tracking_uri() exports
    MLFLOW_TRACKING_URI, which would leak one test's store into another's subprocess."""
    return {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}


def run_module(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, as a launcher would run it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**_environ_without_mlflow(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def doctypes_copy(tmp_path) -> Path:
    """A writable copy of the shipped document types, for tests that break one."""
    target = tmp_path / "doctypes"
    shutil.copytree(ROOT / "configs" / "doctypes", target)
    return target


def wait_for_http(url: str, alive: Callable[[], bool], timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200; fail early once ``alive()`` says the server died."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if not alive() or time.monotonic() > deadline:
            pytest.fail(f"{url} did not come up")
        time.sleep(0.25)


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


STAGE_IMAGE = "localhost/doc-extraction/stages:test"


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


TRAIN_IMAGE = "localhost/doc-extraction/train:test"


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


REMOTE_CODE = ROOT / "tests" / "fixtures" / "remote_code"  # model code we wrote to MiniCPM-V 2.6's interface


def build_remote_code_model(output: Path) -> Path:
    """A tiny checkpoint whose modeling and processing code ships in its folder (``auto_map``), as
    MiniCPM-V 2.6's does: the code of ``tests/fixtures/remote_code``, random weights, the tiny
    model's tokenizer with the ``<unk>`` the processor fills image slices with."""
    import torch
    from transformers import AutoConfig, AutoModel

    from toolkit.tiny_model import build_tokenizer

    output.mkdir(parents=True)
    for code in REMOTE_CODE.glob("*.py"):
        shutil.copy(code, output / code.name)
    tokenizer = build_tokenizer(ROOT / "configs" / "doctypes")
    tokenizer.add_special_tokens({"unk_token": "<unk>"})
    tokenizer.save_pretrained(output)
    config = {
        "model_type": "tiny_minicpmv",
        "architectures": ["TinyMiniCPMV"],
        "version": 2.6,
        "auto_map": {
            "AutoConfig": "configuration_tiny_minicpmv.TinyMiniCPMVConfig",
            "AutoModel": "modeling_tiny_minicpmv.TinyMiniCPMV",
        },
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
        "query_num": 4,
        "patch_size": 14,
        "slice_size": 28,
        "vision_hidden": 32,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    (output / "config.json").write_text(json.dumps(config))
    processor = {"AutoProcessor": "processing_tiny_minicpmv.TinyMiniCPMVProcessor"}
    (output / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "TinyMiniCPMVImageProcessor",
                "slice_size": 28,
                "patch_size": 14,
                "query_num": 4,
                "max_slice_nums": 9,
                "auto_map": {
                    "AutoImageProcessor": "image_processing_tiny_minicpmv.TinyMiniCPMVImageProcessor",
                    **processor,
                },
            }
        )
    )
    (output / "processor_config.json").write_text(
        json.dumps({"processor_class": "TinyMiniCPMVProcessor", "auto_map": processor})
    )
    torch.manual_seed(0)
    AutoModel.from_config(
        AutoConfig.from_pretrained(output, trust_remote_code=True), trust_remote_code=True
    ).save_pretrained(output)
    return output


@pytest.fixture(scope="session")
def remote_code_model(tmp_path_factory) -> Path:
    return build_remote_code_model(tmp_path_factory.mktemp("models") / "tiny-remote-code")


def run_stage(stage: str, config_paths: list[Path], *args: str) -> int:
    """A stage's CLI in this process (flags, tracking, result.json), as ``python -m`` would run it."""
    import importlib

    from docpipe.contract import main

    module = importlib.import_module(f"stages.{stage}")
    if hasattr(module, "__path__"):  # a package: the stage lives in its __main__
        module = importlib.import_module(f"stages.{stage}.__main__")
    return main(module.STAGE, module.build_parser(), module.run, [*config_flags(config_paths), *args])


def jpeg(seed: int = 0, size=(96, 64), **save_args) -> bytes:
    """A small, valid JPEG of seeded noise: another seed, another document."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", **save_args)
    return buffer.getvalue()


def land_synthetic(
    location: Path | str, count: int, seed: int = 0, doc_types: list[str] | None = None, s3: S3Config | None = None
) -> str:
    """A completed landing batch of ``count`` synthetic documents (every type unless named); its URI."""
    from docpipe.config import SyntheticConfig
    from docpipe.data.landing import write_batch
    from docpipe.doctypes import load_registry
    from docpipe.storage import open_storage
    from toolkit.synthetic import generate

    registry = load_registry(ROOT / "configs" / "doctypes")
    chosen = [registry[name] for name in doc_types] if doc_types else list(registry.values())
    store = open_storage(location, s3)
    write_batch(
        store,
        [(r, image) for r, image, _ in generate(chosen, SyntheticConfig(count=count, seed=seed))],
        producer="test",
    )
    return store.uri


def write_overlay(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


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


def finetune(config: list[Path], exported: Path, out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    """The stage as the DAG's local launcher runs it: its own process."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.finetune",
            *config_flags(config),
            "--data",
            str(exported),
            "--output",
            str(out),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **env},
    )
