"""``python -m stages.prelabel``: unlabelled documents into Label Studio, pre-filled, worst first.

Reads every image under ``--images`` (a folder or s3:// prefix without labels), answers each with
the champion model (``--model`` a folder; default: the registry's champion, downloaded; with no
champion, the OCR baseline), and creates one Label Studio task per document in its type's project
(``<labelling.project_prefix>: <type>``, created with a labelling configuration generated from the
registry) with the answer as its pre-annotation, each field's confidence as its score. With
``--doc-type`` every image is of that type; without it the images may be of any of the run's types:
the model names each one's type (routed, ``export.routing``), or the OCR baseline guesses it (the
type whose fields it finds most of). A page answered as none of the types (``other``) goes to no
project: it is listed in ``unrouted.jsonl`` with what was answered. Tasks are imported least
confident first (the type's own confidence counts), so a reviewer starts where the model is least
sure; ``needs_review`` in the task data marks documents below ``evaluation.review_threshold``. An
image that does not decode is listed in ``rejected.jsonl`` with the reason and the rest go on.
Writes ``predictions.jsonl``, ``tasks.json``, ``labeling_config/<type>.xml``, ``unrouted.jsonl``
and ``rejected.jsonl``; ``stages.collect_labels`` brings the reviewed values back.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import mimetypes
import sys
import tempfile
from pathlib import PurePosixPath

from PIL import Image

from docpipe.answering.backends import Request
from docpipe.answering.confidence import document_confidence, field_confidence
from docpipe.answering.parsing import extract_json
from docpipe.config import PipelineConfig
from docpipe.contract import BadInputError, main, stage_parser
from docpipe.data.examples import Example
from docpipe.doctypes import OTHER, TYPE_KEY, DocType, load_registry
from docpipe.label_studio import LabelStudio, labelling_config, project_title, registered_type, result_items
from docpipe.manifest import StageOutput, jsonl
from docpipe.registry import champion_model
from docpipe.routing import Routing, answered_type
from docpipe.storage import Storage, StorageError, StorageUnavailable, open_storage

STAGE = "prelabel"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--images", required=True, help="unlabelled images: a folder or s3:// prefix")
    parser.add_argument(
        "--doc-type", help="the document type of every image (a registry id); default: each image's, as answered"
    )
    parser.add_argument("--model", help="the model folder that pre-fills (default: the registry's champion)")
    return parser


def read_images(source: Storage) -> tuple[list[tuple[str, bytes]], list[dict]]:
    """(uri, bytes) of every image that decodes, and the rest with their reasons."""
    good, rejected = [], []
    for key in sorted(source.list()):
        if not key.lower().endswith(IMAGE_SUFFIXES):
            continue
        uri = source.uri_of(key)
        try:
            data = source.read_bytes(key)
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
        except StorageUnavailable:
            raise
        except (StorageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            rejected.append({"image": uri, "reason": f"not a readable image: {type(exc).__name__}: {exc}"})
            continue
        good.append((uri, data))
    return good, rejected


def prelabel_requests(config: PipelineConfig, given: DocType | None, images: list[str]) -> list[Request]:
    """Each image as the model was trained to be asked: routed where the run is (constrained to the
    type where ``--doc-type`` gives it), else with the type's own prompt (which needs the type)."""
    registry = load_registry(config.doctypes_dir)
    if config.export.routing:
        routing = Routing.of(registry, config.doc_types, config.export.routing_prompt)
        asked, prompt = (routing.given(given) if given else routing), routing.prompt
    elif given is None:
        raise BadInputError("--doc-type is needed where export.routing is off: the model knows no type by itself")
    else:
        asked, prompt = None, given.prompt
    return [
        Request(
            Example(
                id=uri,
                doc_type=given.id if given else None,
                routed=asked is not None,
                image=uri,
                conversations=[{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}],
            ),
            given,
            asked,
        )
        for uri in images
    ]


