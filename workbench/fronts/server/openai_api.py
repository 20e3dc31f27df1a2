"""OpenAI-compatible routes for every model the served workbench has: ``GET /v1/models``, ``POST /v1/completions``
and ``POST /v1/chat/completions``, streamed (server-sent events, ``data: [DONE]`` last) or not.

Enough of the OpenAI API for other tools, and this workbench's own remote backend
(``bench.load("r", "http://HOST:PORT/v1", api_key=KEY)``), to call the models here: ``model``,
``prompt`` (one string) or ``messages`` (each one's content a string, text parts or none), ``max_tokens``
(``max_completion_tokens``), ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stream`` and
``stream_options.include_usage``.
Unlike OpenAI, ``temperature`` defaults to 0 (greedy), the workbench's own default. Fields that would
change the answer and that this server cannot honour (``n`` > 1, ``best_of`` > 1, ``stop``, ``logprobs``,
``echo``, ``suffix``, penalties, ``logit_bias``, a JSON ``response_format``) are a 422 naming the field,
not dropped: a client would read an answer it did not ask for. Other fields (``user``, ``tools``, ...) are
ignored, as OpenAI-compatible servers do. Each request goes through the engine as a direct model
call (its own ``text_completion`` span, in the caller's trace when a ``traceparent`` came with it).
Calling a model is the ``chains.invoke`` action, refused to a caller limited to some chains; listing them is
``models.list``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
from opentelemetry import trace
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from workbench.engine import GenerationParams
from workbench.engine.requests import sampling_problem
from workbench.engine.engine import Call
from workbench.errors import Forbidden, UnknownModelError
from workbench.fronts.server import envelope as env
from workbench.fronts.server.envelope import ErrorResponse, RequestError, error_detail

if TYPE_CHECKING:
    from workbench.engine import GenerationResult
    from workbench.fronts.server.gateway import Gateway
    from workbench.fronts.server.auth import Principal

OWNER = "autoglm-workbench"
MAX_TOKENS = 4096


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str = ""


class Message(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None  # text, text parts, or none (an assistant turn that called a tool)


class CompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    prompt: str | list[str] = ""
    messages: list[Message] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Asked of OpenAI, not honoured here: refused unless left as OpenAI's defaults (see _check_unsupported).
    n: int | None = None
    best_of: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None


def routes(gateway: Gateway) -> list[Route]:
    """The OpenAI-compatible routes of ``gateway``."""

    async def models(request: Request, who: Principal | None) -> Response:
        listed = [{"id": name, "object": "model", "created": 0, "owned_by": OWNER}
                  for name in gateway.bench.registry.names() if gateway.bench.registry.is_loaded(name)]
        return gateway.reply(request, {"object": "list", "data": listed})

    async def completions(request: Request, who: Principal | None) -> Response:
        _check_unlimited(gateway, who)
        return await _complete(gateway, request, chat=False)

    async def chat(request: Request, who: Principal | None) -> Response:
        _check_unlimited(gateway, who)
        return await _complete(gateway, request, chat=True)

    r = gateway.route
    return [
        r("/v1/models", models, ["GET"], "models.list"),
        r("/v1/completions", completions, ["POST"], "chains.invoke"),
        r("/v1/chat/completions", chat, ["POST"], "chains.invoke"),
    ]


async def _complete(gateway: Gateway, request: Request, chat: bool) -> Response:
    body: CompletionRequest = await gateway.decode(request, CompletionRequest)
    bench = gateway.bench
    if not bench.registry.is_loaded(body.model):
        loaded = [n for n in bench.registry.names() if bench.registry.is_loaded(n)]
        raise UnknownModelError(f"this server has no model {body.model!r} loaded",
                                hint=f"models: {', '.join(loaded) or 'none'} (GET /v1/models)")
    messages = None
    prompt = ""
    if chat:
        if not body.messages:
            raise RequestError("a chat completion needs 'messages', a non-empty list", field="$.messages",
                               status=422)
        messages = [{"role": m.role, "content": _text(m.content, f"$.messages[{i}].content")}
                    for i, m in enumerate(body.messages)]
    else:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise RequestError("this server takes one prompt per completion request", field="$.prompt",
                               status=422, hint="send one request per prompt")
        prompt = prompts[0]
    limit = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"  # the newer name wins
    max_tokens = getattr(body, limit)
    if max_tokens is None:
        max_tokens = 16
    elif not 1 <= max_tokens <= MAX_TOKENS:  # 0 too: it was taken for "unset", and 16 tokens came back
        raise RequestError(f"{limit} must be 1 to {MAX_TOKENS}, not {max_tokens}", field=f"$.{limit}", status=422)
    _check_sampling(body)
    _check_unsupported(body)
    params = GenerationParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, seed=body.seed)
    parent = gateway.parent(request)
    span = trace.get_current_span(parent) if parent is not None else None
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if not body.stream:
        async with gateway.slot():
            result = await bench.run_async(bench.engine.acall(Call(body.model, prompt, params, span,
                                                                   messages=messages)))
        return gateway.reply(request, _answer(ident, body.model, result, chat))
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    call = Call(body.model, prompt, params, span, messages=messages)
    chunks = _stream(gateway, request, call, ident, chat, include_usage)
    first = await anext(chunks)  # or the error that refused the call before its first token, answered with its status
    return StreamingResponse(_resumed(first, chunks), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


async def _resumed(first: bytes, rest: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """A stream whose first chunk was taken already: ``first``, then ``rest``."""
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


def _text(content: str | list[ContentPart] | None, field: str) -> str:
    """A message's content as one text: its text parts a line each, "" for none; 422 for a part that is not text."""
    if content is None or isinstance(content, str):
        return content or ""
    for i, part in enumerate(content):
        if part.type != "text":
            raise RequestError(f"this server reads text parts of a message only, not {part.type!r}",
                               field=f"{field}[{i}].type", status=422,
                               hint='send {"type": "text", "text": ...} parts, or the text as a string')
    return "\n".join(part.text for part in content)


