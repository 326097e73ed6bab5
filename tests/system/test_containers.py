"""Stages as containers: the CPU stage image, built from docker/ and run through the Docker API.

There is no Docker engine here: podman serves the Docker API on a socket the tests start
(docker/podman/containers.conf holds the settings this sandbox needs), and
localhost/debian-base:bookworm, built from Debian's packages by docker/local-base.sh,
stands in for python:3.11-slim-bookworm, which cannot be pulled.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import mlflow
import pytest

import docker
from docpipe import tracking
from docpipe.config import TrackingConfig, load_pipeline_config
from docpipe.manifest import RESULT_FILE, git_commit
from docpipe.orchestration.containers import gpu_run_arguments
from tests.helpers import LOCAL_BASE, ROOT, SMOKE, land_synthetic, run_stage

pytestmark = [pytest.mark.integration, pytest.mark.container]


@pytest.fixture
def workdir(tmp_path):
    """A folder mounted at /work; writable by the image's unprivileged user (uid 1000)."""
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)
    shutil.copy(SMOKE, work / "smoke.yaml")
    (work / "overlay.yaml").write_text(
        "storage: {landing_uri: /work/landing, datasets_uri: /work/datasets, runs_uri: /work/runs}\n"
        "tracking: {tracking_uri: 'sqlite:////work/mlflow/mlflow.db', artifact_location: /work/mlflow/artifacts}\n"
    )
    return work


CONFIG_FLAGS = [
    "--config",
    "configs/pipeline.yaml",
    "--config",
    "configs/overlays/embedded.yaml",
    "--config",
    "/work/smoke.yaml",
    "--config",
    "/work/overlay.yaml",
]


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
        ["python", "-m", "toolkit.synthetic", *CONFIG_FLAGS, "--output", "/work/landing/b1", "--count", "4"],
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
            ["python", "-m", "toolkit.synthetic", *CONFIG_FLAGS, "--output", "/work/out", "--doc-types", "nope"],
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


# --- the GPU training image, built here from the Debian stand-in with the CPU torch wheel ----------


def test_gpu_run_settings_reach_the_container(docker_client, train_image):
    """GPUs cannot be handed over here: the created container's configuration is checked instead."""
    settings = load_pipeline_config([ROOT / "configs" / "pipeline.yaml"]).gpu_container
    container = docker_client.containers.create(train_image, ["true"], **gpu_run_arguments(settings, gpus=2))
    try:
        host = container.attrs["HostConfig"]
        assert host["ShmSize"] == 32 * 2**30
        ulimits = {u["Name"].lower().removeprefix("rlimit_"): u["Hard"] for u in host["Ulimits"]}  # podman: RLIMIT_*
        assert ulimits.items() >= {"memlock": -1, "stack": 67108864}.items()
        env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
        assert {"NCCL_DEBUG": "WARN", "NCCL_P2P_DISABLE": "0", "NCCL_IB_DISABLE": "0"}.items() <= env.items()
    finally:
        container.remove()
    (request,) = gpu_run_arguments(settings, gpus=2)["device_requests"]  # podman's inspect does not show them
    assert request["Count"] == 2 and request["Capabilities"] == [["gpu"]]
    (request,) = gpu_run_arguments(settings, gpus=["0", "3"])["device_requests"]
    assert request["DeviceIDs"] == ["0", "3"]


def export_for_containers(workdir: Path, tiny_model: Path, export: str = "export") -> None:
    """Ingest and export on the host into ``workdir/<export>``, paths as containers see them
    (/work), the tiny model at /work/model; everything writable by the image's user."""
    shutil.copytree(tiny_model, workdir / "model")
    overlay = workdir / "overlay.yaml"
    overlay.write_text(overlay.read_text() + "model: {base: /work/model}\nexport: {image_root: /work/datasets}\n")
    host_overlay = workdir / "host.yaml"
    host_overlay.write_text(
        f"storage: {{landing_uri: {workdir}/landing, datasets_uri: {workdir}/datasets, "
        f"runs_uri: {workdir}/runs}}\ntracking: {{tracking_uri: 'sqlite:///{workdir}/host.db'}}\n"
        "export: {image_root: /work/datasets}\n"
    )
    host_configs = [
        ROOT / "configs" / "pipeline.yaml",
        ROOT / "configs" / "overlays" / "embedded.yaml",
        SMOKE,
        host_overlay,
    ]
    land_synthetic(workdir / "landing", 12)
    assert (
        run_stage("ingest", host_configs, "--output", str(workdir / "datasets"), "--batch", str(workdir / "landing"))
        == 0
    )
    assert run_stage("export", host_configs, "--output", str(workdir / export)) == 0
    for path in workdir.rglob("*"):
        path.chmod(0o777 if path.is_dir() else 0o666)