def read_answer(request: Request, answer: str, logprobs) -> dict:
    """A model's answer as a prediction: the type it was given, or else the one it names; that type's
    fields and each one's confidence (the type's own too, routed)."""
    parsed = extract_json(answer, request.asked)
    if request.doc_type is not None:
        doc_type = request.doc_type  # the user said so, whatever was answered
    else:
        doc_type = {t.id: t for t in request.routing.doc_types}.get(answered_type(parsed))
    names = [f.name for f in doc_type.fields] if doc_type else []
    keys = [TYPE_KEY] if request.routing else []
    confidence = field_confidence(answer, parsed, keys + names, logprobs)
    fields = {k: v for k, v in (parsed or {}).items() if k in names}
    return {
        "doc_type": doc_type.id if doc_type else OTHER,
        "fields": fields,
        "confidence": confidence,
        "answer": answer,
    }


def predict_with_model(config: PipelineConfig, model: str, given: DocType | None, images: list[str]) -> list[dict]:
    """Each image's type, fields and per-field confidence from the model (the evaluation backend)."""
    from docpipe.answering.backends import NoModelFolder, open_backend

    settings = config.evaluation.model_copy(update={"structured_output": config.labelling.structured_output})
    try:
        backend = open_backend(config.model_copy(update={"evaluation": settings}), model)
    except NoModelFolder as exc:
        raise BadInputError(str(exc)) from exc
    requests = prelabel_requests(config, given, images)
    responses = backend.predict(requests)
    return [read_answer(q, r.answer, r.logprobs) for q, r in zip(requests, responses, strict=True)]


def predict_with_ocr(config: PipelineConfig, given: DocType | None, images: list[str]) -> list[dict]:
    """Each image's fields from the OCR baseline: no confidence, so every document is reviewed. Without
    ``--doc-type`` its best guess at the type: the run's type whose fields it finds most of (none found:
    other)."""
    from docpipe.answering.ocr_baseline import OcrBaseline
    from docpipe.data.examples import load_image

    registry = load_registry(config.doctypes_dir)
    reader, predictions = OcrBaseline(), []
    for uri in images:
        image = load_image(uri, config.storage.s3)
        if given:
            doc_type, (fields, _) = given, reader.read(given, image)
        else:
            doc_type, fields, _ = reader.guess([registry[name] for name in config.doc_types], image)
        kind = doc_type.id if doc_type else OTHER
        predictions.append({"doc_type": kind, "fields": fields, "confidence": None, "answer": ""})
    return predictions


def display_url(uri: str, data: bytes) -> str:
    """What the reviewer's browser loads: a local image inline as a data URL; an s3:// image as is
    (Label Studio signs it through the project's S3 source storage)."""
    if uri.startswith("s3://"):
        return uri
    mime = mimetypes.guess_type(uri)[0] or "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def prefilled_documents(images: list[tuple[str, bytes]], predictions: list[dict], threshold: float) -> list[dict]:
    """Each image's prediction with its document confidence and review flag, least confident first."""
    documents = []
    for (uri, data), prediction in zip(images, predictions, strict=True):
        least = document_confidence(prediction["confidence"])
        documents.append(
            {
                "source": uri,
                "sha256": hashlib.sha256(data).hexdigest(),
                **prediction,
                "document_confidence": least,
                "needs_review": least is None or least < threshold,
            }
        )
    return sorted(documents, key=lambda d: (d["document_confidence"] or 0.0, d["source"]))


def label_studio_tasks(documents: list[dict], images: dict[str, bytes], doc_type: DocType, model_version: str) -> list:
    """One Label Studio task per document of ``doc_type``, its prediction as the pre-filled annotation."""
    return [
        {
            "data": {
                "image": display_url(d["source"], images[d["source"]]),
                "source": d["source"],
                "doc_type": doc_type.id,
                "confidence": d["document_confidence"],
                "needs_review": d["needs_review"],
            },
            "predictions": [
                {
                    "model_version": model_version,
                    "score": d["document_confidence"] or 0.0,
                    "result": result_items(doc_type, d["fields"], d["confidence"]),
                }
            ],
        }
        for d in documents
        if d["doc_type"] == doc_type.id
    ]


