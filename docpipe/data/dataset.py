"""Immutable, cumulative dataset versions.

Layout under the datasets location::

    images/<sha256>.<ext>               every document's image, stored once by content hash
    versions/<id>/manifest.jsonl        one DatasetRecord per line, sorted by id
    versions/<id>/card.json             counts per type and split, quarantine summary, warnings
    quarantine/<source key>.jsonl       bad records of each source, with the reason
    LATEST                              the newest version's id

A version's id is the hash of its manifest, so equal content means an equal id, and a
document's split is a pure function of its content hash and the salt, so an eval
document can never move into train in a later version.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from docpipe.storage import Storage

LATEST = "LATEST"
Split = Literal["train", "eval"]


def image_key(sha256: str, extension: str) -> str:
    """Where the image with this content hash is stored, relative to the datasets location."""
    return f"images/{sha256}.{extension}"


class DatasetRecord(BaseModel):
    """One document of a dataset version."""

    id: str  # sha256 of the image as it arrived
    image: str  # relative to the datasets location
    doc_type: str
    fields: dict[str, str | None]  # canonical values, in the type's order
    split: Split
    source: str  # where the image came from, first seen
    width: int
    height: int


class QuarantinedRecord(BaseModel):
    """A record that did not go on, why, and where it came from; nothing else is lost."""

    source: str
    reason: str
    record: Any = None


class DatasetCard(BaseModel):
    version: str
    parent: str | None
    created_at: datetime
    documents: int
    added: int
    counts: dict[str, dict[str, int]]  # doc type -> split -> documents
    sources: list[str]  # the batches this ingest read
    quarantined: dict[str, int]  # reason kind -> records, for this ingest
    warnings: list[str]
    split: dict[str, Any]


def split_for(document_id: str, salt: str, eval_fraction: float) -> Split:
    """Train or eval, decided by the document's hash alone."""
    draw = int(hashlib.sha256(f"{salt}:{document_id}".encode()).hexdigest()[:12], 16) / 16**12
    return "eval" if draw < eval_fraction else "train"


def manifest_bytes(records: list[DatasetRecord]) -> bytes:
    ordered = sorted(records, key=lambda r: r.id)
    lines = [json.dumps(r.model_dump(), ensure_ascii=False, sort_keys=True) for r in ordered]
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def version_id(manifest: bytes) -> str:
    return hashlib.sha256(manifest).hexdigest()[:16]


def latest_version(store: Storage) -> str | None:
    return store.read_bytes(LATEST).decode().strip() if store.exists(LATEST) else None


def read_manifest(store: Storage, version: str) -> list[DatasetRecord]:
    data = store.read_bytes(f"versions/{version}/manifest.jsonl").decode("utf-8")
    return [DatasetRecord.model_validate_json(line) for line in data.splitlines() if line.strip()]


def read_card(store: Storage, version: str) -> DatasetCard:
    return DatasetCard.model_validate_json(store.read_bytes(f"versions/{version}/card.json"))


def write_version(store: Storage, manifest: bytes, card: DatasetCard) -> None:
    """Manifest, then card, then the LATEST pointer: readers never see half a version."""
    store.write_bytes(f"versions/{card.version}/manifest.jsonl", manifest)
    store.write_bytes(f"versions/{card.version}/card.json", card.model_dump_json(indent=2).encode("utf-8"))
    store.write_bytes(LATEST, card.version.encode())
