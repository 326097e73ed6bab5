"""Typed pipeline configuration: YAML files validated by pydantic.

``load_pipeline_config`` reads ``configs/pipeline.yaml`` and any overlays (small files
that override keys, merged in order) and returns a ``PipelineConfig``. Every error names
the file that set the offending key, the key and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from docpipe.doctypes import load_registry
from docpipe.loader import load_model
from docpipe.routing import ROUTING_PLACEHOLDERS, RoutingError, routing_prompt

DEFAULT_CONFIG = Path("configs/pipeline.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class S3Config(_Strict):
    """How to reach the S3 API; credentials come from the environment, never from here."""

    endpoint_url: str | None = Field(None, description="MinIO, moto or another S3-compatible endpoint")
    region: str = Field("us-east-1", description="the S3 region (AWS; any value for MinIO or moto)")
    max_attempts: int = Field(3, ge=1, le=20, description="attempts per S3 call, the first included")
    connect_timeout_s: float = Field(5, gt=0, description="seconds to open a connection to the S3 endpoint")
    read_timeout_s: float = Field(15, gt=0, description="seconds an S3 endpoint may stay silent within a call")

    def call_bound_s(self) -> float:
        """The longest one S3 call can take before it fails: every attempt timing out, plus backoff."""
        backoff = sum(min(2.0**retry, 20.0) for retry in range(self.max_attempts - 1))  # botocore's standard mode
        return self.max_attempts * (self.connect_timeout_s + self.read_timeout_s) + backoff


class StorageConfig(_Strict):
    """Where batches land, datasets and run outputs live: local paths or s3:// URIs."""

    landing_uri: str = Field(
        description="where labelled batches arrive (folder or s3://bucket/prefix); the watcher lists it"
    )
    datasets_uri: str = Field(description="where ingest keeps the immutable dataset versions and their images")
    runs_uri: str = Field(description="where each run's stage outputs go: exports, checkpoints, the model, reports")
    s3: S3Config = Field(S3Config(), description="how to reach the S3 API, when any location is an s3:// URI")


class TrackingConfig(_Strict):
    tracking_uri: str = Field(description="MLflow tracking URI: sqlite:///..., http(s)://...")
    experiment: str = Field("doc-extraction", description="the MLflow experiment every run of this pipeline goes to")
    artifact_location: str | None = Field(
        None, description="artifact root for a new experiment (local path or s3:// URI)"
    )
    request_timeout_s: int = Field(20, ge=1, description="seconds one call to a tracking server may take")
    max_retries: int = Field(2, ge=0, le=10, description="retries of a failed call to a tracking server")


class ModelConfig(_Strict):
    """The base model to finetune: a local folder, a mounted volume or an s3:// URI."""

    base: str = Field(description="the base model: a folder or s3:// URI you supply; nothing is fetched from a hub")
    adapter: Literal["native", "remote_code"] = Field(
        "native", description="native: transformers 5.x classes; remote_code: trust_remote_code"
    )
    llm_type: Literal["qwen2", "llama3", "minicpm"] | None = Field(
        None, description="the remote-code recipe's LLM_TYPE; required for remote_code"
    )

    @model_validator(mode="after")
    def _llm_type_matches_adapter(self) -> ModelConfig:
        if self.adapter == "remote_code" and self.llm_type is None:
            raise ValueError("llm_type is required when adapter is remote_code")
        if self.adapter == "native" and self.llm_type is not None:
            raise ValueError("llm_type applies only to adapter remote_code")
        return self


