"""Random, valid field values for a document type, printed the way documents print them."""

from __future__ import annotations

import random
from datetime import date, timedelta

import rstr

from docpipe.doctypes import DocType, FieldSpec

_FIRST_DAY = date(2016, 1, 1)
_DAYS = (date(2026, 12, 31) - _FIRST_DAY).days
OPTIONAL_FIELD_ABSENT = 0.3


def printed_value(spec: FieldSpec, rng: random.Random, taken: frozenset[str] = frozenset()) -> str:
    """One value for ``spec`` as it would appear on paper (currency signs, date styles).

    Text and enum values avoid ``taken`` where they can (a ticket's two stations differ).
    """
    if spec.type in ("text", "enum"):
        options = spec.samples if spec.type == "text" else spec.values
        if not options:
            raise ValueError(f"field {spec.name!r}: a text field needs samples to be generated")
        return rng.choice([o for o in options if o not in taken] or options)
    if spec.type == "id":
        return rstr.Rstr(rng).xeger(spec.pattern)
    if spec.type == "date":
        day = _FIRST_DAY + timedelta(days=rng.randrange(_DAYS))
        return day.strftime(rng.choice(spec.input_formats))
    if spec.type == "time":
        return f"{rng.randrange(5, 24):02d}:{rng.randrange(60):02d}"
    low, high = spec.amount_range
    if spec.type == "integer":
        return str(rng.randint(int(low), int(high)))
    amount = rng.uniform(low, high)
    grouping = "," if rng.random() < 0.5 else ""
    return f"{rng.choice(spec.currencies)}{amount:{grouping}.{spec.decimals}f}"


def random_fields(doc_type: DocType, rng: random.Random) -> dict[str, str]:
    """A label for one synthetic document; optional fields are sometimes absent."""
    values: dict[str, str] = {}
    for spec in doc_type.fields:
        if spec.required or rng.random() >= OPTIONAL_FIELD_ABSENT:
            values[spec.name] = printed_value(spec, rng, frozenset(values.values()))
    return values
