"""OTLP export: the same spans reach a real OTLP/HTTP endpoint on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import workbench as wb

trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")


class _Collector(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP protobuf posts and keeps the decoded spans."""

    received: list[tuple[str, object]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = trace_service.ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
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
    _Collector.received = []
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
