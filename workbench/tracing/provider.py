"""The workbench's own TracerProvider, with an index of finished spans by trace."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Span, Status, StatusCode

from workbench.errors import SettingsError, WorkbenchError, describe
from workbench.tracing import attributes as attr
from workbench.tracing import gcpauses
from workbench.tracing.lean import SpanProvider

log = logging.getLogger(__name__)

# The Phoenix project of the engine's own traces is the run project's name with this suffix.
ENGINE_PROJECT_SUFFIX = "-engine"

# How many traces of runs a span index keeps unless told otherwise, and the variable that tells it.
MAX_TRACES = 10_000
MAX_TRACES_VARIABLE = "AUTOGLM_MAX_TRACES"

# How many dropped traces' ids the index recalls to say why a run has no spans (1.4 MiB of ids, measured); of a run
# dropped before those, the count of every trace dropped speaks.
DROPPED_RECALLED = 10_000


def _max_traces_from_environment() -> int:
    text = os.environ.get(MAX_TRACES_VARIABLE, "").strip()
    if not text:
        return MAX_TRACES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise SettingsError(
            f"{MAX_TRACES_VARIABLE}={text!r:.40} is not a whole number of at least 1",
            hint=f"say how many runs' traces the workbench keeps, e.g. {MAX_TRACES_VARIABLE}=50000 "
                 f"(the default is {MAX_TRACES:,}), or unset it",
        )
    return value


class SpanIndex(SpanProcessor):
    """Keeps finished spans grouped by trace id, oldest trace first: the newest ``max_traces`` traces of runs, and
    as many of the engine's own (loads, batches, probes) through :attr:`engine`, so the engine's traces, often
    several per run, never push a run's trace out. ``max_traces`` is 10,000 unless ``$AUTOGLM_MAX_TRACES`` says
    otherwise, and may be set on a running index.

    A trace keeps its newest ``max_spans_per_trace`` spans: a caller that sends one ``traceparent`` (or envelope
    ``trace_id``) with every request puts every run in one trace, which would otherwise grow for as long as the
    server runs. One run's trace is far smaller.

    The ids of the runs' traces it dropped are recalled (the latest :data:`DROPPED_RECALLED`), with a count of all
    of them, so that a run whose spans went says so (:meth:`dropped`) rather than look like a run that did nothing.
    """

    def __init__(self, max_traces: int | None = None, max_spans_per_trace: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._traces: dict[int, deque[ReadableSpan]] = {}  # every trace kept, oldest first
        # The trace ids of runs, then of the engine, oldest first: each is bounded apart.
        self._order: tuple[OrderedDict[int, None], ...] = (OrderedDict(), OrderedDict())
        self._dropped: OrderedDict[int, None] = OrderedDict()  # the runs' traces dropped last, oldest first
        self.dropped_traces = 0  # every run's trace dropped so far (the engine's are not counted)
        self.max_traces = max_traces if max_traces is not None else _max_traces_from_environment()
        self.max_spans_per_trace = max_spans_per_trace
        self.exported_to: str | None = None  # the OTLP endpoint that has every span, if any (set by Tracing)
        self.engine = _EngineSpans(self)

    def on_end(self, span: ReadableSpan) -> None:
        self.add(span, engine=False)

    def add(self, span: ReadableSpan, *, engine: bool) -> None:
        trace_id = span.context.trace_id
        with self._lock:
            spans = self._traces.get(trace_id)
            if spans is None:
                spans = self._traces[trace_id] = deque(maxlen=self.max_spans_per_trace)
                order = self._order[engine]
                order[trace_id] = None
                while len(order) > self.max_traces:
                    gone = order.popitem(last=False)[0]
                    del self._traces[gone]
                    if not engine:
                        self.dropped_traces += 1
                        self._dropped[gone] = None
                        if len(self._dropped) > DROPPED_RECALLED:
                            self._dropped.popitem(last=False)
            spans.append(span)

    def spans(self, trace_id: int | None = None) -> list[ReadableSpan]:
        with self._lock:
            if trace_id is not None:
                return list(self._traces.get(trace_id, ()))
            return [span for spans in self._traces.values() for span in spans]

    def dropped(self, trace_id: int) -> bool:
        """Whether spans of trace ``trace_id`` were dropped to keep the index within its bounds: the whole trace, or
        (a trace many runs share) its oldest spans. A trace the index has dropped so long ago that it no longer
        recalls its id counts as dropped when no trace of a run is kept by that id and runs' traces were dropped."""
        with self._lock:
            kept = self._traces.get(trace_id)
            if kept is not None:
                return len(kept) == kept.maxlen  # full: each new span pushes the oldest out
            return trace_id in self._dropped or self.dropped_traces > len(self._dropped)

    def dropped_note(self, runs: int | None = None) -> str:
        """What to tell a reader of one run (``runs`` None), or of ``runs`` runs among others, whose spans
        :meth:`dropped`: why they went, and how to keep them."""
        which = "this run's spans were" if runs is None else f"the spans of {runs:,} run{'s' if runs != 1 else ''} were"
        note = (f"{which} dropped from the workbench's span index, which keeps the traces of the latest "
                f"{self.max_traces:,} runs and a trace's newest {self.max_spans_per_trace:,} spans "
                f"({self.dropped_traces:,} runs' traces dropped so far). ")
        if self.exported_to:
            return note + f"They were sent to the OTLP endpoint {self.exported_to} too: look for them there."
        return note + ("To keep more, raise bench.tracing.index.max_traces (or set AUTOGLM_MAX_TRACES before the "
                       "workbench starts), or send every span to Phoenix or Jaeger: wb.Workbench(otlp_endpoint=...).")

    def clear(self) -> None:
        with self._lock:
            self._traces.clear()
            self._dropped.clear()
            self.dropped_traces = 0
            for order in self._order:
                order.clear()

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class _EngineSpans(SpanProcessor):
    """The span index as the engine's provider feeds it: the engine's traces, counted apart from the runs'."""

    def __init__(self, index: SpanIndex) -> None:
        self._index = index

    def on_end(self, span: ReadableSpan) -> None:
        self._index.add(span, engine=True)


