"""The model registry: load, register, unload and describe local causal LMs."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

import torch
from opentelemetry.trace import Span

from workbench.errors import ModelLoadError, UnknownModelError
from workbench.models import heap, remote
from workbench.models.adapters import ADAPTER_WEIGHTS, AdapterRules, AdapterSet, inspect_adapter, relative_note
from workbench.models.devices import dtype_name, resolve_device, resolve_dtype
from workbench.models.fingerprint import model_identity
from workbench.models.remote import REMOTE_DEVICE
from workbench.models.settings import LoadSettings, is_server_url
from workbench.tracing import Tracing
from workbench.tracing import attributes as attr_names

if TYPE_CHECKING:
    import pandas as pd

# Where a model runs: in this process (its worker is a thread), or in a child process of its own.
ISOLATIONS = ("thread", "process")


class IsolatedModel(Protocol):
    """A model loaded in a child process, as the registry keeps it: what the child reported, and how to end it."""

    pid: int | None  # None while a restarted child loads
    device: str
    dtype: str
    params: int
    memory_bytes: int
    warmup_s: float
    context_window: int | None

    def close(self) -> None: ...


# Starts a child process that loads ``settings`` as the model ``name``; the engine provides it.
Spawner = Callable[[str, LoadSettings], IsolatedModel]


@dataclass
class LoadedModel:
    """A model in memory with its tokenizer, and what it cost to get it there.

    A model behind a server (``settings.remote``) has no weights here: ``model`` is None, ``device``
    is ``"remote"``, ``dtype`` and ``params`` are unknown (None), ``memory_bytes`` 0 (none of this
    machine's), and ``tokenizer`` is the served model's own where one is on this machine, else None.
    """

    name: str
    settings: LoadSettings
    model: Any
    tokenizer: Any
    device: torch.device | str
    dtype: torch.dtype | None
    params: int | None
    memory_bytes: int
    load_s: float
    context_window: int | None
    warmup_s: float = 0.0
    loaded_at: float = field(default_factory=time.time)
    # The named LoRA adapters on ``model`` (``settings.adapters``), which hops pick by name; None without any.
    adapters: AdapterSet | None = None
    # What its answers depend on, for cache keys (fingerprint.py): taken as its files are when it has just loaded,
    # since a directory rewritten later (the next checkpoint saved in place) no longer holds the weights in memory.
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.identity:
            # A Ray model's weights are in its actors: its dtype here is unknown (None), so the setting stands in.
            dtype = self.settings.dtype if self.dtype is None else dtype_name(self.dtype)
            self.identity = model_identity(self.settings, str(self.device), dtype)

    @property
    def source(self) -> str:
        return self.settings.source

    @property
    def cold_start_s(self) -> float:
        """What the model cost before it could serve at full speed: load plus warm-up."""
        return self.load_s + self.warmup_s


def on_device(loaded: LoadedModel, device: str) -> LoadedModel:
    """``loaded`` as a replica on ``device``: the same model where it already is, else a copy of its weights there.

    Replicas on one device share one model: inference only reads the weights, so worker threads
    may run it at once, and a second copy would only take memory. The copy's memory is not in
    the registry's count (keep-warm budgets see one copy per model).
    """
    import copy

    target = resolve_device(device)
    if target == loaded.device:
        return loaded
    model = copy.deepcopy(loaded.model).to(target)
    model.eval()
    return dataclasses.replace(loaded, model=model, device=target)


class UsageClock:
    """When each model last served a request: keep-warm evicts the least recent first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ticks = itertools.count()  # orders touches that the wall clock cannot tell apart
        self._last: dict[str, tuple[int, float]] = {}

    def touch(self, name: str) -> None:
        with self._lock:
            self._last[name] = (next(self._ticks), time.time())

    def last_used(self, name: str) -> float | None:
        """Wall-clock time (seconds since the epoch) of the last use, or None if never used."""
        with self._lock:
            entry = self._last.get(name)
        return entry[1] if entry else None

    def least_recent_first(self, names: Iterable[str]) -> list[str]:
        with self._lock:
            return sorted(names, key=lambda n: self._last.get(n, (-1, 0.0))[0])

    def forget(self, name: str) -> None:
        with self._lock:
            self._last.pop(name, None)


class ModelRegistry:
    """Models by name: every known one with its settings, and the loaded ones in memory."""

    def __init__(self, tracing: Tracing) -> None:
        self._tracing = tracing
        self.spawner: Spawner | None = None  # loads isolation="process" models; the engine sets it (it owns backends)
        self._lock = threading.RLock()
        self._loaded: dict[str, LoadedModel] = {}
        self._registered: dict[str, LoadSettings] = {}  # every known model, loaded or not
        self._measured: dict[str, tuple[LoadSettings, int]] = {}  # bytes each model took when last loaded
        self.usage = UsageClock()

    # -- queries -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every name a chain may use: loaded and registered models."""
        with self._lock:
            return sorted({*self._loaded, *self._registered})

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._loaded

    def loaded(self) -> list[LoadedModel]:
        """The models in memory, in load order."""
        with self._lock:
            return list(self._loaded.values())

    def loaded_as(self, name: str, settings: LoadSettings) -> LoadedModel | None:
        """The model loaded as ``name``, if it loaded with ``settings`` from files as they are now (a notebook's load
        cell run again); else None."""
        with self._lock:
            loaded = self._loaded.get(name)
        # Not a server's model: what it serves now is only known by asking the server.
        if loaded is None or loaded.settings != settings or loaded.settings.remote:
            return None
        dtype = loaded.settings.dtype if loaded.dtype is None else dtype_name(loaded.dtype)
        return loaded if model_identity(settings, str(loaded.device), dtype) == loaded.identity else None

    def check_free(self, name: str) -> None:
        """Refuse to load a second model under a name that is loaded."""
        with self._lock:
            if name in self._loaded:
                raise ModelLoadError(
                    f"a model named {name!r} is already loaded (from {self._loaded[name].source})",
                    hint=f"pick another name, or bench.unload({name!r}) first",
                )

    def estimate_bytes(self, name: str, settings: LoadSettings) -> int:
        """Bytes ``settings`` will take once loaded: as measured last time, else from the safetensors headers.

        A header estimate counts weights only, not buffers or an adapter; 0 when neither is
        known (a hub id not loaded yet). Keep-warm settles the difference after the load.
        """
        if settings.engine == "ray":
            return 0  # the weights live in the Ray actors, not in this process
        with self._lock:
            measured = self._measured.get(name)
        if measured is not None and measured[0] == settings:
            return measured[1]
        path = Path(os.path.expanduser(settings.source))
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            return 0
        itemsize = torch.empty((), dtype=resolve_dtype(settings.dtype, resolve_device(settings.device))).element_size()
        return sum(_safetensors_numel(f) for f in files) * itemsize

    def get(self, name: str) -> LoadedModel:
        """The loaded model called ``name``; a clear error (with near names) if there is none."""
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            if name in self._registered:
                raise UnknownModelError(
                    f"model {name!r} is registered but not loaded", hint=f"load it: bench.load({name!r})"
                )
        raise self.unknown(name)

    def unknown(self, name: str) -> UnknownModelError:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        hint += f"known models: {', '.join(known)}" if known else "no model is loaded yet: bench.load(NAME, PATH)"
        return UnknownModelError(f"no model named {name!r}", hint=hint)

    def adapters(self) -> dict[str, list[str]]:
        """Each known model's named adapters: those it loads with, and any a watch added since."""
        with self._lock:  # one moment's models: an unload between listing and reading one is not a KeyError
            known = {name: [n for n, _ in self.settings(name).adapters] for name in self.names()}
            for loaded in self._loaded.values():
                if loaded.adapters is not None:
                    known[loaded.name] = sorted({*known.get(loaded.name, ()), *loaded.adapters.names()})
        return known

    def settings(self, name: str) -> LoadSettings:
        with self._lock:
            if name in self._loaded:
                return self._loaded[name].settings
            if name in self._registered:
                return self._registered[name]
        raise self.unknown(name)

    def table(self) -> pd.DataFrame:
        """One row per known model: name, source, device, dtype, params, memory, load_s, state, cold start, last use."""
        import pandas as pd

        columns = ["name", "source", "adapter", "device", "dtype", "isolation", "params", "memory_mb", "load_s",
                   "state", "cold_start_s", "last_used"]

        def last_used(name: str) -> pd.Timestamp | None:
            used = self.usage.last_used(name)
            return None if used is None else pd.Timestamp(used, unit="s", tz="UTC")

        with self._lock:
            rows = [
                {
                    "name": m.name,
                    "source": m.source,
                    "adapter": m.settings.adapter or ",".join(n for n, _ in m.settings.adapters) or None,
                    "device": str(m.device),
                    "dtype": dtype_name(m.dtype) if m.dtype is not None else None,
                    "isolation": m.settings.isolation,
                    "params": m.params,
                    "memory_mb": None if m.settings.remote else round(_memory_now(m) / 2**20, 2),
                    "load_s": round(m.load_s, 3),
                    "state": "loaded",
                    "cold_start_s": round(m.cold_start_s, 3),
                    "last_used": last_used(m.name),
                }
                for m in self._loaded.values()
            ]
            rows += [
                {"name": n, "source": s.source, "adapter": s.adapter, "device": s.device, "dtype": s.dtype,
                 "isolation": s.isolation, "params": None, "memory_mb": None, "load_s": None, "state": "registered",
                 "cold_start_s": None,
                 "last_used": last_used(n)}
                for n, s in self._registered.items()
                if n not in self._loaded
            ]
        # Whole numbers stay whole when a registered model has none yet.
        return pd.DataFrame(rows, columns=columns).astype({"params": "Int64"})

    # -- changes -----------------------------------------------------------------------------

    def register(self, name: str, settings: LoadSettings) -> None:
        """Make ``name`` known to chains without loading it yet; settings a load would refuse are refused now, so a
        mistaken registration neither replaces a good one nor waits to fail on first use."""
        check_settings(settings)
        _check_placement(settings)
        with self._lock:
            if name in self._loaded:
                raise ModelLoadError(f"a model named {name!r} is already loaded", hint=f"bench.unload({name!r}) first")
            self._registered[name] = settings

    def load(
        self, name: str, settings: LoadSettings, parent: Span | None = None, trigger: str = "explicit"
    ) -> LoadedModel:
        """Load ``settings.source`` under ``name``; loading is a span, a child of ``parent`` where given.

        ``trigger`` says on the span why it loaded: explicit, on_use, prefetch or eager.
        """
        self.check_free(name)
        check_settings(settings)
        if settings.isolation == "process":
            return self._load_isolated(name, settings, parent, trigger)
        if settings.remote:
            return self._keep(name, settings, self._connect(name, settings, parent, trigger))
        if settings.engine == "ray":
            return self._keep(name, settings, self._load_tokenizer_only(name, settings, parent, trigger))
        return self._keep(name, settings, self._load_here(name, settings, parent, trigger))

    def _load_here(self, name: str, settings: LoadSettings, parent: Span | None, trigger: str) -> LoadedModel:
        """Load ``settings`` into this process (a ``load`` span), without making it the model of ``name`` yet."""
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        _check_source(settings)
        span_attrs = self._load_span_attributes(name, settings, trigger)
        with self._tracing.span(f"load {name}", parent, span_attrs) as span:
            span.set_attributes({attr_names.MODEL_DEVICE: str(device), attr_names.MODEL_DTYPE: dtype_name(dtype)})
            started = time.perf_counter()
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            model, tokenizer = _from_pretrained(settings, device, dtype)
            adapters = _named_adapters(model, tokenizer, device, settings) if settings.adapters else None
            if adapters is not None:
                model = adapters.model
                span.set_attribute(attr_names.ADAPTER_NAMES, [n for n, _ in settings.adapters])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                memory = torch.cuda.memory_allocated(device) - before
            else:
                memory = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
            if adapters is not None:
                adapters.counted_bytes = adapters.memory_bytes()
            load_s = time.perf_counter() - started
            params = sum(p.numel() for p in model.parameters())
            warmup_s = _warm_up(model, tokenizer, device) if settings.warmup else 0.0
            span.set_attributes(
                {
                    attr_names.MODEL_PARAMS: params,
                    attr_names.MODEL_MEMORY_BYTES: memory,
                    attr_names.LOAD_S: load_s,
                    attr_names.WARMUP_S: warmup_s,
                    attr_names.COLD_START_S: load_s + warmup_s,
                }
            )
            if settings.adapter:
                span.set_attribute(attr_names.MODEL_ADAPTER, settings.adapter)
        loaded = LoadedModel(
            name=name,
            settings=settings,
            model=model,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            params=params,
            memory_bytes=memory,
            load_s=load_s,
            warmup_s=warmup_s,
            context_window=_context_window(model.config, tokenizer),
            adapters=adapters,
        )
        return loaded

    def follow_adapter(self, name: str, adapter: str, path: str) -> None:
        """From now on model ``name`` loads its named adapter ``adapter`` from ``path`` (a watch follows it there),
        so a load after an unload or eviction serves what the watch serves, not what the first load read."""
        with self._lock:
            settings = self._registered[name]
            paths = {**dict(settings.adapters), adapter: path}  # in load order, a new name last
            self._registered[name] = dataclasses.replace(settings, adapters=tuple(paths.items()))

    def check_swappable(self, name: str) -> LoadedModel:
        """The loaded model ``name``, if a new version of its weights may be swapped in live; else ModelLoadError."""
        current = self.get(name)
        settings = current.settings
        if settings.isolation != "thread" or settings.remote or settings.engine != "local":
            raise ModelLoadError(f"model {name!r} is not loaded in this process, so it cannot be swapped live",
                                 hint="live swaps are for models loaded with isolation='thread', engine='local'")
        if settings.adapters:
            raise ModelLoadError(f"model {name!r} carries named adapters, which were trained on its present weights",
                                 hint="watch its adapters instead (bench.watch_adapter), or reload it")
        return current

    def load_beside(self, name: str, source: str, parent: Span | None = None) -> LoadedModel:
        """A new version of the loaded model ``name`` from ``source``, loaded beside it with its settings; not
        serving yet (:meth:`replace` makes it the model of ``name``). Only a model in this process can."""
        settings = self.check_swappable(name).settings
        return self._load_here(name, dataclasses.replace(settings, source=source), parent, "swap")

    def replace(self, name: str, new: LoadedModel) -> LoadedModel:
        """Make ``new`` the model of ``name`` and return the one it replaced, still in memory (:meth:`release`)."""
        with self._lock:
            old = self.get(name)
            self._loaded[name] = new
            self._registered[name] = new.settings
            self._measured[name] = (new.settings, new.memory_bytes)
        return old

    def release(self, loaded: LoadedModel) -> None:
        """Free a model that no longer serves (the version a swap replaced, or one that failed its checks)."""
        device = loaded.device
        _release(loaded)
        _free(device)

    def _load_tokenizer_only(self, name: str, settings: LoadSettings, parent: Span | None, trigger: str) -> LoadedModel:
        """Only the tokenizer of a model whose replicas load elsewhere (``engine="ray"``: Ray actors).

        Prompts are tokenized here and only token ids travel; the weights, their device and their
        memory are the actors' (``bench.replicas()`` shows each), so this process counts none.
        """
        _check_source(settings)
        span_attrs = {**self._load_span_attributes(name, settings, trigger), attr_names.MODEL_DEVICE: RAY_DEVICE}
        with self._tracing.span(f"load {name}", parent, span_attrs) as span:
            started = time.perf_counter()
            tokenizer = _load_tokenizer(settings)
            load_s = time.perf_counter() - started
            span.set_attribute(attr_names.LOAD_S, load_s)
        return LoadedModel(name=name, settings=settings, model=None, tokenizer=tokenizer, device=RAY_DEVICE, dtype=None,
                           params=None, memory_bytes=0, load_s=load_s, context_window=None)

    def _load_span_attributes(self, name: str, settings: LoadSettings, trigger: str) -> dict[str, Any]:
        return {
            attr_names.SPAN_KIND: attr_names.KIND_CHAIN,
            attr_names.MODEL_NAME: name,
            attr_names.MODEL_SOURCE: settings.source,
            attr_names.LOAD_TRIGGER: trigger,
            attr_names.MODEL_ISOLATION: settings.isolation,
        }

    def _load_isolated(self, name: str, settings: LoadSettings, parent: Span | None, trigger: str) -> LoadedModel:
        """Load ``settings`` in a child process (the engine's spawner), and only its tokenizer here.

        Device and dtype are resolved in the child, so this process never initialises CUDA. The
        load time is the whole wait here: starting Python, importing torch, loading, warming up.
        """
        if self.spawner is None:
            raise RuntimeError("isolation='process' needs the engine's spawner; load through a Workbench")
        _check_source(settings)
        with self._tracing.span(f"load {name}", parent, self._load_span_attributes(name, settings, trigger)) as span:
            started = time.perf_counter()
            tokenizer = _load_tokenizer(settings)
            process = self.spawner(name, settings)
            load_s = time.perf_counter() - started - process.warmup_s
            span.set_attributes(
                {
                    attr_names.MODEL_DEVICE: process.device,
                    attr_names.MODEL_DTYPE: process.dtype,
                    attr_names.MODEL_PARAMS: process.params,
                    attr_names.MODEL_MEMORY_BYTES: process.memory_bytes,
                    attr_names.PROCESS_PID: process.pid,
                    attr_names.LOAD_S: load_s,
                    attr_names.WARMUP_S: process.warmup_s,
                    attr_names.COLD_START_S: load_s + process.warmup_s,
                }
            )
        loaded = LoadedModel(
            name=name,
            settings=settings,
            model=process,
            tokenizer=tokenizer,
            device=torch.device(process.device),
            dtype=getattr(torch, process.dtype),
            params=process.params,
            memory_bytes=process.memory_bytes,
            load_s=load_s,
            warmup_s=process.warmup_s,
            context_window=process.context_window,
        )
        try:
            return self._keep(name, settings, loaded)
        except BaseException:
            process.close()
            raise

    def _keep(self, name: str, settings: LoadSettings, loaded: LoadedModel) -> LoadedModel:
        """Make ``loaded`` the model of ``name``, unless another thread loaded one under that name meanwhile."""
        with self._lock:
            if name in self._loaded:  # another thread won the race; keep theirs, free ours
                device = loaded.device
                _release(loaded)
                del loaded
                _free(device)
                raise ModelLoadError(f"a model named {name!r} was loaded meanwhile", hint="use a different name")
            self._loaded[name] = loaded
            self._registered[name] = settings
            self._measured[name] = (settings, loaded.memory_bytes)
        heap.settle()
        return loaded

    def _connect(self, name: str, settings: LoadSettings, parent: Span | None, trigger: str) -> LoadedModel:
        """A model behind an OpenAI-compatible server: ask the server what it serves; load no weights.

        The served model's tokenizer and config load from this machine where they are here (a
        directory, or a hub id in the Hugging Face cache), for the context-window check and token
        counts; without them the server's usage counts tokens and the window is what the server lists.
        """
        span_attrs = {**self._load_span_attributes(name, settings, trigger), attr_names.MODEL_DEVICE: REMOTE_DEVICE}
        with self._tracing.span(f"load {name}", parent, span_attrs) as span:
            started = time.perf_counter()
            try:
                listed = remote.list_models(settings)
                served = remote.pick_model(settings, listed)
            except ModelLoadError as exc:  # a replica of several says which it is
                raise ModelLoadError(f"model {name!r}: {exc.message}", hint=exc.hint) from exc.__cause__
            tokenizer, config = remote.local_tokenizer(served, settings)
            load_s = time.perf_counter() - started
            window = remote.listed_window(listed, served) or (_context_window(config, tokenizer) if tokenizer else None)
            span.set_attributes({attr_names.REMOTE_SERVED_MODEL: served, attr_names.LOAD_S: load_s,
                                 attr_names.COLD_START_S: load_s})
        settings = dataclasses.replace(settings, served_model=served)
        return LoadedModel(
            name=name, settings=settings, model=None, tokenizer=tokenizer, device=REMOTE_DEVICE, dtype=None,
            params=None, memory_bytes=0, load_s=load_s, context_window=window,
            identity=model_identity(settings, REMOTE_DEVICE, None, remote.listed_entry(listed, served)),
        )

    def replica(
        self, loaded: LoadedModel, place: str | None, name: str, parent: Span | None = None, trigger: str = "explicit"
    ) -> LoadedModel:
        """``loaded`` as its replica ``name`` at ``place``: itself (None), on a device here, or on a server (a URL).

        A server replica is the same model there: asked for with the load's ``served_model``, else
        the one model the server lists, and connected in a ``load {name}`` span as any server is.
        Where the server's model has no tokenizer on this machine, the loaded model's own counts its
        prompts. Neither a copy nor a server is in the registry's count of memory.
        """
        if place is None:
            return loaded
        if not is_server_url(place):
            # A child process loaded the weights on its one device (the first listed); it serves one replica.
            return loaded if loaded.settings.isolation == "process" else on_device(loaded, place)
        if loaded.settings.remote and remote.base_url(loaded.settings) == place.rstrip("/"):
            return loaded
        with self._lock:
            asked = self._registered.get(loaded.name, loaded.settings)  # served_model as given, not as found
        # The server runs the model in its own process, whatever isolation the weights here have.
        settings = dataclasses.replace(asked, source=place, isolation="thread")
        served = self._connect(name, settings, parent, trigger)
        if served.tokenizer is None and loaded.tokenizer is not None:
            served = dataclasses.replace(served, tokenizer=loaded.tokenizer,
                                         context_window=served.context_window or loaded.context_window)
        return served

    def unload(self, name: str, forget: bool = False) -> int:
        """Drop ``name`` from memory, keeping it registered unless ``forget``; returns the bytes its weights held."""
        with self._lock:
            if name not in self._registered:
                raise self.unknown(name)
            loaded = self._loaded.pop(name, None)
            if forget:
                del self._registered[name]
                self._measured.pop(name, None)
                self.usage.forget(name)
            if loaded is None:
                return 0
        freed, device = loaded.memory_bytes, loaded.device
        _release(loaded)
        del loaded
        _free(device)
        return freed


# Where a model's replicas run: workers in this process, or Ray actors (engine/backends/ray.py).
ENGINES = ("local", "ray")
RAY_DEVICE = "ray"  # a Ray model's device here: its weights are in its actors, each on a device bench.replicas() shows


def check_settings(settings: LoadSettings) -> None:
    """Refuse, with a ModelLoadError naming the setting, load settings that no load could take, whatever the
    machine: every load and registration checks them first, and a workbench configuration as it reads its file."""
    _check_isolation(settings)
    _check_engine(settings)
    _check_read_timeout(settings)
    _check_adapters(settings)


def _check_engine(settings: LoadSettings) -> None:
    if settings.engine not in ENGINES:
        raise ModelLoadError(
            f"engine must be one of {', '.join(map(repr, ENGINES))}, got {settings.engine!r}",
            hint="'local' serves the model from this process; 'ray' from Ray actors (pip install "
            "'autoglm-workbench[ray]')",
        )
    if settings.engine == "ray" and settings.isolation == "process":
        raise ModelLoadError("engine='ray' runs each replica in an actor, a process of its own already: "
                             "isolation='process' has nothing to add",
                             hint="drop isolation='process' to run on Ray, or drop engine='ray' for a child process on this "
                             "machine")
    if settings.engine == "ray" and settings.remote:
        raise ModelLoadError(f"{settings.source!r} is a model server, which serves itself: engine='ray' cannot run it",
                             hint="give engine='ray' a model directory or hub id, or drop it for the server")
    gpus, cpus = _amount(settings, "num_gpus"), _amount(settings, "num_cpus")
    if settings.engine != "ray" and (settings.address is not None or gpus or cpus != 1):
        raise ModelLoadError(
            f"address, num_gpus and num_cpus are settings of engine='ray', and this load has engine={settings.engine!r}",
            hint="add engine='ray' (--engine ray), or drop them",
        )


def _check_read_timeout(settings: LoadSettings) -> None:
    """A server's read timeout is a finite number of seconds > 0: NaN never timed out (a silent server held its
    requests for good), and 0 or less failed every request at once. Checked for any source: a replica set may mix
    local replicas and servers under one model's settings."""
    _check_seconds("read_timeout_s", settings.read_timeout_s,
                   "how long a server's stream may go without a byte, the first included (default 60)")


def _check_seconds(name: str, value: object, hint: str, least: float = 0.0) -> None:
    """A load setting of seconds is a finite number > 0 (and >= ``least`` where given): NaN never runs out, and 0 or
    less runs out at once."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf or value < least:
        bound = f">= {least:g}" if least else "> 0"
        raise ModelLoadError(f"{name} must be a finite number of seconds {bound}, got {value!r:.80}", hint=hint)


def _amount(settings: LoadSettings, name: str) -> float:
    """A resource count of ``settings`` (``num_gpus``, ``num_cpus``) as a number >= 0; a front end's flag is text."""
    value = getattr(settings, name)
    try:
        amount = float(value)
    except (TypeError, ValueError):
        amount = -1.0
    if isinstance(value, bool) or not amount >= 0:
        raise ModelLoadError(f"{name} must be a number >= 0, got {value!r}",
                             hint="what each replica's Ray actor asks of the cluster: 1, or 0.5 to share one")
    return amount


def _release(loaded: LoadedModel) -> None:
    """Let go of ``loaded``'s model: drop the references, or end the child process that holds it."""
    if loaded.settings.isolation == "process":
        loaded.model.close()
    loaded.adapters = None
    loaded.model = loaded.tokenizer = None


def check_successor(old: LoadedModel, new: LoadedModel, prompts: Iterable[str]) -> None:
    """Refuse ``new`` as the next version of ``old`` unless it is the same kind of model with the same
    vocabulary, and gives finite logits on ``prompts``; ModelLoadError says which check failed."""
    check_version(kind_of(old), new, prompts, f"the new version of model {old.name!r} (from {new.source})")


def kind_of(loaded: LoadedModel) -> dict[str, Any]:
    """What a new version of ``loaded`` must keep: its ``model_type`` and ``vocab_size``."""
    return {key: getattr(loaded.model.config, key, None) for key in ("model_type", "vocab_size")}


def check_version(kind: Mapping[str, Any], new: LoadedModel, prompts: Iterable[str], where: str) -> None:
    """Refuse ``new`` (described as ``where``) unless it is of ``kind`` (:func:`kind_of` the serving version) and gives
    finite logits on ``prompts``; ModelLoadError says which check failed."""
    for key, before in kind.items():
        after = getattr(new.model.config, key, None)
        if before != after:
            raise ModelLoadError(f"{where} has {key} {after!r}, the serving one {before!r}",
                                 hint="a live swap keeps the architecture and the vocabulary; load it under a new name")
    texts = list(prompts)
    if not texts:
        return
    encoded = new.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = new.model(input_ids=encoded["input_ids"].to(new.device),
                           attention_mask=encoded["attention_mask"].to(new.device)).logits
    if not bool(torch.isfinite(logits).all()):
        raise ModelLoadError(f"{where} gives non-finite logits (NaN or inf) on the golden prompts",
                             hint="its weights are damaged or diverged in training")


def _check_adapters(settings: LoadSettings) -> None:
    """Named adapters are served by the in-process transformers backend only, and not beside ``adapter``."""
    if not settings.adapters:
        return
    if settings.adapter:
        raise ModelLoadError("a load takes adapter=PATH (one adapter, always on) or adapters={NAME: PATH} (hops "
                             "pick one by name), not both", hint="put the one adapter in adapters= too")
    where = ("a child process (isolation='process')" if settings.isolation == "process" else
             "a model server" if settings.remote else "Ray actors (engine='ray')" if settings.engine == "ray" else None)
    if where is not None:
        raise ModelLoadError(f"named adapters are served in this process only, and this model runs in {where}",
                             hint="load it with isolation='thread' and engine='local', or serve the adapters "
                             "from the server itself")


def _memory_now(loaded: LoadedModel) -> int:
    """``loaded``'s memory as of now: as measured at load, with adapter versions attached or freed since."""
    adapters = loaded.adapters
    if adapters is None:
        return loaded.memory_bytes
    return loaded.memory_bytes + adapters.memory_bytes() - adapters.counted_bytes


def _named_adapters(model: Any, tokenizer: Any, device: torch.device, settings: LoadSettings) -> AdapterSet:
    """``model`` with every adapter of ``settings.adapters`` attached (version 1 each), each checked first."""
    adapters = AdapterSet(model, tokenizer, device)
    for adapter_name, path in settings.adapters:
        adapters.add(adapter_name, os.path.expanduser(path))
    adapters.model.eval()
    return adapters


def _check_placement(settings: LoadSettings) -> None:
    """Refuse a device or dtype no load of ``settings`` could use. A child process or a Ray actor resolves its own
    device (this process never initialises CUDA for it), so for those only the dtype's name is checked here."""
    if settings.remote:
        return
    here = settings.isolation == "thread" and settings.engine == "local"
    resolve_dtype(settings.dtype, resolve_device(settings.device) if here else torch.device("cpu"))


# The shortest hang_timeout_s: one decoding step of many a model, or a prefill, takes longer on a busy machine, and
# the child beats every quarter of it (1e-9 s made every batch look hung, the child beating without pause).
HANG_TIMEOUT_LEAST_S = 1.0


def _check_isolation(settings: LoadSettings) -> None:
    if settings.isolation not in ISOLATIONS:
        raise ModelLoadError(
            f"isolation must be one of {', '.join(map(repr, ISOLATIONS))}, got {settings.isolation!r}",
            hint="'thread' runs the model in this process; 'process' in a child process a crash cannot take this "
            "one down with",
        )
    if settings.isolation == "process" and settings.remote:
        raise ModelLoadError(
            f"{settings.source!r} is a model server: it runs in the server's process, not in one of ours",
            hint="drop isolation='process' for a server URL",
        )
    if isinstance(settings.restarts, bool) or not isinstance(settings.restarts, int) or settings.restarts < 0:
        raise ModelLoadError(
            f"restarts must be a whole number >= 0, got {settings.restarts!r}",
            hint="it is how often a model process that died is started again (0: never)",
        )
    if settings.hang_timeout_s is not None:
        _check_seconds("hang_timeout_s", settings.hang_timeout_s,
                       "how long a model process may go without ending a decoding step (default: no limit); set it "
                       "above the longest prefill", least=HANG_TIMEOUT_LEAST_S)
        if settings.isolation != "process":
            raise ModelLoadError(
                f"hang_timeout_s is a setting of isolation='process', and this load has isolation={settings.isolation!r}",
                hint="add isolation='process' (--isolation process), or drop hang_timeout_s")


def _free(device: torch.device | str) -> None:
    heap.collect()
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.empty_cache()


_DAMAGED_WEIGHTS = "a weights file is incomplete or damaged (an interrupted download or copy?): fetch or save it again"


def _safetensors_numel(path: Path) -> int:
    """How many weights a safetensors file holds, from its header alone; ModelLoadError if the header is damaged."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            # A damaged or hostile length would have us read (and allocate) up to 16 EiB.
            if not 0 < length <= path.stat().st_size - 8:
                raise ValueError(f"its header claims {length} bytes in a file of {path.stat().st_size}")
            header = json.loads(handle.read(length))
        return sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelLoadError(f"weights file {str(path)!r} has a damaged header: {type(exc).__name__}: {exc}"[:500],
                             hint=_DAMAGED_WEIGHTS) from None


def _warm_up(model: Any, tokenizer: Any, device: torch.device) -> float:
    """One tiny greedy generate, so allocator growth and kernel selection happen before the first request."""
    started = time.perf_counter()
    encoded = tokenizer("Hello", return_tensors="pt")
    with torch.inference_mode():
        model.generate(
            input_ids=encoded["input_ids"].to(device),
            attention_mask=encoded["attention_mask"].to(device),
            max_new_tokens=2,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _check_source(settings: LoadSettings) -> None:
    """Refuse what is clearly not a model, and pickle weights (the model's or its adapter's) unless allowed."""
    adapter = Path(os.path.expanduser(settings.adapter)) if settings.adapter else None
    if adapter is not None and not adapter.exists() and _looks_local(str(settings.adapter), adapter):
        raise ModelLoadError(f"adapter {settings.adapter!r} does not exist{relative_note(adapter)}",
                             hint="give the folder that save_pretrained wrote, or a hub id like 'org/name'")
    if adapter is not None and adapter.is_dir() and not settings.allow_pickle and _only_pickle(adapter):
        raise ModelLoadError(
            f"adapter {settings.adapter!r} has only pickle weights (.bin/.pt), which can run code when loaded",
            hint="convert them to safetensors, or pass allow_pickle=True if you trust their author",
        )
    path = Path(os.path.expanduser(settings.source))
    if not _looks_local(settings.source, path):
        _check_hub_id(settings)
        return
    if not path.is_dir():
        raise ModelLoadError(
            f"{settings.source!r} does not exist{relative_note(path)}" if not path.exists()
            else f"{settings.source!r} is not a directory",
            hint="give the directory that holds config.json and the weights, or a hub id like 'org/name'",
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{settings.source!r} is not a model directory: it has no config.json",
            hint="point at the folder that save_pretrained wrote",
        )
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = _pickle_files(path)
    if _only_pickle(path) and not settings.allow_pickle:
        raise ModelLoadError(
            f"{settings.source!r} has only pickle weights (.bin/.pt), which can run code when loaded",
            hint="convert them to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust their author",
        )
    if not has_safetensors and not has_pickle:
        raise ModelLoadError(f"{settings.source!r} has a config.json but no weights", hint="is the download complete?")


def _looks_local(text: str, path: Path) -> bool:
    """Whether a source or adapter names a folder here rather than a hub id."""
    return (path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1
            or Path(path.parts[0]).is_dir())  # 'models/x' where ./models exists means a folder, not a hub id


def _check_hub_id(settings: LoadSettings) -> None:
    """Refuse at once a hub id that is not in the local cache while the hub cannot be reached.

    Otherwise huggingface_hub retries for most of a minute before saying so, and a mistyped
    relative path ('model/tiny' for 'models/tiny') looks exactly like a hub id.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    source = settings.source
    try:
        if isinstance(try_to_load_from_cache(source, "config.json", revision=settings.revision), str):
            return
    except HFValidationError:
        raise ModelLoadError(f"{source!r} is neither a local directory nor a hub id like 'org/name'",
                             hint=f"check the path (relative paths start at {os.getcwd()})") from None
    host = urlparse(constants.ENDPOINT)
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if reason is None:
        try:
            socket.create_connection((host.hostname, host.port or 443), timeout=3).close()
        except OSError as exc:
            reason = f"{host.hostname} cannot be reached ({exc.strerror or exc})"
    if reason is not None:
        raise ModelLoadError(
            f"{source!r} is not a local directory, and as a hub id it is not in the Hugging Face cache while {reason}",
            hint=f"check the path (relative paths start at {os.getcwd()}); a hub model must be downloaded once online",
        )


def _pickle_files(path: Path) -> bool:
    return any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))


