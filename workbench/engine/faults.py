"""Fault injection for research: seeded errors, latency and out-of-memory on one model's batches."""

from __future__ import annotations

import operator
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.trace import Span

from workbench.engine.backends.base import BackendOutOfMemory
from workbench.engine.requests import GenerationRequest
from workbench.errors import SettingsError
from workbench.tracing import attributes as attr

MAX_LATENCY_MS = 3_600_000  # an hour


class InjectedFault(RuntimeError):
    """A failure made up by ``bench.inject(error_rate=...)``; it stands in for a model error."""


class InjectedOutOfMemory(BackendOutOfMemory):
    """A fake out-of-memory error made up by ``bench.inject(oom_every=..., oom_above=...)``.

    A fake because a CPU cannot run out of GPU memory on demand; it is the error a backend
    raises for a real one (torch's OutOfMemoryError, translated at the backend seam), so the
    worker's batch splitting treats both alike.
    """


def _check(ok: bool, model: str, message: str) -> None:
    if not ok:
        raise SettingsError(
            f"bench.inject({model!r}, ...): {message}",
            hint=f"error_rate in [0, 1]; latency_ms in [0, {MAX_LATENCY_MS}] or a (low, high) pair; oom_every and "
            "oom_above >= 1; seed an integer",
        )


def _range(value: object) -> tuple[float, float] | None:
    """``latency_ms`` as a (low, high) pair, or None if it is neither a number nor a pair of numbers."""
    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(value, (tuple, list)) and len(value) == 2 and all(number(v) for v in value):
        return float(value[0]), float(value[1])
    return (float(value), float(value)) if number(value) else None  # type: ignore[arg-type]


@dataclass(frozen=True)
class Faults:
    """What ``bench.inject`` makes a model do, batch by batch, until ``bench.clear_faults``.

    Each batch first waits ``latency_ms`` (a number, or a ``(low, high)`` range drawn uniformly
    per batch); then each of its requests fails with probability ``error_rate``; every
    ``oom_every``-th batch, and every batch of more than ``oom_above`` requests, raises a fake
    out-of-memory error. ``seed`` makes the draws repeatable for the same order of batches.
    """

    model: str
    error_rate: float = 0.0
    latency_ms: float | tuple[float, float] = 0.0
    oom_every: int | None = None
    oom_above: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        rate = self.error_rate
        _check(not isinstance(rate, bool) and isinstance(rate, (int, float)) and 0 <= rate <= 1, self.model,
               f"error_rate must be a probability in [0, 1], got {rate!r}")
        span = _range(self.latency_ms)
        # A longer sleep holds the model's worker where clear_faults cannot reach it; an endless one killed it.
        _check(span is not None and 0 <= span[0] <= span[1] <= MAX_LATENCY_MS, self.model,
               f"latency_ms must be a number >= 0 or a (low, high) pair, at most {MAX_LATENCY_MS} (an hour), "
               f"got {self.latency_ms!r}")
        for name in ("oom_every", "oom_above"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                   self.model, f"{name} must be an integer >= 1 or None, got {value!r}")
        if self.seed is not None:
            # A numpy integer (a seed from np.arange) failed later, as a bare TypeError of random.Random's.
            _check(not isinstance(self.seed, bool) and hasattr(type(self.seed), "__index__"), self.model,
                   f"seed must be an integer or None, got {self.seed!r}")
            object.__setattr__(self, "seed", operator.index(self.seed))

    @property
    def latency_range(self) -> tuple[float, float]:
        span = _range(self.latency_ms)
        assert span is not None  # checked in __post_init__
        return span


class FaultInjector:
    """Draws one worker's faults from a seeded generator; only the model's worker thread calls it.

    Faults injected into a model with replicas draw from one stream per replica, each seeded from
    ``seed`` and the replica's name: with one stream for all, the replicas failed in step, and a retry
    the balancer sent to the other replica failed whenever the first attempt had.
    """

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._rng: random.Random | None = None  # seeded at the first batch, by the replica that runs it
        self._batches = 0

    def _generator(self, worker: str) -> random.Random:
        if self._rng is None:
            seed = self.faults.seed
            # ``worker`` is the replica's name (m#1) when a model has several; the model's own when it has one, or
            # when the faults went to one replica alone: its draws are those of the seed itself.
            self._rng = random.Random(seed if seed is None or worker == self.faults.model else f"{seed}/{worker}")
        return self._rng

    def apply(
        self, batch: list[GenerationRequest], fail: Callable[[list[GenerationRequest], BaseException], None]
    ) -> list[GenerationRequest]:
        """Wait the injected latency, fail the requests the error rate picks, and return the others."""
        rng = self._generator(batch[0].model)
        low, high = self.faults.latency_range
        delay_ms = rng.uniform(low, high) if high > low else low
        if delay_ms > 0:
            time.sleep(delay_ms / 1e3)
            for request in batch:
                request.span.set_attribute(attr.FAULT_LATENCY_MS, delay_ms)
                request.fault_ms += delay_ms
        kept = []
        for request in batch:
            if self.faults.error_rate and rng.random() < self.faults.error_rate:
                request.span.set_attribute(attr.FAULT_ERROR, True)
                fail([request], InjectedFault(  # on the replica it names (m#1), of a model with several
                    f"injected fault on model {request.model!r} (error_rate={self.faults.error_rate:g})"
                ))
            else:
                kept.append(request)
        return kept

    def check_memory(self, batch: list[GenerationRequest], span: Span) -> None:
        """Raise a fake out-of-memory error if this batch is one ``oom_every`` or ``oom_above`` picks."""
        self._batches += 1
        every, above = self.faults.oom_every, self.faults.oom_above
        if (every is not None and self._batches % every == 0) or (above is not None and len(batch) > above):
            span.add_event("fault.injected", {attr.FAULT_KIND: "oom", attr.BATCH_SIZE: len(batch)})
            for request in batch:
                request.span.set_attribute(attr.FAULT_OOM, True)
            raise InjectedOutOfMemory(
                f"injected out-of-memory on a batch of {len(batch)} (model {self.faults.model!r}, "
                f"oom_every={every}, oom_above={above})"
            )
