"""The engine: batched generation that matches single requests, finish reasons, timings, the queue."""

from __future__ import annotations

import _thread
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import WAIT_S, eventually
from opentelemetry.trace import INVALID_SPAN

import workbench as wb
from workbench.engine import GenerationParams, GenerationRequest
from workbench.engine.backends import Backend
from workbench.errors import WorkerStopped

PROMPTS = [
    "Question: What is the capital of France?\nPlan:",
    "A chain",
    "Latency is measured per span: queue wait, prefill, decode, and the time to first token. Question: How many?",
    "Tokens in, tokens out",
]


def _requests(bench: wb.Workbench, prompts: list[str], params: GenerationParams) -> list[GenerationRequest]:
    backend = bench.engine.worker("tiny").backend
    return [GenerationRequest("tiny", ids, params, INVALID_SPAN) for ids in backend.tokenize(prompts)]


def test_the_transformers_backend_is_a_backend_and_tokenizes_a_batch_as_one_by_one(tiny_bench: wb.Workbench) -> None:
    backend = tiny_bench.engine.worker("tiny").backend
    assert isinstance(backend, Backend)
    assert backend.tokenize(PROMPTS) == [backend.tokenize([p])[0] for p in PROMPTS]
    tokenizer = tiny_bench.registry.get("tiny").tokenizer
    alone = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert backend.tokenize(PROMPTS) == alone  # what the model would be given
    # A padded call elsewhere leaves padding switched on in the tokenizer's Rust core; the backend must not pad.
    tokenizer(PROMPTS, padding=True)
    assert backend.tokenize(PROMPTS) == alone
    assert (backend.device, backend.dtype) == ("cpu", "float32")


def test_the_codec_encodes_and_decodes_as_the_tokenizers_own_calls(tiny_bench: wb.Workbench) -> None:
    # The codec drives a private copy of the Rust core (see TextCodec); the ids and texts must be the tokenizer's.
    from workbench.engine.backends.codec import TextCodec

    backend = tiny_bench.engine.worker("tiny").backend
    codec: TextCodec = backend.codec
    tokenizer = tiny_bench.registry.get("tiny").tokenizer
    special = tokenizer.convert_ids_to_tokens(sorted(backend.eos_ids))[0]
    texts = [*PROMPTS, "", " leading space", f"text {special} with a special token", "ünïcödé ✓ 漢字", "a\nb\tc  d"]
    assert len(texts) > TextCodec.ONE_BY_ONE  # the whole list goes through encode_batch, short ones one by one
    for special_tokens in (True, False):
        expected = tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]
        assert codec.tokenize(texts, special_tokens) == expected
        assert [codec.tokenize([t], special_tokens)[0] for t in texts] == expected
    for ids in tokenizer(texts)["input_ids"]:
        kept = [t for t in ids if t not in backend.eos_ids]
        assert codec.detokenize(ids) == tokenizer.decode(kept, skip_special_tokens=True).strip()
    # A tokenizer that cleans up tokenization spaces keeps its own Python layer: the copy would not clean up.
    tokenizer.clean_up_tokenization_spaces = True
    try:
        assert TextCodec(tokenizer, backend.eos_ids)._core is None
    finally:
        tokenizer.clean_up_tokenization_spaces = False
    with pytest.raises(wb.InvalidInput, match="prompt 2 of 2"):
        codec.tokenize(["fine", "lone \udc80 surrogate"])


def test_a_stream_hands_out_each_character_whole_where_byte_tokens_split_it(tiny_bench: wb.Workbench) -> None:
    # The tiny model's byte-level BPE (GPT-2's kind, as Qwen's and GLM-4's) splits a Chinese character into up to
    # four tokens. Each step sliced the whole answer's text, so a stream sent U+FFFD for every such token and never
    # the character: 北京是中国的首都。 streamed as nine replacement characters.
    backend = tiny_bench.engine.worker("tiny").backend
    text = "北京是中国的首都。 Hello, 世界 🙂 ok"
    ids = backend.tokenize([text], special_tokens=False)[0]
    assert len(ids) > 2 * len(text.split())  # characters split across tokens
    expected = backend.detokenize(ids)
    assert expected == text
    pieces: dict[int, list[str]] = defaultdict(list)  # per request id
    for rows in (1, 3):  # the padded batch's streamer, fed each step's tokens as generate feeds them
        batch = [GenerationRequest("tiny", ids, GenerationParams(), INVALID_SPAN, on_token=lambda *_: None)
                 for _ in range(rows)]
        on_step = backend._streamer(batch, lambda request, token, piece: pieces[request.id].append(piece))
        for token in ids:
            on_step(torch.tensor([token] * rows))
    stream = backend.codec.stream()  # as continuous batching streams
    streamed = [*pieces.values(), [stream.add(token) for token in ids]]
    assert len(streamed) == 5
    for pieces_of_row in streamed:
        assert "".join(pieces_of_row) == expected
        assert not any("\ufffd" in piece for piece in pieces_of_row)
        assert len(pieces_of_row) == len(ids)  # one piece per token, empty while a character is incomplete


