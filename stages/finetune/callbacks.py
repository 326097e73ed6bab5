"""Training metrics into the finetune stage's MLflow run, from rank 0 of the torchrun processes."""

from __future__ import annotations

import time

from transformers import TrainerCallback

_GIB = 2**30
# The Trainer's end-of-training summary: the finetune stage logs it once, from its result.
TRAINING_SUMMARY = {"train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}


class MlflowMetrics(TrainerCallback):
    """Every logged number at its global step (loss, learning rate, grad norm, eval loss), plus
    samples/s and tokens/s since the previous log and, on GPU, peak memory."""

    def __init__(self, tracking_uri: str | None, run_id: str):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id
        self.last: tuple[float, int, int] | None = None  # (time, step, tokens seen) at the previous log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        import torch
        from mlflow.entities import Metric

        now = time.time()
        values = {
            key: float(value)
            for key, value in logs.items()
            if isinstance(value, int | float) and key not in TRAINING_SUMMARY
        }
        step, tokens = state.global_step, state.num_input_tokens_seen
        if self.last and step > self.last[1] and now > self.last[0]:
            elapsed = now - self.last[0]
            samples = (step - self.last[1]) * args.per_device_train_batch_size * args.gradient_accumulation_steps
            values["samples_per_second"] = samples * args.world_size / elapsed
            values["tokens_per_second"] = (tokens - self.last[2]) / elapsed
        self.last = (now, step, tokens)
        if torch.cuda.is_available():
            values["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / _GIB
        stamp = int(now * 1000)
        metrics = [Metric(key, value, stamp, state.global_step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