def write_outputs(
    output: Storage, label_configs: dict[str, str], documents: list[dict], tasks: list, rejected: list
) -> None:
    """The labelling configs, the predictions, the pages of no type, the rejected images and the tasks
    (sources, not inline images)."""
    for name, label_config in label_configs.items():
        output.write_bytes(f"labeling_config/{name}.xml", label_config.encode("utf-8"))
    output.write_bytes("predictions.jsonl", jsonl({k: v for k, v in d.items() if k != "answer"} for d in documents))
    unrouted = [{"source": d["source"], "answer": d["answer"]} for d in documents if d["doc_type"] == OTHER]
    output.write_bytes("unrouted.jsonl", jsonl(unrouted))
    output.write_bytes("rejected.jsonl", jsonl(rejected))
    by_source = [{**t, "data": {**t["data"], "image": t["data"]["source"]}} for t in tasks]
    output.write_bytes("tasks.json", json.dumps(by_source, ensure_ascii=False, indent=1).encode())


def predictions_for(
    config: PipelineConfig, given: DocType | None, uris: list[str], model_arg: str | None
) -> tuple[list[dict], str]:
    """Each image's prediction, by the model named, else the registry's champion, else the OCR baseline;
    and the version that made them."""
    with tempfile.TemporaryDirectory(prefix="champion-") as cache:
        if model_arg:
            model, model_version = model_arg, PurePosixPath(model_arg).name
        else:
            model, model_version = champion_model(config.tracking.tracking_uri, config.publish.registered_model, cache)
        if model:
            return predict_with_model(config, model, given, uris), model_version
        return predict_with_ocr(config, given, uris), model_version


def run(args: argparse.Namespace, config: PipelineConfig, output: Storage) -> StageOutput:
    given = registered_type(config, args.doc_type) if args.doc_type else None
    registry = load_registry(config.doctypes_dir)
    source = open_storage(args.images, config.storage.s3)
    images, rejected = read_images(source)
    if not images:
        raise BadInputError(f"{source.uri}: no readable image ({len(rejected)} rejected)")
    predictions, model_version = predictions_for(config, given, [uri for uri, _ in images], args.model)
    documents = prefilled_documents(images, predictions, config.evaluation.review_threshold)
    doc_types = [registry[name] for name in sorted({d["doc_type"] for d in documents} - {OTHER})]
    tasks = {t.id: label_studio_tasks(documents, dict(images), t, model_version) for t in doc_types}
    label_configs = {t.id: labelling_config(t) for t in doc_types}
    write_outputs(output, label_configs, documents, [task for each in tasks.values() for task in each], rejected)

    studio, projects, imported = LabelStudio(config.labelling), {}, 0
    for doc_type in doc_types:
        project = studio.project(project_title(config.labelling, doc_type), label_configs[doc_type.id])
        imported += studio.import_tasks(project["id"], tasks[doc_type.id])
        projects[f"project.{doc_type.id}"] = f"{config.labelling.url.rstrip('/')}/projects/{project['id']}"
    confidences = [d["document_confidence"] for d in documents if d["document_confidence"] is not None]
    review = sum(d["needs_review"] for d in documents)
    return StageOutput(
        inputs={"images": source.uri, "doc_type": given.id if given else "", "model": model_version},
        outputs={
            **projects,
            **{n: output.uri_of(n) for n in ("predictions.jsonl", "tasks.json", "unrouted.jsonl", "rejected.jsonl")},
        },
        counts={
            "documents": len(documents),
            "imported": imported,
            "rejected": len(rejected),
            "needs_review": review,
            "unrouted": sum(d["doc_type"] == OTHER for d in documents),
            **{f"doc_type.{t.id}": len(tasks[t.id]) for t in doc_types},
        },
        metrics={
            "review_rate": review / len(documents),
            **({"mean_document_confidence": sum(confidences) / len(confidences)} if confidences else {}),
        },
    )


if __name__ == "__main__":
    sys.exit(main(STAGE, build_parser(), run))