def test_the_worker_loop_and_the_seam_import_no_torch() -> None:
    # The backend seam keeps torch behind it: the worker, queue, policies and failure kinds run without it,
    # so a process-isolated or remote backend's parent side need not load it.
    for module in ("workbench/engine/worker.py", "workbench/engine/failures.py", "workbench/engine/queue.py",
                   "workbench/engine/batching.py", "workbench/engine/backends/base.py", "workbench/engine/faults.py"):
        source = (Path(__file__).parent.parent / module).read_text()
        assert "import torch" not in source, module


def test_greedy_output_is_the_same_alone_or_in_a_padded_batch(tiny_bench: wb.Workbench) -> None:
    backend = tiny_bench.engine.worker("tiny").backend
    params = GenerationParams(max_new_tokens=20)
    alone = [backend.generate(_requests(tiny_bench, [p], params))[0][0] for p in PROMPTS]
    together, timing = backend.generate(_requests(tiny_bench, PROMPTS, params))

    assert timing.size == len(PROMPTS)
    assert timing.padding_tokens > 0  # the prompts differ in length, so rows were padded
    assert [r.batch_size for r in together] == [len(PROMPTS)] * len(PROMPTS)
    assert len({r.tokens_in for r in together}) > 1
    for single, batched in zip(alone, together, strict=True):
        assert batched.token_ids == single.token_ids
        assert batched.text == single.text
        assert batched.finish_reason == single.finish_reason
    assert any(r.tokens_out != together[0].tokens_out for r in together)  # rows stopped at different steps


def test_a_prefix_batch_gives_the_greedy_outputs_of_each_request_alone_under_a_repetition_penalty(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    """A batch whose requests share a cached prefix pads between the prefix and each suffix. The padding was the pad
    token, which a repetition penalty from the model's generation config counts (it skips leading padding only): with
    a tokenizer that pads with EOS, padded rows had EOS penalized and ran on past where the same requests end alone."""
    import json
    import shutil

    model = tmp_path / "tiny-penalized-no-pad"
    shutil.copytree(tiny_path, model)
    for name, drop, add in (("tokenizer_config.json", "pad_token", {}),  # the workbench pads with EOS then
                            ("generation_config.json", "pad_token_id", {"repetition_penalty": 3.0})):
        config = json.loads((model / name).read_text())
        config.pop(drop)
        (model / name).write_text(json.dumps({**config, **add}))
    bench.load("tiny", model, device="cpu")
    backend = bench.engine.worker("tiny").backend
    assert backend.pad_id in backend.eos_ids
    prefix = "The model is small, the tokenizer is trained on this text, and everything runs offline. Question:"
    size = len(backend.tokenize([prefix])[0]) - 1  # as the engine counts it: the last token may merge
    params = GenerationParams(max_new_tokens=24)

    def requests() -> list[GenerationRequest]:
        return [GenerationRequest("tiny", ids, params, INVALID_SPAN, prefix_len=size)
                for ids in backend.tokenize([f"{prefix} {p}" for p in PROMPTS])]

    alone = [backend.generate([request])[0][0] for request in requests()]
    together, timing = backend.generate(requests())
    assert timing.padding_tokens > 0 and all(r.prefix_tokens == size for r in together)  # the prefix path, padded
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]


