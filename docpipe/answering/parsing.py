"""The JSON object inside a model's answer: bare, in a code fence, or among other text.

An answer may hold several objects (an example, a draft, then the answer); with the type's
answer schema the one that validates wins, else the one that shares the most keys with it; among
equals the last, as answers end with the answer. Without a schema the first (fenced ones first).
"""

from __future__ import annotations

import json
import re

from docpipe.doctypes import DocType

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


def extract_json(answer: str, doc_type: DocType | None = None) -> dict | None:
    """The answer's JSON object (see the module's rule), or None where there is none."""
    objects = json_objects(answer)
    if doc_type is None or len(objects) < 2:
        return objects[0] if objects else None
    keys = {spec.name for spec in doc_type.fields}
    return max(objects, key=lambda o: (fits(o, doc_type), len(keys & set(o)), objects.index(o)))


def fits(value: dict | None, doc_type: DocType) -> bool:
    """Whether a parsed answer is a valid answer: an object that validates against the type's schema."""
    return value is not None and doc_type.answer_validator.is_valid(value)
