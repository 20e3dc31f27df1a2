"""A model behind an OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, ``transformers serve``): streamed HTTP.

Each request is one streamed ``POST /completions`` (a prompt) or ``POST /chat/completions`` (a chat
hop's messages), timed on the client as vLLM's serving benchmark times it: the clock starts just
before the POST, TTFT is the first chunk that carries a choice (for a chat, the first with content or a
reasoning model's thinking: a chat stream opens with a chunk that carries only the role), each later
chunk with text or thinking is one inter-token latency (thinking is timed, but is not the answer), and
TPOT is (E2E - TTFT) / (tokens - 1) with the tokens the server's ``usage`` reports.
What the batching policy means here: how many requests are in flight at once. ``ContinuousBatching(max_batch=N)``
(the default for a server) sends each request as it arrives, up to N at a time, and completes
each as its stream ends, so a fast answer never waits for a slow one; ``NoBatching`` sends one
at a time; a static or dynamic batch of B is B streams sent together, done when the last ends
(and failed together, as a local batch is). The server batches on its own side either way.

A call awaited on an event loop (every hop of a chain: the workbench's loop) streams on that loop
itself, through :meth:`RemoteBackend.astream` (the engine's loop lane: no worker thread in between,
under a continuous policy with no injected faults). Everything else (``bench.generate`` from a
script, a static or dynamic batch, faults) goes through the model's worker, and its streams run on
one event loop thread of their own. One pooled ``aiohttp.ClientSession`` per server and loop, shared by the
models on that server; HTTP errors become :class:`RemoteError` here, at the seam, with a span event each.

The client is aiohttp's (the one vLLM's serving benchmark streams with): on this project's 2-core
machine, against an instant stand-in server, one streamed request costs the client about 0.35 ms
less to its first token and 0.55 ms less to its end than with httpx (``benchmarks/remote.py``
compares both by hand). A proxy the environment names (``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``)
applies, as with httpx, read once when the model loads: aiohttp's own ``trust_env`` reads the
environment again for every request, which cost 1.6 ms of TTFT here.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import re
import threading
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.http_exceptions import LineTooLong
from opentelemetry.trace import Span, Status, StatusCode

from workbench.engine.backends.base import (
    BatchTiming,
    OnError,
    OnResult,
    Scheduler,
    TokenSink,
    next_batch_id,
    render_chat,
    result_from_stamps,
)
from workbench.engine.backends.codec import StrippedText, TextCodec
from workbench.engine.requests import NO_TOKEN_ID, GenerationRequest, GenerationResult, Messages, check_text
from workbench.errors import RemoteError, RemoteRateLimited, WorkerStopped
from workbench.models import remote
from workbench.models.registry import LoadedModel
from workbench.tracing import attributes as attr

if TYPE_CHECKING:
    from workbench.engine.batching import BatchingPolicy

CONNECT_TIMEOUT_S = 5.0
# The longest line of a stream read whole (aiohttp buffers up to twice this): a server's chunk is far smaller.
READ_BUFFER_BYTES = 1 << 20
# The most characters one token's text may have (the longest in common vocabularies are runs of a few hundred).
TOKEN_CHARS = 1024
# What earlier aiohttp releases raised for a longer line, before LineTooLong: a ValueError that says this.
_CHUNK_TOO_BIG = "Chunk too big"
# How much of an error response's body is read (its message shows the first 300 characters).
ERROR_BODY_BYTES = 64 * 1024
# How long a stream is read past its finish reason, for what may follow it: the usage chunk and [DONE], which vLLM,
# SGLang and OpenAI write right behind it. A server that sends neither and keeps the connection open holds the answer
# this long, not read_timeout_s: long enough for a busy server to get its usage out, short next to any answer.
FINISH_GRACE_S = 1.0
# The finish reasons that say an answer is whole, as the result names them: stop (the model ended it, or a stop
# sequence did; TGI before it took OpenAI's names said eos_token and stop_sequence), length (max_tokens), and a tool
# call that ended the model's turn (no hop offers tools, so only a model that wrote one unasked makes one). Any other
# (vLLM's and SGLang's abort, vLLM's error, content_filter, one unknown here) fails the request: see _ended.
_WHOLE = {"stop": "stop", "eos_token": "stop", "stop_sequence": "stop", "tool_calls": "stop", "function_call": "stop",
          "length": "length"}


class _Clients:
    """The event loop every remote stream runs on, and one pooled client per server (scheme, host, port) on it and on
    each event loop that awaits streams itself (a loop lane: the workbench's loop).

    Models on one server share its pool: vLLM serves a base model and each LoRA adapter under names of their own,
    and a chain that calls two of them keeps its connections warm for both. The loop thread starts with the first
    backend and stops when the last one closes, and a lane's client closes with the last model that used it there,
    so a closed workbench leaves no thread, socket or loop behind.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._clients: dict[str, tuple[aiohttp.ClientSession, int]] = {}
        self._lanes: dict[tuple[asyncio.AbstractEventLoop, str], tuple[aiohttp.ClientSession, int]] = {}

    def lane(self, loop: asyncio.AbstractEventLoop, url: str) -> aiohttp.ClientSession:
        """The pooled client for ``url``'s server on ``loop``, the running loop (made there if it is the first): one
        more user of it, until :meth:`release_lane`."""
        key = (loop, _server(url))
        with self._lock:
            client, users = self._lanes.get(key) or (_new_client(), 0)
            self._lanes[key] = (client, users + 1)
            return client

    def release_lane(self, loop: asyncio.AbstractEventLoop, url: str) -> None:
        """One user fewer of ``url``'s client on ``loop``; the last one closes it."""
        key = (loop, _server(url))
        with self._lock:
            client, users = self._lanes[key]
            if users > 1:
                self._lanes[key] = (client, users - 1)
                return
            del self._lanes[key]
        _aclose_on(loop, client)

    def acquire(self, url: str) -> tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]:
        server = _server(url)
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="workbench-remote", daemon=True)
                self._thread.start()
            # Made on the loop it belongs to, under the lock (the loop's own thread never takes it).
            client, users = self._clients.get(server) or (_client_on(self._loop), 0)
            self._clients[server] = (client, users + 1)
            return self._loop, client

    def release(self, url: str) -> None:
        server = _server(url)
        with self._lock:
            client, users = self._clients[server]
            loop, thread = self._loop, self._thread
            if users > 1:
                self._clients[server] = (client, users - 1)
                return
            del self._clients[server]
            last = not self._clients
            if last:
                self._loop = self._thread = None
        assert loop is not None and thread is not None
        _aclose_on(loop, client)
        if last:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()


