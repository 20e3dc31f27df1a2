"""JSON-RPC 2.0 at ``POST /rpc``: ``chain.invoke``, ``chain.batch``, ``models.list``, ``runs.get``, one call or a batch.

Params go by name (an object). Each call is authorized on its own (``chain.invoke`` and
``chain.batch`` as ``chains.invoke`` on their chain, ``models.list``, ``runs.read``). Against the
caller's rate limit a request costs one per call, and a ``chain.batch`` call one per input; the
whole cost is charged before any call runs, and a request the caller's bucket cannot pay is
answered as a whole: HTTP 429 (``Retry-After``) or, when it costs more than the bucket ever holds,
413, with one JSON-RPC error (-32029 or -32013). Calls of one batch run concurrently; a notification
(no ``id``) runs and gets no answer.

Error codes. The protocol's own: -32700 parse error (HTTP 400), -32600 invalid request (HTTP 400
when the whole body is one), -32601 method not found, -32602 invalid params (a param of the
wrong type, a missing or unknown chain input). A workbench error's code follows the HTTP status
its class in ``workbench.errors`` carries: ``-32000 - (status - 400)`` for a 4xx (401 -> -32001,
403 -> -32003, 404 -> -32004, 413 -> -32013, 422 -> -32022, 429 -> -32029) and
``-32050 - (status - 500)`` for a 5xx (500 -> -32050, 502 -> -32052, 503 -> -32053, 504 -> -32054,
507 -> -32057); anything else is -32603 internal error. ``error.data`` holds the error's ``type``,
``http_status``, ``hint``, and ``field`` or ``hop`` where known. A run whose hop failed is a result,
not an error: its ``status`` is ``"error"`` and its ``error`` says why, as over REST.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from workbench.errors import AccessError, InvalidInput, MissingInputError, WorkbenchError
from workbench.fronts.server import envelope as env
from workbench.fronts.server.envelope import BatchRequest, RequestError, error_detail
from workbench.fronts.server.gateway import run_json, sees_places

if TYPE_CHECKING:
    from workbench.fronts.server.auth import Principal
    from workbench.fronts.server.gateway import Gateway

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
MAX_CALLS = 256  # calls in one batch


class InvokeParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    chain: str
    inputs: dict[str, Any] = {}
    session_id: str | None = None
    trace_id: str | None = None
    context_blob: str | None = None


class BatchParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    chain: str
    inputs: list[dict[str, Any]]
    session_id: str | None = None
    concurrency: int = 8
    trace_id: str | None = None
    context_blob: str | None = None


class RunParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    run_id: str


class NoParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class RpcError(Exception):
    """A JSON-RPC error with its code, message and data."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def code_of(exc: BaseException) -> int:
    """The JSON-RPC error code of ``exc`` (see the module's docstring)."""
    if isinstance(exc, (MissingInputError, InvalidInput)):
        return INVALID_PARAMS
    if not isinstance(exc, WorkbenchError):
        return INTERNAL_ERROR
    status = int(exc.http_status)
    if 400 <= status < 500:
        return -32000 - (status - 400)
    if 500 <= status < 600:
        return -32050 - (status - 500)
    return INTERNAL_ERROR


def _translate(exc: BaseException) -> RpcError:
    detail = error_detail(exc)
    data = {"type": detail.type, "http_status": detail.status}
    data.update({k: v for k, v in (("hint", detail.hint), ("field", detail.field), ("hop", detail.hop)) if v})
    return RpcError(code_of(exc), detail.message, data)