def _check_unlimited(gateway: Gateway, who: Principal | None) -> None:
    """Refuse a direct model call (403) to a caller limited to some chains, by its key, token or role: a prompt of its
    own choosing to the model would run in none of them, so the limit would mean nothing."""
    if who is None:
        return
    role = gateway.auth.roles.get(who.role)
    limited = who.chains if who.chains is not None else role.chains if role is not None else None
    if limited is not None:
        raise Forbidden(f"{who.name!r} may invoke only chains {', '.join(sorted(limited)) or '(none)'}, not call a "
                        "model directly", hint="call one of those chains (POST /v1/chains/NAME/invoke), or use a key "
                        "that is not limited to chains")


def _check_sampling(body: CompletionRequest) -> None:
    """Refuse sampling settings the model would refuse (422, naming the field) before GenerationParams does (as an
    InvalidInput with no field): as the model's own failure they would count against its circuit breaker."""
    problem = sampling_problem(body.temperature, body.top_p, body.top_k, body.seed)
    if problem is not None:
        raise RequestError(problem[1], field=f"$.{problem[0]}", status=422)


# Each field OpenAI takes that would change the answer, the values that ask nothing of it, and what to do instead.
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((None, 1), "send n requests (with a seed each, to sample different answers)"),
    "best_of": ((None, 1), "send several requests and pick the answer yourself"),
    "stop": ((None, [], ""), "cut the text at your stop sequence yourself, or bound it with max_tokens"),
    "logprobs": ((None, False, 0), "this server returns text and token counts, no log-probabilities"),
    "top_logprobs": ((None, 0), "this server returns text and token counts, no log-probabilities"),
    "echo": ((None, False), "prepend the prompt to the text yourself"),
    "suffix": ((None, ""), "this server completes prompts left to right, with no suffix"),
    "presence_penalty": ((None, 0, 0.0), "leave it out: this server samples with temperature, top_p and top_k"),
    "frequency_penalty": ((None, 0, 0.0), "leave it out: this server samples with temperature, top_p and top_k"),
    "logit_bias": ((None, {}), "leave it out: this server samples with temperature, top_p and top_k"),
}


