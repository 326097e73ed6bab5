"""Finetune across nodes on Kubernetes: a Kubeflow Trainer ``TrainJob`` and the operator that follows it.

The TrainJob runs the finetune stage's command on ``nodes`` pods of the ``torch-distributed``
runtime (``orchestration.kubernetes.training_runtime``), which sets PET_NNODES, PET_NODE_RANK,
PET_MASTER_ADDR, ... in each; the stage's torchrun reads them (``stages.finetune``). The job is
built with Kubeflow Trainer's published API models (``kubeflow-trainer-api``) and the pod it
asks for is validated against the Kubernetes schemas (``kubernetes-validate``) before it is
submitted. ``TrainJobOperator`` submits it, copies its pods' logs into the task log, returns
when it completes and deletes it when it fails, when the task is killed or times out.
"""

from __future__ import annotations

import re
import time
from typing import Any

from airflow.sdk import BaseOperator

from docpipe.config import PipelineConfig
from docpipe.loader import ConfigError
from docpipe.orchestration.containers import gpu_environment, shm_quantity
from docpipe.orchestration.plan import Plan, stage_command
from docpipe.orchestration.stage_task import StageTask

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE = "node"  # the torch-distributed runtime's replicated job and container
MANAGER = "doc-extraction"  # owner of this job's runtime patch
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"  # on every pod of the TrainJob's JobSet
REQUEST_TIMEOUT = (10, 60)  # seconds to connect, to read: an API server that stalls fails the call


def job_name(run_name: str, attempt: int) -> str:
    """A DNS-1035 name for one attempt of one run (≤ 63 characters, letters, digits and dashes)."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-")
    return f"ft-{slug[:50].strip('-')}-{attempt}"


def node_environment(config: PipelineConfig, environment: dict[str, str]) -> list:
    """The nodes' environment: the values given, and credentials as references to the Secret (the
    manifest names them only; their values stay in the Secret)."""
    from kubeflow_trainer_api import models as m

    kube = config.orchestration.kubernetes
    env = [m.IoK8sApiCoreV1EnvVar(name=key, value=value) for key, value in environment.items()]
    if kube.credentials_secret:
        secret = kube.credentials_secret
        env += [
            m.IoK8sApiCoreV1EnvVar(
                name=key,
                value_from=m.IoK8sApiCoreV1EnvVarSource(
                    secret_key_ref=m.IoK8sApiCoreV1SecretKeySelector(name=secret, key=key, optional=True)
                ),
            )
            for key in config.orchestration.pass_environment
        ]
    return env


def node_pod_patch(config: PipelineConfig):
    """What the runtime's node pods get added: a memory-backed /dev/shm and the data claim (every node
    reads the export and writes checkpoints there: ReadWriteMany), under the runtime patch's manager."""
    from kubeflow_trainer_api import models as m

    kube = config.orchestration.kubernetes
    shm = m.IoK8sApiCoreV1EmptyDirVolumeSource(
        medium="Memory", size_limit=m.IoK8sApimachineryPkgApiResourceQuantity(shm_quantity(config.gpu_container))
    )
    volumes = [m.IoK8sApiCoreV1Volume(name="dshm", empty_dir=shm)]
    mounts = [m.IoK8sApiCoreV1VolumeMount(name="dshm", mount_path="/dev/shm")]
    if kube.data_claim:
        claim = m.IoK8sApiCoreV1PersistentVolumeClaimVolumeSource(claim_name=kube.data_claim)
        volumes.append(m.IoK8sApiCoreV1Volume(name="data", persistent_volume_claim=claim))
        mounts.append(m.IoK8sApiCoreV1VolumeMount(name="data", mount_path=kube.data_mount_path))
    pod = m.TrainerV1alpha1PodSpecPatch(
        containers=[m.TrainerV1alpha1ContainerPatch(name=NODE, volume_mounts=mounts)],
        volumes=volumes,
        node_selector=kube.node_selector or None,
        service_account_name=kube.service_account,
    )
    node_job = m.TrainerV1alpha1ReplicatedJobPatch(
        name=NODE,
        template=m.TrainerV1alpha1JobTemplatePatch(
            spec=m.TrainerV1alpha1JobSpecPatch(template=m.TrainerV1alpha1PodTemplatePatch(spec=pod))
        ),
    )
    return m.TrainerV1alpha1RuntimePatch(
        manager=MANAGER,
        training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=m.TrainerV1alpha1JobSetTemplatePatch(
                spec=m.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[node_job])
            )
        ),
    )