def test_finetune_and_patch_run_in_the_training_image(docker_client, train_image, workdir, tiny_model):
    """The stages as the DAG runs them on a GPU node, here on CPU: shared memory as configured
    (the sandbox forbids raising ulimits, so those are left out of this run)."""
    export_for_containers(workdir, tiny_model)
    settings = load_pipeline_config([ROOT / "configs" / "pipeline.yaml"]).gpu_container
    arguments = {key: value for key, value in gpu_run_arguments(settings, gpus=None).items() if key != "ulimits"}
    run = partial(
        docker_client.containers.run,
        train_image,
        volumes={str(workdir): {"bind": "/work", "mode": "rw"}},
        network_mode="none",
        remove=True,
        stderr=True,
        **arguments,
    )
    shm = run(["python", "-c", "import os; s = os.statvfs('/dev/shm'); print(s.f_blocks * s.f_frsize)"])
    assert int(shm.decode()) == 32 * 2**30
    logs = run(["python", "-m", "stages.finetune", *CONFIG_FLAGS, "--data", "/work/export", "--output", "/work/ft"])
    assert b"finetune succeeded" in logs
    result = json.loads((workdir / "ft" / RESULT_FILE).read_text())
    assert result["counts"]["global_step"] == 12 and result["versions"]["torch"].startswith("2.13.0")
    logs = run(["python", "-m", "stages.patch", *CONFIG_FLAGS, "--finetune", "/work/ft", "--output", "/work/model-out"])
    assert b"patch succeeded" in logs
    assert (workdir / "model-out" / "preprocessor_config.json").is_file()


def test_preflight_runs_in_the_training_image_on_a_remote_code_checkpoint(
    docker_client, train_image, workdir, remote_code_model
):
    """The README's preflight command in the image it is meant for: the checkpoint's own code is
    loaded by an unprivileged user (transformers copies it into its module cache) and the stages
    run one training step, patch and answer."""
    from toolkit.preflight import PIPELINE_STAGES

    shutil.copytree(remote_code_model, workdir / "model")
    for path in workdir.rglob("*"):
        path.chmod(0o777 if path.is_dir() else 0o666)
    remote = json.dumps({"model": {"adapter": "remote_code", "llm_type": "qwen2"}})  # reaches every stage too
    command = [
        "python",
        "-m",
        "toolkit.preflight",
        "--config",
        "configs/pipeline.yaml",
        "--config",
        "configs/overlays/embedded.yaml",
        "--overrides",
        remote,
        "--base",
        "/work/model",
        "--output",
        "/work/preflight",
    ]
    logs = docker_client.containers.run(
        train_image,
        command,
        volumes={str(workdir): {"bind": "/work", "mode": "rw"}},
        network_mode="none",
        remove=True,
        stderr=True,
    )
    assert b"preflight passed" in logs, logs[-3000:]
    checks = {c["name"]: c for c in json.loads((workdir / "preflight" / "preflight.json").read_text())["checks"]}
    assert list(checks) == ["environment", "imports", *PIPELINE_STAGES]
    assert {check["status"] for check in checks.values()} == {"passed"}
    assert "all resolve" in checks["imports"]["detail"] and "answered" in checks["patch"]["detail"]
    finetune = json.loads((workdir / "preflight" / "finetune" / RESULT_FILE).read_text())
    assert finetune["counts"]["global_step"] == 1 and finetune["counts"]["train"] == 2  # one step, two documents
    model = workdir / "preflight" / "model"
    assert {p.name for p in remote_code_model.glob("*.py")} <= {p.name for p in model.glob("*.py")}


