"""DAG parse time and the heavy modules the DAG file imports (targets: at most 0.5 s; none).

Each repetition runs in a fresh interpreter that first imports Airflow's task SDK (as the
dag-processor has), then times executing ``dags/doc_extraction.py`` alone, and lists which of
torch, transformers, deepspeed, mlflow, PIL, boto3, docker and kubernetes that import loaded.
Prints the median and the worst time.

    .venv/bin/python benchmarks/dag_parse.py [--repeat 5] [--config configs/overlays/embedded.yaml ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "deepspeed", "mlflow", "PIL", "boto3", "docker", "kubernetes")
PROBE = """
import importlib.util, json, sys, time
import airflow.sdk, airflow.sdk.definitions.dag
before = set(sys.modules)
start = time.perf_counter()
spec = importlib.util.spec_from_file_location("doc_extraction_dag", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "heavy": sorted({m.split(".")[0] for m in set(sys.modules) - before}
                                                        & set(sys.argv[2].split(",")))}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--config", action="append", default=[], help="overlays after configs/pipeline.yaml")
    args = parser.parse_args()
    configs = ["configs/pipeline.yaml", *(args.config or ["configs/overlays/embedded.yaml"])]
    env = {**os.environ, "DOC_EXTRACTION_CONFIG": os.pathsep.join(configs), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    runs = []
    for _ in range(args.repeat):
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(ROOT / "dags" / "doc_extraction.py"), ",".join(HEAVY)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    times = [run["seconds"] for run in runs]
    heavy = sorted({module for run in runs for module in run["heavy"]})
    print(f"configs: {' + '.join(configs)}")
    print(
        f"DAG file parse: median {statistics.median(times):.3f} s, worst {max(times):.3f} s "
        f"over {len(times)} fresh interpreters (target <= 0.5 s)"
    )
    print(f"heavy modules imported: {', '.join(heavy) or 'none'} (target: none)")


if __name__ == "__main__":
    main()
