"""``python -m stages.publish``: register a patched model and, where its gate passed, serve it.

1. Logs the model folder to this run's artifacts and registers it in the MLflow Model Registry
   (``publish.registered_model``) with its lineage as tags (dataset version, eval set, git
   commit, pipeline run, metrics, gate decision); alias ``challenger``.
2. If the evaluation's gate did not pass, stops there: the stage succeeds, nothing is served.
3. Builds the vLLM serving image (``docker/serving.Dockerfile`` on ``publish.vllm_image``, the
   weights baked in or streamed from the artifact store), tags it ``v<version>``, pushes it to
   ``publish.image_repository`` and records reference and digest in MLflow.
4. Smoke-tests the pushed image: starts it, waits for ``/health``, sends one eval document
   through ``/v1/chat/completions`` as a client would (routed where the run is: the routing
   prompt, without the type), once free and once with the answer's schema as ``response_format``
   (that request, its image a placeholder, is ``request.json`` in the output and in the image),
   and checks both answers against that schema.
   Only then ``champion`` moves to this version (the one it replaces becomes
   ``previous-champion``); a failed smoke test fails the stage with the server's log tail and
   moves nothing. ``python -m stages.publish.rollback`` moves the champion back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from docpipe.answering.backends import Request, chat_request, requests_for
from docpipe.answering.parsing import extract_json
from docpipe.config import PipelineConfig
from docpipe.contract import BadInputError, input_errors_are_bad_input, main, stage_parser
from docpipe.data.dataset import DatasetCard
from docpipe.data.examples import DataError, read_examples
from docpipe.doctypes import load_registry
from docpipe.manifest import StageOutput, git_commit
from docpipe.registry import EVALUATION_METRICS, Registry
from docpipe.routing import Routing
from docpipe.storage import Storage, StorageError, open_storage
from stages.publish.image import build_and_push, build_context, smoke_test

STAGE = "publish"


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--model", type=Path, required=True, help="the patched model folder")
    parser.add_argument("--evaluation", required=True, help="the evaluate stage's output (decision.json, ...)")
    return parser


def _json(store: Storage, name: str) -> dict:
    try:
        return json.loads(store.read_bytes(name))
    except (StorageError, ValueError) as exc:
        raise BadInputError(f"{store.uri_of(name)}: {exc}") from exc


def lineage(evaluation: Storage, data: Storage, parent_run: str | None) -> dict[str, str]:
    """Tags of the model version: where it came from (``data``: the evaluated export) and how it scored."""
    decision, metrics = (_json(evaluation, n) for n in ("decision.json", "metrics.json"))
    card = DatasetCard.model_validate_json(data.read_bytes("card.json")) if data.exists("card.json") else None
    overall = metrics["metrics"]["overall"]
    return {
        "dataset.version": card.version if card else "unknown",
        "eval_set": metrics["eval_set"],
        EVALUATION_METRICS: evaluation.uri_of("metrics.json"),
        "git_commit": git_commit(),
        "pipeline.run_id": parent_run or "",
        "gate.passed": str(decision["passed"]).lower(),
        "gate.reasons": "; ".join(decision["reasons"])[:4000],
        **{f"metrics.{k}": f"{overall[k]:.4f}" for k in ("field_accuracy", "document_accuracy", "json_validity")},
    }


def smoke_check(example_request: Request, config: PipelineConfig):
    """What the smoke test asks the server, and how it judges the answers (ValueError: not acceptable).
    One document is asked twice, as a client asks it (routed where the run is, without the type):
    first free, where the served weights must answer valid JSON of what is asked on their own (wrong or
    broken weights do not), then as ``request.json`` shows, with the answer's schema as
    ``response_format``, which the server must honour."""
    import jsonschema

    asked = example_request.asked
    served = config.publish.serving.served_model_name

    def judged(answer: str, how: str) -> None:
        parsed = extract_json(answer, asked)
        if parsed is None:
            raise ValueError(f"{how}: the answer holds no JSON object: {answer[:200]!r}")
        try:
            jsonschema.validate(parsed, asked.answer_schema())
        except jsonschema.ValidationError as exc:
            raise ValueError(f"{how}: the answer does not fit the {asked.id} schema: {exc.message}") from exc

    def check(client) -> str:
        answers = []
        for constrained, how in ((False, "asked free"), (True, "asked with response_format")):
            body = chat_request(example_request, served, config, constrained=constrained)
            answers.append(client.chat.completions.create(**body).choices[0].message.content or "")
            judged(answers[-1], how)
        return "\n".join(answers)

    return check


def client_request(example_request: Request, config: PipelineConfig) -> dict:
    """The request a client copies: the smoke test's, its image a placeholder to replace."""
    placeholder = "data:image/jpeg;base64,<the page, base64>"
    return chat_request(
        example_request, config.publish.serving.served_model_name, config, constrained=True, image_url=placeholder
    )


