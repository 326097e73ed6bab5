"""The stage contract, through a real stage process: flags, result.json, exit codes 0/1/2, MLflow."""

from __future__ import annotations

import json

import mlflow
import pytest

from docpipe.contract import config_flags
from docpipe.data.landing import COMPLETE_MARKER, LABELS_FILE
from docpipe.manifest import RESULT_FILE
from docpipe.storage import open_storage
from tests.helpers import run_module

pytestmark = pytest.mark.integration


def runs(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("doc-extraction")
    return client, client.search_runs([experiment.experiment_id])


def test_help_lists_the_contract_flags():
    done = run_module("toolkit.synthetic", "--help")
    assert done.returncode == 0
    for flag in ("--config", "--output", "--count", "--seed", "--doc-types"):
        assert flag in done.stdout


def test_success_writes_batch_manifest_and_mlflow_run(overlay, tmp_path):
    out = tmp_path / "landing" / "batch-1"
    done = run_module("toolkit.synthetic", *config_flags(overlay), "--output", str(out), "--count", "6", "--seed", "1")
    assert done.returncode == 0, done.stderr
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["status"] == "succeeded" and result["exit_code"] == 0
    assert result["counts"]["documents"] == 6 and result["outputs"]["batch"] == str(out)
    assert {"python", "git_commit", "pillow", "mlflow"} <= set(result["versions"])
    assert (out / COMPLETE_MARKER).exists() and len((out / LABELS_FILE).read_text().splitlines()) == 6

    client, found = runs(tmp_path)
    (run,) = found
    assert run.info.run_id == result["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["pipeline.stage"] == "synthetic"
    assert run.data.params["config.training.learning_rate"] == "0.001"
    assert run.data.params["stage.count"] == "6"
    assert run.data.metrics["count.documents"] == 6
    artifact = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/synthetic/{RESULT_FILE}")
    assert artifact["counts"] == result["counts"]


def test_writes_to_s3(overlay, bucket, s3_endpoint, tmp_path):
    s3_overlay = tmp_path / "s3.yaml"
    s3_overlay.write_text(f"storage:\n  s3:\n    endpoint_url: {s3_endpoint}\n")
    uri = f"s3://{bucket}/landing/batch-7"
    done = run_module("toolkit.synthetic", *config_flags([*overlay, s3_overlay]), "--output", uri, "--count", "3")
    assert done.returncode == 0, done.stderr
    from docpipe.config import S3Config

    store = open_storage(uri, S3Config(endpoint_url=s3_endpoint))
    assert store.exists(COMPLETE_MARKER)
    assert json.loads(store.read_bytes(RESULT_FILE))["counts"]["documents"] == 3


def test_bad_config_exits_2_with_one_line_naming_file_and_key(overlay, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("synthetic:\n  count: 0\n")
    done = run_module("toolkit.synthetic", *config_flags([*overlay, bad]), "--output", str(tmp_path / "out"))
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("synthetic: error: ") and f"{bad}: synthetic.count: " in line
    assert not (tmp_path / "out").exists()


def test_bad_input_exits_2_and_records_the_failure(overlay, tmp_path):
    out = tmp_path / "out"
    done = run_module("toolkit.synthetic", *config_flags(overlay), "--output", str(out), "--doc-types", "bus_ticket")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("synthetic: error: --doc-types: unknown document type(s)")
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["status"] == "failed" and result["exit_code"] == 2 and "bus_ticket" in result["error"]
    _, (run,) = runs(tmp_path)
    assert run.info.status == "FAILED"


def test_failure_exits_1_with_reason(overlay, tmp_path):
    out = tmp_path / "out"
    done = run_module(
        "toolkit.synthetic",
        *config_flags(overlay),
        "--output",
        str(out),
        "--count",
        "2",
        env={"SYNTH_FONT": str(tmp_path / "missing-font.ttc")},
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("synthetic: error: FontMissingError: no CJK font found")
    result = json.loads((out / RESULT_FILE).read_text())
    assert result["exit_code"] == 1 and result["error"].startswith("FontMissingError: no CJK font found")
    assert not (out / COMPLETE_MARKER).exists()


def test_usage_error_exits_2():
    done = run_module("toolkit.synthetic", "--count", "3")
    assert done.returncode == 2 and "--output" in done.stderr


def test_unreachable_tracking_store_exits_1_with_one_line(overlay, tmp_path):
    broken = tmp_path / "broken-tracking.yaml"
    broken.write_text("tracking:\n  tracking_uri: sqlite:////proc/no-such-dir/mlflow.db\n")
    done = run_module("toolkit.synthetic", *config_flags([*overlay, broken]), "--output", str(tmp_path / "out"))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("synthetic: error: ") and "/proc/no-such-dir" in last
