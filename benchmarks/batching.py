"""Batching policies side by side: 64 concurrent two-hop chains against one padded generate per hop.

Every policy runs the same 64 two-hop chains (``chain.map(inputs, concurrency=64)``) on one
loaded model; the ceiling is the same work done by hand: one left-padded ``model.generate``
over all 64 prompts of hop 1, then one over the 64 hop-2 prompts built from its outputs with
the chain's own template. Policies and the ceiling run interleaved in every repeat (the order
rotates), after one warm-up round that is reported apart as cold start.

Throughput is requests/s (chains finished per second; a chain is two model calls) and output
tokens/s (model tokens generated, EOS included, both hops). Ratios are taken within a repeat
and reported as the median with [min, max]. Padding is the share of padded-batch cells that
were padding: sum of padding tokens / sum of batch size x padded length.

    python benchmarks/batching.py                      # tiny model, CPU, 3 repeats
    python benchmarks/batching.py --device cuda --model /path/to/checkpoint --repeats 5
    python benchmarks/batching.py --device cuda --random large   # a random-weight 0.36B Qwen2-0.5B shape

``--random small|large`` builds a random-weight Llama-shape checkpoint (the shapes of
``preloading.py``, the tiny model's tokenizer) once, next to the tiny model's cache; random
weights rarely emit EOS, so every hop generates exactly ``--max-new-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

import workbench as wb
from workbench.models.tiny import cache_root
from workbench.tracing import attributes as attr

TOPICS = [
    "the capital of France",
    "how many hops this chain has",
    "why padding costs time",
    "what the time to first token measures in a chain of language model calls that share one model",
    "batching",
    "which preloading strategy gives the fastest first result when three models are needed",
    "tokens per second",
    "the queue wait of a request that arrives while the model is busy with a batch of other requests",
]


def chain_spec(max_new_tokens: int) -> dict[str, Any]:
    return {
        "name": "bench-qa",
        "hops": [
            {
                "name": "plan",
                "model": "m",
                "prompt": "Question: {{ question }}\nPlan:",
                "max_new_tokens": max_new_tokens,
            },
            {
                "name": "answer",
                "model": "m",
                "prompt": "{{ plan }}\nQuestion: {{ question }}\nAnswer:",
                "max_new_tokens": max_new_tokens,
            },
        ],
        "output": "answer",
    }


def questions(n: int) -> list[dict[str, str]]:
    """``n`` questions of very different lengths (a few words to a few dozen)."""
    return [{"question": f"#{i}: what is {TOPICS[i % len(TOPICS)]}?" + " Explain." * (i % 5)} for i in range(n)]


@dataclass
class Sample:
    seconds: float
    requests: int
    tokens: int
    padding: int = 0
    cells: int = 0
    batches: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds


def run_chains(bench: wb.Workbench, chain: wb.Chain, inputs: list[dict[str, str]], concurrency: int) -> Sample:
    bench.tracing.index.clear()
    started = time.perf_counter()
    runs = chain.map(inputs, concurrency=concurrency)
    seconds = time.perf_counter() - started
    failed = [r.error for r in runs if r.error is not None]
    if failed:
        raise SystemExit(f"a chain failed: {failed[0]}")
    spans = bench.tracing.index.spans()
    call_spans = [s for s in spans if s.name.startswith(attr.TEXT_COMPLETION)]
    calls = [s.attributes for s in call_spans]
    batches = [s.attributes for s in spans if s.name.startswith("batch ")]
    padded = [b for b in batches if attr.BATCH_PADDED_LEN in b]
    return Sample(
        seconds=seconds,
        requests=len(runs),
        tokens=sum(int(a[attr.USAGE_OUTPUT_TOKENS]) for a in calls),
        padding=sum(int(b[attr.PADDING_TOKENS]) for b in padded),
        cells=sum(int(b[attr.BATCH_SIZE]) * int(b[attr.BATCH_PADDED_LEN]) for b in padded),
        batches=[int(b[attr.BATCH_SIZE]) for b in batches],
        outputs=[r.output for r in runs],
        latencies_ms=[(s.end_time - s.start_time) / 1e6 for s in call_spans],
    )


def run_ceiling(bench: wb.Workbench, chain: wb.Chain, inputs: list[dict[str, str]]) -> Sample:
    """Both hops by hand: one left-padded generate over every prompt of a hop, nothing else."""
    loaded = bench.registry.get("m")
    model, tokenizer = loaded.model, loaded.tokenizer
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    plan, answer = chain.spec.hops
    started = time.perf_counter()
    tokens = 0
    values = [dict(i) for i in inputs]
    for hop in (plan, answer):
        prompts = [hop.template.render(v) for v in values]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(loaded.device)
        with torch.inference_mode():
            output = model.generate(
                **encoded,
                max_new_tokens=hop.params.max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
        rows = output[:, encoded["input_ids"].shape[1] :].tolist()  # copies to the host: synchronised on CUDA
        for value, row in zip(values, rows):
            stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
            row = row[: stop + 1] if stop is not None else row
            tokens += len(row)
            value[hop.name] = tokenizer.decode([t for t in row if t not in eos_ids], skip_special_tokens=True).strip()
    seconds = time.perf_counter() - started
    return Sample(seconds, len(values), tokens, outputs=[v["answer"] for v in values])


def random_model(size: str, device: str, dtype: str) -> Path:
    from preloading import LARGE, SMALL, build_models  # this folder is the script's, so first on sys.path

    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return build_models(LARGE if size == "large" else SMALL, dtype, cache_root() / "bench-preloading", count=1)[0]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto (default cpu)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default=None, help="a checkpoint directory or hub id (default: the tiny model)")
    parser.add_argument("--random", choices=["small", "large"], default=None,
                        help="a random-weight model of preloading.py's shapes: small 24M, large 0.36B parameters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chains", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--max-wait-ms", type=float, default=100.0,
        help="DynamicBatching's max_wait_ms (default 100: a batch closes as soon as it is full, so a long wait only"
        " costs when fewer than --chains requests come)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--policies", default="none,static,dynamic,dynamic+len,continuous",
                        help="which policies run beside the ceiling, comma-separated (none is always kept: the"
                        " 'vs none' column divides by it unless it is left out, then that column reads 'vs ceiling')")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    n = args.chains
    policies: dict[str, wb.BatchingPolicy] = {
        "none": wb.NoBatching(),
        "static": wb.StaticBatching(size=n // 2, timeout_ms=50),
        "dynamic": wb.DynamicBatching(max_batch=n, max_wait_ms=args.max_wait_ms),
        "dynamic+len": wb.DynamicBatching(max_batch=n, max_wait_ms=args.max_wait_ms, max_length_ratio=1.5),
    }
    wanted = set(args.policies.split(","))
    if "continuous" in wanted:
        try:
            policies["continuous"] = wb.ContinuousBatching(max_batch=n)
        except wb.WorkbenchError as exc:
            print(f"continuous batching skipped: {exc.message}", file=sys.stderr)
    policies = {label: policy for label, policy in policies.items() if label in wanted}

    with wb.Workbench() as bench:
        source = args.model or (random_model(args.random, args.device, args.dtype) if args.random else wb.tiny_model())
        loaded = bench.load("m", source, device=args.device, dtype=args.dtype)
        chain = bench.chain(chain_spec(args.max_new_tokens))
        inputs = questions(n)
        print(
            f"model {args.model or (f'random {args.random}' if args.random else 'tiny')} ({loaded.params:,} params) on {loaded.device},"
            f" dtype {str(loaded.dtype).removeprefix('torch.')}, greedy, max_new_tokens {args.max_new_tokens};"
            f" {n} concurrent two-hop chains; {args.repeats} repeats; torch {torch.__version__}"
            f" ({torch.get_num_threads()} threads, {os.cpu_count()} CPUs), transformers {transformers.__version__}"
        )

        def measure(label: str) -> Sample:
            if label == "ceiling":
                return run_ceiling(bench, chain, inputs)
            bench.set_batching("m", policies[label])
            return run_chains(bench, chain, inputs, concurrency=n)

        labels = ["ceiling", *policies]
        cold = {label: measure(label) for label in labels}  # warm-up round: allocator, kernels, CB cache
        print("cold start (first round, excluded): " + ", ".join(f"{k} {v.seconds:.2f}s" for k, v in cold.items()))
        reference = cold["ceiling"].outputs
        same = [f"{k} {sum(a == b for a, b in zip(s.outputs, reference))}/{n}" for k, s in cold.items() if k != "ceiling"]
        print("chain outputs equal to the hand-built ones: " + ", ".join(same))

        samples: dict[str, list[Sample]] = {label: [] for label in labels}
        for repeat in range(args.repeats):
            shift = repeat % len(labels)
            for label in labels[shift:] + labels[:shift]:
                samples[label].append(measure(label))

        names = {label: "generate per hop" if label == "ceiling" else policies[label].name for label in labels}
        print(f"\n{'policy':<12} {'name':<28} {'req/s':>7} {'tok/s':>7} {'batches':>7} {'size':>5} {'padding':>7}"
              f" {'call p50/p95 ms':>16}   {'vs none':<22} {'vs ceiling':<22}")
        ratio: dict[str, dict[str, list[float]]] = {}
        for label in labels:
            runs = samples[label]
            vs_none = [s.rps / b.rps for s, b in zip(runs, samples["none" if "none" in samples else "ceiling"])]
            vs_ceiling = [s.rps / c.rps for s, c in zip(runs, samples["ceiling"])]
            ratio[label] = {"none": vs_none, "ceiling": vs_ceiling}
            batches = [len(s.batches) for s in runs if s.batches]
            sizes = [b for s in runs for b in s.batches]
            cells = sum(s.cells for s in runs)
            padding = f"{sum(s.padding for s in runs) / cells:7.1%}" if cells else "      -"
            latencies = [ms for s in runs for ms in s.latencies_ms]
            latency = f"{percentile(latencies, 0.5):.0f}/{percentile(latencies, 0.95):.0f}" if latencies else "-"
            print(
                f"{label:<12} {names[label]:<28} {statistics.median(s.rps for s in runs):7.1f}"
                f" {statistics.median(s.tps for s in runs):7.0f}"
                f" {statistics.median(batches) if batches else 2:7.0f}"
                f" {statistics.mean(sizes) if sizes else n:5.1f} {padding} {latency:>16}"
                f"   {spread(vs_none):<28} {spread(vs_ceiling):<22}"
            )
        dynamic = ratio["dynamic"]
        versus_none = (
            f" and {statistics.median(dynamic['none']):.1f}x the throughput of no batching" if "none" in policies else ""
        )
        print(
            f"\nheadline: {policies['dynamic'].name} reaches {spread(dynamic['ceiling']).strip()} of the"
            f" hand-built ceiling{versus_none} (median [min, max] of {args.repeats} interleaved repeats)"
        )


if __name__ == "__main__":
    main()
