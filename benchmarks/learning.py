"""Learning benchmark: does a model initialised from scratch learn to read held-out documents?

Builds a tiny MiniCPM-V 4.6 from scratch (``toolkit/tiny_model.py``), lands synthetic documents of
a few types, and runs the stages as the DAG does (ingest, export, finetune, patch, evaluate) with a
profile of ``configs/benchmarks/learning.yaml``. The finetune stage scores every checkpoint on all
held-out documents (its checkpoint selection), which gives the learning curve. Beside the model,
a prior-only baseline answers every held-out document with each field's most frequent training
value. Prints the per-field table (held-out accuracy of the patched model against the prior, and
whether the field's values come from a short list) and the curve, and saves ``learning.png`` and
``learning.json`` in the output folder.

    .venv/bin/python benchmarks/learning.py [--profile cpu|gpu|...] [--output data/benchmarks/learning] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from docpipe.answering.scoring import evaluate_all, score
from docpipe.contract import config_flags
from docpipe.doctypes import load_registry
from docpipe.loader import read_yaml
from toolkit.tiny_model import SIZES, build

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "configs" / "benchmarks" / "learning.yaml"
SHORT_LIST = 30  # a field whose values come from at most this many is "drawn from a short list"


class Profile(BaseModel):
    """One profile of ``configs/benchmarks/learning.yaml``."""

    model_config = ConfigDict(extra="forbid")

    size: str = Field(description="a size of toolkit/tiny_model.py")
    documents: int = Field(ge=20)
    doc_types: list[str] = Field(min_length=1)
    other_pages: bool = Field(False, description="pages of none of the types among the documents (routed runs)")
    pipeline: dict = Field(description="overlay over pipeline.yaml + embedded.yaml")


def stage(name: str, configs: list[Path], *args: str) -> float:
    """A stage (or the synthetic tool) as the local launcher runs it, through ``docpipe <name>``; its seconds."""
    started = time.perf_counter()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, "-m", "toolkit.commands", name, *config_flags(configs), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if done.returncode:
        sys.exit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def prior_answers(train: list[dict]) -> dict[str, dict[str, str | None]]:
    """Each type's most frequent training value of every field: what a model that reads nothing can do best."""
    values: dict[str, dict[str, Counter]] = {}
    for example in train:
        answer = json.loads(example["conversations"][1]["content"])
        for field, value in answer.items():
            values.setdefault(example["doc_type"], {}).setdefault(field, Counter())[value] += 1
    return {t: {f: c.most_common(1)[0][0] for f, c in fields.items()} for t, fields in values.items()}


def per_field_table(saved: dict, prior: dict, registry) -> list[dict]:
    rows = []
    for doc_type, metrics in saved["metrics"]["per_doc_type"].items():
        for spec in registry[doc_type].fields:
            options = len(spec.values or spec.samples) if spec.type in ("enum", "text") else None
            rows.append(
                {
                    "doc_type": doc_type,
                    "field": spec.name,
                    "type": spec.type,
                    "short_list": bool(options and options <= SHORT_LIST),
                    "options": options,
                    "model": metrics["per_field_accuracy"][spec.name],
                    "prior": prior["per_doc_type"][doc_type]["per_field_accuracy"][spec.name],
                }
            )
    return rows


