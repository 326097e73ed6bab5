"""Training metrics into the finetune stage's MLflow run, from rank 0 of the torchrun processes."""

from __future__ import annotations

import time

from transformers import TrainerCallback

_GIB = 2**30


class MlflowMetrics(TrainerCallback):
    """Every logged number at its global step (loss, learning rate, grad norm, eval loss,
    samples/s), plus tokens/s since the previous log and, on GPU, peak memory."""

    def __init__(self, tracking_uri: str | None, run_id: str):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id
        self.last: tuple[float, int] | None = None  # (time, tokens seen) at the previous log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        import torch
        from mlflow.entities import Metric

        now = time.time()
        values = {key: float(value) for key, value in logs.items() if isinstance(value, int | float)}
        tokens = state.num_input_tokens_seen
        if self.last and tokens > self.last[1] and now > self.last[0]:
            values["tokens_per_second"] = (tokens - self.last[1]) / (now - self.last[0])
        self.last = (now, tokens)
        if torch.cuda.is_available():
            values["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / _GIB
        stamp = int(now * 1000)
        metrics = [Metric(key, value, stamp, state.global_step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
