"""``python -m stages.prelabel``: unlabelled documents into Label Studio, pre-filled, worst first.

Reads every image under ``--images`` (a folder or s3:// prefix without labels) of one document
type, answers each with the champion model (``--model`` a folder; default: the registry's
champion, downloaded; with no champion, the OCR baseline), and creates one Label Studio task per
document in the type's project (``<labelling.project_prefix>: <type>``, created with a labelling
configuration generated from the registry) with the answer as its pre-annotation, each field's
confidence as its score. Tasks are imported least confident first, so a reviewer starts where
the model is least sure; ``needs_review`` in the task data marks documents below
``evaluation.review_threshold``. An image that does not decode is listed in ``rejected.jsonl``
with the reason and the rest go on. Writes ``predictions.jsonl``, ``tasks.json``,
``labeling_config.xml`` and ``rejected.jsonl``; ``stages.collect_labels`` brings the reviewed
values back.
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

from docpipe.answering.confidence import document_confidence, field_confidence
from docpipe.config import PipelineConfig
from docpipe.contract import BadInputError, main, stage_parser
from docpipe.data.examples import Example
from docpipe.doctypes import DocType
from docpipe.label_studio import LabelStudio, labelling_config, project_title, registered_type, result_items
from docpipe.manifest import StageOutput, jsonl
from docpipe.registry import champion_model
from docpipe.storage import Storage, StorageError, StorageUnavailable, open_storage

STAGE = "prelabel"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--images", required=True, help="unlabelled images: a folder or s3:// prefix")
    parser.add_argument("--doc-type", required=True, help="the document type of every image (a registry id)")
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


def predict_with_model(config: PipelineConfig, model: str, doc_type: DocType, images: list[str]) -> list[dict]:
    """Each image's fields and per-field confidence from the model (the evaluation backend)."""
    from docpipe.answering.backends import NoModelFolder, Request, open_backend
    from docpipe.answering.parsing import extract_json

    settings = config.evaluation.model_copy(update={"structured_output": config.labelling.structured_output})
    try:
        backend = open_backend(config.model_copy(update={"evaluation": settings}), model)
    except NoModelFolder as exc:
        raise BadInputError(str(exc)) from exc
    requests = [
        Request(
            Example(
                id=uri,
                doc_type=doc_type.id,
                image=uri,
                conversations=[{"role": "user", "content": doc_type.prompt}, {"role": "assistant", "content": ""}],
            ),
            doc_type,
        )
        for uri in images
    ]
    predictions = []
    for response in backend.predict(requests):
        fields = extract_json(response.answer, doc_type)
        confidence = field_confidence(response.answer, fields, [f.name for f in doc_type.fields], response.logprobs)
        predictions.append({"fields": fields or {}, "confidence": confidence, "answer": response.answer})
    return predictions


def predict_with_ocr(config: PipelineConfig, doc_type: DocType, images: list[str]) -> list[dict]:
    """Each image's fields from the OCR baseline: no confidence, so every document is reviewed."""
    from docpipe.answering.ocr_baseline import OcrBaseline
    from docpipe.data.examples import load_image

    reader = OcrBaseline()
    return [
        {"fields": reader.read(doc_type, load_image(uri, config.storage.s3))[0], "confidence": None, "answer": ""}
        for uri in images
    ]


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
    """One Label Studio task per document, its prediction as the pre-filled annotation."""
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
    ]


def write_outputs(output: Storage, label_config: str, documents: list[dict], tasks: list, rejected: list) -> None:
    """The labelling config, the predictions, the rejected images and the tasks (sources, not inline images)."""
    output.write_bytes("labeling_config.xml", label_config.encode("utf-8"))
    output.write_bytes("predictions.jsonl", jsonl({k: v for k, v in d.items() if k != "answer"} for d in documents))
    output.write_bytes("rejected.jsonl", jsonl(rejected))
    by_source = [{**t, "data": {**t["data"], "image": t["data"]["source"]}} for t in tasks]
    output.write_bytes("tasks.json", json.dumps(by_source, ensure_ascii=False, indent=1).encode())


def run(args: argparse.Namespace, config: PipelineConfig, output: Storage) -> StageOutput:
    doc_type = registered_type(config, args.doc_type)
    source = open_storage(args.images, config.storage.s3)
    images, rejected = read_images(source)
    if not images:
        raise BadInputError(f"{source.uri}: no readable image ({len(rejected)} rejected)")
    with tempfile.TemporaryDirectory(prefix="champion-") as cache:
        if args.model:
            model, model_version = args.model, PurePosixPath(args.model).name
        else:
            model, model_version = champion_model(config.tracking.tracking_uri, config.publish.registered_model, cache)
        uris = [uri for uri, _ in images]
        predictions = (
            predict_with_model(config, model, doc_type, uris) if model else predict_with_ocr(config, doc_type, uris)
        )
    documents = prefilled_documents(images, predictions, config.evaluation.review_threshold)
    tasks = label_studio_tasks(documents, dict(images), doc_type, model_version)
    label_config = labelling_config(doc_type)
    write_outputs(output, label_config, documents, tasks, rejected)

    studio = LabelStudio(config.labelling)
    project = studio.project(project_title(config.labelling, doc_type), label_config)
    imported = studio.import_tasks(project["id"], tasks)
    confidences = [d["document_confidence"] for d in documents if d["document_confidence"] is not None]
    review = sum(d["needs_review"] for d in documents)
    return StageOutput(
        inputs={"images": source.uri, "doc_type": doc_type.id, "model": model_version},
        outputs={
            "project": f"{config.labelling.url.rstrip('/')}/projects/{project['id']}",
            **{n: output.uri_of(n) for n in ("predictions.jsonl", "tasks.json", "rejected.jsonl")},
        },
        counts={"documents": len(documents), "imported": imported, "rejected": len(rejected), "needs_review": review},
        metrics={
            "review_rate": review / len(documents),
            **({"mean_document_confidence": sum(confidences) / len(confidences)} if confidences else {}),
        },
    )


if __name__ == "__main__":
    sys.exit(main(STAGE, build_parser(), run))
