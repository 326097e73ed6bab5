"""``python -m stages.ingest``: validate newly landed labelled batches into a new dataset version.

A landing batch is read only when its ``_COMPLETE`` marker's record count and labels hash
match its ``labels.jsonl``. Every record is checked (label readable, image path inside the
batch, document type known (or ``other``: a page of none of the types, with no fields), fields valid
for the type, image decodes fully within the size
limits, EXIF orientation applied). Bad records go to ``quarantine/<source>.jsonl`` with the
reason and good ones go on; a batch whose bad share exceeds ``dataset.max_bad_fraction``
fails the stage and leaves no new image in the store. Images are stored once by content
hash; copies of one image whose labels differ only in case or whitespace are one document (the
first copy's label kept); copies with different labels (an invalid one included) are all
quarantined as a conflict. The new version holds every document so far; ingesting the same
batch again changes nothing. A store that stops answering fails the stage (exit 1) within
its timeouts; it never quarantines records. ``--eval-only`` puts every document the run adds in
the eval split: a golden evaluation set (``evaluation.eval_sets``), never trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from docpipe import tracking
from docpipe.config import DatasetConfig, PipelineConfig, S3Config
from docpipe.contract import BadInputError, main, stage_parser
from docpipe.data.dataset import (
    DatasetCard,
    DatasetRecord,
    QuarantinedRecord,
    image_key,
    latest_version,
    manifest_bytes,
    read_manifest,
    split_for,
    version_id,
    write_version,
)
from docpipe.data.images import ImageRejected, check_image
from docpipe.doctypes import OTHER, DocType, LabelError, load_registry
from docpipe.loader import load_model
from docpipe.manifest import StageOutput
from docpipe.storage import LocalStorage, Storage, StorageError, StorageUnavailable, open_storage
from stages.ingest.importers import FORMATS, Candidate, ImportMapping, SourceError, read_source

STAGE = "ingest"
CHUNK = 16  # records per worker task: fewer, larger messages between processes
STOPPED = "stopped: another worker's store call failed"
PROGRESS_EVERY_S = 30.0  # a log line this often while a batch is read, for logs that are not terminals
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--batch", action="append", required=True, help="a landed batch (folder or s3://); repeat")
    parser.add_argument("--format", choices=FORMATS, default="landing", help="how the batches are laid out")
    parser.add_argument("--mapping", type=Path, help="an ImportMapping YAML: tool labels -> document-type fields")
    parser.add_argument("--doc-type", help="document type of every record (image-key, label-studio, ppocrlabel)")
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="every new document goes to the eval split: a golden set, never trained on",
    )
    return parser


@dataclass
class Accepted:
    """A record that passed every check, waiting for de-duplication."""

    batch: str
    candidate: Candidate
    record: DatasetRecord


@dataclass
class Verdict:
    """A record's outcome: the dataset record it makes, or why it was rejected."""

    record: DatasetRecord | None = None
    rejected: tuple[str, str] | None = None  # (kind, reason)
    sha256: str | None = None  # of the image, where it could be read: a rejected label still names its copy
    created: str | None = None  # the image key this check wrote into the store
    unavailable: str | None = None  # the store did not answer: nothing is known of this record or the rest


_worker: dict = {}


def _start_worker(datasets: str, s3: S3Config, limits: DatasetConfig, doctypes_dir: Path, store_failed) -> None:
    """Once per worker process: what every record's check needs, so tasks carry only records, and
    the event by which the first worker a store fails tells the others to stop asking it."""
    _worker.update(
        output=open_storage(datasets, s3),
        s3=s3,
        limits=limits,
        batches={},
        registry=load_registry(doctypes_dir),
        store_failed=store_failed,
    )


def _check_records(batch: str, candidates: list[Candidate]) -> list[Verdict]:
    """The chunk's verdicts; a store that does not answer ends the chunk with an ``unavailable`` verdict,
    so the images its earlier records stored are still known."""
    verdicts = []
    for candidate in candidates:
        if _worker["store_failed"].is_set():
            verdicts.append(Verdict(unavailable=STOPPED))
            break
        try:
            verdicts.append(_check_record(batch, candidate))
        except StorageUnavailable as exc:
            _worker["store_failed"].set()
            verdicts.append(Verdict(unavailable=str(exc)))
            break
    return verdicts


