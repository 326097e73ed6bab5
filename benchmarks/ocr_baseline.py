"""The OCR baseline on real receipts: field accuracy per field and latency, on the shared SROIE sample.

Runs ``stages.evaluate.baseline.OcrBaseline`` (RapidOCR PP-OCRv4 + the receipt_en rules) on every
``img/*.jpg`` of a folder in SROIE's layout (``key/*.json`` beside it), scores each field exactly
as the evaluate stage does, and prints per-field accuracy, field and document accuracy, and
seconds per receipt (p50/p95). ``--show-misses`` prints each wrong field.

    .venv/bin/python benchmarks/ocr_baseline.py [--folder ../shared/data/sroie-sample] [--show-misses]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from PIL import Image

from stages.doctypes import load_registry
from stages.evaluate.baseline import OcrBaseline
from stages.evaluate.metrics import evaluate_all, score

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("SHARED_DIR", ROOT.parent / "shared")) / "data" / "sroie-sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=SAMPLE)
    parser.add_argument("--doc-type", default="receipt_en")
    parser.add_argument("--show-misses", action="store_true")
    args = parser.parse_args()
    registry = load_registry(ROOT / "configs" / "doctypes")
    doc_type, reader, documents = registry[args.doc_type], OcrBaseline(), []
    for image in sorted((args.folder / "img").glob("*.jpg")):
        expected = doc_type.canonical_fields(json.loads((args.folder / "key" / f"{image.stem}.json").read_text()))
        fields, seconds = reader.read(doc_type, Image.open(image))
        documents.append(score(doc_type, image.stem, expected, fields, json.dumps(fields), seconds))
        if args.show_misses:
            for name in (n for n, right in documents[-1].correct.items() if not right):
                print(f"{image.stem} {name}: expected {expected[name]!r}, read {fields[name]!r}")
    metrics = evaluate_all(documents, registry, sum(d.latency_s for d in documents))["per_doc_type"][doc_type.id]
    print(f"{len(documents)} documents from {args.folder}")
    print("per field: " + ", ".join(f"{name} {value:.3f}" for name, value in metrics["per_field_accuracy"].items()))
    print(f"field accuracy {metrics['field_accuracy']:.3f}, document accuracy {metrics['document_accuracy']:.3f}")
    print(f"seconds per document: p50 {metrics['latency_p50_s']:.2f}, p95 {metrics['latency_p95_s']:.2f}")


if __name__ == "__main__":
    main()
