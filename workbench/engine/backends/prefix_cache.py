"""The prefix (KV) cache of an in-process transformers model: a prompt prefix prefilled once, its KV reused per batch.

Keyed by the prefix's token ids, which is all that crosses the backend seam; the tensors stay here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_MAX_PREFIXES = 16
# The most prefix KV one model keeps: 16 prefixes of 2,000 tokens on a 7B model in float16 would hold ~16 GB.
DEFAULT_MAX_BYTES = 2 << 30


@dataclass
class PrefixEntry:
    """One prefix's KV, per layer (batch 1), what its prefill cost, and how often it was reused."""

    ids: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    prefill_ms: float
    bytes: int
    uses: int = 0
    created: float = field(default_factory=time.time)


class PrefixCache:
    """Prefix KV of one model, least recently used first out past ``max_prefixes`` or ``max_bytes``; safe across
    threads. The newest prefix stays even when it alone is past ``max_bytes``: its batch is about to use it."""

    def __init__(self, model: Any, device: torch.device | str, max_prefixes: int = DEFAULT_MAX_PREFIXES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._model = model
        self._device = device
        self.max_prefixes = max_prefixes
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], PrefixEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, ids: Sequence[int]) -> tuple[PrefixEntry, bool]:
        """The entry of prefix ``ids``, prefilled now if it was not cached; and whether it was (a hit)."""
        key = tuple(ids)
        with self._lock:  # one prefill at a time: two batches wanting one new prefix prefill it once
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.uses += 1
                return entry, True
            entry = self._prefill(key)
            self._entries[key] = entry
            self._bytes += entry.bytes
            while len(self._entries) > self.max_prefixes or (self._bytes > self.max_bytes and len(self._entries) > 1):
                self._bytes -= self._entries.popitem(last=False)[1].bytes
            return entry, False

    def _prefill(self, ids: tuple[int, ...]) -> PrefixEntry:
        started = time.perf_counter()
        with torch.inference_mode():
            output = self._model(input_ids=torch.tensor([list(ids)], device=self._device), use_cache=True)
        cache = getattr(output, "cache", None)
        if cache is None:  # transformers before 5.x names it past_key_values
            cache = output.past_key_values
        if torch.device(self._device).type == "cuda":
            torch.cuda.synchronize(self._device)  # else the clock reads the launch, not the prefill
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        return PrefixEntry(ids, layers, (time.perf_counter() - started) * 1e3, size)

    def expanded(self, entry: PrefixEntry, batch: int, config: Any) -> Any:
        """A fresh DynamicCache holding ``entry``'s KV for ``batch`` rows (views: generate appends, never writes in)."""
        from transformers import DynamicCache

        return DynamicCache(
            ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in entry.layers],
            config=config,
        )

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def rows(self) -> list[dict[str, Any]]:
        """One row per cached prefix: tokens, bytes, prefill_ms, uses."""
        with self._lock:
            return [{"tokens": len(e.ids), "bytes": e.bytes, "prefill_ms": e.prefill_ms, "uses": e.uses}
                    for e in self._entries.values()]

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes
