"""A hop's resilience: retries with backoff (through tenacity), a per-attempt timeout, and fallbacks."""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import tenacity
from opentelemetry.trace import Span

from workbench.engine.failures import DEFAULT_RETRY_ON, error_kind
from workbench.errors import CircuitOpen, RemoteError, RetriesExhausted, describe
from workbench.tracing import attributes as attr


# The longest Retry-After a retry waits out when its policy sets no max_total_s: a server that asks for more (an hour,
# a date next week) is not coming back within this run, so the hop falls back, or fails saying how long it asked.
MAX_RETRY_AFTER_S = 60.0


class Interrupted(Exception):
    """A KeyboardInterrupt raised inside a hop, carried out of the event loop (which must not stop) to the caller.

    The user stopping: never retried, never served by a fallback.
    """


def _asked_wait_s(failure: BaseException | None) -> float:
    """How long ``failure`` said to wait before trying again: a model server's Retry-After, or how long an open
    circuit breaker holds its trial back (0: nothing said)."""
    if isinstance(failure, (RemoteError, CircuitOpen)):
        return failure.retry_after_s or 0.0
    return 0.0


class _AskedTooLong(tenacity.stop.stop_base):
    """Stop when the last failure asked to wait over MAX_RETRY_AFTER_S (a server's Retry-After, a breaker's trial)."""

    def __call__(self, state: tenacity.RetryCallState) -> bool:
        failure = state.outcome.exception() if state.outcome is not None else None
        return _asked_wait_s(failure) > MAX_RETRY_AFTER_S


@dataclass(frozen=True)
class RetryPolicy:
    """How a hop retries its primary model (or Python call) before it falls back.

    ``attempts`` counts every try, the first included. The wait before retry n is ``backoff_ms``
    x 2^(n-1), capped at ``max_backoff_ms``; with ``jitter`` each wait is drawn uniformly between 0
    and that ("full jitter"), so many runs retrying at once spread out instead of arriving together.
    ``max_total_s`` caps the time from the first attempt: no retry starts whose wait would end past
    it, and an attempt's timeout is cut to what is left. A model server's 429 or 5xx with ``Retry-After``
    makes that wait at least as long as the server asked, and so does an open circuit breaker's ``CircuitOpen``
    until it lets its trial through (up to a minute, or up to ``max_total_s`` where it is set: a longer wait ends
    the retries). ``on`` names the kinds of failure worth
    retrying (see ``error_kind``).
    """

    attempts: int = 3
    backoff_ms: float = 50.0
    max_backoff_ms: float = 2000.0
    jitter: bool = True
    max_total_s: float | None = None
    on: tuple[str, ...] = DEFAULT_RETRY_ON

    def retrying(self, before_sleep: Callable[[tenacity.RetryCallState], None]) -> tenacity.AsyncRetrying:
        """A tenacity ``AsyncRetrying`` that follows this policy and re-raises the last error when it gives up."""
        stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(self.attempts)
        if self.max_total_s is not None:
            stop = stop | tenacity.stop_before_delay(self.max_total_s)
        else:
            stop = stop | _AskedTooLong()
        backoff, cap = self.backoff_ms / 1e3, self.max_backoff_ms / 1e3
        backoff_wait = (
            tenacity.wait_random_exponential(multiplier=backoff, max=cap)
            if self.jitter
            else tenacity.wait_exponential(multiplier=backoff, max=cap)
        )

        def wait(state: tenacity.RetryCallState) -> float:
            # A server that answered 429 or 5xx with Retry-After said when to come back, and an open breaker when it
            # lets its trial through: never sooner (a retry before then meets the same refusal).
            failure = state.outcome.exception() if state.outcome is not None else None
            return max(backoff_wait(state), _asked_wait_s(failure))

        kinds = frozenset(self.on)
        return tenacity.AsyncRetrying(
            stop=stop,
            wait=wait,
            retry=tenacity.retry_if_exception(
                lambda exc: not isinstance(exc, Interrupted) and error_kind(exc) in kinds),
            before_sleep=before_sleep,
            reraise=True,
        )


@dataclass(frozen=True)
class Fallback:
    """Where a hop turns when its primary path fails: another loaded model, or a standby hop of the chain."""

    kind: Literal["model", "hop"]
    name: str

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class Resilience:
    """A hop's ``retry``, ``timeout_s`` (per attempt: model calls and async def hops) and ``fallback`` settings."""

    retry: RetryPolicy | None = None
    timeout_s: float | None = None
    fallback: tuple[Fallback, ...] = ()


NO_RESILIENCE = Resilience()


@dataclass(frozen=True)
class Route:
    """One way to serve a hop: ``await call(attempt, timeout_s)`` returns its value or raises."""

    label: str
    call: Callable[[int, float | None], Awaitable[Any]]


async def serve(
    routes: Sequence[Route], policy: Resilience, span: Span,
    on_failure: Callable[[int, str, BaseException], None] | None = None,
) -> Any:
    """Serve a hop down ``routes``: the first (primary) with the policy's retries, then each fallback once.

    Every failed attempt is an ``attempt.failed`` event on ``span`` (the hop's), and is told to ``on_failure``
    (its number, route label and error); every wait a ``retry`` event, every switch of route a ``fallback``
    event; the route that answered is ``workbench.served_by``. When the only attempt fails its error is raised
    as it was; when several did, RetriesExhausted lists them all.
    """
    failures: list[tuple[int, str, BaseException]] = []
    numbers = itertools.count(1)
    started = time.monotonic()
    retry = policy.retry if policy.retry is not None and policy.retry.attempts > 1 else None
    # Bounds the primary's attempts with one attempt too (retry: {attempts: 1, max_total_s: 2} ran for as long as the
    # model took, timeout_s or not).
    budget_s = policy.retry.max_total_s if policy.retry is not None else None

    async def attempt(route: Route, capped: bool) -> Any:
        number = next(numbers)
        timeout = policy.timeout_s
        if capped and budget_s is not None:
            left = max(budget_s - (time.monotonic() - started), 1e-3)
            timeout = left if timeout is None else min(timeout, left)
        try:
            return await route.call(number, timeout)
        except Interrupted:
            raise
        except Exception as exc:
            failures.append((number, route.label, exc))
            span.add_event(
                "attempt.failed",
                {
                    attr.ATTEMPT: number,
                    attr.ROUTE: route.label,
                    attr.ERROR_KIND: error_kind(exc) or "not retryable",
                    "exception.type": type(exc).__name__,
                    "exception.message": describe(exc),
                },
            )
            if on_failure is not None:
                on_failure(number, route.label, exc)
            raise

    def before_sleep(state: tenacity.RetryCallState) -> None:
        wait_ms = state.upcoming_sleep * 1e3
        span.add_event("retry", {attr.ATTEMPT: state.attempt_number + 1, attr.RETRY_WAIT_MS: wait_ms})

    for index, route in enumerate(routes):
        if index:
            reason = describe(failures[-1][2])
            span.add_event("fallback", {attr.ROUTE: route.label, attr.FALLBACK_REASON: reason})
        try:
            if index == 0 and retry is not None:
                value = await retry.retrying(before_sleep)(attempt, route, True)
            else:
                value = await attempt(route, index == 0)
        except Interrupted:
            raise
        except Exception as exc:
            if index + 1 < len(routes):
                continue
            if len(failures) == 1:
                raise
            raise RetriesExhausted(failures) from exc
        span.set_attributes({attr.SERVED_BY: route.label, attr.ATTEMPTS: len(failures) + 1, attr.FALLBACK: index > 0})
        return value
    raise ValueError("serve() needs at least one route")
