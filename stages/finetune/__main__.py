"""``python -m stages.finetune``: full finetune of a MiniCPM-V model on an export's conversations.

Resolves the base model (a folder, or an s3:// URI copied into ``<output>/base-model``),
checks that every train and eval document fits ``training.model_max_length`` (those that
do not are listed in ``unfit.jsonl`` with the reason, never cut; more than
``training.max_unfit_fraction`` of the train documents fails the stage before training),
then runs ``stages.finetune.train`` under torchrun (``training.launch``, or GPUS_PER_NODE,
NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT from the environment, or Kubeflow Trainer's PET_
variables). Checkpoints land in the output folder, which must be local or mounted: a retried
run continues from the latest one. Across nodes every node runs this stage with the same flags
and mounts the same output folder: checkpoints are written there by all of them, while node
k > 0 keeps its own copy of the data, spec and manifest in ``<output>/nodes/<k>``.
Every evaluation also scores the answers the model generates for a fixed sample of eval
documents; ``selection.json`` names the best checkpoint by ``training.selection`` and why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from docpipe.config import PipelineConfig, TorchrunLayout
from docpipe.contract import BadInputError, input_errors_are_bad_input, main, stage_parser
from docpipe.data.dataset import DatasetCard
from docpipe.data.examples import DataError, Example, Unfit, read_examples, split_fitting, write_examples
from docpipe.doctypes import OTHER
from docpipe.manifest import StageOutput
from docpipe.model.adapters import Adapter, AdapterError, load_adapter, resolve_model_dir
from docpipe.redaction import redact
from docpipe.storage import LocalStorage, Storage, open_storage
from stages.finetune.train import RESULT, TrainSpec, die_with_parent, location_environment

STAGE = "finetune"
SELECTION = "selection.json"
LAYOUT_ENV = {
    "gpus_per_node": ("GPUS_PER_NODE", "PET_NPROC_PER_NODE"),
    "nnodes": ("NNODES", "PET_NNODES"),
    "node_rank": ("NODE_RANK", "PET_NODE_RANK"),
    "master_addr": ("MASTER_ADDR", "PET_MASTER_ADDR"),
    "master_port": ("MASTER_PORT", "PET_MASTER_PORT"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--data", required=True, help="the export stage's output (train.json, eval.json)")
    parser.add_argument("--base-model", help="a folder or s3:// URI; default: model.base of the config")
    parser.set_defaults(checkpoints=None)  # route_node_outputs's: the shared checkpoint folder (None: --output)
    return parser


def layout_from_environment(config: TorchrunLayout, environ: Mapping[str, str]) -> TorchrunLayout:
    """The configured layout with any of GPUS_PER_NODE, NNODES, ... (or PET_NPROC_PER_NODE,
    PET_NNODES, ...) from the environment on top."""
    overrides = {
        key: value
        for key, names in LAYOUT_ENV.items()
        if (value := next((environ[n] for n in names if environ.get(n)), None))
    }
    return TorchrunLayout.model_validate({**config.model_dump(), **overrides})


def route_node_outputs(args: argparse.Namespace, config: PipelineConfig) -> None:
    """Checkpoints go to ``--output`` from every node; node k > 0 writes its lock, manifest,
    prepared data and spec to ``<output>/nodes/<k>``, so nodes sharing the folder do not collide."""
    args.checkpoints = args.output
    rank = layout_from_environment(config.training.launch, os.environ).node_rank
    if rank:
        args.output = f"{args.output.rstrip('/')}/nodes/{rank}"


def torchrun_command(launch: TorchrunLayout, spec: Path, checkpoints: Path) -> list[str]:
    """torchrun for ``stages.finetune.train``: standalone on one node; across several, a c10d
    rendezvous hosted by node 0 at MASTER_ADDR:MASTER_PORT, named after the checkpoint folder
    that every node of the run shares."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.gpus_per_node}"]
    if launch.nnodes == 1:
        command.append("--standalone")  # a free local port: two runs on one machine do not collide
    else:
        run_id = hashlib.sha256(str(checkpoints).encode()).hexdigest()[:16]
        command += [
            f"--nnodes={launch.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-id={run_id}",
            f"--rdzv-endpoint={launch.master_addr}:{launch.master_port}",
            f"--rdzv-conf=join_timeout={launch.rendezvous_timeout_s}",
        ]
    return [*command, "-m", "stages.finetune.train", str(spec)]


