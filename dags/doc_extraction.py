"""The document-extraction pipeline as Airflow DAGs: wiring only.

- ``doc_extraction``: plan -> ingest -> new_data -> export -> finetune -> patch -> evaluate ->
  gate -> publish (or not) -> summary. Runs when a landing watcher reports new completed batches,
  or by hand from the UI's form (validated by the plan task before any stage runs). A run the
  watcher started whose batches add no document ends after ingest (``new_data``) without training,
  the reason in the summary and the MLflow parent run; a manual run retrains on the latest
  dataset version unless its form says not to. Every stage
  is ``python -m stages.<name>`` through the configured launcher (local, docker, kubernetes),
  continuing the run's MLflow parent run; XComs carry only small JSON.
- ``doc_extraction_landing_watcher``: polls the landing location for completed batches not
  yet ingested and emits one event of the ``landed-batches`` asset for each.
- Event-driven, when ``orchestration.sqs_queue`` is set: an AssetWatcher on the SQS queue that
  S3 event notifications feed (``MessageQueueTrigger``) schedules the DAG as well.

Configuration: ``DOC_EXTRACTION_HOME`` (the project root holding ``configs/``; default: this
file's parent folder) and ``DOC_EXTRACTION_CONFIG`` (config files relative to it, separated
by ``os.pathsep``; default ``configs/pipeline.yaml``).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from airflow.sdk import DAG, Asset, AssetAlias, AssetWatcher, Param, task
from airflow.sdk.exceptions import AirflowFailException

from docpipe.orchestration import plan as planning
from docpipe.orchestration.launchers import stage_operator
from docpipe.orchestration.stage_task import PLAN_TASK

HOME = Path(os.environ.get("DOC_EXTRACTION_HOME", Path(__file__).resolve().parents[1]))
CONFIG_PATHS = os.environ.get("DOC_EXTRACTION_CONFIG", "configs/pipeline.yaml").split(os.pathsep)
CONFIG = planning.load_config(HOME, CONFIG_PATHS)
SETTINGS = CONFIG.orchestration

LANDED = Asset(name="landed-batches", uri=planning.asset_uri(HOME, CONFIG.storage.landing_uri))
LANDED_ALIAS = AssetAlias(name="landed-batches-announcements")
schedule = LANDED
if SETTINGS.sqs_queue:
    from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger

    trigger = MessageQueueTrigger(scheme="sqs", sqs_queue=SETTINGS.sqs_queue, aws_conn_id=SETTINGS.aws_conn_id)
    schedule |= Asset(
        name="landing-notifications",
        uri=SETTINGS.sqs_queue,
        watchers=[AssetWatcher(name="landing-sqs", trigger=trigger)],
    )

# The trigger form, derived from the model that validates the plan (same types and bounds).
FORM = {name: Param(**spec) for name, spec in planning.in_home(HOME, planning.form_params, CONFIG).items()}

with DAG(
    dag_id="doc_extraction_landing_watcher",
    schedule=timedelta(seconds=SETTINGS.landing_poll_seconds),
    catchup=False,
    is_paused_upon_creation=False,
    max_active_runs=1,
    tags=["doc-extraction"],
    doc_md="Lists the landing location for completed batches and announces each new one.",
):

    @task(outlets=[LANDED_ALIAS], inlets=[LANDED])
    def announce_new_batches(*, outlet_events, inlet_events) -> list[str]:
        """One ``landed-batches`` event per completed batch that is neither ingested nor announced."""
        announced = {event.extra.get("batch") for event in inlet_events[LANDED]}
        new = planning.new_batches(HOME, CONFIG, announced)
        for batch in new:
            outlet_events[LANDED_ALIAS].add(LANDED, extra={"batch": batch})
        return new

    announce_new_batches()


with DAG(
    dag_id="doc_extraction",
    schedule=schedule,
    catchup=False,
    is_paused_upon_creation=False,  # retraining on new labelled data works out of the box
    max_active_runs=1,
    params=FORM,
    tags=["doc-extraction"],
    doc_md=__doc__,
    default_args={"retries": 0},
):

    @task(task_id=PLAN_TASK)
    def plan(*, params, run_id, triggering_asset_events=None) -> dict:
        """Validate the form and the configuration, choose the batches, start the MLflow parent run."""
        from docpipe import tracking
        from docpipe.loader import ConfigError

        events = planning.batches_from_events(triggering_asset_events or {})
        try:
            decided, config = planning.make_plan(HOME, CONFIG_PATHS, params, events, run_id)
        except ConfigError as exc:
            raise AirflowFailException(str(exc)) from None
        print(f"memory plan: {decided.memory or 'not estimated (no safetensors weights to count)'}")
        if decided.dry_run:
            paths = planning.stage_config_paths(CONFIG, CONFIG_PATHS)
            for stage in planning.STAGES:
                print(f"dry run: stages.{stage} would run: {' '.join(planning.stage_command(stage, decided, paths))}")
        else:
            logged = {"config": config.model_dump(mode="json"), "form": dict(params), "memory_plan": decided.memory}
            tags = {"airflow.dag_run_id": run_id, "run.folder": decided.run_uri}
            decided.mlflow_run_id = planning.in_home(
                HOME, tracking.start_pipeline_run, config.tracking, f"airflow-{decided.run_name}", logged, tags
            )
        return decided.model_dump()

    @task.short_circuit(task_id="new_data", trigger_rule="none_failed", ignore_downstream_trigger_rules=False)
    def new_data(plan: dict) -> bool:
        """Train only on something new: a data-triggered run whose batches added no document stops here."""
        reason = planning.in_home(HOME, planning.nothing_to_train_on, planning.Plan.model_validate(plan), CONFIG)
        print(f"not training: {reason}" if reason else "training: the run has new documents or retrains on purpose")
        return reason is None

    @task.branch(task_id="gate")
    def gate(plan: dict) -> str:
        """Publish only a model whose evaluation passed its gate, unless the form skips publishing."""
        decided = planning.Plan.model_validate(plan)
        passed, reasons = planning.in_home(HOME, planning.gate_passed, decided, CONFIG)
        print(f"gate {'passed' if passed else 'failed'}: {'; '.join(reasons)}")
        return "publish" if passed and not decided.skip_publish else "not_published"

    @task(task_id="not_published")
    def not_published() -> None:
        """The gate failed or the form skipped publishing: the model stays a challenger at most."""

    @task(task_id="summary", trigger_rule="all_done")
    def summary(plan: dict | None) -> dict:
        """Each stage's outcome from its manifest, the MLflow run ended with it, and its link."""
        from docpipe import tracking

        if plan is None:
            raise AirflowFailException(
                "the plan task failed, so no stage ran: its log names the form field, "
                "config key or store that was refused"
            )
        decided = planning.Plan.model_validate(plan)
        if decided.dry_run:
            print(f"dry run: nothing ran; plan: {decided.model_dump_json()}")
            return {"succeeded": True, "dry_run": True}
        outcome = planning.in_home(HOME, planning.summarize, decided, CONFIG)
        config = planning.load_config(HOME, CONFIG_PATHS, decided.overrides)
        planning.in_home(
            HOME,
            tracking.end_pipeline_run,
            config.tracking,
            decided.mlflow_run_id,
            outcome["succeeded"],
            outcome["stages"],
            config.doc_types,
            outcome.get("reason"),
        )
        experiment = planning.in_home(HOME, tracking.experiment_id, config.tracking)
        outcome["mlflow_run"] = planning.mlflow_run_link(
            config.tracking.tracking_uri, experiment, decided.mlflow_run_id
        )
        print(f"MLflow run: {outcome['mlflow_run']}")
        if not outcome["trained"]:
            print(f"not trained: {outcome['reason']}")
        if not outcome["succeeded"]:
            raise AirflowFailException(f"stages failed: {outcome['failed_stages']}; see {outcome['mlflow_run']}")
        return outcome

    planned = plan()
    stages = {name: stage_operator(name, CONFIG, HOME, CONFIG_PATHS) for name in planning.STAGES}
    checked = new_data(planned)  # runs after ingest, which skips itself when no batch is new
    decision = gate(planned)
    skipped = not_published()
    planned >> stages["ingest"] >> checked >> stages["export"] >> stages["finetune"] >> stages["patch"]
    stages["patch"] >> stages["evaluate"]
    stages["evaluate"] >> decision >> [stages["publish"], skipped]
    [stages["publish"], skipped] >> summary(planned)
