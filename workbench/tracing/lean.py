"""The workbench's own spans: OpenTelemetry's Span API over a plain dict, ended into the same span processors.

The SDK's span validates every attribute value on every write (type checks through the
``Sequence`` and ``Mapping`` ABCs, a lock, a bounded dict), and copies itself for the processors
when it ends. Measured on a 64-chain map with an instant model, spans were ~40 % of the
orchestration, and half of a span's cost was that validation. Nearly every value the workbench
writes is a plain ``str``, ``int``, ``float`` or ``bool``: :class:`LeanSpan` stores those as they
are (text with a lone surrogate escaped, see :func:`_encodable`) and sends anything else (lists,
mappings, other types) through OpenTelemetry's own cleaning, so what reaches an exporter is what the
SDK would have sent.

A :class:`LeanSpan` is a :class:`~opentelemetry.sdk.trace.ReadableSpan` as well, so the span
processors of its provider (the workbench's span index, an OTLP exporter, any processor a user
adds with ``provider.add_span_processor``) receive it as they receive SDK spans: ``on_start`` with
the live span, ``on_end`` with the ended one, which takes no more writes.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

from workbench.errors import clipped
from workbench.tracing.clock import now_ns

_PLAIN = frozenset({str, int, float, bool})
_LISTS = frozenset({list, tuple})
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)  # a Status is never changed in place: every new span may start with this one
_ids = RandomIdGenerator()


# The span processors whose on_start does nothing (the SDK's base class, its batch and simple processors): a span
# started with none but these builds no Context for them.
_QUIET_STARTS = frozenset({SpanProcessor.on_start, BatchSpanProcessor.on_start, SimpleSpanProcessor.on_start})


class SpanProvider(TracerProvider):
    """A TracerProvider that also lists its span processors, for the workbench's spans to end into."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.processors: tuple[SpanProcessor, ...] = ()
        self._starters: tuple[SpanProcessor, ...] = ()  # those that hear a span start (see _QUIET_STARTS)
        super().__init__(*args, **kwargs)
        self.limits = SpanLimits()  # OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT and friends, read from the environment once

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self.processors = (*self.processors, span_processor)  # a new tuple: a span ending now reads the old one
        if type(span_processor).on_start not in _QUIET_STARTS:
            self._starters = (*self._starters, span_processor)

    def start_span(
        self,
        name: str,
        parent: trace.Span | Context,
        scope: InstrumentationScope,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] = (),
        start_time: int | None = None,
    ) -> LeanSpan:
        """Start a span under ``parent``, a span or the span a context holds (a new trace if none), always sampled, as
        ALWAYS_ON does."""
        context = None if isinstance(parent, trace.Span) else parent
        parent_span = parent if context is None else trace.get_current_span(context)
        parent_context: SpanContext | None = parent_span.get_span_context()
        if parent_context.is_valid:  # type: ignore[union-attr]
            span_context = SpanContext(parent_context.trace_id, _ids.generate_span_id(),  # type: ignore[union-attr]
                                       is_remote=False, trace_flags=_SAMPLED,
                                       trace_state=parent_context.trace_state)  # type: ignore[union-attr]
        else:
            parent_context = None
            span_context = SpanContext(_ids.generate_trace_id(), _ids.generate_span_id(), is_remote=False,
                                       trace_flags=_SAMPLED)
        span = LeanSpan(name, span_context, parent_context, self, scope, attributes, links, start_time)
        if self._starters:
            if context is None:
                context = trace.set_span_in_context(parent_span)  # type: ignore[arg-type]
            for processor in self._starters:
                processor.on_start(span, parent_context=context)
        return span


