"""The publish stage: Model Registry versions and aliases, and the serving image built, pushed
and smoke-tested through the OpenAI API.

What stands in for what here (no GPU, nothing can be pulled):
- the official vLLM OpenAI-server image: ``tests/fixtures/vllm-standin``, the project's training
  image plus a ``vllm serve`` that runs ``toolkit.openai_standin`` (the same API) on CPU;
- the container registry: Debian's ``docker-registry`` on loopback, plain HTTP;
- the GPU: none (``publish.smoke_gpus: 0``); the serving image's own build is the real one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest

from docpipe.contract import config_flags
from stages.publish.image import serve_flags
from tests.helpers import ROOT, land_synthetic, run_stage, write_overlay

STANDIN = "localhost/vllm-standin:test"


@pytest.fixture(scope="module")
def answering(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """A tiny model trained until it answers in its schema (SROIE-style receipts, whose schema a
    small model meets soonest; 16 documents learnt by heart), patched, and its export: what a
    published model looks like, in a minute or two on CPU."""
    root = tmp_path_factory.mktemp("answering")
    land_synthetic(root / "landing", 16, seed=3, doc_types=["receipt_en"])
    overlay = write_overlay(
        root,
        "o.yaml",
        json.dumps(
            {
                "doc_types": ["receipt_en"],
                "model": {"base": str(tiny_model)},
                "export": {"prompt_variants": False},
                "storage": {"landing_uri": str(root), "datasets_uri": str(root / "ds"), "runs_uri": str(root)},
                "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db"},
                "training": {
                    "max_steps": 300,
                    "learning_rate": 3e-3,
                    "per_device_train_batch_size": 4,
                    "eval_steps": 300,
                    "save_steps": 300,
                    "dataloader_num_workers": 0,
                },
            }
        ),
    )
    configs = [ROOT / "configs" / "pipeline.yaml", ROOT / "configs" / "overlays" / "embedded.yaml", overlay]
    assert run_stage("ingest", configs, "--output", str(root / "ds"), "--batch", str(root / "landing")) == 0
    assert run_stage("export", configs, "--output", str(root / "export")) == 0
    flags = config_flags(configs)
    for stage, extra in (("finetune", ["--data", str(root / "export")]), ("patch", ["--finetune", str(root / "ft")])):
        out = root / ("ft" if stage == "finetune" else "model")
        done = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}", *flags, *extra, "--output", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    return {"model": root / "model", "export": root / "export", "random": tiny_model}


def _evaluate(config: list[Path], model: Path, export: Path, out: Path) -> Path:
    code = run_stage("evaluate", config, "--data", str(export), "--model", str(model), "--output", str(out))
    assert code == 0
    return out


def _publish(config, model: Path, evaluation: Path, out: Path) -> int:
    return run_stage("publish", config, "--model", str(model), "--evaluation", str(evaluation), "--output", str(out))


@pytest.fixture
def publish_config(overlay, tmp_path, local_registry) -> list[Path]:
    settings = {
        "doc_types": ["receipt_en"],
        "evaluation": {"ocr_baseline": False, "max_new_tokens": 256},
        "publish": {
            "registered_model": "receipts",
            "image_repository": f"{local_registry}/doc/serving",
            "vllm_image": STANDIN,
            "smoke_gpus": 0,
            "smoke_timeout_s": 240,
            "serving": {"served_model_name": "receipts"},
        },
    }
    return [*overlay, write_overlay(tmp_path, "publish.yaml", json.dumps(settings))]


def test_serve_flags_are_vllms_and_in_one_place(overlay):
    from docpipe.config import load_pipeline_config

    config = load_pipeline_config(overlay)
    flags = serve_flags(config, "/models/served")
    assert flags == {
        "model": "/models/served",
        "served-model-name": "doc-extraction",
        "max-model-len": 4096,
        "limit-mm-per-prompt": '{"image": 1}',
        "gpu-memory-utilization": 0.9,
        "port": 8000,
    }
    remote = config.model_copy(
        update={"model": config.model.model_copy(update={"adapter": "remote_code", "llm_type": "qwen2"})}
    )
    streamed = serve_flags(remote, "s3://models/tickets/3")
    assert streamed["trust-remote-code"] is True and streamed["load-format"] == "runai_streamer"


@pytest.mark.integration
def test_a_failed_gate_registers_a_challenger_and_serves_nothing(publish_config, answering, tmp_path):
    perfect = "{field_accuracy: 1.0, document_accuracy: 1.0, json_validity: 1.0}"
    strict = write_overlay(
        tmp_path, "strict.yaml", f"evaluation: {{thresholds: {perfect}, per_doc_type: {{receipt_en: {perfect}}}}}\n"
    )
    config = [*publish_config, strict]
    evaluation = _evaluate(config, answering["random"], answering["export"], tmp_path / "evaluate")
    out = tmp_path / "publish"
    assert _publish(config, answering["random"], evaluation, out) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["counts"]["served"] == 0 and result["outputs"]["version"] == "1"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    version = client.get_model_version_by_alias("receipts", "challenger")
    assert version.tags["gate.passed"] == "false" and "eval_set" in version.tags
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("receipts", "champion")


@pytest.fixture(scope="module")
def vllm_standin(docker_client, train_image) -> str:
    docker_client.images.build(
        path=str(ROOT / "tests" / "fixtures" / "vllm-standin"),
        tag=STANDIN,
        rm=True,
        buildargs={"BASE_IMAGE": train_image},
    )
    return STANDIN


@pytest.fixture
def docker_host(docker_client, monkeypatch) -> None:
    """The stage finds the engine as a worker does, through DOCKER_HOST: here podman's socket."""
    monkeypatch.setenv("DOCKER_HOST", docker_client.docker_host)


