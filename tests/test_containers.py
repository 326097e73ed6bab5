"""Stages as containers: the CPU stage image, built from docker/ and run through the Docker API.

There is no Docker engine here: podman serves the Docker API on a socket the tests start
(docker/podman/containers.conf holds the settings this sandbox needs), and
localhost/debian-base:bookworm, built from Debian's packages by docker/local-base.sh,
stands in for python:3.11-slim-bookworm, which cannot be pulled.
"""

from __future__ import annotations

import json

import mlflow
import pytest

import docker
from stages import tracking
from stages.config import TrackingConfig
from stages.manifest import RESULT_FILE, git_commit
from tests.conftest import LOCAL_BASE, ROOT

pytestmark = [pytest.mark.integration, pytest.mark.container]
STAGE_IMAGE = "localhost/doc-extraction/stages:test"


@pytest.fixture(scope="session")
def stage_image(docker_client) -> str:
    """docker/stages.Dockerfile built from the working tree."""
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


@pytest.fixture
def workdir(tmp_path):
    """A folder mounted at /work; writable by the image's unprivileged user (uid 1000)."""
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)
    (work / "overlay.yaml").write_text(
        "storage: {landing_uri: /work/landing, datasets_uri: /work/datasets, runs_uri: /work/runs}\n"
        "tracking: {tracking_uri: 'sqlite:////work/mlflow/mlflow.db', artifact_location: /work/mlflow/artifacts}\n"
    )
    return work


CONFIG_FLAGS = ["--config", "configs/pipeline.yaml", "--config", "configs/overlays/embedded.yaml",
                "--config", "/work/overlay.yaml"]  # fmt: skip


def test_stage_runs_in_its_container_and_continues_the_pipeline_run(docker_client, stage_image, workdir):
    # The host sees the store at workdir; the experiment's artifact root is the container's path.
    host_view = TrackingConfig(
        tracking_uri=f"sqlite:///{workdir}/mlflow/mlflow.db", artifact_location="/work/mlflow/artifacts"
    )
    parent = tracking.start_pipeline_run(host_view, "pipeline-in-containers", {})
    (workdir / "mlflow").chmod(0o777)
    (workdir / "mlflow" / "mlflow.db").chmod(0o666)

    logs = docker_client.containers.run(
        stage_image,
        ["python", "-m", "stages.synthetic", *CONFIG_FLAGS, "--output", "/work/landing/b1", "--count", "4"],
        environment={tracking.PARENT_RUN_ENV: parent},
        volumes={str(workdir): {"bind": "/work", "mode": "rw"}},
        network_mode="none",
        remove=True,
        stderr=True,
    ).decode()
    assert "synthetic succeeded" in logs

    result = json.loads((workdir / "landing" / "b1" / RESULT_FILE).read_text())
    assert result["counts"]["documents"] == 4
    assert result["versions"]["git_commit"] == git_commit()  # baked in at build time
    assert len(list((workdir / "landing" / "b1" / "images").glob("*.jpg"))) == 4
    client = mlflow.MlflowClient(host_view.tracking_uri)
    child = client.get_run(result["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent and child.info.status == "FINISHED"


def test_bad_input_in_a_container_exits_2_with_the_reason(docker_client, stage_image, workdir):
    with pytest.raises(docker.errors.ContainerError) as caught:
        docker_client.containers.run(
            stage_image,
            ["python", "-m", "stages.synthetic", *CONFIG_FLAGS, "--output", "/work/out", "--doc-types", "nope"],
            volumes={str(workdir): {"bind": "/work", "mode": "rw"}},
            network_mode="none",
            remove=True,
        )
    assert caught.value.exit_status == 2
    assert b"synthetic: error: --doc-types: unknown document type(s) ['nope']" in caught.value.stderr


def test_image_runs_unprivileged_and_holds_no_training_stack(docker_client, stage_image):
    out = docker_client.containers.run(
        stage_image,
        ["python", "-c", "import os, importlib.util as u; print(os.getuid(), u.find_spec('torch') is None)"],
        network_mode="none",
        remove=True,
    )
    assert out.decode().split() == ["1000", "True"]
