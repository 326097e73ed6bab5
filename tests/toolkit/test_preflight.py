"""``python -m toolkit.preflight``, what a user runs first on a base model, on a checkpoint whose code
was written for transformers 4.x, as the published MiniCPM-V 2.6's was. Its passing run, on a
tiny checkpoint whose code ships beside its weights (ours, to 2.6's interface), is the training
image's test in ``test_containers.py``: the command the README gives, where it is meant to run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from docpipe.contract import config_flags
from tests.helpers import EMBEDDED, PIPELINE, ROOT, write_overlay
from toolkit.preflight import PIPELINE_STAGES, transformers_imports

REMOTE = "model: {adapter: remote_code, llm_type: qwen2}\n"


def preflight(configs: list[Path], base: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "toolkit.preflight",
        *config_flags(configs),
        "--base",
        str(base),
        "--output",
        str(out),
        *extra,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_the_imports_of_a_checkpoints_code_are_found_where_they_are_written():
    code = "import os\nfrom transformers import AutoModel, Qwen2Config\nimport transformers.utils\nfrom .x import y\n"
    assert transformers_imports({"modeling.py": code}) == [
        ("modeling.py", 2, "transformers.AutoModel"),
        ("modeling.py", 2, "transformers.Qwen2Config"),
        ("modeling.py", 3, "transformers.utils"),
    ]


def test_a_hub_cache_snapshot_is_read_through_its_links(tmp_path):
    """A hub cache's snapshot folder links every file to a blob outside it; transformers follows them."""
    from docpipe.config import ModelConfig, S3Config
    from docpipe.model.compatibility import check_base_model
    from toolkit.preflight import check_imports

    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir(), snapshot.mkdir(parents=True)
    (blobs / "1").write_text("from transformers import AutoModel\n")
    (blobs / "2").write_text('{"model_type": "minicpmv4_6"}')
    (snapshot / "modeling_x.py").symlink_to(blobs / "1")
    (snapshot / "config.json").symlink_to(blobs / "2")
    assert check_imports(str(snapshot), S3Config()) == "1 transformers imports in 1 files all resolve"
    assert check_base_model(ModelConfig(base=str(snapshot)), S3Config()) == {"model_type": "minicpmv4_6"}


@pytest.mark.integration
def test_preflight_names_what_a_4x_era_checkpoint_needs_and_runs_no_stage(remote_code_model, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(remote_code_model, old)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "transformers_version": "4.40.0"}))
    (old / "tokenization_tiny_minicpmv_fast.py").write_text(
        "from transformers.models.qwen2.tokenization_qwen2_fast import Qwen2TokenizerFast\n"
    )  # what the published 2.6 tokenizer imports, gone in transformers 5
    configs = [PIPELINE, EMBEDDED, write_overlay(tmp_path, "remote.yaml", REMOTE)]
    done = preflight(configs, old, tmp_path / "preflight")
    assert done.returncode == 1
    checks = {c["name"]: c for c in json.loads((tmp_path / "preflight" / "preflight.json").read_text())["checks"]}
    assert (
        checks["environment"]["status"] == "failed"
        and "written for transformers 4.40.0" in checks["environment"]["detail"]
    )
    assert checks["imports"]["status"] == "failed"
    assert (
        "tokenization_tiny_minicpmv_fast.py:1 transformers.models.qwen2.tokenization_qwen2_fast"
        in checks["imports"]["detail"]
    )
    assert {checks[stage]["status"] for stage in PIPELINE_STAGES} == {"skipped"}
    assert "preflight failed" in done.stdout
