"""The OCR pipeline teams are leaving, as a baseline beside the model.

PP-OCRv4 text detection and recognition (the ONNX models inside the ``rapidocr-onnxruntime``
wheel: offline, CPU), reading order by the usual sort (boxes top to bottom, merged into a line
where they overlap vertically, each line left to right), then per-type rules from the document
type's own data: a field's value follows its caption (``keywords``, else the words of its
``label``) on the same line or the next; failing that, the first unclaimed text of the field's
type anywhere (a date, an amount, an id matching its pattern, one of an enum's values);
captionless text fields (SROIE's company and address) take the first unclaimed lines.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import cached_property

from stages.doctypes import DocType, FieldSpec

_TOKEN = re.compile(r"[^\s:：]+(?:[ /.\-][^\s:：]+)*")
_AMOUNT = re.compile(r"\d[\d,]*(?:\.\d+)?")
ADDRESS_LINES = 3


@dataclass(frozen=True)
class Box:
    text: str
    top: float
    bottom: float
    left: float

    @property
    def height(self) -> float:
        return max(1.0, self.bottom - self.top)


def reading_order(boxes: list[Box]) -> list[str]:
    """Lines of text: boxes merged into a line where they overlap vertically by half a box."""
    lines: list[list[Box]] = []
    for box in sorted(boxes, key=lambda b: (b.top + b.bottom) / 2):
        line = lines[-1] if lines else None
        if line and min(box.bottom, line[-1].bottom) - max(box.top, line[-1].top) > 0.5 * min(
            box.height, line[-1].height
        ):
            line.append(box)
        else:
            lines.append([box])
    return [" ".join(b.text for b in sorted(line, key=lambda b: b.left)) for line in lines]  # fmt: skip


def keywords(spec: FieldSpec) -> list[str]:
    return spec.keywords or [word.strip(":：") for word in spec.label.split() if word.strip(":：")]


class Extractor:
    """One document's lines, and the rules that pull each field of its type out of them."""

    def __init__(self, doc_type: DocType, lines: list[str]):
        self.doc_type = doc_type
        self.lines = lines
        self.claimed: set[int] = set()  # lines a captionless field took

    @cached_property
    def captions(self) -> list[str]:
        return [word for spec in self.doc_type.fields for word in keywords(spec)]

    def valid(self, spec: FieldSpec, text: str) -> str | None:
        """The first part of ``text`` that is a valid value of the field (canonical form)."""
        if spec.type == "enum":
            return next((v for v in spec.values if self.doc_type.fold(v) in self.doc_type.fold(text)), None)
        pieces = _AMOUNT.findall(text)[::-1] if spec.type == "money" else [text, *_TOKEN.findall(text)]
        for piece in pieces:
            try:
                return self.doc_type.canonical_value(spec, piece)
            except ValueError:
                continue
        return None

    def after_caption(self, spec: FieldSpec) -> str | None:
        """The value after the field's caption (case and variants folded), on its line or the next;
        the last such place wins, as totals and dates are restated lower down."""
        fold = self.doc_type.fold
        for index in reversed(range(len(self.lines))):
            line = fold(self.lines[index])
            for word in map(fold, keywords(spec)):
                if word and word in line:
                    rest = line.split(word, 1)[1].strip(" :：")
                    for candidate in (rest, *self.lines[index + 1 : index + 2]):
                        if candidate and (value := self.valid(spec, candidate) if spec.type != "text" else candidate):
                            return value
        return None

    def anywhere(self, spec: FieldSpec, taken: set[str]) -> str | None:
        if spec.type == "text":
            return None
        for line in self.lines:
            value = self.valid(spec, line)
            if value is not None and value not in taken:
                return value
        return None

    def captionless_text(self, spec: FieldSpec, first: bool) -> str | None:
        free = [i for i, line in enumerate(self.lines)
                if i not in self.claimed and not any(self.doc_type.fold(c) in self.doc_type.fold(line)
                                                     for c in self.captions)]  # fmt: skip
        take = free[:1] if first else free[:ADDRESS_LINES]
        self.claimed.update(take)
        return " ".join(self.lines[i] for i in take) or None

    def fields(self) -> dict[str, str | None]:
        result: dict[str, str | None] = {}
        captionless = 0
        for spec in self.doc_type.fields:
            if spec.type == "text" and not keywords(spec):
                result[spec.name] = self.captionless_text(spec, first=captionless == 0)
                captionless += 1
                continue
            taken = {v for v in result.values() if v}
            result[spec.name] = self.after_caption(spec) or self.anywhere(spec, taken)
        return result


class OcrBaseline:
    """RapidOCR (PP-OCRv4, ONNX) plus the rules above; ``read`` answers one image as the model would."""

    def __init__(self):
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()

    def lines(self, image) -> list[str]:
        import numpy as np

        found, _ = self.engine(np.asarray(image.convert("RGB")))
        boxes = [Box(text, min(p[1] for p in points), max(p[1] for p in points), min(p[0] for p in points))
                 for points, text, _score in found or []]  # fmt: skip
        return reading_order(boxes)

    def read(self, doc_type: DocType, image) -> tuple[dict[str, str | None], float]:
        """The fields it finds, and the seconds it took."""
        started = time.perf_counter()
        fields = Extractor(doc_type, self.lines(image)).fields()
        return fields, time.perf_counter() - started
