"""One run of the pipeline DAG, decided before any stage starts, and read back at the end.

``make_plan`` validates the run's form (the Airflow Params) into config overrides, checks the
merged configuration and that the base model can run in the stages' environment
(``compatibility``), finds the batches to ingest (those the triggering asset events name, or
every completed batch not yet ingested) and names the run's folder. ``stage_arguments`` turns
the plan into each stage's command line. ``gate_passed`` and ``summarize`` read the stages'
own manifests (``decision.json``, ``result.json``), so the DAG's XComs stay small.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import chdir
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from docpipe.config import PipelineConfig, load_pipeline_config
from docpipe.contract import config_flags
from docpipe.data.landing import COMPLETE_MARKER
from docpipe.loader import ConfigError
from docpipe.manifest import RESULT_FILE
from docpipe.model.compatibility import check_base_model
from docpipe.redaction import redact_text

T = TypeVar("T")
STAGES = ("ingest", "export", "finetune", "patch", "evaluate", "publish")


class RunForm(BaseModel):
    """The manual-trigger form (and what a scheduled run takes from the config's defaults).

    The one source of truth for the form: the DAG's Params are derived from this model's JSON
    schema (``form_params``), so the UI refuses what the plan would refuse.
    """

    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as the form's schema says: "0.1" is no number

    base_model: str = Field(
        min_length=1,
        title="Base model",
        description="a folder or s3:// URI of the model to finetune (nothing comes from a hub)",
    )
    doc_types: list[str] = Field(
        min_length=1,
        title="Document types",
        description="document types to train and evaluate",
        json_schema_extra={"uniqueItems": True},
    )
    max_steps: int = Field(ge=1, title="Max steps")
    learning_rate: float = Field(gt=0, lt=1, title="Learning rate")
    gpus: int = Field(ge=0, le=64, title="GPUs per node", description="GPUs per node for finetune (0: CPU)")
    nodes: int = Field(
        1,
        ge=1,
        le=64,
        title="Nodes",
        description="nodes for finetune, each with the GPUs above (above 1: the "
        "kubernetes launcher, a Kubeflow TrainJob)",
    )
    batches: list[str] | None = Field(
        None, title="Batches", description="landed batches to ingest; empty: every new completed batch"
    )
    retrain_on_latest: bool = Field(
        True,
        title="Retrain on the latest version",
        description="when no batch adds a document, train on the latest dataset version anyway (a run "
        "the landing watcher starts never does: it trains only on what its batches add)",
    )
    skip_publish: bool = Field(False, title="Skip publish")
    dry_run: bool = Field(
        False,
        title="Dry run",
        description="validate and plan, run no stage: the plan task prints every stage's command",
    )

    @field_validator("doc_types")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("a document type is listed twice")
        return names

    def overrides(self) -> dict[str, Any]:
        """The form as a config overlay: what each stage gets in ``--overrides``."""
        return {
            "model": {"base": self.base_model},
            "doc_types": self.doc_types,
            "training": {
                "max_steps": self.max_steps,
                "learning_rate": self.learning_rate,
                "launch": {"gpus_per_node": max(self.gpus, 1), "nnodes": self.nodes},
            },
        }


def form_defaults(config: PipelineConfig) -> dict[str, Any]:
    """The form's defaults, from the deployment's configuration."""
    return RunForm(
        base_model=config.model.base,
        doc_types=config.doc_types,
        max_steps=config.training.max_steps,
        learning_rate=config.training.learning_rate,
        gpus=config.training.launch.gpus_per_node if config.gpu_container.gpus is None else config.gpu_container.gpus,
        nodes=config.training.launch.nnodes,
        retrain_on_latest=True,
        skip_publish=not config.orchestration.publish,
    ).model_dump()


SCHEMA_KEYWORDS = {
    "type",
    "items",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "minItems",
    "uniqueItems",
    "title",
    "description",
}


def form_params(config: PipelineConfig) -> dict[str, dict[str, Any]]:
    """The trigger form as Airflow Param arguments (``default`` and JSON schema), from ``RunForm``'s
    schema: the same types and bounds. An optional field's type admits null (the UI marks it
    optional); document types are a multi-select of the registry's ids, named by display name."""
    from docpipe.doctypes import load_registry

    defaults = form_defaults(config)
    params: dict[str, dict[str, Any]] = {}
    for name, schema in RunForm.model_json_schema()["properties"].items():
        variants = schema.get("anyOf", [schema])
        spec = {key: value for part in [*variants, schema] for key, value in part.items() if key in SCHEMA_KEYWORDS}
        if len(variants) > 1:
            spec["type"] = [variant["type"] for variant in variants]
        params[name] = {"default": defaults[name], **spec}
    doc_types = load_registry(config.doctypes_dir)
    ids = sorted(doc_types)
    shown = {name: f"{doc_type.display_name} ({name})" for name, doc_type in doc_types.items()}
    params["doc_types"].update(items={"type": "string", "enum": ids}, examples=ids, values_display=shown)
    if config.orchestration.launcher != "kubernetes":  # only a TrainJob spans nodes
        params["nodes"].update(
            maximum=1, description=f"1: the {config.orchestration.launcher} launcher starts one node"
        )
    return params


