"""Engine: per-model workers over backends, batching policies, preloading, breakers, health, faults."""

from workbench.engine.batching import (
    BatchingPolicy,
    ContinuousBatching,
    DynamicBatching,
    NoBatching,
    StaticBatching,
)
from workbench.engine.engine import Call, Engine
from workbench.engine.faults import Faults, InjectedFault, InjectedOutOfMemory
from workbench.engine.requests import GenerationParams, GenerationRequest, GenerationResult

__all__ = [
    "BatchingPolicy",
    "Call",
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
    "StaticBatching",
]
