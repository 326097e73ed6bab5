"""The evaluate stage end to end on the tiny model, its backends, and the OCR baseline.

The tiny model is random: these tests check the machinery (backends, parsing, scoring, gate,
report, MLflow), not accuracy. vLLM cannot be installed here (its wheel needs torch 2.14 and
transformers <5.21): its backend's requests are checked as built, without importing vllm.
The OpenAI-compatible server on loopback is ``toolkit.openai_standin`` running the tiny model on CPU,
standing in for the vLLM server.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from docpipe.answering.backends import (
    OpenAIBackend,
    Request,
    VllmBackend,
    decoding_schema,
    max_new_tokens,
    requests_for,
)
from docpipe.answering.ocr_baseline import Box, Extractor, OcrBaseline, reading_order, spaced
from docpipe.answering.scoring import evaluate_all, score
from docpipe.config import EvaluationConfig, load_pipeline_config
from docpipe.contract import config_flags
from docpipe.data.examples import read_examples
from docpipe.doctypes import load_registry
from docpipe.routing import Routing
from stages.evaluate.__main__ import swapped_images
from stages.evaluate.gate import decide
from tests.helpers import ROOT, SROIE, free_port, land_synthetic, run_stage, wait_for_http, write_overlay

REGISTRY = load_registry(ROOT / "configs" / "doctypes")
EMBEDDED_CONFIG = load_pipeline_config(
    [ROOT / "configs" / "pipeline.yaml", ROOT / "configs" / "overlays" / "embedded.yaml"]
)
ROUTING = Routing.of(REGISTRY, EMBEDDED_CONFIG.doc_types, EMBEDDED_CONFIG.export.routing_prompt)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """An export of 40 synthetic documents; eval.json gets a few of every type."""
    root = tmp_path_factory.mktemp("exported")
    land_synthetic(root / "landing", 40, seed=9)
    overlay = write_overlay(
        root,
        "o.yaml",
        json.dumps(
            {
                "storage": {"landing_uri": str(root), "datasets_uri": str(root / "ds"), "runs_uri": str(root)},
                "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db"},
                "dataset": {"eval_fraction": 0.3},
            }
        ),
    )
    configs = [ROOT / "configs" / "pipeline.yaml", ROOT / "configs" / "overlays" / "embedded.yaml", overlay]
    assert run_stage("ingest", configs, "--output", str(root / "ds"), "--batch", str(root / "landing")) == 0
    assert run_stage("export", configs, "--output", str(root / "export")) == 0
    return root / "export"


def _requests(exported: Path) -> list[Request]:
    """The export's eval documents as evaluate asks them (routed: the embedded default exports so)."""
    examples = read_examples((exported / "eval.json").read_bytes(), "eval.json")
    return requests_for(examples, REGISTRY, ROUTING, "eval.json")


def _config(overlay: list[Path], tmp_path: Path, **evaluation) -> list[Path]:
    """The test's configuration with ``evaluation:`` settings on top (no OCR baseline unless asked)."""
    settings = {"evaluation": {"ocr_baseline": False, **evaluation}}
    return [*overlay, write_overlay(tmp_path, "evaluate.yaml", json.dumps(settings))]


def assert_routed_confidence(predictions: list[dict]) -> None:
    """Routed answers: the type has a confidence; the labelled type's fields have one where the answer
    named that type, and 0 where it named another (they are missing from the answer)."""
    for prediction in predictions:
        confidence = dict(prediction["confidence"])
        assert 0 < confidence.pop("doc_type") <= 1
        named_right = prediction["answered_type"] == prediction["doc_type"]
        assert all((0 < c <= 1) if named_right else c == 0 for c in confidence.values()), prediction


