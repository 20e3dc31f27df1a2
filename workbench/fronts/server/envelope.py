"""The gateway's envelope: typed request and response structs, and how bodies are encoded (JSON or msgpack, zstd).

Every request and response carries ``trace_id``, ``context_blob`` (the caller's session context,
opaque to the gateway, echoed back, at most :data:`MAX_CONTEXT_BLOB` characters) and
``action_type``. Bodies are validated by msgspec structs as they decode, so a wrong field is named
in the error (``Expected `str`, got `int` - at `$.session_id```) before anything runs.

Content negotiation: ``Content-Type: application/json`` or ``application/msgpack`` in (no type
means JSON), ``Accept`` picks the same two out; ``Content-Encoding: zstd`` in, and a response
above :data:`COMPRESS_ABOVE` bytes is zstd-compressed when the client sent ``Accept-Encoding: zstd``.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
import zstandard

from workbench.errors import WorkbenchError

JSON = "application/json"
MSGPACK = "application/msgpack"
_MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
ZSTD = "zstd"
MAX_CONTEXT_BLOB = 64 * 1024  # characters
MAX_BATCH = 1024  # inputs in one batch call
MAX_CONCURRENCY = 64  # runs of one batch call in flight at once
COMPRESS_ABOVE = 1024  # bytes: a smaller body costs more to compress than it saves

T = TypeVar("T")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")
_KEY_IN = re.compile(r"`key` in `(.*)`")


class RequestError(WorkbenchError):
    """A request the gateway cannot read: a bad body, a wrong content type, a field of the wrong type (HTTP 4xx).

    ``field`` names the part of the request at fault (``$.inputs``, ``Content-Type``) where one is.
    """

    http_status = 400

    def __init__(self, message: str, *, field: str | None = None, status: int = 400, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field
        self.http_status = status


# -- requests ------------------------------------------------------------------------------------


class Envelope(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The fields every request may carry; each is optional on the way in."""

    trace_id: str | None = None
    context_blob: str | None = None
    action_type: str | None = None