class TorchrunLayout(_Strict):
    """torchrun's layout. The environment variable named beside a key (or Kubeflow Trainer's
    ``PET_`` one), when set, wins: cluster schedulers set them per node."""

    gpus_per_node: int = Field(1, ge=1, description="GPUS_PER_NODE (PET_NPROC_PER_NODE): processes per node (CPU: 1)")
    nnodes: int = Field(1, ge=1, le=64, description="NNODES (PET_NNODES): nodes, each running the stage")
    node_rank: int = Field(0, ge=0, description="NODE_RANK (PET_NODE_RANK): this node's index; node 0 reports the run")
    master_addr: str = Field("127.0.0.1", description="MASTER_ADDR (PET_MASTER_ADDR): node 0, the rendezvous host")
    master_port: int = Field(29500, ge=1, le=65535, description="MASTER_PORT (PET_MASTER_PORT)")
    rendezvous_timeout_s: int = Field(
        900, ge=10, description="how long nodes wait for each other at the rendezvous before the run fails"
    )
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="memory of each GPU: the plan refuses a layout estimated not to fit (null: not checked)"
    )
    host_memory_gib: float | None = Field(
        None, gt=0, description="host memory of each node for the same check (CPU offload lives there)"
    )

    @model_validator(mode="after")
    def _rank_in_range(self) -> TorchrunLayout:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} is not below nnodes {self.nnodes}")
        return self


class TrainingConfig(_Strict):
    """Full-finetune hyperparameters; defaults mirror the practitioner recipe."""

    learning_rate: float = Field(1e-6, gt=0, description="peak learning rate (the recipe's 1e-6 for a full finetune)")
    lr_scheduler_type: Literal["cosine", "linear", "constant_with_warmup"] = Field(
        "cosine", description="the learning-rate schedule after warm-up"
    )
    warmup_ratio: Probability = Field(0.01, description="share of max_steps spent warming the learning rate up")
    weight_decay: float = Field(0.1, ge=0, description="AdamW's weight decay")
    adam_beta2: float = Field(0.95, gt=0, lt=1, description="AdamW's beta2 (the recipe's 0.95)")
    bf16: bool = Field(True, description="train in bfloat16 where the GPU supports it (ignored on CPU)")
    gradient_checkpointing: bool = Field(
        True, description="recompute activations in the backward pass: less memory, about a third more compute"
    )
    max_slice_nums: int = Field(9, ge=1, le=9, description="above 9 crashes MiniCPM-V 2.6 code")
    model_max_length: int = Field(
        2048,
        ge=64,
        description="tokens per document (prompt, image slices, answer); longer ones go to unfit.jsonl, never cut",
    )
    per_device_train_batch_size: int = Field(4, ge=1, description="documents per GPU per step")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="steps whose gradients are summed before one optimizer step"
    )
    max_steps: int = Field(10000, ge=1, description="optimizer steps in the run")
    eval_steps: int = Field(1000, ge=1, description="evaluate (eval loss, checkpoint scoring) every this many steps")
    save_steps: int = Field(
        2000, ge=1, description="save a checkpoint every this many steps (a multiple of eval_steps)"
    )
    save_total_limit: int = Field(
        5, ge=1, description="checkpoints kept on disk, the newest (the Trainer also keeps the best)"
    )
    tune_vision: bool = Field(True, description="train the vision encoder and resampler (false: frozen)")
    tune_llm: bool = Field(True, description="train the language model (false: frozen)")
    deepspeed: Literal["zero2", "zero2_offload", "zero3"] | None = Field(
        "zero2_offload", description="a config in configs/deepspeed/, or null for none"
    )
    max_unfit_fraction: Probability = Field(
        0.01, description="share of train documents that may not fit model_max_length before the run fails"
    )
    seed: int = Field(42, description="seeds data order, initialisation of new layers and dropout")
    dataloader_num_workers: int = Field(2, ge=0, description="processes preparing batches beside each training process")
    launch: TorchrunLayout = Field(
        TorchrunLayout(), description="torchrun's layout: processes per node, nodes, rendezvous, memory limits"
    )
    selection: Literal["field_accuracy", "document_accuracy", "eval_loss"] = Field(
        "field_accuracy", description="what makes a checkpoint the best one: accuracy of its generated answers, or loss"
    )
    selection_documents: int = Field(
        64, ge=0, description="eval documents answered at every evaluation to score the checkpoint (0: none)"
    )

    @model_validator(mode="after")
    def _something_to_tune(self) -> TrainingConfig:
        if not (self.tune_vision or self.tune_llm):
            raise ValueError("tune_vision and tune_llm are both false: nothing would be trained")
        return self

    @model_validator(mode="after")
    def _checkpoints_are_scored(self) -> TrainingConfig:
        if self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps {self.save_steps} must be a multiple of eval_steps {self.eval_steps}: "
                "every saved checkpoint is scored"
            )
        if self.selection != "eval_loss" and not self.selection_documents:
            raise ValueError(f"selection {self.selection} needs selection_documents above 0")
        return self


