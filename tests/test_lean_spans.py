"""The workbench's own spans (workbench/tracing/lean.py) against OpenTelemetry's SDK spans: the same calls, the
same exported span, through the same kind of processor."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, Status, StatusCode

from workbench.tracing.lean import LeanSpan, SpanProvider


class Odd:
    def __str__(self) -> str:
        return "odd"


def exercise(start: Any) -> None:
    """The same calls on a span of either kind: every write the workbench makes, and the SDK's edge cases."""
    root = start("root", Context(), {"a": "x", "n": 3, "f": 1.5, "b": True, "list": ["p", "q"], "odd": Odd(),
                                     "": "dropped", "none": None})
    child = start("child", trace.set_span_in_context(root), {"kept": 1})
    child.set_attribute("tuple", (1, 2))
    child.set_attributes({"dict": {"k": "v"}, "kept": 2, "nested": [1.5, 2.5], "mixed": ["p", Odd(), None, 1],
                          "empty": [], "flags": (True, False)})
    child.add_event("ev", {"x": 1, "y": ["a"]}, timestamp=123)
    child.record_exception(ValueError("boom"), {"extra": "yes"}, timestamp=456)
    child.set_status(StatusCode.UNSET)  # ignored
    child.set_status(Status(StatusCode.ERROR, "bad"))
    child.update_name("child renamed")
    child.add_link(root.get_span_context(), {"why": "test"})
    child.end(end_time=10**18)
    child.set_attribute("late", 1)  # after the end: ignored
    child.set_status(Status(StatusCode.OK))
    child.end()  # twice: harmless
    root.set_status(Status(StatusCode.OK))
    root.set_status(Status(StatusCode.ERROR, "too late"))  # OK is final
    root.end()


def shape(span: ReadableSpan) -> dict[str, Any]:
    events = [(e.name, dict(e.attributes or {}), e.timestamp) for e in span.events]
    events = [(n, {k: v for k, v in a.items() if k != "exception.stacktrace"}, t) for n, a, t in events]
    return {"name": span.name, "attributes": dict(span.attributes or {}), "events": events,
            "status": (span.status.status_code, span.status.description),
            "links": [dict(link.attributes or {}) for link in span.links],
            "parent": span.parent is not None, "end": span.end_time == 10**18 if span.name != "root" else None}


def test_a_lean_span_exports_what_an_sdk_span_would() -> None:
    sdk_out, lean_out = InMemorySpanExporter(), InMemorySpanExporter()
    sdk = TracerProvider(sampler=ALWAYS_ON)
    sdk.add_span_processor(SimpleSpanProcessor(sdk_out))
    tracer = sdk.get_tracer("t")
    lean = SpanProvider(sampler=ALWAYS_ON)
    lean.add_span_processor(SimpleSpanProcessor(lean_out))
    scope = InstrumentationScope("t")

    exercise(lambda name, context, attributes: tracer.start_span(name, context=context, attributes=attributes))
    exercise(lambda name, context, attributes: lean.start_span(name, context, scope, attributes))

    theirs, ours = [shape(s) for s in sdk_out.get_finished_spans()], [shape(s) for s in lean_out.get_finished_spans()]
    assert [s["name"] for s in ours] == ["child renamed", "root"]
    assert ours == theirs
    child, root = lean_out.get_finished_spans()
    assert isinstance(child, LeanSpan) and child.parent == root.get_span_context()
    assert child.context.trace_id == root.context.trace_id and child.context.span_id != root.context.span_id
    assert "ValueError: boom" in dict(child.events[1].attributes)["exception.stacktrace"]
    assert not child.is_recording() and child.resource is lean.resource


def test_a_lean_span_joins_a_remote_parent_and_tells_processors_it_started() -> None:
    started: list[tuple[str, Any]] = []

    class Starts(SpanProcessor):
        def on_start(self, span: Any, parent_context: Context | None = None) -> None:
            started.append((span.name, parent_context))  # the live span, as the SDK passes it

    provider = SpanProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(Starts())
    remote = trace.SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=trace.TraceFlags(1))
    context = trace.set_span_in_context(trace.NonRecordingSpan(remote))
    span = provider.start_span("served", context, InstrumentationScope("t"), links=[Link(remote)])
    assert started == [("served", context)]
    assert span.get_span_context().trace_id == 0x1234 and span.parent == remote
    assert [link.context for link in span.links] == [remote]
    # Started under a span itself (the workbench's own path, no Context built for quiet processors), a processor that
    # hears starts still gets a context holding the parent.
    child = provider.start_span("hop", span, InstrumentationScope("t"))
    assert started[-1][0] == "hop" and trace.get_current_span(started[-1][1]) is span
    assert child.parent == span.get_span_context() and child.context.trace_id == 0x1234
    child.add_link(remote)  # its first link, after a start with none
    assert [link.context for link in child.links] == [remote] and child.dropped_links == 0
    child.end()
    span.end()


def test_a_lean_span_keeps_the_limits_opentelemetry_reads_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "2")
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "3")
    attributes = {"a": "abcdef", "b": ["xyzw"], "c": 1}
    span = SpanProvider(sampler=ALWAYS_ON).start_span("s", Context(), InstrumentationScope("t"), attributes)
    span.set_attribute("b", "vwxyz")  # rewritten: now the newest
    span.set_attribute("d", 2.5)  # full: the oldest goes
    sdk = TracerProvider(sampler=ALWAYS_ON).get_tracer("t").start_span("s", attributes=attributes)
    sdk.set_attribute("b", "vwxyz")
    sdk.set_attribute("d", 2.5)
    assert dict(span.attributes) == dict(sdk.attributes) == {"b": "vwx", "d": 2.5}
    assert list(span.attributes) == list(sdk.attributes)


def test_a_lean_span_bounds_events_and_links_as_the_sdk_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SPAN_EVENT_COUNT_LIMIT", "2")
    monkeypatch.setenv("OTEL_SPAN_LINK_COUNT_LIMIT", "1")
    monkeypatch.setenv("OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT", "1")
    other = trace.SpanContext(0x1, 0x2, is_remote=False, trace_flags=trace.TraceFlags(1))
    lean = SpanProvider(sampler=ALWAYS_ON).start_span("s", Context(), InstrumentationScope("t"), links=[Link(other)])
    sdk = TracerProvider(sampler=ALWAYS_ON).get_tracer("t").start_span("s", links=[Link(other)])
    for span in (lean, sdk):
        for n in range(3):
            span.add_event(f"e{n}", {"a": n, "b": n})
        span.add_link(other)
        span.end()
    assert [(e.name, dict(e.attributes)) for e in lean.events] == [(e.name, dict(e.attributes)) for e in sdk.events]
    assert [e.name for e in lean.events] == ["e1", "e2"]
    assert (lean.dropped_events, lean.dropped_links) == (sdk.dropped_events, sdk.dropped_links) == (1, 1)


def test_one_request_span_ends_once_when_two_threads_race_to_end_it() -> None:
    ended: list[str] = []

    class Ends(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            ended.append(span.name)

    provider = SpanProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(Ends())
    for _ in range(50):
        span = provider.start_span("r", Context(), InstrumentationScope("t"))
        threads = [threading.Thread(target=span.end) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert ended == ["r"] * 50
