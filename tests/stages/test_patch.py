"""The patch stage: a checkpoint becomes a model folder that loads and generates, with nothing
of the base model or the checkpoint changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stages.patch import assemble
from tests.helpers import run_stage, write_overlay

TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin")


@pytest.fixture
def checkpoint(tiny_model, tmp_path) -> Path:
    """A Trainer checkpoint as it is saved (weights, config and training state, no processor
    files) inside a finetune output that holds the run's examples."""
    folder = tmp_path / "finetune" / "checkpoint-6"
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model / name, folder / name)
    for name in TRAINING_STATE:
        (folder / name).write_bytes(b"state")
    (tmp_path / "finetune" / "data").mkdir()
    Image.new("RGB", (300, 400), "white").save(tmp_path / "finetune" / "data" / "doc.png")
    example = {
        "id": "doc",
        "image": str(tmp_path / "finetune" / "data" / "doc.png"),
        "conversations": [{"role": "user", "content": "<image>\n請回傳"}, {"role": "assistant", "content": "{}"}],
    }
    (tmp_path / "finetune" / "data" / "eval.json").write_text(json.dumps([example]))
    return folder


@pytest.fixture
def config(overlay, tiny_model, tmp_path) -> list[Path]:
    return [*overlay, write_overlay(tmp_path, "model.yaml", f"model: {{base: {tiny_model}}}\n")]


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_patched_checkpoint_loads_and_generates(config, checkpoint, tiny_model, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from docpipe.model.adapters.native import chat, image_only_processor

    before = (_listing(checkpoint), _listing(tiny_model))
    out = tmp_path / "patched"
    assert run_stage("patch", config, "--checkpoint", str(checkpoint), "--output", str(out)) == 0
    assert (_listing(checkpoint), _listing(tiny_model)) == before  # originals untouched
    report = json.loads((out / "patch.json").read_text())
    assert {"preprocessor_config.json", "tokenizer.json", "chat_template.jinja"} <= set(report["from_base"])
    assert not any((out / name).exists() for name in TRAINING_STATE)
    for name, digest in {**report["from_checkpoint"], **report["from_base"]}.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert report["example"]["id"] == "doc" and isinstance(report["example"]["answer"], str)
    assert load_file(out / "model.safetensors").keys() == load_file(checkpoint / "model.safetensors").keys()

    # Loads from the folder alone, as serving would, and answers.
    tokenizer, images = AutoTokenizer.from_pretrained(out), AutoImageProcessor.from_pretrained(out, backend="pil")
    processor = image_only_processor("minicpmv4_6", images, tokenizer)
    model = AutoModelForImageTextToText.from_pretrained(out)
    text = processor.apply_chat_template(chat("<image>\n請回傳"), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[Image.new("RGB", (200, 300), "white")]], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("choice", ["best", "latest"])
def test_patch_takes_the_configured_checkpoint_of_a_finetune_run(config, checkpoint, tmp_path, choice):
    latest = checkpoint.parent / "checkpoint-12"
    shutil.copytree(checkpoint, latest)
    outputs = {"best_checkpoint": str(checkpoint), "last_checkpoint": str(latest)}
    (checkpoint.parent / "result.json").write_text(json.dumps({"status": "succeeded", "outputs": outputs}))
    choose = write_overlay(tmp_path, "choose.yaml", f"patch: {{checkpoint: {choice}}}\n")
    code = run_stage("patch", [*config, choose], "--finetune", str(checkpoint.parent), "--output", str(tmp_path / "p"))
    assert code == 0
    expected = checkpoint if choice == "best" else latest
    assert json.loads((tmp_path / "p" / "patch.json").read_text())["checkpoint"] == str(expected)


def test_weights_that_do_not_fit_the_model_fail_the_stage(config, checkpoint, tmp_path):
    weights = load_file(checkpoint / "model.safetensors")
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, checkpoint / "model.safetensors")
    out = tmp_path / "patched"
    assert run_stage("patch", config, "--checkpoint", str(checkpoint), "--output", str(out)) == 1
    result = json.loads((out / "result.json").read_text())
    assert "the weights do not fit the model" in result["error"] and dropped in result["error"]


def test_bad_sources_are_bad_input(config, checkpoint, tmp_path):
    (checkpoint.parent / "result.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    assert run_stage("patch", config, "--finetune", str(checkpoint.parent), "--output", str(tmp_path / "a")) == 2
    assert "did not succeed (boom)" in json.loads((tmp_path / "a" / "result.json").read_text())["error"]
    assert run_stage("patch", config, "--checkpoint", str(tmp_path), "--output", str(tmp_path / "b")) == 2
    assert "not a checkpoint (no config.json)" in json.loads((tmp_path / "b" / "result.json").read_text())["error"]


def test_remote_code_files_and_config_keys_come_back_from_the_base(tmp_path):
    """MiniCPM-V 2.6 checkpoints lose processing_minicpmv.py & co; serving needs auto_map and version as shipped."""
    base, checkpoint = tmp_path / "base", tmp_path / "checkpoint-10"
    base.mkdir(), checkpoint.mkdir()
    auto_map = {"AutoModel": "modeling_minicpmv.MiniCPMV", "AutoConfig": "configuration_minicpm.MiniCPMVConfig"}
    (base / "config.json").write_text(json.dumps({"version": 2.6, "auto_map": auto_map, "hidden_size": 8}))
    for name in (
        "processing_minicpmv.py",
        "image_processing_minicpmv.py",
        "modeling_minicpmv.py",
        "preprocessor_config.json",
        "tokenizer_config.json",
    ):
        (base / name).write_text(name)
    (checkpoint / "config.json").write_text(json.dumps({"version": 2.5, "hidden_size": 8}))
    save_file({"w": torch.zeros(1)}, checkpoint / "model.safetensors")
    from docpipe.model.adapters.remote_code import RemoteCodeAdapter

    report = assemble(checkpoint, base, RemoteCodeAdapter.processor_files, tmp_path / "out")
    assert {"processing_minicpmv.py", "image_processing_minicpmv.py", "preprocessor_config.json"} <= set(
        report["from_base"]
    )
    patched = json.loads((tmp_path / "out" / "config.json").read_text())
    assert patched == {"version": 2.6, "auto_map": auto_map, "hidden_size": 8}
    assert report["config_restored"] == {"version": 2.6, "auto_map": auto_map}
    assert json.loads((checkpoint / "config.json").read_text())["version"] == 2.5  # the checkpoint is untouched
