"""The gRPC front on a real grpc.aio server on 127.0.0.1: Invoke, the bidirectional Stream, auth, traces, errors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import workbench as wb
from workbench.errors import CircuitOpen
from workbench.fronts.server import chain_pb2 as pb
from workbench.fronts.server import chain_pb2_grpc, protogen
from workbench.fronts.server.gateway import Gateway
from workbench.fronts.server.auth import Auth, KeyStore
from workbench.fronts.server.grpc_server import GrpcServer, status_for
from tests.helpers import QA_SPEC, eventually, sse

RUNNER_KEY = "runner-key"
VIEWER_KEY = "viewer-key"


def broken(answer: str) -> str:
    raise ValueError(f"no good: {answer}")


CANCELLED: list[str] = []  # the questions whose slow hop was cancelled


async def slow(question: str) -> str:
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        CANCELLED.append(question)
        raise
    return question


FLAKED: set[str] = set()  # the questions whose flaky hop failed its first attempt


def flaky(question: str) -> str:
    if question not in FLAKED:
        FLAKED.add(question)
        raise ValueError(f"first try at {question!r} fails")
    return question.upper()


def breaker_open(question: str) -> str:
    raise CircuitOpen("model 'tiny' has its breaker open")


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Auth:
    auth = Auth(tmp_path_factory.mktemp("grpc-auth"), rate_per_s=1000.0, burst=1000)
    keys = {"runner": auth.keys.add("alice", "runner"), "viewer": auth.keys.add("vic", "viewer")}
    auth.test_keys = keys  # type: ignore[attr-defined]
    return auth


@pytest.fixture(scope="module")
def chains(tiny_bench: wb.Workbench) -> dict[str, wb.Chain]:
    qa = tiny_bench.chain(QA_SPEC)
    fails = tiny_bench.chain({**QA_SPEC, "name": "fails", "hops": [*QA_SPEC["hops"], {"name": "check", "call": broken}],
                              "output": "check"})
    unavailable = tiny_bench.chain({"name": "unavailable", "hops": [{"name": "only", "call": breaker_open}]})
    sleepy = tiny_bench.chain({"name": "slow", "hops": [{"name": "wait", "call": slow}]})
    return {c.name: c for c in (qa, fails, unavailable, sleepy)}


@pytest.fixture(scope="module")
def server(chains: dict[str, wb.Chain], auth: Auth) -> Iterator[GrpcServer]:
    with GrpcServer(Gateway(chains["qa"].bench, chains.values(), auth), host="127.0.0.1", port=0) as served:
        yield served


def key(auth: Auth, role: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {auth.test_keys[role]}"),)  # type: ignore[attr-defined]


def invoke_request(chain: str = "qa", session: str = "", blob: bytes = b"", action: str = "invoke",
                   **inputs: Any) -> pb.InvokeRequest:
    return pb.InvokeRequest(
        envelope=pb.Envelope(context_blob=blob, action_type=action),
        chain=chain, inputs_json=json.dumps(inputs), session_id=session,
    )


def stream_request(request_id: str, chain: str = "qa", **inputs: Any) -> pb.StreamRequest:
    return pb.StreamRequest(request_id=request_id, request=invoke_request(chain, action="stream", **inputs))


async def _invoke(target: str, request: pb.InvokeRequest, metadata: Any) -> tuple[pb.InvokeResponse, Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        call = chain_pb2_grpc.ChainServiceStub(channel).Invoke(request, metadata=metadata, timeout=60)
        return await call, await call.trailing_metadata()


def invoke(server: GrpcServer, request: pb.InvokeRequest, metadata: Any = ()) -> pb.InvokeResponse:
    return asyncio.run(_invoke(server.target, request, metadata))[0]


def refusal(server: GrpcServer, request: pb.InvokeRequest, metadata: Any = ()) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        invoke(server, request, metadata)
    return caught.value


def stream(server: GrpcServer, requests: list[pb.StreamRequest], metadata: Any) -> list[pb.StreamEvent]:
    async def main() -> list[pb.StreamEvent]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = chain_pb2_grpc.ChainServiceStub(channel).Stream(iter(requests), metadata=metadata, timeout=60)
            return [event async for event in call]

    return asyncio.run(main())


# -- Invoke --------------------------------------------------------------------------------------


def test_invoke_answers_as_the_chain_runs_in_process(server: GrpcServer, chains: dict[str, wb.Chain],
                                                     auth: Auth) -> None:
    response = invoke(server, invoke_request(question="What is 2 + 2?", blob=b"\x00ctx"), key(auth, "runner"))
    local = chains["qa"].run(question="What is 2 + 2?")
    assert json.loads(response.output_json) == local.output
    assert json.loads(response.outputs_json) == local.outputs
    assert response.envelope.context_blob == b"\x00ctx" and response.envelope.action_type == "invoke"
    served = chains["qa"].bench.run(response.run_id)
    assert response.envelope.trace_id == format(served.trace_id, "032x")
    assert [s.name for s in served.trace.spans if s.name.startswith("hop")] == ["hop plan", "hop answer"]


def test_a_blocking_client_calls_it_as_the_readme_shows(server: GrpcServer, auth: Auth) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = chain_pb2_grpc.ChainServiceStub(channel)
        bearer = f"Bearer {auth.test_keys['runner']}"  # type: ignore[attr-defined]
        reply = stub.Invoke(pb.InvokeRequest(chain="qa", inputs_json=json.dumps({"question": "hi"})),
                            metadata=[("authorization", bearer)])
    assert isinstance(json.loads(reply.output_json), str) and len(reply.envelope.trace_id) == 32


def test_an_api_key_header_works_like_a_bearer_token(server: GrpcServer, auth: Auth) -> None:
    metadata = (("x-api-key", auth.test_keys["runner"]),)  # type: ignore[attr-defined]
    assert invoke(server, invoke_request(question="hi"), metadata).run_id


def test_sessions_keep_history_per_caller(server: GrpcServer, chains: dict[str, wb.Chain], auth: Auth) -> None:
    first = invoke(server, invoke_request(session="s1", question="one"), key(auth, "runner"))
    second = invoke(server, invoke_request(session="s1", question="two"), key(auth, "runner"))
    bench = chains["qa"].bench
    session = bench.run(second.run_id).session
    assert session is not None and session == bench.run(first.run_id).session
    assert [r.run_id for r in bench.session(session).records()][-2:] == [first.run_id, second.run_id]


# -- auth ----------------------------------------------------------------------------------------


def test_refusals_have_their_status_codes_and_start_no_run(server: GrpcServer, chains: dict[str, wb.Chain],
                                                           auth: Auth) -> None:
    bench = chains["qa"].bench
    before = len(bench.runs())
    assert refusal(server, invoke_request(question="hi")).code() is grpc.StatusCode.UNAUTHENTICATED
    bad = (("authorization", "Bearer not-a-key"),)
    assert refusal(server, invoke_request(question="hi"), bad).code() is grpc.StatusCode.UNAUTHENTICATED
    wrong_role = refusal(server, invoke_request(question="hi"), key(auth, "viewer"))
    assert wrong_role.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(bench.runs()) == before


def test_a_rate_limit_says_resource_exhausted_and_when_to_retry(chains: dict[str, wb.Chain],
                                                                tmp_path: Path) -> None:
    strict = Auth(tmp_path, rate_per_s=0.01, burst=1)
    runner = strict.keys.add("bob", "runner")
    metadata = (("x-api-key", runner),)
    with GrpcServer(Gateway(chains["qa"].bench, chains.values(), strict)) as served:
        assert invoke(served, invoke_request(question="hi"), metadata).run_id
        before = len(chains["qa"].bench.runs())
        limited = refusal(served, invoke_request(question="hi"), metadata)
        assert limited.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert float(dict(limited.trailing_metadata())["retry-after"]) > 0
        assert len(chains["qa"].bench.runs()) == before


def test_a_model_whose_breaker_is_open_says_unavailable_and_when_to_retry(server: GrpcServer,
                                                                          chains: dict[str, wb.Chain],
                                                                          auth: Auth) -> None:
    bench = chains["qa"].bench
    bench.set_breaker("tiny", failure_threshold=1, reset_timeout_s=30)
    bench.inject("tiny", error_rate=1.0)
    try:
        assert refusal(server, invoke_request(question="fail"), key(auth, "runner")).code() is not \
            grpc.StatusCode.UNAVAILABLE  # the model's own failure, which opens the breaker
        refused = refusal(server, invoke_request(question="open?"), key(auth, "runner"))
        assert refused.code() is grpc.StatusCode.UNAVAILABLE
        assert 0 < float(dict(refused.trailing_metadata())["retry-after"]) <= 30
        [event] = [e for e in stream(server, [stream_request("r1", question="open?")], key(auth, "runner"))
                   if e.WhichOneof("event") == "error"]
        assert event.error.code == grpc.StatusCode.UNAVAILABLE.value[0] and 0 < event.error.retry_after_s <= 30
    finally:
        bench.clear_faults()
        bench.set_breaker("tiny")


def test_a_message_over_the_size_limit_is_refused(chains: dict[str, wb.Chain], tmp_path: Path) -> None:
    small = Auth(tmp_path, max_body_bytes=4096)
    metadata = (("x-api-key", small.keys.add("carol", "runner")),)
    with GrpcServer(Gateway(chains["qa"].bench, chains.values(), small)) as served:
        too_big = refusal(served, invoke_request(question="x" * 8192), metadata)
        assert too_big.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert invoke(served, invoke_request(question="small"), metadata).run_id  # and it keeps serving


def test_an_open_server_listens_on_loopback_only(chains: dict[str, wb.Chain]) -> None:
    with pytest.raises(wb.SettingsError, match="loopback"):
        GrpcServer(Gateway(chains["qa"].bench, chains.values(), Auth.open()), host="0.0.0.0").start()
    # No credentials needed there: every caller is the admin "local".
    with GrpcServer(Gateway(chains["qa"].bench, chains.values(), Auth.open())) as served:
        assert invoke(served, invoke_request(question="hi")).run_id


def test_a_taken_port_is_refused_with_a_clear_error(server: GrpcServer, capfd: pytest.CaptureFixture[str]) -> None:
    # Before: "the gRPC server cannot listen on ..." and, on stderr beside it, gRPC's C core's own "E1202 ...
    # add_port.cc:83] Failed to add port to server: ..." (bench.serve, %autoglm serve; the command line probes first).
    with pytest.raises(wb.SettingsError, match="cannot listen on 127.0.0.1:[0-9]+: the port is in use") as info:
        GrpcServer(server.gateway, port=server.port).start()
    assert "stop what holds it" in str(info.value.hint)
    assert "add_port" not in capfd.readouterr().err



@pytest.mark.parametrize("ports", [{"port": 99999}, {"port": -1}, {"port": 0, "grpc_port": 70000},
                                   {"port": 0, "grpc_port": "50051"}])
def test_a_port_out_of_range_is_refused_before_anything_listens(chains: dict[str, wb.Chain],
                                                                 ports: dict[str, Any]) -> None:
    # Not an OverflowError from bind(), and not gRPC's silent 70000 -> 4464.
    with pytest.raises(wb.SettingsError, match="not a TCP port"):
        chains["qa"].bench.serve(chains=list(chains.values()), auth=False, **ports)


# -- traces --------------------------------------------------------------------------------------


def test_traceparent_puts_the_run_in_the_callers_trace(server: GrpcServer, chains: dict[str, wb.Chain],
                                                       auth: Auth) -> None:
    caller = TracerProvider().get_tracer("caller")
    with caller.start_as_current_span("client call") as span:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
    trace_id = format(span.get_span_context().trace_id, "032x")
    metadata = (*key(auth, "runner"), ("traceparent", carrier["traceparent"]))
    response = invoke(server, invoke_request(question="hi"), metadata)
    assert response.envelope.trace_id == trace_id
    run = chains["qa"].bench.run(response.run_id)
    assert format(run.trace_id, "032x") == trace_id
    roots = [s for s in run.trace.spans if s.parent is not None and s.parent.span_id == span.get_span_context().span_id]
    assert roots, "a server span hangs under the caller's span"


def test_the_envelope_trace_id_joins_a_trace_and_a_bad_traceparent_is_refused(server: GrpcServer,
                                                                             auth: Auth) -> None:
    request = invoke_request(question="hi")
    request.envelope.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response, trailing = asyncio.run(_invoke(server.target, request, key(auth, "runner")))
    assert response.envelope.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert dict(trailing)["x-trace-id"] == response.envelope.trace_id  # the trailing metadata names it too
    bad = refusal(server, invoke_request(question="hi"), (*key(auth, "runner"), ("traceparent", "00-nope")))
    assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT and "traceparent" in bad.details()


def test_without_traceparent_each_call_starts_its_own_trace(server: GrpcServer, auth: Auth) -> None:
    first = invoke(server, invoke_request(question="hi"), key(auth, "runner"))
    second = invoke(server, invoke_request(question="hi"), key(auth, "runner"))
    assert first.envelope.trace_id != second.envelope.trace_id


# -- errors --------------------------------------------------------------------------------------


def test_errors_map_to_status_codes(server: GrpcServer, auth: Auth) -> None:
    runner = key(auth, "runner")
    unknown = refusal(server, invoke_request(chain="nope", question="hi"), runner)
    assert unknown.code() is grpc.StatusCode.NOT_FOUND and "qa" in unknown.details()
    missing = refusal(server, invoke_request(), runner)
    assert missing.code() is grpc.StatusCode.INVALID_ARGUMENT and "question" in missing.details()
    not_json = refusal(server, pb.InvokeRequest(chain="qa", inputs_json="{question"), runner)
    assert not_json.code() is grpc.StatusCode.INVALID_ARGUMENT and "inputs_json" in not_json.details()
    not_object = refusal(server, pb.InvokeRequest(chain="qa", inputs_json="[1, 2]"), runner)
    assert not_object.code() is grpc.StatusCode.INVALID_ARGUMENT and "object" in not_object.details()
    deep = refusal(server, pb.InvokeRequest(chain="qa", inputs_json='{"question": ' + "[" * 100_000 + "]" * 100_000
                                            + "}"), runner)
    assert deep.code() is grpc.StatusCode.INVALID_ARGUMENT and "nests too deeply" in deep.details()


def test_a_failed_hop_answers_with_its_cause_and_names_the_run(server: GrpcServer, chains: dict[str, wb.Chain],
                                                               auth: Auth) -> None:
    failed = refusal(server, invoke_request(chain="fails", question="hi"), key(auth, "runner"))
    assert failed.code() is grpc.StatusCode.UNKNOWN and "hop 'check' failed" in failed.details()
    trailing = dict(failed.trailing_metadata())
    run = chains["fails"].bench.run(trailing["x-run-id"])
    assert format(run.trace_id, "032x") == trailing["x-trace-id"] and "plan" in run.outputs
    unavailable = refusal(server, invoke_request(chain="unavailable", question="hi"), key(auth, "runner"))
    assert unavailable.code() is grpc.StatusCode.UNAVAILABLE and "breaker" in unavailable.details()


def test_status_for_follows_the_error_tree() -> None:
    assert status_for(wb.MissingInputError("x")) is grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(wb.UnknownModelError("x")) is grpc.StatusCode.NOT_FOUND
    assert status_for(wb.HopTimeout("x")) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_for(wb.RunCancelled("x")) is grpc.StatusCode.CANCELLED
    assert status_for(wb.HopFailed("h", wb.CircuitOpen("x"))) is grpc.StatusCode.UNAVAILABLE
    assert status_for(wb.HopFailed("h", KeyError("x"))) is grpc.StatusCode.UNKNOWN
    assert status_for(RuntimeError("bug")) is grpc.StatusCode.INTERNAL


# -- Stream --------------------------------------------------------------------------------------


def test_one_stream_answers_two_requests_each_with_its_events(server: GrpcServer, chains: dict[str, wb.Chain],
                                                              auth: Auth) -> None:
    requests = [
        stream_request("a", question="What is 2 + 2?"),
        stream_request("b", question="And 3 + 3?"),
    ]
    events = stream(server, requests, key(auth, "runner"))
    for request_id, question in (("a", "What is 2 + 2?"), ("b", "And 3 + 3?")):
        mine = [e for e in events if e.request_id == request_id]
        kinds = [e.WhichOneof("event") for e in mine]
        assert kinds[0] == "hop_started" and kinds[-1] == "final" and kinds.count("final") == 1
        assert [e.hop_started.hop for e in mine if e.HasField("hop_started")] == ["plan", "answer"]
        final = mine[-1].final.response
        local = chains["qa"].run(question=question)
        assert json.loads(final.output_json) == local.output
        tokens = "".join(e.token.text for e in mine if e.HasField("token") and e.token.hop == "answer")
        assert tokens == local.outputs["answer"]
        assert mine[-1].envelope.trace_id == final.envelope.trace_id != ""


def test_a_client_can_send_its_next_request_after_reading_the_last_answer(server: GrpcServer, auth: Auth) -> None:
    async def main() -> list[pb.StreamEvent]:
        seen: list[pb.StreamEvent] = []
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = chain_pb2_grpc.ChainServiceStub(channel).Stream(metadata=key(auth, "runner"), timeout=60)
            for request_id in ("first", "second"):
                await call.write(stream_request(request_id, question="hi"))
                while not (event := await call.read()).HasField("final"):
                    seen.append(event)
                seen.append(event)
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
        return seen

    events = asyncio.run(main())
    finals = [e for e in events if e.HasField("final")]
    assert [e.request_id for e in finals] == ["first", "second"]
    assert finals[0].final.response.output_json == finals[1].final.response.output_json  # greedy: same answer
    assert finals[0].final.response.run_id != finals[1].final.response.run_id


def test_a_refused_or_failed_request_on_a_stream_leaves_the_others_running(server: GrpcServer,
                                                                           auth: Auth) -> None:
    requests = [
        stream_request("bad", chain="nope", question="hi"),
        stream_request("fails", chain="fails", question="hi"),
        stream_request("good", question="hi"),
    ]
    events = {e.request_id: e for e in stream(server, requests, key(auth, "runner"))}  # the last of each
    assert events["bad"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert events["fails"].error.code == grpc.StatusCode.UNKNOWN.value[0] and events["fails"].error.hop == "check"
    assert events["fails"].error.run_id and events["fails"].envelope.trace_id
    assert events["good"].HasField("final")


def test_a_client_that_cancels_its_stream_stops_the_runs_it_started(server: GrpcServer, chains: dict[str, wb.Chain],
                                                                     auth: Auth) -> None:
    async def main() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = chain_pb2_grpc.ChainServiceStub(channel).Stream(metadata=key(auth, "runner"), timeout=60)
            await call.write(stream_request("a", chain="slow", question="hi"))
            await call.write(stream_request("b", chain="slow", question="ho"))
            started = {(await call.read()).request_id, (await call.read()).request_id}
            assert started == {"a", "b"} and CANCELLED == []
            call.cancel()

    asyncio.run(main())
    eventually(lambda: sorted(CANCELLED) == ["hi", "ho"], "the cancelled stream's runs to stop")


def test_a_stream_without_credentials_ends_unauthenticated(server: GrpcServer, chains: dict[str, wb.Chain],
                                                           auth: Auth) -> None:
    before = len(chains["qa"].bench.runs())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        stream(server, [stream_request("a", question="hi")], ())
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    viewer = stream(server, [stream_request("a", question="hi")],
                    key(auth, "viewer"))
    assert [e.error.code for e in viewer] == [grpc.StatusCode.PERMISSION_DENIED.value[0]]
    assert len(chains["qa"].bench.runs()) == before


def test_a_retried_hop_tells_its_failed_attempt_over_grpc_as_over_sse(chains: dict[str, wb.Chain],
                                                                      auth: Auth) -> None:
    # Stream had no event for wb.AttemptFailed: a gRPC client saw a retried hop's tokens from every attempt run
    # together, with nothing saying the first were no answer, where an SSE client got an attempt_failed event.
    import httpx

    bench = chains["qa"].bench
    retried = bench.chain({"name": "flaky", "hops": [
        {"name": "once", "call": flaky, "retry": {"attempts": 2, "backoff_ms": 0}}]})
    with bench.serve(chains=[retried], port=0, grpc_port=0, auth=auth) as served:
        assert served.grpc is not None
        headers = {"authorization": f"Bearer {auth.test_keys['runner']}"}  # type: ignore[attr-defined]
        with httpx.stream("POST", f"{served.url}/v1/chains/flaky/stream", json={"inputs": {"question": "rest"}},
                          headers=headers, timeout=60) as response:
            by_sse = [data for kind, data in sse(response.iter_lines()) if kind == "attempt_failed"]
        events = stream(served.grpc, [stream_request("a", chain="flaky", question="grpc")], key(auth, "runner"))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["hop_started", "attempt_failed", "hop_finished", "final"]
    assert json.loads(events[-1].final.response.output_json) == "GRPC"
    failed = events[1].attempt_failed
    assert (failed.hop, failed.attempt, failed.route) == ("once", 1, "hop:once")
    assert "first try at 'grpc' fails" in failed.error
    assert by_sse == [{"hop": "once", "attempt": 1, "route": "hop:once",
                       "error": failed.error.replace("'grpc'", "'rest'")}]


# -- the generated code --------------------------------------------------------------------------


def test_the_generated_modules_are_up_to_date_with_the_proto() -> None:
    assert protogen.stale() == []


def test_the_freshness_check_sees_a_stale_module(tmp_path: Path) -> None:
    for name in protogen.GENERATED:
        shutil.copy(protogen.HERE / name, tmp_path / name)
    stub = tmp_path / "chain_pb2_grpc.py"
    stub.write_text(stub.read_text().replace("def Invoke(", "def Invoked("))
    problems = protogen.stale(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("chain_pb2_grpc.py is out of date")


# -- beside the REST front -----------------------------------------------------------------------


def test_bench_serve_with_a_grpc_port_serves_both_fronts_on_one_gateway(chains: dict[str, wb.Chain],
                                                                       auth: Auth) -> None:
    import httpx

    bench = chains["qa"].bench
    with bench.serve(chains=[chains["qa"]], port=0, grpc_port=0, auth=auth) as served:
        assert served.grpc is not None and served.grpc.port > 0
        by_grpc = invoke(served.grpc, invoke_request(question="hi"), key(auth, "runner"))
        headers = {"authorization": f"Bearer {auth.test_keys['runner']}"}  # type: ignore[attr-defined]
        by_rest = httpx.post(f"{served.url}/v1/chains/qa/invoke", json={"inputs": {"question": "hi"}},
                             headers=headers, timeout=60).json()
        assert json.loads(by_grpc.output_json) == by_rest["output"]
        # A run made over gRPC is its caller's over REST too, and nobody else's.
        mine = httpx.get(f"{served.url}/v1/runs/{by_grpc.run_id}", headers=headers, timeout=60)
        assert mine.status_code == 200 and mine.json()["trace_id"] == by_grpc.envelope.trace_id
        viewer = {"authorization": f"Bearer {auth.test_keys['viewer']}"}  # type: ignore[attr-defined]
        assert httpx.get(f"{served.url}/v1/runs/{by_grpc.run_id}", headers=viewer, timeout=60).status_code == 404
        metrics = httpx.get(f"{served.url}/metrics", headers=headers, timeout=60).text
        assert 'route="/autoglm.workbench.v1.ChainService/Invoke"' in metrics
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # stopped with the REST server
        invoke(served.grpc, invoke_request(question="hi"), key(auth, "runner"))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_closing_the_workbench_stops_its_grpc_front(tiny_path: Path, auth: Auth) -> None:
    with wb.Workbench() as bench:
        bench.load("tiny", tiny_path, device="cpu")
        served = bench.serve(chains=[bench.chain(QA_SPEC)], port=0, grpc_port=0, auth=auth)
        grpc_front = served.grpc
        assert grpc_front is not None and invoke(grpc_front, invoke_request(question="hi"), key(auth, "runner")).run_id
    assert not grpc_front.running
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        invoke(grpc_front, invoke_request(question="hi"), key(auth, "runner"))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_autoglm_serve_with_grpc_port_serves_grpc_from_a_child_process(tiny_path: Path, tmp_path: Path) -> None:
    spec = tmp_path / "qa.yaml"
    spec.write_text(json.dumps(QA_SPEC))  # JSON is YAML
    data = tmp_path / "data"
    runner = KeyStore(data).add("cli", "runner")
    command = [sys.executable, "-m", "workbench.fronts.cli", "serve", "--spec", str(spec), "--model",
               f"tiny={tiny_path}", "--device", "cpu", "--port", "0", "--grpc-port", "0", "--data-dir", str(data)]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 180
        while (found := re.search(r"gRPC \(ChainService\) on (\S+)", log_path.read_text())) is None:
            if child.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"autoglm serve --grpc-port did not come up:\n{log_path.read_text()}")
            time.sleep(0.2)
        target = found.group(1)

        async def call(metadata: Any) -> pb.InvokeResponse:
            async with grpc.aio.insecure_channel(target) as channel:
                return await chain_pb2_grpc.ChainServiceStub(channel).Invoke(
                    invoke_request(question="2 + 2?"), metadata=metadata, timeout=60)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            asyncio.run(call(()))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert asyncio.run(call((("x-api-key", runner),))).run_id
    finally:
        child.send_signal(signal.SIGTERM)
        code = child.wait(30)
    said = log_path.read_text()
    assert code == 0, said
    assert said.rstrip().endswith("stopped")