@pytest.mark.integration
def test_transformers_backend_end_to_end(overlay, exported, tiny_model, tmp_path):
    config = _config(overlay, tmp_path, ocr_baseline=True)
    out = tmp_path / "evaluate"
    assert run_stage("evaluate", config, "--data", str(exported), "--model", str(tiny_model), "--output", str(out)) == 0
    result = json.loads((out / "result.json").read_text())
    saved = json.loads((out / "metrics.json").read_text())
    assert result["counts"]["documents"] == len(_requests(exported)) == saved["metrics"]["overall"]["documents"]
    assert set(saved["metrics"]["per_doc_type"]) == {r.doc_type.id for r in _requests(exported)}
    assert saved["baseline"]["overall"]["field_accuracy"] > 0.2  # the OCR reads clean synthetic documents
    decision = json.loads((out / "decision.json").read_text())
    assert result["metrics"]["gate_passed"] == float(decision["passed"])
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == result["counts"]["documents"] and all("answer" in p for p in predictions)
    page = (out / "report.html").read_text()
    assert "Failed documents" in page and "data:image/png;base64," in page and "OCR field acc." in page
    train = read_examples((exported / "train.json").read_bytes(), "train.json")
    sample = min(load_pipeline_config(config).evaluation.fit_check.documents, len(train))
    assert saved["fit"]["overall"]["documents"] == saved["image_control"]["overall"]["documents"] == sample
    assert "Fit check" in page and "swapped images (control)" in page

    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db").get_run(result["mlflow_run_id"])
    assert run.data.tags["eval_set"] == saved["eval_set"] and "ocr_baseline.field_accuracy" in run.data.metrics
    assert {"fit.field_accuracy", "fit.json_validity", "image_control.field_accuracy"} <= set(run.data.metrics)
    for doc_type in saved["metrics"]["per_doc_type"]:
        first_field = REGISTRY[doc_type].fields[0].name
        assert {f"{doc_type}.field_accuracy", f"{doc_type}.per_field_accuracy.{first_field}"} <= set(run.data.metrics)


@pytest.mark.integration
def test_a_regression_against_the_champion_fails_the_gate_not_the_stage(overlay, exported, tiny_model, tmp_path):
    requests = _requests(exported)
    perfect = evaluate_all(
        [
            score(r.doc_type, r.example.id, json.loads(r.example.answer), json.loads(r.example.answer), "", 0.1)
            for r in requests
        ],
        REGISTRY,
        1.0,
    )
    eval_set = hashlib.sha256((exported / "eval.json").read_bytes()).hexdigest()[:16]
    champion = tmp_path / "champion.json"
    champion.write_text(json.dumps({"eval_set": eval_set, "metrics": perfect}))
    out = tmp_path / "evaluate"
    code = run_stage(
        "evaluate",
        _config(overlay, tmp_path),
        "--data",
        str(exported),
        "--model",
        str(tiny_model),
        "--output",
        str(out),
        "--champion-metrics",
        str(champion),
    )
    assert code == 0
    decision = json.loads((out / "decision.json").read_text())
    assert not decision["passed"] and any("the champion's less the tolerance" in r for r in decision["reasons"])
    assert json.loads((out / "result.json").read_text())["metrics"]["gate_passed"] == 0.0


