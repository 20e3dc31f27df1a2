"""LoRA adapters in one batch (mixed) or batched per adapter (grouped), side by side; and the cost of a live swap.

Workload: ``--requests`` requests (default 48) queued at once on one model carrying ``--adapters``
LoRA adapters (default 3, rank 8 on q/k/v/o), spread round robin over the base model and each
adapter, prompts of a few to a few dozen tokens, ``--max-new-tokens`` greedy tokens each (default 16).
Both policies are ``DynamicBatching(max_batch=16, max_wait_ms=5)``: ``adapters="mixed"`` runs a
batch of any adapters as one ``generate`` with peft's per-row ``adapter_names``; ``"grouped"``
gives each adapter (and the base model) batches of their own. They alternate in every repeat
(the order rotates) after one warm-up round each, reported apart as cold start.

Reported per policy: requests/s, output tokens/s, p50 and p95 end-to-end latency, batches per
round; the last line is the median ratio grouped/mixed throughput with [min, max] over repeats.
Then the swap: ``--swaps`` new versions of one adapter staged on the idle model (load beside the
live one, checks, switch; the old one drained and freed), with p50 and max ``swap_ms``.

    python benchmarks/adapters.py                    # tiny model, CPU, 3 repeats
    python benchmarks/adapters.py --device cuda --repeats 5 --requests 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import workbench as wb
from workbench.engine import GenerationParams

TOPICS = ["the capital of France", "why padding costs time", "tokens per second", "batching",
          "what the time to first token measures in a chain of language model calls that share one model"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_round(bench: wb.Workbench, names: list[str | None], args: argparse.Namespace) -> dict[str, float]:
    params = GenerationParams(max_new_tokens=args.max_new_tokens)
    started = time.perf_counter()
    requests = [
        bench.engine.submit("m", f"Question #{i}: what is {TOPICS[i % len(TOPICS)]}?\nAnswer:", params,
                            adapter=names[i % len(names)])
        for i in range(args.requests)
    ]
    results = [r.future.result() for r in requests]
    wall = time.perf_counter() - started
    e2e = [r.e2e_ms for r in results]
    return {
        "req_s": len(results) / wall,
        "tok_s": sum(r.tokens_out for r in results) / wall,
        "p50_ms": percentile(e2e, 0.5),
        "p95_ms": percentile(e2e, 0.95),
        "batches": len({r.batch_id for r in results}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--swaps", type=int, default=5)
    args = parser.parse_args()

    path = wb.tiny_model()
    scratch = Path(tempfile.mkdtemp(prefix="adapters-bench-"))
    modules = ("q_proj", "k_proj", "v_proj", "o_proj")
    adapters = {f"a{i}": wb.tiny_lora(path, scratch / f"a{i}", seed=i + 1, rank=8, target_modules=modules)
                for i in range(args.adapters)}
    names: list[str | None] = [None, *adapters]
    policies = {
        "mixed": wb.DynamicBatching(max_batch=16, max_wait_ms=5),
        "grouped": wb.DynamicBatching(max_batch=16, max_wait_ms=5, adapters="grouped"),
    }
    print(f"model: tiny ({path.name}), device {args.device}, float32, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {args.requests} requests over the base model and "
          f"{args.adapters} LoRA adapters (rank 8, q/k/v/o), {args.max_new_tokens} new tokens, {args.repeats} repeats")
    with wb.Workbench(data_dir=scratch / "data") as bench:
        bench.load("m", path, device=args.device, adapters=adapters)
        for label, policy in policies.items():  # warm-up, reported apart
            bench.set_batching("m", policy)
            cold = one_round(bench, names, args)
            print(f"cold start {label:8s} {cold['req_s']:7.1f} req/s  p50 {cold['p50_ms']:7.1f} ms")
        samples: dict[str, list[dict[str, float]]] = {label: [] for label in policies}
        ratios = []
        for repeat in range(args.repeats):
            order = list(policies) if repeat % 2 == 0 else list(reversed(policies))
            this: dict[str, dict[str, float]] = {}
            for label in order:
                bench.set_batching("m", policies[label])
                this[label] = one_round(bench, names, args)
                samples[label].append(this[label])
            ratios.append(this["grouped"]["req_s"] / this["mixed"]["req_s"])
        print(f"{'policy':8s} {'req/s':>8s} {'tok/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'batches':>8s}")
        for label, rows in samples.items():
            def med(key: str) -> float:
                return statistics.median(r[key] for r in rows)

            print(f"{label:8s} {med('req_s'):8.1f} {med('tok_s'):8.1f} {med('p50_ms'):8.1f} {med('p95_ms'):8.1f} "
                  f"{med('batches'):8.0f}")

        # Live swaps: each publishes a new version of a0 and stages it as a watcher would.
        live = bench.registry.get("m").adapters
        assert live is not None
        for i in range(args.swaps):
            wb.tiny_lora(path, scratch / f"v{i}", seed=100 + i, rank=8, target_modules=modules)
            live.stage("a0", scratch / f"v{i}")
        live.wait_drained(60.0)
        table = bench.adapters("m").query("name == 'a0' and version > 1")
        swaps = table["swap_ms"].tolist()
        states = ", ".join(f"{s}={n}" for s, n in table["state"].value_counts().items())
        print(f"swap: {len(swaps)} versions staged, swap_ms p50 {statistics.median(swaps):.1f} max {max(swaps):.1f} "
              f"(load + checks + switch, idle model); states now {states}")
    print(f"grouped/mixed throughput: {statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}] "
          f"over {len(ratios)} repeats (noisy on a shared CPU)")


if __name__ == "__main__":
    sys.exit(main())
