"""What each torchrun process runs: ``python -m stages.finetune.train SPEC.json``.

The stage (``python -m stages.finetune``) writes the spec and launches this under torchrun.
HF Trainer does the work: DeepSpeed from ``configs/deepspeed/`` (which leave the learning-rate
schedule to the Trainer), evaluation of the loss and of the answers the model generates for a
fixed sample of eval documents (``selection``), checkpoints every ``save_steps``, the best one
chosen by ``training.selection``, and resume from the latest complete checkpoint in the output
folder, so a retried task continues where the last attempt stopped.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import time
import zipfile
from contextlib import nullcontext
from pathlib import Path

from pydantic import BaseModel

from docpipe.config import EvaluationConfig, ExportConfig, ModelConfig, S3Config, TrainingConfig
from docpipe.data.examples import ExampleDataset, read_examples
from docpipe.locking import exclusive
from docpipe.model.adapters import load_adapter
from docpipe.redaction import redact_output
from stages.finetune.selection import CHECKPOINT_PREFIX, SelectionScorer, choose, curve

log = logging.getLogger("stages.finetune")
RESULT = "train_result.json"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class TrainSpec(BaseModel):
    """Everything one training process needs, written by the stage as JSON, redacted: locations
    that carry credentials reach the processes in their environment (``LOCATION_ENV``)."""

    model_dir: str
    model: ModelConfig
    training: TrainingConfig
    evaluation: EvaluationConfig  # how checkpoints answer: batch size, token budget
    doctypes_dir: str
    doc_types: list[str]  # the run's types: routed documents are asked about these
    export: ExportConfig  # how the examples were asked (the routing prompt)
    train_file: str
    eval_file: str | None
    output_dir: str  # checkpoints, TensorBoard events, train_result.json
    deepspeed_config: str | None
    s3: S3Config
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None


LOCATION_ENV = {"tracking_uri": "MLFLOW_TRACKING_URI", "s3_endpoint_url": "STAGES_S3_ENDPOINT_URL"}


def location_environment(tracking_uri: str | None, s3: S3Config) -> dict[str, str]:
    """The environment that carries the spec's locations, credentials included, to the training processes."""
    values = {"tracking_uri": tracking_uri, "s3_endpoint_url": s3.endpoint_url}
    return {LOCATION_ENV[key]: value for key, value in values.items() if value}


def with_locations(spec: TrainSpec, environ: dict[str, str]) -> TrainSpec:
    """The spec with its redacted locations taken back from the environment."""
    s3 = spec.s3.model_copy(update={"endpoint_url": environ.get(LOCATION_ENV["s3_endpoint_url"], spec.s3.endpoint_url)})
    return spec.model_copy(
        update={"tracking_uri": environ.get(LOCATION_ENV["tracking_uri"], spec.tracking_uri), "s3": s3}
    )


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux), so that killing a stage
    (an Airflow task timing out, a retry) never leaves training processes writing behind it:
    torchrun starts its workers in sessions of their own, out of reach of a process-group kill."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why resume could not continue from ``checkpoint``, or None when every file it needs is there
    and readable: trainer state, weights (whole, sharded or ZeRO shards), optimizer and scheduler state.
    Only headers are read (a torch file's zip directory, a safetensors header), never whole tensors."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"trainer_state.json unreadable ({exc.__class__.__name__})"
    zero = _zero_folder(checkpoint)
    weights = [checkpoint / "model.safetensors", checkpoint / "pytorch_model.bin", *_shards(checkpoint)]
    if zero is not None:
        weights += sorted(zero.glob("*model_states.pt"))
    if not any(_readable(path) for path in weights):
        return "no readable model weights"
    optimizer = [checkpoint / "optimizer.pt", *(sorted(zero.glob("*optim_states.pt")) if zero else [])]
    if not any(_readable(path) for path in optimizer):
        return "no readable optimizer state"
    if zero is None and not _readable(checkpoint / "scheduler.pt"):  # DeepSpeed's checkpoint holds its own
        return "no readable scheduler state"
    return None


def _zero_folder(checkpoint: Path) -> Path | None:
    """The DeepSpeed checkpoint folder that ``latest`` names, if any."""
    try:
        tag = (checkpoint / "latest").read_text().strip()
    except OSError:
        return None
    return checkpoint / tag if tag and (checkpoint / tag).is_dir() else None


def _shards(checkpoint: Path) -> list[Path]:
    """The shards a sharded checkpoint's index lists, when all of them are readable (else none)."""
    try:
        index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return []
    shards = [checkpoint / name for name in sorted(set(index.get("weight_map", {}).values()))]
    return shards[:1] if shards and all(_readable(shard) for shard in shards) else []


def _readable(path: Path) -> bool:
    """A file whose header is intact: a torch zip archive, or a safetensors file whose header parses."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt"):
                return True
        except Exception:  # safetensors raises its own error types for a cut-off or corrupt header
            return False
    return zipfile.is_zipfile(path)  # torch.save writes zip archives; a cut-off one has no central directory


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (``checkpoint_problem``); incomplete newer ones are named and skipped."""
    found = sorted(
        (p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()),
        key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)),
    )
    for checkpoint in reversed(found):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        log.warning("%s is incomplete (%s): falling back to an earlier checkpoint", checkpoint, problem)
    return None


