"""What a Ray replica adds per hop: the same one-hop chain served in-process and by a Ray actor, interleaved.

One workbench holds the model twice: ``local`` (a worker thread in this process, the floor) and
``ray`` (one replica in a Ray actor on a local Ray). Each pair runs the chain once on each, the
order alternating; the per-hop time is the request span's duration (queue to last token, as the
trace reports it). Warm-up pairs are left out. Also printed: the actor call's own cost as the
spans record it (``workbench.ray.overhead_ms``: the round trip minus the actor's time in
``generate``), and a bare Ray actor's synchronous round trip (an empty method) for reference.
The headline is the median ratio ray / in-process with min and max, and the median added ms.

    python benchmarks/ray_overhead.py                       # tiny model, CPU, 200 pairs
    python benchmarks/ray_overhead.py --device cuda --model /path/to/checkpoint --num-gpus 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import ray
import torch
import transformers

import workbench as wb
from workbench.tracing import attributes as attr


class Echo:
    """An empty actor method: Ray's own floor for a synchronous actor round trip."""

    def ping(self) -> None:
        return None


def spec(model: str, max_new_tokens: int) -> dict[str, object]:
    return {"name": f"hop-{model}", "output": "answer",
            "hops": [{"name": "answer", "model": model, "prompt": "Question: {{ question }}\nAnswer:",
                      "max_new_tokens": max_new_tokens}]}


def percentiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100)
    return f"p50 {q[49]:.2f}  p95 {q[94]:.2f}  p99 {q[98]:.2f} ms (n={len(values)}{', p99 from <100' if len(values) < 100 else ''})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="a checkpoint directory (default: the offline tiny model)")
    parser.add_argument("--num-gpus", type=float, default=0)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in this process; Ray gives an actor as many as its num_cpus (1)")
    args = parser.parse_args()
    # Equal threads on both sides, else the comparison measures thread contention (on a shared
    # 2-core machine, two torch threads in this process made the in-process hop the slower one).
    torch.set_num_threads(args.threads)

    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, num_gpus=1 if args.num_gpus else 0, object_store_memory=80 * 2**20, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}})
    echo = ray.remote(Echo).options(num_cpus=0).remote()
    ray.get(echo.ping.remote())
    round_trips = []
    for _ in range(1000):
        started = time.perf_counter()
        ray.get(echo.ping.remote())
        round_trips.append((time.perf_counter() - started) * 1e3)

    source = args.model or wb.tiny_model()
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("local", source, device=args.device)
        loaded = time.perf_counter()
        bench.load("ray", source, device=args.device, engine="ray", num_gpus=args.num_gpus)
        ray_load_s = time.perf_counter() - loaded
        chains = {name: bench.chain(spec(name, args.max_new_tokens)) for name in ("local", "ray")}
        hop_ms: dict[str, list[float]] = {"local": [], "ray": []}
        actor_overhead: list[float] = []
        for pair in range(args.warmup + args.pairs):
            order = ("local", "ray") if pair % 2 == 0 else ("ray", "local")
            for name in order:
                run = chains[name].run(question=f"What is {pair % 10} + {pair % 10}?")
                (span,) = [s for s in run.trace.spans if s.name.startswith(attr.TEXT_COMPLETION)]
                if pair >= args.warmup:
                    hop_ms[name].append((span.end_time - span.start_time) / 1e6)
                    if name == "ray":
                        actor_overhead.append(float(span.attributes[attr.RAY_OVERHEAD_MS]))
        replica = bench.replicas("ray").iloc[0]
    ray.shutdown()

    ratios = [r / l for r, l in zip(hop_ms["ray"], hop_ms["local"])]
    added = [r - l for r, l in zip(hop_ms["ray"], hop_ms["local"])]
    print(f"model {source} on {args.device}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"ray {ray.__version__}; one hop, {args.max_new_tokens} new tokens, greedy, no batching; {args.pairs} pairs "
          f"interleaved after {args.warmup} warm-up pairs; {args.threads} torch thread(s) in-process; actor on node {replica['node'][:12]}, device "
          f"{replica['device']}; Ray replica cold start {ray_load_s:.1f} s (actor start + model load)")
    print(f"bare Ray actor round trip (empty method):      {percentiles(round_trips)}")
    print(f"per hop, in-process:                           {percentiles(hop_ms['local'])}")
    print(f"per hop, Ray replica:                          {percentiles(hop_ms['ray'])}")
    print(f"actor call overhead on the spans (round trip - generate): {percentiles(actor_overhead)}")
    print(f"added per hop by Ray: median {statistics.median(added):.2f} ms [{min(added):.2f}, {max(added):.2f}]")
    print(f"Ray replica / in-process per hop: median {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}, {max(ratios):.3f}] over {len(ratios)} pairs")


if __name__ == "__main__":
    main()
