"""Documents whose type nobody told the model: the registry asked as one question.

A routed document is asked with one prompt for every type (``export.routing_prompt``, generated
from the registry), and the answer names the type it sees, then carries that type's fields:
``{"doc_type": "thsr_ticket", "乘車日期": ..., ...}``. A page of none of the run's types answers
the declared ``{"doc_type": "other"}`` and nothing else. The answer's schema is the union of the
types' answer schemas with ``doc_type`` as the discriminator, plus ``other``: an answer naming an
unregistered type, or ``other`` with fields, is not valid, and constrained decoders cannot emit one.

``Routing.given(doc_type)`` is the same question with the answer's type fixed by its schema: how
evaluation asks "what would the fields be, had the type been known?" with the same prompt.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator

from docpipe.doctypes import OTHER, TYPE_KEY, DocType

ROUTING_PLACEHOLDERS = ("types", "prompts")


class RoutingError(ValueError):
    """The routing prompt or the types cannot make a routed question; the message says why."""


def _question(doc_type: DocType) -> str:
    """A type's own prompt without its image placeholder: the recipe's 如果這是… sentence."""
    return doc_type.prompt.replace("<image>", "").strip()


def routing_prompt(template: str, doc_types: Sequence[DocType]) -> str:
    """``template`` with ``{types}`` (each type's display name and id) and ``{prompts}`` (each type's
    own prompt, one per line) filled in from the registry."""
    types = "、".join(f"{t.display_name} ({t.id})" for t in doc_types)
    prompts = "\n".join(_question(t) for t in doc_types)
    try:
        return template.format(types=types, prompts=prompts)
    except (KeyError, IndexError, ValueError) as exc:
        raise RoutingError(
            f"export.routing_prompt: {exc!r}: only {{types}} and {{prompts}} are filled in; write a literal "
            "brace as {{ or }}"
        ) from None


@dataclass(frozen=True)
class Routing:
    """The run's types asked as one question; ``other`` is an answer unless the type is given."""

    doc_types: tuple[DocType, ...]
    prompt: str
    allow_other: bool = True

    @classmethod
    def of(cls, registry: Mapping[str, DocType], names: Sequence[str], template: str) -> Routing:
        doc_types = tuple(registry[name] for name in names)
        return cls(doc_types, routing_prompt(template, doc_types))

    @property
    def id(self) -> str:
        """What names the routed answer's schema, as a document type's id names its own."""
        return "routed" if len(self.doc_types) > 1 or self.allow_other else f"routed_{self.doc_types[0].id}"

    @property
    def labels(self) -> list[str]:
        """Every answer's type, in order: the run's types, then ``other``."""
        return [t.id for t in self.doc_types] + [OTHER]

    def given(self, doc_type: DocType) -> Routing:
        """The same prompt, the answer's type fixed to ``doc_type``."""
        return Routing((doc_type,), self.prompt, allow_other=False)

    def answer_schema(self, branch: Callable[[DocType], dict] = DocType.answer_schema) -> dict[str, Any]:
        """JSON schema (draft 2020-12) of a routed answer: one branch per type (``branch`` of it, with
        ``doc_type`` first), and ``other`` alone."""
        branches = [self._typed(t, branch(t)) for t in self.doc_types]
        if self.allow_other:
            branches.append(
                {
                    "type": "object",
                    "properties": {TYPE_KEY: {"const": OTHER, "description": "none of the types listed"}},
                    "required": [TYPE_KEY],
                    "additionalProperties": False,
                }
            )
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": self.id,
            "anyOf": branches,
        }

    @staticmethod
    def _typed(doc_type: DocType, schema: dict) -> dict:
        properties = {TYPE_KEY: {"const": doc_type.id, "description": doc_type.display_name}}
        return {
            "type": "object",
            "properties": properties | schema["properties"],
            "required": [TYPE_KEY, *schema["required"]],
            "additionalProperties": False,
        }

    @functools.cached_property
    def answer_validator(self) -> Draft202012Validator:
        return Draft202012Validator(self.answer_schema())

    @property
    def keys(self) -> set[str]:
        """Every key a routed answer may have."""
        return {TYPE_KEY} | {spec.name for t in self.doc_types for spec in t.fields}

    def canonical_answer(self, doc_type: DocType | None, fields: Mapping[str, Any]) -> str:
        """The JSON string the model learns: the type first, then its canonical fields; ``None`` is other."""
        if doc_type is None:
            return json.dumps({TYPE_KEY: OTHER}, ensure_ascii=False)
        return json.dumps({TYPE_KEY: doc_type.id, **doc_type.canonical_fields(fields)}, ensure_ascii=False)


def answered_type(predicted: dict | None) -> str | None:
    """The type a routed answer names (None: no answer, or no type as a string)."""
    value = (predicted or {}).get(TYPE_KEY)
    return value if isinstance(value, str) else None
