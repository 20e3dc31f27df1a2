"""What flows through the engine: generation parameters, requests, results."""

from __future__ import annotations

import itertools
import math
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from opentelemetry.trace import Span

from workbench.errors import InvalidInput, plain_fields

_ids = itertools.count(1)
# Half of a UTF-16 pair on its own: what a bad decode (errors="surrogateescape") leaves in a str.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# The seeds torch.manual_seed takes (64 bits, signed or not); it raises on any other, inside the model's call.
_SEEDS = (-(1 << 63), (1 << 64) - 1)

# The token id of streamed text that came without ids: a server's chunk, an answer from the exact cache.
NO_TOKEN_ID = -1

# A chat's messages as OpenAI's API and ``apply_chat_template`` take them: {"role": ..., "content": ...} each.
Messages = list[dict[str, str]]


def check_text(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode, which tokenizers and SQLite cannot take; ``what`` names it."""
    bad = None if text.isascii() else _LONE_SURROGATE.search(text)
    if bad is not None:
        raise InvalidInput(
            f"{what} is not valid text: it holds a lone surrogate ({bad.group()!r}) at character {bad.start()}",
            hint="decode the bytes it came from with their real encoding, or with errors='replace'",
        )


def sampling_problem(temperature: Any, top_p: Any, top_k: Any, seed: Any = None) -> tuple[str, str] | None:
    """What is wrong with these sampling settings, as (the setting, why), or None: the rules GenerationParams keeps."""
    t, p, k = temperature, top_p, top_k
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t >= 0):
        return "temperature", f"temperature must be a finite number >= 0 (0 is greedy), not {t!r}"
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 <= p <= 1) or (p == 0 and t > 0):
        return "top_p", f"top_p must be a number in (0, 1] when sampling, not {p!r}"
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        return "top_k", f"top_k must be an integer >= 0 (0 turns it off), not {k!r}"
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not _SEEDS[0] <= seed <= _SEEDS[1]):
        return "seed", f"seed must be an integer from {_SEEDS[0]} to {_SEEDS[1]} (64 bits), not {seed!r:.40}"
    return None


@dataclass(frozen=True)
class GenerationParams:
    """Generation settings of one request; requests share a batch only if these are equal.

    ``temperature == 0`` is greedy decoding. ``seed`` makes sampling repeatable: a seeded request
    samples the same text alone and in any padded batch (continuous batching draws for the whole
    running batch, so there it runs alone, in a scheduler started with its seed). ``truncate="left"`` drops the
    oldest prompt tokens instead of raising when a prompt does not fit the context window (the trace records how
    many were dropped).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    truncate: Literal["error", "left"] = "error"

    def __post_init__(self) -> None:
        plain_fields(self)  # numpy's numbers, from a sweep, as Python's
        # The model refuses these deep inside generate, where its ValueError would count against its circuit breaker:
        # a caller's bad setting would open it for everyone. Refused here, on every path (bench.generate, a server
        # front, a hop), before a request exists.
        problem = sampling_problem(self.temperature, self.top_p, self.top_k, self.seed)
        if problem is not None:
            raise InvalidInput(problem[1])
        tokens = self.max_new_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise InvalidInput(f"max_new_tokens must be a whole number >= 1, not {tokens!r:.40}",
                               hint="how many tokens the model may generate, e.g. max_new_tokens=32")
        if not isinstance(self.truncate, str) or self.truncate not in ("error", "left"):
            raise InvalidInput(f"truncate must be 'error' or 'left', not {self.truncate!r:.40}",
                               hint="'left' drops the oldest prompt tokens to fit the context window; 'error' refuses")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def sampling(self) -> tuple[float, float, int, int | None]:
        """What requests in one continuous-batching scheduler must share; max_new_tokens may differ."""
        return (self.temperature, self.top_p, self.top_k, self.seed)

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": not self.greedy}
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class GenerationResult:
    """One request's output and honest timings, in milliseconds."""

    text: str
    token_ids: list[int]
    tokens_in: int
    tokens_out: int
    finish_reason: Literal["stop", "length"]
    queue_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_ms: float
    e2e_ms: float
    batch_id: int
    batch_size: int
    padding_tokens: int
    # Prompt tokens whose KV came from the prefix cache instead of a prefill, and the prefill time that saved
    # (the prefix's own prefill, measured once when it was cached).
    prefix_tokens: int = 0
    prefix_saved_ms: float = 0.0

    @property
    def tpot_ms(self) -> float | None:
        return self.decode_ms / (self.tokens_out - 1) if self.tokens_out > 1 else None


@dataclass(eq=False)
class GenerationRequest:
    """A tokenized prompt waiting for a model, with the span that will record its life."""

    model: str
    input_ids: list[int]
    params: GenerationParams
    span: Span
    hop: str | None = None
    truncated_tokens: int = 0
    # The prompt's text, for backends that send text rather than token ids (a remote server). For a chat, the
    # text its model's chat template made of ``messages`` ("" where the server renders them).
    prompt: str = ""
    # A chat (a hop with ``messages:``): a server is sent these, not the prompt (None: a plain prompt).
    messages: Messages | None = None
    id: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.perf_counter)
    future: Future[GenerationResult] = field(default_factory=Future)
    # A health probe passes an open breaker and an unhealthy mark, and counts for neither.
    probe: bool = False
    # Has a timeout, so a padded batch checks at each step whether to stop its row.
    cancellable: bool = False
    cancelled: bool = False
    # The circuit breaker's half-open trial, whose outcome decides the breaker's state.
    trial: bool = False
    # Hears each generated token with the text it adds, from the worker's thread (None: not streamed).
    on_token: Callable[[int, str], None] | None = None
    # How many leading ``input_ids`` are a prefix whose KV a backend with a prefix cache may reuse (0: none).
    prefix_len: int = 0

    # The LoRA adapter version to run with, as the peft model names it (``sql@v2``); None: the base model.
    adapter: str | None = None
    # Latency injected into the request's batch (bench.inject's latency_ms): the model's slowness, not a wait in its
    # queue, so its queue_ms leaves it out.
    fault_ms: float = field(default=0.0, repr=False)
    # What went to ``on_token`` so far, as (token, text), and how far the current run of the request has come in it:
    # after an out-of-memory split the request runs again from its first token, and must not stream those twice.
    streamed: list[tuple[int, str]] = field(default_factory=list, repr=False)
    replayed: int = field(default=0, repr=False)
    # The re-run wrote other tokens than the ones already streamed, which cannot be taken back (see worker._on_token).
    diverged: bool = field(default=False, repr=False)
    _settle_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _settled: bool = field(default=False, repr=False)

    @property
    def tokens_in(self) -> int:
        return len(self.input_ids)

    @property
    def stream(self) -> bool:
        return self.on_token is not None

    def settle(self) -> bool:
        """Claim the right to end this request's span and set its future: True for the first caller only.

        The worker (with a result or an error) and a caller whose timeout ran out may race to
        finish a request; the loser leaves it alone, so the span ends once and the future is set once.
        """
        with self._settle_lock:
            first, self._settled = not self._settled, True
            return first
