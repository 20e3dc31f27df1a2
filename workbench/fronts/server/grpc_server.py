"""The gRPC front: ChainService (chain.proto) on a grpc.aio server, with the gateway's auth, envelope and traces.

``Invoke`` runs a chain once; ``Stream`` is bidirectional: a client sends any number of StreamRequests on one
stream and each is answered by its own events (hop started, token, attempt failed, hop finished, then one Final or
one Error), tagged with the request's ``request_id``. Requests on one stream run concurrently, up to
``max_in_flight``.

Credentials come as metadata (``authorization: Bearer <key or JWT>`` or ``x-api-key``) and go through the same
:class:`~workbench.fronts.server.auth.Auth` as the REST front. A refused call never starts a run: no or bad
credentials end the call (or the whole stream) with UNAUTHENTICATED, and count against the client's address as
over REST (an address locked out for them: RESOURCE_EXHAUSTED and ``retry-after``, for the call or the whole
stream); a wrong role with PERMISSION_DENIED, a rate limit with RESOURCE_EXHAUSTED (and ``retry-after`` in the
trailing metadata) — on a stream these two answer only the request they refuse, as an Error event, and the
stream goes on. A stream's credential is checked again for each request it carries, as each unary call's is: a key
revoked (or a JWT expired) while the stream is open answers the requests sent after that with an UNAUTHENTICATED
Error event. A ``traceparent`` metadata entry (else
the envelope's ``trace_id``) puts the server's spans in the caller's trace; replies name the trace
(``envelope.trace_id``, and ``x-trace-id`` in the trailing metadata, a failed run's included). Errors of the
error tree map to status codes by :func:`status_for`; anything else that fails while answering is logged with its
traceback and answered INTERNAL with a plain message (an Error event on a stream, which goes on).

It serves a :class:`~workbench.fronts.server.gateway.Gateway`, the REST routes' own: the same run slots,
sessions namespaced per caller, run owners (a run made over gRPC is read back over ``GET /v1/runs/{id}`` by its
caller only) and metrics (routes ``/autoglm.workbench.v1.ChainService/Invoke`` and ``/Stream``, method ``GRPC``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import grpc
import msgspec

from workbench.chains.events import AttemptFailed, HopFinished, HopStarted, RunFinished, Token
from workbench.chains.runner import CACHE_SCOPE, TRACE_PARENT, check_inputs
from workbench.errors import HopFailed, RunCancelled, SettingsError, WorkbenchError
from workbench.fronts.server import chain_pb2 as pb
from workbench.fronts.server import chain_pb2_grpc
from workbench.fronts.server import envelope as env
from workbench.fronts.server.app import _check_action
from workbench.fronts.server.envelope import RequestError
from workbench.fronts.server.gateway import bound_socket, cache_scope, retry_after_s

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from workbench.chains.chain import Chain
    from workbench.chains.run import Run
    from workbench.fronts.server.auth import Principal
    from workbench.fronts.server.gateway import Gateway

log = logging.getLogger(__name__)

INVOKE_ACTION = "chains.invoke"  # the Auth's action for both methods
# What a caller is told of a failure outside the error tree; the server's log has the traceback.
INTERNAL_MESSAGE = "internal error: the server failed while answering this request; its log says why"
SERVICE = "/autoglm.workbench.v1.ChainService"
# Requests one Stream runs at once; the next waits (the stream stops reading) until one finishes.
MAX_IN_FLIGHT = 64
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

# The gateway's HTTP status of an error (its ``http_status``) as a gRPC status code, following the pairs of
# Google's API design guide (AIP-193) read the other way.
_BY_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # what gRPC itself answers for a message over its size limit
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code a caller gets for ``exc``.

    A failed hop answers with the code of what made it fail (a breaker open: UNAVAILABLE; a hop timeout:
    DEADLINE_EXCEEDED); a Python hop that raised something outside the error tree: UNKNOWN. A cancelled run:
    CANCELLED. Any other WorkbenchError: by its ``http_status`` (400 and 422: INVALID_ARGUMENT, 404: NOT_FOUND,
    413 and 429: RESOURCE_EXHAUSTED, 503: UNAVAILABLE, ...); an exception outside the tree: INTERNAL.
    """
    if isinstance(exc, HopFailed):
        return status_for(exc.cause) if isinstance(exc.cause, WorkbenchError) else grpc.StatusCode.UNKNOWN
    if isinstance(exc, RunCancelled):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, WorkbenchError):
        return _BY_HTTP_STATUS.get(int(exc.http_status), grpc.StatusCode.INTERNAL)
    return grpc.StatusCode.INTERNAL


