"""The finetune stage on the tiny random MiniCPM-V 4.6 (built offline): data handling and the
recipe's known traps, training through torchrun on CPU (DeepSpeed included), resume after a kill.

No GPU here: bf16, CUDA memory and NCCL are not exercised; DeepSpeed runs on its CPU accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import mlflow
import pytest
import torch
from PIL import Image

from docpipe.config import (
    EvaluationConfig,
    ExportConfig,
    S3Config,
    TorchrunLayout,
    TrainingConfig,
    load_pipeline_config,
)
from docpipe.contract import config_flags
from docpipe.data.examples import Example, Sample, read_examples, split_fitting
from docpipe.model.adapters import IGNORE_INDEX, load_adapter
from stages.finetune.__main__ import layout_from_environment, route_node_outputs, torchrun_command
from stages.finetune.train import TrainSpec, checkpoint_problem, latest_checkpoint, training_arguments
from tests.helpers import ROOT, finetune, run_stage, write_overlay

DEEPSPEED = ROOT / "configs" / "deepspeed"


def examples(exported: Path, name: str = "train.json") -> list[Example]:
    return read_examples((exported / name).read_bytes(), name)


def adapter_for(model: Path, **training):
    config = load_pipeline_config([ROOT / "configs" / "pipeline.yaml", ROOT / "configs" / "overlays" / "embedded.yaml"])
    return load_adapter(model, config.model, config.training.model_copy(update=training))


# --- data handling -------------------------------------------------------------------------


def test_labels_cover_only_the_answer(tiny_model, exported):
    adapter = adapter_for(tiny_model)
    batch_examples = examples(exported)[:3]
    samples = [Sample(e, Image.open(e.image).convert("RGB")) for e in batch_examples]
    batch = adapter.collate(samples)
    tokenizer = adapter.processor.tokenizer
    for row, example in enumerate(batch_examples):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX]
        assert tokenizer.decode(kept) == example.answer + "<|im_end|>\n"
        real = int(batch["attention_mask"][row].sum())
        assert (labels[real:] == IGNORE_INDEX).all()  # right padding never trains
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not (batch["labels"] == image_token).any() and (batch["input_ids"] == image_token).any()


@pytest.mark.parametrize("family", ["minicpmv4_6", "minicpmv4_7"])
def test_each_native_family_trains_on_a_batch(family, exported, tmp_path):
    """A tiny model of each native family: forward and backward through the adapter's batch, and
    tune_vision=false keeps the vision encoder's weights out of training."""
    from toolkit.tiny_model import build

    model_dir = build(tmp_path / family, ROOT / "configs" / "doctypes", family=family)
    adapter = adapter_for(model_dir, tune_vision=False)
    model = adapter.load_model(torch.float32)
    samples = [Sample(e, Image.open(e.image).convert("RGB")) for e in examples(exported)[:2]]
    loss = model(**adapter.collate(samples)).loss
    loss.backward()
    assert torch.isfinite(loss) and model.config.model_type == family
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
    assert model.lm_head.weight.grad.abs().sum() > 0 and any(
        p.grad is not None for p in model.model.merger.parameters()
    )


def test_images_keep_their_pixels_for_slicing(tiny_model, exported):
    """A dense document is sliced as max_slice_nums allows, from its full resolution."""
    example = examples(exported)[0]
    big = Sample(example, Image.new("RGB", (1400, 1000), "white"))
    one, nine = adapter_for(tiny_model, max_slice_nums=1), adapter_for(tiny_model, max_slice_nums=9)
    assert nine.length(big) > one.length(big)
    assert nine.collate([big])["target_sizes"].shape[0] == 1 + 9  # the overview plus nine slices


