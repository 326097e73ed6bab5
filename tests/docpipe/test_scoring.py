"""Parsing answers, scoring them against labels, and the gate's decisions."""

from __future__ import annotations

import json

import pytest

from docpipe.answering.parsing import extract_json
from docpipe.answering.scoring import donut_scores, evaluate_all, score
from docpipe.config import EvaluationConfig, Thresholds
from docpipe.doctypes import load_registry
from stages.evaluate.gate import decide
from tests.helpers import ROOT

REGISTRY = load_registry(ROOT / "configs" / "doctypes")
THSR = REGISTRY["thsr_ticket"]
TICKET = {"乘車日期": "2024-03-09", "起站": "台北", "迄站": "左營", "票面金額": "1490", "票號": "01-2-34-5-678-9012"}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('{"a": "1"}', {"a": "1"}),
        ('```json\n{"a": "1"}\n```', {"a": "1"}),
        ('Here it is: {"a": {"b": 2}} hope that helps {"c": 3}', {"a": {"b": 2}}),
        ('{"a": "1"', None),  # cut off
        ("no json at all", None),
        ('["a", "b"]', None),  # JSON, but not an object
        ('{bad} then {"a": 1}', {"a": 1}),
    ],
)
def test_the_json_object_is_found_in_an_answer(answer, expected):
    assert extract_json(answer) == expected


def test_the_object_that_fits_the_schema_wins_and_only_it_is_valid():
    example = {"乘車日期": "2000-01-01", "起站": "南港", "迄站": "台北", "票面金額": "1", "票號": "00-0-00-0-000-0000"}
    answer = f'For example {json.dumps(example)}; the keys {{"起站": "x"}}. Answer: {json.dumps(TICKET)} {{}}'
    assert extract_json(answer, THSR) == TICKET  # the last one that validates, not the first object
    assert extract_json('{"note": 1} {"起站": "台北", "迄站": "左營"}', THSR) == {"起站": "台北", "迄站": "左營"}
    for wrong_shape in ({}, {"起站": "台北"}, {**TICKET, "extra": "1"}, {**TICKET, "票面金額": 1490}):
        assert not score(THSR, "d", TICKET, wrong_shape, json.dumps(wrong_shape), 0.1).valid
    scored = [score(THSR, "d", TICKET, p, "", 0.1) for p in (TICKET, {}, None)]
    assert [s.valid for s in scored] == [True, False, False]
    assert evaluate_all(scored, REGISTRY, 1.0)["overall"]["json_validity"] == pytest.approx(1 / 3)


def test_normalisation_makes_equivalent_values_equal():
    predicted = {
        "乘車日期": "2024/03/09",
        "起站": "臺北",
        "迄站": "左營",
        "票面金額": "NT$1,490",
        "票號": "01-2-34-5-678-9012",
    }
    scored = score(THSR, "d", TICKET, predicted, "", 0.1)
    assert scored.all_correct and set(scored.cer.values()) == {0.0}
    full_width = {**predicted, "票號": "０１-２-３４-５-６７８-９０１２"}  # NFKC: full-width digits
    assert score(THSR, "d", TICKET, full_width, "", 0.1).all_correct


def test_wrong_and_missing_fields_count_as_wrong():
    scored = score(THSR, "d", TICKET, {**TICKET, "迄站": "左中", "票號": None}, "", 0.1)
    assert scored.correct == {"乘車日期": True, "起站": True, "迄站": False, "票面金額": True, "票號": False}
    assert scored.cer["迄站"] == 0.5 and scored.cer["票號"] == 1.0
    unparsed = score(THSR, "d", TICKET, None, "garbage", 0.1)
    assert not any(unparsed.correct.values()) and set(unparsed.cer.values()) == {1.0}


def test_metrics_per_type_and_overall():
    documents = [
        score(THSR, "a", TICKET, dict(TICKET), "", 0.1),
        score(THSR, "b", TICKET, {**TICKET, "起站": "南港"}, "", 0.3),
        score(THSR, "c", TICKET, None, "oops", 0.2),
    ]
    metrics = evaluate_all(documents, REGISTRY, duration_s=2.0)
    thsr = metrics["per_doc_type"]["thsr_ticket"]
    assert thsr["field_accuracy"] == pytest.approx(9 / 15)
    assert thsr["document_accuracy"] == pytest.approx(1 / 3)
    assert thsr["json_validity"] == pytest.approx(2 / 3)
    assert thsr["per_field_accuracy"]["起站"] == pytest.approx(1 / 3)
    assert thsr["latency_p50_s"] == pytest.approx(0.2)
    assert metrics["overall"]["docs_per_s"] == pytest.approx(1.5)
    assert metrics["overall"]["field_accuracy"] == thsr["field_accuracy"]


