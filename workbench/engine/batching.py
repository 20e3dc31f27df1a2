"""Batching policies: when the queued requests of one model become a batch."""

from __future__ import annotations

import inspect
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from workbench.engine.queue import Accept, RequestQueue, select
from workbench.engine.requests import GenerationRequest
from workbench.errors import StrategyError, did_you_mean, plain_fields
from workbench.models.settings import LoadSettings



def same_params(request: GenerationRequest, taken: list[GenerationRequest]) -> bool:
    """Requests share a padded batch only when their generation parameters are identical."""
    return request.params == taken[0].params


# How requests for different LoRA adapters batch: together in one generate (peft's adapter_names, one per row),
# or grouped, one generate per adapter version.
ADAPTER_BATCHING = ("mixed", "grouped")


def same_adapter(request: GenerationRequest, taken: list[GenerationRequest]) -> bool:
    """Requests of one adapter version (or all of the base model): what a grouped batch holds."""
    return request.adapter == taken[0].adapter


def _same_params_and_adapter(request: GenerationRequest, taken: list[GenerationRequest]) -> bool:
    return same_params(request, taken) and same_adapter(request, taken)


def _check(ok: bool, policy: str, message: str) -> None:
    if not ok:  # policy: the policy's repr, StaticBatching(size=0, ...)
        raise StrategyError(f"{policy}: {message}", hint=f"help(wb.{policy.partition('(')[0]}) lists its settings")


def _whole(value: object, least: int, optional: bool = False) -> bool:
    """Whether ``value`` is a whole number >= ``least`` (a bool is not one), or None where ``optional``."""
    if value is None:
        return optional
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _number(value: object, least: float) -> bool:
    """Whether ``value`` is a finite number >= ``least`` (a bool is not one; NaN is no number, nor an int too large
    for a float: its name and its waits are floats)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return least <= float(value) < math.inf
    except OverflowError:
        return False


def _ms(value: float) -> str:
    return f"{value:g}ms"


class BatchingPolicy(ABC):
    """Decides which queued requests run together; ``name`` appears on every batch and request span.

    A policy only chooses; the model's worker runs what it chose, so one policy object may
    serve several models. ``continuous`` policies hand their requests to an iteration-level
    scheduler instead of one padded ``generate`` per batch.
    """

    name: str = "policy"
    continuous: bool = False

    @abstractmethod
    def next_batch(self, queue: RequestQueue) -> list[GenerationRequest]:
        """Block until a batch is ready and return it.

        An empty list means "nothing to run now": the queue closed, or the worker's policy
        was swapped (``queue.interrupted``) and the worker should read it again.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoBatching(BatchingPolicy):
    """One request at a time, in arrival order."""

    name = "none"

    def next_batch(self, queue: RequestQueue) -> list[GenerationRequest]:
        if not queue.wait() or queue.interrupted:
            return []
        return queue.take(1, same_params)


def _gather(
    queue: RequestQueue,
    wait_ms: float,
    limit: int,
    full: Callable[[GenerationRequest, Sequence[GenerationRequest], int], bool],
    accept: Accept,
) -> list[GenerationRequest]:
    """Wait until ``full(oldest, queued, limit)`` or the oldest request is ``wait_ms`` old, then take up to ``limit``.

    The wait runs from the arrival of the oldest queued request, so one that already waited
    that long while the worker was busy goes at once. After an out-of-memory split, a full
    batch is a smaller one (``queue.limited``). An oldest request that leaves the queue while
    it waits (cancelled: its timeout ran out) ends the wait, and an empty list has the worker
    ask again: the batch then forms around the new oldest request, from its own arrival.
    """
    if not queue.wait() or queue.interrupted:
        return []
    head = queue.peek()
    if head is None:  # closed meanwhile
        return []
    remaining = head.submitted + wait_ms / 1e3 - time.perf_counter()
    if remaining > 0:
        size = queue.limited(limit)
        queue.wait_until(lambda queued: not queued or queued[0] is not head or full(head, queued, size), remaining)
    if queue.interrupted or queue.peek() is not head:
        return []
    return queue.take(limit, accept)


def _compatible(head: GenerationRequest, queued: Sequence[GenerationRequest], grouped: bool = False) -> int:
    """How many queued requests could share a padded batch with ``head`` (itself included)."""
    return sum(1 for r in queued if r.params == head.params and (not grouped or r.adapter == head.adapter))


