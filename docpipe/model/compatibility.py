"""Whether a base model can run in this pipeline's environment, decided from its ``config.json``
before anything is launched (the plan task, ``toolkit.preflight``).

Training, evaluation and serving share one transformers (``TRANSFORMERS_VERSION``). Native
families are the MiniCPM-V model types it implements. A remote-code checkpoint brings its own
modeling and processing code, written against the transformers of its day, which its
``config.json`` records (``transformers_version``): code written for another major version is
refused, because transformers 5 removed or renamed what 4.x-era code imports (MiniCPM-V 2.6's
tokenizer subclasses ``transformers.models.qwen2.tokenization_qwen2_fast``, gone in 5.x), and
such a checkpoint would fail hours into a GPU booking, or train with a processor that behaves
differently. Light on purpose: the DAG's plan task imports it (no torch or transformers).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from docpipe.config import ModelConfig, S3Config
from docpipe.loader import ConfigError

TRANSFORMERS_VERSION = "5.20.2"  # pyproject's pin for the training, evaluation and serving images
NATIVE_MODEL_TYPES = ("minicpmv4_6", "minicpmv4_7")  # the MiniCPM-V families this transformers implements
VERSION_LLM_TYPE = {2.0: "minicpm", 2.5: "llama3", 2.6: "qwen2"}  # config.json "version" of each release
PREFLIGHT = "make preflight BASE=<folder or s3:// URI>"
WAY_OUT = (
    f"use a native family, MiniCPM-V 4.6 or 4.7 (model types {', '.join(NATIVE_MODEL_TYPES)}; model.adapter: "
    "native), or port the checkpoint's "
    f"code to transformers {TRANSFORMERS_VERSION.split('.')[0]}.x, prove it with `{PREFLIGHT}` in the training "
    "image, and record the version it passed with as config.json's transformers_version"
)


class IncompatibleModel(ConfigError):
    """The base model cannot run in this environment; the message says why and the way out."""


def model_files(base: str, s3: S3Config, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The files at the top of the model folder or s3:// URI whose names are ``wanted``, by name. A
    local folder is read as transformers reads it, links followed (a hub cache's snapshot links
    every file to its blob)."""
    from docpipe.storage import open_storage

    if "://" in base:
        store = open_storage(base, s3)
        return {key: store.read_bytes(key) for key in store.list() if "/" not in key and wanted(key)}
    folder = Path(base)
    if not folder.is_dir():
        return {}
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file() and wanted(path.name)}


def read_model_config(base: str, s3: S3Config) -> dict[str, Any]:
    """The base model's ``config.json`` from its folder or s3:// URI."""
    from docpipe.storage import StorageError

    where = f"{base.rstrip('/')}/config.json"
    try:
        data = model_files(base, s3, lambda name: name == "config.json").get("config.json")
    except (StorageError, OSError) as exc:
        raise IncompatibleModel(f"model.base: {where} could not be read: {exc}") from None
    if data is None:
        raise IncompatibleModel(
            f"model.base: {where} does not exist (the scheduler must see the base model too: "
            "mount its folder or use an s3:// URI)"
        )
    try:
        config = json.loads(data)
    except ValueError as exc:
        raise IncompatibleModel(f"model.base: {where} is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise IncompatibleModel(f"model.base: {where} is not a JSON object")
    return config


def _major(version: str) -> int | None:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else None


def problems(config: dict[str, Any], model: ModelConfig) -> list[str]:
    """Why a model with this ``config.json`` cannot run with ``model``'s adapter here; empty when it can."""
    found = []
    model_type, auto_map = config.get("model_type"), config.get("auto_map") or {}
    if model.adapter == "native":
        if model_type not in NATIVE_MODEL_TYPES:
            found.append(
                f"model_type {model_type!r} is not a MiniCPM-V family native in transformers "
                f"{TRANSFORMERS_VERSION} ({', '.join(NATIVE_MODEL_TYPES)})"
            )
            if auto_map:
                found.append("it ships its own code (auto_map): that is model.adapter: remote_code, with its llm_type")
        return found
    if "AutoModel" not in auto_map:
        found.append("config.json's auto_map names no AutoModel: not a remote-code MiniCPM-V checkpoint")
    recorded = str(config.get("transformers_version") or "")
    major, pinned = _major(recorded), _major(TRANSFORMERS_VERSION)
    if not recorded:
        found.append(
            "config.json records no transformers_version: which transformers its code was written for is unknown"
        )
    elif major != pinned:
        found.append(
            f"its code was written for transformers {recorded} (config.json's transformers_version); this "
            f"pipeline trains, evaluates and serves with {TRANSFORMERS_VERSION}, and code written for another "
            "major version does not run there (transformers 5 removed or renamed what 4.x-era remote code "
            "imports: MiniCPM-V 2.6's tokenizer needs transformers.models.qwen2.tokenization_qwen2_fast)"
        )
    if contradiction := llm_type_contradiction(config, model.llm_type):
        found.append(contradiction)
    return found


def llm_type_contradiction(config: dict[str, Any], llm_type: str | None) -> str | None:
    """Why ``llm_type`` does not fit a checkpoint whose ``config.json`` names its release, or None."""
    expected = VERSION_LLM_TYPE.get(config.get("version"))
    if expected and expected != llm_type:
        return (
            f"llm_type {llm_type!r} does not fit this checkpoint: its config.json says version "
            f"{config['version']}, whose LLM type is {expected!r}"
        )
    return None


def check_base_model(model: ModelConfig, s3: S3Config) -> dict[str, Any]:
    """The base model's ``config.json`` when it can run here; else ``IncompatibleModel`` with every
    reason and the way out."""
    config = read_model_config(model.base, s3)
    found = problems(config, model)
    if found:
        raise IncompatibleModel(
            f"model.base {model.base} (adapter {model.adapter}) cannot run in this pipeline's "
            f"environment: {'; '.join(found)}. Way out: {WAY_OUT}"
        )
    return config