def _check_record(batch: str, candidate: Candidate) -> Verdict:
    """In a worker process: read the image, validate the label, then check and store the image by
    content hash. A rejected label keeps its image's hash, so conflicts between copies are seen.

    Images are written without fsync; the run syncs once before a version refers to them.
    StorageUnavailable propagates: an unanswering store says nothing about the record.
    """
    registry: dict[str, DocType] = _worker["registry"]
    limits: DatasetConfig = _worker["limits"]
    if candidate.problem:
        return Verdict(rejected=("unreadable", candidate.problem))
    if not candidate.image:
        return Verdict(rejected=("image_path", "no image path"))
    if batch not in _worker["batches"]:
        _worker["batches"][batch] = open_storage(batch, _worker["s3"])
    try:
        data = _worker["batches"][batch].read_bytes(candidate.image)
    except StorageUnavailable:
        raise
    except StorageError as exc:
        return Verdict(rejected=("image_path", str(exc)))
    if candidate.doc_type not in registry and candidate.doc_type != OTHER:
        reason = f"unknown document type {candidate.doc_type!r}; known: {sorted(registry)}, and {OTHER!r} for none"
        return Verdict(rejected=("doc_type", reason), sha256=hashlib.sha256(data).hexdigest())
    try:
        fields = _canonical_fields(candidate, registry)
    except LabelError as exc:
        return Verdict(rejected=("fields", str(exc)), sha256=hashlib.sha256(data).hexdigest())
    try:
        checked = check_image(data, limits)
    except ImageRejected as exc:
        return Verdict(rejected=("image", str(exc)))
    stored, created = image_key(checked.sha256, checked.extension), None
    if not _worker["output"].exists(stored):
        _worker["output"].write_bytes(stored, checked.upright or data, durable=False)
        created = stored
    return Verdict(
        DatasetRecord(
            id=checked.sha256,
            image=stored,
            doc_type=candidate.doc_type,
            fields=fields,
            split=split_for(checked.sha256, limits.split_salt, limits.eval_fraction),
            source=f"{batch}/{candidate.image}",
            width=checked.width,
            height=checked.height,
        ),
        sha256=checked.sha256,
        created=created,
    )


def _canonical_fields(candidate: Candidate, registry: dict[str, DocType]) -> dict[str, str | None]:
    """The label's fields, canonical for its type; a page labelled ``other`` (none of the registered
    types) has none. LabelError says what is wrong."""
    if candidate.doc_type != OTHER:
        return registry[candidate.doc_type].canonical_fields(candidate.fields or {})
    if candidate.fields:
        got = sorted(candidate.fields)
        raise LabelError(OTHER, [f"a page of none of the registered types has no fields, got {got}"])
    return {}


def _label(record: DatasetRecord) -> tuple:
    """What two copies of an image must share to be one document: the type, and each value with
    case and whitespace ignored (``SDN BHD`` and ``SDN  bhd`` are one label, the first copy's kept)."""
    same = {name: "".join(value.casefold().split()) if value else value for name, value in record.fields.items()}
    return record.doc_type, frozenset(same.items())


