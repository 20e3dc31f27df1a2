"""The Workbench: one registry, engine, tracer and context store, and the kernel's default one."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from workbench.chains.chain import Chain
from workbench.chains.context import ContextStore, InMemoryContextStore, RunRecord
from workbench.chains.run import Run
from workbench.chains.runner import Runner, check_inputs
from workbench.chains.spec import ChainSpec, parse_spec
from workbench.engine import BatchingPolicy, Engine, GenerationParams, GenerationResult
from workbench.errors import WorkbenchError
from workbench.models.registry import LoadedModel, LoadSettings, ModelRegistry
from workbench.tracing import Trace, Tracing

if TYPE_CHECKING:
    import os

    import pandas as pd

MAX_RUNS_KEPT = 10_000


class Session:
    """A named conversation: runs that share history across calls."""

    def __init__(self, store: ContextStore, session_id: str) -> None:
        self.id = session_id
        self._store = store

    def records(self) -> list[RunRecord]:
        """The session's runs, oldest first."""
        return self._store.history(self.id)

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

    ``otlp_endpoint`` also exports spans to an OTLP/HTTP collector such as Phoenix or Jaeger.
    """

    def __init__(
        self,
        *,
        otlp_endpoint: str | None = None,
        store: ContextStore | None = None,
        hop_threads: int = 64,
    ) -> None:
        self.tracing = Tracing(otlp_endpoint)
        self.registry = ModelRegistry(self.tracing)
        self.engine = Engine(self.registry, self.tracing)
        self.store = store if store is not None else InMemoryContextStore()
        self._hop_pool = ThreadPoolExecutor(max_workers=hop_threads, thread_name_prefix="workbench-hop")
        self._runner = Runner(self.engine, self.tracing, self.store, self._hop_pool)
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._runs_lock = threading.Lock()
        self._chains: dict[str, Chain] = {}

    # -- models --------------------------------------------------------------------------------

    def load(
        self,
        name: str,
        source: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        adapter: str | os.PathLike[str] | None = None,
        batching: BatchingPolicy | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        revision: str | None = None,
    ) -> LoadedModel:
        """Load a local directory or hub id as ``name`` and start its worker.

        Weights must be safetensors unless ``allow_pickle=True``; repository code never runs
        unless ``trust_remote_code=True``. ``adapter`` is a PEFT (LoRA) adapter directory.
        Without ``source``, loads a model registered earlier with :meth:`register`.
        """
        if source is None:
            settings = self.registry.settings(name)
        else:
            settings = LoadSettings(
                source=str(source),
                device=device,
                dtype=dtype,
                adapter=str(adapter) if adapter is not None else None,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                revision=revision,
            )
        loaded = self.registry.load(name, settings)
        try:
            self.engine.start(name, batching)
        except BaseException:  # a policy that cannot serve this model: leave nothing half-loaded
            self.registry.unload(name)
            raise
        return loaded

    def register(self, name: str, source: str | os.PathLike[str], **settings: Any) -> None:
        """Make a model known to chains without loading it yet (see :meth:`load`)."""
        self.registry.register(name, LoadSettings(source=str(source), **settings))

    def unload(self, name: str) -> int:
        """Stop the model's worker (failing what is still queued) and free its memory; returns bytes freed."""
        self.engine.stop(name)
        return self.registry.unload(name)

    def models(self) -> pd.DataFrame:
        """One row per known model: name, source, device, dtype, params, memory, load time, state."""
        return self.registry.table()

    def set_batching(self, name: str, policy: BatchingPolicy) -> None:
        """Change a loaded model's batching policy live; no reload."""
        self.engine.set_policy(name, policy)

    def generate(self, model: str, prompt: str, **params: Any) -> GenerationResult:
        """One direct model call, outside any chain (traced as its own text_completion span)."""
        return self.engine.generate(model, prompt, GenerationParams(**params))

    # -- chains --------------------------------------------------------------------------------

    def chain(self, spec: str | Mapping[str, Any], name: str | None = None) -> Chain:
        """Validate a chain spec (YAML text or dict) against the models this workbench knows."""
        parsed = parse_spec(spec, known_models=self.registry.names(), default_name=name)
        if name is not None and parsed.name != name:
            parsed.name = name
        chain = Chain(parsed, self)
        self._chains[parsed.name] = chain
        return chain

    def chains(self) -> dict[str, Chain]:
        """Chains built on this workbench, by name (the latest of each name)."""
        return dict(self._chains)

    def _check_inputs(self, spec: ChainSpec, inputs: Mapping[str, Any]) -> None:
        check_inputs(spec, inputs)

    def _execute(self, spec: ChainSpec, inputs: Mapping[str, Any], session: str | None) -> Run:
        run = self._runner.run(spec, inputs, session)
        with self._runs_lock:
            self._runs[run.id] = run
            while len(self._runs) > MAX_RUNS_KEPT:
                self._runs.popitem(last=False)
        return run

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
        return Session(self.store, session_id)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker and free every model."""
        for name in self.registry.names():
            try:
                self.unload(name)
            except WorkbenchError:
                pass
        self._hop_pool.shutdown(wait=False, cancel_futures=True)
        self.tracing.shutdown()

    def __enter__(self) -> Workbench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Workbench models={self.registry.names()} runs={len(self._runs)}>"


_current: Workbench | None = None
_current_lock = threading.Lock()


def current() -> Workbench:
    """The kernel's default Workbench, created on first use; the magics use it too."""
    global _current
    with _current_lock:
        if _current is None:
            _current = Workbench()
        return _current


def set_current(bench: Workbench) -> Workbench:
    """Make ``bench`` the default that :func:`current` and the magics use."""
    global _current
    with _current_lock:
        _current = bench
    return bench
