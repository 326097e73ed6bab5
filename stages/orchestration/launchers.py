"""One factory turns a stage into an Airflow operator: ``local``, ``docker`` or ``kubernetes``.

Every launcher runs ``python -m stages.<stage>`` with the command line the run's plan gives
(``plan.stage_arguments``), in the environment that continues the pipeline's MLflow run
(``MLFLOW_RUN_ID``, ``MLFLOW_TRACKING_URI``). What the form decides per run (the GPU count)
and what DockerOperator does not template (``device_requests``, ``shm_size``) is resolved in
``execute`` from the plan, which the operators read from the ``plan`` task's XCom.

- ``local``: a subprocess in the worker's own environment (the embedded demo, CI).
- ``docker``: DockerOperator; GPU stages get ``gpu_container`` (device requests, shm size,
  IPC mode, ulimits, NCCL environment) through ``stages.launch.gpu_run_arguments``.
- ``kubernetes``: KubernetesPodOperator; GPU stages get ``nvidia.com/gpu`` limits and a
  memory-backed emptyDir at ``/dev/shm``; finetune is a Kubeflow TrainJob over the run's
  nodes (``trainjob.TrainJobOperator``).

Provider modules are imported when an operator is built, so a deployment only needs the
provider of the launcher it uses.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

from stages.cli import EXIT_BAD_INPUT
from stages.config import PipelineConfig
from stages.launch import gpu_environment, shm_quantity
from stages.orchestration.plan import Plan, stage_command, stage_config_paths
from stages.tracking import PARENT_RUN_ENV

PLAN_TASK = "plan"


class StageLaunch:
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


class LocalStageOperator(StageLaunch, BaseOperator):
    """A stage as a subprocess of the worker, in its environment, from the project's root.

    Exit 2 (bad input) fails the task without retries: the same input fails the same way.
    """

    def __init__(self, *, stage: str, home: Path, config_paths: list[str], **kwargs):
        super().__init__(**kwargs)
        self.stage, self.home, self.config_paths = stage, Path(home), config_paths
        self._process: subprocess.Popen | None = None

    def stage_command(self, plan: Plan) -> list[str]:
        return [sys.executable, *super().stage_command(plan)[1:]]

    def execute(self, context: Any) -> dict[str, str]:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        plan = self.launch_plan(context)
        argv = self.stage_command(plan)
        self.log.info("running %s", " ".join(argv))
        env = {**os.environ, **self.run_environment(plan)}
        self._process = subprocess.Popen(argv, cwd=self.home, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, errors="replace")  # fmt: skip
        last = ""
        for line in self._process.stdout:
            last = line.rstrip() or last
            self.log.info("%s", line.rstrip())
        code = self._process.wait()
        if code == EXIT_BAD_INPUT:
            raise AirflowFailException(f"stages.{self.stage}: bad input (exit 2): {last}")
        if code:
            raise AirflowException(f"stages.{self.stage} failed with exit code {code}: {last}")
        return {"stage": self.stage, "output": argv[argv.index("--output") + 1]}

    def on_kill(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()  # the finetune stage takes its training processes down with it


def _docker_stage_operator(**kwargs):
    """The DockerOperator subclass, built when the docker launcher is configured."""
    from airflow.providers.docker.operators.docker import DockerOperator

    class DockerStageOperator(StageLaunch, DockerOperator):
        """A stage in a container of its image; GPU settings resolved per run from the plan. Exit 2
        (bad input, a folder in use) fails the task without retries, as with the local launcher."""

        def __init__(self, *, stage: str, config_paths: list[str], gpu: PipelineConfig | None,
                     pass_environment: list[str], **kwargs):  # fmt: skip
            super().__init__(**kwargs)
            self.stage, self.config_paths, self.gpu_config = stage, config_paths, gpu
            self.pass_environment = pass_environment

        def execute(self, context: Any):
            plan = self.launch_plan(context)
            self.container_settings_for(plan)
            from airflow.providers.docker.exceptions import DockerContainerFailedException
            from airflow.sdk.exceptions import AirflowFailException

            try:
                return super().execute(context)
            except DockerContainerFailedException as exc:  # its message holds the engine's {'StatusCode': N}
                if re.search(rf"'StatusCode': {EXIT_BAD_INPUT}\b", str(exc)):
                    last = next((str(line).strip() for line in reversed(exc.logs or []) if str(line).strip()), "")
                    raise AirflowFailException(f"stages.{self.stage}: bad input (exit 2): {last}") from exc
                raise

        def container_settings_for(self, plan: Plan) -> None:
            """Command, environment and GPU settings of this run's container, set on the operator."""
            from docker.utils import parse_bytes

            from stages.launch import gpu_run_arguments

            self.command = self.stage_command(plan)
            self.environment = {**self.environment, **self.run_environment(plan)}
            # Credentials from the worker's environment, read now: never rendered, logged or serialized.
            # DockerOperator adds its ``_private_environment`` to the container's environment.
            self._private_environment = {n: os.environ[n] for n in self.pass_environment if n in os.environ}
            if self.gpu_config is not None:
                gpu = gpu_run_arguments(self.gpu_config.gpu_container, plan.gpus or None)
                self.environment.update(gpu["environment"])
                self.shm_size = parse_bytes(gpu["shm_size"])
                self.ulimits = gpu["ulimits"]
                self.ipc_mode = gpu.get("ipc_mode")
                self.device_requests = gpu.get("device_requests")

    return DockerStageOperator(**kwargs)