def _http_status(exc: BaseException) -> int:
    if isinstance(exc, HopFailed) and isinstance(exc.cause, WorkbenchError):
        return int(exc.cause.http_status)
    return int(exc.http_status) if isinstance(exc, WorkbenchError) else 500


class ChainServicer(chain_pb2_grpc.ChainServiceServicer):
    """Serves a Gateway's chains: the same Auth, sessions, run owners and metrics as its REST routes."""

    def __init__(self, gateway: Gateway, *, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.gateway = gateway
        self.max_in_flight = max_in_flight

    # -- the two methods -----------------------------------------------------------------------

    async def Invoke(self, request: pb.InvokeRequest, context: grpc.aio.ServicerContext) -> pb.InvokeResponse:
        started = time.perf_counter()
        status = 200
        metadata = _metadata(context)
        try:
            who = self.gateway.auth.authenticate(metadata, self._address(context, metadata))
            chain, inputs, session = self._admit(who, request, "invoke")
            parent = self._parent(metadata, request.envelope.trace_id)
            run = await self.gateway.run(chain, inputs, session, parent, who)
            context.set_trailing_metadata(tuple(self.gateway.trace_headers(run).items()))
            if run.error is not None:
                raise run.error
            return _response(run, request, "invoke")
        except WorkbenchError as exc:
            status = _http_status(exc)
            await _abort(context, exc)
            raise  # not reached: abort raises
        except Exception as exc:  # else gRPC answers UNKNOWN with the Python class's name, and logs no traceback
            status = 500
            _log_internal("Invoke", request.chain, exc)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
            raise  # not reached: abort raises
        finally:
            self.gateway.metrics.observe(f"{SERVICE}/Invoke", "GRPC", status, time.perf_counter() - started)

    async def Stream(
        self, requests: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamEvent]:
        metadata = _metadata(context)
        address = self._address(context, metadata)
        try:
            self.gateway.auth.authenticate(metadata, address)  # bad credentials refuse the whole stream at once
        except WorkbenchError as exc:
            self.gateway.metrics.observe(f"{SERVICE}/Stream", "GRPC", _http_status(exc), 0.0)
            await _drain(requests)
            await _abort(context, exc)
            return
        events: asyncio.Queue[pb.StreamEvent | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.max_in_flight)
        running: set[asyncio.Task[None]] = set()

        async def answer(item: pb.StreamRequest) -> None:
            try:
                await self._answer(item, metadata, address, events.put_nowait)
            finally:
                slots.release()

        async def read() -> None:
            async for item in requests:
                await slots.acquire()
                task = asyncio.ensure_future(answer(item))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:  # the client closed its side: finish what it asked for, then end the stream
                await asyncio.gather(*list(running), return_exceptions=True)
            events.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (event := await events.get()) is not None:
                yield event
            await reader  # a broken request stream raises here
        finally:  # the client cancelled, or the stream broke: stop every run it started
            reader.cancel()
            for task in list(running):
                task.cancel()

    # -- the steps -----------------------------------------------------------------------------

    def _admit(self, who: Principal, request: pb.InvokeRequest,
               action: str) -> tuple[Chain, dict[str, Any], str | None]:
        """Check one request before its run, in the REST routes' order: role (403), rate (429), then the chain
        (404), the envelope and the inputs."""
        self.gateway.auth.authorize(who, INVOKE_ACTION, request.chain)
        self.gateway.auth.admit(who)
        chain = self.gateway.chain(request.chain)
        env.check_envelope(request.envelope)
        _check_action(request.envelope.action_type or None, action)
        inputs = _inputs(request.inputs_json)
        check_inputs(chain.spec, inputs)
        return chain, inputs, self.gateway.session(who, request.session_id or None)

    def _address(self, context: grpc.aio.ServicerContext, metadata: Mapping[str, str]) -> str | None:
        """The client's address (the peer, or a trusted proxy's ``x-forwarded-for``), whose failed logins count."""
        return self.gateway.auth.client_address(_peer_host(context.peer()), metadata.get("x-forwarded-for"))

    def _parent(self, metadata: Mapping[str, str], trace_id: str) -> Context | None:
        """The caller's trace: a W3C ``traceparent`` metadata entry, else the envelope's ``trace_id``."""
        # Gateway.parent reads only a request's ``headers``; gRPC metadata is the same lower-case mapping.
        return self.gateway.parent(SimpleNamespace(headers=metadata), trace_id or None)  # type: ignore[arg-type]

    async def _answer(self, item: pb.StreamRequest, metadata: Mapping[str, str], address: str | None,
                      put: Callable[[pb.StreamEvent], None]) -> None:
        """Run one request of a stream, putting its events (or its one Error) on the stream.

        The stream's credential is checked again for each request, as each unary call's is: a key revoked or a JWT
        expired while the stream is open refuses the requests sent after that (UNAUTHENTICATED)."""
        request_id, request = item.request_id, item.request
        started = time.perf_counter()
        status = 200
        trace_id = ""
        first_token = True

        def send(**event: Any) -> None:
            put(pb.StreamEvent(request_id=request_id, envelope=pb.Envelope(
                trace_id=trace_id, context_blob=request.envelope.context_blob, action_type="stream"), **event))

        try:
            who = self.gateway.auth.authenticate(metadata, address)
            chain, inputs, session = self._admit(who, request, "stream")
            TRACE_PARENT.set(self._parent(metadata, request.envelope.trace_id))  # this request's task only
            CACHE_SCOPE.set(cache_scope(who))
            async with self.gateway.slot():
                async for event in chain.astream(session, **inputs):
                    if isinstance(event, HopStarted):
                        send(hop_started=pb.HopStarted(hop=event.hop))
                    elif isinstance(event, Token):
                        if first_token:
                            self.gateway.metrics.ttft.labels(chain.name).observe(time.perf_counter() - started)
                            first_token = False
                        send(token=pb.TokenDelta(hop=event.hop, text=event.text, token_id=event.token_id))
                    elif isinstance(event, AttemptFailed):
                        send(attempt_failed=pb.AttemptFailed(hop=event.hop, attempt=event.attempt, route=event.route,
                                                             error=event.error))
                    elif isinstance(event, HopFinished):
                        send(hop_finished=pb.HopFinished(hop=event.hop, output_json=_json(event.output),
                                                         duration_ms=event.duration_ms))
                    elif isinstance(event, RunFinished):
                        run = event.run
                        self.gateway.own(run, who)
                        trace_id = f"{run.trace_id:032x}"
                        if run.error is not None:
                            status = _http_status(run.error)
                            send(error=_error(run.error, run))
                        else:
                            send(final=pb.Final(response=_response(run, request, "stream")))
        except WorkbenchError as exc:  # refused, or the run failed outside every hop (the workbench closed, say)
            status = _http_status(exc)
            send(error=_error(exc))
        except Exception as exc:  # a bug, or a hop output no encoder can write: this request ends, the stream goes on
            status = 500
            _log_internal("Stream", request.chain, exc)
            send(error=pb.Error(code=grpc.StatusCode.INTERNAL.value[0], message=INTERNAL_MESSAGE))
        finally:
            self.gateway.metrics.observe(f"{SERVICE}/Stream", "GRPC", status, time.perf_counter() - started)


class GrpcServer:
    """A Gateway's ChainService on ``host:port`` (port 0: a free one), served on the workbench's own event loop.

    The loop the chains walk on serves the calls too (as the REST server does), so a call's run starts without a
    hand-off between threads. ``start()`` returns once it listens; ``target`` is what a channel dials
    (``grpc.aio.insecure_channel``); ``stop()`` lets calls in flight finish for ``grace`` seconds, then cancels
    them. Also a context manager. Messages over the Auth's ``max_body_bytes`` are refused with RESOURCE_EXHAUSTED
    by gRPC itself. ``bench.serve(..., grpc_port=N)`` starts one beside the REST server, on the same Gateway.
    """

    def __init__(self, gateway: Gateway, *, host: str = "127.0.0.1", port: int = 0,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.gateway = gateway
        self.host = host
        self.port = port
        self.servicer = ChainServicer(gateway, max_in_flight=max_in_flight)
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the workbench's, where the server runs

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> GrpcServer:
        """Listen; an open Auth (no credentials) is refused off loopback."""
        if self._server is None:
            self.gateway.auth.check_host(self.host)
            if self.port:  # said as for HTTP, where gRPC would also log its own line to stderr (add_port.cc)
                bound_socket(self.host, self.port).close()
            self.gateway.bench.start(self._open()).result(START_TIMEOUT_S)
        return self

    async def _open(self) -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", self.gateway.auth.max_body_bytes),
                                          ("grpc.so_reuseport", 0)])
        chain_pb2_grpc.add_ChainServiceServicer_to_server(self.servicer, server)
        try:
            bound = server.add_insecure_port(self.target)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise SettingsError(f"the gRPC server cannot listen on {self.target}",
                                hint="pick another port, or grpc_port=0 for any free one")
        self.port = bound
        await server.start()
        self._server, self._loop = server, asyncio.get_running_loop()

    def stop(self, grace: float = 1.0) -> None:
        """Stop listening; calls in flight get ``grace`` seconds to finish. Stopping twice is harmless."""
        server, loop, self._server, self._loop = self._server, self._loop, None, None
        if server is None or loop is None or loop.is_closed() or not loop.is_running():
            return  # the workbench's loop ended, and the server's calls with it
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace), loop)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not inside a loop (a handler, a hop), where waiting would block it
            stopping.result(STOP_TIMEOUT_S)

    def __enter__(self) -> GrpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "listening" if self.running else "stopped"
        return f"<GrpcServer {self.target} {state}: chains={sorted(self.gateway.chains)}>"


