"""The gRPC front: ChainService (chain.proto) on a grpc.aio server, with the gateway's auth, envelope and traces.

``Invoke`` runs a chain once; ``Stream`` is bidirectional: a client sends any number of StreamRequests on one
stream and each is answered by its own events (hop started, token, hop finished, then one Final or one Error),
tagged with the request's ``request_id``. Requests on one stream run concurrently, up to ``max_in_flight``.

Credentials come as metadata (``authorization: Bearer <key or JWT>`` or ``x-api-key``) and go through the same
:class:`~workbench.fronts.server.auth.Auth` as the REST front. A refused call never starts a run: no or bad
credentials end the call (or the whole stream) with UNAUTHENTICATED; a wrong role with PERMISSION_DENIED, a rate
limit with RESOURCE_EXHAUSTED (and ``retry-after`` in the trailing metadata) — on a stream these two answer
only the request they refuse, as an Error event, and the stream goes on. A ``traceparent`` metadata entry puts
the server's spans in the caller's trace; replies name the trace (``envelope.trace_id``, and ``x-trace-id`` in the
trailing metadata, errors included). Errors of the error tree map to status codes by :func:`status_for`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
import msgspec
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from workbench.chains.events import HopFinished, HopStarted, RunFinished, Token
from workbench.errors import (
    Forbidden,
    HopFailed,
    RateLimited,
    RunCancelled,
    Unauthenticated,
    WorkbenchError,
)
from workbench.fronts.server import chain_pb2 as pb
from workbench.fronts.server import chain_pb2_grpc
from workbench.fronts.server.auth import Auth, Principal

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from workbench.chains.chain import Chain
    from workbench.chains.run import Run

INVOKE_ACTION = "chains.invoke"
# Requests one Stream runs at once; the next waits (the stream stops reading) until one finishes.
MAX_IN_FLIGHT = 64

# The gateway's HTTP status of an error (its class's ``http_status``) as a gRPC status code, following the
# pairs of Google's API design guide (AIP-193) read the other way.
_BY_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # what gRPC itself answers for a message over its size limit
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
    429: RESOURCE_EXHAUSTED, 503: UNAVAILABLE, ...); an exception outside the tree: INTERNAL.
    """
    if isinstance(exc, HopFailed):
        return status_for(exc.cause) if isinstance(exc.cause, WorkbenchError) else grpc.StatusCode.UNKNOWN
    if isinstance(exc, RunCancelled):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, WorkbenchError):
        return _BY_HTTP_STATUS.get(exc.http_status, grpc.StatusCode.INTERNAL)
    return grpc.StatusCode.INTERNAL


