"""Models behind an OpenAI-compatible server: a real `transformers serve` on the tiny model, and for the failures a
real server cannot make on demand, a tiny real HTTP server written here that misbehaves (named FaultServer)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import psutil
import pytest

import workbench as wb
from workbench.engine.worker import STOP_GRACE_S
from workbench.errors import (
    HopFailed,
    HopTimeout,
    InvalidInput,
    ModelLoadError,
    RemoteError,
    RemoteRateLimited,
    WorkerStopped,
)
from workbench.tracing import attributes as attr

from helpers import WAIT_S, Server, eventually, free_port

PROMPTS = ["Question: What is the capital of France?\nAnswer:", "The sea is", "Plan:"]


@pytest.fixture(scope="module")
def remote(server: Server, tiny_path: Path) -> Iterator[wb.Workbench]:
    """A workbench with the served tiny model as 'remote' and the same model in process as 'tiny'."""
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("remote", server.url)
        bench.load("tiny", tiny_path, device="cpu")
        yield bench


def _chain(bench: wb.Workbench, model: str = "remote", **hop: object) -> wb.Chain:
    spec = {"name": f"on-{model}", "hops": [{"name": "answer", "model": model, "prompt": "{{ prompt }}",
                                             "max_new_tokens": 12, **hop}], "output": "answer"}
    return bench.chain(spec)


def _request_span(run: wb.Run) -> dict[str, object]:
    (span,) = [s for s in run.trace.spans if s.name.startswith("text_completion")]
    return dict(span.attributes or {})


# -- the real server -----------------------------------------------------------------------------


def test_a_served_model_writes_the_same_greedy_text_as_the_local_one(remote: wb.Workbench) -> None:
    served, local = _chain(remote), _chain(remote, "tiny")
    for prompt in PROMPTS:
        assert served.run(prompt=prompt).output == local.run(prompt=prompt).output


def test_loading_a_url_asks_the_server_and_shows_a_remote_row(remote: wb.Workbench, tiny_path: Path) -> None:
    row = remote.models().set_index("name").loc["remote"]
    assert row["device"] == "remote"
    assert row["source"].startswith("http://127.0.0.1:")
    assert pd.isna(row["params"]) and pd.isna(row["memory_mb"])  # not known of a model on a server
    loaded = remote.registry.get("remote")
    assert loaded.settings.served_model == str(tiny_path)  # the one model the server lists
    assert loaded.context_window == 512  # from the served model's config, which is on this machine


def test_streamed_tokens_reach_chain_stream(remote: wb.Workbench) -> None:
    events = list(_chain(remote).stream(prompt=PROMPTS[0]))
    tokens = [e.text for e in events if e.kind == "token"]
    (finished,) = [e for e in events if e.kind == "run_finished"]
    assert len(tokens) > 1
    assert "".join(tokens).strip() == finished.run.output


def test_the_request_span_records_what_a_serving_researcher_reads(remote: wb.Workbench) -> None:
    run = _chain(remote).run(prompt=PROMPTS[0])
    span = _request_span(run)
    assert span[attr.HTTP_STATUS] == 200
    assert span[attr.REMOTE_TOKENS_FROM] == "server"
    tokens = span[attr.USAGE_OUTPUT_TOKENS]
    assert isinstance(tokens, int) and tokens > 1
    assert span[attr.RESPONSE_FINISH_REASONS] == ("length",) or span[attr.RESPONSE_FINISH_REASONS] == ("stop",)
    ttft, e2e = span[attr.REMOTE_TTFT_MS], span[attr.REMOTE_E2E_MS]
    assert 0 < ttft <= e2e  # type: ignore[operator]
    assert span[attr.REMOTE_TPOT_MS] == pytest.approx((e2e - ttft) / (tokens - 1))  # type: ignore[operator]
    assert len(span[attr.REMOTE_ITL_MS]) == span[attr.REMOTE_CHUNKS] - 1  # type: ignore[arg-type, operator]
    # The prompt surely fit the window by its length, so it went out untokenized: the server's usage counted it.
    assert span[attr.PROMPT_UNCOUNTED] is True
    assert span[attr.USAGE_INPUT_TOKENS] == len(remote.registry.get("tiny").tokenizer(PROMPTS[0])["input_ids"])
    row = run.trace.table().query("name == 'text_completion remote'").iloc[0]
    assert row["tokens_out"] == tokens and row["tpot_ms"] > 0


def test_a_prompt_cut_to_fit_the_window_is_sent_cut(remote: wb.Workbench) -> None:
    long = "word " * 600  # the tiny model's window is 512 tokens
    run = _chain(remote, truncate="left").run(prompt=long)
    span = _request_span(run)
    assert span[attr.TRUNCATED_TOKENS] > 0
    assert span[attr.USAGE_INPUT_TOKENS] + 12 <= 512 + 1  # what the server read; it adds back a BOS
    assert isinstance(run.output, str)


def test_a_prompt_too_long_to_be_sure_of_is_counted_here_before_it_is_sent(remote: wb.Workbench) -> None:
    # 500 bytes, 12 new tokens, a 512-token window: it may not fit by its length, so the tokenizer here decides.
    prompt = "word " * 100
    span = _request_span(_chain(remote).run(prompt=prompt))
    assert attr.PROMPT_UNCOUNTED not in span
    assert span[attr.USAGE_INPUT_TOKENS] == len(remote.registry.get("tiny").tokenizer(prompt)["input_ids"])
    assert not span.get(attr.TRUNCATED_TOKENS)


def test_a_chat_for_a_served_model_without_a_chat_template_fails_saying_so(remote: wb.Workbench) -> None:
    # The tiny model has none. transformers serve 5.24 answers a bare HTTP 500, and the hint says why that may be;
    # 5.25 answers HTTP 400 with transformers' own words, and the hint says so (it said "the server refused the
    # request as sent").
    chain = remote.chain({"name": "chat", "hops": [
        {"name": "answer", "model": "remote", "messages": [{"role": "user", "content": "{{ prompt }}"}]}]})
    with pytest.raises(HopFailed) as caught:
        chain.run(prompt=PROMPTS[1])
    error = caught.value.cause
    assert isinstance(error, RemoteError) and error.url.endswith("/v1/chat/completions")
    if (error.kind, error.status) == ("rejected", 400):
        assert "chat template" in error.message and error.hint == (
            "the served model has no chat template, so it cannot take messages: give the hop prompt: instead")
    else:
        assert (error.kind, error.status) == ("status", 500)
        assert "without a chat template" in (error.hint or "")


def test_every_batching_policy_gives_the_same_answers(remote: wb.Workbench) -> None:
    chain = _chain(remote)
    inputs = [{"prompt": p} for p in PROMPTS * 2]
    answers = {}
    for policy in (wb.NoBatching(), wb.DynamicBatching(max_batch=4, max_wait_ms=20), wb.ContinuousBatching(8)):
        remote.set_batching("remote", policy)
        answers[policy.name] = [run.output for run in chain.map(inputs, concurrency=6)]
    remote.set_batching("remote", wb.ContinuousBatching())
    assert len(set(map(tuple, answers.values()))) == 1, answers


def test_health_probes_and_injected_faults_reach_a_served_model(remote: wb.Workbench) -> None:
    assert remote.check_health("remote").loc[0, "health"] == "healthy"
    remote.inject("remote", error_rate=1.0, seed=0)
    try:
        assert "injected fault" in str(_failed(_chain(remote), prompt=PROMPTS[1]).error)
    finally:
        remote.clear_faults("remote")
    assert _chain(remote).run(prompt=PROMPTS[1]).error is None


def test_a_loop_lane_batch_span_covers_its_stream_and_links_its_request(remote: wb.Workbench) -> None:
    # Made when the stream has ended (so it is not in the TTFT), stamped with when the request went out.
    run = _chain(remote).run(prompt=PROMPTS[2])
    (request,) = [s for s in run.trace.spans if s.name.startswith("text_completion")]
    span_id = request.context.span_id
    (batch,) = [s for s in remote.traces().spans if s.name == "batch remote"
                and any(link.context.span_id == span_id for link in s.links)]
    assert batch.attributes[attr.BATCH_MODE] == "continuous" and batch.attributes[attr.BATCH_SIZE] == 1
    assert request.start_time <= batch.start_time <= batch.end_time <= request.end_time
    stream_ms = float(request.attributes[attr.REMOTE_E2E_MS])
    assert (batch.end_time - batch.start_time) / 1e6 >= stream_ms - 0.5  # the POST to the end of the stream, at least
    assert batch.status.status_code.name == "OK"


def test_a_hop_streams_on_the_workbench_loop_and_faults_send_it_through_the_worker(remote: wb.Workbench) -> None:
    """The loop lane: a chain's remote call goes out from the workbench's own loop (no worker thread in between),
    capped by the continuous policy's max_batch; with faults injected it takes the worker's path, where they apply."""
    worker = remote.engine.worker("remote")
    backend = worker.backend
    real = backend.astream
    seen: list[str] = []
    streaming = [0, 0]  # now, most at once

    async def observed(request, batch_id, batch_size):  # type: ignore[no-untyped-def]
        seen.append(threading.current_thread().name)
        streaming[0] += 1
        streaming[1] = max(streaming)
        try:
            return await real(request, batch_id, batch_size)
        finally:
            streaming[0] -= 1

    backend.astream = observed
    try:
        remote.set_batching("remote", wb.ContinuousBatching(2))
        runs = _chain(remote).map([{"prompt": p} for p in PROMPTS * 2], concurrency=6)
        assert [r.error for r in runs] == [None] * 6
        assert seen == ["workbench-loop"] * 6
        assert streaming[1] <= 2  # ContinuousBatching(2): two streams at a time
        assert worker._lane_inflight == 0
        slots = [s for loop, (limit, s) in worker._lane_slots.items() if limit == 2]
        assert slots and all(s._value == 2 for s in slots)  # every slot handed back
        remote.inject("remote", error_rate=1.0, seed=0)
        try:
            assert not worker.lane_open()
            assert "injected fault" in str(_failed(_chain(remote), prompt=PROMPTS[1]).error)
        finally:
            remote.clear_faults("remote")
        assert len(seen) == 6  # the faulted call never reached the lane
        assert remote.generate("remote", PROMPTS[1], max_new_tokens=4).text  # a script's call: the worker's path
        assert len(seen) == 6
    finally:
        backend.astream = real
        remote.set_batching("remote", wb.ContinuousBatching())


def test_unloading_a_served_model_lets_the_streams_its_loop_lane_has_in_flight_finish(server: Server) -> None:
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("r", server.url)
        worker = bench.engine.worker("r")
        backend = worker.backend
        real = backend._stream

        async def late(*args, **kwargs):  # type: ignore[no-untyped-def]
            # In flight on the lane, not yet sent when the unload begins (its loop was busy, say): all six were cut
            # off as if the server had been silent since before they were sent, on a busy CI machine.
            await asyncio.sleep(0.5)
            return await real(*args, **kwargs)

        backend._stream = late
        chain = _chain(bench, "r", max_new_tokens=24)
        runs: list[list[wb.Run]] = []
        mapping = threading.Thread(target=lambda: runs.append(chain.map([{"prompt": p} for p in PROMPTS * 2],
                                                                        concurrency=6)))
        mapping.start()
        eventually(lambda: worker._lane_inflight > 0, "a stream in flight on the loop lane")
        streaming = worker._lane_inflight
        bench.unload("r")  # returns once the streams in flight have ended
        assert worker._lane_inflight == 0
        mapping.join(60)
        (done,) = runs
        assert sum(r.error is None for r in done) >= streaming, [str(r.error) for r in done]
        for run in done:  # one not yet sent when the model went is refused, saying why
            assert run.error is None or "unloaded" in str(run.error) or "not loaded" in str(run.error), run.error


def _connections_to(url: str) -> set[tuple[str, int]]:
    """This process's open TCP connections to ``url``'s port, by their local address."""
    port = urlsplit(url).port
    return {tuple(c.laddr) for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}


def test_models_on_one_server_share_its_pooled_connections(server: Server) -> None:
    """vLLM serves a base model and each LoRA adapter under names of their own: a chain calling two of them went out
    on two pools, one per model, each opening its own connections to the same server."""
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("base", server.url)
        bench.load("other", server.url)
        on_base, on_other = _chain(bench, "base"), _chain(bench, "other")
        assert on_base.run(prompt=PROMPTS[1]).error is None
        warm = _connections_to(server.url)
        assert on_other.run(prompt=PROMPTS[1]).error is None
        # The other model's request went out on a kept connection: none is new. (Other tests' workbenches in this
        # process hold connections to the same server, which its keep-alive timeout may close meanwhile: a count of
        # them all fell from 7 to 1 once.)
        assert warm and not _connections_to(server.url) - warm
        bench.unload("base")  # its last user on the loop is "other" now: the pool stays open for it
        run = on_other.run(prompt=PROMPTS[2])
        assert run.error is None and run.output == bench.generate("other", PROMPTS[2], max_new_tokens=12).text
        bench.unload("other")
        eventually(lambda: not _connections_to(server.url), "every connection to the server closed")


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0, -1.0, "60", True])
def test_a_read_timeout_that_is_no_finite_number_of_seconds_is_refused(
    bench: wb.Workbench, faults: FaultServer, timeout: object
) -> None:
    """NaN never timed out (a silent server held its requests for good); 0 or less failed every request at once."""
    for call in (bench.register, bench.load):
        with pytest.raises(ModelLoadError, match="read_timeout_s must be a finite number of seconds > 0"):
            call("r", f"{faults.url}/ok/v1", read_timeout_s=timeout)
    assert "r" not in bench.registry.names()
    bench.load("r", f"{faults.url}/ok/v1", read_timeout_s=2)
    assert bench.generate("r", "hi", max_new_tokens=4).text == "fine words"


def test_a_url_where_no_server_listens_does_not_load(bench: wb.Workbench) -> None:
    with pytest.raises(ModelLoadError, match="cannot reach a model server") as info:
        bench.load("gone", f"http://127.0.0.1:{free_port()}/v1")
    assert "start the server" in str(info.value)
    assert "gone" not in bench.registry.names()


# -- failures a real server cannot make on demand: a tiny misbehaving HTTP server ------------------


# Streams a server that is broken or lies sends, by mode: each the chunks of one answer.
CANNED: dict[str, list[object]] = {
    # 15,000 characters: no 12 tokens are that long.
    "wordy": [{"choices": [{"index": 0, "text": "x" * 5000, "finish_reason": finish}]}
              for finish in (None, None, "stop")],
    "failing": [{"choices": [{"index": 0, "text": " a"}]}, {"error": {"message": "out of blocks " * 100_000}}],
    "misshapen": [{"choices": [{"index": 0, "text": " a"}]}, {"choices": [5]}],
    "lying": [{"choices": [{"index": 0, "text": " two words", "finish_reason": "stop"}],
               "usage": {"prompt_tokens": -3, "completion_tokens": 10**9}}],
    "oddusage": [{"choices": [{"index": 0, "text": " two words", "finish_reason": "stop"}], "usage": [3, 2]}],
    "boolusage": [{"choices": [{"index": 0, "text": " two words", "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": True, "completion_tokens": True}}],
    # Some providers and gateways send an error field in every chunk, null while all is well.
    "nullerror": [{"error": None, "choices": [{"index": 0, "text": text, "finish_reason": finish}]}
                  for text, finish in ((" two", None), (" words", "stop"))],
    # An answer that starts and ends with whitespace, as most completions start with a space.
    "spaced": [{"choices": [{"index": 0, "text": text, "finish_reason": "stop" if text == " \n" else None}]}
               for text in ("\n", " The", " answer ", "\n", " is.", " \n")],
}


# GET /models answers whose ids are not all text, by mode.
MODEL_LISTS: dict[str, list[object]] = {
    "oddids": [{"id": 5, "object": "model"}, {"id": None}, {"id": {"name": "x"}}, {"object": "model"},
               {"id": "faulty", "object": "model"}],
    "numbered": [{"id": 7, "object": "model"}],
}


class FaultServer:
    """A real HTTP/1.1 server on 127.0.0.1 (asyncio streams) that misbehaves as its URL says: an imitation of a
    failing model server, for failures `transformers serve` cannot produce on demand.

    ``{url}/{mode}/v1`` is an OpenAI base URL; ``mode`` is ``ok`` (a good stream), ``error500``, ``reject``
    (400), ``busy`` (429 with Retry-After: 1 on the first request, then good), ``closed`` (429 with
    Retry-After: a day, always), ``broken`` (one chunk, then the connection drops), ``silent`` (takes the
    request and never answers), ``huge`` (a first line of 3 MiB), ``endless`` (text chunks until the client
    hangs up), ``bigerror`` (a 500 whose body says it is 100 MiB and never ends), ``biglist`` (a GET /models
    answer that never ends), ``slowhead`` (a GET /models answer whose status line and headers come a byte at a time),
    one of ``MODEL_LISTS`` (that GET /models list), ``ends-REASON`` (two words, the last with finish_reason REASON),
    ``lingers``, ``closes`` and ``drops`` (a whole answer and its usage, never a [DONE]: the connection then stays
    open with keep-alive comments, closes, or closes half way through a chunk), ``pings`` (SSE comments every 20 ms and never a data
    line), ``stalls`` (one chunk, then ``pings``), ``drip`` (a good stream of eight words, one each DRIP_S),
    ``queue`` (``drip``'s stream, but one request at a time, the others waiting unanswered, as ``transformers serve``
    does), or one of ``CANNED`` (those chunks, then [DONE]). Asked as a proxy (an absolute URL in the request line), it
    answers for any host as if it were that host, and keeps the URL in ``proxied``.
    """

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.proxied: list[str] = []
        self.keys_seen: list[tuple[str, str | None]] = []  # (Host, Authorization) of each request
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._handlers: set[asyncio.Task[None]] = set()
        self._one_at_a_time = asyncio.Lock()
        self._server = self._run(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def _run(self, coroutine):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

        self._run(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            path = head.split(" ")[1]
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])}
            self.keys_seen.append((fields.get("host", ""), fields.get("authorization")))
            if not path.startswith("/"):  # absolute form: a client that takes this server for its proxy
                self.proxied.append(path)
                path = urlsplit(path).path
            length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                           if line.lower().startswith("content-length:")), 0)
            await reader.readexactly(length)
            await self._answer(path, head, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    async def _answer(self, path: str, head: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = path.split("/")[1]
        # As llama.cpp's server with --api-key: every route wants the key but the model list ("keyed"), or every one.
        if mode in ("keyed", "locked") and "authorization: bearer right\r\n" not in head.lower() and (
                mode == "locked" or not path.endswith("/models")):
            body = b'{"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}'
            writer.write(f"HTTP/1.1 401 Unauthorized\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n"
                         .encode() + body)
            await writer.drain()
            return
        if path.endswith("/models") and mode == "moved":  # to the same server under another name: another origin
            port = self.url.rsplit(":", 1)[1]
            writer.write(f"HTTP/1.1 307 Temporary Redirect\r\nlocation: http://localhost:{port}/ok/v1/models\r\n"
                         "connection: close\r\ncontent-length: 0\r\n\r\n".encode())
            await writer.drain()
            return
        if path.endswith("/models") and mode == "trickle":  # a good list, a byte at a time
            body = json.dumps({"object": "list", "data": [{"id": "faulty", "object": "model"}]}).encode()
            writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                         .encode())
            try:
                for byte in body:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.1)
            except ConnectionError:
                self.hits["trickle hung up"] += 1
                raise
            return
        if path.endswith("/models") and mode == "slowhead":  # a good list, its status line and headers a byte at a time
            body = json.dumps({"object": "list", "data": [{"id": "faulty", "object": "model"}]})
            head = ("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-padding: " + "." * 200
                    + f"\r\ncontent-length: {len(body)}\r\n\r\n" + body)
            try:
                for byte in head.encode():  # ~12 s in all, unless the client hangs up first
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)
            except ConnectionError:
                self.hits["slowhead hung up"] += 1
                raise
            return
        if path.endswith("/models") and mode in MODEL_LISTS:
            body = json.dumps({"object": "list", "data": MODEL_LISTS[mode]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                         + f"content-length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            return
        if path.endswith("/models") and mode == "biglist":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"10\r\n" + b'{"data": [      ' + b"\r\n")
            while True:  # until the client hangs up: the write fails, or the handler is cancelled
                writer.write(f"{1 << 16:x}\r\n".encode() + b" " * (1 << 16) + b"\r\n")
                await writer.drain()
        if path.endswith("/models"):
            body = json.dumps({"object": "list", "data": [{"id": "faulty", "object": "model"}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                         + f"content-length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            return
        self.hits[mode] += 1
        if mode in ("error500", "reject", "closed", "endless429") or (mode in ("busy", "down") and self.hits[mode] == 1):
            status = {"error500": "500 Internal Server Error", "reject": "400 Bad Request",
                      "busy": "429 Too Many Requests\r\nretry-after: 1",
                      "down": "503 Service Unavailable\r\nretry-after: 1",
                      "closed": "429 Too Many Requests\r\nretry-after: 86400",
                      "endless429": "429 Too Many Requests\r\nretry-after: inf"}[mode]
            body = b'{"error": "made to fail"}'
            writer.write(f"HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n".encode()
                         + body)
            await writer.drain()
            return
        if mode == "crashed" and self.hits[mode] == 1:
            # As uvicorn answers a request its app raised on (vLLM, SGLang, transformers serve): a 500 that does not
            # say the connection closes; then it closes it (after logging the traceback), resetting a request on it.
            body = b"Internal Server Error"
            writer.write(f"HTTP/1.1 500 Internal Server Error\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            await reader.read(1)  # the next request on this connection, or the client closing it
            writer.transport.abort()
            return
        if mode == "whole":  # a server (or a gateway before it) that answers stream: true with the whole answer
            body = json.dumps({"object": "text_completion", "choices": [{"index": 0, "text": " all at once",
                                                                          "finish_reason": "stop"}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                         + f"content-length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            return
        if mode == "silent":
            await asyncio.Event().wait()  # until the client hangs up or the server closes
        if mode == "bigerror":
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 104857600\r\n\r\n"
                         + b"overloaded " * 30000)
            await writer.drain()
            await asyncio.Event().wait()  # the rest never comes
        if mode == "endless":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            data = f"data: {json.dumps({'choices': [{'index': 0, 'text': ' more'}]})}\n\n".encode()
            while True:  # until the client hangs up: the write fails, or the handler is cancelled
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()
        if mode == "dribble":  # a byte now and then, never a line's end: each read comes back, no line ever does
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"6\r\ndata: \r\n")
            while True:  # until the client hangs up
                writer.write(b"1\r\n[\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
        if mode in ("pings", "stalls"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            first = f"data: {json.dumps({'choices': [{'index': 0, 'text': ' one'}]})}\n\n".encode()
            for data in [first] if mode == "stalls" else []:
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            while True:  # until the client hangs up: the write fails, or the handler is cancelled
                writer.write(b"8\r\n: ping\n\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.02)
        if mode == "deep":  # a chunk of arrays nested past Python's stack (1 MB: under the line limit)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            data = b"data: " + b"[" * 500_000 + b"]" * 500_000 + b"\n\n"
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
            await writer.drain()
            return
        if mode in CANNED:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for data in [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in CANNED[mode]] + [b"data: [DONE]\n\n"]:
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        if mode.startswith("ends-"):  # two words, the second with this finish_reason, then [DONE]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            chunks = [{"choices": [{"index": 0, "text": " two", "finish_reason": None}]},
                      {"choices": [{"index": 0, "text": " words", "finish_reason": mode.removeprefix("ends-")}]}]
            for data in [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks] + [b"data: [DONE]\n\n"]:
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        if mode in ("lingers", "closes", "drops"):  # a whole answer and its usage, never a [DONE]
            chunked = mode != "closes"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         + (b"transfer-encoding: chunked\r\n\r\n" if chunked else b"connection: close\r\n\r\n"))
            chunks = [{"choices": [{"index": 0, "text": " fine", "finish_reason": None}]},
                      {"choices": [{"index": 0, "text": " words", "finish_reason": "stop"}]},
                      {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}]
            for data in [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks]:
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
                await writer.drain()
            if mode == "lingers":  # the connection stays open, the body unfinished, until the client hangs up
                try:
                    while True:
                        await asyncio.sleep(0.05)
                        writer.write(b"8\r\n: ping\n\n\r\n")
                        await writer.drain()
                except ConnectionError:
                    self.hits["lingers hung up"] += 1
                    raise
            if mode == "drops":  # closed half way through a chunk (not reset: a reset may discard what was sent)
                writer.write(b"40\r\ndata: {")
                await writer.drain()
            return
        if mode == "thinks":  # a reasoning model's chat: thoughts (both names servers give them), a pause, the answer
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            deltas = [{"role": "assistant", "content": ""}, {"reasoning_content": "Compare"}, {"reasoning": " digits."},
                      None, {"content": "9.8"}, {"content": " is."}]
            for delta in deltas:
                if delta is None:
                    await asyncio.sleep(DRIP_S)
                    continue
                data = f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n".encode()
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()
            last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 4}}
            for data in (f"data: {json.dumps(last)}\n\n".encode(), b"data: [DONE]\n\n"):
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        if mode == "queue":
            async with self._one_at_a_time:  # not a byte, headers included, until the one before is answered
                await self._words(writer, "drip")
            return
        if mode == "huge":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 3145734\r\n\r\n"
                         + b"data: " + b"x" * 3 * 2**20)
            await writer.drain()
            return
        await self._words(writer, mode)

    async def _words(self, writer: asyncio.StreamWriter, mode: str) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        words = {"broken": [" half"], "drip": [" drip"] * 8}.get(mode, [" fine", " words"])
        for index, word in enumerate(words):
            if mode == "drip":
                await asyncio.sleep(DRIP_S)
            chunk = {"choices": [{"index": 0, "text": word,
                                  "finish_reason": "stop" if index == len(words) - 1 else None}]}
            if mode == "broken" or index < len(words) - 1:
                chunk["choices"][0].pop("finish_reason")
            data = f"data: {json.dumps(chunk)}\n\n".encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
        if mode == "broken":
            writer.transport.abort()  # mid-body: no last chunk, the connection just drops
            return
        done = b"data: [DONE]\n\n"
        writer.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
        await writer.drain()


DRIP_S = 0.5  # eight of them: longer than an unload lets a silent request be (STOP_GRACE_S), never that silent


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultServer]:
    server = FaultServer()
    yield server
    server.close()


@pytest.fixture
def faulty(bench: wb.Workbench, faults: FaultServer, tiny_path: Path) -> wb.Workbench:
    """A workbench with one model per fault mode ('ok', 'error500', ...) on the FaultServer, and 'tiny' here."""
    for mode in ("ok", "error500", "reject", "busy", "broken", "silent", "huge", "endless", "bigerror", "closed",
                 *CANNED):
        bench.load(mode, f"{faults.url}/{mode}/v1")
    bench.load("tiny", tiny_path, device="cpu")
    return bench


def _failed(chain: wb.Chain, **inputs: str) -> wb.Run:
    """The run of ``chain`` that failed (``chain.run`` raises HopFailed, which holds it)."""
    with pytest.raises(HopFailed) as info:
        chain.run(**inputs)
    run = info.value.run
    assert isinstance(run, wb.Run)
    return run


def _failure(run: wb.Run) -> BaseException:
    assert run.error is not None
    return run.error.cause


def _remote_events(run: wb.Run) -> list[str]:
    return [name for name in run.trace.events()["event"] if name.startswith("remote.")]


def test_a_proxy_the_environment_names_carries_the_requests(
    monkeypatch: pytest.MonkeyPatch, faults: FaultServer, bench: wb.Workbench
) -> None:
    # HTTP_PROXY and NO_PROXY, as httpx and the OpenAI SDK honour them: here the FaultServer is the proxy.
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, faults.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    bench.load("far", "http://model-server.invalid/ok/v1")
    run = _chain(bench, "far").run(prompt="hi")
    assert run.output == "fine words"
    assert faults.proxied[-2:] == ["http://model-server.invalid/ok/v1/models",
                                   "http://model-server.invalid/ok/v1/completions"]

    seen = len(faults.proxied)
    monkeypatch.setenv("NO_PROXY", "model-server.invalid")  # now straight to the host, which does not exist
    with pytest.raises(ModelLoadError, match="cannot reach a model server"):
        bench.load("near", "http://model-server.invalid/ok/v1")
    assert len(faults.proxied) == seen


def test_a_server_without_usage_or_tokenizer_counts_chunks_and_says_so(faulty: wb.Workbench) -> None:
    run = _chain(faulty, "ok").run(prompt="hi")
    assert run.output == "fine words"
    span = _request_span(run)
    assert span[attr.REMOTE_TOKENS_FROM] == "chunks" and span[attr.USAGE_OUTPUT_TOKENS] == 2
    assert faulty.registry.get("ok").settings.served_model == "faulty"


@pytest.mark.parametrize("mode", ["lying", "oddusage", "boolusage"])
def test_a_usage_that_cannot_be_true_is_counted_here_and_says_so(faulty: wb.Workbench, mode: str) -> None:
    run = _chain(faulty, mode).run(prompt="hi")  # max_new_tokens 12: not 10**9 tokens, nor True
    span = _request_span(run)
    assert span[attr.REMOTE_TOKENS_FROM] == "chunks" and span[attr.USAGE_OUTPUT_TOKENS] == 1
    assert span[attr.USAGE_INPUT_TOKENS] == 0  # no tokenizer here and none believed: not -3
    assert run.output == "two words"
    assert set(run.trace.events()["event"]) == {"remote.usage_ignored"}


def test_a_prompt_sent_uncounted_to_a_server_without_usage_is_counted_after_its_stream(
    faulty: wb.Workbench, faults: FaultServer, tiny_path: Path
) -> None:
    faulty.load("counted", f"{faults.url}/ok/v1", served_model=str(tiny_path))  # the tokenizer is here
    span = _request_span(_chain(faulty, "counted").run(prompt="Question: hi"))
    tokenizer = faulty.registry.get("tiny").tokenizer
    assert span[attr.PROMPT_UNCOUNTED] is True
    assert span[attr.USAGE_INPUT_TOKENS] == len(tokenizer("Question: hi")["input_ids"])
    assert span[attr.REMOTE_TOKENS_FROM] == "tokenizer"
    assert span[attr.USAGE_OUTPUT_TOKENS] == len(tokenizer("fine words", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("model", ["counted", "ok"])  # the served model's tokenizer here, and none
def test_a_prompt_that_is_not_valid_text_is_refused_before_it_is_sent(
    faulty: wb.Workbench, faults: FaultServer, tiny_path: Path, model: str
) -> None:
    faulty.load("counted", f"{faults.url}/ok/v1", served_model=str(tiny_path))
    sent = faults.hits["ok"]
    with pytest.raises(InvalidInput, match="the prompt is not valid text: it holds a lone surrogate"):
        faulty.generate(model, "Question: \ud800?", max_new_tokens=4)
    assert faults.hits["ok"] == sent  # nothing reached the server
    assert faulty.generate(model, "Question: fine?", max_new_tokens=4).text == "fine words"  # nothing lost


@pytest.mark.parametrize("normalizer", ["none", "llama2", "nfc"])
def test_the_token_bound_holds_for_texts_of_every_kind(tiny_path: Path, normalizer: str) -> None:
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    from workbench.engine.backends.openai import token_bound

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    if normalizer == "llama2":  # SentencePiece's spaces as Llama 2's tokenizer writes them: " " becomes "▁" (3 bytes)
        tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    elif normalizer == "nfc":
        tokenizer.backend_tokenizer.normalizer = normalizers.NFC()
    bound = token_bound(tokenizer)
    assert bound is not None
    factor, slack = bound
    assert (factor, slack) == {"none": (1, 2), "llama2": (3, 5), "nfc": (3, 2)}[normalizer]
    texts = ["", " ", "a", "  many   spaces  ", "Question: What is the capital of France?\nAnswer:", "\u00e9t\u00e9",
             "e\u0301te\u0301", "\u65e5\u672c\u8a9e\u306e\u6587", "\U0001f600\U0001f680 emoji", "\u0344\u0958\u2126",
             "\t\n\r", "x" * 300, "<s></s><unk>", "\u00a0\u3000\u200b"]
    for text in texts:
        tokens = len(tokenizer(text)["input_ids"])
        assert tokens <= factor * len(text.encode()) + slack, (text, tokens)


def test_a_tokenizer_whose_normalizer_can_grow_a_text_gives_no_bound(tiny_path: Path) -> None:
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    from workbench.engine.backends.openai import token_bound

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    tokenizer.backend_tokenizer.normalizer = normalizers.NFKC()  # U+FDFA is 3 bytes and NFKC makes it 33
    assert token_bound(tokenizer) is None
    assert token_bound(object()) is None  # a slow tokenizer: no pipeline to read


def test_a_reasoning_models_thoughts_are_timed_as_its_tokens_but_left_out_of_its_answer(
    bench: wb.Workbench, faults: FaultServer
) -> None:
    """vLLM, SGLang, llama.cpp and Ollama stream a reasoning model's thinking as ``delta.reasoning_content`` (or
    ``delta.reasoning``) before its answer's ``content``, and its usage counts every thought. Timing only the content
    put the whole thinking in the TTFT and divided the answer's decode time by every token (TPOT far too small)."""
    bench.load("thinker", f"{faults.url}/thinks/v1")
    chain = bench.chain({"name": "think", "hops": [{"name": "answer", "model": "thinker", "max_new_tokens": 12,
                                                     "messages": [{"role": "user", "content": "{{ prompt }}"}]}]})
    events = list(chain.stream(prompt="9.11 or 9.8?"))
    assert [e.text for e in events if e.kind == "token"] == ["9.8", " is."]  # the answer's tokens, not the thoughts
    (run,) = [e.run for e in events if e.kind == "run_finished"]
    assert run.output == "9.8 is."
    span = _request_span(run)
    assert span[attr.REMOTE_CHUNKS] == 4 and span[attr.USAGE_OUTPUT_TOKENS] == 4
    itl = span[attr.REMOTE_ITL_MS]
    assert len(itl) == 3  # type: ignore[arg-type]
    # The server paused between its last thought and its answer: a gap between two tokens, not part of the TTFT. (The
    # thought read late, on a busy machine, shortens the gap a little: 495 ms for the 500 once, in CI.)
    assert max(itl) >= DRIP_S * 1e3 / 2  # type: ignore[arg-type]
    ttft, e2e = span[attr.REMOTE_TTFT_MS], span[attr.REMOTE_E2E_MS]
    assert span[attr.REMOTE_TPOT_MS] == pytest.approx((e2e - ttft) / 3)  # type: ignore[operator]


