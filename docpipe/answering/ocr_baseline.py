"""The OCR pipeline teams are leaving, as a baseline beside the model: what a competent engineer
writes in a day, from what receipts and tickets look like.

PP-OCRv4 text detection and recognition (the ONNX models inside the ``rapidocr-onnxruntime``
wheel: offline, CPU) with per-character boxes, so word gaps the recogniser drops become spaces
again; reading order by the usual sort (boxes top to bottom, merged into a line where they
overlap vertically, each line left to right). Then per-type rules, all taken from the document
type's data:

- dates and times are found inside a line (``Date:19/10/2018 11:50`` holds both), read by the
  type's table of date shapes; a captioned one first, else the first on the document;
- amounts by caption priority: the field's ``keywords`` in order, each caption's largest first
  amount after it, lines with an ``exclude_keywords`` word (tax, item counts, change) never
  count; ``fallback_keywords`` (a subtotal, the cash paid) when no caption is found;
- ids by their pattern, enums by their values, captioned text after its caption;
- captionless text (a receipt's company and address) from the block above the first caption:
  headings, stamps and numbers skipped, the company on the line with a ``hints`` word (SDN BHD)
  with a wrapped first half joined, the address from its first ``hints`` line down to a heading.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from docpipe.dates import find_dates
from docpipe.doctypes import DocType, FieldSpec

_TOKEN = re.compile(r"[^\s:：]+(?:[ /.\-][^\s:：]+)*")
_AMOUNT = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d.,]*\s*%)(?!\d)")  # not a rate
_TIME = re.compile(r"(?<!\d)([01]?\d|2[0-3]):([0-5]\d)(?::[0-5]\d)?")
_FINISHING = re.compile(r"\s*(?:[(（][^)）]*[)）])?\s*")  # what may stand before a hint on a name's second line
_SQUEEZE = re.compile(r"[\s.]+")
_STAMP = re.compile(r"\s*[(（]?\s*(?:CO\.?\s*(?:NO|REG)\S*\s*)?[A-Z]{0,4}\d[\d\-]{4,}[A-Z]?\b.*$", re.I)
SPACE_GAP = 0.6  # a gap wider than this share of the line's median character width is a space
BLOCK_LINES = 12  # captionless text is looked for in the document's first lines only
ADDRESS_LINES = 4


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
    return [" ".join(b.text for b in sorted(line, key=lambda b: b.left)) for line in lines]


def spaced(characters: list[str], boxes: list[list[list[float]]]) -> str:
    """A recognised line with a space wherever two characters stand further apart than a space's width."""
    spans = [(min(p[0] for p in box), max(p[0] for p in box)) for box in boxes]
    widths = sorted(right - left for left, right in spans) or [0.0]
    median = widths[len(widths) // 2]
    text = characters[:1]
    for index in range(1, len(characters)):
        gap = spans[index][0] - spans[index - 1][1]
        digits = all(c.isdigit() or c in ".," for c in (characters[index - 1], characters[index]))
        if gap > SPACE_GAP * median and not digits and characters[index] != " " and text[-1] != " ":
            text.append(" ")
        text.append(characters[index])
    return " ".join("".join(text).split())


def _squeezed(text: str) -> str:
    """Text without spaces and dots: OCR drops and adds both (``TotalAmt`` / ``Reg.No``)."""
    return _SQUEEZE.sub("", text)


def keywords(spec: FieldSpec) -> list[str]:
    return spec.keywords or [word.strip(":：") for word in spec.label.split() if word.strip(":：")]


class Extractor:
    """One document's lines, and the rules that pull each field of its type out of them."""

    def __init__(self, doc_type: DocType, lines: list[str]):
        self.doc_type = doc_type
        self.lines = lines
        self.keys: dict[str, str] = {}
        self.folded = [self._key(line) for line in lines]

    def _key(self, text: str) -> str:
        """Text as compared: case and variants folded, spaces and dots dropped (each text once)."""
        if text not in self.keys:
            self.keys[text] = _squeezed(self.doc_type.fold(text))
        return self.keys[text]

    def _find(self, index: int, words: list[str]) -> int | None:
        """Where the first of ``words`` ends in line ``index`` (spaces and dots ignored), or None."""
        for word in words:
            if word and (at := self.folded[index].find(self._key(word))) >= 0:
                return at + len(self._key(word))
        return None

    def _after(self, index: int, end: int) -> str:
        """The text of line ``index`` after its ``end``-th character that is no space or dot."""
        line, seen = self.lines[index], 0
        for position, char in enumerate(line):
            if seen == end:
                return line[position:]
            seen += not _SQUEEZE.match(char)
        return ""

    @cached_property
    def captions(self) -> list[str]:
        return [word for spec in self.doc_type.fields for word in keywords(spec)]

    def _has(self, index: int, words: list[str]) -> bool:
        return self._find(index, words) is not None

    def values_in(self, spec: FieldSpec, text: str) -> list[str]:
        """Every valid value of the field inside ``text``, left to right, in canonical form."""
        if spec.type == "date":
            return [day.strftime(spec.canonical_format) for day in find_dates(text, spec.date_reading)]
        if spec.type == "enum":
            folded = self.doc_type.fold(text)
            found = [(folded.find(self.doc_type.fold(v)), v) for v in spec.values if self.doc_type.fold(v) in folded]
            return [value for _, value in sorted(found)]
        if spec.type == "time":
            pieces = [match.group(0) for match in _TIME.finditer(text)]
        elif spec.type in ("money", "integer"):
            text = re.sub(r"(?<=\d)\s*[,.]\s*(?=\d{2}(?!\d))", ".", text) if spec.type == "money" else text
            pieces = _AMOUNT.findall(text)
            if spec.type == "money" and spec.decimals:  # an amount printed without its decimals is an OCR slip
                pieces = [p for p in pieces if "." in p and len(p.rsplit(".", 1)[1]) == spec.decimals]
        elif spec.type == "id":
            compact = "".join(text.split()).upper()
            pieces = [match.group(0) for match in re.finditer(spec.pattern, compact)]
        else:
            pieces = [text, *_TOKEN.findall(text)]
        values = []
        for piece in pieces:
            try:
                values.append(self.doc_type.canonical_value(spec, piece))
            except ValueError:
                continue
        return values

    def captioned(self, spec: FieldSpec, words: list[str], excluded: list[str]) -> list[str]:
        """The first value after any of ``words`` (on its line, else the next), for each line holding one."""
        found = []
        for index in range(len(self.lines)):
            end = self._find(index, words)
            if end is None or self._has(index, excluded):
                continue
            rest = self._after(index, end).strip(" :：")
            candidates = [rest] if rest else []
            if spec.type != "text" and len(_squeezed(self.lines[index])) <= end + 3:  # a caption alone on its line
                candidates += self.lines[index + 1 : index + 2]
            for candidate in candidates:
                values = self.values_in(spec, candidate) if spec.type != "text" else [candidate]
                if values:
                    found.append(values[0])
                    break
        return found

    def amount(self, spec: FieldSpec) -> str | None:
        """By caption priority: the first caption found wins, its largest amount; then the fallbacks'."""
        for caption in keywords(spec):
            values = self.captioned(spec, [caption], spec.exclude_keywords)
            if values:
                return max(values, key=float)
        for caption in spec.fallback_keywords:
            values = self.captioned(spec, [caption], [])
            if values:
                return values[-1]
        return None

    def anywhere(self, spec: FieldSpec, taken: set[str]) -> str | None:
        """The first value of the field's type on any line; free text has no type to recognise it by."""
        if spec.type == "text":
            return None
        for index, line in enumerate(self.lines):
            if spec.exclude_keywords and self._has(index, spec.exclude_keywords):
                continue
            for value in self.values_in(spec, line):
                if value not in taken:
                    return value
        return None

    @cached_property
    def block(self) -> list[int]:
        """The document's first lines, above its first caption or date: where captionless text is printed."""
        date_specs = [spec for spec in self.doc_type.fields if spec.type == "date"]
        lines = []
        for index in range(min(len(self.lines), BLOCK_LINES)):
            if self._has(index, self.captions) or any(self.values_in(spec, self.lines[index]) for spec in date_specs):
                break
            lines.append(index)
        return lines

    def _wordy(self, index: int) -> bool:
        """A line that can be a name or an address: mostly letters, not a heading."""
        squeezed = _squeezed(self.lines[index])
        letters = sum(char.isalpha() for char in squeezed)
        return letters >= 3 and letters >= 0.5 * len(squeezed) and not self._has(index, self.doc_type.headings)

    def company_like(self, spec: FieldSpec, free: list[int]) -> tuple[str | None, list[int]]:
        """Above the first heading: the first line with a ``hints`` word, joined with the line above
        where it only finishes that one (``(KL) SDN BHD``, or after a line ending in ``&``) or with the
        line below where that one starts with a hint word (``SDN BHD``); else the
        first wordy line with capitals. A registration stamp after the name is cut. Returns the value
        and the lines it took."""
        headings = [i for i in range(len(self.lines)) if free and i > free[0] and self._has(i, self.doc_type.headings)]
        top = [i for i in free if not headings or i < headings[0]]  # a heading below the name ends its block
        taken = next(([i] for i in top if self._has(i, spec.hints)), None)
        if taken is None:
            taken = next(([i] for i in top if self._wordy(i) and any(c.isupper() for c in self.lines[i])), [])
        if not taken:
            return None, []
        index = taken[0]
        above = self.lines[index - 1].rstrip() if index else ""
        finishes = _FINISHING.fullmatch(self._before(index, spec.hints)) or above.endswith("&")
        if index - 1 in free and finishes and any(c.isupper() for c in self.lines[index - 1]):
            taken.insert(0, index - 1)
        elif index + 1 in free and self._has(index + 1, spec.hints) and not self._before(index + 1, spec.hints).strip():
            taken.append(index + 1)
        name = " ".join(_STAMP.sub("", self.lines[i]) for i in taken).strip(" ,")
        return name or None, taken

    def _before(self, index: int, words: list[str]) -> str:
        """The text of line ``index`` before the first of ``words`` it holds."""
        starts = [at for word in words if word and (at := self.folded[index].find(self._key(word))) >= 0]
        if not starts:
            return self.lines[index]
        return self.lines[index][: len(self.lines[index]) - len(self._after(index, min(starts)))]

    def address_like(self, spec: FieldSpec, free: list[int]) -> tuple[str | None, list[int]]:
        """From the first of ``free`` with a ``hints`` word down, while lines hold letters and no
        heading or caption."""
        start = next((i for i in free if self._has(i, spec.hints) and not self._has(i, self.doc_type.headings)), None)
        if start is None:
            start = next((i for i in free if self._wordy(i)), None)
        if start is None:
            return None, []
        taken = []
        for index in range(start, len(self.lines)):
            squeezed = _squeezed(self.lines[index])
            ends = self._has(index, [*self.doc_type.headings, *self.captions]) or (
                index in self.block and index not in free
            )
            if ends or sum(c.isalpha() for c in squeezed) < 2:
                break
            taken.append(index)
            if len(taken) == ADDRESS_LINES:
                break
        return " ".join(self.lines[i] for i in taken) or None, taken

    def fields(self) -> dict[str, str | None]:
        result: dict[str, str | None] = {}
        captionless = [spec for spec in self.doc_type.fields if spec.type == "text" and not keywords(spec)]
        free = [i for i in self.block if self._wordy(i) or any(self._has(i, s.hints) for s in captionless)]
        below = [
            i
            for i in range(len(self.lines))
            if i > (self.block[-1] if self.block else -1) and not self._has(i, self.captions) and self._wordy(i)
        ]
        for number, spec in enumerate(captionless):
            value, taken = (self.company_like if number == 0 else self.address_like)(spec, free)
            if value is None and number:  # printed below the captions (a layout that puts the date first)
                value, taken = self.address_like(spec, below)
            result[spec.name] = value
            free = [i for i in free if i not in taken and (not taken or i > taken[-1])]
        for spec in self.doc_type.fields:
            if spec in captionless:
                continue
            taken = {v for v in result.values() if v}
            if spec.type == "money":
                result[spec.name] = self.amount(spec) or self.anywhere(spec, taken)
                continue
            captioned = self.captioned(spec, keywords(spec), spec.exclude_keywords) if keywords(spec) else []
            result[spec.name] = next(iter(captioned), None) or self.anywhere(spec, taken)
        return {spec.name: result[spec.name] for spec in self.doc_type.fields}


def box_of(points, text: str, _score, char_boxes=None, characters=None, *_rest) -> Box:
    """One recognised text box, its spaces restored from the character boxes where the recogniser gave them."""
    if characters and char_boxes and len(characters) == len(char_boxes) and "".join(characters) == text:
        text = spaced(list(characters), char_boxes)
    return Box(text, min(p[1] for p in points), max(p[1] for p in points), min(p[0] for p in points))


class OcrBaseline:
    """RapidOCR (PP-OCRv4, ONNX) plus the rules above; ``read`` answers one image as the model would."""

    def __init__(self):
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()

    def lines(self, image) -> list[str]:
        import numpy as np

        found, _ = self.engine(np.asarray(image.convert("RGB")), return_word_box=True)
        return reading_order([box_of(*entry) for entry in found or []])

    def read(self, doc_type: DocType, image) -> tuple[dict[str, str | None], float]:
        """The fields it finds, and the seconds it took."""
        started = time.perf_counter()
        fields = Extractor(doc_type, self.lines(image)).fields()
        return fields, time.perf_counter() - started

    def guess(self, doc_types: Sequence[DocType], image) -> tuple[DocType | None, dict[str, str | None], float]:
        """A document of unknown type: the type whose fields it finds most of (the first among equals;
        None where it finds none of any), those fields, and the seconds it took."""
        started = time.perf_counter()
        lines = self.lines(image)
        read = [(doc_type, Extractor(doc_type, lines).fields()) for doc_type in doc_types]
        doc_type, fields = max(read, key=lambda pair: sum(value is not None for value in pair[1].values()))
        if not any(value is not None for value in fields.values()):
            return None, {}, time.perf_counter() - started
        return doc_type, fields, time.perf_counter() - started
