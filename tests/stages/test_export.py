"""Annotation export: MiniCPM-V conversations whose answers match each type's schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from docpipe.doctypes import load_registry
from tests.helpers import ROOT, land_synthetic, run_stage, write_overlay

REGISTRY = load_registry(ROOT / "configs" / "doctypes")


@pytest.fixture
def dataset(overlay, tmp_path) -> Path:
    """A dataset version of 40 synthetic documents of every type."""
    land_synthetic(tmp_path / "landing", 40, seed=2)
    assert run_stage("ingest", overlay, "--output", str(tmp_path / "ds"), "--batch", str(tmp_path / "landing")) == 0
    return tmp_path / "ds"


def export(config: list[Path], dataset: Path, out: Path, *extra: str) -> tuple[int, dict]:
    code = run_stage("export", config, "--dataset", str(dataset), "--output", str(out), *extra)
    return code, json.loads((out / "result.json").read_text())


def test_conversations_follow_the_finetune_format(overlay, dataset, tmp_path):
    variants = write_overlay(tmp_path, "variants.yaml", "export: {prompt_variants: true}\n")
    code, result = export([*overlay, variants], dataset, tmp_path / "export")
    assert code == 0
    train = json.loads((tmp_path / "export" / "train.json").read_text())
    evaluation = json.loads((tmp_path / "export" / "eval.json").read_text())
    assert len(train) + len(evaluation) == 40 and train and evaluation
    assert {e["id"] for e in train}.isdisjoint({e["id"] for e in evaluation})
    for split, examples in (("train", train), ("eval", evaluation)):
        for example in examples:
            user, assistant = example["conversations"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert user["content"].startswith("<image>\n")
            assert Path(example["image"]).is_file() and example["image"].startswith(str(dataset.resolve()))
            answer = json.loads(assistant["content"])
            doc_type = REGISTRY[example["doc_type"]]
            assert user["content"] in (doc_type.prompt, *doc_type.prompt_variants)
            schema = json.loads((tmp_path / "export" / "schemas" / f"{doc_type.id}.json").read_text())
            jsonschema.validate(answer, schema)
            assert list(answer) == [f.name for f in doc_type.fields]
            if split == "eval":
                assert user["content"] == doc_type.prompt
    assert any(
        e["conversations"][0]["content"] != d.prompt
        for e in train
        for d in REGISTRY.values()
        if e["conversations"][0]["content"] in d.prompt_variants
    )
    assert result["counts"]["train"] == len(train) and result["inputs"]["version"]


def test_non_ascii_is_kept_in_the_files(overlay, dataset, tmp_path):
    export(overlay, dataset, tmp_path / "export")
    text = (tmp_path / "export" / "train.json").read_text(encoding="utf-8")
    assert "如果這是" in text or "請擷取" in text
    assert "\\u" not in text


def test_image_paths_are_mapped_for_the_training_container(overlay, dataset, tmp_path):
    mapped = write_overlay(tmp_path, "mapped.yaml", "export: {image_root: /data/datasets/, prompt_variants: false}\n")
    export([*overlay, mapped], dataset, tmp_path / "export")
    train = json.loads((tmp_path / "export" / "train.json").read_text())
    assert all(e["image"].startswith("/data/datasets/images/") for e in train)
    prompts = {d.prompt for d in REGISTRY.values()}
    assert all(e["conversations"][0]["content"] in prompts for e in train)


def test_export_is_deterministic(overlay, dataset, tmp_path):
    export(overlay, dataset, tmp_path / "a")
    export(overlay, dataset, tmp_path / "b")
    for name in ("train.json", "eval.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_only_configured_doc_types_are_exported(overlay, dataset, tmp_path):
    only = write_overlay(tmp_path, "only.yaml", "doc_types: [receipt_en]\n")
    code, result = export([*overlay, only], dataset, tmp_path / "export")
    assert code == 0 and result["counts"]["skipped_doc_type"] == 30
    assert [p.name for p in (tmp_path / "export" / "schemas").iterdir()] == ["receipt_en.json"]


def test_missing_dataset_or_version_is_bad_input(overlay, dataset, tmp_path):
    code, result = export(overlay, tmp_path / "empty", tmp_path / "e1")
    assert code == 2 and "no dataset version yet (run stages.ingest first)" in result["error"]
    code, result = export(overlay, dataset, tmp_path / "e2", "--version", "0123456789abcdef")
    assert code == 2 and "dataset version '0123456789abcdef' not found" in result["error"]
