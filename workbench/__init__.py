"""AutoGLM Workbench: multi-hop LLM call chains on local models, traced span by span, in Jupyter."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from workbench.bench import Session, Workbench, current, set_current  # noqa: E402
from workbench.chains.chain import Chain  # noqa: E402
from workbench.chains.run import Run  # noqa: E402
from workbench.engine import (  # noqa: E402
    BatchingPolicy,
    ContinuousBatching,
    DynamicBatching,
    GenerationParams,
    GenerationResult,
    NoBatching,
    StaticBatching,
)
from workbench.errors import (  # noqa: E402
    ContextWindowExceeded,
    HopFailed,
    MissingInputError,
    ModelLoadError,
    SpecError,
    TemplateError,
    UnknownModelError,
    WorkbenchError,
)
from workbench.models.tiny import tiny_model  # noqa: E402
from workbench.tracing import Trace  # noqa: E402

__all__ = [
    "BatchingPolicy",
    "Chain",
    "ContextWindowExceeded",
    "ContinuousBatching",
    "DynamicBatching",
    "GenerationParams",
    "GenerationResult",
    "HopFailed",
    "MissingInputError",
    "ModelLoadError",
    "NoBatching",
    "Run",
    "Session",
    "SpecError",
    "StaticBatching",
    "TemplateError",
    "Trace",
    "UnknownModelError",
    "Workbench",
    "WorkbenchError",
    "__version__",
    "current",
    "load_ipython_extension",
    "set_current",
    "tiny_model",
]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext workbench``: register the ``%autoglm`` line and cell magics."""
    from workbench.notebook.magics import register

    register(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from workbench.notebook.magics import unregister

    unregister(ipython)