@pytest.mark.integration
def test_a_golden_set_compares_every_model_on_the_same_documents_without_training(overlay, tiny_model, tmp_path):
    """A batch ingested --eval-only is pinned as a golden set; evaluate answers it with no export and
    no training, and compares with the registered champion only where that was measured on it."""
    land_synthetic(tmp_path / "golden-batch", 8, seed=21)
    golden = tmp_path / "golden"
    assert (
        run_stage("ingest", overlay, "--output", str(golden), "--batch", str(tmp_path / "golden-batch"), "--eval-only")
        == 0
    )
    ingested = json.loads((golden / "result.json").read_text())
    version = ingested["outputs"]["version"]
    assert (ingested["counts"]["train"], ingested["counts"]["eval"]) == (0, 8)
    assert run_stage("export", overlay, "--dataset", str(golden), "--output", str(tmp_path / "export")) == 0
    assert json.loads((tmp_path / "export" / "train.json").read_text()) == []  # evaluation-only, yet exported

    pinned = {"receipts-2026": {"dataset": str(golden), "version": version}}
    fit_rules = {"thresholds": {"field_accuracy": 0.9, "document_accuracy": 0.5, "json_validity": 1.0}}
    sets = write_overlay(
        tmp_path,
        "golden.yaml",
        json.dumps({"evaluation": {"ocr_baseline": False, "eval_sets": pinned, "fit_check": fit_rules}}),
    )
    config = [*overlay, sets]

    def regression_check(name: str) -> dict:
        out = tmp_path / name
        code = run_stage(
            "evaluate", config, "--eval-set", "receipts-2026", "--model", str(tiny_model), "--output", str(out)
        )
        assert code == 0
        return json.loads((out / "decision.json").read_text())

    first = regression_check("first")
    assert first["eval_set"] == f"receipts-2026@{version}" and sum(first["doc_types"].values()) == 8
    assert first["notes"][0].startswith("no --data: a regression check") and "no champion" in first["notes"][1]
    assert not {c["rule"] for c in first["checks"]} & {"fit_threshold", "image_dependence", "no_regression"}

    best = {"field_accuracy": 1.0, "document_accuracy": 1.0}
    perfect = {"overall": best, "per_doc_type": dict.fromkeys(first["doc_types"], best)}
    metrics = tmp_path / "champion-metrics.json"
    metrics.write_text(json.dumps({"eval_set": first["eval_set"], "metrics": perfect}))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    client.create_registered_model("doc-extraction")
    for eval_set in (first["eval_set"], "an-older-eval-set"):  # the champion as publish tags it
        version_tags = {"eval_set": eval_set, "evaluation.metrics": str(metrics)}
        champion = client.create_model_version("doc-extraction", str(tiny_model), tags=version_tags).version
        client.set_registered_model_alias("doc-extraction", "champion", champion)
        decision = regression_check(f"against-{champion}")
        compared = [c for c in decision["checks"] if c["rule"] == "no_regression"]
        if eval_set == first["eval_set"]:
            assert (
                compared
                and not decision["passed"]
                and f"compared with champion version {champion}" in decision["notes"][1]
            )
        else:
            assert (
                not compared
                and f"evaluated on an-older-eval-set, not {first['eval_set']}: not compared" in (decision["notes"][1])
            )


@pytest.fixture
def served(overlay, tiny_model, tmp_path):
    """toolkit.openai_standin on loopback: an OpenAI-compatible server running the tiny model on CPU."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "toolkit.openai_standin",
            "--model",
            str(tiny_model),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            *config_flags(overlay),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", lambda: server.poll() is None)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.mark.integration
def test_openai_backend_against_a_server_on_loopback(overlay, exported, served, tmp_path):
    """The stand-in honours response_format and returns log-probabilities, as vLLM does."""
    config = _config(
        overlay,
        tmp_path,
        backend="openai",
        endpoint=served,
        served_model="tiny",
        batch_size=2,
        structured_output=True,
        max_new_tokens=512,
    )
    out = tmp_path / "evaluate"
    assert run_stage("evaluate", config, "--data", str(exported), "--output", str(out)) == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(_requests(exported)) and all(p["latency_s"] > 0 for p in predictions)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["model"] == served and saved["metrics"]["overall"]["json_validity"] == 1.0
    # Routed through the server as a client asks it: each answer names one of the run's types (or other).
    assert all(p["answered_type"] in ROUTING.labels for p in predictions)
    assert_routed_confidence(predictions)
    assert saved["metrics"]["routing"]["documents"] == len(predictions)


@pytest.mark.integration
def test_constrained_decoding_makes_every_answer_valid(overlay, exported, tiny_model, tmp_path):
    """The random tiny model answers no valid JSON on its own; constrained, every answer is valid,
    and each field has a confidence from the tokens' log-probabilities, reported against accuracy."""
    validity = {}
    for constrained in (False, True):
        out = tmp_path / f"evaluate-{constrained}"
        config = _config(
            overlay, tmp_path, structured_output=constrained, max_new_tokens=512, fit_check={"documents": 0}
        )
        assert (
            run_stage("evaluate", config, "--data", str(exported), "--model", str(tiny_model), "--output", str(out))
            == 0
        )
        saved = json.loads((out / "metrics.json").read_text())["metrics"]
        validity[constrained] = saved["overall"]["json_validity"]
    assert validity == {False: 0.0, True: 1.0}
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for prediction in predictions:
        assert set(prediction["confidence"]) == set(prediction["expected"]) and prediction["needs_review"] is True
    assert_routed_confidence(predictions)
    table = saved["confidence"]["calibration"]
    assert sum(row["fields"] for row in table["bins"]) == sum(len(p["correct"]) for p in predictions)  # not the type
    assert saved["confidence"]["review_rate"] == 1.0  # a random model is sure of nothing
    assert "Confidence" in (out / "report.html").read_text()
    run_id = json.loads((out / "result.json").read_text())["mlflow_run_id"]
    logged = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db").get_run(run_id).data.metrics
    assert logged["review_rate"] == 1.0 and "expected_calibration_error" in logged


