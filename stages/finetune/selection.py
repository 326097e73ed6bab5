"""Checkpoint selection by what users care about: the accuracy of the answers a checkpoint generates.

At every evaluation the Trainer runs (``training.eval_steps``; each saved checkpoint is one),
``SelectionScorer`` has the model being trained answer a fixed sample of eval documents with
the evaluate stage's own generation and scoring, so field accuracy, document accuracy and JSON
validity sit beside the eval loss in the Trainer's log, its TensorBoard events and MLflow.
After training, ``choose`` picks among the checkpoints still on disk by ``training.selection``
(ties go to the later step) and says why; the patch stage takes that checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from docpipe.answering.scoring import HEADLINE, measure
from docpipe.config import EvaluationConfig, ExportConfig, S3Config
from docpipe.data.examples import Example, fixed_sample
from docpipe.doctypes import load_registry
from docpipe.routing import Routing

CHECKPOINT_PREFIX = "checkpoint-"


class RunTypes(Protocol):
    """What the scorer needs to ask as export asked: the registry's folder, the run's types, the export settings."""

    doctypes_dir: str
    doc_types: list[str]
    export: ExportConfig


class SelectionScorer:
    """Answers and scores a fixed sample of eval documents with the model in memory."""

    def __init__(
        self,
        adapter: Any,
        examples: list[Example],
        documents: int,
        seed: int,
        run: RunTypes,
        settings: EvaluationConfig,
        s3: S3Config,
    ):
        from docpipe.answering.backends import requests_for

        self.registry = load_registry(Path(run.doctypes_dir))
        routing = Routing.of(self.registry, run.doc_types, run.export.routing_prompt)
        chosen = fixed_sample(examples, documents, seed)
        self.requests = requests_for(chosen, self.registry, routing, "the eval documents checkpoints are scored on")
        self.adapter, self.settings, self.s3 = adapter, settings, s3

    def __call__(self, model: Any) -> dict[str, float]:
        from docpipe.answering.backends import TransformersBackend

        _, metrics = measure(
            TransformersBackend(self.adapter, model.eval(), self.settings, self.s3), self.requests, self.registry
        )
        return {name: metrics["overall"][name] for name in HEADLINE}


class CheckpointScore(BaseModel):
    """One evaluation of the run: its step, the checkpoint saved there (if still on disk), its scores."""

    step: int
    checkpoint: str | None = None
    eval_loss: float | None = None
    field_accuracy: float | None = None
    document_accuracy: float | None = None
    json_validity: float | None = None


class Selection(BaseModel):
    """The checkpoint chosen, by which metric, and why; the whole curve beside it."""

    metric: str
    documents: int
    checkpoint: str | None
    step: int | None
    value: float | None
    reason: str
    curve: list[CheckpointScore]


def curve(log_history: list[dict], output_dir: Path) -> list[CheckpointScore]:
    """Each evaluation in the Trainer's log (the last one per step), with the checkpoint saved at its step."""
    by_step: dict[int, CheckpointScore] = {}
    for entry in log_history:
        if "eval_loss" not in entry:
            continue
        step = int(entry["step"])
        folder = output_dir / f"{CHECKPOINT_PREFIX}{step}"
        by_step[step] = CheckpointScore(
            step=step,
            checkpoint=str(folder) if (folder / "trainer_state.json").is_file() else None,
            eval_loss=entry["eval_loss"],
            **{name: entry.get(f"eval_{name}") for name in HEADLINE},
        )
    return [by_step[step] for step in sorted(by_step)]


def choose(scores: list[CheckpointScore], metric: str, documents: int, latest: str | None) -> Selection:
    """The best saved checkpoint by ``metric`` (highest accuracy, or lowest eval loss); ties go to the
    later step. Where no saved checkpoint was scored by it, the latest checkpoint, and the reason says so."""
    scored = [s for s in scores if s.checkpoint and getattr(s, metric) is not None]
    if not scored:
        return Selection(
            metric=metric,
            documents=documents,
            checkpoint=latest,
            step=int(Path(latest).name.removeprefix(CHECKPOINT_PREFIX)) if latest else None,
            value=None,
            reason=f"no saved checkpoint was scored by {metric} (no eval documents, or "
            "selection_documents 0): the latest checkpoint",
            curve=scores,
        )
    sign = -1 if metric == "eval_loss" else 1
    best = max(scored, key=lambda s: (sign * getattr(s, metric), s.step))
    value = getattr(best, metric)
    tied = [s.step for s in scored if getattr(s, metric) == value and s.step != best.step]
    on = "" if metric == "eval_loss" else f" on {documents} eval documents"
    reason = (
        f"step {best.step}: {metric} {value:.4f}{on}, the {'lowest' if sign < 0 else 'highest'} of "
        f"{len(scored)} saved checkpoints" + (f" (tied with steps {tied}: the later one wins)" if tied else "")
    )
    return Selection(
        metric=metric,
        documents=documents,
        checkpoint=best.checkpoint,
        step=best.step,
        value=value,
        reason=reason,
        curve=scores,
    )
