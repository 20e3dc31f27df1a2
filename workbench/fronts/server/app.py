"""The gateway app: a Workbench's chains over REST + server-sent events, JSON-RPC and OpenAI-compatible routes.

Built on plain Starlette (the ASGI toolkit FastAPI sits on): bodies are decoded and validated by
msgspec structs (see envelope.py), so FastAPI's pydantic layer and dependency injection would only
add work on the hot path; ``benchmarks/served.py`` measures what the gateway adds to a run. The
routes' shared steps (auth, bodies, replies, sessions, traces) live in gateway.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from opentelemetry import trace
from opentelemetry.context import Context
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Route

from workbench._version import __version__
from workbench.chains import trust
from workbench.chains.chain import Chain
from workbench.chains.events import AttemptFailed, HopFinished, HopStarted, RunFinished, Token
from workbench.chains.runner import CACHE_SCOPE, TRACE_PARENT, check_inputs
from workbench.errors import ModelLoadError, UnknownModelError
from workbench.fronts.server import envelope as env
from workbench.fronts.server import openai_api, rpc
from workbench.fronts.server.envelope import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    InvokeRequest,
    InvokeResponse,
    LoadModelRequest,
    RegisterChainRequest,
    RequestError,
    error_detail,
)
from workbench.fronts.server.gateway import (
    AUTHENTICATED,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_QUEUED,
    Gateway,
    allowed,
    cache_scope,
    refusal_headers,
    run_json,
    run_status,
    sees_places,
)
from workbench.fronts.server.metrics import CONTENT_TYPE
from workbench.models.devices import resolve_device, resolve_dtype
from workbench.models.settings import is_server_url
from workbench.models.tiny import resolve_source

if TYPE_CHECKING:
    from workbench.bench import Workbench
    from workbench.fronts.server.auth import Auth, Principal


def create_app(
    host: Workbench,
    chains: Collection[Chain],
    auth: Auth,
    *,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_queued: int = DEFAULT_MAX_QUEUED,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> Starlette:
    """The ASGI app serving ``chains`` (built on ``host``, a Workbench) behind ``auth``.

    The app's Gateway (its chains, metrics and run owners) is ``app.state.gateway``.
    """
    gateway = Gateway(host, chains, auth, max_in_flight=max_in_flight, max_queued=max_queued,
                      body_timeout_s=body_timeout_s)
    r = gateway.route

    async def health(request: Request, who: Principal | None) -> Response:
        # Open, for load balancers and Kubernetes probes; it says nothing a caller could use.
        if host.closed:
            return gateway.reply(request, {"status": "closed", "version": __version__}, 503)
        return gateway.reply(request, {"status": "ok", "version": __version__})

    async def metrics(request: Request, who: Principal | None) -> Response:
        return Response(gateway.metrics.text(), media_type=CONTENT_TYPE)

    async def list_chains(request: Request, who: Principal | None) -> Response:
        listed = []
        for name, chain in sorted(gateway.chains.items()):
            if who is not None and not allowed(auth, who, "chains.list", name):
                continue
            listed.append({"name": name, "inputs": list(chain.inputs), "hops": chain.hops,
                           "output": chain.spec.output, "description": chain.spec.description})
        return gateway.reply(request, {"chains": listed})

    async def invoke(request: Request, who: Principal | None) -> Response:
        chain = gateway.chain(request.path_params["name"])
        body: InvokeRequest = await gateway.decode(request, InvokeRequest)
        _check_action(body.action_type, "invoke")
        run = await gateway.run(chain, body.inputs, gateway.session(who, body.session_id),
                                gateway.parent(request, body.trace_id), who)
        answer = gateway.result(run, InvokeResponse, context_blob=body.context_blob)
        if run.error is None:
            return gateway.reply(request, answer, headers=gateway.trace_headers(run))
        return gateway.reply(request, answer, run_status(run.error),
                             {**gateway.trace_headers(run), **refusal_headers(run.error)})

    async def batch(request: Request, who: Principal | None) -> Response:
        chain = gateway.chain(request.path_params["name"])
        body: BatchRequest = await gateway.decode(request, BatchRequest)
        _check_action(body.action_type, "batch")
        gateway.charge(who, len(body.inputs))  # a batch of N runs costs N requests
        parent = gateway.parent(request, body.trace_id)
        runs = await gateway.batch(chain, body, who, parent)
        trace_id = f"{trace.get_current_span(parent).get_span_context().trace_id:032x}" if parent else None
        answer = BatchResponse(runs=[gateway.result(run) for run in runs], trace_id=trace_id,
                               context_blob=body.context_blob)
        return gateway.reply(request, answer, headers={"x-trace-id": trace_id} if trace_id else None)

    async def stream(request: Request, who: Principal | None) -> Response:
        chain = gateway.chain(request.path_params["name"])
        body: InvokeRequest = await gateway.decode(request, InvokeRequest)
        _check_action(body.action_type, "stream")
        check_inputs(chain.spec, body.inputs)
        parent = gateway.parent(request, body.trace_id)
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        if parent is not None:
            headers["x-trace-id"] = f"{trace.get_current_span(parent).get_span_context().trace_id:032x}"
        events = _sse(gateway, request, chain, body, gateway.session(who, body.session_id), parent, who)
        # The stream's first step takes its run slot: a full server refuses it (503, ServerBusy) before its 200.
        await anext(events)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    async def get_run(request: Request, who: Principal | None) -> Response:
        run = gateway.owned_run(request.path_params["run_id"], who)
        return gateway.reply(request, run_json(run, places=sees_places(gateway.auth, who)),
                             headers=gateway.trace_headers(run))

    async def register_chain(request: Request, who: Principal | None) -> Response:
        kind = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if kind in ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"):
            raw = await gateway.body(request)
            try:
                spec = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError("the YAML spec is not UTF-8 text", field="body") from None
        else:
            spec = (await gateway.decode(request, RegisterChainRequest)).spec
        _check_served_name(_spec_name(spec), "chain", "name")  # before the workbench builds (and keeps) it
        with trust.served_spec():  # a client's spec calls only the modules the server allows
            chain = await asyncio.to_thread(host.chain, spec)
        gateway.chains[chain.name] = chain
        return gateway.reply(request, {"name": chain.name, "inputs": list(chain.inputs), "hops": chain.hops}, 201)

    async def load_model(request: Request, who: Principal | None) -> Response:
        body: LoadModelRequest = await gateway.decode(request, LoadModelRequest)
        _check_served_name(body.name, "model", "$.name")
        source = resolve_source(body.source)
        await asyncio.to_thread(_check_load, body, source)  # a CUDA device's first look takes a while
        loaded = await asyncio.to_thread(host.load, body.name, source, device=body.device,
                                         dtype=body.dtype, adapter=body.adapter, warmup=body.warmup)
        return gateway.reply(request, {"name": loaded.name, "device": str(loaded.device),
                                       "load_s": loaded.load_s}, 201)

    async def unload_model(request: Request, who: Principal | None) -> Response:
        name = request.path_params["model"]
        if name not in host.registry.names():
            raise UnknownModelError(f"no model named {name!r} is loaded here",
                                    hint=f"models: {', '.join(host.registry.names()) or 'none'}")
        freed = await asyncio.to_thread(host.unload, name, forget=True)
        return gateway.reply(request, {"name": name, "freed_bytes": freed})

    routes = [
        r("/health", health, ["GET"], None),
        r("/metrics", metrics, ["GET"], "metrics.read"),
        r("/v1/chains", list_chains, ["GET"], "chains.list"),
        r("/v1/chains", register_chain, ["POST"], "chains.register"),
        r("/v1/chains/{name}/invoke", invoke, ["POST"], "chains.invoke", per_chain=True),
        r("/v1/chains/{name}/batch", batch, ["POST"], "chains.invoke", per_chain=True),
        r("/v1/chains/{name}/stream", stream, ["POST"], "chains.invoke", per_chain=True),
        r("/v1/runs/{run_id}", get_run, ["GET"], "runs.read"),
        r("/v1/models", load_model, ["POST"], "models.admin"),
        r("/v1/models/{model}", unload_model, ["DELETE"], "models.admin"),
        r("/rpc", rpc.endpoint(gateway), ["POST"], AUTHENTICATED),
        *openai_api.routes(gateway),
    ]

    async def unrouted(request: Request, exc: Exception) -> Response:
        # Starlette's router answers these in plain text ("Not Found"); every other refusal is the envelope's.
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        return _unrouted(gateway, request, routes, status)

    app = Starlette(routes=routes, exception_handlers={404: unrouted, 405: unrouted})
    app.state.gateway = gateway
    return app


def _unrouted(gateway: Gateway, request: Request, routes: list[BaseRoute], status: int) -> Response:
    """The envelope's answer to a path no route serves (404) or a method its routes do not take (405, with the
    ``Allow`` header naming every method of that path: two routes may share it, as GET and POST /v1/chains do)."""
    path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "..."  # a name, quoted
    allowed = sorted({method for route in routes if isinstance(route, Route) and route.methods
                      and route.matches(request.scope)[0] is not Match.NONE for method in route.methods})
    if status == 405 and allowed:
        said = " or ".join(method for method in allowed if method != "HEAD")  # HEAD goes with GET, unsaid
        error = RequestError(f"{request.method} {path} is not served: {path} takes {said}", field="method",
                             status=405, hint=f"send it as {said}")
        response = gateway.error(request, error)
        response.headers["allow"] = ", ".join(allowed)
        return response
    error = RequestError(f"this server has no route {path!r}", field="path", status=404,
                         hint=f"the routes: {_route_list(routes)}")
    return gateway.error(request, error)


def _route_list(routes: list[BaseRoute]) -> str:
    """Each route's methods and path, the methods of one path together: ``GET|POST /v1/chains``."""
    methods: dict[str, list[str]] = {}
    for route in routes:
        if isinstance(route, Route):
            methods.setdefault(route.path, []).extend(set(route.methods or ()) - {"HEAD"})
    return ", ".join(f"{'|'.join(sorted(said))} {path}" for path, said in methods.items())


