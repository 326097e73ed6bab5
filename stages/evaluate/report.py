"""The HTML report: per-type table beside the OCR baseline, for routed documents the type confusion
table and each type's accuracy routed and with the type given, confidence against accuracy (a
calibration table, and what the review threshold sends to review), the fit check (a sample of training
documents, and the same with swapped images), the finetune run's per-checkpoint accuracy with the
chosen checkpoint, an accuracy plot, the fields most often wrong, and a gallery of failed
documents with expected and predicted values, the differences marked. One self-contained file
(images inline)."""

from __future__ import annotations

import base64
import difflib
import html
import io
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from docpipe.answering.scoring import HEADLINE, Scored
from docpipe.config import S3Config
from docpipe.data.examples import load_image

TEMPLATE = "report.html.j2"
THUMBNAIL = (240, 320)


def _png_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_url(figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=96)
    _pyplot().close(figure)
    return _png_url(buffer.getvalue())


def selection_plot(selection: dict) -> str | None:
    """The finetune run's accuracy per evaluated step, the chosen checkpoint marked, as a PNG data URL."""
    curve = [point for point in selection.get("curve", []) if point.get("field_accuracy") is not None]
    if not curve:
        return None
    figure, axes = _pyplot().subplots(figsize=(6.4, 3.2))
    steps = [point["step"] for point in curve]
    for metric in HEADLINE:
        axes.plot(steps, [point[metric] for point in curve], marker="o", label=metric.replace("_", " "))
    if selection.get("step") is not None:
        axes.axvline(selection["step"], color="grey", linestyle="--", label=f"chosen: step {selection['step']}")
    axes.set_xlabel("step")
    axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right", fontsize=8)
    return _figure_url(figure)


def accuracy_plot(metrics: dict, baseline: dict | None) -> str:
    """Field and document accuracy per type (and the OCR baseline's), as a PNG data URL."""
    plt = _pyplot()

    names = list(metrics["per_doc_type"])
    series = {
        "field acc.": [metrics["per_doc_type"][n]["field_accuracy"] for n in names],
        "document acc.": [metrics["per_doc_type"][n]["document_accuracy"] for n in names],
    }
    if baseline:
        series["OCR field acc."] = [baseline["per_doc_type"].get(n, {}).get("field_accuracy", 0.0) for n in names]
    figure, axes = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.2))
    width = 0.8 / len(series)
    for offset, (label, values) in enumerate(series.items()):
        axes.bar([i + offset * width for i in range(len(names))], values, width, label=label)
    axes.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(names))], names)
    axes.set_ylim(0, 1)
    axes.legend(loc="lower right", fontsize=8)
    return _figure_url(figure)


GAP = '<span class="gap" title="characters of the expected value missing here">‸</span>'
NO_JSON = '<span class="none">no JSON</span>'
NO_VALUE = '<span class="none">no value</span>'


def marked_difference(expected: str, predicted: str) -> str:
    """``predicted`` as HTML, what differs from ``expected`` marked: <ins> wrong or extra characters,
    a caret where characters are missing. Nothing of the expected value is shown in it."""
    parts = []
    for op, _a0, _a1, b0, b1 in difflib.SequenceMatcher(None, expected, predicted).get_opcodes():
        if op == "delete":
            parts.append(GAP)
        elif op in ("replace", "insert"):
            parts.append(f"<ins>{html.escape(predicted[b0:b1])}</ins>")
        else:
            parts.append(html.escape(predicted[b0:b1]))
    return "".join(parts)


def predicted_cell(expected: str | None, predicted: dict | None, name: str, correct: bool) -> str:
    """The predicted column of one field: "no JSON" where the answer had none, "no value" where the
    field is missing or null, else the value with its differences marked."""
    if predicted is None:
        return NO_JSON
    value = predicted.get(name)
    if value is None or str(value) == "":
        return NO_VALUE
    return html.escape(str(value)) if correct else marked_difference(str(expected or ""), str(value))


def thumbnail(uri: str, s3: S3Config) -> str:
    image = load_image(uri, s3)
    image.thumbnail(THUMBNAIL)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return _png_url(buffer.getvalue())


def _failed(documents: list[Scored], images: dict[str, str], limit: int, s3: S3Config) -> list[dict]:
    shown = []
    for document in [d for d in documents if not d.all_correct][:limit]:
        rows = [
            {
                "field": name,
                "expected": document.expected.get(name) or "",
                "predicted": predicted_cell(document.expected.get(name), document.predicted, name, ok),
            }
            for name, ok in document.correct.items()
        ]
        shown.append(
            {
                "id": document.id,
                "doc_type": document.doc_type,
                "routed": document.routed,
                "answered_type": document.answered_type,
                "rows": rows,
                "answer": document.answer,
                "unparsed": document.predicted is None,
                "thumbnail": thumbnail(images[document.id], s3),
            }
        )
    return shown


def render(
    *,
    model: str,
    backend: str,
    eval_set: str,
    metrics: dict,
    baseline: dict | None,
    fit: dict | None,
    control: dict | None,
    type_given: dict | None,
    selection: dict | None,
    decision: dict,
    documents: list[Scored],
    images: dict[str, str],
    gallery_size: int,
    s3: S3Config,
) -> str:
    """The report's HTML. ``images`` maps document ids to their image URIs."""
    worst = sorted(
        (
            {"doc_type": t, "field": f, "accuracy": a, "cer": m["per_field_cer"][f]}
            for t, m in metrics["per_doc_type"].items()
            for f, a in m["per_field_accuracy"].items()
        ),
        key=lambda row: (row["accuracy"], -row["cer"]),
    )[:10]
    environment = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=select_autoescape())
    return environment.get_template(TEMPLATE).render(
        model=model,
        backend=backend,
        eval_set=eval_set,
        overall=metrics["overall"],
        per_type=metrics["per_doc_type"],
        routing=metrics.get("routing"),
        given=(type_given or {}).get("per_doc_type", {}),
        confidence=metrics.get("confidence"),
        baseline=baseline,
        decision=decision,
        plot=accuracy_plot(metrics, baseline),
        worst_fields=worst,
        fit=fit,
        control=control,
        selection=selection,
        selection_plot=selection and selection_plot(selection),
        failed=_failed(documents, images, gallery_size, s3),
        failed_total=sum(not d.all_correct for d in documents),
    )
