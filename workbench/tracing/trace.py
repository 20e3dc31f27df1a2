"""A trace as a researcher reads it: a pandas table, a per-hop summary, a waterfall plot."""

from __future__ import annotations

import html
import textwrap
import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import ReadableSpan

from workbench.errors import SettingsError, plain
from workbench.tracing import attributes as attr
from workbench.tracing import gcpauses

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

# The subset ``Trace.compact`` shows (the CLI and the magics print it).
COMPACT_COLUMNS = [
    "name", "offset_ms", "duration_ms", "queue_ms", "ttft_ms", "decode_ms", "tokens_in", "tokens_out", "status_code",
]

# Columns every table has, in this order; span attributes follow as ``attributes.*``.
COLUMNS = [
    "name",
    "span_kind",
    "parent_id",
    "start_time",
    "end_time",
    "status_code",
    "status_message",
    "context.span_id",
    "context.trace_id",
    "depth",
    "hop",
    "model",
    "offset_ms",
    "duration_ms",
    "self_ms",
    "gc_ms",
    "queue_ms",
    "ttft_ms",
    "decode_ms",
    "tpot_ms",
    "tokens_in",
    "tokens_out",
    "batch_size",
]

_KIND_COLOURS = {"CHAIN": "#4c72b0", "LLM": "#dd8452", "TOOL": "#55a868", "RETRIEVER": "#8172b3"}  # OpenInference


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _ms(ns: int) -> float:
    return ns / 1e6


def _covered_ns(intervals: list[tuple[int, int]]) -> int:
    """Total length of the union of ``intervals``."""
    total, end = 0, None
    for lo, hi in sorted(intervals):
        if end is None or lo > end:
            total += hi - lo
            end = hi
        elif hi > end:
            total += hi - end
            end = hi
    return total


def run_spans(spans: Iterable[ReadableSpan], run_id: str) -> list[ReadableSpan]:
    """The spans of run ``run_id`` among those of its trace: its root span's subtree where a caller's ``traceparent``
    (or envelope ``trace_id``) put the run in a trace of its own; where the run began the trace, all of them but the
    subtrees of runs that joined it since (a trace id is no secret: a served caller's spans would show another's)."""
    spans = list(spans)
    root = next((s for s in spans if (s.parent is None or s.parent.is_remote)
                 and (s.attributes or {}).get(attr.RUN_ID) == run_id), None)
    if root is None:
        return []
    joined = [s for s in spans if s.parent is not None and s.parent.is_remote and s is not root]
    if root.parent is None and not joined:
        return spans
    children: dict[int, list[ReadableSpan]] = defaultdict(list)
    for span in spans:
        if span.parent is not None and not span.parent.is_remote:
            children[span.parent.span_id].append(span)

    def subtree(top: ReadableSpan) -> list[ReadableSpan]:
        found, stack = [], [top]
        while stack:
            span = stack.pop()
            found.append(span)
            stack.extend(children.get(span.context.span_id, ()))
        return found

    if root.parent is not None:
        return subtree(root)
    others = {id(span) for top in joined for span in subtree(top)}
    return [span for span in spans if id(span) not in others]