_clients = _Clients()


def _new_client() -> aiohttp.ClientSession:
    """One server's pooled client, for the running event loop (the streams thread's, or a caller's on the loop lane)."""
    return aiohttp.ClientSession(
        # The batching policy bounds the streams in flight; the pool must not queue them a second time.
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        # The read timeout is each model's own (its read_timeout_s), given per request.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
        read_bufsize=READ_BUFFER_BYTES,
    )


def _proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTP_PROXY``/``HTTPS_PROXY`` less ``NO_PROXY``), or None."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass_environment(parts.netloc.rpartition("@")[2]):
        return None
    return urllib.request.getproxies_environment().get(parts.scheme)


def _client_on(loop: asyncio.AbstractEventLoop) -> aiohttp.ClientSession:
    """A client made on ``loop`` (running in another thread): aiohttp binds a session to the loop it is made on."""

    async def make() -> aiohttp.ClientSession:
        return _new_client()

    return asyncio.run_coroutine_threadsafe(make(), loop).result()


def _aclose_on(loop: asyncio.AbstractEventLoop, client: aiohttp.ClientSession) -> None:
    """Close ``client`` on the loop it belongs to: wait for it from another thread, schedule it from the loop's own."""
    if loop.is_closed() or not loop.is_running():
        return  # its connections go with the loop
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.create_task(client.close())
        return
    try:
        asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=5.0)
    except Exception:  # the loop stopped meanwhile, or the close hung: nothing more to free here
        pass


