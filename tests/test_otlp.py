"""OTLP export: the same spans reach a real OTLP/HTTP endpoint on loopback."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import workbench as wb

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")


class _Collector(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP protobuf posts and keeps the decoded spans; while ``busy``, answers 503 to every post."""

    received: list[tuple[str, object]] = []
    resources: list[object] = []  # the resource of each batch's spans
    busy: dict[str, str] | None = None  # the 503's headers
    refused = 0
    posted = threading.Event()  # a post came
    held: threading.Event | None = None  # while given and not set, a post waits for it (a slow endpoint)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posted.set()
        if (held := type(self).held) is not None:
            held.wait(30)
        if (busy := type(self).busy) is not None:
            type(self).refused += 1
            self.send_response(503)
            for header, value in busy.items():
                self.send_header(header, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        request = trace_service.ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            type(self).resources.append(resource_spans.resource)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    type(self).received.append((self.path, span))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(trace_service.ExportTraceServiceResponse().SerializeToString())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    _Collector.received, _Collector.resources, _Collector.busy, _Collector.refused = [], [], None, 0
    _Collector.posted, _Collector.held = threading.Event(), None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_spans_of_a_run_reach_an_otlp_endpoint(collector: str, tiny_path: Path) -> None:
    bench = wb.Workbench(otlp_endpoint=collector)
    bench.load("tiny", tiny_path, device="cpu")
    run = bench.chain(
        {"name": "one", "hops": [{"name": "say", "model": "tiny", "prompt": "Question: {{ q }}", "max_new_tokens": 4}]}
    ).run(q="hi")
    bench.close()  # shutting the provider down flushes the batch processor

    paths = {path for path, _ in _Collector.received}
    assert paths == {"/v1/traces"}
    names = {span.name for _, span in _Collector.received if span.trace_id == run.trace_id.to_bytes(16, "big")}
    assert names == {"chain one", "hop say", "text_completion tiny"}
    llm = next(span for _, span in _Collector.received if span.name == "text_completion tiny")
    attributes = {kv.key: kv.value for kv in llm.attributes}
    assert attributes["gen_ai.operation.name"].string_value == "text_completion"
    assert attributes["gen_ai.usage.output_tokens"].int_value == run.trace.table().iloc[-1]["tokens_out"]


ONE_CALL = {"name": "echo", "hops": [{"name": "say", "call": "workbench.demo:canned_answer"}]}


def _exporter_said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")]


def _workbench_said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("workbench")]


