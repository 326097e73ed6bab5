"""``python -m stages.collect_labels``: reviewed Label Studio tasks into a landed batch.

Takes every task of the type's project (``<labelling.project_prefix>: <type>``) that a reviewer
submitted (its latest annotation, not skipped) and that no earlier batch took, and writes them
to ``--output`` in the landing format (images, ``labels.jsonl``, then ``_COMPLETE``): put it
under ``storage.landing_uri`` and the data-triggered DAG ingests it. Each task taken is marked
in Label Studio with the batch it went to. An image that cannot be read any more is listed in
``rejected.jsonl`` with the reason, its task left for a later batch.

What people changed is the model's real-world accuracy: for each reviewed document, the fields
whose reviewed value differs from the pre-filled one (compared as evaluation compares them,
after the type's normalisation), logged as ``prefill_field_accuracy`` (fields unchanged / fields),
``prefill_document_accuracy`` (documents unchanged) and ``changed.<field>`` counts.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from docpipe.config import PipelineConfig
from docpipe.contract import BadInputError, main, stage_parser
from docpipe.data.landing import LabelRecord, write_batch
from docpipe.doctypes import DocType
from docpipe.label_studio import LabelStudio, project_title, registered_type, result_fields
from docpipe.manifest import StageOutput, jsonl
from docpipe.storage import Storage, StorageError, StorageUnavailable, open_storage

STAGE = "collect_labels"


def build_parser() -> argparse.ArgumentParser:
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--doc-type", required=True, help="the document type whose project to collect")
    return parser


def reviewed(task: dict) -> dict | None:
    """The task's latest submitted annotation, or None (none yet, skipped, or already landed)."""
    if (task.get("meta") or {}).get("landed_in"):
        return None
    submitted = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    return max(submitted, key=lambda a: (a.get("updated_at") or "", a["id"])) if submitted else None


def changes(doc_type: DocType, prefilled: dict, final: dict) -> list[str]:
    """Fields whose reviewed value is not the pre-filled one, compared as evaluation compares values."""
    return [
        spec.name
        for spec in doc_type.fields
        if doc_type.compare_key(spec.name, prefilled.get(spec.name))
        != doc_type.compare_key(spec.name, final.get(spec.name))
    ]


def run(args: argparse.Namespace, config: PipelineConfig, output: Storage) -> StageOutput:
    doc_type = registered_type(config, args.doc_type)
    studio = LabelStudio(config.labelling)
    title = project_title(config.labelling, doc_type)
    project = studio.find_project(title)
    if project is None:
        raise BadInputError(f"Label Studio at {config.labelling.url} has no project {title!r}: run stages.prelabel")
    documents, taken, rejected, changed = [], [], [], {spec.name: 0 for spec in doc_type.fields}
    unchanged_documents = 0
    for task in studio.tasks(project["id"]):
        annotation = reviewed(task)
        if annotation is None:
            continue
        source = task["data"].get("source", "")
        try:
            parent, image_name = source.rsplit("/", 1)
            image = open_storage(parent, config.storage.s3).read_bytes(image_name)
        except StorageUnavailable:
            raise
        except (StorageError, ValueError) as exc:
            rejected.append({"task": task["id"], "image": source, "reason": f"image not readable: {exc}"})
            continue
        final = result_fields(doc_type, annotation.get("result") or [])
        predictions = sorted(task.get("predictions") or [], key=lambda p: p.get("id", 0))
        prefilled = result_fields(doc_type, predictions[-1].get("result") or []) if predictions else {}
        fields_changed = changes(doc_type, prefilled, final)
        for field in fields_changed:
            changed[field] += 1
        unchanged_documents += not fields_changed
        record = LabelRecord(
            image=f"images/{task['id']}-{image_name}",
            doc_type=doc_type.id,
            fields={k: v for k, v in final.items() if v is not None},
        )
        documents.append((record, image))
        taken.append(task["id"])

    output.write_bytes("rejected.jsonl", jsonl(rejected))
    if not documents:
        return StageOutput(inputs={"project": title}, counts={"documents": 0, "rejected": len(rejected)})
    write_batch(output, documents, producer=f"stages.{STAGE} ({config.labelling.url} project {project['id']})")
    landed_at = datetime.now(UTC).isoformat()
    for task_id in taken:
        studio.mark(task_id, {"landed_in": output.uri, "landed_at": landed_at})
    fields = len(documents) * len(doc_type.fields)
    return StageOutput(
        inputs={"project": title},
        outputs={"batch": output.uri},
        counts={"documents": len(documents), "rejected": len(rejected), "fields_changed": sum(changed.values())},
        metrics={
            "prefill_field_accuracy": 1 - sum(changed.values()) / fields,
            "prefill_document_accuracy": unchanged_documents / len(documents),
            **{f"changed.{name}": float(count) for name, count in changed.items()},
        },
    )


if __name__ == "__main__":
    sys.exit(main(STAGE, build_parser(), run))