def plot(selection: dict, prior: float, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [point for point in selection["curve"] if point["field_accuracy"] is not None]
    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    steps = [point["step"] for point in curve]
    axes.plot(steps, [p["field_accuracy"] for p in curve], marker="o", label="held-out field accuracy")
    axes.plot(steps, [p["json_validity"] for p in curve], marker=".", label="held-out JSON validity")
    axes.axhline(prior, color="grey", linestyle="--", label=f"prior-only baseline ({prior:.3f})")
    axes.set_xlabel("step")
    axes.set_ylim(0, 1.02)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def chosen_profile(name: str) -> Profile:
    """The named profile of configs/benchmarks/learning.yaml, checked."""
    profiles = read_yaml(PROFILES)
    if name not in profiles:
        sys.exit(f"{PROFILES}: no profile {name!r}; it has {sorted(profiles)}")
    profile = Profile.model_validate(profiles[name])
    if profile.size not in SIZES:
        sys.exit(f"{PROFILES}: {name}.size: {profile.size!r} is not one of {sorted(SIZES)}")
    return profile


def benchmark_overlay(out: Path, profile: Profile, model: Path) -> Path:
    """The run's overlay: the profile's pipeline settings, its folders, no gate, no OCR baseline."""
    overlay = out / "benchmark.yaml"
    settings = {
        **profile.pipeline,
        "doc_types": profile.doc_types,
        "model": {"base": str(model)},
        "storage": {
            "landing_uri": str(out / "landing"),
            "datasets_uri": str(out / "datasets"),
            "runs_uri": str(out / "runs"),
        },
        "tracking": {"tracking_uri": f"sqlite:///{out}/mlflow.db", "artifact_location": str(out / "artifacts")},
        "evaluation": {
            **profile.pipeline.get("evaluation", {}),
            "ocr_baseline": False,
            "thresholds": {"field_accuracy": 0, "document_accuracy": 0, "json_validity": 0},
        },
    }
    overlay.write_text(json.dumps(settings))
    return overlay


def run_stages(out: Path, configs: list[Path], profile: Profile, seed: int) -> dict[str, float]:
    """synthetic (documents of ``seed``), ingest, export, finetune, patch and evaluate, as the DAG chains
    them; seconds of each."""
    batch = str(out / "landing" / "batch-1")
    documents, types = (
        str(profile.documents),
        ",".join([*profile.doc_types, *(["other"] if profile.other_pages else [])]),
    )
    export, model = str(out / "export"), str(out / "model")
    return {
        "synthetic": stage(
            "synthetic", configs, "--output", batch, "--count", documents, "--doc-types", types, "--seed", str(seed)
        ),
        "ingest": stage("ingest", configs, "--output", str(out / "datasets"), "--batch", batch),
        "export": stage("export", configs, "--output", export),
        "finetune": stage("finetune", configs, "--data", export, "--output", str(out / "finetune")),
        "patch": stage("patch", configs, "--finetune", str(out / "finetune"), "--output", model),
        "evaluate": stage("evaluate", configs, "--data", export, "--model", model, "--output", str(out / "evaluate")),
    }


def prior_baseline(train: list[dict], held_out: list[dict], registry: dict) -> dict:
    """Every held-out document of a type answered with each field's most frequent training value (its
    type given), scored."""
    guesses = prior_answers(train)
    scored = [
        score(
            registry[e["doc_type"]],
            e["id"],
            json.loads(e["conversations"][1]["content"]),
            guesses.get(e["doc_type"], {}),
            "",
            0.0,
        )
        for e in held_out
        if e["doc_type"] in registry
    ]
    return evaluate_all(scored, registry, 1.0)


def print_report(name: str, profile: Profile, figures: dict, train: list, held_out: list) -> None:
    """Timings, the learning curve, the per-field table against the prior, and the overall figures."""
    import torch

    finetune, selection, rows = figures["finetune"], figures["selection"], figures["rows"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(
        f"\nprofile {name}: size {profile.size}, {len(train)} train / {len(held_out)} held-out documents, "
        f"{finetune['counts']['global_step']} steps, {os.cpu_count()} CPUs, {device}"
    )
    seconds = figures["seconds"]
    print(f"time: {figures['total_s']:.0f} s in all ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})")
    runtime = finetune["metrics"]["train_runtime_s"]
    print(f"training: {runtime:.0f} s, {finetune['counts']['input_tokens_seen'] / runtime:.0f} tokens/s")
    print("\nlearning curve (held-out, every checkpoint):")
    for point in selection["curve"]:
        if point["field_accuracy"] is not None:
            print(
                f"  step {point['step']:5d}  field {point['field_accuracy']:.3f}  document "
                f"{point['document_accuracy']:.3f}  JSON {point['json_validity']:.3f}  "
                f"eval loss {point['eval_loss']:.3f}"
            )
    print(f"\nchosen: {selection['reason']}")
    print(f"\n{'type':12} {'field':8} {'kind':6} {'options':>7} {'model':>6} {'prior':>6}  learned")
    for row in rows:
        learned = "yes" if row["model"] > row["prior"] else "no"
        print(
            f"{row['doc_type']:12} {row['field']:8} {row['type']:6} {row['options'] or '-':>7} {row['model']:6.3f} "
            f"{row['prior']:6.3f}  {learned}{' (short list)' if row['short_list'] else ''}"
        )
    overall, fit, prior = figures["held_out"], figures["fit"], figures["prior"]
    print(
        f"\nheld-out: field {overall['field_accuracy']:.3f}, JSON {overall['json_validity']:.3f}; prior "
        f"{prior['field_accuracy']:.3f}; training sample (fit) {fit['field_accuracy']:.3f}"
    )
    short = [r for r in rows if r["short_list"]]
    print(f"short-list fields above the prior: {sum(r['model'] > r['prior'] for r in short)} of {len(short)}")
    control = figures["control"]
    if "type_accuracy" in fit:
        print(
            f"routed: type accuracy fit {fit['type_accuracy']:.3f}, image control "
            f"{control['type_accuracy'] if control else float('nan'):.3f}, held-out {overall['type_accuracy']:.3f}; "
            f"field accuracy image control {control['field_accuracy'] if control else float('nan'):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu", help="a profile of configs/benchmarks/learning.yaml")
    parser.add_argument("--output", type=Path, default=ROOT / "data" / "benchmarks" / "learning")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic documents' seed")
    args = parser.parse_args()
    profile = chosen_profile(args.profile)
    out = args.output.resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out}: not empty; give another --output")
    started = time.perf_counter()
    registry = load_registry(ROOT / "configs" / "doctypes")
    model = build(out / "base-model", ROOT / "configs" / "doctypes", size=profile.size)
    overlay = benchmark_overlay(out, profile, model)
    configs = [ROOT / "configs" / "pipeline.yaml", ROOT / "configs" / "overlays" / "embedded.yaml", overlay]
    seconds = run_stages(out, configs, profile, args.seed)
    total = time.perf_counter() - started

    train = json.loads((out / "export" / "train.json").read_text())
    held_out = json.loads((out / "export" / "eval.json").read_text())
    prior = prior_baseline(train, held_out, registry)
    saved = json.loads((out / "evaluate" / "metrics.json").read_text())
    selection = json.loads((out / "finetune" / "selection.json").read_text())
    figures = {
        "profile": args.profile,
        "seconds": seconds,
        "total_s": total,
        "rows": per_field_table(saved, prior, registry),
        "prior": prior["overall"],
        "held_out": saved["metrics"]["overall"],
        "fit": saved["fit"]["overall"],
        "control": (saved.get("image_control") or {}).get("overall"),
        "selection": selection,
    }
    print_report(
        args.profile,
        profile,
        {**figures, "finetune": json.loads((out / "finetune" / "result.json").read_text())},
        train,
        held_out,
    )
    title = f"{args.profile}: {profile.size}, {len(train)} train docs, held-out {len(held_out)}"
    plot(selection, prior["overall"]["field_accuracy"], out / "learning.png", title)
    (out / "learning.json").write_text(json.dumps(figures, indent=2, ensure_ascii=False))
    print(f"saved {out / 'learning.png'} and {out / 'learning.json'}")


if __name__ == "__main__":
    main()
