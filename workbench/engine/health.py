"""A model's health as its probes found it: a model that fails a probe leaves rotation until one passes."""

from __future__ import annotations

import threading
import time
from typing import Any

from opentelemetry.trace import Span

from workbench.errors import describe
from workbench.tracing import attributes as attr

HEALTHY, UNHEALTHY, UNCHECKED = "healthy", "unhealthy", "unchecked"


class ModelHealth:
    """One model's health as its probes found it: unchecked until the first probe."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.state = UNCHECKED
        self.failures = 0
        self.probe_ms: float | None = None
        self.error: str | None = None
        self.checked_at: float | None = None
        self._lock = threading.Lock()

    @property
    def serving(self) -> bool:
        """Whether requests may go to the model: every state but unhealthy."""
        return self.state != UNHEALTHY

    def record(self, error: BaseException | None, probe_ms: float, failures_to_fail: int, span: Span) -> None:
        """Take one probe's outcome; ``failures_to_fail`` failed probes in a row make the model unhealthy."""
        with self._lock:
            self.probe_ms, self.checked_at = probe_ms, time.time()
            if error is None:
                self.failures, self.error = 0, None
                new = HEALTHY
            else:
                self.failures += 1
                self.error = describe(error)
                new = UNHEALTHY if self.failures >= failures_to_fail else self.state
            if new != self.state:
                span.add_event(f"health.{new}", {attr.MODEL_NAME: self.model, attr.HEALTH_PREVIOUS: self.state})
                self.state = new

    def row(self) -> dict[str, Any]:
        with self._lock:
            return {"name": self.model, "health": self.state, "failures": self.failures,
                    "probe_ms": self.probe_ms, "error": self.error}
