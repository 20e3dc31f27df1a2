"""The workbench's own greedy loop (backends/transformers.py, _LeanGreedy): the tokens generate writes.

Greedy requests, alone or in a padded batch, decode in a plain loop over the model's forward instead of ``generate``.
These tests hold it to ``generate``'s tokens on models of several architectures (random weights, built here: their
argmax is as arbitrary as can be, so any difference in masks, positions or caches shows), on the trained tiny model
(which ends its answers with its end token), and through the workbench's paths that lean on a decode's steps:
streaming, timeouts, the step clock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import GenerationConfig

from helpers import eventually

import workbench as wb
from workbench.engine.requests import GenerationParams
from workbench.tracing import attributes as attr

PROMPTS = ("Question: What is the capital of France?\nPlan:", "hello", "a b c d e f g h i j k l m n o p q r s t",
           "P.\nQuestion: Q?\nAnswer:", "x")


def decode_loop(bench: wb.Workbench, result: wb.GenerationResult) -> Any:
    """Which loop decoded the batch that ``result`` came from, read off its batch span."""
    (batch,) = [s for s in bench.traces().spans
                if s.name.startswith("batch ") and s.attributes.get(attr.BATCH_ID) == result.batch_id]
    return batch.attributes[attr.DECODE_LOOP]


def by_generate(loaded: Any, prompt: str, max_new_tokens: int) -> list[int]:
    """What transformers' greedy generate writes for ``prompt`` alone, cut after its first end token."""
    return by_generate_batch(loaded, [prompt], max_new_tokens)[0]


ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 256}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # A sliding window shorter than the prompts: the cache and the mask must both know it.
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    # Soft-capped logits and alternating sliding and global layers.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 8, "head_dim": 8}),
    # Its class prepares its own inputs (a long cache is reset): it keeps generate.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}
OWN_STEPS = {"phi3"}
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256}


def random_model(directory: Path, architecture: str, tokenizer_of: Path, **generation: Any) -> Path:
    """A model of ``architecture`` with random weights and the tiny model's tokenizer, saved to ``directory``."""
    config_name, model_name, extra = ARCHITECTURES[architecture]
    vocab = transformers.AutoTokenizer.from_pretrained(tokenizer_of)
    settings = {**(SMALL if architecture != "gpt2" else {}), **extra, "vocab_size": len(vocab),
                "bos_token_id": vocab.bos_token_id, "eos_token_id": vocab.eos_token_id}
    torch.manual_seed(sum(map(ord, architecture)))
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**settings)).eval()
    model.generation_config = GenerationConfig(bos_token_id=vocab.bos_token_id, eos_token_id=vocab.eos_token_id,
                                               pad_token_id=vocab.pad_token_id, **generation)
    model.save_pretrained(directory)
    vocab.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_greedy_rows_alone_and_in_a_padded_batch_decode_in_the_workbench_loop_to_the_tokens_generate_writes(
        architecture: str, tiny_path: Path, tmp_path: Path) -> None:
    """Alone: no mask, positions counted on. In a batch, rows of different lengths, left-padded: the mask, positions
    counted from the mask, a pad token after a row ends."""
    path = random_model(tmp_path / architecture, architecture, tiny_path)
    loop = "generate" if architecture in OWN_STEPS else "workbench"
    with wb.Workbench() as bench:
        loaded = bench.load("m", path, device="cpu")
        for prompt in PROMPTS:
            for max_new_tokens in (1, 7, 40):
                result = bench.generate("m", prompt, max_new_tokens=max_new_tokens)
                assert decode_loop(bench, result) == loop
                assert result.token_ids == by_generate(loaded, prompt, max_new_tokens), (prompt, max_new_tokens)
                assert result.tokens_out == len(result.token_ids)
        for max_new_tokens in (1, 9, 30):
            results = one_batch(bench, "m", list(PROMPTS), max_new_tokens)
            assert decode_loop(bench, results[0]) == loop
            assert [r.token_ids for r in results] == by_generate_batch(loaded, list(PROMPTS), max_new_tokens)


def test_the_trained_tiny_model_ends_where_generate_ends_and_says_why(tiny_path: Path) -> None:
    with wb.Workbench() as bench:
        loaded = bench.load("tiny", tiny_path, device="cpu")
        eos = loaded.model.generation_config.eos_token_id
        stops = 0
        for prompt in PROMPTS:
            for max_new_tokens in (3, 64):
                result = bench.generate("tiny", prompt, max_new_tokens=max_new_tokens)
                assert decode_loop(bench, result) == "workbench"
                assert result.token_ids == by_generate(loaded, prompt, max_new_tokens)
                ended = result.token_ids[-1] == eos
                stops += ended
                assert result.finish_reason == ("stop" if ended else "length")
                assert result.text == loaded.tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()
                # The step clock heard the prompt and every step: a first token, then one decode step each.
                assert result.ttft_ms > 0 and (result.decode_ms > 0) == (result.tokens_out > 1)
        assert stops  # the trained model does end its answers: the end token's path was walked


