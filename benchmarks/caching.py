"""Caches side by side: off vs the exact response cache (with repeated inputs) vs the prefix KV cache, then prefetch.

One hop whose prompt starts with a long fixed instruction (``--prefix-words`` words, ~1.3 tokens
each on the tiny model's tokenizer) and ends with the question. ``--inputs`` questions, a
``--repeat-rate`` share of them repeats of earlier ones (seeded). ``wb.compare`` runs the chain
under ``cache=["off", "exact", "prefix"]`` (closed loop, ``--concurrency`` runs in flight, dynamic
batching), repeats interleaved with the order rotating, one warm-up run per pass left out; every pass
starts with empty caches (a scratch response cache, the prefix KV dropped), so its hits are its own
repeats and its first batch prefills the prefix. Ratios are per repeat (the same repeat's passes ran
back to back), as median [min, max].

Then prefetch: the same map with the prefix cache, ``prefetch=False`` and ``True`` interleaved
(order alternating), ratio of wall times per pair.

    python benchmarks/caching.py                       # tiny model, CPU, 3 repeats
    python benchmarks/caching.py --device cuda --model /path/to/checkpoint --prefix-words 800
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import pandas as pd
import torch
import transformers

from opentelemetry.trace import INVALID_SPAN

import workbench as wb
from workbench.chains.spec import fixed_prefix as wb_fixed_prefix
from workbench.engine.requests import GenerationRequest

ARMS = ["off", "exact", "prefix"]
WORDS = ("you answer questions about geography history and science in one short sentence without preamble "
         "and you never repeat the question nor explain your reasoning unless asked").split()


def spec(prefix_words: int, max_new_tokens: int) -> dict:
    instruction = " ".join(WORDS[i % len(WORDS)] for i in range(prefix_words))
    return {"name": "qa", "hops": [{"name": "answer", "model": "m", "max_new_tokens": max_new_tokens,
                                    "prompt": f"Instructions: {instruction}.\nQuestion: {{{{ question }}}}\nAnswer:"}]}


def questions(count: int, repeat_rate: float, seed: int) -> list[dict[str, str]]:
    """``count`` questions, each (after the first) a repeat of an earlier one with probability ``repeat_rate``."""
    rng = random.Random(seed)
    asked: list[str] = []
    for i in range(count):
        if asked and rng.random() < repeat_rate:
            asked.append(rng.choice(asked))
        else:
            asked.append(f"What is {i} times {i + 3}?" + " Say why." * (i % 3))
    return [{"question": q} for q in asked]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="a checkpoint directory (default: the offline tiny model)")
    parser.add_argument("--prefix-words", type=int, default=100, help="the tiny model has a 512-token window")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--repeat-rate", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("m", args.model or wb.tiny_model(), device=args.device,
                   batching=wb.DynamicBatching(max_batch=args.concurrency, max_wait_ms=5))
        chain = bench.chain(spec(args.prefix_words, args.max_new_tokens))
        inputs = questions(args.inputs, args.repeat_rate, args.seed)
        distinct = len({i["question"] for i in inputs})
        prompt_tokens = len(bench.engine.worker("m").backend.tokenize(
            [chain.spec.hops[0].template.render({"question": inputs[0]["question"]})])[0])
        cmp = wb.compare(chain, inputs, cache=ARMS, concurrency=args.concurrency, repeats=args.repeats, warmup=1,
                         progress=False)
        env = cmp.environment
        print(f"model {env['model_source']} on {env['device']} ({env['dtype']}), torch {torch.__version__}, "
              f"transformers {transformers.__version__}; {args.inputs} one-hop runs ({distinct} distinct, repeat "
              f"rate {args.repeat_rate:g}), prompt ~{prompt_tokens} tokens, {args.max_new_tokens} new tokens, "
              f"concurrency {args.concurrency}, dynamic:{args.concurrency}:5ms, {args.repeats} repeats")
        columns = ["cache", "requests_per_s", "requests_per_s_lo", "requests_per_s_hi", "ttft_p50_ms", "e2e_p50_ms",
                   "e2e_p95_ms", "n", "ttft_n", "cache_hit_rate", "prefix_tokens_reused", "prefix_kv_mb",
                   "peak_weights_mb", "errors"]
        with pd.option_context("display.width", 220, "display.max_columns", 20):
            print(cmp.table()[columns].round(3).to_string(index=False))
        passes = cmp.passes().set_index(["repeat", "cache"])["requests_per_s"]
        calls = cmp.calls()
        ttft = calls.groupby(["repeat", "cache"])["ttft_ms"].median()
        headline = {}
        for arm in ("exact", "prefix"):
            throughput = [passes[(r, arm)] / passes[(r, "off")] for r in range(args.repeats)]
            headline[arm] = spread(throughput)
            print(f"{arm} / off throughput: {headline[arm]}")
        ratios = [ttft[(r, "prefix")] / ttft[(r, "off")] for r in range(args.repeats)]
        print(f"prefix / off TTFT p50 (model calls): {spread(ratios)}")

        # The prefill alone: one batch of ``concurrency`` prompts straight to the backend, one new token,
        # with the prefix KV reused (warm) and without, interleaved.
        backend = bench.engine.worker("m").backend
        template = chain.spec.hops[0].template
        prompts = [template.render({"question": i["question"]}) for i in inputs[:args.concurrency]]
        ids = backend.tokenize(prompts)
        prefix_ids = backend.tokenize([wb_fixed_prefix(template)])[0][:-1]
        one = wb.GenerationParams(max_new_tokens=1)

        def batch(prefixed: bool) -> list[GenerationRequest]:
            return [GenerationRequest("m", row, one, INVALID_SPAN, prefix_len=len(prefix_ids) if prefixed else 0)
                    for row in ids]

        backend.generate(batch(True))  # prefills the prefix once
        prefill: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(args.repeats * 10):
            for prefixed in ((False, True) if repeat % 2 == 0 else (True, False)):
                prefill[prefixed].append(backend.generate(batch(prefixed))[1].prefill_ms)
        prefill_pairs = pairs = [warm / cold for warm, cold in zip(prefill[True], prefill[False])]
        print(f"prefill of {len(ids)} prompts (~{len(ids[0])} tokens, {len(prefix_ids)} of them the prefix): "
              f"without the prefix cache {spread(prefill[False])} ms, with it {spread(prefill[True])} ms; "
              f"with / without: {spread(pairs)} ({len(pairs)} interleaved pairs)")

        # Prefetch: the same map with the prefix cache, without and with prefetch, interleaved.
        prefixed = spec(args.prefix_words, args.max_new_tokens)
        prefixed["hops"][0]["cache"] = "prefix"
        cached = bench.chain({**prefixed, "name": "qa_prefix"})
        distinct_inputs = [{"question": f"What is {i} minus {i + 1}?"} for i in range(args.inputs)]
        cached.map(distinct_inputs[:args.concurrency], concurrency=args.concurrency)  # warm-up
        walls: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(args.repeats * 2):
            for prefetch in ((False, True) if repeat % 2 == 0 else (True, False)):
                bench.clear_cache()
                started = time.perf_counter()
                batch = cached.map(distinct_inputs, concurrency=args.concurrency, prefetch=prefetch)
                walls[prefetch].append(time.perf_counter() - started)
                assert not batch.failed
        pairs = [on / off for on, off in zip(walls[True], walls[False])]
        print(f"prefetch off wall: {spread(walls[False])} s; on: {spread(walls[True])} s "
              f"({len(pairs)} interleaved pairs, {args.inputs} distinct inputs, prefix cache on, cold each map)")
        print(f"prefetch on / off wall time: {spread(pairs)} (below 1 means prefetch helps)")
        print(f"throughput vs off: exact {headline['exact']}, prefix {headline['prefix']}; prefill with / without "
              f"the prefix cache {spread(prefill_pairs)}; prefetch on / off wall {spread(pairs)}")


if __name__ == "__main__":
    main()
