"""Whether a base model can run in the pipeline's environment, from its config.json alone: the
plan's check before anything is launched (``docpipe.model.compatibility``)."""

from __future__ import annotations

import json
import re
import tomllib

import boto3
import pytest

from docpipe.config import ModelConfig, S3Config
from docpipe.loader import ConfigError
from docpipe.model.compatibility import (
    NATIVE_MODEL_TYPES,
    TRANSFORMERS_VERSION,
    IncompatibleModel,
    check_base_model,
    problems,
)
from tests.helpers import ROOT, free_port

NATIVE = ModelConfig(base="unused")
REMOTE = ModelConfig(base="unused", adapter="remote_code", llm_type="qwen2")
AUTO_MAP = {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV"}
HUB_26 = {"model_type": "minicpmv", "version": 2.6, "auto_map": AUTO_MAP, "transformers_version": "4.40.0"}


def test_the_pin_is_the_installed_transformers_and_the_native_families_are_in_it():
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    assert f"transformers=={TRANSFORMERS_VERSION}" in pinned
    assert transformers.__version__ == TRANSFORMERS_VERSION
    assert set(NATIVE_MODEL_TYPES) <= set(CONFIG_MAPPING_NAMES)


def test_a_native_family_and_remote_code_for_this_major_version_pass():
    assert problems({"model_type": "minicpmv4_6", "transformers_version": "5.20.2"}, NATIVE) == []
    assert problems({**HUB_26, "transformers_version": "5.20.2"}, REMOTE) == []


@pytest.mark.parametrize(
    ("config", "model", "reasons"),
    [
        (HUB_26, REMOTE, [r"written for transformers 4\.40\.0 .*tokenization_qwen2_fast"]),
        (HUB_26, NATIVE, [r"model_type 'minicpmv' is not a MiniCPM-V family native", r"ships its own code"]),
        ({**HUB_26, "transformers_version": None}, REMOTE, ["records no transformers_version"]),
        ({**HUB_26, "transformers_version": "6.0.0"}, REMOTE, ["written for transformers 6.0.0"]),
        ({**HUB_26, "auto_map": {"AutoConfig": "c.C"}, "transformers_version": "5.1.0"}, REMOTE, ["no AutoModel"]),
        ({**HUB_26, "version": 2.5, "transformers_version": "5.1.0"}, REMOTE, ["version 2.5, whose LLM type is"]),
        ({"model_type": "minicpm_ocr"}, NATIVE, ["'minicpm_ocr' is not a MiniCPM-V family native"]),
    ],
)
def test_what_cannot_run_here_is_refused_with_every_reason(config, model, reasons):
    found = problems(config, model)
    assert len(found) == len(reasons)
    for problem, reason in zip(found, reasons, strict=True):
        assert re.search(reason, problem), problem


def test_the_refusal_names_the_model_the_reason_and_the_way_out(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_26))
    with pytest.raises(IncompatibleModel) as refused:
        check_base_model(REMOTE.model_copy(update={"base": str(tmp_path)}), S3Config())
    message = str(refused.value)
    assert isinstance(refused.value, ConfigError)  # the plan fails as for any bad configuration
    assert message.startswith(f"model.base {tmp_path} (adapter remote_code) cannot run")
    assert "Way out: use a native family, MiniCPM-V 4.6" in message and "make preflight BASE=" in message


@pytest.mark.parametrize(
    ("content", "reason"), [(None, "does not exist"), ("{not json", "is not JSON"), ("[1]", "is not a JSON object")]
)
def test_an_unreadable_config_json_is_refused_naming_it(tmp_path, content, reason):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(IncompatibleModel, match=f"model.base: {re.escape(str(tmp_path))}/config.json {reason}"):
        check_base_model(NATIVE.model_copy(update={"base": str(tmp_path)}), S3Config())


@pytest.mark.integration
def test_the_config_is_read_from_s3_and_a_dead_endpoint_is_a_bounded_refusal(s3_config, bucket):
    s3 = boto3.client("s3", endpoint_url=s3_config.endpoint_url)
    s3.put_object(Bucket=bucket, Key="models/mcpm/config.json", Body=json.dumps({"model_type": "minicpmv4_6"}))
    assert check_base_model(NATIVE.model_copy(update={"base": f"s3://{bucket}/models/mcpm"}), s3_config) == {
        "model_type": "minicpmv4_6"
    }
    with pytest.raises(IncompatibleModel, match=f"s3://{bucket}/models/other/config.json does not exist"):
        check_base_model(NATIVE.model_copy(update={"base": f"s3://{bucket}/models/other"}), s3_config)
    dead = s3_config.model_copy(update={"endpoint_url": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(IncompatibleModel, match="could not be read"):
        check_base_model(NATIVE.model_copy(update={"base": f"s3://{bucket}/models/mcpm"}), dead)


def test_the_models_folder_is_visible_to_the_scheduler_in_compose():
    """The plan reads config.json where the stages will: compose mounts the models into Airflow too."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    scheduler = compose["services"]["airflow-scheduler"]["volumes"]  # LocalExecutor: the plan task runs here
    assert "/models" in {volume.removesuffix(":ro").rsplit(":", 1)[1] for volume in scheduler}
