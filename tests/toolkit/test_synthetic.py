"""Synthetic generator: deterministic, valid labels, every layout and degradation, CJK rendered."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import jsonschema
import pytest
from PIL import Image

from docpipe.config import DegradationConfig, SyntheticConfig
from docpipe.doctypes import load_registry
from tests.helpers import ROOT
from toolkit.synthetic import generate
from toolkit.synthetic.render import FontMissingError, font_path, render

REGISTRY = load_registry(ROOT / "configs" / "doctypes")
DOC_TYPES = list(REGISTRY.values())


def digests(config: SyntheticConfig) -> list[tuple[str, str]]:
    return [
        (json.dumps(record.model_dump(), ensure_ascii=False), hashlib.sha256(image).hexdigest())
        for record, image, _ in generate(DOC_TYPES, config)
    ]


def test_same_seed_same_batch_byte_for_byte():
    config = SyntheticConfig(count=8, seed=42)
    assert digests(config) == digests(config)


def test_other_seed_other_batch():
    first, second = digests(SyntheticConfig(count=8, seed=1)), digests(SyntheticConfig(count=8, seed=2))
    assert all(a != b for a, b in zip(first, second, strict=True))


def test_documents_do_not_depend_on_batch_size():
    """Document i is the same in a batch of 4 and a batch of 8: each has its own random stream."""
    assert digests(SyntheticConfig(count=4, seed=3)) == digests(SyntheticConfig(count=8, seed=3))[:4]


def test_labels_validate_and_answers_match_the_schema():
    seen = Counter()
    for record, image_bytes, applied in generate(DOC_TYPES, SyntheticConfig(count=80, seed=7)):
        doc_type = REGISTRY[record.doc_type]
        answer = json.loads(doc_type.canonical_answer(record.fields))
        jsonschema.validate(answer, doc_type.answer_schema())
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
            assert image.format == "JPEG" and image.width >= 300 and image.height >= 100
        seen.update([record.doc_type, *(a.rstrip("+-.0123456789") for a in applied)])
    assert {seen[d.id] for d in DOC_TYPES} == {20}
    for effect in ("rows", "grid", "stacked", "dense", "rotate", "perspective", "blur", "noise", "jpeg"):
        assert seen[effect] > 0, f"no document had {effect}"


def test_two_stations_on_a_ticket_differ():
    for record, _, _ in generate([REGISTRY["thsr_ticket"]], SyntheticConfig(count=30, seed=5)):
        assert record.fields["起站"] != record.fields["迄站"]


def test_optional_field_is_sometimes_absent():
    present = [
        "買方統編" in record.fields
        for record, _, _ in generate([REGISTRY["einvoice"]], SyntheticConfig(count=30, seed=9))
    ]
    assert any(present) and not all(present)


def test_clean_settings_apply_no_degradation():
    clean = DegradationConfig(rotate=0, perspective=0, blur=0, noise=0, jpeg_quality=(95, 95))
    for _, _, applied in generate(DOC_TYPES, SyntheticConfig(count=4, seed=0, degradation=clean, dense=0)):
        assert applied[1:] == ["jpeg95"]


def test_cjk_text_is_drawn_with_a_cjk_font():
    """A CJK font renders 高 with ink; a font without CJK glyphs draws an empty box or nothing."""
    from PIL import ImageFont

    font = ImageFont.truetype(str(font_path()), 32)
    assert font.getmask("高").getbbox() is not None
    assert font.getmask("高").getbbox() != font.getmask("\uffff").getbbox()


def test_render_wraps_long_values_inside_the_page():
    import random

    receipt = REGISTRY["receipt_en"]
    values = {"company": "A" * 30, "date": "01/02/2020", "address": "X" * 200, "total": "1.00"}
    image = render(receipt, values, random.Random(0), "rows", dense=False)
    assert image.width == 640 and image.height > 200


def test_missing_font_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SYNTH_FONT", str(tmp_path / "none.ttc"))
    with pytest.raises(FontMissingError, match="fonts-wqy-microhei"):
        font_path()


def test_pages_of_none_of_the_types_are_blank_noise_or_unrelated_forms_without_fields():
    """``None`` among the types: pages labelled other, of every kind, decodable, never with fields."""
    generated = list(generate([REGISTRY["thsr_ticket"], None], SyntheticConfig(count=40, seed=4)))
    others = [(record, image, effects) for record, image, effects in generated if record.doc_type == "other"]
    assert len(others) == 20 and all(record.fields == {} for record, _, _ in others)
    assert {effects[0] for _, _, effects in others} == {"blank", "noise", "unrelated"}
    for _, image, _ in others:
        with Image.open(io.BytesIO(image)) as page:
            page.load()
            assert min(page.size) >= 32
    titles = {record.image for record, _, _ in others}
    assert len(titles) == 20 and all(name.startswith("images/other-") for name in titles)
