"""``python -m toolkit.local_airflow`` (``make airflow``): the Airflow the demo used, running.

Starts Airflow 3's components (api-server, scheduler, dag-processor, triggerer) from this
project's virtual environment on the demo's state (``data/airflow``, sqlite), reading this
project's DAGs and the embedded default (or ``--config`` files), with the API server bound to
127.0.0.1. It works whether or not the venv is activated: each component is started by its
absolute path, with the venv's ``bin`` first on ``PATH`` for whatever it starts in turn. The
pipeline DAGs are created unpaused (and unpaused here if an older run left them paused), so a
batch landing in ``storage.landing_uri`` starts a run within ``orchestration.landing_poll_seconds``
plus a few seconds. It prints the URL, the user and the file holding the generated password;
when one component dies it stops the others and exits 1 naming it, instead of running on with
nothing listening. Ctrl-C (or SIGTERM) stops everything; a pipeline run still going is marked
failed first, with the reason as its note, so no task waits to retry when Airflow next starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from docpipe.config import PipelineConfig, load_pipeline_config
from docpipe.contract import EXIT_BAD_INPUT, EXIT_FAILED
from docpipe.loader import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = [Path("configs/pipeline.yaml"), Path("configs/overlays/embedded.yaml")]
# Everything runs on this machine and reads its logs from disk: no log servers (they bind every interface).
COMPONENTS = {
    "api-server": [],
    "scheduler": ["--skip-serve-logs"],
    "dag-processor": [],
    "triggerer": ["--skip-serve-logs"],
}
PIPELINE_DAGS = ("doc_extraction", "doc_extraction_landing_watcher")
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"


def airflow_environment(home: Path, configs: list[Path]) -> dict[str, str]:
    """Airflow on a sqlite database in ``home``, reading this project's DAGs and configs, with this
    interpreter's ``bin`` first on PATH (Airflow starts ``airflow`` subprocesses by name)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW__", "MLFLOW_"))}
    bin_dir = str(Path(sys.executable).parent)
    return {
        **env,
        "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
        "AIRFLOW_HOME": str(home.resolve()),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "DOC_EXTRACTION_HOME": str(ROOT),
        "DOC_EXTRACTION_CONFIG": os.pathsep.join(str(path.resolve()) for path in configs),
    }


def service_environment(home: Path, configs: list[Path], port: int) -> dict[str, str]:
    """``airflow_environment`` plus what running the components needs: the API on loopback, one
    API worker (two cores), the local executor and its execution API at that address, the simple
    auth manager with a generated admin password, four task workers, DAGs unpaused at creation."""
    return {
        **airflow_environment(home, configs),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",  # worker processes the executor keeps (32 by default)
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    }


class LocalAirflow:
    """The components as child processes of this one, supervised."""

    def __init__(self, home: Path, configs: list[Path], port: int):
        self.home, self.port = home, port
        self.env = service_environment(home, configs, port)
        self.airflow = str(Path(sys.executable).with_name("airflow"))
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs = home / "logs" / "components"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        migrated = subprocess.run([self.airflow, "db", "migrate"], env=self.env, stdout=subprocess.DEVNULL)
        if migrated.returncode:
            raise RuntimeError(f"airflow db migrate failed with exit code {migrated.returncode}")
        self.logs.mkdir(parents=True, exist_ok=True)
        for name, flags in COMPONENTS.items():
            with (self.logs / f"{name}.log").open("ab") as log:
                self.processes[name] = subprocess.Popen(
                    [self.airflow, name, *flags],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            print(
                f"local_airflow: started {name} (pid {self.processes[name].pid}, log {self.logs / name}.log)",
                flush=True,
            )

    def dead(self) -> str | None:
        """A component that exited, with its exit code and the end of its log, or None."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                return f"{name} exited with code {process.returncode}; the end of its log:\n" + "\n".join(tail)
        return None

    def stop(self) -> None:
        """SIGTERM to each component's process group (its workers too, also where the component
        itself died), then SIGKILL to what is left after 30 s."""
        self._signal_groups(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        time.sleep(min(max(deadline - time.monotonic(), 0), 2))  # the groups' other members
        self._signal_groups(signal.SIGKILL)

    def _signal_groups(self, sig: signal.Signals) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)

    def _request(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def wait_until(self, what: str, ready, timeout_s: float):
        """Poll ``ready()`` until it returns something truthy; fail on a dead component or the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if dead := self.dead():
                raise RuntimeError(f"{dead} while waiting for {what}")
            try:
                if result := ready():
                    return result
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError(f"{what} did not happen within {timeout_s:.0f} s")

    def token(self) -> str:
        """An API token for the admin user, from the generated password file."""
        password = json.loads((self.home / PASSWORDS_FILE).read_text())["admin"]
        return self._request("POST", "/auth/token", {"username": "admin", "password": password})["access_token"]

    def unpause_pipeline_dags(self, token: str) -> list[str]:
        """Unpause the pipeline DAGs once the dag-processor has parsed them; returns those it unpaused."""

        def parsed() -> list[dict] | None:
            dags = self._request("GET", "/api/v2/dags?tags=doc-extraction", token=token)["dags"]
            return dags if {d["dag_id"] for d in dags} >= set(PIPELINE_DAGS) else None

        dags = self.wait_until("the pipeline DAGs to be parsed", parsed, 300)
        paused = [d["dag_id"] for d in dags if d["is_paused"]]
        for dag_id in paused:
            self._request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False}, token=token)
        return paused

    def fail_unfinished_runs(self, token: str, why: str) -> list[str]:
        """Mark the pipeline DAGs' queued and running runs failed, ``why`` as their note (Airflow
        fails their running tasks with them): a task stopped with the scheduler would otherwise wait
        to retry, and the next start would run it again. Returns the runs it failed."""
        failed = []
        for dag_id in PIPELINE_DAGS:
            listed = self._request("GET", f"/api/v2/dags/{dag_id}/dagRuns?state=running&state=queued", token=token)
            for run in listed["dag_runs"]:
                path = f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run['dag_run_id'], safe='')}"
                self._request("PATCH", path, {"state": "failed", "note": why}, token=token)
                failed.append(f"{dag_id} {run['dag_run_id']}")
        return failed


