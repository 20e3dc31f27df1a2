"""Garbage-collector pauses, on the spans' clock, so a trace can say how much of a span was GC.

A collection stops every Python thread, so a pause that lands inside a span lengthens it with no
sign of why. Python calls ``gc.callbacks`` before and after each collection; the log keeps the
start and end (on ``tracing.clock.now_ns``, the clock spans are stamped with) of every
collection, with its generation and what it freed, in a bounded ring. ``Trace.table()`` reads it
for its ``gc_ms`` column (the pause time inside each span) and ``wb.gc_pauses()`` lists it.

The callback only reads the clock and appends to a deque: no lock (a collection can start while
the thread that triggered it holds any lock), no span calls. Python checks for signals inside it,
so a Ctrl-C that arrives during a collection is raised there, where gc can only drop it; the
callback catches it and re-sends it to the main thread instead (see ``_callback``).
"""

from __future__ import annotations

import _thread
import bisect
import gc
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from workbench.tracing.clock import now_ns

if TYPE_CHECKING:
    import pandas as pd

# About an hour of a busy workbench's collections (tens a second); older ones drop off.
CAPACITY = 100_000

# (start_ns, end_ns, generation, collected, uncollectable, thread name), oldest first.
_pauses: deque[tuple[int, int, int, int, int, str]] = deque(maxlen=CAPACITY)
_started: dict[int, int] = {}  # thread id -> start of the collection running in it
_installed = False
_install_lock = threading.Lock()


def _callback(phase: str, info: dict[str, Any]) -> None:
    try:
        _record(phase, info)
    except RecursionError:
        # A collection that started deep in a recursion (a hop's deeply nested output being walked): no frames are
        # left for the log, and gc would print the error, then fail to print it. The log misses this one instead.
        # No start is left behind for a later stop to pair with (C calls only: no frame is needed).
        _started.pop(threading.get_ident(), None)
    except KeyboardInterrupt:
        # Ctrl-C (or the notebook's stop button) landed during a collection in the main thread,
        # and Python ran its handler here, where an exception can only be printed and dropped:
        # the interrupt would be lost. Hand it back: a bare thread re-sends it to the main thread,
        # once it gets the GIL, i.e. after this returns (should it land in a callback again, it
        # is caught and re-sent again).
        _thread.start_new_thread(_thread.interrupt_main, ())


def _record(phase: str, info: dict[str, Any]) -> None:
    now = now_ns()
    ident = threading.get_ident()
    if phase == "start":
        _started[ident] = now
        return
    start = _started.pop(ident, None)
    if start is not None:
        _pauses.append(
            (start, now, info.get("generation", -1), info.get("collected", 0), info.get("uncollectable", 0),
             threading.current_thread().name)
        )


def install() -> None:
    """Start logging collections (once per process; a workbench does it when it starts)."""
    global _installed
    with _install_lock:
        if not _installed:
            gc.callbacks.append(_callback)
            _installed = True


class Overlaps:
    """Nanoseconds of logged collections inside a span's ``[start, end]``, against one snapshot of the log."""

    def __init__(self) -> None:
        self._pauses = list(_pauses)
        self._starts = [p[0] for p in self._pauses]

    def __call__(self, start: int, end: int) -> int:
        if not self._pauses or end <= start:
            return 0
        # Collections never overlap one another (they run under the GIL), so those that can touch the
        # interval start before its end, and of those that start before it only the last can reach in.
        first = max(0, bisect.bisect_left(self._starts, start) - 1)
        return sum(
            max(0, min(hi, end) - max(lo, start))
            for lo, hi, *_ in self._pauses[first : bisect.bisect_left(self._starts, end)]
        )


def pauses(since_ns: int | None = None) -> pd.DataFrame:
    """Every logged collection (since ``since_ns`` where given): when, how long, which generation, what it freed."""
    import pandas as pd

    rows = [
        {
            "start_time": pd.Timestamp(start, unit="ns", tz="UTC"),
            "duration_ms": (end - start) / 1e6,
            "generation": generation,
            "collected": collected,
            "uncollectable": uncollectable,
            "thread": thread,
        }
        for start, end, generation, collected, uncollectable, thread in list(_pauses)
        if since_ns is None or end >= since_ns
    ]
    columns = ["start_time", "duration_ms", "generation", "collected", "uncollectable", "thread"]
    return pd.DataFrame(rows, columns=columns)
