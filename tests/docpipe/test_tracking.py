"""MLflow plumbing against a real store: parent and child runs, parameters without secrets."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import mlflow
import pytest

from docpipe import tracking
from docpipe.config import TrackingConfig
from docpipe.contract import config_flags
from docpipe.manifest import StageResult
from tests.helpers import run_module


@pytest.fixture
def tracking_config(tmp_path) -> TrackingConfig:
    return TrackingConfig(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment="test-exp",
        artifact_location=str(tmp_path / "artifacts"),
    )


def test_safe_params_drop_secrets_and_redact_values(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "planted-mlflow-password")
    params = tracking.safe_params(
        {
            "storage": {"s3": {"endpoint_url": "https://user:hunter2@minio:9000", "aws_secret_access_key": "x"}},
            "db_password": "x",
            "api_token": "x",
            "training": {"learning_rate": 1e-6},
            "mounts": ["s3://b/p", {"uri": "http://u:pw@h/x"}],  # lists and what they hold
            "note": "logged in with planted-mlflow-password",
            "orchestration": {"mounts": {"${DOC_EXTRACTION_DATA}/models": "/models"}},  # names MLflow refuses
        }
    )
    assert params == {
        "storage.s3.endpoint_url": "https://***@minio:9000",
        "training.learning_rate": "1e-06",
        "mounts": "['s3://b/p', {'uri': 'http://***@h/x'}]",
        "note": "logged in with ***",
        "orchestration.mounts.__DOC_EXTRACTION_DATA_/models": "/models",
    }


def test_stage_run_nests_under_the_pipeline_run(tracking_config, monkeypatch):
    parent = tracking.start_pipeline_run(tracking_config, "pipeline-1", {"model": {"base": "/models/x"}})
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    with tracking.stage_run(tracking_config, "ingest", {"batch": "s3://b/p", "password": "x"}) as child:
        assert mlflow.active_run().info.run_id == child != parent
    tracking.end_pipeline_run(tracking_config, parent, succeeded=True)

    client = mlflow.MlflowClient(tracking_config.tracking_uri)
    child_run, parent_run = client.get_run(child), client.get_run(parent)
    assert child_run.data.tags["mlflow.parentRunId"] == parent
    assert child_run.data.tags["pipeline.stage"] == "ingest"
    assert child_run.data.params == {"batch": "s3://b/p"}
    assert parent_run.data.params == {"model.base": "/models/x"}
    assert parent_run.info.status == "FINISHED" and child_run.info.status == "FINISHED"
    assert child_run.info.artifact_uri.startswith(Path(tracking_config.artifact_location).resolve().as_uri())


def test_the_pipeline_run_carries_what_a_reviewer_looks_for(tracking_config, tmp_path, monkeypatch):
    """Headline metrics, dataset version, eval set, document types and the gate on the parent run, the
    evaluation's dataset as its input, and an experiment the UI opens on its runs table."""
    parent = tracking.start_pipeline_run(tracking_config, "pipeline", {})
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    (tmp_path / "ds").mkdir()
    with tracking.stage_run(tracking_config, "evaluate", {}) as evaluate_run:
        tracking.log_dataset(str(tmp_path / "ds"), "v123", context="evaluation")
    stages = {
        "export": {"status": "succeeded", "inputs": {"dataset": str(tmp_path / "ds"), "version": "v123"}},
        "evaluate": {
            "status": "succeeded",
            "mlflow_run_id": evaluate_run,
            "inputs": {"eval_set": "golden@v123"},
            "metrics": {
                "field_accuracy": 0.97,
                "document_accuracy": 0.9,
                "json_validity": 1.0,
                "ocr_baseline.field_accuracy": 0.62,
                "gate_passed": 1.0,
                "fit.field_accuracy": 0.99,
            },
        },
    }
    tracking.end_pipeline_run(tracking_config, parent, True, stages, ["receipt_en", "thsr_ticket"])

    client = mlflow.MlflowClient(tracking_config.tracking_uri)
    run = client.get_run(parent)
    assert run.data.metrics == {
        "field_accuracy": 0.97,
        "document_accuracy": 0.9,
        "json_validity": 1.0,
        "ocr_baseline.field_accuracy": 0.62,
        "gate_passed": 1.0,
    }
    assert {k: run.data.tags[k] for k in ("dataset.version", "eval_set", "doc_types", "gate.passed")} == {
        "dataset.version": "v123",
        "eval_set": "golden@v123",
        "doc_types": "receipt_en,thsr_ticket",
        "gate.passed": "true",
    }
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.digest == "v123" and {t.value for t in used.tags} == {"evaluation"}
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_parent_stays_running_until_ended(tracking_config):
    parent = tracking.start_pipeline_run(tracking_config, "p", {})
    client = mlflow.MlflowClient(tracking_config.tracking_uri)
    assert client.get_run(parent).info.status == "RUNNING"
    tracking.end_pipeline_run(tracking_config, parent, succeeded=False)
    assert client.get_run(parent).info.status == "FAILED"


def test_failed_result_marks_the_run_failed(tracking_config):
    from datetime import datetime

    now = datetime.now(UTC)
    with tracking.stage_run(tracking_config, "export", {}) as run_id:
        tracking.log_result(
            StageResult(
                stage="export",
                status="failed",
                exit_code=1,
                error="boom",
                started_at=now,
                finished_at=now,
                duration_s=0.0,
            )
        )
    run = mlflow.MlflowClient(tracking_config.tracking_uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["pipeline.error"] == "boom"


@pytest.mark.integration
def test_stage_process_continues_the_pipeline_run(overlay, tmp_path):
    """A stage launched with MLFLOW_RUN_ID logs a child of that run, as the DAG's launchers do."""
    from docpipe.config import load_pipeline_config

    config = load_pipeline_config(overlay)
    parent = tracking.start_pipeline_run(config.tracking, "pipeline", {})
    done = run_module(
        "toolkit.synthetic",
        *config_flags(overlay),
        "--output",
        str(tmp_path / "b"),
        "--count",
        "2",
        env={tracking.PARENT_RUN_ENV: parent},
    )
    assert done.returncode == 0, done.stderr
    client = mlflow.MlflowClient(config.tracking.tracking_uri)
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert [run.info.run_name for run in children] == ["synthetic"]
    assert client.get_run(parent).info.status == "RUNNING"  # the stage did not end the pipeline's run


@pytest.mark.integration
def test_tracking_through_an_mlflow_server(mlflow_server, monkeypatch):
    """The compose path: runs and artifacts go through the server's REST API and artifact proxy."""
    from datetime import UTC, datetime

    config = TrackingConfig(tracking_uri=mlflow_server, experiment="through-server")
    parent = tracking.start_pipeline_run(config, "pipeline", {"model": {"base": "s3://models/x"}})
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    now = datetime.now(UTC)
    with tracking.stage_run(config, "evaluate", {"threshold": 0.9}) as child:
        tracking.log_result(
            StageResult(
                stage="evaluate",
                status="succeeded",
                exit_code=0,
                metrics={"acc": 0.97},
                started_at=now,
                finished_at=now,
                duration_s=1.5,
            )
        )
    tracking.end_pipeline_run(config, parent, succeeded=True)

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.metrics["acc"] == 0.97
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/evaluate/result.json")["metrics"] == {"acc": 0.97}
