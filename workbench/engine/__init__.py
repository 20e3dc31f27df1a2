"""Engine: the transformers backend, per-model workers, batching policies, resilience."""

from workbench.engine.batching import (
    BatchingPolicy,
    ContinuousBatching,
    DynamicBatching,
    NoBatching,
    StaticBatching,
)
from workbench.engine.engine import Engine
from workbench.engine.faults import Faults, InjectedFault, InjectedOutOfMemory
from workbench.engine.requests import GenerationParams, GenerationRequest, GenerationResult
from workbench.engine.resilience import RetryPolicy

__all__ = [
    "BatchingPolicy",
    "ContinuousBatching",
    "DynamicBatching",
    "Engine",
    "Faults",
    "GenerationParams",
    "GenerationRequest",
    "GenerationResult",
    "InjectedFault",
    "InjectedOutOfMemory",
    "NoBatching",
    "RetryPolicy",
    "StaticBatching",
]
