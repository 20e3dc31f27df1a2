"""Preloading strategies (lazy, eager, prefetch, keep-warm), memory budgets, and the loader that applies them."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry.trace import Span

from workbench.engine.batching import BatchingPolicy
from workbench.errors import ModelLoadError, StrategyError, did_you_mean
from workbench.tracing import Tracing
from workbench.tracing import attributes as attr

if TYPE_CHECKING:
    from workbench.models.registry import LoadedModel, LoadSettings, ModelRegistry

log = logging.getLogger(__name__)

PRELOADING_FORMS = "lazy, eager, prefetch[:THREADS], keep_warm:BUDGET (a size such as 20GiB or 512MiB)"
# How long a keep-warm load waits for a busy model to finish its requests before it may be evicted.
ROOM_TIMEOUT_S = 300.0

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value: int | str) -> int:
    """A memory size in bytes from an int or a string such as ``"20GiB"``, ``"512MiB"`` or ``"1.5GB"``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise StrategyError(f"a memory size is a number of bytes or a string, not {type(value).__name__}",
                            hint='write it like "20GiB", "512MiB", "1.5GB" or 1073741824')
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise StrategyError(f"{value!r} is not a memory size",
                                hint='write it like "20GiB", "512MiB", "1.5GB" (GiB = 2**30 bytes, GB = 10**9)')
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise StrategyError(f"a memory budget must be more than 0 bytes, got {value!r}", hint='e.g. "20GiB"')
    return size


def format_bytes(size: int) -> str:
    """An exact spelling of ``size`` that :func:`parse_bytes` reads back: ``20GiB``, ``1500MB``, ``1000B``."""
    units = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6),
             ("KiB", 2**10), ("KB", 10**3))
    for unit, scale in units:
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


