"""The finetune example format (``train.json``/``eval.json`` of ``stages.export``): its writer
(``example_for``) and reader (``read_examples``), the examples' images, and the check that every
example fits ``model_max_length`` before any training starts."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from tqdm import tqdm

from docpipe.config import S3Config
from docpipe.data.dataset import DatasetRecord
from docpipe.doctypes import DocType
from docpipe.routing import Routing
from docpipe.storage import StorageError, StorageUnavailable, open_storage

IMAGE_PLACEHOLDER = "<image>"
log = logging.getLogger(__name__)


class DataError(ValueError):
    """An examples file cannot be used; the message names the file and the problem."""


class Turn(BaseModel):
    role: str
    content: str


class Example(BaseModel):
    """One conversation in the MiniCPM-V finetune format: a user turn with ``<image>`` and the answer."""

    id: str
    doc_type: str | None = Field(None, description="the labelled document type (other: none of the types)")
    routed: bool = Field(False, description="asked without its type (export.routing): the answer names it")
    image: str = Field(description="local path or s3:// URI")
    conversations: list[Turn] = Field(min_length=2, max_length=2)

    @property
    def prompt(self) -> str:
        return self.conversations[0].content

    @property
    def answer(self) -> str:
        return self.conversations[1].content


def prompt_for(record: DatasetRecord, doc_type: DocType, use_variants: bool) -> str:
    """The type's prompt; train documents draw a fixed variant by their hash when variants are on."""
    prompts = [doc_type.prompt, *doc_type.prompt_variants]
    if record.split == "eval" or not use_variants:
        return doc_type.prompt
    return prompts[int(hashlib.sha256(f"prompt:{record.id}".encode()).hexdigest()[:8], 16) % len(prompts)]


def example_for(
    record: DatasetRecord,
    doc_type: DocType | None,
    image_root: str,
    use_variants: bool,
    routing: Routing | None = None,
) -> dict:
    """A dataset record as one example in the MiniCPM-V finetune format (what ``read_examples`` reads):
    asked with its type's prompt, or routed (the routing prompt, the answer naming the type; a page of
    none of the types, ``doc_type`` None, answers other)."""
    if routing is not None:
        prompt, answer = routing.prompt, routing.canonical_answer(doc_type, record.fields)
    else:
        prompt, answer = prompt_for(record, doc_type, use_variants), doc_type.canonical_answer(record.fields)
    return {
        "id": record.id,
        "doc_type": record.doc_type,  # beside the recipe's keys: evaluation scores each document by its type
        "routed": routing is not None,
        "image": f"{image_root.rstrip('/')}/{record.image}",
        "conversations": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
    }


_EXAMPLES = TypeAdapter(list[Example])


def read_examples(data: bytes, path: str) -> list[Example]:
    """Parse an examples file read from ``path``, checking each example has one user turn with
    one ``<image>`` and an assistant answer."""
    try:
        examples = _EXAMPLES.validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise DataError(f"{path}: [{where}]: {first['msg']} ({exc.error_count()} problem(s))") from None
    for index, example in enumerate(examples):
        roles = [turn.role for turn in example.conversations]
        if roles != ["user", "assistant"] or example.prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise DataError(
                f"{path}: [{index}] {example.id}: need a user turn with one {IMAGE_PLACEHOLDER} "
                f"and an assistant answer, got roles {roles}"
            )
    return examples


def fixed_sample(examples: list[Example], size: int, seed: int) -> list[Example]:
    """At most ``size`` examples drawn by ``seed``, whatever the order of ``examples``: the same
    documents at every checkpoint and in every evaluation of the same set."""
    ordered = sorted(examples, key=lambda example: example.id)
    return ordered if size >= len(ordered) else sorted(random.Random(seed).sample(ordered, size), key=lambda e: e.id)


def write_examples(path: Path, examples: list[Example]) -> None:
    path.write_text(json.dumps([e.model_dump() for e in examples], ensure_ascii=False, indent=1), encoding="utf-8")


@dataclass(frozen=True)
class Sample:
    """An example with its image, as the adapters' ``collate`` receives it."""

    example: Example
    image: Image.Image


def load_image(uri: str, s3: S3Config) -> Image.Image:
    """The image at a local path or s3:// URI as RGB, at its full resolution."""
    parent, name = uri.rsplit("/", 1) if "/" in uri else (".", uri)
    try:
        data = open_storage(parent, s3).read_bytes(name)
    except StorageUnavailable:
        raise
    except StorageError as exc:
        raise DataError(str(exc)) from exc
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class ExampleDataset:
    """Samples for the Trainer: each image read when its example is drawn."""

    def __init__(self, examples: list[Example], s3: S3Config):
        self.examples = examples
        self.s3 = s3

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Sample:
        example = self.examples[index]
        return Sample(example, load_image(example.image, self.s3))


class Unfit(BaseModel):
    """An example left out of training, and why."""

    id: str
    image: str
    reason: str


def split_fitting(
    examples: list[Example], length: Callable[[Sample], int], max_length: int, s3: S3Config, label: str
) -> tuple[list[Example], list[Unfit]]:
    """Examples that fit ``max_length`` tokens, and the ones that do not (or cannot be encoded),
    each with its reason. Nothing is cut: a cut answer or image placeholder would train garbage."""
    fitting, unfit = [], []
    for example in tqdm(examples, desc=f"checking {label} lengths", unit="doc", disable=None):
        try:
            tokens = length(Sample(example, load_image(example.image, s3)))
        except (DataError, OSError, ValueError) as exc:
            unfit.append(Unfit(id=example.id, image=example.image, reason=f"cannot encode: {exc}"))
            continue
        if tokens > max_length:
            unfit.append(
                Unfit(id=example.id, image=example.image, reason=f"{tokens} tokens > model_max_length {max_length}")
            )
        else:
            fitting.append(example)
    for bad in unfit:
        log.warning("%s example %s left out: %s", label, bad.id, bad.reason)
    return fitting, unfit
