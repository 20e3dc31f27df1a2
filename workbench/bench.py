"""The Workbench: one registry, engine, tracer, context store and event loop, and the kernel's default one."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from workbench import _gateway
from workbench.chains.cache import CACHE_FILE, ResponseCache
from workbench.chains.chain import Chain
from workbench.chains.configfile import LiveConfig
from workbench.chains.context import ContextStore, RunRecord, SessionLimits, SessionWrites
from workbench.chains.host import HOP_THREADS
from workbench.chains.live import DEFAULT_INTERVAL_S, read_text
from workbench.chains.run import Run
from workbench.chains.events import Event
from workbench.chains.runner import INTERRUPTED_RUNS, Runner, RunKeeper, check_session, lending
from workbench.chains.spec import ChainSpec, check_chain_name, parse_spec
from workbench.chains.sqlite_store import SESSIONS_FILE, SQLiteContextStore, data_root
from workbench.engine import BatchingPolicy, Engine, GenerationParams, GenerationResult
from workbench.engine.backends.process import ProcessBackend
from workbench.engine.backends.ray import RayBackend
from workbench.engine.backends.ray import release as release_ray
from workbench.engine.backends.transformers import TransformersBackend
from workbench.engine.balancing import BalancePolicy, parse_balance
from workbench.engine.faults import Faults
from workbench.engine.prober import HealthChecks
from workbench.engine.replicas import REPLICA_NAME
from workbench.engine.batching import POLICY_FORMS, parse_policy
from workbench.errors import AdapterError, HopFailed, InvalidInput, ModelLoadError, SettingsError, StrategyError, WorkbenchClosed, WorkbenchError, did_you_mean
from workbench.knowledge import GraphStore, KnowledgeGraph, resolve
from workbench.models import heap
from workbench.engine.preloading import Eager, PreloadingStrategy, parse_preloading
from workbench.models.adapters import (
    GOLDEN_PROMPTS,
    AdapterRules,
    AdapterSet,
    AdapterVersion,
    LATER,
    DirectoryWatcher,
    content_digest,
    inspect_adapter,
    parse_adapters,
)
from workbench.models.registry import LoadedModel, LoadSettings, ModelRegistry, check_successor, check_version, kind_of
from workbench.models.remote import REMOTE_DEVICE
from workbench.models.settings import is_server_url
from workbench.tracing import Trace, Tracing
from workbench.tracing import attributes as attr
from opentelemetry.trace import Status, StatusCode

if TYPE_CHECKING:
    import pandas as pd

    from workbench.engine.replicas import ReplicaSet

log = logging.getLogger(__name__)

MAX_RUNS_KEPT = 10_000
MAX_MODEL_NAME_CHARS = 200
# And at most about this many bytes of their inputs and outputs: a served chain's runs of 1 MB inputs each held 10 GB.
MAX_RUN_BYTES_KEPT = 256 * 2**20
# Threads for the runs' own short work (session stores, the response cache, preparing prompts; see __init__).
IO_THREADS = 8
# How often a thread waiting on the loop returns to Python: a Ctrl-C is only seen between bytecodes.
_POLL_S = 0.1

T = TypeVar("T")


class Session:
    """A named conversation: runs that share history across calls."""

    def __init__(self, writes: SessionWrites, session_id: str) -> None:
        self.id = session_id
        self._writes = writes

    def records(self) -> list[RunRecord]:
        """The session's runs, oldest first."""
        return self._writes.store.history(self.id)

    def forget(self) -> int:
        """Delete the session's runs from the store, so its next run starts with no history; returns how many.

        A run of the session in flight now finishes and returns as usual, but is not kept in the session: it was
        built on the history forgotten. Other kernels on the same ``data_dir`` lose the runs too. The workbench's own
        record of the runs (``bench.runs()``, their traces) stays.
        """
        return self._writes.forget(self.id)

    def history(self) -> pd.DataFrame:
        """The session's runs as a table, oldest first."""
        import pandas as pd

        return pd.DataFrame(
            [
                {"run_id": r.run_id, "chain": r.chain, "status": r.status, "duration_ms": r.duration_ms,
                 **{f"input.{k}": v for k, v in r.inputs.items()}, "output": r.output, "error": r.error}
                for r in self.records()
            ]
        )


