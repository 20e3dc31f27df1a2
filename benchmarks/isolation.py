"""Process isolation's cost per hop: the demo chain on a model in a child process against the same model in-process.

The same checkpoint is loaded twice in one workbench: ``local`` (isolation="thread", the floor)
and ``iso`` (isolation="process": tokenized here, generated in a child over a pipe of msgpack
frames). The three-hop demo chain runs on each, interleaved in pairs whose order alternates
(A B, B A, ...), after one warm-up pair reported apart. Both must write the same text; the script
stops if they do not.

Per LLM hop the figure is the hop span's duration (template to result, through retries and the
worker), as a ratio iso / local per pair; the headline is the median over pairs and hops with
min and max. Also printed: the chain's end-to-end ratio and what the pipe itself added per batch
(``workbench.ipc_ms`` on the batch spans: the round trip less the time the child spent).

    python benchmarks/isolation.py                       # tiny model, CPU, 60 pairs
    python benchmarks/isolation.py --threads 1           # steadier on a shared machine
    python benchmarks/isolation.py --device cuda --model /path/to/checkpoint --pairs 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers
import yaml

import workbench as wb
from workbench.demo import DEMO_QUESTION, DEMO_SPEC

HOPS = ("plan", "answer")


def spec_on(model: str) -> dict[str, object]:
    spec = yaml.safe_load(DEMO_SPEC)
    spec["name"] = f"qa-{model}"
    for hop in spec["hops"]:
        if "model" in hop:
            hop["model"] = model
    return spec


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default=None, help="a checkpoint directory or hub id (default: the tiny model)")
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads, here and in the child")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the child inherits it; torch reads it as it starts
    source = args.model or wb.tiny_model()

    with wb.Workbench() as bench:
        started = time.perf_counter()
        local = bench.load("local", source, device=args.device, dtype=args.dtype)
        local_s = time.perf_counter() - started
        started = time.perf_counter()
        bench.load("iso", source, device=args.device, dtype=args.dtype, isolation="process")
        iso_s = time.perf_counter() - started
        chains = {name: bench.chain(spec_on(name)) for name in ("local", "iso")}
        print(f"model {args.model or 'tiny'} ({local.params:,} params) on {local.device}, dtype "
              f"{str(local.dtype).removeprefix('torch.')}; demo chain (plan 24, answer 32 new tokens, greedy); "
              f"{args.pairs} pairs after 1 warm-up pair; torch {torch.__version__}, transformers "
              f"{transformers.__version__} ({torch.get_num_threads()} torch threads), {os.cpu_count()} CPUs (shared)")
        print(f"cold start: load in-process {local_s:.2f} s, in a child process {iso_s:.2f} s "
              f"(a fresh Python, torch and transformers imported, then the same load)")
        hop_ms: dict[str, dict[str, list[float]]] = {n: {h: [] for h in HOPS} for n in chains}
        chain_ms: dict[str, list[float]] = {n: [] for n in chains}
        outputs: dict[str, str] = {}
        for pair in range(args.pairs + 1):
            order = list(chains) if pair % 2 == 0 else list(reversed(chains))
            for name in order:
                began = time.perf_counter()
                run = chains[name].run(question=DEMO_QUESTION)
                took = (time.perf_counter() - began) * 1e3
                if outputs.setdefault("text", run.output) != run.output:
                    raise SystemExit(f"{name} wrote {run.output!r}, not {outputs['text']!r}: not a fair comparison")
                if pair == 0:
                    print(f"warm-up {name}: {took:.1f} ms")
                    continue
                table = run.trace.table().set_index("name")
                for hop in HOPS:
                    hop_ms[name][hop].append(float(table.loc[f"hop {hop}", "duration_ms"]))
                chain_ms[name].append(took)
        batches = bench.traces().table().query("name == 'batch iso'")
        ipc = batches["attributes.workbench.ipc_ms"].dropna().tolist()[2:]  # the warm-up pair's two batches apart

    print(f"{'hop':<8}{'local p50 ms':>14}{'iso p50 ms':>12}{'iso p95 ms':>12}{'iso / local per pair':>32}")
    per_hop: list[float] = []
    for hop in HOPS:
        ratios = [a / b for a, b in zip(hop_ms["iso"][hop], hop_ms["local"][hop])]
        per_hop += ratios
        print(f"{hop:<8}{statistics.median(hop_ms['local'][hop]):>14.2f}{statistics.median(hop_ms['iso'][hop]):>12.2f}"
              f"{percentile(hop_ms['iso'][hop], 0.95):>12.2f}{spread(ratios):>32}")
    chain_ratios = [a / b for a, b in zip(chain_ms["iso"], chain_ms["local"])]
    print(f"chain end to end: local p50 {statistics.median(chain_ms['local']):.2f} ms, iso p50 "
          f"{statistics.median(chain_ms['iso']):.2f} ms, iso / local {spread(chain_ratios)}")
    print(f"pipe per batch (round trip less the child's time): p50 {statistics.median(ipc):.3f} ms, "
          f"p95 {percentile(ipc, 0.95):.3f} ms over {len(ipc)} batches")
    print(f"headline: isolated / in-process per hop, median over {len(per_hop)} hop pairs: {spread(per_hop)}")


if __name__ == "__main__":
    main()
