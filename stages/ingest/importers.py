"""Readers for the ways labelled documents arrive, each yielding ``Candidate`` records.

- ``landing``: our landing format (``labels.jsonl`` + ``_COMPLETE``).
- ``image-key``: an image folder plus same-named key JSON files (SROIE: ``img/`` and ``key/``).
- ``label-studio``: a Label Studio JSON export of an OCR project (regions with a label and
  a per-region transcription).
- ``ppocrlabel``: PaddleOCR PPOCRLabel's KIE ``Label.txt``
  (``path<TAB>[{"transcription", "points", "key_cls"}, ...]``), the batch being the folder
  that holds ``Label.txt`` and the image folder its paths start with.

Tool labels become document-type fields through a small mapping file (``ImportMapping``).
A record that cannot be read becomes a Candidate with a ``problem``: nothing is dropped.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal
from urllib.parse import parse_qs, urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from docpipe.data.landing import COMPLETE_MARKER, LABELS_FILE, LabelRecord, marker_mismatch, read_marker
from docpipe.storage import Storage

Format = Literal["landing", "image-key", "label-studio", "ppocrlabel"]
FORMATS: tuple[str, ...] = Format.__args__


class SourceError(ValueError):
    """A whole source cannot be read (missing labels file, incomplete batch)."""


class ImportMapping(BaseModel):
    """How a tool's labels map onto a document type (``configs/importers/*.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    doc_type: str | None = Field(None, description="the document type of every record")
    doc_type_choices: dict[str, str] = Field({}, description="label-studio: a Choices value -> document type")
    fields: dict[str, str] = Field({}, description="tool label -> field name; unmapped labels are ignored")
    labels_file: str | None = Field(None, description="default: Label.txt (ppocrlabel), export.json (label-studio)")
    data_key: str = Field("image", description="label-studio: the task data key holding the image ($ocr: ocr)")
    image_prefix: str = Field("", description="label-studio: prefix of the image reference to strip")
    image_dir: str = Field("img", description="image-key: the image folder")
    key_dir: str = Field("key", description="image-key: the folder of same-named JSON labels")

    def field_for(self, label: str) -> str | None:
        return self.fields.get(label, None if self.fields else label)


@dataclass
class Candidate:
    """A record as read from its source, before validation."""

    source: str
    image: str | None = None
    doc_type: str | None = None
    fields: dict[str, Any] | None = None
    raw: Any = None
    problem: str | None = None


def read_source(store: Storage, fmt: Format, mapping: ImportMapping) -> Iterator[Candidate]:
    readers = {"landing": _landing, "image-key": _image_key, "label-studio": _label_studio, "ppocrlabel": _ppocr}
    return readers[fmt](store, mapping)


def _lines(store: Storage, name: str, data: bytes | None = None) -> Iterator[tuple[str, str | None, str]]:
    """(source, text or None, problem) for each non-empty line of a UTF-8 text file (``data``: its bytes, read)."""
    if data is None:
        if not store.exists(name):
            raise SourceError(f"{store.uri_of(name)}: labels file not found")
        data = store.read_bytes(name)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        source = f"{store.uri_of(name)}:{number}"
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            yield source, None, f"not UTF-8: {exc}"
            continue
        if text:
            yield source, text, ""


def _landing(store: Storage, mapping: ImportMapping) -> Iterator[Candidate]:
    """The batch's records, once its marker vouches for its labels file (record count and hash)."""
    try:
        marker = read_marker(store)
    except ValidationError as exc:
        raise SourceError(f"{store.uri_of(COMPLETE_MARKER)}: not a batch marker: {_first_error(exc)}") from exc
    if marker is None:
        raise SourceError(f"{store.uri}: no {COMPLETE_MARKER} marker, the batch is still being written")
    if not store.exists(LABELS_FILE):
        raise SourceError(f"{store.uri_of(LABELS_FILE)}: labels file not found")
    labels = store.read_bytes(LABELS_FILE)
    if problem := marker_mismatch(marker, labels):
        raise SourceError(f"{store.uri}: refused: {problem}")
    for source, text, problem in _lines(store, LABELS_FILE, labels):
        if text is None:
            yield Candidate(source, problem=problem)
            continue
        try:
            record = LabelRecord.model_validate_json(text)
        except ValidationError as exc:
            yield Candidate(source, raw=text, problem=f"not a label record: {_first_error(exc)}")
            continue
        yield Candidate(source, record.image, record.doc_type, record.fields, raw=json.loads(text))


