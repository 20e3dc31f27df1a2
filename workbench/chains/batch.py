"""What ``chain.map`` returns: one entry per input, kept as each run finishes, even through an interrupt."""

from __future__ import annotations

import html
import json
import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from workbench.chains.run import Run
from workbench.chains.threads import ChainThreads

if TYPE_CHECKING:
    import pandas as pd

Errors = Literal["keep", "raise"]
# How often the waiting thread returns to Python: a Ctrl-C is only seen between bytecodes, and a
# signal that lands on another thread would otherwise wait for the next run to finish.
_POLL_S = 0.1


class RunBatch(list["Run | None"]):
    """The runs of one ``chain.map``, in input order: a list of Run, where a failed run has ``.error``.

    An entry is ``None`` while its input has not run: only in a batch that was interrupted
    (``MapInterrupted.batch``, ``chain.last_batch``). Such a batch keeps filling in as the runs
    that were in flight finish; ``chain.map(inputs, resume=batch)`` reuses its successful runs and
    runs the rest.
    """

    def __init__(self, chain: str, inputs: list[dict[str, Any]]) -> None:
        super().__init__([None] * len(inputs))
        self.chain = chain
        self.inputs = inputs
        self.interrupted = False

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
        return f"<div>{head}{self.table().to_html()}</div>"


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


def reuse(batch: RunBatch, previous: Iterable[Run | None]) -> None:
    """Fill ``batch`` with the successful runs of ``previous`` whose chain and inputs match."""
    done: dict[str, list[Run]] = defaultdict(list)
    for run in previous:
        if run is not None and run.ok and run.chain == batch.chain:
            done[_key(run.inputs)].append(run)
    for index, item in enumerate(batch.inputs):
        matches = done.get(_key(item))
        if batch[index] is None and matches:
            batch[index] = matches.pop(0)  # an input given twice reuses two runs, not one twice


def _key(inputs: dict[str, Any]) -> str:
    # Inputs need not be hashable; their canonical JSON (repr for what JSON cannot hold) compares them.
    return json.dumps(inputs, sort_keys=True, default=repr)


def run_all(
    batch: RunBatch,
    execute: Callable[[dict[str, Any]], Run],
    concurrency: int,
    errors: Errors,
    threads: ChainThreads,
) -> RunBatch:
    """Run every input of ``batch`` that has no run yet, ``concurrency`` at a time.

    ``concurrency`` lanes on ``threads`` each take the next input not yet started, run it and
    keep its run in ``batch``, until none is left or the map stops. On KeyboardInterrupt no
    lane starts another input, runs in flight finish in the background (and land in the
    batch), and MapInterrupted is raised at once.
    """
    todo = batch.missing
    if not todo:
        return batch
    lanes = _Lanes(batch, execute, todo)
    try:
        for _ in range(max(1, min(concurrency, len(todo)))):
            threads.submit(lanes.run)
        for _ in todo:
            while True:
                try:
                    run, error = lanes.ended.get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    continue
            if error is not None:
                raise error  # what failed outside every hop (or an interrupt raised by a hop)
            assert run is not None
            if errors == "raise" and run.error is not None:
                raise run.error
    except KeyboardInterrupt:
        lanes.stop()
        batch.interrupted = True
        raise MapInterrupted(batch) from None
    except BaseException:
        lanes.stop()
        raise
    return batch


class _Lanes:
    """What the lanes of one map share: the inputs left to start, and a queue of how each run ended."""

    def __init__(self, batch: RunBatch, execute: Callable[[dict[str, Any]], Run], todo: list[int]) -> None:
        self.batch = batch
        self.execute = execute
        self.ended: queue.SimpleQueue[tuple[Run | None, BaseException | None]] = queue.SimpleQueue()
        self._todo = iter(todo)
        self._lock = threading.Lock()
        self._stopped = False

    def stop(self) -> None:
        """Start no further input; runs in flight still finish and are kept."""
        with self._lock:
            self._stopped = True

    def _take(self) -> int | None:
        with self._lock:
            return None if self._stopped else next(self._todo, None)

    def run(self) -> None:
        while (index := self._take()) is not None:
            try:
                run = self.execute(self.batch.inputs[index])
            except BaseException as exc:
                self.stop()  # the map raises this; nothing new should start behind it
                self.ended.put((None, exc))
                return
            self.batch[index] = run  # kept before the map hears of it, so a raise never outruns it
            self.ended.put((run, None))
