"""The exceptions a user can cause, rooted in one base class."""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base of every error the workbench raises for something the user can fix.

    ``hint`` says what to do about it; the magics print it under the message.
    """

    hint: str | None = None

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


def describe(exc: BaseException) -> str:
    """One line saying what ``exc`` was: a WorkbenchError's message, else its type and text."""
    return exc.message if isinstance(exc, WorkbenchError) else f"{type(exc).__name__}: {exc}"


class SpecError(WorkbenchError):
    """A chain spec is malformed; names the hop, the field and (for YAML) the line."""

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


class TemplateError(SpecError):
    """A prompt template does not parse, or a variable it needs has no value at run time."""


class MissingInputError(WorkbenchError):
    """A chain was run without an input that one of its templates uses."""


class InvalidInput(WorkbenchError):
    """A chain input, a map's list of inputs or a session id that cannot be used: not a mapping, or text that is not
    valid Unicode."""


class ModelLoadError(WorkbenchError):
    """A model could not be loaded: not a model, unsafe weights, bad device or dtype, name taken."""


class UnknownModelError(WorkbenchError):
    """A name that no loaded or registered model has."""


class ContextWindowExceeded(WorkbenchError):
    """A prompt plus its new tokens does not fit the model's context window."""


class HopFailed(WorkbenchError):
    """A hop raised; ``run`` holds the partial run with every output that did finish."""

    def __init__(self, hop: str, cause: BaseException, run: object | None = None) -> None:
        self.hop, self.cause, self.run = hop, cause, run
        hint = cause.hint if isinstance(cause, WorkbenchError) else None
        super().__init__(
            f"hop {hop!r} failed: {describe(cause)}",
            hint=hint or "the outputs of hops that finished are kept on the error's .run",
        )


class WorkbenchClosed(WorkbenchError):
    """The workbench was closed (``bench.close()``, or the end of its ``with`` block): it loads and runs nothing more."""

    def __init__(self, doing: str) -> None:
        super().__init__(
            f"this workbench is closed, so it cannot {doing}",
            hint="start another (bench = wb.Workbench()) and load the models again; sessions in its data_dir stay",
        )


class WorkerStopped(WorkbenchError):
    """A request reached a model worker that was stopped (the model was unloaded)."""


class StrategyError(WorkbenchError):
    """A batching or preloading strategy that does not parse, or a comparison of strategies that cannot run."""


class StoreError(WorkbenchError):
    """The session store cannot be opened, read or written (a bad data directory, a newer schema)."""


class WorkloadError(WorkbenchError):
    """A workload that cannot run: no inputs, a bad concurrency or arrival rate, an unreadable inputs file."""


class HopTimeout(WorkbenchError):
    """A model call outlived its hop's ``timeout_s``; the request was cancelled (dropped from the queue, or its
    row stopped in the running batch)."""


class CircuitOpen(WorkbenchError):
    """A model's circuit breaker is open after repeated failures: its requests fail fast until a trial succeeds."""


class ModelUnhealthy(WorkbenchError):
    """A model failed its health probe and is out of rotation until a probe passes again."""


class ModelOutOfMemory(WorkbenchError):
    """A model ran out of memory on a batch of one request, after its larger batches were split."""


class RetriesExhausted(WorkbenchError):
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
