"""The gateway on a real uvicorn server on 127.0.0.1: REST + SSE, JSON-RPC, OpenAI-compatible routes (and the
workbench's own remote backend calling them), msgpack and zstd, traceparent, refusals, admin routes, the CLI."""

from __future__ import annotations

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

import httpx
import msgspec
import numpy as np
import pytest
import zstandard
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

import workbench as wb
from helpers import QA_SPEC, eventually, free_port, sse
from workbench.errors import SettingsError
from workbench.fronts.server import Server, ServeError
from workbench.fronts.server.auth import Auth, KeyStore
from workbench.fronts.server.rpc import code_of
from workbench.tracing import attributes as attr

CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
BODY_LIMIT = 256 * 1024
BODY_TIMEOUT_S = 4.0  # well above how long a whole body takes to arrive on a busy machine (200 calls, 32 at once)
CLI_START_S = 180


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Real API keys in a real key store: two runners, a viewer, an admin."""
    store = KeyStore(tmp_path_factory.mktemp("keys"))
    made = {name: store.add(name, role) for name, role in
            [("alice", "runner"), ("bob", "runner"), ("val", "viewer"), ("root", "admin")]}
    made["_dir"] = str(store.path.parent)
    store.close()
    return made


@pytest.fixture(scope="module")
def bench(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[wb.Workbench]:
    """A workbench with 'tiny', and 'chat' (the tiny model given a chat template), serving 'qa'."""
    chat_dir = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_path, chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(chat_dir)
    with wb.Workbench() as b:
        b.load("tiny", tiny_path, device="cpu")
        b.load("chat", chat_dir, device="cpu")
        yield b


@pytest.fixture(scope="module")
def server(bench: wb.Workbench, keys: dict[str, str]) -> Iterator[Server]:
    """The module's one server: 'qa', keys required, no rate limit (one test makes its own limited server)."""
    auth = Auth(keys["_dir"], rate_per_s=None, max_body_bytes=BODY_LIMIT)
    with bench.serve(chains=[bench.chain(QA_SPEC)], port=0, auth=auth, body_timeout_s=BODY_TIMEOUT_S) as served:
        yield served


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def key(keys: dict[str, str], name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {keys[name]}"}


# -- REST ------------------------------------------------------------------------------------------


def test_invoke_answers_with_the_run_and_names_its_trace(client: httpx.Client, keys: dict[str, str]) -> None:
    response = client.post("/v1/chains/qa/invoke", headers=key(keys, "alice"),
                           json={"inputs": {"question": "What is 2 + 2?"}, "context_blob": "turn=3"})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["chain"] == "qa"
    assert body["output"] == body["outputs"]["answer"] and set(body["outputs"]) == {"plan", "answer"}
    assert body["context_blob"] == "turn=3" and body["action_type"] == "invoke"
    assert response.headers["x-trace-id"] == body["trace_id"]
    assert response.headers["traceparent"].startswith(f"00-{body['trace_id']}-")


def test_batch_answers_each_input_in_order(client: httpx.Client, keys: dict[str, str],
                                           bench: wb.Workbench) -> None:
    questions = ["What is 1 + 1?", "Why is the sea blue?", "Who?"]
    response = client.post("/v1/chains/qa/batch", headers=key(keys, "alice"),
                           json={"inputs": [{"question": q} for q in questions], "concurrency": 2})
    assert response.status_code == 200
    runs = response.json()["runs"]
    assert [r["status"] for r in runs] == ["ok"] * 3
    kept = {run.id: run for run in bench.runs()}
    assert [kept[r["run_id"]].inputs["question"] for r in runs] == questions


def test_a_failed_run_answers_with_its_cause_status_and_the_hops_that_finished(
        client: httpx.Client, keys: dict[str, str], bench: wb.Workbench) -> None:
    bench.inject("tiny", error_rate=1.0, seed=0)
    try:
        response = client.post("/v1/chains/qa/invoke", headers=key(keys, "alice"), json={"inputs": {"question": "?"}})
        rpc_answer = client.post("/rpc", headers=key(keys, "alice"), json={
            "jsonrpc": "2.0", "method": "chain.invoke", "params": {"chain": "qa", "inputs": {"question": "?"}}, "id": 1})
    finally:
        bench.clear_faults()
    body = response.json()
    assert response.status_code == body["error"]["status"] == 500  # the model raised
    assert body["status"] == "error" and body["error"]["hop"] == "plan" and body["outputs"] == {}
    assert body["error"]["type"] == "HopFailed" and "injected fault" in body["error"]["message"]
    assert rpc_answer.json()["result"]["status"] == "error"  # a failed run is a result, not a protocol error


def test_stream_sends_hops_tokens_and_the_run_as_server_sent_events(client: httpx.Client,
                                                                    keys: dict[str, str]) -> None:
    with client.stream("POST", "/v1/chains/qa/stream", headers=key(keys, "alice"),
                       json={"inputs": {"question": "What is 2 + 2?"}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response.iter_lines())
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "hop_started" and kinds[-1] == "run_finished"
    assert [d["hop"] for k, d in events if k == "hop_started"] == ["plan", "answer"]
    assert kinds.index("token") < kinds.index("hop_finished")
    final = events[-1][1]
    answer_tokens = "".join(d["text"] for k, d in events if k == "token" and d["hop"] == "answer")
    assert final["status"] == "ok" and final["output"] == answer_tokens.strip()
    assert [d["output"] for k, d in events if k == "hop_finished"] == [final["outputs"]["plan"], final["output"]]
    assert len(final["trace_id"]) == 32


def test_a_client_that_leaves_a_stream_cancels_its_run(client: httpx.Client, keys: dict[str, str],
                                                       bench: wb.Workbench) -> None:
    def interrupted() -> list[Any]:
        return [s for s in bench.traces().spans if s.name == "chain qa"
                and (s.status.description or "").startswith("interrupted")]

    before = len(interrupted())
    bench.inject("tiny", latency_ms=3000)  # the run cannot finish before the client has gone
    try:
        with client.stream("POST", "/v1/chains/qa/stream", headers=key(keys, "alice"),
                           json={"inputs": {"question": "Long?"}}) as response:
            first = next(response.iter_lines())
            assert first == "event: hop_started"
        eventually(lambda: len(interrupted()) == before + 1, "the left stream's run to be cancelled")
    finally:
        bench.clear_faults()
    assert client.get("/health").json()["status"] == "ok"


def test_a_client_that_gives_up_waiting_cancels_its_run(client: httpx.Client, keys: dict[str, str],
                                                        bench: wb.Workbench) -> None:
    """A client that times out (and retries, as the openai package does) does not leave its run holding a slot and the
    model until it ends: its run, or its direct model call, is cancelled as the connection closes."""
    def cancelled(name: str, said: str) -> int:
        return sum(1 for s in bench.traces().spans if s.name == name and said in (s.status.description or ""))

    runs = cancelled("chain qa", "interrupted: CancelledError")
    calls = cancelled("text_completion tiny", "cancelled while model 'tiny' ran")
    # Neither can finish before the client has gone; and the client waits long enough for its call to reach the
    # model even on a busy machine (at 0.5 s the call was once still on its way there when the client left, on CI).
    bench.inject("tiny", latency_ms=6000)
    try:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chains/qa/invoke", headers=key(keys, "alice"), json={"inputs": {"question": "Long?"}},
                        timeout=2.0)
        eventually(lambda: cancelled("chain qa", "interrupted: CancelledError") == runs + 1,
                   "the run of the client that left to be cancelled")
        # Its model call is cancelled with it, saying so as a direct call's does: counted before the direct one, as
        # the two could land between two looks and the count pass calls + 1 unseen (it did, twice, on CI).
        eventually(lambda: cancelled("text_completion tiny", "cancelled while model 'tiny' ran") == calls + 1,
                   "the run's model call to be cancelled")
        calls += 1
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", headers=key(keys, "alice"), json={"model": "tiny", "prompt": "Long?"},
                        timeout=2.0)
        eventually(lambda: cancelled("text_completion tiny", "cancelled while model 'tiny' ran") == calls + 1,
                   "the model call to be cancelled")
    finally:
        bench.clear_faults()
    assert client.post("/v1/chains/qa/invoke", headers=key(keys, "alice"),
                       json={"inputs": {"question": "Still?"}}).json()["status"] == "ok"


