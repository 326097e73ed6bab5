"""``python -m stages.patch``: a training checkpoint made into a model folder that serving loads.

Trainer checkpoints hold the weights and ``config.json`` but not what loading the processor
needs (``preprocessor_config.json``, the tokenizer and chat template, and for remote-code
models ``processing_minicpmv.py``, ``image_processing_minicpmv.py`` and the other ``.py``
files), nor ``generation_config.json`` in every version. This stage copies the weights out
of the checkpoint (leaving optimizer, scheduler and RNG state behind), adds the processor
files from the base model, restores what serving keys on in a remote-code ``config.json``
(``auto_map``, ``version``) as the base had it, then proves the folder loads: the processor,
and the model with no missing, unexpected or mismatched weights. ``patch.json`` says what
came from where.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.cli import BadInputError, main, stage_parser
from stages.config import PipelineConfig
from stages.finetune.adapters import AdapterError, adapter_class, load_adapter, resolve_model_dir
from stages.manifest import StageOutput
from stages.storage import LocalStorage, Storage

STAGE = "patch"
WEIGHT_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json")
RESTORED_CONFIG_KEYS = ("auto_map", "version")  # remote code: serving finds its classes and version here
REPORT = "patch.json"


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(STAGE, __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a checkpoint folder (checkpoint-N)")
    source.add_argument("--finetune", type=Path, help="the finetune stage's output: its best checkpoint, else its last")
    parser.add_argument("--base-model", help="the model that was finetuned; default: model.base of the config")
    return parser


def chosen_checkpoint(args: argparse.Namespace) -> Path:
    if args.checkpoint:
        checkpoint = args.checkpoint
    else:
        path = args.finetune / "result.json"
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{path}: cannot read the finetune result: {exc}") from exc
        if result.get("status") != "succeeded":
            raise BadInputError(f"{path}: the finetune run did not succeed ({result.get('error')})")
        checkpoint = Path(result["outputs"]["best_checkpoint"] or result["outputs"]["last_checkpoint"])
    if not (checkpoint / "config.json").is_file():
        raise BadInputError(f"{checkpoint}: not a checkpoint (no config.json)")
    return checkpoint


def _matching(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({path for pattern in patterns for path in folder.glob(pattern) if path.is_file()})


def assemble(checkpoint: Path, base: Path, processor_files: tuple[str, ...], output: Storage) -> dict:
    """Weights from the checkpoint, processor files from the base; returns what came from where."""
    weights = _matching(checkpoint, WEIGHT_FILES)
    if not any(path.suffix == ".safetensors" for path in weights):
        raise BadInputError(f"{checkpoint}: no *.safetensors weights")
    from_checkpoint = {path.name for path in weights}
    from_base = [path for path in _matching(base, processor_files) if path.name not in from_checkpoint]
    if not from_base:
        raise BadInputError(f"{base}: none of the processor files {list(processor_files)}")
    for path in [*weights, *from_base]:
        output.write_bytes(path.name, path.read_bytes())

    config = json.loads((checkpoint / "config.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    restored = {key: base_config[key] for key in RESTORED_CONFIG_KEYS
                if key in base_config and config.get(key) != base_config[key]}  # fmt: skip
    if restored:
        output.write_bytes("config.json", json.dumps({**config, **restored}, indent=2).encode("utf-8"))
    return {"checkpoint": str(checkpoint), "base_model": str(base), "from_checkpoint": sorted(from_checkpoint),
            "from_base": [path.name for path in from_base], "config_restored": restored}  # fmt: skip


def run(args: argparse.Namespace, config: PipelineConfig, output: Storage) -> StageOutput:
    import torch

    if not isinstance(output, LocalStorage):
        raise BadInputError(f"--output {output.uri}: the patched model needs a local or mounted folder")
    checkpoint = chosen_checkpoint(args)
    out = Path(output.uri).resolve()
    try:
        base = resolve_model_dir(args.base_model or config.model.base, out.parent / "base-model", config.storage.s3)
    except AdapterError as exc:
        raise BadInputError(f"base model: {exc}") from exc
    report = assemble(checkpoint, base, adapter_class(config.model.adapter).processor_files, output)

    try:
        adapter = load_adapter(out, config.model, config.training)  # the processor loads from the folder alone
    except (AdapterError, OSError, ValueError) as exc:
        raise RuntimeError(f"{out}: the processor does not load: {exc}") from exc
    _, info = adapter.from_pretrained(torch.bfloat16, output_loading_info=True)
    problems = {kind: sorted(map(str, keys)) for kind, keys in info.items()
                if kind in ("missing_keys", "unexpected_keys", "mismatched_keys") and keys}  # fmt: skip
    if problems:
        raise RuntimeError(f"{out}: the weights do not fit the model: {problems}")
    output.write_bytes(REPORT, json.dumps(report, indent=2).encode("utf-8"))
    return StageOutput(
        inputs={"checkpoint": str(checkpoint), "base_model": args.base_model or config.model.base},
        outputs={"model": str(out), "report": output.uri_of(REPORT)},
        counts={"from_checkpoint": len(report["from_checkpoint"]), "from_base": len(report["from_base"]),
                "config_keys_restored": len(report["config_restored"])},
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(STAGE, build_parser(), run))
