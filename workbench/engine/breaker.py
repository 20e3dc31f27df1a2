"""A circuit breaker per model worker: closed, open, half-open, each change an event on the span that caused it.

Our own rather than pybreaker: pybreaker wraps a call made and finished in one thread, but here
a request is admitted in its caller's thread and its outcome arrives later from the model's
worker thread (or from a timeout in a third), so admission and outcome are separate calls; and
each state change has to land on the span of the request that caused it. One lock, a few lines.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.trace import Span

from workbench.engine.failures import MODEL_FAILURES, error_kind
from workbench.errors import CircuitOpen, ModelActorDied, ModelProcessDied, SettingsError, describe
from workbench.tracing import attributes as attr

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Stops sending requests to a model after ``failure_threshold`` failures in a row.

    Closed: requests pass; a success resets the count. Open: requests fail fast with CircuitOpen
    for ``reset_timeout_s``. Half-open: the next request is let through as a trial while the
    rest still fail fast; its success closes the breaker, its failure opens it again. A model
    process that died (ModelProcessDied) or a Ray actor that died (ModelActorDied) opens it at once. Only
    the model's own failures count (errors, timeouts, out-of-memory), never a caller's mistake.
    """

    def __init__(
        self,
        model: str,
        failure_threshold: int = 5,
        reset_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int) or failure_threshold < 1:
            raise SettingsError(
                f"breaker of model {model!r}: failure_threshold must be an integer >= 1, got {failure_threshold!r}",
                hint="it is how many failures in a row open the breaker",
            )
        # NaN and inf pass a plain comparison, and no clock reading is ever that long past the opening.
        if isinstance(reset_timeout_s, bool) or not isinstance(reset_timeout_s, (int, float)) or not (
                0 <= reset_timeout_s < math.inf):
            raise SettingsError(
                f"breaker of model {model!r}: reset_timeout_s must be a finite number >= 0, got {reset_timeout_s!r}",
                hint="it is how long the breaker stays open before it lets a trial request through",
            )
        self.model = model
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = float(reset_timeout_s)
        self._clock = clock
        self._lock = threading.Lock()
        self.state = CLOSED
        self.failures = 0
        self.opened = 0
        self.last_error: str | None = None
        self._changed_at = clock()
        self._trial_out = False

    @property
    def available(self) -> bool:
        """Whether :meth:`admit` would let a request through now; reading it changes nothing."""
        with self._lock:
            if self.state == OPEN:
                return self._clock() - self._changed_at >= self.reset_timeout_s
            return self.state == CLOSED or not self._trial_out

    def admit(self, span: Span) -> bool:
        """Let a request through, or raise CircuitOpen; True when it is the half-open trial."""
        with self._lock:
            if self.state == OPEN and self._clock() - self._changed_at >= self.reset_timeout_s:
                self._change(HALF_OPEN, span)
            if self.state == CLOSED:
                return False
            if self.state == HALF_OPEN and not self._trial_out:
                self._trial_out = True
                return True
            state = self.state.replace("_", "-")
            since = self._clock() - self._changed_at
            why = "a trial request is in flight" if self.state == HALF_OPEN else (
                f"it opened {since:.2f} s ago after {self.failures} failures in a row (last: {self.last_error})"
            )
            trial_in = None if self.state == HALF_OPEN else self.reset_timeout_s - since
        raise CircuitOpen(
            f"model {self.model!r} is not taking requests: its circuit breaker is {state}; {why}",
            retry_after_s=trial_in,
            hint=f"it lets a trial through {self.reset_timeout_s:g} s after opening; add a fallback to the hop, "
            "or see bench.breakers()",
        )

    def record(self, error: BaseException | None, span: Span, trial: bool) -> None:
        """Count one admitted request's outcome (``error`` None for success); ``trial`` as ``admit`` returned."""
        counts = error is None or error_kind(error) in MODEL_FAILURES
        with self._lock:
            if trial:
                self._trial_out = False
            # While open, and in half-open but for the trial, outcomes are of requests admitted
            # before the breaker opened: they neither close it nor keep it open.
            if not counts or (self.state != CLOSED and not trial):
                return
            if error is None:
                self.failures = 0
                if self.state == HALF_OPEN:
                    self._change(CLOSED, span)
                return
            self.failures += 1
            self.last_error = describe(error)
            # A model process or Ray actor that died fails everything until it is back (or replaced): open
            # now, not after N more, so the balancer sends the next requests to the other replicas.
            crashed = isinstance(error, (ModelProcessDied, ModelActorDied))
            if self.state == HALF_OPEN or crashed or self.failures >= self.failure_threshold:
                self.opened += 1
                self._change(OPEN, span)

    def row(self) -> dict[str, Any]:
        """The breaker's state for ``bench.breakers()``."""
        with self._lock:
            return {
                "model": self.model,
                "state": self.state,
                "failures": self.failures,
                "failure_threshold": self.failure_threshold,
                "reset_timeout_s": self.reset_timeout_s,
                "opened": self.opened,
                "since_s": round(self._clock() - self._changed_at, 3),
                "last_error": self.last_error,
            }

    def _change(self, state: str, span: Span) -> None:
        span.add_event(
            f"breaker.{state}",
            {
                attr.MODEL_NAME: self.model,
                attr.BREAKER_STATE: state,
                attr.BREAKER_PREVIOUS: self.state,
                attr.BREAKER_FAILURES: self.failures,
                **({attr.BREAKER_LAST_ERROR: self.last_error} if self.last_error else {}),
            },
        )
        self.state = state
        self._changed_at = self._clock()
