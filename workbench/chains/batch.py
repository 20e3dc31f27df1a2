"""What ``chain.map`` returns: one entry per input, kept as each run finishes, even through an interrupt."""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from workbench.chains.run import Run

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

    def _keep(self, index: int, future: Future[Run]) -> None:
        # Runs in the worker thread as the run ends, so a result is kept even if nobody waits for it.
        if not future.cancelled() and future.exception() is None:
            self[index] = future.result()


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


def run_all(batch: RunBatch, execute: Callable[[dict[str, Any]], Run], concurrency: int, errors: Errors) -> RunBatch:
    """Run every input of ``batch`` that has no run yet, ``concurrency`` at a time.

    On KeyboardInterrupt, inputs not yet started are cancelled, runs in flight finish in the
    background (and land in the batch), and MapInterrupted is raised at once.
    """
    todo = batch.missing
    if not todo:
        return batch
    workers = max(1, min(concurrency, len(todo)))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"chain-{batch.chain}")
    futures: dict[Future[Run], int] = {}
    try:
        for index in todo:
            future = pool.submit(execute, batch.inputs[index])
            future.add_done_callback(partial(batch._keep, index))
            futures[future] = index
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_COMPLETED)
            for future in done:
                run = future.result()  # raises only for what failed outside every hop (or an interrupt)
                if errors == "raise" and run.error is not None:
                    raise run.error
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        _keep_finished(batch, futures)
        batch.interrupted = True
        raise MapInterrupted(batch) from None
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        _keep_finished(batch, futures)
        raise
    pool.shutdown()
    return batch


def _keep_finished(batch: RunBatch, futures: dict[Future[Run], int]) -> None:
    """Put every run that has ended into ``batch`` now, before map raises.

    A future wakes its waiters before it calls its done-callbacks, so without this a run that had
    finished (the failure that ``errors="raise"`` raises, say) could still be missing when the caller looks.
    """
    for future, index in futures.items():
        if future.done():
            batch._keep(index, future)