class Plan(BaseModel):
    """What a run does; small JSON, passed between tasks by XCom."""

    run_name: str
    run_uri: str
    datasets_uri: str
    batches: list[str]
    trigger: Literal["data", "manual"] = "manual"  # data: started by a landing watcher's asset event
    retrain: bool = True  # train on the latest version when no batch adds a document (manual runs only)
    overrides: dict[str, Any]
    gpus: int
    nodes: int = 1
    memory: str | None = None  # the memory plan, as the plan task prints it
    skip_publish: bool
    dry_run: bool
    mlflow_run_id: str | None = None
    tracking_uri: str  # redacted: where to look, not how to log in


def in_home(home: Path, function: Callable[..., T], *args: Any) -> T:
    """Call ``function`` from the project's root, where the stages run: relative paths in the
    configuration (``configs/doctypes``, ``data/landing``) mean the same to the DAG."""
    with chdir(home):
        return function(*args)


def load_config(home: Path, paths: list[str], overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The pipeline configuration as the stages see it."""
    return in_home(home, load_pipeline_config, [Path(p) for p in paths], overrides)


def asset_uri(home: Path, location: str) -> str:
    """An asset URI for a storage location: ``s3://...`` as it is, a folder as ``file://``."""
    return location if "://" in location else (home / location).resolve().as_uri()


def _batch_of(key: str) -> str | None:
    """The batch folder of a completion marker's key, or None for any other key."""
    return key[: -len(COMPLETE_MARKER) - 1] if key.endswith(f"/{COMPLETE_MARKER}") else None


def batches_from_events(events: Mapping[Any, Iterable[Any]]) -> list[str]:
    """Batches named by triggering asset events: the polling watcher's ``{"batch": uri}``, or an
    S3 event notification (``ObjectCreated`` of a ``_COMPLETE`` marker) that the SQS watcher
    passed on as its trigger's payload."""
    found: list[str] = []
    for asset_events in events.values():
        for event in asset_events:
            extra = getattr(event, "extra", None) or {}
            if extra.get("batch"):
                found.append(extra["batch"])
            for message in (extra.get("payload") or {}).get("message_batch", []):
                found.extend(_batches_in_notification(message.get("Body", "")))
    return list(dict.fromkeys(found))


def _batches_in_notification(body: str) -> list[str]:
    try:
        records = json.loads(body).get("Records", [])
    except (ValueError, AttributeError):
        return []
    batches = []
    for record in records:
        s3 = record.get("s3", {}) if record.get("eventName", "").startswith("ObjectCreated") else {}
        batch = _batch_of(unquote_plus(s3.get("object", {}).get("key", "")))
        if batch:
            batches.append(f"s3://{s3['bucket']['name']}/{batch}")
    return batches


def completed_batches(config: PipelineConfig) -> list[str]:
    """Every batch under the landing location whose completion marker is written."""
    from docpipe.storage import open_storage

    landing = open_storage(config.storage.landing_uri, config.storage.s3)
    return [landing.child(batch).uri for key in landing.list() if (batch := _batch_of(key)) and "/" not in batch]


def ingested_batches(config: PipelineConfig) -> set[str]:
    """Batches some dataset version already read (the ``sources`` of every version's card)."""
    from docpipe.data.dataset import DatasetCard
    from docpipe.storage import open_storage

    datasets = open_storage(config.storage.datasets_uri, config.storage.s3)
    cards = (key for key in datasets.list("versions") if key.endswith("/card.json"))
    return {source for key in cards for source in DatasetCard.model_validate_json(datasets.read_bytes(key)).sources}


def new_batches(home: Path, config: PipelineConfig, announced: set[str] = frozenset()) -> list[str]:
    """Completed batches that no dataset version has read and no watcher has announced yet."""
    done = in_home(home, ingested_batches, config) | set(announced)
    return [batch for batch in in_home(home, completed_batches, config) if batch not in done]


def check_memory(config: PipelineConfig, model_config: dict[str, Any], gpus: int, nodes: int) -> str | None:
    """The memory plan of this run's finetune, described; ``ConfigError`` with the nearest layout that
    fits when GPU training is estimated not to fit ``training.launch.gpu_memory_gib`` (or the host's
    ``host_memory_gib``). None when the base model has no safetensors weights to count."""
    from docpipe.model import memory_plan

    tensors = memory_plan.tensor_sizes(config.model.base, config.storage.s3)
    if not tensors:
        return None
    launch = config.training.launch
    shape = memory_plan.shape_of(model_config, tensors)
    layout = memory_plan.plan_layout(config.training, gpus, nodes)
    found = memory_plan.estimate(shape, layout, launch.gpu_memory_gib, launch.host_memory_gib)
    if gpus and not found.fits:
        near = memory_plan.nearest_fit(shape, layout, launch.gpu_memory_gib or found.gpu_gib, launch.host_memory_gib)
        way = "none of ZeRO-2, ZeRO-2 with CPU offload or ZeRO-3 at batch 1 fits: more GPUs or nodes would"
        if near:
            accumulate = config.training.gradient_accumulation_steps * layout.batch // near.layout.batch
            way = (
                f"nearest that fits: {near.describe()} (training.deepspeed: {near.layout.deepspeed}, "
                f"per_device_train_batch_size: {near.layout.batch}, gradient_accumulation_steps: {accumulate})"
            )
        raise ConfigError(
            f"memory plan: {found.describe()}; that exceeds training.launch "
            f"(gpu_memory_gib {launch.gpu_memory_gib}, host_memory_gib {launch.host_memory_gib}); {way}"
        )
    return found.describe()


def run_folder_name(run_id: str) -> str:
    """A folder name from an Airflow run id (``manual__2026-11-25T10:00:00+00:00``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_")


def make_plan(
    home: Path, paths: list[str], params: Mapping[str, Any], event_batches: list[str], run_id: str
) -> tuple[Plan, PipelineConfig]:
    """Validate the form and the merged configuration, and decide what the run does; returns the
    plan and the configuration the stages will see.

    Raises ``ConfigError`` naming the form field or the config key that is wrong, or why the base
    model cannot run here.
    """
    try:
        form = RunForm.model_validate(dict(params))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'form'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"the run's form: {problems}") from None
    overrides = form.overrides()
    config = load_config(home, paths, overrides)
    if form.nodes > 1 and config.orchestration.launcher != "kubernetes":
        raise ConfigError(
            f"the run's form: nodes {form.nodes} needs orchestration.launcher kubernetes (a Kubeflow "
            f"TrainJob); the {config.orchestration.launcher} launcher starts one node"
        )
    # refused here, not hours into a GPU booking
    model_config = in_home(home, check_base_model, config.model, config.storage.s3)
    memory = in_home(home, check_memory, config, model_config, form.gpus, form.nodes)
    chosen = list(dict.fromkeys(form.batches or event_batches))
    if chosen:
        done = in_home(home, ingested_batches, config)
        batches = [batch for batch in chosen if batch not in done]
    else:
        batches = new_batches(home, config)
    name = run_folder_name(run_id)
    run_uri = f"{config.storage.runs_uri.rstrip('/')}/{name}"
    plan = Plan(
        run_name=name,
        run_uri=run_uri,
        datasets_uri=config.storage.datasets_uri,
        batches=batches,
        trigger="data" if event_batches else "manual",
        retrain=form.retrain_on_latest and not event_batches,
        overrides=overrides,
        gpus=form.gpus,
        nodes=form.nodes,
        memory=memory,
        skip_publish=form.skip_publish,
        dry_run=form.dry_run,
        tracking_uri=redact_text(config.tracking.tracking_uri),  # a plan is an XCom, shown in the UI
    )
    return plan, config


OUTPUT_FOLDERS = {"patch": "model"}  # patch writes the complete model folder
SUMMARY_KEYS = ("status", "error", "mlflow_run_id", "inputs", "metrics", "outputs")  # of each stage's result.json


def stage_output(plan: Plan, stage: str) -> str:
    """Where a stage writes: ingest the datasets location, the others a folder of the run's."""
    return plan.datasets_uri if stage == "ingest" else f"{plan.run_uri}/{OUTPUT_FOLDERS.get(stage, stage)}"


def stage_arguments(stage: str, plan: Plan, config_paths: list[str]) -> list[str]:
    """The command line of ``python -m stages.<stage>`` for this run."""
    out = {name: stage_output(plan, name) for name in STAGES}
    inputs = {
        "ingest": [flag for batch in plan.batches for flag in ("--batch", batch)],
        "export": ["--dataset", plan.datasets_uri],
        "finetune": ["--data", out["export"]],
        "patch": ["--finetune", out["finetune"]],
        "evaluate": ["--data", out["export"], "--model", out["patch"]],
        "publish": ["--model", out["patch"], "--evaluation", out["evaluate"]],
    }
    return [
        *config_flags(config_paths),
        "--overrides",
        json.dumps(plan.overrides, ensure_ascii=False),
        *inputs[stage],
        "--output",
        out[stage],
    ]


def stage_config_paths(config: PipelineConfig, worker_paths: list[str]) -> list[str]:
    """The config files as the stage sees them: the worker's for the local launcher, the images'
    (``orchestration.container_configs``) for containers and pods."""
    return worker_paths if config.orchestration.launcher == "local" else config.orchestration.container_configs


def stage_command(stage: str, plan: Plan, config_paths: list[str]) -> list[str]:
    """``python -m stages.<stage>`` with this run's arguments."""
    return ["python", "-m", f"stages.{stage}", *stage_arguments(stage, plan, config_paths)]


def _read_json(uri: str, config: PipelineConfig) -> dict | None:
    from docpipe.storage import StorageError, open_storage

    folder, name = uri.rsplit("/", 1)
    store = open_storage(folder, config.storage.s3)
    try:
        return json.loads(store.read_bytes(name)) if store.exists(name) else None
    except (StorageError, ValueError):
        return None


def gate_passed(plan: Plan, config: PipelineConfig) -> tuple[bool, list[str]]:
    """The evaluate stage's decision: passed, and its reasons."""
    decision = _read_json(f"{plan.run_uri}/evaluate/decision.json", config)
    if decision is None:
        return False, [f"{plan.run_uri}/evaluate/decision.json: missing or unreadable"]
    return bool(decision.get("passed")), list(decision.get("reasons", []))


def nothing_to_train_on(plan: Plan, config: PipelineConfig) -> str | None:
    """Why the run stops after ingest without training, or None when it trains. A run the data
    trigger started trains only on documents its batches added; so does a manual run whose form
    turns ``retrain_on_latest`` off. Asked once ingest has run (or skipped itself)."""
    return _untrained_reason(plan, _ingest_result(plan, config))


def _ingest_result(plan: Plan, config: PipelineConfig) -> dict | None:
    """Ingest's ``result.json`` when the run had batches to ingest (None when ingest skipped)."""
    return _read_json(f"{stage_output(plan, 'ingest')}/{RESULT_FILE}", config) if plan.batches else None


def _untrained_reason(plan: Plan, ingested: dict | None) -> str | None:
    if plan.dry_run or plan.retrain:
        return None
    why = "a data-triggered run" if plan.trigger == "data" else "the form's retrain_on_latest is off"
    if not plan.batches:
        return f"no new batch to ingest ({why}): nothing new to train on"
    if not ingested or ingested.get("status") != "succeeded":
        return None  # ingest failed: its failure is the run's outcome, reported as such
    counts = ingested.get("counts", {})
    if counts.get("added", 0):
        return None
    return (
        f"{len(plan.batches)} batch(es) ingested, {counts.get('seen', 0)} records seen, no document the dataset "
        f"did not already have ({why}): nothing new to train on"
    )


def summarize(plan: Plan, config: PipelineConfig) -> dict[str, Any]:
    """Each stage's status from its ``result.json``: a stage the run needed whose manifest is
    missing or failed makes the run failed. A run with nothing new to train on needed ingest only."""
    ingested = _ingest_result(plan, config)
    if reason := _untrained_reason(plan, ingested):
        stages = {"ingest": {key: ingested.get(key) for key in SUMMARY_KEYS}} if ingested else {}
        return {"succeeded": True, "trained": False, "reason": reason, "failed_stages": [], "stages": stages}
    needed = list(STAGES[1:5]) + (["ingest"] if plan.batches else [])
    passed, reasons = gate_passed(plan, config)
    if passed and not plan.skip_publish:
        needed.append("publish")
    stages: dict[str, dict[str, Any]] = {}
    for stage in (s for s in STAGES if s in needed):
        uri = f"{stage_output(plan, stage)}/{RESULT_FILE}"
        result = _read_json(uri, config) or {"status": "missing", "error": f"{uri} was not written"}
        stages[stage] = {key: result.get(key) for key in SUMMARY_KEYS}
    failed = [stage for stage, result in stages.items() if result["status"] != "succeeded"]
    return {
        "succeeded": not failed,
        "trained": True,
        "failed_stages": failed,
        "gate_passed": passed,
        "gate_reasons": reasons,
        "stages": stages,
    }


def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where to look at the run: the MLflow UI's page for a server, or the store and id otherwise."""
    tracking_uri = redact_text(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{run_id} in {tracking_uri} (mlflow ui --backend-store-uri {tracking_uri})"