def _examples(data: Storage, name: str, required: bool) -> list[Example]:
    if not data.exists(name):
        if required:
            raise BadInputError(f"{data.uri_of(name)}: missing (run stages.export first)")
        return []
    try:
        return read_examples(data.read_bytes(name), data.uri_of(name))
    except DataError as exc:
        raise BadInputError(str(exc)) from exc


def _dataset_version(data: Storage) -> str | None:
    return DatasetCard.model_validate_json(data.read_bytes("card.json")).version if data.exists("card.json") else None


def _fitting_examples(data: Storage, adapter: Adapter, config: PipelineConfig, output: LocalStorage):
    """Train and eval examples that fit ``model_max_length``, written to ``<output>/data/``, and the
    ones that do not, listed in ``unfit.jsonl``; too many unfit train documents is bad input."""
    training, s3, out = config.training, config.storage.s3, Path(output.uri)
    examples = _examples(data, "train.json", required=True)
    if not examples:
        raise BadInputError(
            f"{data.uri_of('train.json')}: no train document (an evaluation-only export, such as a "
            "golden set, is evaluated, not trained on)"
        )
    train, unfit_train = split_fitting(examples, adapter.length, training.model_max_length, s3, "train")
    evaluation, unfit_eval = split_fitting(
        _examples(data, "eval.json", required=False), adapter.length, training.model_max_length, s3, "eval"
    )
    unfit: list[Unfit] = unfit_train + unfit_eval
    output.write_bytes("unfit.jsonl", "".join(u.model_dump_json() + "\n" for u in unfit).encode("utf-8"))
    share = len(unfit_train) / max(1, len(train) + len(unfit_train))
    if share > training.max_unfit_fraction or not train:
        raise BadInputError(
            f"{len(unfit_train)} of {len(train) + len(unfit_train)} train documents cannot be "
            f"trained on ({share:.1%} > max_unfit_fraction {training.max_unfit_fraction:.1%}); "
            f"reasons in {output.uri_of('unfit.jsonl')}"
        )
    untyped = [
        e.id for e in evaluation if e.doc_type not in config.doc_types and not (e.routed and e.doc_type == OTHER)
    ]
    if untyped and training.selection_documents:
        raise BadInputError(
            f"{data.uri_of('eval.json')}: documents {untyped[:5]} have no doc_type of "
            f"{config.doc_types}: checkpoints cannot be scored on them (export again)"
        )
    (out / "data").mkdir(parents=True, exist_ok=True)
    write_examples(out / "data" / "train.json", train)
    if evaluation:
        write_examples(out / "data" / "eval.json", evaluation)
    return train, evaluation, unfit_train, unfit_eval


def train_spec(model_dir: Path, out: Path, checkpoints: Path, has_eval: bool, config: PipelineConfig) -> TrainSpec:
    """What every training process reads: the model, the prepared data, the settings, where to write."""
    import mlflow

    training = config.training
    deepspeed = config.deepspeed_dir / f"{training.deepspeed}.json" if training.deepspeed else None
    return TrainSpec(
        model_dir=str(model_dir.resolve()),
        model=config.model,
        training=training,
        evaluation=config.evaluation,
        doctypes_dir=str(config.doctypes_dir.resolve()),
        doc_types=config.doc_types,
        export=config.export,
        train_file=str(out / "data" / "train.json"),
        eval_file=str(out / "data" / "eval.json") if has_eval else None,
        output_dir=str(checkpoints),
        deepspeed_config=str(deepspeed.resolve()) if deepspeed else None,
        s3=config.storage.s3,
        tracking_uri=config.tracking.tracking_uri,
        mlflow_run_id=mlflow.active_run().info.run_id,
    )


