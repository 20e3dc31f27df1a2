"""Gaps an audit of the served gateway found, each shown on a real server (uvicorn or grpc.aio on 127.0.0.1): a
credential revoked under an open gRPC stream, cross-site requests to a server without credentials, a stream's slot
taken after its 200, the envelope's limits over JSON-RPC, unexpected failures over gRPC, multi-frame zstd, a
msgpack key that is not text, the admin routes' statuses for the caller's mistakes, and names no route can address."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import msgspec
import pytest
import zstandard
from helpers import GATE, gated_echo, sse

import workbench as wb
from workbench.fronts.server import Server, chain_pb2_grpc
from workbench.fronts.server import chain_pb2 as pb
from workbench.fronts.server.auth import Auth

BODY_LIMIT = 256 * 1024  # above the context blob's own limit (64 Ki characters)


def echo(question: str) -> str:
    return question


def tangled(question: str) -> dict[str, Any]:
    """A hop output that refers to itself: no encoder can write it out."""
    knot: dict[str, Any] = {"question": question}
    knot["self"] = knot
    return knot


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[wb.Workbench]:
    with wb.Workbench(data_dir=tmp_path_factory.mktemp("audit")) as b:
        yield b


@pytest.fixture(scope="module")
def chains(bench: wb.Workbench) -> dict[str, wb.Chain]:
    made = [
        bench.chain({"name": "echo", "hops": [{"name": "say", "call": echo}]}),
        bench.chain({"name": "tangled", "hops": [{"name": "knot", "call": tangled}]}),
        bench.chain({"name": "gated", "hops": [{"name": "wait", "call": gated_echo}]}),
    ]
    return {chain.name: chain for chain in made}


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Auth:
    auth = Auth(tmp_path_factory.mktemp("audit-keys"), rate_per_s=None, max_body_bytes=BODY_LIMIT,
                login_failures=None)
    assert auth.keys is not None
    auth.test_keys = {"runner": auth.keys.add("runner", "runner"),  # type: ignore[attr-defined]
                      "admin": auth.keys.add("admin", "admin")}
    return auth


@pytest.fixture(scope="module")
def served(bench: wb.Workbench, chains: dict[str, wb.Chain], auth: Auth) -> Iterator[Server]:
    with bench.serve(chains=[chains["echo"], chains["tangled"]], port=0, grpc_port=0, auth=auth) as server:
        yield server


def bearer(auth: Auth, role: str) -> dict[str, str]:
    return {"authorization": f"Bearer {auth.test_keys[role]}"}  # type: ignore[attr-defined]


def stream_request(request_id: str, chain: str = "echo", **inputs: Any) -> pb.StreamRequest:
    return pb.StreamRequest(request_id=request_id, request=pb.InvokeRequest(
        envelope=pb.Envelope(action_type="stream"), chain=chain, inputs_json=json.dumps(inputs)))


def questions_run(bench: wb.Workbench) -> list[str]:
    return [run.inputs.get("question") for run in bench.runs()]


# -- 1. a gRPC stream checks its credential on every request --------------------------------------


def test_a_key_revoked_while_a_grpc_stream_is_open_refuses_its_next_request(bench: wb.Workbench, served: Server,
                                                                              auth: Auth) -> None:
    # The stream authenticated once, as it opened: a key revoked meanwhile kept running requests on it, where
    # KeyStore promises "revoke takes effect on the next request" and unary Invoke keeps that promise.
    assert auth.keys is not None and served.grpc is not None
    key = auth.keys.add("leaver", "runner")

    async def main() -> tuple[pb.StreamEvent, pb.StreamEvent]:
        async with grpc.aio.insecure_channel(served.grpc.target) as channel:
            call = chain_pb2_grpc.ChainServiceStub(channel).Stream(
                metadata=(("authorization", f"Bearer {key}"),), timeout=60)
            answers = []
            for request_id in ("before", "after"):
                await call.write(stream_request(request_id, question=f"asked {request_id} the revocation"))
                while (event := await call.read()).WhichOneof("event") not in ("final", "error"):
                    pass
                answers.append(event)
                if request_id == "before":
                    auth.keys.revoke("leaver")
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            return answers[0], answers[1]

    before, after = asyncio.run(main())
    assert before.HasField("final")
    assert after.request_id == "after" and after.HasField("error")
    assert after.error.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "not valid" in after.error.message
    assert "asked after the revocation" not in questions_run(bench)


# -- 2. a server without credentials answers this machine only -------------------------------------


def test_a_server_without_credentials_refuses_other_sites_and_other_host_names(bench: wb.Workbench,
                                                                                chains: dict[str, wb.Chain],
                                                                                tiny_path: Path) -> None:
    # A web page could POST to it (fetch with mode no-cors; no Content-Type reads as JSON), and a DNS-rebound name
    # could read its answers: both reach an admin without credentials.
    with bench.serve(chains=[chains["echo"]], port=0, auth=False) as open_, \
            httpx.Client(base_url=open_.url, timeout=30) as c:
        load = json.dumps({"name": "planted", "source": str(tiny_path), "device": "cpu"}).encode()
        page = c.post("/v1/models", headers={"origin": "https://evil.example"}, content=load)
        assert page.status_code == 403, page.text
        error = page.json()["error"]
        assert error["type"] == "Forbidden" and "'https://evil.example'" in error["message"]
        assert "planted" not in bench.registry.names()
        assert c.post("/v1/chains/echo/invoke", headers={"origin": "null"},
                      json={"inputs": {"question": "from a sandboxed page"}}).status_code == 403
        rebound = c.get("/v1/chains", headers={"host": f"evil.example:{open_.port}"})
        assert rebound.status_code == 403 and f"'evil.example:{open_.port}'" in rebound.json()["error"]["message"]
        assert "from a sandboxed page" not in questions_run(bench)
        for origin in ("http://localhost:3000", "http://127.0.0.1:8888", "http://[::1]:8888", "https://LOCALHOST"):
            assert c.get("/v1/chains", headers={"origin": origin}).status_code == 200, origin
        for host in ("localhost", f"127.0.0.1:{open_.port}", "[::1]:1234"):
            assert c.get("/v1/chains", headers={"host": host}).status_code == 200, host
        ran = c.post("/v1/chains/echo/invoke", json={"inputs": {"question": "from this machine"}})
        assert ran.status_code == 200 and ran.json()["output"] == "from this machine"


def test_a_server_with_credentials_leaves_origin_to_them(served: Server, auth: Auth) -> None:
    answer = httpx.post(f"{served.url}/v1/chains/echo/invoke", headers={**bearer(auth, "runner"),
                        "origin": "https://app.example"}, json={"inputs": {"question": "keyed"}}, timeout=30)
    assert answer.status_code == 200, answer.text


# -- 3. a stream refused for a full server is refused before its 200 --------------------------------


def test_streams_that_find_the_server_full_get_503_before_any_200(bench: wb.Workbench, chains: dict[str, wb.Chain],
                                                                   auth: Auth) -> None:
    # check_room() ran before the 200 but the slot was taken inside the stream: a burst of streams all passed the
    # check, and those the queue then refused got 200 followed by a ServerBusy error event.
    runner = bearer(auth, "runner")
    GATE.clear()
    with bench.serve(chains=[chains["gated"]], port=0, auth=auth, max_in_flight=1, max_queued=1) as server:
        gateway = server.app.state.gateway

        async def open_stream(client: httpx.AsyncClient, question: str) -> tuple[int, list[tuple[str, Any]]]:
            async with client.stream("POST", "/v1/chains/gated/stream", headers=runner,
                                     json={"inputs": {"question": question}}) as response:
                if response.status_code != 200:
                    await response.aread()
                    return response.status_code, [("refused", response.json())]
                return 200, sse([line async for line in response.aiter_lines()])

        async def main() -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
            """The burst's answers while the one slot is held (all but the one waiting), then every answer."""
            async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                         limits=httpx.Limits(max_connections=32)) as client:
                first = asyncio.ensure_future(open_stream(client, "first"))
                async with asyncio.timeout(60):
                    while gateway.slots.free:
                        await asyncio.sleep(0.005)
                    burst = [asyncio.ensure_future(open_stream(client, f"burst {i}")) for i in range(16)]
                    while sum(f.done() for f in burst) < len(burst) - 1:
                        await asyncio.wait([f for f in burst if not f.done()], return_when=asyncio.FIRST_COMPLETED)
                early = [f.result() for f in burst if f.done()]
                GATE.set()
                return early, await asyncio.gather(first, *burst)

        try:
            early, answered = asyncio.run(main())
        finally:
            GATE.set()
    for status, events in early:
        assert status == 503 and events[0][1]["error"]["type"] == "ServerBusy", events
    served_streams = [events for status, events in answered if status == 200]
    assert len(served_streams) == 2  # the first, and the one that waited its turn
    assert all(events[-1][0] == "run_finished" and events[-1][1]["status"] == "ok" for events in served_streams)