class Trace:
    """The finished spans of one run (or of many runs), readable as tables and plots.

    ``note`` says why spans are missing where that is known (a run whose spans the span index dropped): its repr, its
    HTML view and an empty waterfall say it, so that such a run does not read as one that did nothing.
    """

    def __init__(self, spans: Iterable[ReadableSpan], note: str | None = None) -> None:
        self.spans: list[ReadableSpan] = [s for s in spans if s.end_time is not None]
        self.note = note

    def __len__(self) -> int:
        return len(self.spans)

    def __repr__(self) -> str:
        traces = len({s.context.trace_id for s in self.spans})
        note = f": {self.note}" if self.note else ""
        return f"<Trace {len(self.spans)} spans in {traces} trace(s){note}>"

    def _repr_html_(self) -> str:
        from workbench.tables import Readable

        shown = Readable(self.table()[["name", "offset_ms", "duration_ms", "status_code"]])
        return f"<p>{html.escape(repr(self))}</p>" + shown.to_html()

    def ordered(self) -> list[tuple[ReadableSpan, int]]:
        """Spans in tree order (each parent before its children, siblings by start), with depth."""
        by_id = {s.context.span_id: s for s in self.spans}
        children: dict[int | None, list[ReadableSpan]] = defaultdict(list)
        for span in self.spans:
            parent = span.parent.span_id if span.parent is not None else None
            children[parent if parent in by_id else None].append(span)
        out: list[tuple[ReadableSpan, int]] = []
        stack = [(s, 0) for s in sorted(children[None], key=lambda s: s.start_time or 0, reverse=True)]
        while stack:
            span, depth = stack.pop()
            out.append((span, depth))
            kids = sorted(children.get(span.context.span_id, ()), key=lambda s: s.start_time or 0, reverse=True)
            stack.extend((k, depth + 1) for k in kids)
        return out

    def table(self) -> pd.DataFrame:
        """One row per span, in tree order; column names follow Phoenix's spans DataFrame."""
        import pandas as pd

        ordered = self.ordered()
        trace_start: dict[int, int] = {}
        child_intervals: dict[int, list[tuple[int, int]]] = defaultdict(list)
        for span, _ in ordered:
            tid = span.context.trace_id
            trace_start[tid] = min(trace_start.get(tid, span.start_time or 0), span.start_time or 0)
            if span.parent is not None:
                child_intervals[span.parent.span_id].append((span.start_time or 0, span.end_time or 0))
        rows = []
        in_gc = gcpauses.Overlaps()
        for span, depth in ordered:
            start, end = span.start_time or 0, span.end_time or 0
            a = dict(span.attributes or {})
            clipped = [(max(lo, start), min(hi, end)) for lo, hi in child_intervals.get(span.context.span_id, [])]
            tokens_out = a.get(attr.USAGE_OUTPUT_TOKENS)
            decode_ms = a.get(attr.DECODE_MS)
            tpot = (
                float(decode_ms) / (int(tokens_out) - 1)  # type: ignore[arg-type]
                if decode_ms is not None and tokens_out is not None and int(tokens_out) > 1  # type: ignore[call-overload]
                else None
            )
            row: dict[str, Any] = {
                "name": span.name,
                "span_kind": a.get(attr.SPAN_KIND, span.kind.name),
                "parent_id": _hex(span.parent.span_id, 16) if span.parent is not None else None,
                "start_time": pd.Timestamp(start, unit="ns", tz="UTC"),
                "end_time": pd.Timestamp(end, unit="ns", tz="UTC"),
                "status_code": span.status.status_code.name,
                "status_message": span.status.description,
                "context.span_id": _hex(span.context.span_id, 16),
                "context.trace_id": _hex(span.context.trace_id, 32),
                "depth": depth,
                "hop": a.get(attr.HOP_NAME),
                "model": a.get(attr.MODEL_NAME),
                "offset_ms": _ms(start - trace_start[span.context.trace_id]),
                "duration_ms": _ms(end - start),
                "self_ms": _ms(end - start - _covered_ns([iv for iv in clipped if iv[1] > iv[0]])),
                # Every thread stops for a collection, so each open span pays it; one recorded in another process
                # (a model process's decode) paid that process's, which this one does not know.
                "gc_ms": None if a.get(attr.RECORDED_ELSEWHERE) else _ms(in_gc(start, end)),
                "queue_ms": a.get(attr.QUEUE_MS),
                "ttft_ms": a.get(attr.TTFT_MS),
                "decode_ms": decode_ms,
                "tpot_ms": tpot,
                "tokens_in": a.get(attr.USAGE_INPUT_TOKENS),
                "tokens_out": tokens_out,
                "batch_size": a.get(attr.BATCH_SIZE),
            }
            for key, value in a.items():
                row[f"attributes.{key}"] = list(value) if isinstance(value, tuple) else value
            rows.append(row)
        frame = pd.DataFrame(rows)
        if frame.empty:
            return pd.DataFrame(columns=COLUMNS)
        extra = sorted(c for c in frame.columns if c not in COLUMNS)
        frame = frame[COLUMNS + extra]
        numeric = ["queue_ms", "ttft_ms", "decode_ms", "tpot_ms"]
        frame[numeric] = frame[numeric].astype("float64")
        for col in ("tokens_in", "tokens_out", "batch_size"):
            frame[col] = frame[col].astype("Int64")
        return frame

    def compact(self, indent: str = "  ") -> pd.DataFrame:
        """The columns a latency reader wants first, span names indented by depth in the tree."""
        table = self.table()
        names = table["depth"].map(lambda d: indent * int(d)) + table["name"]
        # Padding to one width keeps the text repr left-aligned, so the indentation stays visible.
        names = names.str.ljust(int(names.str.len().max())) if len(names) else names
        return table.assign(name=names)[COMPACT_COLUMNS].reset_index(drop=True)

    def summary(self) -> pd.DataFrame:
        """Per-hop latency: count, errors, mean / p50 / p95 of duration, TTFT p50, output tokens/s.

        The ``(chain)`` row is over the chain runs' spans and the model calls made within them.
        """
        import pandas as pd

        table = self.table()
        columns = ["count", "errors", "mean_ms", "p50_ms", "p95_ms", "ttft_p50_ms", "tokens_out", "tokens_per_s"]
        if table.empty:
            return pd.DataFrame(columns=columns)
        hops = table[table["name"].str.startswith("hop ") & table["hop"].notna()]
        calls = table[table["name"].str.startswith(attr.TEXT_COMPLETION)]
        chains = table[table["name"].str.startswith("chain ")]
        rows = {}
        groups: list[tuple[str, pd.DataFrame, pd.DataFrame]] = [
            (str(hop), frame, calls[calls["hop"] == hop]) for hop, frame in hops.groupby("hop", sort=False)
        ]
        if not chains.empty:
            groups.append(("(chain)", chains, calls[_under(calls, table, set(chains["context.span_id"]))]))
        for label, frame, llm in groups:
            duration = frame["duration_ms"]
            tokens = int(llm["tokens_out"].fillna(0).sum())
            seconds = duration.sum() / 1e3
            rows[label] = {
                "count": len(frame),
                "errors": int((frame["status_code"] == "ERROR").sum()),
                "mean_ms": duration.mean(),
                "p50_ms": duration.quantile(0.5),
                "p95_ms": duration.quantile(0.95),
                "ttft_p50_ms": llm["ttft_ms"].quantile(0.5) if not llm.empty else float("nan"),
                "tokens_out": tokens,
                "tokens_per_s": tokens / seconds if tokens and seconds > 0 else float("nan"),
            }
        out = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
        out.index.name = "hop"
        return out

    def events(self) -> pd.DataFrame:
        """One row per span event, in time order: retries, fallbacks, breaker and health changes, faults, exceptions.

        Columns: ``event``, ``offset_ms`` (from its trace's start), ``span`` (the span's name),
        ``hop``, ``model``, ``context.span_id``, ``context.trace_id``, then ``attributes.*``.
        """
        import pandas as pd

        columns = ["event", "offset_ms", "span", "hop", "model", "context.span_id", "context.trace_id"]
        trace_start: dict[int, int] = {}
        for span in self.spans:
            tid = span.context.trace_id
            trace_start[tid] = min(trace_start.get(tid, span.start_time or 0), span.start_time or 0)
        rows = []
        for span in self.spans:
            a = span.attributes or {}
            for event in span.events:
                row: dict[str, Any] = {
                    "event": event.name,
                    "offset_ms": _ms(event.timestamp - trace_start[span.context.trace_id]),
                    "span": span.name,
                    "hop": a.get(attr.HOP_NAME),
                    "model": a.get(attr.MODEL_NAME),
                    "context.span_id": _hex(span.context.span_id, 16),
                    "context.trace_id": _hex(span.context.trace_id, 32),
                    "_at": event.timestamp,
                }
                for key, value in (event.attributes or {}).items():
                    row[f"attributes.{key}"] = list(value) if isinstance(value, tuple) else value
                rows.append(row)
        if not rows:
            return pd.DataFrame(columns=columns)
        frame = pd.DataFrame(rows).sort_values("_at", kind="stable").drop(columns="_at").reset_index(drop=True)
        return frame[columns + sorted(c for c in frame.columns if c not in columns)]

    def waterfall(self, max_rows: int = 40) -> Figure:
        """A matplotlib Figure: a bar per span, nested by depth, queue wait drawn hatched.

        A trace of more than ``max_rows`` spans (a map's, ``bench.traces()``) folds the spans that repeat, those of one
        name under the same path from the root, into one row of bars labelled with their count and median; the first
        ``max_rows`` rows are drawn, so the figure stays about ``max_rows`` bars tall. The title says what it folded
        and what it left out.
        """
        from matplotlib.patches import Patch

        from workbench.tracing.figure import DisplayFigure

        max_rows = plain(max_rows)  # an np.int64 from a sweep is a whole number too
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            # 0 drew a trace of spans as "empty trace", and -1 left out its last row while saying "the first rows"
            raise SettingsError(f"waterfall max_rows must be a whole number of at least 1, not {max_rows!r:.40}",
                                hint="e.g. trace.waterfall(max_rows=40)")
        everything = self.ordered()
        rows = _waterfall_rows(everything, fold=len(everything) > max_rows)
        shown = rows[:max_rows]
        fig = DisplayFigure(figsize=(10, max(2.0, 0.32 * len(shown) + 1.0)), layout="constrained")
        ax = fig.add_subplot()
        if not shown:
            ax.set_title("empty trace" if not self.note else textwrap.fill(f"empty trace: {self.note}", 100),
                         fontsize=8 if self.note else None, parse_math=False)
            return fig
        origin = min(s.start_time or 0 for _, spans in shown for s in spans)
        labels = []
        for y, (depth, spans) in enumerate(shown):
            kind = str((spans[0].attributes or {}).get(attr.SPAN_KIND, "CHAIN"))
            colour = _KIND_COLOURS.get(kind, "#999999")
            busy, queued, failed, widths = [], [], [], []
            for span in spans:
                start = _ms((span.start_time or 0) - origin)
                width = _ms((span.end_time or 0) - (span.start_time or 0))
                widths.append(width)
                queue = float((span.attributes or {}).get(attr.QUEUE_MS, 0.0) or 0.0)  # type: ignore[arg-type]
                if queue > 0:
                    queued.append((start, queue))
                    busy.append((start + queue, max(width - queue, 0.0)))
                else:
                    busy.append((start, width))
                if span.status.status_code.name == "ERROR":
                    failed.append((start, width))
            bar = (y - 0.35, 0.7)
            ax.broken_barh(busy, bar, facecolors=colour)
            if queued:
                ax.broken_barh(queued, bar, facecolors="white", edgecolors=colour, hatch="///")
            if failed:
                ax.broken_barh(failed, bar, facecolors="none", edgecolors="red", linewidth=1.5)
            end = max(start + width for (start, width) in busy + queued)
            if len(spans) == 1:
                ax.text(end, y, f" {widths[0]:.1f} ms", va="center", fontsize=7)
                labels.append("  " * depth + spans[0].name)
            else:
                # The median: of an even count, the mean of the middle two (the upper one alone read 30 ms for 25).
                ax.text(end, y, f" p50 {statistics.median(widths):.1f} ms", va="center", fontsize=7)
                labels.append("  " * depth + f"{spans[0].name} ×{len(spans):,}")
        # Names are the user's text: a '$' in a chain's name would start matplotlib's math (and an odd one fail the PNG).
        ax.set_yticks(range(len(labels)), labels, fontsize=8, family="monospace", parse_math=False)
        widest = max(len(label) for label in labels)
        ax.tick_params(axis="y", pad=widest * 5.2 + 4)
        for tick in ax.get_yticklabels():
            tick.set_horizontalalignment("left")
        ax.set_ylim(len(shown) - 0.5, -0.5)  # the first row on top
        ax.set_xlabel("ms since trace start")
        kinds = sorted({str((spans[0].attributes or {}).get(attr.SPAN_KIND, "CHAIN")) for _, spans in shown})
        handles = [Patch(color=_KIND_COLOURS.get(k, "#999999"), label=k) for k in kinds]
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch="///", label="queue wait"))
        fig.legend(handles=handles, loc="outside upper right", fontsize=7, ncols=len(handles))
        chains = sorted({spans[0].name for d, spans in shown if d == 0 and spans[0].name.startswith("chain ")})
        said = f"{len(everything):,} spans"
        if len(rows) < len(everything):
            said += f" in {len(rows):,} rows (×n: spans of one name under one path, folded)"
        if len(shown) < len(rows):
            said += f"; the first {len(shown):,} rows shown"
        ax.set_title(f"{', '.join(chains[:3]) or 'spans'}: {said}", loc="left", fontsize=9, parse_math=False)
        return fig


