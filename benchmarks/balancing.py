"""Balance policies on two replicas, one slowed by injected latency: throughput, tail latency, load per replica.

The model is loaded with two replicas; every batch on ``m#1`` waits an extra ``--slow-ms``, as
a replica on a busier or slower device would. ``wb.compare`` runs the same two-hop chains under
each policy (closed loop, ``--concurrency`` runs in flight), repeats interleaved with the order
rotating, one warm-up run per pass left out. The headline is least_loaded's throughput over
round_robin's, per repeat (the same repeat's passes ran back to back), as median [min, max].
With two replicas power_of_two draws both, so it is least_loaded by another name: it differs from
least_loaded only by noise, which shows how much there is.

    python benchmarks/balancing.py                     # tiny model, CPU, 5 repeats
    python benchmarks/balancing.py --device cuda --model /path/to/checkpoint --replicas cuda:0,cuda:1
"""

from __future__ import annotations

import argparse
import statistics

import pandas as pd
import torch
import transformers

import workbench as wb

POLICIES = ["round_robin", "least_loaded", "power_of_two"]
SPEC = {
    "name": "qa",
    "hops": [
        {"name": "plan", "model": "m", "prompt": "Question: {{ question }}\nPlan:", "max_new_tokens": 8},
        {"name": "answer", "model": "m", "prompt": "{{ plan }}\nQuestion: {{ question }}\nAnswer:",
         "max_new_tokens": 8},
    ],
    "output": "answer",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="a checkpoint directory (default: the offline tiny model)")
    parser.add_argument("--replicas", default="2", help="a count, or devices separated by commas")
    parser.add_argument("--slow-ms", type=float, default=50.0, help="latency injected into each batch of m#1")
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    replicas: int | list[str] = int(args.replicas) if args.replicas.isdigit() else args.replicas.split(",")

    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("m", args.model or wb.tiny_model(), device=args.device, replicas=replicas)
        bench.inject("m#1", latency_ms=args.slow_ms)
        chain = bench.chain(SPEC)
        inputs = [{"question": f"What is {i} + {i}?" + " Say why." * (i % 3)} for i in range(args.inputs)]
        cmp = wb.compare(chain, inputs, balance=POLICIES, concurrency=args.concurrency, repeats=args.repeats,
                         warmup=1, progress=False)
        env = cmp.environment
        print(f"model {env['model_source']} on {env['device']} ({env['dtype']}), torch {torch.__version__}, "
              f"transformers {transformers.__version__}; {args.inputs} two-hop chains, concurrency "
              f"{args.concurrency}, {args.repeats} repeats, m#1 slowed by {args.slow_ms:g} ms per batch, no batching")
        with pd.option_context("display.width", 200, "display.max_columns", 20):
            print(cmp.table()[["balance", "requests_per_s", "requests_per_s_lo", "requests_per_s_hi", "e2e_p50_ms",
                               "e2e_p95_ms", "e2e_p99_ms", "n", "replica_load", "errors"]].round(1).to_string(index=False))
            print(cmp.replica_load()[["balance", "replica", "calls", "share", "e2e_p50_ms", "e2e_p95_ms"]]
                  .round(2).to_string(index=False))
        passes = cmp.passes().set_index(["repeat", "balance"])["requests_per_s"]
        ratios = [passes[(r, "least_loaded")] / passes[(r, "round_robin")] for r in range(args.repeats)]
        print(f"least_loaded / round_robin throughput: median {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] over {len(ratios)} repeats")


if __name__ == "__main__":
    main()