def example_request(data: Storage, config: PipelineConfig) -> Request:
    """The smoke test's document: the evaluated export's first eval document, asked as it was exported
    (routed where the run is routed)."""
    registry = load_registry(config.doctypes_dir)
    routing = Routing.of(registry, config.doc_types, config.export.routing_prompt)
    with input_errors_are_bad_input(DataError):
        examples = read_examples(data.read_bytes("eval.json"), data.uri_of("eval.json"))
        return requests_for(examples[:1], registry, routing, data.uri_of("eval.json"))[0]


def run(args: argparse.Namespace, config: PipelineConfig, output: Storage) -> StageOutput:
    import mlflow

    import docker

    if not (args.model / "config.json").is_file():
        raise BadInputError(f"--model {args.model}: not a model folder (no config.json)")
    evaluation = open_storage(args.evaluation, config.storage.s3)
    data = open_storage(_json(evaluation, "result.json")["inputs"]["data"], config.storage.s3)
    tags = lineage(evaluation, data, mlflow.active_run().data.tags.get("mlflow.parentRunId"))
    passed = tags["gate.passed"] == "true"

    mlflow.log_artifacts(str(args.model), "model")
    run_id = mlflow.active_run().info.run_id
    registry = Registry(config.tracking.tracking_uri, config.publish.registered_model)
    version = registry.register(mlflow.get_artifact_uri("model"), run_id, tags)
    outputs = {"registered_model": config.publish.registered_model, "version": version}
    if not passed:
        return StageOutput(outputs=outputs, counts={"served": 0}, metrics={"gate_passed": 0.0})

    request = example_request(data, config)
    output.write_bytes(
        "request.json", json.dumps(client_request(request, config), ensure_ascii=False, indent=1).encode()
    )
    client = docker.from_env(timeout=config.publish.engine_timeout_s)
    reference = f"{config.publish.image_repository}:v{version}"
    context = build_context(
        Path(output.uri_of("image-context")),
        args.model,
        mlflow.get_artifact_uri("model"),
        config,
        Path(output.uri_of("request.json")),
    )
    image = build_and_push(client, context, reference, config.publish.vllm_image, version)
    registry.tag(version, {"serving.image": image.pinned})
    mlflow.set_tags({"serving.image": image.reference, "serving.digest": image.digest})
    answer = smoke_test(client, image.pinned, config, smoke_check(request, config))
    replaced = registry.promote(version)
    output.write_bytes("smoke_answer.txt", answer.encode("utf-8"))
    return StageOutput(
        inputs={"model": str(args.model), "evaluation": evaluation.uri},
        outputs={
            **outputs,
            "image": image.reference,
            "digest": image.digest,
            "champion": version,
            "previous_champion": replaced or "",
        },
        counts={"served": 1},
        metrics={"gate_passed": 1.0},
    )


if __name__ == "__main__":
    sys.exit(main(STAGE, build_parser(), run))
