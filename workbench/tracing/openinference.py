"""OpenInference attribute values: inputs and outputs with their mime types, model requests, token counts."""

from __future__ import annotations

import dataclasses
import functools
import json
import reprlib
from collections.abc import Callable
from typing import Any

from workbench.tracing import attributes as attr

# Spans travel whole to every exporter; a long context or a big Python value would bloat each one.
PREVIEW_CHARS = 4000


def preview(text: str) -> str:
    """``text``, cut to its first PREVIEW_CHARS characters (and an ellipsis) when longer."""
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"


# Encodes a value only as far as its preview reaches: a hop's 3-million-item list cost 1.3 s on the loop encoded whole.
# NaN and the infinities are no JSON (Python's encoder writes them as bare NaN/Infinity, which JSON.parse, and with it
# Phoenix's viewer, refuses): a value holding one is shown as text, as values JSON cannot hold are.
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False, allow_nan=False)
# What shows a value that JSON cannot hold at all (tuple keys, a cycle, NaN), as bounded as the preview.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 6, PREVIEW_CHARS, 200
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 100


def _shown(value: Any, room: list[int], path: set[int]) -> Any:
    """``value`` less what its preview cannot show: text and bytes cut just past PREVIEW_CHARS, containers cut once
    ``room`` values have been taken in all (each one is at least a character of JSON), the rest as it is.

    The encoder writes a string whole, in one piece: a 50 MB document cost 220 ms per span it reached."""
    room[0] -= 1
    if isinstance(value, (str, bytes)):
        return value[: PREVIEW_CHARS + 1]
    if not isinstance(value, (dict, list, tuple)) or id(value) in path:
        return value  # a cycle stays one, for the encoder to refuse
    path.add(id(value))
    try:
        if isinstance(value, dict):
            kept: dict[Any, Any] = {}
            for key, item in value.items():
                if room[0] <= 0:
                    break
                kept[key] = _shown(item, room, path)
            return kept
        taken = []
        for item in value:
            if room[0] <= 0:
                break
            taken.append(_shown(item, room, path))
        return taken
    finally:
        path.discard(id(value))


def _small_flat(value: Any) -> bool:
    """Whether ``value`` is a small mapping of text keys to scalars (a chain's inputs, a Python hop's counts: most values
    a span shows) whose text is within PREVIEW_CHARS in all, so JSON of it is small enough to write at once."""
    if type(value) is not dict or len(value) > 64:
        return False
    size = 0
    for key, item in value.items():
        if type(key) is not str:
            return False
        kind = type(item)
        if kind is str:
            size += len(item)
        elif kind is not int and kind is not float and kind is not bool and item is not None:
            return False
        size += len(key)
    return size <= PREVIEW_CHARS


def _json_preview(value: Any) -> str:
    """``value`` as JSON, encoded no further than just past PREVIEW_CHARS (values JSON cannot hold as their ``str``)."""
    if _small_flat(value):
        # The same text the bounded walk below writes, by the C encoder at a sixth of its cost (escapes may take the
        # text past PREVIEW_CHARS: then _value cuts it as it cuts the walk's).
        return _ENCODER.encode(value)
    chunks, size = [], 0
    for chunk in _ENCODER.iterencode(_shown(value, [PREVIEW_CHARS + 1], set())):
        chunks.append(chunk)
        size += len(chunk)
        if size > PREVIEW_CHARS:
            break
    return "".join(chunks)


def _value(value_key: str, mime_key: str, value: Any) -> dict[str, object]:
    """A string as plain text, anything else as JSON (values JSON cannot hold as their ``str``)."""
    if isinstance(value, str):
        text, mime = value, attr.MIME_TEXT
    else:
        try:
            text, mime = _json_preview(value), attr.MIME_JSON
        except Exception:  # keys JSON cannot hold (a tuple), a cycle, a str() that raises: not the hop's failure
            try:
                text = _REPR.repr(value)
            except Exception as exc:  # an int past sys.get_int_max_str_digits() (reprlib does not catch that one)
                text = unshown(value, exc)
            mime = attr.MIME_TEXT
    if len(text) > PREVIEW_CHARS:
        text, mime = preview(text), attr.MIME_TEXT  # cut JSON no longer parses
    return {value_key: text, mime_key: mime}


def unshown(value: Any, exc: BaseException) -> str:
    """What stands for ``value`` where even its repr raised ``exc`` (or recursed too deep)."""
    return f"<{type(value).__qualname__}: its repr raised {type(exc).__name__}>"


def input_value(value: Any) -> dict[str, object]:
    """``input.value`` and ``input.mime_type`` for ``value``."""
    return _value(attr.INPUT_VALUE, attr.INPUT_MIME_TYPE, value)


def output_value(value: Any) -> dict[str, object]:
    """``output.value`` and ``output.mime_type`` for ``value``."""
    return _value(attr.OUTPUT_VALUE, attr.OUTPUT_MIME_TYPE, value)


def input_messages(messages: list[dict[str, str]]) -> dict[str, object]:
    """A chat's messages as OpenInference flattens them: ``llm.input_messages.{i}.message.role`` and ``.content``."""
    attributes: dict[str, object] = {}
    for index, message in enumerate(messages):
        prefix = f"{attr.LLM_INPUT_MESSAGES}.{index}.message"
        content = message["content"]
        attributes[f"{prefix}.role"] = message["role"]
        attributes[f"{prefix}.content"] = preview(content)
    return attributes


def model(source: str) -> dict[str, object]:
    """The model a span ran: its source (hub id or directory), which says more than the workbench's alias for it."""
    return {attr.LLM_MODEL_NAME: source, attr.LLM_SYSTEM: attr.PROVIDER, attr.LLM_PROVIDER: attr.LOCAL_PROVIDER}


def request(source: str, params: Any) -> dict[str, object]:
    """A model request's model and its generation settings (a frozen dataclass) as ``llm.invocation_parameters``."""
    return {**model(source), attr.LLM_INVOCATION_PARAMETERS: _invocation_parameters(params)}


@functools.lru_cache(maxsize=256)
def _invocation_parameters(params: Any) -> str:
    # Every request of a hop shares its settings; asdict deep-copies them, which cost more than the span itself.
    return json.dumps(dataclasses.asdict(params))


def token_counts(prompt: int, completion: int | None = None) -> dict[str, object]:
    """``llm.token_count.*``; the total only once the completion is known."""
    counts: dict[str, object] = {attr.LLM_TOKEN_COUNT_PROMPT: prompt}
    if completion is not None:
        counts[attr.LLM_TOKEN_COUNT_COMPLETION] = completion
        counts[attr.LLM_TOKEN_COUNT_TOTAL] = prompt + completion
    return counts


def tool_name(call: Callable[..., Any]) -> str:
    """A Python hop's function as its dotted path, ``package.module:function``, as a spec names it."""
    # A callable object (a functools.partial, say) has no name of its own: its class names it.
    module = getattr(call, "__module__", None) or type(call).__module__
    return f"{module}:{getattr(call, '__qualname__', type(call).__qualname__)}"
