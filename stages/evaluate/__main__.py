"""``python -m stages.evaluate``: score a model on an export's eval documents and decide the gate.

Answers every document of ``<data>/eval.json`` through ``evaluation.backend`` (``transformers``
on the model folder, ``openai`` against ``evaluation.endpoint``, ``vllm`` on a GPU), parses the
JSON in each answer, scores each field against the label with the document type's
normalisation, runs the OCR baseline on the same documents (``evaluation.ocr_baseline``), and
applies the gate: thresholds per type and, with ``--champion-metrics``, no regression against
the champion measured on the same eval set. The fit check (``evaluation.fit_check``) answers a
fixed sample of ``train.json`` the same way, then again with each image swapped for another
document's: train against eval tells under-fitting from over-fitting, and the control tells
answers read from the pixels from answers guessed from the prompt; the gate can require both.
Routed documents (exported with ``export.routing``) are asked without their type: type accuracy and
the confusion between types are scored and gated (``evaluation.type_accuracy``), the image control
swaps images across types, and the eval set is answered a second time with each document's type
given through the answer's schema (the same prompt, constrained to the labelled type), so the
report shows what routing costs per type.
Writes ``predictions.jsonl``, ``metrics.json``, ``decision.json`` and ``report.html``; the
stage succeeds whatever the decision (a failed gate is an outcome, not an error) and reports
it as ``metrics.gate_passed`` for the DAG.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from docpipe import tracking
from docpipe.answering.backends import Backend, NoModelFolder, Request, open_backend, requests_for
from docpipe.answering.scoring import HEADLINE, Scored, evaluate_all, measure, score
from docpipe.config import EvaluationConfig, FitCheckConfig, PipelineConfig
from docpipe.contract import BadInputError, input_errors_are_bad_input, main, stage_parser
from docpipe.data.examples import DataError, Example, fixed_sample, read_examples
from docpipe.doctypes import OTHER, TYPE_KEY, DocType, load_registry
from docpipe.manifest import StageOutput, jsonl
from docpipe.model.adapters import AdapterError
from docpipe.routing import Routing
from docpipe.storage import Storage, StorageError, StorageUnavailable, absolute_location, open_storage
from stages.evaluate.gate import Decision, decide

STAGE = "evaluate"
OUTPUT_FILES = ("predictions.jsonl", "metrics.json", "decision.json", "report.html")


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--data", help="the export stage's output (eval.json; train.json for the fit check)")
    parser.add_argument(
        "--eval-set",
        help="a golden set of evaluation.eval_sets to answer instead of eval.json "
        "(default: evaluation.eval_set); without --data: a regression check, no training",
    )
    parser.add_argument("--model", help="the patched model folder (transformers and vllm backends)")
    parser.add_argument("--champion-metrics", help="metrics.json of the champion's evaluation, to compare with")
    return parser


def read_requests(
    data: Storage, name: str, registry: dict[str, DocType], routing: Routing
) -> tuple[list[Request], str]:
    """The documents of an examples file, and the file's version (its hash)."""
    with input_errors_are_bad_input(DataError):
        raw = data.read_bytes(name)
        examples = read_examples(raw, data.uri_of(name))
        if not examples:
            raise BadInputError(f"{data.uri_of(name)}: no documents")
        requests = requests_for(examples, registry, routing, data.uri_of(name))
    return requests, hashlib.sha256(raw).hexdigest()[:16]


def golden_requests(
    config: PipelineConfig, name: str, registry: dict[str, DocType], routing: Routing
) -> tuple[list[Request], str]:
    """The eval documents of a golden set's pinned version, of the run's types; its id is ``name@version``."""
    from docpipe.data.dataset import read_manifest
    from docpipe.data.examples import example_for

    pinned = config.evaluation.eval_sets[name]
    dataset = open_storage(pinned.dataset, config.storage.s3)
    not_found = f"eval set {name!r}: version {pinned.version} of {dataset.uri} not found: "
    with input_errors_are_bad_input(prefix=not_found):
        records = read_manifest(dataset, pinned.version)
    root = absolute_location(dataset.uri)
    asked = routing if config.export.routing else None
    wanted = [*config.doc_types, *([OTHER] if asked else [])]
    examples = [
        Example.model_validate(example_for(r, registry.get(r.doc_type), root, False, asked))
        for r in records
        if r.split == "eval" and r.doc_type in wanted
    ]
    if not examples:
        raise BadInputError(
            f"eval set {name!r} ({dataset.uri} version {pinned.version}): no eval document of types {config.doc_types}"
        )
    tracking.log_dataset(dataset.uri, pinned.version, context="evaluation")
    with input_errors_are_bad_input(DataError):
        requests = requests_for(examples, registry, routing, f"eval set {name!r} ({dataset.uri})")
    return requests, f"{name}@{pinned.version}"


