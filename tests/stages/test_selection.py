"""Checkpoint selection: the curve read from the Trainer's log, and the choice by the configured metric."""

from __future__ import annotations

from pathlib import Path

import pytest

from docpipe.config import TrainingConfig
from docpipe.data.examples import Example, fixed_sample
from stages.finetune.selection import CheckpointScore, choose, curve


def _saved(tmp_path: Path, *steps: int) -> None:
    for step in steps:
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


def _point(tmp_path: Path, step: int, field: float, loss: float, saved: bool = True) -> CheckpointScore:
    folder = str(tmp_path / f"checkpoint-{step}") if saved else None
    return CheckpointScore(
        step=step,
        checkpoint=folder,
        eval_loss=loss,
        field_accuracy=field,
        document_accuracy=field / 2,
        json_validity=1.0,
    )


def test_curve_takes_each_evaluation_and_the_checkpoint_still_saved(tmp_path):
    _saved(tmp_path, 20)
    history = [
        {"loss": 2.0, "step": 10},
        {"eval_loss": 1.5, "eval_field_accuracy": 0.1, "step": 10},
        {"eval_loss": 1.0, "eval_field_accuracy": 0.5, "eval_document_accuracy": 0.2, "step": 20},
        {"eval_loss": 0.9, "step": 30},
    ]
    points = curve(history, tmp_path)
    assert [p.step for p in points] == [10, 20, 30]
    assert [p.checkpoint for p in points] == [
        None,
        str(tmp_path / "checkpoint-20"),
        None,
    ]  # 10 rotated away, 30 unsaved
    assert (points[1].field_accuracy, points[1].document_accuracy, points[2].field_accuracy) == (0.5, 0.2, None)


def test_best_by_accuracy_and_ties_go_to_the_later_step(tmp_path):
    points = [
        _point(tmp_path, 10, 0.4, 1.0),
        _point(tmp_path, 20, 0.9, 0.8),
        _point(tmp_path, 30, 0.9, 0.7),
        _point(tmp_path, 40, 0.95, 0.6, saved=False),
    ]
    chosen = choose(points, "field_accuracy", 16, latest=str(tmp_path / "checkpoint-30"))
    assert (chosen.step, chosen.value) == (30, 0.9) and chosen.checkpoint.endswith("checkpoint-30")
    assert "tied with steps [20]" in chosen.reason and "on 16 eval documents" in chosen.reason
    assert chosen.curve == points


def test_best_by_eval_loss_is_the_lowest(tmp_path):
    points = [_point(tmp_path, 10, 0.9, 0.5), _point(tmp_path, 20, 0.1, 0.7)]
    chosen = choose(points, "eval_loss", 16, latest=None)
    assert chosen.step == 10 and "the lowest of 2 saved checkpoints" in chosen.reason


def test_nothing_scored_falls_back_to_the_latest_and_says_so(tmp_path):
    chosen = choose([], "field_accuracy", 0, latest=str(tmp_path / "checkpoint-12"))
    assert (chosen.checkpoint, chosen.step, chosen.value) == (str(tmp_path / "checkpoint-12"), 12, None)
    assert "the latest checkpoint" in chosen.reason


def test_fixed_sample_ignores_order_and_is_seeded():
    turns = [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "{}"}]
    examples = [Example(id=f"d{i:02d}", image="x.jpg", conversations=turns) for i in range(30)]
    first = fixed_sample(examples, 8, seed=1)
    assert [e.id for e in first] == [e.id for e in fixed_sample(list(reversed(examples)), 8, seed=1)]
    assert len(first) == 8 and [e.id for e in fixed_sample(examples, 8, seed=2)] != [e.id for e in first]
    assert len(fixed_sample(examples, 100, seed=1)) == 30


def test_selection_settings_are_checked():
    with pytest.raises(ValueError, match="must be a multiple of eval_steps"):
        TrainingConfig(eval_steps=300, save_steps=1000)
    with pytest.raises(ValueError, match="needs selection_documents above 0"):
        TrainingConfig(selection="field_accuracy", selection_documents=0)
    assert TrainingConfig(selection="eval_loss", selection_documents=0).selection == "eval_loss"