def test_finish_reason_and_token_counts(tiny_bench: wb.Workbench) -> None:
    eos = tiny_bench.engine.worker("tiny").backend.eos_ids
    stopped = tiny_bench.generate("tiny", PROMPTS[0], max_new_tokens=32)
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids[-1] in eos
    assert stopped.tokens_out == len(stopped.token_ids) < 32
    assert stopped.text and "</s>" not in stopped.text

    cut = tiny_bench.generate("tiny", PROMPTS[0], max_new_tokens=3)
    assert cut.finish_reason == "length"
    assert cut.tokens_out == len(cut.token_ids) == 3
    assert cut.token_ids == stopped.token_ids[:3]
    assert cut.tokens_in == stopped.tokens_in == len(tiny_bench.registry.get("tiny").tokenizer(PROMPTS[0]).input_ids)


def test_seeded_sampling_is_repeatable(tiny_bench: wb.Workbench) -> None:
    def sample(seed: int) -> list[int]:
        return tiny_bench.generate("tiny", "A chain", max_new_tokens=16, temperature=1.5, seed=seed).token_ids

    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in range(1, 6)}) > 1  # it really samples


def test_a_seeded_request_samples_under_the_models_own_sampling_settings_as_an_unseeded_one_does(
        tiny_path: Path) -> None:
    """A model's generation config may narrow sampling (min_p, typical_p, ...); generate applies those to an unseeded
    request, and the seeded path (its own warpers) must too. With min_p 0.99 every token written, seeded or not, is
    within 1 % of the likeliest at its step (at the request's temperature); without it, sampling at 1.5 strays."""
    import torch

    with wb.Workbench() as bench:
        loaded = bench.load("tiny", tiny_path, device="cpu")
        prompt_ids = loaded.tokenizer("A chain")["input_ids"]

        def strays(token_ids: list[int]) -> int:
            """How many of ``token_ids`` min_p 0.99 would not have let through."""
            with torch.inference_mode():
                logits = loaded.model(input_ids=torch.tensor([prompt_ids + token_ids])).logits[0]
            probs = torch.softmax(logits[len(prompt_ids) - 1: -1] / 1.5, dim=-1)
            chosen = probs[torch.arange(len(token_ids)), torch.tensor(token_ids)]
            return int((chosen < 0.99 * probs.max(dim=-1).values).sum())

        def sampled(seed: int | None) -> list[int]:
            return bench.generate("tiny", "A chain", max_new_tokens=16, temperature=1.5, seed=seed).token_ids

        assert sum(strays(sampled(seed)) for seed in (1, 2, 3)) > 0  # sampling at 1.5 strays, unnarrowed
        loaded.model.generation_config.min_p = 0.99
        for seed in (None, 1, 2, 3, 4):
            assert strays(sampled(seed)) == 0, seed

def test_timings_are_consistent(tiny_bench: wb.Workbench) -> None:
    for max_new_tokens in (1, 6, 32):
        result = tiny_bench.generate("tiny", PROMPTS[0], max_new_tokens=max_new_tokens)
        assert result.prefill_ms > 0
        assert result.queue_ms >= 0
        assert result.ttft_ms >= result.queue_ms
        assert result.ttft_ms == pytest.approx(result.queue_ms + result.prefill_ms)
        assert result.decode_ms >= 0
        assert result.e2e_ms >= result.ttft_ms + result.decode_ms
        if result.tokens_out > 1:
            assert result.tpot_ms == pytest.approx(result.decode_ms / (result.tokens_out - 1))
        else:
            assert result.tpot_ms is None
            assert result.decode_ms == 0


def _long_text(bench: wb.Workbench) -> tuple[str, int]:
    text = "Tokens in, tokens out, padding, batch size, throughput in tokens per second. " * 40
    return text, len(bench.registry.get("tiny").tokenizer(text).input_ids)


def test_prompt_longer_than_the_window_names_the_hop(tiny_bench: wb.Workbench) -> None:
    text, tokens = _long_text(tiny_bench)
    assert tokens > 512
    chain = tiny_bench.chain({"name": "long", "hops": [{"name": "digest", "model": "tiny", "prompt": "{{ text }}",
                                                        "max_new_tokens": 8}]})
    with pytest.raises(wb.HopFailed) as info:
        chain.run(text=text)
    assert info.value.hop == "digest"
    assert isinstance(info.value.cause, wb.ContextWindowExceeded)
    message = str(info.value.cause)
    assert "hop 'digest'" in message and f"{tokens} tokens" in message and "512" in message
    assert "truncate: left" in message
    with pytest.raises(wb.ContextWindowExceeded, match="the prompt"):
        tiny_bench.generate("tiny", text, max_new_tokens=8)