def test_chains_list_names_each_served_chain_with_its_inputs(client: httpx.Client, keys: dict[str, str]) -> None:
    response = client.get("/v1/chains", headers=key(keys, "val"))
    assert response.status_code == 200
    qa = next(c for c in response.json()["chains"] if c["name"] == "qa")
    assert qa["inputs"] == ["question"] and qa["hops"] == ["plan", "answer"] and qa["output"] == "answer"


def test_a_run_is_read_back_only_by_its_maker_or_an_admin(client: httpx.Client, keys: dict[str, str]) -> None:
    made = client.post("/v1/chains/qa/invoke", headers=key(keys, "alice"), json={"inputs": {"question": "Hi?"}})
    run_id = made.json()["run_id"]
    mine = client.get(f"/v1/runs/{run_id}", headers=key(keys, "alice"))
    assert mine.status_code == 200
    run = mine.json()
    assert run["run_id"] == run_id and run["output"] == made.json()["output"]
    names = [s["name"] for s in run["spans"]]
    assert "chain qa" in names and "hop plan" in names and "hop answer" in names
    assert {s["trace_id"] for s in run["spans"]} == {made.json()["trace_id"]}
    assert client.get(f"/v1/runs/{run_id}", headers=key(keys, "bob")).status_code == 404
    assert client.get(f"/v1/runs/{run_id}", headers=key(keys, "val")).status_code == 404
    admin = client.get(f"/v1/runs/{run_id}", headers=key(keys, "root"))
    assert admin.status_code == 200
    # The model's directory on the server is its administrators' to read, as models.list has it: a runner sees the
    # model's served name where OpenInference's llm.model_name held the path.
    names = {s["attributes"].get("llm.model_name") for s in run["spans"]} - {None}
    assert names == {"tiny"} and not any("workbench.model.source" in s["attributes"] for s in run["spans"])
    paths = {s["attributes"].get("llm.model_name") for s in admin.json()["spans"]} - {None}
    assert len(paths) == 1 and Path(paths.pop()).is_dir()
    by_rpc = client.post("/rpc", headers=key(keys, "alice"), json=rpc("runs.get", {"run_id": run_id})).json()["result"]
    assert {s["attributes"].get("llm.model_name") for s in by_rpc["spans"]} - {None} == {"tiny"}


def test_sessions_are_kept_apart_per_caller(client: httpx.Client, keys: dict[str, str], server: Server,
                                            bench: wb.Workbench) -> None:
    for who in ("alice", "alice", "bob"):
        response = client.post("/v1/chains/qa/invoke", headers=key(keys, who),
                               json={"inputs": {"question": f"Who am I, {who}?"}, "session_id": "shared-name"})
        assert response.status_code == 200
    gateway = server.app.state.gateway
    alice = bench.session(gateway.session(Auth(keys["_dir"]).authenticate(key(keys, "alice")), "shared-name"))
    bob = bench.session(gateway.session(Auth(keys["_dir"]).authenticate(key(keys, "bob")), "shared-name"))
    assert [r.inputs["question"] for r in alice.records()] == ["Who am I, alice?"] * 2
    assert [r.inputs["question"] for r in bob.records()] == ["Who am I, bob?"]
    assert "shared-name" not in bench.sessions()


def test_health_is_open_and_metrics_parse_as_prometheus_text(client: httpx.Client, keys: dict[str, str]) -> None:
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/chains/qa/invoke", headers=key(keys, "alice"), json={"inputs": {"question": "Hi?"}})
    client.post("/v1/chains/qa/invoke", headers=key(keys, "alice"), content=b"{not json")
    with client.stream("POST", "/v1/chains/qa/stream", headers=key(keys, "alice"),
                       json={"inputs": {"question": "Hi?"}}) as response:
        list(response.iter_lines())
    assert client.get("/metrics").status_code == 401
    text = client.get("/metrics", headers=key(keys, "val")).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    invoke = "/v1/chains/{name}/invoke"
    assert samples[("autoglm_gateway_requests_total", (("method", "POST"), ("route", invoke)))] >= 2
    assert samples[("autoglm_gateway_errors_total", (("route", invoke), ("status", "400")))] >= 1
    assert samples[("autoglm_gateway_request_seconds_count", (("route", invoke),))] >= 2
    assert samples[("autoglm_gateway_ttft_seconds_count", (("target", "qa"),))] >= 1
    assert samples[("autoglm_gateway_queue_wait_seconds_count", ())] >= 2


# -- JSON-RPC --------------------------------------------------------------------------------------


def rpc(method: str, params: Any = None, ident: Any = 1) -> dict[str, Any]:
    call: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        call["params"] = params
    if ident is not None:
        call["id"] = ident
    return call


def test_jsonrpc_single_call(client: httpx.Client, keys: dict[str, str], bench: wb.Workbench) -> None:
    answer = client.post("/rpc", headers=key(keys, "alice"),
                         json=rpc("chain.invoke", {"chain": "qa", "inputs": {"question": "2 + 2?"}}, "a1")).json()
    assert answer["id"] == "a1" and answer["result"]["status"] == "ok"
    run = client.post("/rpc", headers=key(keys, "alice"), json=rpc("runs.get", {"run_id": answer["result"]["run_id"]}))
    assert run.json()["result"]["output"] == answer["result"]["output"]
    models = client.post("/rpc", headers=key(keys, "val"), json=rpc("models.list")).json()["result"]
    assert {m["name"] for m in models} >= {"tiny", "chat"}
    assert not any("source" in m for m in models)  # the server's paths are for its admins
    listed = client.post("/rpc", headers=key(keys, "root"), json=rpc("models.list")).json()["result"]
    assert {m["name"]: m["source"] for m in listed}["tiny"] == str(bench.registry.get("tiny").source)


