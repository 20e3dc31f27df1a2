"""What one served app holds and every route shares: the auth steps, body reading, replies, run slots, sessions,
run owners, and the caller's trace.

Every route but ``/health`` goes through the Auth first, in this order, before a body is read or
a run starts: is the client's address locked out for failed logins (429), who is calling (401), may
they (403), within their rate (429, ``Retry-After``), and is the body small enough (413). A server without
credentials first refuses, on every route, a browser's request from another site's page or under a name that is
not loopback (403, :meth:`Auth.check_local`). A request
that starts several runs (``/batch``, JSON-RPC) pays one at the door and the rest once its body,
read under the size limit, says how many (:meth:`Gateway.charge`): before any of them starts.
A batch also holds one run slot for each run it keeps in flight, so ``max_in_flight`` bounds the
runs a server runs at once however the callers bunch them; at most ``max_queued`` wait for a slot, and a call
that finds the queue full is refused at once (ServerBusy, 503 with ``Retry-After``) rather than held, its body
and connection with it, for as long as the queue takes.
Sessions are namespaced per principal, and a run can be read back only by the principal that made
it, or an admin, with its own spans only (a trace id is no secret, and others may join its trace: see
:func:`~workbench.tracing.trace.run_spans`).
The exact response cache (``cache: exact`` hops) keeps each principal's answers apart (:func:`cache_scope`): a caller
who sent the very prompt another sent got the stored answer, and could tell from ``workbench.cache.hit`` or the
speed that somebody had sent it. A server without credentials shares the notebook's cache.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from workbench.chains.chain import Chain
from workbench.chains.run import Run
from workbench.chains.runner import CACHE_SCOPE, TRACE_PARENT, check_inputs
from workbench.errors import (
    AccessError,
    HopFailed,
    ServerBusy,
    ServingError,
    SettingsError,
    WorkbenchError,
    plain,
    retry_after,
)
from workbench.fronts.server import envelope as env
from workbench.fronts.server.envelope import BatchRequest, ErrorResponse, RequestError, RunResult, error_detail
from workbench.fronts.server.metrics import GatewayMetrics
from workbench.tracing import attributes as attr

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from workbench.bench import Workbench
    from workbench.fronts.server.auth import Auth, Principal

log = logging.getLogger(__name__)

MAX_RUNS_OWNED = 100_000  # run ids remembered with their owner; older runs can no longer be read back
DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_MAX_QUEUED = 1024  # runs waiting for a slot; each holds its connection and its body (up to max_body_bytes)
DEFAULT_BODY_TIMEOUT_S = 10.0
BUSY_RETRY_AFTER_S = 1.0  # what a call refused by a full queue is told to wait
ADMIN_ACTION = "models.admin"  # whoever may do this administers the server, and may read every run
CLIENT_GONE = 499  # the status counted for a request whose client left before its answer (as nginx counts it)
AUTHENTICATED = ""  # the action of a route open to any known caller, whose handler authorizes each call it makes
_PROPAGATOR = TraceContextTextMapPropagator()

Handler = Callable[[Request, "Principal | None"], Awaitable[Response]]


class ServeError(SettingsError):
    """A gateway that cannot start: an unsafe host and auth pairing, a port in use or out of range, a bad limit."""


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free one), not listening yet; a ServeError saying why where
    it cannot be: the port in use, a host that is no address of this machine, a port only root may take."""
    if not host.strip():  # the socket would take it as every interface, which nobody writes as ''
        raise ServeError(f"host {host!r} is empty: name the address to listen on",
                         hint="127.0.0.1 serves this machine only, 0.0.0.0 every network it is on")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"cannot listen on {host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"{where}: the port is in use",
                             hint="stop what holds it, or pick another port (0: any free one)") from None
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise ServeError(f"{where}: {exc.strerror or exc}",
                             hint=f"{host!r} is no address of this machine: 127.0.0.1 serves this machine only, "
                                  "0.0.0.0 every network it is on") from None
        raise ServeError(f"{where}: {exc.strerror or exc}",
                         hint="ports below 1024 need root: pick one above (0: any free one)" if exc.errno ==
                         errno.EACCES else "pick another port (0: any free one)") from None
    return sock


