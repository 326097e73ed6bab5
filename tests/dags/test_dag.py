"""The Airflow DAGs (dags/doc_extraction.py): they parse, fast and light; their structure and
each launcher's arguments; the form; the watchers; and the whole pipeline run end to end with
``airflow dags test``, once with the local launcher and once with the docker launcher, whose
stages run in containers built from docker/.

What stands in for what: podman's Docker API for the Docker engine; moto's server for S3 and
SQS (S3 event notifications included); no Kubernetes cluster exists here, so the pod the
kubernetes launcher would start is checked as the operator builds it, not run.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml

from docpipe.loader import ConfigError
from docpipe.model import memory_plan
from docpipe.orchestration import plan as planning
from docpipe.orchestration.launchers import stage_operator
from tests.helpers import EMBEDDED, PIPELINE, ROOT, SMOKE, free_port, land_synthetic, run_stage, write_overlay
from toolkit.local_airflow import airflow_environment

HEAVY = ("torch", "transformers", "deepspeed", "mlflow", "boto3", "kubernetes", "docker", "PIL")


def in_dag_process(script: str, env: dict[str, str]) -> dict:
    """Run ``script`` in a fresh interpreter (clean sys.modules); it prints one JSON line last."""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


PARSE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag()
dag = bag.dags["doc_extraction"]
condition = dag.timetable.asset_condition
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dags),
    "heavy": [m for m in %r if m in sys.modules],
    "edges": sorted([t.task_id, d] for t in dag.tasks for d in t.downstream_task_ids),
    "rules": {t.task_id: t.trigger_rule.value for t in dag.tasks},
    "retries": {t.task_id: t.retries for t in dag.tasks},
    "timeouts": {t.task_id: t.execution_timeout.total_seconds() for t in dag.tasks if t.execution_timeout},
    "params": {k: dag.params[k] for k in dag.params},
    "schedule": sorted(a.name for a in getattr(condition, "objects", [condition])),
    "operators": {t.task_id: type(t).__name__ for t in dag.tasks},
    "paused_at_creation": {d.dag_id: d.is_paused_upon_creation for d in bag.dags.values()},
}))
""" % (HEAVY,)  # noqa: UP031


