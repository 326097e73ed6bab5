"""The labelling loop against a real Label Studio server (``make label-studio``, started here on
127.0.0.1): unlabelled images pre-filled by the model and imported worst-first with their
predictions, annotations submitted through its API as a reviewer would, the reviewed tasks
collected into a landed batch, and that batch ingested."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest

from docpipe.config import LabellingConfig
from docpipe.data.landing import COMPLETE_MARKER, LABELS_FILE
from docpipe.doctypes import load_registry
from docpipe.label_studio import API_KEY_ENV, LabelStudio, result_fields, result_items
from tests.helpers import ROOT, free_port, land_synthetic, run_stage, wait_for_http, write_overlay

pytestmark = pytest.mark.integration

LABEL_STUDIO = Path(os.environ.get("LABEL_STUDIO_BIN", ROOT / ".venv-label-studio" / "bin" / "label-studio"))
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # a legacy token for this throwaway server only
DOC_TYPE = "thsr_ticket"


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory) -> str:
    if not LABEL_STUDIO.is_file():
        pytest.fail(f"{LABEL_STUDIO} is missing: `make label-studio` installs Label Studio's server")
    data, port = tmp_path_factory.mktemp("label-studio"), free_port()
    environment = {
        "PATH": os.environ["PATH"],
        "HOME": str(data),
        "LABEL_STUDIO_BASE_DATA_DIR": str(data),
        "LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_USERNAME": "reviewer@example.com",
        "LABEL_STUDIO_PASSWORD": "not-a-secret-1",
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
    }
    with (data / "server.log").open("w") as log:
        server = subprocess.Popen(
            [
                str(LABEL_STUDIO),
                "start",
                "--no-browser",
                "--internal-host",
                "127.0.0.1",
                "--port",
                str(port),
                "--enable-legacy-api-token",
            ],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{url}/health", lambda: server.poll() is None, timeout=300)
            yield url
        finally:
            server.terminate()
            server.wait(30)


def test_reviewed_predictions_come_back_as_a_landed_batch_that_ingest_takes(
    label_studio, overlay, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv(API_KEY_ENV, TOKEN)
    # the smoke overlay's token cap (48) would cut every answer before its JSON closes
    settings = f"labelling: {{url: '{label_studio}'}}\nevaluation: {{max_new_tokens: 512}}\n"
    config = [*overlay, write_overlay(tmp_path, "labelling.yaml", settings)]
    doc_type = load_registry(ROOT / "configs" / "doctypes")[DOC_TYPE]
    labelled = Path(land_synthetic(tmp_path / "labelled", 5, seed=3, doc_types=[DOC_TYPE]))
    truth = {Path(r["image"]).name: r["fields"] for r in map(json.loads, (labelled / LABELS_FILE).open())}
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for name in truth:
        shutil.copy(next(labelled.rglob(name)), unlabelled / name)
    (unlabelled / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")

    prelabel = tmp_path / "prelabel"
    assert (
        run_stage(
            "prelabel",
            config,
            "--output",
            str(prelabel),
            "--images",
            str(unlabelled),
            "--doc-type",
            DOC_TYPE,
            "--model",
            str(tiny_model),
        )
        == 0
    )
    result = json.loads((prelabel / "result.json").read_text())
    assert result["counts"] == {
        "documents": 5,
        "imported": 5,
        "rejected": 1,
        "needs_review": 5,
        "unrouted": 0,
        f"doc_type.{DOC_TYPE}": 5,
    }
    assert "broken.png" in (prelabel / "rejected.jsonl").read_text()

    studio = LabelStudio(LabellingConfig(url=label_studio))
    project = studio.find_project(f"doc-extraction: {DOC_TYPE}")
    tasks = sorted(studio.tasks(project["id"]), key=lambda t: t["id"])
    assert len(tasks) == 5
    confidences = [t["data"]["confidence"] for t in tasks]
    assert confidences == sorted(confidences), "imported least confident first"
    for task in tasks:  # constrained decoding: every field pre-filled, in the type's schema
        (prediction,) = task["predictions"]
        prefilled = result_fields(doc_type, prediction["result"])
        assert doc_type.answer_validator.is_valid(prefilled), prefilled
        assert all(0 <= item["score"] <= 1 for item in prediction["result"])

    # A reviewer corrects four documents (the right values, as typed) and leaves the fifth for later.
    changed = 0
    for task in tasks[:4]:
        right = truth[Path(task["data"]["source"]).name]
        prefilled = result_fields(doc_type, task["predictions"][0]["result"])
        changed += sum(
            doc_type.compare_key(n, prefilled.get(n)) != doc_type.compare_key(n, right.get(n)) for n in right
        )
        studio.annotate(task["id"], result_items(doc_type, right))

    # Collected with a personal access token, as the UI gives them now (a refresh JWT).
    personal = studio._call("POST", "/api/token/")["token"]
    monkeypatch.setenv(API_KEY_ENV, personal)
    batch = tmp_path / "landing" / "label-studio-1"
    assert run_stage("collect_labels", config, "--output", str(batch), "--doc-type", DOC_TYPE) == 0
    assert (batch / COMPLETE_MARKER).is_file()
    records = [json.loads(line) for line in (batch / LABELS_FILE).read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        name = record["image"].split("-", 1)[1]
        assert record["fields"] == {k: v for k, v in truth[name].items() if v is not None}
        assert (batch / record["image"]).read_bytes() == (unlabelled / name).read_bytes()
    collected = json.loads((batch / "result.json").read_text())
    fields = 4 * len(doc_type.fields)
    assert collected["counts"]["fields_changed"] == changed > 0
    assert collected["metrics"]["prefill_field_accuracy"] == pytest.approx(1 - changed / fields)
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db").get_run(collected["mlflow_run_id"])
    assert run.data.metrics["prefill_field_accuracy"] == pytest.approx(1 - changed / fields)

    landed = {t["id"]: t for t in studio.tasks(project["id"])}
    assert all(landed[t["id"]]["meta"]["landed_in"] == str(batch) for t in tasks[:4])
    again = tmp_path / "landing" / "label-studio-2"
    assert run_stage("collect_labels", config, "--output", str(again), "--doc-type", DOC_TYPE) == 0
    assert not (again / COMPLETE_MARKER).exists(), "a task goes into one batch only"

    written = [f for folder in (prelabel, batch) for f in folder.rglob("*") if f.is_file()]
    assert not [f for f in written if TOKEN.encode() in f.read_bytes() or personal.encode() in f.read_bytes()]

    # The landed batch is what the data-triggered DAG ingests.
    assert run_stage("ingest", config, "--output", str(tmp_path / "ingest"), "--batch", str(batch)) == 0
    ingested = json.loads((tmp_path / "ingest" / "result.json").read_text())
    assert ingested["counts"]["accepted"] == 4, ingested["counts"]


def test_prelabel_without_a_reachable_server_fails_saying_so(overlay, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, TOKEN)
    closed = f"http://127.0.0.1:{free_port()}"
    config = [*overlay, write_overlay(tmp_path, "labelling.yaml", f"labelling: {{url: '{closed}', retries: 0}}\n")]
    images = Path(land_synthetic(tmp_path / "labelled", 1, seed=4, doc_types=[DOC_TYPE]))
    assert (
        run_stage(
            "prelabel",
            config,
            "--output",
            str(tmp_path / "out"),
            "--images",
            str(images),
            "--doc-type",
            DOC_TYPE,
            "--model",
            str(tiny_model),
        )
        == 1
    )
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert "did not answer" in result["error"] and closed in result["error"]
    assert (tmp_path / "out" / "predictions.jsonl").is_file(), "what was predicted is kept"


def test_without_a_champion_the_ocr_baseline_prefills_and_every_document_is_reviewed(
    label_studio, overlay, tmp_path, monkeypatch
):
    monkeypatch.setenv(API_KEY_ENV, TOKEN)
    config = [*overlay, write_overlay(tmp_path, "labelling.yaml", f"labelling: {{url: '{label_studio}'}}\n")]
    images = Path(land_synthetic(tmp_path / "labelled", 2, seed=5, doc_types=[DOC_TYPE])) / "images"
    out = tmp_path / "prelabel"
    assert run_stage("prelabel", config, "--output", str(out), "--images", str(images), "--doc-type", DOC_TYPE) == 0
    result = json.loads((out / "result.json").read_text())
    assert "OCR baseline" in result["inputs"]["model"] and result["counts"]["imported"] == 2
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(p["confidence"] is None and p["needs_review"] for p in predictions)
    assert any(p["fields"] for p in predictions), "the OCR reads clean synthetic tickets"


def test_images_of_unknown_type_go_to_the_project_of_the_type_guessed_and_pages_of_none_to_unrouted(
    label_studio, overlay, tmp_path, monkeypatch
):
    """No --doc-type and no champion: the OCR baseline guesses each image's type (the one whose fields it
    finds most of), each goes to its type's project, and a page of none of the types to unrouted.jsonl."""
    monkeypatch.setenv(API_KEY_ENV, TOKEN)
    settings = f"labelling: {{url: '{label_studio}', project_prefix: unsorted}}\n"
    config = [*overlay, write_overlay(tmp_path, "labelling.yaml", settings)]
    batch = Path(land_synthetic(tmp_path / "mixed", 6, seed=11, doc_types=["thsr_ticket", "receipt_en", "other"]))
    truth = {Path(r["image"]).name: r["doc_type"] for r in map(json.loads, (batch / LABELS_FILE).open())}
    out = tmp_path / "prelabel"
    assert run_stage("prelabel", config, "--output", str(out), "--images", str(batch / "images")) == 0
    result = json.loads((out / "result.json").read_text())
    predictions = {Path(p["source"]).name: p for p in map(json.loads, (out / "predictions.jsonl").open())}
    print({name: (truth[name], p["doc_type"]) for name, p in predictions.items()})
    assert {name: p["doc_type"] for name, p in predictions.items() if truth[name] != "other"} == {
        name: kind for name, kind in truth.items() if kind != "other"
    }
    unrouted = [Path(u["source"]).name for u in map(json.loads, (out / "unrouted.jsonl").open())]
    assert unrouted == [name for name, p in predictions.items() if p["doc_type"] == "other"]
    assert result["counts"]["unrouted"] == len(unrouted) and result["counts"]["imported"] == 6 - len(unrouted)
    studio = LabelStudio(LabellingConfig(url=label_studio))
    for doc_type in ("thsr_ticket", "receipt_en"):
        project = studio.find_project(f"unsorted: {doc_type}")
        sources = {Path(t["data"]["source"]).name for t in studio.tasks(project["id"])}
        assert sources == {n for n, p in predictions.items() if p["doc_type"] == doc_type}
        assert result["outputs"][f"project.{doc_type}"].endswith(f"/projects/{project['id']}")
        assert (out / "labeling_config" / f"{doc_type}.xml").is_file()
