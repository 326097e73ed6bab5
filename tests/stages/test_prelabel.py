"""Prelabel's reading of a model's answer, with the type given or routed (no model, no server)."""

from __future__ import annotations

import json

from docpipe.answering.backends import Request
from docpipe.config import ExportConfig
from docpipe.data.examples import Example
from docpipe.doctypes import load_registry
from docpipe.routing import Routing
from stages.prelabel import read_answer
from tests.helpers import ROOT

REGISTRY = load_registry(ROOT / "configs" / "doctypes")
ROUTING = Routing.of(REGISTRY, ["thsr_ticket", "receipt_en"], ExportConfig().routing_prompt)
THSR = REGISTRY["thsr_ticket"]
TICKET = {"乘車日期": "2024-03-09", "起站": "台北", "迄站": "左營", "票面金額": "1490", "票號": "01-2-34-5-678-9012"}


def request(doc_type=None, asked=ROUTING) -> Request:
    example = Example(
        id="page.png",
        doc_type=doc_type.id if doc_type else None,
        routed=True,
        image="page.png",
        conversations=[{"role": "user", "content": ROUTING.prompt}, {"role": "assistant", "content": ""}],
    )
    return Request(example, doc_type, asked)


def sure(answer: str) -> tuple[tuple[int, float], ...]:
    """One token per byte, each certain: every value present has confidence 1."""
    return tuple((end, 0.0) for end in range(1, len(answer.encode()) + 1))


def test_a_routed_answer_decides_the_type_its_fields_and_their_confidence():
    answer = json.dumps({"doc_type": "thsr_ticket", **TICKET}, ensure_ascii=False)
    read = read_answer(request(), answer, sure(answer))
    assert read["doc_type"] == "thsr_ticket" and read["fields"] == TICKET
    assert read["confidence"] == {"doc_type": 1.0, **dict.fromkeys(TICKET, 1.0)}


def test_a_page_answered_as_none_of_the_types_or_as_no_type_goes_nowhere():
    for answer in ('{"doc_type": "other"}', '{"doc_type": "bus_ticket", "起站": "台北"}', "no JSON at all"):
        read = read_answer(request(), answer, sure(answer))
        assert read["doc_type"] == "other" and read["fields"] == {}, answer


def test_the_type_given_is_kept_whatever_was_answered():
    cut = '{"doc_type": "thsr_ticket", "乘車日期": "2024-'  # the answer ran out of tokens
    read = read_answer(request(THSR, ROUTING.given(THSR)), cut, sure(cut))
    assert read["doc_type"] == "thsr_ticket" and read["fields"] == {}
    assert read["confidence"] == {"doc_type": 0.0, **dict.fromkeys(TICKET, 0.0)}  # nothing was answered in full
