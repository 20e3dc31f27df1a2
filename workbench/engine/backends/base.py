"""The backend seam: what the engine asks of a model, whatever runs it (in-process, a child process, a server, Ray).

Token ids, texts and timings cross this seam, never tensors, so a backend can live anywhere
a request can travel. A backend translates its library's errors here (out of memory becomes
:class:`BackendOutOfMemory`), so the engine's worker loop imports no torch.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from workbench.engine.requests import GenerationParams, GenerationRequest, GenerationResult, Messages
from workbench.errors import ChatTemplateError, ContextWindowExceeded, InvalidInput

if TYPE_CHECKING:
    from workbench.engine.batching import BatchingPolicy

_batch_ids = itertools.count(1)


def next_batch_id() -> int:
    """A process-wide batch number, shared by every backend so batch ids never collide in a trace."""
    return next(_batch_ids)


class BackendOutOfMemory(RuntimeError):
    """A backend ran out of device memory on a batch; the worker splits the batch and tries the halves."""


@dataclass
class RemoteSpan:
    """A span recorded where a batch ran (a child process, a server), as plain data that can cross a wire.

    The worker re-creates it under the batch span, so work done elsewhere shows in the same trace.
    """

    name: str
    start_ns: int  # epoch nanoseconds (time.time_ns), the clock OpenTelemetry spans are stamped with
    end_ns: int
    attributes: dict[str, object] = field(default_factory=dict)


@dataclass
class BatchTiming:
    """What one executed batch cost, for the batch span."""

    batch_id: int
    size: int
    padded_len: int
    padding_tokens: int
    started: float
    prefill_ms: float
    decode_ms: float
    detokenize_ms: float
    steps: int
    # What the backend adds to the batch span about where the batch ran (a child's pid, its IPC time),
    # and the spans recorded there, which join the trace under the batch span.
    attributes: dict[str, object] = field(default_factory=dict)
    spans: list[RemoteSpan] = field(default_factory=list)


# Called by a backend after each decode step with (request, new token id, text delta) per streaming row.
TokenSink = Callable[[GenerationRequest, int, str], None]
OnResult = Callable[[GenerationRequest, GenerationResult], None]
OnError = Callable[[list[GenerationRequest], BaseException], None]


class RowCancels:
    """Rows of the batches a model process or actor runs that the parent stopped (their requests timed out).

    Batches are numbered by the parent (``seq``); a cancel may arrive before its batch does, and is kept
    for it. A cancelled row ends at its next decoding step (the transformers backend's stopping criteria).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._batch: list[GenerationRequest] = []
        self._early: dict[int, set[int]] = {}  # for a batch that has not come yet

    def running(self, seq: int, batch: list[GenerationRequest]) -> None:
        with self._lock:
            self._seq, self._batch = seq, batch
            for row in self._early.pop(seq, ()):
                batch[row].cancelled = True
            self._early = {later: rows for later, rows in self._early.items() if later > seq}

    def cancel(self, seq: int, rows: list[int]) -> None:
        with self._lock:
            if seq == self._seq:
                for row in rows:
                    self._batch[row].cancelled = True  # _CancelledRows stops the row at its next step
            elif seq > self._seq:
                self._early.setdefault(seq, set()).update(rows)


class Scheduler(Protocol):
    """An iteration-level scheduler a backend runs for continuous batching: requests join while others decode."""

    def submit(self, batch: list[GenerationRequest], span: object) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """One loaded model as the engine sees it: tokenize, generate a batch (streaming tokens), memory, close."""

    model: str
    source: str  # the hub id or directory it came from (traces name the model by it, not only by ``model``)
    device: str  # "cpu", "cuda:0", or where a remote backend runs
    dtype: str
    context_window: int | None

    def tokenize(self, prompts: Sequence[str], special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each prompt, in one call (a batch tokenizes together).

        ``special_tokens=False`` adds none (no BOS): a chat template's text carries its own.
        """
        ...

    def chat_prompt(self, messages: Messages, hop: str | None = None) -> str | None:
        """The prompt ``messages`` make by this model's chat template; None where a server renders them itself.

        Raises ChatTemplateError where the model has no chat template, or its template refuses the messages.
        """
        ...

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of generated ``tokens``, end-of-sequence and special tokens dropped."""
        ...

    def generate(
        self, batch: list[GenerationRequest], on_token: TokenSink | None = None
    ) -> tuple[list[GenerationResult], BatchTiming]:
        """Generate for every request of ``batch`` (equal params); ``on_token`` hears each streaming row's tokens."""
        ...

    def check(self, policy: BatchingPolicy) -> None:
        """Raise a WorkbenchError if this backend cannot run under ``policy``."""
        ...

    def scheduler(self, policy: BatchingPolicy, on_result: OnResult, on_error: OnError) -> Scheduler:
        """A continuous-batching scheduler for ``policy`` (only asked for when ``policy.continuous``)."""
        ...

    def release_memory(self) -> None:
        """Give back what a failed batch left cached on the device."""
        ...

    def memory_bytes(self) -> int:
        """Bytes the model holds now."""
        ...

    def close(self) -> None:
        """Free what the backend holds; it serves nothing more."""
        ...


def check_not_empty(text: str, ids: list[int], model: str, hop: str | None = None) -> None:
    """Refuse a prompt with no text that tokenized to nothing (InvalidInput): a model has nothing to continue from,
    and torch fails deep inside the forward pass (or, padded into a batch, the row answers from padding alone).

    ``ids`` is empty for a server's prompt that was not tokenized here too, so the text decides.
    """
    if not text and not ids:
        raise InvalidInput(
            f"{f'hop {hop!r}: ' if hop else ''}the prompt is empty (0 tokens), so model {model!r} has nothing to "
            "continue",
            hint="give the prompt some text; an empty input or an earlier hop that answered nothing renders an "
            "empty prompt",
        )


def fit_window(
    ids: list[int], params: GenerationParams, window: int | None, model: str, hop: str | None = None
) -> tuple[list[int], int]:
    """``ids`` cut to fit ``window`` with the request's new tokens, and how many were dropped; or ContextWindowExceeded."""
    if window is None or len(ids) + params.max_new_tokens <= window:
        return ids, 0
    room = window - params.max_new_tokens
    if params.truncate == "left" and room > 0:
        return ids[-room:], len(ids) - room
    where = f"hop {hop!r}" if hop else "the prompt"
    raise ContextWindowExceeded(
        f"{where}: the prompt is {len(ids)} tokens and asks for {params.max_new_tokens} new ones, "
        f"but model {model!r} has a context window of {window} tokens",
        hint=_PAST_WINDOW_HINT,
    )


def past_window(
    text: str, params: GenerationParams, window: int | None, token_chars: int | None, model: str, hop: str | None = None
) -> ContextWindowExceeded | None:
    """The refusal of a prompt that cannot fit ``window`` by its length alone, where no token stands for more than
    ``token_chars`` of its characters (see :attr:`~workbench.engine.backends.codec.TextCodec.token_chars`), or None.

    Tokenizing takes about 2 us a character, with Python's lock held: ten million characters stopped every run for
    ~20 s, only to find the prompt far past the window. ``truncate: left`` keeps its newest tokens, so it counts.
    """
    if window is None or token_chars is None or params.truncate != "error":
        return None
    room = window - params.max_new_tokens
    if len(text) <= room * token_chars:
        return None
    where = f"hop {hop!r}" if hop else "the prompt"
    return ContextWindowExceeded(
        f"{where}: the prompt is {len(text):,} characters, so at least {-(-len(text) // token_chars):,} tokens (no "
        f"token of model {model!r} stands for more than {token_chars} characters), and asks for "
        f"{params.max_new_tokens} new ones, but the model has a context window of {window} tokens",
        hint=_PAST_WINDOW_HINT,
    )


_PAST_WINDOW_HINT = "shorten the prompt, lower max_new_tokens, or set truncate: left on the hop"


def render_chat(tokenizer: Any, messages: Messages, model: str, hop: str | None = None) -> str:
    """``messages`` as the prompt ``tokenizer``'s chat template makes of them, ready for the assistant's answer.

    Without a template this refuses, as ``transformers serve`` does (HTTP 500): no default template is guessed.
    """
    where = f"hop {hop!r}: " if hop else ""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{where}model {model!r} has no chat template, so it cannot take messages",
            hint="give the hop prompt: instead of messages:, or use a chat model (one whose tokenizer has a chat "
            "template)",
        )
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except Exception as exc:  # jinja2's errors, and what a template's raise_exception(...) says
        raise ChatTemplateError(
            f"{where}the chat template of model {model!r} refused the messages: {type(exc).__name__}: {exc}",
            hint="many templates want one system message first, then user and assistant in turn, ending with user",
        ) from None


def result_from_stamps(
    request: GenerationRequest,
    tokens: list[int],
    text: str,
    finish_reason: Literal["stop", "length"],
    *,
    started: float,
    first: float,
    last: float,
    batch_id: int,
    batch_size: int,
    padding_tokens: int = 0,
    tokens_in: int | None = None,
    tokens_out: int | None = None,
    prefix_tokens: int = 0,
    prefix_saved_ms: float = 0.0,
) -> GenerationResult:
    """A request's result from the clock reads of its batch: scheduled at ``started``, first token, last token.

    ``tokens_in`` and ``tokens_out`` are for a backend that counts tokens it does not hold (a server's
    usage); by default they are the prompt's and ``tokens``' lengths.
    """
    return GenerationResult(
        text=text,
        token_ids=tokens,
        tokens_in=request.tokens_in if tokens_in is None else tokens_in,
        tokens_out=len(tokens) if tokens_out is None else tokens_out,
        finish_reason=finish_reason,
        queue_ms=(started - request.submitted) * 1e3,
        prefill_ms=(first - started) * 1e3,
        ttft_ms=(first - request.submitted) * 1e3,
        decode_ms=(last - first) * 1e3,
        e2e_ms=(time.perf_counter() - request.submitted) * 1e3,
        batch_id=batch_id,
        batch_size=batch_size,
        padding_tokens=padding_tokens,
        prefix_tokens=prefix_tokens,
        prefix_saved_ms=prefix_saved_ms,
    )
