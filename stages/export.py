"""``python -m stages.export``: a dataset version as MiniCPM-V finetune data.

Writes ``train.json`` and ``eval.json`` (lists of ``{"id", "doc_type", "image", "conversations": [user
prompt with <image>, assistant canonical JSON answer]}``), ``schemas/<doc type>.json`` with
each type's answer schema, and ``card.json`` of the dataset version. Image paths point to
where the training container sees the dataset (``export.image_root``). A version with eval
documents only (a golden set) exports with an empty ``train.json``: it can be evaluated, not trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

from stages import tracking
from stages.cli import BadInputError, main, stage_parser
from stages.config import PipelineConfig
from stages.dataset import DatasetRecord, latest_version, read_manifest
from stages.doctypes import DocType, load_registry
from stages.manifest import StageOutput
from stages.storage import Storage, StorageError, StorageUnavailable, open_storage

STAGE = "export"


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--dataset", help="the datasets location (default: storage.datasets_uri)")
    parser.add_argument("--version", help="dataset version id (default: the latest)")
    return parser


def prompt_for(record: DatasetRecord, doc_type: DocType, use_variants: bool) -> str:
    """The type's prompt; train documents draw a fixed variant by their hash when variants are on."""
    prompts = [doc_type.prompt, *doc_type.prompt_variants]
    if record.split == "eval" or not use_variants:
        return doc_type.prompt
    return prompts[int(hashlib.sha256(f"prompt:{record.id}".encode()).hexdigest()[:8], 16) % len(prompts)]


def conversation(record: DatasetRecord, doc_type: DocType, image_root: str, use_variants: bool) -> dict:
    """One training example in the MiniCPM-V finetune format."""
    return {
        "id": record.id,
        "doc_type": doc_type.id,  # beside the recipe's keys: evaluation scores each document by its type
        "image": f"{image_root.rstrip('/')}/{record.image}",
        "conversations": [
            {"role": "user", "content": prompt_for(record, doc_type, use_variants)},
            {"role": "assistant", "content": doc_type.canonical_answer(record.fields)},
        ],
    }


def _dumps(data) -> bytes:
    return json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")


def run(args: argparse.Namespace, config: PipelineConfig, output: Storage) -> StageOutput:
    dataset = open_storage(args.dataset or config.storage.datasets_uri, config.storage.s3)
    version = args.version or latest_version(dataset)
    if version is None:
        raise BadInputError(f"{dataset.uri}: no dataset version yet (run stages.ingest first)")
    try:
        records = read_manifest(dataset, version)
    except StorageUnavailable:
        raise
    except StorageError as exc:
        raise BadInputError(f"dataset version {version!r} not found: {exc}") from exc

    registry = load_registry(config.doctypes_dir)
    image_root = config.export.image_root or (dataset.uri if "://" in dataset.uri else str(Path(dataset.uri).resolve()))
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    counts: Counter[str] = Counter()
    for record in records:
        if record.doc_type not in config.doc_types:
            counts["skipped_doc_type"] += 1
            continue
        splits[record.split].append(conversation(record, registry[record.doc_type], image_root,
                                                 config.export.prompt_variants))  # fmt: skip
        counts[f"{record.split}.{record.doc_type}"] += 1
    if not splits["train"] and not splits["eval"]:
        raise BadInputError(f"dataset version {version} has no document of types {config.doc_types}")

    for split, examples in splits.items():
        output.write_bytes(f"{split}.json", _dumps(examples))
    for name in sorted({r.doc_type for r in records} & set(config.doc_types)):
        output.write_bytes(f"schemas/{name}.json", _dumps(registry[name].answer_schema()))
    output.write_bytes("card.json", dataset.read_bytes(f"versions/{version}/card.json"))
    tracking.log_dataset(dataset.uri, version, context="export")
    return StageOutput(
        inputs={"dataset": dataset.uri, "version": version},
        outputs={"train": output.uri_of("train.json"), "eval": output.uri_of("eval.json"), "image_root": image_root},
        counts={"train": len(splits["train"]), "eval": len(splits["eval"]), **counts},
    )


if __name__ == "__main__":
    sys.exit(main(STAGE, build_parser(), run))