def _log_exported_dataset(data: Storage) -> None:
    """The dataset version the export was made from, as this run's evaluation input (where the export says)."""
    try:
        exported = json.loads(data.read_bytes("result.json")).get("inputs", {})
    except StorageUnavailable:
        raise
    except (StorageError, ValueError):
        return
    if exported.get("dataset") and exported.get("version"):
        tracking.log_dataset(exported["dataset"], exported["version"], context="evaluation")


def fit_sample(data: Storage, registry: dict[str, DocType], routing: Routing, size: int, seed: int) -> list[Request]:
    """The fit check's fixed sample of training documents (the same for the same train.json and seed)."""
    requests, _ = read_requests(data, "train.json", registry, routing)
    chosen = {e.id for e in fixed_sample([r.example for r in requests], size, seed)}
    return [r for r in requests if r.example.id in chosen]


def _label(request: Request) -> str:
    return request.example.doc_type


def swapped_images(requests: list[Request]) -> list[Request]:
    """The image control: each document asked about with another document's image, so no answer can be
    read from its own pixels. Asked with its type, the donor is the next document of the same type (the
    next at all, where its type has one document only): the answer's keys are still right, its values
    not. Routed, the donor is the next document of another type: a model that reads names the
    donor's type, so type accuracy falls too. A model that reads scores near what guessing would."""
    donor = {}
    for index, request in enumerate(requests):
        after = [requests[(index + step) % len(requests)] for step in range(1, len(requests))]
        same = [d for d in after if _label(d) == _label(request)]
        other = [d for d in after if _label(d) != _label(request)]
        pool = (other or same) if request.routing else (same or after)
        donor[index] = pool[0] if pool else request
    return [
        Request(r.example.model_copy(update={"image": donor[i].example.image}), r.doc_type, r.routing)
        for i, r in enumerate(requests)
    ]


def type_given(
    backend: Backend, requests: list[Request], registry: dict[str, DocType], config: PipelineConfig
) -> tuple[dict | None, str | None]:
    """The routed eval documents of a registered type answered again, the same prompt with the answer's
    schema fixed to the labelled type (so constrained decoding, whatever ``structured_output`` says):
    what the fields would score had the type been known. None, with a note, where nothing was routed or
    the backend cannot constrain."""
    given = [Request(r.example, r.doc_type, r.routing.given(r.doc_type)) for r in requests if r.routing and r.doc_type]
    if not given:
        return None, None
    constrained = backend.with_settings(config.evaluation.model_copy(update={"structured_output": True}))
    try:
        _, metrics = measure(constrained, given, registry, config.evaluation.review_threshold)
    except AdapterError as exc:
        return None, f"the type-given pass did not run: {exc}"
    return metrics, None


def ocr_baseline(requests: list[Request], config: PipelineConfig) -> tuple[list[Scored], float]:
    """The OCR pipeline on the same documents, asked as the model was: with the type given, or routed
    (its best guess at the type: the one whose fields it finds most of; none found, other)."""
    from docpipe.answering.ocr_baseline import OcrBaseline
    from docpipe.data.examples import load_image

    reader, documents, started = OcrBaseline(), [], time.perf_counter()
    for request in requests:
        image = load_image(request.example.image, config.storage.s3)
        if request.routing:
            doc_type, fields, seconds = reader.guess(request.routing.doc_types, image)
            fields = {TYPE_KEY: doc_type.id if doc_type else OTHER, **fields}
        else:
            fields, seconds = reader.read(request.doc_type, image)
        documents.append(
            score(
                request.doc_type,
                request.example.id,
                json.loads(request.example.answer),
                fields,
                json.dumps(fields, ensure_ascii=False),
                seconds,
                request.routing,
            )
        )
    return documents, time.perf_counter() - started