def test_openai_requests_carry_the_image_and_the_schema(overlay, exported, tmp_path):
    endpoint = "http://127.0.0.1:9/v1"
    config = load_pipeline_config(
        _config(overlay, tmp_path, backend="openai", endpoint=endpoint, structured_output=True)
    )
    request = _requests(exported)[0]
    arguments = OpenAIBackend(endpoint, "m", config).request_arguments(request)
    image, question = arguments["messages"][0]["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,") and "<image>" not in question["text"]
    assert request.routing is not None and question["text"] == ROUTING.prompt.removeprefix("<image>\n")
    assert arguments["temperature"] == 0 and arguments["max_tokens"] == max_new_tokens(
        ROUTING, config.evaluation.max_new_tokens
    )
    assert arguments["response_format"]["json_schema"]["schema"] == decoding_schema(ROUTING)
    assert arguments["logprobs"] is True


def test_vllm_requests_are_built_without_vllm(overlay, exported, tmp_path):
    """vLLM is not installed here: the backend's request building is checked on its own."""
    config = load_pipeline_config(_config(overlay, tmp_path, structured_output=True))
    backend = VllmBackend.__new__(VllmBackend)  # no engine: its constructor would import vllm
    backend.config = config
    request = _requests(exported)[0]
    arguments = backend.sampling_arguments(request)
    assert arguments["temperature"] == 0.0 and arguments["structured_outputs"] == {"json": decoding_schema(ROUTING)}
    assert arguments["logprobs"] == 0  # the chosen token's
    assert "guided_json" not in arguments  # removed from vLLM: structured_outputs replaces it


def test_token_budget_follows_the_schema_and_the_cap():
    thsr, receipt = REGISTRY["thsr_ticket"], REGISTRY["receipt_en"]
    assert max_new_tokens(thsr, 10_000) < max_new_tokens(receipt, 10_000)  # receipts carry free-text addresses
    assert max_new_tokens(thsr, 32) == 32


def test_reading_order_merges_boxes_into_lines():
    boxes = [Box("B", 10, 30, 200), Box("A", 12, 31, 20), Box("next", 40, 60, 5)]
    assert reading_order(boxes) == ["A B", "next"]


def test_extraction_rules_come_from_the_document_type():
    thsr = REGISTRY["thsr_ticket"]
    lines = [
        "台灣高鐵",
        "乘車日期 Date 2024/03/09",
        "起站 From 臺北",
        "迄站 To",
        "左營",
        "票價 Fare NT$1,490",
        "票號 Ticket No. 01-2-34-5-678-9012",
    ]
    assert Extractor(thsr, lines).fields() == {
        "乘車日期": "2024-03-09",
        "起站": "台北",
        "迄站": "左營",
        "票面金額": "1490",
        "票號": "01-2-34-5-678-9012",
    }
    receipt = Extractor(
        REGISTRY["receipt_en"], ["ACME SDN BHD", "1 JALAN X", "JOHOR", "Date: 25/12/2018", "TOTAL: 9.00"]
    ).fields()
    assert receipt == {"company": "ACME SDN BHD", "date": "2018-12-25", "address": "1 JALAN X JOHOR", "total": "9.00"}


