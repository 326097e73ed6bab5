"""The memory plan (docpipe/model/memory_plan.py): DeepSpeed's estimators, the practitioners' data point,
parameter counts from safetensors headers (a folder and S3), and the plan task's refusal."""

from __future__ import annotations

import shutil

import pytest

from docpipe.config import load_pipeline_config
from docpipe.loader import ConfigError
from docpipe.model import memory_plan
from docpipe.model.memory_plan import MINICPM_V_2_6, Layout, estimate, nearest_fit
from docpipe.orchestration.plan import check_memory
from tests.helpers import PIPELINE

RECIPE = Layout(deepspeed="zero2_offload", batch=4, tokens=2048, slices=10, gpus_per_node=4, nodes=1)


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("gpus", [1, 4, 8])
def test_model_states_are_deepspeeds_own_estimates(gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape, layout = MINICPM_V_2_6, RECIPE.model_copy(update={"gpus_per_node": gpus, "nodes": nodes})
    for option, offload in (("zero2", False), ("zero2_offload", True)):
        expected = estimate_zero2_model_states_mem_needs(shape.parameters, gpus, nodes, cpu_offload=offload)
        assert memory_plan.model_states(shape, layout.model_copy(update={"deepspeed": option})) == expected
    host, gpu, _ = estimate_zero3_model_states_mem_needs(
        shape.parameters, shape.largest_tensor, gpus, nodes, cpu_offload=False, zero_init=False
    )
    assert memory_plan.model_states(shape, layout.model_copy(update={"deepspeed": "zero3"})) == (host, gpu)


def test_the_practitioners_8b_fits_four_48gb_gpus_only_with_zero2_offload():
    """They fully finetuned MiniCPM-V 2.6 on 4 x 48 GB with ZeRO-2, CPU offload and batch 4."""
    fits = estimate(MINICPM_V_2_6, RECIPE, gpu_gib=48)
    assert fits.fits and 30 < fits.gpu_gib < 48
    without_offload = estimate(MINICPM_V_2_6, RECIPE.model_copy(update={"deepspeed": "zero2"}), gpu_gib=48)
    assert not without_offload.fits and without_offload.model_states_gib > 48
    near = nearest_fit(MINICPM_V_2_6, without_offload.layout, 48, None)
    assert near.layout == RECIPE  # the nearest plan that fits is theirs
    assert "ZeRO-2 without offload, batch 4 x 2048 tokens on 1 x 4 GPUs of 48 GiB" in without_offload.describe()


def test_parameters_are_counted_from_safetensors_headers_in_a_folder_and_on_s3(tiny_model, s3_config, bucket):
    import boto3
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    local = memory_plan.tensor_sizes(str(tiny_model), s3_config)
    assert sum(local.values()) == sum(p.numel() for p in model.state_dict().values())
    s3 = boto3.client("s3", endpoint_url=s3_config.endpoint_url)
    for path in tiny_model.iterdir():
        s3.upload_file(str(path), bucket, f"models/tiny/{path.name}")
    assert memory_plan.tensor_sizes(f"s3://{bucket}/models/tiny", s3_config) == local


def test_the_plan_refuses_a_layout_that_cannot_fit_and_names_the_nearest_that_does(tiny_model, tmp_path):
    import json

    model_config = json.loads((tiny_model / "config.json").read_text())
    big = {
        "model": {"base": str(tiny_model)},
        "training": {
            "deepspeed": "zero2",
            "per_device_train_batch_size": 64,
            "model_max_length": 65536,
            "launch": {"gpu_memory_gib": 8},
        },
    }
    config = load_pipeline_config([PIPELINE], big)
    with pytest.raises(ConfigError) as refused:
        check_memory(config, model_config, gpus=4, nodes=1)
    message = str(refused.value)
    assert message.startswith("memory plan: ZeRO-2 without offload, batch 64 x 65536 tokens on 1 x 4 GPUs of 8 GiB")
    assert "nearest that fits:" in message and "gradient_accumulation_steps:" in message
    assert "per GPU" in (check_memory(config, model_config, gpus=0, nodes=1) or "")  # CPU runs are not refused
    small = load_pipeline_config([PIPELINE], {**big, "training": {"launch": {"gpu_memory_gib": 80}}})
    assert "ZeRO-2 with CPU offload" in check_memory(small, model_config, gpus=4, nodes=1)
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_model, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    nothing = load_pipeline_config([PIPELINE], {"model": {"base": str(weightless)}})
    assert check_memory(nothing, model_config, gpus=4, nodes=1) is None  # no weights to count: nothing to say