def test_documents_that_do_not_fit_are_listed_not_cut(tiny_model, exported):
    adapter = adapter_for(tiny_model)
    train = examples(exported)
    lengths = sorted(adapter.length(Sample(e, Image.open(e.image).convert("RGB"))) for e in train)
    limit = lengths[len(lengths) // 2]
    fitting, unfit = split_fitting(train, adapter.length, limit, S3Config(), "train")
    assert len(fitting) + len(unfit) == len(train) and unfit
    assert all("tokens > model_max_length" in u.reason for u in unfit)
    broken = train[0].model_copy(update={"image": "/nonexistent/x.jpg"})
    _, unfit = split_fitting([broken], adapter.length, 10_000, S3Config(), "train")
    assert unfit[0].id == broken.id and unfit[0].reason.startswith("cannot encode:")


def test_an_examples_file_with_a_bad_record_names_it(tmp_path):
    bad = [
        {
            "id": "a",
            "image": "x.jpg",
            "conversations": [{"role": "user", "content": "no image here"}, {"role": "assistant", "content": "{}"}],
        }
    ]
    with pytest.raises(ValueError, match=r"train.json: \[0\] a: need a user turn with one <image>"):
        read_examples(json.dumps(bad).encode(), "train.json")


def test_wrong_model_for_the_adapter_is_a_clear_error(tmp_path, tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(ValueError, match="model_type 'qwen2' is not a native MiniCPM-V"):
        adapter_for(tmp_path)


# --- configuration of the run ----------------------------------------------------------------


def test_deepspeed_configs_leave_the_schedule_to_the_trainer():
    """The recipe's DeepSpeed JSON had a scheduler section that silently replaced the cosine schedule."""
    configs = {path.stem: json.loads(path.read_text()) for path in DEEPSPEED.glob("*.json")}
    assert set(configs) == {"zero2", "zero2_offload", "zero3"}
    for name, config in configs.items():
        assert "scheduler" not in config, name
        assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert configs["zero2_offload"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert configs["zero3"]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_training_arguments_follow_the_config(tmp_path):
    offload = str(DEEPSPEED / "zero2_offload.json")
    spec = TrainSpec(
        model_dir="m",
        model={"base": "m"},
        training=TrainingConfig(),
        evaluation=EvaluationConfig(),
        doctypes_dir="d",
        doc_types=["thsr_ticket"],
        export=ExportConfig(),
        train_file="t",
        eval_file="e",
        output_dir=str(tmp_path),
        deepspeed_config=offload,
        s3=S3Config(),
    )
    args = training_arguments(spec, use_cpu=True, has_eval=True)
    assert args.prediction_loss_only  # evaluation keeps the loss, never every batch's logits
    assert (args.lr_scheduler_type, args.learning_rate, args.warmup_steps) == ("cosine", 1e-6, 0.01)
    assert (args.weight_decay, args.adam_beta2, args.max_steps, args.save_total_limit) == (0.1, 0.95, 10000, 5)
    assert args.metric_for_best_model == "field_accuracy" and args.greater_is_better  # kept from rotation
    assert args.gradient_checkpointing
    by_loss = spec.model_copy(update={"training": TrainingConfig(selection="eval_loss")})
    args = training_arguments(by_loss, use_cpu=True, has_eval=True)
    assert args.metric_for_best_model == "eval_loss" and not args.greater_is_better


def test_launch_layout_from_config_or_environment():
    config = TorchrunLayout(gpus_per_node=2)
    assert layout_from_environment(config, {}) == config
    launch = layout_from_environment(
        config,
        {"GPUS_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"},
    )
    assert (launch.gpus_per_node, launch.nnodes, launch.node_rank) == (8, 2, 1)
    command = torchrun_command(launch, Path("spec.json"), Path("/data/run/finetune"))
    assert command[1:3] == ["-m", "torch.distributed.run"] and command[-3:] == [
        "-m",
        "stages.finetune.train",
        "spec.json",
    ]
    assert {
        "--nproc-per-node=8",
        "--nnodes=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:23456",
        "--rdzv-conf=join_timeout=900",
    } <= set(command)
    same_run = torchrun_command(
        launch.model_copy(update={"node_rank": 0}), Path("other.json"), Path("/data/run/finetune")
    )
    assert [a for a in command if a.startswith("--rdzv-id")] == [a for a in same_run if a.startswith("--rdzv-id")]
    assert "--standalone" in torchrun_command(config, Path("spec.json"), Path("ft"))
    with pytest.raises(ValueError, match="gpus_per_node"):
        layout_from_environment(config, {"GPUS_PER_NODE": "0"})
    with pytest.raises(ValueError, match="node_rank 2 is not below nnodes 2"):
        layout_from_environment(config, {"NNODES": "2", "NODE_RANK": "2"})


def test_kubeflow_trainers_variables_set_the_layout_and_node_k_gets_a_folder_of_its_own(tmp_path):
    """What the torch-distributed runtime sets in each node's pod (PET_*) is the layout; our own
    names win where both are set. Node 1 writes its manifest and data beside the shared checkpoints."""
    pet = {
        "PET_NPROC_PER_NODE": "4",
        "PET_NNODES": "2",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "job-node-0-0.job",
        "PET_MASTER_PORT": "29400",
    }
    launch = layout_from_environment(TorchrunLayout(), pet)
    assert (launch.gpus_per_node, launch.nnodes, launch.node_rank, launch.master_addr, launch.master_port) == (
        4,
        2,
        1,
        "job-node-0-0.job",
        29400,
    )
    assert layout_from_environment(TorchrunLayout(), {**pet, "NODE_RANK": "0"}).node_rank == 0
    config = load_pipeline_config([ROOT / "configs" / "pipeline.yaml"])
    for rank, output in (("0", "/data/run/finetune"), ("1", "/data/run/finetune/nodes/1")):
        args = argparse.Namespace(output="/data/run/finetune/")
        with patch.dict(os.environ, {**pet, "PET_NODE_RANK": rank}):
            route_node_outputs(args, config)
        assert (args.checkpoints, args.output.rstrip("/")) == ("/data/run/finetune/", output)


def saved_checkpoint(folder: Path, zero: bool = False) -> Path:
    """A checkpoint laid out as the Trainer saves one (plain, or with DeepSpeed ZeRO shards), tiny tensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"global_step": 1}')
    if zero:
        (folder / "latest").write_text("global_step1")
        (folder / "global_step1").mkdir()
        torch.save({"module": {}}, folder / "global_step1" / "mp_rank_00_model_states.pt")
        torch.save({"state": {}}, folder / "global_step1" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    else:
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
        torch.save({"state": {}}, folder / "optimizer.pt")
        torch.save({"last_epoch": 1}, folder / "scheduler.pt")
    return folder


def test_latest_checkpoint_skips_one_cut_off_while_saving(tmp_path):
    for step in (2, 4):
        saved_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-10").mkdir()  # killed before anything was written
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert latest_checkpoint(tmp_path / "none") is None


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda c: (c / "model.safetensors").unlink(), "no readable model weights"),
        (lambda c: (c / "model.safetensors").write_bytes(b"\x08" + bytes(7) + b"{"), "no readable model weights"),
        (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]), "no readable optimizer"),
        (lambda c: (c / "scheduler.pt").unlink(), "no readable scheduler state"),
        (lambda c: (c / "trainer_state.json").write_text("{"), "trainer_state.json unreadable"),
    ],
)
def test_a_checkpoint_missing_what_resume_needs_is_passed_over(tmp_path, damage, problem, caplog):
    saved_checkpoint(tmp_path / "checkpoint-2")
    damage(saved_checkpoint(tmp_path / "checkpoint-4"))
    assert checkpoint_problem(tmp_path / "checkpoint-4").startswith(problem)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert f"checkpoint-4 is incomplete ({problem}" in caplog.text


def test_a_zero_checkpoint_is_complete_with_its_shards(tmp_path):
    checkpoint = saved_checkpoint(tmp_path / "checkpoint-6", zero=True)
    assert checkpoint_problem(checkpoint) is None
    next(checkpoint.glob("global_step1/*optim_states.pt")).unlink()
    assert checkpoint_problem(checkpoint) == "no readable optimizer state"


# --- training, for real ------------------------------------------------------------------------


def _stage_run(tmp_path: Path, result: dict):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    return client, client.get_run(result["mlflow_run_id"])


def _assert_cosine(rates: list[float], peak: float) -> None:
    top = rates.index(max(rates))
    assert max(rates) == pytest.approx(peak, rel=1e-6) and top <= 2  # warm-up is 1% of the steps
    decay = rates[top:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False)) and decay[-1] < 0.1 * peak


@pytest.mark.integration
def test_finetune_trains_saves_and_tracks(finetune_config, exported, tmp_path):
    done = finetune(finetune_config, exported, tmp_path / "ft")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert result["counts"]["global_step"] == 12 and result["counts"]["unfit_train"] == 0
    assert result["outputs"]["last_checkpoint"].endswith("checkpoint-12")
    assert (tmp_path / "ft" / "checkpoint-12" / "model.safetensors").is_file()
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ft" / "checkpoint-12").state_dict()
    base = load_file(
        Path(json.loads((tmp_path / "ft" / "train_spec.json").read_text())["model_dir"]) / "model.safetensors"
    )
    assert reloaded.keys() >= base.keys() and any(not torch.equal(reloaded[k], base[k]) for k in base)
    assert list((tmp_path / "ft" / "tensorboard").glob("events.out.tfevents.*"))
    client, run = _stage_run(tmp_path, result)
    assert run.info.status == "FINISHED" and run.data.tags["dataset.version"] == result["inputs"]["dataset_version"]

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    losses = history("loss")
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert len(history("eval_loss")) == 2 and history("tokens_per_second") and history("samples_per_second")
    assert history("train_loss") == [result["metrics"]["train_loss"]]  # once, from the stage, not twice
    assert run.data.params["dataset.version"] == result["inputs"]["dataset_version"]
    for key in ("eval_field_accuracy", "eval_document_accuracy", "eval_json_validity"):  # each checkpoint's answers
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [6, 12]
    selection = json.loads((tmp_path / "ft" / "selection.json").read_text())
    assert result["outputs"]["best_checkpoint"] == selection["checkpoint"] and selection["documents"] == 4
    assert [point["step"] for point in selection["curve"]] == [6, 12] and run.data.tags["checkpoint.selection"]
    _assert_cosine(history("learning_rate"), peak=1e-3)


@pytest.mark.integration
@pytest.mark.parametrize(("deepspeed", "processes"), [("zero2", 2), ("zero2_offload", 1), ("zero3", 2)])
def test_deepspeed_keeps_the_trainers_cosine_schedule(finetune_config, exported, tmp_path, deepspeed, processes):
    """DeepSpeed on its CPU accelerator, torchrun processes talking over gloo as GPUs over NCCL.
    The first run compiles DeepSpeed's shared-memory op (~30 s) and, with the optimizer offloaded,
    DeepSpeedCPUAdam (~45 s); both are cached afterwards. ZeRO-3 across processes runs with one
    slice per image: MiniCPM-V 4.6's merger runs once per slice, and DeepSpeed requires every rank
    to run the same modules (ranks whose images slice differently fail its trace check; README)."""
    steps = "max_steps: 8, eval_steps: 8, save_steps: 8" + (", max_slice_nums: 1" if deepspeed == "zero3" else "")
    zero2 = write_overlay(tmp_path, "ds.yaml", f"training: {{deepspeed: {deepspeed}, {steps}}}\n")
    done = finetune([*finetune_config, zero2], exported, tmp_path / "ft", GPUS_PER_NODE=str(processes))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert result["counts"]["global_step"] == 8
    shards = list((tmp_path / "ft" / "checkpoint-8").glob("global_step8/*optim_states.pt"))  # DeepSpeed's own state
    assert len(shards) == processes  # ZeRO-2: the optimizer state is split across the processes
    selection = json.loads((tmp_path / "ft" / "selection.json").read_text())  # scored under DeepSpeed too
    assert selection["step"] == 8 and selection["value"] is not None
    assert selection["curve"][0]["json_validity"] is not None
    client, run = _stage_run(tmp_path, result)
    rates = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "learning_rate"), key=lambda m: m.step)]
    _assert_cosine(rates, peak=1e-3)

    # A checkpoint whose weights exist only as ZeRO shards is consolidated by patch, and loads.
    shards_only = tmp_path / "ft" / "checkpoint-80"
    shutil.copytree(tmp_path / "ft" / "checkpoint-8", shards_only, ignore=shutil.ignore_patterns("*.safetensors"))
    done = run_stage("patch", finetune_config, "--checkpoint", str(shards_only), "--output", str(tmp_path / "model"))
    report = json.loads((tmp_path / "model" / "patch.json").read_text())
    assert done == 0 and report["consolidated_zero"] and "model.safetensors" in report["from_checkpoint"]


@pytest.mark.integration
def test_too_many_unfit_documents_fail_before_training(finetune_config, exported, tmp_path):
    short = write_overlay(tmp_path, "short.yaml", "training: {model_max_length: 64}\n")
    done = finetune([*finetune_config, short], exported, tmp_path / "ft")
    assert done.returncode == 2
    assert "train documents cannot be trained on" in done.stderr and "unfit.jsonl" in done.stderr.splitlines()[-1]
    unfit = [json.loads(line) for line in (tmp_path / "ft" / "unfit.jsonl").read_text().splitlines()]
    assert len(unfit) == 24 and all("> model_max_length 64" in u["reason"] for u in unfit)
    assert not list((tmp_path / "ft").glob("checkpoint-*"))


def _training_processes(out: Path) -> list[int]:
    """Processes whose command line names this run's training spec."""
    spec = str(out / "train_spec.json").encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and spec in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.integration
def test_a_killed_run_continues_from_its_last_complete_checkpoint(finetune_config, exported, tmp_path):
    """An Airflow retry runs the same command into the same folder: it must continue, not restart,
    from the newest checkpoint that holds everything resume needs (here the newest has lost its weights)."""
    long = write_overlay(
        tmp_path, "long.yaml", "training: {max_steps: 60, save_steps: 10, eval_steps: 10, save_total_limit: 3}\n"
    )
    config, out = [*finetune_config, long], tmp_path / "ft"
    first = subprocess.Popen(
        [sys.executable, "-m", "stages.finetune", *config_flags(config), "--data", str(exported), "--output", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
    )
    deadline = time.monotonic() + 300
    while not out.exists() or len([c for c in out.glob("checkpoint-*") if not checkpoint_problem(c)]) < 2:
        assert first.poll() is None and time.monotonic() < deadline, "no two checkpoints before the run ended"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the stage's process group: the stage and torchrun
    first.wait(timeout=30)
    deadline = time.monotonic() + 30  # torchrun's worker runs in a session of its own: it must die with torchrun
    while (workers := _training_processes(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workers, f"training processes outlived the killed stage: {workers}"
    newest = latest_checkpoint(out)
    assert not (out / "result.json").exists()
    (newest / "model.safetensors").unlink()  # lost with the node's disk, say
    fallback = latest_checkpoint(out)
    step = int(fallback.name.split("-")[1])
    assert 10 <= step < int(newest.name.split("-")[1]) < 60

    done = finetune(config, exported, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{newest} is incomplete (no readable model weights): falling back" in done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["outputs"]["resumed_from"] == str(fallback)
    assert result["counts"]["global_step"] == 60
    state = json.loads((out / "checkpoint-60" / "trainer_state.json").read_text())
    logged = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged == list(range(1, 61))  # one history, continued where it stopped


# --- remote-code family (MiniCPM-V 2.6, Llama3-V 2.5, 2.0) -------------------------------------
# Their code ships only with the real checkpoints, which cannot be fetched here. The adapter's
# contract is proven on a tiny checkpoint whose code we wrote to 2.6's interface
# (tests/fixtures/remote_code), loaded through trust_remote_code; the real 2.6 code never ran here.


def test_the_remote_code_adapter_drives_a_checkpoint_through_its_own_code(remote_code_model, exported):
    from docpipe.config import ModelConfig

    model_config = ModelConfig(base=str(remote_code_model), adapter="remote_code", llm_type="qwen2")
    adapter = load_adapter(remote_code_model, model_config, TrainingConfig(bf16=False, max_slice_nums=4))
    assert type(adapter.processor).__module__.startswith("transformers_modules.")  # the checkpoint's own processor
    example = examples(exported)[0]
    wide = Sample(example, Image.new("RGB", (240, 80), "white"))  # an overview and a grid of slices
    batch = adapter.collate([wide, Sample(example, Image.new("RGB", (40, 40), "white"))])
    tokenizer = adapter.processor.tokenizer
    ids, bounds = batch["input_ids"][0], batch["image_bound"][0]
    assert tokenizer.convert_tokens_to_ids("<image>") in ids.tolist()  # (<image>./</image>) was expanded
    assert len(bounds) == len(batch["pixel_values"][0]) == len(batch["tgt_sizes"][0]) > 1
    filled = torch.cat([torch.arange(int(start), int(end)) for start, end in bounds])
    assert set(ids[filled].tolist()) == {tokenizer.convert_tokens_to_ids("<unk>")}  # each slice's queries
    assert len(batch["image_bound"][1]) == 1  # a small image: the overview alone
    answer = tokenizer(example.answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist() == answer

    model = adapter.load_model(torch.float32)
    loss = adapter.loss(model, dict(batch))
    loss.backward()
    assert torch.isfinite(loss) and model.resampler.queries.grad.abs().sum() > 0
    assert model.vpm[0].weight.grad.abs().sum() > 0  # the loss reaches the vision encoder through the image bounds
    frozen = load_adapter(remote_code_model, model_config, TrainingConfig(tune_vision=False))
    model = frozen.load_model(torch.float32)
    assert not any(p.requires_grad for p in model.vpm.parameters())
    assert all(p.requires_grad for p in model.resampler.parameters())  # the resampler always trains
    answers = adapter.complete(model.eval(), [wide], max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0].text, str)


@pytest.mark.parametrize(
    ("llm_type", "prompt", "answer"),
    [
        ("qwen2", "<|im_start|>user\nX<|im_end|>\n<|im_start|>assistant\n", "{}<|im_end|>\n"),
        (
            "llama3",
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nX<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "{}<|eot_id|>",
        ),
        ("minicpm", "<用户>X<AI>", "{}</s>"),
    ],
)
def test_each_llm_type_has_its_own_chat_format(llm_type, prompt, answer):
    from docpipe.model.adapters.remote_code import chat_format

    chat = chat_format(llm_type, {})
    assert (chat.prompt("X"), chat.answer("{}")) == (prompt, answer)


def test_an_unknown_or_contradicted_llm_type_is_refused(tmp_path):
    """The recipe fell back to another chat format for an unknown type (upstream renamed qwen2 to qwen)."""
    from docpipe.config import ModelConfig
    from docpipe.model.adapters.remote_code import chat_format

    with pytest.raises(ValueError, match="llm_type 'qwen' is unknown"):
        chat_format("qwen", {})
    with pytest.raises(ValueError, match="version 2.5, whose LLM type is 'llama3'"):
        chat_format("qwen2", {"version": 2.5})
    (tmp_path / "config.json").write_text(json.dumps({"version": 2.6, "model_type": "minicpmv"}))
    with pytest.raises(ValueError, match="no auto_map: not a remote-code checkpoint"):
        load_adapter(
            tmp_path, ModelConfig(base=str(tmp_path), adapter="remote_code", llm_type="qwen2"), TrainingConfig()
        )