def test_donut_scores_match_their_definitions():
    perfect = [score(THSR, "a", TICKET, dict(TICKET), "", 0.1)]
    assert donut_scores(THSR, perfect) == (1.0, 1.0)
    one_wrong = [score(THSR, "a", TICKET, {**TICKET, "起站": "南港"}, "", 0.1)]
    f1, ted = donut_scores(THSR, one_wrong)
    assert f1 == pytest.approx(4 / (4 + (1 + 1) / 2))  # TP / (TP + (FN + FP) / 2)
    assert ted == pytest.approx(1 - 1 / 10)  # one relabelled leaf; building the tree from nothing takes 10
    assert donut_scores(THSR, [score(THSR, "a", TICKET, None, "", 0.1)]) == (0.0, 0.0)


def _metrics(field_accuracy, document_accuracy, json_validity=1.0, doc_type="thsr_ticket"):
    values = {
        "field_accuracy": field_accuracy,
        "document_accuracy": document_accuracy,
        "json_validity": json_validity,
        "documents": 50,
    }
    return {"overall": dict(values), "per_doc_type": {doc_type: dict(values)}}


CONFIG = EvaluationConfig(
    thresholds=Thresholds(field_accuracy=0.98, document_accuracy=0.92, json_validity=0.99),
    per_doc_type={"receipt_en": Thresholds(field_accuracy=0.9, document_accuracy=0.8, json_validity=0.99)},
    regression_tolerance=0.005,
)


def test_gate_fails_below_a_threshold_and_says_which():
    decision = decide(_metrics(0.99, 0.90), CONFIG, eval_set="v1")
    assert not decision.passed
    assert decision.reasons == ["thsr_ticket: document_accuracy 0.9000 < 0.9200 (the threshold)"]
    assert decide(_metrics(0.91, 0.85, doc_type="receipt_en"), CONFIG, eval_set="v1").passed  # its own thresholds


def test_gate_fails_a_regression_against_the_champion():
    champion = _metrics(0.995, 0.97)
    decision = decide(_metrics(0.99, 0.95), CONFIG, "v1", champion, champion_eval_set="v1")
    assert not decision.passed
    assert "overall: document_accuracy 0.9500 < 0.9650 (the champion's less the tolerance)" in decision.reasons
    within_tolerance = decide(_metrics(0.991, 0.966), CONFIG, "v1", champion, champion_eval_set="v1")
    assert within_tolerance.passed and within_tolerance.reasons == ["every check passed"]


def test_gate_does_not_compare_with_a_champion_measured_on_another_eval_set():
    decision = decide(_metrics(0.99, 0.99), CONFIG, "v2", _metrics(0.5, 0.5), champion_eval_set="v1")
    assert not decision.passed and "evaluated on eval set v1, not v2" in decision.reasons[0]


def test_gate_passes_when_everything_holds():
    decision = decide(_metrics(0.99, 0.95), CONFIG, "v1", _metrics(0.99, 0.95), champion_eval_set="v1")
    assert decision.passed and {c.rule for c in decision.checks} == {"eval_documents", "threshold", "no_regression"}


def test_a_requested_type_without_enough_eval_documents_fails_the_gate():
    """Asked for tickets and receipts, evaluated on tickets only: the gate names the missing type."""
    documents = [score(THSR, str(i), TICKET, dict(TICKET), "", 0.1) for i in range(3)]
    metrics = evaluate_all(documents, REGISTRY, 1.0)
    config = EvaluationConfig(
        thresholds=Thresholds(field_accuracy=0.5, document_accuracy=0.5, json_validity=0.5), min_eval_documents=3
    )
    decision = decide(metrics, config, "set", requested=["thsr_ticket", "receipt_en"])
    assert not decision.passed and decision.doc_types == {"thsr_ticket": 3, "receipt_en": 0}
    assert decision.reasons == [
        "receipt_en: 0 eval documents, fewer than evaluation.min_eval_documents (3): its "
        "accuracy is not measured well enough to gate on"
    ]
    assert decide(metrics, config, "set", requested=["thsr_ticket"]).passed
    assert not decide(metrics, config.model_copy(update={"min_eval_documents": 4}), "set").passed


def test_the_report_never_shows_an_expected_value_as_predicted():
    from stages.evaluate.report import predicted_cell

    assert predicted_cell("ACME SDN BHD", None, "company", False) == '<span class="none">no JSON</span>'
    assert "no value" in predicted_cell("ACME SDN BHD", {"company": None}, "company", False)
    assert "no value" in predicted_cell("ACME SDN BHD", {}, "company", False)
    cut = predicted_cell("ACME SDN BHD", {"company": "ACNE"}, "company", False)
    assert "SDN" not in cut and "<ins>N</ins>" in cut and "‸" in cut
    assert predicted_cell("9.00", {"total": "9.0"}, "total", True) == "9.0"
    template = (ROOT / "stages" / "evaluate" / "report.html.j2").read_text()
    assert "Legend:" in template and "no JSON" in template