class PreloadingStrategy:
    """When registered models load besides on first use; ``name`` is the short form :func:`parse_preloading` reads.

    Under every strategy a registered model that is not loaded loads on its first request.
    """

    @property
    def name(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Lazy(PreloadingStrategy):
    """Load a model on its first request; the cold start is a span inside that request's trace."""

    @property
    def name(self) -> str:
        return "lazy"


@dataclass(frozen=True)
class Eager(PreloadingStrategy):
    """Load every model a chain names before its first run (``bench.prepare(chain)``), in parallel."""

    @property
    def name(self) -> str:
        return "eager"


@dataclass(frozen=True)
class Prefetch(PreloadingStrategy):
    """When a hop starts, load in the background the models that hops downstream of it need.

    The hop's own model loads first, so nothing competes with the load it waits for; then
    ``threads`` background loads run at once, nearer hops' models first.
    """

    threads: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise StrategyError(f"Prefetch(threads={self.threads!r}): threads must be an integer >= 1",
                                hint="wb.Prefetch() loads two models at a time")

    @property
    def name(self) -> str:
        return "prefetch" if self.threads == 2 else f"prefetch:{self.threads}"


class KeepWarm(PreloadingStrategy):
    """Hold loaded models within ``budget`` (bytes, or a size such as ``"20GiB"``), evicting the least recently used.

    A model is used when it serves a request. Eviction and the later reload are spans of the
    run that needed the room; a model that alone exceeds the budget is refused with an error.
    """

    def __init__(self, budget: int | str) -> None:
        self.budget = parse_bytes(budget)

    @property
    def name(self) -> str:
        return f"keep_warm:{format_bytes(self.budget)}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeepWarm) and other.budget == self.budget

    def __hash__(self) -> int:
        return hash((KeepWarm, self.budget))

    def __repr__(self) -> str:
        return f"KeepWarm({format_bytes(self.budget)!r})"


def parse_preloading(text: str | PreloadingStrategy) -> PreloadingStrategy:
    """A strategy from its short name, the inverse of ``strategy.name``: ``lazy``, ``eager``, ``prefetch``,
    ``prefetch:4``, ``keep_warm:20GiB``. A strategy object passes through unchanged."""
    if isinstance(text, PreloadingStrategy):
        return text
    if not isinstance(text, str):
        raise StrategyError(f"a preloading strategy is a string or a strategy object, not {type(text).__name__}",
                            hint=f"the forms are {PRELOADING_FORMS}")
    kind, _, setting = text.strip().partition(":")
    kind = kind.strip().lower().replace("-", "_")

    def fail(message: str) -> StrategyError:
        return StrategyError(f"preloading {text!r}: {message}", hint=f"the forms are {PRELOADING_FORMS}")

    if kind in ("lazy", "eager"):
        if setting:
            raise fail(f"{kind} takes no setting")
        return Lazy() if kind == "lazy" else Eager()
    if kind == "prefetch":
        if not setting:
            return Prefetch()
        if not setting.strip().isdigit():
            raise fail(f"threads {setting!r} is not a whole number")
        return Prefetch(int(setting))
    if kind == "keep_warm":
        if not setting:
            raise fail("keep_warm needs a memory budget, e.g. keep_warm:20GiB")
        try:
            return KeepWarm(setting)
        except StrategyError as exc:
            raise fail(exc.message) from None
    raise fail(f"unknown strategy {kind!r}{did_you_mean(kind, ['lazy', 'eager', 'prefetch', 'keep_warm'])}")


class Preloader:
    """Applies the preloading strategy to a registry: loads on use, ahead of use or up front, within a budget.

    ``start(name, policy, parent, trigger)`` and ``stop(name)`` start and stop a model's workers; the engine that
    owns this preloader supplies them (it holds the workers). One load per model runs at a time:
    concurrent first uses of a model wait for one load instead of starting their own.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        tracing: Tracing,
        start: Callable[[str, BatchingPolicy | None, Span | None, str], object],
        stop: Callable[[str], None],
    ) -> None:
        self.registry = registry
        self._tracing = tracing
        self._start = start
        self._stop = stop
        self.strategy: PreloadingStrategy = Lazy()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # Guards the budget: requests in flight per model, bytes reserved by loads in progress.
        self._room = threading.Condition()
        self._busy: Counter[str] = Counter()
        self._reserved: dict[str, int] = {}
        # The models keep-warm holds to its budget (evicts, and counts); None: every loaded model. See confined_to.
        self._confined: frozenset[str] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_threads = 0
        self._pending: dict[str, Future[None]] = {}
        self._pending_lock = threading.Lock()
        self._closed = False
        # Loads a request is waiting for right now; prefetches hold back until there are none.
        self._urgent = 0
        self._urgent_done = threading.Condition()
        # Set by the workbench, which swaps watched models' versions live: why keep-warm must leave a loaded model
        # loaded though idle (None: it may be evicted), and a check, raising ModelLoadError, that a model may load
        # from the source in its settings now. See Workbench.watch_model.
        self.keep_loaded: Callable[[str], str | None] = lambda name: None
        self.check_source: Callable[[str, LoadSettings], None] = lambda name, settings: None
        # And a check of what a load brought in, before its workers start (raising ModelLoadError unloads it).
        self.check_loaded: Callable[[str, LoadedModel], None] = lambda name, loaded: None
        self._kept_said: set[tuple[str, str]] = set()  # (model, why) keep-warm has logged, each once

    # -- strategy ------------------------------------------------------------------------------

    @property
    def prefetching(self) -> bool:
        return isinstance(self.strategy, Prefetch)

    def set_strategy(self, strategy: PreloadingStrategy) -> None:
        """Switch strategies; a keep-warm budget takes effect at once, evicting idle models down to it.

        It waits for no busy model: one serving requests stays loaded (said in a warning) until a load next needs
        its room, so choosing a strategy never holds a notebook cell while a model finishes its work.
        """
        self.strategy = strategy
        if isinstance(strategy, KeepWarm):
            with self._room:
                busy = self._make_room(0, strategy.budget, for_model=None, parent=None, wait=False)
            if busy:
                log.warning("%s: %s, over the budget, serving requests now: evicted when a load next needs the room",
                            strategy.name, ", ".join(map(repr, busy)))

    @contextmanager
    def confined_to(self, names: Iterable[str]) -> Iterator[None]:
        """For the block, keep-warm evicts only the models in ``names`` and counts only them against its budget.

        A comparison's keep-warm passes hold the chain's models to the budget, and leave every other loaded model
        as they found it, instead of evicting it to reload cold on its next use.
        """
        with self._room:
            previous, self._confined = self._confined, frozenset(names)
        try:
            yield
        finally:
            with self._room:
                self._confined = previous
                self._room.notify_all()

    # -- loading and unloading -----------------------------------------------------------------

    def load(
        self,
        name: str,
        settings: LoadSettings | None = None,
        *,
        parent: Span | None = None,
        trigger: str = "explicit",
        policy: BatchingPolicy | None = None,
    ) -> LoadedModel:
        """Load ``name`` and start its worker; without ``settings``, the registered model, if not loaded already.

        With ``settings`` this is an explicit load, refused if ``name`` is loaded. The load span
        is a child of ``parent``; ``policy`` goes to the engine's ``start`` as it is.
        """
        if trigger != "on_use":
            return self._load(name, settings, parent, trigger, policy)
        with self._urgent_done:
            self._urgent += 1
        try:
            return self._load(name, settings, parent, trigger, policy)
        finally:
            with self._urgent_done:
                self._urgent -= 1
                self._urgent_done.notify_all()

    def _load(
        self, name: str, settings: LoadSettings | None, parent: Span | None, trigger: str, policy: BatchingPolicy | None
    ) -> LoadedModel:
        with self._lock_for(name):
            if settings is None:
                if self.registry.is_loaded(name):
                    return self.registry.get(name)
                settings = self.registry.settings(name)
            else:
                self.registry.check_free(name)
            self.check_source(name, settings)
            # What a load refused at its workers' start puts back (the load registers its own settings).
            before = self.registry.settings(name) if name in self.registry.names() else None
            budget = self.strategy.budget if isinstance(self.strategy, KeepWarm) else None
            if budget is not None:
                self._reserve(name, settings, budget, parent)
            try:
                loaded = self.registry.load(name, settings, parent=parent, trigger=trigger)
            finally:
                if budget is not None:
                    with self._room:
                        self._reserved.pop(name, None)
                        self._room.notify_all()
            try:
                self.check_loaded(name, loaded)
                self._start(name, policy, parent, trigger)
            except BaseException:  # refused, or a worker that cannot serve this model: leave nothing half-loaded
                self.registry.unload(name, forget=before is None)
                if before is not None:
                    self.registry.register(name, before)
                raise
            self.registry.usage.touch(name)
            if budget is not None:
                # The estimate ignores buffers and adapters; evict again if the real size went over.
                with self._room:
                    self._make_room(0, budget, for_model=name, parent=parent)
            return loaded

    def unload(self, name: str, *, forget: bool = False) -> int:
        """Stop the worker and free the weights; the model stays registered unless ``forget``. Returns bytes freed.

        A prefetch of the model queued before and not started yet is dropped: it would load the model back.
        """
        with self._pending_lock:
            queued = self._pending.pop(name, None)
        if queued is not None:
            queued.cancel()  # fails for one already running, which _prefetch_one stops before its load
        with self._lock_for(name):
            self._stop(name)
            freed = self.registry.unload(name, forget=forget)
        with self._room:
            self._room.notify_all()
        return freed

    def prepare(self, names: Iterable[str], label: str = "chain") -> dict[str, float]:
        """Under eager preloading, load the models in ``names`` that are not loaded, in parallel threads.

        Returns each loaded model's cold start (load + warm-up) in seconds; empty under other
        strategies. The loads are children of one ``prepare {label}`` span.
        """
        if not isinstance(self.strategy, Eager):
            return {}
        todo = [n for n in dict.fromkeys(names) if not self.registry.is_loaded(n)]
        if not todo:
            return {}
        with self._tracing.span(
            f"prepare {label}", attributes={attr.SPAN_KIND: attr.KIND_CHAIN, attr.PRELOADING: self.strategy.name}
        ) as span:
            if len(todo) == 1:
                loaded = [self.load(todo[0], parent=span, trigger="eager")]
            else:
                # Threads overlap file reads, host-to-device copies and allocation across models.
                with ThreadPoolExecutor(len(todo), thread_name_prefix="workbench-eager") as pool:
                    futures = [pool.submit(self.load, n, parent=span, trigger="eager") for n in todo]
                loaded = [f.result() for f in futures]
        return {m.name: m.cold_start_s for m in loaded}

    def hop_started(self, model: str | None, later: Iterable[str], hop: Span, root: Span) -> None:
        """Under prefetch, when a hop starts: load its own ``model`` here, then the ``later`` hops' models behind it.

        The hop's own model loads first and in this thread (a child of the ``hop`` span), so no
        background load competes with the one the hop waits for; the later models load in the
        background, children of the run's ``root`` span, while the hop computes. A load that
        fails is recorded on its span and left to the request that needs the model, which tries
        again and reports the error where it belongs, with the hop's retries and fallbacks.
        """
        if not self.prefetching:
            return
        if model is not None:
            try:
                self.load(model, parent=hop, trigger="on_use")
            except Exception:  # recorded on the load span; the hop's own request reports it
                log.debug("loading %r at the start of its hop failed", model, exc_info=True)
        self.prefetch([m for m in later if m != model], root)

    def prefetch(self, names: Iterable[str], parent: Span | None = None) -> None:
        """Under prefetch, start background loads of the registered models in ``names`` that are not loaded."""
        strategy = self.strategy
        if not isinstance(strategy, Prefetch):
            return
        known = set(self.registry.names())
        for name in names:
            if name not in known or self.registry.is_loaded(name):
                continue
            with self._pending_lock:
                if name in self._pending or self._closed:
                    continue
                self._pending[name] = self._pool_for(strategy.threads).submit(self._prefetch_one, name, parent)

    def close(self) -> None:
        """Stop prefetching: cancel queued prefetches and wait for the ones loading."""
        with self._pending_lock:
            self._closed = True
            pool, self._pool = self._pool, None
        with self._urgent_done:
            self._urgent_done.notify_all()  # a prefetch holding back gives up
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- use, for least-recently-used eviction ------------------------------------------------

    def begin_use(self, name: str) -> None:
        """A request for ``name`` is on its way: until :meth:`end_use`, keep-warm will not evict it."""
        with self._room:
            self._busy[name] += 1
            # Touched on arrival too: a caller that reads its result may ask for the next model
            # before the serving thread gets to end_use, and the LRU order must already be right.
            self.registry.usage.touch(name)

    def end_use(self, name: str) -> None:
        """A request for ``name`` was served (or failed): it counts as the model's latest use."""
        with self._room:
            self._busy[name] -= 1
            if self._busy[name] <= 0:
                del self._busy[name]
            self.registry.usage.touch(name)
            self._room.notify_all()

    # -- internals -----------------------------------------------------------------------------

    def _lock_for(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(name, threading.Lock())

    def _pool_for(self, threads: int) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_threads != threads:
            if self._pool is not None:
                self._pool.shutdown(wait=False)  # its loads finish on their own threads
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="workbench-prefetch")
            self._pool_threads = threads
        return self._pool

    def _prefetch_one(self, name: str, parent: Span | None) -> None:
        # The model a request waits for loads first: loads share the disk, the host-to-device
        # link, the CPU and the GIL, so a prefetch beside it would only slow the critical path.
        with self._urgent_done:
            self._urgent_done.wait_for(lambda: self._urgent == 0 or self._closed, timeout=ROOM_TIMEOUT_S)
        try:
            with self._pending_lock:
                wanted = name in self._pending and not self._closed  # else an unload since dropped it
            if wanted:
                self.load(name, parent=parent, trigger="prefetch")
        except Exception:  # recorded on the load span; the hop that needs the model raises it
            log.debug("prefetching %r failed", name, exc_info=True)
        finally:
            with self._pending_lock:
                self._pending.pop(name, None)

    def check_budget(self, name: str, budget: int, settings: LoadSettings | None = None) -> int:
        """The bytes ``name`` needs loaded (with ``settings``, else as registered); ModelLoadError if that alone is
        more than a keep-warm ``budget``."""
        need = self.registry.estimate_bytes(name, settings or self.registry.settings(name))
        if need > budget:
            raise ModelLoadError(
                f"model {name!r} needs about {need / 2**20:.1f} MiB, more than the whole keep-warm budget "
                f"of {format_bytes(budget)}",
                hint="raise the budget (bench.set_preloading(wb.KeepWarm('...'))), load it in a smaller dtype, "
                "or use another preloading strategy",
            )
        return need

    def _reserve(self, name: str, settings: LoadSettings, budget: int, parent: Span | None) -> None:
        need = self.check_budget(name, budget, settings)
        with self._room:
            self._make_room(need, budget, for_model=name, parent=parent)
            self._reserved[name] = need

    def _make_room(
        self, need: int, budget: int, for_model: str | None, parent: Span | None, wait: bool = True
    ) -> list[str]:
        """Evict idle models, least recently used first, until ``need`` more bytes fit; holds ``_room``.

        An idle model that :attr:`keep_loaded` says must stay is passed over (said once in a warning). Waits (up to
        ROOM_TIMEOUT_S) for a busy model to finish where evicting the idle ones is not enough, and fails at once where
        only models that must stay hold the room; without ``wait``, returns the busy models that keep it over the
        budget instead (empty where nothing is busy).
        """
        deadline = time.monotonic() + ROOM_TIMEOUT_S
        while True:
            loaded = {m.name: m.memory_bytes for m in self.registry.loaded()
                      if self._confined is None or m.name in self._confined}
            if sum(loaded.values()) + sum(self._reserved.values()) + need <= budget:
                return []
            idle = [n for n in self.registry.usage.least_recent_first(loaded) if n != for_model and not self._busy[n]]
            kept: dict[str, str] = {}
            for candidate in idle:
                why = self._why_kept(candidate)
                if why is None:
                    self._evict(candidate, budget, for_model, parent)
                    break
                kept[candidate] = why
            else:
                if not wait:
                    return sorted(n for n in loaded if self._busy[n])
                where = (f"no room within the keep-warm budget of {format_bytes(budget)}"
                         + (f" to load {for_model!r}" if for_model and for_model not in loaded else ""))
                staying = "; ".join(f"{n!r} stays loaded: {why}" for n, why in kept.items())
                if kept and not self._reserved and not any(self._busy[n] for n in loaded if n != for_model):
                    # Nothing to wait for: no request ends, and no load finishes, that would free the room.
                    raise ModelLoadError(f"{where}: {staying}",
                                         hint="raise the budget, or unload one of them (bench.unload(NAME))")
                left = deadline - time.monotonic()
                if left <= 0 or not self._room.wait(timeout=left):
                    busy = sorted(n for n in loaded if self._busy[n] or n == for_model) + sorted(self._reserved)
                    raise ModelLoadError(
                        f"{where}: the models using it ({', '.join(busy)}) stayed busy for {ROOM_TIMEOUT_S:.0f} s"
                        + (f"; {staying}" if kept else ""),
                        hint="raise the budget, or run fewer models at once",
                    )

    def _why_kept(self, name: str) -> str | None:
        """Why the idle model ``name`` must stay (:attr:`keep_loaded`), said once in a warning; None: it may go."""
        why = self.keep_loaded(name)
        if why is not None and (name, why) not in self._kept_said:
            self._kept_said.add((name, why))
            log.warning("keep-warm keeps model %r loaded though it is idle: %s", name, why)
        return why

    def _evict(self, name: str, budget: int, for_model: str | None, parent: Span | None) -> None:
        attributes: dict[str, object] = {
            attr.SPAN_KIND: attr.KIND_CHAIN,
            attr.MODEL_NAME: name,
            attr.PRELOADING: self.strategy.name,
            attr.BUDGET_BYTES: budget,
        }
        if for_model is not None:
            attributes[attr.EVICTED_FOR] = for_model
        with self._tracing.span(f"evict {name}", parent, attributes) as span:
            self._stop(name)
            span.set_attribute(attr.MODEL_MEMORY_BYTES, self.registry.unload(name))
