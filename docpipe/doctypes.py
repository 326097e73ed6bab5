"""Document-type registry: ``configs/doctypes/<id>.yaml`` files, one per type.

A document type is data: its prompt, its ordered fields and how each field is
normalised. From it come the answer's JSON schema, the canonical answer string the
model is trained to emit, label validation, and the comparison keys evaluation uses.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from jsonschema import Draft202012Validator
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from docpipe.dates import DateOrder, DateReading, parse_date
from docpipe.loader import ConfigError, load_model

FieldType = Literal["text", "date", "time", "money", "integer", "id", "enum"]
OTHER = "other"  # the label of a page of none of the registered types: no type may take this id
TYPE_KEY = "doc_type"  # a routed answer's discriminator (docpipe.routing): no field may take this name

_DEFAULT_FORMATS = {"date": ["%Y-%m-%d"], "time": ["%H:%M", "%H:%M:%S"]}
_DEFAULT_OUTPUT = {"date": "%Y-%m-%d", "time": "%H:%M"}
_STRFTIME_PATTERNS = {
    "%Y": r"\d{4}",
    "%y": r"\d{2}",
    "%m": r"\d{2}",
    "%d": r"\d{2}",
    "%H": r"\d{2}",
    "%M": r"\d{2}",
    "%S": r"\d{2}",
}
_AMOUNT = re.compile(r"^\D*?(-?\d[\d,]*(?:\.\d+)?)\D*$")


def _ecma_escape(text: str) -> str:
    """Escape regex syntax characters only: JSON-schema regexes are ECMA-262, where
    escaping other characters (as re.escape does with '-') is invalid in unicode mode."""
    return "".join("\\" + c if c in r"\^$.|?*+()[]{}/" else c for c in text)


class LabelError(ValueError):
    """A label's fields do not fit their document type; ``problems`` lists each one."""

    def __init__(self, doc_type: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{doc_type}: " + "; ".join(problems))


def clean_text(value: str) -> str:
    """Unicode NFKC (full-width to half-width) and collapsed whitespace."""
    return " ".join(unicodedata.normalize("NFKC", value).split())


class FieldSpec(BaseModel):
    """One field of a document type, in answer order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="the key in the JSON answer")
    type: FieldType = Field(
        description="how the value is read, normalised and compared: text, date, time, money, integer, id or enum"
    )
    label: str = Field("", description="the caption printed beside the value on documents")
    keywords: list[str] = Field(
        [], description="captions the OCR baseline looks for, the first found wins; default: the label's words"
    )
    exclude_keywords: list[str] = Field([], description="OCR baseline: a line with one of these never holds the value")
    fallback_keywords: list[str] = Field(
        [], description="OCR baseline: captions tried last where the value may be restated (a subtotal, cash paid)"
    )
    hints: list[str] = Field([], description="OCR baseline, captionless text: words that mark a line of this field")
    required: bool = Field(True, description="a label without this field is quarantined at ingest")
    description: str = Field("", description="what the field holds, for people labelling and reading the schema")
    pattern: str | None = Field(None, description="id: regex the normalised value must match")
    values: list[str] | None = Field(None, description="enum: the allowed values")
    date_formats: list[str] | None = Field(
        None, description="time: accepted input formats; date: how documents print it (the synthetic generator)"
    )
    output_format: str | None = Field(None, description="date/time: format of the canonical value")
    date_order: DateOrder = Field("YMD", description="date: how all-numeric shapes such as 11.02.18 are read")
    roc_years: bool = Field(False, description="date: two- and three-digit leading years are ROC (民國) years")
    year_range: tuple[int, int] = Field((1900, 2099), description="date: the years a real value can have")
    samples: list[str] = Field([], description="text: values the synthetic generator draws from")
    currencies: list[str] = Field([""], description="money: prefixes the generator prints")
    amount_range: tuple[float, float] = Field((1, 1000), description="money/integer: generator range")
    decimals: int = Field(2, ge=0, le=4, description="money: decimals the generator prints")

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from exc
        return pattern

    @model_validator(mode="after")
    def _type_settings(self) -> FieldSpec:
        if self.type == "id" and not self.pattern:
            raise ValueError(f"field {self.name!r}: type id needs a pattern")
        if self.type == "enum" and not self.values:
            raise ValueError(f"field {self.name!r}: type enum needs values")
        if self.type not in ("date", "time") and (self.date_formats or self.output_format):
            raise ValueError(f"field {self.name!r}: date_formats/output_format apply to date and time only")
        if self.type == "date":
            for fmt in [*self.input_formats, self.canonical_format]:
                for day in (date(2024, 3, 25), date(2024, 3, 5)):
                    try:
                        read = parse_date(day.strftime(fmt), self.date_reading)
                    except ValueError as exc:
                        read = exc
                    if read != day:
                        raise ValueError(
                            f"field {self.name!r}: {day} printed as {fmt!r} reads back as {read} "
                            f"(date_order {self.date_order})"
                        )
        return self

    @property
    def date_reading(self) -> DateReading:
        return DateReading(self.date_order, self.roc_years, self.year_range)

    @property
    def input_formats(self) -> list[str]:
        return self.date_formats or _DEFAULT_FORMATS.get(self.type, [])

    @property
    def canonical_format(self) -> str:
        return self.output_format or _DEFAULT_OUTPUT[self.type]

    def canonical_pattern(self) -> str | None:
        """A regex every canonical value of this field matches (None where free text)."""
        if self.type == "id":
            return self.pattern
        if self.type == "money":
            return r"-?\d+(\.\d+)?"
        if self.type == "integer":
            return r"-?\d+"
        if self.type in ("date", "time"):
            parts = re.split(r"(%.)", self.canonical_format)
            if any(p.startswith("%") and p not in _STRFTIME_PATTERNS for p in parts):
                return None
            return "".join(_STRFTIME_PATTERNS.get(p) or _ecma_escape(p) for p in parts)
        return None


class DocType(BaseModel):
    """A document type: prompt, ordered fields and normalisation rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="the type's id: labels, configs and file names use it")
    display_name: str = Field(description="the type's name as people read it, e.g. 高鐵票")
    title: str = Field("", description="heading the synthetic generator prints")
    prompt: str = Field(description="the question asked of every document of the type, with one <image>")
    prompt_variants: list[str] = Field([], description="alternative prompts for training documents")
    variants: dict[str, str] = Field({}, description="character variants folded for comparison, e.g. 臺: 台")
    headings: list[str] = Field([], description="OCR baseline: printed headings that end or are never captionless text")
    fields: list[FieldSpec] = Field(min_length=1, description="the answer's fields, in answer order")

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == OTHER:
            raise ValueError(f"id {OTHER!r} is reserved for pages of none of the registered types")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_has_one_image(cls, prompt: str) -> str:
        if prompt.count("<image>") != 1:
            raise ValueError("prompt must contain the <image> placeholder exactly once")
        return prompt

    @field_validator("prompt_variants")
    @classmethod
    def _variants_have_one_image(cls, prompts: list[str]) -> list[str]:
        for prompt in prompts:
            cls._prompt_has_one_image(prompt)
        return prompts

    @field_validator("fields")
    @classmethod
    def _unique_names(cls, fields: list[FieldSpec]) -> list[FieldSpec]:
        names = [f.name for f in fields]
        if TYPE_KEY in names:
            raise ValueError(f"field name {TYPE_KEY!r} is reserved: a routed answer names its type with it")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate field names {duplicates}")
        return fields

    def field(self, name: str) -> FieldSpec:
        return next(f for f in self.fields if f.name == name)

    @property
    def keys(self) -> set[str]:
        """Every key an answer of this type has."""
        return {spec.name for spec in self.fields}

    @functools.cached_property
    def _variant_table(self) -> dict[int, str]:
        return str.maketrans(self.variants)

    @functools.cached_property
    def _enum_values(self) -> dict[str, dict[str, str]]:
        """Per enum field: folded value -> the value as configured (the first where two fold alike)."""
        return {
            spec.name: {self.fold(value): value for value in reversed(spec.values)}
            for spec in self.fields
            if spec.values
        }

    def fold(self, value: str) -> str:
        """Text with character variants folded and case ignored, for comparisons."""
        return clean_text(value).translate(self._variant_table).casefold()

    def canonical_value(self, spec: FieldSpec, raw: str) -> str:
        """The canonical form of one raw value; ValueError says why it is not valid."""
        text = clean_text(raw)
        if not text:
            raise ValueError("empty value")
        if spec.type == "text":
            return text
        if spec.type == "date":
            return parse_date(text, spec.date_reading).strftime(spec.canonical_format)
        if spec.type == "time":
            for fmt in [*spec.input_formats, spec.canonical_format]:  # canonical values stay valid
                try:
                    return datetime.strptime(text, fmt).strftime(spec.canonical_format)
                except ValueError:
                    continue
            raise ValueError(f"{text!r} matches none of the formats {spec.input_formats}")
        if spec.type in ("money", "integer"):
            match = _AMOUNT.match(text.replace(" ", ""))
            try:
                number = Decimal(match.group(1).replace(",", "")) if match else None
            except InvalidOperation:
                number = None
            if number is None or (spec.type == "integer" and number != number.to_integral_value()):
                raise ValueError(f"{text!r} is not {'an amount' if spec.type == 'money' else 'an integer'}")
            return format(number, "f")
        if spec.type == "id":
            compact = "".join(text.split()).upper()
            if not re.fullmatch(spec.pattern, compact):
                raise ValueError(f"{compact!r} does not match {spec.pattern!r}")
            return compact
        match = self._enum_values.get(spec.name, {}).get(self.fold(text))  # enum
        if match is None:
            raise ValueError(f"{text!r} is not one of {spec.values}")
        return match

    def compare_key(self, field_name: str, value: str | None) -> str:
        """What evaluation compares: canonical value, numbers as numbers, variants folded.

        A value that does not parse is compared as folded text, so it can still match.
        """
        if value is None:
            return ""
        spec = self.field(field_name)
        try:
            canonical = self.canonical_value(spec, str(value))
        except ValueError:
            return self.fold(str(value))
        if spec.type == "money":
            return format(Decimal(canonical).normalize(), "f")
        return self.fold(canonical)

    def canonical_fields(self, raw: Mapping[str, Any]) -> dict[str, str | None]:
        """All fields in answer order, canonicalised; LabelError lists every problem."""
        problems = [f"unknown field {name!r}" for name in raw if name not in {f.name for f in self.fields}]
        result: dict[str, str | None] = {}
        for spec in self.fields:
            value = raw.get(spec.name)
            if value is None or (isinstance(value, str) and not value.strip()):
                if spec.required:
                    problems.append(f"required field {spec.name!r} is missing")
                result[spec.name] = None
                continue
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                problems.append(f"field {spec.name!r}: expected a string, got {type(value).__name__}")
                continue
            try:
                result[spec.name] = self.canonical_value(spec, str(value))
            except ValueError as exc:
                problems.append(f"field {spec.name!r} ({spec.type}): {exc}")
        if problems:
            raise LabelError(self.id, problems)
        return result

    def canonical_answer(self, raw: Mapping[str, Any]) -> str:
        """The JSON string the model learns to answer: fixed key order, non-ASCII kept."""
        return json.dumps(self.canonical_fields(raw), ensure_ascii=False)

    @functools.cached_property
    def answer_validator(self) -> Draft202012Validator:
        return Draft202012Validator(self.answer_schema())

    def answer_schema(self) -> dict[str, Any]:
        """JSON schema (draft 2020-12) of the canonical answer."""
        properties = {}
        for spec in self.fields:
            prop: dict[str, Any] = {"type": "string" if spec.required else ["string", "null"]}
            if spec.label or spec.description:
                prop["description"] = spec.description or spec.label
            if spec.type == "enum":
                prop["enum"] = [*spec.values, *([] if spec.required else [None])]
            elif (pattern := spec.canonical_pattern()) is not None:
                prop["pattern"] = f"^(?:{pattern})$"
            properties[spec.name] = prop
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": self.display_name,
            "type": "object",
            "properties": properties,
            "required": [f.name for f in self.fields],
            "additionalProperties": False,
        }


@functools.lru_cache(maxsize=8)
def load_registry(directory: Path = Path("configs/doctypes")) -> dict[str, DocType]:
    """Every ``<id>.yaml`` in ``directory``, validated, keyed by id."""
    directory = Path(directory)
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise ConfigError(f"{directory}: no document types (*.yaml) found")
    registry: dict[str, DocType] = {}
    for path in files:
        doc_type = load_model(DocType, [path])
        if doc_type.id != path.stem:
            raise ConfigError(f"{path}: id: {doc_type.id!r} must match the file name {path.stem!r}")
        registry[doc_type.id] = doc_type
    return registry