def test_a_stream_on_a_server_with_no_queue_runs_when_a_slot_is_free(bench: wb.Workbench,
                                                                      chains: dict[str, wb.Chain], auth: Auth) -> None:
    # max_queued=0 (no waiting) refused every stream, a free slot or not: the check asked whether a wait would fit.
    with bench.serve(chains=[chains["echo"]], port=0, auth=auth, max_queued=0) as server, \
            httpx.stream("POST", f"{server.url}/v1/chains/echo/stream", headers=bearer(auth, "runner"),
                         json={"inputs": {"question": "no queue"}}, timeout=30) as response:
        assert response.status_code == 200
        events = sse(response.iter_lines())
    assert events[-1][0] == "run_finished" and events[-1][1]["output"] == "no queue"


# -- 4. JSON-RPC keeps the envelope's limits ---------------------------------------------------------


def test_jsonrpc_invoke_refuses_a_context_blob_over_the_limit(bench: wb.Workbench, served: Server,
                                                              auth: Auth) -> None:
    call = {"jsonrpc": "2.0", "id": 1, "method": "chain.invoke",
            "params": {"chain": "echo", "inputs": {"question": "big blob"}, "context_blob": "x" * 70_000}}
    answer = httpx.post(f"{served.url}/rpc", headers=bearer(auth, "runner"), json=call, timeout=30).json()
    assert answer["error"]["code"] == -32013, answer
    assert answer["error"]["data"]["field"] == "$.context_blob"
    assert "big blob" not in questions_run(bench)