@pytest.fixture
def dag_configs(overlay, tmp_path, tiny_model) -> list[Path]:
    """The embedded default in this test's folder, stages retried once, its base model the tiny one."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-minicpmv4_6").symlink_to(tiny_model)  # where ``embedded`` points
    extra = tmp_path / "dag.yaml"
    extra.write_text(
        "orchestration: {retries: 1}\nevaluation: {ocr_baseline: false}\ndoc_types: [receipt_en, thsr_ticket]\n"
    )  # what the tests land
    return [*overlay, extra]


def test_dags_parse_without_errors_or_heavy_imports(dag_configs, tmp_path):
    parsed = in_dag_process(PARSE, airflow_environment(tmp_path / "airflow", dag_configs))
    assert parsed["errors"] == {}
    assert parsed["dags"] == ["doc_extraction", "doc_extraction_landing_watcher"]
    assert parsed["heavy"] == []
    chain = ["plan", "ingest", "new_data", "export", "finetune", "patch", "evaluate", "gate"]
    assert set(map(tuple, parsed["edges"])) == {
        *zip(chain, chain[1:], strict=False),
        ("gate", "publish"),
        ("gate", "not_published"),
        ("publish", "summary"),
        ("not_published", "summary"),
        ("plan", "gate"),
        ("plan", "new_data"),
        ("plan", "summary"),
    }
    # new_data runs after ingest skipped itself (no new batch); export waits for its verdict
    assert parsed["rules"]["new_data"] == "none_failed" and parsed["rules"]["export"] == "all_success"
    assert parsed["rules"]["summary"] == "all_done"
    assert {parsed["retries"][s] for s in planning.STAGES} == {1}
    assert parsed["timeouts"]["finetune"] == 4320 * 60
    assert parsed["operators"]["finetune"] == "LocalStageOperator"
    assert parsed["params"]["max_steps"] == 12 and parsed["params"]["skip_publish"] is True
    assert parsed["schedule"] == ["landed-batches"]
    assert parsed["paused_at_creation"] == {"doc_extraction": False, "doc_extraction_landing_watcher": False}


def test_the_sqs_watcher_schedules_the_dag_too(dag_configs, tmp_path):
    sqs = tmp_path / "sqs.yaml"
    sqs.write_text("orchestration: {sqs_queue: 'https://sqs.us-east-1.amazonaws.com/123456789012/landing'}\n")
    parsed = in_dag_process(PARSE, airflow_environment(tmp_path / "airflow", [*dag_configs, sqs]))
    assert parsed["errors"] == {} and parsed["heavy"] == ["boto3"]  # the SQS trigger's provider needs it
    assert parsed["schedule"] == ["landed-batches", "landing-notifications"]


def test_a_bad_form_fails_the_plan_naming_the_field(dag_configs, tmp_path):
    config = planning.load_config(ROOT, [str(p) for p in dag_configs])
    form = {**planning.form_defaults(config), "max_steps": 0}
    with pytest.raises(ConfigError, match="the run's form: max_steps: Input should be greater than or equal to 1"):
        planning.make_plan(ROOT, [str(p) for p in dag_configs], form, [], "manual__1")
    form = {**planning.form_defaults(config), "doc_types": ["passport"]}
    with pytest.raises(ConfigError, match=r"--overrides: doc_types: .*unknown document type"):
        planning.make_plan(ROOT, [str(p) for p in dag_configs], form, [], "manual__1")


def test_a_checkpoint_the_environment_cannot_run_fails_the_plan_before_any_stage(dag_configs, tmp_path):
    """MiniCPM-V 2.6 as published: code for transformers 4.40 beside the weights (a folder the form names)."""
    hub = tmp_path / "MiniCPM-V-2_6"
    hub.mkdir()
    (hub / "config.json").write_text(
        json.dumps(
            {
                "model_type": "minicpmv",
                "version": 2.6,
                "transformers_version": "4.40.0",
                "auto_map": {"AutoModel": "modeling_minicpmv.MiniCPMV"},
            }
        )
    )
    remote = write_overlay(tmp_path, "remote.yaml", "model: {adapter: remote_code, llm_type: qwen2}\n")
    paths = [str(p) for p in [*dag_configs, remote]]
    config = planning.load_config(ROOT, paths)
    form = {**planning.form_defaults(config), "base_model": str(hub)}
    with pytest.raises(ConfigError, match=r"written for transformers 4\.40\.0.*Way out: use a native family"):
        planning.make_plan(ROOT, paths, form, [], "manual__1")
    form["base_model"] = str(tmp_path / "typo")
    with pytest.raises(ConfigError, match="typo/config.json does not exist"):
        planning.make_plan(ROOT, [str(p) for p in dag_configs], form, [], "manual__1")


HOSTILE_FORMS = {
    "learning_rate": [1, 0, -0.1, 2, "0.1", None],
    "max_steps": [0, -1, 1.5, "10", None],
    "gpus": [-1, 65, 0.5],
    "base_model": ["", 3, None],
    "nodes": [0, 65, 1.5, 2],  # 2: not with the local launcher
    "doc_types": [[], ["passport"], "receipt_en", None, ["einvoice", "einvoice"]],
    "batches": ["batch-1", [1]],
    "skip_publish": ["yes", None],
    "retrain_on_latest": ["no", 0, None],
    "dry_run": [1],
}
GOOD_FORMS = {
    "learning_rate": [0.999, 1e-9],
    "max_steps": [1],
    "gpus": [0, 64],
    "batches": [None, [], ["b"]],
    "nodes": [1],
    "doc_types": [["receipt_en", "thsr_ticket"], ["einvoice"]],
}


def test_the_form_refuses_exactly_what_the_plan_refuses(dag_configs, tmp_path):
    """One source of truth: every Param comes from the plan's model, so a value the trigger form
    accepts is one the plan accepts, and the other way round."""
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    paths = [str(p) for p in dag_configs]
    config = planning.load_config(ROOT, paths)
    form = {name: Param(**spec) for name, spec in planning.in_home(ROOT, planning.form_params, config).items()}
    defaults = {name: param.resolve() for name, param in form.items()}
    cases = [(field, value, False) for field, values in HOSTILE_FORMS.items() for value in values]
    cases += [(field, value, True) for field, values in GOOD_FORMS.items() for value in values]
    for field, value, good in cases:
        try:
            form[field].resolve(value)
            form_accepts = True
        except ParamValidationError:
            form_accepts = False
        try:
            planning.make_plan(ROOT, paths, {**defaults, field: value}, [], "manual__1")
            plan_accepts = True
        except ConfigError:
            plan_accepts = False
        assert (form_accepts, plan_accepts) == (good, good), f"{field}={value!r}"
    assert form["doc_types"].schema["examples"] == ["einvoice", "receipt_en", "thsr_ticket", "tra_ticket"]
    assert form["doc_types"].schema["values_display"]["thsr_ticket"].endswith("(thsr_ticket)")
    assert "null" in form["batches"].schema["type"] and "null" not in form["max_steps"].schema["type"]


def test_batches_come_from_the_polling_watcher_and_from_s3_notifications():
    def record(event: str, key: str) -> dict:
        return {"eventName": event, "s3": {"bucket": {"name": "land"}, "object": {"key": key}}}

    created = {
        "Records": [
            record("ObjectCreated:Put", "in/batch+7/_COMPLETE"),  # keys arrive URL-encoded
            record("ObjectCreated:Put", "in/batch-8/labels.jsonl"),
            record("ObjectRemoved:Delete", "in/b9/_COMPLETE"),
        ]
    }
    events = {
        "landed-batches": [SimpleNamespace(extra={"batch": "/data/landing/batch-1"})],
        "landing-notifications": [
            SimpleNamespace(
                extra={
                    "from_trigger": True,
                    "payload": {
                        "status": "success",
                        "message_batch": [{"Body": json.dumps(created)}, {"Body": "not json"}],
                    },
                }
            )
        ],
    }
    assert planning.batches_from_events(events) == ["/data/landing/batch-1", "s3://land/in/batch 7"]


def test_new_batches_leave_out_ingested_announced_and_incomplete_ones(dag_configs, tmp_path):
    config = planning.load_config(ROOT, [str(p) for p in dag_configs])
    landing = tmp_path / "landing"
    first, second, third = (land_synthetic(landing / f"batch-{n}", 8, n, ["receipt_en"]) for n in (1, 2, 3))
    (tmp_path / "landing" / "batch-4").mkdir()
    (tmp_path / "landing" / "batch-4" / "labels.jsonl").write_text("")  # still being written: no marker
    assert planning.new_batches(ROOT, config) == [first, second, third]
    assert run_stage("ingest", dag_configs, "--output", str(tmp_path / "datasets"), "--batch", first) == 0
    assert planning.new_batches(ROOT, config, {third}) == [second]
    plan, _ = planning.make_plan(ROOT, [str(p) for p in dag_configs], planning.form_defaults(config), [first], "r1")
    assert plan.batches == []  # the event named a batch already ingested


def test_a_data_triggered_run_trains_only_on_what_its_batches_add(dag_configs, tmp_path):
    """A copy of an ingested batch, or an event naming one, gives the watcher's run nothing to train
    on (the reason says so, and the summary ends the run succeeded, untrained); a manual run retrains
    on the latest version unless its form says not to; a batch with new documents trains."""
    paths = [str(p) for p in dag_configs]
    config = planning.load_config(ROOT, paths)
    form, landing, datasets = planning.form_defaults(config), tmp_path / "landing", str(tmp_path / "datasets")
    first = land_synthetic(landing / "batch-1", 4, 1, ["receipt_en"])
    assert run_stage("ingest", dag_configs, "--output", datasets, "--batch", first) == 0
    copy = str(landing / "batch-copy")
    shutil.copytree(first, copy)

    plan, _ = planning.make_plan(ROOT, paths, form, [copy], "asset_triggered__1")
    assert (plan.trigger, plan.retrain, plan.batches) == ("data", False, [copy])
    assert run_stage("ingest", dag_configs, "--output", datasets, "--batch", copy) == 0
    reason = planning.nothing_to_train_on(plan, config)
    assert reason == (
        "1 batch(es) ingested, 4 records seen, no document the dataset did not already have "
        "(a data-triggered run): nothing new to train on"
    )
    outcome = planning.summarize(plan, config)
    assert (outcome["succeeded"], outcome["trained"], outcome["reason"]) == (True, False, reason)
    assert outcome["stages"]["ingest"]["status"] == "succeeded"

    named, _ = planning.make_plan(ROOT, paths, form, [first], "asset_triggered__2")
    assert (
        planning.nothing_to_train_on(named, config)
        == "no new batch to ingest (a data-triggered run): nothing new to train on"
    )
    manual, _ = planning.make_plan(ROOT, paths, form, [], "manual__1")
    assert manual.trigger == "manual" and planning.nothing_to_train_on(manual, config) is None
    held, _ = planning.make_plan(ROOT, paths, {**form, "retrain_on_latest": False}, [], "manual__2")
    assert "the form's retrain_on_latest is off" in planning.nothing_to_train_on(held, config)

    second = land_synthetic(landing / "batch-2", 4, 2, ["receipt_en"])
    fresh, _ = planning.make_plan(ROOT, paths, form, [second], "asset_triggered__3")
    assert run_stage("ingest", dag_configs, "--output", datasets, "--batch", second) == 0
    assert planning.nothing_to_train_on(fresh, config) is None
    (tmp_path / "datasets" / "result.json").write_text(json.dumps({"status": "failed", "counts": {}}))
    assert planning.nothing_to_train_on(fresh, config) is None  # a failed ingest is the run's failure


def test_a_run_spans_nodes_only_as_a_trainjob_and_its_plan_says_what_memory_it_needs(dag_configs, tmp_path):
    paths = [str(p) for p in dag_configs]
    form = {**planning.form_defaults(planning.load_config(ROOT, paths)), "nodes": 2, "gpus": 8}
    with pytest.raises(ConfigError, match="nodes 2 needs orchestration.launcher kubernetes"):
        planning.make_plan(ROOT, paths, form, [], "manual__1")
    kube = tmp_path / "kube.yaml"
    kube.write_text("orchestration: {launcher: kubernetes}\ntraining: {launch: {gpu_memory_gib: 80}}\n")
    plan, config = planning.make_plan(ROOT, [*paths, str(kube)], form, [], "manual__1")
    assert (plan.nodes, plan.gpus, config.training.launch.nnodes, config.training.launch.gpus_per_node) == (2, 8, 2, 8)
    assert plan.memory.startswith(f"{memory_plan.NAMES[config.training.deepspeed]}, batch ")
    assert "on 2 x 8 GPUs of 80 GiB" in plan.memory
    assert planning.in_home(ROOT, planning.form_params, config)["nodes"]["maximum"] == 64  # nodes offered here


def _plan(gpus: int) -> planning.Plan:
    """A run's plan as the launchers receive it from the plan task."""
    return planning.Plan(
        run_name="r",
        run_uri="/data/runs/r",
        datasets_uri="/data/ds",
        batches=[],
        overrides={},
        gpus=gpus,
        skip_publish=False,
        dry_run=False,
        mlflow_run_id="abc",
        tracking_uri="http://m:5000",
    )


