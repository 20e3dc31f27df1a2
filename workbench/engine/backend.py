"""The local transformers backend: tokenize one prompt, generate one padded batch, time it honestly."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from workbench.engine.requests import GenerationParams, GenerationRequest, GenerationResult, check_text
from workbench.errors import ContextWindowExceeded
from workbench.models.registry import LoadedModel

_batch_ids = itertools.count(1)


def next_batch_id() -> int:
    """A process-wide batch number, shared by every backend so batch ids never collide in a trace."""
    return next(_batch_ids)


class _StepClock(BaseStreamer):
    """Reads the clock at each ``put`` of ``generate``: once for the prompt, then once per step.

    The first put after the prompt is the first token (prefill done); each later one is a
    decode step. ``put`` gets tokens already copied to the host, so on CUDA its clock reads
    are synchronised. It only reads the clock: which step ended a row is read from the
    generated tokens afterwards, so a step costs no tensor work here.
    """

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.step_times.append(time.perf_counter())
        else:
            self._prompt_seen = True

    def end(self) -> None:
        pass


class _CancelledRows(StoppingCriteria):
    """Stops the rows of requests cancelled mid-batch (their timeout ran out) while batch-mates go on."""

    def __init__(self, batch: list[GenerationRequest]) -> None:
        self.batch = batch

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        return torch.tensor([r.cancelled for r in self.batch], dtype=torch.bool, device=input_ids.device)


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


class TransformersBackend:
    """Runs left-padded batched ``generate`` for one loaded model."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        tokenizer = loaded.tokenizer
        eos = loaded.model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_id: int = tokenizer.pad_token_id

    def tokenize(self, prompt: str, params: GenerationParams, hop: str | None = None) -> tuple[list[int], int]:
        """Token ids for ``prompt`` and how many were dropped to fit the context window."""
        try:
            ids: list[int] = self.loaded.tokenizer(prompt)["input_ids"]
        except TypeError:  # how a fast tokenizer refuses text with a lone surrogate; say which
            check_text(prompt, f"the prompt of hop {hop!r}" if hop else "the prompt")
            raise
        window = self.loaded.context_window
        if window is None or len(ids) + params.max_new_tokens <= window:
            return ids, 0
        room = window - params.max_new_tokens
        where = f"hop {hop!r}" if hop else "the prompt"
        if params.truncate == "left" and room > 0:
            return ids[-room:], len(ids) - room
        raise ContextWindowExceeded(
            f"{where}: the prompt is {len(ids)} tokens and asks for {params.max_new_tokens} new ones, "
            f"but model {self.loaded.name!r} has a context window of {window} tokens",
            hint="shorten the prompt, lower max_new_tokens, or set truncate: left on the hop",
        )

    def detokenize(self, tokens: list[int]) -> str:
        """The text of generated ``tokens``, end-of-sequence and special tokens dropped."""
        return self.loaded.tokenizer.decode([t for t in tokens if t not in self.eos_ids], skip_special_tokens=True).strip()

    def generate(self, batch: list[GenerationRequest]) -> tuple[list[GenerationResult], BatchTiming]:
        """Generate for every request of ``batch`` (equal params) in one padded call."""
        params = batch[0].params
        model, device = self.loaded.model, self.loaded.device
        width = max(r.tokens_in for r in batch)
        # Padded rows built as lists: two tensor constructions, however large the batch.
        input_ids = torch.tensor([[self.pad_id] * (width - r.tokens_in) + r.input_ids for r in batch], dtype=torch.long)
        attention = torch.tensor([[0] * (width - r.tokens_in) + [1] * r.tokens_in for r in batch], dtype=torch.long)
        clock = _StepClock()
        cancellable = any(r.cancellable for r in batch)
        started = time.perf_counter()
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids) or None,
                streamer=clock,
                # Only requests with a timeout can be cancelled; others skip the per-step check.
                stopping_criteria=StoppingCriteriaList([_CancelledRows(batch)] if cancellable else []),
                **params.generate_kwargs(),
            )
        ended = time.perf_counter()
        generated = output[:, width:].tolist()
        first = clock.step_times[0] if clock.step_times else ended
        batch_id = next_batch_id()
        results = []
        detok_start = time.perf_counter()
        for row, request in enumerate(batch):
            # A finished row is padded from then on, so its first EOS is the step that ended it.
            stop_step = next((step for step, t in enumerate(generated[row]) if t in self.eos_ids), None)
            if stop_step is not None:
                tokens = generated[row][: stop_step + 1]
                finished = clock.step_times[stop_step]
            else:
                tokens = generated[row][: params.max_new_tokens]
                finished = clock.step_times[len(tokens) - 1] if tokens else first
            results.append(
                GenerationResult(
                    text=self.detokenize(tokens),
                    token_ids=tokens,
                    tokens_in=request.tokens_in,
                    tokens_out=len(tokens),
                    finish_reason="stop" if stop_step is not None else "length",
                    queue_ms=(started - request.submitted) * 1e3,
                    prefill_ms=(first - started) * 1e3,
                    ttft_ms=(first - request.submitted) * 1e3,
                    decode_ms=(finished - first) * 1e3,
                    e2e_ms=(time.perf_counter() - request.submitted) * 1e3,
                    batch_id=batch_id,
                    batch_size=len(batch),
                    padding_tokens=width - request.tokens_in,
                )
            )
        timing = BatchTiming(
            batch_id=batch_id,
            size=len(batch),
            padded_len=width,
            padding_tokens=sum(width - r.tokens_in for r in batch),
            started=started,
            prefill_ms=(first - started) * 1e3,
            decode_ms=(ended - first) * 1e3,
            detokenize_ms=(time.perf_counter() - detok_start) * 1e3,
            steps=len(clock.step_times),
        )
        return results, timing

