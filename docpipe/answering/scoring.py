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
  literature (CORD, SROIE);
- routed documents (asked without their type, ``docpipe.routing``): type accuracy, per labelled
  type and overall, and the confusion between labelled and answered types (the run's types,
  ``other``, and ``invalid`` for an answer naming no registered type); a document routed to the
  wrong type counts every field wrong. Pages labelled ``other`` have no fields: they count in the
  overall document accuracy and JSON validity and in the routing figures, not in ``per_doc_type``.
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
from docpipe.doctypes import OTHER, TYPE_KEY, DocType
from docpipe.routing import Routing, answered_type

HEADLINE = ("field_accuracy", "document_accuracy", "json_validity")  # what gates, selection and reports show
INVALID_TYPE = "invalid"  # the confusion table's column for a routed answer that names no registered type


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
    valid: bool = False  # the object validates against the schema of what was asked
    confidence: dict[str, float] | None = None  # per field (and doc_type, routed), where log-probabilities came
    routed: bool = False  # asked without its type: the answer names one
    answered_type: str | None = None  # routed: the type the answer names (None: no answer, or no type in it)

    @property
    def type_correct(self) -> bool:
        """Routed: whether the answer names the labelled type; given the type, always."""
        return not self.routed or self.answered_type == self.doc_type

    @property
    def fields_read(self) -> dict | None:
        """The answer's fields where they answer the labelled type (a wrongly routed answer reads none)."""
        return self.predicted if self.type_correct else None

    @property
    def all_correct(self) -> bool:
        return self.type_correct and all(self.correct.values())

    def needs_review(self, threshold: float) -> bool | None:
        """Whether its least confident field is below ``threshold`` (None: no confidence to tell)."""
        least = document_confidence(self.confidence)
        return None if least is None else least < threshold


def score(
    doc_type: DocType | None,
    document_id: str,
    expected: dict,
    predicted: dict | None,
    answer: str,
    latency_s: float,
    routing: Routing | None = None,
) -> Scored:
    """Compare every field of the labelled type (None: a page of none of the types) by its comparison
    key (normalised, variants folded, money as numbers); routed, first the type the answer names."""
    asked = routing or doc_type
    label = doc_type.id if doc_type else OTHER
    scored = Scored(document_id, label, expected, predicted, answer, latency_s, valid=fits(predicted, asked))
    if routing is not None:
        scored.routed, scored.answered_type = True, answered_type(predicted)
    read = scored.fields_read
    for spec in doc_type.fields if doc_type else []:
        want = doc_type.compare_key(spec.name, expected.get(spec.name))
        got = doc_type.compare_key(spec.name, _text(read.get(spec.name))) if read is not None else None
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
        expected, predicted = _pairs(doc_type, document.expected), _pairs(doc_type, document.fields_read)
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


def routing_metrics(documents: list[Scored], registry: dict[str, DocType]) -> dict | None:
    """Type accuracy of the routed documents, overall and per labelled type, the confusion between
    labelled (rows) and answered types (columns: the labelled ones, any other registered type answered,
    ``other``, and ``invalid`` for an answer that names no registered type), and how well the type's
    confidence tells right from wrong. None where no document was routed."""
    routed = [d for d in documents if d.routed]
    if not routed:
        return None
    rows = sorted({d.doc_type for d in routed} - {OTHER}) + (
        [OTHER] if any(d.doc_type == OTHER for d in routed) else []
    )
    named = {d.answered_type for d in routed if d.answered_type in registry}
    columns = [*rows, *sorted(named - set(rows)), *([] if OTHER in rows else [OTHER]), INVALID_TYPE]
    confusion = {label: dict.fromkeys(columns, 0) for label in rows}
    for document in routed:
        answered = document.answered_type if document.answered_type in columns else INVALID_TYPE
        confusion[document.doc_type][answered] += 1
    rated = [(d.confidence[TYPE_KEY], d.type_correct) for d in routed if d.confidence and TYPE_KEY in d.confidence]
    return {
        "documents": len(routed),
        "type_accuracy": float(np.mean([d.type_correct for d in routed])),
        "per_label": {
            label: {"documents": sum(row.values()), "type_accuracy": row[label] / sum(row.values())}
            for label, row in confusion.items()
        },
        "confusion": confusion,
        "type_calibration": calibration(rated) if rated else None,
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
    """``{"overall": {...}, "per_doc_type": {type: {...}}, "confidence": {...} or None, "routing":
    {...} or None}``; Donut's scores overall are the per-type ones weighted by documents; a routed
    set's type accuracy is also in ``overall`` and in each type's figures."""
    by_type: dict[str, list[Scored]] = defaultdict(list)
    for document in documents:
        if document.doc_type != OTHER:
            by_type[document.doc_type].append(document)
    per_type = {name: summarize(docs, registry[name]) for name, docs in sorted(by_type.items())}
    typed = sum(m["documents"] for m in per_type.values()) or 1
    overall = {
        **_pooled(documents),
        "docs_per_s": len(documents) / duration_s if duration_s else 0.0,
        **{
            key: sum(m[key] * m["documents"] for m in per_type.values()) / typed
            for key in ("donut_field_f1", "donut_ted_accuracy")
        },
    }
    routing = routing_metrics(documents, registry)
    if routing:
        overall["type_accuracy"] = routing["type_accuracy"]
        for name, values in per_type.items():
            values["type_accuracy"] = routing["per_label"][name]["type_accuracy"]
    return {
        "overall": overall,
        "per_doc_type": per_type,
        "confidence": review(documents, review_threshold),
        "routing": routing,
    }


def measure(
    backend: Backend, requests: list[Request], registry: dict[str, DocType], review_threshold: float = 0.9
) -> tuple[list[Scored], dict]:
    """Answer ``requests`` through ``backend`` and score every answer: the documents and their metrics."""
    started = time.perf_counter()
    responses = backend.predict(requests)
    duration = time.perf_counter() - started
    documents = []
    for request, response in zip(requests, responses, strict=True):
        predicted = extract_json(response.answer, request.asked)
        document = score(
            request.doc_type,
            request.example.id,
            json.loads(request.example.answer),
            predicted,
            response.answer,
            response.latency_s,
            request.routing,
        )
        names = [TYPE_KEY] if request.routing else []
        names += [f.name for f in request.doc_type.fields] if request.doc_type else []
        document.confidence = field_confidence(response.answer, predicted, names, response.logprobs)
        documents.append(document)
    return documents, evaluate_all(documents, registry, duration, review_threshold)