class Ingest:
    """One run: reads batches, sorts records into accepted and quarantined, writes a version."""

    def __init__(self, config: PipelineConfig, output: Storage, pool: ProcessPoolExecutor, workers: int):
        self.config = config
        self.output = output
        self.pool = pool
        self.workers = workers
        self.accepted: list[Accepted] = []
        self.quarantine: dict[str, list[QuarantinedRecord]] = defaultdict(list)
        self.seen: Counter[str] = Counter()
        self.invalid_copies: dict[str, list[str]] = defaultdict(list)  # image hash -> sources with a bad label
        self.created: set[str] = set()  # image keys this run wrote: removed again unless a version refers to them
        self.unavailable: str | None = None  # the first store failure a worker met

    def reject(self, batch: str, candidate: Candidate, kind: str, reason: str) -> None:
        self.quarantine[batch].append(
            QuarantinedRecord(source=candidate.source, reason=f"{kind}: {reason}", record=candidate.raw)
        )

    def read_batch(self, store: Storage, candidates: Iterator[Candidate]) -> None:
        """Check every record of one batch in the worker processes, a chunk of records per task
        and a bounded number of chunks in flight. After a store failure nothing more is sent;
        chunks not started are cancelled, running ones collected; then StorageUnavailable."""
        in_flight: deque[tuple[list[Candidate], Future]] = deque()
        records = iter(tqdm(candidates, desc=store.uri, unit="doc", disable=None))
        reported = time.monotonic()
        while chunk := list(itertools.islice(records, CHUNK)):
            self.seen[store.uri] += len(chunk)
            in_flight.append((chunk, self.pool.submit(_check_records, store.uri, chunk)))
            if len(in_flight) > 2 * self.workers:
                self.collect(store.uri, *in_flight.popleft())
            if self.unavailable:
                break
            if time.monotonic() - reported > PROGRESS_EVERY_S:
                reported = time.monotonic()
                log.info("%s: %d records read, %d accepted so far", store.uri, self.seen[store.uri], len(self.accepted))
        if self.unavailable:
            for _, job in in_flight:
                job.cancel()
        while in_flight:
            self.collect(store.uri, *in_flight.popleft())
        if self.unavailable:
            raise StorageUnavailable(self.unavailable)

    def collect(self, batch: str, chunk: list[Candidate], job: Future) -> None:
        if job.cancelled():
            return
        for candidate, verdict in zip(chunk, job.result(), strict=False):  # a chunk ends at a store failure
            if verdict.created:
                self.created.add(verdict.created)
            if verdict.unavailable:
                if self.unavailable in (None, STOPPED):  # the failure itself, not a worker that stopped for it
                    self.unavailable = verdict.unavailable
            elif verdict.rejected:
                self.reject(batch, candidate, *verdict.rejected)
                if verdict.sha256:
                    self.invalid_copies[verdict.sha256].append(candidate.source)
            else:
                self.accepted.append(Accepted(batch, candidate, verdict.record))

    def merge(self, existing: list[DatasetRecord]) -> tuple[list[DatasetRecord], int]:
        """Existing records plus the new ones; an image whose copies carry different labels (an
        invalid one included) is quarantined, every new copy of it."""
        records = {r.id: r for r in existing}
        by_id: dict[str, list[Accepted]] = defaultdict(list)
        for item in self.accepted:
            by_id[item.record.id].append(item)
        added = 0
        for document_id, items in by_id.items():
            known = records.get(document_id)
            labels = {_label(r) for r in [*(i.record for i in items), *([known] if known else [])]}
            invalid = self.invalid_copies.get(document_id, [])
            if len(labels) > 1 or invalid:
                sources = {i.candidate.source for i in items} | ({known.source} if known else set()) | set(invalid)
                others = ", ".join(sorted(sources))
                for item in items:
                    if not known or _label(item.record) != _label(known) or invalid:
                        self.reject(
                            item.batch,
                            item.candidate,
                            "conflict",
                            f"image {document_id[:12]} has conflicting labels in {others}",
                        )
            elif not known:
                records[document_id] = items[0].record
                added += 1
        return list(records.values()), added

    def discard_created(self, keep: set[str]) -> None:
        """Remove the images this run wrote that no version refers to (a refused batch, conflicts)."""
        for key in sorted(self.created - keep):
            self.output.delete(key)

    def write_quarantine(self) -> None:
        for batch, bad in self.quarantine.items():
            key = f"quarantine/{hashlib.sha256(batch.encode()).hexdigest()[:16]}.jsonl"
            lines = [json.dumps({"batch": batch, **q.model_dump()}, ensure_ascii=False, default=str) for q in bad]
            self.output.write_bytes(key, ("\n".join(lines) + "\n").encode("utf-8"))
            log.warning("%d record(s) of %s quarantined: %s", len(bad), batch, self.output.uri_of(key))

    def failures(self) -> list[str]:
        limit = self.config.dataset.max_bad_fraction
        failed = []
        for batch, seen in self.seen.items():
            bad = len(self.quarantine.get(batch, []))
            if bad / seen > limit:
                reasons = Counter(q.reason.split(":")[0] for q in self.quarantine[batch])
                failed.append(f"{batch}: {bad} of {seen} records bad ({bad / seen:.0%} > {limit:.0%}; {dict(reasons)})")
        return failed


def _card(
    records: list[DatasetRecord],
    version: str,
    parent: str | None,
    added: int,
    run: Ingest,
    batches: list[str],
    eval_only: bool,
) -> DatasetCard:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"train": 0, "eval": 0})
    for record in records:
        counts[record.doc_type][record.split] += 1
    warnings = [
        f"{doc_type} has {c['train']} train and no eval document; its accuracy cannot be measured yet"
        for doc_type, c in sorted(counts.items())
        if c["eval"] == 0 and not eval_only
    ]
    quarantined = Counter(q.reason.split(":")[0] for bad in run.quarantine.values() for q in bad)
    settings = run.config.dataset
    return DatasetCard(
        version=version,
        parent=parent,
        created_at=datetime.now(UTC),
        documents=len(records),
        added=added,
        counts=dict(counts),
        sources=batches,
        quarantined=dict(quarantined),
        warnings=warnings,
        split={"salt": settings.split_salt, "eval_fraction": settings.eval_fraction, "eval_only": eval_only},
    )


