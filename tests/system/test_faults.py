"""The fault suite: nothing lost, nothing leaked, nothing hung, against real parts.

Real processes (stages run as ``python -m``, killed with SIGKILL), moto's S3 server, a real MLflow
server, a TCP server that accepts and never answers, and a proxy that stops answering mid-run.
Each test times the failure against its configured bound and greps everything the run wrote or
printed for planted secrets. Faults of the data itself (a batch changed after its marker, a refused
batch's images, conflicting copies) are in test_ingest.py; a killed and resumed training with a
damaged checkpoint is in test_finetune.py.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import mlflow
import pytest

from docpipe.config import S3Config, TrackingConfig
from docpipe.contract import config_flags
from docpipe.data.landing import COMPLETE_MARKER
from docpipe.locking import FolderInUse, exclusive
from docpipe.redaction import redact_output, redact_text
from tests.helpers import ROOT, land_synthetic, run_module, write_overlay

SECRETS = {  # planted where a careless writer would pick them up
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-0d4f",
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-password-7c1e",
}
URL_PASSWORD = "planted-url-password-91ab"
STARTUP_S = 30  # a stage process's own start (imports, MLflow store) on 2 busy cores, on top of a fault's bound
FAST_S3 = {"connect_timeout_s": 1, "read_timeout_s": 2, "max_attempts": 2}


# --- faulty servers -----------------------------------------------------------------------------


@pytest.fixture
def silent_endpoint():
    """A TCP server that accepts every connection and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


class _Forward(BaseHTTPRequestHandler):
    """Forwards the first ``answer_first`` requests to the upstream S3 server, then holds every
    later one unanswered until the proxy is released."""

    protocol_version = "HTTP/1.1"

    def _forward(self):
        server = self.server
        with server.lock:
            server.requests += 1
            answering = server.requests <= server.answer_first
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not answering:
            server.release.wait()
            self.close_connection = True
            return
        upstream = http.client.HTTPConnection(*server.upstream, timeout=30)
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header(
            "Content-Length", response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args):
        pass


@pytest.fixture
def stalling_proxy(s3_endpoint):
    """A proxy to moto that answers ``proxy.answer_first`` requests, then stops answering."""
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _Forward)
    proxy.daemon_threads = True
    parts = urlsplit(s3_endpoint)
    proxy.upstream, proxy.requests, proxy.answer_first = (parts.hostname, parts.port), 0, 1_000_000
    proxy.lock, proxy.release = threading.Lock(), threading.Event()
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    proxy.url = f"http://127.0.0.1:{proxy.server_address[1]}"
    yield proxy
    proxy.release.set()
    proxy.shutdown()
    proxy.server_close()


# --- helpers ------------------------------------------------------------------------------------


def overlay_with(tmp_path: Path, name: str, settings: dict) -> Path:
    return write_overlay(tmp_path, name, json.dumps(settings))


def timed_stage(stage: str, config: list[Path], *args: str, env: dict | None = None):
    started = time.monotonic()
    done = run_module(f"stages.{stage}", *config_flags(config), *args, env=env)
    return done, time.monotonic() - started


