"""The JSON object inside a model's answer: bare, in a code fence, or among other text.

An answer may hold several objects (an example, a draft, then the answer); with the answer's
schema (a document type's, or the routed question's) the one that validates wins, else the one
that shares the most keys with it; among equals the last, as answers end with the answer. Without
a schema the first (fenced ones first).
"""

from __future__ import annotations

import json
import re

from docpipe.doctypes import DocType
from docpipe.routing import Routing

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)
_DECODER = json.JSONDecoder()


def json_objects(answer: str) -> list[dict]:
    """Every JSON object in ``answer``, fenced ones first, each once."""
    found: list[dict] = []
    for candidate in [*_FENCE.findall(answer), answer]:
        position = 0
        while (start := candidate.find("{", position)) >= 0:
            try:
                value, end = _DECODER.raw_decode(candidate, start)
            except json.JSONDecodeError:
                position = start + 1
                continue
            if isinstance(value, dict) and value not in found:
                found.append(value)
            position = end if isinstance(value, dict) else start + 1
    return found


def extract_json(answer: str, asked: DocType | Routing | None = None) -> dict | None:
    """The answer's JSON object (see the module's rule), or None where there is none."""
    objects = json_objects(answer)
    if asked is None or len(objects) < 2:
        return objects[0] if objects else None
    return max(objects, key=lambda o: (fits(o, asked), len(asked.keys & set(o)), objects.index(o)))


def fits(value: dict | None, asked: DocType | Routing) -> bool:
    """Whether a parsed answer is a valid answer: an object that validates against the schema of what
    was asked (a document type, or the routed question)."""
    return value is not None and asked.answer_validator.is_valid(value)
