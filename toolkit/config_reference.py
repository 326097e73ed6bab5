"""``python -m toolkit.config_reference``: write docs/configuration-reference.md from the pydantic models.

One table per section of ``configs/pipeline.yaml`` (``PipelineConfig``), of a document type
(``configs/doctypes/*.yaml``) and of an importer mapping (``configs/importers/*.yaml``): every key
with its type, default, bounds and description. The descriptions are the configuration's
documentation, so the page is generated, never edited; ``--check`` exits 1 when the page is stale
or a field has no description (the test suite runs it).
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from docpipe.config import PipelineConfig
from docpipe.doctypes import DocType
from stages.ingest.importers import ImportMapping

PAGE = Path("docs/configuration-reference.md")
ROOTS = (
    (PipelineConfig, "`configs/pipeline.yaml` and its overlays", ""),
    (DocType, "A document type (one file per type in `configs/doctypes/`)", "doctype."),
    (ImportMapping, "An importer mapping (`configs/importers/`, `ingest --mapping`)", "mapping."),
)
BOUNDS = {  # constraint class: (its attribute, how the page says it)
    annotated_types.Ge: ("ge", "≥ {}"),
    annotated_types.Gt: ("gt", "> {}"),
    annotated_types.Le: ("le", "≤ {}"),
    annotated_types.Lt: ("lt", "< {}"),
    annotated_types.MinLen: ("min_length", "at least {} long"),
    annotated_types.MaxLen: ("max_length", "at most {} long"),
}


def nested_models(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models a field's type holds (itself, in a list, a dict's values, an Optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in nested_models(arg)]


def type_name(annotation: object) -> str:
    """A field's type as a reader writes it: ``int``, ``str | null``, ``list[str]``, ``one of a, b``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field: FieldInfo) -> str:
    """The field's constraints: numeric bounds, lengths and a pattern."""
    found = []
    for item in field.metadata:
        for kind, (attribute, text) in BOUNDS.items():
            if isinstance(item, kind):
                found.append(text.format(getattr(item, attribute)))
        if getattr(item, "pattern", None):
            found.append(f"matches `{item.pattern}`")
    return ", ".join(found)


def default_of(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if value is PydanticUndefined:
        return ""
    if isinstance(value, Path):
        return f"`{value}`"
    return f"`{value!r}`" if value not in ("", None) else ("`null`" if value is None else '`""`')


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def sections(model: type[BaseModel], prefix: str) -> list[tuple[str, type[BaseModel]]]:
    """The model and every model below it, each with its dotted key (``training.launch``)."""
    found = [(prefix.rstrip("."), model)]
    for name, field in model.model_fields.items():
        for nested in nested_models(field.annotation):
            key = f"{prefix}{name}" + ("[]" if typing.get_origin(field.annotation) in (list, dict) else "")
            found += sections(nested, f"{key}.")
    return found


def undescribed() -> list[str]:
    """Every field, in every model of the configuration, that has no description."""
    return [
        f"{model.__name__}.{name}"
        for root, _, prefix in ROOTS
        for _, model in sections(root, prefix)
        for name, field in model.model_fields.items()
        if not field.description
    ]


def table(model: type[BaseModel]) -> list[str]:
    """A model's keys: type, default, bounds and description, one row each."""
    rows = ["| key | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        row = (name, type_name(field.annotation), default_of(field), bounds(field), field.description or "")
        rows.append("| " + " | ".join(cell(str(part)) for part in row) + " |")
    return rows


def page() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models by `python -m toolkit.config_reference` (`make docs`): do not",
        "edit by hand. Each field's description is written beside it in the code; a test fails when this",
        "page is stale or a field has none. How files and overlays merge: [configuration.md](configuration.md).",
    ]
    for root, title, prefix in ROOTS:
        for key, model in sections(root, prefix):
            heading = f"{title}: top level" if model is root else f"`{key}`"
            doc = " ".join((model.__doc__ or "").split())
            lines += ["", f"## {heading}", "", *([doc, ""] if doc else []), *table(model)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.config_reference", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the page is stale or a field lacks a description"
    )
    args = parser.parse_args(argv)
    if missing := undescribed():
        print(f"config_reference: fields without a description: {', '.join(missing)}", file=sys.stderr)
        return 1
    text = page()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text:
            print(f"config_reference: {PAGE} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
