"""How sure the model was of each field, from its generated tokens' log-probabilities, and how
well that sureness tells right values from wrong ones.

A field's confidence is the probability the model gave its value: ``exp`` of the summed
log-probabilities of the tokens that overlap the value's bytes in the answer (the quotes
included, so an empty value has one too). The probabilities are the model's own, before any
constraint masked them (vLLM's ``raw_logprobs`` too). A field missing from the answer has
confidence 0; without log-probabilities (a backend or server that gives none) there is none.
A document's confidence is its least confident field's; below ``evaluation.review_threshold``
it goes to review.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np

_DECODER = json.JSONDecoder()
BINS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0)  # calibration table rows: where review thresholds sit


def _object_spans(answer: str, start: int) -> tuple[dict, dict[str, tuple[int, int]]] | None:
    """The JSON object at ``answer[start]`` and each top-level value's span in characters, or None."""
    values, spans, position = {}, {}, start + 1

    def skip(at: int) -> int:
        while at < len(answer) and answer[at] in " \t\r\n":
            at += 1
        return at

    position = skip(position)
    if answer.startswith("}", position):
        return values, spans
    while True:
        try:
            key, position = _DECODER.raw_decode(answer, skip(position))
            position = skip(position)
            if not (isinstance(key, str) and answer.startswith(":", position)):
                return None
            value_start = skip(position + 1)
            value, position = _DECODER.raw_decode(answer, value_start)
        except json.JSONDecodeError:
            return None
        values[key], spans[key] = value, (value_start, position)
        position = skip(position)
        if answer.startswith("}", position):
            return values, spans
        if not answer.startswith(",", position):
            return None
        position += 1


def value_spans(answer: str, predicted: dict) -> dict[str, tuple[int, int]]:
    """Where each value of ``predicted`` (the object parsed out of ``answer``) lies in ``answer``,
    in bytes of its UTF-8; the last object equal to it wins, as the parser's rule does."""
    found: dict[str, tuple[int, int]] = {}
    position = 0
    while (start := answer.find("{", position)) >= 0:
        parsed = _object_spans(answer, start)
        if parsed is not None and parsed[0] == predicted:
            found = parsed[1]
        position = start + 1
    to_bytes = [0]
    for character in answer:
        to_bytes.append(to_bytes[-1] + len(character.encode("utf-8")))
    return {key: (to_bytes[begin], to_bytes[end]) for key, (begin, end) in found.items()}


def field_confidence(
    answer: str, predicted: dict | None, fields: Sequence[str], logprobs: Sequence[tuple[int, float]]
) -> dict[str, float] | None:
    """Each field's confidence (see the module), or None without log-probabilities."""
    if not logprobs:
        return None
    spans = value_spans(answer, predicted) if predicted is not None else {}
    confidence = {}
    for name in fields:
        if name not in spans:
            confidence[name] = 0.0
            continue
        begin, end = spans[name]
        total, token_start = 0.0, 0
        for token_end, logprob in logprobs:
            if token_start < end and token_end > begin:
                total += logprob
            token_start = token_end
        confidence[name] = math.exp(total)
    return confidence


def document_confidence(confidence: dict[str, float] | None) -> float | None:
    return min(confidence.values(), default=None) if confidence is not None else None


def calibration(pairs: Sequence[tuple[float, bool]]) -> dict:
    """Accuracy against confidence over (confidence, correct) pairs of fields: one row per bin of
    ``BINS``, and the expected calibration error (the fields' mean |accuracy - confidence| by bin)."""
    rows, gap = [], 0.0
    for low, high in zip(BINS, BINS[1:], strict=False):
        inside = [(c, ok) for c, ok in pairs if low <= c < high or (high == 1.0 and c == 1.0)]
        if not inside:
            rows.append({"from": low, "to": high, "fields": 0, "mean_confidence": None, "accuracy": None})
            continue
        mean, accuracy = float(np.mean([c for c, _ in inside])), float(np.mean([ok for _, ok in inside]))
        rows.append({"from": low, "to": high, "fields": len(inside), "mean_confidence": mean, "accuracy": accuracy})
        gap += len(inside) * abs(accuracy - mean)
    return {"bins": rows, "expected_calibration_error": gap / len(pairs) if pairs else None}
