"""The workbench's own TracerProvider, with an index of finished spans by trace."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, Status, StatusCode

from workbench.errors import WorkbenchError
from workbench.tracing import attributes as attr
from workbench.tracing import gcpauses


class SpanIndex(SpanProcessor):
    """Keeps finished spans grouped by trace id, oldest trace first, up to ``max_traces``."""

    def __init__(self, max_traces: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._traces: OrderedDict[int, list[ReadableSpan]] = OrderedDict()
        self.max_traces = max_traces

    def on_end(self, span: ReadableSpan) -> None:
        trace_id = span.context.trace_id
        with self._lock:
            spans = self._traces.get(trace_id)
            if spans is None:
                spans = self._traces[trace_id] = []
                while len(self._traces) > self.max_traces:
                    self._traces.popitem(last=False)
            spans.append(span)

    def spans(self, trace_id: int | None = None) -> list[ReadableSpan]:
        with self._lock:
            if trace_id is not None:
                return list(self._traces.get(trace_id, ()))
            return [span for spans in self._traces.values() for span in spans]

    def clear(self) -> None:
        with self._lock:
            self._traces.clear()

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class Tracing:
    """A TracerProvider owned by one workbench (never the global one), plus its span index.

    ``otlp_endpoint`` sends the same spans to an OTLP/HTTP collector (Phoenix, Jaeger, ...);
    it needs the ``otlp`` extra.
    """

    def __init__(self, otlp_endpoint: str | None = None, service_name: str = "autoglm-workbench") -> None:
        from workbench._version import __version__

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.index = SpanIndex()
        self.provider.add_span_processor(self.index)
        if otlp_endpoint:
            self.provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(otlp_endpoint)))
        self.tracer = self.provider.get_tracer("workbench", __version__, schema_url=attr.SCHEMA_URL)
        gcpauses.install()  # so a trace can say how much of each span the garbage collector took

    def start_span(
        self,
        name: str,
        parent: Span | Context | None = None,
        attributes: dict[str, object] | None = None,
        links: Sequence[trace.Link] = (),
        start_time: int | None = None,
    ) -> Span:
        """Start a span under ``parent`` (a span or a context); None starts a new trace."""
        if isinstance(parent, Span):
            context: Context | None = trace.set_span_in_context(parent)
        elif parent is None:
            context = Context()  # a fresh root, whatever is ambient in this thread
        else:
            context = parent
        return self.tracer.start_span(
            name, context=context, attributes=attributes, links=links, start_time=start_time  # type: ignore[arg-type]
        )

    @contextmanager
    def span(
        self, name: str, parent: Span | Context | None = None, attributes: dict[str, object] | None = None
    ) -> Iterator[Span]:
        """A span that records an escaping exception as its error status, then re-raises."""
        span = self.start_span(name, parent, attributes)
        try:
            yield span
        except BaseException as exc:
            mark_error(span, exc)
            raise
        finally:
            span.end()

    def shutdown(self) -> None:
        self.provider.shutdown()


def mark_error(span: Span, exc: BaseException) -> None:
    """Record ``exc`` on ``span`` and set its status to ERROR."""
    span.record_exception(exc)
    message = exc.message if isinstance(exc, WorkbenchError) else f"{type(exc).__name__}: {exc}"
    span.set_status(Status(StatusCode.ERROR, message))


def _otlp_exporter(endpoint: str):  # type: ignore[no-untyped-def]
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise WorkbenchError(
            "OTLP export needs the exporter package",
            hint="pip install 'autoglm-workbench[otlp]'",
        ) from exc
    if not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint)