def test_what_greedy_generate_would_do_more_keeps_generate(tiny_path: Path, tmp_path: Path) -> None:
    """A generation config that asks for a logits processor (a repetition penalty, a minimum length) or another
    cache decodes through generate, which applies it; and a sampled or batched request as before."""
    with wb.Workbench() as bench:
        for name, generation in {"penalized": {"repetition_penalty": 1.5}, "longer": {"min_new_tokens": 5},
                                 "static": {"cache_implementation": "static"}}.items():
            path = random_model(tmp_path / name, "llama", tiny_path, **generation)
            bench.load(name, path, device="cpu")
            result = bench.generate(name, "hello", max_new_tokens=6)
            assert decode_loop(bench, result) == "generate", name
        bench.load("tiny", tiny_path, device="cpu")
        sampled = bench.generate("tiny", "hello", max_new_tokens=6, temperature=0.8, seed=3)
        assert decode_loop(bench, sampled) == "generate"


def test_a_penalized_model_writes_what_generate_writes_with_its_penalty(tiny_path: Path, tmp_path: Path) -> None:
    path = random_model(tmp_path / "penalized", "llama", tiny_path, repetition_penalty=3.0)
    with wb.Workbench() as bench:
        loaded = bench.load("m", path, device="cpu")
        result = bench.generate("m", PROMPTS[2], max_new_tokens=20)
        assert result.token_ids == by_generate(loaded, PROMPTS[2], 20)


def test_streamed_tokens_of_the_workbench_loop_are_the_answer(tiny_path: Path) -> None:
    with wb.Workbench() as bench:
        bench.load("tiny", tiny_path, device="cpu")
        chain = bench.chain({"name": "one", "hops": [
            {"name": "answer", "model": "tiny", "prompt": "Question: {{ question }}\nAnswer:", "max_new_tokens": 24}]})
        events = list(chain.stream(question="What is the capital of France?"))
        tokens = [e for e in events if isinstance(e, wb.Token)]
        (finished,) = [e for e in events if isinstance(e, wb.RunFinished)]
        assert tokens and "".join(t.text for t in tokens).strip() == finished.run.outputs["answer"]
        (request,) = [s for s in finished.run.trace.spans if s.name.startswith(attr.TEXT_COMPLETION)]
        batch_id = request.attributes[attr.BATCH_ID]
        (batch,) = [s for s in bench.traces().spans
                    if s.name.startswith("batch ") and s.attributes.get(attr.BATCH_ID) == batch_id]
        assert batch.attributes[attr.DECODE_LOOP] == "workbench"


def test_a_timeout_stops_its_row_at_the_next_step_alone_and_in_a_batch_whose_mate_runs_on(
        tiny_path: Path, tmp_path: Path) -> None:
    """The step clock stops a lone row's loop at the first step after its request was cancelled, as it stops generate;
    in a padded batch the cancelled row ends there and its batch-mate runs on."""
    path = random_model(tmp_path / "m", "llama", tiny_path)  # random weights: it runs on to max_new_tokens
    params = GenerationParams(max_new_tokens=240)
    with wb.Workbench() as bench:
        bench.load("m", path, device="cpu")
        whole = bench.engine.generate("m", "Hello", params)
        assert whole.tokens_out == 240 and decode_loop(bench, whole) == "workbench"
        with pytest.raises(wb.HopTimeout):
            bench.engine.call("m", "Hello", params, timeout_s=whole.e2e_ms / 1e3 / 8)
        (stopped,) = [s for s in bench.traces().spans if s.attributes.get(attr.CANCELLED) == "running"]

        def batch() -> list[Any]:
            return [s for s in bench.traces().spans if s.name == "batch m"
                    and any(link.context.span_id == stopped.context.span_id for link in s.links)]

        eventually(lambda: len(batch()) == 1, "the cancelled request's batch to end")
        assert batch()[0].attributes[attr.DECODE_LOOP] == "workbench"
        assert batch()[0].attributes[attr.BATCH_STEPS] < 240

        bench.set_batching("m", wb.DynamicBatching(max_batch=2, max_wait_ms=60_000))  # the two run as one batch
        mate = bench.engine.submit("m", "Hello there", params)
        with pytest.raises(wb.HopTimeout):
            bench.engine.call("m", "Hello", params, timeout_s=whole.e2e_ms / 1e3 / 4)
        answer = mate.future.result(timeout=120)
        assert answer.tokens_out == 240 and answer.batch_size == 2
        (cut,) = [s for s in bench.traces().spans
                  if s.attributes.get(attr.CANCELLED) == "running" and s.context.span_id != stopped.context.span_id]
        (shared,) = [s for s in bench.traces().spans if s.name == "batch m"
                     and any(link.context.span_id == cut.context.span_id for link in s.links)]
        assert shared.attributes[attr.DECODE_LOOP] == "workbench" and shared.attributes[attr.BATCH_STEPS] == 240


