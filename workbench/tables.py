"""Tables as a person reads them at a glance: the display form of the DataFrames the workbench returns.

The DataFrames stay numeric for whoever computes on them; :class:`Readable` is what magics,
widgets and HTML reprs show. Its rules: milliseconds, rates, MiB and batch sizes to one
decimal, seconds to three (a millisecond), other floats to three significant digits and
never in scientific notation, whole numbers as integers with thousands
separators, fractions as percentages, timestamps as local times of day, missing figures as
"—", text left-aligned (so span names indented by depth line up) and numbers right-aligned.
"""

from __future__ import annotations

import html
import math
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

MISSING = "—"
# A display shows the first and last half of this many rows: every span of a 10,000-run map would be megabytes
# of HTML in the notebook, and more than a browser lays out.
SHOWN_ROWS = 200
_LEFT = "text-align: left; white-space: nowrap"
_RIGHT = "text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums"


def _missing(value: Any) -> bool:
    import pandas as pd

    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value))


def plain_number(value: float) -> str:
    """A float with three significant digits, never in scientific notation: 0.000123, 1.23, 1,235."""
    import numpy as np

    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return np.format_float_positional(value, precision=3, unique=False, fractional=False, trim="-")


def _base(column: str) -> str:
    """The figure a column holds: interval bounds read like the figure they bound."""
    for suffix in ("_lo", "_hi"):
        if column.endswith(suffix):
            return column[: -len(suffix)]
    return column


def float_format(column: str, values: Iterable[float] = ()) -> Callable[[float], str]:
    """How a float column named ``column`` reads, by the unit its name ends in."""
    name = _base(column)
    if name.endswith(("_ms", "per_s", "_mb", "batch_size")):
        return lambda v: f"{v:,.1f}"
    if name.endswith("_s"):
        return lambda v: f"{v:,.3f}"
    if name.endswith("fraction"):
        return lambda v: f"{v:.1%}"
    finite = [v for v in values if not math.isnan(v)]
    if finite and all(v.is_integer() for v in finite):  # counts widened to float by a missing value
        return lambda v: f"{int(v):,}"
    return plain_number


def _time_of_day(value: Any) -> str:
    local = value.to_pydatetime(warn=False)  # nanoseconds go: the text shows milliseconds
    if local.tzinfo is not None:
        local = local.astimezone()
    if local.date() == datetime.now(local.tzinfo).date():
        return local.strftime("%H:%M:%S.%f")[:-3]
    return local.strftime("%Y-%m-%d %H:%M:%S")


def _column_text(column: str, series: pd.Series) -> tuple[list[str], bool]:
    """The cells of one column as text, and whether they are numbers (right-aligned)."""
    import pandas as pd
    from pandas.api import types

    values = series.tolist()
    if types.is_bool_dtype(series.dtype):
        return [MISSING if _missing(v) else ("yes" if v else "no") for v in values], False
    if types.is_datetime64_any_dtype(series.dtype):
        return [MISSING if _missing(v) else _time_of_day(pd.Timestamp(v)) for v in values], False
    if types.is_integer_dtype(series.dtype):
        return [MISSING if _missing(v) else f"{int(v):,}" for v in values], True
    if types.is_float_dtype(series.dtype):
        fmt = float_format(column, (float(v) for v in values if not _missing(v)))
        return [MISSING if _missing(v) else fmt(float(v)) for v in values], True
    numbers = [v for v in values if not _missing(v)]
    if numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        fmt = float_format(column, (float(v) for v in numbers))  # an object column of numbers (span attributes)
        return [MISSING if _missing(v) else fmt(float(v)) for v in values], True
    # Trailing blanks are padding for a plain-text repr (Trace.compact's names): this table aligns its own columns.
    return [MISSING if _missing(v) else str(v).rstrip() for v in values], False


