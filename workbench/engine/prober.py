"""Health checks: a cheap one-token probe per model, now or every ``interval_s`` from a daemon thread."""

from __future__ import annotations

import threading
import time
from typing import Any

from workbench.engine.engine import Engine
from workbench.engine.requests import GenerationParams
from workbench.engine.worker import ModelWorker
from workbench.errors import SettingsError
from workbench.tracing import Tracing, mark_error
from workbench.tracing import attributes as attr

PROBE_PROMPT = "ok"
PROBE_PARAMS = GenerationParams(max_new_tokens=1)


class HealthChecks:
    """Probes an engine's models: all of them now (:meth:`check`), or every ``interval_s`` from a daemon thread.

    A probe is a one-token generation through the model's queue and worker, so it finds what a
    request would: a hung worker (it times out), a broken model, injected faults. It passes an
    open breaker and an unhealthy mark (a probe is how a model gets back into rotation) and counts
    for neither. Each probe is a ``health_check {model}`` span; changes of health are its events.
    """

    def __init__(self, engine: Engine, tracing: Tracing) -> None:
        self._engine = engine
        self._tracing = tracing
        self.interval_s: float | None = None
        self.timeout_s = 5.0
        self.failures = 1
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def configure(self, interval_s: float | None, timeout_s: float = 5.0, failures: int = 1) -> None:
        """Probe every ``interval_s`` seconds (None: never); ``failures`` failed probes in a row make a model
        unhealthy, and a probe that takes longer than ``timeout_s`` has failed."""
        for name, value in (("interval_s", interval_s), ("timeout_s", timeout_s)):
            # NaN passes a plain comparison (a wait of NaN returns at once: probes without a pause), and a wait
            # longer than TIMEOUT_MAX kills the thread with an OverflowError.
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value <= threading.TIMEOUT_MAX):
                raise SettingsError(
                    f"health checks: {name} must be a number of seconds > 0 (and finite), got {value!r}",
                    hint="bench.set_health_checks(None) turns periodic checks off")
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
            raise SettingsError(f"health checks: failures must be an integer >= 1, got {failures!r}",
                                hint="it is how many failed probes in a row take a model out of rotation")
        self.stop()
        self.interval_s, self.timeout_s, self.failures = interval_s, float(timeout_s), failures
        if interval_s is not None:
            self._stopped = threading.Event()
            self._thread = threading.Thread(target=self._loop, args=(self._stopped,), name="workbench-health",
                                            daemon=True)
            self._thread.start()

    def check(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """Probe ``names`` (every loaded model by default) now, one after another; a health row per replica."""
        workers = self._engine.workers() if names is None else {
            worker.name: worker for name in names for worker in self._engine.replicas_of(name)  # each replica
        }
        return [self._probe(name, worker) for name, worker in workers.items()]

    def stop(self) -> None:
        """Stop periodic checks and wait for a probe in flight."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self, stopped: threading.Event) -> None:
        while not stopped.wait(self.interval_s):
            for name, worker in self._engine.workers().items():
                if not stopped.is_set() and worker.alive:
                    self._probe(name, worker)

    def _probe(self, name: str, worker: ModelWorker) -> dict[str, Any]:
        attributes = {attr.SPAN_KIND: attr.KIND_CHAIN, attr.MODEL_NAME: name, attr.PROBE: True}
        with self._tracing.span(f"health_check {name}", attributes=attributes) as span:
            started = time.perf_counter()
            try:
                self._engine.call(name, PROBE_PROMPT, PROBE_PARAMS, span, timeout_s=self.timeout_s, probe=True)
                error: Exception | None = None
            except Exception as exc:  # a failed probe is a finding, not an error of the checker
                error = exc
                mark_error(span, exc)
            worker.health.record(error, (time.perf_counter() - started) * 1e3, self.failures, span)
            span.set_attribute(attr.HEALTH, worker.health.state)
        return worker.health.row()