class GpuContainerConfig(_Strict):
    """How GPU stage containers run: image, shared memory, IPC, ulimits, NCCL and the GPUs they see."""

    image: str = Field("doc-extraction/train:latest", description="the training image GPU stages run in")
    shm_size: str = Field(
        "32g",
        pattern=r"^\d+[kmg]?$",
        description="/dev/shm of GPU containers: NCCL and DataLoader workers share tensors there (Docker gives 64m)",
    )
    ipc_mode: str | None = Field(
        None,
        description='"host" shares the host\'s IPC namespace instead of a private /dev/shm; then shm_size is ignored',
    )
    ulimits: dict[str, int] | None = Field(
        {"memlock": -1, "stack": 67108864}, description="null: the engine's defaults (where limits can't be raised)"
    )
    environment: dict[str, str] = Field(
        {},
        description="environment of GPU containers: NCCL_DEBUG (INFO shows the topology), NCCL_P2P_DISABLE and "
        'NCCL_IB_DISABLE ("1" where peer-to-peer hangs or there is no InfiniBand), NCCL_SOCKET_IFNAME (the NIC)',
    )
    cuda_visible_devices: str | None = Field(
        None, description='which GPUs the container\'s processes see, e.g. "0,1" (null: all it is given)'
    )
    gpus: int | None = Field(
        None,
        ge=0,
        description="GPUs a run's GPU stages get unless its form says otherwise (null: "
        "training.launch.gpus_per_node; 0: none, a host without GPUs)",
    )


class Thresholds(_Strict):
    field_accuracy: Probability = Field(description="the least share of fields answered right")
    document_accuracy: Probability = Field(description="the least share of documents with every field right")
    json_validity: Probability = Field(
        description="the least share of answers that are valid JSON of the type's schema"
    )


class FitCheckConfig(_Strict):
    """Training documents answered beside the eval set: train against eval tells under-fitting from
    over-fitting, and the same documents with their images swapped tell reading from guessing."""

    documents: int = Field(64, ge=0, description="training documents in the fixed sample (0: no fit check)")
    seed: int = Field(0, description="draws the sample; the same seed and train set give the same sample")
    image_control: bool = Field(True, description="answer the sample again with each image swapped for another's")
    thresholds: Thresholds | None = Field(None, description="the gate also needs the fit to reach these")
    max_control_ratio: Probability | None = Field(
        None, description="the gate also needs the control's field accuracy at most this share of the fit's"
    )

    @model_validator(mode="after")
    def _control_for_ratio(self) -> FitCheckConfig:
        if self.max_control_ratio is not None and not self.image_control:
            raise ValueError("max_control_ratio needs image_control")
        if (self.thresholds or self.max_control_ratio is not None) and not self.documents:
            raise ValueError("a gate on the fit check needs documents above 0")
        return self


class EvalSetConfig(_Strict):
    """A golden evaluation set: the eval documents of one pinned dataset version (a batch ingested
    with ``--eval-only`` makes every document of it one), the same for every model compared."""

    dataset: str = Field(min_length=1, description="the datasets location (folder or s3://) that holds the version")
    version: str = Field(min_length=1, description="the pinned dataset version id")


