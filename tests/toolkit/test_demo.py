"""The README's demo, end to end: a synthetic batch lands, the landing watcher announces it, and
the pipeline DAG runs every stage through ``airflow dags test``; MLflow shows the pipeline's runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from docpipe.contract import config_flags
from docpipe.data.landing import read_marker
from docpipe.storage import open_storage
from tests.helpers import run_module

pytestmark = pytest.mark.integration


def test_demo_generates_a_batch_and_leaves_mlflow_runs(embedded, tmp_path):
    """The embedded default as shipped: the model learns its documents, and the gate says so."""
    done = run_module("toolkit.demo", *config_flags(embedded), "--count", "12", "--airflow-home", str(tmp_path / "af"))
    assert done.returncode == 0, done.stderr

    batch_uri = re.search(r"Labelled batch:\s+(\S+)", done.stdout).group(1)
    assert batch_uri.startswith(str(tmp_path / "landing" / "batch-"))
    assert read_marker(open_storage(batch_uri)).records == 12
    outputs = Path(re.search(r"Run outputs:\s+(\S+)", done.stdout).group(1))
    examples = json.loads((outputs / "export" / "train.json").read_text()) + json.loads(
        (outputs / "export" / "eval.json").read_text()
    )
    assert len(examples) == 12 and all(Path(e["image"]).is_file() for e in examples)
    finetuned = json.loads((outputs / "finetune" / "result.json").read_text())
    assert finetuned["counts"]["global_step"] == 300 and (outputs / "model" / "preprocessor_config.json").is_file()
    saved = json.loads((outputs / "evaluate" / "metrics.json").read_text())
    fit = re.search(r"Fit \(training documents\): +field accuracy (\S+),", done.stdout).group(1)
    assert float(fit) == pytest.approx(saved["fit"]["overall"]["field_accuracy"], abs=5e-4) and float(fit) >= 0.9
    assert re.search(r"Image control \(swapped\): +field accuracy", done.stdout)
    assert re.search(r"Eval set \(unseen\): +field accuracy", done.stdout)
    assert "Gate: passed: every check passed" in done.stdout
    report = Path(re.search(r"Report:\s+(\S+)", done.stdout).group(1))
    assert report == outputs / "evaluate" / "report.html" and "Gate:" in report.read_text()

    run_id = re.search(r"MLflow run:\s+(\w+)", done.stdout).group(1)
    uri = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("airflow-manual__")
    assert parent.data.tags["run.folder"] == str(outputs)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(c.info.run_name for c in children) == ["evaluate", "export", "finetune", "ingest", "patch"]
    assert {c.info.status for c in children} == {"FINISHED"}

    # The command the demo prints for listing runs works and shows both.
    listing = subprocess.run(
        [str(Path(sys.executable).with_name("mlflow")), "runs", "list", "--experiment-id", parent.info.experiment_id],
        env={"MLFLOW_TRACKING_URI": uri, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0, listing.stderr
    assert run_id in listing.stdout and all(c.info.run_id in listing.stdout for c in children)
    assert f"--experiment-id {parent.info.experiment_id}" in done.stdout


def test_demo_fails_when_a_stage_fails(overlay, tmp_path):
    """Every document is longer than this model_max_length: finetune refuses to train, the DAG
    run fails, and so do the demo and the pipeline's MLflow run."""
    short = tmp_path / "short.yaml"
    short.write_text("training: {model_max_length: 64}\nevaluation: {ocr_baseline: false}\n")
    done = run_module(
        "toolkit.demo", *config_flags([*overlay, short]), "--count", "4", "--airflow-home", str(tmp_path / "af")
    )
    assert done.returncode == 1
    assert "demo: the pipeline DAG failed with exit code 1" in done.stderr
    run_id = re.search(r"MLflow run:\s+(\w+) \(FAILED\)", done.stdout).group(1)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    assert client.get_run(run_id).info.status == "FAILED"
    experiment = client.get_run(run_id).info.experiment_id
    stage = f"tags.mlflow.parentRunId = '{run_id}' and tags.`pipeline.stage` = 'finetune'"
    (finetune,) = client.search_runs([experiment], stage)
    assert finetune.info.status == "FAILED"


def test_demo_bad_config_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("doc_types: []\n")
    done = run_module("toolkit.demo", "--config", str(bad))
    assert done.returncode == 2 and f"{bad}: doc_types:" in done.stderr
