"""Engine: the transformers backend, per-model workers, batching policies."""

from workbench.engine.batching import (
    BatchingPolicy,
    ContinuousBatching,
    DynamicBatching,
    NoBatching,
    StaticBatching,
)
from workbench.engine.engine import Engine
from workbench.engine.requests import GenerationParams, GenerationRequest, GenerationResult

__all__ = [
    "BatchingPolicy",
    "ContinuousBatching",
    "DynamicBatching",
    "Engine",
    "GenerationParams",
    "GenerationRequest",
    "GenerationResult",
    "NoBatching",
    "StaticBatching",
]