class Tracing:
    """Two TracerProviders owned by one workbench (never the global one), plus their span index.

    ``otlp_endpoint`` sends the same spans to an OTLP/HTTP collector (Phoenix, Jaeger, ...);
    it needs the ``otlp`` extra. Runs go to the Phoenix project ``project_name``; what the
    engine does outside any run (loads, batches, health probes) to ``{project_name}-engine``,
    so the run project lists runs only. Both land in the one local index.
    """

    def __init__(
        self,
        otlp_endpoint: str | None = None,
        service_name: str = "autoglm-workbench",
        project_name: str = "autoglm-workbench",
        close_timeout_s: float = 2.0,
    ) -> None:
        from workbench._version import __version__

        self.project_name = project_name
        self.index = SpanIndex()
        # One exporter for both projects: the endpoint's trouble is said once, and a span's resource names its project.
        self.export = OTLPExport(otlp_endpoint, close_timeout_s) if otlp_endpoint else None
        self.index.exported_to = self.export.endpoint if self.export is not None else None
        self.provider = self._provider(service_name, project_name, self.index)
        self.engine_provider = self._provider(service_name, f"{project_name}{ENGINE_PROJECT_SUFFIX}", self.index.engine)
        self.tracer = self.provider.get_tracer("workbench", __version__, schema_url=attr.SCHEMA_URL)
        self._scope = InstrumentationScope("workbench", __version__, attr.SCHEMA_URL)
        gcpauses.install()  # so a trace can say how much of each span the garbage collector took

    def _provider(self, service_name: str, project_name: str, index: SpanProcessor) -> SpanProvider:
        # OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) names the service, as for any OpenTelemetry
        # SDK: the workbench's name is only the default, which an explicit service.name would override.
        named = OTELResourceDetector().detect().attributes.get(SERVICE_NAME)
        resource = Resource.create({SERVICE_NAME: named or service_name, attr.PROJECT_NAME: project_name})
        # Every span is kept, so the default parent-based sampler's per-span lookups buy nothing.
        provider = SpanProvider(resource=resource, sampler=ALWAYS_ON)
        provider.add_span_processor(index)
        if self.export is not None:
            provider.add_span_processor(_CountedBatches(self.export))
        return provider

    def start_span(
        self,
        name: str,
        parent: Span | Context | None = None,
        attributes: dict[str, object] | None = None,
        links: Sequence[trace.Link] = (),
        start_time: int | None = None,
        *,
        run: bool = False,
    ) -> Span:
        """Start a span under ``parent`` (a span or a context); None starts a new trace.

        A new trace is the engine's unless ``run`` (a chain run's root); a child joins its parent's.
        """
        if parent is None:
            provider = self.provider if run else self.engine_provider
            under: Span | Context = Context()  # a fresh root, whatever is ambient in this thread
        else:
            # A remote parent (no resource of ours) came with a request: that is a run's trace.
            under = parent
            held = parent if isinstance(parent, Span) else trace.get_current_span(parent)
            resource = getattr(held, "resource", None)
            provider = self.engine_provider if resource is self.engine_provider.resource else self.provider
        # The workbench's own span type (see lean.py): the same API and processors, a cheaper attribute path.
        return provider.start_span(name, under, self._scope, attributes, links, start_time)

    @contextmanager
    def span(
        self, name: str, parent: Span | Context | None = None, attributes: dict[str, object] | None = None
    ) -> Iterator[Span]:
        """A span whose status is OK, or ERROR with an escaping exception recorded (then re-raised)."""
        span = self.start_span(name, parent, attributes)
        try:
            yield span
        except BaseException as exc:
            mark_error(span, exc)
            raise
        else:
            if span.status.status_code is StatusCode.UNSET:  # type: ignore[attr-defined]  # an SDK span
                span.set_status(Status(StatusCode.OK))  # unless the body recorded an error it did not raise
        finally:
            span.end()

    def shutdown(self) -> None:
        if self.export is None:
            self.provider.shutdown()
            self.engine_provider.shutdown()
            return
        self.export.closing()  # else each project's last flush would retry a dead endpoint for seconds
        # An endpoint that takes the connection and never answers holds the last flush for the exporter's timeout
        # (10 s by default): the close waits close_timeout_s for it, and leaves the flush to end on its own thread.
        flushing = threading.Thread(target=self._shut_providers, name="workbench-otlp-close", daemon=True)
        flushing.start()
        flushing.join(self.export.close_timeout_s)
        self.export.close(answered=not flushing.is_alive())

    def _shut_providers(self) -> None:
        self.provider.shutdown()
        self.engine_provider.shutdown()