def _only_pickle(path: Path) -> bool:
    return _pickle_files(path) and not any(path.glob("*.safetensors"))


_bars_lock = threading.Lock()
_quiet_loads = 0  # loads running now; the last one to finish turns the bars back on
_bars_were_on = False


@contextmanager
def _progress_bars_off() -> Iterator[None]:
    """Hide transformers' progress bars while any load runs; loads in parallel threads share one switch."""
    from transformers.utils import logging as hf_logging

    global _quiet_loads, _bars_were_on
    with _bars_lock:
        if _quiet_loads == 0:
            _bars_were_on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
        _quiet_loads += 1
    try:
        yield
    finally:
        with _bars_lock:
            _quiet_loads -= 1
            if _quiet_loads == 0 and _bars_were_on:
                hf_logging.enable_progress_bar()


def _from_pretrained(settings: LoadSettings, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    source = os.path.expanduser(settings.source)
    common: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code, "revision": settings.revision}
    tokenizer = _load_tokenizer(settings)
    try:
        with _progress_bars_off():
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, use_safetensors=None if settings.allow_pickle else True, **common
            )
    except Exception as exc:  # transformers and safetensors each raise their own kinds; all end here
        raise _load_error(settings, exc) from exc
    if settings.adapter:
        model = _with_adapter(model, settings)
    model.to(device)
    model.eval()
    return model, tokenizer


