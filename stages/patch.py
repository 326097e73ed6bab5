"""``python -m stages.patch``: a training checkpoint made into a model folder that serving loads.

Trainer checkpoints hold the weights and ``config.json`` but not what loading the processor
needs (``preprocessor_config.json``, the tokenizer and chat template, and for remote-code
models ``processing_minicpmv.py``, ``image_processing_minicpmv.py`` and the other ``.py``
files). This stage takes the finetune run's best checkpoint (by ``training.selection``, as the
finetune stage's ``selection.json`` says) or its latest (``patch.checkpoint``), or the one
given, copies its weights (consolidating DeepSpeed ZeRO shards into safetensors
where the checkpoint has none) and leaves optimizer, scheduler and RNG state behind, adds the
processor files from the base model, restores what serving keys on in a remote-code
``config.json`` (``auto_map``, ``version``) as the base had it, then proves the folder works:
the processor and the model load from it alone with no missing, unexpected or mismatched
weights, and the model answers one of the run's examples. ``patch.json`` lists every file
with its sha256 and where it came from, and why that checkpoint was taken (with the finetune
run's per-checkpoint scores, which the evaluate stage's report draws).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

from docpipe.config import PipelineConfig
from docpipe.contract import BadInputError, main, stage_parser
from docpipe.data.examples import Example, Sample, load_image, read_examples
from docpipe.manifest import StageOutput
from docpipe.model.adapters import Adapter, AdapterError, adapter_class, load_adapter, resolve_model_dir
from docpipe.storage import LocalStorage, Storage

STAGE = "patch"
WEIGHT_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json")
RESTORED_CONFIG_KEYS = ("auto_map", "version")  # remote code: serving finds its classes and version here
REPORT = "patch.json"
log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(STAGE, __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--finetune", type=Path, help="the finetune stage's output; patch.checkpoint picks from it")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint folder (checkpoint-N) of a finetune output")
    parser.add_argument("--base-model", help="the model that was finetuned; default: model.base of the config")
    return parser


def _selection(outputs: dict) -> dict | None:
    """The finetune run's checkpoint selection (``selection.json``), where it wrote one."""
    path = Path(outputs.get("selection") or "/nonexistent")
    return json.loads(path.read_text()) if path.is_file() else None


def chosen_checkpoint(args: argparse.Namespace, choice: str) -> tuple[Path, dict]:
    """The checkpoint to patch, and why it was taken."""
    if args.checkpoint:
        checkpoint, why = args.checkpoint, {"reason": "given with --checkpoint"}
    else:
        path = args.finetune / "result.json"
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{path}: cannot read the finetune result: {exc}") from exc
        if result.get("status") != "succeeded":
            raise BadInputError(f"{path}: the finetune run did not succeed ({result.get('error')})")
        outputs = result["outputs"]
        try:
            selection = _selection(outputs)
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{outputs['selection']}: cannot read the checkpoint selection: {exc}") from exc
        if choice == "best" and outputs.get("best_checkpoint"):
            checkpoint = Path(outputs["best_checkpoint"])
            why = selection or {"reason": "the finetune run's best checkpoint"}
        else:
            checkpoint = Path(outputs["last_checkpoint"])
            why = {**(selection or {}), "reason": f"patch.checkpoint is {choice}: the latest checkpoint"}
    if not (checkpoint / "config.json").is_file():
        raise BadInputError(f"{checkpoint}: not a checkpoint (no config.json)")
    return checkpoint, why


def example_of(run: Path) -> Example:
    """One example the finetune run in ``run`` used (eval first), to ask the patched model."""
    for name in ("eval.json", "train.json"):
        path = run / "data" / name
        if path.is_file() and (examples := read_examples(path.read_bytes(), str(path))):
            return examples[0]
    raise BadInputError(
        f"{run}/data/: no example to ask the patched model (give --finetune, or a checkpoint inside a finetune output)"
    )