def test_jsonrpc_batch_answers_each_call_and_maps_errors(client: httpx.Client, keys: dict[str, str]) -> None:
    calls = [
        rpc("chain.batch", {"chain": "qa", "inputs": [{"question": "a?"}, {"question": "b?"}]}, 1),
        rpc("no.such", {}, 2),
        rpc("chain.invoke", {"chain": "qa", "inputs": {"questoin": "typo"}}, 3),
        rpc("chain.invoke", {"chain": "qa", "inputs": "not a mapping"}, 4),
        rpc("chain.invoke", {"chain": "nope", "inputs": {}}, 5),
        rpc("models.list", None, None),  # a notification: no answer
    ]
    answers = {a["id"]: a for a in client.post("/rpc", headers=key(keys, "alice"), json=calls).json()}
    assert set(answers) == {1, 2, 3, 4, 5}
    assert [r["status"] for r in answers[1]["result"]["runs"]] == ["ok", "ok"]
    assert answers[2]["error"]["code"] == -32601
    assert answers[3]["error"]["code"] == -32602 and "did you mean 'question'" in answers[3]["error"]["message"]
    assert answers[4]["error"]["code"] == -32602
    assert answers[5]["error"]["code"] == -32004 and answers[5]["error"]["data"]["http_status"] == 404
    viewer = client.post("/rpc", headers=key(keys, "val"),
                         json=rpc("chain.invoke", {"chain": "qa", "inputs": {"question": "x"}})).json()
    assert viewer["error"]["code"] == -32003 and viewer["error"]["data"]["type"] == "Forbidden"
    broken = client.post("/rpc", headers=key(keys, "alice"), content=b"[{")
    assert broken.status_code == 400 and broken.json()["error"]["code"] == -32700
    invalid = client.post("/rpc", headers=key(keys, "alice"), json={"method": "models.list", "id": 9})
    assert invalid.status_code == 400 and invalid.json()["error"]["code"] == -32600


def test_jsonrpc_codes_follow_the_error_tree() -> None:
    from workbench.errors import HopTimeout, ModelOutOfMemory, RateLimited, Unauthenticated, UnknownModelError

    assert code_of(Unauthenticated("x")) == -32001
    assert code_of(RateLimited("x", retry_after_s=1)) == -32029
    assert code_of(UnknownModelError("x")) == -32004
    assert code_of(HopTimeout("x")) == -32054
    assert code_of(ModelOutOfMemory("x")) == -32057
    assert code_of(RuntimeError("x")) == -32603


# -- OpenAI-compatible -----------------------------------------------------------------------------


def test_openai_completions_streamed_and_not(client: httpx.Client, keys: dict[str, str]) -> None:
    listed = client.get("/v1/models", headers=key(keys, "val")).json()
    assert {m["id"] for m in listed["data"]} >= {"tiny", "chat"}
    whole = client.post("/v1/completions", headers=key(keys, "alice"),
                        json={"model": "tiny", "prompt": "Question: why?\nAnswer:", "max_tokens": 5}).json()
    assert whole["object"] == "text_completion" and whole["usage"]["completion_tokens"] == 5
    with client.stream("POST", "/v1/completions", headers=key(keys, "alice"),
                       json={"model": "tiny", "prompt": "Question: why?\nAnswer:", "max_tokens": 5, "stream": True,
                             "stream_options": {"include_usage": True}}) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text.strip() == whole["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_openai_chat_completions_streamed_and_not(client: httpx.Client, keys: dict[str, str]) -> None:
    messages = [{"role": "user", "content": "What is the sea?"}]
    whole = client.post("/v1/chat/completions", headers=key(keys, "alice"),
                        json={"model": "chat", "messages": messages, "max_tokens": 4}).json()
    assert whole["choices"][0]["message"]["role"] == "assistant" and whole["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", headers=key(keys, "alice"),
                       json={"model": "chat", "messages": messages, "max_tokens": 4, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() == whole["choices"][0]["message"]["content"]
    unknown = client.post("/v1/completions", headers=key(keys, "alice"), json={"model": "gpt-9", "prompt": "x"})
    assert unknown.status_code == 404 and "tiny" in unknown.json()["error"]["hint"]


def test_openai_chat_messages_may_hold_their_text_in_parts_or_none(client: httpx.Client, keys: dict[str, str]) -> None:
    """What the openai package and agent frameworks send: content as a list of text parts, and an assistant turn
    with no content (it called a tool); a part this server cannot read (an image) is a 422 naming it."""
    alice = key(keys, "alice")

    def chat(messages: list[dict[str, Any]]) -> httpx.Response:
        return client.post("/v1/chat/completions", headers=alice,
                           json={"model": "chat", "messages": messages, "max_tokens": 4})

    plain = chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the sea?"}])
    parts = chat([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "What is the sea?"}]}])
    assert parts.status_code == 200, parts.text
    assert parts.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    assert parts.json()["usage"] == plain.json()["usage"]  # the same prompt, token for token
    tool_turn = chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": []},
                      {"role": "user", "content": "Again?"}])
    assert tool_turn.status_code == 200, tool_turn.text
    image = chat([{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                               {"type": "image_url", "image_url": {"url": "data:,"}}]}])
    assert image.status_code == 422 and image.json()["error"]["field"] == "$.messages[0].content[1].type"


