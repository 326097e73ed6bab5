"""Synthetic labelled documents for every registered document type.

``generate`` is deterministic for a given seed: document ``i`` draws everything from
its own random stream seeded by ``(seed, i)``, so a batch can be regenerated exactly. A ``None``
among the types stands for pages of none of them (labelled ``other``, with no fields).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from docpipe.config import SyntheticConfig
from docpipe.data.landing import LabelRecord
from docpipe.doctypes import OTHER, DocType
from toolkit.synthetic.degrade import degrade
from toolkit.synthetic.render import LAYOUTS, render, render_other
from toolkit.synthetic.values import random_fields


def generate(
    doc_types: list[DocType | None], config: SyntheticConfig
) -> Iterator[tuple[LabelRecord, bytes, list[str]]]:
    """``config.count`` documents, cycling through ``doc_types`` (None: a page of none of them): label,
    JPEG bytes, effects applied."""
    for index in range(config.count):
        rng = random.Random(f"{config.seed}:{index}")
        doc_type = doc_types[index % len(doc_types)]
        if doc_type is None:
            page, kind = render_other(rng)
            image_bytes, effects = degrade(page, rng, config.degradation)
            record = LabelRecord(image=f"images/{OTHER}-{index:05d}.jpg", doc_type=OTHER, fields={})
            yield record, image_bytes, [kind, *effects]
            continue
        values = random_fields(doc_type, rng)
        layout, dense = rng.choice(LAYOUTS), rng.random() < config.dense
        image_bytes, effects = degrade(render(doc_type, values, rng, layout, dense), rng, config.degradation)
        record = LabelRecord(image=f"images/{doc_type.id}-{index:05d}.jpg", doc_type=doc_type.id, fields=values)
        yield record, image_bytes, [layout, *(["dense"] if dense else []), *effects]
