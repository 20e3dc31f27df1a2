"""A model's worker thread: drains its queue through a batching policy into its backend (no torch here)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from opentelemetry.trace import Link, Span, Status, StatusCode

from workbench.engine.backends.base import Backend, Scheduler, next_batch_id
from workbench.engine.batching import BatchingPolicy, DynamicBatching
from workbench.engine.breaker import CircuitBreaker
from workbench.engine.faults import FaultInjector
from workbench.engine.health import ModelHealth
from workbench.engine.queue import RequestQueue
from workbench.engine.requests import GenerationRequest, GenerationResult
from workbench.engine.wakeups import together
from workbench.engine.failures import error_kind, is_out_of_memory
from workbench.errors import ModelOutOfMemory, WorkerStopped, describe
from workbench.tracing import Tracing, mark_error
from workbench.tracing import attributes as attr
from workbench.tracing import openinference
from workbench.tracing.clock import now_ns

log = logging.getLogger(__name__)
DRAIN_GRACE_S = 0.05  # how long a draining worker's queue must stay empty before it closes
# How long a request in flight may stay silent during an unload before a backend that can cut it off (a server's
# stream) does: an unload does not wait for a server that sits on a request (up to its read_timeout_s, a minute by
# default), while streams still sending tokens run to their end, as a local batch does.
STOP_GRACE_S = 2.0


class ModelWorker:
    """Owns one model's queue and thread; the policy can be swapped while it runs.

    Also the model's resilience state: its circuit breaker, its health as probes found it, and
    the faults injected into its batches (None when there are none).
    """

    def __init__(self, name: str, backend: Backend, policy: BatchingPolicy, tracing: Tracing) -> None:
        self.name = name
        self.backend = backend
        self.policy = policy
        self.queue = RequestQueue()
        self._tracing = tracing
        self._continuous: Scheduler | None = None
        self._continuous_policy: BatchingPolicy | None = None
        self.breaker = CircuitBreaker(name)
        self.health = ModelHealth(name)
        self.faults: FaultInjector | None = None
        # The loop lane (see submit_many): requests streamed on their caller's event loop, and how many are in flight.
        self._lane_slots: dict[asyncio.AbstractEventLoop, tuple[int, asyncio.Semaphore]] = {}
        self._lane_idle = threading.Condition()
        self._lane_inflight = 0
        self._thread = threading.Thread(target=self._loop, name=f"workbench-worker-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: GenerationRequest) -> None:
        self.submit_many([request])

    def submit_many(self, requests: list[GenerationRequest], loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Queue ``requests`` for this worker's thread; or, from the thread of ``loop``, stream them on that loop.

        The loop lane: a backend that can await a request on the caller's own event loop (a server's,
        :meth:`~workbench.engine.backends.openai.RemoteBackend.astream`) under a continuous policy, with
        no faults injected, needs no worker thread: each request goes out at once, up to the policy's
        ``max_batch`` in flight per loop, and completes on its own, with the same spans, breaker and
        cancellation. It saves the hand-offs to the worker's thread and the streams' thread and back.
        """
        if loop is not None and self.lane_open():
            for request in requests:
                self._lane_start(request, loop)
            return
        try:
            self.queue.put_many(requests)
        except RuntimeError:
            raise WorkerStopped(f"model {self.name!r} was unloaded", hint=f"bench.load({self.name!r}, ...) again") from None

    def lane_open(self) -> bool:
        """Whether requests awaited on an event loop may skip this worker's thread (see :meth:`submit_many`)."""
        return (self.policy.continuous and self.faults is None and not self.queue.closed
                and getattr(self.backend, "astream", None) is not None)

    def _lane_start(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        policy = self.policy
        limit = int(getattr(policy, "max_batch", 64))
        known = self._lane_slots.get(loop)  # only the loop's own thread adds its entry
        if known is None or known[0] != limit:  # the policy changed: the new limit from the next request
            known = self._lane_slots[loop] = (limit, asyncio.Semaphore(limit))
        with self._lane_idle:
            self._lane_inflight += 1
        task = loop.create_task(self._lane_run(request, policy, known[1]))

        def cancelled(future: Any) -> None:
            # Failed or cancelled from outside (a timeout, an unload): stop the stream. After a result the task
            # has ended, and cancelling it is a no-op.
            if future.cancelled() or future.exception() is not None:
                try:
                    loop.call_soon_threadsafe(task.cancel)
                except RuntimeError:
                    pass  # the loop closed: the task went with it

        request.future.add_done_callback(cancelled)

    async def _lane_run(self, request: GenerationRequest, policy: BatchingPolicy, slots: asyncio.Semaphore) -> None:
        try:
            async with slots:
                if request.future.done():
                    return  # cancelled while it waited for a slot
                # The batch span is made when the stream has ended, stamped with when it began: made here, it
                # put ~45 us of cold code between the request and its POST, inside the TTFT.
                started_ns, inflight, batch_id = now_ns(), self._lane_inflight, next_batch_id()

                def batch_span() -> Span:
                    span = self._batch_span([request], policy, start_time=started_ns)
                    span.set_attributes({attr.BATCH_ID: batch_id, attr.PADDING_TOKENS: 0,
                                         attr.BATCH_MODE: "continuous", attr.BATCH_INFLIGHT: inflight})
                    return span

                try:
                    result = await self.backend.astream(request, batch_id, 1)  # type: ignore[attr-defined]
                except asyncio.CancelledError:
                    span = batch_span()
                    span.set_status(Status(StatusCode.ERROR, "cancelled"))
                    span.end()
                    return  # whoever cancelled the request has settled it
                except BaseException as exc:
                    span = batch_span()
                    mark_error(span, exc)
                    span.end()
                    self._fail([request], exc)
                    return
                span = batch_span()
                span.set_status(Status(StatusCode.OK))
                span.end()
                self._complete(request, result, policy)
        finally:
            with self._lane_idle:
                self._lane_inflight -= 1
                self._lane_idle.notify_all()

    def _on_a_lane(self) -> bool:
        """Whether this thread runs a loop whose streams use the loop lane (they cannot go on while it waits)."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        return running is not None and running in self._lane_slots

    def _lane_wait(self, timeout: float) -> bool:
        """Wait until no request is in flight on the loop lane, and say whether none is; from a lane loop's own thread
        it only says (waiting there would wait for itself)."""
        with self._lane_idle:
            if self._on_a_lane():
                return self._lane_inflight == 0
            return self._lane_idle.wait_for(lambda: self._lane_inflight == 0, timeout)

    def stop(self, timeout: float = 30.0, grace_s: float | None = STOP_GRACE_S) -> None:
        """Refuse new work, fail what is still queued, and wait for the batch in flight (and the loop lane's).

        A backend that can cut its requests off (``abort``: a server's streams) cuts them off once its server has
        sent nothing on any of them for ``grace_s`` seconds (since the stop began, at the earliest: a request on the
        loop lane may not have been sent yet), and at ``timeout`` every one left; those fail with
        WorkerStopped. While the server still sends, its streams go on to their end (those it queued included).
        ``grace_s=None`` lets every request run to its end (a live swap's old worker). A local generate cannot be
        interrupted: it is waited for, up to ``timeout``.
        """
        for request in self.queue.close():
            self._fail([request], WorkerStopped(f"model {self.name!r} was unloaded before this request ran"))
        abort = getattr(self.backend, "abort", None)
        if abort is not None and grace_s is not None:
            since, deadline = time.perf_counter(), time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                self._thread.join(min(grace_s / 4, max(left, 0.0)))
                if not self._thread.is_alive():
                    if self._lane_wait(0.0):
                        return
                    if self._on_a_lane():  # its own loop's streams cannot go on while it waits here: cut them off
                        abort()
                        return
                if left <= 0:
                    abort()  # still in flight at the stop's own bound: cut off, however lively
                    break
                abort(quiet_s=grace_s, since=since)
        self._thread.join(timeout)
        self._lane_wait(timeout)

    def drain(self, timeout: float = 60.0) -> None:
        """Run every queued request, then stop: a live swap's old worker finishes its work (new requests go to the
        new one). Whatever is still queued after ``timeout`` seconds fails as :meth:`stop` fails it."""
        if not self.policy.continuous:
            self.set_policy(DynamicBatching(max_batch=64, max_wait_ms=0))  # run what it holds now, waiting for no one
        deadline = time.monotonic() + timeout
        while not self.queue.closed and time.monotonic() < deadline:
            if not len(self.queue):
                # A caller that picked this worker just before the swap may still be queueing here: give it a
                # moment (a request arriving after the close fails with WorkerStopped).
                time.sleep(DRAIN_GRACE_S)
                if not len(self.queue):
                    break
            time.sleep(0.005)  # a policy may be waiting for company: its batch leaves the queue when it runs
        self.stop(grace_s=None)

    def cancel(self, request: GenerationRequest, error: BaseException) -> bool:
        """Fail ``request`` with ``error`` now: drop it from the queue, or stop its row in the running batch.

        Its batch-mates finish as if it had never been there. False if it had already finished.
        """
        request.cancelled = True
        where = "queued" if self.queue.remove(request) else "running"
        if not request.settle():
            return False
        request.span.set_attribute(attr.CANCELLED, where)
        self._error(request, error)
        return True

    def set_policy(self, policy: BatchingPolicy) -> None:
        """Swap the policy; one waiting inside the old policy (for a timeout, say) gives way at once."""
        self.policy = policy
        self.queue.interrupt()

    def _loop(self) -> None:
        while True:
            self.queue.resume()  # before reading the policy, so a swap from here on interrupts its wait
            policy = self.policy
            try:
                batch = policy.next_batch(self.queue)
            except Exception:  # a policy bug must not strand the requests behind it
                log.exception("batching policy %r failed", policy)
                batch = self.queue.take(1, lambda *_: False)
                self._fail(batch, RuntimeError(f"batching policy {policy!r} failed; see the log"))
                continue
            if not batch:
                if self.queue.closed:
                    self._end_continuous()
                    return
                continue
            faults = self.faults
            if faults is not None:
                batch = faults.apply(batch, self._fail)
                if not batch:
                    continue
            if policy.continuous:
                self._stream(batch, policy)
            else:
                self._end_continuous()
                self._execute(batch, policy)

    def _batch_span(self, batch: list[GenerationRequest], policy: BatchingPolicy, start_time: int | None = None) -> Span:
        span = self._start_batch_span(batch, policy, start_time)
        if getattr(self.backend, "adapters", None) is not None:  # a model with named LoRA adapters
            span.set_attribute(attr.ADAPTER_BATCHING, getattr(policy, "adapters", "mixed"))
        return span

    def _start_batch_span(
        self, batch: list[GenerationRequest], policy: BatchingPolicy, start_time: int | None = None
    ) -> Span:
        return self._tracing.start_span(
            f"batch {self.name}",
            attributes={
                attr.SPAN_KIND: attr.KIND_LLM,  # one generate call of the model, for every request in it
                **openinference.model(self.backend.source),
                attr.MODEL_NAME: self.name,
                attr.BATCH_SIZE: len(batch),
                attr.BATCH_POLICY: policy.name,
            },
            links=[Link(r.span.get_span_context()) for r in batch],
            start_time=start_time,
        )

    def _stream(self, batch: list[GenerationRequest], policy: BatchingPolicy) -> None:
        """Admit ``batch`` into the continuous-batching scheduler; its requests finish on the scheduler's side."""
        span = self._batch_span(batch, policy)
        try:
            if self._continuous is None or self._continuous_policy != policy:
                self._end_continuous()
                self._continuous = self.backend.scheduler(
                    policy, lambda request, result: self._complete(request, result, policy), self._fail
                )
                self._continuous_policy = policy
            self._continuous.submit(batch, span)
        except BaseException as exc:
            mark_error(span, exc)
            span.end()
            self._fail([r for r in batch if not r.future.done()], exc)

    def _end_continuous(self) -> None:
        """Let the continuous scheduler finish what it holds and give the model back to padded generate."""
        if self._continuous is not None:
            self._continuous.close()
            self._continuous = self._continuous_policy = None

    def _execute(self, batch: list[GenerationRequest], policy: BatchingPolicy) -> None:
        batch = [r for r in batch if not r.cancelled]  # timed out while the batch formed
        if not batch:
            return
        span = self._batch_span(batch, policy)
        try:
            faults = self.faults
            if faults is not None:
                faults.check_memory(batch, span)
            streaming = any(r.stream for r in batch)
            results, timing = self.backend.generate(batch, _on_token if streaming else None)
        except BaseException as exc:  # an error in one batch fails its requests, never the worker
            mark_error(span, exc)
            if is_out_of_memory(exc):
                self._split(batch, policy, span, exc)
                return
            span.end()
            self._fail(batch, exc)
            return
        span.set_attributes(
            {
                attr.BATCH_ID: timing.batch_id,
                attr.PADDING_TOKENS: timing.padding_tokens,
                attr.BATCH_PADDED_LEN: timing.padded_len,
                attr.PREFILL_MS: timing.prefill_ms,
                attr.DECODE_MS: timing.decode_ms,
                attr.DETOKENIZE_MS: timing.detokenize_ms,
                attr.BATCH_STEPS: timing.steps,
                **timing.attributes,
            }
        )
        for remote in timing.spans:
            self._tracing.start_span(remote.name, span, {**remote.attributes, attr.RECORDED_ELSEWHERE: True},
                                     start_time=remote.start_ns).end(end_time=remote.end_ns)
        span.set_status(Status(StatusCode.OK))
        span.end()
        # Spans first, answers after, in a tight loop: the awaiting runs then wake together and send
        # their next hops in one tick of their loop, so the next batch forms whole instead of in pieces.
        for request in batch:
            # A re-run that wrote other tokens, or fewer, than its stream already sent.
            if request.diverged or request.replayed < len(request.streamed):
                self._fail([request], ModelOutOfMemory(
                    f"model {self.name!r} ran out of memory after streaming {len(request.streamed)} tokens of this "
                    "request, and its re-run in a smaller batch wrote other tokens; what was streamed cannot be "
                    "taken back", hint="call again; a model that runs out of memory at this batch size now takes "
                    "smaller batches"))
        finished = [(request, result) for request, result in zip(batch, results)
                    if self._record(request, result, policy)]
        with together():
            for request, result in finished:
                request.future.set_result(result)

    def _split(self, batch: list[GenerationRequest], policy: BatchingPolicy, span: Span, exc: BaseException) -> None:
        """Out of memory: run the batch again as two halves, and from now on take no batch larger than a half."""
        self.backend.release_memory()
        if len(batch) == 1:
            span.end()
            request = batch[0]
            self._fail(batch, ModelOutOfMemory(
                f"model {self.name!r} ran out of memory on a single request ({request.tokens_in} prompt tokens, "
                f"max_new_tokens {request.params.max_new_tokens}): {describe(exc)}",
                hint="shorten the prompt or max_new_tokens, or load the model with a smaller dtype or elsewhere",
            ))
            return
        half = (len(batch) + 1) // 2
        limit = self.queue.batch_limit
        self.queue.batch_limit = half if limit is None else min(limit, half)
        span.add_event("oom.split", {attr.BATCH_HALVES: [half, len(batch) - half],
                                     attr.BATCH_LIMIT: self.queue.batch_limit})
        span.end()
        for request in batch:
            request.span.set_attribute(attr.OOM_SPLIT, True)
            request.replayed = 0  # its re-run streams from its first token again; _on_token skips what went out
        self._execute(batch[:half], policy)
        self._execute(batch[half:], policy)

    def _complete(self, request: GenerationRequest, result: GenerationResult, policy: BatchingPolicy) -> None:
        if self._record(request, result, policy):
            request.future.set_result(result)

    def _record(self, request: GenerationRequest, result: GenerationResult, policy: BatchingPolicy) -> bool:
        """End ``request``'s span with its result; False if it was cancelled meanwhile (its caller moved on)."""
        if not request.settle():
            return False
        if not request.probe:
            self.breaker.record(None, request.span, request.trial)
        if request.fault_ms:  # counted in TTFT and E2E as the model's own slowness, not as queueing
            result.queue_ms = max(result.queue_ms - request.fault_ms, 0.0)
        request.span.set_attributes(
            {
                attr.USAGE_OUTPUT_TOKENS: result.tokens_out,
                attr.RESPONSE_FINISH_REASONS: [result.finish_reason],
                attr.QUEUE_MS: result.queue_ms,
                attr.PREFILL_MS: result.prefill_ms,
                attr.TTFT_MS: result.ttft_ms,
                attr.DECODE_MS: result.decode_ms,
                attr.BATCH_ID: result.batch_id,
                attr.BATCH_SIZE: result.batch_size,
                attr.BATCH_POLICY: policy.name,
                attr.PADDING_TOKENS: result.padding_tokens,
                **({attr.PREFIX_TOKENS: result.prefix_tokens, attr.PREFIX_SAVED_MS: result.prefix_saved_ms}
                   if request.prefix_len else {}),
                **openinference.output_value(result.text),
                # The result's count: a server's usage may know the prompt's length better than this machine.
                **openinference.token_counts(result.tokens_in, result.tokens_out),
            }
        )
        request.span.set_status(Status(StatusCode.OK))
        request.span.end()
        return True

    def _fail(self, batch: list[GenerationRequest], exc: BaseException) -> None:
        for request in batch:
            if request.settle():
                self._error(request, exc)

    def _error(self, request: GenerationRequest, exc: BaseException) -> None:
        """End a settled request with ``exc``, counting it against the breaker if the model was at fault."""
        if not request.probe:
            self.breaker.record(exc, request.span, request.trial)
        request.span.set_attribute(attr.ERROR_KIND, error_kind(exc) or "other")
        mark_error(request.span, exc)
        request.span.end()
        request.future.set_exception(exc)


def _on_token(request: GenerationRequest, token: int, text: str) -> None:
    if request.on_token is None or request.cancelled or request.diverged:
        return
    step, streamed = request.replayed, request.streamed
    request.replayed += 1
    if step < len(streamed):
        # A re-run after an out-of-memory split: this token already went out. A re-run in a smaller batch may pick
        # another (padding changes the numbers, an unseeded sample differs); the stream cannot take back what it sent.
        request.diverged = streamed[step] != (token, text)
        return
    streamed.append((token, text))
    request.on_token(token, text)
