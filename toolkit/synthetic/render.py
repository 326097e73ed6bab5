"""Draw a clean document image from field values, in one of several layouts.

Layouts differ where OCR pipelines lose reading order: ``rows`` (label and value on one
line), ``grid`` (a ruled two-column table), ``stacked`` (small caption above the value),
each optionally ``dense`` (small type, distractor text between and beside the fields).
``render_other`` draws a page of none of the registered types: blank paper, noise, or an
unrelated form with its own heading and captions.
"""

from __future__ import annotations

import os
import random
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from docpipe.doctypes import DocType

LAYOUTS = ("rows", "grid", "stacked")
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
)
DISTRACTORS = (
    "僅限當日當次車有效",
    "請妥善保存本票",
    "退票須收手續費",
    "Non-smoking car",
    "自由座 Non-reserved",
    "客服專線 4066-3000",
    "THANK YOU PLEASE COME AGAIN",
    "GST SUMMARY",
    "QTY  U/P  AMT",
    "CASH  CHANGE",
    "營業人統一編號",
    "備註 Remarks",
    "ROUNDING ADJ",
    "SERVICE TAX 6%",
    "交易序號",
    "載具號碼",
    "GOODS SOLD ARE NOT RETURNABLE",
    "會員卡號 ****1234",
)
OTHER_KINDS = ("blank", "noise", "unrelated")
UNRELATED_TITLES = (
    "會議紀錄 Meeting Minutes",
    "停車繳費證明",
    "DELIVERY ORDER",
    "掛號信函收據",
    "MENU 今日菜單",
    "員工請假單",
    "WARRANTY CARD",
    "成績單 Transcript",
)
UNRELATED_CAPTIONS = (
    "姓名",
    "Name",
    "部門",
    "Room",
    "時段",
    "Qty",
    "Item",
    "備註",
    "Signature",
    "Ref.",
    "科目",
    "Hours",
)
WIDTH = {"rows": 640, "grid": 720, "stacked": 600}
MARGIN = 24


class FontMissingError(RuntimeError):
    """No CJK font is installed (set SYNTH_FONT or install fonts-wqy-microhei)."""