# -- 5. an unexpected failure over gRPC is an internal error, told once --------------------------------


def test_an_unexpected_failure_on_a_grpc_stream_ends_its_request_with_an_internal_error(
        served: Server, auth: Auth, caplog: pytest.LogCaptureFixture) -> None:
    assert served.grpc is not None
    metadata = tuple(bearer(auth, "runner").items())

    async def main() -> list[pb.StreamEvent]:
        async with grpc.aio.insecure_channel(served.grpc.target) as channel:
            call = chain_pb2_grpc.ChainServiceStub(channel).Stream(
                iter([stream_request("knot", chain="tangled", question="q"), stream_request("fine", question="q")]),
                metadata=metadata, timeout=60)
            return [event async for event in call]

    with caplog.at_level(logging.ERROR, logger="workbench.fronts.server.grpc_server"):
        events = asyncio.run(main())
    knot = [e for e in events if e.request_id == "knot"]
    ends = [e for e in knot if e.WhichOneof("event") in ("final", "error")]
    assert len(ends) == 1 and ends[0].HasField("error"), knot
    assert ends[0].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "Error" not in ends[0].error.message and "internal" in ends[0].error.message  # no Python class named
    assert any(e.request_id == "fine" and e.HasField("final") for e in events)
    assert any(record.exc_info and isinstance(record.exc_info[1], RecursionError) for record in caplog.records)


