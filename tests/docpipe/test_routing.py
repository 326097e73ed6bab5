"""Documents whose type nobody told the model: the routed question, its schema, and how routed
answers are scored and gated. Expectations are written out by hand."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from docpipe.answering.backends import decoding_schema, max_new_tokens, response_format
from docpipe.answering.parsing import extract_json
from docpipe.answering.scoring import evaluate_all, score
from docpipe.config import EvaluationConfig, ExportConfig
from docpipe.doctypes import DocType, load_registry
from docpipe.routing import Routing, RoutingError, routing_prompt
from stages.evaluate.gate import decide
from tests.helpers import ROOT

REGISTRY = load_registry(ROOT / "configs" / "doctypes")
TYPES = ["thsr_ticket", "tra_ticket", "einvoice"]
ROUTING = Routing.of(REGISTRY, TYPES, ExportConfig().routing_prompt)
THSR, TRA = REGISTRY["thsr_ticket"], REGISTRY["tra_ticket"]
TICKET = {"乘車日期": "2024-03-09", "起站": "台北", "迄站": "左營", "票面金額": "1490", "票號": "01-2-34-5-678-9012"}
TRA_TICKET = {"乘車日期": "2024-03-09", "起站": "臺北", "迄站": "高雄", "車次": "123", "車種": "自強", "票價": "843"}


def routed(doc_type: str, fields: dict) -> dict:
    return {"doc_type": doc_type, **fields}


def test_the_routing_prompt_lists_the_run_types_from_the_registry():
    assert ROUTING.prompt.startswith("<image>\n") and ROUTING.prompt.count("<image>") == 1
    for name in TYPES:
        assert f"{REGISTRY[name].display_name} ({name})" in ROUTING.prompt
    assert "receipt_en" not in ROUTING.prompt and '{"doc_type": "other"}' in ROUTING.prompt
    recipe = routing_prompt("<image>\n{prompts}", [THSR, TRA])  # the recipe's own 如果這是… sentences
    assert recipe == "<image>\n" + THSR.prompt.removeprefix("<image>\n") + "\n" + TRA.prompt.removeprefix("<image>\n")
    with pytest.raises(RoutingError, match=r"only \{types\} and \{prompts\}"):
        routing_prompt("<image>\n{kinds}", [THSR])


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("這是哪一種文件?{types}", "<image> placeholder exactly once"),
        ("<image>\n這是哪一種文件?", "names no type"),
        ('<image>\n{types}: 回傳 {"doc_type": "other"}', "literal brace"),
    ],
)
def test_a_routing_prompt_that_cannot_be_filled_is_a_config_error(template, problem):
    with pytest.raises(ValidationError, match=problem):
        ExportConfig(routing_prompt=template)


def test_other_and_doc_type_are_reserved_names():
    thsr = THSR.model_dump()
    with pytest.raises(ValidationError, match="id 'other' is reserved"):
        DocType.model_validate({**thsr, "id": "other"})
    with pytest.raises(ValidationError, match="field name 'doc_type' is reserved"):
        DocType.model_validate({**thsr, "fields": [*thsr["fields"], {"name": "doc_type", "type": "text"}]})


@pytest.mark.parametrize(
    ("answer", "valid"),
    [
        (routed("thsr_ticket", TICKET), True),
        (routed("tra_ticket", TRA_TICKET), True),
        ({"doc_type": "other"}, True),
        ({"doc_type": "other", "起站": "台北"}, False),  # "none of these" with fields
        ({"doc_type": "other", "乘車日期": None}, False),
        (routed("bus_ticket", TICKET), False),  # a type nobody registered
        (routed("receipt_en", TICKET), False),  # registered, but not one of this run's types
        (routed("tra_ticket", TICKET), False),  # one type's name, another's fields
        (TICKET, False),  # no type named
        (routed("thsr_ticket", {**TICKET, "extra": "1"}), False),
    ],
)
def test_the_routed_schema_is_the_union_of_the_types_with_the_type_as_discriminator(answer, valid):
    assert ROUTING.answer_validator.is_valid(answer) is valid
    assert score(THSR, "d", TICKET, answer, json.dumps(answer), 0.1, ROUTING).valid is valid


def test_the_type_given_question_allows_only_that_type():
    given = ROUTING.given(TRA)
    assert given.prompt == ROUTING.prompt and given.labels == ["tra_ticket", "other"]
    assert given.answer_validator.is_valid(routed("tra_ticket", TRA_TICKET))
    assert not given.answer_validator.is_valid(routed("thsr_ticket", TICKET))
    assert not given.answer_validator.is_valid({"doc_type": "other"})


def test_decoding_budget_and_response_format_cover_every_routed_type():
    budget = max_new_tokens(ROUTING, 10_000)
    assert budget > max(max_new_tokens(REGISTRY[name], 10_000) for name in TYPES)  # the type key on top
    schema = decoding_schema(ROUTING)
    bounded = {b["properties"]["doc_type"]["const"]: b for b in schema["anyOf"]}
    assert set(bounded) == {*TYPES, "other"} and bounded["tra_ticket"]["properties"]["起站"]["maxLength"] > 0
    assert response_format(ROUTING)["json_schema"] == {"name": "routed", "schema": schema, "strict": True}


def test_the_routed_answer_that_validates_wins_over_drafts():
    answer = f'draft {{"doc_type": "bus"}} then {json.dumps(routed("thsr_ticket", TICKET), ensure_ascii=False)}'
    assert extract_json(answer, ROUTING) == routed("thsr_ticket", TICKET)


def test_a_document_routed_to_the_wrong_type_counts_every_field_wrong():
    # A TRA ticket answered as a THSR ticket that shares 乘車日期, 起站 and 迄站 with the label: still all wrong.
    wrong = routed("thsr_ticket", {**TICKET, "起站": "台北", "迄站": "高雄", "乘車日期": "2024-03-09"})
    scored = score(TRA, "d", TRA_TICKET, wrong, json.dumps(wrong), 0.1, ROUTING)
    assert scored.answered_type == "thsr_ticket" and not scored.type_correct
    assert set(scored.correct.values()) == {False} and not scored.all_correct
    right = score(TRA, "d", TRA_TICKET, routed("tra_ticket", TRA_TICKET), "", 0.1, ROUTING)
    assert right.type_correct and right.all_correct
    other = score(None, "p", {"doc_type": "other"}, {"doc_type": "other"}, "", 0.1, ROUTING)
    assert other.doc_type == "other" and other.correct == {} and other.all_correct and other.valid


def test_type_accuracy_and_the_confusion_table():
    documents = [
        score(THSR, "t1", TICKET, routed("thsr_ticket", TICKET), "", 0.1, ROUTING),
        score(THSR, "t2", TICKET, routed("tra_ticket", TRA_TICKET), "", 0.1, ROUTING),
        score(TRA, "r1", TRA_TICKET, routed("tra_ticket", TRA_TICKET), "", 0.1, ROUTING),
        score(TRA, "r2", TRA_TICKET, {"doc_type": "bus_ticket"}, "", 0.1, ROUTING),
        score(None, "o1", {}, {"doc_type": "other"}, "", 0.1, ROUTING),
        score(None, "o2", {}, routed("thsr_ticket", TICKET), "", 0.1, ROUTING),
        score(None, "o3", {}, None, "no JSON", 0.1, ROUTING),
    ]
    metrics = evaluate_all(documents, REGISTRY, 1.0)
    routing = metrics["routing"]
    assert routing["documents"] == 7 and routing["type_accuracy"] == pytest.approx(3 / 7)
    assert routing["confusion"] == {  # a made-up type and an answer with no type are both invalid
        "thsr_ticket": {"thsr_ticket": 1, "tra_ticket": 1, "other": 0, "invalid": 0},
        "tra_ticket": {"thsr_ticket": 0, "tra_ticket": 1, "other": 0, "invalid": 1},
        "other": {"thsr_ticket": 1, "tra_ticket": 0, "other": 1, "invalid": 1},
    }
    assert routing["per_label"]["other"] == {"documents": 3, "type_accuracy": pytest.approx(1 / 3)}
    assert set(metrics["per_doc_type"]) == {"thsr_ticket", "tra_ticket"}  # other pages have no fields to score
    assert metrics["per_doc_type"]["thsr_ticket"]["type_accuracy"] == 0.5
    assert metrics["per_doc_type"]["thsr_ticket"]["field_accuracy"] == 0.5  # t2's fields all count wrong
    assert metrics["overall"]["type_accuracy"] == pytest.approx(3 / 7)
    assert metrics["overall"]["document_accuracy"] == pytest.approx(3 / 7)  # t1, r1, o1
    assert metrics["overall"]["field_accuracy"] == pytest.approx((5 + 6) / (2 * 5 + 2 * 6))


def test_the_gate_fails_a_run_under_its_type_accuracy_threshold_with_the_reason():
    zero = {"field_accuracy": 0.0, "document_accuracy": 0.0, "json_validity": 0.0}
    documents = [
        score(THSR, "t1", TICKET, routed("thsr_ticket", TICKET), "", 0.1, ROUTING),
        score(THSR, "t2", TICKET, {"doc_type": "other"}, "", 0.1, ROUTING),
    ]
    metrics = evaluate_all(documents, REGISTRY, 1.0)
    assert metrics["routing"]["confusion"] == {"thsr_ticket": {"thsr_ticket": 1, "other": 1, "invalid": 0}}
    failed = decide(metrics, EvaluationConfig(thresholds=zero, type_accuracy=0.9), "set")
    assert not failed.passed
    assert failed.reasons == [
        "overall: type_accuracy 0.5000 < 0.9000 (evaluation.type_accuracy: documents whose type the model names right)"
    ]
    assert decide(metrics, EvaluationConfig(thresholds=zero, type_accuracy=0.5), "set").passed
    given = evaluate_all([score(THSR, "t", TICKET, TICKET, "", 0.1)], REGISTRY, 1.0)
    assert given["routing"] is None and "type_accuracy" not in given["overall"]  # not routed: no type rule
    assert decide(given, EvaluationConfig(thresholds=zero, type_accuracy=1.0), "set").passed
