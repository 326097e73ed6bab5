"""Dates as documents print them: one table of shapes, read in a document type's declared order.

Every shape is a regular expression with named parts (year, month or month name, day); a match
counts only when it is a real calendar date inside the type's year range. Four-digit years
first (``2018/02/22``, ``2024年3月5日``) and month names (``28 MAR 18``, ``24-MAR-2018``) are
unambiguous; all-numeric day/month shapes (``11.02.18``) are read in the type's ``order``
(DMY, MDY or YMD); eight digits in a row are ``YYYYMMDD`` or the order's own (``25032018``);
with ``roc`` a two- or three-digit leading year (``113/03/05``, ``民國113年3月5日``) is a
Republic of China year (+1911). Two-digit years are 2000-2069 and 1970-1999 (strptime's rule).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import date
from typing import Literal

DateOrder = Literal["DMY", "MDY", "YMD"]
ROC_OFFSET = 1911
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")

_D, _M = r"(?P<d>\d{1,2})", r"(?P<m>\d{1,2})"
_Y4, _Y2, _ROC = r"(?P<y>\d{4})", r"(?P<y2>\d{2})", r"(?P<roc>\d{2,3})"
_SEP, _SAME = r"(?P<s>[/.\-])", r"(?P=s)"
_MON = r"(?P<mon>JAN(?:UARY)?|FEB(?:RUARY)?|MAR(?:CH)?|APR(?:IL)?|MAY|JUNE?|JULY?|AUG(?:UST)?|SEPT?(?:EMBER)?|OCT(?:OBER)?|NOV(?:EMBER)?|DEC(?:EMBER)?)"  # noqa: E501
_CJK_YEAR = r"(?:(?P<minguo>(?:中華)?民國)\s*)?(?P<cy>\d{2,4})\s*年\s*"


@dataclass(frozen=True)
class DateReading:
    """How one date field reads numbers: the order of ambiguous shapes, ROC years, sane years."""

    order: DateOrder = "YMD"
    roc: bool = False
    years: tuple[int, int] = (1900, 2099)

    @property
    def shapes(self) -> list[re.Pattern[str]]:
        return _shapes(self.order, self.roc)


def _numeric(order: DateOrder) -> list[str]:
    """Day and month as numbers with a year last (or, for YMD, a two-digit year first)."""
    first, second = (_D, _M) if order == "DMY" else (_M, _D)
    if order == "YMD":
        return [rf"{_Y2}{_SEP}{_M}{_SAME}{_D}"]
    return [rf"{first}{_SEP}{second}{_SAME}{year}" for year in (_Y4, _Y2)]


def _compact(order: DateOrder) -> list[str]:
    own = {"DMY": r"(?P<d>\d{2})(?P<m>\d{2})(?P<y>\d{4})", "MDY": r"(?P<m>\d{2})(?P<d>\d{2})(?P<y>\d{4})"}
    iso = r"(?P<y>\d{4})(?P<m>\d{2})(?P<d>\d{2})"
    return [rf"{p}(?!\d)" for p in ([iso] if order == "YMD" else [own[order], iso])]


def _shapes(order: DateOrder, roc: bool) -> list[re.Pattern[str]]:
    """The table, most specific first: at one position the first shape that reads a date wins."""
    table = [
        rf"{_Y4}{_SEP}{_M}{_SAME}{_D}",
        rf"{_CJK_YEAR}{_M}\s*月\s*{_D}\s*日",
        *([rf"{_ROC}{_SEP}{_M}{_SAME}{_D}"] if roc else []),
        *_numeric(order),
        rf"{_D}[ \-./]?{_MON}\.?[ \-./,]*{_Y4}",
        rf"{_D}[ \-./]?{_MON}\.?[ \-./,]*{_Y2}",
        rf"{_MON}\.?[ \-]?{_D},?[ \-]*{_Y4}",
        *_compact(order),
    ]
    return [re.compile(rf"(?<!\d){shape}") for shape in table]


def _year(parts: dict[str, str | None], reading: DateReading) -> int | None:
    if parts.get("y"):
        return int(parts["y"])
    if parts.get("y2"):
        short = int(parts["y2"])
        return 2000 + short if short < 70 else 1900 + short
    if parts.get("roc"):
        return int(parts["roc"]) + ROC_OFFSET
    if parts.get("cy"):
        year = int(parts["cy"])
        if len(parts["cy"]) == 4 and not parts.get("minguo"):
            return year
        return year + ROC_OFFSET if (reading.roc or parts.get("minguo")) and len(parts["cy"]) <= 3 else None
    return None


def _date(match: re.Match[str], reading: DateReading) -> date | None:
    parts = match.groupdict()
    year = _year(parts, reading)
    month = _MONTHS.index(parts["mon"][:3]) + 1 if parts.get("mon") else int(parts["m"])
    if year is None or not reading.years[0] <= year <= reading.years[1]:
        return None
    try:
        return date(year, month, int(parts["d"]))
    except ValueError:
        return None


def _normal(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).upper().split())


def parse_date(text: str, reading: DateReading) -> date:
    """The date that ``text`` is, whole; ValueError says why not."""
    normal = _normal(text)
    for shape in reading.shapes:
        match = shape.fullmatch(normal)
        if match and (found := _date(match, reading)):
            return found
    raise ValueError(
        f"{text!r} is not a date (read {reading.order}"
        f"{', ROC years' if reading.roc else ''}, years {reading.years[0]}-{reading.years[1]})"
    )


def find_dates(text: str, reading: DateReading) -> list[date]:
    """Every date inside a line of text, left to right (``Date:19/10/2018 11:50`` holds one)."""
    normal = _normal(text)
    found: dict[int, tuple[date, int]] = {}  # start -> the date read there, and where it ends
    for shape in reading.shapes:
        for start in range(len(normal)):
            if start not in found and (match := shape.match(normal, start)) and (day := _date(match, reading)):
                found[start] = day, match.end()
    dates, end = [], 0
    for start in sorted(found):
        if start >= end:  # nothing read inside a date already read
            day, end = found[start]
            dates.append(day)
    return dates
