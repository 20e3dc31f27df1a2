"""The engine: one worker per loaded model, and the door requests come in through."""

from __future__ import annotations

import threading
import time

from opentelemetry.trace import Span

from workbench.engine.backend import TransformersBackend
from workbench.engine.batching import BatchingPolicy, NoBatching
from workbench.engine.requests import GenerationParams, GenerationRequest, GenerationResult
from workbench.engine.worker import ModelWorker
from workbench.models.registry import ModelRegistry
from workbench.tracing import Tracing, mark_error
from workbench.tracing import attributes as attr


class Engine:
    """Routes generation requests to the worker of the model they name."""

    def __init__(self, registry: ModelRegistry, tracing: Tracing) -> None:
        self._registry = registry
        self._tracing = tracing
        self._lock = threading.Lock()
        self._workers: dict[str, ModelWorker] = {}

    def start(self, name: str, policy: BatchingPolicy | None = None) -> ModelWorker:
        """Start the worker of the loaded model ``name``."""
        loaded = self._registry.get(name)
        policy = policy or NoBatching()
        policy.check(loaded)
        worker = ModelWorker(name, TransformersBackend(loaded), policy, self._tracing)
        with self._lock:
            self._workers[name] = worker
        return worker

    def stop(self, name: str) -> None:
        with self._lock:
            worker = self._workers.pop(name, None)
        if worker is not None:
            worker.stop()

    def close(self) -> None:
        for name in list(self._workers):
            self.stop(name)

    def worker(self, name: str) -> ModelWorker:
        with self._lock:
            worker = self._workers.get(name)
        if worker is None:
            self._registry.get(name)  # raises the user-facing error: unknown, or registered but not loaded
            raise RuntimeError(f"model {name!r} is loaded but has no worker")
        return worker

    def set_policy(self, name: str, policy: BatchingPolicy) -> None:
        """Swap the batching policy of a running worker, live: a worker waiting inside the old one gives way at once."""
        worker = self.worker(name)
        policy.check(worker.backend.loaded)
        worker.set_policy(policy)

    def policy(self, name: str) -> BatchingPolicy:
        return self.worker(name).policy

    def submit(
        self,
        model: str,
        prompt: str,
        params: GenerationParams,
        parent: Span | None = None,
        hop: str | None = None,
    ) -> GenerationRequest:
        """Tokenize ``prompt`` here, in the caller's thread, and queue it for ``model``.

        The request's span (``text_completion {model}``) starts now, as a child of ``parent``,
        and the worker ends it, so its duration is the request's end-to-end latency.
        """
        worker = self.worker(model)
        loaded = worker.backend.loaded
        span = self._tracing.start_span(
            f"{attr.TEXT_COMPLETION} {model}",
            parent,
            attributes={
                attr.SPAN_KIND: "LLM",
                attr.OPERATION_NAME: attr.TEXT_COMPLETION,
                attr.PROVIDER_NAME: attr.PROVIDER,
                attr.REQUEST_MODEL: model,
                attr.REQUEST_MAX_TOKENS: params.max_new_tokens,
                attr.REQUEST_TEMPERATURE: params.temperature,
                attr.REQUEST_TOP_P: params.top_p,
                attr.MODEL_NAME: model,
                attr.MODEL_DEVICE: str(loaded.device),
                attr.MODEL_DTYPE: str(loaded.dtype).removeprefix("torch."),
                attr.INPUT_VALUE: prompt,
                **({attr.HOP_NAME: hop} if hop else {}),
                **({attr.REQUEST_TOP_K: params.top_k} if params.top_k else {}),
                **({attr.REQUEST_SEED: params.seed} if params.seed is not None else {}),
            },
        )
        started = time.perf_counter()
        try:
            input_ids, truncated = worker.backend.tokenize(prompt, params, hop)
        except BaseException as exc:
            mark_error(span, exc)
            span.end()
            raise
        span.set_attributes(
            {
                attr.USAGE_INPUT_TOKENS: len(input_ids),
                attr.TOKENIZE_MS: (time.perf_counter() - started) * 1e3,
                **({attr.TRUNCATED_TOKENS: truncated} if truncated else {}),
            }
        )
        request = GenerationRequest(model, input_ids, params, span, hop=hop, truncated_tokens=truncated)
        try:
            worker.submit(request)
        except BaseException as exc:
            mark_error(span, exc)
            span.end()
            raise
        return request

    def generate(self, model: str, prompt: str, params: GenerationParams | None = None) -> GenerationResult:
        """Submit one prompt and wait for its result (a convenience for scripts and tests)."""
        return self.submit(model, prompt, params or GenerationParams()).future.result()