def _server(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


@dataclass
class _Stamps:
    """One stream's clock reads and what it carried."""

    posted: float
    first: float | None = None
    last: float | None = None
    status: int | None = None
    chunks: int = 0  # those with text
    lines: int = 0  # every data line
    finish_reason: str | None = None
    usage: object = None  # as the server sent it: checked when the stream ends
    heard: float = 0.0  # the last data line's clock read (posted until one comes): keep-alive comments do not count


class RemoteBackend:
    """One model on an OpenAI-compatible server (a :class:`Backend`): tokenize here if it can, generate there."""

    def __init__(self, loaded: LoadedModel) -> None:
        settings = loaded.settings
        self.model = loaded.name
        self.source = loaded.source
        self.device = remote.REMOTE_DEVICE
        self.dtype = "unknown"
        # Without the served model's tokenizer here, the prompt's length is the server's to judge.
        self.context_window = loaded.context_window if loaded.tokenizer is not None else None
        self.tokenizer = loaded.tokenizer
        # The served model's tokenizer, where it is here: counts and fits prompts, and counts answers without usage.
        self.codec = TextCodec(loaded.tokenizer, set()) if loaded.tokenizer is not None else None
        # How many tokens a prompt can be at most, by its UTF-8 length (see fits_uncounted); None: count every one.
        self._bound = token_bound(loaded.tokenizer) if self.context_window is not None else None
        self.served_model = str(settings.served_model)
        self.url = f"{remote.base_url(settings)}/completions"
        self.chat_url = f"{remote.base_url(settings)}/chat/completions"
        self.headers = remote.headers(settings)
        self.proxy = _proxy_for(self.url)  # HTTP(S)_PROXY and NO_PROXY, as httpx and the OpenAI SDK honour them
        self.read_timeout_s = settings.read_timeout_s
        # sock_read: the longest wait for any bytes, the first included (httpx's read timeout).
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S,
                                              sock_read=settings.read_timeout_s)
        self._loop, self._client = _clients.acquire(self.url)
        # The pooled client of each event loop that awaits this model's streams itself (see astream), its server's.
        self._lock = threading.Lock()
        self._lane_clients: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
        # The streams in flight, each a task on its loop (the streams thread's or a lane's) with its clock reads,
        # and those cut off.
        self._streams: dict[asyncio.Task[Any], tuple[asyncio.AbstractEventLoop, _Stamps]] = {}
        self._cut: set[asyncio.Task[Any]] = set()
        self._heard = 0.0  # the last data line of a stream that has ended: the server was alive then
        self._aborted = self._closed = False

    # -- the Backend protocol ------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str], special_tokens: bool = True) -> list[list[int]]:
        """Token ids by the served model's own tokenizer where it is here; else none (the server counts)."""
        if self.codec is None:
            for index, prompt in enumerate(prompts):  # the tokenizer's check, where there is none to make it
                check_text(prompt, "the prompt" if len(prompts) == 1 else f"prompt {index + 1} of {len(prompts)}")
            return [[] for _ in prompts]
        return self.codec.tokenize(prompts, special_tokens)

    def fits_uncounted(self, prompt: str, max_new_tokens: int) -> bool:
        """Whether ``prompt`` surely fits the window with ``max_new_tokens``, by its length alone: then the engine
        sends it without tokenizing it here first, and the server's ``usage`` counts it (or this tokenizer does,
        after the stream, for a server without usage).

        Tokenizing right after a generate costs up to ~0.13 ms of cold cache on the loop every hop walks on, and
        for a prompt far inside the window it decides nothing. The bound comes from the tokenizer's own
        pipeline (:func:`token_bound`); a tokenizer whose pipeline gives none counts every prompt, as before.
        """
        if self._bound is None or self.context_window is None:
            return False
        factor, slack = self._bound
        if prompt.isascii():
            size = len(prompt)
        else:
            try:
                size = len(prompt.encode())
            except UnicodeEncodeError:
                return False  # a lone surrogate: tokenizing it says what is wrong, and where
        return factor * size <= self.context_window - max_new_tokens - slack

    def chat_prompt(self, messages: Messages, hop: str | None = None) -> str | None:
        """The prompt the served model's chat template makes, where its tokenizer is here with one (to count and fit
        the window); else None, and the server renders the messages (or refuses them)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            return None
        return render_chat(self.tokenizer, messages, self.model, hop)

    def detokenize(self, tokens: Sequence[int]) -> str:
        if self.codec is None:
            raise NotImplementedError(f"model {self.model!r} has no tokenizer here; its server sends text")
        return self.codec.detokenize(tokens)

    def check(self, policy: BatchingPolicy) -> None:
        pass  # every policy applies: it says how many requests are in flight at once

    def scheduler(self, policy: BatchingPolicy, on_result: OnResult, on_error: OnError) -> Scheduler:
        return _Streams(self, policy.settings().max_batch, on_result, on_error)  # type: ignore[attr-defined]

    def release_memory(self) -> None:
        pass  # nothing of this machine's

    def memory_bytes(self) -> int:
        return 0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.abort()  # before the clients close, so what was in flight says the model went, not the server
            _clients.release(self.url)
            with self._lock:
                lanes, self._lane_clients = self._lane_clients, {}
            for loop in lanes:
                _clients.release_lane(loop, self.url)

    def abort(self, quiet_s: float | None = None, since: float = 0.0) -> None:
        """Cut off the streams in flight (the model is being unloaded): each fails with WorkerStopped and its
        connection closes; a stream that would start from now on fails so at once.

        ``quiet_s``: only once the server has sent no data line on any of them for that long (it took the requests
        and sits on them); while it sends tokens on one, every one goes on, as those it has queued behind that one
        are silent only because it answers one at a time (``transformers serve`` does). None: every one at once.
        The silence counts from ``since`` (a ``time.perf_counter()`` reading: when the unload began) at the
        earliest: a request on a loop lane may not have been sent yet, and its server cannot have been silent on it.
        """
        now = time.perf_counter()
        with self._lock:
            heard = max([self._heard, since, *(stamps.heard for _, stamps in self._streams.values())])
            if quiet_s is not None and now - heard < quiet_s:
                return  # and those waiting for a slot on the lane may still start: they were in flight already
            self._aborted = True
            streams = [(task, loop) for task, (loop, _) in self._streams.items()]
        for task, loop in streams:
            try:
                loop.call_soon_threadsafe(self._cut_off, task)
            except RuntimeError:
                pass  # the loop closed: the stream went with it

    def _cut_off(self, task: asyncio.Task[Any]) -> None:
        """On ``task``'s own loop: cancel its stream, unless it ended meanwhile; :meth:`_stream` says why it ended."""
        with self._lock:
            if task not in self._streams:
                return
            self._cut.add(task)
        task.cancel()

    def _unloaded(self) -> WorkerStopped:
        return WorkerStopped(f"model {self.model!r} was unloaded while this request was in flight",
                             hint=f"bench.load({self.model!r}, ...) again")

    async def astream(self, request: GenerationRequest, batch_id: int, batch_size: int) -> GenerationResult:
        """Stream ``request`` on the running event loop and return its result (the engine's loop lane).

        The same request, timing and errors as :meth:`send`, without the hand-offs: a call awaited
        on the workbench's loop goes out from that loop, and its answer wakes the awaiting hop
        there, with no worker thread and no streams thread in between.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._lane_clients.get(loop)
            if client is None:
                if self._closed:
                    raise WorkerStopped(f"model {self.model!r} was unloaded", hint=f"bench.load({self.model!r}, ...) again")
                client = self._lane_clients[loop] = _clients.lane(loop, self.url)
        result, _ = await self._stream(request, None, batch_id, batch_size, client)
        return result

    def generate(
        self, batch: list[GenerationRequest], on_token: TokenSink | None = None
    ) -> tuple[list[GenerationResult], BatchTiming]:
        """Send every request of ``batch`` at once, one stream each; return when the last stream ends."""
        batch_id = next_batch_id()
        started = time.perf_counter()
        sent = [self.send(request, on_token, batch_id, len(batch)) for request in batch]
        outcomes: list[tuple[GenerationResult, _Stamps]] = []
        error: BaseException | None = None
        for request, future in zip(batch, sent):
            try:
                outcomes.append(future.result())
            except BaseException as exc:  # wait for every stream, so none outlives its batch
                if not future.cancelled():
                    error = error or exc
                # Cancelled: its timeout ran out and its canceller settled it; the worker drops what stands here.
                outcomes.append((result_from_stamps(request, [], "", "length", started=started, first=started,
                                                    last=started, batch_id=batch_id, batch_size=len(batch)),
                                 _Stamps(posted=started)))
        if error is not None:
            raise error
        firsts = [stamps.first for _, stamps in outcomes if stamps.first is not None]
        first = min(firsts, default=time.perf_counter())
        ended = time.perf_counter()
        timing = BatchTiming(
            batch_id=batch_id, size=len(batch), padded_len=0, padding_tokens=0, started=started,
            prefill_ms=(first - started) * 1e3, decode_ms=(ended - first) * 1e3, detokenize_ms=0.0,
            steps=max((stamps.chunks for _, stamps in outcomes), default=0),
        )
        return [result for result, _ in outcomes], timing

    # -- one request -----------------------------------------------------------------------

    def send(
        self, request: GenerationRequest, on_token: TokenSink | None, batch_id: int, batch_size: int
    ) -> Future[tuple[GenerationResult, _Stamps]]:
        """Start ``request``'s stream on the loop; cancelling the request (its timeout ran out) closes the stream."""
        future = asyncio.run_coroutine_threadsafe(self._stream(request, on_token, batch_id, batch_size), self._loop)
        request.future.add_done_callback(lambda _: future.cancel())
        return future

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        params = request.params
        body: dict[str, Any] = {"model": self.served_model}
        if request.messages is not None:
            body["messages"] = request.messages  # never cut: a spec refuses truncate: left on a chat hop
        elif request.truncated_tokens:  # cut to fit the window (truncate: left): send the text of what was kept
            assert self.codec is not None  # only a prompt counted here can have been cut
            body["prompt"] = self.codec.decode(request.input_ids)
        else:
            body["prompt"] = request.prompt
        body.update({
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            # The server's token counts, in the last chunk; a server that does not know the option ignores it.
            "stream_options": {"include_usage": True},
        })
        if params.top_k:
            body["top_k"] = params.top_k  # vLLM, SGLang and llama.cpp take it; OpenAI itself does not
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    async def _post(
        self, client: aiohttp.ClientSession, url: str, body: dict[str, Any], span: Span
    ) -> aiohttp.ClientResponse:
        """POST ``body`` and return the answer once its headers are in; once more if the connection closed first.

        A server may close a connection the pool keeps without saying so: uvicorn (under vLLM, SGLang and
        ``transformers serve``) does after a 500 from an app that raised, and at the end of its keep-alive. A request
        sent on it meets a reset or a disconnect before any answer, the server never having read it; a completion
        changes nothing on the server, so it goes out again, as aiohttp resends an idempotent request.
        """
        try:
            return await client.post(url, json=body, headers=self.headers, proxy=self.proxy, timeout=self._timeout)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise  # nothing listens there: not a connection it closed
            span.add_event("remote.resent", {"exception.message": f"{type(exc).__name__}: {exc} before any answer"})
        return await client.post(url, json=body, headers=self.headers, proxy=self.proxy, timeout=self._timeout)

    async def _stream(
        self, request: GenerationRequest, on_token: TokenSink | None, batch_id: int, batch_size: int,
        client: aiohttp.ClientSession | None = None,
    ) -> tuple[GenerationResult, _Stamps]:
        span = request.span
        chat = request.messages is not None
        url = self.chat_url if chat else self.url
        span.set_attributes({attr.REMOTE_URL: url, attr.REMOTE_SERVED_MODEL: self.served_model,
                             attr.REMOTE_ENDPOINT: "/chat/completions" if chat else "/completions",
                             attr.SERVER_ADDRESS: _server(url)})
        body = self._body(request)
        texts: list[str] = []
        streamed = StrippedText()  # what each chunk adds to the answer, which is the texts joined and stripped
        thoughts: list[str] = []  # a reasoning model's thinking: its tokens, timed and counted, but not its answer
        itl: list[float] = []
        # A server that keeps sending (broken, or hostile) must not fill this machine's memory: one chunk a token
        # and a few more (a role, a finish reason, usage) is what an honest one sends.
        most_chunks = 2 * request.params.max_new_tokens + 16
        # And no token is longer than TOKEN_CHARS: the text kept is bounded too (each chunk may be 2 MiB long).
        most_chars, kept = TOKEN_CHARS * request.params.max_new_tokens, 0
        task = asyncio.current_task()
        assert task is not None
        stamps = _Stamps(posted=time.perf_counter())
        stamps.heard = stamps.posted
        other = b""  # the first line that is no part of an event stream, to show if no data line comes
        with self._lock:
            if self._aborted:
                raise self._unloaded()
            self._streams[task] = (asyncio.get_running_loop(), stamps)
        # read_timeout_s since the last data line, on a timer: aiohttp's read timeout starts again with every byte,
        # and the check below runs only when a whole line comes, so a server sending a byte now and then and never a
        # line's end held the request for ever. The timer costs nothing a line: it looks at stamps.heard when due.
        loop, silenced, noise = asyncio.get_running_loop(), [], [False]  # noise: lines came, none of them data
        ended: float | None = None  # when the finish reason came: the answer is whole, and what follows has a grace

        def watch() -> None:
            if ended is not None:
                return  # past the finish reason, FINISH_GRACE_S bounds the wait
            quiet_s = time.perf_counter() - stamps.heard
            if quiet_s >= self.read_timeout_s:
                silenced.append(quiet_s)
                task.cancel()
            else:
                watchdog[0] = loop.call_later(self.read_timeout_s - quiet_s, watch)

        watchdog = [loop.call_later(self.read_timeout_s, watch)]
        try:
            async with await self._post(client or self._client, url, body, span) as response:
                stamps.status = response.status
                span.set_attribute(attr.HTTP_STATUS, response.status)
                if response.status >= 400:
                    raise self._status_error(url, response, await _head_of(response))
                lines, grace = response.content, min(FINISH_GRACE_S, self.read_timeout_s)
                while True:
                    if ended is None:
                        line = await lines.readline()  # one line at a time, its b"\n" included
                    else:  # the answer is whole: its usage and [DONE] may follow, within the grace
                        try:
                            line = await asyncio.wait_for(lines.readline(), ended + grace - time.perf_counter())
                        except (TimeoutError, aiohttp.ClientError):
                            break  # kept open, or dropped mid-body: nothing more is needed of it
                    if not line:
                        break  # closed: without a finish reason, said below
                    now = time.perf_counter()
                    if not line.startswith(b"data:"):  # blank separators, comments, event names
                        noise[0] = True
                        if not other and line.strip() and not line.startswith((b":", b"event:", b"id:", b"retry:")):
                            other = line[:300]
                        if ended is None and now - stamps.heard > self.read_timeout_s:
                            raise self._silent(url, stamps, "no data line, only comments or blank lines")
                        continue
                    stamps.heard, noise[0] = now, False
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    stamps.lines += 1
                    if stamps.lines > most_chunks:
                        raise self._broken(url, stamps, f"it sent more than {most_chunks} chunks for max_tokens "
                                           f"{request.params.max_new_tokens}")
                    chunk = _parse(data, url)
                    # An error the server reports in a stream it had begun (some send the field, null, in every chunk).
                    if chunk.get("error") is not None:
                        said = _quoted(str(chunk["error"]))  # as much of it as an HTTP error shows
                        raise self._broken(url, stamps, f"the server reported an error mid-stream: {said}")
                    if chunk.get("usage"):
                        stamps.usage = chunk["usage"]
                    choices = chunk.get("choices")
                    if not choices:
                        continue
                    choice = choices[0] if isinstance(choices, list) else None
                    added = _texts(choice, chat) if isinstance(choice, dict) else None
                    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
                    if added is None or not isinstance(finish, (str, type(None))):
                        raise _misshapen(data, url, "whose choices are not shaped as an OpenAI stream's")
                    text, thought = added
                    if stamps.first is None and (text or thought or not chat):
                        stamps.first = now
                        # Now, not at the end: a span its timeout ended says by this whether a first token came.
                        span.set_attribute(attr.REMOTE_TTFT_MS, (now - stamps.posted) * 1e3)
                    elif (text or thought) and stamps.last is not None:
                        itl.append((now - stamps.last) * 1e3)
                    if text or thought:
                        stamps.last = now
                        stamps.chunks += 1
                        kept += len(text) + len(thought)
                        if kept > most_chars:
                            raise self._broken(url, stamps, f"it sent more than {most_chars} characters of text for "
                                               f"max_tokens {request.params.max_new_tokens}")
                    if thought:
                        thoughts.append(thought)
                    if text:
                        texts.append(text)
                        if request.stream and not request.cancelled:
                            (on_token or _on_token)(request, NO_TOKEN_ID, streamed.add(text))
                    if finish:  # null (or empty) until the last chunk of the answer
                        stamps.finish_reason = self._ended(url, stamps, finish)
                        ended = now
        except asyncio.CancelledError:
            if task in self._cut:  # by abort: the model was unloaded, the server did nothing wrong
                raise self._unloaded() from None
            if silenced and task.uncancel() == 0:  # the watchdog's, and no one else's: the server went quiet
                error = self._silent(url, stamps, "no data line, only comments or blank lines" if noise[0] else
                                     "not one whole line" if stamps.status is not None else "")
                _event(span, error)
                raise error from None
            raise  # its timeout ran out: whoever cancelled it has settled it
        except RemoteError as exc:
            _event(span, exc)
            raise
        except (aiohttp.ClientError, LineTooLong, ValueError) as exc:
            if isinstance(exc, ValueError) and str(exc) != _CHUNK_TOO_BIG:
                raise  # not the stream's: a token sink's own error, say
            error = self._translate(url, exc, stamps)
            _event(span, error)
            raise error from exc
        finally:
            watchdog[0].cancel()
            with self._lock:
                del self._streams[task]
                self._cut.discard(task)
                self._heard = max(self._heard, stamps.heard)
        if stamps.finish_reason is None:
            error = self._broken(url, stamps, "the stream ended without a finish reason") if stamps.lines or not other \
                else RemoteError(f"model server {url} sent no event stream (no data: line) but: "
                                 f"{other.decode('utf-8', 'replace')!r}", kind="broken_stream", url=url,
                                 status=stamps.status, hint="it was asked for a stream (stream: true): is this an "
                                 "OpenAI-compatible server that streams, and the URL its OpenAI base?")
            _event(span, error)
            raise error
        return self._result(request, stamps, "".join(texts), "".join(thoughts), itl, batch_id, batch_size), stamps

    def _result(
        self, request: GenerationRequest, stamps: _Stamps, text: str, thought: str, itl: list[float], batch_id: int,
        batch_size: int,
    ) -> GenerationResult:
        ended = time.perf_counter()
        first = stamps.first if stamps.first is not None else ended
        usage = stamps.usage if isinstance(stamps.usage, dict) else {}
        # A count the request rules out (below zero, above max_tokens, none for a text, more prompt tokens than any
        # tokenizer makes of its bytes) is a server's mistake: counted here instead, as without usage.
        sent = request.prompt if request.messages is None else json.dumps(request.messages)
        tokens_in = _count(usage.get("prompt_tokens"), 0, 3 * len(sent.encode("utf-8", "replace")) + 4096)
        tokens_out = _count(usage.get("completion_tokens"), 1 if text or thought else 0, request.params.max_new_tokens)
        if stamps.usage and (tokens_in is None or tokens_out is None):
            request.span.add_event("remote.usage_ignored", {"exception.message": f"the server's usage {usage!r:.200} "
                                                            "is not possible for this request; counted here"})
        counted_by = "server"
        if tokens_out is None:
            if self.codec is not None:
                tokens_out = sum(len(ids) for ids in self.codec.tokenize([text, thought], special_tokens=False))
                counted_by = "tokenizer"
            else:
                tokens_out, counted_by = stamps.chunks, "chunks"
        if tokens_in is None:
            if not request.input_ids and request.prompt and self.codec is not None:
                # Sent uncounted (see fits_uncounted) to a server that did not say: count it now.
                tokens_in = len(self.codec.tokenize([request.prompt])[0])
            else:
                tokens_in = request.tokens_in
        ttft_ms, e2e_ms = (first - stamps.posted) * 1e3, (ended - stamps.posted) * 1e3
        attributes: dict[str, Any] = {
            attr.REMOTE_E2E_MS: e2e_ms,
            attr.REMOTE_ITL_MS: itl,
            attr.REMOTE_CHUNKS: stamps.chunks,
            attr.REMOTE_TOKENS_FROM: counted_by,
            attr.USAGE_INPUT_TOKENS: tokens_in,
        }
        if tokens_out > 1:
            attributes[attr.REMOTE_TPOT_MS] = (e2e_ms - ttft_ms) / (tokens_out - 1)
        request.span.set_attributes(attributes)
        return result_from_stamps(
            request, [], text.strip(), stamps.finish_reason or "stop",  # type: ignore[arg-type]
            started=stamps.posted, first=first, last=ended, batch_id=batch_id, batch_size=batch_size,
            tokens_in=tokens_in, tokens_out=tokens_out,
        )

    # -- errors at the seam ----------------------------------------------------------------

    def _status_error(self, url: str, response: aiohttp.ClientResponse, text: str) -> RemoteError:
        status = response.status
        said = _quoted(text)
        where = f"model server {url} ({self.served_model!r})"
        # transformers serve answers a chat for a model without a chat template with a bare HTTP 500 (5.24), or with
        # HTTP 400 and transformers' own words (5.25: "Cannot use chat template functions because ...").
        no_template = url == self.chat_url and re.search(r"chat[ _]template", text, re.IGNORECASE) is not None
        chat = " (a model without a chat template cannot take messages: give the hop prompt: instead)" \
            if url == self.chat_url else ""
        if status == 429:
            retry_after = _retry_after(response.headers.get("retry-after"))
            return RemoteRateLimited(
                f"{where} is rate limiting: HTTP 429" + (f", retry after {retry_after:g} s" if retry_after else "")
                + (f": {said}" if said else ""),
                url=url, retry_after_s=retry_after,
                hint="give the hop retry (its waits honour Retry-After), lower the concurrency, or add a fallback",
            )
        if status >= 500:
            # A server starting up, scaling from zero or draining (or its balancer) says when to come back, as 429 does.
            retry_after = _retry_after(response.headers.get("retry-after"))
            return RemoteError(f"{where} failed the request: HTTP {status}"
                               + (f", retry after {retry_after:g} s" if retry_after else "")
                               + (f": {said}" if said else ""),
                               kind="status", url=url, status=status, retry_after_s=retry_after,
                               hint=f"the server's log says why{chat}; give the hop retry or a fallback")
        hint = {401: "the server refused this api_key: check it" if self.headers else "pass api_key=... when loading",
                403: "check the api_key",
                404: f"check served_model ({self.served_model!r}) and that the URL ends in /v1"}.get(
            status, "the server refused the request as sent: its message above says why")
        if no_template and status not in (401, 403, 404):
            hint = "the served model has no chat template, so it cannot take messages: give the hop prompt: instead"
        return RemoteError(f"{where} refused the request: HTTP {status}" + (f": {said}" if said else ""),
                           kind="rejected", url=url, status=status, hint=hint)

    def _translate(self, url: str, exc: BaseException, stamps: _Stamps) -> RemoteError:
        where = f"model server {url}"
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return RemoteError(f"{where} did not accept the connection within {CONNECT_TIMEOUT_S:g} s",
                               kind="refused", url=url, hint="is the host reachable? is the server overloaded?")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return RemoteError(f"{where} refused the connection: {exc.os_error or type(exc).__name__}", kind="refused",
                               url=url, hint="is the server running? a fallback model can answer meanwhile")
        if isinstance(exc, aiohttp.SocketTimeoutError) and stamps.first is None:
            return self._silent(url, stamps, "")
        if isinstance(exc, (LineTooLong, ValueError)):
            return self._broken(url, stamps, f"a line of the stream is longer than {2 * READ_BUFFER_BYTES} bytes")
        return self._broken(url, stamps, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

    def _silent(self, url: str, stamps: _Stamps, sent: str) -> RemoteError:
        """``read_timeout_s`` went by with no first token (``sent``: what came instead), or with no data at all."""
        if stamps.first is not None:
            return self._broken(url, stamps, f"{sent} for {self.read_timeout_s:g} s")
        return RemoteError(
            f"model server {url} took the request but sent no first token within {self.read_timeout_s:g} s"
            + (f" ({sent})" if sent else ""),
            kind="no_first_byte", url=url, status=stamps.status,
            hint="the server may be stuck or overloaded: give the hop a fallback, or load the model with a "
            "longer read_timeout_s if its queue is long",
        )

    @staticmethod
    def _ended(url: str, stamps: _Stamps, reason: str) -> str:
        """The result's finish reason for a server's ``reason``; a RemoteError for one that does not say the answer is
        whole: ``rejected`` for a content filter's (the same prompt meets the same filter, so no retry, and the model is
        not failing: its breaker does not count it), ``aborted`` for any other (vLLM's and SGLang's ``abort``: the
        server cut the request off, shutting down, pausing or told to; vLLM's ``error``; one unknown here), which a
        retry or a fallback may answer whole."""
        whole = _WHOLE.get(reason)
        if whole is not None:
            return whole
        said = f"model server {url} ended the answer with finish_reason {reason[:100]!r} after {stamps.chunks} chunks"
        if reason == "content_filter":
            raise RemoteError(f"{said}: its content filter withheld the rest", kind="rejected", url=url,
                              status=stamps.status,
                              hint="a retry meets the same filter: change the prompt, or give the hop a fallback")
        why = "the server cut the request off" if reason in ("abort", "error") else \
            "a reason that does not say it is whole"
        raise RemoteError(f"{said}: {why}, so its text is not the whole answer", kind="aborted", url=url,
                          status=stamps.status, hint="the server's log says why (it may have been shutting down or "
                          "pausing); give the hop retry or a fallback")

    @staticmethod
    def _broken(url: str, stamps: _Stamps, why: str) -> RemoteError:
        return RemoteError(
            f"model server {url} broke off the stream after {stamps.chunks} chunks: {why}",
            kind="broken_stream", url=url, status=stamps.status,
            hint="the server's log says why; give the hop retry or a fallback",
        )


class _Streams:
    """The continuous path: each request goes out as the worker takes it, up to ``limit`` in flight, and
    completes on its own. Each hand-off from the worker is one batch span, ended when its last request does."""

    def __init__(self, backend: RemoteBackend, limit: int, on_result: OnResult, on_error: OnError) -> None:
        self.backend = backend
        self._on_result = on_result
        self._on_error = on_error
        self._slots = threading.BoundedSemaphore(limit)
        self._inflight = 0
        self._idle = threading.Condition()

    def submit(self, batch: list[GenerationRequest], span: Span) -> None:
        batch_id = next_batch_id()
        with self._idle:
            self._inflight += len(batch)
            inflight = self._inflight
        span.set_attributes({attr.BATCH_ID: batch_id, attr.PADDING_TOKENS: 0, attr.BATCH_MODE: "continuous",
                             attr.BATCH_INFLIGHT: inflight})
        left = [len(batch)]
        failed = [False]
        lock = threading.Lock()

        def finished(request: GenerationRequest, future: Future[tuple[GenerationResult, _Stamps]]) -> None:
            self._slots.release()
            error = None if future.cancelled() else future.exception()
            with lock:
                left[0] -= 1
                failed[0] |= error is not None
                last = left[0] == 0
            if last:
                span.set_status(Status(StatusCode.ERROR if failed[0] else StatusCode.OK))
                span.end()
            if future.cancelled():
                pass  # the request's timeout ran out: whoever cancelled it has settled it
            elif error is not None:
                self._on_error([request], error)
            else:
                self._on_result(request, future.result()[0])
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

        for request in batch:
            self._slots.acquire()  # the worker waits here while ``limit`` requests are in flight
            future = self.backend.send(request, None, batch_id, len(batch))
            future.add_done_callback(lambda f, r=request: finished(r, f))

    def close(self) -> None:
        """Wait until every request sent has finished."""
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0)