@dataclass(frozen=True)
class StaticBatching(BatchingPolicy):
    """Wait for ``size`` requests with equal parameters, or ``timeout_ms`` after the oldest arrived.

    The timeout runs from the arrival of the oldest queued request, so a lone request waits
    ``timeout_ms`` at most and then runs as a partial batch. Requests whose generation
    parameters differ never share a batch: they wait for a batch of their own. ``adapters="grouped"``
    keeps requests for different LoRA adapters (and versions) apart too; ``"mixed"`` (the default) lets
    them share one generate, each row with its own adapter.
    """

    size: int = 8
    timeout_ms: float = 50.0
    adapters: str = field(default="mixed", repr=False)  # the name ends in :grouped when grouped

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy's numbers, from a sweep, as Python's
        _check(_whole(self.size, 1), repr(self), "size must be a whole number >= 1")
        _check(_number(self.timeout_ms, 0), repr(self), "timeout_ms must be a finite number >= 0")
        _check(self.adapters in ADAPTER_BATCHING, repr(self), "adapters must be 'mixed' or 'grouped'")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"static:{self.size}:{_ms(self.timeout_ms)}" + (":grouped" if self.adapters == "grouped" else "")

    def next_batch(self, queue: RequestQueue) -> list[GenerationRequest]:
        grouped = self.adapters == "grouped"
        return _gather(queue, self.timeout_ms, self.size,
                       lambda head, queued, size: _compatible(head, queued, grouped) >= size,
                       _same_params_and_adapter if grouped else same_params)


@dataclass(frozen=True)
class DynamicBatching(BatchingPolicy):
    """Run what is queued as soon as the worker is free, waiting at most ``max_wait_ms`` for company.

    When the worker asks for a batch it takes every queued request with the oldest one's
    generation parameters, up to ``max_batch``. If fewer are queued it waits for more, but
    never past ``max_wait_ms`` after the oldest request arrived (a request that already waited
    that long while the worker was busy goes at once), and it stops waiting as soon as the
    batch is full.

    ``max_batch_tokens`` caps the padded size of a batch: batch size x longest prompt, in
    tokens. A request that would push the batch over the cap waits for a later batch, except
    the oldest one, which always runs (alone, if it is longer than the cap by itself).

    ``max_length_ratio`` groups requests by prompt length to cut padding: a request joins the
    batch only while the longest prompt in it stays within ``max_length_ratio`` times the
    shortest (e.g. 1.5). The batch forms around the oldest request, scanning the queue in
    arrival order, so a short prompt never pads up to a long one; requests of other lengths
    form the next batches. ``None`` mixes all lengths (fewest batches, most padding).

    ``adapters`` says how requests for different LoRA adapters of one model batch: ``"mixed"`` (the
    default) runs them in one generate, each row with its own adapter (peft's ``adapter_names``);
    ``"grouped"`` gives each adapter version (and the base model) batches of its own.
    """

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_batch_tokens: int | None = None
    max_length_ratio: float | None = None
    adapters: str = field(default="mixed", repr=False)  # the name ends in :grouped when grouped

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy's numbers, from a sweep, as Python's
        _check(_whole(self.max_batch, 1), repr(self), "max_batch must be a whole number >= 1")
        _check(_number(self.max_wait_ms, 0), repr(self), "max_wait_ms must be a finite number >= 0")
        _check(_whole(self.max_batch_tokens, 1, optional=True), repr(self),
               "max_batch_tokens must be a whole number >= 1, or None")
        _check(self.max_length_ratio is None or _number(self.max_length_ratio, 1), repr(self),
               "max_length_ratio must be a finite number >= 1, or None")
        _check(self.adapters in ADAPTER_BATCHING, repr(self), "adapters must be 'mixed' or 'grouped'")

    @property
    def name(self) -> str:  # type: ignore[override]
        name = f"dynamic:{self.max_batch}:{_ms(self.max_wait_ms)}"
        if self.max_batch_tokens is not None:
            name += f":{self.max_batch_tokens}tok"
        if self.max_length_ratio is not None:
            name += f":len{self.max_length_ratio:g}"
        if self.adapters == "grouped":
            name += ":grouped"
        return name

    def admits(self, request: GenerationRequest, taken: list[GenerationRequest]) -> bool:
        """Whether ``request`` may join the batch ``taken`` (same parameters, within the token and length limits)."""
        if request.params != taken[0].params:
            return False
        if self.adapters == "grouped" and request.adapter != taken[0].adapter:
            return False
        if self.max_batch_tokens is None and self.max_length_ratio is None:
            return True
        lengths = [r.tokens_in for r in taken]
        longest = max(request.tokens_in, *lengths)
        if self.max_batch_tokens is not None and (len(taken) + 1) * longest > self.max_batch_tokens:
            return False
        return self.max_length_ratio is None or longest <= self.max_length_ratio * min(request.tokens_in, *lengths)

    def _full(self, queued: Sequence[GenerationRequest], max_batch: int) -> bool:
        """Whether the batch the queue holds now cannot grow: ``max_batch`` reached, or no room for one more row."""
        batch = select(queued, max_batch, self.admits)
        if len(batch) >= max_batch:
            return True
        if self.max_batch_tokens is not None and batch:
            return (len(batch) + 1) * max(r.tokens_in for r in batch) > self.max_batch_tokens
        return False

    def next_batch(self, queue: RequestQueue) -> list[GenerationRequest]:
        return _gather(queue, self.max_wait_ms, self.max_batch, lambda _, queued, size: self._full(queued, size),
                       self.admits)


def same_sampling(request: GenerationRequest, taken: list[GenerationRequest]) -> bool:
    """Requests share one continuous-batching scheduler when their sampling settings are equal."""
    return request.params.sampling == taken[0].params.sampling


_NEEDED_ARGS = {"request_id", "max_new_tokens", "record_timestamps", "eos_token_id"}


def check_transformers() -> None:
    """Raise a WorkbenchError unless the installed transformers has the continuous-batching API we use."""
    import transformers

    try:
        from transformers import ContinuousBatchingConfig  # noqa: F401
        from transformers.generation.continuous_batching import ContinuousBatchingManager
    except ImportError:
        found = False
    else:
        found = _NEEDED_ARGS <= inspect.signature(ContinuousBatchingManager.add_request).parameters.keys()
    if not found:
        raise StrategyError(
            f"ContinuousBatching needs transformers' ContinuousBatchingConfig and ContinuousBatchingManager with "
            f"per-request max_new_tokens and token timestamps; transformers {transformers.__version__} has not",
            hint="upgrade transformers (5.24 works), or use DynamicBatching",
        )


@dataclass(frozen=True)
class ContinuousSettings:
    """The scheduler's sizes, from a ContinuousBatching policy (None: sized by transformers, or by the CPU bounds)."""

    max_batch: int
    max_batch_tokens: int | None = None
    num_blocks: int | None = None
    page_size: int | None = None


@dataclass(frozen=True)
class ContinuousBatching(BatchingPolicy):
    """Iteration-level scheduling with transformers' own continuous batching (paged KV cache).

    Requests join and leave the running batch at every decode step, so a short answer never
    waits for a long one and nothing is padded. The worker hands every queued request to
    transformers' ``ContinuousBatchingManager`` as soon as it arrives; each hand-off is one
    batch span (``workbench.batch.size`` = requests admitted together,
    ``workbench.batch.inflight`` = requests in the scheduler just after), which ends when the
    last of them finishes, while the scheduler runs them alongside the requests already in it.
    ``max_new_tokens`` is per request; requests with other sampling settings (temperature,
    top_p, top_k, seed) wait until the running ones finish and the scheduler restarts with
    theirs. A seeded request that samples runs alone, in a scheduler started with its seed, so it
    samples the same text every time, as it does alone under the padded policies (its batch span
    says ``workbench.batch.mode`` ``continuous:seeded``). The scheduler keeps its paged KV cache while the policy is in place; swapping to
    another policy lets the running requests finish, then frees it.

    ``max_batch`` caps the requests in one forward pass, ``max_batch_tokens`` the tokens in one
    (prefill chunks included), ``num_blocks`` x ``page_size`` the paged KV cache. Left at
    ``None``, on a CPU the cache holds ``max_batch`` requests of up to 1024 tokens and a pass
    512 tokens; on a GPU transformers sizes both from free memory.

    Needs a transformers with ``ContinuousBatchingManager`` (5.24 works); constructing the
    policy raises a WorkbenchError on one without.
    """

    max_batch: int = 64
    max_batch_tokens: int | None = None
    num_blocks: int | None = None
    page_size: int | None = None

    continuous = True

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy's numbers, from a sweep, as Python's
        _check(_whole(self.max_batch, 1), repr(self), "max_batch must be a whole number >= 1")
        _check(_whole(self.max_batch_tokens, 1, optional=True), repr(self),
               "max_batch_tokens must be a whole number >= 1, or None")
        _check(_whole(self.num_blocks, 1, optional=True), repr(self), "num_blocks must be a whole number >= 1, or None")
        _check(_whole(self.page_size, 4, optional=True), repr(self), "page_size must be a whole number >= 4, or None")
        check_transformers()

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"continuous:{self.max_batch}"

    def settings(self) -> ContinuousSettings:
        """The sizes the backend's scheduler runs with."""
        return ContinuousSettings(self.max_batch, self.max_batch_tokens, self.num_blocks, self.page_size)

    def next_batch(self, queue: RequestQueue) -> list[GenerationRequest]:
        if not queue.wait() or queue.interrupted:
            return []
        return queue.take(len(queue) or 1, same_sampling)


