"""Scoring predictions as practitioners report them, per document type and overall.

- field accuracy: fields exactly right after the type's normalisation / all fields;
- document accuracy: documents with every field right / documents;
- JSON validity: answers whose JSON object validates against the type's answer schema / answers
  (``{}`` or an object of the wrong shape is not valid; an answer with no object counts every
  field wrong);
- per-field accuracy and character error rate (a diagnostic: how far off a wrong value is);
- latency p50/p95 per document and throughput;
- where the backend gives log-probabilities, each field's confidence, a calibration table
  (accuracy against confidence) and what ``evaluation.review_threshold`` would send to review
  (``confidence.py``);
- Donut's field-level F1 and tree-edit-distance accuracy, so figures compare with the
  literature (CORD, SROIE).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from rapidfuzz.distance import Levenshtein
from zss import Node, simple_distance

from docpipe.answering.backends import Backend, Request
from docpipe.answering.confidence import calibration, document_confidence, field_confidence
from docpipe.answering.parsing import extract_json, fits
from docpipe.doctypes import DocType

HEADLINE = ("field_accuracy", "document_accuracy", "json_validity")  # what gates, selection and reports show


@dataclass
class Scored:
    """One document's prediction against its label."""

    id: str
    doc_type: str
    expected: dict[str, str | None]
    predicted: dict | None  # None: the answer held no JSON object
    answer: str
    latency_s: float
    correct: dict[str, bool] = field(default_factory=dict)
    cer: dict[str, float] = field(default_factory=dict)
    valid: bool = False  # the object validates against the type's answer schema
    confidence: dict[str, float] | None = None  # per field, where the backend gave log-probabilities

    @property
    def all_correct(self) -> bool:
        return all(self.correct.values())

    def needs_review(self, threshold: float) -> bool | None:
        """Whether its least confident field is below ``threshold`` (None: no confidence to tell)."""
        least = document_confidence(self.confidence)
        return None if least is None else least < threshold


def score(
    doc_type: DocType, document_id: str, expected: dict, predicted: dict | None, answer: str, latency_s: float
) -> Scored:
    """Compare every field of the type by its comparison key (normalised, variants folded, money as numbers)."""
    scored = Scored(document_id, doc_type.id, expected, predicted, answer, latency_s, valid=fits(predicted, doc_type))
    for spec in doc_type.fields:
        want = doc_type.compare_key(spec.name, expected.get(spec.name))
        got = doc_type.compare_key(spec.name, _text(predicted.get(spec.name))) if predicted is not None else None
        scored.correct[spec.name] = got == want
        scored.cer[spec.name] = 1.0 if got is None else Levenshtein.distance(got, want) / max(1, len(want))
    return scored


def _text(value) -> str | None:
    return None if value is None else str(value)


def _tree(fields: dict[str, str]) -> Node:
    """Donut's tree of a flat answer: a root, one node per key, the value below it."""
    root = Node("<root>")
    for key in sorted(fields):
        root.addkid(Node(f"<{key}>").addkid(Node(fields[key])))
    return root


def _pairs(doc_type: DocType, fields: dict | None) -> dict[str, str]:
    if not fields:
        return {}
    return {
        name: doc_type.compare_key(name, _text(value))
        for name, value in fields.items()
        if value is not None and name in {f.name for f in doc_type.fields}
    }


def donut_scores(doc_type: DocType, documents: list[Scored]) -> tuple[float, float]:
    """Donut's field-level F1 (normalised values) and its TED accuracy, 1 - TED(pred, gt)/TED(∅, gt)."""
    true_positives = false_negatives = false_positives = 0
    accuracies = []
    for document in documents:
        expected, predicted = _pairs(doc_type, document.expected), _pairs(doc_type, document.predicted)
        matched = {k for k in expected if predicted.get(k) == expected[k]}
        true_positives += len(matched)
        false_negatives += len(expected) - len(matched)
        false_positives += len(predicted) - len(matched)
        truth = _tree(expected)
        empty = simple_distance(Node("<root>"), truth)
        accuracies.append(max(0.0, 1 - simple_distance(_tree(predicted), truth) / empty) if empty else 1.0)
    denominator = true_positives + (false_negatives + false_positives) / 2
    return (true_positives / denominator if denominator else 1.0), float(np.mean(accuracies)) if accuracies else 0.0


