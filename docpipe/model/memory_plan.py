"""Will a training layout fit? Per-GPU and host memory, estimated before any GPU is booked.

Model states follow DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``,
``estimate_zero3_model_states_mem_needs``: the same formulas, here so the plan task needs no
torch; ``tests/docpipe/test_memory_plan.py`` holds them to DeepSpeed's). Activations are added for
training with gradient checkpointing: each language-model layer keeps its bf16 input
(layers x batch x tokens x hidden x 2 bytes), one layer is recomputed at a time (34 bytes per
token and hidden unit, Korthikanti et al. 2022, attention scores not materialised by SDPA), the
vision tower likewise over its patches (every slice of every image), and the loss holds the
logits in bf16, their fp32 copy and its log-softmax (10 bytes per token and vocabulary entry).
A fixed allowance covers the CUDA context and allocator fragmentation.

The parameter count is read from the weights' safetensors headers (a folder, or ranged reads
of an s3:// URI), the shapes from ``config.json``. The estimate is an upper bound at
``model_max_length`` tokens per document; documents are usually shorter.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from docpipe.config import S3Config, TrainingConfig

GIB = 2**30
BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for host memory
CONTEXT_BYTES = 1.5 * GIB  # CUDA context, NCCL buffers
FRAGMENTATION = 1.10  # the caching allocator's slack over what tensors hold
DeepSpeedOption = Literal["zero2", "zero2_offload", "zero3"] | None
TRIED: tuple[DeepSpeedOption, ...] = ("zero2", "zero2_offload", "zero3")
NAMES = {
    None: "DDP without DeepSpeed",
    "zero2": "ZeRO-2 without offload",
    "zero2_offload": "ZeRO-2 with CPU offload",
    "zero3": "ZeRO-3 without offload",
}


class ModelShape(BaseModel):
    """What the estimate needs to know about a model."""

    parameters: int
    largest_tensor: int  # elements of the largest weight: what ZeRO-3 gathers at once
    hidden: int
    layers: int
    vocab: int
    vision_hidden: int = 0
    vision_layers: int = 0
    patches_per_slice: int = 0


# MiniCPM-V 2.6 (Qwen2-7B + SigLIP-400M, 8.1 B parameters) as its config.json describes it: the
# practitioners' model, for the benchmark and the test that check the plan against their data point.
MINICPM_V_2_6 = ModelShape(
    parameters=8_099_175_152,
    largest_tensor=151_666 * 3584,
    hidden=3584,
    layers=28,
    vocab=151_666,
    vision_hidden=1152,
    vision_layers=27,
    patches_per_slice=1024,
)


class Layout(BaseModel):
    """One way to train: the DeepSpeed option, per-device batch, tokens, GPUs."""

    deepspeed: DeepSpeedOption
    batch: int
    tokens: int
    slices: int  # image slices per document (overview + max_slice_nums)
    gpus_per_node: int
    nodes: int


class Estimate(BaseModel):
    """Bytes per GPU and per node's host, and what they are made of; fits when a capacity is known."""

    layout: Layout
    model_states_gib: float
    activations_gib: float
    gpu_gib: float
    host_gib: float
    gpu_capacity_gib: float | None = None
    host_capacity_gib: float | None = None

    @property
    def fits(self) -> bool:
        gpu_ok = self.gpu_capacity_gib is None or self.gpu_gib <= self.gpu_capacity_gib
        return gpu_ok and (self.host_capacity_gib is None or self.host_gib <= self.host_capacity_gib)

    def describe(self) -> str:
        layout = self.layout
        where = f"{layout.nodes} x {layout.gpus_per_node} GPUs" + (
            f" of {self.gpu_capacity_gib:g} GiB" if self.gpu_capacity_gib else ""
        )
        return (
            f"{NAMES[layout.deepspeed]}, batch {layout.batch} x {layout.tokens} tokens on {where}: "
            f"{self.gpu_gib:.1f} GiB per GPU (model states {self.model_states_gib:.1f}, activations "
            f"{self.activations_gib:.1f}), {self.host_gib:.1f} GiB host memory per node"
        )


def model_states(shape: ModelShape, layout: Layout) -> tuple[int, int]:
    """(host bytes per node, bytes per GPU) for parameters, gradients and Adam states: DeepSpeed's formulas."""
    params, gpus = shape.parameters, layout.gpus_per_node * layout.nodes
    if layout.deepspeed == "zero2_offload":
        return int(params * max(4 * gpus, 16) * BUFFER_FACTOR), 2 * params
    if layout.deepspeed == "zero2":
        return int(params * 4 * layout.gpus_per_node * BUFFER_FACTOR), 2 * params + int(18 * params / gpus)
    if layout.deepspeed == "zero3":  # no offload, weights loaded whole by each process (no zero.Init)
        largest = 4 * shape.largest_tensor
        return int(params * 4 * layout.gpus_per_node * BUFFER_FACTOR), largest + int(18 * params / gpus)
    return int(params * 4 * layout.gpus_per_node * BUFFER_FACTOR), 20 * params  # DDP: everything on every GPU


