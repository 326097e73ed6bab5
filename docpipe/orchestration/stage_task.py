"""What every stage operator shares, whichever launcher runs it: the run's plan from the ``plan``
task's XCom, the stage's command line, the environment that continues the pipeline's MLflow run,
and the skips (a dry run; ingest with no new batch)."""

from __future__ import annotations

from typing import Any

from docpipe.orchestration.plan import Plan, stage_command
from docpipe.tracking import PARENT_RUN_ENV

PLAN_TASK = "plan"


class StageTask:
    """What every launcher shares: the plan, the command line, the environment, skips."""

    stage: str
    config_paths: list[str]

    def launch_plan(self, context: Any) -> Plan:
        """The run's plan; skips this task in a dry run, and ingest when no batch is new."""
        from airflow.sdk.exceptions import AirflowSkipException

        plan = Plan.model_validate(context["ti"].xcom_pull(task_ids=PLAN_TASK))
        argv = self.stage_command(plan)
        if plan.dry_run:
            raise AirflowSkipException(f"dry run; would run: {' '.join(argv)}")
        if self.stage == "ingest" and not plan.batches:
            raise AirflowSkipException("no new batch to ingest: training on the latest dataset version")
        return plan

    def stage_command(self, plan: Plan) -> list[str]:
        return stage_command(self.stage, plan, self.config_paths)

    @staticmethod
    def run_environment(plan: Plan) -> dict[str, str]:
        return {PARENT_RUN_ENV: plan.mlflow_run_id or "", "MLFLOW_TRACKING_URI": plan.tracking_uri}