def test_a_5xx_is_a_remote_error_with_its_status_and_an_event(faulty: wb.Workbench) -> None:
    run = _failed(_chain(faulty, "error500"), prompt="hi")
    error = _failure(run)
    assert isinstance(error, RemoteError) and error.kind == "status" and error.status == 500
    assert "HTTP 500" in str(error) and "made to fail" in str(error)
    assert _request_span(run)[attr.HTTP_STATUS] == 500
    assert _remote_events(run) == ["remote.status"]


def test_a_request_after_a_server_error_goes_out_again_on_a_new_connection(
    bench: wb.Workbench, faults: FaultServer
) -> None:
    """uvicorn (under vLLM, SGLang, transformers serve) closes a connection after a 500 from an app that raised, but
    its answer does not say so: the next request, sent on that connection from the pool, was reset, and failed as
    a broken stream though nothing was wrong with it or the server. It is sent again."""
    bench.load("crashed", f"{faults.url}/crashed/v1")
    chain = _chain(bench, "crashed")
    error = _failure(_failed(chain, prompt="hi"))
    assert isinstance(error, RemoteError) and error.status == 500
    run = chain.run(prompt="hi")
    assert run.output == "fine words"
    assert _remote_events(run) == ["remote.resent"]  # sent again, on a new connection, and said so