def font_path() -> Path:
    """The CJK TrueType font the generator renders with."""
    candidates = [os.environ["SYNTH_FONT"]] if os.environ.get("SYNTH_FONT") else FONT_CANDIDATES
    for candidate in candidates:
        if Path(candidate).is_file():
            return Path(candidate)
    raise FontMissingError(
        f"no CJK font found (looked for {', '.join(candidates)}); "
        "install Debian's fonts-wqy-microhei (make setup does) or set SYNTH_FONT"
    )


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path()), size)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Break ``text`` into lines no wider than ``width`` (at spaces, else between characters)."""
    lines, line = [], ""
    for token in text.replace(" ", " \0").split("\0"):
        if line and font.getlength(line + token) > width:
            lines.append(line.rstrip())
            line = ""
        while font.getlength(token) > width:  # one token too long for a line (CJK has no spaces)
            cut = 1
            while cut < len(token) and font.getlength(token[: cut + 1]) <= width:
                cut += 1
            lines.append(token[:cut])
            token = token[cut:]
        line += token
    return [*lines, line.rstrip()] if line.strip() else lines


class _Canvas:
    """A growing column of text lines, drawn onto a page once the height is known.

    ``side`` pixels on the right are kept free of fields for marginal notes.
    """

    def __init__(self, width: int, ink: tuple[int, int, int], side: int = 0):
        self.width = width
        self.ink = ink
        self.side = side
        self.ops: list[tuple[str, tuple, dict]] = []
        self.y = MARGIN

    def text(self, x: int, text: str, size: int, advance: bool = True) -> None:
        font = _font(size)
        in_margin = x >= self.width - self.side
        limit = self.width - MARGIN if in_margin else self.width - self.side - MARGIN
        for line in _wrap(text, font, limit - x):
            self.ops.append(("text", ((x, self.y), line), {"font": font}))
            if advance:
                self.y += int(size * 1.35)

    def rule(self, x0: int, x1: int) -> None:
        self.ops.append(("line", ([(x0, self.y), (x1, self.y)],), {"width": 1}))

    def draw(self, paper: tuple[int, int, int]) -> Image.Image:
        image = Image.new("RGB", (self.width, self.y + MARGIN), paper)
        draw = ImageDraw.Draw(image)
        for op, args, kwargs in self.ops:
            getattr(draw, op)(*args, fill=self.ink, **kwargs)
        return image


def render(doc_type: DocType, values: dict[str, str], rng: random.Random, layout: str, dense: bool) -> Image.Image:
    """The document as a clean RGB image; ``values`` are printed strings keyed by field name."""
    size = rng.randint(15, 18) if dense else rng.randint(20, 26)
    paper = tuple(rng.randint(235, 255) for _ in range(3))
    side = 240 if dense else 0
    canvas = _Canvas(WIDTH[layout] + side, ink=tuple(rng.randint(0, 60) for _ in range(3)), side=side)
    canvas.text(MARGIN, doc_type.title or doc_type.display_name, size + 6)
    fields = [spec for spec in doc_type.fields if spec.name in values]
    if rng.random() < 0.3:  # printed order need not follow the answer's order
        rng.shuffle(fields)
    label_width = 0 if layout == "stacked" else max(int(_font(size).getlength(f.label)) for f in fields) + 16
    for spec in fields:
        if dense and rng.random() < 0.6:
            canvas.text(MARGIN, rng.choice(DISTRACTORS), size - 2)
        if dense and rng.random() < 0.5:  # a marginal note level with the field: two reading columns
            canvas.text(canvas.width - side + 8, rng.choice(DISTRACTORS), size - 3, advance=False)
        if layout == "grid":
            canvas.rule(MARGIN, canvas.width - MARGIN)
            canvas.y += 6
        value = values[spec.name]
        if not spec.label:
            canvas.text(MARGIN, value, size)
        elif layout == "stacked":
            canvas.text(MARGIN, spec.label, max(size - 6, 12))
            canvas.text(MARGIN + 8, value, size)
        else:
            canvas.text(MARGIN, spec.label, size, advance=False)
            canvas.text(MARGIN + label_width, value, size)
    if layout == "grid":
        canvas.rule(MARGIN, canvas.width - MARGIN)
    for _ in range(rng.randint(4, 9) if dense else rng.randint(0, 2)):
        canvas.text(MARGIN, rng.choice(DISTRACTORS), size - 2)
    return canvas.draw(paper)


def render_other(rng: random.Random) -> tuple[Image.Image, str]:
    """A page of none of the registered types, and which kind: blank paper, noise (a photo of a desk or
    a sensor's grain), or an unrelated form (its own heading, captions and values)."""
    kind = rng.choice(OTHER_KINDS)
    paper = tuple(rng.randint(200, 255) for _ in range(3))
    width, height = rng.randint(480, 720), rng.randint(360, 900)
    if kind == "blank":
        return Image.new("RGB", (width, height), paper), kind
    if kind == "noise":
        noise = Image.effect_noise((width, height), rng.uniform(20, 90)).convert("RGB")
        return Image.blend(Image.new("RGB", (width, height), paper), noise, rng.uniform(0.4, 0.9)), kind
    size = rng.randint(18, 26)
    canvas = _Canvas(width, ink=tuple(rng.randint(0, 80) for _ in range(3)))
    canvas.text(MARGIN, rng.choice(UNRELATED_TITLES), size + 6)
    for caption in rng.sample(UNRELATED_CAPTIONS, rng.randint(2, 6)):
        value = "".join(rng.choice("0123456789ABCDEFGHJK") for _ in range(rng.randint(3, 10)))
        canvas.text(MARGIN, f"{caption}: {value}", size)
    for _ in range(rng.randint(0, 4)):
        canvas.text(MARGIN, rng.choice(DISTRACTORS), size - 2)
    return canvas.draw(paper), kind
