"""``python -m toolkit.synthetic``: write a batch of synthetic labelled documents in the landing format."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from tqdm import tqdm

from docpipe.config import PipelineConfig
from docpipe.contract import BadInputError, main, stage_parser
from docpipe.data.landing import write_batch
from docpipe.doctypes import OTHER, load_registry
from docpipe.manifest import StageOutput
from docpipe.storage import Storage
from toolkit.synthetic import generate

STAGE = "synthetic"


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(STAGE, __doc__, module="toolkit.synthetic")
    parser.add_argument("--count", type=int, help="documents to generate (default: synthetic.count)")
    parser.add_argument("--seed", type=int, help="random seed (default: synthetic.seed)")
    parser.add_argument(
        "--doc-types",
        help=f"comma-separated document types, {OTHER} for pages of none of them (default: the config's doc_types)",
    )
    return parser


def run(args: argparse.Namespace, config: PipelineConfig, output: Storage) -> StageOutput:
    registry = load_registry(config.doctypes_dir)
    names = args.doc_types.split(",") if args.doc_types else config.doc_types
    unknown = sorted(set(names) - set(registry) - {OTHER})
    if unknown:
        known = sorted(registry)
        raise BadInputError(f"--doc-types: unknown document type(s) {unknown}; {config.doctypes_dir} has {known}")
    overrides = {key: value for key, value in (("count", args.count), ("seed", args.seed)) if value is not None}
    try:
        settings = config.synthetic.model_validate({**config.synthetic.model_dump(), **overrides})
    except ValueError as exc:
        raise BadInputError(f"--count/--seed: {exc}") from exc
    doc_types = [registry.get(name) for name in names]

    per_type, effects = Counter(), Counter()

    def documents():
        for record, image_bytes, applied in tqdm(generate(doc_types, settings), total=settings.count, desc="render"):
            if record.doc_type != OTHER:
                registry[record.doc_type].canonical_fields(record.fields)  # a generated label must validate
            per_type[record.doc_type] += 1
            effects.update(effect.rstrip("+-.0123456789") for effect in applied)
            yield record, image_bytes

    marker = write_batch(output, documents(), producer=f"toolkit.synthetic seed={settings.seed}")
    return StageOutput(
        outputs={"batch": output.uri},
        counts={
            "documents": marker.records,
            **{f"doc_type.{k}": v for k, v in per_type.items()},
            **{f"effect.{k}": v for k, v in effects.items()},
        },
    )


if __name__ == "__main__":
    sys.exit(main(STAGE, build_parser(), run))