class InvokeRequest(Envelope, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/chains/{name}/invoke`` and ``/stream``: one run of the chain."""

    inputs: dict[str, Any] = {}
    session_id: str | None = None


class BatchRequest(Envelope, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/chains/{name}/batch``: one run per input mapping, ``concurrency`` at a time."""

    inputs: list[dict[str, Any]]
    session_id: str | None = None
    concurrency: int = 8


class RegisterChainRequest(Envelope, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/chains`` (admin): a chain spec as YAML text."""

    spec: str


class LoadModelRequest(Envelope, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/models`` (admin): load a model. ``source`` ``tiny`` is the built-in tiny model.

    Only these settings travel: unsafe ones (``trust_remote_code``, ``allow_pickle``) are the
    server owner's to set, never a client's.
    """

    name: str
    source: str
    device: str = "auto"
    dtype: str = "auto"
    adapter: str | None = None
    warmup: bool = False


# -- responses -----------------------------------------------------------------------------------


class ErrorDetail(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What went wrong: the error's type (a class of workbench.errors), message, hint, and the field at fault."""

    type: str
    message: str
    status: int
    hint: str | None = None
    field: str | None = None
    hop: str | None = None


class RunResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One run as a response tells it: ``status`` "ok" or "error" (then ``error`` says why)."""

    run_id: str
    chain: str
    status: str
    output: Any = None
    outputs: dict[str, Any] = {}
    trace_id: str | None = None
    duration_ms: float = 0.0
    error: ErrorDetail | None = None


class InvokeResponse(RunResult, kw_only=True, omit_defaults=False):
    """One run, with the envelope's fields always present (null where none)."""

    context_blob: str | None = None
    action_type: str = "invoke"


class BatchResponse(msgspec.Struct, kw_only=True):
    """Each run of a batch in input order; ``trace_id`` is the caller's trace, where it sent one."""

    runs: list[RunResult]
    trace_id: str | None = None
    context_blob: str | None = None
    action_type: str = "batch"


class ErrorResponse(msgspec.Struct, kw_only=True):
    """A refused or failed request; ``error.field`` names the part of the request at fault where one is."""

    error: ErrorDetail
    trace_id: str | None = None
    context_blob: str | None = None
    action_type: str | None = None


def error_detail(exc: BaseException) -> ErrorDetail:
    """An exception as the envelope reports it; anything that is not a WorkbenchError is an internal 500."""
    if isinstance(exc, WorkbenchError):
        return ErrorDetail(
            type=type(exc).__name__, message=exc.message, status=int(exc.http_status), hint=exc.hint,
            field=getattr(exc, "field", None), hop=getattr(exc, "hop", None),
        )
    return ErrorDetail(type="InternalError", message=f"{type(exc).__name__}: {exc}", status=500)


# -- encoding ------------------------------------------------------------------------------------

# A value msgspec does not know (a Python hop's own object) travels as its text; known types never reach the hook.
_json_encoder = msgspec.json.Encoder(enc_hook=str)
_msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=str)
_json_decoders: dict[type, msgspec.json.Decoder[Any]] = {}
_msgpack_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}


def media_type(content_type: str | None) -> str:
    """The codec a ``Content-Type`` names (JSON when absent); RequestError 415 for any other type."""
    if not content_type:
        return JSON
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == JSON or kind.endswith("+json"):
        return JSON
    if kind in _MSGPACK_TYPES:
        return MSGPACK
    raise RequestError(f"cannot read a body of type {kind!r}", field="Content-Type", status=415,
                       hint=f"send {JSON} or {MSGPACK}")


def accepted(accept: str | None) -> str:
    """The codec to answer in: msgpack when ``Accept`` names it, else JSON."""
    if accept and any(part.split(";", 1)[0].strip().lower() in _MSGPACK_TYPES for part in accept.split(",")):
        return MSGPACK
    return JSON


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """``body`` as sent before its ``Content-Encoding`` (identity or zstd), refusing more than ``limit`` bytes."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    if encoding.strip().lower() != ZSTD:
        raise RequestError(f"cannot read Content-Encoding {encoding!r}", field="Content-Encoding", status=415,
                           hint="send zstd or no Content-Encoding")
    pieces: list[bytes] = []
    size = 0
    try:
        # Read in pieces with a cap: a small compressed body may claim to expand without bound. A body may be several
        # frames (a client that compresses as it sends); they are read one after another, under the one cap.
        reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
        while size <= limit and (piece := reader.read(limit + 1 - size)):
            pieces.append(piece)
            size += len(piece)
    except zstandard.ZstdError as exc:
        raise RequestError(f"the body is not valid zstd: {exc}", field="Content-Encoding") from None
    plain = b"".join(pieces)
    if len(plain) > limit:
        raise RequestError(f"the body expands to more than {limit} bytes", field="body", status=413,
                           hint="send less, or split it into several requests")
    return plain


def decode(body: bytes, kind: type[T], codec: str) -> T:
    """Decode and validate ``body`` as ``kind``; RequestError naming the field (``$.inputs[2]``) when it is wrong."""
    try:
        if codec == MSGPACK:
            decoder = _msgpack_decoders.get(kind) or _msgpack_decoders.setdefault(kind, msgspec.msgpack.Decoder(kind))
        else:
            decoder = _json_decoders.get(kind) or _json_decoders.setdefault(kind, msgspec.json.Decoder(kind))
        value: T = decoder.decode(body)
    except msgspec.ValidationError as exc:
        where, message = fault(exc)
        raise RequestError(f"the request's {where or 'body'} is wrong: {message}", field=where or None,
                           status=422, hint=_fields_hint(kind)) from None
    except msgspec.DecodeError as exc:
        name = "msgpack" if codec == MSGPACK else "JSON"
        raise RequestError(f"the body is not valid {name}: {exc}", field="body",
                           hint=f"send one {name} object; Content-Type says which encoding") from None
    except RecursionError:
        raise RequestError("the body nests too deeply to read", field="body",
                           hint="a request needs a few levels of nesting at most") from None
    check_envelope(value)
    return value


def fault(exc: msgspec.ValidationError) -> tuple[str, str]:
    """Where a value failed its struct (``$.inputs[2]``; empty for the whole) and what is wrong there."""
    message, _, where = str(exc).partition(" - at ")
    key = _KEY_IN.fullmatch(where)
    if key:  # msgspec says "at `key` in `$.inputs`": the map is the place, one of its keys the fault
        return key.group(1), f"{message} (for one of its keys)"
    where = where.strip("`")
    unknown = _UNKNOWN_FIELD.search(message)
    if unknown:  # msgspec names the object; the field at fault is the unknown one inside it
        where = f"{where or '$'}.{unknown.group(1)}"
    return where, message


def decode_any(body: bytes, codec: str) -> Any:
    """Decode ``body`` without a schema (a JSON-RPC body, checked by hand)."""
    return decode(body, Any, codec)  # type: ignore[arg-type]


def encode(value: Any, codec: str) -> bytes:
    """``value`` (structs, dicts, lists, strings, numbers) as JSON or msgpack bytes; other values as text."""
    return (_msgpack_encoder if codec == MSGPACK else _json_encoder).encode(value)


def compress(body: bytes, accept_encoding: str | None) -> tuple[bytes, str | None]:
    """``body`` zstd-compressed when the client accepts zstd and it is worth it, with its ``Content-Encoding``."""
    if len(body) <= COMPRESS_ABOVE or not accept_encoding or ZSTD not in accept_encoding.lower():
        return body, None
    return zstandard.ZstdCompressor(level=3).compress(body), ZSTD


def check_envelope(value: Any) -> None:
    """Limits no type can say: the context blob's size, a batch's length and concurrency."""
    blob = getattr(value, "context_blob", None)
    if blob is not None and len(blob) > MAX_CONTEXT_BLOB:
        raise RequestError(f"context_blob holds {len(blob)} characters, more than the {MAX_CONTEXT_BLOB} allowed",
                           field="$.context_blob", status=413, hint="keep the session context small, or keep it "
                           "on your side and send a key to it")
    if isinstance(value, BatchRequest):
        if not value.inputs:
            raise RequestError("a batch needs at least one input mapping", field="$.inputs")
        if len(value.inputs) > MAX_BATCH:
            raise RequestError(f"a batch takes at most {MAX_BATCH} inputs, not {len(value.inputs)}",
                               field="$.inputs", status=413, hint="split it into several batches")
        if not 1 <= value.concurrency <= MAX_CONCURRENCY:
            raise RequestError(f"concurrency must be 1 to {MAX_CONCURRENCY}, not {value.concurrency}",
                               field="$.concurrency", status=422)


def _fields_hint(kind: type) -> str | None:
    fields = getattr(kind, "__struct_fields__", None)
    return f"the fields are: {', '.join(fields)}" if fields else None
