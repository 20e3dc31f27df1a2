"""Failure classification: which kind of failure an exception is, for retries, breakers and spans."""

from __future__ import annotations

from workbench.engine.backends.base import BackendOutOfMemory
from workbench.errors import (
    CircuitOpen,
    HopTimeout,
    ModelActorDied,
    ModelOutOfMemory,
    ModelProcessDied,
    ModelUnhealthy,
    RemoteError,
    WorkbenchError,
)

# The kinds of failure a retry policy's ``on`` can name; see ``error_kind``.
ERROR_KINDS = ("error", "timeout", "oom", "breaker", "unhealthy")
DEFAULT_RETRY_ON = ("error", "timeout", "oom")
# The kinds that count against a model's circuit breaker: the model failed, not the caller.
MODEL_FAILURES = frozenset({"error", "timeout", "oom"})


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error: a backend's (translated at its seam, or injected), or ours."""
    return isinstance(exc, (BackendOutOfMemory, ModelOutOfMemory))


def error_kind(exc: BaseException) -> str | None:
    """Which kind of failure ``exc`` is, as ``RetryPolicy.on`` names them; None for a mistake no retry can fix.

    ``timeout``: the call outlived ``timeout_s``; ``oom``: out of memory even after batch splitting;
    ``breaker``: the model's circuit breaker is open; ``unhealthy``: the model failed its health probe;
    ``error``: any other failure of the call (an injected fault, a CUDA error, a Python hop raising, a
    model process that died: it is starting again, so a retry may find it back; a Ray actor that died with
    its node: another replica can serve the retry; a model server failing: refused, 5xx, 429, a broken
    stream); a server that took the request and never answered is a ``timeout``, and one that rejected it
    as sent (a 4xx) is the caller's to fix.
    A WorkbenchError outside these (a prompt too long for the window, an unloaded model) is the caller's
    to fix, and a KeyboardInterrupt is the user stopping: neither is retried.
    """
    if isinstance(exc, HopTimeout):
        return "timeout"
    if isinstance(exc, CircuitOpen):
        return "breaker"
    if isinstance(exc, ModelUnhealthy):
        return "unhealthy"
    if is_out_of_memory(exc):
        return "oom"
    if isinstance(exc, (ModelProcessDied, ModelActorDied)):
        return "error"
    if isinstance(exc, RemoteError):
        return {"no_first_byte": "timeout", "rejected": None}.get(exc.kind, "error")
    if isinstance(exc, WorkbenchError) or not isinstance(exc, Exception):
        return None
    return "error"
