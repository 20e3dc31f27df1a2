"""Chain latency under injected faults: p50/p95/p99 without resilience, with retries, and with retries + fallback.

Every repeat runs the same two-hop chains (``chain.map(inputs, concurrency=C)``) four ways,
interleaved (the order rotates per repeat), after one warm-up round reported apart as cold start:

- ``clean``: no faults, no resilience keys (the floor);
- ``faults``: the model fails 20% of requests and each batch waits a random 0-20 ms, no resilience;
- ``retry``: the same faults, each hop retrying (4 attempts, 10 ms exponential backoff, full jitter);
- ``retry+fallback``: as ``retry``, then a second copy of the model (with its own faults) once.

Latency is each chain run's end-to-end time, failed runs included (a fast failure is still a
latency a user sees); ``ok`` is the share of runs that returned an output. Circuit breakers are
set out of the way (a threshold no streak reaches), so the figures are those of retry and fallback
alone. Ratios are p99 over the same repeat's ``faults`` p99, reported as median [min, max].

    python benchmarks/faults.py                       # tiny model, CPU, 3 repeats
    python benchmarks/faults.py --device cuda --model /path/to/checkpoint --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import transformers

import workbench as wb

RETRY = {"attempts": 4, "backoff_ms": 10, "max_backoff_ms": 200, "jitter": True}


def chain_spec(name: str, max_new_tokens: int, **resilience: Any) -> dict[str, Any]:
    hop = {"model": "m", "max_new_tokens": max_new_tokens, **resilience}
    return {
        "name": name,
        "hops": [
            {"name": "plan", "prompt": "Question: {{ question }}\nPlan:", **hop},
            {"name": "answer", "prompt": "{{ plan }}\nQuestion: {{ question }}\nAnswer:", **hop},
        ],
        "output": "answer",
    }


@dataclass
class Sample:
    latencies_ms: list[float]
    ok: int
    attempts: int
    hops: int

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):5.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto (default cpu)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default=None, help="a checkpoint directory or hub id (default: the tiny model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chains", type=int, default=64, help="chain runs per configuration and repeat")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--error-rate", type=float, default=0.2)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="each batch waits uniformly 0..this")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        source = args.model or wb.tiny_model()
        policy = wb.DynamicBatching(max_batch=args.concurrency, max_wait_ms=5)
        loaded = bench.load("m", source, device=args.device, dtype=args.dtype, batching=policy)
        bench.load("backup", source, device=args.device, dtype=args.dtype, batching=policy)
        for name in ("m", "backup"):
            bench.set_breaker(name, failure_threshold=10**9)
        n = args.max_new_tokens
        chains = {
            "clean": bench.chain(chain_spec("clean", n)),
            "faults": bench.chain(chain_spec("faults", n)),
            "retry": bench.chain(chain_spec("retry", n, retry=RETRY)),
            "retry+fallback": bench.chain(chain_spec("retry_fallback", n, retry=RETRY, fallback="backup")),
        }
        inputs = [{"question": f"#{i}: what is {i} + {i % 7}?"} for i in range(args.chains)]
        print(
            f"model {args.model or 'tiny'} ({loaded.params:,} params) on {loaded.device},"
            f" dtype {str(loaded.dtype).removeprefix('torch.')}, greedy, max_new_tokens {n}, {policy.name};"
            f" {args.chains} two-hop chains at concurrency {args.concurrency}; faults: error_rate {args.error_rate:g},"
            f" latency 0-{args.latency_ms:g} ms per batch; retry {RETRY}; {args.repeats} repeats;"
            f" torch {torch.__version__} ({torch.get_num_threads()} threads, {os.cpu_count()} CPUs),"
            f" transformers {transformers.__version__}"
        )

        def measure(label: str, seed: int) -> Sample:
            bench.clear_faults()
            if label != "clean":
                bench.inject("m", error_rate=args.error_rate, latency_ms=(0, args.latency_ms), seed=seed)
                bench.inject("backup", error_rate=args.error_rate, latency_ms=(0, args.latency_ms), seed=seed + 1)
            runs = chains[label].map(inputs, concurrency=args.concurrency)
            latencies = [r.duration_ms for r in runs]
            attempts = [
                int(s.attributes.get("workbench.attempts", 1))
                for r in runs for s in r.trace.spans if s.name.startswith("hop ") and s.attributes
                and "workbench.attempts" in s.attributes
            ]
            return Sample(latencies, sum(r.ok for r in runs), sum(attempts), len(attempts))

        labels = list(chains)
        started = time.perf_counter()
        cold = {label: measure(label, args.seed) for label in labels}
        print("cold start (first round, excluded): " + ", ".join(
            f"{k} p50 {v.percentile(0.5):.0f} ms" for k, v in cold.items()
        ) + f"; {time.perf_counter() - started:.1f} s")

        samples: dict[str, list[Sample]] = {label: [] for label in labels}
        for repeat in range(args.repeats):
            shift = repeat % len(labels)
            for label in labels[shift:] + labels[:shift]:
                samples[label].append(measure(label, args.seed + 100 * (repeat + 1)))

        print(f"\n{'config':<15} {'runs':>5} {'ok':>7} {'attempts/hop':>12} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
              f"   {'p99 / faults p99':<20}")
        ratios: dict[str, list[float]] = {}
        for label in labels:
            runs = samples[label]
            merged = Sample([ms for s in runs for ms in s.latencies_ms], sum(s.ok for s in runs),
                            sum(s.attempts for s in runs), sum(s.hops for s in runs))
            ratios[label] = [s.percentile(0.99) / f.percentile(0.99) for s, f in zip(runs, samples["faults"])]
            total = len(merged.latencies_ms)
            print(
                f"{label:<15} {total:5d} {merged.ok / total:7.1%} {merged.attempts / max(merged.hops, 1):12.2f}"
                f" {merged.percentile(0.5):8.1f} {merged.percentile(0.95):8.1f} {merged.percentile(0.99):8.1f}"
                f"   {spread(ratios[label]):<20}"
            )
        if args.chains < 100:  # the ratios take each repeat's p99 apart; the table's merges the repeats
            merged_n = args.chains * args.repeats
            print(f"(p99 from fewer than 100 samples: {args.chains} per repeat in the ratios"
                  f"{f', {merged_n} in the table' if merged_n < 100 else ''})")
        ok = {label: sum(s.ok for s in samples[label]) / sum(len(s.latencies_ms) for s in samples[label])
              for label in labels}
        print(
            f"\nheadline: under {args.error_rate:.0%} injected failures, retries + fallback return an output for"
            f" {ok['retry+fallback']:.1%} of chains (none: {ok['faults']:.1%}) at"
            f" {statistics.median(ratios['retry+fallback']):.2f}x the p99 latency of no resilience"
            f" (median of {args.repeats} interleaved repeats)"
        )


if __name__ == "__main__":
    main()
