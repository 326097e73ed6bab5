"""The README's demo, end to end: a synthetic batch lands, the landing watcher announces it, and
the pipeline DAG runs every stage through ``airflow dags test``; MLflow shows the pipeline's runs.
Then the path a new user takes next: ``make airflow`` on the demo's state starts no second run of
the same data, and Ctrl-C while a task runs leaves that run failed with the reason, not retrying."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest

from docpipe.contract import config_flags
from docpipe.data.landing import read_marker
from docpipe.storage import open_storage
from tests.helpers import ROOT, airflow_api, embedded_configs, free_port, run_module, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """The demo run once, on the embedded default as shipped, in a folder of its own."""
    folder = tmp_path_factory.mktemp("demo")
    configs = embedded_configs(folder)
    done = run_module("toolkit.demo", *config_flags(configs), "--count", "12", "--airflow-home", str(folder / "af"))
    return {"done": done, "configs": configs, "folder": folder}


def test_demo_generates_a_batch_and_leaves_mlflow_runs(demo):
    """The embedded default as shipped: the model learns its documents, and the gate says so."""
    done, tmp_path = demo["done"], demo["folder"]
    assert done.returncode == 0, done.stderr
    assert "1 queued run(s) of doc_extraction consumed" in done.stdout  # the watcher's event queued one

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


def test_after_the_demo_make_airflow_starts_no_second_run_and_ctrl_c_fails_the_running_one(demo):
    """``make airflow`` on the demo's state: a minute with the scheduler's heartbeat seen, and no
    pipeline run queued or started, no stage run; then a manual run, interrupted (SIGINT, as Ctrl-C)
    while finetune trains, is failed with the reason as its note, no task left to retry."""
    assert demo["done"].returncode == 0, demo["done"].stderr
    folder, home, port = demo["folder"], demo["folder"] / "af", free_port()
    runs_before = sorted(p.name for p in (folder / "runs").iterdir())
    log = folder / "local-airflow.log"
    with log.open("w") as out:
        service = subprocess.Popen(
            [sys.executable, "-m", "toolkit.local_airflow", *config_flags(demo["configs"]), "--airflow-home", str(home)]
            + ["--port", str(port)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url, token = started(service, log, home, port)
        beat = wait_for(lambda: scheduler_heartbeat(url, token), 180, "the scheduler's heartbeat")
        print(f"scheduler heartbeat seen: {beat}")
        quiet_until = time.monotonic() + 60
        while time.monotonic() < quiet_until:
            runs = airflow_api(url, "/api/v2/dags/doc_extraction/dagRuns", token)["dag_runs"]
            assert [(r["run_type"], r["state"]) for r in runs] == [("manual", "success")], runs  # the demo's own
            time.sleep(5)
        assert sorted(p.name for p in (folder / "runs").iterdir()) == runs_before  # no stage wrote anything
        assert scheduler_heartbeat(url, token) != beat  # it was alive all along

        run = airflow_api(url, "/api/v2/dags/doc_extraction/dagRuns", token, {"logical_date": None, "conf": {}})
        wait_for(lambda: task_state(url, token, run["dag_run_id"], "finetune") == "running", 300, "finetune running")
        service.send_signal(signal.SIGINT)
        assert service.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if service.poll() is None:
            service.kill()
    assert f"doc_extraction {run['dag_run_id']} marked failed" in log.read_text()
    with sqlite3.connect(home / "airflow.db") as db:
        (state,) = db.execute("select state from dag_run where run_id = ?", (run["dag_run_id"],)).fetchone()
        tasks = dict(db.execute("select task_id, state from task_instance where run_id = ?", (run["dag_run_id"],)))
        notes = [n for (n,) in db.execute("select content from dag_run_note join dag_run on dag_run.id = dag_run_id")]
    assert state == "failed" and tasks["finetune"] == "failed", tasks
    assert "up_for_retry" not in tasks.values() and any("make airflow was interrupted" in n for n in notes), notes


def started(service: subprocess.Popen, log: Path, home: Path, port: int) -> tuple[str, str]:
    """The local Airflow's URL and an admin token, once its banner says it is up."""
    wait_for(lambda: "Airflow is up" in log.read_text() or service.poll() is not None, 420, "the start banner")
    assert service.poll() is None, log.read_text()[-3000:]
    password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
    url = f"http://127.0.0.1:{port}"
    return url, airflow_api(url, "/auth/token", body={"username": "admin", "password": password})["access_token"]


def scheduler_heartbeat(url: str, token: str) -> str | None:
    scheduler = airflow_api(url, "/api/v2/monitor/health", token)["scheduler"]
    return scheduler["latest_scheduler_heartbeat"] if scheduler["status"] == "healthy" else None


def task_state(url: str, token: str, run_id: str, task_id: str) -> str | None:
    path = f"/api/v2/dags/doc_extraction/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/{task_id}"
    try:
        return airflow_api(url, path, token)["state"]
    except urllib.error.HTTPError:
        return None