def test_an_openai_stream_refused_before_its_first_token_answers_with_the_refusals_status(
        client: httpx.Client, server: Server, keys: dict[str, str], bench: wb.Workbench) -> None:
    """A streamed call the model refuses outright (a prompt over its context window, a breaker open) gets the HTTP
    status a call without ``stream`` gets, not a 200 whose stream holds an error: the openai package raises its
    status's error (and retries a 503 after Retry-After), and a workbench calling this one does not retry a 422."""
    alice = key(keys, "alice")
    for path, body in [("/v1/completions", {"model": "tiny", "prompt": "Hi"}),
                       ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "Hi"}]})]:
        with client.stream("POST", path, headers=alice, json={**body, "max_tokens": 600, "stream": True}) as refused:
            refused.read()
        assert refused.status_code == 422 and refused.headers["content-type"] == "application/json"
        assert refused.json()["error"]["type"] == "ContextWindowExceeded"
    with wb.Workbench() as caller:
        caller.load("r", server.url + "/v1", served_model="tiny", api_key=keys["alice"])
        chain = caller.chain({"name": "long", "hops": [{"name": "a", "model": "r", "prompt": "Hi",
                                                        "max_new_tokens": 600}]})
        with pytest.raises(wb.HopFailed) as failed:
            chain.run()
        assert (failed.value.cause.kind, failed.value.cause.status) == ("rejected", 422)  # not a broken stream
    bench.set_breaker("tiny", failure_threshold=1, reset_timeout_s=30)
    bench.inject("tiny", error_rate=1.0)
    stream = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "stream": True}
    try:
        with client.stream("POST", "/v1/completions", headers=alice, json=stream) as failing:
            failing.read()
        assert failing.status_code == 500
        with client.stream("POST", "/v1/completions", headers=alice, json=stream) as refused:
            refused.read()
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "CircuitOpen"
    finally:
        bench.clear_faults()
        bench.set_breaker("tiny")
    with client.stream("POST", "/v1/completions", headers=alice, json=stream) as served:
        lines = [line for line in served.iter_lines() if line.startswith("data: ")]
    assert served.status_code == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_openai_sampling_settings_the_model_would_refuse_are_422_and_do_not_open_its_breaker(
        client: httpx.Client, keys: dict[str, str]) -> None:
    alice = key(keys, "alice")
    bad = [({"temperature": -1}, "$.temperature"), ({"temperature": 0.5, "top_p": -3}, "$.top_p"),
           ({"temperature": 0.5, "top_p": 0}, "$.top_p"), ({"temperature": 0.5, "top_k": -5}, "$.top_k"),
           ({"temperature": 0.5, "seed": 2**70}, "$.seed"), ({"seed": -2**64}, "$.seed"),  # torch takes 64 bits
           ({"max_tokens": 0}, "$.max_tokens"), ({"max_completion_tokens": 0}, "$.max_completion_tokens")]
    for _ in range(3):  # more failures in a row than the breaker's threshold (5), were they the model's
        for settings, field in bad:
            refused = client.post("/v1/completions", headers=alice,
                                  json={"model": "tiny", "prompt": "Hi", "max_tokens": 2, **settings})
            assert (refused.status_code, refused.json()["error"]["field"]) == (422, field), settings
    nan = client.post("/v1/chat/completions", headers={**alice, "content-type": "application/msgpack"},
                      content=msgspec.msgpack.encode({"model": "chat", "max_tokens": 2, "temperature": float("nan"),
                                                      "messages": [{"role": "user", "content": "Hi"}]}))
    assert nan.status_code == 422 and nan.headers["content-type"] == "application/json"
    # Another caller is still served: the model's breaker stayed closed.
    answer = client.post("/v1/completions", headers=key(keys, "bob"),
                         json={"model": "tiny", "prompt": "Hi", "max_tokens": 2, "temperature": 0.7, "top_p": 0.9})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
    run = client.post("/v1/chains/qa/invoke", headers=key(keys, "bob"), json={"inputs": {"question": "still?"}})
    assert run.json()["status"] == "ok"


def test_openai_fields_that_would_change_the_answer_and_are_not_served_are_422_not_dropped(
        client: httpx.Client, keys: dict[str, str]) -> None:
    # n=3 gave one choice, stop=["\n"] untrimmed text, logprobs=true no log-probabilities: a client read an answer
    # it had not asked for. OpenAI's own defaults, sent explicitly (as the openai package may), are served.
    alice = key(keys, "alice")
    for settings, field in [({"n": 3}, "$.n"), ({"stop": ["\n"]}, "$.stop"), ({"stop": "Q:"}, "$.stop"),
                            ({"logprobs": 2}, "$.logprobs"), ({"echo": True}, "$.echo"), ({"best_of": 2}, "$.best_of"),
                            ({"presence_penalty": 0.5}, "$.presence_penalty"), ({"logit_bias": {"50256": -100}},
                                                                               "$.logit_bias")]:
        refused = client.post("/v1/completions", headers=alice,
                              json={"model": "tiny", "prompt": "Hi", "max_tokens": 2, **settings})
        assert (refused.status_code, refused.json()["error"]["field"]) == (422, field), settings
        assert refused.json()["error"]["hint"]
    chat = client.post("/v1/chat/completions", headers=alice, json={
        "model": "chat", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_object"}})
    assert (chat.status_code, chat.json()["error"]["field"]) == (422, "$.response_format.type")
    defaults = {"n": 1, "stop": None, "logprobs": False, "echo": False, "presence_penalty": 0, "frequency_penalty": 0,
                "logit_bias": {}, "response_format": {"type": "text"}, "user": "someone"}
    served = client.post("/v1/chat/completions", headers=alice, json={
        "model": "chat", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}], **defaults})
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 2


def test_a_caller_limited_to_some_chains_may_not_call_the_models_directly(client: httpx.Client,
                                                                          keys: dict[str, str]) -> None:
    limited = {"authorization": "Bearer " + KeyStore(keys["_dir"]).add("qa-only", "runner", chains=["qa"])}
    for path, body in [("/v1/completions", {"model": "tiny", "prompt": "Anything at all", "max_tokens": 2}),
                       ("/v1/completions", {"model": "tiny", "prompt": "Anything", "max_tokens": 2, "stream": True}),
                       ("/v1/chat/completions", {"model": "chat", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "Anything"}]})]:
        refused = client.post(path, headers=limited, json=body)
        assert refused.status_code == 403 and "qa" in refused.json()["error"]["message"], (path, refused.text)
    assert client.post("/v1/chains/qa/invoke", headers=limited, json={"inputs": {"question": "q"}}).json()[
        "status"] == "ok"


def test_the_workbench_remote_backend_calls_the_served_models(server: Server, keys: dict[str, str],
                                                              bench: wb.Workbench) -> None:
    direct = bench.chain({"name": "direct", "hops": [{"name": "a", "model": "tiny", "prompt": "Q: {{ q }}\nA:",
                                                      "max_new_tokens": 6}]})
    expected = direct.run(q="Why is the sky blue?").output
    with wb.Workbench() as caller:
        caller.load("r", server.url + "/v1", served_model="tiny", api_key=keys["alice"])
        chain = caller.chain({"name": "remote", "hops": [{"name": "a", "model": "r", "prompt": "Q: {{ q }}\nA:",
                                                          "max_new_tokens": 6}]})
        run = chain.run(q="Why is the sky blue?")
        assert run.output == expected  # greedy: the same tokens, through HTTP and back
        request = next(s for s in run.trace.spans if s.name == "text_completion r")
        assert request.attributes[attr.REMOTE_URL] == server.url + "/v1/completions"
        with pytest.raises(wb.ModelLoadError, match="401"):
            caller.load("nokey", server.url + "/v1", served_model="tiny")


# -- the envelope's encodings, and traces ----------------------------------------------------------


def test_msgpack_and_zstd_both_ways(client: httpx.Client, keys: dict[str, str]) -> None:
    blob = "session context " * 256  # echoed back: the answer is well over the compression threshold
    request = {"inputs": [{"question": f"Question {i}: why is that so?"} for i in range(3)], "context_blob": blob}
    body = zstandard.ZstdCompressor().compress(msgspec.msgpack.encode(request))
    headers = {**key(keys, "alice"), "content-type": "application/msgpack", "content-encoding": "zstd",
               "accept": "application/msgpack", "accept-encoding": "zstd"}
    with client.stream("POST", "/v1/chains/qa/batch", headers=headers, content=body) as response:
        raw = b"".join(response.iter_raw())
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/msgpack"
    assert response.headers["content-encoding"] == "zstd"
    answer = msgspec.msgpack.decode(zstandard.ZstdDecompressor().stream_reader(raw).read())
    assert [r["status"] for r in answer["runs"]] == ["ok"] * 3 and answer["context_blob"] == blob
    assert len(raw) < len(blob) / 4
    small = client.get("/v1/chains", headers={**key(keys, "val"), "accept-encoding": "zstd"})
    assert "content-encoding" not in small.headers  # too small to be worth it