def default_policy(settings: LoadSettings) -> BatchingPolicy:
    """The policy a model runs under until told otherwise: one request at a time here; for a model server,
    each request sent as it comes, up to 64 in flight (the server batches them its own way)."""
    return ContinuousBatching() if settings.remote else NoBatching()


POLICY_FORMS = ("none, static:SIZE[:TIMEOUT][:grouped], dynamic:MAX_BATCH[:MAX_WAIT][:Ntok][:lenR][:grouped], "
                "continuous[:MAX_BATCH]")


def parse_policy(text: str) -> BatchingPolicy:
    """A policy from its short name, the inverse of ``policy.name``.

    ``none``, ``static:8`` (50 ms timeout), ``static:8:20ms``, ``dynamic:16:5ms``,
    ``dynamic:32:5ms:512tok:len1.5`` (token budget, length grouping), ``continuous``,
    ``continuous:32``; ``:grouped`` at the end of static and dynamic batches each LoRA adapter apart. Times take ``ms`` or ``s``; a bare number is milliseconds.
    """
    kind, *fields = text.strip().lower().split(":")
    # static and dynamic end in :grouped to keep each LoRA adapter's requests in batches of their own
    adapters = fields.pop() if kind in ("static", "dynamic") and fields and fields[-1] in ADAPTER_BATCHING else None

    def fail(message: str) -> StrategyError:
        return StrategyError(f"batching {text!r}: {message}", hint=f"the forms are {POLICY_FORMS}")

    def whole(value: str, what: str) -> int:
        if not value.isdigit():
            raise fail(f"{what} {value!r} is not a whole number")
        return int(value)

    def millis(value: str, what: str) -> float:
        number, scale = value, 1.0
        if value.endswith("ms"):
            number = value[:-2]
        elif value.endswith("s"):
            number, scale = value[:-1], 1e3
        try:
            millis = float(number) * scale
        except ValueError:
            millis = math.nan
        if not math.isfinite(millis):  # float() also reads inf and nan, which no wait means
            raise fail(f"{what} {value!r} is not a time such as 5ms or 0.5s")
        return millis

    def arity(most: int) -> None:
        if len(fields) > most:
            allowed = f"at most {most} setting{'s' * (most != 1)}" if most else "no settings"
            raise fail(f"{kind} takes {allowed}, got {len(fields)}")

    if kind == "none":
        arity(0)
        return NoBatching()
    if kind == "static":
        arity(2)
        if not fields:
            return StaticBatching(adapters=adapters or "mixed")
        size = whole(fields[0], "size")
        return StaticBatching(size, *(millis(v, "timeout") for v in fields[1:]), adapters=adapters or "mixed")
    if kind == "dynamic":
        arity(4)
        settings: dict[str, float | int] = {}
        for index, value in enumerate(fields):
            if index == 0:
                settings["max_batch"] = whole(value, "max_batch")
            elif value.endswith("tok"):
                settings["max_batch_tokens"] = whole(value[:-3], "token budget")
            elif value.startswith("len"):
                try:
                    settings["max_length_ratio"] = float(value[3:])
                except ValueError:
                    raise fail(f"length ratio {value!r} is not len followed by a number, e.g. len1.5") from None
            elif index == 1:
                settings["max_wait_ms"] = millis(value, "max_wait")
            else:
                raise fail(f"setting {value!r} is neither a token budget (512tok) nor a length ratio (len1.5)")
        return DynamicBatching(**settings, adapters=adapters or "mixed")  # type: ignore[arg-type]
    if kind == "continuous":
        arity(1)
        return ContinuousBatching(*(whole(v, "max_batch") for v in fields))
    raise fail(f"unknown policy {kind!r}{did_you_mean(kind, ['none', 'static', 'dynamic', 'continuous'])}")
