"""The exceptions a user can cause: one tree rooted in WorkbenchError, with branches a caller can catch as a group.

    WorkbenchError
    ├── SpecError          the chain spec or a command line is wrong: TemplateError, ParseError, GraphError
    ├── SettingsError      a strategy, replicas, workload or store setting is wrong: StrategyError, WorkloadError,
    │                      StoreError
    ├── ModelError         a model is unknown, will not load, ran out of memory, cannot take a chat:
    │                      UnknownModelError, ModelLoadError (AdapterError), ModelOutOfMemory, ChatTemplateError
    ├── ServingError       a model refused to serve now: CircuitOpen, ModelUnhealthy, HopTimeout,
    │                      RetriesExhausted, WorkerStopped, RunCancelled, ModelProcessDied, RemoteError
    │                      (RemoteRateLimited), ModelActorDied
    ├── RunError           a run could not go on: HopFailed, MissingInputError, ContextWindowExceeded
    ├── WorkbenchClosed    the workbench was closed
    └── AccessError        a served call was refused before it ran: Unauthenticated, Forbidden, RateLimited,
                           ServerBusy, PayloadTooLarge

Each class carries ``http_status``, the status a gateway answers with for it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any


class WorkbenchError(Exception):
    """Base of every error the workbench raises for something the user can fix.

    ``hint`` says what to do about it; the magics print it under the message.
    """

    hint: str | None = None
    http_status: int = 400

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        message = super().__str__()
        return f"{message}\nhint: {self.hint}" if self.hint else message

    @property
    def message(self) -> str:
        return super().__str__()


def plain(value: Any) -> Any:
    """A numpy scalar (an ``np.int64`` from ``np.arange``, an ``np.float32``) as the Python int or float it holds, so a
    setting swept with numpy passes the checks and crosses JSON, msgpack and SQLite; anything else as it is (a numpy
    bool too, which no number setting takes)."""
    if isinstance(value, numbers.Number) and type(value).__module__ == "numpy":
        return value.item()
    return value


def plain_fields(instance: Any) -> None:
    """Every field of dataclass ``instance`` (frozen or not) through :func:`plain`: its ``__post_init__`` does this
    before its checks."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if (held := plain(value)) is not value:
            object.__setattr__(instance, field.name, held)


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)``, naming the one of ``choices`` closest to a misspelt ``word``; "" if none is close (or
    ``word`` is not text). Every "unknown ..." refusal ends its message with it."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# The most of an error's own text a description keeps: an exception's message can be a whole HTML error page or a
# dump of the data it choked on, and each retry, span event, run error and widget would hold a copy.
DESCRIBE_MAX_CHARS = 2000


def clipped(text: str) -> str:
    """``text``, or its first DESCRIBE_MAX_CHARS characters and how many more there were."""
    if len(text) <= DESCRIBE_MAX_CHARS:
        return text
    return f"{text[:DESCRIBE_MAX_CHARS]} … ({len(text) - DESCRIBE_MAX_CHARS:,} more characters)"


def describe(exc: BaseException, *, hint: bool = False) -> str:
    """One line saying what ``exc`` was: a WorkbenchError's message, else its type and text.

    ``hint=True`` adds a WorkbenchError's hint in brackets, as the widgets show a failure. A text longer than
    DESCRIBE_MAX_CHARS is cut there, saying how much was left out (``exc`` itself keeps it whole).
    """
    said = str(exc) if not isinstance(exc, WorkbenchError) else ""
    # An exception with no text (CancelledError, a bare raise KeyError()) is its name alone, not "CancelledError: ".
    text = clipped(exc.message if isinstance(exc, WorkbenchError) else
                   f"{type(exc).__name__}: {said}" if said else type(exc).__name__)
    return text + (f" (hint: {exc.hint})" if hint and isinstance(exc, WorkbenchError) and exc.hint else "")


# -- the branches --------------------------------------------------------------------------------


