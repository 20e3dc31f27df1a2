"""The threads that walk chains for ``chain.map``, kept between maps instead of started for each.

Starting a thread costs its start-up handshake with the GIL held by everyone else: a map of 64
chains on a fresh pool spent a quarter of its orchestration time starting threads (see
benchmarks/README.md). These threads wait for the next task when they finish one, and leave
after ``idle_s`` without work, so a notebook that stops mapping holds none for long.

There is no upper bound: a task never waits for a thread, so a map inside a Python hop of
another map (both needing threads at once) cannot deadlock the way a fixed-size pool would.
A caller bounds its own concurrency by how many tasks it submits, or through ``limited(n)``.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from workbench.errors import WorkbenchClosed

Task = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class ChainThreads:
    """Runs submitted callables on reusable daemon threads named ``{name}-N``; ``busy`` counts those at work."""

    def __init__(self, name: str = "workbench-map", idle_s: float = 30.0) -> None:
        self.name = name
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._idle = 0  # threads waiting for a task, less the tasks already queued for them
        self._threads: set[threading.Thread] = set()
        self._numbers = itertools.count(1)
        self._closed = False

    @property
    def busy(self) -> int:
        """Threads running a task now (or about to take a queued one)."""
        with self._lock:
            return len(self._threads) - self._idle

    @property
    def threads(self) -> int:
        with self._lock:
            return len(self._threads)

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on an idle thread, or on a new one if none is idle."""
        future: Future[Any] = Future()
        task = (future, fn, args)
        with self._lock:
            if self._closed:
                raise WorkbenchClosed("start another run")
            if self._idle:
                self._idle -= 1
                self._tasks.put(task)
                return future
            thread = threading.Thread(target=self._serve, args=(task,), name=f"{self.name}-{next(self._numbers)}", daemon=True)
            self._threads.add(thread)
        thread.start()
        return future

    def limited(self, limit: int) -> Limited:
        """An executor over these threads that runs at most ``limit`` of its tasks at once, the rest in order."""
        return Limited(self, limit)

    def close(self) -> None:
        """Let idle threads go now and busy ones when their task ends; ``submit`` refuses from here on."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._tasks.put(None)

    def _serve(self, task: Task | None) -> None:
        while task is not None:
            _run(task)
            task = None  # drop references before waiting, so a finished run's objects can go
            task = self._next()
        with self._lock:
            self._threads.discard(threading.current_thread())

    def _next(self) -> Task | None:
        """The next task for this thread, or None when it should leave (closed, or idle for ``idle_s``)."""
        with self._lock:
            if self._closed:
                return None
            self._idle += 1
        try:
            return self._tasks.get(timeout=self.idle_s)
        except queue.Empty:
            pass
        with self._lock:
            # A task queued just as the wait ran out was counted against this thread's idle slot: take it.
            try:
                return self._tasks.get_nowait()
            except queue.Empty:
                self._idle -= 1
                return None


class Limited:
    """Tasks submitted here run on a ChainThreads, at most ``limit`` at once; the rest wait in a queue, in order.

    Up to ``limit`` lanes (tasks on the shared threads) each run queued tasks until the queue
    is empty, then end, so a pass of a workload leaves no thread of its own behind.
    """

    def __init__(self, threads: ChainThreads, limit: int) -> None:
        self.limit = max(1, limit)
        self._threads = threads
        self._queue: queue.SimpleQueue[Task] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._lanes = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((future, fn, args))  # before the count is read: a lane that sees no task has left it
        with self._lock:
            start = self._lanes < self.limit
            self._lanes += start
        if start:
            self._threads.submit(self._lane)
        return future

    def cancel_queued(self) -> None:
        """Cancel every task not yet started; those running finish."""
        while True:
            try:
                future, _, _ = self._queue.get_nowait()
            except queue.Empty:
                return
            future.cancel()

    def _lane(self) -> None:
        while True:
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():  # checked under the lock submit counts lanes under
                        self._lanes -= 1
                        return
                continue
            _run(task)
            del task


def _run(task: Task) -> None:
    future, fn, args = task
    if future.set_running_or_notify_cancel():
        try:
            result = fn(*args)
        except BaseException as exc:  # a KeyboardInterrupt from a hop too: its caller decides what it means
            future.set_exception(exc)
        else:
            future.set_result(result)