def last_line(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


def assert_no_secret(texts: dict[str, str]) -> None:
    """No planted secret in any of these texts (name -> text)."""
    for name, text in texts.items():
        for secret in [*SECRETS.values(), URL_PASSWORD]:
            assert secret not in text, f"{secret!r} leaked into {name}"


def written_texts(*roots: Path) -> dict[str, str]:
    """Every file under these folders, as text."""
    return {
        str(path): path.read_bytes().decode("utf-8", "replace")
        for root in roots
        for path in root.rglob("*")
        if path.is_file()
    }


def mlflow_texts(tracking_uri: str, run_ids: list[str], tmp_path: Path) -> dict[str, str]:
    """Each run's parameters, tags and every artifact, as MLflow serves them."""
    client = mlflow.MlflowClient(tracking_uri)
    texts = {}
    for run_id in run_ids:
        run = client.get_run(run_id)
        texts[f"mlflow run {run_id} params and tags"] = json.dumps([run.data.params, run.data.tags])
        local = Path(client.download_artifacts(run_id, "", str(tmp_path / "downloaded" / run_id)))
        texts.update(written_texts(local))
    return texts


def child_runs(tracking_uri: str, experiment: str) -> list[str]:
    client = mlflow.MlflowClient(tracking_uri)
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [run.info.run_id for run in found]


# --- redaction ----------------------------------------------------------------------------------


def test_redaction_masks_url_credentials_and_secret_values_in_any_text(monkeypatch, capsys):
    monkeypatch.setenv("MY_API_TOKEN", "tok-1234567")
    text = "at https://u:p@h:1/x and s3://key:sec@b/p?q, with tok-1234567; mail a@b.c, http://h/a@b, https://h/x"
    assert (
        redact_text(text) == "at https://***@h:1/x and s3://***@b/p?q, with ***; mail a@b.c, http://h/a@b, https://h/x"
    )
    redact_output()
    print("logged in as http://u:pw@h with tok-1234567")
    logging.getLogger("some.library").warning("token tok-1234567")
    captured = capsys.readouterr()
    assert "pw@" not in captured.out and "tok-1234567" not in captured.out + captured.err


def test_redaction_reads_an_environment_other_threads_are_changing():
    """MLflow's telemetry thread sets and unsets a variable while stages log: reading secrets must not fail."""
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            os.environ["_CHURNING_TOKEN"] = "churned-value"
            os.environ.pop("_CHURNING_TOKEN", None)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        deadline = time.monotonic() + 2  # the old reading failed within a tenth of a second here
        while time.monotonic() < deadline:
            redact_text("nothing secret")
    finally:
        stop.set()
        thread.join()


# --- the output lock ----------------------------------------------------------------------------


def test_a_held_folder_names_its_holder_and_is_left_alone(tmp_path):
    with exclusive(tmp_path):
        record = (tmp_path / ".stage.lock").read_bytes()
        held = rf"{tmp_path}: in use by another run \(host .+, pid {os.getpid()}, "
        with pytest.raises(FolderInUse, match=held), exclusive(tmp_path):
            pass
        assert (tmp_path / ".stage.lock").read_bytes() == record
    with exclusive(tmp_path):  # released when its holder is done
        pass


@pytest.mark.integration
def test_a_second_finetune_into_a_training_folder_is_refused_and_nothing_leaks(
    finetune_config, exported, tmp_path, mlflow_server, monkeypatch
):
    """The second run exits 2 with one line naming the folder and the holder, changes nothing; the
    first trains on. Credentials in the tracking URI and the environment reach no file, log or MLflow."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    tracking_uri = mlflow_server.replace("http://", f"http://alice:{URL_PASSWORD}@")
    secret_overlay = overlay_with(
        tmp_path,
        "secret.yaml",
        {
            "tracking": {"tracking_uri": tracking_uri, "experiment": "faults-lock"},
            "training": {"max_steps": 40, "save_steps": 10, "eval_steps": 10},
            "orchestration": {"pass_environment": ["AWS_REGION", f"http://bob:{URL_PASSWORD}@list.example"]},
        },
    )
    config, out = [*finetune_config, secret_overlay], tmp_path / "ft"
    command = [
        sys.executable,
        "-m",
        "stages.finetune",
        *config_flags(config),
        "--data",
        str(exported),
        "--output",
        str(out),
    ]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | SECRETS
    first = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "train_spec.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before training"
        time.sleep(0.2)
    spec, lock = (out / "train_spec.json").read_bytes(), (out / ".stage.lock").read_bytes()

    second, took = timed_stage("finetune", config, "--data", str(exported), "--output", str(out), env=SECRETS)
    assert first.poll() is None, "the first run should still be training"
    assert second.returncode == 2, second.stderr[-2000:]
    assert last_line(second) == (
        f"finetune: error: {out}: in use by another run (host {socket.gethostname()}, "
        f"pid {first.pid}, started {json.loads(lock)['started_at']}); nothing was written"
    )
    assert "Traceback" not in second.stderr
    assert (out / "train_spec.json").read_bytes() == spec and (out / ".stage.lock").read_bytes() == lock
    assert not (out / "result.json").exists()
    print(f"\nsecond finetune refused in {took:.1f}s")

    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "succeeded" and result["counts"]["global_step"] == 40
    assert json.loads(spec)["tracking_uri"] == mlflow_server.replace("http://", "http://***@")
    runs = child_runs(mlflow_server, "faults-lock")
    assert_no_secret(
        {
            "first stdout": stdout,
            "first stderr": stderr,
            "second stdout": second.stdout,
            "second stderr": second.stderr,
            **written_texts(out),
            **mlflow_texts(mlflow_server, runs, tmp_path),
        }
    )


# --- stores that stop answering -----------------------------------------------------------------


def test_default_timeouts_fail_a_silent_store_in_about_a_minute():
    assert 45 <= S3Config().call_bound_s() <= 90
    tracking = TrackingConfig(tracking_uri="http://mlflow:5000")
    assert 30 <= tracking.request_timeout_s * (tracking.max_retries + 1) <= 90


@pytest.mark.integration
def test_a_store_that_stops_answering_mid_ingest_fails_it_within_its_bound(
    overlay, tmp_path, bucket, s3_endpoint, stalling_proxy
):
    """Workers reading images meet the stall: the stage fails (exit 1, retryable) naming the cause;
    no record is quarantined for it, no version is written, the batch is untouched."""
    batch = land_synthetic(f"s3://{bucket}/batch", 40, seed=2, s3=S3Config(endpoint_url=s3_endpoint))
    landed = _object_etags(s3_endpoint, bucket)
    s3 = {"endpoint_url": stalling_proxy.url, **FAST_S3}
    config = [*overlay, overlay_with(tmp_path, "stall.yaml", {"storage": {"s3": s3}, "dataset": {"workers": 2}})]
    stalling_proxy.answer_first = 8  # the marker and labels, then a few images
    done, took = timed_stage("ingest", config, "--output", str(tmp_path / "ds"), "--batch", batch)
    bound = S3Config(**s3).call_bound_s()
    print(f"\nstore stalled mid-ingest: exit {done.returncode} after {took:.1f}s (one call's bound {bound:.0f}s)")
    assert done.returncode == 1, done.stderr[-2000:]
    assert took < 2 * bound + STARTUP_S
    line = last_line(done)
    assert line.startswith(f"ingest: error: StorageUnavailable: {batch}/") and "timeout" in line.lower()
    assert "Traceback" not in done.stderr
    result = json.loads((tmp_path / "ds" / "result.json").read_text())
    assert result["status"] == "failed" and result["error"] == line.removeprefix("ingest: error: ")
    assert not (tmp_path / "ds" / "quarantine").exists() and not (tmp_path / "ds" / "versions").exists()
    assert not any((tmp_path / "ds" / "images").glob("*"))  # what it stored before the stall is taken back
    assert _object_etags(s3_endpoint, bucket) == landed


def _object_etags(endpoint: str, bucket: str) -> dict[str, str]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


@pytest.mark.integration
def test_a_silent_output_store_fails_the_stage_once_within_its_bound(overlay, tmp_path, silent_endpoint):
    """The first call meets the silence; the stage does not wait a second time to write its manifest there."""
    batch = land_synthetic(tmp_path / "batch", 4)
    s3 = {"endpoint_url": silent_endpoint, **FAST_S3}
    config = [*overlay, overlay_with(tmp_path, "silent.yaml", {"storage": {"s3": s3}})]
    done, took = timed_stage("ingest", config, "--output", "s3://datasets/ds", "--batch", batch)
    bound = S3Config(**s3).call_bound_s()
    print(f"\nsilent S3 output: exit {done.returncode} after {took:.1f}s (one call's bound {bound:.0f}s)")
    assert done.returncode == 1 and took < bound + STARTUP_S
    cause = "StorageUnavailable: s3://datasets/ds/LATEST: cannot check: Read timeout"
    assert last_line(done).startswith(f"ingest: error: {cause}")
    assert "s3://datasets/ds/result.json not written: the store did not answer" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.integration
def test_a_silent_tracking_server_fails_a_stage_within_its_bound(overlay, tmp_path, silent_endpoint):
    batch = land_synthetic(tmp_path / "batch", 4)
    tracking = {"tracking_uri": silent_endpoint, "request_timeout_s": 2, "max_retries": 0}
    config = [*overlay, overlay_with(tmp_path, "silent.yaml", {"tracking": tracking})]
    done, took = timed_stage("ingest", config, "--output", str(tmp_path / "ds"), "--batch", batch)
    print(f"\nsilent tracking server: exit {done.returncode} after {took:.1f}s (bound 2s)")
    assert done.returncode == 1 and took < 2 + STARTUP_S
    assert "timed out" in last_line(done) and silent_endpoint in last_line(done)
    assert not (tmp_path / "ds" / "versions").exists()


@pytest.mark.integration
def test_credentials_in_an_endpoint_reach_no_error_text_log_or_mlflow(overlay, tmp_path, monkeypatch):
    """A failing S3 endpoint with user:password, secrets in the environment: the error line,
    result.json, the MLflow tag and the logged manifest name the endpoint without them."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens: connections are refused
    endpoint = f"http://carol:{URL_PASSWORD}@127.0.0.1:{port}"
    s3 = {**FAST_S3, "endpoint_url": endpoint}
    config = [*overlay, overlay_with(tmp_path, "secret.yaml", {"storage": {"s3": s3}})]
    done, _ = timed_stage("ingest", config, "--output", str(tmp_path / "ds"), "--batch", "s3://landing/b1", env=SECRETS)
    assert done.returncode == 1
    assert f"http://***@127.0.0.1:{port}/landing/b1/{COMPLETE_MARKER}" in last_line(done)
    tracking_uri = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    runs = child_runs(tracking_uri, "doc-extraction")
    tags = mlflow.MlflowClient(tracking_uri).get_run(runs[0]).data.tags
    assert "http://***@127.0.0.1" in tags["pipeline.error"]
    assert_no_secret(
        {
            "stdout": done.stdout,
            "stderr": done.stderr,
            **written_texts(tmp_path / "ds"),
            **mlflow_texts(tracking_uri, runs, tmp_path),
        }
    )
