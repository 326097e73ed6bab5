"""``python -m toolkit.demo``: the pipeline's Airflow DAG end to end on the embedded default.

A synthetic labelled batch lands (as a labelling team's export would), the landing watcher
DAG announces it, and the pipeline DAG (``dags/doc_extraction.py``) runs every stage with the
local launcher: ingest, export, finetune (the embedded default's tiny random MiniCPM-V 4.6,
built offline on first use, learns its training documents by heart), patch, evaluate and the
gate, which asks the fit check to pass; the embedded default publishes nothing (no container
engine or registry). It ends by printing the fit, the image control, the eval set's accuracy
and the gate's decision. Airflow keeps its state in ``data/airflow``
(sqlite); ``airflow dags test`` runs the DAGs in this process's environment, no scheduler.
The watcher's event queues a pipeline run for the next scheduler to start; the demo consumes it
(its own pipeline run is the one that ingests the batch), so ``make airflow`` afterwards starts
no second run of the same data.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from docpipe import tracking
from docpipe.config import PipelineConfig
from docpipe.contract import EXIT_BAD_INPUT, EXIT_FAILED, config_flags
from docpipe.doctypes import OTHER
from docpipe.storage import open_storage
from toolkit.local_airflow import EMBEDDED, PASSWORDS_FILE, airflow_environment, embedded_parser, load_or_report
from toolkit.tiny_model import build as build_tiny_model

PIPELINE_DAG = "doc_extraction"


def demo_steps(config: PipelineConfig, paths: list[Path], batch_uri: str, count: int) -> dict[str, list[str]]:
    """What the demo runs, in order: a synthetic batch lands, then Airflow runs both DAGs."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    synthetic = [sys.executable, "-m", "toolkit.synthetic", *config_flags(paths), "--output", batch_uri]
    kinds = [*config.doc_types, *([OTHER] if config.export.routing else [])]  # routed: pages of none of them too
    return {
        "a synthetic batch lands": [*synthetic, "--count", str(count), "--doc-types", ",".join(kinds)],
        "Airflow's database": [airflow, "db", "migrate"],
        "the landing watcher": [airflow, "dags", "test", "doc_extraction_landing_watcher"],
        "its event consumed (the demo runs the pipeline itself)": [
            sys.executable,
            "-m",
            "toolkit.demo",
            "--consume-queued-runs",
            PIPELINE_DAG,
        ],
        "the pipeline DAG": [airflow, "dags", "test", PIPELINE_DAG],
    }


def consume_queued_runs(dag_id: str) -> int:
    """Delete the asset-triggered runs queued for ``dag_id``, as Airflow's REST API does for
    ``DELETE /dags/{dag_id}/assets/queuedEvents``; the events themselves stay on record. ``airflow
    dags test`` of the watcher queues a pipeline run that only a scheduler starts: the demo runs
    the pipeline itself, so without this the first scheduler to start would run it again. Run in
    Airflow's environment; returns how many were queued."""
    from airflow.models.asset import AssetDagRunQueue
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as session:
        return session.execute(delete(AssetDagRunQueue).where(AssetDagRunQueue.target_dag_id == dag_id)).rowcount


def run_steps(steps: dict[str, list[str]], env: dict[str, str]) -> int:
    """Each step in turn; the first that fails stops the demo. Its exit code (0 when all pass)."""
    for name, step in steps.items():
        print(f"== {name}", flush=True)
        quiet = name == "Airflow's database"
        done = subprocess.run(step, env=env, stdout=subprocess.DEVNULL if quiet else None)
        if done.returncode:
            print(f"demo: {name} failed with exit code {done.returncode}", file=sys.stderr)
            return done.returncode
    return 0


