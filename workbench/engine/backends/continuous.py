"""Continuous (iteration-level) batching through transformers' ``ContinuousBatchingManager``."""

from __future__ import annotations

import copy
import functools
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from opentelemetry.trace import Span, Status, StatusCode

from workbench.engine.batching import ContinuousSettings, check_transformers
from workbench.engine.backends.base import OnError, OnResult, next_batch_id, result_from_stamps
from workbench.engine.backends.codec import StreamText, TextCodec
from workbench.engine.requests import GenerationParams, GenerationRequest, GenerationResult
from workbench.errors import StrategyError
from workbench.tracing import attributes as attr

if TYPE_CHECKING:
    from workbench.models.registry import LoadedModel


class ModelSide(Protocol):
    """What the scheduler reads of the in-process backend that starts it: the model, its special tokens, its text."""

    loaded: LoadedModel
    eos_ids: set[int]
    pad_id: int
    codec: TextCodec

    def detokenize(self, tokens: Sequence[int]) -> str: ...

# On a CPU, transformers sizes the paged cache and its static attention mask from free RAM,
# which takes seconds and gigabytes; these bounds keep a CPU scheduler small and quick to start.
CPU_MAX_BATCH_TOKENS = 512
CPU_TOKENS_PER_REQUEST = 1024


def check_model(loaded: LoadedModel) -> None:
    """Raise a WorkbenchError unless ``loaded`` can run under transformers' continuous batching."""
    check_transformers()
    model = loaded.model
    if not callable(getattr(model, "init_continuous_batching", None)):
        raise StrategyError(
            f"model {loaded.name!r} ({type(model).__name__}) has no init_continuous_batching",
            hint="continuous batching needs a transformers causal LM; use DynamicBatching for this model",
        )
    impl = str(getattr(model.config, "_attn_implementation", None))
    if impl not in ("eager", "sdpa", "paged|eager", "paged|sdpa") and "flash" not in impl:
        raise StrategyError(
            f"model {loaded.name!r} uses attention implementation {impl!r}, which continuous batching cannot page",
            hint="load it with sdpa, eager or a flash attention implementation, or use DynamicBatching",
        )


@dataclass
class _Group:
    """The requests admitted together: one batch span, ended when the last of them finishes."""

    span: Span
    batch_id: int
    size: int
    left: int
    failed: bool = False