def test_traceparent_puts_the_run_in_the_callers_trace(client: httpx.Client, keys: dict[str, str]) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    from opentelemetry import trace

    with provider.get_tracer("caller").start_as_current_span("caller asks") as span:
        headers = dict(key(keys, "alice"))
        TraceContextTextMapPropagator().inject(headers)
        response = client.post("/v1/chains/qa/invoke", headers=headers, json={"inputs": {"question": "2 + 2?"}})
        caller = span.get_span_context()
    assert trace.get_current_span().get_span_context().is_valid is False
    body = response.json()
    assert body["trace_id"] == f"{caller.trace_id:032x}" == response.headers["x-trace-id"]
    spans = client.get(f"/v1/runs/{body['run_id']}", headers=key(keys, "alice")).json()["spans"]
    root = next(s for s in spans if s["name"] == "chain qa")
    assert root["parent_id"] == f"{caller.span_id:016x}"
    assert exporter.get_finished_spans()[0].name == "caller asks"
    # The envelope's trace_id alone joins that trace too.
    joined = client.post("/v1/chains/qa/invoke", headers=key(keys, "alice"),
                         json={"inputs": {"question": "2 + 2?"}, "trace_id": "ab" * 16}).json()
    assert joined["trace_id"] == "ab" * 16
    bad = client.post("/v1/chains/qa/invoke", headers={**key(keys, "alice"), "traceparent": "00-zz"},
                      json={"inputs": {"question": "2 + 2?"}})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "traceparent"


def test_a_run_that_joined_a_shared_trace_shows_its_own_spans_only(
    bench: wb.Workbench, client: httpx.Client, keys: dict[str, str]
) -> None:
    """Trace ids are not secrets (every traceparent header carries one): bob's run joined the trace alice's run was in,
    and alice's GET /v1/runs/ID listed bob's spans, his question and answer among them; run.trace held both runs."""
    trace_id = "cd" * 16
    mine = client.post("/v1/chains/qa/invoke", headers=key(keys, "alice"),
                       json={"inputs": {"question": "alice asks"}, "trace_id": trace_id}).json()
    theirs = client.post("/v1/chains/qa/invoke", headers=key(keys, "bob"),
                         json={"inputs": {"question": "bob's secret"}, "trace_id": trace_id}).json()
    assert mine["trace_id"] == theirs["trace_id"] == trace_id
    spans = client.get(f"/v1/runs/{mine['run_id']}", headers=key(keys, "alice")).json()["spans"]
    assert "bob's secret" not in json.dumps(spans)
    assert {s["attributes"]["workbench.run.id"] for s in spans if "workbench.run.id" in s["attributes"]} == {
        mine["run_id"]}
    for answer in (mine, theirs):
        table = bench.run(answer["run_id"]).trace.table()
        assert (table["name"] == "chain qa").sum() == 1 and table["parent_id"].notna().all()  # under the caller's span
        assert set(table["attributes.workbench.run.id"].dropna()) == {answer["run_id"]}



def test_a_run_that_began_a_trace_others_joined_shows_its_own_spans_only(
    client: httpx.Client, keys: dict[str, str]
) -> None:
    """Alice's run began its trace, and the server gave her its trace id and traceparent; bob, told them (they are no
    secret), joined that trace with a chain run and a direct model call, and alice's GET /v1/runs/ID, over REST and
    JSON-RPC, listed his spans as hers: his question, his prompt and the model's answers to them."""
    mine = client.post("/v1/chains/qa/invoke", headers=key(keys, "alice"), json={"inputs": {"question": "alice asks"}})
    trace_id, traceparent = mine.json()["trace_id"], mine.headers["traceparent"]
    joined = [
        client.post("/v1/chains/qa/invoke", headers=key(keys, "bob"),
                    json={"inputs": {"question": "bob's secret"}, "trace_id": trace_id}),
        client.post("/v1/chains/qa/invoke", headers={**key(keys, "bob"), "traceparent": traceparent},
                    json={"inputs": {"question": "bob's other secret"}}),
        client.post("/v1/completions", headers={**key(keys, "bob"), "traceparent": traceparent},
                    json={"model": "tiny", "prompt": "bob's prompt", "max_tokens": 2}),
    ]
    assert [r.status_code for r in joined] == [200, 200, 200]
    assert joined[0].json()["trace_id"] == joined[1].json()["trace_id"] == trace_id
    run_id = mine.json()["run_id"]
    by_rest = client.get(f"/v1/runs/{run_id}", headers=key(keys, "alice")).json()["spans"]
    by_rpc = client.post("/rpc", headers=key(keys, "alice"),
                         json=rpc("runs.get", {"run_id": run_id})).json()["result"]["spans"]
    for spans in (by_rest, by_rpc):
        assert "bob" not in json.dumps(spans)
        assert {s["attributes"].get("workbench.run.id") for s in spans} - {None} == {run_id}
        assert [s["name"] for s in spans if s["parent_id"] is None] == ["chain qa"]
        assert {s["name"] for s in spans} >= {"chain qa", "hop plan", "hop answer"}

# -- refusals and bad bodies -----------------------------------------------------------------------


def _run_count(bench: wb.Workbench) -> int:
    return len(bench.runs())


