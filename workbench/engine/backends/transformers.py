"""The in-process transformers backend: tokenize a batch, generate one left-padded batch, time it honestly."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerationMixin

from workbench.engine.backends.base import (
    BackendOutOfMemory,
    render_chat,
    BatchTiming,
    OnError,
    OnResult,
    Scheduler,
    TokenSink,
    next_batch_id,
    result_from_stamps,
)
from workbench.engine.backends.codec import TextCodec
from workbench.engine.backends.prefix_cache import PrefixCache, PrefixEntry
from workbench.engine.requests import GenerationParams, GenerationRequest, GenerationResult, Messages
from workbench.errors import AdapterError
from workbench.models.adapters import BASE
from workbench.models.devices import dtype_name
from workbench.tracing import attributes as attr
from workbench.models.registry import LoadedModel

if TYPE_CHECKING:
    from workbench.engine.batching import BatchingPolicy


def is_torch_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch running out of memory: CUDA's error (or a fake one), or an allocator's RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class _StepClock(BaseStreamer):
    """Reads the clock at each ``put`` of ``generate``: once for the prompt, then once per step.

    The first put after the prompt is the first token (prefill done); each later one is a
    decode step. ``put`` gets tokens already copied to the host, so on CUDA its clock reads
    are synchronised. It only reads the clock: which step ended a row is read from the
    generated tokens afterwards, so a step costs no tensor work here.

    Given the batch to ``watch``, it stops ``generate`` (raising _AllCancelled) at the first step
    after every one of its requests was cancelled.
    """

    def __init__(self, on_step: Callable[[torch.Tensor], None] | None = None,
                 on_beat: Callable[[], None] | None = None, watch: list[GenerationRequest] | None = None) -> None:
        self.step_times: list[float] = []
        self._prompt_seen = False
        self._on_step = on_step
        self._on_beat = on_beat
        self._watch = watch

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.step_times.append(time.perf_counter())
            if self._on_step is not None:
                self._on_step(value)
        else:
            self._prompt_seen = True
        if self._on_beat is not None:
            self._on_beat()
        watch = self._watch  # its first row first: at every step of a batch running as it should, one look
        if watch is not None and watch[0].cancelled and all(r.cancelled for r in watch):
            raise _AllCancelled  # nobody waits for any row: generate stops here

    def end(self) -> None:
        pass


class _AllCancelled(Exception):
    """Every request of the batch was cancelled (see _StepClock's ``watch``): its generate stops at that step."""


class _CancelledRows(StoppingCriteria):
    """Stops the rows of requests cancelled mid-batch (their timeout ran out) while batch-mates go on."""

    def __init__(self, batch: list[GenerationRequest]) -> None:
        self.batch = batch
        self._none: torch.Tensor | None = None  # built once: most steps of most batches stop no row

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        if any(r.cancelled for r in self.batch):
            return torch.tensor([r.cancelled for r in self.batch], dtype=torch.bool, device=input_ids.device)
        if self._none is None:
            self._none = torch.zeros(len(self.batch), dtype=torch.bool, device=input_ids.device)
        return self._none  # type: ignore[return-value]


class _SeededSampling(LogitsProcessor):
    """Samples each row of a seeded batch from a generator of its own, seeded with the request's seed.

    ``torch.manual_seed`` seeds one stream that every row of a batch draws from in turn, so a seeded request's text
    depended on its batch-mates and its row among them: the same request sampled differently alone, in a batch of 4,
    under another policy. Each row here draws as generate's own sampling draws for a batch of one (its warpers, a
    softmax, a multinomial from a stream seeded so), so a seeded request gets in any batch what it gets alone. The
    scores it returns leave only the drawn token, which greedy selection then picks.
    """

    def __init__(self, params: GenerationParams, rows: int, config: Any = None) -> None:
        # As generate orders them for sampling (min_tokens_to_keep 1: no beams). Temperature, top_k and top_p are the
        # request's (generate is given them, None for "off"); the others, as generate takes them, from the model's
        # generation config (``config``), so a seeded request samples from what an unseeded one samples from.
        warpers: list[LogitsProcessor] = []
        if params.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(params.temperature))
        if getattr(config, "top_h", None) is not None:
            warpers.append(TopHLogitsWarper(top_h=config.top_h))
        if params.top_k:
            warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
        if getattr(config, "min_p", None) is not None:
            warpers.append(MinPLogitsWarper(min_p=config.min_p))
        if getattr(config, "typical_p", None) is not None and config.typical_p < 1.0:
            warpers.append(TypicalLogitsWarper(mass=config.typical_p))
        if getattr(config, "epsilon_cutoff", None) is not None and 0.0 < config.epsilon_cutoff < 1.0:
            warpers.append(EpsilonLogitsWarper(epsilon=config.epsilon_cutoff))
        eta = getattr(config, "eta_cutoff", None)
        self._eta = eta if eta is not None and 0.0 < eta < 1.0 else None  # its warper is built at the first step
        self.warpers = LogitsProcessorList(warpers)
        self.seed, self.rows = params.seed, rows
        self.generators: list[torch.Generator] = []  # on the device the logits come out on, at the first step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.generators:
            self.generators = [torch.Generator(device=scores.device).manual_seed(self.seed) for _ in range(self.rows)]
            if self._eta is not None:
                self.warpers.append(EtaLogitsWarper(epsilon=self._eta, device=scores.device))
        probs = torch.softmax(self.warpers(input_ids, scores), dim=-1)
        drawn = torch.cat([torch.multinomial(probs[row : row + 1], 1, generator=generator)
                           for row, generator in enumerate(self.generators)])
        return torch.full_like(scores, -math.inf).scatter_(1, drawn, 0.0)  # type: ignore[return-value]


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end a generation: the model's generation config's, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