INTERRUPTED = "stopped: make airflow was interrupted (Ctrl-C or SIGTERM) while this run was going; trigger it again"


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def embedded_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The flags the demo and this command share: the config files and Airflow's state."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, action="append", help="default: pipeline.yaml + overlays/embedded.yaml")
    parser.add_argument("--airflow-home", type=Path, default=Path("data/airflow"), help="Airflow's state (sqlite)")
    return parser


def load_or_report(configs: list[Path], prog: str) -> PipelineConfig | None:
    """The configuration, or None after one line on stderr naming the file and the problem."""
    try:
        return load_pipeline_config(configs)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = embedded_parser("python -m toolkit.local_airflow", __doc__)
    parser.add_argument("--port", type=int, default=8080, help="the API server's port, on 127.0.0.1")
    args = parser.parse_args(argv)
    configs = args.config or EMBEDDED
    if (config := load_or_report(configs, "local_airflow")) is None:
        return EXIT_BAD_INPUT
    airflow = LocalAirflow(args.airflow_home.resolve(), configs, args.port)
    signal.signal(signal.SIGTERM, _interrupt)
    token = None
    try:
        airflow.start()
        airflow.wait_until(f"the API server on {airflow.url}", lambda: airflow._request("GET", "/api/v2/version"), 300)
        token = airflow.wait_until("the admin password file", airflow.token, 60)
        unpaused = airflow.unpause_pipeline_dags(token)
        poll = config.orchestration.landing_poll_seconds
        were = f" (unpaused now: {', '.join(unpaused)})" if unpaused else ""
        print(
            f"\nAirflow is up: {airflow.url}  (user admin, password in {airflow.home / PASSWORDS_FILE})"
            f"\nDAGs {', '.join(PIPELINE_DAGS)} are unpaused{were}:"
            f" a batch completed in {config.storage.landing_uri} starts a run within about {poll} s."
            "\nCtrl-C stops every component.",
            flush=True,
        )
        while not (dead := airflow.dead()):
            time.sleep(1)
        print(f"local_airflow: {dead}\nlocal_airflow: stopping the other components", file=sys.stderr)
        return EXIT_FAILED
    except RuntimeError as exc:
        print(f"local_airflow: {exc}; stopping", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if token:
            fail_unfinished(airflow, token)
        return 0
    finally:
        airflow.stop()


def fail_unfinished(airflow: LocalAirflow, token: str) -> None:
    """On the way down: unfinished pipeline runs failed with the reason; a server that does not
    answer any more is reported, not waited for (each call is bounded)."""
    try:
        for run in airflow.fail_unfinished_runs(token, INTERRUPTED):
            print(f"local_airflow: {run} marked failed: {INTERRUPTED}", file=sys.stderr)
    except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
        print(f"local_airflow: could not mark unfinished runs failed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