def import_mapping(args: argparse.Namespace) -> ImportMapping:
    """How another tool's labels map onto a document type (``--mapping``, ``--doc-type``)."""
    mapping = load_model(ImportMapping, [args.mapping]) if args.mapping else ImportMapping()
    if args.doc_type:
        mapping = mapping.model_copy(update={"doc_type": args.doc_type})
    if args.format != "landing" and not (mapping.doc_type or mapping.doc_type_choices):
        raise BadInputError(f"--format {args.format}: give --doc-type or a --mapping with doc_type")
    return mapping


def read_batches(args: argparse.Namespace, config: PipelineConfig, output: Storage, mapping: ImportMapping) -> Ingest:
    """Every record of every batch checked by a pool of workers, their images stored as they pass.
    Bad input, or a store that stops answering, leaves none of this run's images behind."""
    workers = config.dataset.workers or os.cpu_count() or 1
    context = multiprocessing.get_context()
    settings = (output.uri, config.storage.s3, config.dataset, config.doctypes_dir, context.Event())
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker, initargs=settings)
    ingest = Ingest(config, output, pool, workers)
    try:
        try:
            for uri in args.batch:
                store = open_storage(uri, config.storage.s3)
                ingest.read_batch(store, read_source(store, args.format, mapping))
        finally:  # after a failure, chunks still queued are dropped: each would meet the same fault
            pool.shutdown(wait=True, cancel_futures=True)
    except SourceError as exc:
        ingest.discard_created(keep=set())
        raise BadInputError(str(exc)) from exc
    except StorageUnavailable:
        if isinstance(output, LocalStorage):  # a store that did not answer is not asked again
            ingest.discard_created(keep=set())
        raise
    return ingest


def kept_records(ingest: Ingest, existing: list[DatasetRecord], eval_only: bool) -> tuple[list[DatasetRecord], int]:
    """The version's records (the previous ones and this run's) and how many were added, with the
    quarantine written; too many bad records fails the run with nothing written."""
    records, added = ingest.merge(existing)
    if eval_only:  # documents this run added; known ones keep their split
        known = {r.id for r in existing}
        records = [r if r.id in known else r.model_copy(update={"split": "eval"}) for r in records]
    ingest.write_quarantine()
    if failed := ingest.failures():
        ingest.discard_created(keep=set())
        raise BadInputError("too many bad records, no version written: " + "; ".join(failed))
    ingest.discard_created(keep={r.image for r in records})
    return records, added


def run(args: argparse.Namespace, config: PipelineConfig, output: Storage) -> StageOutput:
    mapping = import_mapping(args)
    parent = latest_version(output)
    existing = read_manifest(output, parent) if parent else []
    ingest = read_batches(args, config, output, mapping)
    records, added = kept_records(ingest, existing, args.eval_only)

    manifest = manifest_bytes(records)
    version = version_id(manifest)
    changed = version != parent
    if changed:
        output.sync()  # the images, written by the workers without fsync, are durable before the manifest
        card = _card(records, version, parent, added, ingest, list(args.batch), args.eval_only)
        write_version(output, manifest, card)
        for warning in card.warnings:
            log.warning(warning)
    state = "new" if changed else "unchanged"
    log.info("dataset version %s (%s): %d documents, %d added", version, state, len(records), added)
    tracking.log_dataset(output.uri, version, context="ingest")
    splits = Counter(r.split for r in records)
    return StageOutput(
        inputs={f"batch.{i}": uri for i, uri in enumerate(args.batch)},
        outputs={
            "datasets": output.uri,
            "version": version,
            "manifest": output.uri_of(f"versions/{version}/manifest.jsonl"),
        },
        counts={
            "seen": sum(ingest.seen.values()),
            "accepted": len(ingest.accepted),
            "quarantined": sum(len(bad) for bad in ingest.quarantine.values()),
            "added": added,
            "documents": len(records),
            "train": splits["train"],
            "eval": splits["eval"],
            "new_version": int(changed),
        },
    )


if __name__ == "__main__":
    sys.exit(main(STAGE, build_parser(), run))
