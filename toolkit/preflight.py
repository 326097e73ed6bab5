"""``python -m toolkit.preflight``: what to run first on a base model you supply, before a GPU is
booked for days (``make preflight BASE=...``; in the training image on one GPU for real weights).

Each check is reported with its outcome and time, on the console and in ``preflight.json``:

1. ``environment``: the plan's own check of the base model's ``config.json`` (``compatibility``):
   a family this transformers implements, or remote code written for its major version.
2. ``imports``: every ``transformers`` import in the checkpoint's own code (``*.py``) resolves
   in this transformers, each missing one named with its file and line.
3. The pipeline's stages on two documents, with the command lines the DAG runs: two synthetic
   documents of the first configured type land (``synthetic``), are ingested and exported,
   ``finetune`` trains one step on them (torchrun, DeepSpeed as configured, one process),
   and ``patch`` assembles the model, loads it from its folder alone and answers one document.

Everything is written under ``--output`` (a local folder): its own landing, datasets, run
folders and MLflow store, so nothing reaches the pipeline's storage or tracking server. Exit
0 when every check passed, 1 when one failed, 2 for bad flags or configuration.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from docpipe.config import ModelConfig, PipelineConfig, S3Config, load_pipeline_config
from docpipe.contract import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, config_flags, stage_parser
from docpipe.loader import ConfigError
from docpipe.model.compatibility import check_base_model, model_files
from docpipe.redaction import redact_output, redact_text

REPORT = "preflight.json"
PIPELINE_STAGES = ("synthetic", "ingest", "export", "finetune", "patch")
ONE_STEP = {
    "max_steps": 1,
    "eval_steps": 1,
    "save_steps": 1,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "selection": "eval_loss",
    "selection_documents": 0,
    "launch": {"gpus_per_node": 1, "nnodes": 1, "node_rank": 0},
}


@dataclass
class Check:
    name: str
    status: str  # passed, failed or skipped
    seconds: float
    detail: str


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser("preflight", __doc__.split("\n\n")[0])
    parser.add_argument("--base", help="the base model: a folder or s3:// URI (default: the config's model.base)")
    parser.add_argument("--stage-timeout", type=int, default=3600, help="seconds each pipeline stage may take")
    return parser


def transformers_imports(sources: dict[str, str]) -> list[tuple[str, int, str]]:
    """``(file, line, dotted name)`` of every name the code imports from transformers."""
    found = []
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text, filename=name)):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").split(".")[0] == "transformers"
            ):
                found += [(name, node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(name, node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "transformers"]
    return found


def _resolves(dotted: str) -> bool:
    """An importable module, or a name an importable module has."""
    if dotted.endswith(".*"):
        dotted = dotted[:-2]
    try:
        importlib.import_module(dotted)
        return True
    except Exception:  # missing, or failing as it imports: either way the checkpoint's import fails
        pass
    module, _, name = dotted.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except Exception:
        return False


def check_imports(base: str, s3: S3Config) -> str:
    code = model_files(base, s3, lambda name: name.endswith(".py"))
    sources = {name: data.decode("utf-8") for name, data in code.items()}
    if not sources:
        return "no code of its own (*.py): nothing to import"
    wanted = transformers_imports(sources)
    missing = [f"{file}:{line} {name}" for file, line, name in wanted if not _resolves(name)]
    if missing:
        import transformers

        raise RuntimeError(
            f"{len(missing)} of {len(wanted)} transformers imports are not in transformers "
            f"{transformers.__version__}: {'; '.join(missing)}"
        )
    return f"{len(wanted)} transformers imports in {len(sources)} files all resolve"


def preflight_overrides(config: PipelineConfig, base: str, out: Path) -> dict:
    """The configuration the pipeline check runs with: the user's, on this folder, one step."""
    return {
        "model": {"base": base},
        "doc_types": config.doc_types[:1],
        "storage": {"landing_uri": str(out / "landing"), "datasets_uri": str(out / "datasets"), "runs_uri": str(out)},
        "tracking": {"tracking_uri": f"sqlite:///{out / 'mlflow.db'}", "artifact_location": str(out / "mlartifacts")},
        "dataset": {"eval_fraction": 0.0},
        "training": ONE_STEP,
        "patch": {"checkpoint": "latest"},
    }