def mark_error(span: Span, exc: BaseException) -> None:
    """Record ``exc`` on ``span`` and set its status to ERROR."""
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, describe(exc)))  # cut: a message may hold a hop's whole input


class _CountedBatches(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans it is given: its queue, once full (a burst, a slow endpoint),
    drops spans with no count of its own, so only this says at the close how many never reached the endpoint."""

    def __init__(self, export: OTLPExport) -> None:
        super().__init__(export)
        self._export = export

    def on_end(self, span: ReadableSpan) -> None:
        self._export.offered()
        super().on_end(span)


class _HeldBack(logging.Filter):
    """Holds back the records the OTLP exporter logs inside :meth:`OTLPExport.export` (one per retry, per batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        export: OTLPExport | None = getattr(self.local, "export", None)
        if export is None:
            return True  # someone else's exporter: theirs to hear
        export.hold(record)
        return False


_held_back = _HeldBack()


class OTLPExport(SpanExporter):
    """Spans to an OTLP/HTTP endpoint, saying once, in the workbench's words, when it stops taking them and when it
    takes them again: the exporter's own line per retry of every batch would fill a notebook's output."""

    def __init__(self, endpoint: str, close_timeout_s: float = 2.0) -> None:
        if type(close_timeout_s) not in (int, float) or not close_timeout_s > 0:  # NaN too
            raise SettingsError(
                f"otlp_close_timeout_s {close_timeout_s!r} is not a positive number of seconds",
                hint="give how long bench.close() may wait for the endpoint to take the last spans, e.g. "
                     "otlp_close_timeout_s=2.0",
            )
        url = urlsplit(endpoint) if isinstance(endpoint, str) else None
        if url is None or url.scheme not in ("http", "https") or not url.netloc:
            raise SettingsError(
                f"otlp_endpoint {endpoint!r} is not an http:// or https:// URL, so no span could reach it",
                hint="give the collector's base URL, e.g. otlp_endpoint=\"http://127.0.0.1:6006\" for Phoenix or "
                     "\"http://127.0.0.1:4318\" for an OTLP/HTTP collector (the workbench adds /v1/traces)",
            )
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise WorkbenchError(
                "OTLP export needs the exporter package",
                hint="pip install 'autoglm-workbench[otlp]'",
            ) from exc
        if not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        self.endpoint = endpoint
        self.close_timeout_s = float(close_timeout_s)
        self._exporter = OTLPSpanExporter(endpoint=endpoint)
        exporter_log = logging.getLogger(OTLPSpanExporter.__module__)  # the logger it hands its HTTP client
        if _held_back not in exporter_log.filters:
            exporter_log.addFilter(_held_back)
        self._lock = threading.Lock()  # the two projects' batch processors share this exporter
        self.failing = False
        self.unsent = 0  # spans in the batches tried since the endpoint last took some (its full queue drops more)
        self.spans_offered = 0  # every span given to the batch processors, whose full queues drop some unsent
        self.spans_tried = 0  # every span in a batch tried (the rest are queued, or were dropped from a full queue)
        self.spans_taken = 0  # every span in a batch the endpoint took
        self._counting = threading.Lock()  # spans end in many threads
        self._closing = False
        self._closed = False  # the close has said what the endpoint did not take: an export ending later says nothing
        self._stopped = False
        self._stopping = threading.Lock()
        self._held: list[logging.LogRecord] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            self.spans_tried += len(spans)
            if self._closing and self.failing:  # the last flush of a close: no retries against a dead endpoint
                self.unsent += len(spans)
                return SpanExportResult.FAILURE
            held = self._held = []
            self.unsent += len(spans)  # until the endpoint takes them: a close that gives up on this export counts them
            _held_back.local.export = self
            try:
                result = self._exporter.export(spans)
            finally:
                _held_back.local.export = None
                self._held = []
            if self._closed:
                return result  # the close gave up on this export and has said so
            if result is SpanExportResult.SUCCESS:
                self.spans_taken += len(spans)
                if self.failing:
                    log.warning("the OTLP endpoint %s takes spans again (it did not take %d)",
                                self.endpoint, self.unsent - len(spans))
                self.failing, self.unsent = False, 0
                return result
            if not self.failing and not self._closing:  # at the close, the close says it
                said = " ".join(held[0].getMessage().split())[:300] if held else "nothing"
                log.warning(
                    "spans are not reaching the OTLP endpoint %s; the workbench still keeps them (run.trace, "
                    "bench.traces()) and says so again only when the endpoint takes spans again. The exporter said: %s",
                    self.endpoint, said,
                )
            self.failing = True
            return result

    def offered(self) -> None:
        """A span was given to a batch processor, to send here."""
        with self._counting:
            self.spans_offered += 1

    def hold(self, record: logging.LogRecord) -> None:
        """A record the exporter logged inside :meth:`export`: kept to quote, and no retry once closing."""
        self._held.append(record)
        if self._closing:
            self._stop()  # wakes the wait before its retry: the export fails at once

    def closing(self) -> None:
        """The workbench is closing: the last flush gets one try, and none if the endpoint is not taking spans."""
        self._closing = True
        if self.failing or self._held:
            self._stop()  # an export waiting to retry fails at once

    def shutdown(self) -> None:
        """Each batch processor's own call, made after its last flush: :meth:`close` ends the export, after both."""

    def close(self, answered: bool = True) -> None:
        """After both projects' last flush, or ``close_timeout_s`` into it if the endpoint has not ``answered``: stop
        the exporter, and say what the endpoint never got."""
        self._closed = True
        self._stop()
        with self._counting:
            offered = self.spans_offered
        missed, dropped = offered - self.spans_taken, offered - self.spans_tried
        if not answered:
            log.warning("the OTLP endpoint %s did not answer within %.1f s of the close (otlp_close_timeout_s), so the "
                        "spans it had not taken were not delivered: %d in the batches tried, and those still queued "
                        "(%d of the %d spans never reached it); bench.traces() had them all", self.endpoint,
                        self.close_timeout_s, self.unsent, missed, offered)
        elif self.failing:
            log.warning("the OTLP endpoint %s did not take spans up to the close: %d in the batches tried, and any the "
                        "exporter's full queue dropped (%d of the %d spans never reached it); bench.traces() had them "
                        "all", self.endpoint, self.unsent, missed, offered)
        elif dropped:  # those of batches it refused before it took spans again were said then
            log.warning("%d of the %d spans never reached the OTLP endpoint %s: it took them more slowly than the "
                        "workbench made them, and the exporter's full queue dropped them (OTEL_BSP_MAX_QUEUE_SIZE "
                        "says how many it holds, 2048 by default); bench.traces() had them", dropped, offered,
                        self.endpoint)

    def _stop(self) -> None:
        with self._stopping:  # a close and the worker's retry may both stop it: the exporter warns at a second stop
            if not self._stopped:
                self._stopped = True
                self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True
