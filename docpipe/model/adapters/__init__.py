"""Model families behind one interface: how to load the model and processor, how to turn
examples into a training batch with labels on the answer only, what to freeze, and which
files serving needs beside the weights. A new family is one new module here and a line in
``ADAPTERS``.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from docpipe.config import ModelConfig, S3Config, TrainingConfig
from docpipe.data.examples import Sample
from docpipe.storage import LocalStorage, open_storage

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label positions the loss skips: prompt, image placeholders, padding
ADAPTERS = {
    "native": "docpipe.model.adapters.native:NativeAdapter",
    "remote_code": "docpipe.model.adapters.remote_code:RemoteCodeAdapter",
}


class AdapterError(ValueError):
    """The base model folder does not fit the configured adapter; the message says how."""


@dataclass(frozen=True)
class Completion:
    """One generated answer, as a server reports it."""

    text: str
    tokens: int  # tokens generated (the end-of-sequence token included where the model stopped)
    cut: bool  # stopped by the token budget rather than by the model
    #: each generated token of ``text``: (where it ends, in bytes of ``text``'s UTF-8, its log-probability);
    #: empty where the family cannot report them
    logprobs: tuple[tuple[int, float], ...] = ()


class Adapter(ABC):
    """One model family. ``model_dir`` is a local folder with the base model."""

    #: files beside the weights that loading the processor and serving need (globs)
    processor_files: tuple[str, ...] = ()
    #: the transformers auto class that loads the model, and whether its code comes with the checkpoint
    auto_class: str = "AutoModel"
    trust_remote_code: bool = False
    #: modules ZeRO-3 gathers whole (name suffixes): the vision side runs a varying number of
    #: sub-calls per batch (one per image or slice), which ranks must not disagree on
    zero3_leaf_modules: tuple[str, ...] = ()

    def __init__(self, model_dir: Path, model: ModelConfig, training: TrainingConfig):
        self.model_dir = Path(model_dir)
        self.model = model
        self.training = training
        self.processor = self.load_processor()

    @abstractmethod
    def load_processor(self) -> Any:
        """The processor that turns images and text into model inputs, with slicing from the config."""

    def from_pretrained(self, dtype: torch.dtype, **kwargs) -> Any:
        import transformers

        auto = getattr(transformers, self.auto_class)
        return auto.from_pretrained(self.model_dir, dtype=dtype, trust_remote_code=self.trust_remote_code, **kwargs)

    def load_model(self, dtype: torch.dtype) -> Any:
        """The model for training, with ``tune_vision``/``tune_llm`` applied."""
        model = self.from_pretrained(dtype)
        self.freeze(model)
        return model

    @abstractmethod
    def freeze(self, model: Any) -> None:
        """Stop gradients into the vision encoder or the LLM where the config says not to tune them."""

    @abstractmethod
    def collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """A training batch: the model's inputs plus ``labels`` masked to the answers.

        Never truncates: a sample longer than ``model_max_length`` is found by ``length``
        before training and left out with a reason.
        """

    @abstractmethod
    def generate(self, model: Any, samples: list[Sample], max_new_tokens: int) -> list[str]:
        """The model's answers to the samples' prompts and images, greedy."""

    def complete(
        self, model: Any, samples: list[Sample], max_new_tokens: int, schemas: list[dict] | None = None
    ) -> list[Completion]:
        """``generate`` with token counts and, where the family sees its generated ids, each token's
        log-probability; with ``schemas``, row ``i`` can only answer JSON valid against ``schemas[i]``.
        Here each answer is re-tokenised to count it, and constraints are refused."""
        if schemas:
            raise AdapterError(
                f"constrained decoding needs the generated ids, which {type(self).__name__} does "
                "not see: set evaluation.structured_output: false, or serve it with vLLM"
            )
        texts = self.generate(model, samples, max_new_tokens)
        counts = [len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
        return [Completion(text, n, n >= max_new_tokens) for text, n in zip(texts, counts, strict=True)]

    def loss(self, model: Any, inputs: dict) -> torch.Tensor | None:
        """The training loss where the model does not compute one from ``labels``; None: it does."""
        return None

    def length(self, sample: Sample) -> int:
        """Tokens the sample takes, image placeholders included."""
        return int(self.collate([sample])["attention_mask"].sum())


def adapter_class(name: str) -> type[Adapter]:
    module, cls = ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_adapter(model_dir: Path, model: ModelConfig, training: TrainingConfig) -> Adapter:
    return adapter_class(model.adapter)(model_dir, model, training)


def resolve_model_dir(uri: str, cache: Path, s3: S3Config) -> Path:
    """A local folder holding the model at ``uri``: the folder itself, or an s3:// copy in ``cache``."""
    if "://" not in uri:
        folder = Path(uri)
        if not (folder / "config.json").is_file():
            raise AdapterError(f"{folder}: not a model folder (no config.json)")
        return folder
    source, copied = open_storage(uri, s3), LocalStorage(cache)
    keys = list(source.list())
    for number, key in enumerate(keys, start=1):
        if not copied.exists(key):
            data = source.read_bytes(key)
            copied.write_bytes(key, data)
            log.info(
                "copied %s (%.1f MB, file %d of %d) into %s",
                source.uri_of(key),
                len(data) / 1e6,
                number,
                len(keys),
                cache,
            )
    if not copied.exists("config.json"):
        raise AdapterError(f"{uri}: not a model folder (no config.json)")
    return cache


def answer_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, answers: list[list[int]], ids: list[str]
) -> torch.Tensor:
    """Labels for right-padded rows whose last real tokens are each row's answer: everything
    before the answer and all padding become IGNORE_INDEX. A row whose tail is not its answer
    (a template that tokenised differently) is an error naming the example, never a silent guess."""
    labels = input_ids.clone()
    for row, (answer, example_id) in enumerate(zip(answers, ids, strict=True)):
        end = int(attention_mask[row].sum())
        start = end - len(answer)
        if start < 0 or input_ids[row, start:end].tolist() != answer:
            raise ValueError(f"example {example_id}: the answer's tokens are not at the end of its conversation")
        labels[row, :start] = IGNORE_INDEX
        labels[row, end:] = IGNORE_INDEX
    return labels