def activations(shape: ModelShape, layout: Layout) -> int:
    """Bytes of activations per GPU with gradient checkpointing (see the module's docstring)."""
    tokens = layout.batch * layout.tokens
    text = shape.layers * tokens * shape.hidden * 2 + 34 * tokens * shape.hidden
    patches = layout.batch * layout.slices * shape.patches_per_slice
    vision = shape.vision_layers * patches * shape.vision_hidden * 2 + 34 * patches * shape.vision_hidden
    logits = 10 * tokens * shape.vocab
    return text + vision + logits


def estimate(shape: ModelShape, layout: Layout, gpu_gib: float | None = None, host_gib: float | None = None):
    host, states = model_states(shape, layout)
    acts = activations(shape, layout)
    per_gpu = (states + acts) * FRAGMENTATION + CONTEXT_BYTES
    return Estimate(
        layout=layout,
        model_states_gib=states / GIB,
        activations_gib=acts / GIB,
        gpu_gib=per_gpu / GIB,
        host_gib=host / GIB,
        gpu_capacity_gib=gpu_gib,
        host_capacity_gib=host_gib,
    )


def alternatives(layout: Layout) -> Iterator[Layout]:
    """Layouts near ``layout``, nearest first: another DeepSpeed option at the same batch, then
    smaller batches (the global batch kept with gradient accumulation)."""
    batch = layout.batch
    while batch >= 1:
        for option in TRIED:
            if (option, batch) != (layout.deepspeed, layout.batch):
                yield layout.model_copy(update={"deepspeed": option, "batch": batch})
        batch //= 2


def nearest_fit(shape: ModelShape, layout: Layout, gpu_gib: float, host_gib: float | None) -> Estimate | None:
    """The first layout of ``alternatives`` that fits, or None."""
    fitting = (e for option in alternatives(layout) if (e := estimate(shape, option, gpu_gib, host_gib)).fits)
    return next(fitting, None)


def shape_of(config: dict[str, Any], tensors: dict[str, int], scale_resolution: int = 448) -> ModelShape:
    """A model's shape from its ``config.json`` and its tensors' element counts."""
    text = config.get("text_config") or config.get("llm_config") or config
    vision = config.get("vision_config") or {}
    patch = vision.get("patch_size") or 14
    resolution = (config.get("slice_config") or {}).get("scale_resolution") or scale_resolution
    return ModelShape(
        parameters=sum(tensors.values()),
        largest_tensor=max(tensors.values(), default=0),
        hidden=text["hidden_size"],
        layers=text["num_hidden_layers"],
        vocab=text.get("vocab_size") or config["vocab_size"],
        vision_hidden=vision.get("hidden_size", 0),
        vision_layers=vision.get("num_hidden_layers", 0),
        patches_per_slice=(resolution // patch) ** 2 if vision else 0,
    )


def _header(read_range) -> dict[str, int]:
    """Element counts of the tensors in one safetensors file, from its header alone."""
    (length,) = struct.unpack("<Q", read_range(0, 8))
    header = json.loads(read_range(8, length))
    return {name: math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def _s3_range(client, bucket: str, key: str, start: int, size: int) -> bytes:
    return client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + size - 1}")["Body"].read()


def _file_range(handle, start: int, size: int) -> bytes:
    handle.seek(start)
    return handle.read(size)


def tensor_sizes(base: str, s3: S3Config) -> dict[str, int]:
    """Element count of every weight of the model at ``base`` (a folder or s3:// URI), read from
    the headers of its ``*.safetensors`` files, never the weights themselves."""
    counts: dict[str, int] = {}
    if base.startswith("s3://"):
        from docpipe.storage import s3_client

        bucket, _, prefix = base[5:].partition("/")
        client, prefix = s3_client(s3), prefix.rstrip("/") + "/"
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        keys = [o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".safetensors")]
        for key in keys:
            counts.update(_header(partial(_s3_range, client, bucket, key)))
        return counts
    for path in sorted(Path(base).glob("*.safetensors")):
        with path.open("rb") as handle:
            counts.update(_header(partial(_file_range, handle)))
    return counts


def plan_layout(training: TrainingConfig, gpus_per_node: int, nodes: int) -> Layout:
    return Layout(
        deepspeed=training.deepspeed,
        batch=training.per_device_train_batch_size,
        tokens=training.model_max_length,
        slices=training.max_slice_nums + 1,
        gpus_per_node=max(gpus_per_node, 1),
        nodes=nodes,
    )