RECEIPT_LINES = [
    # what SROIE receipts print above the name: a stamp, a heading, an annotator's name
    (
        [
            "3180303",
            "Cash Sale",
            "tan woon yann",
            "SYARIKAT PERNIAGAAN GIN KEE",
            "(81109-A)",
            "NO 290, JALAN AIR PANAS",
            "SETAPAK,",
            "53200, KUALA LUMPUR.",
            "TEL: 03-40210276",
            "Date:19/10/2018 11:50",
            "Total Item(6):1",
            "Total: 80.91 0.00",
            "Total GST (RM): 4.58",
            "CHANGE 1.00",
        ],
        {
            "company": "SYARIKAT PERNIAGAAN GIN KEE",
            "date": "2018-10-19",
            "address": "NO 290, JALAN AIR PANAS SETAPAK, 53200, KUALA LUMPUR.",
            "total": "80.91",
        },
    ),
    # a name wrapped over two lines with its registration number after it; a rounded total wins
    (
        [
            "GARDENIA BAKERIES (KL)",
            "SDN BHD (139386-X)",
            "LOT 3, JALAN PELABUR 23/1,",
            "40300 SHAH ALAM, SELANGOR.",
            "GST ID: 000381399040",
            "24-MAR-2018 10:02",
            "Total: 106.10",
            "Total GST: 6.37",
            "Rounding: -0.01",
            "Total (Inclusive of GST): 112.46",
            "Rounded Total: 112.45",
            "CASH: 120.00",
            "CHANGE: 7.55",
        ],
        {
            "company": "GARDENIA BAKERIES (KL) SDN BHD",
            "date": "2018-03-24",
            "address": "LOT 3, JALAN PELABUR 23/1, 40300 SHAH ALAM, SELANGOR.",
            "total": "112.45",
        },
    ),
    # no total caption: the subtotal, never a number of the address; a date printed in eight digits
    (
        [
            "KEDAI RUNCIT MAJU",
            "NO 12, JALAN 3/4, 81100 JOHOR",
            "Tel 07-1234567",
            "20180304 1830",
            "SUBTOTAL RM20.40",
            "CASH RM20.40",
        ],
        {
            "company": "KEDAI RUNCIT MAJU",
            "date": "2018-03-04",
            "address": "NO 12, JALAN 3/4, 81100 JOHOR",
            "total": "20.40",
        },
    ),
]


@pytest.mark.parametrize(("lines", "expected"), RECEIPT_LINES)
def test_receipt_rules_read_what_real_receipts_print(lines, expected):
    assert Extractor(REGISTRY["receipt_en"], lines).fields() == expected


def test_word_gaps_the_recogniser_dropped_become_spaces_again():
    boxes = [[[x, 0], [x + 10, 0], [x + 10, 20], [x, 20]] for x in (0, 11, 22, 40, 51, 70, 80)]
    assert spaced(list("SDNBH12"), boxes) == "SDN BH 12"  # wide gaps are spaces, digits stay together


@pytest.mark.integration
def test_ocr_baseline_reads_real_receipts():
    """Every fifth SROIE receipt through the whole baseline (OCR included): dates and totals read
    right on most of them. ``benchmarks/ocr_baseline.py`` measures all 46."""
    receipt, reader, documents = REGISTRY["receipt_en"], OcrBaseline(), []
    for image in sorted((SROIE / "img").glob("*.jpg"))[::5]:
        expected = receipt.canonical_fields(json.loads((SROIE / "key" / f"{image.stem}.json").read_text()))
        fields, seconds = reader.read(receipt, Image.open(image))
        documents.append(score(receipt, image.stem, expected, fields, "", seconds))
    per_field = evaluate_all(documents, REGISTRY, 1.0)["per_doc_type"]["receipt_en"]["per_field_accuracy"]
    assert per_field["date"] >= 0.8 and per_field["total"] >= 0.8 and per_field["company"] >= 0.3, per_field


