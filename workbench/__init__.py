"""AutoGLM Workbench: multi-hop LLM call chains on local models, traced span by span, in Jupyter."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from workbench import _gateway
from workbench._version import __version__

if TYPE_CHECKING:
    from workbench.bench import Session, Workbench, current, set_current
    from workbench.chains.batch import MapInterrupted, RunBatch
    from workbench.chains.chain import Chain
    from workbench.chains.events import AttemptFailed, HopFinished, HopStarted, RunFinished, Token
    from workbench.chains.resilience import RetryPolicy
    from workbench.chains.context import ContextStore, InMemoryContextStore, RunRecord, SessionLimits
    from workbench.chains.run import Run, RunInterrupted
    from workbench.chains.live import ConfigRefusal, ConfigVersion, ConfigWarning
    from workbench.chains.configfile import LiveConfig
    from workbench.errors import ConfigError
    from workbench.chains.sqlite_store import SQLiteContextStore
    from workbench.engine import (
        BatchingPolicy,
        ContinuousBatching,
        DynamicBatching,
        Faults,
        GenerationParams,
        GenerationResult,
        InjectedFault,
        NoBatching,
        StaticBatching,
    )
    from workbench.errors import (
        CircuitOpen,
        ContextWindowExceeded,
        HopFailed,
        HopTimeout,
        InvalidInput,
        MissingInputError,
        ModelActorDied,
        ModelError,
        ModelLoadError,
        ModelOutOfMemory,
        ModelProcessDied,
        ModelUnhealthy,
        ParseError,
        RetriesExhausted,
        RunCancelled,
        RunError,
        ServingError,
        SettingsError,
        SpecError,
        StoreError,
        WorkbenchClosed,
        StrategyError,
        TemplateError,
        UnknownModelError,
        WorkbenchError,
        WorkloadError,
    )
    from workbench.experiments import ClosedLoop, CompareInterrupted, Comparison, PoissonArrivals, compare
    from workbench.engine.preloading import Eager, KeepWarm, Lazy, Prefetch, PreloadingStrategy
    from workbench.engine.balancing import (
        BalancePolicy,
        LeastLoaded,
        PowerOfTwo,
        RoundRobin,
        SessionHash,
        Weighted,
    )
    from workbench.models.tiny import tiny_model
    from workbench.models.tiny import tiny_lora
    from workbench.models.adapters import AdapterRules
    from workbench.errors import AdapterError
    from workbench.tracing import Trace
    from workbench.tracing.gcpauses import pauses as gc_pauses
    from workbench.fronts.notebook.widgets import ChainBuilder, ComparisonDashboard, ModelManager, TraceViewer
    from workbench.knowledge import Facts, GraphError, KnowledgeGraph


# Where each public name lives (the imports above, for type checkers, say the same). Names import on
# first use: `import workbench` stays cheap, so `autoglm --help` answers at once and torch and
# transformers load only when something that needs them is touched.
_HOMES = {
    "workbench.bench": ("Session", "Workbench", "current", "set_current"),
    "workbench.chains.batch": ("MapInterrupted", "RunBatch"),
    "workbench.chains.chain": ("Chain",),
    "workbench.chains.events": ("AttemptFailed", "HopFinished", "HopStarted", "RunFinished", "Token"),
    "workbench.chains.resilience": ("RetryPolicy",),
    "workbench.chains.context": ("ContextStore", "InMemoryContextStore", "RunRecord", "SessionLimits"),
    "workbench.chains.run": ("Run", "RunInterrupted"),
    "workbench.chains.live": ("ConfigRefusal", "ConfigVersion", "ConfigWarning"),
    "workbench.chains.configfile": ("LiveConfig",),
    "workbench.chains.sqlite_store": ("SQLiteContextStore",),
    "workbench.engine": (
        "BatchingPolicy", "ContinuousBatching", "DynamicBatching", "Faults", "GenerationParams", "GenerationResult",
        "InjectedFault", "NoBatching", "StaticBatching",
    ),
    "workbench.errors": (
        "CircuitOpen", "ContextWindowExceeded", "HopFailed", "HopTimeout", "InvalidInput", "MissingInputError",
        "ModelActorDied", "ModelError",
        "ModelLoadError", "ModelOutOfMemory", "ModelProcessDied", "ModelUnhealthy", "ParseError", "RetriesExhausted",
        "RunCancelled",
        "RunError", "ServingError", "SettingsError", "SpecError", "StoreError", "WorkbenchClosed", "StrategyError",
        "TemplateError", "UnknownModelError", "WorkbenchError", "WorkloadError",
        "ConfigError",
        "AdapterError",
    ),
    "workbench.experiments": ("ClosedLoop", "CompareInterrupted", "Comparison", "PoissonArrivals", "compare"),
    "workbench.engine.preloading": ("Eager", "KeepWarm", "Lazy", "Prefetch", "PreloadingStrategy"),
    "workbench.engine.balancing": ("BalancePolicy", "LeastLoaded", "PowerOfTwo", "RoundRobin", "SessionHash", "Weighted"),
    "workbench.models.tiny": ("tiny_model", "tiny_lora"),
    "workbench.models.adapters": ("AdapterRules",),
    "workbench.tracing": ("Trace",),
    # The widgets bring in ipywidgets and anywidget: a script or a worker that shows none never pays for them.
    "workbench.fronts.notebook.widgets": ("ChainBuilder", "ComparisonDashboard", "ModelManager", "TraceViewer"),
    "workbench.knowledge": ("Facts", "GraphError", "KnowledgeGraph"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
_RENAMED = {"gc_pauses": ("workbench.tracing.gcpauses", "pauses")}
__all__ = sorted([*_HOME_OF, *_RENAMED, "__version__", "load_ipython_extension"])


def __getattr__(name: str) -> Any:
    if name in _HOME_OF:
        module, attribute = _HOME_OF[name], name
    elif name in _RENAMED:
        module, attribute = _RENAMED[name]
    else:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _start_server(bench: Any, **options: Any) -> Any:
    """``bench.serve(...)``: start the gateway (imported now, on first use) for ``bench``; see workbench/_gateway.py."""
    from workbench.fronts.server import serve

    return serve(bench, **options)


_gateway.start_server = _start_server


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext workbench``: register the ``%autoglm`` line and cell magics."""
    from workbench.fronts.notebook.magics import register

    register(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from workbench.fronts.notebook.magics import unregister

    unregister(ipython)