class LeanSpan(trace.Span, ReadableSpan):
    """A recording span whose plain attribute values are stored as written (see the module's docstring)."""

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        provider: SpanProvider,
        scope: InstrumentationScope,
        attributes: Mapping[str, Any] | None,
        links: Sequence[Link],
        start_time: int | None,
    ) -> None:
        limits = provider.limits
        self._limits = limits
        self._max_attributes = limits.max_span_attributes
        self._max_length = limits.max_span_attribute_length
        # Events and links in the SDK's own bounded lists: the oldest go when full, and exporters see the count.
        # Events and links: an empty tuple until the first one (most spans have neither), then a BoundedList.
        ReadableSpan.__init__(
            self, name, context=context, parent=parent, resource=provider.resource, attributes={},
            events=(),
            links=BoundedList.from_seq(limits.max_links, [_bounded_link(link, limits) for link in links
                                                         if link.context.is_valid]) if links else (),
            kind=SpanKind.INTERNAL,
            status=_UNSET, start_time=start_time if start_time is not None else now_ns(),
            instrumentation_scope=scope,
        )
        self._processors = provider.processors
        self._ending = threading.Lock()
        if attributes:
            self._write(attributes)

    # -- writes -----------------------------------------------------------------------------

    def _write(self, attributes: Mapping[str, Any]) -> None:
        stored: dict[str, Any] = self._attributes  # type: ignore[assignment]  # ours: a plain dict
        limit, length = self._max_attributes, self._max_length
        for key, value in attributes.items():
            if type(key) is not str or not key:
                continue  # as the SDK does: an attribute needs a non-empty string key
            if type(value) not in _PLAIN or (length is not None and type(value) is str and len(value) > length):
                if type(value) in _LISTS and length is None and all(type(item) in _PLAIN for item in value):
                    value = tuple(value)  # what the SDK's cleaning makes of a list of plain values, at a seventh the cost
                else:
                    value = _cleaned(value, length)  # None stays None, as the SDK keeps it
                if type(value) is tuple and value and type(value[0]) is str:
                    value = tuple(_encodable(item) if type(item) is str else item for item in value)
            if type(value) is str and not value.isascii():
                value = _encodable(value)
            if key in stored:
                del stored[key]  # as the SDK: a rewritten key counts as the newest
            elif limit is not None and len(stored) >= limit:
                del stored[next(iter(stored))]  # full: the oldest goes, as the SDK does it
            stored[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        if self._end_time is None:
            self._write(attributes)

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self._end_time is None:
            self._write({key: value})

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self._end_time is None:
            if attributes:  # an exception's message may name an undecodable file
                attributes = {key: _encodable(value) if type(value) is str else value
                              for key, value in attributes.items()}
            cleaned = BoundedAttributes(self._limits.max_event_attributes, attributes,
                                        max_value_len=self._limits.max_attribute_length)
            if type(self._events) is tuple:
                self._events = BoundedList(self._limits.max_events)
            self._events.append(Event(name, cleaned, timestamp if timestamp is not None else now_ns()))  # type: ignore[attr-defined]

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is None and context.is_valid:
            if type(self._links) is tuple:
                self._links = BoundedList(self._limits.max_links)
            self._links.append(_bounded_link(Link(context, attributes), self._limits))  # type: ignore[attr-defined]

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK: an OK status is final, UNSET is ignored, and nothing changes once the span has ended.
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if not status.description:  # a Status never changes: one with nothing to clean is kept as it is
                if status.status_code is not StatusCode.UNSET:
                    self._status = status
                return
            status, description = status.status_code, status.description
        if status is not StatusCode.UNSET:
            self._status = Status(status, _encodable(description) if description else description)

    def record_exception(
        self, exception: BaseException, attributes: types.Attributes = None, timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module, qualname = type(exception).__module__, type(exception).__qualname__
        # Each part cut, as the status is: a message may hold a hop's whole input, and the stack trace repeats it.
        event: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": clipped(str(exception)),
            "exception.stacktrace": "".join(clipped(part) for part in traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    # -- life -------------------------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]  # always set

    def is_recording(self) -> bool:
        return self._end_time is None

    def end(self, end_time: int | None = None) -> None:
        with self._ending:  # a worker and a timeout may race to end a request's span: the first one does
            if self._end_time is not None:
                return
            self._end_time = end_time if end_time is not None else now_ns()
        for processor in self._processors:
            processor.on_end(self)

    def __repr__(self) -> str:
        return f"LeanSpan(name={self._name!r}, context={self._context})"


def _encodable(text: str) -> str:
    """``text`` with any lone surrogate written out as JSON escapes it (``\\udcff``): Python keeps an undecodable byte
    of a file name or a subprocess's output that way (``surrogateescape``), but no exporter can encode it in UTF-8,
    nor can pandas' strings hold it, so one such value would break every table of its trace."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="backslashreplace").decode()
    return text


def _cleaned(value: Any, length: int | None) -> Any:
    """``value`` as OpenTelemetry's own cleaning leaves it: sequences as tuples, other types as their str (None where
    a type has none of its own)."""
    return BoundedAttributes(attributes={"value": value}, max_value_len=length).get("value")


def _bounded_link(link: Link, limits: SpanLimits) -> Link:
    """``link`` with its attributes bounded as the SDK bounds a link's."""
    return Link(link.context, BoundedAttributes(limits.max_link_attributes, link.attributes,
                                                max_value_len=limits.max_attribute_length))