class Workbench:
    """Loads models, builds chains, runs them, and keeps every run's trace.

    ``otlp_endpoint`` also exports spans to an OTLP/HTTP collector such as Phoenix or Jaeger; in
    Phoenix, runs land in the project ``project_name`` and the engine's loads, batches and health
    probes in ``{project_name}-engine``. :meth:`close` waits up to ``otlp_close_timeout_s`` for the
    endpoint to take the last spans, and says which it did not.
    Sessions persist in ``data_dir`` (default ``$AUTOGLM_DATA_DIR``, else
    ``~/.local/share/autoglm-workbench``), in the SQLite file ``sessions.sqlite3``, so a kernel
    restart keeps them; ``store=InMemoryContextStore()`` keeps them in memory instead. ``session_limits`` bound what
    the store keeps (:class:`SessionLimits`; by default no bound).
    ``health_interval_s`` probes every loaded model that often (off by default; see
    :meth:`set_health_checks`). ``allow_modules`` lets chain specs call into these modules
    (and their submodules) besides your own code; see :meth:`allow_modules`.
    """

    def __init__(
        self,
        *,
        otlp_endpoint: str | None = None,
        otlp_close_timeout_s: float = 2.0,
        project_name: str = "autoglm-workbench",
        store: ContextStore | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        hop_threads: int = 64,
        health_interval_s: float | None = None,
        allow_modules: Collection[str] = (),
        session_limits: SessionLimits | None = None,
    ) -> None:
        self.tracing = Tracing(otlp_endpoint, project_name=project_name, close_timeout_s=otlp_close_timeout_s)
        self.registry = ModelRegistry(self.tracing)
        self.engine = Engine(self.registry, self.tracing)
        self.data_dir = data_root(data_dir)
        self.store = store if store is not None else SQLiteContextStore(self.data_dir / SESSIONS_FILE)
        if session_limits is not None:
            self.set_session_limits(session_limits)
        # Python hops run the user's code, which may block (an API, a lock) for as long as it likes; the workbench's
        # own short work (session history, run records, the response cache, preparing prompts) has threads of its
        # own, so hops that take every hop thread hold up only other Python hops.
        self._hop_pool = ThreadPoolExecutor(max_workers=hop_threads, thread_name_prefix=HOP_THREADS)
        self._io_pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="workbench-io")
        self.graphs = GraphStore()  # knowledge hops' graphs, each loaded once
        # The exact response cache of ``cache: exact`` hops, in the data directory (opened on first use).
        self.cache = ResponseCache(self.data_dir / CACHE_FILE)
        self._runner = Runner(self.engine, self.tracing, self.store, self._hop_pool, self._io_pool,
                              graphs=self.graphs, cache=self.cache)
        self._in_flight = 0  # runs walking on the loop now (only the loop thread changes it)
        self._loop: asyncio.AbstractEventLoop | None = None  # chains walk here, on its own thread, from first use
        self._loop_thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()
        self._closed = False
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._run_bytes: dict[str, int] = {}  # each kept run's inputs and outputs, roughly (see _weight)
        self._runs_lock = threading.Lock()
        self._kept_bytes = 0
        self._chains: dict[str, Chain] = {}
        self._servers: list[Any] = []  # started by serve(); close() stops them
        self._built: weakref.WeakSet[Chain] = weakref.WeakSet()  # every chain, so close() stops their watchers
        self._configs: list[LiveConfig] = []
        self._allowed_modules: tuple[str, ...] = ()
        self.allow_modules(*allow_modules)
        self.health = HealthChecks(self.engine, self.tracing)
        self._adapter_watchers: dict[tuple[str, str], DirectoryWatcher] = {}
        self._model_watchers: dict[str, DirectoryWatcher] = {}
        self._model_versions: dict[str, list[AdapterVersion]] = {}  # versions of each watched model, oldest first
        # Held while a watched model's versions change: by its watcher (staging one, switching to it) and by a load
        # back after keep-warm (checking what the folder holds), which may find the same new version at once.
        self._versions_lock = threading.RLock()
        # Versions a watch refused, by model and digest; kept past an unload, so no later load brings them in.
        self._refused_models: dict[str, dict[str, AdapterVersion]] = {}
        # What each watched model's versions are checked against: the serving kind (model type, vocabulary) and the
        # golden prompts; also for a version that came while keep-warm had the model out, checked as it loads back.
        self._model_checks: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {}
        self.engine.preloader.keep_loaded = self._why_keep_loaded
        self.engine.preloader.check_source = self._check_not_refused
        self.engine.preloader.check_loaded = self._check_loaded_version
        if health_interval_s is not None:
            self.health.configure(health_interval_s)

    # -- models --------------------------------------------------------------------------------

    def load(
        self,
        name: str,
        source: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        adapter: str | os.PathLike[str] | None = None,
        adapters: Mapping[str, str | os.PathLike[str]] | str | None = None,
        batching: BatchingPolicy | str | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        revision: str | None = None,
        warmup: bool = False,
        isolation: str = "thread",
        restarts: int = 3,
        hang_timeout_s: float | None = None,
        replicas: int | list[str] | None = None,
        balance: str | BalancePolicy | None = None,
        served_model: str | None = None,
        api_key: str | None = None,
        read_timeout_s: float = 60.0,
        engine: str = "local",
        address: str | None = None,
        num_gpus: float = 0.0,
        num_cpus: float = 1.0,
        **unknown: Any,
    ) -> LoadedModel:
        """Load a local directory or hub id as ``name`` and start its worker (one per replica).

        A ``source`` that is an http(s) URL is an OpenAI-compatible server (vLLM, SGLang, llama.cpp,
        Ollama, ``transformers serve``): ``bench.load("remote", "http://127.0.0.1:8000/v1",
        served_model="m")``. Nothing loads here; hops call it like a local model, each request a
        streamed POST. ``served_model`` defaults to the one model the server lists; ``api_key``
        goes in the Authorization header; a stream that goes ``read_timeout_s`` without a byte, or with
        only keep-alive comments (the first token's wait included), fails with RemoteError. A server's
        default batching is ``ContinuousBatching()``: each request is sent as it comes, up to 64 in flight.

        Weights must be safetensors unless ``allow_pickle=True``; repository code never runs
        unless ``trust_remote_code=True``. ``adapter`` is a PEFT (LoRA) adapter directory.
        ``adapters={"sql": DIR, ...}`` puts several named LoRA adapters on the one base model; a hop picks
        one with ``adapter: sql`` (none: the base model), and :meth:`watch_adapter` swaps in new versions live.
        ``warmup=True`` runs a tiny generate after loading, reported as part of the cold start.
        ``isolation="process"`` loads the model in a child process of its own, which a crash there
        (SIGKILL, a segfault, a CUDA fatal error) takes down alone: the requests it ran fail with
        ModelProcessDied, and it starts again, up to ``restarts`` times. ``hang_timeout_s`` treats a model process
        that ends no decoding step of a batch for that many seconds (a deadlock, a driver that never returns) as one
        that died: it is killed and started again. Off by default: a long prompt's prefill is one step.
        ``replicas=2`` serves the model from two workers on its device (sharing its weights),
        ``replicas=["cuda:0", "cuda:1"]`` from one per device listed (the first is where it
        loads); an http(s) URL in the list is a replica on that server, serving the same model
        (``replicas=["cpu", "cpu", "http://127.0.0.1:8000/v1"]``; ``served_model``, ``api_key`` and
        ``read_timeout_s`` apply to it). ``balance`` picks a replica per request (see
        :meth:`set_balance`; round robin by default). Without ``source``, loads a model registered
        earlier with :meth:`register`, with its registered settings, batching policy and replicas.

        ``engine="ray"`` runs each replica as a Ray actor that loads its own copy of the model, spread
        over the nodes of a Ray cluster: a local one started here, or the one at ``address``
        (``ray://head:10001``, or ``auto``); ``num_gpus`` and ``num_cpus`` are what each actor asks the cluster for.
        An actor that dies is started again, up to ``restarts`` times, as a model process is.
        """
        self.check_open(f"load {name!r}")
        _refuse_unknown("load", unknown, list(_LOAD_SETTINGS), ModelLoadError)
        _check_model_name(name)
        requested = None if source is None else LoadSettings(
            source=str(source), device=device, dtype=dtype, adapter=str(adapter) if adapter is not None else None,
            adapters=parse_adapters(adapters), trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
            revision=revision, warmup=warmup, isolation=isolation, restarts=restarts, hang_timeout_s=hang_timeout_s,
            served_model=served_model, api_key=api_key, read_timeout_s=read_timeout_s, engine=engine, address=address,
            num_gpus=num_gpus, num_cpus=num_cpus)
        if requested is not None and replicas is None and balance is None and batching is None:
            # The same load again (a notebook cell run twice), from files as they were: the model it loaded.
            same = self.registry.loaded_as(name, requested)
            if same is not None:
                log.info("model %r is already loaded with these settings, from these files: nothing to load", name)
                return same
        batching = _batching(batching)
        self.registry.check_free(name)  # before the replicas of the model loaded under that name change
        # A load that fails leaves what was configured for the name (a registered model's replicas, balance and
        # batching) as it was: a refused or failed second load under a name does not undo the first's settings.
        saved = self.engine.configuration(name)
        try:
            if source is not None:
                # A fresh load does not inherit an earlier one's replicas or balance policy either.
                places = self._replicate(name, 1 if replicas is None else replicas, balance or "round_robin",
                                         is_server_url(str(source)))
                device = _first_device(places) or device
            else:
                self._replicate(name, replicas, balance, replicas is not None and self.registry.settings(name).remote)
            if source is None:
                settings = self.registry.settings(name)
                if warmup:
                    settings = dataclasses.replace(settings, warmup=True)
            else:
                assert requested is not None
                settings = dataclasses.replace(requested, device=device)  # a replica list's first place
                # A fresh load does not inherit an earlier one's policy: without one, each replica runs its
                # kind's default.
                self.engine.clear_policy(name)
            self.engine.check_replicas(name, settings)
            return self.engine.preloader.load(name, settings, policy=batching)
        except BaseException:
            if not self.registry.is_loaded(name):
                self.engine.restore(name, saved)
            raise

    def _replicate(
        self, name: str, replicas: int | list[str] | None, balance: str | BalancePolicy | None, remote: bool
    ) -> tuple[str | None, ...] | None:
        """Configure ``name``'s replicas and balance policy for its next load (each checked before any load);
        ``remote`` says the model loads from a server. Returns where each replica runs, as configured."""
        policy = parse_balance(balance) if balance is not None else None
        return self.engine.configure(name, replicas, policy, remote)

    def register(
        self,
        name: str,
        source: str | os.PathLike[str],
        *,
        batching: BatchingPolicy | str | None = None,
        replicas: int | list[str] | None = None,
        balance: str | BalancePolicy | None = None,
        **settings: Any,
    ) -> None:
        """Make a model known to chains without loading it yet; it loads on first use, or as the preloading
        strategy says (see :meth:`set_preloading`). Takes the settings of :meth:`load`, ``warmup`` and
        ``replicas`` included."""
        self.check_open(f"register {name!r}")
        _check_model_name(name)
        _refuse_unknown("register", settings, list(_LOAD_SETTINGS), SettingsError)
        batching = _batching(batching)  # a bad value fails before the model is known
        saved = self.engine.configuration(name)
        try:
            # A bad value fails before the model is known, and leaves what was configured for the name as it was.
            places = self._replicate(name, replicas, balance, is_server_url(str(source)))
            settings["device"] = _first_device(places) or settings.get("device", "auto")
            if "adapters" in settings:
                settings["adapters"] = parse_adapters(settings["adapters"])
            registered = LoadSettings(source=str(source), **settings)
            self.engine.check_replicas(name, registered)
            self.registry.register(name, registered)
        except BaseException:
            self.engine.restore(name, saved)
            raise
        if batching is not None:
            self.engine.set_policy(name, batching)

    def unload(self, name: str, *, forget: bool = False) -> int:
        """Stop the model's worker (failing what is still queued) and free its memory; returns bytes freed.

        The model stays registered, so it loads again on use; ``forget=True`` drops it entirely. A model whose
        folder holds a version that :meth:`watch_model` refused does not load from it again (ModelLoadError says
        which version and why) until the folder holds another, or ``forget=True`` drops what was refused.
        """
        self._stop_watchers(name)
        self._model_versions.pop(name, None)  # a later load starts a new history
        self._model_checks.pop(name, None)
        freed = self.engine.preloader.unload(name, forget=forget)
        if forget:
            self._refused_models.pop(name, None)
            self.engine.forget(name)
        return freed

    @property
    def preloading(self) -> PreloadingStrategy:
        """The preloading strategy in force (lazy unless :meth:`set_preloading` chose another)."""
        return self.engine.preloader.strategy

    def set_preloading(self, strategy: str | PreloadingStrategy) -> None:
        """Choose when registered models load: ``"lazy"``, ``"eager"``, ``"prefetch"``, ``"keep_warm:20GiB"``,
        or ``wb.Lazy()``, ``wb.Eager()``, ``wb.Prefetch()``, ``wb.KeepWarm("20GiB")``.

        Under every strategy a model that is not loaded loads on its first request. Eager also
        loads a chain's models before its first run; prefetch loads the models of later hops
        while earlier ones run; keep-warm evicts the least recently used model to stay within
        its budget (at once, if the loaded models exceed it now).
        """
        self.engine.preloader.set_strategy(parse_preloading(strategy))

    def prepare(self, chain: Chain | ChainSpec) -> dict[str, float]:
        """Under eager preloading, load every model ``chain`` names, in parallel; a no-op under other strategies.

        Runs by itself at the start of each run under eager; call it first to keep the loads out of
        a timed run. Returns the cold start (load + warm-up, seconds) of each model it loaded.
        """
        spec = chain.spec if isinstance(chain, Chain) else chain
        return self.engine.preloader.prepare(spec.models(), label=spec.name)

    def models(self) -> pd.DataFrame:
        """One row per known model: name, source, device, dtype, isolation, params, memory, load time, state,
        health, ``batch_limit``, the largest batch it runs since one ran out of memory (None: no limit), its
        ``replicas`` with the requests they hold (``in_flight``) and served (:meth:`replicas` has one row
        each), ``pid``, the process it runs in (None while a model process restarts), and ``restarts``, how
        often its model process (or, summed over its replicas, its Ray actors) was started again after dying (None
        for a model in this process).

        A model with replicas is ``healthy`` while every replica is, ``unhealthy`` when none is, else
        ``degraded``; its ``batch_limit`` is the smallest of its replicas'.
        """
        import pandas as pd

        table = self.registry.table()
        sets = self.engine.replica_sets()

        def health(name: str) -> str | None:
            if name not in sets:
                return None
            states = {w.health.state for w in sets[name].workers}
            if len(states) == 1:
                return states.pop()
            return "unhealthy" if states == {"unhealthy"} else "degraded"

        def limit(name: str) -> int | None:
            limits = [w.queue.batch_limit for w in sets[name].workers] if name in sets else []
            return min((n for n in limits if n is not None), default=None)

        def count(name: str, key: str) -> int | None:
            return sum(getattr(r, key) for r in sets[name].replicas) if name in sets else None

        table["health"] = [health(n) for n in table["name"]]
        table["batch_limit"] = pd.array([limit(n) for n in table["name"]], dtype="Int64")
        table["replicas"] = pd.array([len(sets[n].replicas) if n in sets else None for n in table["name"]],
                                     dtype="Int64")
        table["in_flight"] = pd.array([count(n, "in_flight") for n in table["name"]], dtype="Int64")
        table["served"] = pd.array([count(n, "served") for n in table["name"]], dtype="Int64")
        # Every local replica of a model runs in this process, or in its one child process (which serves one
        # replica); a replica on a server runs in none of ours.
        backends = [next((w.backend for w in sets[n].workers if w.backend.device != REMOTE_DEVICE), None)
                    if n in sets else None for n in table["name"]]
        table["pid"] = pd.array([_pid(b) for b in backends], dtype="Int64")
        table["restarts"] = pd.array(
            [b.restarts if isinstance(b, ProcessBackend) else _ray_restarts(sets.get(n)) for b, n in
             zip(backends, table["name"])], dtype="Int64"
        )
        return table

    def replicas(self, name: str | None = None) -> pd.DataFrame:
        """One row per replica of ``name`` (or of every loaded model): its worker's name (``m#1``), its ``kind``
        (``local``, or ``remote`` for a replica on a server), device (``remote`` on a server) and the server's ``url``,
        the balance policy, the replica's batching policy (in a mixed set, until ``set_batching`` chooses one for
        all, a server's replica sends each request as it comes, ``continuous:64``, and one here generates one at a
        time, ``none``), requests in flight, served and failed, health, breaker state, whether faults are
        injected, and ``restarts``, how often its model process or Ray actor was started again after dying (None for
        a replica in this process or on a server)."""
        import pandas as pd

        columns = ["model", "replica", "index", "kind", "device", "url", "node", "balance", "batching", "in_flight",
                   "served", "failed", "health", "breaker", "faults", "restarts"]
        sets = self.engine.replica_sets()
        if name is not None:
            self.registry.get(name)  # unknown, or not loaded: a clear error
            sets = {name: sets[name]}
        return pd.DataFrame([row for replicas in sets.values() for row in replicas.rows()], columns=columns)

    def set_balance(self, name: str, policy: str | BalancePolicy) -> None:
        """Change how ``name``'s replicas are picked, live: ``"round_robin"``, ``"least_loaded"``, ``"power_of_two"``,
        ``"session_hash"``, ``"weighted:3,1"``, or a policy object such as ``wb.Weighted({"m#0": 3, "m#1": 1})``.

        Every policy picks among the healthy replicas only (health serving, breaker not open).
        """
        self.engine.set_balance(name, parse_balance(policy))

    def set_batching(self, name: str, policy: BatchingPolicy | str) -> None:
        """Change a loaded model's batching policy live; no reload. ``policy`` is a policy object or its short name
        (``"none"``, ``"static:8"``, ``"dynamic:16:5ms"``, ``"continuous"``)."""
        self.engine.set_policy(name, _batching(policy))

    def generate(self, model: str, prompt: str, *, adapter: str | None = None, **params: Any) -> GenerationResult:
        """One direct model call, outside any chain (traced as its own text_completion span); ``adapter`` names
        one of the model's LoRA adapters."""
        self.check_open("generate")
        if not isinstance(prompt, str):  # None failed deep in the engine (AttributeError), bytes in the tokenizer
            raise InvalidInput(f"generate() takes the prompt as text (a str), not {type(prompt).__name__} {prompt!r:.60}",
                               hint="decode bytes first (prompt.decode('utf-8')), or str() a value you mean as text")
        known = [f.name for f in dataclasses.fields(GenerationParams)]
        _refuse_unknown("generate", params, known, InvalidInput)
        return self.engine.generate(model, prompt, GenerationParams(**params), adapter=adapter)

    # -- resilience ----------------------------------------------------------------------------

    def inject(
        self,
        model: str,
        *,
        error_rate: float = 0.0,
        latency_ms: float | tuple[float, float] = 0.0,
        oom_every: int | None = None,
        oom_above: int | None = None,
        seed: int | None = None,
        replica: int | None = None,
    ) -> Faults:
        """Inject faults into a loaded model's batches, for studying retries and fallbacks; replaces earlier ones.

        A model with replicas takes the faults on every replica, or on one: ``replica=1``, or the
        replica's name, ``bench.inject("m#1", ...)``; each replica draws from its own generator.

        Each batch first waits ``latency_ms`` (or a ``(low, high)`` range drawn per batch), each
        request then fails with probability ``error_rate``, and every ``oom_every``-th batch and
        every batch of more than ``oom_above`` requests raises a fake out-of-memory error. ``seed``
        makes the draws repeatable. Spans say what was injected (``workbench.fault.*``).
        """
        if replica is not None:
            if isinstance(replica, bool) or not isinstance(replica, int) or replica < 0:
                raise SettingsError(f"bench.inject({model!r}, replica={replica!r}): replica is an index >= 0",
                                    hint=f"e.g. replica=1, or name the replica: bench.inject('{model}#1', ...)")
            model = f"{model}#{replica}"
        faults = Faults(model, error_rate, latency_ms, oom_every, oom_above, seed)
        self.engine.inject(faults)
        return faults

    def clear_faults(self, model: str | None = None) -> None:
        """Stop injecting faults into ``model``, or into every model."""
        self.engine.clear_faults(model)

    def faults(self) -> dict[str, Faults]:
        """The faults injected now, by model (by replica, ``m#1``, for a model with replicas)."""
        return self.engine.faults()

    def set_breaker(self, model: str, *, failure_threshold: int = 5, reset_timeout_s: float = 5.0) -> None:
        """Give ``model`` a fresh circuit breaker: open after ``failure_threshold`` failures in a row, try again
        ``reset_timeout_s`` later. Every loaded model has one (5 failures, 5 s) until told otherwise; each
        replica has its own, and ``model`` may name one (``m#1``) or mean all of them."""
        self.engine.set_breaker(model, failure_threshold, reset_timeout_s)

    def breakers(self) -> pd.DataFrame:
        """The circuit breaker of each loaded model (of each replica, ``m#0``, ``m#1``, for a model with replicas):
        state, failures in a row, settings, times opened, last error."""
        import pandas as pd

        columns = ["model", "state", "failures", "failure_threshold", "reset_timeout_s", "opened", "since_s",
                   "last_error"]
        return pd.DataFrame([w.breaker.row() for w in self.engine.workers().values()], columns=columns)

    def set_health_checks(self, interval_s: float | None, *, timeout_s: float = 5.0, failures: int = 1) -> None:
        """Probe every loaded model every ``interval_s`` seconds (None turns it off) with a one-token generation.

        A model whose probe fails (an error, or no answer in ``timeout_s``) ``failures`` times in a
        row is out of rotation: its requests fail fast with ModelUnhealthy, so hops go to their
        fallbacks. The next probe that passes puts it back. ``models()`` shows each model's health.
        """
        self.health.configure(interval_s, timeout_s, failures)

    def check_health(self, model: str | None = None) -> pd.DataFrame:
        """Probe ``model`` (or every loaded model) now; one row per model (per replica, ``m#0``, ``m#1``, for a model
        with replicas, each probed on its own): health, failures, probe_ms, error."""
        import pandas as pd

        rows = self.health.check(None if model is None else [model])
        return pd.DataFrame(rows, columns=["name", "health", "failures", "probe_ms", "error"])

    # -- chains --------------------------------------------------------------------------------

    def allow_modules(self, *modules: str) -> tuple[str, ...]:
        """Let chain specs' ``call:`` name functions in ``modules`` (and their submodules); returns all allowed.

        Without this a spec may call only your own code: the notebook and modules outside the
        standard library and site-packages. Allow a module only if you trust every spec you run
        with it, since a spec may then call any function in it.
        """
        for module in modules:
            if not isinstance(module, str) or not all(part.isidentifier() for part in module.split(".")):
                raise SettingsError(f"{module!r} is not a module name", hint="e.g. bench.allow_modules('numpy')")
        self._allowed_modules = tuple(dict.fromkeys((*self._allowed_modules, *modules)))
        return self._allowed_modules

    def chain(
        self,
        spec: str | os.PathLike[str] | Mapping[str, Any],
        name: str | None = None,
        *,
        watch: bool = False,
        interval_s: float = DEFAULT_INTERVAL_S,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> Chain:
        """Validate a chain spec (YAML text, a dict, or a ``pathlib.Path`` to a YAML file) against the models this
        workbench knows.

        ``watch=True``: ``spec`` is the path of a YAML file, followed live (see :meth:`Chain.watch`): an edit
        that validates serves the runs that start after it (within about ``interval_s``); one that does not
        is refused and the last good version keeps serving. Runs record the version they used.
        ``base_dir``: where a relative ``graph:`` path is read from, for this version and every later one
        (default: the spec file's folder; for text or a dict, the working directory).
        """
        self.check_open("build a chain")  # not "unknown model": close() took the models, and says so
        path = None
        if watch and not isinstance(spec, (str, os.PathLike)):
            raise WorkbenchError(f"watch=True follows a spec file, and {type(spec).__name__} is not a path",
                                 hint="bench.chain('qa.yaml', watch=True)")
        if watch or isinstance(spec, os.PathLike):
            path = Path(spec)
            spec = read_text(path, "chain spec file")
        folder = Path(base_dir).expanduser().absolute() if base_dir is not None else \
            path.parent.absolute() if path is not None else None
        # A spec file without a name is named after the file (qa.yaml: qa).
        parsed = self._parse_chain(spec, name, path.stem if path is not None else None,  # type: ignore[arg-type]
                                   folder)
        chain = Chain(parsed, self, parse=lambda source: self._parse_chain(source, parsed.name, base_dir=folder),
                      context=self._spec_context)
        earlier = self._chains.get(parsed.name)
        if watch and earlier is not None and earlier.watching is not None and path is not None \
                and earlier.watching.resolve() == path.resolve():
            earlier.unwatch()  # the same chain built again (a cell run again): the new one follows the file from now on
        self._chains[parsed.name] = chain
        self._built.add(chain)
        if path is not None and watch:
            chain.watch(path, interval_s)
        return chain

    def _parse_chain(self, spec: str | Mapping[str, Any], name: str | None, default: str | None = None,
                     base_dir: Path | None = None) -> ChainSpec:
        if name is not None:
            check_chain_name(name)  # it replaces the spec's own
        parsed = parse_spec(spec, known_models=self.registry.names(), default_name=name or default,
                            allowed_modules=self._allowed_modules, graphs=self.graphs,
                            known_adapters=self.registry.adapters(), base_dir=base_dir)
        if name is not None and parsed.name != name:
            parsed.name = name
        return parsed

    def configure(
        self, path: str | os.PathLike[str], *, watch: bool = False, interval_s: float = DEFAULT_INTERVAL_S
    ) -> LiveConfig:
        """Load the models, policies and chains a workbench configuration file (YAML) names, and apply its overrides.

        ``models: {NAME: {source, device, dtype, batching, balance, replicas, ...}}``, ``chains: {NAME: FILE}``
        (relative to the file), ``overrides: {CHAIN.HOP.FIELD: VALUE}``. The file is validated whole first
        (errors name its line and field). ``watch=True`` follows the file and the chain files live: a new
        batching or balance policy applies at once, a changed source or load setting loads the model again,
        and an edit that does not validate is refused while the last good configuration keeps serving
        (see the returned object's ``version`` and ``errors``).
        """
        self.check_open(f"configure from {str(path)!r}")
        config = LiveConfig(self, path, watch, interval_s).start()
        for earlier in [c for c in self._configs if c.path.resolve() == config.path.resolve()]:
            earlier.stop()  # the same file again: the new one follows it from now on
            self._configs.remove(earlier)
        self._configs.append(config)
        return config

    def chains(self) -> dict[str, Chain]:
        """Chains built on this workbench, by name (the latest of each name)."""
        return dict(self._chains)

    def graph(self, graph: str | os.PathLike[str]) -> KnowledgeGraph:
        """The knowledge graph a hop's ``graph:`` names (a demo graph such as ``"countries"``, or a .csv/.json file).

        Loaded once per workbench and kept; ``graph.lookup("What borders France?", hops=1)`` shows
        what a knowledge hop would find.
        """
        return self.graphs.get(resolve(str(graph)))

    # -- serving -------------------------------------------------------------------------------

    def serve(
        self,
        chains: Collection[Chain] | None = None,
        *,
        port: int = 8000,
        host: str = "127.0.0.1",
        auth: Any = None,
        **options: Any,
    ) -> Any:
        """Serve ``chains`` (default: every chain built here) over HTTP from a background thread; returns the Server.

        ``server.url``, ``server.stop()``; a ``with`` block stops it. ``port=0`` picks a free port.
        ``auth``: None requires credentials (API keys in ``data_dir``, see ``autoglm keys add``), an
        ``Auth`` object says how, and ``False`` lets anyone in, allowed only on a loopback host.
        Other ``options`` go to the gateway (see ``workbench.fronts.server.serve``).
        """
        self.check_open("serve chains")
        # The gateway lives in workbench.fronts, above this layer: the root package hands it over (see _gateway.py).
        if _gateway.start_server is None:
            raise WorkbenchError("the gateway is not available", hint="import workbench first")
        served = list(self._chains.values()) if chains is None else list(chains)
        for chain in served:
            if getattr(chain, "bench", None) is not self:  # its runs would go to another workbench's models
                raise SettingsError(
                    f"chain {getattr(chain, 'name', chain)!r:.80} was not built on this workbench, so it cannot serve "
                    "here", hint="build it on this workbench from its spec: bench.chain(spec)")
        server = _gateway.start_server(self, chains=served, port=port, host=host, auth=auth, **options)
        self._servers.append(server)  # close() stops it before the loop it runs on
        return server

    # -- the event loop chains walk on (the ChainHost protocol) -------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                self.check_open("run a chain")
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_serve, args=(loop,), name="workbench-loop", daemon=True)
                thread.start()
                self._loop, self._loop_thread = loop, thread
            return self._loop

    def start(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Start ``coroutine`` on the workbench's event loop; the future answers when it ends."""
        try:
            loop = self._ensure_loop()
        except BaseException:
            coroutine.close()
            raise
        return asyncio.run_coroutine_threadsafe(coroutine, loop)

    def check_blocking(self) -> None:
        """Raise WorkbenchError on the workbench's own event loop, where a blocking wait would wait for itself."""
        if self._loop is not None and threading.current_thread() is self._loop_thread:
            raise WorkbenchError(
                "a blocking chain call (run, map, stream) was made on the workbench's own event loop, where it "
                "would wait for itself",
                hint="inside an async def hop, await chain.arun(...) or chain.amap(...), "
                "or async for ... in chain.astream(...)",
            )

    def run_sync(self, coroutine: Coroutine[Any, Any, T], on_interrupt: Callable[[], None] | None = None) -> T:
        """Run ``coroutine`` on the workbench's loop and wait here; a Ctrl-C calls ``on_interrupt`` (or cancels it)."""
        try:
            self.check_blocking()
        except WorkbenchError:
            coroutine.close()
            raise
        with lending() as lent:  # a Python hop's own chain call: its thread runs the call's hop work while it waits
            future = self.start(coroutine)
        try:
            if lent is not None:
                lent.wait(future)
            while True:
                try:
                    return future.result(timeout=_POLL_S)  # wakes for a Ctrl-C between waits
                except TimeoutError:
                    continue
        except CancelledError:
            if self._closed:  # close() stopped the loop under it: say so, not a bare CancelledError
                raise WorkbenchClosed("finish what it was running") from None
            raise
        except KeyboardInterrupt:
            if on_interrupt is not None:
                on_interrupt()
            else:
                future.cancel()
                try:  # let the run close its trace before the interrupt goes on
                    future.exception(timeout=1.0)
                except BaseException:
                    pass
            raise

    async def run_async(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the workbench's loop, awaited from whichever loop the caller is on."""
        loop = self._ensure_loop()
        here = asyncio.get_running_loop()
        if here is loop:
            return await coroutine
        with lending(here):  # asyncio.run(chain.arun(...)) in a Python hop: its loop runs the call's hop work
            future = self.start(coroutine)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            cancelling = getattr(task, "cancelling", None)  # Python 3.11+: was the caller's own task cancelled?
            if self._closed and future.cancelled() and not (cancelling is not None and cancelling()):
                # close() stopped the loop under it: say so, as run_sync does, not a bare CancelledError that reads
                # as if the caller's task had been cancelled
                raise WorkbenchClosed("finish what it was running") from None
            raise

    async def arun_spec(
        self,
        spec: ChainSpec,
        inputs: Mapping[str, Any],
        session: str | None = None,
        events: Callable[[Event], None] | None = None,
    ) -> Run:
        """Run ``spec`` once on the workbench's loop (awaited from any loop); the Run is kept in :meth:`runs`."""
        return await self.run_async(self._execute(spec, inputs, session, events))

    async def _execute(
        self, spec: ChainSpec, inputs: Mapping[str, Any], session: str | None, events: Callable[[Event], None] | None
    ) -> Run:
        self.check_open(f"run chain {spec.name!r}")
        self._in_flight += 1  # on the loop thread, the only one that changes it
        keeper = INTERRUPTED_RUNS.get()
        if keeper is None:  # this task's own (its context is a copy): an interrupted run is kept all the same
            INTERRUPTED_RUNS.set(keeper := RunKeeper())
        try:
            if isinstance(self.preloading, Eager):
                try:
                    await asyncio.get_running_loop().run_in_executor(self._io_pool, self.prepare, spec)
                except WorkbenchError:
                    pass  # the hop whose model failed to load tries again and fails as a HopFailed on its Run
            run = await self._runner.arun(spec, inputs, session, events)
            run._models = self.models_digest(spec)  # what answered it, as it finished (5.6 us): see Chain._same_models
        except BaseException:
            if keeper.runs:  # a Ctrl-C or a cancel stopped it: what it had done is kept among the runs
                self._keep_run(keeper.runs[-1])
            raise
        finally:
            self._in_flight -= 1
            keeper.ended.set()
        if self._closed and run.error is not None:
            # close() took the models from under this run: say that, not the engine's "no model named ...".
            run.error = HopFailed(run.error.hop, WorkbenchClosed(f"finish running chain {spec.name!r}"), run)
        self._keep_run(run)
        return run

    def _keep_run(self, run: Run) -> None:
        """Keep ``run`` among :meth:`runs`, dropping the oldest past MAX_RUNS_KEPT runs or MAX_RUN_BYTES_KEPT."""
        weight = _weight(run)
        with self._runs_lock:
            self._runs[run.id] = run
            self._run_bytes[run.id] = weight
            self._kept_bytes += weight
            while len(self._runs) > MAX_RUNS_KEPT or self._kept_bytes > MAX_RUN_BYTES_KEPT and len(self._runs) > 1:
                gone, _ = self._runs.popitem(last=False)
                self._kept_bytes -= self._run_bytes.pop(gone)

    # -- runs, traces, sessions ---------------------------------------------------------------

    def runs(self) -> list[Run]:
        """Runs of this workbench, oldest first."""
        with self._runs_lock:
            return list(self._runs.values())

    def run(self, run_id: str = "last") -> Run:
        """A run by id, or ``"last"``."""
        with self._runs_lock:
            if not self._runs:
                raise WorkbenchError("no chain has run yet", hint="chain.run(...) or %autoglm run CHAIN ...")
            if run_id == "last":
                return next(reversed(self._runs.values()))
            matches = [r for i, r in self._runs.items() if i.startswith(run_id)]
        if len(matches) != 1:
            raise WorkbenchError(
                f"{'no' if not matches else 'more than one'} run has id {run_id!r}",
                hint="bench.runs() lists them; ids may be shortened while unique",
            )
        return matches[0]

    def traces(self) -> Trace:
        """Every span this workbench recorded: runs, loads, batches, direct calls."""
        return Trace(self.tracing.index.spans())

    def session(self, session_id: str) -> Session:
        check_session(session_id)  # as a run does: an id no run can have
        return Session(self._runner.sessions, session_id)

    def sessions(self) -> list[str]:
        """Every session with a run in this workbench's store, including those of earlier kernels."""
        return self.store.sessions()

    @property
    def session_limits(self) -> SessionLimits:
        """The bounds on what the session store keeps (see :meth:`set_session_limits`)."""
        return self._limited_store().limits

    def set_session_limits(self, limits: SessionLimits) -> None:
        """Bound what the session store keeps, from its next write on: each run appended drops, in the same write,
        what ``limits`` no longer allow (a session's oldest runs, runs past an age, the least recently active
        sessions). ``wb.SessionLimits()``, no bound at all, is the default; a field of None lifts its bound."""
        if not isinstance(limits, SessionLimits):
            raise SettingsError(f"set_session_limits takes a wb.SessionLimits, not {type(limits).__name__}",
                                hint="e.g. bench.set_session_limits(wb.SessionLimits(runs_per_session=1000))")
        self._limited_store().set_limits(limits)

    def session_stats(self) -> dict[str, int]:
        """What the session store holds, of every kernel on its file: ``sessions``, ``runs``, ``bytes``; and
        ``evicted_runs``, how many runs its limits made this workbench drop."""
        return self._limited_store().stats()

    def _limited_store(self) -> ContextStore:
        store = self.store
        if type(store).set_limits is ContextStore.set_limits:
            raise SettingsError(f"the session store {type(store).__name__} is one of your own, which keeps no limits "
                                "nor statistics", hint="bound it in its own code, or use the workbench's SQLite store "
                                "or wb.InMemoryContextStore()")
        return store

    # -- caches (the hop's ``cache:``) -----------------------------------------------------------

    def cache_stats(self) -> pd.DataFrame:
        """The exact response cache, one row per hop and model: hits, misses and hit rate (this workbench's),
        entries and bytes stored (the data directory's), and ``saved_s``, what the hits would have cost the model."""
        return self.cache.stats()

    def clear_cache(self, *, chain: str | None = None, hop: str | None = None, prefix: bool = True) -> int:
        """Empty the exact response cache (or its entries of one chain or hop) and, with ``prefix``, every model's
        prefix KV cache; returns how many stored answers went."""
        removed = self.cache.clear(chain=chain, hop=hop)
        if prefix:
            self.engine.clear_prefix_caches()
        return removed

    def set_cache_limits(self, *, max_entries: int | None = None, max_bytes: int | None = None) -> None:
        """Bound the exact response cache; past a bound the least recently used answers go (at the next write)."""
        self.cache.set_limits(max_entries, max_bytes)

    def use_cache(self, cache: ResponseCache) -> ResponseCache:
        """Answer ``cache: exact`` hops from ``cache`` from now on (a comparison's scratch cache, say); returns the
        one it replaces, which stays open."""
        previous, self.cache = self.cache, cache
        self._runner.cache = cache
        return previous

    def prefix_cache_stats(self) -> pd.DataFrame:
        """One row per cached prompt prefix of each model worker: its tokens, KV bytes, prefill_ms, and reuses."""
        import pandas as pd

        rows = [{"worker": name, **row} for name, cache in self.engine.prefix_caches().items()
                for row in cache.rows()]  # type: ignore[attr-defined]
        return pd.DataFrame(rows, columns=["worker", "tokens", "bytes", "prefill_ms", "uses"])

    async def aprepare_spec(self, spec: ChainSpec, inputs: Mapping[str, Any]) -> int:
        """Get a run of ``spec``'s first hops ready ahead of it (a map's prefetch); see ``Chain.map(prefetch=True)``."""
        return await self._runner.prepare(spec, inputs)

    def models_digest(self, spec: ChainSpec, *, load: bool = False) -> str | None:
        """A short hash of what answers ``spec``'s model hops now: each model's identity (source, revision, device,
        dtype, a fingerprint of its files) and the live version of each adapter a hop names, as the response cache
        keys them. A map's checkpoint keeps it with each run, so that a map resumed after the model changed does not
        reuse the other model's answers. None while a model is not loaded, unless ``load``: then it loads, as the
        map's first run would."""
        parts: dict[str, Any] = {}
        for hop in spec.hops:
            if not hop.model:
                continue
            identity = self.engine.identity(hop.model)
            if identity is None and load:
                pinned = REPLICA_NAME.match(hop.model)  # m#1: replica 1 of m
                base = pinned["model"] if pinned and hop.model not in self.registry.names() else hop.model
                self.engine.preloader.load(base, trigger="on_use")
                identity = self.engine.identity(hop.model)
            if identity is None:
                return None
            parts[hop.model] = identity
            if hop.adapter is not None:
                parts[f"{hop.model} adapter {hop.adapter}"] = self.engine.adapter_identity(hop.model, hop.adapter)
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # -- lifetime ------------------------------------------------------------------------------

    def check_open(self, doing: str) -> None:
        """Raise WorkbenchClosed, saying what could not be done (``doing``), once the workbench is closed."""
        if self._closed:
            raise WorkbenchClosed(doing)


    @property
    def runs_in_flight(self) -> int:
        """Chain runs walking on the workbench's event loop right now (a map's, a stream's, an awaited one)."""
        return self._in_flight

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran: the workbench loads and runs nothing more."""
        return self._closed

    def close(self) -> None:
        """Stop every worker and free every model; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        for server in self._servers:
            server.stop()  # stopping twice is harmless; open streams get a moment to end
        for config in self._configs:
            config.stop()
        for chain in list(self._built):
            chain.unwatch()
        self.health.stop()
        self._stop_watchers()
        self.engine.preloader.close()  # no background load may start once models are being freed
        self.engine.close()  # what is in flight fails now: nobody is left to wait for it
        with heap.deferred():  # one collection for every model freed, not one each
            for name in self.registry.names():
                try:
                    self.unload(name, forget=True)
                except WorkbenchError:
                    pass
        release_ray()  # a Ray this process started for the workbench's replicas stops once none is open
        self._hop_pool.shutdown(wait=False, cancel_futures=True)
        self._io_pool.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if threading.current_thread() is not self._loop_thread:
                self._loop_thread.join(5.0)
        self.store.close()
        self.cache.close()
        self.tracing.shutdown()
        heap.thaw()  # what this workbench held can go now; the next load anywhere freezes again

    # -- LoRA adapters (issue 15) ----------------------------------------------------------------

    def adapters(self, model: str | None = None) -> pd.DataFrame:
        """One row per version of each named LoRA adapter of ``model`` (or of every loaded model): name, version,
        state (staging, live, draining, retired, refused), loaded_at, swap_ms (noticed to live: load, checks,
        switch), error (why a version was refused), the requests holding it (``in_flight``), ``retire_ms`` (from
        being replaced until drained and freed), rank, the peft ``key`` (``sql@v2``), content digest and path."""
        import pandas as pd

        columns = ["name", "version", "state", "loaded_at", "swap_ms", "error", "model", "key", "in_flight",
                   "retire_ms", "rank", "digest", "path"]
        models = [self.registry.get(model)] if model is not None else self.registry.loaded()
        rows = [row for m in models if m.adapters is not None for row in m.adapters.rows(m.name)]
        table = pd.DataFrame(rows, columns=columns)
        table["loaded_at"] = pd.to_datetime(table["loaded_at"], unit="s", utc=True)
        return table.astype({"rank": "Int64"})

    def watch_adapter(
        self,
        model: str,
        name: str,
        path: str | os.PathLike[str] | None = None,
        interval_s: float = 2.0,
        *,
        max_rank: int = 64,
        target_modules: Collection[str] | None = None,
        golden_prompts: Collection[str] | None = None,
    ) -> None:
        """Watch an adapter directory and bring each new version of adapter ``name`` of ``model`` live, safely.

        Every ``interval_s`` seconds the directory's content (adapter_config.json and the weights) is hashed;
        a new hash is a new version, which loads beside the live one as ``name@vN``, is checked (safetensors
        only, shaped for this base model, rank at most ``max_rank``, LoRA on ``target_modules`` only if given,
        finite logits on ``golden_prompts``), then serves every new request; requests already holding the
        old version finish on it, and then it is deleted and its memory freed. A version that fails a check
        is refused: :meth:`adapters` says why, its ``adapter swap`` span has an ``adapter.refused`` event, a
        warning is logged, and the live version serves on. ``path`` defaults to where ``name`` loaded from;
        a ``name`` the model has no adapter by loads from ``path`` now, as version 1. The model loads ``name``
        from ``path`` from now on, so the watch goes on when keep-warm evicts the model and it loads back.
        """
        adapters = self._adapter_set(model)
        rules = AdapterRules(
            max_rank=max_rank,
            target_modules=frozenset(target_modules) if target_modules is not None else None,
            **({"golden_prompts": tuple(golden_prompts)} if golden_prompts is not None else {}),
        )
        if name not in adapters.names():
            if path is None:
                raise AdapterError(f"model {model!r} has no adapter named {name!r}, and no path was given to load "
                                   "it from", hint=f"bench.watch_adapter({model!r}, {name!r}, DIR)")
            adapters.add(name, os.path.expanduser(path), rules)
        # Absolute now: the watcher polls it, and stages from it, after the notebook may have changed directory.
        directory = os.path.abspath(os.path.expanduser(path)) if path is not None else adapters.path(name)
        if directory != adapters.path(name):
            # Checked before the model follows it: a directory that is not there, or holds an adapter these rules
            # refuse, would otherwise be where the model loads its adapter from after keep-warm evicts it, and the
            # model would not load back at all. Refused here, the watch and the adapter serving now stay as they were.
            try:
                inspect_adapter(directory, adapters.base, rules)
            except AdapterError as exc:
                raise AdapterError(f"cannot watch adapter {name!r} of model {model!r} at {str(path)!r} (it serves on "
                                   f"from {adapters.path(name)}): {exc.message}", hint=exc.hint) from None
        adapters.set_rules(name, rules)
        # The watch outlives keep-warm evicting the model: loaded again, it starts from the directory followed.
        self.registry.follow_adapter(model, name, directory)
        live = adapters.live(name)
        self.unwatch_adapter(model, name)
        self._adapter_watchers[(model, name)] = DirectoryWatcher(
            directory, interval_s, functools.partial(self._stage_adapter, model, name, directory, rules),
            seen=live.digest if live is not None else None,  # another directory's content differs: staged
            label=f"adapter-{model}-{name}")

    def unwatch_adapter(self, model: str, name: str) -> None:
        """Stop watching adapter ``name`` of ``model``; its live version serves on."""
        watcher = self._adapter_watchers.pop((model, name), None)
        if watcher is not None:
            watcher.stop()

    def _adapter_set(self, model: str) -> AdapterSet:
        loaded = self.registry.get(model)
        if loaded.adapters is None:
            raise AdapterError(f"model {model!r} was loaded without named adapters",
                               hint=f"bench.load({model!r}, PATH, adapters={{NAME: DIR}}) (in this process)")
        return loaded.adapters

    def _stage_adapter(self, model: str, name: str, path: str, rules: AdapterRules, digest: str,
                       noticed: float) -> AdapterVersion | None:
        """Stage a version a watcher noticed, in an ``adapter swap`` span of the engine's trace, on the adapters of
        the model loaded now; None while it is not loaded (evicted), or when its load brought this version already."""
        loaded = next((m for m in self.registry.loaded() if m.name == model), None)
        adapters = loaded.adapters if loaded is not None else None
        live = adapters.live(name) if adapters is not None else None
        if adapters is None or live is None or live.digest == digest:
            return None
        adapters.set_rules(name, rules)  # a load after an eviction made new adapters, with the default rules
        attributes: dict[str, object] = {attr.SPAN_KIND: attr.KIND_CHAIN, attr.MODEL_NAME: model,
                                         attr.ADAPTER_NAME: name, attr.ADAPTER_PATH: path, attr.ADAPTER_DIGEST: digest}
        with self.tracing.span(f"adapter swap {model}/{name}", None, attributes) as span:
            version = adapters.stage(name, path, digest, noticed)
            span.set_attributes({attr.ADAPTER_VERSION: version.version, attr.ADAPTER_KEY: version.key,
                                 attr.ADAPTER_STATE: version.state})
            if version.swap_ms is not None:
                span.set_attribute(attr.ADAPTER_SWAP_MS, version.swap_ms)
            if version.error is not None:
                span.add_event("adapter.refused", {attr.ADAPTER_ERROR: version.error})
                span.set_status(Status(StatusCode.ERROR, version.error))
        return version

    def watch_model(
        self, name: str, path: str | os.PathLike[str] | None = None, interval_s: float = 2.0, *,
        golden_prompts: Collection[str] | None = None,
    ) -> None:
        """Watch a model directory and swap each new version of its weights in live, as :meth:`watch_adapter` does.

        A new content digest (config.json and the weights) loads beside the serving model with its
        settings, is checked (safetensors unless the model allowed pickle, same model type and
        vocabulary, finite logits on ``golden_prompts``), and then new workers serve every new request
        while the old workers finish theirs; then the old weights are freed. A version that fails is
        refused (:meth:`model_versions` says why) and the serving one goes on. ``path`` defaults to the
        directory the model loaded from. For models in this process without named adapters; any other is
        refused here, before a watch that could only refuse every version.

        While the directory the model loads from holds another version than the one serving (refused, or not
        checked yet), keep-warm does not evict the model, which could not load back what it serves (a warning says
        so, once); and no load, after an unload either, brings in a version that was refused.
        """
        loaded = self.registry.check_swappable(name)
        directory = os.path.abspath(os.path.expanduser(path)) if path is not None else loaded.source  # as for adapters
        prompts = tuple(golden_prompts) if golden_prompts is not None else GOLDEN_PROMPTS
        self._model_checks[name] = (kind_of(loaded), prompts)
        if name not in self._model_versions:
            first = AdapterVersion(name, 1, loaded.source, content_digest(loaded.source, "config.json"),
                                   state="live", loaded_at=loaded.loaded_at)
            self._model_versions[name] = [first]
        live = self._model_versions[name][-1] if self._model_versions[name][-1].state == "live" else None
        self.unwatch_model(name)
        self._model_watchers[name] = DirectoryWatcher(
            directory, interval_s, functools.partial(self._stage_model, name, directory, prompts),
            seen=live.digest if live is not None else None, config="config.json", label=f"model-{name}")

    def unwatch_model(self, name: str) -> None:
        """Stop watching model ``name``'s directory; the serving version serves on."""
        watcher = self._model_watchers.pop(name, None)
        if watcher is not None:
            watcher.stop()

    def model_versions(self, name: str | None = None) -> pd.DataFrame:
        """One row per version of each watched model (:meth:`watch_model`), with :meth:`adapters`' columns."""
        import pandas as pd

        columns = ["name", "version", "state", "loaded_at", "swap_ms", "error", "retire_ms", "digest", "path"]
        rows = [{c: getattr(v, c) for c in columns} for model, versions in self._model_versions.items()
                if name is None or model == name for v in versions]
        table = pd.DataFrame(rows, columns=columns)
        table["loaded_at"] = pd.to_datetime(table["loaded_at"], unit="s", utc=True)
        return table

    def _stage_model(self, name: str, directory: str, prompts: tuple[str, ...], digest: str,
                     noticed: float) -> AdapterVersion | object | None:
        """Stage a model version a watcher noticed: load beside, check, switch, drain, free (a ``model swap`` span).
        None while keep-warm has the model evicted and it loads back from ``directory`` (its source, where a swap left
        it), which then holds this version; LATER while it would load back from elsewhere (a watch of another
        directory whose first version came while it was evicted), so the watcher offers the version again once the
        model is back, to be checked and swapped in."""
        if not self.registry.is_loaded(name):
            source = self.registry.settings(name).source
            return None if os.path.abspath(os.path.expanduser(source)) == directory else LATER
        versions = self._model_versions[name]
        with self._versions_lock:
            serving = _live(versions)
            if serving is not None and serving.digest == digest:
                return None  # checked as the model loaded back (see _check_loaded_version): serving already
            if content_digest(directory, "config.json") != digest:
                # The folder changed since the watcher read it (a write it took for settled, then finished while the
                # model loaded back, say): a swap now would load what the folder holds under the digest of what it
                # held. The next poll offers what it holds now.
                return None
            version = AdapterVersion(name, max(v.version for v in versions) + 1, directory, digest)
            versions.append(version)
        attributes: dict[str, object] = {attr.SPAN_KIND: attr.KIND_CHAIN, attr.MODEL_NAME: name,
                                         attr.ADAPTER_PATH: directory, attr.ADAPTER_DIGEST: digest,
                                         attr.ADAPTER_VERSION: version.version}
        with self.tracing.span(f"model swap {name}", None, attributes) as span:
            try:
                current = self.registry.get(name)
                new = self.registry.load_beside(name, directory, span)
                try:
                    check_successor(current, new, prompts)
                    with self._versions_lock:
                        if version.state != "staging":
                            # The model was evicted and loaded back from this folder meanwhile, and that load checked
                            # this very version and made it live (_check_loaded_version): it serves already.
                            self.registry.release(new)
                            span.set_attribute(attr.ADAPTER_STATE, version.state)
                            return version
                        old = self.registry.replace(name, new)
                        try:
                            replaced = self.engine.swap(name, span)  # from here on new requests go to the new workers
                        except BaseException:  # its replicas could not start (a server replica gone, a device full)
                            self.registry.replace(name, old)  # the old workers serve on: the registry says so again
                            raise
                        previous = _live([v for v in versions if v is not version])
                        version.state, version.loaded_at = "live", time.time()
                        if previous is not None:
                            previous.state, previous.switched_at = "draining", time.perf_counter()
                except BaseException:
                    self.registry.release(new)
                    raise
            except Exception as exc:
                if version.state != "staging":  # made live (or refused) by a load back meanwhile, which checked it
                    return version
                version.state = "refused"
                version.error = exc.message if isinstance(exc, WorkbenchError) else f"{type(exc).__name__}: {exc}"
                self._refused_models.setdefault(name, {})[digest] = version
                span.add_event("model.refused", {attr.ADAPTER_ERROR: version.error})
                span.set_status(Status(StatusCode.ERROR, version.error))
                span.set_attribute(attr.ADAPTER_STATE, "refused")
                log.warning("model %s version %d from %s refused: %s", name, version.version, directory, version.error)
                return version
            version.swap_ms = (time.perf_counter() - noticed) * 1e3
            span.set_attributes({attr.ADAPTER_STATE: "live", attr.ADAPTER_SWAP_MS: version.swap_ms})
            if replaced is not None:
                self.engine.drain(replaced)  # the old workers finish what they hold
            self.registry.release(old)
            if previous is not None:
                previous.state = "retired"
                previous.retire_ms = (time.perf_counter() - (previous.switched_at or time.perf_counter())) * 1e3
        return version

    def _why_keep_loaded(self, name: str) -> str | None:
        """Why keep-warm must not evict model ``name``: the directory it would load back from holds another version
        than the one serving (refused, or not checked yet); None where it would load back what it serves, or is not
        watched (nothing is known of its versions)."""
        live = _live(self._model_versions.get(name, []))
        if live is None:
            return None
        source = os.path.abspath(os.path.expanduser(self.registry.settings(name).source))
        digest = content_digest(source, "config.json")
        if digest == live.digest:
            return None
        refused = self._refused_models.get(name, {}).get(digest)
        now = ("does not exist" if not os.path.exists(source)
               else f"holds version {refused.version}, which was refused ({refused.error})" if refused is not None
               else "holds a new version, not checked yet")
        return f"{source} {now}, so it could not load back version {live.version}, which it serves"

    def _check_loaded_version(self, name: str, loaded: LoadedModel) -> None:
        """Check a watched model loaded back after keep-warm evicted it, whose folder now holds another
        version than the one that served: as a live swap checks one (:func:`check_version`), since the watch, which
        saw it come while the model was out, had nothing to check it against. It joins :meth:`model_versions`, live
        or refused (then ModelLoadError, and the load is undone)."""
        with self._versions_lock:
            self._check_loaded_version_locked(name, loaded)

    def _check_loaded_version_locked(self, name: str, loaded: LoadedModel) -> None:
        versions = self._model_versions.get(name)
        checks = self._model_checks.get(name)
        live = _live(versions) if versions else None
        if live is None or checks is None:
            return
        source = os.path.abspath(os.path.expanduser(loaded.source))
        digest = content_digest(source, "config.json")
        if digest == live.digest:
            return
        # The watcher may be staging this same version (it saw the folder change as the model was loaded back): this
        # load checks it, and the watcher, finding it decided, switches to nothing.
        version = next((v for v in versions if v.state == "staging" and v.digest == digest and v.path == source), None)
        if version is None:
            version = AdapterVersion(name, max(v.version for v in versions) + 1, source, digest)
            versions.append(version)
        try:
            check_version(checks[0], loaded, checks[1], "it")
        except Exception as exc:
            version.state = "refused"
            version.error = exc.message if isinstance(exc, WorkbenchError) else f"{type(exc).__name__}: {exc}"
            self._refused_models.setdefault(name, {})[digest] = version
            log.warning("model %s version %d from %s, written while keep-warm had it evicted, refused as it loaded "
                        "back: %s", name, version.version, source, version.error)
            raise _refused_load(name, source, version) from None
        version.state, version.loaded_at = "live", time.time()
        live.state = "retired"  # its weights went with the eviction
        log.info("model %s loaded back with version %d from %s, written while keep-warm had it evicted", name,
                 version.version, source)

    def _check_not_refused(self, name: str, settings: LoadSettings) -> None:
        """Refuse to load model ``name`` from a directory that holds a version a watch of it refused."""
        refused = self._refused_models.get(name)
        if not refused:
            return
        source = os.path.abspath(os.path.expanduser(settings.source))
        if not os.path.isdir(source):
            return  # the load says what is missing
        version = refused.get(content_digest(source, "config.json"))
        if version is not None and version.path == source:
            raise _refused_load(name, source, version)

    def _spec_context(self) -> tuple[Any, ...]:
        """What a chain spec is validated against here: the models, the modules its code may come from, the adapters."""
        return tuple(self.registry.names()), self._allowed_modules, self.registry.adapters()

    def _stop_watchers(self, model: str | None = None) -> None:
        for key in [k for k in self._adapter_watchers if model is None or k[0] == model]:
            self.unwatch_adapter(*key)
        for name in [n for n in self._model_watchers if model is None or n == model]:
            self.unwatch_model(name)

    def __enter__(self) -> Workbench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Workbench models={self.registry.names()} runs={len(self._runs)}>"


def _live(versions: list[AdapterVersion]) -> AdapterVersion | None:
    """The version of a watched model that serves now (the newest live one), if any."""
    return next((v for v in reversed(versions) if v.state == "live"), None)


def _refused_load(name: str, source: str, version: AdapterVersion) -> ModelLoadError:
    """The refusal to load model ``name`` from ``source``, which holds ``version``, refused as a version of it."""
    return ModelLoadError(
        f"model {name!r} cannot load from {source}: it holds version {version.version}, which was refused "
        f"({version.error})",
        hint=f"put a version there that passes the checks, or bench.unload({name!r}, forget=True) and load it anew")


def _weight(run: Run) -> int:
    """Roughly the bytes a run's inputs and outputs hold: text and bytes by their size, containers by what they hold
    (at most ``_WEIGHED`` values looked at; the rest counted at the average so far), anything else as a small object,
    each object once."""
    total, seen, held = 0, 0, set()
    stack: list[Any] = [*run.inputs.values(), *run.outputs.values()]
    while stack and seen < _WEIGHED:
        value = stack.pop()
        seen += 1
        if id(value) in held:  # an output that is an input (or another output) holds no more
            continue
        held.add(id(value))
        if isinstance(value, (str, bytes, bytearray)):
            total += sys.getsizeof(value)
        elif isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
            total += 64 * len(value)
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
            total += 8 * len(value)
        else:
            total += 64
    return total + (total // seen) * len(stack) if seen else 0


_WEIGHED = 10_000


def _first_device(places: tuple[str | None, ...] | None) -> str | None:
    """The first device a replicas list names: where the model's weights load."""
    return next((p for p in places or () if p is not None and not is_server_url(p)), None)


def _ray_restarts(replicas: ReplicaSet | None) -> int | None:
    """How often the Ray actors of a model's replicas were started again, all told; None for a model not on Ray."""
    backends = [w.backend for w in replicas.workers if isinstance(w.backend, RayBackend)] if replicas else []
    return sum(b.restarts for b in backends) if backends else None


# What load() and register() take besides a model's name and source.
_LOAD_SETTINGS = ("batching", "replicas", "balance", *(f.name for f in dataclasses.fields(LoadSettings)
                                                       if f.name != "source"))


def _refuse_unknown(call: str, given: Iterable[str], known: list[str], error: type[WorkbenchError]) -> None:
    """Refuse the first of ``given`` not in ``known`` as ``call``'s misspelt setting: "did you mean", and ``known``."""
    unknown = [key for key in given if key not in known]
    if unknown:
        raise error(f"{call}() takes no setting {unknown[0]!r}{did_you_mean(unknown[0], known)}",
                    hint=f"its settings: {', '.join(known)}")


def _check_model_name(name: object) -> None:
    """A model's name is what specs write after ``model:``: text that is not blank and has no spaces at its ends."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise SettingsError(f"model name {name!r:.80} is not text without spaces at its ends",
                            hint="name it as chain specs will write it after  model:  e.g. bench.load('tiny', PATH)")
    if len(name) > MAX_MODEL_NAME_CHARS:  # it names spans, metrics and every table's rows
        raise SettingsError(f"model name {name!r:.80}... is {len(name):,} characters; a name has at most "
                            f"{MAX_MODEL_NAME_CHARS}", hint="name it as chain specs will write it after  model:  "
                            "e.g. bench.load('tiny', PATH)")
    replica = REPLICA_NAME.match(name)
    if replica is not None:  # generate, inject, set_breaker and the tables would mistake one for the other
        raise SettingsError(f"model name {name!r:.80} ends in #{replica['index']}, which names replica "
                            f"{replica['index']} of a model with replicas",
                            hint=f"name it without the '#' (e.g. {name.replace('#', '-')!r:.80})")


def _batching(policy: BatchingPolicy | str | None) -> BatchingPolicy | None:
    """A batching policy from an object or its short name; anything else is a StrategyError, not a crash later."""
    if policy is None or isinstance(policy, BatchingPolicy):
        return policy
    if isinstance(policy, str):
        return parse_policy(policy)
    raise StrategyError(f"batching {policy!r:.80} is neither a batching policy nor its name",
                        hint=f"wb.DynamicBatching(16, 5), or one of the forms {POLICY_FORMS}")


def _pid(backend: object) -> int | None:
    """The process a model's backend runs it in: its child's, or this one."""
    if isinstance(backend, ProcessBackend):
        return backend.pid
    return os.getpid() if isinstance(backend, TransformersBackend) else None


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """The loop thread: run until the workbench closes, then cancel what is left and close the loop."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


_current: Workbench | None = None
_current_lock = threading.Lock()


def current() -> Workbench:
    """The kernel's default Workbench, created on first use (and again after it was closed); the magics use it too."""
    global _current
    with _current_lock:
        if _current is None or _current.closed:
            _current = Workbench()
        return _current


def set_current(bench: Workbench) -> Workbench:
    """Make ``bench`` the default that :func:`current` and the magics use."""
    global _current
    with _current_lock:
        _current = bench
    return bench