def _kubernetes_stage_operator(**kwargs):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    class KubernetesStageOperator(StageLaunch, KubernetesPodOperator):
        """A stage in a pod; GPU stages get GPU limits and a memory-backed /dev/shm."""

        def __init__(self, *, stage: str, config_paths: list[str], gpu: PipelineConfig | None, **kwargs):
            super().__init__(**kwargs)
            self.stage, self.config_paths, self.gpu_config = stage, config_paths, gpu

        def execute(self, context: Any):
            self.pod_spec_for(self.launch_plan(context))
            return super().execute(context)

        def pod_spec_for(self, plan: Plan) -> None:
            """Command, environment and GPU resources of this run's pod, set on the operator."""
            command = self.stage_command(plan)
            self.cmds, self.arguments = command[:1], command[1:]
            environment = {**{v.name: v.value for v in self.env_vars or []}, **self.run_environment(plan)}
            if self.gpu_config is not None:
                settings = self.gpu_config.gpu_container
                environment.update(gpu_environment(settings))
                if plan.gpus:
                    self.container_resources = k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": str(plan.gpus)})
                shm = k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=shm_quantity(settings))
                self.volumes = [*self.volumes, k8s.V1Volume(name="dshm", empty_dir=shm)]
                self.volume_mounts = [*self.volume_mounts, k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")]
            self.env_vars = [k8s.V1EnvVar(name=key, value=value) for key, value in environment.items()]

    return KubernetesStageOperator(**kwargs)


def host_path(source: str) -> str:
    """A mount's host path with ``${VAR}`` read from the scheduler's environment (compose sets
    ``DOC_EXTRACTION_DATA``); an unset variable is an error naming it."""
    from stages.config import ConfigError

    expanded = os.path.expandvars(source)
    if unset := re.findall(r"[$]{?(\w+)", expanded):
        raise ConfigError(f"orchestration.mounts: {source}: {', '.join(unset)} not set in the scheduler's environment")
    return expanded


def stage_operator(stage: str, config: PipelineConfig, home: Path, config_paths: list[str], **task_kwargs):
    """The operator that runs ``stage`` with the configured launcher, retries and timeout.

    ``config_paths``: the config files as the worker sees them (local launcher); containers
    read ``orchestration.container_configs``.
    """
    settings = config.orchestration
    gpu = config if stage in settings.gpu_stages else None
    common: dict[str, Any] = {
        "task_id": stage,
        "retries": settings.retries,
        "retry_delay": timedelta(minutes=settings.retry_delay_minutes),
        "execution_timeout": timedelta(minutes=settings.timeout_minutes.get(stage, 240)),
        **task_kwargs,
    }
    config_paths = stage_config_paths(config, config_paths)
    if settings.launcher == "local":
        return LocalStageOperator(stage=stage, home=home, config_paths=config_paths, **common)
    image = config.gpu_container.image if gpu else settings.stage_image
    environment = dict(settings.container_environment)
    if settings.launcher == "docker":
        from docker.types import Mount

        mounts = [Mount(target=target, source=host_path(source), type="bind")
                  for source, target in settings.mounts.items()]  # fmt: skip
        return _docker_stage_operator(
            stage=stage, config_paths=config_paths, gpu=gpu, image=image, docker_url=settings.docker_url,
            network_mode=settings.network_mode, mounts=mounts, environment=environment, auto_remove="success",
            pass_environment=settings.pass_environment,
            mount_tmp_dir=False, **common,
        )  # fmt: skip
    kube = settings.kubernetes
    if stage == "finetune":
        from stages.orchestration.trainjob import TrainJobOperator

        return TrainJobOperator(stage=stage, config=config, config_paths=config_paths, poll_seconds=kube.poll_seconds,
                                **common)  # fmt: skip
    from kubernetes.client import models as k8s

    volumes, volume_mounts = [], []
    if kube.data_claim:
        claim = k8s.V1PersistentVolumeClaimVolumeSource(claim_name=kube.data_claim)
        volumes.append(k8s.V1Volume(name="data", persistent_volume_claim=claim))
        volume_mounts.append(k8s.V1VolumeMount(name="data", mount_path=kube.data_mount_path))
    return _kubernetes_stage_operator(
        stage=stage, config_paths=config_paths, gpu=gpu, image=image, namespace=kube.namespace,
        service_account_name=kube.service_account, node_selector=kube.node_selector, env_vars=environment,
        volumes=volumes, volume_mounts=volume_mounts, name=f"doc-extraction-{stage}", kubernetes_conn_id=kube.conn_id,
        on_finish_action="delete_succeeded_pod", get_logs=True, **common,
    )  # fmt: skip