@pytest.mark.integration
@pytest.mark.container
def test_publish_pushes_smoke_tests_and_promotes(
    publish_config, answering, tmp_path, docker_host, vllm_standin, local_registry
):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    evaluation = _evaluate(publish_config, answering["model"], answering["export"], tmp_path / "evaluate")
    for attempt in (1, 2):
        out = tmp_path / f"publish{attempt}"
        assert _publish(publish_config, answering["model"], evaluation, out) == 0, json.loads(
            (out / "result.json").read_text()
        )["error"]
        result = json.loads((out / "result.json").read_text())
        assert result["outputs"]["champion"] == str(attempt) and result["outputs"]["digest"].startswith("sha256:")
    with urllib.request.urlopen(f"http://{local_registry}/v2/doc/serving/tags/list") as response:
        assert set(json.load(response)["tags"]) >= {"v1", "v2"}  # pushed to the registry
    champion = client.get_model_version_by_alias("receipts", "champion")
    assert str(champion.version) == "2" and champion.tags["serving.image"].endswith(result["outputs"]["digest"])
    assert str(client.get_model_version_by_alias("receipts", "previous-champion").version) == "1"
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["serving.digest"] == result["outputs"]["digest"]

    rolled = subprocess.run(
        [sys.executable, "-m", "stages.publish.rollback", *config_flags(publish_config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rolled.returncode == 0 and "champion 2 -> 1" in rolled.stdout, rolled.stderr
    assert str(client.get_model_version_by_alias("receipts", "champion").version) == "1"


@pytest.mark.integration
@pytest.mark.container
def test_a_failed_smoke_test_moves_no_alias(publish_config, answering, tmp_path, docker_host, vllm_standin):
    """The random model passes the zero thresholds of the embedded gate but answers no JSON."""
    evaluation = _evaluate(publish_config, answering["random"], answering["export"], tmp_path / "evaluate")
    out = tmp_path / "publish"
    assert _publish(publish_config, answering["random"], evaluation, out) == 1
    error = json.loads((out / "result.json").read_text())["error"]
    assert "SmokeTestFailed" in error and "server log tail" in error
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    assert str(client.get_model_version_by_alias("receipts", "challenger").version) == "1"
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("receipts", "champion")