class _Refused(Exception):
    """A request this front answers with ``code`` before any run starts (bad inputs, an unknown chain)."""

    def __init__(self, code: grpc.StatusCode, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


class ChainServicer(chain_pb2_grpc.ChainServiceServicer):
    """Serves ``chains`` (a mapping name -> Chain, read at each call, so chains added to it later are served)."""

    def __init__(self, chains: Mapping[str, Chain], auth: Auth, *, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.chains = chains
        self.auth = auth
        self.max_in_flight = max_in_flight
        self._propagator = TraceContextTextMapPropagator()

    # -- the two methods -----------------------------------------------------------------------

    async def Invoke(self, request: pb.InvokeRequest, context: grpc.aio.ServicerContext) -> pb.InvokeResponse:
        metadata = _metadata(context)
        try:
            who = self.auth.authenticate(metadata)
            chain, inputs, session = self._admit(who, request)
        except (WorkbenchError, _Refused) as exc:
            await _abort(context, exc)
        parent = self._parent(metadata)
        try:
            run = await _arun(chain, session, inputs, parent)
        except WorkbenchError as exc:
            await _abort(context, exc)
        except asyncio.CancelledError:
            raise  # the client went away or its deadline passed: the run was cancelled with this task
        return _response(run, request)

    async def Stream(
        self, requests: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamEvent]:
        metadata = _metadata(context)
        try:
            who = self.auth.authenticate(metadata)  # the stream's credentials, once
        except WorkbenchError as exc:
            await _abort(context, exc)
        parent = self._parent(metadata)
        events: asyncio.Queue[pb.StreamEvent | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.max_in_flight)
        running: set[asyncio.Task[None]] = set()

        async def answer(item: pb.StreamRequest) -> None:
            try:
                await self._answer(who, item, parent, events.put_nowait)
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

    def _admit(self, who: Principal, request: pb.InvokeRequest) -> tuple[Chain, dict[str, Any], str | None]:
        """Check one request before its run: role, rate limit, chain, inputs, session, envelope."""
        self.auth.authorize(who, INVOKE_ACTION, request.chain)
        self.auth.admit(who)
        chain = self.chains.get(request.chain)
        if chain is None:
            served = ", ".join(sorted(self.chains)) or "none"
            raise _Refused(grpc.StatusCode.NOT_FOUND, f"no chain named {request.chain!r} is served here",
                           hint=f"served chains: {served}")
        inputs = _inputs(request.inputs_json)
        _check_envelope(request.envelope)
        return chain, inputs, _session(who, request.session_id)

    async def _answer(self, who: Principal, item: pb.StreamRequest, parent: Context | None, put: Any) -> None:
        """Run one request of a stream, putting its events (or its one Error) on the stream."""
        request_id, request = item.request_id, item.request
        action = request.envelope.action_type or INVOKE_ACTION

        def envelope(trace_id: str = "") -> pb.Envelope:
            return pb.Envelope(trace_id=trace_id, context_blob=request.envelope.context_blob, action_type=action)

        try:
            chain, inputs, session = self._admit(who, request)
        except (WorkbenchError, _Refused) as exc:
            put(pb.StreamEvent(request_id=request_id, envelope=envelope(), error=_error(exc)))
            return
        trace_id = ""
        try:
            async for event in _astream(chain, session, inputs, parent):
                if isinstance(event, HopStarted):
                    put(pb.StreamEvent(request_id=request_id, envelope=envelope(trace_id),
                                       hop_started=pb.HopStarted(hop=event.hop)))
                elif isinstance(event, Token):
                    put(pb.StreamEvent(request_id=request_id, envelope=envelope(trace_id),
                                       token=pb.TokenDelta(hop=event.hop, text=event.text, token_id=event.token_id)))
                elif isinstance(event, HopFinished):
                    put(pb.StreamEvent(request_id=request_id, envelope=envelope(trace_id),
                                       hop_finished=pb.HopFinished(hop=event.hop, output_json=_json(event.output),
                                                                   duration_ms=event.duration_ms)))
                elif isinstance(event, RunFinished):
                    run = event.run
                    trace_id = _trace_hex(run.trace_id)
                    if run.error is not None:
                        put(pb.StreamEvent(request_id=request_id, envelope=envelope(trace_id),
                                           error=_error(run.error, run)))
                    else:
                        put(pb.StreamEvent(request_id=request_id, envelope=envelope(trace_id),
                                           final=pb.Final(response=_response(run, request))))
        except WorkbenchError as exc:  # the run failed outside every hop (the workbench closed, say)
            put(pb.StreamEvent(request_id=request_id, envelope=envelope(trace_id), error=_error(exc)))

    def _parent(self, metadata: Mapping[str, str]) -> Context | None:
        """The caller's trace from a W3C ``traceparent`` entry; None (a new trace) if it has none or a bad one."""
        if "traceparent" not in metadata:
            return None
        return self._propagator.extract(metadata)


class GrpcServer:
    """ChainService on ``host:port`` (port 0: a free one), on its own thread and event loop.

    ``start()`` returns once it listens; ``target`` is what a channel dials (``grpc.aio.insecure_channel``);
    ``stop()`` lets calls in flight finish for ``grace`` seconds, then cancels them. Also a context manager.
    Messages over ``auth.max_body_bytes`` are refused with RESOURCE_EXHAUSTED by gRPC itself.
    """

    def __init__(
        self,
        chains: Mapping[str, Chain] | Iterable[Chain],
        auth: Auth,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.chains = chains if isinstance(chains, Mapping) else {chain.name: chain for chain in chains}
        self.auth = auth
        self.host = host
        self.port = port
        self.servicer = ChainServicer(self.chains, auth, max_in_flight=max_in_flight)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> GrpcServer:
        """Listen (on a thread of its own); an open Auth (no credentials) is refused off loopback."""
        if self._thread is not None:
            return self
        self.auth.check_host(self.host)
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name=f"workbench-grpc-{self.port}", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread = None
            raise failure[0]
        return self

    async def _open(self) -> None:
        limit = self.auth.max_body_bytes
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)],
        )
        chain_pb2_grpc.add_ChainServiceServicer_to_server(self.servicer, server)
        bound = server.add_insecure_port(self.target)
        if bound == 0:
            raise WorkbenchError(f"the gRPC server cannot listen on {self.target}",
                                 hint="is the port taken? port=0 picks a free one")
        self.port = bound
        await server.start()
        self._server = server

    def stop(self, grace: float = 1.0) -> None:
        """Stop listening; calls in flight get ``grace`` seconds to finish."""
        if self._thread is None or self._loop is None:
            return
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = self._server = self._loop = None

    def __enter__(self) -> GrpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "listening" if self._thread is not None else "stopped"
        return f"<GrpcServer {self.target} {state}: {len(self.chains)} chains>"


