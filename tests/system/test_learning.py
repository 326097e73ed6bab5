"""Behavioural test of training: through the stages themselves, a model learns its documents and
answers them from their pixels.

The demo-sized tiny MiniCPM-V 4.6 (toolkit/tiny_model.py) is initialised here and trained with the
embedded default as shipped: export gives every document of a type the same prompt, so nothing but
the image tells two documents apart. The patched model must reproduce its training documents (the
evaluate stage's fit check), and the same documents asked about with each other's images must score
far lower (its image control). The run's checkpoints are scored by the answers they generate, and the
best one by field accuracy is named with its reason.
"""

from __future__ import annotations

import json

import mlflow
import pytest

from tests.helpers import ROOT, land_synthetic, run_stage, write_overlay
from toolkit.tiny_model import build

pytestmark = pytest.mark.integration


def test_the_patched_model_reproduces_its_documents_from_their_pixels(embedded, tmp_path):
    model = build(tmp_path / "model", ROOT / "configs" / "doctypes", size="demo")
    configs = [
        *embedded,
        write_overlay(
            tmp_path,
            "learn.yaml",
            json.dumps(
                {
                    "model": {"base": str(model)},
                    "dataset": {"eval_fraction": 0.25},
                    "doc_types": ["thsr_ticket", "tra_ticket"],
                    "evaluation": {"ocr_baseline": False},
                }
            ),
        ),
    ]
    land_synthetic(tmp_path / "landing", 16, seed=3, doc_types=["thsr_ticket", "tra_ticket"])
    runs = tmp_path / "runs"
    assert (
        run_stage("ingest", configs, "--output", str(tmp_path / "datasets"), "--batch", str(tmp_path / "landing")) == 0
    )
    assert run_stage("export", configs, "--output", str(runs / "export")) == 0
    assert run_stage("finetune", configs, "--data", str(runs / "export"), "--output", str(runs / "finetune")) == 0
    assert run_stage("patch", configs, "--finetune", str(runs / "finetune"), "--output", str(runs / "model")) == 0
    assert (
        run_stage(
            "evaluate",
            configs,
            "--data",
            str(runs / "export"),
            "--model",
            str(runs / "model"),
            "--output",
            str(runs / "evaluate"),
        )
        == 0
    )

    saved = json.loads((runs / "evaluate" / "metrics.json").read_text())
    fit, control = saved["fit"]["overall"], saved["image_control"]["overall"]
    train = json.loads((runs / "export" / "train.json").read_text())
    assert fit["documents"] == control["documents"] == len(train) >= 8
    print(
        f"fit {fit['field_accuracy']:.3f} (JSON {fit['json_validity']:.3f}), control "
        f"{control['field_accuracy']:.3f}, eval {saved['metrics']['overall']['field_accuracy']:.3f}"
    )
    assert fit["field_accuracy"] >= 0.95 and fit["json_validity"] == 1.0
    assert control["field_accuracy"] <= 0.5 * fit["field_accuracy"]  # the answers come from the pixels
    assert json.loads((runs / "evaluate" / "decision.json").read_text())["passed"]  # the embedded gate agrees

    # Every saved checkpoint was scored by its answers and the best by field accuracy named, with why; the
    # embedded default patches the latest (its eval set shows noise: the model does not read unseen
    # documents), and patch.json says so beside the selection.
    selection = json.loads((runs / "finetune" / "selection.json").read_text())
    scored = [point for point in selection["curve"] if point["checkpoint"]]
    assert selection["metric"] == "field_accuracy" and scored
    assert selection["value"] == max(point["field_accuracy"] for point in scored)
    assert selection["step"] == max(p["step"] for p in scored if p["field_accuracy"] == selection["value"])
    patched = json.loads((runs / "model" / "patch.json").read_text())
    assert patched["checkpoint"].endswith("checkpoint-300") and patched["selection"]["curve"] == selection["curve"]
    assert patched["selection"]["reason"] == "patch.checkpoint is latest: the latest checkpoint"
    result = json.loads((runs / "finetune" / "result.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    steps = {m.step for m in client.get_metric_history(result["mlflow_run_id"], "eval_field_accuracy")}
    assert steps == {point["step"] for point in selection["curve"]} and len(steps) == 5
    assert client.get_run(result["mlflow_run_id"]).data.tags["checkpoint.selection"] == selection["reason"]
    assert "accuracy per checkpoint" in (runs / "evaluate" / "report.html").read_text()