async def _sse(gateway: Gateway, request: Request, chain: Chain, body: InvokeRequest, session: str | None,
               parent: Context | None, who: Principal | None) -> AsyncIterator[bytes]:
    """A run's events as server-sent events: hop_started, token, hop_finished, then run_finished (or error).

    Its first step, which the handler takes before the response starts, takes a run slot (or raises ServerBusy)
    and yields nothing; the slot is held until the stream ends."""
    async with gateway.slot():
        yield b""
        started = request.state.started
        status = 200
        TRACE_PARENT.set(parent)  # the task that iterates this stream
        CACHE_SCOPE.set(cache_scope(who))
        first_token = True
        try:
            async for event in chain.astream(session, **body.inputs):
                if isinstance(event, Token):
                    if first_token:
                        gateway.metrics.ttft.labels(chain.name).observe(time.perf_counter() - started)
                        first_token = False
                    yield _event("token", {"hop": event.hop, "text": event.text, "token_id": event.token_id})
                elif isinstance(event, HopStarted):
                    yield _event(event.kind, {"hop": event.hop})
                elif isinstance(event, AttemptFailed):
                    yield _event(event.kind, {"hop": event.hop, "attempt": event.attempt, "route": event.route,
                                              "error": event.error})
                elif isinstance(event, HopFinished):
                    yield _event(event.kind, {"hop": event.hop, "output": event.output,
                                              "duration_ms": event.duration_ms})
                elif isinstance(event, RunFinished):
                    gateway.own(event.run, who)
                    if event.run.error is not None:
                        status = run_status(event.run.error)
                    yield _event(event.kind, gateway.result(event.run, InvokeResponse, context_blob=body.context_blob,
                                                            action_type="stream"))
        except Exception as exc:  # the run failed outside every hop: say so in the stream, which has begun
            status = error_detail(exc).status
            yield sse_error(exc)
        finally:
            gateway.metrics.observe("/v1/chains/{name}/stream", "POST", status, time.perf_counter() - started)


