"""Batching policies: when the queued requests of one model become a batch."""

from __future__ import annotations

from abc import ABC, abstractmethod

from workbench.engine.queue import RequestQueue
from workbench.engine.requests import GenerationRequest


def same_params(request: GenerationRequest, taken: list[GenerationRequest]) -> bool:
    """Requests share a batch only when their generation parameters are identical."""
    return request.params == taken[0].params


class BatchingPolicy(ABC):
    """Decides which queued requests run together; ``name`` appears on every batch span."""

    name: str = "policy"

    @abstractmethod
    def next_batch(self, queue: RequestQueue) -> list[GenerationRequest]:
        """Block until a batch is ready and return it; an empty list means the queue closed."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoBatching(BatchingPolicy):
    """One request at a time, in arrival order."""

    name = "none"

    def next_batch(self, queue: RequestQueue) -> list[GenerationRequest]:
        if not queue.wait():
            return []
        return queue.take(1, same_params)