def _flat(metrics: dict, prefix: str = "") -> dict[str, float]:
    """MLflow metrics: overall under their names, per type as ``<type>.<name>``, per field one deeper."""
    flat = {f"{prefix}{k}": v for k, v in metrics["overall"].items()}
    for doc_type, values in metrics["per_doc_type"].items():
        for key, value in values.items():
            if isinstance(value, dict):
                flat |= {f"{prefix}{doc_type}.{key}.{field}": v for field, v in value.items()}
            else:
                flat[f"{prefix}{doc_type}.{key}"] = value
    return flat


def _confidence_metrics(confidence: dict | None) -> dict[str, float]:
    """The review figures as MLflow metrics (the calibration table is in the report and metrics.json)."""
    if confidence is None:
        return {}
    logged = {"review_rate": confidence["review_rate"]}
    if confidence["calibration"]["expected_calibration_error"] is not None:
        logged["expected_calibration_error"] = confidence["calibration"]["expected_calibration_error"]
    if confidence["accepted"]:
        logged |= {f"accepted.{k}": confidence["accepted"][k] for k in HEADLINE}
    return logged


def _selection(model: str | None) -> dict | None:
    """How the patched model's checkpoint was chosen (``patch.json``), for the report's curve."""
    path = Path(model or "/nonexistent") / "patch.json"
    return json.loads(path.read_text()).get("selection") if path.is_file() else None


def registered_champion(config: PipelineConfig, eval_set: str) -> tuple[str | None, str]:
    """The registered champion's ``metrics.json`` where it was evaluated on ``eval_set``, and a note
    on what was (or could not be) compared."""
    from docpipe.registry import CHAMPION, EVALUATION_METRICS, Registry

    champion = Registry(config.tracking.tracking_uri, config.publish.registered_model).version_of(CHAMPION)
    if champion is None:
        return None, f"no champion of {config.publish.registered_model} yet: nothing to compare with"
    its_set, uri = champion.tags.get("eval_set"), champion.tags.get(EVALUATION_METRICS)
    if its_set != eval_set or not uri:
        return None, (
            f"champion version {champion.version} was evaluated on {its_set}, not {eval_set}: not compared "
            f"(evaluate it on {eval_set} and pass its metrics.json as --champion-metrics)"
        )
    return uri, f"compared with champion version {champion.version} on {eval_set}"


def _champion(uri: str | None, config: PipelineConfig) -> tuple[dict | None, str | None]:
    if not uri:
        return None, None
    parent, name = uri.rsplit("/", 1)
    not_metrics = f"--champion-metrics {uri}: not a metrics.json of this stage: "
    with input_errors_are_bad_input(ValueError, KeyError, prefix=not_metrics):
        saved = json.loads(open_storage(parent, config.storage.s3).read_bytes(name))
        return saved["metrics"], saved["eval_set"]


@dataclass
class Inputs:
    """What the run answers: the eval documents (and their set's id), the fit check's sample, the
    champion's figures to compare with, and notes on what was left out."""

    data: Storage | None
    requests: list[Request]
    eval_set: str
    settings: EvaluationConfig
    train_sample: list[Request] = field(default_factory=list)
    champion_uri: str | None = None
    champion: dict | None = None
    champion_eval_set: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """The answers scored: the eval set's, the fit check's, the OCR baseline's, and the gate's decision."""

    documents: list[Scored]
    metrics: dict
    fit: dict | None
    control: dict | None
    baseline: dict | None
    decision: Decision
    type_given: dict | None = None  # routed eval documents answered again with the type given


def read_inputs(args: argparse.Namespace, config: PipelineConfig, registry: dict[str, DocType]) -> Inputs:
    """The eval documents (an export's eval.json or a golden set), the fit sample and the champion."""
    settings, fit_check = config.evaluation, config.evaluation.fit_check
    golden = args.eval_set or settings.eval_set
    if golden and golden not in settings.eval_sets:
        raise BadInputError(f"--eval-set {golden}: not one of evaluation.eval_sets {sorted(settings.eval_sets)}")
    if not (golden or args.data):
        raise BadInputError("give --data (an export's eval.json) or --eval-set (a golden set of evaluation.eval_sets)")
    data = open_storage(args.data, config.storage.s3) if args.data else None
    if data is not None and not golden:
        _log_exported_dataset(data)
    routing = Routing.of(registry, config.doc_types, config.export.routing_prompt)  # as export asks it
    requests, eval_set = (
        golden_requests(config, golden, registry, routing)
        if golden
        else read_requests(data, "eval.json", registry, routing)
    )
    inputs = Inputs(data, requests, eval_set, settings)
    if data is None and (fit_check.thresholds or fit_check.max_control_ratio is not None):
        inputs.settings = settings.model_copy(update={"fit_check": FitCheckConfig(documents=0)})
        inputs.notes.append("no --data: a regression check on the eval set alone, without the fit check's rules")
    if data and fit_check.documents:
        inputs.train_sample = fit_sample(data, registry, routing, fit_check.documents, fit_check.seed)
    inputs.champion_uri = args.champion_metrics
    if not inputs.champion_uri and golden:
        inputs.champion_uri, note = registered_champion(config, eval_set)
        inputs.notes.append(note)
    inputs.champion, inputs.champion_eval_set = _champion(inputs.champion_uri, config)
    return inputs


def answer_and_score(
    inputs: Inputs, model: str | None, config: PipelineConfig, registry: dict[str, DocType]
) -> Outcome:
    """Every document answered by the backend and scored; the fit check, its image control and the
    OCR baseline beside them; then the gate."""
    try:
        backend = open_backend(config, model)
    except NoModelFolder as exc:
        raise BadInputError(str(exc)) from exc
    settings, sample = inputs.settings, inputs.train_sample
    threshold = settings.review_threshold
    documents, metrics = measure(backend, inputs.requests, registry, threshold)
    given, note = type_given(backend, inputs.requests, registry, config)
    fit = control = baseline = None
    if sample:
        _, fit = measure(backend, sample, registry, threshold)
        if settings.fit_check.image_control and len(sample) > 1:
            _, control = measure(backend, swapped_images(sample), registry, threshold)
    if settings.ocr_baseline:
        baseline_documents, seconds = ocr_baseline(inputs.requests, config)
        baseline = evaluate_all(baseline_documents, registry, seconds, threshold)
    decision = decide(
        metrics, settings, inputs.eval_set, inputs.champion, inputs.champion_eval_set, fit, control, config.doc_types
    )
    decision.notes = inputs.notes + ([note] if note else [])
    return Outcome(documents, metrics, fit, control, baseline, decision, given)


def prediction_rows(documents: list[Scored], threshold: float) -> list[dict]:
    """One row per document for ``predictions.jsonl`` and MLflow's table."""
    return [
        {
            "id": d.id,
            "doc_type": d.doc_type,
            "answered_type": d.answered_type,
            "expected": d.expected,
            "predicted": d.predicted,
            "answer": d.answer,
            "latency_s": d.latency_s,
            "correct": d.correct,
            "confidence": d.confidence,
            "needs_review": d.needs_review(threshold),
        }
        for d in documents
    ]


def write_outputs(
    output: Storage, inputs: Inputs, outcome: Outcome, predictions: list[dict], model: str, config: PipelineConfig
) -> str:
    """predictions.jsonl, metrics.json, decision.json and report.html; returns the report."""
    from stages.evaluate.report import render

    output.write_bytes("predictions.jsonl", jsonl(predictions))
    saved = {
        "eval_set": inputs.eval_set,
        "model": model,
        "metrics": outcome.metrics,
        "baseline": outcome.baseline,
        "fit": outcome.fit,
        "image_control": outcome.control,
        "type_given": outcome.type_given,
    }
    output.write_bytes("metrics.json", json.dumps(saved, indent=2, ensure_ascii=False).encode("utf-8"))
    output.write_bytes("decision.json", outcome.decision.model_dump_json(indent=2).encode("utf-8"))
    page = render(
        model=model,
        backend=config.evaluation.backend,
        eval_set=inputs.eval_set,
        metrics=outcome.metrics,
        baseline=outcome.baseline,
        fit=outcome.fit,
        control=outcome.control,
        type_given=outcome.type_given,
        selection=_selection(model),
        decision=outcome.decision.model_dump(),
        documents=outcome.documents,
        images={r.example.id: r.example.image for r in inputs.requests},
        gallery_size=config.evaluation.gallery_size,
        s3=config.storage.s3,
    )
    output.write_bytes("report.html", page.encode("utf-8"))
    return page


def log_to_mlflow(eval_set: str, outcome: Outcome, predictions: list[dict], page: str) -> None:
    """Metrics (overall, per type and field, baseline, fit, control), the gate's tags, the report,
    the decision and the predictions table, in the stage's MLflow run."""
    import mlflow

    logged = _flat(outcome.metrics) | _confidence_metrics(outcome.metrics["confidence"])
    for part, prefix in (
        (outcome.baseline, "ocr_baseline."),
        (outcome.fit, "fit."),
        (outcome.control, "image_control."),
        (outcome.type_given, "type_given."),
    ):
        logged |= _flat(part, prefix) if part else {}
    mlflow.log_metrics(logged)
    mlflow.set_tags({"eval_set": eval_set, "gate.passed": str(outcome.decision.passed).lower()})
    mlflow.log_text(page, f"{STAGE}/report.html")
    mlflow.log_dict(outcome.decision.model_dump(mode="json"), f"{STAGE}/decision.json")
    if outcome.metrics["routing"]:
        mlflow.log_dict(outcome.metrics["routing"], f"{STAGE}/type_confusion.json")
    table = {
        key: [json.dumps(p[key], ensure_ascii=False) if isinstance(p[key], dict) else p[key] for p in predictions]
        for key in predictions[0]
    }
    mlflow.log_table(table, f"{STAGE}/predictions.json")


def stage_output(args: argparse.Namespace, inputs: Inputs, outcome: Outcome, output: Storage) -> StageOutput:
    overall, baseline, fit, control = outcome.metrics["overall"], outcome.baseline, outcome.fit, outcome.control
    documents = outcome.documents
    return StageOutput(
        inputs={
            "data": inputs.data.uri if inputs.data else "",
            "model": args.model or "",
            "eval_set": inputs.eval_set,
            "champion_metrics": inputs.champion_uri or "",
        },
        outputs={name: output.uri_of(name) for name in OUTPUT_FILES},
        counts={"documents": len(documents), "unparsed": sum(d.predicted is None for d in documents)},
        metrics={
            "gate_passed": float(outcome.decision.passed),
            **{k: overall[k] for k in ("field_accuracy", "document_accuracy", "json_validity", "docs_per_s")},
            **({"type_accuracy": overall["type_accuracy"]} if "type_accuracy" in overall else {}),
            **({"ocr_baseline.field_accuracy": baseline["overall"]["field_accuracy"]} if baseline else {}),
            **({f"fit.{k}": fit["overall"][k] for k in HEADLINE} if fit else {}),
            **({"image_control.field_accuracy": control["overall"]["field_accuracy"]} if control else {}),
            **(
                {"image_control.type_accuracy": control["overall"]["type_accuracy"]}
                if control and "type_accuracy" in control["overall"]
                else {}
            ),
        },
    )


def run(args: argparse.Namespace, config: PipelineConfig, output: Storage) -> StageOutput:
    registry = load_registry(config.doctypes_dir)
    inputs = read_inputs(args, config, registry)
    outcome = answer_and_score(inputs, args.model, config, registry)
    predictions = prediction_rows(outcome.documents, inputs.settings.review_threshold)
    page = write_outputs(output, inputs, outcome, predictions, args.model or config.evaluation.endpoint, config)
    log_to_mlflow(inputs.eval_set, outcome, predictions, page)
    return stage_output(args, inputs, outcome, output)


if __name__ == "__main__":
    sys.exit(main(STAGE, build_parser(), run))