def _config_with(configs: list[Path], tmp_path: Path, overlay: str):
    path = tmp_path / "launcher.yaml"
    path.write_text(overlay)
    return planning.load_config(ROOT, [str(p) for p in [*configs, path]])


def test_docker_launcher_hands_gpus_shm_ulimits_and_nccl_to_the_container(dag_configs, tmp_path, monkeypatch):
    settings = (
        "orchestration: {launcher: docker, mounts: {/srv/data: /data}, network_mode: pipeline, "
        "pass_environment: [AWS_SECRET_ACCESS_KEY, UNSET_KEY]}\n"
    )
    config, plan = _config_with(dag_configs, tmp_path, settings), _plan(gpus=2)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-key")
    finetune = stage_operator("finetune", config, ROOT, [])
    finetune.container_settings_for(plan)
    assert finetune.image == config.gpu_container.image and finetune.mount_tmp_dir is False
    assert finetune.command[:3] == ["python", "-m", "stages.finetune"] and "--overrides" in finetune.command
    (request,) = finetune.device_requests
    assert request["Count"] == 2 and request["Capabilities"] == [["gpu"]]
    assert finetune.shm_size == 32 * 2**30
    assert {u["Name"]: u["Hard"] for u in finetune.ulimits} == {"memlock": -1, "stack": 67108864}
    assert {
        "NCCL_DEBUG": "WARN",
        "NCCL_IB_DISABLE": "0",
        "MLFLOW_RUN_ID": "abc",
        "MLFLOW_TRACKING_URI": "http://m:5000",
    }.items() <= finetune.environment.items()
    assert [(m["Source"], m["Target"]) for m in finetune.mounts] == [("/srv/data", "/data")]
    # what DockerOperator adds to the container's environment, kept out of the rendered one
    assert finetune._private_environment == {"AWS_SECRET_ACCESS_KEY": "planted-key"}
    assert "planted-key" not in json.dumps(finetune.environment)
    ingest = stage_operator("ingest", config, ROOT, [])
    ingest.container_settings_for(plan)
    assert ingest.image == config.orchestration.stage_image and not ingest.device_requests
    assert ingest.network_mode == "pipeline"


