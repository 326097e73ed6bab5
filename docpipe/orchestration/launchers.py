"""The function that turns a stage into an Airflow operator: ``local``, ``docker`` or ``kubernetes``.

Every launcher runs ``python -m stages.<stage>`` with the command line the run's plan gives
(``plan.stage_arguments``), in the environment that continues the pipeline's MLflow run
(``MLFLOW_RUN_ID``, ``MLFLOW_TRACKING_URI``). What the form decides per run (the GPU count)
and what DockerOperator does not template (``device_requests``, ``shm_size``) is resolved in
``execute`` from the plan, which the operators read from the ``plan`` task's XCom.

- ``local``: a subprocess in the worker's own environment (the embedded demo, CI).
- ``docker``: DockerOperator; GPU stages get ``gpu_container`` (device requests, shm size,
  IPC mode, ulimits, NCCL environment) through ``docpipe.orchestration.containers.gpu_run_arguments``.
- ``kubernetes``: KubernetesPodOperator; GPU stages get ``nvidia.com/gpu`` limits and a
  memory-backed emptyDir at ``/dev/shm``; finetune is a Kubeflow TrainJob over the run's
  nodes (``trainjob.TrainJobOperator``).

Provider modules are imported when an operator is built, so a deployment only needs the
provider of the launcher it uses.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from docpipe.config import PipelineConfig
from docpipe.orchestration.operators import LocalStageOperator, docker_stage_operator, kubernetes_stage_operator
from docpipe.orchestration.plan import stage_config_paths


def host_path(source: str) -> str:
    """A mount's host path with ``${VAR}`` read from the scheduler's environment (compose sets
    ``DOC_EXTRACTION_DATA``); an unset variable is an error naming it."""
    from docpipe.loader import ConfigError

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
    if settings.launcher == "docker":
        return _in_a_container(stage, config, config_paths, common)
    return _in_a_pod(stage, config, config_paths, common)


def _image_of(stage: str, config: PipelineConfig) -> tuple[PipelineConfig | None, str]:
    """A GPU stage's configuration (its container settings come from it; None for a CPU stage) and
    the image the stage runs in."""
    if stage in config.orchestration.gpu_stages:
        return config, config.gpu_container.image
    return None, config.orchestration.stage_image


def _in_a_container(stage: str, config: PipelineConfig, config_paths: list[str], common: dict[str, Any]):
    """The docker launcher's operator: the stage's image, the configured mounts and network."""
    from docker.types import Mount

    settings = config.orchestration
    gpu, image = _image_of(stage, config)
    mounts = [Mount(target=target, source=host_path(source), type="bind") for source, target in settings.mounts.items()]
    return docker_stage_operator(
        stage=stage,
        config_paths=config_paths,
        gpu=gpu,
        image=image,
        docker_url=settings.docker_url,
        network_mode=settings.network_mode,
        mounts=mounts,
        environment=dict(settings.container_environment),
        auto_remove="success",
        pass_environment=settings.pass_environment,
        mount_tmp_dir=False,
        **common,
    )


def _in_a_pod(stage: str, config: PipelineConfig, config_paths: list[str], common: dict[str, Any]):
    """The kubernetes launcher's operator: a pod with the data claim mounted; finetune a TrainJob."""
    settings = config.orchestration
    kube = settings.kubernetes
    if stage == "finetune":
        from docpipe.orchestration.trainjob import TrainJobOperator

        return TrainJobOperator(
            stage=stage, config=config, config_paths=config_paths, poll_seconds=kube.poll_seconds, **common
        )
    from kubernetes.client import models as k8s

    gpu, image = _image_of(stage, config)
    volumes, volume_mounts = [], []
    if kube.data_claim:
        claim = k8s.V1PersistentVolumeClaimVolumeSource(claim_name=kube.data_claim)
        volumes.append(k8s.V1Volume(name="data", persistent_volume_claim=claim))
        volume_mounts.append(k8s.V1VolumeMount(name="data", mount_path=kube.data_mount_path))
    return kubernetes_stage_operator(
        stage=stage,
        config_paths=config_paths,
        gpu=gpu,
        image=image,
        namespace=kube.namespace,
        service_account_name=kube.service_account,
        node_selector=kube.node_selector,
        env_vars=dict(settings.container_environment),
        volumes=volumes,
        volume_mounts=volume_mounts,
        name=f"doc-extraction-{stage}",
        kubernetes_conn_id=kube.conn_id,
        on_finish_action="delete_succeeded_pod",
        get_logs=True,
        **common,
    )
