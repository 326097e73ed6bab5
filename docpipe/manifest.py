"""The ``result.json`` manifest every stage writes into its output location."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

RESULT_FILE = "result.json"
_REPORTED_PACKAGES = ("pillow", "pydantic", "boto3", "mlflow", "torch", "transformers", "deepspeed")


class StageOutput(BaseModel):
    """What a stage's ``run`` returns: locations it read and wrote, counts and metrics."""

    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    counts: dict[str, int] = {}
    metrics: dict[str, float] = {}


class StageResult(StageOutput):
    """The manifest: a stage's output plus status, timings, versions and its MLflow run."""

    stage: str
    status: Literal["succeeded", "failed"]
    exit_code: int
    error: str | None = None
    started_at: datetime
    finished_at: datetime
    duration_s: float
    versions: dict[str, str] = Field(default_factory=dict)
    mlflow_run_id: str | None = None


@functools.cache
def git_commit() -> str:
    """The code's commit: $GIT_COMMIT (baked into images) or ``git rev-parse`` in a checkout."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


@functools.cache
def versions() -> dict[str, str]:
    """Python, the key packages that are installed, and the git commit."""
    found = {"python": platform.python_version(), "git_commit": git_commit()}
    for package in _REPORTED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def jsonl(rows: Iterable[dict]) -> bytes:
    """Rows as JSON lines, UTF-8 (non-ASCII kept readable)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