def endpoint(gateway: Gateway) -> Callable[[Request, Principal | None], Awaitable[Response]]:
    """The ``/rpc`` handler for ``gateway`` (the route has authenticated the caller and admitted one request)."""

    async def params(raw: Any, kind: type[Any]) -> Any:
        try:
            return msgspec.convert({} if raw is None else raw, kind)
        except msgspec.ValidationError as exc:
            where, message = env.fault(exc)
            data = {"type": "RequestError", "fields": list(kind.__struct_fields__)}
            if where:
                data["field"] = where
            raise RpcError(INVALID_PARAMS, f"invalid params: {where + ': ' if where else ''}{message}", data) from None

    async def invoke(raw: Any, who: Principal | None, request: Request) -> Any:
        p: InvokeParams = await params(raw, InvokeParams)
        gateway.auth.authorize(who, "chains.invoke", p.chain)
        chain = gateway.chain(p.chain)
        env.check_envelope(p)  # the context blob's limit, as over REST and gRPC
        run = await gateway.run(chain, p.inputs, gateway.session(who, p.session_id), gateway.parent(request, p.trace_id),
                                who)
        return gateway.result(run, env.InvokeResponse, context_blob=p.context_blob)

    async def batch(raw: Any, who: Principal | None, request: Request) -> Any:
        p: BatchParams = await params(raw, BatchParams)
        gateway.auth.authorize(who, "chains.invoke", p.chain)
        chain = gateway.chain(p.chain)
        batch_request = BatchRequest(inputs=p.inputs, session_id=p.session_id, concurrency=p.concurrency,
                                     context_blob=p.context_blob)
        env.check_envelope(batch_request)
        runs = await gateway.batch(chain, batch_request, who, gateway.parent(request, p.trace_id))
        return env.BatchResponse(runs=[gateway.result(run) for run in runs], context_blob=p.context_blob)

    async def models(raw: Any, who: Principal | None, request: Request) -> Any:
        await params(raw, NoParams)
        gateway.auth.authorize(who, "models.list", None)
        admin = sees_places(gateway.auth, who)
        return [model_entry(gateway, name, source=admin) for name in gateway.bench.registry.names()]

    async def get_run(raw: Any, who: Principal | None, request: Request) -> Any:
        p: RunParams = await params(raw, RunParams)
        gateway.auth.authorize(who, "runs.read", None)
        return run_json(gateway.owned_run(p.run_id, who), places=sees_places(gateway.auth, who))

    methods: dict[str, Callable[[Any, Principal | None, Request], Awaitable[Any]]] = {
        "chain.invoke": invoke, "chain.batch": batch, "models.list": models, "runs.get": get_run,
    }

    async def call(message: Any, who: Principal | None, request: Request) -> dict[str, Any] | None:
        ident: Any = None
        try:
            if not isinstance(message, dict) or message.get("jsonrpc") != "2.0" or not isinstance(
                    message.get("method"), str):
                raise RpcError(INVALID_REQUEST, "invalid request: a call is an object with \"jsonrpc\": \"2.0\", "
                               "a string \"method\", and optional \"params\" (an object) and \"id\"")
            ident = message.get("id")
            if ident is not None and not isinstance(ident, (str, int)) or isinstance(ident, bool):
                ident = None
                raise RpcError(INVALID_REQUEST, "invalid request: \"id\" is a string or a number")
            method = methods.get(message["method"])
            if method is None:
                raise RpcError(METHOD_NOT_FOUND, f"method not found: {message['method']!r}",
                               {"methods": sorted(methods)})
            result = await method(message.get("params"), who, request)
        except RpcError as error:
            return {"jsonrpc": "2.0", "error": error.body(), "id": ident}
        except Exception as exc:
            return {"jsonrpc": "2.0", "error": _translate(exc).body(), "id": ident}
        if "id" not in message:
            return None  # a notification
        return {"jsonrpc": "2.0", "result": result, "id": ident}

    async def handle(request: Request, who: Principal | None) -> Response:
        codec = env.media_type(request.headers.get("content-type"))
        raw = await gateway.body(request)
        try:
            body = env.decode_any(raw, codec)
        except RequestError as exc:
            return gateway.reply(request, {"jsonrpc": "2.0", "id": None,
                                           "error": RpcError(PARSE_ERROR, f"parse error: {exc.message}").body()}, 400)
        if isinstance(body, list):
            if not body or len(body) > MAX_CALLS:
                error = RpcError(INVALID_REQUEST, f"invalid request: a batch holds 1 to {MAX_CALLS} calls")
                return gateway.reply(request, {"jsonrpc": "2.0", "id": None, "error": error.body()}, 400)
        try:
            gateway.charge(who, cost_of(body))
        except AccessError as refused:  # the whole request: none of its calls runs
            ident = body.get("id") if isinstance(body, dict) else None
            if not isinstance(ident, (str, int)) or isinstance(ident, bool):
                ident = None
            return gateway.reply(request, {"jsonrpc": "2.0", "id": ident, "error": _translate(refused).body()},
                                 int(refused.http_status), refused.headers)
        if isinstance(body, list):
            answers = await asyncio.gather(*(call(message, who, request) for message in body))
            replies = [a for a in answers if a is not None]
            return gateway.reply(request, replies) if replies else Response(status_code=204)
        answer = await call(body, who, request)
        if answer is None:
            return Response(status_code=204)
        bad = "error" in answer and answer["error"]["code"] == INVALID_REQUEST
        return gateway.reply(request, answer, 400 if bad else 200)

    return handle


def cost_of(body: Any) -> int:
    """What a request (one call, or a list of calls) costs against the caller's rate limit: one per call, and one
    per input of a ``chain.batch`` call (a malformed one costs one: it fails before it runs anything)."""
    cost = 0
    for message in body if isinstance(body, list) else [body]:
        params = message.get("params") if isinstance(message, dict) else None
        inputs = params.get("inputs") if isinstance(params, dict) and message.get("method") == "chain.batch" else None
        cost += max(len(inputs), 1) if isinstance(inputs, list) else 1
    return cost


def model_entry(gateway: Gateway, name: str, *, source: bool) -> dict[str, Any]:
    """A model as ``models.list`` tells it: its name, whether it is loaded, and where.

    Its ``source`` (a directory on the server, a server's URL) only where ``source`` says the caller
    administers the server: the server's paths and backends are not every caller's business.
    """
    registry = gateway.bench.registry
    if not registry.is_loaded(name):
        return {"name": name, "loaded": False}
    loaded = registry.get(name)
    entry = {"name": name, "loaded": True, "device": str(loaded.device), "context_window": loaded.context_window}
    if source:
        entry["source"] = loaded.source
    return entry
