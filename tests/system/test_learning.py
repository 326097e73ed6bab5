"""Behavioural test of training: through the stages themselves, a model learns which type each of
its documents is and what it says, and answers both from the pixels.

The demo-sized tiny MiniCPM-V 4.6 (toolkit/tiny_model.py) is initialised here and trained with the
embedded default as shipped: routed, so every document, of three types and pages of none of them
(``other``), is asked the same routing prompt and nothing but the image tells two documents, or two
types, apart. The patched model must name each training document's type and reproduce its fields (the
evaluate stage's fit check), and the same documents asked about with images of other types must
score far lower, in type and in fields (its image control). The run's checkpoints are scored by the
answers they generate, and the best one by field accuracy is named with its reason.
"""

from __future__ import annotations

import json

import mlflow
import pytest

from tests.helpers import ROOT, land_synthetic, run_stage, write_overlay
from toolkit.tiny_model import build

pytestmark = pytest.mark.integration
TYPES = ["thsr_ticket", "tra_ticket", "einvoice"]


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
                    "doc_types": TYPES,
                    "evaluation": {"ocr_baseline": False},
                }
            ),
        ),
    ]
    land_synthetic(tmp_path / "landing", 20, seed=3, doc_types=[*TYPES, "other"])
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
    assert fit["documents"] == control["documents"] == len(train) >= 12
    assert {e["doc_type"] for e in train} == {*TYPES, "other"} and all(e["routed"] for e in train)
    held_out = saved["metrics"]["overall"]
    print(
        f"fit: type {fit['type_accuracy']:.3f}, fields {fit['field_accuracy']:.3f} (JSON {fit['json_validity']:.3f}); "
        f"control: type {control['type_accuracy']:.3f}, fields {control['field_accuracy']:.3f}; "
        f"eval: type {held_out['type_accuracy']:.3f}, fields {held_out['field_accuracy']:.3f}"
    )
    assert fit["type_accuracy"] >= 0.95 and fit["field_accuracy"] >= 0.9 and fit["json_validity"] == 1.0
    # The answers come from the pixels: with another type's image, both the type and the fields fall.
    assert control["type_accuracy"] <= 0.5 * fit["type_accuracy"]
    assert control["field_accuracy"] <= 0.5 * fit["field_accuracy"]
    assert saved["fit"]["routing"]["confusion"]["other"]["other"] >= 1  # pages of none of the types answered so
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
    report = (runs / "evaluate" / "report.html").read_text()
    assert "accuracy per checkpoint" in report and "Document types: routed, not told" in report
    assert {"einvoice", "thsr_ticket", "tra_ticket"} == set(saved["type_given"]["per_doc_type"])