def test_kubernetes_launcher_asks_for_gpus_and_a_memory_backed_shm(dag_configs, tmp_path):
    settings = "orchestration: {launcher: kubernetes, kubernetes: {namespace: ml, data_claim: pipeline-data}}\n"
    config, plan = _config_with(dag_configs, tmp_path, settings), _plan(gpus=4)
    patch = stage_operator("patch", config, ROOT, [])
    patch.pod_spec_for(plan)
    assert patch.namespace == "ml" and patch.cmds == ["python"]
    assert patch.arguments[:2] == ["-m", "stages.patch"]
    assert patch.container_resources.limits == {"nvidia.com/gpu": "4"}
    shm = {v.name: v for v in patch.volumes}["dshm"].empty_dir
    assert shm.medium == "Memory" and shm.size_limit == "32Gi"
    assert {m.mount_path for m in patch.volume_mounts} == {"/dev/shm", "/data"}
    assert {"NCCL_DEBUG": "WARN", "MLFLOW_RUN_ID": "abc"}.items() <= {e.name: e.value for e in patch.env_vars}.items()
    assert (
        type(stage_operator("finetune", config, ROOT, [])).__name__ == "TrainJobOperator"
    )  # its own tests: tests/docpipe/test_trainjob.py
    export = stage_operator("export", config, ROOT, [])
    export.pod_spec_for(plan)
    assert export.container_resources is None and "dshm" not in {v.name for v in export.volumes}


