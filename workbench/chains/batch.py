"""What ``chain.map`` returns: one entry per input, kept as each run finishes, even through an interrupt."""

from __future__ import annotations

import asyncio
import html
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from workbench.chains.run import Run
from workbench.chains.runner import Interrupted
from workbench.errors import WorkloadError

if TYPE_CHECKING:
    import pandas as pd

    from workbench.chains.live import ConfigVersion

Errors = Literal["keep", "raise"]


class RunBatch(list["Run | None"]):
    """The runs of one ``chain.map``, in input order: a list of Run, where a failed run has ``.error``.

    An entry is ``None`` while its input has not run: only in a batch that was interrupted
    (``MapInterrupted.batch``, ``chain.last_batch``). Such a batch keeps filling in as the runs
    that were in flight finish; ``chain.map(inputs, resume=batch)`` reuses its successful runs, waits
    for those still in flight rather than running their inputs again, and runs the rest.
    """

    def __init__(self, chain: str, inputs: list[dict[str, Any]]) -> None:
        super().__init__([None] * len(inputs))
        self.chain = chain
        self.inputs = inputs
        self.interrupted = False
        # The runs in flight, by position (tasks on the workbench's loop), and those of an earlier batch that a
        # resuming map waits for in place of a run of its own, reused if made under ``_serving`` (see reuse()).
        self._flying: dict[int, asyncio.Future[Run]] = {}
        self._adopted: dict[int, asyncio.Future[Run]] = {}
        self._serving: ConfigVersion | None = None

    @property
    def finished(self) -> list[Run]:
        """Runs that ended, successful or failed, in input order."""
        return [run for run in self if run is not None]

    @property
    def failed(self) -> list[Run]:
        """Runs that ended with a failed hop; each ``.error`` says which hop and why."""
        return [run for run in self if run is not None and not run.ok]

    @property
    def missing(self) -> list[int]:
        """Positions of the inputs that have not run (interrupted or cancelled)."""
        return [index for index, run in enumerate(self) if run is None]

    @property
    def complete(self) -> bool:
        return all(run is not None for run in self)

    def table(self) -> pd.DataFrame:
        """One row per input: status (ok, error or not run), run id, duration, output, error, inputs."""
        import pandas as pd

        rows = []
        for item, run in zip(self.inputs, self, strict=True):
            status = "not run" if run is None else run.status
            rows.append(
                {
                    "status": status,
                    "run_id": run.id if run is not None else None,
                    "duration_ms": run.duration_ms if run is not None else None,
                    "output": run.output if run is not None else None,
                    "error": run.error.message if run is not None and run.error is not None else None,
                    **{f"input.{key}": value for key, value in item.items()},
                }
            )
        return pd.DataFrame(rows)

    def summary(self) -> str:
        """``100 inputs: 97 ok, 1 failed, 2 not run`` (and whether it was interrupted)."""
        failed = len(self.failed)
        missing = len(self.missing)
        text = f"{len(self)} inputs: {len(self) - failed - missing} ok, {failed} failed, {missing} not run"
        return text + (" (interrupted)" if self.interrupted else "")

    def __repr__(self) -> str:
        return f"<RunBatch of {self.chain!r}, {self.summary()}>"

    def _repr_html_(self) -> str:
        head = f"<p>RunBatch of <b>{html.escape(self.chain)}</b>, {self.summary()}</p>"
        # As a notebook shows any DataFrame (pandas' display.max_rows and max_colwidth): a map of thousands of
        # inputs, or of runs whose outputs are whole documents, would otherwise put every character in the page.
        table = self.table()
        return f"<div>{head}{table._repr_html_() or html.escape(repr(table))}</div>"


class MapInterrupted(KeyboardInterrupt):
    """``chain.map`` was interrupted (Ctrl-C, the notebook's stop button); ``batch`` holds what finished.

    It is a KeyboardInterrupt, so it stops a script or a cell as one would; the runs are not lost:
    they are on ``.batch`` and on ``chain.last_batch``.
    """

    def __init__(self, batch: RunBatch) -> None:
        self.batch = batch
        super().__init__(
            f"chain.map of {batch.chain!r} interrupted with {len(batch.finished)} of {len(batch)} inputs run;"
            " the runs are kept in chain.last_batch (runs still in flight are added as they finish),"
            " and chain.map(inputs, resume=chain.last_batch) runs only the rest"
        )


def reuse(batch: RunBatch, previous: Iterable[Run | None], version: ConfigVersion | None = None,
          answered: Callable[[list[Run]], list[Run]] | None = None) -> None:
    """Fill ``batch`` with the successful runs of ``previous`` whose chain and inputs match, and, where both are
    known, whose configuration is ``version`` (a run of an edited chain answered another prompt or model), and
    which ``answered`` keeps of them (those the models of now answered: see Chain._same_models)."""
    hint = "resume=chain.last_batch, or any Runs, e.g. resume=bench.runs()"
    # Its runs in flight are read before its finished ones: one that lands in between is among the finished.
    flying = dict(previous._flying) if isinstance(previous, RunBatch) and previous.chain == batch.chain else {}
    try:
        runs = list(previous)
    except TypeError:
        raise WorkloadError(f"resume= takes a RunBatch or a list of Runs, not {type(previous).__name__}",
                            hint=hint) from None
    done: dict[str, list[Run]] = defaultdict(list)
    fitting = []
    for position, run in enumerate(runs):
        if run is not None and not isinstance(run, Run):  # before any run starts, not an AttributeError
            raise WorkloadError(f"resume= takes Runs (or None); item {position} is {type(run).__name__} {run!r:.80}",
                                hint=hint)
        if run is not None and run.ok and run.chain == batch.chain and _same_config(run.config_version, version):
            fitting.append(run)
    for run in answered(fitting) if answered is not None else fitting:
        if (key := _key(run.inputs)) is not None:
            done[key].append(run)
    waiting: dict[str, list[asyncio.Future[Run]]] = defaultdict(list)
    for position, task in flying.items():
        if (key := _key(previous.inputs[position])) is not None:  # type: ignore[attr-defined]
            waiting[key].append(task)

    batch._serving = version
    for index, item in enumerate(batch.inputs):
        key = _key(item)
        matches = done.get(key)
        if batch[index] is None and matches:
            batch[index] = matches.pop(0)  # an input given twice reuses two runs, not one twice
        elif batch[index] is None and waiting.get(key):
            batch._adopted[index] = waiting[key].pop(0)