class Readable:
    """A DataFrame as a person reads it at a glance: the cells as text, each column aligned.

    Shows as formatted HTML in a notebook (``_repr_html_``) and as aligned text elsewhere.
    A named index (``hop`` in a trace summary) becomes the first column; an unnamed one (row
    numbers, even of a filtered table) is left out. ``numeric`` names text columns that hold
    formatted figures, so they are right-aligned like numbers; ``notes`` are lines shown under
    the table.
    """

    def __init__(self, frame: pd.DataFrame, *, numeric: Sequence[str] = (), notes: Sequence[str] = ()) -> None:
        self.notes = list(notes)
        shown = frame.reset_index() if any(name is not None for name in frame.index.names) else frame
        self.columns = [str(c) for c in shown.columns]
        self.cells: list[list[str]] = []
        self.right: list[bool] = []
        for column in shown.columns:
            text, is_number = _column_text(str(column), shown[column])
            self.cells.append(text)
            self.right.append(is_number or str(column) in numeric)
        self.rows = len(shown)

    def row(self, index: int) -> dict[str, str]:
        """Row ``index`` as shown: column name to cell text."""
        return {column: cells[index] for column, cells in zip(self.columns, self.cells)}

    def column(self, name: str) -> list[str]:
        """Column ``name`` as shown, one text per row."""
        return self.cells[self.columns.index(name)]

    def _shown(self) -> tuple[list[int], str | None]:
        """The rows a display shows (all, or the first and last ``SHOWN_ROWS // 2``) and the line for those left out."""
        if self.rows <= SHOWN_ROWS:
            return list(range(self.rows)), None
        half = SHOWN_ROWS // 2
        left_out = self.rows - 2 * half
        return [*range(half), *range(self.rows - half, self.rows)], (
            f"⋮ {left_out:,} more rows, not shown: the DataFrame holds all {self.rows:,}")

    def to_html(self, classes: str = "autoglm-table") -> str:
        # Inline alignment: notebook stylesheets right-align every cell, and a notebook's sanitizer or an
        # ipywidgets HTML view may drop a <style> block, but both keep a cell's own style.
        styles = [_RIGHT if right else _LEFT for right in self.right]
        head = "".join(f'<th style="{s}">{html.escape(c)}</th>' for c, s in zip(self.columns, styles))
        shown, gap = self._shown()
        rows = [
            "<tr>" + "".join(f'<td style="{s}">{html.escape(cells[i])}</td>' for cells, s in zip(self.cells, styles))
            + "</tr>"
            for i in shown
        ]
        if gap is not None:
            span = len(self.columns)
            rows.insert(SHOWN_ROWS // 2, f'<tr><td colspan="{span}" style="{_LEFT}">{html.escape(gap)}</td></tr>')
        body = "".join(rows)
        notes = "".join(f"<div><small>{html.escape(n)}</small></div>" for n in self.notes)
        table = f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
        return f'<table class="{html.escape(classes)}">{table}</table>{notes}'

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        widths = [max([_width(c), *map(_width, cells)]) for c, cells in zip(self.columns, self.cells)]

        def line(texts: Sequence[str]) -> str:
            return "  ".join(_pad(t, w, r) for t, w, r in zip(texts, widths, self.right)).rstrip()

        shown, gap = self._shown()
        lines = [line([cells[i] for cells in self.cells]) for i in shown]
        if gap is not None:
            lines.insert(SHOWN_ROWS // 2, gap)
        return "\n".join([line(self.columns), *lines, *self.notes])


def _width(text: str) -> int:
    """The columns ``text`` takes on a terminal: two for a wide character (Chinese, Japanese, Korean, fullwidth
    forms), none for a combining mark or a zero-width one, one for the rest."""
    if text.isascii():
        return len(text)
    return sum(0 if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me", "Cf")
               else 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def _pad(text: str, width: int, right: bool) -> str:
    """``text`` padded with spaces to ``width`` terminal columns, on the left if ``right``."""
    fill = " " * (width - _width(text))
    return fill + text if right else text + fill
