"""Pipeline configuration: every shipped file validates; bad files fail naming file, key and problem."""

from __future__ import annotations

import pytest

from docpipe.config import load_pipeline_config
from docpipe.loader import ConfigError
from tests.helpers import EMBEDDED, PIPELINE, ROOT


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("overlay", sorted((ROOT / "configs" / "overlays").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_overlay_validates(overlay):
    config = load_pipeline_config([PIPELINE, overlay])
    assert config.doc_types == ["thsr_ticket", "tra_ticket", "einvoice", "receipt_en"]


def test_defaults_mirror_the_practitioner_recipe():
    training = load_pipeline_config([PIPELINE]).training
    assert (training.learning_rate, training.lr_scheduler_type, training.warmup_ratio) == (1e-6, "cosine", 0.01)
    assert (training.weight_decay, training.adam_beta2, training.max_slice_nums) == (0.1, 0.95, 9)
    assert (training.model_max_length, training.per_device_train_batch_size) == (2048, 4)
    assert (training.max_steps, training.eval_steps, training.save_steps, training.save_total_limit) == (
        10000,
        1000,
        2000,
        5,
    )
    assert training.bf16 and training.gradient_checkpointing and training.tune_vision and training.tune_llm


def test_overlay_overrides_only_its_keys():
    base, embedded = load_pipeline_config([PIPELINE]), load_pipeline_config([PIPELINE, EMBEDDED])
    assert embedded.training.max_steps == 300 and embedded.model.base == "data/models/tiny-minicpmv4_6-demo"
    assert embedded.training.weight_decay == base.training.weight_decay  # untouched key kept
    assert embedded.storage == base.storage


def test_invalid_yaml_names_file_and_line(tmp_path):
    bad = write(tmp_path, "bad.yaml", "training:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_pipeline_config([PIPELINE, bad])


def test_duplicate_key_is_refused(tmp_path):
    bad = write(tmp_path, "dup.yaml", "training:\n  max_steps: 5\n  max_steps: 6\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:3:\d+: invalid YAML: duplicate key 'max_steps'"):
        load_pipeline_config([PIPELINE, bad])


def test_top_level_must_be_a_mapping(tmp_path):
    bad = write(tmp_path, "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping at the top level, got list"):
        load_pipeline_config([bad])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: cannot read"):
        load_pipeline_config([tmp_path / "nowhere.yaml"])


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("training:\n  learning_rate: -1\n", "training.learning_rate", "greater than 0"),
        ("training:\n  max_slice_nums: 10\n", "training.max_slice_nums", "less than or equal to 9"),
        ("training:\n  lr_scheduler_type: cosine_restarts\n", "training.lr_scheduler_type", "Input should be"),
        ("training:\n  max_step: 5\n", "training.max_step", "Extra inputs are not permitted"),
        ("training:\n  tune_vision: false\n  tune_llm: false\n", "training", "nothing would be trained"),
        ("model:\n  adapter: remote_code\n", "model", "llm_type is required"),
        ("model:\n  adapter: remote_code\n  llm_type: qwen\n", "model.llm_type", "'qwen2', 'llama3' or 'minicpm'"),
        (
            "evaluation:\n  thresholds: {field_accuracy: 1.5, document_accuracy: 0.9, json_validity: 0.9}\n",
            "evaluation.thresholds.field_accuracy",
            "less than or equal to 1",
        ),
        ("doc_types: [thsr_ticket, bus_ticket]\n", "doc_types", "unknown document type(s) ['bus_ticket']"),
        (
            "evaluation:\n  per_doc_type:\n    nope: {field_accuracy: 1, document_accuracy: 1, json_validity: 1}\n",
            "evaluation",
            "unknown document type(s) ['nope']",
        ),
        (
            "synthetic:\n  degradation:\n    jpeg_quality: [90, 10]\n",
            "synthetic.degradation.jpeg_quality",
            "low <= high",
        ),
    ],
)
def test_bad_value_names_the_overlay_file_and_key(tmp_path, text, key, problem):
    bad = write(tmp_path, "overlay.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_pipeline_config([PIPELINE, bad])
    message = str(caught.value)
    assert f"overlay.yaml: {key}: " in message
    assert problem in message


def test_missing_required_section_names_the_base_file(tmp_path):
    bad = write(tmp_path, "base.yaml", "doc_types: [thsr_ticket]\n")
    with pytest.raises(ConfigError) as caught:
        load_pipeline_config([bad])
    assert "base.yaml: storage: Field required" in str(caught.value)
    assert "base.yaml: tracking: Field required" in str(caught.value)
