"""The request queue a model worker drains; batching policies read it."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from workbench.engine.requests import GenerationRequest


class RequestQueue:
    """A FIFO of requests that a policy can wait on, scan and take from selectively."""

    def __init__(self) -> None:
        self._items: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self.closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, request: GenerationRequest) -> None:
        with self._cond:
            if self.closed:
                raise RuntimeError("queue closed")
            self._items.append(request)
            self._cond.notify_all()

    def wait(self, timeout: float | None = None, count: int = 1) -> bool:
        """Block until at least ``count`` requests are queued, or the timeout, or close."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._items) < count and not self.closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            return len(self._items) >= count

    def take(self, limit: int, accept: Callable[[GenerationRequest, list[GenerationRequest]], bool]) -> list[GenerationRequest]:
        """Remove and return, in FIFO order, up to ``limit`` requests that ``accept`` admits.

        ``accept(request, taken_so_far)`` sees the requests already chosen, so a policy can
        keep parameters uniform or cap padded tokens. The head of the queue is always taken,
        so no request can starve.
        """
        with self._cond:
            taken: list[GenerationRequest] = []
            kept: deque[GenerationRequest] = deque()
            while self._items and len(taken) < limit:
                item = self._items.popleft()
                if not taken or accept(item, taken):
                    taken.append(item)
                else:
                    kept.append(item)
            kept.extend(self._items)
            self._items = kept
            return taken

    def close(self) -> list[GenerationRequest]:
        """Refuse new requests, wake waiters, and hand back what was still queued."""
        with self._cond:
            self.closed = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return left