# Pre-tokenizers that split text, or map each byte or character to one character (Metaspace: " " to "▁").
_PRE_TOKENIZERS = {"ByteLevel", "Split", "Whitespace", "WhitespaceSplit", "Digits", "Punctuation", "Metaspace",
                   "BertPreTokenizer", "UnicodeScripts", "CharDelimiterSplit"}


def token_bound(tokenizer: Any) -> tuple[int, int] | None:
    """``(factor, slack)`` such that no text tokenizes to more than ``factor * utf8_bytes(text) + slack`` tokens
    (special tokens, and a BOS a server may add, included), where ``tokenizer``'s pipeline shows it; else None.

    Every model a fast tokenizer runs (BPE, Unigram, WordPiece, WordLevel) makes each token of at least one
    character of the normalized, pre-tokenized text, or of one byte of it with byte fallback; so tokens are at
    most that text's bytes. What can make the text longer is its normalizer: none keeps it as it is; NFC
    grows a text by at most 3 times; a ``Replace`` of a literal by a longer one grows it by their ratio (a
    ``Metaspace`` pre-tokenizer's ``▁`` too), and a ``Prepend`` by its own length. Any other normalizer (NFKC
    can grow a character eighteen-fold), a pre-tokenizer not known here, or a slow tokenizer: None.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        normalizer = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else None
        pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else None
        specials = int(tokenizer.num_special_tokens_to_add())
    except Exception:  # a tokenizers release that serializes otherwise: count every prompt
        return None
    factor, slack = 1, specials + 2  # a prefix space or a prefix "▁" from the pre-tokenizer, a BOS from the server
    parts = [] if normalizer is None else normalizer.get("normalizers", [normalizer])
    for part in parts:
        kind = part.get("type")
        if kind == "NFC":
            factor = max(factor, 3)
        elif kind == "Prepend":
            slack += len(str(part.get("prepend", "")).encode())
        elif kind == "Replace" and isinstance(part.get("pattern"), dict) and "String" in part["pattern"]:
            was, now = str(part["pattern"]["String"]).encode(), str(part.get("content", "")).encode()
            if not was:
                return None
            factor = max(factor, -(-len(now) // len(was)))
        else:
            return None
    pres = [] if pre is None else pre.get("pretokenizers", [pre])
    for part in pres:
        if part.get("type") not in _PRE_TOKENIZERS:
            return None
        if part.get("type") == "Metaspace":
            factor = max(factor, len(str(part.get("replacement", "\u2581")).encode()))
    return factor, slack


def _on_token(request: GenerationRequest, token: int, text: str) -> None:
    if request.on_token is not None:
        request.on_token(token, text)


def _texts(choice: dict[str, Any], chat: bool) -> tuple[str, str] | None:
    """The answer's text and the thinking a streamed choice adds: a completion's ``text``; a chat's ``delta.content``,
    and a reasoning model's ``delta.reasoning_content`` (vLLM before 0.11, SGLang, llama.cpp) or ``delta.reasoning``
    (vLLM since, Ollama). None if the answer's is not text."""
    thought: object = ""
    if not chat:
        text = choice.get("text") or ""
    else:
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        text = delta.get("content") or ""
        thought = delta.get("reasoning_content") or delta.get("reasoning") or ""
    if not isinstance(text, str):
        return None
    return text, thought if isinstance(thought, str) else ""


