"""Per-field confidence from token log-probabilities, the calibration table and the review split."""

from __future__ import annotations

import math

import pytest

from docpipe.answering.backends import byte_ends
from docpipe.answering.confidence import calibration, field_confidence, value_spans
from docpipe.answering.scoring import Scored, review


def tokens(answer: str, cuts: list[int], logprobs: list[float]) -> tuple[tuple[int, float], ...]:
    """The answer cut into tokens at these character positions, as (end byte, logprob)."""
    bounds = [0, *cuts, len(answer)]
    pieces = [answer[a:b].encode() for a, b in zip(bounds, bounds[1:], strict=False)]
    return byte_ends(list(zip(pieces, logprobs, strict=True)))


def test_value_spans_are_bytes_of_the_object_the_parser_chose():
    answer = 'draft {"起站": "x"} then ```json\n{"起站": "臺北", "票號": null}\n```'
    spans = value_spans(answer, {"起站": "臺北", "票號": None})
    start = len(answer[: answer.index('"臺北"')].encode())
    assert spans["起站"] == (start, start + len('"臺北"'.encode()))
    assert answer.encode()[slice(*spans["票號"])] == b"null"


def test_field_confidence_multiplies_the_probabilities_of_its_tokens():
    answer = '{"a": "12", "b": "x"}'
    # tokens: '{"a": ' | '"1' | '2"' | ', "b": ' | '"x"' | '}'
    cuts = [6, 8, 10, 17, 20]
    logprobs = [-0.1, math.log(0.5), math.log(0.8), -0.2, math.log(0.9), -0.3]
    confidence = field_confidence(answer, {"a": "12", "b": "x"}, ["a", "b", "c"], tokens(answer, cuts, logprobs))
    assert confidence["a"] == pytest.approx(0.4)
    assert confidence["b"] == pytest.approx(0.9)
    assert confidence["c"] == 0.0  # not answered: as unsure as can be


def test_without_logprobs_there_is_no_confidence_and_no_json_means_zero():
    assert field_confidence('{"a": "1"}', {"a": "1"}, ["a"], ()) is None
    assert field_confidence("no json here", None, ["a"], ((12, -0.1),)) == {"a": 0.0}


def test_calibration_bins_fields_by_confidence():
    table = calibration([(0.3, False), (0.85, True), (0.85, False), (0.999, True), (1.0, True)])
    rows = {(row["from"], row["to"]): row for row in table["bins"]}
    assert rows[(0.0, 0.5)]["fields"] == 1 and rows[(0.0, 0.5)]["accuracy"] == 0.0
    assert rows[(0.8, 0.9)]["accuracy"] == 0.5 and rows[(0.8, 0.9)]["mean_confidence"] == pytest.approx(0.85)
    assert rows[(0.99, 1.0)]["fields"] == 2
    assert rows[(0.5, 0.8)]["fields"] == 0 and rows[(0.5, 0.8)]["accuracy"] is None
    expected = (0.3 + 2 * 0.35 + (1 - 0.999) + 0) / 5
    assert table["expected_calibration_error"] == pytest.approx(expected)


def document(name: str, correct: dict[str, bool], confidence: dict[str, float] | None) -> Scored:
    scored = Scored(name, "t", {}, {}, "", 0.1, correct=correct, confidence=confidence)
    scored.valid = True
    return scored


def test_review_sends_documents_with_an_unsure_field_and_reports_the_rest():
    documents = [
        document("sure-right", {"a": True, "b": True}, {"a": 0.99, "b": 0.97}),
        document("sure-wrong", {"a": True, "b": False}, {"a": 0.99, "b": 0.95}),
        document("unsure", {"a": False, "b": True}, {"a": 0.2, "b": 0.99}),
        document("no-logprobs", {"a": True, "b": True}, None),
    ]
    summary = review(documents, threshold=0.9)
    assert summary["review_rate"] == pytest.approx(1 / 3)  # of the documents that have a confidence
    assert summary["accepted"]["documents"] == 2 and summary["accepted"]["field_accuracy"] == pytest.approx(0.75)
    assert documents[2].needs_review(0.9) and not documents[0].needs_review(0.9)
    assert documents[3].needs_review(0.9) is None
    assert review([documents[3]], 0.9) is None