def training_arguments(spec: TrainSpec, use_cpu: bool, has_eval: bool):
    """HF TrainingArguments from the validated config."""
    from transformers import TrainingArguments

    t = spec.training
    return TrainingArguments(
        output_dir=spec.output_dir,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of max_steps in transformers 5
        weight_decay=t.weight_decay,
        adam_beta2=t.adam_beta2,
        bf16=t.bf16,
        gradient_checkpointing=t.gradient_checkpointing,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=t.max_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        prediction_loss_only=True,  # holding every eval batch's logits exhausts memory
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        metric_for_best_model=t.selection if has_eval else None,  # the Trainer keeps its best from rotation
        logging_steps=1,
        include_num_input_tokens_seen="non_padding",
        report_to=["tensorboard"],
        deepspeed=spec.deepspeed_config,
        use_cpu=use_cpu,
        seed=t.seed,
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,  # samples are (example, image); the adapter's collate builds inputs
    )


def adapter_trainer(adapter, scorer: SelectionScorer | None, **kwargs):
    """HF Trainer that takes the loss from the adapter where the model does not compute it, and
    whose evaluations also score the answers the model generates (``scorer``)."""
    from transformers import Trainer

    class AdapterTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = adapter.loss(model, inputs)
            if loss is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss

        def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
            output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
            if scorer is not None:  # every process answers (ZeRO-3 generates collectively); rank 0 logs
                output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in scorer(self.model).items()})
            return output

    return AdapterTrainer(**kwargs)


def cpu_tensors_record_no_stream() -> None:
    """DeepSpeed 0.19's ZeRO-3 ``zero_grad`` calls ``record_stream`` on every gradient its
    accelerator holds; on the CPU accelerator those are CPU tensors, which have no streams
    (RuntimeError: unknown parameter type). On CPU runs (tests, the demo) the call does nothing."""
    import torch

    record_stream = torch.Tensor.record_stream

    def on_device_only(tensor, stream):
        if tensor.device.type != "cpu":
            record_stream(tensor, stream)

    torch.Tensor.record_stream = on_device_only


def zero_stage(deepspeed_config: Path) -> int:
    """The ZeRO stage a DeepSpeed config file asks for (0: none)."""
    return json.loads(deepspeed_config.read_text()).get("zero_optimization", {}).get("stage", 0)


def train(spec: TrainSpec) -> dict:
    """Train (or continue training) and return what rank 0 reports."""
    import torch

    from stages.finetune.callbacks import MlflowMetrics

    use_cpu = not torch.cuda.is_available()
    output_dir = Path(spec.output_dir)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output_dir / "tensorboard"))
    adapter = load_adapter(Path(spec.model_dir), spec.model, spec.training)
    dtype = torch.bfloat16 if spec.training.bf16 else torch.float32
    model = adapter.load_model(dtype)
    if spec.deepspeed_config and zero_stage(Path(spec.deepspeed_config)) == 3:
        from deepspeed.utils import set_z3_leaf_modules_by_suffix

        set_z3_leaf_modules_by_suffix(model, list(adapter.zero3_leaf_modules))
        if use_cpu:
            cpu_tensors_record_no_stream()
    train_set = ExampleDataset(read_examples(Path(spec.train_file).read_bytes(), spec.train_file), spec.s3)
    eval_set = None
    if spec.eval_file:
        eval_set = ExampleDataset(read_examples(Path(spec.eval_file).read_bytes(), spec.eval_file), spec.s3)
    args = training_arguments(spec, use_cpu, has_eval=bool(eval_set))
    callbacks = [MlflowMetrics(spec.tracking_uri, spec.mlflow_run_id)] if spec.mlflow_run_id else []
    t = spec.training
    scorer = None
    if eval_set and t.selection_documents:
        scorer = SelectionScorer(
            adapter, eval_set.examples, t.selection_documents, t.seed, spec, spec.evaluation, spec.s3
        )
    trainer = adapter_trainer(
        adapter,
        scorer,
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=adapter.collate,
        callbacks=callbacks,
    )
    resume = latest_checkpoint(output_dir)
    if resume:
        log.info("resuming from %s", resume)
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    state = trainer.state
    last = latest_checkpoint(output_dir)
    scored = len(scorer.requests) if scorer else 0
    selection = choose(curve(state.log_history, output_dir), t.selection, scored, str(last) if last else None)
    return {
        "global_step": state.global_step,
        "resumed_from": str(resume) if resume else None,
        "last_checkpoint": str(last) if last else None,
        "selection": selection.model_dump(),
        "train_loss": outcome.training_loss,
        "train_runtime_s": round(time.perf_counter() - started, 3),
        "input_tokens_seen": state.num_input_tokens_seen,
        "learning_rates": [e["learning_rate"] for e in state.log_history if "learning_rate" in e],
        "is_world_process_zero": trainer.is_world_process_zero(),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stages.finetune.train SPEC.json", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    redact_output()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )
    die_with_parent()
    import torch.distributed as dist

    spec = with_locations(TrainSpec.model_validate_json(Path(args[0]).read_text()), dict(os.environ))
    try:
        with exclusive(Path(spec.output_dir), ".train.lock") if rank == 0 else nullcontext():
            result = train(spec)
        if result.pop("is_world_process_zero"):
            Path(spec.output_dir, RESULT).write_text(json.dumps(result, indent=2))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no node ends before the result is written, wherever the rendezvous put rank 0
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # without it, one CPU run in three aborts at exit
    return 0


def exit_without_teardown(code: int) -> None:
    """Leave once everything is written, without the interpreter's teardown: native threads of gloo
    and DeepSpeed's CPU ops still abort it now and then, even after ``destroy_process_group``
    ("terminate called without an active exception", SIGABRT), which turned a finished run into
    a failed one for torchrun, and a retry for Airflow. Logs and streams are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())  # a failure raises out of main: a traceback and exit 1, as usual