# -- helpers -----------------------------------------------------------------------------------------

# How long a refused stream's requests are read (and dropped) before its status is sent.
DRAIN_S = 0.5


async def _drain(requests: AsyncIterator[pb.StreamRequest]) -> None:
    """Read and drop a refused stream's requests until the client half-closes, for at most DRAIN_S seconds.

    grpcio's asyncio client reports INTERNAL ("Failed execute_batch") instead of the server's status when one of
    its writes lands after the status (grpc/grpc#36066); a client that sends its requests and half-closes gets the
    real refusal this way. Nothing is decoded or run, and a client that keeps writing waits no longer than this.
    """
    async def read_all() -> None:
        async for _ in requests:
            pass

    try:
        await asyncio.wait_for(read_all(), DRAIN_S)
    except (TimeoutError, grpc.RpcError):
        pass


def _peer_host(peer: str | None) -> str | None:
    """The host of a gRPC peer (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``); None for a Unix socket or none."""
    kind, _, rest = unquote(peer or "").partition(":")  # some gRPC versions write ipv6:%5B::1%5D:5000
    if kind not in ("ipv4", "ipv6"):
        return None
    return rest.rpartition(":")[0].strip("[]")


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's metadata as lower-case text headers (binary ``-bin`` entries left out)."""
    return {key.lower(): value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with the status ``exc`` maps to; trailing metadata names the run and its trace, and when to try
    again where the refusal says (``retry-after``, seconds: a rate limit, a breaker open until its trial)."""
    trailing: list[tuple[str, str]] = []
    run = exc.run if isinstance(exc, HopFailed) else None
    if run is not None:
        trailing += [("x-trace-id", f"{run.trace_id:032x}"), ("x-run-id", run.id)]  # type: ignore[attr-defined]
    wait = retry_after_s(exc)
    if wait is not None:
        trailing.append(("retry-after", f"{wait:.3f}"))
    context.set_trailing_metadata(tuple(trailing))
    await context.abort(status_for(exc), str(exc))


def _log_internal(method: str, chain: str, exc: BaseException) -> None:
    log.error("%s/%s on chain %r failed", SERVICE, method, chain, exc_info=exc)


def _error(exc: BaseException, run: Run | None = None) -> pb.Error:
    detail = env.error_detail(exc)
    return pb.Error(
        code=status_for(exc).value[0], message=detail.message, hint=detail.hint or "", hop=detail.hop or "",
        run_id=run.id if run is not None else "",
        retry_after_s=retry_after_s(exc) or 0.0,
    )


def _response(run: Run, request: pb.InvokeRequest, action: str) -> pb.InvokeResponse:
    return pb.InvokeResponse(
        envelope=pb.Envelope(trace_id=f"{run.trace_id:032x}", context_blob=request.envelope.context_blob,
                             action_type=action),
        run_id=run.id,
        output_json=_json(run.output),
        outputs_json=_json(run.outputs),
        duration_ms=run.duration_ms,
    )


_json_decoder = msgspec.json.Decoder(dict[str, Any])


def _inputs(text: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        return _json_decoder.decode(text)
    except msgspec.ValidationError as exc:
        raise RequestError(f"inputs_json must be a JSON object (input name -> value): {exc}", field="inputs_json",
                           hint='e.g. {"question": "..."}') from None
    except msgspec.DecodeError as exc:
        raise RequestError(f"inputs_json is not JSON: {exc}", field="inputs_json",
                           hint='a JSON object of the chain\'s inputs, e.g. {"question": "..."}') from None
    except RecursionError:
        raise RequestError("inputs_json nests too deeply to read", field="inputs_json",
                           hint="inputs need a few levels of nesting at most") from None


def _json(value: Any) -> str:
    return env.encode(value, env.JSON).decode()
