"""AutoGLM Workbench: multi-hop LLM call chains on local models, traced span by span, in Jupyter."""

from __future__ import annotations

from typing import Any

from workbench._version import __version__

from workbench.bench import Session, Workbench, current, set_current
from workbench.chains.batch import MapInterrupted, RunBatch
from workbench.chains.chain import Chain
from workbench.chains.resilience import RetryPolicy
from workbench.chains.context import ContextStore, InMemoryContextStore, RunRecord
from workbench.chains.run import Run
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
    ModelError,
    ModelLoadError,
    ModelOutOfMemory,
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
from workbench.experiments import ClosedLoop, Comparison, PoissonArrivals, compare
from workbench.engine.preloading import Eager, KeepWarm, Lazy, Prefetch, PreloadingStrategy
from workbench.models.tiny import tiny_model
from workbench.tracing import Trace
from workbench.tracing.gcpauses import pauses as gc_pauses

__all__ = [
    "BatchingPolicy",
    "Chain",
    "ChainBuilder",
    "CircuitOpen",
    "ClosedLoop",
    "Comparison",
    "ComparisonDashboard",
    "ContextStore",
    "ContextWindowExceeded",
    "ContinuousBatching",
    "DynamicBatching",
    "Eager",
    "Faults",
    "GenerationParams",
    "GenerationResult",
    "HopFailed",
    "HopTimeout",
    "InMemoryContextStore",
    "InjectedFault",
    "InvalidInput",
    "KeepWarm",
    "Lazy",
    "MapInterrupted",
    "MissingInputError",
    "ModelError",
    "ModelLoadError",
    "ModelManager",
    "ModelOutOfMemory",
    "ModelUnhealthy",
    "NoBatching",
    "PoissonArrivals",
    "Prefetch",
    "PreloadingStrategy",
    "ParseError",
    "RetriesExhausted",
    "RetryPolicy",
    "Run",
    "RunBatch",
    "RunCancelled",
    "RunError",
    "RunRecord",
    "SQLiteContextStore",
    "ServingError",
    "Session",
    "SettingsError",
    "SpecError",
    "StaticBatching",
    "StoreError",
    "WorkbenchClosed",
    "StrategyError",
    "TemplateError",
    "Trace",
    "TraceViewer",
    "UnknownModelError",
    "Workbench",
    "WorkbenchError",
    "WorkloadError",
    "__version__",
    "compare",
    "current",
    "gc_pauses",
    "load_ipython_extension",
    "set_current",
    "tiny_model",
]


# The widgets bring in ipywidgets and anywidget: they import on first use, so a script or a
# worker process that never shows one does not pay for them.
_WIDGETS = frozenset({"ChainBuilder", "ComparisonDashboard", "ModelManager", "TraceViewer"})


def __getattr__(name: str) -> Any:
    if name in _WIDGETS:
        from workbench.fronts.notebook import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext workbench``: register the ``%autoglm`` line and cell magics."""
    from workbench.fronts.notebook.magics import register

    register(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from workbench.fronts.notebook.magics import unregister

    unregister(ipython)
