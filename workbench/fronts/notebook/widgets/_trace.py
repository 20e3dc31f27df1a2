"""The trace viewer: an interactive waterfall beside the span table, drawn by an anywidget ES module."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anywidget
import pandas as pd
import traitlets

from workbench.chains.run import Run
from workbench.errors import WorkbenchError
from workbench.fronts.notebook.widgets._background import text_fallback
from workbench.tracing import Trace
from workbench.tracing.trace import _KIND_COLOURS

# The front-end sources live in the repository's extensions/ folder; the package links to it so
# that the wheel carries them (see pyproject's package-data).
FRONTEND = Path(__file__).with_name("_extensions")
ATTRIBUTE_TEXT_LIMIT = 600
MAX_SPANS = 1500


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a table cell, or None for a missing one; an infinity as its text ("inf"), for JSON has none
    (the browser's JSON.parse refuses the ``Infinity`` Python writes)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    if isinstance(value, str):
        return value if len(value) <= ATTRIBUTE_TEXT_LIMIT else value[:ATTRIBUTE_TEXT_LIMIT] + "…"
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _runs(source: Run | Iterable[Run | None]) -> list[Run]:
    """The runs ``source`` is or holds (say, the result of ``chain.map``), those that ran: an interrupted map's batch
    holds None for the inputs that did not run."""
    if isinstance(source, Run):
        return [source]
    runs = list(source) if isinstance(source, Iterable) and not isinstance(source, (str, bytes)) else None
    if runs is None or not all(run is None or isinstance(run, Run) for run in runs):
        raise WorkbenchError(
            f"a trace viewer shows a Run, several Runs or a Trace, not {type(source).__name__}",
            hint="e.g. wb.TraceViewer(chain.run(...)), wb.TraceViewer(chain.map(inputs)) or wb.TraceViewer(run.trace)",
        )
    return [run for run in runs if run is not None]


def dropped_note(empty: list[Run], alone: bool) -> str | None:
    """What to say of the runs of ``empty`` (runs with no span) whose spans the span index dropped, if any; ``alone``:
    the viewer shows one run."""
    gone = [run for run in empty if run.dropped_note() is not None]
    return gone[0].dropped_note(None if alone else len(gone)) if gone else None


def span_payload(trace: Trace, max_spans: int = MAX_SPANS) -> list[dict[str, Any]]:
    """The spans as the front end draws them: tree order, times in ms from the earliest span's start."""
    # The first spans in tree order, each parent before its children, tabled alone: a table of every span of a
    # trace of 50,000 took 2.6 s to show 1,500 of them.
    shown = [span for span, _ in trace.ordered()[:max_spans]]
    table = Trace(shown).table()
    if table.empty:
        return []
    origin = table["start_time"].min()
    # Attributes come from the spans themselves: the table's columns widen integers to floats.
    raw = {format(s.context.span_id, "016x"): s.attributes or {} for s in shown}
    spans = []
    for row in table.to_dict("records"):
        attributes = {key: _plain(value) for key, value in raw[row["context.span_id"]].items()}
        spans.append(
            {
                "id": row["context.span_id"],
                "parent": _plain(row["parent_id"]),
                "trace": row["context.trace_id"],
                "name": row["name"],
                "kind": str(row["span_kind"]),
                "depth": int(row["depth"]),
                "start_ms": (row["start_time"] - origin) / pd.Timedelta(milliseconds=1),
                "duration_ms": float(row["duration_ms"]),
                "queue_ms": _plain(row["queue_ms"]) or 0.0,
                "gc_ms": _plain(row["gc_ms"]),  # None for a span recorded in another process
                "status": row["status_code"],
                "attributes": attributes,
            }
        )
    return spans


class TraceViewer(anywidget.AnyWidget):
    """An interactive waterfall of one run, or of many concurrent runs, with the span table beside it.

    Bars nest by parent and are coloured by span kind; hovering shows a span's attributes;
    clicking a bar (or a row) selects the span, whose id the kernel reads as ``selected``
    and whose fields as ``selected_span``. ``show()`` draws another trace in place.
    """

    _esm = FRONTEND / "trace_viewer.js"
    _css = FRONTEND / "trace_viewer.css"

    spans = traitlets.List(traitlets.Dict()).tag(sync=True)
    colours = traitlets.Dict(dict(_KIND_COLOURS)).tag(sync=True)
    selected = traitlets.Unicode("").tag(sync=True)
    title = traitlets.Unicode("").tag(sync=True)

    def __init__(self, source: Trace | Run | Iterable[Run | None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if source is not None:
            self.show(source)

    def show(self, source: Trace | Run | Iterable[Run | None]) -> None:
        """Draw ``source`` (a Trace, a Run, or Runs) in place of what the viewer shows now."""
        ran = [] if isinstance(source, Trace) else [(run, run.trace.spans) for run in _runs(source)]
        trace = source if isinstance(source, Trace) else Trace(span for _, spans in ran for span in spans)
        spans = span_payload(trace)
        traces = len({s["trace"] for s in spans})
        shown = f"the first {len(spans)} of {len(trace)}" if len(spans) < len(trace) else f"{len(spans)}"
        title = f"{shown} spans in {traces} trace{'s' if traces != 1 else ''}"
        # A run whose spans the index dropped would otherwise read as a run that did nothing.
        note = dropped_note([run for run, spans in ran if not spans], alone=isinstance(source, Run))
        self.selected = ""
        self.title = title if note is None else f"{title}: {note}"
        self.spans = spans

    def __repr__(self) -> str:
        return text_fallback(self, self.title or "no spans yet")

    @property
    def selected_span(self) -> dict[str, Any] | None:
        """The span the user clicked (its name, kind, times and attributes), or None."""
        return next((s for s in self.spans if s["id"] == self.selected), None)