def train_job(name: str, config: PipelineConfig, plan: Plan, command: list[str], environment: dict[str, str]):
    """The TrainJob for finetune: ``plan.nodes`` nodes of ``plan.gpus`` GPUs, the stage image, a
    memory-backed /dev/shm, the data claim, NCCL and MLflow environment, credentials by reference."""
    from kubeflow_trainer_api import models as m

    kube = config.orchestration.kubernetes
    limits = {"nvidia.com/gpu": m.IoK8sApimachineryPkgApiResourceQuantity(str(plan.gpus))} if plan.gpus else None
    trainer = m.TrainerV1alpha1Trainer(
        image=config.gpu_container.image,
        command=command[:1],
        args=command[1:],
        env=node_environment(config, environment),
        num_nodes=plan.nodes,
        num_proc_per_node=max(plan.gpus, 1),
        resources_per_node=m.IoK8sApiCoreV1ResourceRequirements(limits=limits),
    )
    return m.TrainerV1alpha1TrainJob(
        api_version=f"{GROUP}/{VERSION}",
        kind="TrainJob",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, namespace=kube.namespace, labels={"app.kubernetes.io/part-of": "doc-extraction"}
        ),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtime_ref=m.TrainerV1alpha1RuntimeRef(name=kube.training_runtime),
            trainer=trainer,
            runtime_patches=[node_pod_patch(config)],
        ),
    )


def finetune_job(name: str, config: PipelineConfig, plan: Plan, config_paths: list[str]):
    """The run's finetune TrainJob: the stage's command line and the environment every launcher
    gives it (NCCL settings, the MLflow run to continue)."""
    environment = {
        **config.orchestration.container_environment,
        **gpu_environment(config.gpu_container),
        "PYTHONUNBUFFERED": "1",
        **StageTask.run_environment(plan),
    }
    return train_job(name, config, plan, stage_command("finetune", plan, config_paths), environment)


def node_pod(job) -> dict[str, Any]:
    """The pod of one node as the job asks for it (the runtime's template adds the rest): what
    is checked against the Kubernetes schemas."""
    trainer = job.spec.trainer
    patch = job.spec.runtime_patches[0].training_runtime_spec.template.spec.replicated_jobs[0]
    pod = patch.template.spec.template.spec.to_dict()
    container = {
        "name": NODE,
        "image": trainer.image,
        "command": trainer.command,
        "args": trainer.args,
        "env": [e.to_dict() for e in trainer.env],
        "resources": trainer.resources_per_node.to_dict(),
        **{k: v for k, v in pod.pop("containers")[0].items() if k != "name"},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{job.metadata.name}-{NODE}-0-0"},
        "spec": {**pod, "containers": [container], "restartPolicy": "Never"},
    }