def _load_tokenizer(settings: LoadSettings) -> Any:
    """Only the tokenizer of ``settings.source``: what a process needs to tokenize for a model loaded elsewhere."""
    from transformers import AutoTokenizer

    source = os.path.expanduser(settings.source)
    try:
        with _progress_bars_off():
            tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=settings.trust_remote_code, revision=settings.revision
            )
    except Exception as exc:
        raise _load_error(settings, exc, tokenizer=True) from exc
    return _prepared_tokenizer(tokenizer)


def _prepared_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token_id is None:
        # Many causal LMs ship without a pad token; EOS is the conventional stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# Most often a directory that model.save_pretrained wrote, without tokenizer.save_pretrained.
_NO_TOKENIZER = ("a model directory holds its tokenizer's files beside config.json (tokenizer.json, or tokenizer.model "
                 "or vocab files): write them with tokenizer.save_pretrained(DIR), or copy them from the base model")


def _load_error(settings: LoadSettings, exc: Exception, tokenizer: bool = False) -> ModelLoadError:
    """The ModelLoadError for whatever transformers, safetensors or peft raised while loading ``settings`` (its
    ``tokenizer`` alone, where that is what failed)."""
    kind = type(exc).__name__
    if "trust_remote_code" in str(exc):  # transformers refused to run the repository's own Python code
        hint = (
            "the model needs its repository's Python code; read it, and pass trust_remote_code=True"
            " (--trust-remote-code) only if you trust its author"
        )
    elif "Could not import module" in str(exc):  # transformers' lazy modules, once an import of theirs broke off
        hint = ("transformers is half imported in this process (was its first import interrupted, by Ctrl-C say?); "
                "restart the kernel, then load again")
    elif "Safetensor" in kind:
        hint = _DAMAGED_WEIGHTS
    elif isinstance(exc, FileNotFoundError) and not tokenizer:  # a shard the index lists is not there
        hint = ("a file that the checkpoint's index (model.safetensors.index.json) names is missing: is the download "
                "or copy complete? fetch the missing shards again")
    elif "Validation" in kind or isinstance(exc, TypeError):
        hint = "config.json holds a value of the wrong type: compare it with the model's original config.json"
    elif tokenizer:
        hint = _NO_TOKENIZER
    else:
        hint = "check the path or hub id; on an offline machine, hub ids must already be in the HF cache"
    # The config's and the repository code's failures come first from the tokenizer's load too: they are the model's.
    what = f"the tokenizer of {settings.source!r}" if hint == _NO_TOKENIZER else repr(settings.source)
    return ModelLoadError(f"could not load {what}: {_said(exc)}", hint=hint)


