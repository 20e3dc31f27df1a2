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
        detail = cause.message if isinstance(cause, WorkbenchError) else f"{type(cause).__name__}: {cause}"
        hint = cause.hint if isinstance(cause, WorkbenchError) else None
        super().__init__(
            f"hop {hop!r} failed: {detail}",
            hint=hint or "the outputs of hops that finished are kept on the error's .run",
        )


class WorkerStopped(WorkbenchError):
    """A request reached a model worker that was stopped (the model was unloaded)."""