def _matching(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted({path for pattern in patterns for path in folder.glob(pattern) if path.is_file()})


def _copy(source: Path, out: Path) -> str:
    """Copy into ``out``; returns the file's sha256."""
    shutil.copyfile(source, out / source.name)
    with open(out / source.name, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def consolidate_zero(checkpoint: Path, out: Path) -> str:
    """DeepSpeed ZeRO shards of ``checkpoint`` as one ``model.safetensors`` in the model's dtype."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    config = json.loads((checkpoint / "config.json").read_text())
    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    save_file(
        {k: v.to(dtype).contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"}
    )
    with open(out / "model.safetensors", "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def assemble(checkpoint: Path, base: Path, processor_files: tuple[str, ...], out: Path) -> dict:
    """Weights from the checkpoint, processor files from the base; returns what came from where."""
    out.mkdir(parents=True, exist_ok=True)
    weights = _matching(checkpoint, WEIGHT_FILES)
    from_checkpoint = {path.name: _copy(path, out) for path in weights}
    consolidated = not any(path.suffix == ".safetensors" for path in weights)
    if consolidated:
        if not (checkpoint / "latest").is_file():
            raise BadInputError(f"{checkpoint}: no *.safetensors weights and no DeepSpeed checkpoint to consolidate")
        log.info("consolidating the ZeRO shards of %s", checkpoint)
        from_checkpoint["model.safetensors"] = consolidate_zero(checkpoint, out)
    from_base = {
        path.name: _copy(path, out) for path in _matching(base, processor_files) if path.name not in from_checkpoint
    }
    if not from_base:
        raise BadInputError(f"{base}: none of the processor files {list(processor_files)}")

    config = json.loads((checkpoint / "config.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    restored = {
        key: base_config[key]
        for key in RESTORED_CONFIG_KEYS
        if key in base_config and config.get(key) != base_config[key]
    }
    if restored:
        (out / "config.json").write_text(json.dumps({**config, **restored}, indent=2))
        from_checkpoint["config.json"] = hashlib.sha256((out / "config.json").read_bytes()).hexdigest()
    return {
        "checkpoint": str(checkpoint),
        "base_model": str(base),
        "consolidated_zero": consolidated,
        "from_checkpoint": from_checkpoint,
        "from_base": from_base,
        "config_restored": restored,
    }


def prove(adapter: Adapter, example: Example, config: PipelineConfig) -> str:
    """Load the model from the patched folder alone and have it answer; returns the answer."""
    import torch

    model, info = adapter.from_pretrained(torch.bfloat16, output_loading_info=True)
    problems = {
        kind: sorted(map(str, keys))
        for kind, keys in info.items()
        if kind in ("missing_keys", "unexpected_keys", "mismatched_keys") and keys
    }
    if problems:
        raise RuntimeError(f"{adapter.model_dir}: the weights do not fit the model: {problems}")
    sample = Sample(example, load_image(example.image, config.storage.s3))
    with torch.no_grad():
        return adapter.generate(model.eval(), [sample], config.patch.max_new_tokens)[0]


def run(args: argparse.Namespace, config: PipelineConfig, output: Storage) -> StageOutput:
    if not isinstance(output, LocalStorage):
        raise BadInputError(f"--output {output.uri}: the patched model needs a local or mounted folder")
    import mlflow

    checkpoint, why = chosen_checkpoint(args, config.patch.checkpoint)
    log.info("patching %s: %s", checkpoint, why["reason"])
    mlflow.set_tag("checkpoint.selection", why["reason"][:5000])
    example = example_of(args.finetune or checkpoint.parent)
    out = Path(output.uri).resolve()
    try:
        base = resolve_model_dir(args.base_model or config.model.base, out.parent / "base-model", config.storage.s3)
    except AdapterError as exc:
        raise BadInputError(f"base model: {exc}") from exc
    report = assemble(checkpoint, base, adapter_class(config.model.adapter).processor_files, out)
    report["selection"] = why

    try:
        adapter = load_adapter(out, config.model, config.training)  # the processor loads from the folder alone
    except (AdapterError, OSError, ValueError) as exc:
        raise RuntimeError(f"{out}: the processor does not load: {exc}") from exc
    report["example"] = {"id": example.id, "answer": prove(adapter, example, config)}
    log.info("the patched model answers example %s: %r", example.id, report["example"]["answer"][:200])
    output.write_bytes(REPORT, json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8"))
    return StageOutput(
        inputs={"checkpoint": str(checkpoint), "base_model": args.base_model or config.model.base},
        outputs={"model": str(out), "report": output.uri_of(REPORT)},
        counts={
            "from_checkpoint": len(report["from_checkpoint"]),
            "from_base": len(report["from_base"]),
            "config_keys_restored": len(report["config_restored"]),
            "consolidated_zero": int(report["consolidated_zero"]),
        },
    )


if __name__ == "__main__":
    sys.exit(main(STAGE, build_parser(), run))
