"""Model families behind one interface: how to load the model and processor, how to turn
examples into a training batch with labels on the answer only, what to freeze, and which
files serving needs beside the weights. A new family is one new module here and a line in
``ADAPTERS``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.config import ModelConfig, TrainingConfig
from stages.finetune.data import Sample

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label positions the loss skips: prompt, image placeholders, padding
ADAPTERS = {
    "native": "stages.finetune.adapters.native:NativeAdapter",
    "remote_code": "stages.finetune.adapters.remote_code:RemoteCodeAdapter",
}


class AdapterError(ValueError):
    """The base model folder does not fit the configured adapter; the message says how."""


class Adapter(ABC):
    """One model family. ``model_dir`` is a local folder with the base model."""

    #: files beside the weights that loading the processor and serving need (globs)
    processor_files: tuple[str, ...] = ()

    def __init__(self, model_dir: Path, model: ModelConfig, training: TrainingConfig):
        self.model_dir = Path(model_dir)
        self.model = model
        self.training = training
        self.processor = self.load_processor()

    @abstractmethod
    def load_processor(self) -> Any:
        """The processor that turns images and text into model inputs, with slicing from the config."""

    @abstractmethod
    def load_model(self, dtype: torch.dtype) -> Any:
        """The model for training, with ``tune_vision``/``tune_llm`` applied."""

    @abstractmethod
    def collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """A training batch: the model's inputs plus ``labels`` masked to the answers.

        Never truncates: a sample longer than ``model_max_length`` is found by ``length``
        before training and left out with a reason.
        """

    def length(self, sample: Sample) -> int:
        """Tokens the sample takes, image placeholders included."""
        return int(self.collate([sample])["attention_mask"].sum())


def load_adapter(model_dir: Path, model: ModelConfig, training: TrainingConfig) -> Adapter:
    module, name = ADAPTERS[model.adapter].split(":")
    return getattr(importlib.import_module(module), name)(model_dir, model, training)


def answer_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, answers: list[list[int]],
                  ids: list[str]) -> torch.Tensor:  # fmt: skip
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