def _said(exc: Exception) -> str:
    """What a library's exception says, for a ModelLoadError: its kind and the first two lines of its message."""
    said = " ".join(line.strip() for line in str(exc).splitlines()[:2] if line.strip())[:400]
    return f"{type(exc).__name__}: {said}" if said else type(exc).__name__


# Where a LoRA adapter loaded onto a model it was not trained for: peft's words, and what they mean.
_OTHER_BASE = "load it on the model it was trained on"
_ADAPTER_HINTS = (
    ("size mismatch", f"its weights have other shapes than this base model's layers: {_OTHER_BASE}"),
    ("not found in the base model", f"its target_modules are not modules of this base model: {_OTHER_BASE}"),
)


def _with_adapter(model: Any, settings: LoadSettings) -> Any:
    """``model`` with the always-on adapter of ``settings`` attached; ModelLoadError names the adapter if it fails."""
    try:
        from peft import PeftModel
    except ImportError as exc:  # pragma: no cover - peft is a declared dependency
        raise ModelLoadError("LoRA adapters need peft", hint="pip install peft") from exc
    adapter = str(settings.adapter)
    path = Path(os.path.expanduser(adapter))
    if not path.exists() and not settings.allow_pickle:
        path = _hub_adapter(adapter)  # its safetensors only: given the hub id, peft falls back to torch.load of a .bin
    if path.exists() and not (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter!r} is not a PEFT adapter directory: no adapter_config.json",
                             hint="point at the folder that save_pretrained wrote")
    if (path / ADAPTER_WEIGHTS).is_file():
        # The checks named adapters get (rank, shapes, linear layers): peft itself loads weights for a layer the
        # config does not adapt without a word, and the adapter then does less than it was trained to.
        inspect_adapter(path, model, AdapterRules())
    try:
        with _progress_bars_off():
            return PeftModel.from_pretrained(model, str(path) if path.exists() else adapter)
    except Exception as exc:  # peft, safetensors and huggingface_hub each raise their own kinds; all end here
        text = str(exc)
        hint = next((h for words, h in _ADAPTER_HINTS if words in text),
                    _DAMAGED_WEIGHTS if "Safetensor" in type(exc).__name__ else
                    "give the folder that save_pretrained wrote for this base model, or a hub id like 'org/name'")
        raise ModelLoadError(f"could not load adapter {adapter!r} onto {settings.source!r}: {_said(exc)}",
                             hint=hint) from exc


def _hub_adapter(adapter: str) -> Path:
    """The folder in the Hugging Face cache of hub adapter ``adapter``, with its config and safetensors weights
    fetched; ModelLoadError if it has no safetensors weights (pickle ones need allow_pickle)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(adapter, "adapter_config.json")
    except Exception as exc:  # not on the hub, not cached while offline, not a hub id: huggingface_hub's own kinds
        raise ModelLoadError(f"could not load adapter {adapter!r}: {_said(exc)}",
                             hint="give the folder that save_pretrained wrote, or a hub id like 'org/name'") from exc
    try:
        return Path(hf_hub_download(adapter, ADAPTER_WEIGHTS)).parent
    except EntryNotFoundError:
        raise ModelLoadError(
            f"adapter {adapter!r} has no {ADAPTER_WEIGHTS} (in the Hugging Face cache or on the hub): pickle weights "
            "(.bin) can run code when loaded",
            hint="convert them to safetensors, or pass allow_pickle=True (--allow-pickle) if you trust their author",
        ) from None


def _context_window(config: Any, tokenizer: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None