class EvaluationConfig(_Strict):
    """How the eval set is answered, and the accuracy gates: defaults for every type, overrides per type."""

    backend: Literal["transformers", "openai", "vllm"] = Field(
        "transformers", description="transformers: batched generate; openai: an OpenAI-compatible server; vllm"
    )
    endpoint: str | None = Field(None, description="openai backend: the server's base URL, e.g. http://host:8000/v1")
    served_model: str = Field("doc-extraction", description="openai backend: the model name the server serves")
    batch_size: int = Field(8, ge=1, description="documents per generate call (concurrent requests for openai)")
    max_new_tokens: int = Field(512, ge=1, description="cap on the budget derived from each type's answer schema")
    structured_output: bool = Field(
        False, description="constrain answers to the type's JSON schema (transformers: llguidance; openai; vllm)"
    )
    review_threshold: Probability = Field(
        0.9, description="a document whose least confident field is below this goes to review (report, labelling)"
    )
    ocr_baseline: bool = Field(True, description="also run the OCR pipeline on the eval set and report it beside")
    gallery_size: int = Field(24, ge=0, description="failed documents shown in the report")

    thresholds: Thresholds = Field(
        Thresholds(field_accuracy=0.98, document_accuracy=0.92, json_validity=0.99),
        description="the gate's thresholds for every document type without its own",
    )
    per_doc_type: dict[str, Thresholds] = Field(
        {}, description="thresholds of one document type, by its id, instead of the defaults"
    )
    type_accuracy: Probability = Field(
        0.97,
        description="routed runs: the least share of eval documents whose type the model names right (pages "
        "of none of the types included, as other)",
    )
    regression_tolerance: Probability = Field(
        0.005, description="how far below the champion a challenger may fall and still pass"
    )
    min_eval_documents: int = Field(
        1, ge=1, description="the gate fails a requested document type with fewer eval documents than this"
    )
    fit_check: FitCheckConfig = Field(
        FitCheckConfig(), description="training documents answered beside the eval set, and the image control"
    )
    eval_sets: dict[str, EvalSetConfig] = Field({}, description="golden evaluation sets by name")
    eval_set: str | None = Field(
        None, description="the golden set evaluate answers instead of the run's export (a name in eval_sets)"
    )

    @model_validator(mode="after")
    def _endpoint_for_openai(self) -> EvaluationConfig:
        if self.backend == "openai" and not self.endpoint:
            raise ValueError("backend openai needs an endpoint")
        if self.eval_set is not None and self.eval_set not in self.eval_sets:
            raise ValueError(f"eval_set {self.eval_set!r} is not one of eval_sets {sorted(self.eval_sets)}")
        return self

    def thresholds_for(self, doc_type: str) -> Thresholds:
        return self.per_doc_type.get(doc_type, self.thresholds)


class DegradationConfig(_Strict):
    """How synthetic documents are photographed badly: each effect's chance and strength."""

    rotate: Probability = Field(0.5, description="chance a document is photographed rotated")
    max_rotation_deg: float = Field(6.0, ge=0, le=45, description="the largest rotation, either way, in degrees")
    perspective: Probability = Field(0.3, description="chance of a perspective distortion")
    perspective_strength: float = Field(0.06, ge=0, le=0.2, description="corner shift / side")
    blur: Probability = Field(0.3, description="chance of a Gaussian blur")
    max_blur_radius: float = Field(1.2, ge=0, le=5, description="the largest blur radius, in pixels")
    noise: Probability = Field(0.3, description="chance of sensor noise")
    noise_sigma: float = Field(8.0, ge=0, le=64, description="the noise's standard deviation, in grey levels")
    jpeg_quality: tuple[int, int] = Field((35, 92), description="JPEG quality drawn from this range")

    @field_validator("jpeg_quality")
    @classmethod
    def _quality_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1] <= 95:
            raise ValueError("need 1 <= low <= high <= 95")
        return value


class SyntheticConfig(_Strict):
    """The synthetic document generator used by the demo and the tests."""

    count: int = Field(
        24, ge=1, le=100_000, description="documents per batch (python -m toolkit.synthetic --count overrides it)"
    )
    seed: int = Field(0, description="document i of seed s is always the same bytes")
    dense: Probability = Field(0.3, description="share of documents in a dense layout")
    degradation: DegradationConfig = Field(
        DegradationConfig(), description="how the rendered documents are photographed badly"
    )


