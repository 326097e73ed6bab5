"""``make airflow`` (``python -m toolkit.local_airflow``): the demo's Airflow as a running service.

Started as a new user would, from a shell without the venv on PATH: it comes up on loopback
only, prints where the admin password is, has the pipeline DAGs unpaused, starts a pipeline
run for a batch landed while it runs (the latency measured and printed), and exits naming the
component that died instead of running on with nothing listening.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import EMBEDDED, PIPELINE, ROOT, free_port, land_synthetic

pytestmark = pytest.mark.integration


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def api(url: str, token: str | None = None, body: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_local_airflow_serves_on_loopback_and_runs_a_landed_batch_within_a_minute(tmp_path):
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
        token = api(f"{url}/auth/token", body={"username": "admin", "password": password})["access_token"]
        dags = api(f"{url}/api/v2/dags?tags=doc-extraction", token)["dags"]
        assert {d["dag_id"]: d["is_paused"] for d in dags} == {
            "doc_extraction": False,
            "doc_extraction_landing_watcher": False,
        }

        landed = time.monotonic()
        land_synthetic(tmp_path / "landing" / "batch-1", 4, doc_types=["thsr_ticket"])
        runs = wait_for(
            lambda: api(f"{url}/api/v2/dags/doc_extraction/dagRuns", token)["dag_runs"],
            120,
            "a pipeline run for the landed batch",
        )
        latency = time.monotonic() - landed
        print(f"landed batch -> pipeline run created: {latency:.1f} s (poll every 15 s)")
        assert runs[0]["run_type"] == "asset_triggered"
        assert latency < 60

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
