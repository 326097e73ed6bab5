"""The landing format: how a labelled batch arrives.

A batch is a folder (local path or ``s3://bucket/prefix``) holding images, a
``labels.jsonl`` with one ``{"image", "doc_type", "fields"}`` object per line, and a
completion marker ``_COMPLETE`` written last. Until the marker exists the batch is
still being written and nothing may read it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from docpipe.storage import Storage, StorageError

LABELS_FILE = "labels.jsonl"
COMPLETE_MARKER = "_COMPLETE"


class LabelRecord(BaseModel):
    """One labelled document: an image path relative to the batch and its field values."""

    model_config = ConfigDict(extra="forbid")

    image: str
    doc_type: str
    fields: dict[str, Any]


class BatchMarker(BaseModel):
    """Content of the completion marker: what the batch holds and who wrote it."""

    records: int
    labels_sha256: str
    created_at: datetime
    producer: str


def marker_for(labels: bytes, producer: str) -> BatchMarker:
    """The marker that vouches for this labels file: its record count and hash."""
    records = sum(1 for line in labels.split(b"\n") if line.strip())
    return BatchMarker(
        records=records,
        labels_sha256=hashlib.sha256(labels).hexdigest(),
        created_at=datetime.now(UTC),
        producer=producer,
    )


def write_batch(store: Storage, documents: Iterable[tuple[LabelRecord, bytes]], producer: str) -> BatchMarker:
    """Write images, then ``labels.jsonl``, then the marker. A completed batch is never overwritten."""
    if store.exists(COMPLETE_MARKER):
        raise StorageError(f"{store.uri_of(COMPLETE_MARKER)}: batch is already complete; batches are immutable")
    lines = []
    for record, image_bytes in documents:
        store.write_bytes(record.image, image_bytes)
        lines.append(json.dumps(record.model_dump(), ensure_ascii=False))
    labels = ("\n".join(lines) + "\n").encode("utf-8")
    store.write_bytes(LABELS_FILE, labels)
    marker = marker_for(labels, producer)
    store.write_bytes(COMPLETE_MARKER, marker.model_dump_json(indent=2).encode("utf-8"))
    return marker


def read_marker(store: Storage) -> BatchMarker | None:
    """The batch's marker, or None while the batch is incomplete."""
    if not store.exists(COMPLETE_MARKER):
        return None
    return BatchMarker.model_validate_json(store.read_bytes(COMPLETE_MARKER))


def marker_mismatch(marker: BatchMarker, labels: bytes) -> str | None:
    """Why ``labels`` is not the labels file the marker was written for, or None when it is."""
    found = marker_for(labels, marker.producer)
    if (found.records, found.labels_sha256) != (marker.records, marker.labels_sha256):
        records, digest = found.records, found.labels_sha256
        return (
            f"{LABELS_FILE} holds {records} records with sha256 {digest[:12]}, but {COMPLETE_MARKER} was written "
            f"for {marker.records} records with sha256 {marker.labels_sha256[:12]}: the batch changed after it was "
            "completed"
        )
    return None