def _under(rows: pd.DataFrame, table: pd.DataFrame, ancestors: set[str]) -> pd.Series:
    """For each of ``rows``, whether a span of ``ancestors`` is above it in ``table``: the model calls of chain runs,
    not those made outside any chain (``bench.generate``, health probes) that ``bench.traces()`` holds beside them."""
    parent = dict(zip(table["context.span_id"], table["parent_id"]))

    def under(span_id: str) -> bool:
        above = parent.get(span_id)
        while above is not None:
            if above in ancestors:
                return True
            above = parent.get(above)
        return False

    import pandas as pd

    # A Series, not a list: indexing a frame with an empty list would select no columns, not no rows.
    return pd.Series([under(span_id) for span_id in rows["context.span_id"]], index=rows.index, dtype=bool)


def _waterfall_rows(ordered: list[tuple[ReadableSpan, int]], fold: bool) -> list[tuple[int, list[ReadableSpan]]]:
    """The waterfall's rows, each a depth and its spans: a span each, or, when ``fold``, one per path of names from
    the root, in tree order (a path first seen in a later run still follows its parent's row)."""
    if not fold:
        return [(depth, [span]) for span, depth in ordered]
    rows: dict[tuple[str, ...], tuple[int, list[ReadableSpan]]] = {}
    path_of: dict[int, tuple[str, ...]] = {}
    for span, depth in ordered:
        parent = path_of.get(span.parent.span_id, ()) if span.parent is not None else ()
        path = path_of[span.context.span_id] = (*parent, span.name)
        rows.setdefault(path, (depth, []))[1].append(span)
    first_seen = {path: i for i, path in enumerate(rows)}
    return [rows[path] for path in sorted(rows, key=lambda p: [first_seen[p[:i]] for i in range(1, len(p) + 1)])]