@pytest.mark.integration
def test_the_sqs_watchers_trigger_reports_a_completed_batch(s3_endpoint, bucket, monkeypatch):
    """S3 notifies SQS of each new object (moto's server does both); the DAG's MessageQueueTrigger
    receives the marker's notification, and the plan turns it into the batch to ingest."""
    import boto3
    from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger

    sqs = boto3.client("sqs", endpoint_url=s3_endpoint)
    queue = sqs.create_queue(QueueName="landing")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "suffix", "Value": "_COMPLETE"}]}},
                }
            ]
        },
    )
    sqs.purge_queue(QueueUrl=queue)  # moto sends a test event when notifications are configured
    s3.put_object(Bucket=bucket, Key="landing/batch-9/labels.jsonl", Body=b"")
    s3.put_object(Bucket=bucket, Key="landing/batch-9/_COMPLETE", Body=b"{}")
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_LOOPBACK",
        json.dumps({"conn_type": "aws", "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}),
    )
    trigger = MessageQueueTrigger(scheme="sqs", sqs_queue=queue, aws_conn_id="aws_loopback", waiter_delay=1)

    async def first_event():
        return await asyncio.wait_for(anext(trigger.trigger.run()), timeout=60)

    event = asyncio.run(first_event())
    extra = {"from_trigger": True, "payload": event.payload}  # what the triggerer records on the asset event
    assert planning.batches_from_events({"landing-notifications": [SimpleNamespace(extra=extra)]}) == [
        f"s3://{bucket}/landing/batch-9"
    ]


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    """An Airflow metadata database (sqlite) for ``airflow dags test``."""
    home = tmp_path_factory.mktemp("airflow")
    env = airflow_environment(home, [PIPELINE, EMBEDDED])
    done = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return home


def airflow(home: Path, configs: list[Path], *args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), *args],
        cwd=ROOT,
        env=airflow_environment(home, configs),
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def _pipeline_runs(tracking_uri: str, experiment: str = "doc-extraction") -> tuple[object, dict[str, object]]:
    """The one parent run of the experiment, and its child runs by stage."""
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("pipeline.role") == "parent"]
    children = {
        r.data.tags["pipeline.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    return parent, children


@pytest.mark.integration
def test_the_dag_runs_end_to_end_with_the_local_launcher(airflow_home, dag_configs, tmp_path):
    batch = land_synthetic(tmp_path / "landing" / "batch-1", 16, doc_types=["receipt_en", "thsr_ticket"])

    watched = airflow(airflow_home, dag_configs, "dags", "test", "doc_extraction_landing_watcher")
    assert watched.returncode == 0, watched.stdout[-3000:]
    assert f"Returned value was: ['{batch}']" in watched.stdout + watched.stderr

    done = airflow(airflow_home, dag_configs, "dags", "test", "doc_extraction")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "gate passed" in output and "Marking run" in output and "successful" in output
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "evaluate" / "decision.json").read_text())["passed"] is True
    assert not (run / "publish").exists()  # the embedded default publishes nothing
    parent, children = _pipeline_runs(f"sqlite:///{tmp_path}/mlflow/mlflow.db")
    assert parent.info.status == "FINISHED"
    assert set(children) == {"ingest", "export", "finetune", "patch", "evaluate"}
    assert all(child.info.status == "FINISHED" for child in children.values())
    card = json.loads((tmp_path / "datasets" / "result.json").read_text())
    assert card["inputs"] and batch in json.dumps(card)

    dry = airflow(airflow_home, dag_configs, "dags", "test", "doc_extraction", "--conf", '{"dry_run": true}')
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-3000:]
    for stage in planning.STAGES:  # the plan task prints every stage's command, publish's included
        assert f"dry run: stages.{stage} would run: python -m stages.{stage} --config" in dry.stdout + dry.stderr
    assert len(list((tmp_path / "runs").iterdir())) == 1  # nothing ran