# -- helpers -----------------------------------------------------------------------------------------


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's metadata as lower-case text headers (binary ``-bin`` entries left out)."""
    return {key.lower(): value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, run: Run | None = None) -> None:
    """End the call with the status ``exc`` maps to; trailing metadata names the trace, and a rate limit's wait."""
    trailing: list[tuple[str, str]] = []
    if isinstance(exc, HopFailed) and exc.run is not None:
        run = exc.run  # type: ignore[assignment]
    if run is not None:
        trailing += [("x-trace-id", _trace_hex(run.trace_id)), ("x-run-id", run.id)]
    if isinstance(exc, RateLimited):
        trailing.append(("retry-after", f"{exc.retry_after_s:g}"))
    if isinstance(exc, _Refused):
        code, message = exc.code, exc.message + (f"\nhint: {exc.hint}" if exc.hint else "")
    else:
        code, message = status_for(exc), str(exc)
    context.set_trailing_metadata(tuple(trailing))
    await context.abort(code, message)


def _error(exc: BaseException, run: Run | None = None) -> pb.Error:
    if isinstance(exc, _Refused):
        return pb.Error(code=exc.code.value[0], message=exc.message, hint=exc.hint or "")
    return pb.Error(
        code=status_for(exc).value[0],
        message=exc.message if isinstance(exc, WorkbenchError) else str(exc),
        hint=(exc.hint or "") if isinstance(exc, WorkbenchError) else "",
        hop=exc.hop if isinstance(exc, HopFailed) else "",
        run_id=run.id if run is not None else "",
        retry_after_s=exc.retry_after_s if isinstance(exc, RateLimited) else 0.0,
    )


def _response(run: Run, request: pb.InvokeRequest) -> pb.InvokeResponse:
    return pb.InvokeResponse(
        envelope=pb.Envelope(
            trace_id=_trace_hex(run.trace_id),
            context_blob=request.envelope.context_blob,
            action_type=request.envelope.action_type or INVOKE_ACTION,
        ),
        run_id=run.id,
        output_json=_json(run.output),
        outputs_json=_json(run.outputs),
        duration_ms=run.duration_ms,
    )


def _inputs(text: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"inputs_json is not JSON: {exc}",
                       hint='a JSON object of the chain\'s inputs, e.g. {"question": "..."}') from None
    if not isinstance(value, dict):
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                       f"inputs_json must be a JSON object (input name -> value), not {type(value).__name__}",
                       hint='e.g. {"question": "..."}')
    return value


def _json(value: Any) -> str:
    return msgspec.json.encode(value, enc_hook=str).decode()


def _trace_hex(trace_id: int) -> str:
    return format(trace_id, "032x")


CONTEXT_BLOB_MAX = 64 * 1024  # TODO(gw-core merge): the envelope's own cap


def _check_envelope(envelope: pb.Envelope) -> None:
    if len(envelope.context_blob) > CONTEXT_BLOB_MAX:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                       f"envelope.context_blob is {len(envelope.context_blob)} bytes, over the cap of {CONTEXT_BLOB_MAX}")


def _session(who: Principal, session_id: str) -> str | None:
    return f"{who.owner}/{session_id}" if session_id else None  # TODO(gw-core merge): the gateway's namespacing


async def _arun(chain: Chain, session: str | None, inputs: dict[str, Any], parent: Context | None) -> Run:
    return await chain.arun(session, **inputs)  # TODO(gw-core merge): parent


def _astream(chain: Chain, session: str | None, inputs: dict[str, Any], parent: Context | None) -> AsyncIterator[Any]:
    return chain.astream(session, **inputs)  # TODO(gw-core merge): parent