def stage_commands(config_paths: list[str], overrides: dict, out: Path) -> dict[str, list[str]]:
    """Each pipeline stage's command line, as the DAG builds it (``plan.stage_command``)."""
    from docpipe.orchestration.plan import Plan, stage_command

    batch = str(out / "landing" / "batch-preflight")
    plan = Plan(
        run_name="preflight",
        run_uri=str(out),
        datasets_uri=str(out / "datasets"),
        batches=[batch],
        overrides=overrides,
        gpus=1,
        skip_publish=True,
        dry_run=False,
        tracking_uri="",
    )
    commands = {stage: [sys.executable, *stage_command(stage, plan, config_paths)[1:]] for stage in PIPELINE_STAGES[1:]}
    synthetic = [
        sys.executable,
        "-m",
        "toolkit.synthetic",
        *config_flags(config_paths),
        "--overrides",
        json.dumps(overrides),
        "--output",
        batch,
        "--count",
        "2",
    ]
    return {"synthetic": synthetic, **commands}


def run_stage(stage: str, command: list[str], logs: Path, timeout: int) -> str:
    """Run one stage; its output goes to ``logs/<stage>.log``; a failure quotes its last line, which says why."""
    log = logs / f"{stage}.log"
    with log.open("w") as sink:
        try:
            done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"did not finish in {timeout} s; its log: {log}") from None
    if done.returncode:  # a stage's last line says why
        last = next((line for line in reversed(log.read_text(errors="replace").splitlines()) if line.strip()), "")
        raise RuntimeError(f"exit code {done.returncode}: {last} (log: {log})")
    return f"log: {log}"


def timed(name: str, action: Callable[[], str]) -> Check:
    started = time.perf_counter()
    try:
        status, detail = "passed", action()
    except Exception as exc:  # every check reports its own failure and the others still run
        status, detail = "failed", f"{type(exc).__name__}: {exc}"
    check = Check(name, status, round(time.perf_counter() - started, 1), redact_text(detail))
    print(f"{check.status:>7}  {check.name:<12} {check.seconds:>7.1f} s  {check.detail}", flush=True)
    return check


def pipeline_check(stage: str, command: list[str], out: Path, timeout: int) -> str:
    """One stage of the pipeline check; patch's detail is the answer the patched model gave."""
    logged = run_stage(stage, command, out / "logs", timeout)
    return patched_answer(out) if stage == "patch" else logged


def check_environment(model: ModelConfig, s3: S3Config) -> str:
    found = check_base_model(model, s3)
    return f"model_type {found.get('model_type')!r}, written with transformers {found.get('transformers_version')}"


def patched_answer(out: Path) -> str:
    from stages.patch import REPORT as PATCH_REPORT

    example = json.loads((out / "model" / PATCH_REPORT).read_text())["example"]
    return f"the patched model in {out / 'model'} answered {example['id']}: {example['answer'][:200]!r}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    redact_output()
    paths = [str(path) for path in args.config or [Path("configs/pipeline.yaml")]]
    try:
        config = load_pipeline_config([Path(p) for p in paths], args.overrides)
    except ConfigError as exc:
        print(f"preflight: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if "://" in args.output:
        print(f"preflight: error: --output {args.output}: a local folder is needed", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.output).resolve()
    if out.exists() and any(out.iterdir()):
        print(f"preflight: error: --output {out} is not empty", file=sys.stderr)
        return EXIT_BAD_INPUT
    (out / "logs").mkdir(parents=True)
    if args.overrides:  # the stages get them as a config file, under the preflight's own
        (out / "overrides.yaml").write_text(json.dumps(args.overrides))
        paths.append(str(out / "overrides.yaml"))
    base = args.base or config.model.base
    model = config.model.model_copy(update={"base": base})
    print(f"preflight of {base} (adapter {model.adapter}) into {out}", flush=True)
    checks = [timed("environment", lambda: check_environment(model, config.storage.s3))]
    checks.append(timed("imports", lambda: check_imports(base, config.storage.s3)))
    if checks[-1].status == "passed":
        commands = stage_commands(paths, preflight_overrides(config, base, out), out)
        for stage, command in commands.items():
            checks.append(timed(stage, lambda s=stage, c=command: pipeline_check(s, c, out, args.stage_timeout)))
            if checks[-1].status != "passed":
                break
    ran = {check.name for check in checks}
    checks += [Check(stage, "skipped", 0.0, "an earlier check failed") for stage in PIPELINE_STAGES if stage not in ran]
    passed = all(check.status == "passed" for check in checks)
    report = {"base": base, "adapter": model.adapter, "passed": passed, "checks": [asdict(c) for c in checks]}
    (out / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"preflight {'passed' if passed else 'failed'}: {out / REPORT}")
    return EXIT_OK if passed else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