class ServerStopping(ServingError):
    """The server stopped (Ctrl-C, SIGTERM, ``server.stop()``) before a request's answer was done; its run was
    cancelled."""

    def __init__(self) -> None:
        super().__init__("the server stopped before this request was answered; its run was cancelled",
                         hint="send it again once the server is back")


class Gateway:
    """What one served app holds: the workbench, the chains it serves, the Auth, metrics, and who owns which run.

    ``max_in_flight`` runs at once (the rest wait for a slot: the queue-wait metric), and at most
    ``max_queued`` waiting (more are refused: ServerBusy, 503); a request body that takes longer than
    ``body_timeout_s`` to arrive is refused with 408.
    """

    def __init__(
        self,
        bench: Workbench,
        chains: Collection[Chain],
        auth: Auth,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_queued: int = DEFAULT_MAX_QUEUED,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        # Checked here, before the server starts: a bad limit would otherwise fail every call (or none would wait).
        max_in_flight = _count("max_in_flight", max_in_flight, 1, DEFAULT_MAX_IN_FLIGHT)
        max_queued = _count("max_queued", max_queued, 0, DEFAULT_MAX_QUEUED)
        body_timeout_s = plain(body_timeout_s)
        if isinstance(body_timeout_s, bool) or not isinstance(body_timeout_s, (int, float)) \
                or not 0 < body_timeout_s < math.inf:
            raise ServeError(f"body_timeout_s={body_timeout_s!r:.40} is not a number of seconds above 0",
                             hint=f"e.g. body_timeout_s={DEFAULT_BODY_TIMEOUT_S:g} (the default)")
        self.bench = bench
        self.auth = auth
        self.chains: dict[str, Chain] = {chain.name: chain for chain in chains}
        self.metrics = GatewayMetrics()
        self.body_timeout_s = body_timeout_s
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self._slots: RunSlots | None = None  # made on the server's loop, at its first run
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._owners_lock = threading.Lock()

    # -- the steps every request takes ------------------------------------------------------------

    def route(self, path: str, handler: Handler, methods: list[str], action: str | None,
              *, per_chain: bool = False) -> Route:
        """``handler`` behind the Auth, timed and counted under ``path``.

        ``action`` None: an open route; :data:`AUTHENTICATED`: any known caller (the handler authorizes each call).
        """

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            request.state.started = started
            try:
                self.auth.check_local(request.headers)  # an open server: no other site's page, no rebound name
                who = None if action is None else self.admit(request, action, per_chain)
                answer = handler(request, who)
                response = await (_unless_gone(request, answer) if request.method == "POST" else answer)
            except Exception as exc:  # every failure becomes an error body; the server serves on
                response = self.error(request, exc)
            if not isinstance(response, StreamingResponse):  # a stream counts itself as it ends
                self.metrics.observe(path, request.method, response.status_code, time.perf_counter() - started)
            return response

        return Route(path, endpoint, methods=methods)

    def admit(self, request: Request, action: str, per_chain: bool) -> Principal:
        """429 (a locked-out address), 401, 403, 429 and 413, in that order, before anything is read or run."""
        who = self.auth.authenticate(request.headers, self.address(request))
        if action != AUTHENTICATED:
            self.auth.authorize(who, action, request.path_params.get("name") if per_chain else None)
        self.auth.admit(who)
        length = request.headers.get("content-length")
        self.auth.check_size(int(length) if length is not None and length.isdigit() else None)
        return who

    def address(self, request: Request) -> str | None:
        """The client's address: the socket peer, or what ``X-Forwarded-For`` says when the peer is a trusted proxy."""
        peer = request.client.host if request.client is not None else None
        return self.auth.client_address(peer, ",".join(request.headers.getlist("x-forwarded-for")))

    def charge(self, who: Principal | None, cost: int) -> None:
        """Charge the rest of a request that starts ``cost`` runs (the door took one): RateLimited (429) when the
        caller's bucket holds less, PayloadTooLarge (413) when ``cost`` is more than it ever holds."""
        if who is not None:
            self.auth.admit(who, max(cost, 1), paid=1)

    async def body(self, request: Request) -> bytes:
        """The request's body, decompressed; 413 past the Auth's size limit, 408 if it trickles in too slowly."""
        limit = self.auth.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    self.auth.check_size(size)
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(f"the request body did not arrive within {self.body_timeout_s:g} s", field="body",
                               status=408, hint="send the whole body at once") from None
        read = getattr(request.state, "body_read", None)
        if read is not None:
            read.set()  # from now on the request's receive channel says only whether the client is still there
        return env.decompress(b"".join(chunks), request.headers.get("content-encoding"), limit)

    async def decode(self, request: Request, kind: type[Any]) -> Any:
        codec = env.media_type(request.headers.get("content-type"))
        return env.decode(await self.body(request), kind, codec)

    def reply(self, request: Request, value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        """``value`` in the codec the client accepts, zstd-compressed when it asked for that and it is worth it."""
        codec = env.accepted(request.headers.get("accept"))
        body, encoding = env.compress(env.encode(value, codec), request.headers.get("accept-encoding"))
        headers = dict(headers or {})
        if encoding is not None:
            headers["content-encoding"] = encoding
        return Response(body, status, headers=headers, media_type=codec)

    def error(self, request: Request, exc: BaseException, action_type: str | None = None) -> Response:
        detail = error_detail(exc)
        if detail.status >= 500 and not isinstance(exc, WorkbenchError):
            log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return self.reply(request, ErrorResponse(error=detail, action_type=action_type), detail.status,
                          refusal_headers(exc))

    @asynccontextmanager
    async def slot(self, count: int = 1) -> AsyncIterator[None]:
        """``count`` of the ``max_in_flight`` run slots, for as long as the block runs; the wait is the queue-wait
        metric. A batch takes one per run it keeps in flight."""
        waited = time.perf_counter()
        slots = self.slots
        await slots.acquire(count)
        try:
            self.metrics.queue_wait.observe(time.perf_counter() - waited)
            self.metrics.in_flight.inc(count)
            try:
                yield
            finally:
                self.metrics.in_flight.dec(count)
        finally:
            slots.release(count)

    @property
    def slots(self) -> RunSlots:
        """The run slots, made on the server's loop at its first use."""
        if self._slots is None:
            self._slots = RunSlots(self.max_in_flight, self.max_queued, self.metrics.waiting)
        return self._slots

    # -- chains, sessions, runs ------------------------------------------------------------------

    def chain(self, name: str) -> Chain:
        chain = self.chains.get(name)
        if chain is None:
            raise RequestError(f"this server serves no chain {name!r}", field="name", status=404,
                               hint=f"served chains: {', '.join(sorted(self.chains)) or 'none'} (GET /v1/chains)")
        return chain

    @staticmethod
    def session(who: Principal | None, session_id: str | None) -> str | None:
        """The store's session id for a principal's ``session_id``: prefixed by the principal, so no key reads another's.

        The owner's length leads, so no choice of names and ids can make two principals' sessions meet.
        """
        if session_id is None:
            return None
        owner = who.owner if who is not None else ""
        return f"@{len(owner)}:{owner}:{session_id}"

    def own(self, run: Run, who: Principal | None) -> None:
        with self._owners_lock:
            self._owners[run.id] = who.owner if who is not None else ""
            while len(self._owners) > MAX_RUNS_OWNED:
                self._owners.popitem(last=False)

    def owned_run(self, run_id: str, who: Principal | None) -> Run:
        """The run ``run_id`` if ``who`` made it or is an admin; a 404 otherwise (another's run is not told apart)."""
        with self._owners_lock:
            owner = self._owners.get(run_id)
        if owner is None or (who is not None and owner != who.owner and not allowed(self.auth, who, ADMIN_ACTION, None)):
            raise RequestError(f"no run {run_id!r} of yours on this server", field="run_id", status=404,
                               hint="runs are kept for the principal that made them")
        runs = [r for r in self.bench.runs() if r.id == run_id]
        if not runs:
            raise RequestError(f"run {run_id!r} is no longer kept", field="run_id", status=404)
        return runs[0]

    async def run(self, chain: Chain, inputs: dict[str, Any], session: str | None, parent: Context | None,
                  who: Principal | None) -> Run:
        """One run of ``chain`` joined to ``parent``'s trace; a failed hop gives the failed Run, not an exception."""
        check_inputs(chain.spec, inputs)  # before a slot is taken: a bad input waits for nothing
        async with self.slot():
            TRACE_PARENT.set(parent)  # this request's task only
            CACHE_SCOPE.set(cache_scope(who))
            try:
                run = await chain.arun(session, **inputs)
            except HopFailed as failed:
                if not isinstance(failed.run, Run):
                    raise
                run = failed.run
        self.own(run, who)
        return run

    async def batch(self, chain: Chain, request: BatchRequest, who: Principal | None,
                    parent: Context | None) -> list[Run]:
        for item in request.inputs:
            check_inputs(chain.spec, item)
        in_flight = max(1, min(request.concurrency, len(request.inputs), self.max_in_flight))
        async with self.slot(in_flight):  # one slot per run in flight, as if each came alone
            TRACE_PARENT.set(parent)
            CACHE_SCOPE.set(cache_scope(who))
            runs = await chain.amap(request.inputs, concurrency=in_flight,
                                    session=self.session(who, request.session_id))
        finished = [run for run in runs if run is not None]
        for run in finished:
            self.own(run, who)
        return finished

    # -- traces ----------------------------------------------------------------------------------

    @staticmethod
    def parent(request: Request, trace_id: str | None = None) -> Context | None:
        """The caller's trace: its W3C ``traceparent`` header, else the envelope's ``trace_id``; None for a new one."""
        if "traceparent" in request.headers:
            context = _PROPAGATOR.extract(request.headers)
            if trace.get_current_span(context).get_span_context().is_valid:
                return context
            raise RequestError(f"the traceparent header {request.headers['traceparent']!r} is not a W3C trace context",
                               field="traceparent", hint="00-<32 hex trace id>-<16 hex span id>-<2 hex flags>")
        if trace_id is None:
            return None
        try:
            number = int(trace_id, 16) if len(trace_id) == 32 else 0
        except ValueError:
            number = 0
        if not number:
            raise RequestError(f"trace_id {trace_id!r} is not 32 hex digits (not all zero)", field="$.trace_id",
                               status=422)
        # Join that trace under a parent we do not know: a remote span context with a fresh span id.
        span = NonRecordingSpan(SpanContext(number, uuid.uuid4().int >> 64 or 1, is_remote=True,
                                            trace_flags=TraceFlags(TraceFlags.SAMPLED)))
        return trace.set_span_in_context(span, Context())

    def trace_headers(self, run: Run) -> dict[str, str]:
        """``x-trace-id`` and a ``traceparent`` naming the run's root span, so the caller can link to it."""
        headers = {"x-trace-id": f"{run.trace_id:032x}"}
        root = self._root_span_id(run)
        if root is not None:
            headers["traceparent"] = f"00-{run.trace_id:032x}-{root:016x}-01"
        return headers

    def _root_span_id(self, run: Run) -> int | None:
        for span in self.bench.tracing.index.spans(run.trace_id):
            if span.name == f"chain {run.chain}" and (span.attributes or {}).get(attr.RUN_ID) == run.id:
                return span.context.span_id if span.context is not None else None
        return None

    # -- the envelope's view of a run ------------------------------------------------------------

    @staticmethod
    def result(run: Run, kind: type[RunResult] = RunResult, **extra: Any) -> Any:
        error = None
        if run.error is not None:
            error = error_detail(run.error)
            error.status = run_status(run.error)
        return kind(run_id=run.id, chain=run.chain, status=run.status, output=run.output, outputs=run.outputs,
                    trace_id=f"{run.trace_id:032x}", duration_ms=run.duration_ms, error=error, **extra)


async def _unless_gone(request: Request, answer: Awaitable[Response]) -> Response:
    """``answer``, unless the client goes away first, once it has sent its body (a client that timed out, to retry
    perhaps): then the work is cancelled (its run stops and frees its slot and the model) and the answer is a
    :data:`CLIENT_GONE` that nobody reads. A stream's handler returns at once; its response watches for itself."""
    request.state.body_read = asyncio.Event()
    work = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the server stopping cancels the request
        work.cancel()
        raise
    finally:
        gone.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.wait({work})
    return Response(status_code=CLIENT_GONE)


async def _disconnect(request: Request) -> None:
    """Return when the client disconnects, once its body was read (before that, the handler reads the channel)."""
    await request.state.body_read.wait()
    while (await request.receive())["type"] != "http.disconnect":
        pass


# Span attributes that name the server's own files or the servers behind it: an administrator's to read, as a
# model's source is in models.list, not every caller's who reads a run back.
_SERVER_PLACES = frozenset({attr.MODEL_SOURCE, attr.REMOTE_URL, attr.ADAPTER_PATH, attr.KNOWLEDGE_GRAPH,
                            attr.KNOWLEDGE_RELOAD_ERROR})


def run_json(run: Run, places: bool = True) -> dict[str, Any]:
    """A run and its spans (the server's part of its trace) as JSON-ready data; without the server's own paths and
    upstream URLs unless ``places`` (see :func:`sees_places`): ``llm.model_name`` is then the model's served name."""
    spans = []
    for span in sorted(run.trace.spans, key=lambda s: s.start_time or 0):
        context = span.context
        attributes = dict(span.attributes or {})
        if not places:
            for key in _SERVER_PLACES.intersection(attributes):
                del attributes[key]
            if attr.LLM_MODEL_NAME in attributes:
                name = attributes.get(attr.MODEL_NAME)
                if isinstance(name, str):
                    attributes[attr.LLM_MODEL_NAME] = name
                else:
                    del attributes[attr.LLM_MODEL_NAME]
        spans.append({
            "name": span.name,
            "span_id": f"{context.span_id:016x}" if context else None,
            "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
            "trace_id": f"{context.trace_id:032x}" if context else None,
            "start_time_ns": span.start_time,
            "end_time_ns": span.end_time,
            "duration_ms": ((span.end_time or 0) - (span.start_time or 0)) / 1e6,
            "status": span.status.status_code.name,
            "attributes": {k: list(v) if isinstance(v, tuple) else v for k, v in attributes.items()},
        })
    return {
        "run_id": run.id, "chain": run.chain, "status": run.status, "inputs": run.inputs, "outputs": run.outputs,
        "output": run.output, "trace_id": f"{run.trace_id:032x}", "started_at": run.started_at,
        "duration_ms": run.duration_ms, "error": error_detail(run.error) if run.error is not None else None,
        "spans": spans,
    }


def cache_scope(who: Principal | None) -> str | None:
    """Whose answers a served run's exact cache hops share: the principal's (None, a server without credentials: the
    workbench's, as the notebook's runs)."""
    return None if who is None or who.via == "open" else f"principal:{who.owner}"


def run_status(error: HopFailed) -> int:
    """The HTTP status of a failed run: its cause's where the cause is the workbench's (422 for a template that
    could not render, 503 for a refusing model, 504 for a timeout), else 500: the model or a Python hop raised."""
    cause = error.cause
    return int(cause.http_status) if isinstance(cause, WorkbenchError) else 500


def _count(name: str, value: object, least: int, default: int) -> int:
    """``value`` as a whole number of at least ``least``, or ServeError naming the setting and its ``default``."""
    value = plain(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ServeError(f"{name}={value!r:.40} is not a whole number of at least {least}",
                         hint=f"e.g. {name}={default} (the default)")
    return value


def refusal_headers(exc: BaseException) -> dict[str, str]:
    """The headers an error's response carries: an AccessError's own (WWW-Authenticate, Retry-After), and Retry-After
    for a serving refusal that says when to try again (see :func:`retry_after_s`)."""
    if isinstance(exc, AccessError):
        return exc.headers
    wait = retry_after_s(exc)
    return retry_after(wait) if wait is not None else {}


def retry_after_s(exc: BaseException) -> float | None:
    """How long a refused call should wait before it is tried again, where the refusal says: a rate limit, a breaker
    open until its trial, a model server's 429; itself or as the cause of a failed run. None where it does not say."""
    cause = exc.cause if isinstance(exc, HopFailed) else exc
    # A rate limit or a full server (AccessErrors), a breaker or a model server's 429 (ServingErrors): the others of
    # both branches have no retry_after_s.
    return getattr(cause, "retry_after_s", None) if isinstance(cause, (AccessError, ServingError)) else None


def sees_places(auth: Auth, who: Principal | None) -> bool:
    """Whether ``who`` reads the server's own paths and upstream URLs in what it is sent: its administrators (and
    everyone on a server without credentials, which is this machine's own)."""
    return who is None or allowed(auth, who, ADMIN_ACTION, None)


def allowed(auth: Auth, who: Principal, action: str, chain: str | None) -> bool:
    """Whether ``who`` may do ``action`` (on ``chain``), without raising."""
    try:
        auth.authorize(who, action, chain)
    except WorkbenchError:
        return False
    return True


class RunSlots:
    """``size`` run slots on one event loop, taken and given back several at a time, and at most ``max_waiting``
    callers waiting for them (ServerBusy for the next).

    Waiters are served in the order they came, so a batch waiting for many slots is not starved by
    single runs slipping past it; a waiter cancelled before its turn gives its place up.
    """

    def __init__(self, size: int, max_waiting: int = DEFAULT_MAX_QUEUED, gauge: Gauge | None = None) -> None:
        self.size = size
        self.free = size
        self.max_waiting = max_waiting
        self.waiting = 0
        self._gauge = gauge  # the metric of how many wait
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def check_room(self) -> None:
        """ServerBusy if a caller that had to wait now would find the queue full."""
        if self.waiting >= self.max_waiting:
            raise ServerBusy(
                f"the server is full: all {self.size} run slots (max_in_flight) are taken and {self.waiting} "
                f"calls wait for one (max_queued={self.max_waiting}); nothing ran",
                retry_after_s=BUSY_RETRY_AFTER_S,
                hint="try again after Retry-After; whoever runs the server can raise max_queued or max_in_flight "
                     "(bench.serve(max_queued=...), autoglm serve --max-queued N)",
            )

    async def acquire(self, count: int) -> None:
        if not 1 <= count <= self.size:
            raise ValueError(f"a run takes 1 to {self.size} slots, not {count}")
        if not self._waiters and self.free >= count:
            self.free -= count
            return
        self.check_room()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((count, waiter))
        self._waited(+1)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # its slots were given just as it was cancelled
                self.release(count)
            else:
                self._wake()  # drops it; a big waiter leaving the head may let smaller ones behind it in
            raise
        finally:
            self._waited(-1)

    def _waited(self, change: int) -> None:
        self.waiting += change
        if self._gauge is not None:
            self._gauge.inc(change)

    def release(self, count: int) -> None:
        self.free += count
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            count, waiter = self._waiters[0]
            if waiter.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if self.free < count:
                return
            self._waiters.popleft()
            self.free -= count
            waiter.set_result(None)