def test_an_endpoint_that_stops_taking_spans_is_said_once_and_again_when_it_takes_them(
    collector: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The exporter logged a line per retry of every batch: a notebook's output filled with them."""
    bench = wb.Workbench(otlp_endpoint=collector)
    chain = bench.chain(ONE_CALL)
    _Collector.busy = {"Retry-After": "3600"}  # busy for an hour: the exporter gives a batch up at once
    for _ in range(3):
        run = chain.run(question="hi")
        bench.tracing.provider.force_flush()
    assert _Collector.refused == 3
    assert _exporter_said(caplog) == []
    (said,) = _workbench_said(caplog)
    assert said.startswith(f"spans are not reaching the OTLP endpoint {collector}/v1/traces; the workbench still keeps")
    assert "The exporter said: Failed to export spans batch" in said  # its own words, quoted once
    assert len(run.trace) == 2  # kept here all the same
    _Collector.busy = None
    chain.run(question="hi")
    bench.tracing.provider.force_flush()
    again = f"the OTLP endpoint {collector}/v1/traces takes spans again (it did not take 6)"
    assert _workbench_said(caplog)[1] == again
    bench.close()
    assert len(_workbench_said(caplog)) == 2 and _exporter_said(caplog) == []


def test_closing_gives_a_failing_endpoint_one_try_not_seconds_of_retries(
    collector: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench.close() waited out each project's retries against an endpoint that refused: 18 s, measured."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "3600000")  # nothing goes out before the close
    bench = wb.Workbench(otlp_endpoint=collector)
    run = bench.chain(ONE_CALL).run(question="hi")
    _Collector.busy = {}  # a 503 with no Retry-After: the exporter retries, 1 s, 2 s, 4 s apart
    bench.close()
    assert _Collector.refused == 1
    assert _workbench_said(caplog)[-1].startswith(
        f"the OTLP endpoint {collector}/v1/traces did not take spans up to the close: 2 in the batches tried")
    assert _exporter_said(caplog) == [] and len(run.trace) == 2


def test_spans_the_exporters_full_queue_dropped_are_counted_at_the_close(
    collector: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map against an endpoint that took each batch in 0.3 s: the exporter's full queue dropped 1,662 of 6,002
    spans with one line of its own and no count, and bench.close() said nothing, as if the endpoint had them all."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "2")  # the queue, made small: 2,048 spans
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    bench = wb.Workbench(otlp_endpoint=collector)
    chain = bench.chain(ONE_CALL)
    _Collector.held = threading.Event()
    chain.run(question="first")  # its two spans go out at once, and the endpoint is slow to take them
    assert _Collector.posted.wait(30)
    for _ in range(3):
        chain.run(question="hi")  # six spans for a queue of two, while the first post waits
    _Collector.held.set()
    bench.close()
    assert len(_Collector.received) == 4
    assert _workbench_said(caplog)[-1].startswith(
        f"4 of the 8 spans never reached the OTLP endpoint {collector}/v1/traces: it took them more slowly than the "
        "workbench made them, and the exporter's full queue dropped them (OTEL_BSP_MAX_QUEUE_SIZE")


class _Silent:
    """A TCP endpoint that accepts every connection, reads what comes, and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections: list[socket.socket] = []
        self.received = bytearray()
        self.got_request = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        while True:
            try:
                data = connection.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.received += data
            self.got_request.set()

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def silent() -> Iterator[_Silent]:
    endpoint = _Silent()
    try:
        yield endpoint
    finally:
        endpoint.close()


def test_closing_with_an_endpoint_that_never_answers_returns_and_says_once_where_spans_did_not_go(
    silent: _Silent, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint that took the connection and never answered (a collector hung, a port forwarded to nothing) held
    bench.close() for the exporter's whole timeout: 10 s, measured, before a notebook could close."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "3600000")  # nothing goes out before the close
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "3600")  # the exporter alone would wait an hour
    endpoint = f"http://127.0.0.1:{silent.listener.getsockname()[1]}"
    bench = wb.Workbench(otlp_endpoint=endpoint)
    run = bench.chain(ONE_CALL).run(question="hi")
    closing = threading.Thread(target=bench.close)
    closing.start()
    closing.join(120)  # a bound on a hang, far above the close's own
    assert not closing.is_alive(), "bench.close() waited on an endpoint that never answers"
    assert silent.got_request.is_set() and silent.received.startswith(b"POST /v1/traces")  # the close did try
    assert _exporter_said(caplog) == []
    (said,) = _workbench_said(caplog)
    assert said.startswith(f"the OTLP endpoint {endpoint}/v1/traces did not answer within 2.0 s of the close")
    assert "otlp_close_timeout_s" in said  # how to give it longer
    assert len(run.trace) == 2  # kept here all the same


@pytest.mark.parametrize("timeout", [0, -1.0, "2", float("nan")])
def test_a_close_timeout_that_is_not_a_positive_number_is_refused(timeout: object) -> None:
    with pytest.raises(wb.SettingsError, match="otlp_close_timeout_s"):
        wb.Workbench(otlp_endpoint="http://127.0.0.1:4318", otlp_close_timeout_s=timeout)  # type: ignore[arg-type]


def test_text_with_a_lone_surrogate_reaches_the_endpoint_and_the_tables(
    collector: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Python hop that listed a directory (os.listdir decodes an undecodable name with lone surrogates) and failed
    on a second such name: the exporter logged a traceback per span and dropped output.value, and every table of the
    workbench's traces (run.trace, bench.traces(), events()) failed in pandas ('surrogates not allowed')."""
    name = "report-\udcff.txt"

    def listing(question: str) -> list[str]:
        return [name]

    def opening(listing: list[str]) -> str:
        raise FileNotFoundError(2, "No such file or directory", listing[0])

    bench = wb.Workbench(otlp_endpoint=collector)
    chain = bench.chain({"name": "files", "hops": [
        {"name": "listing", "call": listing}, {"name": "opening", "call": opening}]})
    with pytest.raises(wb.HopFailed) as failure:
        chain.run(question="hi")
    run = failure.value.run
    assert run.outputs["listing"] == [name]  # the run's own values stay as the hop made them
    bench.close()

    assert _exporter_said(caplog) == []
    received = {span.name: span for _, span in _Collector.received}
    assert set(received) == {"chain files", "hop listing", "hop opening"}
    output = {kv.key: kv.value.string_value for kv in received["hop listing"].attributes}["output.value"]
    assert json.loads(output) == [name]  # escaped as JSON escapes it: the same text, read back
    failed = received["hop opening"]
    assert "report-\\udcff.txt" in failed.status.message
    event = next(event for event in failed.events if event.name == "exception")
    assert "report-\\udcff.txt" in {kv.key: kv.value.string_value for kv in event.attributes}["exception.message"]
    table = bench.traces().table()
    assert json.loads(table.set_index("name").loc["hop listing", "attributes.output.value"]) == [name]
    assert "report-\\udcff.txt" in table.set_index("name").loc["hop opening", "status_message"]
    events = run.trace.events()
    assert "report-\\udcff.txt" in events[events["event"] == "exception"]["attributes.exception.message"].iloc[0]


@pytest.mark.parametrize(
    ("variable", "value"),
    [("OTEL_SERVICE_NAME", "qa-study"), ("OTEL_RESOURCE_ATTRIBUTES", "service.name=qa-study,team=nlp")],
)
def test_the_service_name_the_environment_sets_reaches_the_endpoint(
    collector: str, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Jaeger lists traces by service: OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) was ignored,
    every workbench's spans arrived as autoglm-workbench, and two studies' traces could not be told apart."""
    monkeypatch.setenv(variable, value)
    bench = wb.Workbench(otlp_endpoint=collector, project_name="qa")
    bench.chain(ONE_CALL).run(question="hi")
    bench.close()
    projects = {
        attributes["openinference.project.name"]: attributes["service.name"]
        for attributes in ({kv.key: kv.value.string_value for kv in r.attributes} for r in _Collector.resources)
    }
    assert projects == {"qa": "qa-study"}


def test_without_a_service_name_in_the_environment_spans_come_from_the_workbench(collector: str) -> None:
    bench = wb.Workbench(otlp_endpoint=collector)
    bench.chain(ONE_CALL).run(question="hi")
    bench.close()
    assert {kv.value.string_value for r in _Collector.resources for kv in r.attributes if kv.key == "service.name"} == {
        "autoglm-workbench"}


@pytest.mark.parametrize("endpoint", ["127.0.0.1:6006", "localhost:4318", "htp://127.0.0.1:6006", "http://", 6006])
def test_an_endpoint_that_is_not_an_http_url_is_refused_at_once(endpoint: object) -> None:
    """'127.0.0.1:6006' (Phoenix's address as its UI prints it) was taken: the workbench ran, and only the first
    export said, seconds later and as the exporter's 'No connection adapters', that no span was going anywhere."""
    with pytest.raises(wb.SettingsError, match="otlp_endpoint") as info:
        wb.Workbench(otlp_endpoint=endpoint)  # type: ignore[arg-type]
    assert "http://127.0.0.1:6006" in str(info.value)  # the hint shows the form it takes
