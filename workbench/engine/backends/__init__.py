"""Backends: what runs a model for the engine. ``Backend`` is the seam; transformers in-process is the first."""

from workbench.engine.backends.base import Backend, BackendOutOfMemory, BatchTiming, Scheduler

__all__ = ["Backend", "BackendOutOfMemory", "BatchTiming", "Scheduler"]