@pytest.mark.integration
def test_a_failed_plan_is_reported_as_such_by_the_summary(airflow_home, dag_configs, tmp_path):
    """The landing store is down when the run is planned: plan fails naming it, and the summary
    says the plan failed (not a validation error about a missing plan)."""
    down = tmp_path / "down.yaml"
    down.write_text(
        yaml.safe_dump(
            {
                "storage": {
                    "landing_uri": "s3://landing/batches",
                    "s3": {
                        "endpoint_url": f"http://127.0.0.1:{free_port()}",
                        "max_attempts": 1,
                        "connect_timeout_s": 1,
                    },
                }
            }
        )
    )
    done = airflow(airflow_home, [*dag_configs, down], "dags", "test", "doc_extraction")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Could not connect to the endpoint URL" in output or "127.0.0.1" in output
    assert "the plan task failed, so no stage ran" in output
    assert "input_value=None" not in output


@pytest.mark.integration
@pytest.mark.container
def test_the_dag_runs_end_to_end_in_containers(
    airflow_home, tmp_path, tiny_model, docker_client, stage_image, train_image, mlflow_server
):
    """Every stage in a container of the project's images through podman's Docker API, tracking
    into a real MLflow server (as compose does); the data folder is mounted at the same path, so
    the one overlay serves the worker and the containers. The sandbox forbids raising ulimits,
    so the GPU stages run without them here."""
    work = tmp_path / "work"
    work.mkdir()
    experiment = f"dag-in-containers-{uuid.uuid4().hex[:8]}"
    shutil.copytree(tiny_model, work / "model")
    smoke = shutil.copy(SMOKE, work / "smoke.yaml")
    overlay = work / "overlay.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "doctypes_dir": "configs/doctypes",
                "storage": {
                    "landing_uri": str(work / "landing"),
                    "datasets_uri": str(work / "datasets"),
                    "runs_uri": str(work / "runs"),
                },
                "tracking": {"tracking_uri": mlflow_server, "experiment": experiment, "artifact_location": None},
                "model": {"base": str(work / "model")},
                "evaluation": {"ocr_baseline": False},
                "gpu_container": {"image": train_image, "ulimits": None, "shm_size": "1g"},
                "orchestration": {
                    "launcher": "docker",
                    "stage_image": stage_image,
                    "docker_url": docker_client.docker_host,
                    "network_mode": "host",
                    "mounts": {str(work): str(work)},
                    "retries": 0,
                    "container_configs": [
                        "configs/pipeline.yaml",
                        "configs/overlays/embedded.yaml",
                        str(smoke),
                        str(overlay),
                    ],
                },
            }
        )
    )
    configs = [PIPELINE, EMBEDDED, smoke, overlay]
    land_synthetic(work / "landing" / "batch-1", 12, doc_types=["receipt_en"])
    for path in [work, *work.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)

    no_gpu = json.dumps({"gpus": 0})  # the form's GPU count: no device request (there is no GPU here)
    done = airflow(airflow_home, configs, "dags", "test", "doc_extraction", "--conf", no_gpu, umask=0)
    output = done.stdout + done.stderr
    (tmp_path / "airflow.log").write_text(output)  # the whole run's log, when the tail below is not enough
    assert done.returncode == 0, output[-5000:]
    (run,) = (work / "runs").iterdir()
    finetune = json.loads((run / "finetune" / "result.json").read_text())
    assert finetune["status"] == "succeeded" and finetune["versions"]["torch"].startswith("2.13.0")
    ingest = json.loads((work / "datasets" / "result.json").read_text())
    assert ingest["counts"]["accepted"] == 12 and "torch" not in ingest["versions"]  # the CPU image: no torch
    parent, children = _pipeline_runs(mlflow_server, experiment)
    assert parent.info.status == "FINISHED" and set(children) == {"ingest", "export", "finetune", "patch", "evaluate"}