def _same_config(used: ConfigVersion | None, serving: ConfigVersion | None) -> bool:
    # By content hash, not number: two chains of one name both start at v1, and an undone edit is the same config.
    return used is None or serving is None or used.digest == serving.digest


def inputs_key(inputs: dict[str, Any]) -> str | None:
    """What tells a run's inputs apart when a map reuses runs (see :func:`reuse`); None for inputs never reused."""
    return _key(inputs)


def _key(inputs: dict[str, Any]) -> str | None:
    """What compares two runs' inputs (they need not be hashable): their canonical JSON. None for inputs JSON cannot
    hold (an array, an object): a repr may leave out what tells two apart (numpy shows a long array's ends only),
    so their runs are never reused, only run again."""
    try:
        return json.dumps(_canonical(inputs))
    except (TypeError, ValueError):  # not JSON, or a cycle
        return None


def _canonical(value: Any) -> Any:
    """``value`` with each mapping as its items sorted by the keys' repr: JSON would make the keys 1 and "1" one,
    and cannot sort keys of mixed types."""
    if isinstance(value, dict):
        return {"items": sorted([repr(key), _canonical(item)] for key, item in value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    return value


async def _adopt(batch: RunBatch, index: int) -> Run | None:
    """The run of an earlier, interrupted map that was in flight for this input, once it lands, if it can be reused;
    None to run the input here (there is none, it failed or was cancelled, or it ran another configuration)."""
    task = batch._adopted.pop(index, None)
    if task is None:
        return None
    if task.get_loop() is not asyncio.get_running_loop():  # another workbench's run
        return None
    try:
        run = await asyncio.shield(task)  # cancelling this map leaves the other's run to land in its own batch
    except asyncio.CancelledError:
        if not task.cancelled():
            raise  # this map was cancelled
        return None
    except Exception:  # it failed in its own map (a hop's KeyboardInterrupt, say): run it here
        return None
    return run if run.ok and _same_config(run.config_version, batch._serving) else None


class MapState:
    """One map's lanes: the inputs left to start, and whether to start more (a Ctrl-C or an error stops them)."""

    def __init__(self, batch: RunBatch, todo: list[int]) -> None:
        self.batch = batch
        self._todo = iter(todo)
        self.stopped = False

    def stop(self) -> None:
        """Start no further input; runs in flight still finish and are kept. Safe to call from any thread."""
        self.stopped = True

    def next(self) -> int | None:
        return None if self.stopped else next(self._todo, None)


async def run_all(
    batch: RunBatch,
    execute: Callable[[dict[str, Any]], Awaitable[Run]],
    concurrency: int,
    errors: Errors,
    state: MapState | None = None,
    kept: Callable[[Run], None] | None = None,
) -> RunBatch:
    """Run every input of ``batch`` that has no run yet, ``concurrency`` at a time, on the running loop.

    ``concurrency`` lanes each take the next input not yet started, run it and keep its run in
    ``batch``, until none is left or the map stops. With ``errors="raise"`` the first failed run
    stops new starts and its HopFailed is raised; runs in flight still land in the batch. A hop
    that raised KeyboardInterrupt stops the map the same way and raises Interrupted (never a
    KeyboardInterrupt on the loop: it would stop the loop); the caller turns it into MapInterrupted.
    ``kept`` hears each run as it lands in the batch (a checkpoint file's writer).
    """
    state = state or MapState(batch, batch.missing)
    lanes_wanted = max(1, min(concurrency, len(batch.missing)))
    if not batch.missing:
        return batch

    async def lane() -> None:
        while (index := state.next()) is not None:
            try:
                run = await _adopt(batch, index)
                if run is None:
                    task = batch._flying[index] = asyncio.ensure_future(execute(batch.inputs[index]))
                    try:
                        run = await task
                    finally:
                        del batch._flying[index]
            except BaseException:
                state.stop()
                raise
            batch[index] = run
            if kept is not None:
                kept(run)
            if errors == "raise" and run.error is not None:
                state.stop()
                raise run.error

    lanes = [asyncio.ensure_future(lane()) for _ in range(lanes_wanted)]
    try:
        await asyncio.gather(*lanes)
    except Interrupted:
        batch.interrupted = True
        raise
    except asyncio.CancelledError:
        state.stop()  # cancelled by the caller: the lanes are cancelled with it, and so are their runs in flight
        batch.interrupted = True
        raise
    return batch