def test_a_wrong_api_key_is_called_wrong_and_a_missing_one_missing(bench: wb.Workbench, faults: FaultServer) -> None:
    """A server that refused the key it was given told the user to pass the key they had passed."""
    for given, said in ((None, "pass api_key=..."), ("wrong", "the server refused this api_key: check it")):
        with pytest.raises(ModelLoadError, match="HTTP 401") as refused:
            bench.load("locked", f"{faults.url}/locked/v1", api_key=given)
        assert said in str(refused.value)
        bench.load(f"keyed-{given}", f"{faults.url}/keyed/v1", api_key=given)  # its model list wants no key
        with pytest.raises(RemoteError, match="HTTP 401: .*Invalid API Key") as rejected:
            bench.generate(f"keyed-{given}", "hi", max_new_tokens=4)
        assert said in str(rejected.value)
    bench.load("keyed", f"{faults.url}/keyed/v1", api_key="right")
    assert bench.generate("keyed", "hi", max_new_tokens=4).text == "fine words"


def test_a_request_the_server_rejects_is_not_retried(faulty: wb.Workbench) -> None:
    run = _failed(_chain(faulty, "reject", retry={"attempts": 3, "backoff_ms": 1}), prompt="hi")
    error = _failure(run)
    assert isinstance(error, RemoteError) and error.kind == "rejected" and error.status == 400
    assert len(run.trace.events().query("event == 'attempt.failed'")) == 1  # a 400 stays a 400: no retry


def test_a_429_retry_waits_as_long_as_retry_after_asks(faulty: wb.Workbench) -> None:
    run = _chain(faulty, "busy", retry={"attempts": 2, "backoff_ms": 1, "jitter": False}).run(prompt="hi")
    assert run.error is None and run.output == "fine words"
    events = run.trace.events()
    assert "remote.rate_limited" in list(events["event"])
    (wait,) = events.query("event == 'retry'")["attributes.workbench.retry.wait_ms"]
    assert wait >= 1000  # the server said Retry-After: 1; the backoff alone would wait 1 ms


def test_a_503_retry_waits_as_long_as_retry_after_asks(bench: wb.Workbench, faults: FaultServer) -> None:
    """A server starting up, scaling from zero or draining (or the balancer before it) answers 503 with Retry-After,
    as RFC 9110 has it; the retry came back 1 ms later, and again, until its attempts were spent."""
    bench.load("down", f"{faults.url}/down/v1")
    run = _chain(bench, "down", retry={"attempts": 2, "backoff_ms": 1, "jitter": False}).run(prompt="hi")
    assert run.error is None and run.output == "fine words"
    events = run.trace.events()
    (failed,) = events.query("event == 'remote.status'")["attributes.workbench.remote.retry_after_s"]
    assert failed == 1.0
    (wait,) = events.query("event == 'retry'")["attributes.workbench.retry.wait_ms"]
    assert wait >= 1000  # the server said Retry-After: 1; the backoff alone would wait 1 ms


def test_a_429_that_asks_for_a_day_ends_the_retries_and_falls_back_at_once(faulty: wb.Workbench) -> None:
    run = _chain(faulty, "closed", retry={"attempts": 3}, fallback=["tiny"]).run(prompt="hi")  # not a day later
    assert run.served_by["answer"] == "model:tiny"
    events = run.trace.events()
    assert "retry" not in set(events["event"])
    assert "retry after 86400 s" in events.query("event == 'fallback'")["attributes.workbench.fallback.reason"].iloc[0]


def test_a_retry_after_no_one_can_wait_is_read_as_none(bench: wb.Workbench, faults: FaultServer) -> None:
    # 'inf' (and 'nan', '1e400') read as floats: the error said "retry after inf s", and a served chain's 429 turned
    # into a 500 (math.ceil of infinity, building the Retry-After header).
    from workbench.errors import retry_after

    bench.load("endless429", f"{faults.url}/endless429/v1")
    error = _failure(_failed(_chain(bench, "endless429"), prompt="hi"))
    assert isinstance(error, RemoteRateLimited) and error.retry_after_s is None and "inf" not in str(error)
    assert retry_after(math.inf) == {"Retry-After": "86400"} and retry_after(math.nan) == {"Retry-After": "1"}


def test_a_redirected_model_list_does_not_take_the_api_key_to_another_origin(
    bench: wb.Workbench, faults: FaultServer
) -> None:
    # urllib copied Authorization onto a redirect to any host: the key went to whoever the server pointed at.
    bench.load("moved", f"{faults.url}/moved/v1", api_key="SECRET")
    (first, followed) = [seen for seen in faults.keys_seen if seen[0]][-2:]
    assert first == (faults.url.removeprefix("http://"), "Bearer SECRET")
    assert followed[0].startswith("localhost:") and followed[1] is None


@pytest.mark.parametrize(("path", "part"), [("trickle", "body"), ("slowhead", "head")])
def test_a_model_list_sent_a_byte_at_a_time_is_bounded_by_one_deadline(
    bench: wb.Workbench, faults: FaultServer, monkeypatch: pytest.MonkeyPatch, path: str, part: str
) -> None:
    # The timeout was per socket read: a body of 70 bytes sent one a second kept the load waiting 70 s. Then the
    # deadline covered the body alone: a status line and headers sent a byte at a time held the load for as long as
    # the server cared to send them. The body takes ~7 s to send, the head ~12 s.
    import workbench.models.remote as remote

    monkeypatch.setattr(remote, "LIST_TIMEOUT_S", 1.0)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="took more than 1 s to answer GET /models"):
        bench.load(path, f"{faults.url}/{path}/v1")
    assert time.monotonic() - started < 5, part
    assert path not in bench.registry.names()
    # The connection the load gave up on is cut, not left reading the rest of it.
    eventually(lambda: faults.hits[f"{path} hung up"] == 1, f"the server to see the load hang up in the {part}")


def test_a_listed_id_that_is_not_text_is_skipped_and_never_loaded(bench: wb.Workbench, faults: FaultServer) -> None:
    # str() made names of them: a list of the id 7 alone loaded a model named '7', and a server listing one good id
    # among bad ones served "4 models, so say which".
    bench.load("odd", f"{faults.url}/oddids/v1")  # 5, null, an object, no id at all, and "faulty"
    assert bench.registry.get("odd").settings.served_model == "faulty"
    assert bench.generate("odd", "hi", max_new_tokens=4).text == "fine words"
    with pytest.raises(ModelLoadError) as refused:
        bench.load("numbered", f"{faults.url}/numbered/v1")
    message = str(refused.value)
    assert f"model server '{faults.url}/numbered/v1' lists no model whose id is text" in message
    assert "{'id': 7, 'object': 'model'}" in message and "served_model" in message
    assert "numbered" not in bench.registry.names()


@pytest.mark.parametrize(("reason", "kind"), [("abort", "aborted"), ("error", "aborted"), ("made_up", "aborted"),
                                              ("content_filter", "rejected")])
def test_an_answer_the_server_ended_without_saying_it_is_whole_fails_and_says_how_it_ended(
    bench: wb.Workbench, faults: FaultServer, reason: str, kind: str
) -> None:
    # vLLM and SGLang end a request they cut off (shutting down, pausing, asked to abort) with finish_reason 'abort',
    # then [DONE]: the half answer passed as a whole one.
    bench.load("ends", f"{faults.url}/ends-{reason}/v1")
    run = _failed(_chain(bench, "ends"), prompt="hi")
    error = _failure(run)
    assert isinstance(error, RemoteError) and error.kind == kind
    assert f"ended the answer with finish_reason {reason!r} after 2 chunks" in str(error)
    assert _remote_events(run) == [f"remote.{kind}"]
    # A server that cut the answer off may finish it next time; a content filter filters the same prompt again.
    retried = _failed(_chain(bench, "ends", retry={"attempts": 2, "backoff_ms": 1}), prompt="hi")
    kinds = list(retried.trace.events().query("event == 'attempt.failed'")["attributes.workbench.error.kind"])
    assert kinds == (["error", "error"] if kind == "aborted" else ["not retryable"])


@pytest.mark.parametrize(("reason", "finish"), [("stop", "stop"), ("length", "length"), ("eos_token", "stop"),
                                                ("stop_sequence", "stop"), ("tool_calls", "stop")])
def test_an_answer_ended_with_a_reason_that_says_it_is_whole_is_its_answer(
    bench: wb.Workbench, faults: FaultServer, reason: str, finish: str
) -> None:
    # TGI before it took OpenAI's names says eos_token and stop_sequence for stop.
    bench.load("ends", f"{faults.url}/ends-{reason}/v1")
    run = _chain(bench, "ends").run(prompt="hi")
    assert run.output == "two words"
    assert _request_span(run)[attr.RESPONSE_FINISH_REASONS] == (finish,)


@pytest.mark.parametrize("mode", ["lingers", "closes", "drops"])
def test_an_answer_whose_finish_reason_came_is_whole_without_a_done(
    bench: wb.Workbench, faults: FaultServer, mode: str
) -> None:
    """A server that sent the finish reason and its usage but no [DONE], and then kept the connection open (its body
    unfinished), failed the answer as a broken stream once read_timeout_s went by; one that closed the connection
    half way through a chunk failed it at once."""
    bench.load(mode, f"{faults.url}/{mode}/v1", read_timeout_s=5)
    run = _chain(bench, mode).run(prompt="hi")
    assert run.error is None and run.output == "fine words"
    span = _request_span(run)
    assert span[attr.USAGE_OUTPUT_TOKENS] == 2
    if mode != "drops":  # (aiohttp drops what it holds unread of a body that broke off: the usage may go with it)
        assert span[attr.REMOTE_TOKENS_FROM] == "server"  # the usage after the finish reason was read
    assert _remote_events(run) == []
    if mode == "lingers":  # the connection is closed, not kept in the pool with the rest of a body in it
        eventually(lambda: faults.hits["lingers hung up"] == 1, "the server to see the client hang up")


def test_a_chunk_nested_too_deeply_is_a_broken_stream(faulty: wb.Workbench, faults: FaultServer) -> None:
    # A bare RecursionError failed the hop: no RemoteError kind, no URL, no span event.
    faulty.load("deep", f"{faults.url}/deep/v1")
    run = _failed(_chain(faulty, "deep"), prompt="hi")
    error = _failure(run)
    assert isinstance(error, RemoteError) and error.kind == "broken_stream" and "nested too deeply" in str(error)
    assert _remote_events(run) == ["remote.broken_stream"]


def test_without_retries_a_429_says_how_long_to_wait(faulty: wb.Workbench, faults: FaultServer) -> None:
    faults.hits["busy"] = 0
    error = _failure(_failed(_chain(faulty, "busy"), prompt="hi"))
    assert isinstance(error, RemoteRateLimited) and error.retry_after_s == 1.0
    assert "retry after 1 s" in str(error)


def test_a_stream_broken_half_way_fails_with_what_arrived(faulty: wb.Workbench) -> None:
    run = _failed(_chain(faulty, "broken"), prompt="hi")
    error = _failure(run)
    assert isinstance(error, RemoteError) and error.kind == "broken_stream"
    assert "after 1 chunks" in str(error)
    assert _remote_events(run) == ["remote.broken_stream"]


def test_a_line_longer_than_the_read_buffer_is_a_broken_stream_that_says_so(faulty: wb.Workbench) -> None:
    run = _failed(_chain(faulty, "huge"), prompt="hi")
    error = _failure(run)
    assert isinstance(error, RemoteError) and error.kind == "broken_stream"
    assert "a line of the stream is longer than 2097152 bytes" in str(error)
    assert _remote_events(run) == ["remote.broken_stream"]


def test_a_server_that_never_stops_sending_is_cut_off(faulty: wb.Workbench) -> None:
    run = _failed(_chain(faulty, "endless"), prompt="hi")  # max_new_tokens 12: at most 40 chunks
    error = _failure(run)
    assert isinstance(error, RemoteError) and error.kind == "broken_stream"
    assert "sent more than 40 chunks for max_tokens 12" in str(error)


