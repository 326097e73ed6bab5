"""``make airflow`` (``python -m toolkit.local_airflow``): the demo's Airflow as a running service.

Started as a new user would, from a shell without the venv on PATH: it comes up on loopback
only, prints where the admin password is, has the pipeline DAGs unpaused, starts a pipeline
run for a batch landed while it runs (the latency measured and printed), and exits naming the
component that died instead of running on with nothing listening. The landed batch is a copy of
one the dataset already holds: its data-triggered run ends after ingest, training nothing, and
says why in its summary and its MLflow parent run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import EMBEDDED, PIPELINE, ROOT, airflow_api, free_port, land_synthetic, run_stage, wait_for

pytestmark = pytest.mark.integration


def test_local_airflow_serves_on_loopback_and_runs_a_landed_batch_within_a_minute(tmp_path):
    """The landed batch holds only documents ingested before: its run starts, then trains nothing."""
    overlay = tmp_path / "local.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "doc_types": ["thsr_ticket"],
                "storage": {
                    "landing_uri": str(tmp_path / "landing"),
                    "datasets_uri": str(tmp_path / "datasets"),
                    "runs_uri": str(tmp_path / "runs"),
                },
                "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
                "model": {"base": str(tmp_path / "model")},
            }
        )
    )
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "minicpmv4_6"}')  # what the plan reads
    configs = [PIPELINE, EMBEDDED, overlay]
    known = land_synthetic(tmp_path / "landing" / "batch-0", 4, doc_types=["thsr_ticket"])
    assert run_stage("ingest", configs, "--output", str(tmp_path / "datasets"), "--batch", known) == 0
    port, home = free_port(), tmp_path / "airflow"
    bare = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # venv not active
    out = (tmp_path / "stdout.log").open("w")
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "toolkit.local_airflow",
            "--config",
            str(PIPELINE),
            "--config",
            str(EMBEDDED),
            "--config",
            str(overlay),
            "--airflow-home",
            str(home),
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=bare,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = tmp_path / "stdout.log"
    try:
        banner = wait_for(
            lambda: (
                re.search(r"Airflow is up: (\S+) +\(user admin, password in (\S+)\)", log.read_text())
                or service.poll() is not None
            ),
            420,
            "the start banner",
        )
        assert service.poll() is None, log.read_text()[-3000:]
        url, password_file = banner.group(1), Path(banner.group(2))
        assert url == f"http://127.0.0.1:{port}" and password_file.parent == home

        processes = [psutil.Process(service.pid), *psutil.Process(service.pid).children(recursive=True)]
        listening = {
            (c.laddr.ip, c.laddr.port)
            for p in processes
            for c in p.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening and {ip for ip, _ in listening} == {"127.0.0.1"}, listening

        password = json.loads(password_file.read_text())["admin"]
        token = airflow_api(url, "/auth/token", body={"username": "admin", "password": password})["access_token"]
        dags = airflow_api(url, "/api/v2/dags?tags=doc-extraction", token)["dags"]
        assert {d["dag_id"]: d["is_paused"] for d in dags} == {
            "doc_extraction": False,
            "doc_extraction_landing_watcher": False,
        }

        landed = time.monotonic()
        shutil.copytree(known, tmp_path / "landing" / "batch-1")  # a new folder, every document known
        runs = wait_for(
            lambda: airflow_api(url, "/api/v2/dags/doc_extraction/dagRuns", token)["dag_runs"],
            120,
            "a pipeline run for the landed batch",
        )
        latency = time.monotonic() - landed
        print(f"landed batch -> pipeline run created: {latency:.1f} s (poll every 15 s)")
        assert runs[0]["run_type"] == "asset_triggered"
        assert latency < 60
        run_id = runs[0]["dag_run_id"]
        finished = wait_for(lambda: finished_run(url, token, run_id), 300, "the data-triggered run to finish")
        assert finished["state"] == "success", finished
        states = task_states(url, token, run_id)
        assert states["ingest"] == "success" and states["new_data"] == "success", states
        assert {states[t] for t in ("export", "finetune", "patch", "evaluate", "publish")} == {"skipped"}, states
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("finetune"))
        parent = mlflow_parent(tmp_path / "mlflow.db", run_id)
        assert parent.info.status == "FINISHED", parent
        assert parent.data.tags["run.outcome"].startswith("not trained: 1 batch(es) ingested, 4 records seen")
        assert "a data-triggered run" in parent.data.tags["mlflow.note.content"]

        scheduler = int(re.search(r"started scheduler \(pid (\d+)", log.read_text()).group(1))
        os.kill(scheduler, signal.SIGKILL)
        assert service.wait(timeout=60) == 1
        assert re.search(r"scheduler exited with code -9.*stopping the other components", log.read_text(), re.S)
        wait_for(
            lambda: not [p for p in processes[1:] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
            10,
            "every component and worker gone",
        )
    finally:
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=60)
        out.close()


def finished_run(url: str, token: str, run_id: str) -> dict | None:
    run = airflow_api(url, f"/api/v2/dags/doc_extraction/dagRuns/{urllib.parse.quote(run_id, safe='')}", token)
    return run if run["state"] in ("success", "failed") else None


def task_states(url: str, token: str, run_id: str) -> dict[str, str]:
    path = f"/api/v2/dags/doc_extraction/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
    return {t["task_id"]: t["state"] for t in airflow_api(url, path, token)["task_instances"]}


def mlflow_parent(store: Path, dag_run_id: str):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.`airflow.dag_run_id` = '{dag_run_id}'"
    )
    return parent
