"""Workloads that drive a chain: closed loop at a fixed concurrency, or open loop with Poisson arrivals."""

from __future__ import annotations

import asyncio
import json
import math
import numbers
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.chains.runner import Interrupted, check_inputs
from workbench.errors import WorkloadError, plain_fields
from workbench.tracing.clock import now_ns

if TYPE_CHECKING:
    import numpy as np

    from workbench.chains.chain import Chain
    from workbench.chains.run import Run


_JSONL_HINT = 'one JSON object of chain inputs per line, e.g. {"question": "What is 2 + 2?"}'


def not_whole(name: str, value: object, least: int) -> str | None:
    """What is wrong with ``value`` as a whole number (an int, not a bool) of at least ``least``; None if nothing."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be a whole number, not {value!r}"
    return f"{name} must be at least {least}, not {value}" if value < least else None


def as_inputs(inputs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A list of input dicts from any iterable of mappings; a clear error for anything else."""
    items = []
    for index, item in enumerate(inputs):
        if not isinstance(item, Mapping):
            raise WorkloadError(
                f"input {index} is a {type(item).__name__}, not a mapping of chain inputs",
                hint='inputs are dicts, e.g. [{"question": "What is 2 + 2?"}]',
            )
        items.append(dict(item))
    return items


def read_inputs(path: str | Path) -> list[dict[str, Any]]:
    """Chain inputs from a JSON Lines file: one JSON object per line, blank lines skipped."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise WorkloadError(f"cannot read inputs file {str(path)!r}: {exc.strerror}", hint=_JSONL_HINT) from exc
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        at = raw.count(b"\n", 0, exc.start) + 1
        raise WorkloadError(f"{path.name}, line {at}: not UTF-8 text (byte {raw[exc.start]:#04x})",
                            hint="save the inputs file as UTF-8") from None
    items: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path.name}, line {number}: not JSON ({exc.msg})", hint=_JSONL_HINT) from exc
        except RecursionError:  # lists or objects nested thousands deep: no chain's inputs look like that
            raise WorkloadError(f"{path.name}, line {number}: JSON nested too deeply to read",
                                hint=_JSONL_HINT) from None
        if not isinstance(item, dict):
            raise WorkloadError(
                f"{path.name}, line {number}: a JSON {type(item).__name__}, not an object of chain inputs",
                hint=_JSONL_HINT,
            )
        items.append(item)
    if not items:
        raise WorkloadError(f"inputs file {str(path)!r} holds no inputs", hint=_JSONL_HINT)
    return items


@dataclass
class WorkloadResult:
    """The measured runs of one workload pass, with the times a latency reader needs.

    Times are epoch nanoseconds on the clock spans are stamped with (``tracing.clock.now_ns``), so they
    compare directly with span start and end times. ``arrivals_ns[i]`` is when ``runs[i]``
    was due: its start in a closed loop, its scheduled arrival in an open loop (a run that
    starts late because the machine is saturated still counts its latency from arrival).
    ``first_result_ns`` is when the first run of the pass, warm-up included, finished without error.
    """

    runs: list[Run]
    arrivals_ns: list[int]
    started_ns: int
    ended_ns: int
    warmup_runs: list[Run] = field(default_factory=list)
    first_result_ns: int | None = None

    @property
    def wall_s(self) -> float:
        """Seconds from the first measured arrival to the last measured completion."""
        return (self.ended_ns - self.started_ns) / 1e9


class _Pass:
    """One pass of a workload on the workbench's event loop: its runs, ``limit`` at a time, and its first result.

    A failed run is kept (with its error), not raised, as ``Chain.map`` does. After :meth:`stop`
    (a Ctrl-C) no further run starts; the ones running finish in the background.
    """

    def __init__(self, chain: Chain, limit: int) -> None:
        self.chain = chain
        self.limit = limit
        self.first_result_ns: int | None = None
        self.stopped = False
        self._slots: asyncio.Semaphore | None = None

    def stop(self) -> None:
        self.stopped = True

    async def one(self, inputs: Mapping[str, Any]) -> Run | None:
        if self._slots is None:  # made on the loop the pass runs on
            self._slots = asyncio.Semaphore(self.limit)
        async with self._slots:
            if self.stopped:
                return None
            run = await self.chain.bench.arun_spec(self.chain.spec, inputs)
        if run.ok and self.first_result_ns is None:
            self.first_result_ns = now_ns()
        return run

    @staticmethod
    async def gather(runs: Iterable[Awaitable[Run | None]]) -> list[Run]:
        return [run for run in await asyncio.gather(*runs) if run is not None]


class Workload(ABC):
    """Chain inputs and how they arrive; ``warmup`` extra runs go first and are left out of the results."""

    inputs: list[dict[str, Any]]
    warmup: int

    def check(self, chain: Chain) -> None:
        """Refuse a workload that cannot run on ``chain`` (no inputs, a missing or misspelt input) before it starts."""
        if not self.inputs:
            raise WorkloadError("a workload needs at least one input", hint="pass a list of dicts of chain inputs")
        if wrong := not_whole("warmup", self.warmup, 0):
            raise WorkloadError(wrong, hint="warmup=0 measures from the first run")
        for item in self.inputs:
            check_inputs(chain.spec, item)

    def warmup_inputs(self) -> list[dict[str, Any]]:
        """The warm-up runs' inputs: the workload's own, from the start, cycled as needed."""
        return [self.inputs[i % len(self.inputs)] for i in range(self.warmup)]

    @abstractmethod
    def _threads(self) -> int:
        """How many runs may be in flight at once."""

    @abstractmethod
    async def _measure(self, runs: _Pass) -> tuple[list[Run], list[int], int]:
        """Start the measured runs; return them, their arrival times, and when the measurement began."""

    def run(self, chain: Chain, *, after_warmup: Callable[[], None] | None = None) -> WorkloadResult:
        """Run the warm-up, then the measured runs; a failing run is kept with its error, not raised.

        ``after_warmup``, if given, is called once the warm-up runs have finished and before the first measured run
        starts (a comparison empties its scratch cache there). The runs walk on the workbench's event loop; a Ctrl-C
        starts no further run and raises at once.
        """
        self.check(chain)
        runs = _Pass(chain, self._threads())
        try:
            return chain.bench.run_sync(  # type: ignore[attr-defined]
                self._run(runs, after_warmup), on_interrupt=runs.stop)
        except Interrupted:  # a hop raised KeyboardInterrupt
            raise KeyboardInterrupt from None

    async def _run(self, runs: _Pass, after_warmup: Callable[[], None] | None) -> WorkloadResult:
        try:
            warm = await runs.gather(runs.one(i) for i in self.warmup_inputs())
            if after_warmup is not None:
                after_warmup()
            measured, arrivals, started = await self._measure(runs)
        except BaseException:
            runs.stop()  # the runs still queued behind this one start no more
            raise
        return WorkloadResult(
            runs=measured,
            arrivals_ns=arrivals,
            started_ns=started,
            ended_ns=max((_end_ns(r) for r in measured), default=started),
            warmup_runs=warm,
            first_result_ns=runs.first_result_ns,
        )


def _end_ns(run: Run) -> int:
    return int(run.started_at * 1e9 + run.duration_ms * 1e6)


def _start_ns(run: Run) -> int:
    return int(run.started_at * 1e9)


@dataclass
class ClosedLoop(Workload):
    """Every input once, ``concurrency`` runs in flight: a new run starts as soon as one finishes."""

    inputs: list[dict[str, Any]]
    concurrency: int = 8
    warmup: int = 0

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy's numbers, from a sweep, as Python's
        self.inputs = as_inputs(self.inputs)
        if wrong := not_whole("concurrency", self.concurrency, 1):
            raise WorkloadError(wrong, hint="the number of chain runs in flight")

    def _threads(self) -> int:
        return self.concurrency

    async def _measure(self, runs: _Pass) -> tuple[list[Run], list[int], int]:
        started = now_ns()
        done = await runs.gather(runs.one(i) for i in self.inputs)
        # In a closed loop a run is due when a slot frees up, which is when it starts.
        return done, [_start_ns(r) for r in done], started


@dataclass
class PoissonArrivals(Workload):
    """Every input once, arriving at random at ``rate`` runs per second on average (an open loop).

    Gaps between arrivals are exponential with mean ``1 / rate``, drawn from
    ``numpy.random.default_rng(seed)``, so one seed gives the same arrival times on every
    pass. Runs start when they arrive whether or not earlier ones have finished, up to
    ``max_in_flight`` at once; latency counts from the scheduled arrival, so a saturated
    machine shows up as latency rather than as a slower arrival rate.
    """

    inputs: list[dict[str, Any]]
    rate: float = 1.0
    seed: int = 0
    warmup: int = 0
    max_in_flight: int = 256

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy's numbers, from a sweep, as Python's
        self.inputs = as_inputs(self.inputs)
        if isinstance(self.rate, bool) or not isinstance(self.rate, numbers.Real) or not 0 < self.rate < math.inf:
            raise WorkloadError(f"arrival rate must be a finite number > 0 runs/s, not {self.rate!r:.80}",
                                hint="e.g. arrival_rate=20; for every run at once, a closed loop: concurrency=N")
        if wrong := not_whole("seed", self.seed, 0):  # numpy's would come at the first pass's measurement
            raise WorkloadError(wrong, hint="the seed of the arrival times, e.g. seed=0: one seed, one schedule")
        if wrong := not_whole("max_in_flight", self.max_in_flight, 1):
            raise WorkloadError(wrong)

    def arrival_times(self) -> np.ndarray:
        """Seconds from the start of the measured runs at which each input arrives (the first at 0)."""
        import numpy as np

        gaps = np.random.default_rng(self.seed).exponential(1.0 / self.rate, size=len(self.inputs))
        gaps[0] = 0.0
        return np.cumsum(gaps)

    def _threads(self) -> int:
        return min(len(self.inputs), self.max_in_flight)

    async def _measure(self, runs: _Pass) -> tuple[list[Run], list[int], int]:
        offsets = self.arrival_times()
        started = now_ns()
        origin = time.perf_counter()
        arrived = []
        for inputs, offset in zip(self.inputs, offsets):
            delay = origin + float(offset) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            arrived.append(asyncio.ensure_future(runs.one(inputs)))
        arrivals = [started + int(float(o) * 1e9) for o in offsets]
        return await runs.gather(arrived), arrivals, started