def test_a_server_that_sends_more_text_than_max_tokens_can_make_is_cut_off(faulty: wb.Workbench) -> None:
    error = _failure(_failed(_chain(faulty, "wordy"), prompt="hi"))  # max_new_tokens 12
    assert isinstance(error, RemoteError) and error.kind == "broken_stream"
    assert "it sent more than 12288 characters of text for max_tokens 12" in str(error)


def test_a_whole_answer_where_a_stream_was_asked_for_says_what_came(bench: wb.Workbench, faults: FaultServer) -> None:
    bench.load("whole", f"{faults.url}/whole/v1")
    with pytest.raises(RemoteError) as caught:  # it said only 'the stream ended without a finish reason'
        bench.generate("whole", "hi", max_new_tokens=4)
    assert caught.value.kind == "broken_stream"
    assert "sent no event stream (no data: line) but: '{\"object\": \"text_completion\"" in str(caught.value)
    assert "stream" in (caught.value.hint or "")


def test_an_error_field_that_is_null_is_no_error(faulty: wb.Workbench) -> None:
    run = _chain(faulty, "nullerror").run(prompt="hi")  # it failed: 'the server reported an error mid-stream: None'
    assert run.output == "two words"
    assert _remote_events(run) == []


def test_a_served_answers_streamed_texts_join_to_its_output_whitespace_and_all(faulty: wb.Workbench) -> None:
    # The output is the answer stripped, as a local model's is, but each chunk went out as the server sent it: the
    # tokens of " The answer ... is. " joined to "\n The answer \n is. \n", not the hop's output, so a client that
    # printed the stream (the magics, the builder, an SSE client) showed another text than the run kept.
    events = list(_chain(faulty, "spaced").stream(prompt="hi"))
    (run,) = [e.run for e in events if e.kind == "run_finished"]
    assert run.output == "The answer \n is."
    tokens = [e.text for e in events if e.kind == "token"]
    assert "".join(tokens) == run.output
    assert tokens == ["", "The", " answer", "", " \n is.", ""]  # one token a chunk still; whitespace waits for text


def test_an_error_sent_mid_stream_is_quoted_as_far_as_its_message_needs(faulty: wb.Workbench) -> None:
    error = _failure(_failed(_chain(faulty, "failing"), prompt="hi"))
    assert isinstance(error, RemoteError) and error.kind == "broken_stream"
    assert "the server reported an error mid-stream: {'message': 'out of blocks out of blocks" in str(error)
    assert len(error.message) < 1000  # not the 1.4 MB the server sent, in every span and stored run


def test_a_chunk_not_shaped_as_an_openai_streams_is_a_broken_stream_that_shows_it(faulty: wb.Workbench) -> None:
    run = _failed(_chain(faulty, "misshapen"), prompt="hi")
    error = _failure(run)
    assert isinstance(error, RemoteError) and error.kind == "broken_stream"  # not an AttributeError from within
    assert "sent a chunk whose choices are not shaped as an OpenAI stream's: '{\"choices\": [5]}'" in str(error)
    assert _remote_events(run) == ["remote.broken_stream"]


def test_an_error_body_that_never_ends_is_read_only_as_far_as_its_message_needs(faulty: wb.Workbench) -> None:
    started = time.perf_counter()
    run = _failed(_chain(faulty, "bigerror"), prompt="hi")
    error = _failure(run)
    assert isinstance(error, RemoteError) and error.status == 500
    assert "HTTP 500: overloaded overloaded" in str(error)
    assert time.perf_counter() - started < 30  # not the read timeout (60 s), waiting for 100 MiB


@pytest.mark.parametrize("policy", [wb.ContinuousBatching(), wb.DynamicBatching(max_batch=4, max_wait_ms=1)],
                         ids=["continuous", "dynamic"])
def test_a_first_byte_that_never_comes_times_out_and_falls_back(
    faulty: wb.Workbench, policy: wb.BatchingPolicy
) -> None:
    faulty.set_batching("silent", policy)  # a stream on its own, or one of a wave the worker waits for
    chain = _chain(faulty, "silent", timeout_s=1.5, fallback="tiny")
    run = chain.run(prompt=PROMPTS[0])
    assert run.error is None and run.served_by["answer"] == "model:tiny"
    failed = run.trace.events().query("event == 'attempt.failed'")
    assert list(failed["attributes.workbench.error.kind"]) == ["timeout"]
    (span,) = [s for s in run.trace.spans if s.name == "text_completion silent"]
    assert span.attributes[attr.CANCELLED] == "running"  # the stream was open...
    assert attr.REMOTE_TTFT_MS not in span.attributes  # ...and no first token had come
    alone = _failed(_chain(faulty, "silent", timeout_s=0.5), prompt="hi")
    assert isinstance(_failure(alone), HopTimeout)


def test_without_a_hop_timeout_the_read_timeout_names_the_missing_first_byte(
    bench: wb.Workbench, faults: FaultServer
) -> None:
    bench.load("stuck", f"{faults.url}/silent/v1", read_timeout_s=0.5)
    run = _failed(_chain(bench, "stuck"), prompt="hi")
    error = _failure(run)
    assert isinstance(error, RemoteError) and error.kind == "no_first_byte"
    assert "sent no first token within 0.5 s" in str(error) and "read_timeout_s" in str(error)
    assert _remote_events(run) == ["remote.no_first_byte"]


@pytest.mark.parametrize(("mode", "said"), [("pings", "sent no first token within 1 s (no data line"),
                                            ("stalls", "broke off the stream after 1 chunks: no data line"),
                                            # Each byte started aiohttp's read timeout again, and the check ran only
                                            # when a whole line came: the request waited for ever.
                                            ("dribble", "sent no first token within 1 s (not one whole line)")])
def test_a_stream_of_keep_alive_comments_alone_ends_after_the_read_timeout(
    bench: wb.Workbench, faults: FaultServer, mode: str, said: str
) -> None:
    bench.load(mode, f"{faults.url}/{mode}/v1", read_timeout_s=1)  # bytes keep coming, but never a token
    with pytest.raises(RemoteError, match=re.escape(said)):
        bench.generate(mode, "hi", max_new_tokens=4)


def test_a_model_list_that_never_ends_fails_the_load_once_it_is_too_big_to_be_one(
    bench: wb.Workbench, faults: FaultServer
) -> None:
    with pytest.raises(ModelLoadError, match="answered GET /models with more than 16 MiB"):
        bench.load("biglist", f"{faults.url}/biglist/v1")  # read so far and no further, not until memory runs out


def test_closing_the_workbench_fails_a_stream_in_flight_at_once_instead_of_waiting_for_its_server(
    faults: FaultServer,
) -> None:
    bench = wb.Workbench()
    bench.load("silent", f"{faults.url}/silent/v1")  # takes the request and never answers
    asked = faults.hits["silent"]
    outcome: list[BaseException] = []

    def ask() -> None:
        try:
            bench.generate("silent", "hi", max_new_tokens=4)
        except wb.WorkbenchError as exc:
            outcome.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    eventually(lambda: faults.hits["silent"] > asked, "the request to reach the server")
    bench.close()
    asking.join(WAIT_S)
    (error,) = outcome
    # Not the read timeout's no_first_byte a minute later, blaming the server.
    assert isinstance(error, WorkerStopped) and "unloaded while this request was in flight" in str(error)


