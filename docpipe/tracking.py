"""MLflow plumbing: one parent run per pipeline run, one child run per stage.

The pipeline's first step starts the parent run and leaves it running; every stage
process gets its id in ``MLFLOW_RUN_ID`` (and the tracking URI in its config) and logs
into a child run named after the stage. Parameters are the validated configuration,
with anything that looks like a secret left out. Every call to a tracking server is bounded by
``tracking.request_timeout_s`` and ``tracking.max_retries``.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from docpipe.config import TrackingConfig
from docpipe.manifest import RESULT_FILE, StageResult, git_commit
from docpipe.redaction import SECRET_NAME, redact, redact_logs, redact_text, secret_values
from docpipe.storage import absolute_location

PARENT_RUN_ENV = "MLFLOW_RUN_ID"
EXPERIMENT_KIND = "mlflow.experimentKind"  # the MLflow UI opens a custom-model experiment on its runs table
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}
# What a reviewer sees on the pipeline's run, copied from the evaluate stage's result.
HEADLINE_METRICS = (
    "field_accuracy",
    "document_accuracy",
    "json_validity",
    "ocr_baseline.field_accuracy",
    "gate_passed",
    "docs_per_s",
)
log = logging.getLogger(__name__)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


PARAM_NAME_UNSAFE = re.compile(r"[^\w\-. :/]")  # what MLflow refuses in a parameter's name


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Flattened parameters with secret-looking keys dropped and every value redacted; characters
    MLflow refuses in a name (``${VAR}`` in a mount's host path) become ``_``."""
    secrets = secret_values()  # read the environment once, not once per parameter
    return {
        PARAM_NAME_UNSAFE.sub("_", key): str(redact(value, secrets))
        for key, value in flatten(params).items()
        if not SECRET_NAME.search(key)
    }


def _bound_requests(config: TrackingConfig) -> None:
    """Bound every MLflow HTTP call (MLflow reads these per request), and keep MLflow from printing
    run URLs itself: they may carry credentials; ``stage_run`` logs a redacted one."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(config.request_timeout_s)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(config.max_retries)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def experiment_id(config: TrackingConfig) -> str:
    """The experiment's id, created (with its artifact location) on first use."""
    import mlflow

    _bound_requests(config)
    mlflow.set_tracking_uri(config.tracking_uri)
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is not None:
        if EXPERIMENT_KIND not in experiment.tags:
            mlflow.MlflowClient(config.tracking_uri).set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND, EXPERIMENT_TAGS[EXPERIMENT_KIND]
            )
        return experiment.experiment_id
    location = config.artifact_location
    if location and "://" not in location:
        location = Path(location).resolve().as_uri()  # MLflow creates the folder on first write
    return mlflow.create_experiment(config.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)