def test_an_unexpected_failure_of_grpc_invoke_is_internal_with_a_plain_message(
        served: Server, auth: Auth, caplog: pytest.LogCaptureFixture) -> None:
    assert served.grpc is not None

    async def main() -> None:
        async with grpc.aio.insecure_channel(served.grpc.target) as channel:
            await chain_pb2_grpc.ChainServiceStub(channel).Invoke(
                pb.InvokeRequest(chain="tangled", inputs_json=json.dumps({"question": "q"})),
                metadata=tuple(bearer(auth, "runner").items()), timeout=60)

    with caplog.at_level(logging.ERROR, logger="workbench.fronts.server.grpc_server"), \
            pytest.raises(grpc.aio.AioRpcError) as caught:
        asyncio.run(main())
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert "Error" not in (caught.value.details() or "") and "internal" in (caught.value.details() or "")
    assert any(record.exc_info and isinstance(record.exc_info[1], RecursionError) for record in caplog.records)


# -- 6. zstd bodies of several frames ----------------------------------------------------------------


def test_a_zstd_body_of_several_frames_is_read_whole_and_still_capped(served: Server, auth: Auth) -> None:
    compressor = zstandard.ZstdCompressor()
    body = b'{"inputs": {"question": "two frames"}, "context_blob": "tail"}'
    framed = compressor.compress(body[:20]) + compressor.compress(body[20:])
    headers = {**bearer(auth, "runner"), "content-encoding": "zstd", "content-type": "application/json"}
    answer = httpx.post(f"{served.url}/v1/chains/echo/invoke", headers=headers, content=framed, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["output"] == "two frames" and answer.json()["context_blob"] == "tail"
    # Each frame is under the limit; together they expand past it.
    half = compressor.compress(b" " * (BODY_LIMIT // 2 + 1))
    bomb = httpx.post(f"{served.url}/v1/chains/echo/invoke", headers=headers,
                      content=compressor.compress(b"{") + half + half, timeout=30)
    assert bomb.status_code == 413 and bomb.json()["error"]["field"] == "body"


# -- 7. a msgpack key that is not text ---------------------------------------------------------------


def test_a_msgpack_inputs_key_that_is_not_text_is_named_plainly(served: Server, auth: Auth) -> None:
    headers = {**bearer(auth, "runner"), "content-type": "application/msgpack"}
    body = msgspec.msgpack.encode({"inputs": {1: "x"}})
    error = httpx.post(f"{served.url}/v1/chains/echo/invoke", headers=headers, content=body, timeout=30).json()["error"]
    assert error["field"] == "$.inputs", error
    assert error["message"] == "the request's $.inputs is wrong: Expected `str`, got `int` (for one of its keys)"
    call = {"jsonrpc": "2.0", "id": 1, "method": "chain.invoke", "params": {"chain": "echo", "inputs": {2: "y"}}}
    replied = httpx.post(f"{served.url}/rpc", headers={**headers, "accept": "application/msgpack"},
                         content=msgspec.msgpack.encode(call), timeout=30)
    answer = msgspec.msgpack.decode(replied.content)
    assert answer["error"]["code"] == -32602
    assert answer["error"]["message"] == "invalid params: $.inputs: Expected `str`, got `int` (for one of its keys)"
    assert answer["error"]["data"]["field"] == "$.inputs"


# -- 8. the admin routes: the caller's mistakes are 4xx ------------------------------------------------


def test_loading_a_model_the_caller_described_wrongly_is_422_naming_the_field(served: Server, auth: Auth,
                                                                              tmp_path: Path, tiny_path: Path) -> None:
    admin = bearer(auth, "admin")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    cases = [
        ({"dtype": "float13"}, "$.dtype", "unknown dtype"),
        ({"device": "tpu:0"}, "$.device", "device"),
        ({"device": "cuda:7"}, "$.device", "not available"),
        ({"source": str(tmp_path / "missing")}, "$.source", "not a directory"),
        ({"source": str(tmp_path / "notes")}, "$.source", "no config.json"),
    ]
    for change, field, words in cases:
        body = {"name": "m", "source": str(tiny_path), "device": "cpu", **change}
        answer = httpx.post(f"{served.url}/v1/models", headers=admin, json=body, timeout=60)
        assert answer.status_code == 422, (change, answer.text)
        error = answer.json()["error"]
        assert error["field"] == field and words in error["message"], (change, error)


# -- 9. names the REST routes could not address --------------------------------------------------------


def test_names_the_rest_routes_cannot_address_are_refused_at_registration(bench: wb.Workbench, served: Server,
                                                                          auth: Auth, tiny_path: Path) -> None:
    admin = bearer(auth, "admin")
    for name in ("org/m", "..", "."):
        body = {"name": name, "source": str(tiny_path), "device": "cpu"}
        answer = httpx.post(f"{served.url}/v1/models", headers=admin, json=body, timeout=60)
        assert answer.status_code == 422 and answer.json()["error"]["field"] == "$.name", (name, answer.text)
        assert name not in bench.registry.names()
    for name in ("../../x", "a/b", ".."):
        spec = f"name: {json.dumps(name)}\nhops:\n  - name: n\n    call: workbench.demo:canned_answer\n"
        answer = httpx.post(f"{served.url}/v1/chains", headers=admin, json={"spec": spec}, timeout=60)
        assert answer.status_code == 422 and answer.json()["error"]["field"] == "name", (name, answer.text)
        assert name not in bench.chains() and name not in served.app.state.gateway.chains
    spec = "name: a..b\nhops:\n  - name: n\n    call: workbench.demo:canned_answer\n"  # dots inside a name are fine
    assert httpx.post(f"{served.url}/v1/chains", headers=admin, json={"spec": spec}, timeout=60).status_code == 201
    ran = httpx.post(f"{served.url}/v1/chains/a..b/invoke", headers=bearer(auth, "runner"),
                     json={"inputs": {"question": "?"}}, timeout=30)
    assert ran.status_code == 200 and ran.json()["status"] == "ok"


# -- 10. a path no route serves, a method its route does not take ------------------------------------


def test_an_unrouted_path_or_method_is_answered_in_the_envelope_with_every_allowed_method(served: Server,
                                                                                          auth: Auth) -> None:
    # Before, Starlette's router answered these in plain text ("Not Found", "Method Not Allowed"), which a client
    # reading error.message got nothing from, and DELETE /v1/chains said "Allow: GET, HEAD": POST /v1/chains is there.
    runner = bearer(auth, "runner")
    with httpx.Client(base_url=served.url, timeout=30) as c:
        missing = c.post("/v1/chain/echo/invoke", headers=runner, json={"inputs": {"question": "?"}})
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"
        error = missing.json()["error"]
        assert (error["type"], error["status"], error["field"]) == ("RequestError", 404, "path")
        assert error["message"] == "this server has no route '/v1/chain/echo/invoke'"
        assert "POST /v1/chains/{name}/invoke" in error["hint"] and "GET|POST /v1/chains," in error["hint"]

        wrong = c.get("/v1/chains/echo/invoke", headers=runner)
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        assert wrong.json()["error"] == {
            "type": "RequestError", "status": 405, "field": "method", "hint": "send it as POST",
            "message": "GET /v1/chains/echo/invoke is not served: /v1/chains/echo/invoke takes POST"}

        shared = c.delete("/v1/chains", headers=runner)
        assert shared.status_code == 405 and shared.headers["allow"] == "GET, HEAD, POST"
        assert shared.json()["error"]["message"] == "DELETE /v1/chains is not served: /v1/chains takes GET or POST"

        packed = c.get("/nope", headers={"accept": "application/msgpack"})  # in the codec the caller reads
        assert packed.status_code == 404 and packed.headers["content-type"] == "application/msgpack"
        assert msgspec.msgpack.decode(packed.content)["error"]["field"] == "path"
        # The real routes still answer as before.
        assert c.get("/health").json()["status"] == "ok"
        assert c.post("/v1/chains/echo/invoke", headers=runner, json={"inputs": {"question": "hi"}}).status_code == 200