class TransformersBackend:
    """Runs left-padded batched ``generate`` for one model loaded in this process (a :class:`Backend`)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.name
        self.source = loaded.source
        self.device = str(loaded.device)
        self.dtype = dtype_name(loaded.dtype)
        self.context_window = loaded.context_window
        self.eos_ids = eos_ids(loaded.model, loaded.tokenizer)
        self.pad_id: int = loaded.tokenizer.pad_token_id
        self.codec = TextCodec(loaded.tokenizer, self.eos_ids)
        # Requests with a prefix_len reuse the KV of their prompt's prefix from here (cache: prefix hops).
        self.prefix_cache = PrefixCache(loaded.model, loaded.device)
        forward = getattr(loaded.model, "get_base_model", lambda: loaded.model)().forward
        self._cache_kwarg = "past_key_values" if "past_key_values" in inspect.signature(forward).parameters else "cache"
        # Named LoRA adapters, for requests that name one; a replica that copied the weights elsewhere has none.
        adapters = loaded.adapters
        self.adapters = adapters if adapters is not None and adapters.model is loaded.model else None
        self._lean: _LeanGreedy | None | bool = False  # False: not looked at yet (see _lean_greedy)
        self._lean_for: tuple[Any, dict[str, Any]] = (None, {})  # the generation config it was decided for, as it was

    def warm_prefix(self, ids: Sequence[int]) -> bool:
        """Make sure the KV of prefix ``ids`` is cached (prefilling it now if not); True if it already was."""
        if self.adapters is not None:
            return False  # no prefix KV on a model with named adapters (see _generate)
        return self.prefix_cache.get(ids)[1]

    def tokenize(self, prompts: Sequence[str], special_tokens: bool = True) -> list[list[int]]:
        return self.codec.tokenize(prompts, special_tokens)

    def chat_prompt(self, messages: Messages, hop: str | None = None) -> str:
        return render_chat(self.codec.tokenizer, messages, self.model, hop)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.codec.detokenize(tokens)

    def check(self, policy: BatchingPolicy) -> None:
        if policy.continuous and self.adapters is not None:
            # transformers' scheduler runs the peft model with whichever adapter is active, for every row.
            raise AdapterError(f"model {self.model!r} carries named LoRA adapters, and {policy.name} has no "
                               "per-request adapters", hint="use DynamicBatching (adapters='mixed' or 'grouped')")
        if policy.continuous:
            from workbench.engine.backends.continuous import check_model

            check_model(self.loaded)

    def scheduler(self, policy: BatchingPolicy, on_result: OnResult, on_error: OnError) -> Scheduler:
        from workbench.engine.backends.continuous import ContinuousBackend

        return ContinuousBackend(self, policy.settings(), on_result, on_error)  # type: ignore[attr-defined]

    def release_memory(self) -> None:
        if self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()  # give back what the failed batch's allocations left cached

    def memory_bytes(self) -> int:
        return self.loaded.memory_bytes

    def close(self) -> None:
        pass  # the registry owns the weights and frees them on unload

    def _lean_greedy(self) -> _LeanGreedy | None:
        """The workbench's greedy loop for this model, or None where only ``generate`` decodes as ``generate`` does
        (decided once, and again whenever the model's generation config changed)."""
        model = self.loaded.model
        if not _LEAN_DECODE:
            return None
        if "generate" in vars(model):
            return None  # generate replaced on the model itself (a wrapper, a patch, a stand-in): it decodes
        # Looked at again whenever the generation config changed since (a penalty set on the loaded model, say).
        settings = model.generation_config
        try:
            same = self._lean is not False and self._lean_for[0] is settings and vars(settings) == self._lean_for[1]
        except Exception:  # a value that does not compare as one bool (a tensor): look again every time
            same = False
        if not same:
            self._lean = _LeanGreedy.of(model, self.pad_id, self.eos_ids)
            try:
                self._lean_for = (settings, copy.deepcopy(vars(settings)))
            except Exception:  # a value that does not copy: decided again next time, never a failed request
                self._lean_for = (None, {})
        return self._lean  # type: ignore[return-value]

    def generate(
        self, batch: list[GenerationRequest], on_token: TokenSink | None = None, on_beat: Callable[[], None] | None = None
    ) -> tuple[list[GenerationResult], BatchTiming]:
        """``on_beat`` (beyond the Backend protocol) hears each step of the batch, prefill included, with no data: a
        model process tells its parent it is alive."""
        try:
            return self._generate(batch, on_token, on_beat)
        except BaseException as exc:
            if is_torch_out_of_memory(exc):
                raise BackendOutOfMemory(str(exc)) from exc
            raise

    def _streamer(self, batch: list[GenerationRequest], on_token: TokenSink) -> Callable[[torch.Tensor], None]:
        """Forward each step's token of every streaming row to ``on_token``, with the text it adds."""
        rows = [(row, request) for row, request in enumerate(batch) if request.stream]
        texts = {row: self.codec.stream() for row, _ in rows}
        done: set[int] = set()
        steps = 0
        most = batch[0].params.max_new_tokens

        def on_step(value: torch.Tensor) -> None:
            nonlocal steps
            steps += 1
            step = value.tolist()
            for row, request in rows:
                if row in done:
                    continue
                token = step[row] if isinstance(step, list) else step
                if token in self.eos_ids:
                    done.add(row)
                    rest = texts[row].add(token, last=True)  # a character the row ended inside
                    if rest:
                        on_token(request, token, rest)
                    continue
                on_token(request, token, texts[row].add(token, last=steps == most))

        return on_step

    def _generate(
        self, batch: list[GenerationRequest], on_token: TokenSink | None, on_beat: Callable[[], None] | None = None
    ) -> tuple[list[GenerationResult], BatchTiming]:
        """Generate for every request of ``batch`` (equal params) in one padded call."""
        params = batch[0].params
        model, device = self.loaded.model, self.loaded.device
        # A model with named adapters keeps no prefix KV: a prefix's KV depends on each row's adapter version,
        # and the prefill would run under peft's active adapter, not the row's. Such batches prefill whole prompts.
        shared = _shared_prefix(batch) if self.adapters is None else None
        prefix: PrefixEntry | None = None
        cached: dict[str, Any] = {}
        if shared is None:
            width = max(r.tokens_in for r in batch)
            # Padded rows built as lists: two tensor constructions, however large the batch.
            rows = [[self.pad_id] * (width - r.tokens_in) + r.input_ids for r in batch]
            masks = [[0] * (width - r.tokens_in) + [1] * r.tokens_in for r in batch]
        else:
            # Every row starts with the same cached prefix: [prefix][padding][suffix]. The mask hides the padding,
            # and generate numbers positions by the mask's running count, so each suffix goes on from the prefix.
            # The padding holds the prefix's first token, not the pad token: a repetition penalty (from a model's
            # generation config) skips leading padding only, so a pad token here was penalized in padded rows alone
            # (an EOS where the tokenizer pads with EOS, and those rows ran on past where they end alone); the
            # prefix's own token is in every row already, and a token is penalized once however often it occurs.
            looked_up = time.perf_counter()
            prefix, hit = self.prefix_cache.get(shared)
            size = len(shared)
            width = max(r.tokens_in for r in batch)
            rows = [r.input_ids[:size] + [shared[0]] * (width - r.tokens_in) + r.input_ids[size:] for r in batch]
            masks = [[1] * size + [0] * (width - r.tokens_in) + [1] * (r.tokens_in - size) for r in batch]
            cached[self._cache_kwarg] = self.prefix_cache.expanded(prefix, len(batch), model.config)
            if not hit:
                prefix = None  # prefilled in this batch: nothing was saved this time
        input_ids = torch.tensor(rows, dtype=torch.long)
        attention = torch.tensor(masks, dtype=torch.long)
        # A prefix prefilled for this batch (a miss) is part of its prefill.
        started = looked_up if shared is not None and prefix is None else time.perf_counter()
        streaming = on_token is not None and any(r.stream for r in batch)
        cancellable = any(r.cancellable for r in batch)
        # The clock stops generate once every request of the batch is cancelled; with batch-mates, a stopping criterion
        # stops each cancelled row at its next step while they go on. A criterion costs a tensor op at every step (with
        # the clock, ~0.4 ms of a 10-token generate of the tiny model on this CPU against ~0.1 ms for the clock alone):
        # a batch of one, the common case of a chain run alone, goes without it.
        clock = _StepClock(self._streamer(batch, on_token) if streaming else None, on_beat,  # type: ignore[arg-type]
                           batch if cancellable else None)
        criteria = [_CancelledRows(batch)] if cancellable and len(batch) > 1 else []
        adapter_kwargs: dict[str, Any] = {}
        lock: Any = contextlib.nullcontext()
        if self.adapters is not None:
            # One generate for the whole batch: peft applies each row's own adapter version (or none, __base__).
            adapter_kwargs["adapter_names"] = [r.adapter or BASE for r in batch]
            lock = self.adapters.lock  # peft hooks the shared model per call; a swap must not overlap
        decoding = params.generate_kwargs()
        sampler: list[LogitsProcessor] = []
        if params.seed is not None and not params.greedy:
            sampler.append(_SeededSampling(params, len(batch), model.generation_config))
            decoding.update(do_sample=False, temperature=None, top_p=None, top_k=None)  # it draws; greedy picks
        # Greedy rows with nothing cached nor adapted decode in the workbench's own loop (see _LeanGreedy).
        lean = self._lean_greedy() if params.greedy and shared is None and not adapter_kwargs else None
        try:
            with lock, torch.inference_mode():
                if lean is not None:
                    generated = lean.decode(input_ids.to(device), attention.to(device), params.max_new_tokens,
                                            self.eos_ids, self.pad_id, clock, batch)
                else:
                    output = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention.to(device),
                        pad_token_id=self.pad_id,
                        eos_token_id=sorted(self.eos_ids) or None,
                        streamer=clock,
                        stopping_criteria=StoppingCriteriaList(criteria),
                        **cached,
                        **adapter_kwargs,
                        logits_processor=LogitsProcessorList(sampler),
                        **decoding,
                    )
                    generated = output[:, width:].tolist()
        except _AllCancelled:
            # No one reads the rows of a batch stopped short: each request was failed when it was cancelled.
            generated = [[] for _ in batch]
        ended = time.perf_counter()
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
                result_from_stamps(
                    request, tokens, self.detokenize(tokens), "stop" if stop_step is not None else "length",
                    started=started, first=first, last=finished, batch_id=batch_id, batch_size=len(batch),
                    padding_tokens=width - request.tokens_in,
                    prefix_tokens=len(prefix.ids) if prefix is not None else 0,
                    prefix_saved_ms=prefix.prefill_ms if prefix is not None else 0.0,
                )
            )
        attributes: dict[str, object] = {attr.DECODE_LOOP: "workbench" if lean is not None else "generate"}
        if self.adapters is not None:
            attributes[attr.ADAPTER_NAMES] = sorted(set(adapter_kwargs["adapter_names"]))
        timing = BatchTiming(
            attributes=attributes,
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


# AUTOGLM_LEAN_DECODE=0 (read at import, in a model process too): every request decodes through generate, to compare
# generate itself or to rule the workbench's loop out.
_LEAN_DECODE = os.environ.get("AUTOGLM_LEAN_DECODE", "1") != "0"

# The steps of greedy generate a model's class may make its own; one that does decodes through generate.
_GENERATE_STEPS = ("generate", "_sample", "_prefill", "prepare_inputs_for_generation",
                   "_update_model_kwargs_for_generation", "_prepare_cache_for_generation")


class _LeanGreedy:
    """Greedy decoding of a batch in a plain loop over the model's forward: what ``generate`` does for it, without
    ``generate``'s Python around each call and each step.

    ``generate`` builds and validates a generation config, its logits processors and stopping criteria on every call,
    and at every step prepares inputs, updates keyword arguments and runs each criterion as a tensor op. On the tiny
    model on this CPU that was ~1 ms a call and ~0.25 ms a step: a lone 10-token answer took 8.5 ms through
    ``generate`` and 6.3 ms here, the same tokens. The loop is what ``generate``'s greedy search does with a dynamic
    cache: prefill the left-padded prompts, take the argmax of each row's last logits (in float32), feed them back
    (the mask grown by one, positions on by one, an ended row with the pad token), until every row has ended or
    ``max_new_tokens``.

    Used only where ``generate`` would add nothing else (see :meth:`of`): a model of transformers' own code that
    takes a dynamic cache and whose class changes none of generate's steps, whose generation config asks for no
    logits processor, no stop strings, no time limit, no other cache and no chunked prefill (looked at again when
    that config changes), and whose ``generate`` was not replaced on the model itself. Any other decodes through
    ``generate`` as before; the batch span's ``workbench.decode_loop`` says which loop ran.
    """

    def __init__(self, model: Any, cache_kwarg: str, logits_to_keep: bool, positions: bool) -> None:
        self.model = model
        self._cache_kwarg = cache_kwarg
        self._logits_to_keep = logits_to_keep
        self._positions = positions  # the forward takes position_ids: generate passes them, so the loop does

    @classmethod
    def of(cls, model: Any, pad_id: int | None, eos: set[int]) -> _LeanGreedy | None:
        """A loop for ``model``, or None where greedy ``generate`` would do anything the loop does not."""
        try:
            config = model.config
            if config.is_encoder_decoder or hasattr(model, "peft_config") or model.is_remote_code() or pad_id is None:
                return None
            if not type(model)._supports_default_dynamic_cache():
                return None
            if any(getattr(type(model), step) is not getattr(GenerationMixin, step) for step in _GENERATE_STEPS):
                return None  # the model's class decodes its own way (Phi-3 resets a long cache, say)
            settings = copy.deepcopy(model.generation_config)
            settings.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1,
                            pad_token_id=pad_id, eos_token_id=sorted(eos) or None)
            if (settings.cache_implementation not in (None, "dynamic") or settings.use_cache is False
                    or getattr(settings, "prefill_chunk_size", None) or settings.max_time is not None
                    or settings.stop_strings is not None or getattr(settings, "compile_config", None) is not None
                    and model._valid_auto_compile_criteria({}, settings)):
                return None
            # transformers' own list of what greedy generate would do to the scores: nothing, or no loop here. Those
            # that act on end tokens (a minimum length, bad words) are listed only given the end tokens' tensor, which
            # generate sets before it asks; a model without end tokens is asked as if it had one, to be sure.
            settings._eos_token_tensor = torch.tensor(sorted(eos) or [0])
            if len(model._get_logits_processor(generation_config=settings, input_ids_seq_length=1,
                                               device=str(model.device), model_kwargs={})):
                return None
            parameters = inspect.signature(model.forward).parameters
        except Exception:  # another transformers, another model: generate decides everything, as before
            return None
        cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        if cache_kwarg not in parameters:
            return None
        return cls(model, cache_kwarg, "logits_to_keep" in parameters, "position_ids" in parameters)

    def decode(self, input_ids: torch.Tensor, attention: torch.Tensor, max_new_tokens: int, eos: set[int],
               pad_id: int, clock: _StepClock, batch: list[GenerationRequest]) -> list[list[int]]:
        """The tokens greedy decoding of the left-padded rows ``input_ids`` (``attention`` their mask) writes, each
        row's end token included and its pad tokens after; ``clock`` hears the prompt, then each step's tokens, as
        ``generate``'s streamer does. As ``generate``: a mask of only ones is dropped; positions count the mask's ones
        (0 on padding) and go on by one a step; a row that ended takes the pad token; a row of ``batch`` cancelled
        meanwhile ends at this step; decoding stops once every row has ended."""
        from transformers import DynamicCache

        model = self.model
        rows, width = input_ids.shape
        kwargs: dict[str, Any] = {self._cache_kwarg: DynamicCache(config=model.config.get_text_config(decoder=True)),
                                  "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        padded = rows > 1 and not bool((attention == 1).all())
        if padded:
            kwargs["attention_mask"] = attention
        positions = None
        if self._positions:
            positions = ((attention.cumsum(-1) - 1).masked_fill(attention == 0, 0) if padded
                         else torch.arange(width, device=input_ids.device)[None])
        ends = torch.tensor(sorted(eos), device=input_ids.device) if eos and rows > 1 else None
        unfinished = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
        watch = batch if rows > 1 and any(r.cancellable for r in batch) else None
        clock.put(input_ids)
        steps: list[torch.Tensor] = []
        step_input = input_ids
        for _ in range(max_new_tokens):
            if positions is not None:
                kwargs["position_ids"] = positions
            logits = model(input_ids=step_input, return_dict=True, **kwargs).logits
            chosen = logits[:, -1].to(dtype=torch.float32).argmax(dim=-1)
            steps.append(chosen)
            if rows == 1:  # one row: its token read here (to the host: synchronised on CUDA, as generate's check is)
                clock.put(chosen)
                if int(chosen.item()) in eos:
                    break
            else:
                if ends is not None:
                    chosen = steps[-1] = torch.where(unfinished, chosen, pad_id)  # an ended row goes on with pads
                    unfinished &= ~torch.isin(chosen, ends)
                if watch is not None and any(r.cancelled for r in watch):
                    unfinished &= ~torch.tensor([r.cancelled for r in watch], device=unfinished.device)
                clock.put(chosen)
                if not bool(unfinished.any()):  # to the host: synchronised on CUDA, as generate's stop check is
                    break
            step_input = chosen[:, None]
            if padded:
                kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"], attention.new_ones((rows, 1))], dim=-1)
            if positions is not None:
                positions = positions[:, -1:] + 1
        return torch.stack(steps, dim=1).tolist()


# How many tokens short of the shortest prefix in a batch the common part may fall and still be reused.
_PREFIX_SLACK = 4


def _shared_prefix(batch: list[GenerationRequest]) -> tuple[int, ...] | None:
    """The prefix token ids every request of ``batch`` shares and may reuse from the prefix cache, or None.

    The longest run of leading tokens common to the requests' prefixes; a batch whose requests have
    different prefixes (or none) runs as a plain padded batch.
    """
    size = min(r.prefix_len for r in batch)
    if size <= 0:
        return None
    shared = batch[0].input_ids[:size]
    for request in batch[1:]:
        same = 0
        while same < size and request.input_ids[same] == shared[same]:
            same += 1
        size = same
    # A few tokens in common (a BOS, a word) are not a shared prefix worth a cache entry.
    return tuple(shared[:size]) if size >= max(1, min(r.prefix_len for r in batch) - _PREFIX_SLACK) else None
