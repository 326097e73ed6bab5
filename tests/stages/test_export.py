"""Annotation export: MiniCPM-V conversations whose answers match each type's schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from docpipe.config import load_pipeline_config
from docpipe.doctypes import load_registry
from docpipe.routing import Routing
from tests.helpers import ROOT, land_synthetic, run_stage, write_overlay

REGISTRY = load_registry(ROOT / "configs" / "doctypes")
TYPE_GIVEN = "export: {routing: false}\n"


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
    variants = write_overlay(tmp_path, "variants.yaml", "export: {prompt_variants: true, routing: false}\n")
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
            assert example["routed"] is False
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
    assert "這是哪一種文件" in text and "高鐵票" in text
    assert "\\u" not in text


def test_routed_documents_are_asked_without_their_type_and_other_pages_answer_other(overlay, tmp_path):
    land_synthetic(tmp_path / "landing", 30, seed=5, doc_types=["thsr_ticket", "receipt_en", "other"])
    assert run_stage("ingest", overlay, "--output", str(tmp_path / "ds"), "--batch", str(tmp_path / "landing")) == 0
    code, result = export(overlay, tmp_path / "ds", tmp_path / "export")
    assert code == 0 and result["metrics"]["routed"] == 1.0
    config = load_pipeline_config(overlay)
    routing = Routing.of(REGISTRY, config.doc_types, config.export.routing_prompt)
    schema = json.loads((tmp_path / "export" / "schemas" / "routed.json").read_text())
    assert schema == routing.answer_schema()
    examples = [*json.loads((tmp_path / "export" / "train.json").read_text())]
    examples += json.loads((tmp_path / "export" / "eval.json").read_text())
    assert len(examples) == 30 and {e["doc_type"] for e in examples} == {"thsr_ticket", "receipt_en", "other"}
    for example in examples:
        user, assistant = example["conversations"]
        answer = json.loads(assistant["content"])
        assert example["routed"] is True and user["content"] == routing.prompt  # nothing in the text tells the type
        jsonschema.validate(answer, schema)
        if example["doc_type"] == "other":
            assert answer == {"doc_type": "other"}
        else:
            assert list(answer) == ["doc_type", *(f.name for f in REGISTRY[example["doc_type"]].fields)]
            assert answer["doc_type"] == example["doc_type"]
    # Asked with their types, pages of none of them have no prompt to answer: left out, and counted.
    given = write_overlay(tmp_path, "given.yaml", TYPE_GIVEN)
    code, result = export([*overlay, given], tmp_path / "ds", tmp_path / "given")
    assert (
        code == 0
        and result["counts"]["skipped_other"] == 10
        and result["counts"]["train"] + result["counts"]["eval"] == 20
    )


def test_image_paths_are_mapped_for_the_training_container(overlay, dataset, tmp_path):
    mapped = write_overlay(
        tmp_path, "mapped.yaml", "export: {image_root: /data/datasets/, prompt_variants: false, routing: false}\n"
    )
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
    assert sorted(p.name for p in (tmp_path / "export" / "schemas").iterdir()) == ["receipt_en.json", "routed.json"]
    routed = json.loads((tmp_path / "export" / "schemas" / "routed.json").read_text())
    assert [branch["properties"]["doc_type"]["const"] for branch in routed["anyOf"]] == ["receipt_en", "other"]


def test_missing_dataset_or_version_is_bad_input(overlay, dataset, tmp_path):
    code, result = export(overlay, tmp_path / "empty", tmp_path / "e1")
    assert code == 2 and "no dataset version yet (run stages.ingest first)" in result["error"]
    code, result = export(overlay, dataset, tmp_path / "e2", "--version", "0123456789abcdef")
    assert code == 2 and "dataset version '0123456789abcdef' not found" in result["error"]
