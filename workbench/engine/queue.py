"""The request queue a model worker drains; batching policies read it."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from workbench.engine.requests import GenerationRequest

Accept = Callable[[GenerationRequest, list[GenerationRequest]], bool]


def select(items: Iterable[GenerationRequest], limit: int, accept: Accept) -> list[GenerationRequest]:
    """The requests :meth:`RequestQueue.take` would remove from ``items``, without removing them."""
    taken: list[GenerationRequest] = []
    for item in items:
        if len(taken) >= limit:
            break
        if not taken or accept(item, taken):
            taken.append(item)
    return taken


class RequestQueue:
    """A FIFO of requests that a policy can wait on, scan and take from selectively.

    ``interrupt()`` wakes every waiter and makes waits return at once until ``resume()``:
    the worker resumes before it reads its policy, so a policy swapped in while the old one
    was waiting (for a timeout, say) takes over at once.
    """

    def __init__(self) -> None:
        self._items: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self.closed = False
        self.interrupted = False
        # The largest batch the model ran without running out of memory; ``take`` never exceeds it.
        self.batch_limit: int | None = None

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, request: GenerationRequest) -> None:
        self.put_many([request])

    def put_many(self, requests: Sequence[GenerationRequest]) -> None:
        """Queue ``requests`` together: the worker wakes once for all of them, not once each."""
        with self._cond:
            if self.closed:
                raise RuntimeError("queue closed")
            self._items.extend(requests)
            self._cond.notify_all()

    def peek(self) -> GenerationRequest | None:
        """The oldest queued request, left in place; None when the queue is empty."""
        with self._cond:
            return self._items[0] if self._items else None

    def wait(self, timeout: float | None = None, count: int = 1) -> bool:
        """Block until at least ``count`` requests are queued, or the timeout, close or interrupt."""
        return self.wait_until(lambda items: len(items) >= count, timeout)

    def wait_until(self, ready: Callable[[Sequence[GenerationRequest]], bool], timeout: float | None = None) -> bool:
        """Block until ``ready(queued)`` holds, or the timeout, close or interrupt; returns ``ready``'s last answer.

        ``ready`` runs under the queue's lock after every arrival, so it must be quick and must
        not call back into the queue.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not (done := ready(self._items)) and not self.closed and not self.interrupted:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            return done

    def take(self, limit: int, accept: Accept) -> list[GenerationRequest]:
        """Remove and return, in FIFO order, up to ``limit`` requests that ``accept`` admits.

        ``accept(request, taken_so_far)`` sees the requests already chosen, so a policy can
        keep parameters uniform or cap padded tokens. The head of the queue is always taken,
        so no request can starve.
        """
        with self._cond:
            taken = select(self._items, self.limited(limit), accept)
            if taken:
                chosen = {id(r) for r in taken}
                self._items = deque(r for r in self._items if id(r) not in chosen)
            return taken

    def limited(self, size: int) -> int:
        """``size``, or the batch limit if that is smaller."""
        limit = self.batch_limit
        return size if limit is None else min(size, limit)

    def remove(self, request: GenerationRequest) -> bool:
        """Take ``request`` out of the queue; False if it is no longer queued (a batch took it).

        Wakes the waiters: a policy waiting for company for the request taken out stops waiting for it.
        """
        with self._cond:
            try:
                self._items.remove(request)
            except ValueError:
                return False
            self._cond.notify_all()
            return True

    def interrupt(self) -> None:
        """Wake every waiter now and keep waits from blocking until :meth:`resume`."""
        with self._cond:
            self.interrupted = True
            self._cond.notify_all()

    def resume(self) -> None:
        """Let waits block again; the worker calls this before it reads its policy."""
        with self._cond:
            self.interrupted = False

    def close(self) -> list[GenerationRequest]:
        """Refuse new requests, wake waiters, and hand back what was still queued."""
        with self._cond:
            self.closed = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return left