def test_a_long_prompt_past_the_window_by_its_length_alone_is_refused_untokenized(
    tiny_bench: wb.Workbench, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A prompt of millions of characters (up to the ten million a template may make) was tokenized in full before
    # the context-window check, on the workbench's event loop and with Python's lock held: ~20 s for ten million, in
    # which no other run took a step (a short run waited 12.7 s behind one of 9.9 million characters), only to be
    # refused. No token of the tiny model's byte-level BPE stands for more than 11 characters, so that prompt is
    # surely past its 512 tokens, and is refused at once.
    from workbench.engine.engine import LONG_PROMPT_CHARS

    backend = tiny_bench.engine.worker("tiny").backend
    assert backend.codec.token_chars == max(map(len, tiny_bench.registry.get("tiny").tokenizer.get_vocab()))
    tokenize, tokenized = backend.tokenize, []

    def watched(prompts: list[str], *args: object, **kwargs: object) -> list[list[int]]:
        tokenized.extend(len(p) for p in prompts if len(p) > LONG_PROMPT_CHARS)
        return tokenize(prompts, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(backend, "tokenize", watched)  # the real tokenizer, watched for the long prompts it gets
    text, tokens = _long_text(tiny_bench)
    text *= LONG_PROMPT_CHARS // len(text) + 1
    chain = tiny_bench.chain({"name": "longer", "hops": [
        {"name": "digest", "model": "tiny", "prompt": "{{ text }}", "max_new_tokens": 8}]})
    with pytest.raises(wb.HopFailed) as info:
        chain.run(text=text)
    message = str(info.value.cause)
    assert isinstance(info.value.cause, wb.ContextWindowExceeded) and "hop 'digest'" in message
    assert f"{len(text):,} characters" in message and "context window of 512 tokens" in message
    with pytest.raises(wb.ContextWindowExceeded, match="characters, so at least"):
        tiny_bench.generate("tiny", text, max_new_tokens=8)
    assert tokenized == []  # refused by length, never tokenized
    chain.set("digest.truncate", "left")  # keeps the newest tokens: the whole prompt is counted
    assert chain.run(text=text).trace.table()["attributes.workbench.truncated_tokens"].max() > tokens
    assert tokenized == [len(text)]


def test_an_empty_prompt_is_refused_by_name_alone_in_a_batch_and_on_the_continuous_path(
    tiny_bench: wb.Workbench,
) -> None:
    # torch failed deep in the forward pass ("cannot reshape tensor of 0 elements"), a RuntimeError that also
    # counted against the model's breaker; padded into a batch the row answered from padding alone.
    chain = tiny_bench.chain({"name": "empty", "hops": [{"name": "say", "model": "tiny", "prompt": "{{ text }}",
                                                         "max_new_tokens": 2}]})
    with pytest.raises(wb.HopFailed) as info:
        chain.run(text="")
    assert isinstance(info.value.cause, wb.InvalidInput) and "hop 'say': the prompt is empty" in str(info.value)
    for policy in (wb.DynamicBatching(max_batch=4, max_wait_ms=100), wb.ContinuousBatching(max_batch=4)):
        tiny_bench.set_batching("tiny", policy)
        try:
            batch = chain.map([{"text": ""}, {"text": "Paris"}], concurrency=2)
            assert isinstance(batch[0].error, wb.HopFailed) and isinstance(batch[0].error.cause, wb.InvalidInput)
            assert batch[1].ok
            with pytest.raises(wb.InvalidInput, match="the prompt is empty"):
                tiny_bench.generate("tiny", "", max_new_tokens=2)
        finally:
            tiny_bench.set_batching("tiny", wb.NoBatching())
    breaker = tiny_bench.breakers().set_index("model").loc["tiny"]
    assert breaker["state"] == "closed" and breaker["failures"] == 0  # a mistake, not a model failure


def test_truncate_left_keeps_the_newest_tokens_and_records_how_many_went(tiny_bench: wb.Workbench) -> None:
    text, tokens = _long_text(tiny_bench)
    chain = tiny_bench.chain({"name": "long", "hops": [{"name": "digest", "model": "tiny", "prompt": "{{ text }}",
                                                        "max_new_tokens": 8, "truncate": "left"}]})
    run = chain.run(text=text)
    call = run.trace.table().query("name == 'text_completion tiny'").iloc[0]
    assert call["tokens_in"] == 512 - 8
    assert call["attributes.workbench.truncated_tokens"] == tokens - (512 - 8)
    assert call["status_code"] == "OK"
    assert run.outputs["digest"] == call["attributes.output.value"]


def test_a_long_prompt_is_tokenized_off_the_loop_and_other_chains_go_on_meanwhile(
    tiny_bench: wb.Workbench, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A million-character prompt (truncate: left) was tokenized on the workbench's loop by a tokenizer call that held
    Python's lock to its end: for ~1 s no other chain moved, nor any thread of the process (a notebook, a gateway)."""
    from workbench.engine.engine import LONG_PROMPT_CHARS

    backend = tiny_bench.engine.worker("tiny").backend
    tokenize, long_calls, ended = backend.tokenize, [], threading.Event()

    def watched(prompts: list[str], *args: object, **kwargs: object) -> list[list[int]]:
        if not any(len(p) > LONG_PROMPT_CHARS for p in prompts):
            return tokenize(prompts, *args, **kwargs)  # type: ignore[no-any-return]
        long_calls.append(threading.current_thread().name)
        try:
            return tokenize(prompts, *args, **kwargs)  # type: ignore[no-any-return]
        finally:
            ended.set()

    monkeypatch.setattr(backend, "tokenize", watched)  # the real tokenizer, watched for the long prompts it gets
    text = "word " * 200_000
    every = len(tokenize([text])[0])
    digest = tiny_bench.chain({"name": "digest", "hops": [
        {"name": "tail", "model": "tiny", "prompt": "{{ text }}", "max_new_tokens": 4, "truncate": "left"}]})
    greet = tiny_bench.chain({"name": "greet", "hops": [
        {"name": "hi", "model": "tiny", "prompt": "Hello {{ name }}", "max_new_tokens": 2}]})
    runs: list[wb.Run] = []
    long = threading.Thread(target=lambda: runs.append(digest.run(text=text)))
    long.start()
    eventually(lambda: bool(long_calls), "the long prompt's tokenization to begin")
    assert greet.run(name="Ada").ok and not ended.is_set()  # done while the long prompt was still being tokenized
    long.join(WAIT_S)
    (run,) = runs
    assert long_calls == [long_calls[0]] and long_calls[0] != "workbench-loop"  # once, and not on the loop
    call = run.trace.table().query("name == 'text_completion tiny'").iloc[0]
    assert call["tokens_in"] == 512 - 4 and call["attributes.workbench.truncated_tokens"] == every - (512 - 4)

    # The hop's timeout counts the tokenizing too: it ends the call, whose span says why.
    timed = tiny_bench.chain({"name": "timed", "hops": [
        {"name": "tail", "model": "tiny", "prompt": "{{ text }}", "max_new_tokens": 4, "truncate": "left",
         "timeout_s": 0.05}]})
    ended.clear()
    with pytest.raises(wb.HopFailed) as info:
        timed.run(text=text)
    assert isinstance(info.value.cause, wb.HopTimeout) and "0.05 s" in str(info.value.cause)
    span = info.value.run.trace.table().query("name == 'text_completion tiny'").iloc[0]
    assert span["status_code"] == "ERROR" and not ended.is_set()
    ended.wait(WAIT_S)  # the tokenizer's thread runs to its end; nothing waits for it


def test_concurrent_submissions_from_many_threads_all_complete(tiny_bench: wb.Workbench) -> None:
    expected = {p: tiny_bench.generate("tiny", p, max_new_tokens=6).text for p in PROMPTS}
    results: dict[int, wb.GenerationResult] = {}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            results[i] = tiny_bench.generate("tiny", PROMPTS[i % len(PROMPTS)], max_new_tokens=6)
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert sorted(results) == list(range(24))
    for i, result in results.items():
        assert result.text == expected[PROMPTS[i % len(PROMPTS)]]  # each caller got its own prompt's answer
    assert len({r.batch_id for r in results.values()}) == 24  # one at a time, through the queue


def test_unloading_fails_queued_requests_instead_of_hanging(bench: wb.Workbench, tiny_path: Path) -> None:
    bench.load("tiny", tiny_path, device="cpu", batching=wb.NoBatching())
    params = GenerationParams(max_new_tokens=48)
    requests = [bench.engine.submit("tiny", PROMPTS[2], params) for _ in range(8)]
    bench.unload("tiny", forget=True)

    outcomes = []
    for request in requests:
        error = request.future.exception(timeout=60)
        outcomes.append(error)
        assert error is None or isinstance(error, WorkerStopped)
    stopped = [e for e in outcomes if e is not None]
    assert stopped, "the queue held requests when the model was unloaded"
    assert "'tiny' was unloaded" in str(stopped[0])
    failed_spans = [s for s in bench.traces().spans if s.name == "text_completion tiny" and not s.status.is_ok]
    assert len(failed_spans) == len(stopped)
    with pytest.raises(wb.UnknownModelError):
        bench.generate("tiny", PROMPTS[0])


def test_prompts_tokenized_ahead_are_dropped_when_the_model_is_reloaded(bench: wb.Workbench, tiny_path: Path,
                                                                        tmp_path: Path) -> None:
    """A map's prefetch tokenizes prompts ahead; a model reloaded under the same name with another tokenizer must
    not be handed the old tokenizer's ids."""
    import json
    import shutil

    lower = tmp_path / "tiny-lowercase"
    shutil.copytree(tiny_path, lower)
    tokenizer = json.loads((lower / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "Lowercase"}  # same vocabulary, other ids for capitals
    (lower / "tokenizer.json").write_text(json.dumps(tokenizer))
    prompt = "Question: WHAT IS A HOP?"
    bench.load("m", tiny_path)
    counted_before = bench.engine.worker("m").backend.tokenize([prompt])[0]
    bench.engine.prepare_prompt("m", prompt)  # as a prefetching map does, then the map is interrupted
    bench.unload("m")
    bench.load("m", lower)
    counted_now = bench.engine.worker("m").backend.tokenize([prompt])[0]
    assert counted_now != counted_before
    assert bench.generate("m", prompt, max_new_tokens=2).tokens_in == len(counted_now)


@pytest.mark.parametrize("call", ["bench.generate", "engine.generate", "chain.run"])
def test_ctrl_c_during_a_blocking_call_returns_at_once_and_stops_its_row(
    tiny_bench: wb.Workbench, ctrl_c_raises: None, call: str
) -> None:
    # bench.generate (and engine.generate) waited on the request's future with no timeout: a Ctrl-C sent as the
    # notebook's stop button sends it (interrupt_main) was only seen once all 400 tokens had come, and the request,
    # not cancellable, ran on to its end in any case, for nobody, with every request behind it waiting for it.
    from workbench.tracing import attributes as attr

    params = {"max_new_tokens": 400, "temperature": 5.0, "seed": 0}  # seeded so that it runs to 400 tokens
    prompt = f"Stop me ({call})"
    chain = tiny_bench.chain({"name": "long", "hops": [{"name": "say", "model": "tiny", "prompt": prompt, **params}]})
    calls = {
        "bench.generate": lambda: tiny_bench.generate("tiny", prompt, **params),
        "engine.generate": lambda: tiny_bench.engine.generate("tiny", prompt, wb.GenerationParams(**params)),
        "chain.run": lambda: chain.run(),
    }
    tiny_bench.generate("tiny", "warm", max_new_tokens=1)
    timer = threading.Timer(0.2, _thread.interrupt_main)  # 400 tokens take about a second on this CPU
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            calls[call]()
    finally:
        timer.cancel()
    tiny_bench.generate("tiny", "next", max_new_tokens=1)  # queued behind it (one at a time), so it has ended
    spans = tiny_bench.traces().spans
    stopped = next(s for s in spans if s.name == "text_completion tiny" and prompt in str(s.attributes))
    assert stopped.attributes.get(attr.CANCELLED) in ("queued", "running")  # cancelled, not left to run on
    assert "RunCancelled" in str(stopped.status.description) + str(stopped.events[-1].attributes)
    batch = [s for s in spans if s.name == "batch tiny"
             and any(link.context.span_id == stopped.context.span_id for link in s.links)]
    assert all(b.attributes[attr.BATCH_STEPS] < 400 for b in batch)  # its row stopped, if a batch had taken it


def test_a_cancelled_row_stops_alone_in_a_padded_batch_and_a_lone_request_stops_its_generate(tiny_path: Path) -> None:
    # A batch of one stops at the step after its request is cancelled (the step clock ends its generate); in a batch
    # of several, only the cancelled row stops (a stopping criterion) and its batch-mate runs on to the same answer
    # it gives alone.
    from workbench.tracing import attributes as attr

    params = GenerationParams(max_new_tokens=400, temperature=5.0, seed=0)  # seeded so that it runs to 400 tokens
    with wb.Workbench() as bench:
        bench.load("tiny", tiny_path, device="cpu")
        alone = bench.engine.generate("tiny", "Hello", params)
        assert alone.tokens_out == 400

        def batches_of(span_id: int) -> list[Any]:
            return [s for s in bench.traces().spans if s.name == "batch tiny"
                    and any(link.context.span_id == span_id for link in s.links)]

        with pytest.raises(wb.HopTimeout):
            bench.engine.call("tiny", "Hello", params, timeout_s=0.2)
        (stopped,) = [s for s in bench.traces().spans if s.attributes.get(attr.CANCELLED) == "running"]
        eventually(lambda: len(batches_of(stopped.context.span_id)) == 1, "the lone request's batch to end")
        assert batches_of(stopped.context.span_id)[0].attributes[attr.BATCH_STEPS] < 400

        bench.set_batching("tiny", wb.DynamicBatching(max_batch=2, max_wait_ms=5_000))  # the two run as one batch
        mate = bench.engine.submit("tiny", "Hello", params)
        with pytest.raises(wb.HopTimeout):
            bench.engine.call("tiny", "Hello", params, timeout_s=0.2)
        answer = mate.future.result(timeout=WAIT_S)
        assert (answer.text, answer.tokens_out, answer.batch_size) == (alone.text, 400, 2)
        (cut,) = [s for s in bench.traces().spans
                  if s.attributes.get(attr.CANCELLED) == "running" and s.context.span_id != stopped.context.span_id]
        (batch,) = batches_of(cut.context.span_id)
        assert batch.attributes[attr.BATCH_STEPS] == 400  # the batch went on for its mate


def test_a_maps_prefetch_tokenizes_a_long_prompt_once_and_none_past_the_window(
    tiny_bench: wb.Workbench, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map's prefetch tokenized each prompt of the inputs ahead whole: a long prompt was then tokenized again when
    its call made it ready off the loop, and one past the window by its length alone (refused untokenized when
    queued) was tokenized for nothing, seconds for millions of characters."""
    from workbench.engine.engine import LONG_PROMPT_CHARS

    backend = tiny_bench.engine.worker("tiny").backend
    tokenize, seen = backend.tokenize, []

    def watched(prompts: list[str], *args: object, **kwargs: object) -> list[list[int]]:
        seen.extend(p for p in prompts if len(p) > LONG_PROMPT_CHARS)
        return tokenize(prompts, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(backend, "tokenize", watched)  # the real tokenizer, watched for the long prompts it gets
    texts = [f"{i} " + "word " * 5_000 for i in range(4)]
    for truncate in ("left", "error"):
        seen.clear()
        chain = tiny_bench.chain({"name": f"tail-{truncate}", "hops": [
            {"name": "tail", "model": "tiny", "prompt": "{{ text }}", "max_new_tokens": 2, "truncate": truncate}]})
        batch = chain.map([{"text": t} for t in texts], concurrency=1, prefetch=True)
        runs = list(batch)
        calls = [run.trace.table().query("name == 'text_completion tiny'").iloc[0] for run in runs]
        if truncate == "left":
            assert all(run.ok for run in runs) and sorted(seen) == sorted(texts)  # each once, however made ready
            assert [c["tokens_in"] for c in calls] == [512 - 2] * 4
            assert all(c.get("attributes.workbench.prefetch.prepared") is True for c in calls[1:])  # said so
        else:
            assert seen == []  # refused by their length alone, never tokenized
            assert all(isinstance(run.error.cause, wb.ContextWindowExceeded) for run in runs)
