"""A finished (or failed) chain run: its outputs, and the trace it left."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workbench.tracing import Trace
from workbench.tracing import attributes as attr
from workbench.tracing.openinference import preview
from workbench.tracing.trace import run_spans

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

    from workbench.chains.live import ConfigVersion
    from workbench.errors import HopFailed
    from workbench.tracing.provider import SpanIndex


@dataclass
class Run:
    """One execution of a chain: ``output``, per-hop ``outputs``, and ``trace``."""

    id: str
    chain: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    output: Any
    trace_id: int
    started_at: float
    duration_ms: float
    session: str | None = None
    error: HopFailed | None = None
    # The chain's configuration this run used (chains/live.py): its version number and content hash.
    config_version: ConfigVersion | None = None
    _index: SpanIndex | None = field(default=None, repr=False)
    # What answered its model hops, noted by the workbench as the run finished (Workbench.models_digest): a map that
    # resumes it, from a checkpoint file or resume=, reuses it only while the same models would answer.
    _models: str | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        return "ok" if self.error is None else "error"

    @property
    def trace(self) -> Trace:
        """The run's spans: chain, hops, model calls (read from the workbench's span index); none, with a note that
        says why, if the index dropped them to stay within its bounds."""
        spans = self._spans()
        return Trace(spans, note=None if spans else self.dropped_note())

    def dropped_note(self, runs: int | None = None) -> str | None:
        """Why this run has no spans, where the span index dropped them to stay within its bounds (and how to keep
        more); None where it kept them. ``runs``: said of that many runs (a batch's view)."""
        index = self._index
        if index is None or self._spans() or not index.dropped(self.trace_id):
            return None
        return index.dropped_note(runs)

    def _spans(self) -> list[ReadableSpan]:
        # Its own only: a caller's traceparent may have put other callers' runs in the same trace.
        return run_spans(self._index.spans(self.trace_id), self.id) if self._index is not None else []

    @property
    def served_by(self) -> dict[str, str]:
        """Which path served each finished hop: ``model:NAME`` or ``hop:NAME`` (read from the hop spans; empty if the
        span index dropped them, as :attr:`trace` then says)."""
        return {hop: str(a[attr.SERVED_BY]) for hop, a in self._hop_attributes()}

    @property
    def fallbacks(self) -> dict[str, str]:
        """The hops that a fallback served (a degraded answer), and which fallback."""
        return {hop: str(a[attr.SERVED_BY]) for hop, a in self._hop_attributes() if a.get(attr.FALLBACK)}

    def _hop_attributes(self) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for span in self._spans():
            a = dict(span.attributes or {})
            hop = a.get(attr.HOP_NAME)
            # A fallback hop's own span is named after it, not after the hop it served, so it is left out.
            if span.name == f"hop {hop}" and hop in self.outputs and attr.SERVED_BY in a:
                found.append((str(hop), a))
        return found

    def __repr__(self) -> str:
        detail = repr(self.output) if self.ok else f"failed at hop {self.error.hop!r}"  # type: ignore[union-attr]
        if len(detail) > 80:
            detail = detail[:77] + "..."
        return f"<Run {self.id} of {self.chain!r} in {self.duration_ms:.1f} ms: {detail}>"

    def _repr_html_(self) -> str:
        rows = "".join(
            # Cut as the trace cuts them: a hop that returns a whole document would put all of it in the page.
            f"<tr><td><b>{html.escape(str(k))}</b></td><td><pre style='margin:0'>{html.escape(preview(str(v)))}</pre>"
            "</td></tr>"
            for k, v in self.outputs.items()
        )
        head = f"Run <code>{self.id}</code> of <b>{html.escape(self.chain)}</b>, {self.duration_ms:.1f} ms"
        if not self.ok:
            head += f" &mdash; <span style='color:#c00'>{html.escape(str(self.error))}</span>"
        return f"<div><p>{head}</p><table>{rows}</table></div>"


class RunInterrupted(KeyboardInterrupt):
    """``chain.run`` was interrupted (Ctrl-C, the notebook's stop button); ``run`` holds the partial run.

    It is a KeyboardInterrupt, so it stops a script or a cell as one would; what the run had done is not lost:
    ``run`` keeps the outputs of the hops that finished and the trace (its ``error`` says where it stopped), and it
    is kept in ``bench.runs()`` too.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        done = ", ".join(repr(name) for name in run.outputs) or "none"
        super().__init__(f"chain {run.chain!r} interrupted; the hops that finished ({done}) are kept on this error's "
                         f".run (run {run.id}, in bench.runs() too)")