def where_things_are(config: PipelineConfig, paths: list[Path], airflow_home: Path, batch_uri: str, parent) -> str:
    """Where the batch, the dataset, the run's outputs, MLflow and the Airflow UI are."""
    run_dir = parent.data.tags.get("run.folder", config.storage.runs_uri)
    uri, experiment = config.tracking.tracking_uri, parent.info.experiment_id
    default = paths == EMBEDDED and airflow_home == Path("data/airflow")
    local_airflow = [".venv/bin/python -m toolkit.local_airflow", *config_flags(paths)]
    ui = "make airflow" if default else " ".join([*local_airflow, "--airflow-home", str(airflow_home)])
    return (
        f"\nLabelled batch:   {batch_uri} (labels.jsonl, images/, result.json)"
        f"\nDataset versions: {config.storage.datasets_uri} (LATEST, versions/<id>/manifest.jsonl, card.json)"
        f"\nRun outputs:      {run_dir} (export/, finetune/checkpoint-*, model/, evaluate/)"
        f"\nReport:           {run_dir}/evaluate/report.html"
        f"\nMLflow run:       {parent.info.run_id} ({parent.info.status}) in experiment {config.tracking.experiment!r}"
        f"\nList runs:        MLFLOW_TRACKING_URI={uri} .venv/bin/mlflow runs list --experiment-id {experiment}"
        f"\nBrowse runs:      .venv/bin/mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"
        f"\nAirflow UI:       {ui}  (then http://127.0.0.1:8080, user admin, password in "
        f"{airflow_home / PASSWORDS_FILE})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = embedded_parser("python -m toolkit.demo", __doc__)
    parser.add_argument("--count", type=int, default=24, help="synthetic documents to generate")
    parser.add_argument("--consume-queued-runs", metavar="DAG_ID", help=argparse.SUPPRESS)  # a step of the demo
    args = parser.parse_args(argv)
    if args.consume_queued_runs:
        print(f"{consume_queued_runs(args.consume_queued_runs)} queued run(s) of {args.consume_queued_runs} consumed")
        return 0
    paths = args.config or EMBEDDED
    if (config := load_or_report(paths, "demo")) is None:
        return EXIT_BAD_INPUT

    base = Path(config.model.base)
    if "://" not in config.model.base and not (base / "config.json").exists():
        print(f"== building the tiny model in {base}", flush=True)
        build_tiny_model(base, config.doctypes_dir, size="demo")

    started = datetime.now(UTC)
    batch = open_storage(config.storage.landing_uri, config.storage.s3).child(f"batch-{started:%Y%m%dT%H%M%SZ}")
    code = run_steps(demo_steps(config, paths, batch.uri, args.count), airflow_environment(args.airflow_home, paths))
    parent = tracking.latest_pipeline_run(config.tracking, since=started)
    if parent is None:
        print("demo: the pipeline DAG started no MLflow run", file=sys.stderr)
        return EXIT_FAILED
    print(where_things_are(config, paths, args.airflow_home, batch.uri, parent))
    print(accuracy_summary(Path(parent.data.tags.get("run.folder", config.storage.runs_uri)) / "evaluate"))
    return code and EXIT_FAILED


def accuracy_summary(evaluation: Path) -> str:
    """Fit, image control and eval accuracy, and the gate's decision, as the evaluate stage wrote them."""
    if not (evaluation / "metrics.json").is_file():
        return f"\nNo evaluation in {evaluation}."
    saved = json.loads((evaluation / "metrics.json").read_text())
    decision = json.loads((evaluation / "decision.json").read_text())
    rows = [
        ("Fit (training documents)", saved.get("fit")),
        ("Image control (swapped)", saved.get("image_control")),
        ("Eval set (unseen)", saved["metrics"]),
    ]
    lines = [
        f"{label + ':':27}field accuracy {m['overall']['field_accuracy']:.3f}, document accuracy "
        f"{m['overall']['document_accuracy']:.3f}, JSON validity {m['overall']['json_validity']:.3f} "
        f"({m['overall']['documents']} documents)"
        for label, m in rows
        if m
    ]
    verdict = "passed" if decision["passed"] else "failed"
    return "\n" + "\n".join([*lines, f"Gate: {verdict}: {'; '.join(decision['reasons'])}"])


if __name__ == "__main__":
    sys.exit(main())
