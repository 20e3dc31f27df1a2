"""The engine: one worker per loaded model, and the door requests come in through."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent.futures import TimeoutError as FutureTimeout

from opentelemetry.trace import Span

from workbench.engine.backend import TransformersBackend
from workbench.engine.batching import BatchingPolicy, NoBatching
from workbench.engine.requests import GenerationParams, GenerationRequest, GenerationResult
from workbench.engine.worker import ModelWorker
from workbench.errors import HopTimeout, ModelUnhealthy
from workbench.models.preloading import Preloader
from workbench.models.registry import ModelRegistry
from workbench.tracing import Tracing, mark_error
from workbench.tracing import attributes as attr
from workbench.tracing import openinference


class Engine:
    """Routes generation requests to the worker of the model they name."""

    def __init__(self, registry: ModelRegistry, tracing: Tracing) -> None:
        self._registry = registry
        self._tracing = tracing
        self._lock = threading.Lock()
        self._workers: dict[str, ModelWorker] = {}
        self._policies: dict[str, BatchingPolicy] = {}  # kept across unloads, so a reload batches the same way
        self.preloader = Preloader(registry, tracing, self.start, self.stop)

    def start(self, name: str, policy: BatchingPolicy | None = None) -> ModelWorker:
        """Start the worker of the loaded model ``name``, under ``policy`` or the one configured for it."""
        loaded = self._registry.get(name)
        policy = policy or self._policies.get(name) or NoBatching()
        policy.check(loaded)
        worker = ModelWorker(name, TransformersBackend(loaded), policy, self._tracing)
        with self._lock:
            self._workers[name] = worker
            self._policies[name] = policy
        return worker

    def forget(self, name: str) -> None:
        """Drop the batching policy configured for ``name`` (the model is no longer known)."""
        with self._lock:
            self._policies.pop(name, None)

    def stop(self, name: str) -> None:
        with self._lock:
            worker = self._workers.pop(name, None)
        if worker is not None:
            worker.stop()

    def close(self) -> None:
        for name in list(self._workers):
            self.stop(name)

    def workers(self) -> dict[str, ModelWorker]:
        """The running workers by model name (a snapshot)."""
        with self._lock:
            return dict(self._workers)

    def worker(self, name: str) -> ModelWorker:
        with self._lock:
            worker = self._workers.get(name)
        if worker is None:
            self._registry.get(name)  # raises the user-facing error: unknown, or registered but not loaded
            raise RuntimeError(f"model {name!r} is loaded but has no worker")
        return worker

    def set_policy(self, name: str, policy: BatchingPolicy) -> None:
        """Swap the batching policy of a running worker, live: a worker waiting inside the old one gives way at once.

        For a registered model that is not loaded, the policy is kept for when it loads.
        """
        with self._lock:
            worker = self._workers.get(name)
        if worker is None:
            self._registry.settings(name)  # an unknown model is a clear error
            with self._lock:
                self._policies[name] = policy
            return
        policy.check(worker.backend.loaded)
        worker.set_policy(policy)
        with self._lock:
            self._policies[name] = policy

    def policy(self, name: str) -> BatchingPolicy:
        """The policy ``name`` runs under, or will once it loads."""
        with self._lock:
            worker = self._workers.get(name)
            configured = self._policies.get(name)
        if worker is not None:
            return worker.policy
        self._registry.settings(name)  # an unknown model is a clear error
        return configured or NoBatching()

    def _ready(self, name: str, parent: Span) -> ModelWorker:
        """The worker of ``name``, loading the model first if it is registered but not loaded (lazy on use)."""
        with self._lock:
            worker = self._workers.get(name)
        if worker is None:
            self.preloader.load(name, parent=parent, trigger="on_use")
            worker = self.worker(name)
        return worker

    def submit(
        self,
        model: str,
        prompt: str,
        params: GenerationParams,
        parent: Span | None = None,
        hop: str | None = None,
        *,
        attributes: Mapping[str, object] | None = None,
        cancellable: bool = False,
        probe: bool = False,
    ) -> GenerationRequest:
        """Tokenize ``prompt`` here, in the caller's thread, and queue it for ``model``.

        The request's span (``text_completion {model}``) starts now, as a child of ``parent``,
        and the worker ends it, so its duration is the request's end-to-end latency. A registered
        model that is not loaded loads first, in a ``load`` span under the request's.

        A model out of rotation fails fast: ModelUnhealthy after a failed health probe,
        CircuitOpen while its breaker is open. ``attributes`` go on the request's span;
        ``cancellable`` lets a timeout stop the request's row mid-batch (see :meth:`call`);
        a ``probe`` (health check) passes both gates and counts for neither.
        """
        settings = self._registry.settings(model)  # an unknown model fails here, before any span
        span = self._tracing.start_span(
            f"{attr.TEXT_COMPLETION} {model}",
            parent,
            attributes={
                attr.SPAN_KIND: attr.KIND_LLM,
                **openinference.request(settings.source, params),
                attr.OPERATION_NAME: attr.TEXT_COMPLETION,
                attr.PROVIDER_NAME: attr.PROVIDER,
                attr.REQUEST_MODEL: model,
                attr.REQUEST_MAX_TOKENS: params.max_new_tokens,
                attr.REQUEST_TEMPERATURE: params.temperature,
                attr.REQUEST_TOP_P: params.top_p,
                attr.MODEL_NAME: model,
                **openinference.input_value(prompt),
                **({attr.HOP_NAME: hop} if hop else {}),
                **({attr.REQUEST_TOP_K: params.top_k} if params.top_k else {}),
                **({attr.REQUEST_SEED: params.seed} if params.seed is not None else {}),
                **({attr.PROBE: True} if probe else {}),
                **(attributes or {}),
            },
            run=True,  # without a parent, a request asked for directly (bench.generate) is a run of its own
        )
        self.preloader.begin_use(model)  # from here until served, keep-warm will not evict it
        try:
            worker = self._ready(model, span)
            started = time.perf_counter()
            input_ids, truncated = worker.backend.tokenize(prompt, params, hop)
            trial = False if probe else _admit(worker, span)
        except BaseException as exc:
            self.preloader.end_use(model)
            mark_error(span, exc)
            span.end()
            raise
        loaded = worker.backend.loaded
        span.set_attributes(
            {
                attr.MODEL_DEVICE: str(loaded.device),
                attr.MODEL_DTYPE: str(loaded.dtype).removeprefix("torch."),
                attr.USAGE_INPUT_TOKENS: len(input_ids),
                **openinference.token_counts(len(input_ids)),
                attr.TOKENIZE_MS: (time.perf_counter() - started) * 1e3,
                **({attr.TRUNCATED_TOKENS: truncated} if truncated else {}),
            }
        )
        request = GenerationRequest(
            model, input_ids, params, span, hop=hop, truncated_tokens=truncated,
            probe=probe, cancellable=cancellable, trial=trial,
        )
        request.future.add_done_callback(lambda _: self.preloader.end_use(model))
        try:
            worker.submit(request)
        except BaseException as exc:
            if trial:
                worker.breaker.record(exc, span, trial)  # never ran: hand the half-open trial to the next request
            mark_error(span, exc)
            span.end()
            self.preloader.end_use(model)  # never queued, so the future's callback never runs
            raise
        return request

    def call(
        self,
        model: str,
        prompt: str,
        params: GenerationParams,
        parent: Span | None = None,
        hop: str | None = None,
        *,
        timeout_s: float | None = None,
        attributes: Mapping[str, object] | None = None,
        probe: bool = False,
    ) -> GenerationResult:
        """Submit one prompt and wait for its result, at most ``timeout_s`` seconds.

        On timeout the request is cancelled, dropped from the queue if no batch took it yet, or
        its row stopped in the running padded batch while its batch-mates finish (under
        ContinuousBatching the row runs on and its result is dropped), and HopTimeout is raised.
        """
        request = self.submit(
            model, prompt, params, parent, hop, attributes=attributes, cancellable=timeout_s is not None, probe=probe
        )
        try:
            return request.future.result(timeout=timeout_s)
        except FutureTimeout:
            where = f"hop {hop!r}" if hop else "the request"
            error = HopTimeout(
                f"{where}: model {model!r} gave no answer within {timeout_s:g} s, so the request was cancelled",
                hint="raise the hop's timeout_s, or give the hop retry or a fallback",
            )
            if self.worker(model).cancel(request, error):
                raise error from None
            return request.future.result()  # it finished just as the wait ran out

    def generate(self, model: str, prompt: str, params: GenerationParams | None = None) -> GenerationResult:
        """Submit one prompt and wait for its result (a convenience for scripts and tests)."""
        return self.submit(model, prompt, params or GenerationParams()).future.result()


def _admit(worker: ModelWorker, span: Span) -> bool:
    """Fail fast if ``worker``'s model is out of rotation; True when the request is the breaker's half-open trial."""
    if not worker.health.serving:
        raise ModelUnhealthy(
            f"model {worker.name!r} is out of rotation: its last health probe failed ({worker.health.error})",
            hint="it returns when a probe passes (bench.check_health() probes now); give the hop a fallback",
        )
    return worker.breaker.admit(span)
