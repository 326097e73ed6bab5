"""The JSON object inside a model's answer: bare, in a code fence, or followed by other text."""

from __future__ import annotations

import json
import re

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)
_DECODER = json.JSONDecoder()


def extract_json(answer: str) -> dict | None:
    """The first JSON object in ``answer`` (fenced ones first), or None where there is none."""
    for candidate in [*_FENCE.findall(answer), answer]:
        for start in (i for i, char in enumerate(candidate) if char == "{"):
            try:
                value, _ = _DECODER.raw_decode(candidate, start)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None