def test_bad_bodies_get_a_4xx_naming_the_fault_and_the_server_serves_on(client: httpx.Client,
                                                                       keys: dict[str, str],
                                                                       bench: wb.Workbench) -> None:
    alice = key(keys, "alice")
    before = _run_count(bench)

    def slow() -> Iterator[bytes]:
        yield b'{"inputs": '
        time.sleep(BODY_TIMEOUT_S + 1)
        yield b'{"question": "slow"}}'

    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"content": b'{"inputs": {"question": '}, 400, "body"),
        ({"content": b"\xc1\xc1", "headers": {"content-type": "application/msgpack"}}, 400, "body"),
        ({"content": b"question=hi", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415,
         "Content-Type"),
        ({"json": {"inputs": {"question": "x"}, "session_id": 7}}, 422, "$.session_id"),
        ({"json": {"inputs": {"question": "x"}, "colour": "red"}}, 422, "$.colour"),
        ({"json": {"inputs": {"question": "x"}, "context_blob": "x" * 70_000}}, 413, "$.context_blob"),
        ({"content": b"not zstd", "headers": {"content-encoding": "zstd"}}, 400, "Content-Encoding"),
        ({"json": {"inputs": {"question": "x"}, "action_type": "batch"}}, 422, "$.action_type"),
        ({"content": slow()}, 408, "body"),
        ({"content": b'{"inputs": {"question": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"}, 400, "body"),
        ({"content": b"\x81\xa6inputs\x81\xa8question" + b"\x91" * 100_000 + b"\x90",
          "headers": {"content-type": "application/msgpack"}}, 400, "body"),
    ]
    for request, status, field in cases:
        response = client.post("/v1/chains/qa/invoke", **{**request, "headers": {**alice, **request.get("headers", {})}})
        assert (response.status_code, response.json()["error"].get("field")) == (status, field), request
        assert response.json()["error"]["message"]
    big = client.post("/v1/chains/qa/invoke", headers=alice, content=b" " * (BODY_LIMIT + 1))
    assert big.status_code == 413 and big.json()["error"]["type"] == "PayloadTooLarge"
    missing = client.post("/v1/chains/qa/invoke", headers=alice, json={"inputs": {}})
    assert missing.status_code == 422 and missing.json()["error"]["type"] == "MissingInputError"
    assert client.post("/v1/chains/nope/invoke", headers=alice, json={"inputs": {}}).status_code == 404
    assert _run_count(bench) == before  # none of these started a run
    assert client.post("/v1/chains/qa/invoke", headers=alice, json={"inputs": {"question": "still there?"}}).json()[
        "status"] == "ok"


def test_refused_callers_start_no_run(client: httpx.Client, keys: dict[str, str], bench: wb.Workbench) -> None:
    before = _run_count(bench)
    body = {"inputs": {"question": "x"}}
    none = client.post("/v1/chains/qa/invoke", json=body)
    assert none.status_code == 401 and none.headers["www-authenticate"].startswith("Bearer")
    assert client.post("/v1/chains/qa/invoke", json=body, headers={"x-api-key": "agw_nope_nope"}).status_code == 401
    assert client.post("/v1/chains/qa/stream", json=body, headers=key(keys, "val")).status_code == 403
    assert client.post("/v1/completions", headers=key(keys, "val"),
                       json={"model": "tiny", "prompt": "x"}).status_code == 403
    assert _run_count(bench) == before


def test_rate_limited_callers_get_429_with_retry_after(bench: wb.Workbench, keys: dict[str, str]) -> None:
    auth = Auth(keys["_dir"], rate_per_s=0.1, burst=1)
    with bench.serve(chains=[bench.chains()["qa"]], port=0, auth=auth) as limited, \
            httpx.Client(base_url=limited.url) as c:
        assert c.get("/v1/chains", headers=key(keys, "val")).status_code == 200
        refused = c.get("/v1/chains", headers=key(keys, "val"))
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert c.get("/v1/chains", headers=key(keys, "root")).status_code == 200  # another caller's own bucket


def test_a_model_whose_breaker_is_open_answers_503_with_retry_after(client: httpx.Client, keys: dict[str, str],
                                                                     bench: wb.Workbench) -> None:
    """A client (the openai package's retries, a load balancer) learns from Retry-After when the model takes
    requests again: the breaker's trial, whether it called the model or a chain whose hop did."""
    alice = key(keys, "alice")
    bench.set_breaker("tiny", failure_threshold=1, reset_timeout_s=30)
    bench.inject("tiny", error_rate=1.0)
    try:
        failed = client.post("/v1/completions", headers=alice, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert failed.status_code == 500 and "retry-after" not in failed.headers  # the model's own failure: no wait
        direct = client.post("/v1/completions", headers=alice, json={"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert direct.json()["error"]["type"] == "CircuitOpen"
        assert direct.status_code == 503 and 1 <= int(direct.headers["retry-after"]) <= 30
        run = client.post("/v1/chains/qa/invoke", headers=alice, json={"inputs": {"question": "Open?"}})
        assert run.json()["status"] == "error" and run.status_code == 503
        assert 1 <= int(run.headers["retry-after"]) <= 30
    finally:
        bench.clear_faults()
        bench.set_breaker("tiny")
    assert client.post("/v1/chains/qa/invoke", headers=alice, json={"inputs": {"question": "Back?"}}).status_code == 200


def test_a_batch_holds_a_run_slot_for_each_run_it_keeps_in_flight(bench: wb.Workbench, keys: dict[str, str]) -> None:
    """``max_in_flight`` bounds the runs in flight however callers bunch them: two batches of 6 (concurrency 6) and
    a single call, on a server of 2 slots, never run more than 2 at once, and every answer is the caller's own."""
    from concurrent.futures import ThreadPoolExecutor

    import helpers

    chain = bench.chain({"name": "slow", "hops": [{"name": "echo", "call": "helpers:slow_echo"}], "output": "echo"})
    helpers.SLOW_ECHO.peak = 0
    auth = Auth(keys["_dir"], rate_per_s=None)
    with bench.serve(chains=[chain], port=0, auth=auth, max_in_flight=2) as served:
        def post(path: str, body: dict[str, Any]) -> httpx.Response:
            with httpx.Client(base_url=served.url, timeout=60) as c:
                return c.post(path, headers=key(keys, "alice"), json=body)

        batches = [[{"question": f"{b}-{i}"} for i in range(6)] for b in range(2)]
        with ThreadPoolExecutor(3) as pool:
            sent = [pool.submit(post, "/v1/chains/slow/batch", {"inputs": inputs, "concurrency": 6})
                    for inputs in batches]
            alone = pool.submit(post, "/v1/chains/slow/invoke", {"inputs": {"question": "alone"}})
            answers = [future.result() for future in sent]
            assert alone.result().json()["output"] == "alone"
    for inputs, answer in zip(batches, answers):
        assert answer.status_code == 200, answer.text
        assert [run["output"] for run in answer.json()["runs"]] == [item["question"] for item in inputs]
    assert helpers.SLOW_ECHO.peak == 2  # 2, not 13: each batch ran on as many slots as it held


def test_a_full_server_refuses_more_calls_at_once_with_503_and_retry_after(bench: wb.Workbench,
                                                                              keys: dict[str, str]) -> None:
    """Beyond ``max_in_flight`` running and ``max_queued`` waiting, a call is refused at once (ServerBusy: 503 with
    Retry-After), a stream before its 200, rather than held with its body and connection for as long as the queue
    takes; the calls already in wait are served."""
    from concurrent.futures import ThreadPoolExecutor

    import helpers

    chain = bench.chain({"name": "gated", "hops": [{"name": "echo", "call": "helpers:gated_echo"}], "output": "echo"})
    auth = Auth(keys["_dir"], rate_per_s=None)
    alice = key(keys, "alice")
    helpers.GATE.clear()
    with bench.serve(chains=[chain], port=0, auth=auth, max_in_flight=1, max_queued=2) as served, \
            httpx.Client(base_url=served.url, timeout=60) as c, ThreadPoolExecutor(3) as pool:
        gateway = served.app.state.gateway
        try:
            def invoke(question: str) -> httpx.Response:
                with httpx.Client(base_url=served.url, timeout=60) as own:
                    return own.post("/v1/chains/gated/invoke", headers=alice, json={"inputs": {"question": question}})

            running = pool.submit(invoke, "first")
            eventually(lambda: gateway.slots.free == 0, "the first call to take the one slot")
            waiting = [pool.submit(invoke, q) for q in ("second", "third")]
            eventually(lambda: gateway.slots.waiting == 2, "two calls to wait for the slot")
            assert 'autoglm_gateway_runs_waiting 2.0' in c.get("/metrics", headers=key(keys, "root")).text
            refused = c.post("/v1/chains/gated/invoke", headers=alice, json={"inputs": {"question": "fourth"}})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            error = refused.json()["error"]
            assert error["type"] == "ServerBusy"
            assert "max_queued=2" in error["message"] and "nothing ran" in error["message"]
            streamed = c.post("/v1/chains/gated/stream", headers=alice, json={"inputs": {"question": "fifth"}})
            assert streamed.status_code == 503 and streamed.json()["error"]["type"] == "ServerBusy"
            batch = c.post("/v1/chains/gated/batch", headers=alice, json={"inputs": [{"question": "sixth"}]})
            assert batch.status_code == 503
            for stream in (False, True):  # a model called directly takes a slot too
                called = c.post("/v1/completions", headers=alice,
                                json={"model": "tiny", "prompt": "Hi", "max_tokens": 2, "stream": stream})
                assert called.status_code == 503 and called.headers["retry-after"] == "1", called.text
        finally:
            helpers.GATE.set()
        answers = [running.result(), *(f.result() for f in waiting)]
    assert [a.json()["output"] for a in answers] == ["first", "second", "third"]
    assert not any(r.inputs.get("question") in ("fourth", "fifth", "sixth") for r in bench.runs())  # nothing ran


def test_serving_limits_that_would_fail_every_call_are_refused_before_the_server_starts(bench: wb.Workbench) -> None:
    for options, wrong in [({"max_in_flight": 0}, "max_in_flight=0"), ({"max_in_flight": "8"}, "max_in_flight='8'"),
                           ({"max_queued": -1}, "max_queued=-1"), ({"body_timeout_s": 0}, "body_timeout_s=0"),
                           ({"body_timeout_s": float("nan")}, "body_timeout_s=nan"),
                           ({"max_inflight": 8}, "did you mean 'max_in_flight'")]:
        with pytest.raises(ServeError, match=re.escape(wrong)):
            bench.serve(port=0, auth=False, **options)
    with bench.serve(port=0, auth=False, max_in_flight=np.int64(2), max_queued=0) as served:  # a numpy count is one
        assert served.app.state.gateway.max_in_flight == 2
    # An empty host: the socket took it as every interface (auth on, a URL of http://:PORT); nobody means that.
    for host in ("", " "):
        with pytest.raises(ServeError, match=re.escape(f"host {host!r} is empty: name the address to listen on")):
            bench.serve(port=0, host=host)


def test_run_slots_serve_waiters_in_turn_and_a_cancelled_waiter_gives_its_place_up() -> None:
    import asyncio

    from workbench.fronts.server.gateway import RunSlots

    async def scenario() -> None:
        slots = RunSlots(4)
        await slots.acquire(3)
        big = asyncio.ensure_future(slots.acquire(4))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(slots.acquire(1))  # one is free, but it waits its turn behind the batch
        await asyncio.sleep(0)
        assert not big.done() and not small.done() and slots.free == 1
        big.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert big.cancelled() and small.done() and slots.free == 0
        slots.release(3)
        slots.release(1)
        assert slots.free == 4
        with pytest.raises(ValueError, match="1 to 4 slots"):
            await slots.acquire(5)

    asyncio.run(scenario())


def test_serving_without_credentials_is_for_loopback_only(bench: wb.Workbench) -> None:
    with pytest.raises(SettingsError, match="loopback"):
        bench.serve(port=0, host="0.0.0.0", auth=False)
    with bench.serve(port=0) as guarded, httpx.Client(base_url=guarded.url) as c:  # the default needs keys
        assert c.get("/v1/chains").status_code == 401
    with bench.serve(port=0, auth=False) as open_, httpx.Client(base_url=open_.url) as c:
        assert c.get("/v1/chains").status_code == 200


# -- admin routes ----------------------------------------------------------------------------------

SERVED_SPEC = """\
name: shout
hops:
  - name: say
    model: tiny
    prompt: "Say: {{ word }}"
    max_new_tokens: 3
"""


def test_admins_register_chains_whose_python_hops_the_server_allows(client: httpx.Client,
                                                                    keys: dict[str, str]) -> None:
    yaml = {"content-type": "application/yaml"}
    assert client.post("/v1/chains", headers={**key(keys, "alice"), **yaml}, content=SERVED_SPEC).status_code == 403
    made = client.post("/v1/chains", headers={**key(keys, "root"), **yaml}, content=SERVED_SPEC)
    assert made.status_code == 201 and made.json()["inputs"] == ["word"]
    ran = client.post("/v1/chains/shout/invoke", headers=key(keys, "alice"), json={"inputs": {"word": "hi"}})
    assert ran.json()["status"] == "ok"
    for call in ("os:system", "helpers:free_port"):  # the standard library, and the server's own code
        spec = f"name: evil\nhops:\n  - name: x\n    call: {call}\n"
        refused = client.post("/v1/chains", headers=key(keys, "root"), json={"spec": spec})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "call", call
    demo = "name: canned\nhops:\n  - name: n\n    call: workbench.demo:canned_answer\n"  # the one module always open
    assert client.post("/v1/chains", headers=key(keys, "root"), json={"spec": demo}).status_code == 201
    canned = client.post("/v1/chains/canned/invoke", headers=key(keys, "alice"), json={"inputs": {"question": "?"}})
    assert canned.json()["status"] == "ok"


def test_admins_load_and_unload_models(client: httpx.Client, keys: dict[str, str], tiny_path: Path) -> None:
    body = {"name": "extra", "source": str(tiny_path), "device": "cpu"}
    assert client.post("/v1/models", headers=key(keys, "alice"), json=body).status_code == 403
    loaded = client.post("/v1/models", headers=key(keys, "root"), json=body)
    assert loaded.status_code == 201 and loaded.json()["device"] == "cpu"
    assert "extra" in {m["id"] for m in client.get("/v1/models", headers=key(keys, "val")).json()["data"]}
    assert client.delete("/v1/models/extra", headers=key(keys, "root")).status_code == 200
    assert "extra" not in {m["id"] for m in client.get("/v1/models", headers=key(keys, "val")).json()["data"]}
    assert client.delete("/v1/models/extra", headers=key(keys, "root")).status_code == 404


def test_concurrent_calls_each_get_their_own_answer(client: httpx.Client, server: Server,
                                                     keys: dict[str, str]) -> None:
    import asyncio

    from workbench.demo import canned_answer

    spec = "name: echo\nhops:\n  - name: n\n    call: workbench.demo:canned_answer\n"
    assert client.post("/v1/chains", headers=key(keys, "root"), json={"spec": spec}).status_code == 201
    questions = [f"question number {i}" for i in range(200)]

    async def load() -> list[httpx.Response]:
        gate = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server.url, headers=key(keys, "alice"), timeout=60) as c:
            async def one(q: str) -> httpx.Response:
                async with gate:
                    return await c.post("/v1/chains/echo/invoke", json={"inputs": {"question": q}})

            return await asyncio.gather(*(one(q) for q in questions))

    answers = asyncio.run(load())
    assert [r.status_code for r in answers] == [200] * len(questions)
    assert [r.json()["output"] for r in answers] == [canned_answer(q) for q in questions]
    assert len({r.json()["run_id"] for r in answers}) == len(questions)


# -- the fronts: the command line and the magics ---------------------------------------------------


def test_autoglm_serve_runs_as_a_child_process(tiny_path: Path, tmp_path: Path) -> None:
    spec = tmp_path / "qa.yaml"
    spec.write_text(json.dumps(QA_SPEC))  # JSON is YAML
    data = tmp_path / "data"
    runner = KeyStore(data).add("cli", "runner")
    port = free_port()
    command = [sys.executable, "-m", "workbench.fronts.cli", "serve", "--spec", str(spec),
               "--model", f"tiny={tiny_path}", "--device", "cpu", "--port", str(port), "--data-dir", str(data)]
    log = (tmp_path / "serve.log").open("w+")
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + CLI_START_S
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"autoglm serve did not come up:\n{log.read()}")
            time.sleep(0.2)
        body = {"inputs": {"question": "2 + 2?"}}
        assert httpx.post(f"{url}/v1/chains/qa/invoke", json=body).status_code == 401
        answer = httpx.post(f"{url}/v1/chains/qa/invoke", json=body, headers={"x-api-key": runner}, timeout=60)
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
    finally:
        child.send_signal(signal.SIGTERM)  # what a container runtime sends; Ctrl-C stops it the same way
        code = child.wait(30)
        log.seek(0)
        said = log.read()
        log.close()
    assert code == 0, said
    assert f"serving qa on http://127.0.0.1:{port}" in said and said.rstrip().endswith("stopped")


def test_the_serve_magic_starts_and_stops_a_server(tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workbench.bench

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "workbench")
    monkeypatch.setattr(workbench.bench, "_current", workbench.bench._current)
    with wb.set_current(wb.Workbench()) as current:
        current.load("tiny", tiny_path, device="cpu")
        current.chain(QA_SPEC)
        with capture_output() as started:
            shell.run_line_magic("autoglm", "serve qa --port 0 --grpc-port 0 --no-auth")
        server = shell.user_ns["_autoglm_server"]
        assert f"serving qa on {server.url}" in started.stdout
        assert f"gRPC (ChainService) on {server.grpc.target}" in started.stdout
        answer = httpx.post(f"{server.url}/v1/chains/qa/invoke", json={"inputs": {"question": "hi"}}, timeout=60)
        assert answer.json()["status"] == "ok"
        import grpc

        from workbench.fronts.server import chain_pb2, chain_pb2_grpc

        with grpc.insecure_channel(server.grpc.target) as channel:
            reply = chain_pb2_grpc.ChainServiceStub(channel).Invoke(
                chain_pb2.InvokeRequest(chain="qa", inputs_json=json.dumps({"question": "hi"})), timeout=60)
        assert json.loads(reply.output_json) == answer.json()["output"]
        with capture_output() as stopped:
            shell.run_line_magic("autoglm", "serve stop")
        assert f"stopped {server.url}" in stopped.stdout
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health")
        with capture_output() as unknown:
            shell.run_line_magic("autoglm", "serve nope")
        assert "no chain named 'nope'" in unknown.stderr


def test_closing_the_workbench_stops_its_servers(tmp_path: Path) -> None:
    """A server runs on the workbench's loop: close() stops it first, so no socket outlives the workbench."""
    bench = wb.Workbench(data_dir=tmp_path)
    try:
        chain = bench.chain({"name": "echo", "hops": [{"name": "say", "call": "workbench.demo:canned_answer"}]})
        server = bench.serve(chains=[chain], port=0, auth=False)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        bench.close()
    assert not server.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=5)


def test_a_chain_built_on_another_workbench_is_refused_before_anything_serves(tmp_path: Path) -> None:
    """Its runs would go to the other workbench (closed, say, after a %load_ext reload): refused, naming it."""
    spec = {"name": "echo", "hops": [{"name": "say", "call": "workbench.demo:canned_answer"}]}
    with wb.Workbench(data_dir=tmp_path / "a") as old:
        stale = old.chain(spec)
    with wb.Workbench(data_dir=tmp_path / "b") as bench:
        with pytest.raises(SettingsError, match="chain 'echo' was not built on this workbench"):
            bench.serve(chains=[stale], port=0, auth=False)
        with bench.serve(chains=[bench.chain(spec)], port=0, auth=False) as served:
            answer = httpx.post(f"{served.url}/v1/chains/echo/invoke", json={"inputs": {"question": "?"}}, timeout=30)
            assert answer.json()["status"] == "ok"


def test_the_exact_cache_keeps_each_callers_answers_apart_and_an_open_server_shares_the_notebooks(
    bench: wb.Workbench, keys: dict[str, str]
) -> None:
    """One cache for every caller: bob, sending the prompt alice had sent, got her stored answer, and could tell from
    workbench.cache.hit (or the speed) that somebody had sent it."""
    spec = {"name": "cached", "hops": [{"name": "answer", "model": "tiny", "prompt": "Question: {{ question }}\nAnswer:",
                                        "max_new_tokens": 4, "cache": "exact"}]}
    chain = bench.chain(spec)
    bench.clear_cache(chain="cached")

    def hits(response: httpx.Response) -> list[object]:
        assert response.status_code == 200, response.text
        spans = [s for s in response.json()["spans"] if s["name"] == "hop answer"]
        return [s["attributes"].get(attr.CACHE_HIT) for s in spans]

    question = {"inputs": {"question": "alice's own question"}}
    auth = Auth(keys["_dir"], rate_per_s=None)
    with bench.serve(chains=[chain], port=0, auth=auth) as served, httpx.Client(base_url=served.url, timeout=60) as c:
        def ask(who: str) -> list[object]:
            run_id = c.post("/v1/chains/cached/invoke", headers=key(keys, who), json=question).json()["run_id"]
            return hits(c.get(f"/v1/runs/{run_id}", headers=key(keys, who)))

        assert ask("alice") == [False]
        assert ask("bob") == [False]  # was [True]: alice's answer, and the news that she had asked
        assert ask("alice") == [True] and ask("bob") == [True]  # each caller's own answers are still reused
    # A server without credentials is this machine's own: it shares the notebook's answers, as before.
    notebook = chain.run(question="asked in the notebook")
    assert notebook.trace.table()[f"attributes.{attr.CACHE_HIT}"].dropna().tolist() == [False]
    with bench.serve(chains=[chain], port=0, auth=False) as served, httpx.Client(base_url=served.url, timeout=60) as c:
        run_id = c.post("/v1/chains/cached/invoke", json={"inputs": {"question": "asked in the notebook"}}).json()["run_id"]
        assert hits(c.get(f"/v1/runs/{run_id}")) == [True]
