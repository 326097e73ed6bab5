"""``python -m stages.export``: a dataset version as MiniCPM-V finetune data.

Writes ``train.json`` and ``eval.json`` (lists of ``{"id", "doc_type", "routed", "image", "conversations":
[user prompt with <image>, assistant canonical JSON answer]}``), ``schemas/<doc type>.json`` with
each type's answer schema, and ``card.json`` of the dataset version. With ``export.routing`` every
document is asked the routing prompt and its answer names its type first (``schemas/routed.json``
is that answer's schema), and pages labelled ``other`` answer ``{"doc_type": "other"}``; without
it each document is asked its own type's prompt and ``other`` pages are left out. Image paths point to
where the training container sees the dataset (``export.image_root``). A version with eval
documents only (a golden set) exports with an empty ``train.json``: it can be evaluated, not trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from docpipe import tracking
from docpipe.config import PipelineConfig
from docpipe.contract import BadInputError, input_errors_are_bad_input, main, stage_parser
from docpipe.data.dataset import latest_version, read_manifest
from docpipe.data.examples import example_for
from docpipe.doctypes import OTHER, load_registry
from docpipe.manifest import StageOutput
from docpipe.routing import Routing
from docpipe.storage import Storage, absolute_location, open_storage

STAGE = "export"


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--dataset", help="the datasets location (default: storage.datasets_uri)")
    parser.add_argument("--version", help="dataset version id (default: the latest)")
    return parser


def _dumps(data) -> bytes:
    return json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")


def run(args: argparse.Namespace, config: PipelineConfig, output: Storage) -> StageOutput:
    dataset = open_storage(args.dataset or config.storage.datasets_uri, config.storage.s3)
    version = args.version or latest_version(dataset)
    if version is None:
        raise BadInputError(f"{dataset.uri}: no dataset version yet (run stages.ingest first)")
    with input_errors_are_bad_input(prefix=f"dataset version {version!r} not found: "):
        records = read_manifest(dataset, version)

    registry = load_registry(config.doctypes_dir)
    routing = Routing.of(registry, config.doc_types, config.export.routing_prompt) if config.export.routing else None
    image_root = config.export.image_root or absolute_location(dataset.uri)
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    counts: Counter[str] = Counter()
    for record in records:
        if record.doc_type == OTHER and routing is None:
            counts["skipped_other"] += 1
            continue
        if record.doc_type not in [*config.doc_types, OTHER]:
            counts["skipped_doc_type"] += 1
            continue
        doc_type = registry.get(record.doc_type)
        splits[record.split].append(example_for(record, doc_type, image_root, config.export.prompt_variants, routing))
        counts[f"{record.split}.{record.doc_type}"] += 1
    if not splits["train"] and not splits["eval"]:
        raise BadInputError(f"dataset version {version} has no document of types {config.doc_types}")

    for split, examples in splits.items():
        output.write_bytes(f"{split}.json", _dumps(examples))
    for name in sorted({r.doc_type for r in records} & set(config.doc_types)):
        output.write_bytes(f"schemas/{name}.json", _dumps(registry[name].answer_schema()))
    if routing is not None:
        output.write_bytes("schemas/routed.json", _dumps(routing.answer_schema()))
    output.write_bytes("card.json", dataset.read_bytes(f"versions/{version}/card.json"))
    tracking.log_dataset(dataset.uri, version, context="export")
    return StageOutput(
        inputs={"dataset": dataset.uri, "version": version},
        outputs={"train": output.uri_of("train.json"), "eval": output.uri_of("eval.json"), "image_root": image_root},
        counts={"train": len(splits["train"]), "eval": len(splits["eval"]), **counts},
        metrics={"routed": float(routing is not None)},
    )


if __name__ == "__main__":
    sys.exit(main(STAGE, build_parser(), run))