class ContinuousBackend:
    """Feeds one model's requests to a running ``ContinuousBatchingManager`` and reports each as it finishes.

    The worker thread calls :meth:`submit`; a collector thread reads the manager's results and
    calls ``on_result`` (or ``on_error``) per request. Timings come from the manager's own clock
    reads (``time.perf_counter``, the clock ``GenerationRequest.submitted`` uses): queue wait
    ends when the scheduler first schedules the request, TTFT at its first token's timestamp,
    decode at its last. The manager holds the model (it may switch its attention to a paged
    kernel), so the worker calls :meth:`close` before any padded ``generate``.
    """

    def __init__(
        self, backend: ModelSide, settings: ContinuousSettings, on_result: OnResult, on_error: OnError
    ) -> None:
        self.backend = backend
        self.settings = settings
        self._on_result = on_result
        self._on_error = on_error
        self._manager: Any = None
        self._collector: threading.Thread | None = None
        self._sampling: tuple[Any, ...] | None = None
        self._inflight: dict[str, tuple[GenerationRequest, _Group]] = {}
        # Of each streamed request: how many of its tokens went to its listener, and their text (the collector's own).
        self._streamed: dict[str, tuple[int, StreamText]] = {}  # tokens handed out, and their text
        self._changed = threading.Condition()

    def submit(self, batch: list[GenerationRequest], span: Span) -> None:
        """Admit ``batch`` (equal sampling settings) into the running scheduler; ``span`` ends with its last request.

        The scheduler samples every row from one generator, seeded once when it starts: a seeded request would draw
        from wherever the requests before it (and beside it) left that stream, so the same seed gave another text
        each time. A seeded request that samples therefore runs alone, in a scheduler started for it with its seed
        (the one before it finishes first; ``workbench.batch.mode`` says ``continuous:seeded``): the same seed, the
        same text, at the price of its batching.
        """
        params = batch[0].params
        seeded = params.seed is not None and not params.greedy
        manager = self._manager
        if not seeded and (manager is None or params.sampling != self._sampling or not manager.is_running()):
            self.close()  # waits for the requests it holds
            self._start(params)
        # Counted once the scheduler that runs them is in place: the requests of one with other settings have finished.
        with self._changed:
            inflight = 1 if seeded else len(self._inflight) + len(batch)
        group = _Group(span, next_batch_id(), len(batch), len(batch))
        span.set_attributes(
            {attr.BATCH_ID: group.batch_id, attr.PADDING_TOKENS: 0,
             attr.BATCH_MODE: "continuous:seeded" if seeded else "continuous", attr.BATCH_INFLIGHT: inflight}
        )
        eos = sorted(self.backend.eos_ids) or -1
        for request in batch:
            if seeded:  # alone, in a scheduler started with its seed
                self.close()
                self._start(params)
            request_id = f"wb-{request.id}"
            with self._changed:
                self._inflight[request_id] = (request, group)
                if request.stream:
                    self._streamed[request_id] = (0, self.backend.codec.stream())
            accepted = self._manager.add_request(
                request.input_ids,
                request_id=request_id,
                max_new_tokens=request.params.max_new_tokens,
                streaming=request.stream,  # an output at every step, not only the last
                record_timestamps=True,
                eos_token_id=eos,
            )
            if accepted is None:  # refused: the manager is stopping after a fatal error
                self._finish(request_id, RuntimeError("the continuous batching scheduler stopped before this request"))
            else:
                request.future.add_done_callback(functools.partial(self._cancelled, request_id))

    def _cancelled(self, request_id: str, future: Future[GenerationResult]) -> None:
        """Stop the row of a request its caller gave up on (a timeout, a stream left early, a cancelled run): it leaves
        the scheduler at its next step, and its slot and KV blocks go to the requests that still wait."""
        if not future.cancelled() and future.exception() is None:
            return  # it finished
        with self._changed:
            running = request_id in self._inflight  # not when it failed here: that took it out first
            manager = self._manager
        if running and manager is not None:
            manager.cancel_request(request_id)
            self._finish(request_id, None)

    def close(self) -> None:
        """Wait for every admitted request to finish, then stop the scheduler and give the model back."""
        manager, collector = self._manager, self._collector
        if manager is None:
            return
        with self._changed:
            self._changed.wait_for(lambda: not self._inflight or not manager.is_running())
        manager.stop(block=True)
        manager.destroy()
        if collector is not None:
            collector.join()
        self._manager = self._collector = self._sampling = None

    # -- the scheduler -------------------------------------------------------------------------

    def _start(self, params: GenerationParams) -> None:
        from transformers import ContinuousBatchingConfig

        loaded = self.backend.loaded
        generation = copy.deepcopy(loaded.model.generation_config)
        generation.update(**params.generate_kwargs())
        generation.eos_token_id = sorted(self.backend.eos_ids) or None
        generation.pad_token_id = self.backend.pad_id
        policy = self.settings
        settings: dict[str, Any] = {
            "max_requests_per_batch": policy.max_batch,
            "max_batch_tokens": policy.max_batch_tokens,
            "num_blocks": policy.num_blocks,
            "seed": params.seed,
        }
        if policy.page_size is not None:
            settings["page_size"] = policy.page_size
        if loaded.device.type == "cpu":
            page = policy.page_size or ContinuousBatchingConfig.page_size
            per_request = min(loaded.context_window or CPU_TOKENS_PER_REQUEST, CPU_TOKENS_PER_REQUEST)
            settings["num_blocks"] = policy.num_blocks or math.ceil(policy.max_batch * per_request / page)
            settings["max_batch_tokens"] = policy.max_batch_tokens or CPU_MAX_BATCH_TOKENS
        try:
            manager = loaded.model.init_continuous_batching(
                generation_config=generation, continuous_batching_config=ContinuousBatchingConfig(**settings)
            )
        except (ValueError, TypeError, RuntimeError) as exc:
            raise StrategyError(
                f"continuous batching could not start for model {loaded.name!r}: {exc}",
                hint="check the ContinuousBatching settings, or use DynamicBatching",
            ) from exc
        with torch.inference_mode():  # the manager's loop runs in its starter's inference mode
            manager.start()
        self._manager, self._sampling = manager, params.sampling
        self._collector = threading.Thread(
            target=self._collect, args=(manager,), name=f"workbench-continuous-{loaded.name}", daemon=True
        )
        self._collector.start()

    def _collect(self, manager: Any) -> None:
        """Turn the manager's finished outputs into results until it stops."""
        while True:
            output = manager.get_result(timeout=0.1)
            if output is None:
                if not manager.is_running():
                    with self._changed:
                        left = list(self._inflight)
                    for request_id in left:
                        self._finish(request_id, RuntimeError("the continuous batching scheduler stopped"))
                    return
                continue
            if output.request_id in self._streamed:
                self._stream(output)
            if output.is_finished():
                self._finish(output.request_id, output)

    def _stream(self, output: Any) -> None:
        """Hand a streamed request's new tokens to its listener, each with the text it adds, up to its end of sequence."""
        # Both under the lock: a cancel on another thread (a timeout, a run given up on) takes the request out of both.
        with self._changed:
            entry = self._inflight.get(output.request_id)
            streamed = self._streamed.get(output.request_id)
        if entry is None or streamed is None:
            return
        request = entry[0]
        sent, text = streamed
        tokens = list(output.generated_tokens)
        finished = output.is_finished()
        for count in range(sent + 1, len(tokens) + 1):
            token = tokens[count - 1]
            if request.on_token is None or request.cancelled:
                break
            last = finished and count == len(tokens)  # a character the row ended inside goes out with it
            if token in self.backend.eos_ids:
                rest = text.add(token, last=last)
                if rest:
                    request.on_token(token, rest)
                break
            request.on_token(token, text.add(token, last=last))
            sent = count
        with self._changed:
            if output.request_id in self._inflight:  # not written back for a request taken out meanwhile
                self._streamed[output.request_id] = (sent, text)

    def _finish(self, request_id: str, outcome: Any) -> None:
        """Take a request out with its outcome: an output, an error, or None when its caller gave up on it."""
        failed = outcome is not None and (isinstance(outcome, BaseException) or outcome.error is not None)
        with self._changed:
            entry = self._inflight.pop(request_id, None)
            self._streamed.pop(request_id, None)
            if entry is not None:
                group = entry[1]
                group.left -= 1
                group.failed |= failed
                last = group.left == 0
            self._changed.notify_all()
        if entry is None:
            return
        request = entry[0]
        if last:  # as with a padded batch, the batch span ends before its requests report back
            group.span.set_status(Status(StatusCode.ERROR if group.failed else StatusCode.OK))
            group.span.end()
        if outcome is None:
            return  # whoever gave up on it has settled it
        if isinstance(outcome, BaseException):
            self._on_error([request], outcome)
        elif failed:
            self._on_error([request], RuntimeError(f"continuous batching failed this request: {outcome.error}"))
        else:
            self._on_result(request, self._result(request, group, outcome))

    def _result(self, request: GenerationRequest, group: _Group, output: Any) -> GenerationResult:
        tokens = list(output.generated_tokens)
        started, ended = output.lifespan
        stamps = output.timestamps or [ended]
        stopped = bool(tokens) and tokens[-1] in self.backend.eos_ids
        return result_from_stamps(
            request, tokens, self.backend.detokenize(tokens), "stop" if stopped else "length",
            started=started, first=stamps[0], last=stamps[-1], batch_id=group.batch_id, batch_size=group.size,
        )