def train(spec_file: Path, spec: TrainSpec, checkpoints: Path, config: PipelineConfig) -> TorchrunLayout:
    """torchrun over the spec, in this node's layout; a failed training is a failure of the stage."""
    import torch

    env = {**os.environ, "PYTHONUNBUFFERED": "1", **location_environment(spec.tracking_uri, spec.s3)}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU (tests, the embedded demo)
    layout = layout_from_environment(config.training.launch, os.environ)
    command = torchrun_command(layout, spec_file, checkpoints)
    done = subprocess.run(command, env=env, check=False, preexec_fn=die_with_parent)
    if done.returncode:
        raise RuntimeError(f"training exited with code {done.returncode}; its log is above")
    return layout


def report_selection(result: dict, out: Path, output: Storage) -> dict:
    """The checkpoint chosen and why: ``selection.json``, and the same in the stage's MLflow run."""
    import mlflow

    selection = result["selection"]
    output.write_bytes(SELECTION, json.dumps(selection, indent=2).encode("utf-8"))
    mlflow.log_artifact(str(out / "unfit.jsonl"), STAGE)
    mlflow.log_dict(selection, f"{STAGE}/{SELECTION}")
    mlflow.set_tags({"checkpoint.selected": selection["checkpoint"] or "", "checkpoint.selection": selection["reason"]})
    return selection


def run(args: argparse.Namespace, config: PipelineConfig, output: Storage) -> StageOutput:
    import mlflow

    if not isinstance(output, LocalStorage):
        raise BadInputError(f"--output {output.uri}: checkpoints need a local or mounted folder, not object storage")
    out = Path(output.uri).resolve()
    checkpoints = Path(args.checkpoints or output.uri).resolve()
    data = open_storage(args.data, config.storage.s3)
    base = args.base_model or config.model.base
    with input_errors_are_bad_input(AdapterError, OSError, prefix=f"base model {base}: "):
        model_dir = resolve_model_dir(base, out / "base-model", config.storage.s3)
        adapter = load_adapter(model_dir, config.model, config.training)
    train_examples, evaluation, unfit_train, unfit_eval = _fitting_examples(data, adapter, config, output)
    version = _dataset_version(data)
    if version:
        mlflow.set_tag("dataset.version", version)
        mlflow.log_param("dataset.version", version)

    spec = train_spec(model_dir, out, checkpoints, bool(evaluation), config)
    output.write_bytes("train_spec.json", json.dumps(redact(spec.model_dump(mode="json")), indent=2).encode("utf-8"))
    layout = train(out / "train_spec.json", spec, checkpoints, config)
    if layout.node_rank != 0:  # node 0 reports the run
        return StageOutput(outputs={"checkpoints": str(checkpoints)}, counts={"node_rank": layout.node_rank})
    result = json.loads((checkpoints / RESULT).read_text())
    selection = report_selection(result, out, output)
    return StageOutput(
        inputs={"data": data.uri, "base_model": base, **({"dataset_version": version} if version else {})},
        outputs={
            "checkpoints": str(checkpoints),
            "tensorboard": str(checkpoints / "tensorboard"),
            "last_checkpoint": result["last_checkpoint"],
            "best_checkpoint": selection["checkpoint"] or "",
            "selection": output.uri_of(SELECTION),
            "resumed_from": result["resumed_from"] or "",
            "unfit": output.uri_of("unfit.jsonl"),
        },
        counts={
            "train": len(train_examples),
            "eval": len(evaluation),
            "unfit_train": len(unfit_train),
            "unfit_eval": len(unfit_eval),
            "global_step": result["global_step"],
            "input_tokens_seen": result["input_tokens_seen"],
        },
        metrics={
            "train_loss": result["train_loss"],
            "train_runtime_s": result["train_runtime_s"],
            **(
                {f"selected.{selection['metric']}": selection["value"], "selected.step": selection["step"]}
                if selection["value"] is not None
                else {}
            ),
        },
    )


if __name__ == "__main__":
    sys.exit(main(STAGE, build_parser(), run, adjust_args=route_node_outputs))