class DatasetConfig(_Strict):
    """Ingest: what a record must satisfy, when a batch fails, and how splits are drawn."""

    eval_fraction: Probability = Field(0.1, description="share of documents in the eval split")
    split_salt: str = Field("v1", min_length=1, description="changing it reshuffles every split: don't")
    max_bad_fraction: Probability = Field(0.2, description="a batch with more bad records fails the stage")
    max_image_pixels: int = Field(60_000_000, ge=1, description="decompression-bomb guard")
    max_image_bytes: int = Field(50 * 2**20, ge=1, description="a larger image file is quarantined")
    min_image_side: int = Field(32, ge=1, description="an image with a shorter side, in pixels, is quarantined")
    workers: int = Field(0, ge=0, description="image-checking processes; 0 means one per CPU")


DEFAULT_ROUTING_PROMPT = (
    "<image>\n這是哪一種文件?{types}。回傳 JSON:doc_type 為文件類型,再附該類型的欄位;"
    '都不是則只回傳 {{"doc_type": "other"}}'
)


class ExportConfig(_Strict):
    """Annotation export to the MiniCPM-V conversation format."""

    image_root: str | None = Field(
        None, description="where the training container sees the dataset root; null: the dataset's own location"
    )
    prompt_variants: bool = Field(
        True, description="train documents draw from each type's prompt_variants (type given only)"
    )
    routing: bool = Field(
        True,
        description="ask every document without its type (one routing prompt for all types): the answer names "
        'the type, then its fields, or {"doc_type": "other"} for a page of none of the run\'s types; on by '
        "default because documents arrive unsorted, as in the recipe's 如果這是… prompts (false: each "
        "document asked with its own type's prompt, and pages labelled other are left out)",
    )
    routing_prompt: str = Field(
        DEFAULT_ROUTING_PROMPT,
        description="the routing prompt, with one <image>; {types} is filled with each type's display name and "
        "id, {prompts} with each type's own prompt, one per line (write a literal brace as {{ or }})",
    )

    @field_validator("routing_prompt")
    @classmethod
    def _routing_prompt_fills(cls, template: str) -> str:
        if template.count("<image>") != 1:
            raise ValueError("routing_prompt must contain the <image> placeholder exactly once")
        if not any("{" + name + "}" in template for name in ROUTING_PLACEHOLDERS):
            raise ValueError("routing_prompt names no type: use {types} or {prompts}")
        try:
            routing_prompt(template, [])
        except RoutingError as exc:
            raise ValueError(str(exc)) from None
        return template


class PatchConfig(_Strict):
    """Which checkpoint of a finetune run becomes the model."""

    checkpoint: Literal["best", "latest"] = Field(
        "best", description="best: by training.selection (the latest where no eval ran); latest: the newest"
    )
    max_new_tokens: int = Field(64, ge=1, description="tokens generated from one example to prove the model answers")


class ServingConfig(_Strict):
    """vLLM server flags for MiniCPM-V, in one place (written into the image's serve.yaml)."""

    served_model_name: str = Field(
        "doc-extraction", description="the model name clients ask the server for (vLLM's --served-model-name)"
    )
    max_model_len: int = Field(4096, ge=256, description="prompt (image slices included) plus answer")
    limit_mm_per_prompt: dict[str, int] = Field({"image": 1}, description="one document image per request")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of GPU memory vLLM may take (weights and KV cache)"
    )
    port: int = Field(8000, ge=1, le=65535, description="the port the server listens on")
    # Request limits of the CPU stand-in (toolkit.openai_standin); vLLM bounds tokens by max_model_len.
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="a request's decoded image, in bytes")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height, checked before decoding")
    max_tokens: int = Field(1024, ge=1, description="the largest max_tokens a request may ask for")


