"""The OCR baseline on real receipts: field accuracy per field and latency, on the shared SROIE sample.

Runs ``docpipe.answering.ocr_baseline.OcrBaseline`` (RapidOCR PP-OCRv4 + the receipt_en rules) on every
``img/*.jpg`` of a folder in SROIE's layout (``key/*.json`` beside it), scores each field exactly
as the evaluate stage does, and prints per-field accuracy, field and document accuracy, and
seconds per receipt (p50/p95). ``--show-misses`` prints each wrong field. ``--synthetic N``
scores N generated documents of the type instead (documents the rules were not written against).

    .venv/bin/python benchmarks/ocr_baseline.py [--folder ../shared/data/sroie-sample] [--show-misses]
    .venv/bin/python benchmarks/ocr_baseline.py --synthetic 40 --doc-type thsr_ticket
"""

from __future__ import annotations

import argparse
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from docpipe.answering.ocr_baseline import OcrBaseline
from docpipe.answering.scoring import evaluate_all, score
from docpipe.config import SyntheticConfig
from docpipe.doctypes import DocType, load_registry
from toolkit.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("SHARED_DIR", ROOT.parent / "shared")) / "data" / "sroie-sample"


def sroie(doc_type: DocType, folder: Path) -> Iterator[tuple[str, Image.Image, dict]]:
    for path in sorted((folder / "img").glob("*.jpg")):
        yield (
            path.stem,
            Image.open(path),
            doc_type.canonical_fields(json.loads((folder / "key" / f"{path.stem}.json").read_text())),
        )


def synthetic(doc_type: DocType, count: int) -> Iterator[tuple[str, Image.Image, dict]]:
    for index, (record, data, _) in enumerate(generate([doc_type], SyntheticConfig(count=count, seed=13))):
        yield f"synthetic-{index}", Image.open(io.BytesIO(data)), doc_type.canonical_fields(record.fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=SAMPLE)
    parser.add_argument("--doc-type", default="receipt_en")
    parser.add_argument("--show-misses", action="store_true")
    parser.add_argument("--synthetic", type=int, default=0, help="score this many generated documents instead")
    args = parser.parse_args()
    registry = load_registry(ROOT / "configs" / "doctypes")
    doc_type, reader, documents = registry[args.doc_type], OcrBaseline(), []
    documents_in = synthetic(doc_type, args.synthetic) if args.synthetic else sroie(doc_type, args.folder)
    for name, image, expected in documents_in:
        fields, seconds = reader.read(doc_type, image)
        documents.append(score(doc_type, name, expected, fields, json.dumps(fields), seconds))
        if args.show_misses:
            for field in (n for n, right in documents[-1].correct.items() if not right):
                print(f"{name} {field}: expected {expected[field]!r}, read {fields[field]!r}")
    metrics = evaluate_all(documents, registry, sum(d.latency_s for d in documents))["per_doc_type"][doc_type.id]
    print(f"{len(documents)} {doc_type.id} documents from {'the generator' if args.synthetic else args.folder}")
    print("per field: " + ", ".join(f"{name} {value:.3f}" for name, value in metrics["per_field_accuracy"].items()))
    print(f"field accuracy {metrics['field_accuracy']:.3f}, document accuracy {metrics['document_accuracy']:.3f}")
    print(f"seconds per document: p50 {metrics['latency_p50_s']:.2f}, p95 {metrics['latency_p95_s']:.2f}")


if __name__ == "__main__":
    main()
