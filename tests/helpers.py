"""Helpers the tests share: repository paths, stage and module runners, small builders.

Fixtures live in ``conftest.py``; these are plain functions and constants a test imports.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from docpipe.config import S3Config
from docpipe.contract import config_flags

ROOT = Path(__file__).resolve().parents[1]


PIPELINE = ROOT / "configs" / "pipeline.yaml"


EMBEDDED = ROOT / "configs" / "overlays" / "embedded.yaml"


SMOKE = ROOT / "tests" / "fixtures" / "smoke.yaml"  # machinery tests: a few steps, no fit gate


SHARED = Path(os.environ.get("SHARED_DIR", ROOT.parent / "shared"))  # CI clones with shared/ beside the repo


SROIE = SHARED / "data" / "sroie-sample"


LOCAL_BASE = "localhost/debian-base:bookworm"  # docker/local-base.sh; stands in for python:3.11-slim-bookworm


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environ_without_mlflow() -> dict[str, str]:
    """This process's environment minus MLFLOW_*: mlflow.set_tracking_uri() exports
    MLFLOW_TRACKING_URI, which would leak one test's store into another's subprocess."""
    return {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}


def run_module(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, as a launcher would run it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**_environ_without_mlflow(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def wait_for_http(url: str, alive: Callable[[], bool], timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200; fail early once ``alive()`` says the server died."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if not alive() or time.monotonic() > deadline:
            pytest.fail(f"{url} did not come up")
        time.sleep(0.25)


STAGE_IMAGE = "localhost/doc-extraction/stages:test"


TRAIN_IMAGE = "localhost/doc-extraction/train:test"


REMOTE_CODE = ROOT / "tests" / "fixtures" / "remote_code"  # model code we wrote to MiniCPM-V 2.6's interface


def build_remote_code_model(output: Path) -> Path:
    """A tiny checkpoint whose modeling and processing code ships in its folder (``auto_map``), as
    MiniCPM-V 2.6's does: the code of ``tests/fixtures/remote_code``, random weights, the tiny
    model's tokenizer with the ``<unk>`` the processor fills image slices with."""
    import torch
    from transformers import AutoConfig, AutoModel

    from toolkit.tiny_model import build_tokenizer

    output.mkdir(parents=True)
    for code in REMOTE_CODE.glob("*.py"):
        shutil.copy(code, output / code.name)
    tokenizer = build_tokenizer(ROOT / "configs" / "doctypes")
    tokenizer.add_special_tokens({"unk_token": "<unk>"})
    tokenizer.save_pretrained(output)
    config = {
        "model_type": "tiny_minicpmv",
        "architectures": ["TinyMiniCPMV"],
        "version": 2.6,
        "auto_map": {
            "AutoConfig": "configuration_tiny_minicpmv.TinyMiniCPMVConfig",
            "AutoModel": "modeling_tiny_minicpmv.TinyMiniCPMV",
        },
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
        "query_num": 4,
        "patch_size": 14,
        "slice_size": 28,
        "vision_hidden": 32,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    (output / "config.json").write_text(json.dumps(config))
    processor = {"AutoProcessor": "processing_tiny_minicpmv.TinyMiniCPMVProcessor"}
    (output / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "TinyMiniCPMVImageProcessor",
                "slice_size": 28,
                "patch_size": 14,
                "query_num": 4,
                "max_slice_nums": 9,
                "auto_map": {
                    "AutoImageProcessor": "image_processing_tiny_minicpmv.TinyMiniCPMVImageProcessor",
                    **processor,
                },
            }
        )
    )
    (output / "processor_config.json").write_text(
        json.dumps({"processor_class": "TinyMiniCPMVProcessor", "auto_map": processor})
    )
    torch.manual_seed(0)
    AutoModel.from_config(
        AutoConfig.from_pretrained(output, trust_remote_code=True), trust_remote_code=True
    ).save_pretrained(output)
    return output


def run_stage(stage: str, config_paths: list[Path], *args: str) -> int:
    """A stage's CLI in this process (flags, tracking, result.json), as ``python -m`` would run it."""
    import importlib

    from docpipe.contract import main

    module = importlib.import_module(f"stages.{stage}")
    if hasattr(module, "__path__"):  # a package: the stage lives in its __main__
        module = importlib.import_module(f"stages.{stage}.__main__")
    return main(module.STAGE, module.build_parser(), module.run, [*config_flags(config_paths), *args])


def jpeg(seed: int = 0, size=(96, 64), **save_args) -> bytes:
    """A small, valid JPEG of seeded noise: another seed, another document."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", **save_args)
    return buffer.getvalue()


def land_synthetic(
    location: Path | str, count: int, seed: int = 0, doc_types: list[str] | None = None, s3: S3Config | None = None
) -> str:
    """A completed landing batch of ``count`` synthetic documents (every type unless named; "other" names
    pages of none of them); its URI."""
    from docpipe.config import SyntheticConfig
    from docpipe.data.landing import write_batch
    from docpipe.doctypes import load_registry
    from docpipe.storage import open_storage
    from toolkit.synthetic import generate

    registry = load_registry(ROOT / "configs" / "doctypes")
    chosen = [registry.get(name) for name in doc_types] if doc_types else list(registry.values())  # other: None
    store = open_storage(location, s3)
    write_batch(
        store,
        [(r, image) for r, image, _ in generate(chosen, SyntheticConfig(count=count, seed=seed))],
        producer="test",
    )
    return store.uri


def write_overlay(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def finetune(config: list[Path], exported: Path, out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    """The stage as the DAG's local launcher runs it: its own process."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.finetune",
            *config_flags(config),
            "--data",
            str(exported),
            "--output",
            str(out),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, **env},
    )


def embedded_configs(folder: Path) -> list[Path]:
    """Config files for the embedded default as shipped, with every location inside ``folder``."""
    path = folder / "test-overlay.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "doctypes_dir": str(ROOT / "configs" / "doctypes"),
                "storage": {
                    "landing_uri": str(folder / "landing"),
                    "datasets_uri": str(folder / "datasets"),
                    "runs_uri": str(folder / "runs"),
                },
                "tracking": {
                    "tracking_uri": f"sqlite:///{folder}/mlflow/mlflow.db",
                    "artifact_location": str(folder / "mlflow" / "artifacts"),
                },
                "model": {"base": str(folder / "models" / "tiny-minicpmv4_6")},  # the demo builds it there
            }
        )
    )
    return [PIPELINE, EMBEDDED, path]


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, every: float = 1.0) -> Any:
    """Poll ``condition`` until it returns something truthy, and return it; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def airflow_api(url: str, path: str, token: str | None = None, body: dict | None = None) -> dict:
    """One call to an Airflow API server (a POST when ``body`` is given), its JSON answer."""
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(f"{url}{path}", data=data, headers=headers), timeout=10) as r:
        return json.loads(r.read())