def _image_key(store: Storage, mapping: ImportMapping) -> Iterator[Candidate]:
    keys = {PurePosixPath(k).stem: k for k in store.list(mapping.key_dir) if k.endswith(".json")}
    images = {PurePosixPath(k).stem: k for k in store.list(mapping.image_dir) if not k.endswith(".json")}
    if not keys and not images:
        raise SourceError(f"{store.uri}: no {mapping.image_dir}/ or {mapping.key_dir}/ folder")
    for stem in sorted(keys.keys() | images.keys()):
        source = store.uri_of(keys.get(stem) or images[stem])
        if stem not in keys:
            yield Candidate(source, image=images[stem], problem=f"no label {mapping.key_dir}/{stem}.json")
        elif stem not in images:
            yield Candidate(source, problem=f"no image for {keys[stem]} in {mapping.image_dir}/")
        else:
            try:
                raw = json.loads(store.read_bytes(keys[stem]).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield Candidate(source, image=images[stem], problem=f"label is not UTF-8 JSON: {exc}")
                continue
            if not isinstance(raw, dict):
                yield Candidate(source, image=images[stem], raw=raw, problem="label is not a JSON object")
                continue
            fields = {mapping.field_for(k) or k: v for k, v in raw.items()}
            yield Candidate(source, images[stem], mapping.doc_type, fields, raw=raw)


def _reading_order(parts: list[tuple[float, float, str]]) -> str:
    """Text of the boxes that make up one field, top to bottom, left to right."""
    return " ".join(text for _, _, text in sorted(parts))


def _label_studio(store: Storage, mapping: ImportMapping) -> Iterator[Candidate]:
    name = mapping.labels_file or "export.json"
    try:
        tasks = json.loads(store.read_bytes(name).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{store.uri_of(name)}: not UTF-8 JSON: {exc}") from exc
    if not isinstance(tasks, list):
        raise SourceError(f"{store.uri_of(name)}: expected a list of tasks")
    for index, task in enumerate(tasks):
        source = f"{store.uri_of(name)}#task={task.get('id', index) if isinstance(task, dict) else index}"
        try:
            yield _label_studio_task(source, task, mapping)
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            yield Candidate(source, raw=task, problem=f"not a Label Studio task: missing or malformed {exc}")


def _label_studio_task(source: str, task: dict, mapping: ImportMapping) -> Candidate:
    annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
    if not annotations:
        return Candidate(source, raw=task, problem="task has no annotation")
    annotation = next((a for a in annotations if a.get("ground_truth")), annotations[-1])
    labels: dict[str, str] = {}
    texts: dict[str, str] = {}
    boxes: dict[str, tuple[float, float]] = {}
    doc_type = mapping.doc_type
    for item in annotation["result"]:
        value = item["value"]
        if item["type"] == "choices" and mapping.doc_type_choices:
            doc_type = mapping.doc_type_choices.get(value["choices"][0], doc_type)
        elif item["type"] in ("labels", "rectanglelabels", "polygonlabels"):
            labels[item["id"]] = value[item["type"]][0]
        elif item["type"] == "textarea":
            texts[item["id"]] = " ".join(value["text"])
        if "y" in value and "x" in value:
            boxes[item["id"]] = (value["y"], value["x"])
    parts: dict[str, list] = defaultdict(list)
    for region, label in labels.items():
        field = mapping.field_for(label)
        if field and region in texts:
            parts[field].append((*boxes.get(region, (0, 0)), texts[region]))
    image = task["data"][mapping.data_key]
    return Candidate(
        source,
        _label_studio_image(image, mapping),
        doc_type,
        {field: _reading_order(p) for field, p in parts.items()},
        raw=task,
    )


def _label_studio_image(reference: str, mapping: ImportMapping) -> str:
    """The image's path inside the batch, from Label Studio's data.image."""
    parsed = urlparse(reference)
    if "d" in parse_qs(parsed.query):  # local storage: /data/local-files/?d=folder/file.jpg
        return parse_qs(parsed.query)["d"][0]
    path = parsed.path if parsed.scheme in ("", "file") else parsed.path.lstrip("/")
    return path.removeprefix(mapping.image_prefix) if mapping.image_prefix else path


def _ppocr(store: Storage, mapping: ImportMapping) -> Iterator[Candidate]:
    folder = PurePosixPath(urlparse(store.uri).path).name
    for source, text, problem in _lines(store, mapping.labels_file or "Label.txt"):
        if text is None:
            yield Candidate(source, problem=problem)
            continue
        path, _, boxes_json = text.partition("\t")
        try:
            boxes = json.loads(boxes_json)
            parts: dict[str, list] = defaultdict(list)
            for box in boxes:
                field = mapping.field_for(box.get("key_cls", "None"))
                if field and field != "None":
                    ys, xs = [p[1] for p in box["points"]], [p[0] for p in box["points"]]
                    parts[field].append((min(ys), min(xs), box["transcription"]))
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
            yield Candidate(source, raw=text, problem=f"not a PPOCRLabel line (path<TAB>JSON boxes): {exc}")
            continue
        fields = {field: _reading_order(p) for field, p in parts.items()}
        image = path.removeprefix(f"{folder}/")  # PPOCRLabel prefixes paths with the folder's own name
        yield Candidate(source, image, mapping.doc_type, fields, raw=text)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(str(p) for p in error['loc']) or 'record'}: {error['msg']}"