@pytest.mark.parametrize("path", ["loop lane", "streams", "batch"])
def test_unloading_a_served_model_cuts_off_a_request_its_server_sits_on(
    bench: wb.Workbench, faults: FaultServer, path: str
) -> None:
    """A hop's stream on the workbench loop (the loop lane), a script's call through the worker's streams, and one
    in a dynamic batch: the unload returns after a short grace, not after the read timeout, and the request fails
    saying the model was unloaded."""
    bench.load("stuck", f"{faults.url}/silent/v1", read_timeout_s=30)  # takes the request and never answers
    if path == "batch":
        bench.set_batching("stuck", wb.DynamicBatching(max_batch=4, max_wait_ms=1))
    worker = bench.engine.worker("stuck")
    backend = worker.backend
    chain = _chain(bench, "stuck", retry={"attempts": 3, "backoff_ms": 10})
    asked = faults.hits["silent"]
    outcome: list[BaseException] = []

    def ask() -> None:
        try:
            if path == "loop lane":
                chain.run(prompt="hi")
            else:
                bench.generate("stuck", "hi", max_new_tokens=4)
        except wb.WorkbenchError as exc:
            outcome.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    eventually(lambda: faults.hits["silent"] > asked, "the request to reach the server")
    lanes = list(backend._lane_clients.values())
    started = time.monotonic()
    bench.unload("stuck")
    # A behaviour bound, not a speed one: the unload does not wait out the read timeout for the server.
    assert time.monotonic() - started < 30 / 3
    asking.join(WAIT_S)
    (error,) = outcome
    if path == "loop lane":
        assert isinstance(error, HopFailed) and isinstance(error.run, wb.Run)
        attempts = error.run.trace.events().query("event == 'attempt.failed'")
        assert list(attempts["attributes.workbench.error.kind"]) == ["not retryable"]  # as an unload always was
        error = _failure(error.run)
    assert isinstance(error, WorkerStopped), error
    assert "model 'stuck' was unloaded while this request was in flight" in str(error)
    assert "bench.load('stuck', ...) again" in str(error)
    batches = [s for s in bench.traces().spans if s.name == "batch stuck"]
    assert batches and all(s.status.status_code.name == "ERROR" for s in batches)
    assert not worker.alive and worker._lane_inflight == 0  # nothing of the model is left running
    assert backend._client.closed and all(client.closed for client in lanes) and not backend._streams
    bench.load("stuck", f"{faults.url}/ok/v1")  # the name serves again
    assert bench.generate("stuck", "hi", max_new_tokens=4).text == "fine words"


@pytest.mark.parametrize("mode", ["drip", "stalls"])
def test_an_unload_lets_a_stream_that_still_sends_finish_and_cuts_off_one_that_only_pings(
    bench: wb.Workbench, faults: FaultServer, mode: str
) -> None:
    """Silence is what an unload does not wait for: a stream still sending tokens runs to its end, as a local batch
    does, however long past STOP_GRACE_S; one whose server sends only keep-alive comments is cut off."""
    assert DRIP_S * 8 > STOP_GRACE_S
    bench.load("slow", f"{faults.url}/{mode}/v1", read_timeout_s=30)
    asked = faults.hits[mode]
    outcome: list[object] = []

    def ask() -> None:
        try:
            outcome.append(bench.generate("slow", "hi", max_new_tokens=16).text)
        except wb.WorkbenchError as exc:
            outcome.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    eventually(lambda: faults.hits[mode] > asked, "the request to reach the server")
    bench.unload("slow")
    asking.join(WAIT_S)
    (answer,) = outcome
    if mode == "drip":
        assert answer == " ".join(["drip"] * 8), answer
    else:
        assert isinstance(answer, WorkerStopped), answer
        assert "model 'slow' was unloaded while this request was in flight" in str(answer)


def test_an_unload_waits_for_the_streams_a_server_queued_behind_the_one_it_answers(
    bench: wb.Workbench, faults: FaultServer
) -> None:
    """A server that answers one request at a time (``transformers serve`` does) leaves the others silent, however
    healthy it is: while it sends tokens on one, an unload cuts off none, though the second waits longer than
    STOP_GRACE_S for its first byte."""
    assert DRIP_S * 8 > STOP_GRACE_S
    bench.load("serial", f"{faults.url}/queue/v1", read_timeout_s=30)
    asked = faults.hits["queue"]
    answers: list[object] = []

    def ask() -> None:
        try:
            answers.append(bench.generate("serial", "hi", max_new_tokens=16).text)
        except wb.WorkbenchError as exc:
            answers.append(exc)

    asking = [threading.Thread(target=ask) for _ in range(2)]
    for thread in asking:
        thread.start()
    eventually(lambda: faults.hits["queue"] == asked + 2, "both requests to reach the server")
    bench.unload("serial")
    for thread in asking:
        thread.join(WAIT_S)
    assert answers == [" ".join(["drip"] * 8)] * 2, answers


def test_a_refused_connection_fails_over_to_the_local_model(tiny_path: Path) -> None:
    server = FaultServer()
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("gone", f"{server.url}/ok/v1")
        bench.load("tiny", tiny_path, device="cpu")
        server.close()  # the server goes away after the model loaded
        run = _chain(bench, "gone", fallback="tiny").run(prompt=PROMPTS[0])
        assert run.error is None
        assert run.output == _chain(bench, "tiny").run(prompt=PROMPTS[0]).output
        events = run.trace.events()
        assert "remote.refused" in list(events["event"]) and "fallback" in list(events["event"])
        assert bench.check_health("gone").loc[0, "health"] == "unhealthy"


def test_the_load_magic_takes_a_server_and_its_settings() -> None:
    from workbench.fronts.notebook.parsers import parse_command

    command = parse_command("load other http://127.0.0.1:8000/v1 --served-model m --api-key secret --read-timeout-s 5")
    assert command.settings.served_model == "m" and command.settings.api_key == "secret"  # type: ignore[attr-defined]
    assert command.settings.remote and "secret" not in repr(command.settings)  # type: ignore[attr-defined]
    assert command.settings.read_timeout_s == 5.0  # type: ignore[attr-defined]


def test_a_listed_context_window_must_be_a_positive_integer() -> None:
    from workbench.models.remote import listed_window

    assert listed_window([{"id": "m", "max_model_len": 4096}], "m") == 4096
    assert listed_window([{"id": "m", "context_length": 2048}], "m") == 2048
    for odd in (True, 0, -5, 4096.0, "4096", None):  # True is an int in Python: it made the window 1
        assert listed_window([{"id": "m", "max_model_len": odd}], "m") is None, odd
    assert listed_window([{"id": "other", "max_model_len": 4096}], "m") is None


def test_a_live_swap_whose_server_replica_is_gone_is_refused_and_the_serving_version_stays(
    tiny_path: Path, tmp_path: Path
) -> None:
    """watch_model on a model with a replica on a server: a new version whose replicas cannot start (the server went
    away) is refused like a version that fails its checks, and the serving one stays the model, in the registry too."""
    from safetensors.torch import load_file, save_file

    watched = Path(shutil.copytree(tiny_path, tmp_path / "m"))
    server = FaultServer()
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("m", watched, replicas=["cpu", f"{server.url}/ok/v1"])
        serving = bench.registry.get("m")
        before = bench.generate("m#0", PROMPTS[0], max_new_tokens=8).token_ids
        bench.watch_model("m", interval_s=0.2)
        server.close()
        nudged = {key: value + 0.05 for key, value in load_file(watched / "model.safetensors").items()}
        save_file(nudged, tmp_path / "next.safetensors", metadata={"format": "pt"})
        os.replace(tmp_path / "next.safetensors", watched / "model.safetensors")  # the next checkpoint, saved whole
        eventually(lambda: bench.model_versions("m")["state"].tolist() == ["live", "refused"],
                   "the new version to be refused")
        assert "cannot reach a model server" in bench.model_versions("m").loc[1, "error"]
        assert bench.registry.get("m") is serving  # bench.models() describes the weights that serve
        assert bench.generate("m#0", PROMPTS[0], max_new_tokens=8).token_ids == before
        bench.unwatch_model("m")


def test_a_comparison_on_served_models_does_not_record_this_machine_as_their_hardware(
    bench: wb.Workbench, faults: FaultServer
) -> None:
    """Its environment (saved beside every row) said accelerator x86_64 and dtype None, and a served model registered
    and not loaded yet went down as this machine's cpu and float32."""
    bench.load("first", f"{faults.url}/ok/v1")
    bench.register("second", f"{faults.url}/ok/v1")
    chain = bench.chain({"name": "served", "hops": [
        {"name": "plan", "model": "first", "prompt": "{{ question }}", "max_new_tokens": 4},
        {"name": "answer", "model": "second", "prompt": "{{ plan }}", "max_new_tokens": 4}]})
    cmp = wb.compare(chain, [{"question": "hi"}], batching="none", repeats=1, warmup=0, progress=False)
    assert cmp.table()["n"].tolist() == [1]
    env = cmp.environment
    assert (env["device"], env["dtype"], env["accelerator"]) == ("remote", "unknown", "unknown (on a server)")
