"""finetune as a Kubeflow TrainJob (docpipe/orchestration/trainjob.py), with no cluster here.

The manifest is built with Kubeflow Trainer's API models and its node pod checked against the
Kubernetes schemas; the operator's conversation (submit, follow status and logs, delete) runs
against a local HTTP server that answers as the Kubernetes API server and the Trainer controller
would: what a real cluster schedules, pulls and runs is not exercised (README, "Scaling out").
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import pytest

from docpipe.config import load_pipeline_config
from docpipe.loader import ConfigError
from docpipe.orchestration import trainjob
from docpipe.orchestration.launchers import stage_operator
from docpipe.orchestration.plan import Plan, stage_command
from tests.helpers import PIPELINE, ROOT

JOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs"
KUBE = {
    "launcher": "kubernetes",
    "pass_environment": ["AWS_SECRET_ACCESS_KEY"],
    "kubernetes": {
        "namespace": "ml",
        "data_claim": "pipeline-data",
        "credentials_secret": "pipeline-keys",
        "poll_seconds": 0.05,
        "conn_id": "no_cluster",
    },
}


def _config(**kube):
    settings = {**KUBE, "kubernetes": {**KUBE["kubernetes"], **kube}}
    return load_pipeline_config([PIPELINE], {"orchestration": settings, "storage": {"runs_uri": "/data/runs"}})


def _plan(nodes=2, gpus=4) -> Plan:
    return Plan(
        run_name="manual__2026-11-26T10:00:00+00:00",
        run_uri="/data/runs/r1",
        datasets_uri="/data/datasets",
        batches=[],
        overrides={"training": {"launch": {"nnodes": nodes}}},
        gpus=gpus,
        nodes=nodes,
        skip_publish=False,
        dry_run=False,
        mlflow_run_id="parent-run",
        tracking_uri="http://mlflow:5000",
    )


def test_the_trainjob_manifest_without_a_cluster_asks_for_nodes_gpus_shm_and_the_shared_claim(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret")
    config, plan = _config(), _plan()
    command = stage_command("finetune", plan, config.orchestration.container_configs)
    job = trainjob.train_job("ft-r1-1", config, plan, command, {"MLFLOW_RUN_ID": "parent-run", "NCCL_DEBUG": "WARN"})
    manifest = job.to_dict()
    assert manifest["kind"] == "TrainJob" and manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    spec = manifest["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed"}
    trainer = spec["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "4"}}
    assert trainer["command"] + trainer["args"] == command and trainer["image"] == config.gpu_container.image
    env = {e["name"]: e for e in trainer["env"]}
    assert env["MLFLOW_RUN_ID"]["value"] == "parent-run"
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "pipeline-keys", "key": "AWS_SECRET_ACCESS_KEY", "optional": True}},
    }
    assert "planted-secret" not in json.dumps(manifest)
    pod = trainjob.node_pod(job)["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "pipeline-data"}
    assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} == {"/dev/shm", "/data"}
    trainjob.validate(job, "1.33")  # the pod passes the cluster version's schemas
    one_cpu_node = trainjob.train_job("ft-r1-2", config, _plan(nodes=1, gpus=0), command, {}).to_dict()
    assert one_cpu_node["spec"]["trainer"]["numProcPerNode"] == 1
    assert "limits" not in one_cpu_node["spec"]["trainer"]["resourcesPerNode"]


def test_a_pod_the_kubernetes_schemas_refuse_is_not_submitted(monkeypatch):
    config, plan = _config(), _plan()
    job = trainjob.train_job("ft-r1-1", config, plan, ["python", "-m", "stages.finetune"], {})
    built = trainjob.node_pod

    def with_a_typo(job):
        pod = built(job)
        pod["spec"]["containers"][0]["volumeMount"] = pod["spec"]["containers"][0].pop("volumeMounts")
        return pod

    monkeypatch.setattr(trainjob, "node_pod", with_a_typo)
    with pytest.raises(ConfigError, match="TrainJob ft-r1-1: .*volumeMount"):
        trainjob.validate(job, "1.33")


def test_job_names_are_dns_labels():
    name = trainjob.job_name("scheduled__2026-11-26T10:00:00+00:00_" + "x" * 80, 3)
    assert len(name) <= 63 and name.endswith("-3") and name.replace("-", "").isalnum() and name == name.lower()


class FakeApiServer:
    """Answers as the Kubernetes API server would for one TrainJob: its status moves through
    ``states`` one read at a time, two node pods log a line per read, and every request is kept."""

    def __init__(self, states: list[str], exit_code: int = 1, stall: bool = False):
        self.states, self.exit_code, self.stall = states, exit_code, stall
        self.requests: list[tuple[str, str, dict | None]] = []
        self.job: dict | None = None
        self.reads = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body, content_type="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(("POST", self.path, body))
                if server.stall:
                    time.sleep(30)
                server.job = body
                self._send(201, body)

            def do_DELETE(self):
                server.requests.append(("DELETE", self.path, None))
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

            def do_GET(self):
                url = urlparse(self.path)
                server.requests.append(("GET", self.path, None))
                name = server.job["metadata"]["name"]
                if url.path == f"{JOBS}/{name}":
                    state = server.states[min(server.reads, len(server.states) - 1)]
                    server.reads += 1
                    conditions = (
                        []
                        if state == "Running"
                        else [
                            {
                                "type": state,
                                "status": "True",
                                "reason": f"Job{state}",
                                "message": f"jobs {state.lower()}",
                                "lastTransitionTime": "2026-11-26T10:00:00Z",
                            }
                        ]
                    )
                    return self._send(200, {**server.job, "status": {"conditions": conditions}})
                if url.path == "/api/v1/namespaces/ml/pods":
                    assert parse_qs(url.query)["labelSelector"] == [f"jobset.sigs.k8s.io/jobset-name={name}"]
                    return self._send(
                        200,
                        {
                            "kind": "PodList",
                            "apiVersion": "v1",
                            "metadata": {},
                            "items": [server.pod(name, rank) for rank in (0, 1)],
                        },
                    )
                if url.path.startswith("/api/v1/namespaces/ml/pods/") and url.path.endswith("/log"):
                    pod = url.path.split("/")[-2]
                    lines = [f"2026-11-26T10:00:{i:02d}.000000000Z {pod} step {i}" for i in range(server.reads)]
                    return self._send(200, "\n".join(lines) + "\n", "text/plain")
                self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def pod(self, job: str, rank: int) -> dict:
        state = self.states[min(self.reads, len(self.states)) - 1]
        terminated = {"terminated": {"exitCode": self.exit_code, "reason": "Error"}} if state == "Failed" else None
        status = {
            "name": "node",
            "image": "train",
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": terminated or {"running": {}},
        }
        return {
            "metadata": {"name": f"{job}-node-0-{rank}"},
            "status": {"phase": "Running", "containerStatuses": [status]},
        }

    def methods(self) -> list[str]:
        return [f"{method} {path.split('?')[0]}" for method, path, _ in self.requests]


@pytest.fixture
def api_server(monkeypatch, request):
    server = FakeApiServer(**request.param)
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "here",
        "clusters": [{"name": "here", "cluster": {"server": server.url}}],
        "contexts": [{"name": "here", "context": {"cluster": "here", "user": "me"}}],
        "users": [{"name": "me", "user": {}}],
    }
    monkeypatch.setenv(
        "AIRFLOW_CONN_NO_CLUSTER", json.dumps({"conn_type": "kubernetes", "extra": {"kube_config": kubeconfig}})
    )
    yield server
    server.httpd.shutdown()


def _operator(timeout=None):
    operator = stage_operator("finetune", _config(), ROOT, [])
    assert isinstance(operator, trainjob.TrainJobOperator)
    context = {"ti": SimpleNamespace(xcom_pull=lambda task_ids: _plan().model_dump(), try_number=2)}
    return operator, context


@pytest.mark.parametrize("api_server", [{"states": ["Running", "Running", "Complete"]}], indirect=True)
def test_the_operator_without_a_cluster_submits_follows_logs_and_returns_on_complete(api_server, capsys):
    operator, context = _operator()
    result = operator.execute(context)
    name = "ft-manual-2026-11-26t10-00-00-00-00-2"
    assert result == {"stage": "finetune", "output": "/data/runs/r1/finetune", "trainjob": name}
    submitted = api_server.requests[0]
    assert submitted[:2] == ("POST", JOBS) and submitted[2]["spec"]["trainer"]["numNodes"] == 2
    assert {"MLFLOW_RUN_ID": "parent-run", "NCCL_DEBUG": "WARN"}.items() <= {
        e["name"]: e.get("value") for e in submitted[2]["spec"]["trainer"]["env"]
    }.items()
    task_log = capsys.readouterr().out  # Airflow's task logger writes here outside a task runner
    for rank in (0, 1):  # each line once, though the windows overlap
        pod = f"{name}-node-0-{rank}"
        copied = re.findall(rf"\[{pod}\] {pod} step (\d+)", task_log)
        assert copied == [str(i) for i in range(len(copied))] and len(copied) >= 2
    assert not [m for m in api_server.methods() if m.startswith("DELETE")]  # a complete job is left to its TTL


@pytest.mark.parametrize("api_server", [{"states": ["Running", "Failed"]}], indirect=True)
def test_a_failed_trainjob_fails_the_task_and_is_deleted(api_server):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    operator, context = _operator()
    with pytest.raises(AirflowException, match="failed: jobs failed") as raised:
        operator.execute(context)
    assert not isinstance(raised.value, AirflowFailException)  # retried: finetune resumes from its checkpoint
    assert api_server.methods()[-1] == f"DELETE {JOBS}/ft-manual-2026-11-26t10-00-00-00-00-2"


@pytest.mark.parametrize("api_server", [{"states": ["Failed"], "exit_code": 2}], indirect=True)
def test_a_node_exiting_with_bad_input_fails_without_retries(api_server):
    from airflow.sdk.exceptions import AirflowFailException

    operator, context = _operator()
    with pytest.raises(AirflowFailException, match="bad input"):
        operator.execute(context)


@pytest.mark.parametrize("api_server", [{"states": ["Running"]}], indirect=True)
def test_a_timed_out_task_deletes_its_trainjob(api_server, monkeypatch):
    """Airflow's execution timeout raises inside ``execute``, wherever it is waiting."""
    from airflow.sdk.exceptions import AirflowTaskTimeout

    waits = []

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) == 3:
            raise AirflowTaskTimeout("Timeout, PID: 1")

    monkeypatch.setattr(trainjob, "time", SimpleNamespace(sleep=sleep))
    operator, context = _operator()
    with pytest.raises(AirflowTaskTimeout):
        operator.execute(context)
    assert api_server.methods()[-1] == f"DELETE {JOBS}/ft-manual-2026-11-26t10-00-00-00-00-2"