def _pooled(documents: list[Scored]) -> dict:
    """The headline figures of any set of documents, every field of every document counted once."""
    fields = sum(len(d.correct) for d in documents)
    latencies = [d.latency_s for d in documents] or [0.0]
    return {
        "documents": len(documents),
        "field_accuracy": sum(sum(d.correct.values()) for d in documents) / fields if fields else 0.0,
        "document_accuracy": float(np.mean([d.all_correct for d in documents])) if documents else 0.0,
        "json_validity": float(np.mean([d.valid for d in documents])) if documents else 0.0,
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p95_s": float(np.percentile(latencies, 95)),
    }


def summarize(documents: list[Scored], doc_type: DocType) -> dict:
    """Metrics of one document type's documents."""
    names = [spec.name for spec in doc_type.fields]
    f1, ted = donut_scores(doc_type, documents)
    return {
        **_pooled(documents),
        "per_field_accuracy": {n: float(np.mean([d.correct[n] for d in documents])) for n in names},
        "per_field_cer": {n: float(np.mean([d.cer[n] for d in documents])) for n in names},
        "donut_field_f1": f1,
        "donut_ted_accuracy": ted,
    }


def review(documents: list[Scored], threshold: float) -> dict | None:
    """Confidence against accuracy: the calibration table over every field, and at ``threshold``
    the share of documents sent to review and how accurate the ones accepted without it are.
    None where no document has a confidence."""
    rated = [d for d in documents if d.confidence is not None]
    if not rated:
        return None
    accepted = [d for d in rated if not d.needs_review(threshold)]
    return {
        "calibration": calibration([(d.confidence[n], ok) for d in rated for n, ok in d.correct.items()]),
        "review_threshold": threshold,
        "review_rate": 1 - len(accepted) / len(rated),
        "accepted": _pooled(accepted) if accepted else None,
    }


def evaluate_all(
    documents: list[Scored], registry: dict[str, DocType], duration_s: float, review_threshold: float = 0.9
) -> dict:
    """``{"overall": {...}, "per_doc_type": {type: {...}}, "confidence": {...} or None}``; Donut's
    scores overall are the per-type ones weighted by documents."""
    by_type: dict[str, list[Scored]] = defaultdict(list)
    for document in documents:
        by_type[document.doc_type].append(document)
    per_type = {name: summarize(docs, registry[name]) for name, docs in sorted(by_type.items())}
    total = len(documents) or 1
    overall = {
        **_pooled(documents),
        "docs_per_s": len(documents) / duration_s if duration_s else 0.0,
        **{
            key: sum(m[key] * m["documents"] for m in per_type.values()) / total
            for key in ("donut_field_f1", "donut_ted_accuracy")
        },
    }
    return {"overall": overall, "per_doc_type": per_type, "confidence": review(documents, review_threshold)}


def measure(
    backend: Backend, requests: list[Request], registry: dict[str, DocType], review_threshold: float = 0.9
) -> tuple[list[Scored], dict]:
    """Answer ``requests`` through ``backend`` and score every answer: the documents and their metrics."""
    started = time.perf_counter()
    responses = backend.predict(requests)
    duration = time.perf_counter() - started
    documents = []
    for request, response in zip(requests, responses, strict=True):
        predicted = extract_json(response.answer, request.doc_type)
        document = score(
            request.doc_type,
            request.example.id,
            json.loads(request.example.answer),
            predicted,
            response.answer,
            response.latency_s,
        )
        document.confidence = field_confidence(
            response.answer, predicted, [f.name for f in request.doc_type.fields], response.logprobs
        )
        documents.append(document)
    return documents, evaluate_all(documents, registry, duration, review_threshold)