def _check_unsupported(body: CompletionRequest) -> None:
    """Refuse (422, naming the field) what would change the answer and this server cannot do: the client would
    otherwise read one answer for n, untrimmed text for stop, no log-probabilities where it asked for them."""
    for name, (unasked, instead) in _UNSUPPORTED.items():
        value = getattr(body, name)
        if value not in unasked:
            raise RequestError(f"{name}={value!r:.80} is not supported by this server", field=f"$.{name}",
                               status=422, hint=instead)
    kind = (body.response_format or {}).get("type", "text")
    if kind != "text":
        raise RequestError(f"response_format type {kind!r:.80} is not supported by this server",
                           field="$.response_format.type", status=422,
                           hint="ask for JSON in the prompt and parse the text; only 'text' is served")


async def _stream(gateway: Gateway, request: Request, call: Call, ident: str, chat: bool,
                  include_usage: bool) -> AsyncGenerator[bytes, None]:
    """The call's tokens as OpenAI stream chunks, then one with the finish reason, the usage if asked, [DONE].

    Nothing is yielded before the call's first token (or its end): a call refused before it (a prompt over the
    context window, a breaker open) raises, and the handler answers with its status, as it would without a stream.
    """
    bench = gateway.bench
    loop = asyncio.get_running_loop()
    texts: asyncio.Queue[str] = asyncio.Queue()
    call.on_token = lambda token, text: loop.call_soon_threadsafe(texts.put_nowait, text)
    started = request.state.started
    created = int(time.time())
    route = "/v1/chat/completions" if chat else "/v1/completions"
    status = 200
    begun = False  # whether a chunk is out: a failure after that can only be told inside the stream

    def chunk(choice: dict[str, Any], usage: dict[str, int] | None = None) -> bytes:
        value: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "created": created, "model": call.model, "choices": [choice] if choice else []}
        if usage is not None:
            value["usage"] = usage
        return b"data: " + env.encode(value, env.JSON) + b"\n\n"

    def piece(text: str, finish: str | None = None) -> dict[str, Any]:
        if chat:
            return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    def opening() -> bytes:
        """What goes before a chunk: once, as the stream begins, a chat's chunk naming the assistant's role."""
        nonlocal begun
        first, begun = not begun, True
        return chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}) \
            if first and chat else b""

    try:
        async with gateway.slot():
            task = asyncio.ensure_future(bench.run_async(bench.engine.acall(call)))
            getter: asyncio.Future[str] | None = None
            try:
                while True:
                    getter = asyncio.ensure_future(texts.get())
                    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        break
                    if not begun:
                        gateway.metrics.ttft.labels(call.model).observe(time.perf_counter() - started)
                    yield opening() + chunk(piece(getter.result()))
                while not texts.empty():  # tokens that landed as the call finished
                    yield opening() + chunk(piece(texts.get_nowait()))
                result: GenerationResult = task.result()
            finally:
                task.cancel()
                if getter is not None:  # the client left mid-stream: else "Task was destroyed but it is pending"
                    getter.cancel()
        yield opening() + chunk(piece("", result.finish_reason))
        if include_usage:
            yield chunk({}, _usage(result))
        yield b"data: [DONE]\n\n"
    except Exception as exc:
        if not begun:  # refused before the stream began: the handler answers with its status (and counts it)
            status = 0
            raise
        # The stream has begun: report the failure inside it, as OpenAI-compatible servers do.
        detail = error_detail(exc)
        status = detail.status
        yield b"data: " + env.encode(ErrorResponse(error=detail), env.JSON) + b"\n\n"
    finally:
        if status:
            gateway.metrics.observe(route, "POST", status, time.perf_counter() - started)


def _usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.tokens_in, "completion_tokens": result.tokens_out,
            "total_tokens": result.tokens_in + result.tokens_out}


def _answer(ident: str, model: str, result: GenerationResult, chat: bool) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result.text},
                                  "finish_reason": result.finish_reason}
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
    return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": _usage(result)}