@pytest.mark.parametrize("api_server", [{"states": ["Running"]}], indirect=True)
def test_a_killed_task_deletes_its_trainjob(api_server, monkeypatch):
    """Airflow calls ``on_kill`` from another thread when the task is killed (UI, CLI, shutdown)."""
    killed = threading.Event()

    def sleep(seconds):
        if killed.is_set():
            raise SystemExit("the task process ends")

    monkeypatch.setattr(trainjob, "time", SimpleNamespace(sleep=sleep))
    operator, context = _operator()
    runner = threading.Thread(target=lambda: pytest.raises(SystemExit, operator.execute, context))
    runner.start()
    while "POST" not in " ".join(api_server.methods()):
        time.sleep(0.01)
    operator.on_kill()
    killed.set()
    runner.join(10)
    deletes = [m for m in api_server.methods() if m.startswith("DELETE")]
    assert deletes and set(deletes) == {f"DELETE {JOBS}/ft-manual-2026-11-26t10-00-00-00-00-2"}


@pytest.mark.parametrize("api_server", [{"states": ["Running"], "stall": True}], indirect=True)
def test_an_api_server_that_stalls_is_a_bounded_failure(api_server, monkeypatch):
    monkeypatch.setattr(trainjob, "REQUEST_TIMEOUT", (1, 1))
    operator, context = _operator()
    started = time.monotonic()
    with pytest.raises(Exception, match="timed out"):
        operator.execute(context)
    assert time.monotonic() - started < 10
