"""``python -m stages.demo``: run the pipeline's stages end to end on the embedded default.

It starts the pipeline's parent MLflow run, runs each stage as its own process (as the
local launcher does, ``MLFLOW_RUN_ID`` naming the parent) and ends the parent run with
the outcome. Stages: a synthetic batch lands, ingest turns it into a dataset version,
export writes the MiniCPM-V finetune files, finetune trains the base model on them (the
embedded default's tiny random MiniCPM-V 4.6, built offline on first use), patch makes its
best checkpoint a complete model folder, evaluate scores it (beside the OCR baseline) and
decides the gate; publish joins when it lands.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from stages import tracking
from stages.cli import EXIT_BAD_INPUT
from stages.config import ConfigError, load_pipeline_config
from stages.storage import open_storage
from stages.tiny_model import build as build_tiny_model

EMBEDDED = [Path("configs/pipeline.yaml"), Path("configs/overlays/embedded.yaml")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.demo", description=__doc__)
    parser.add_argument("--config", type=Path, action="append", help="default: pipeline.yaml + overlays/embedded.yaml")
    parser.add_argument("--count", type=int, default=24, help="synthetic documents to generate")
    args = parser.parse_args(argv)
    paths = args.config or EMBEDDED
    try:
        config = load_pipeline_config(paths)
    except ConfigError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    base = Path(config.model.base)
    if "://" not in config.model.base and not (base / "config.json").exists():
        print(f"== building the tiny model in {base}", flush=True)
        build_tiny_model(base, config.doctypes_dir)

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    parent = tracking.start_pipeline_run(config.tracking, f"demo-{stamp}", {"config": config.model_dump(mode="json")})
    batch = open_storage(config.storage.landing_uri, config.storage.s3).child(f"batch-{stamp}")
    run_dir = open_storage(config.storage.runs_uri, config.storage.s3).child(f"demo-{stamp}")
    config_flags = [flag for path in paths for flag in ("--config", str(path))]
    steps = {
        "synthetic": ["-m", "stages.synthetic", *config_flags, "--output", batch.uri, "--count", str(args.count)],
        "ingest": ["-m", "stages.ingest", *config_flags, "--output", config.storage.datasets_uri, "--batch", batch.uri],
        "export": ["-m", "stages.export", *config_flags, "--output", run_dir.child("export").uri],
        "finetune": ["-m", "stages.finetune", *config_flags, "--data", run_dir.child("export").uri,
                     "--output", run_dir.child("finetune").uri],
        "patch": ["-m", "stages.patch", *config_flags, "--finetune", run_dir.child("finetune").uri,
                  "--output", run_dir.child("model").uri],
        "evaluate": ["-m", "stages.evaluate", *config_flags, "--data", run_dir.child("export").uri,
                     "--model", run_dir.child("model").uri, "--output", run_dir.child("evaluate").uri],
    }  # fmt: skip
    code = 0
    for name, step in steps.items():
        print(f"== {name}", flush=True)
        code = subprocess.run([sys.executable, *step], env={**os.environ, tracking.PARENT_RUN_ENV: parent}).returncode
        if code:
            print(f"demo: stage {name} failed with exit code {code}", file=sys.stderr)
            break
    tracking.end_pipeline_run(config.tracking, parent, succeeded=code == 0)

    uri, experiment = config.tracking.tracking_uri, tracking.experiment_id(config.tracking)
    print(
        f"\nLabelled batch:   {batch.uri} (labels.jsonl, images/, result.json)"
        f"\nDataset versions: {config.storage.datasets_uri} (LATEST, versions/<id>/manifest.jsonl, card.json)"
        f"\nRun outputs:      {run_dir.uri} (export/, finetune/checkpoint-*, model/, evaluate/)"
        f"\nReport:           {run_dir.child('evaluate').uri_of('report.html')}"
        f"\nMLflow run:       {parent} in experiment {config.tracking.experiment!r}"
        f"\nList runs:        MLFLOW_TRACKING_URI={uri} .venv/bin/mlflow runs list --experiment-id {experiment}"
        f"\nBrowse runs:      .venv/bin/mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
