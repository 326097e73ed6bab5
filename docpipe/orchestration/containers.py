"""How GPU stage containers run: Docker API arguments from ``gpu_container:`` of the config.

Light on purpose (no torch, transformers or mlflow): the Airflow DAG imports it to launch the
finetune and evaluation containers. ``configs/pipeline.yaml`` says what each setting is for.
"""

from __future__ import annotations

from typing import Any

from docpipe.config import GpuContainerConfig


def gpu_environment(settings: GpuContainerConfig) -> dict[str, str]:
    """The environment every GPU stage gets, whatever starts it: NCCL switches, visible devices."""
    environment = dict(settings.environment)
    if settings.cuda_visible_devices is not None:
        environment["CUDA_VISIBLE_DEVICES"] = settings.cuda_visible_devices
    return environment


def shm_quantity(settings: GpuContainerConfig) -> str:
    """``shm_size`` as a Kubernetes quantity (``32g`` → ``32Gi``): a memory-backed /dev/shm's size."""
    return settings.shm_size.upper() + "i"


def gpu_run_arguments(settings: GpuContainerConfig, gpus: int | list[str] | None) -> dict[str, Any]:
    """Keyword arguments for docker-py's ``containers.run``/``create`` (and DockerOperator's
    equivalents): shared memory, IPC, ulimits, NCCL environment and the GPUs to hand over.

    ``gpus``: a count, a list of device ids, or None for no GPU (CPU runs, tests).
    """
    from docker.types import DeviceRequest, Ulimit

    arguments: dict[str, Any] = {
        "shm_size": settings.shm_size,
        "ulimits": [Ulimit(name=name, soft=limit, hard=limit) for name, limit in (settings.ulimits or {}).items()],
        "environment": gpu_environment(settings),
    }
    if settings.ipc_mode:
        arguments["ipc_mode"] = settings.ipc_mode
    if isinstance(gpus, int) and gpus > 0:
        arguments["device_requests"] = [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
    elif isinstance(gpus, list) and gpus:
        arguments["device_requests"] = [DeviceRequest(device_ids=gpus, capabilities=[["gpu"]])]
    return arguments