def test_dockerfiles_are_hadolint_clean():
    """Every Dockerfile of the project (.hadolint.yaml says which rule is off, and why)."""
    files = [
        *sorted((ROOT / "docker").glob("**/*.Dockerfile")),  # docker/local's stand-ins too
        ROOT / "tests" / "fixtures" / "vllm-standin" / "Dockerfile",
    ]
    assert len(files) >= 6
    done = subprocess.run(
        [str(Path(sys.executable).with_name("hadolint")), *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
@pytest.mark.container
def test_airflow_image_parses_the_dags_with_its_providers_and_no_training_stack(docker_client):
    """The compose Airflow image, built here from the Debian stand-in: both DAGs load with the
    compose overlay's docker launcher, and the image holds no torch or transformers."""
    image = "localhost/doc-extraction/airflow:test"
    docker_client.images.build(
        path=str(ROOT),
        dockerfile="docker/airflow.Dockerfile",
        tag=image,
        rm=True,
        buildargs={"BASE_IMAGE": LOCAL_BASE, "GIT_COMMIT": git_commit()},
    )
    probe = (
        "import json, importlib.util as u; from airflow.dag_processing.dagbag import DagBag; b = DagBag(); "
        "print(json.dumps({'dags': sorted(b.dags), 'errors': {k: str(v) for k, v in b.import_errors.items()}, "
        "'torch': u.find_spec('torch') is not None, 'transformers': u.find_spec('transformers') is not None, "
        "'postgres': [u.find_spec(m) is not None for m in ('psycopg2', 'asyncpg')]}))"
    )
    output = docker_client.containers.run(
        image,
        ["-c", probe],
        entrypoint=["python"],
        network_mode="none",
        remove=True,
        environment={
            "DOC_EXTRACTION_CONFIG": "configs/pipeline.yaml:configs/overlays/compose.yaml",
            "DOC_EXTRACTION_DATA": "/srv/doc-extraction",
        },
    )
    parsed = json.loads(output.decode().strip().splitlines()[-1])
    assert parsed == {
        "dags": ["doc_extraction", "doc_extraction_landing_watcher"],
        "errors": {},
        "torch": False,
        "transformers": False,
        "postgres": [True, True],
    }


def _losses(checkpoints: Path) -> list[float]:
    last = max(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return [e["loss"] for e in json.loads((last / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def test_two_nodes_in_containers_train_as_one_node_with_two_processes(docker_client, train_image, workdir, tiny_model):
    """The multi-node path for real, without a cluster: two containers of the training image on
    one podman network run the command and environment of the TrainJob the kubernetes launcher
    builds, with the PET_ variables Kubeflow Trainer's torch-distributed runtime sets in each
    node's pod; node 0 hosts the c10d rendezvous; both mount one folder (the shared volume).
    Reference: one container, one node, two processes, same seed and global batch (2 x 2).
    Both under DeepSpeed ZeRO-2 over gloo (NCCL's place on CPU)."""
    from docpipe.config import load_pipeline_config
    from docpipe.orchestration.plan import Plan
    from docpipe.orchestration.trainjob import finetune_job

    export_for_containers(workdir, tiny_model, export="runs/two/export")
    shutil.copytree(workdir / "runs" / "two" / "export", workdir / "runs" / "one" / "export")
    for path in [workdir / "runs" / "one", *(workdir / "runs" / "one").rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    config = load_pipeline_config([ROOT / "configs" / "pipeline.yaml"], {"orchestration": {"launcher": "kubernetes"}})
    zero2 = {
        "training": {
            "deepspeed": "zero2",
            "max_steps": 8,
            "eval_steps": 8,
            "save_steps": 8,  # as on GPUs:
            "selection": "eval_loss",
            "selection_documents": 0,
        }
    }  # DeepSpeed; the curve, not answers
    plan = Plan(
        run_name="two",
        run_uri="/work/runs/two",
        datasets_uri="/work/datasets",
        batches=[],
        overrides=zero2,
        gpus=0,
        nodes=2,
        skip_publish=True,
        dry_run=False,
        tracking_uri="sqlite:////work/mlflow/mlflow.db",
    )
    trainer = finetune_job("ft-two-1", config, plan, CONFIG_FLAGS[1::2]).spec.trainer
    command = trainer.command + trainer.args
    assert trainer.num_nodes == 2 and command[:3] == ["python", "-m", "stages.finetune"]
    environment = {e.name: e.value for e in trainer.env}
    environment["TORCH_EXTENSIONS_DIR"] = "/work/torch-extensions"  # DeepSpeed's CPU ops built once, not per node
    volumes = {str(workdir): {"bind": "/work", "mode": "rw"}}

    one = [a.replace("/work/runs/two", "/work/runs/one") for a in command]
    logs = docker_client.containers.run(
        train_image,
        one,
        environment={**environment, "GPUS_PER_NODE": "2"},
        volumes=volumes,
        network_mode="none",
        remove=True,
        stderr=True,
        shm_size="1g",
    )
    assert b"finetune succeeded" in logs

    network = docker_client.networks.create("doc-extraction-two-nodes")
    nodes = []
    try:
        for rank in (0, 1):
            pet = {
                "PET_NNODES": "2",
                "PET_NPROC_PER_NODE": "1",
                "PET_NODE_RANK": str(rank),
                "PET_MASTER_ADDR": "node-0",
                "PET_MASTER_PORT": "29400",
            }
            nodes.append(
                docker_client.containers.run(
                    train_image,
                    command,
                    name=f"node-{rank}",
                    hostname=f"node-{rank}",
                    network=network.name,
                    environment={**environment, **pet},
                    volumes=volumes,
                    shm_size="1g",
                    detach=True,
                )
            )
        codes = [node.wait(timeout=900)["StatusCode"] for node in nodes]
        node_logs = [node.logs().decode(errors="replace") for node in nodes]
        assert codes == [0, 0], "\n".join(log[-3000:] for log in node_logs)
    finally:
        for node in nodes:
            node.remove(force=True)
        network.remove()

    two = workdir / "runs" / "two" / "finetune"
    result = json.loads((two / RESULT_FILE).read_text())  # node 0 reports the run
    worker = json.loads((two / "nodes" / "1" / RESULT_FILE).read_text())  # node 1 its own part, beside it
    assert result["status"] == worker["status"] == "succeeded" and worker["counts"]["node_rank"] == 1
    assert result["counts"]["global_step"] == 8
    assert len(list((two / "checkpoint-8").glob("global_step8/*optim_states.pt"))) == 2  # a shard per process
    reference, spanning = _losses(workdir / "runs" / "one" / "finetune"), _losses(two)
    assert len(reference) == len(spanning) == 8
    gap = max(abs(a - b) for a, b in zip(reference, spanning, strict=True))
    print(f"loss curves, one node x 2 processes vs two nodes x 1: max |difference| {gap:.2e} over 8 steps")
    assert gap <= 1e-3 * max(reference)  # the stated tolerance: 0.1% of the largest loss