@pytest.mark.integration
def test_ocr_baseline_reads_a_synthetic_document(exported):
    request = next(r for r in _requests(exported) if r.doc_type.id == "einvoice")
    fields, seconds = OcrBaseline().read(request.doc_type, Image.open(request.example.image))
    expected = json.loads(request.example.answer)
    assert seconds > 0 and sum(fields[f.name] == expected[f.name] for f in request.doc_type.fields) >= 2


def test_ocr_baseline_guesses_the_type_it_finds_most_fields_of(exported):
    """Routed documents, for the OCR pipeline: the type whose fields it finds most of, none on a blank page."""
    reader = OcrBaseline()
    candidates = [REGISTRY[name] for name in ("einvoice", "receipt_en")]
    for request in [r for r in _requests(exported) if r.doc_type.id in ("einvoice", "receipt_en")][:2]:
        guessed, fields, _ = reader.guess(candidates, Image.open(request.example.image))
        assert guessed is request.doc_type and any(fields.values())
    assert reader.guess(candidates, Image.new("RGB", (400, 300), "white"))[:2] == (None, {})


def test_swapped_images_give_each_document_another_documents_image(exported):
    """Asked with its type, a document gets another image of its type; routed, one of another type."""
    routed = _requests(exported)
    given = [Request(r.example, r.doc_type) for r in routed]
    for requests, same_type in ((given, True), (routed, False)):
        single = requests[:1] + [r for r in requests if r.doc_type.id != requests[0].doc_type.id]  # a type with one
        for chosen in (requests, single):
            images = {r.example.image: r for r in chosen}
            for before, after in zip(chosen, swapped_images(chosen), strict=True):
                assert (after.example.id, after.example.answer) == (before.example.id, before.example.answer)
                assert after.routing is before.routing
                assert after.example.image != before.example.image and after.example.image in images
                donor = images[after.example.image].doc_type.id
                if same_type:
                    alone = len([r for r in chosen if r.doc_type.id == before.doc_type.id]) == 1
                    assert alone or donor == before.doc_type.id
                else:
                    assert donor != before.doc_type.id


def _overall(field_accuracy: float, json_validity: float = 1.0) -> dict:
    values = {
        "field_accuracy": field_accuracy,
        "document_accuracy": field_accuracy / 2,
        "json_validity": json_validity,
        "documents": 50,
    }
    return {"overall": values, "per_doc_type": {"thsr_ticket": values}}


def test_the_fit_check_gates_the_fit_and_the_image_dependence():
    zero = {"field_accuracy": 0.0, "document_accuracy": 0.0, "json_validity": 0.0}
    config = EvaluationConfig(
        thresholds=zero,
        fit_check={
            "thresholds": {"field_accuracy": 0.9, "document_accuracy": 0.4, "json_validity": 1.0},
            "max_control_ratio": 0.5,
        },
    )
    decision = lambda fit, control: decide(_overall(0.1), config, "set", fit=fit, control=control)  # noqa: E731
    assert decision(_overall(0.96), _overall(0.3)).passed
    guessed = decision(_overall(0.96), _overall(0.6))
    assert not guessed.passed and "do not depend enough on the image" in guessed.reasons[0]
    under = decision(_overall(0.5), _overall(0.1))
    assert not under.passed and any(
        r == "train sample: field_accuracy 0.5000 < 0.9000 (the fit threshold)" for r in under.reasons
    )
    assert "nothing shows that the answers depend on the image" in decision(_overall(0.0), _overall(0.0)).reasons[-1]
    assert "no training document was answered" in decision(None, None).reasons[0]
    assert decide(_overall(0.1), EvaluationConfig(thresholds=zero), "set").passed  # no fit rules: not required


def test_free_text_without_its_caption_is_not_guessed():
    """A captioned text field (a TRA ticket's stations) whose caption the OCR missed stays empty, never
    the first line of the document."""
    fields = Extractor(REGISTRY["tra_ticket"], ["臺灣鐵路 TAIWAN RAILWAY", "2024/03/09", "NT$ 375"]).fields()
    assert fields["起站"] is None and fields["迄站"] is None