def validate(job, kubernetes_version: str) -> None:
    """``ConfigError`` naming the field when the node pod does not pass the cluster version's schema."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(node_pod(job), kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(map(str, exc.path)) or "pod"
        raise ConfigError(f"TrainJob {job.metadata.name}: {where}: {exc.message}") from None


class TrainJobOperator(StageTask, BaseOperator):
    """Finetune as a Kubeflow TrainJob: submitted, followed with its logs, deleted when it fails,
    when the task is killed or times out. Exit 2 of a node (bad input) fails without retries."""

    def __init__(
        self, *, stage: str, config: PipelineConfig, config_paths: list[str], poll_seconds: float = 15, **kwargs
    ):
        super().__init__(**kwargs)
        self.stage, self.config, self.config_paths, self.poll_seconds = stage, config, config_paths, poll_seconds
        self.job_name: str | None = None

    def execute(self, context: Any) -> dict[str, str]:
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        plan = self.launch_plan(context)
        kube = self.config.orchestration.kubernetes
        self.job_name = job_name(plan.run_name, context["ti"].try_number)
        job = finetune_job(self.job_name, self.config, plan, self.config_paths)
        command = job.spec.trainer.args
        validate(job, kube.kubernetes_version)
        self.hook = KubernetesHook(conn_id=kube.conn_id)
        self.log.info(
            "submitting TrainJob %s/%s: %d node(s) x %d GPU(s), runtime %s",
            kube.namespace,
            self.job_name,
            plan.nodes,
            plan.gpus,
            kube.training_runtime,
        )
        self.hook.custom_object_client.create_namespaced_custom_object(
            GROUP, VERSION, kube.namespace, PLURAL, job.to_dict(), _request_timeout=REQUEST_TIMEOUT
        )
        try:
            self.follow(kube.namespace)
        except BaseException:  # failed, timed out (AirflowTaskTimeout) or interrupted: no job is left running
            self.delete()
            raise
        return {"stage": self.stage, "output": command[command.index("--output") + 1], "trainjob": self.job_name}

    def follow(self, namespace: str) -> None:
        """Copy the pods' new log lines into the task log until the job completes or fails."""
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        seen: dict[str, str] = {}  # pod -> timestamp of the last line copied
        while True:
            job = self.hook.custom_object_client.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, self.job_name, _request_timeout=REQUEST_TIMEOUT
            )
            pods = self.copy_logs(namespace, seen)
            conditions = {
                c["type"]: c for c in (job.get("status") or {}).get("conditions", []) if c["status"] == "True"
            }
            if "Complete" in conditions:
                self.log.info("TrainJob %s complete", self.job_name)
                return
            if "Failed" in conditions:
                why = conditions["Failed"].get("message") or conditions["Failed"].get("reason", "")
                statuses = [s for pod in pods if pod.status for s in pod.status.container_statuses or []]
                codes = {s.state.terminated.exit_code for s in statuses if s.state and s.state.terminated}
                if 2 in codes:
                    raise AirflowFailException(f"stages.{self.stage}: bad input (exit 2) in TrainJob {self.job_name}")
                raise AirflowException(f"TrainJob {self.job_name} failed: {why}")
            time.sleep(self.poll_seconds)

    def copy_logs(self, namespace: str, seen: dict[str, str]) -> list:
        """New log lines of every started pod of the job, each prefixed with its pod; returns the pods."""
        core = self.hook.core_v1_client
        pods = core.list_namespaced_pod(
            namespace, label_selector=f"{JOBSET_LABEL}={self.job_name}", _request_timeout=REQUEST_TIMEOUT
        ).items
        since = int(self.poll_seconds * 2 + 30)  # overlapping windows; lines already copied are skipped
        for pod in pods:
            name = pod.metadata.name
            if pod.status is None or pod.status.phase in (None, "Pending"):
                continue
            response = core.read_namespaced_pod_log(
                name,
                namespace,
                container=NODE,
                timestamps=True,
                since_seconds=since,
                _request_timeout=REQUEST_TIMEOUT,
                _preload_content=False,
            )
            for line in response.data.decode("utf-8", "replace").splitlines():
                stamp, _, message = line.partition(" ")
                if stamp > seen.get(name, ""):
                    seen[name] = stamp
                    self.log.info("[%s] %s", name, message)
        return pods

    def delete(self) -> None:
        """Delete the job and, through the garbage collector, its JobSet and pods; a failure to
        reach the API server is logged, not raised over the error that led here."""
        if not self.job_name:
            return
        kube = self.config.orchestration.kubernetes
        try:
            self.hook.custom_object_client.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                kube.namespace,
                PLURAL,
                self.job_name,
                propagation_policy="Foreground",
                _request_timeout=REQUEST_TIMEOUT,
            )
            self.log.info("deleted TrainJob %s/%s", kube.namespace, self.job_name)
        except Exception as exc:  # noqa: BLE001 - reported, and the original failure stands
            self.log.error("could not delete TrainJob %s/%s: %s", kube.namespace, self.job_name, exc)

    def on_kill(self) -> None:
        self.delete()