class PublishConfig(_Strict):
    """Model Registry entry and the vLLM serving image."""

    registered_model: str = Field("doc-extraction", min_length=1, description="MLflow Model Registry name")
    image_repository: str = Field(description="where serving images are pushed, e.g. registry.example.com/doc/serving")
    vllm_image: str = Field("vllm/vllm-openai:v0.33.0", description="the official OpenAI-server base, pinned")
    model_source: Literal["baked", "artifact_store"] = Field(
        "baked", description="baked: the weights inside the image; artifact_store: vLLM streams them at start"
    )
    serving: ServingConfig = Field(
        ServingConfig(), description="the vLLM server's flags, written into the image's serve.yaml"
    )
    smoke_gpus: int = Field(1, ge=0, description="GPUs the smoke-test container gets (0 where there is none)")
    smoke_timeout_s: int = Field(900, ge=10, description="how long the server may take to become healthy")
    engine_timeout_s: int = Field(
        600,
        ge=10,
        description="seconds the container engine may stay silent within one call (a build streams "
        "progress; a stalled engine fails the stage after this)",
    )


class KubernetesConfig(_Strict):
    """Where the kubernetes launcher runs stage pods."""

    namespace: str = Field("default", description="the namespace stage pods and TrainJobs run in")
    service_account: str | None = Field(
        None, description="the service account of stage pods (null: the namespace's default)"
    )
    data_claim: str | None = Field(None, description="a PersistentVolumeClaim mounted at data_mount_path")
    data_mount_path: str = Field("/data", description="where the data claim is mounted in every pod")
    node_selector: dict[str, str] = Field({}, description="node labels stage pods must match, e.g. a GPU pool's")
    conn_id: str = Field("kubernetes_default", description="Airflow connection to the cluster (its kubeconfig)")
    training_runtime: str = Field(
        "torch-distributed", description="the Kubeflow Trainer ClusterTrainingRuntime finetune's TrainJob runs on"
    )
    credentials_secret: str | None = Field(
        None, description="a Secret holding orchestration.pass_environment's keys, given to the TrainJob's nodes"
    )
    kubernetes_version: str = Field(
        "1.33", description="the cluster's version, whose schemas the TrainJob's pod must pass"
    )
    poll_seconds: float = Field(15, gt=0, description="how often the TrainJob's status and logs are read")


class OrchestrationConfig(_Strict):
    """How the Airflow DAG runs the stages (dags/doc_extraction.py)."""

    launcher: Literal["local", "docker", "kubernetes"] = Field(
        "local", description="local: a subprocess beside the worker; docker: DockerOperator; kubernetes: a pod"
    )
    stage_image: str = Field("doc-extraction/stages:latest", description="CPU stages; GPU stages use gpu_container")
    gpu_stages: list[str] = Field(["finetune", "patch", "evaluate"], description="stages run on gpu_container.image")
    docker_url: str = Field("unix://var/run/docker.sock", description="the engine the docker launcher talks to")
    network_mode: str | None = Field(None, description="docker network of stage containers, e.g. the compose one")
    container_configs: list[str] = Field(
        ["configs/pipeline.yaml"], description="config files as stage containers see them (/app/configs in the images)"
    )
    mounts: dict[str, str] = Field(
        {},
        description="docker launcher: host path -> container path (data, models, caches); ${VAR} in a host "
        "path is read from the scheduler's environment",
    )
    container_environment: dict[str, str] = Field({}, description="extra non-secret environment for stage containers")
    pass_environment: list[str] = Field(
        [], description="names of the worker's environment variables passed privately to stage containers (keys)"
    )
    kubernetes: KubernetesConfig = Field(KubernetesConfig(), description="the kubernetes launcher's cluster settings")
    landing_poll_seconds: int = Field(
        30,
        ge=5,
        description="how often the polling watcher lists the landing prefix (a new batch starts a run "
        "within this plus the watcher task's run time)",
    )
    sqs_queue: str | None = Field(
        None, description="SQS queue fed by S3 event notifications: enables the event watcher"
    )
    aws_conn_id: str = Field("aws_default", description="Airflow connection for S3 and SQS (credentials live there)")
    publish: bool = Field(True, description="publish after a passed gate (the form's default; false: no registry here)")
    retries: int = Field(2, ge=0, description="retries of a failed stage task (finetune resumes from its checkpoint)")
    retry_delay_minutes: int = Field(2, ge=0, description="minutes between a failed stage task and its retry")
    timeout_minutes: dict[str, int] = Field(
        {"ingest": 120, "export": 60, "finetune": 4320, "patch": 120, "evaluate": 600, "publish": 180},
        description="per-stage execution timeout",
    )


