"""Waking the tasks that await requests: answers from worker threads reach an event loop in bunches."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

_held = threading.local()  # the Wakeups a worker thread holds back while it answers one batch


@contextmanager
def together() -> Iterator[None]:
    """Hold back loop wake-ups while this thread answers a batch; wake each loop once at the end.

    The runs that awaited the batch then resume in one tick of their loop and queue their next
    hops together, so those form the next batch whole; one wake-up per answer would let the loop
    start on the first answer alone and queue the rest a tick later, splitting the next batch.
    """
    held: set[Wakeups] = set()
    _held.wakeups = held
    try:
        yield
    finally:
        _held.wakeups = None
        for wakeups in held:
            wakeups.wake()


class Wakeups:
    """Hands finished requests (from worker threads) to the tasks awaiting them on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._finished: list[tuple[asyncio.Future[Any], Future[Any]]] = []
        self._scheduled = False

    def resolver(self, done: asyncio.Future[Any]) -> Callable[[Future[Any]], None]:
        """A done-callback for a request's future (run in the worker's thread) that wakes ``done``'s task."""

        def resolve(future: Future[Any]) -> None:
            with self._lock:
                self._finished.append((done, future))
            held = getattr(_held, "wakeups", None)
            if held is not None:
                held.add(self)
            else:
                self.wake()

        return resolve

    def wake(self) -> None:
        """Have the loop settle every answer that came since its last wake-up (once, however many came)."""
        with self._lock:
            if self._scheduled or not self._finished:
                return
            self._scheduled = True
        try:
            if _running_loop() is self._loop:  # answered on the loop itself (its loop lane): no wake-up needed
                self._loop.call_soon(self._settle)
            else:
                self._loop.call_soon_threadsafe(self._settle)
        except RuntimeError:
            pass  # the loop closed (the workbench closed): nobody awaits these any more

    def _settle(self) -> None:
        with self._lock:
            finished, self._finished, self._scheduled = self._finished, [], False
        for done, future in finished:
            if not done.done():
                exc = future.exception()
                if exc is None:
                    done.set_result(future.result())
                else:
                    done.set_exception(exc)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