async def _head_of(response: aiohttp.ClientResponse) -> str:
    """The first ERROR_BODY_BYTES of an error's body, as text: enough to say why, bounded whatever the server sends."""
    chunks: list[bytes] = []
    size = 0
    while size < ERROR_BODY_BYTES:
        chunk = await response.content.read(ERROR_BODY_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _parse(data: bytes, url: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise _misshapen(data, url, "that is not JSON") from None
    except RecursionError:  # arrays nested deeper than Python's stack: a bare RecursionError failed the hop
        raise _misshapen(data, url, "nested too deeply to read") from None
    if not isinstance(chunk, dict):
        raise _misshapen(data, url, "that is not a JSON object")
    return chunk


def _quoted(text: str) -> str:
    """What an error message shows of a server's own words: whitespace collapsed, the first 300 characters."""
    return " ".join(text.split())[:300]


def _misshapen(data: bytes, url: str, what: str) -> RemoteError:
    said = data[:200].decode("utf-8", "replace")
    return RemoteError(f"model server {url} sent a chunk {what}: {said!r}", kind="broken_stream", url=url,
                       hint="is this an OpenAI-compatible server?")


def _count(value: object, least: int, most: int) -> int | None:
    """A token count from a server's ``usage``, if it is a whole number from ``least`` to ``most``; else None."""
    return value if type(value) is int and least <= value <= most else None


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number of seconds, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:  # 'inf', 'nan', '1e400' read as floats: no wait anyone can keep (and a gateway's header failed on them)
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _event(span: Span, error: RemoteError) -> None:
    event: dict[str, Any] = {attr.REMOTE_FAILURE: error.kind, "exception.message": error.message}
    if error.status is not None:
        event[attr.HTTP_STATUS] = error.status
    if error.retry_after_s is not None:
        event[attr.REMOTE_RETRY_AFTER_S] = error.retry_after_s
    span.add_event(f"remote.{error.kind}", event)
    span.set_attribute(attr.REMOTE_FAILURE, error.kind)