class LabellingConfig(_Strict):
    """The labelling loop: a Label Studio server where people review pre-filled documents (its key
    comes from the environment, ``LABEL_STUDIO_API_KEY``, never from here)."""

    url: str = Field("http://127.0.0.1:8081", description="the Label Studio server's base URL")
    project_prefix: str = Field("doc-extraction", min_length=1, description="projects are '<prefix>: <doc type>'")
    structured_output: bool = Field(True, description="pre-fill with answers constrained to the type's schema")
    timeout_s: float = Field(60, gt=0, description="seconds one API call may take")
    retries: int = Field(3, ge=0, description="retries of a call the server answered 502/503/504 or not at all")


class PipelineConfig(_Strict):
    doctypes_dir: Path = Field(
        Path("configs/doctypes"), description="the folder of document-type files (one YAML per type)"
    )
    deepspeed_dir: Path = Field(
        Path("configs/deepspeed"), description="the folder of DeepSpeed configs that training.deepspeed names"
    )
    doc_types: list[str] = Field(min_length=1, description="document types this pipeline trains on")
    storage: StorageConfig = Field(description="where batches land, datasets and run outputs live")
    tracking: TrackingConfig = Field(description="the MLflow tracking server or store")
    model: ModelConfig = Field(description="the base model to finetune")
    training: TrainingConfig = Field(
        TrainingConfig(), description="full-finetune hyperparameters and torchrun's layout"
    )
    gpu_container: GpuContainerConfig = Field(
        GpuContainerConfig(), description="how GPU stage containers run: image, shared memory, ulimits, NCCL"
    )
    evaluation: EvaluationConfig = Field(
        EvaluationConfig(), description="how the eval set is answered, and the accuracy gate"
    )
    synthetic: SyntheticConfig = Field(
        SyntheticConfig(), description="the synthetic document generator (the demo and the tests)"
    )
    dataset: DatasetConfig = Field(
        DatasetConfig(), description="ingest's checks, its failure threshold and how splits are drawn"
    )
    export: ExportConfig = Field(ExportConfig(), description="export to the MiniCPM-V conversation format")
    patch: PatchConfig = Field(PatchConfig(), description="which checkpoint becomes the model")
    publish: PublishConfig = Field(
        PublishConfig(image_repository="localhost:5000/doc-extraction/serving"),
        description="the Model Registry entry and the vLLM serving image",
    )
    orchestration: OrchestrationConfig = Field(OrchestrationConfig(), description="how the Airflow DAG runs the stages")
    labelling: LabellingConfig = Field(LabellingConfig(), description="the Label Studio server of the labelling loop")

    @field_validator("doc_types")
    @classmethod
    def _doc_types_known(cls, names: list[str], info: ValidationInfo) -> list[str]:
        _check_known_doc_types(names, info)
        return names

    @field_validator("evaluation")
    @classmethod
    def _thresholds_for_known_types(cls, evaluation: EvaluationConfig, info: ValidationInfo) -> EvaluationConfig:
        _check_known_doc_types(list(evaluation.per_doc_type), info)
        return evaluation


def _check_known_doc_types(names: list[str], info: ValidationInfo) -> None:
    doctypes_dir = info.data.get("doctypes_dir")
    if doctypes_dir is None:
        return  # doctypes_dir itself failed validation and is reported on its own
    known = load_registry(doctypes_dir)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown document type(s) {unknown}; {doctypes_dir} has {sorted(known)}")


def load_pipeline_config(paths: list[Path] | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load ``configs/pipeline.yaml`` (or the given files, merged in order), then ``overrides``."""
    return load_model(PipelineConfig, list(paths or [DEFAULT_CONFIG]), overrides)