def _prepare_local_store(config: TrackingConfig) -> None:
    """A sqlite store's folder must exist before MLflow opens the database."""
    if config.tracking_uri.startswith("sqlite:///"):
        Path(config.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def start_pipeline_run(
    config: TrackingConfig, name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
) -> str:
    """Start the pipeline's parent run and leave it running; returns its id."""
    import mlflow

    _prepare_local_store(config)
    _bound_requests(config)
    client = mlflow.MlflowClient(config.tracking_uri)
    run = client.create_run(
        experiment_id(config),
        run_name=name,
        tags={"pipeline.role": "parent", "mlflow.source.git.commit": git_commit(), **(tags or {})},
    )
    for key, value in safe_params(params).items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def latest_pipeline_run(config: TrackingConfig, since: datetime):
    """The newest pipeline (parent) run started at or after ``since``, or None."""
    import mlflow

    _bound_requests(config)
    client = mlflow.MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment)
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        f"tags.`pipeline.role` = 'parent' and attributes.start_time >= {int(since.timestamp() * 1000)}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def end_pipeline_run(
    config: TrackingConfig,
    run_id: str,
    succeeded: bool,
    stages: Mapping[str, Mapping] | None = None,
    doc_types: list[str] | None = None,
    note: str | None = None,
) -> None:
    """End the parent run; with the stages' results (``plan.summarize``), first put what a reviewer
    looks for on it: the evaluation's headline metrics, the dataset version, the eval set, the
    document types and the gate as tags, and the evaluation's dataset as an input. ``note`` (why a
    run ended without training) becomes the run's description and its ``run.outcome`` tag."""
    import mlflow
    from mlflow.entities import Metric

    _bound_requests(config)
    client = mlflow.MlflowClient(config.tracking_uri)
    evaluate, export = (stages or {}).get("evaluate") or {}, (stages or {}).get("export") or {}
    metrics = {k: float(v) for k, v in (evaluate.get("metrics") or {}).items() if k in HEADLINE_METRICS}
    if metrics:
        client.log_batch(run_id, metrics=[Metric(key, value, _now_ms(), 0) for key, value in metrics.items()])
    tags = {
        "doc_types": ",".join(doc_types or []),
        "dataset.version": (export.get("inputs") or {}).get("version"),
        "eval_set": (evaluate.get("inputs") or {}).get("eval_set"),
        "gate.passed": str(bool(metrics["gate_passed"])).lower() if "gate_passed" in metrics else None,
        "run.outcome": f"not trained: {note}" if note else None,
        "mlflow.note.content": note,
    }
    for key, value in tags.items():
        if value:
            client.set_tag(run_id, key, value)
    if evaluate.get("mlflow_run_id"):
        datasets = client.get_run(evaluate["mlflow_run_id"]).inputs.dataset_inputs
        if datasets:
            client.log_inputs(run_id, datasets=datasets)
    client.set_terminated(run_id, "FINISHED" if succeeded else "FAILED")


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextmanager
def stage_run(config: TrackingConfig, stage: str, params: Mapping[str, Any]) -> Iterator[str]:
    """A run for one stage, child of ``$MLFLOW_RUN_ID`` when set; yields its id.

    MLflow would *resume* the run named in ``MLFLOW_RUN_ID``; we take it out of the
    environment and nest under it instead.
    """
    import mlflow

    _prepare_local_store(config)
    _bound_requests(config)
    redact_logs()  # MLflow's own handlers, set up when it was imported
    parent = os.environ.pop(PARENT_RUN_ENV, None)
    mlflow.set_tracking_uri(config.tracking_uri)
    if parent:
        experiment = mlflow.MlflowClient(config.tracking_uri).get_run(parent).info.experiment_id
    else:
        experiment = experiment_id(config)
    tags = {"pipeline.stage": stage, "mlflow.source.git.commit": git_commit()}
    with mlflow.start_run(experiment_id=experiment, run_name=stage, parent_run_id=parent, tags=tags) as run:
        mlflow.log_params(safe_params(params))
        log.info("MLflow run %s (%s) at %s", run.info.run_id, stage, redact_text(config.tracking_uri))
        yield run.info.run_id


def log_dataset(uri: str, version: str, context: str) -> None:
    """Record a dataset version as an input of the active run (``mlflow.data``)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    location = absolute_location(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow warns that a local path could be one of two source types
        source = resolve_dataset_source(location)
    mlflow.log_input(MetaDataset(source, name="documents", digest=version), context=context)
    mlflow.set_tag("dataset.version", version)


def log_result(result: StageResult) -> None:
    """Counts and metrics of the active stage run, and the manifest under ``<stage>/``.

    A failed result also ends the run as FAILED.
    """
    import mlflow

    mlflow.log_metrics(
        {**{f"count.{k}": v for k, v in result.counts.items()}, **result.metrics, "duration_s": result.duration_s}
    )
    mlflow.log_dict(redact(result.model_dump(mode="json")), f"{result.stage}/{RESULT_FILE}")
    if result.status == "failed":
        mlflow.set_tag("pipeline.error", redact_text(result.error or "")[:5000])
        mlflow.end_run("FAILED")  # the stage handled its error; the run still failed