class SpecError(WorkbenchError):
    """A chain spec is malformed; names the hop, the field and (for YAML) the line."""

    http_status = 422

    def __init__(
        self,
        message: str,
        *,
        hop: str | None = None,
        field: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.hop, self.field, self.line = hop, field, line
        where = []
        if hop is not None:
            where.append(f"hop {hop!r}")
        if field is not None:
            where.append(f"field {field!r}")
        if line is not None:
            where.append(f"line {line}")
        prefix = f"chain spec, {', '.join(where)}: " if where else "chain spec: "
        super().__init__(prefix + message, hint=hint)


class SettingsError(WorkbenchError):
    """A setting that does not parse or cannot apply: a batching, preloading or balance policy, replicas, a workload,
    a store."""


class ModelError(WorkbenchError):
    """A model is unknown, does not load, or ran out of memory."""

    http_status = 500


class ServingError(WorkbenchError):
    """A model refused to serve now (breaker open, unhealthy, timed out, retries spent); trying later may work."""

    http_status = 503


class RunError(WorkbenchError):
    """A run could not go on: a hop failed, an input is missing, a prompt does not fit."""

    http_status = 422


class WorkbenchClosed(WorkbenchError):
    """The workbench was closed (``bench.close()``, or the end of its ``with`` block): it loads and runs nothing more."""

    http_status = 503

    def __init__(self, doing: str) -> None:
        super().__init__(
            f"this workbench is closed, so it cannot {doing}",
            hint="start another (bench = wb.Workbench()) and load the models again; sessions in its data_dir stay",
        )


# -- spec mistakes -------------------------------------------------------------------------------


class TemplateError(SpecError):
    """A prompt template does not parse, or a variable it needs has no value at run time."""


class ParseError(SpecError):
    """A ``%autoglm`` line or an ``autoglm`` command line that does not parse: unknown subcommand, bad argument."""

    http_status = 400

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.hop = self.field = self.line = None
        WorkbenchError.__init__(self, message, hint=hint)


class ConfigError(SpecError):
    """A workbench configuration file (models, chains, overrides) that does not validate; names file, line, field."""

    def __init__(
        self, message: str, *, path: str | None = None, field: str | None = None, line: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.hop, self.field, self.line, self.path = None, field, line, path
        where = [path or "workbench configuration"]
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field {field!r}")
        WorkbenchError.__init__(self, f"{', '.join(where)}: {message}", hint=hint)


class GraphError(SpecError):
    """A knowledge hop's graph is unknown, or its file of triples is missing, too big or malformed.

    The message names the file and the row; a hop's spec adds the hop, field and line.
    """

    def __init__(
        self,
        message: str,
        *,
        hop: str | None = None,
        field: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        if hop is None and field is None and line is None:  # read outside a chain spec: no spec to point at
            self.hop = self.field = self.line = None
            WorkbenchError.__init__(self, message, hint=hint)
        else:
            super().__init__(message, hop=hop, field=field, line=line, hint=hint)


# -- settings ------------------------------------------------------------------------------------


class StrategyError(SettingsError):
    """A batching or preloading strategy that does not parse, or a comparison of strategies that cannot run."""


class StoreError(SettingsError):
    """The session store cannot be opened, read or written (a bad data directory, a newer schema)."""

    http_status = 500


class WorkloadError(SettingsError):
    """A workload that cannot run: no inputs, a bad concurrency or arrival rate, an unreadable inputs file."""


# -- models --------------------------------------------------------------------------------------


class UnknownModelError(ModelError):
    """A name that no loaded or registered model has."""

    http_status = 404


class ModelLoadError(ModelError):
    """A model could not be loaded: not a model, unsafe weights, bad device or dtype, name taken."""


class ModelOutOfMemory(ModelError):
    """A model ran out of memory on a batch of one request, after its larger batches were split."""

    http_status = 507


class ChatTemplateError(ModelError):
    """A chat hop's model has no chat template to turn its messages into a prompt, or its template refused them."""

    http_status = 422


class AdapterError(ModelLoadError):
    """A LoRA adapter was refused (pickled, damaged, built for another base model, against the rules), or a request
    named an adapter its model does not serve."""

    http_status = 422


# -- serving refusals ----------------------------------------------------------------------------


class WorkerStopped(ServingError):
    """A request reached a model worker that was stopped (the model was unloaded)."""


class ModelProcessDied(ServingError):
    """The child process of a model loaded with ``isolation="process"`` died (killed, a segfault, a CUDA fatal
    error) while it ran a batch, or stays dead; the batch's requests fail with this, and the process restarts."""


class ModelActorDied(ServingError):
    """The Ray actor of a model loaded with ``engine="ray"`` died, or its node left the cluster, while it ran a batch;
    the batch's requests fail with this, the replica leaves rotation, and a retry goes to another replica."""


class RunCancelled(ServingError):
    """A run was cancelled (Ctrl-C, a map stopped by an error, a cancelled task) while its model call waited or ran."""


class HopTimeout(ServingError):
    """A model call outlived its hop's ``timeout_s``; the request was cancelled (dropped from the queue, or its
    row stopped in the running batch)."""

    http_status = 504


class CircuitOpen(ServingError):
    """A model's circuit breaker is open after repeated failures: its requests fail fast until a trial succeeds.

    ``retry_after_s`` is how long until the breaker lets its trial through (None: a trial is in flight already)."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s


class ModelUnhealthy(ServingError):
    """A model failed its health probe and is out of rotation until a probe passes again."""


class RetriesExhausted(ServingError):
    """Every attempt of a hop failed, retries and fallbacks alike; ``failures`` lists (attempt, route, error)."""

    def __init__(self, failures: list[tuple[int, str, BaseException]]) -> None:
        self.failures = failures
        by_route: dict[str, list[BaseException]] = {}
        for _, route, error in failures:
            by_route.setdefault(route, []).append(error)
        parts = [
            f"{route} failed {len(errors)} attempt{'s' * (len(errors) != 1)} (last: {describe(errors[-1])})"
            for route, errors in by_route.items()
        ]
        super().__init__(
            f"all {len(failures)} attempts failed: " + "; ".join(parts),
            hint="run.trace.events() lists every attempt; raise retry attempts or timeout_s, add a fallback, "
            "or bench.clear_faults() if faults were injected",
        )


class RemoteError(ServingError):
    """A model server (an OpenAI-compatible URL) failed a request; ``kind`` says how, ``status`` is its HTTP status.

    Kinds: ``refused`` (nothing listens there), ``status`` (a 5xx answer), ``rejected`` (a 4xx answer, or an
    answer its content filter ended: the request is wrong, so no retry can fix it), ``rate_limited`` (429),
    ``broken_stream`` (the stream stopped half way), ``aborted`` (the server ended the answer with a finish reason
    that does not say it is whole: vLLM's ``abort``), ``no_first_byte`` (the server took the request and never
    answered). ``retry_after_s`` is how long
    the answer's ``Retry-After`` asked to wait (a 429's, or a 5xx's: a 503 from a server starting up or draining; None:
    not said); a hop's retries wait at least that long before the next attempt.
    """

    http_status = 502

    def __init__(self, message: str, *, kind: str, url: str, status: int | None = None,
                 hint: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kind, self.url, self.status, self.retry_after_s = kind, url, status, retry_after_s


class RemoteRateLimited(RemoteError):
    """A model server answered 429; ``retry_after_s`` is how long its ``Retry-After`` asked to wait (None: not said)."""

    http_status = 429

    def __init__(self, message: str, *, url: str, retry_after_s: float | None, hint: str | None = None) -> None:
        super().__init__(message, kind="rate_limited", url=url, status=429, hint=hint, retry_after_s=retry_after_s)


# -- run problems --------------------------------------------------------------------------------


class MissingInputError(RunError):
    """A chain was run without an input that one of its templates uses."""


class InvalidInput(RunError):
    """A chain input, a map's list of inputs or a session id that cannot be used: not a mapping, or text that is not
    valid Unicode."""


class ContextWindowExceeded(RunError):
    """A prompt plus its new tokens does not fit the model's context window."""


class HopFailed(RunError):
    """A hop raised; ``run`` holds the partial run with every output that did finish."""

    def __init__(self, hop: str, cause: BaseException, run: object | None = None) -> None:
        self.hop, self.cause, self.run = hop, cause, run
        hint = cause.hint if isinstance(cause, WorkbenchError) else None
        super().__init__(
            f"hop {hop!r} failed: {describe(cause)}",
            hint=hint or "the outputs of hops that finished are kept on the error's .run",
        )


# -- access refusals (the gateway) ---------------------------------------------------------------


def retry_after(seconds: float) -> dict[str, str]:
    """The ``Retry-After`` header for a wait of ``seconds``: whole seconds (RFC 9110), rounded up so a client that
    obeys it is admitted."""
    if not math.isfinite(seconds):  # never a wait one cannot keep; a day is as long as any here
        seconds = 86_400.0 if seconds > 0 else 1.0
    return {"Retry-After": str(max(1, math.ceil(min(seconds, 86_400.0))))}


class AccessError(WorkbenchError):
    """A served call was refused before anything ran: no or bad credentials, a role without the permission, too
    many calls, too large a body.

    ``headers`` are the response headers a gateway sends with it (``WWW-Authenticate``, ``Retry-After``).
    """

    http_status = 403

    @property
    def headers(self) -> dict[str, str]:
        return {}


class Unauthenticated(AccessError):
    """No credentials, or an API key or JWT that is unknown, revoked, expired, badly signed or for someone else."""

    http_status = 401

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="autoglm"'}


class Forbidden(AccessError):
    """The caller is known, but its role may not do this action (or not on this chain)."""

    http_status = 403


class _RetryLater(AccessError):
    """A refusal that says when to try again: ``retry_after_s``, sent as ``Retry-After``."""

    def __init__(self, message: str, *, retry_after_s: float, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return retry_after(self.retry_after_s)


class RateLimited(_RetryLater):
    """The caller spent its request budget; ``retry_after_s`` is how long until its next request is admitted."""

    http_status = 429


class ServerBusy(_RetryLater):
    """A served call found the server full: every run slot (``max_in_flight``) taken, and ``max_queued`` runs waiting
    for one already. Nothing ran; ``retry_after_s`` is when to try again."""

    http_status = 503


class PayloadTooLarge(AccessError):
    """A request body is larger than the server's ``max_body_bytes``."""

    http_status = 413