def sse_error(exc: BaseException) -> bytes:
    """The ``error`` event that ends a stream which has begun when its run fails outside every hop, or the server
    stops."""
    return _event("error", ErrorResponse(error=error_detail(exc), action_type="stream"))


def _event(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + env.encode(data, env.JSON) + b"\n\n"


def _check_served_name(name: object, kind: str, field: str) -> None:
    """Refuse to register a name the REST routes could not address: each is one segment of a URL path
    (``/v1/chains/{name}/invoke``, ``/v1/models/{name}``), so it holds no '/' and is not '.' or '..', which
    clients fold away. The Python API takes such names; a server cannot route to them."""
    if isinstance(name, str) and ("/" in name or name in (".", "..")):
        raise RequestError(f"{kind} name {name!r:.80} cannot be served: a served name is one segment of a URL path, "
                           "with no '/' and not '.' or '..'", field=field, status=422,
                           hint=f"name it without '/', e.g. {name.replace('/', '-').strip('.') or kind!r:.80}")


def _spec_name(spec: str) -> object:
    """The name a YAML chain spec gives itself, or None where it cannot tell (building the chain says why)."""
    try:
        data = yaml.safe_load(spec)
    except yaml.YAMLError:
        return None
    return data.get("name") if isinstance(data, dict) else None


def _check_load(body: LoadModelRequest, source: str) -> None:
    """Refuse, as the caller's mistake (422 naming the field), a load the request alone shows cannot work: a device
    or dtype this machine has no use for, a source or adapter folder that is not there or holds no model.

    What fails past these checks, loading what looked loadable (weights that do not read, memory that runs out, a
    hub that cannot be reached), is the server's failure and keeps its 5xx."""
    if is_server_url(source):
        return  # a model server: it has its own device and dtype, and loading it is a call to it
    try:
        device = resolve_device(body.device)
    except ModelLoadError as exc:
        raise RequestError(exc.message, field="$.device", status=422, hint=exc.hint) from None
    try:
        resolve_dtype(body.dtype, device)
    except ModelLoadError as exc:
        raise RequestError(exc.message, field="$.dtype", status=422, hint=exc.hint) from None
    for field, given in (("$.source", source), ("$.adapter", body.adapter)):
        if given is None:
            continue
        path = Path(given).expanduser()
        if not (path.is_absolute() or given.startswith((".", "~")) or path.exists()):
            continue  # a hub id: whether the hub has it is the load's to find out
        if not path.is_dir():
            raise RequestError(f"{given!r} is not a directory on this server", field=field, status=422,
                               hint="give the directory save_pretrained wrote, as the server's file system names it")
        if field == "$.source" and not (path / "config.json").is_file():
            raise RequestError(f"{given!r} is not a model directory: it has no config.json", field=field, status=422,
                               hint="point at the folder that save_pretrained wrote")


def _check_action(action_type: str | None, expected: str) -> None:
    if action_type is not None and action_type != expected:
        raise RequestError(f"action_type {action_type!r} does not match this endpoint, which does {expected!r}",
                           field="$.action_type", status=422, hint=f"send action_type {expected!r} or leave it out")