def test_a_generation_config_changed_after_the_load_is_heard(tiny_path: Path) -> None:
    """A setting put on the loaded model's generation config later (a minimum length here) is applied from the next
    request on: generate decodes it."""
    with wb.Workbench() as bench:
        loaded = bench.load("tiny", tiny_path, device="cpu")
        first = bench.generate("tiny", "hello", max_new_tokens=40)
        assert decode_loop(bench, first) == "workbench" and first.tokens_out < 40  # it ends early of its own
        loaded.model.generation_config.min_new_tokens = 40
        longer = bench.generate("tiny", "hello", max_new_tokens=40)
        assert decode_loop(bench, longer) == "generate" and longer.tokens_out == 40
        loaded.model.generation_config.min_new_tokens = None
        assert decode_loop(bench, bench.generate("tiny", "hello", max_new_tokens=40)) == "workbench"


def test_a_generate_replaced_on_the_model_is_the_one_that_decodes(tiny_path: Path) -> None:
    with wb.Workbench() as bench:
        loaded = bench.load("tiny", tiny_path, device="cpu")
        calls = []
        real = loaded.model.generate

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls.append(kwargs["max_new_tokens"])
            return real(*args, **kwargs)

        loaded.model.generate = wrapped
        result = bench.generate("tiny", "hello", max_new_tokens=5)
        assert calls == [5] and decode_loop(bench, result) == "generate"


def test_the_environment_can_send_every_request_through_generate(tiny_path: Path) -> None:
    """AUTOGLM_LEAN_DECODE=0 (read when the workbench is imported: here in a fresh interpreter) turns the loop off."""
    code = ("import workbench as wb\n"
            "with wb.Workbench() as bench:\n"
            f"    bench.load('tiny', {str(tiny_path)!r}, device='cpu')\n"
            "    result = bench.generate('tiny', 'hello', max_new_tokens=4)\n"
            "    (batch,) = [s for s in bench.traces().spans if s.name == 'batch tiny']\n"
            "    print(batch.attributes['workbench.decode_loop'], len(result.token_ids))\n")
    for setting, loop in (("0", "generate"), ("1", "workbench")):
        said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "AUTOGLM_LEAN_DECODE": setting})
        assert said.stdout.split()[0] == loop, said.stderr[-2000:]


def by_generate_batch(loaded: Any, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """What generate writes for ``prompts`` as one left-padded batch, built as the workbench builds it, each row cut
    after its first end token."""
    tokenizer, model = loaded.tokenizer, loaded.model
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    rows = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [tokenizer.eos_token_id])
    with torch.inference_mode():
        output = model.generate(input_ids=rows, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                temperature=None, top_p=None, top_k=None, pad_token_id=pad, eos_token_id=sorted(eos))
    cut = []
    for row in output[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        cut.append(row[: stop + 1] if stop is not None else row)
    return cut


def one_batch(bench: wb.Workbench, model: str, prompts: list[str], max_new_tokens: int) -> list[wb.GenerationResult]:
    """``prompts`` submitted at once and run as one padded batch."""
    bench.set_batching(model, wb.DynamicBatching(max_batch=len(prompts), max_wait_ms=60_000))
    try:
        pending = [bench.engine.submit(model, p, GenerationParams(max_new_tokens=max_new_tokens)) for p in prompts]
        results = [r.future.result(timeout=120) for r in pending]
    finally:
        bench.set_batching(model, wb.NoBatching())
    assert {r.batch_id for r in results} == {results[0].batch_id} and results[0].batch_size == len(prompts)
    return results


def test_rows_of_the_tiny_model_that_end_early_end_where_generate_ends_them(tiny_path: Path) -> None:
    with wb.Workbench() as bench:
        loaded = bench.load("tiny", tiny_path, device="cpu")
        prompts = list(PROMPTS) * 2
        results = one_batch(bench, "tiny", prompts, 64)
        assert decode_loop(bench, results[0]) == "workbench"
        assert [r.token_ids for r in results] == by_generate_batch(loaded, prompts, 64)
        assert any(r.finish_reason == "stop" for r in results)
