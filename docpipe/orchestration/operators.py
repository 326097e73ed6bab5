"""The operators that run one stage: a subprocess of the worker (``local``), a container
(``docker``, DockerOperator) or a pod (``kubernetes``, KubernetesPodOperator). The provider
classes are built when first asked for, so a deployment only needs its launcher's provider.
Finetune on Kubernetes is a Kubeflow TrainJob instead (``trainjob``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

from docpipe.config import PipelineConfig
from docpipe.contract import EXIT_BAD_INPUT
from docpipe.orchestration.containers import gpu_environment, shm_quantity
from docpipe.orchestration.plan import Plan
from docpipe.orchestration.stage_task import StageTask


class LocalStageOperator(StageTask, BaseOperator):
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
        self._process = subprocess.Popen(
            argv, cwd=self.home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
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


def docker_stage_operator(**kwargs):
    """The DockerOperator subclass, built when the docker launcher is configured."""
    from airflow.providers.docker.operators.docker import DockerOperator

    class DockerStageOperator(StageTask, DockerOperator):
        """A stage in a container of its image; GPU settings resolved per run from the plan. Exit 2
        (bad input, a folder in use) fails the task without retries, as with the local launcher."""

        def __init__(
            self,
            *,
            stage: str,
            config_paths: list[str],
            gpu: PipelineConfig | None,
            pass_environment: list[str],
            **kwargs,
        ):
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

            from docpipe.orchestration.containers import gpu_run_arguments

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


def kubernetes_stage_operator(**kwargs):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    class KubernetesStageOperator(StageTask, KubernetesPodOperator):
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
