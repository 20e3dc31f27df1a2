"""A knowledge hop's cost: building the demo graph, linking and walking it, the thread pool, and the longer prompt.

Four parts, each run here in one process (the cold start in fresh child processes):

1. cold start: ``import networkx`` and building the ``countries`` graph from countryinfo's files;
2. one lookup on the loaded graph, per ``hops`` and ``max_triples``: link and traverse time (p50, p95);
3. the same lookup called inline and through the hop thread pool (``run_in_executor``), interleaved:
   what a trip through the pool would add to every knowledge hop;
4. a knowledge -> LLM chain against the same LLM hop without the facts, run interleaved (A B A B),
   on the tiny model: prompt tokens, TTFT and end-to-end per run, ratios per pair as median [min, max].

    python benchmarks/knowledge.py                      # tiny model, CPU, 3 repeats
    python benchmarks/knowledge.py --device cuda --model /path/to/checkpoint --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter

import pandas as pd
import torch
import transformers

import workbench as wb

QUESTIONS = [f"What is the capital of {c}, and which countries border it?"
             for c in ["France", "Japan", "Peru", "Kenya", "Norway"]]
COLD = (
    "import time; t = time.perf_counter(); import networkx; i = time.perf_counter()\n"
    "from workbench.knowledge import GraphStore, resolve\n"
    "b = time.perf_counter(); GraphStore().get(resolve('countries')); e = time.perf_counter()\n"
    "print((i - t) * 1e3, (e - b) * 1e3)"
)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def cold_start(repeats: int) -> pd.DataFrame:
    rows = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", COLD], capture_output=True, text=True, check=True)
        networkx_ms, build_ms = map(float, done.stdout.split())
        rows.append({"import networkx ms": networkx_ms, "build countries ms": build_ms})
    return pd.DataFrame(rows)


def lookups(graph: wb.KnowledgeGraph, samples: int) -> pd.DataFrame:
    rows = []
    for max_triples in (50, 1000):
        for hops in (1, 2, 3, 4):
            link, walk, found = [], [], 0
            for i in range(samples):
                lookup = graph.lookup(QUESTIONS[i % len(QUESTIONS)], hops, max_triples)
                link.append(lookup.link_ms * 1e3)
                walk.append(lookup.traverse_ms * 1e3)
                found += len(lookup.triples)
            rows.append({"max_triples": max_triples, "hops": hops, "triples (mean)": found / samples,
                         "link µs p50": statistics.median(link), "link µs p95": pct(link, 95),
                         "traverse µs p50": statistics.median(walk), "traverse µs p95": pct(walk, 95)})
    return pd.DataFrame(rows)


async def inline_vs_pool(graph: wb.KnowledgeGraph, samples: int) -> tuple[list[float], list[float]]:
    loop = asyncio.get_running_loop()
    inline, pooled = [], []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for i in range(samples):
            question = QUESTIONS[i % len(QUESTIONS)]
            started = perf_counter()
            graph.lookup(question, 1, 50)
            inline.append((perf_counter() - started) * 1e6)
            started = perf_counter()
            await loop.run_in_executor(pool, graph.lookup, question, 1, 50)
            pooled.append((perf_counter() - started) * 1e6)
    return inline, pooled


def chains(bench: wb.Workbench, repeats: int, hops: int, max_triples: int) -> pd.DataFrame:
    answer = {"name": "answer", "model": "m", "max_new_tokens": 8, "truncate": "left"}
    with_facts = bench.chain({"name": "with_facts", "hops": [
        {"name": "facts", "kind": "knowledge", "graph": "countries", "query": "{{ question }}", "hops": hops,
         "max_triples": max_triples},
        {**answer, "prompt": "Facts:\n{{ facts }}\nQuestion: {{ question }}\nAnswer:"}]})
    without = bench.chain({"name": "without", "hops": [{**answer, "prompt": "Question: {{ question }}\nAnswer:"}]})
    with_facts.run(question=QUESTIONS[0])
    without.run(question=QUESTIONS[0])  # warm-up, left out
    rows = []
    for repeat in range(repeats):
        for question in QUESTIONS:
            for chain in ((with_facts, without) if repeat % 2 == 0 else (without, with_facts)):
                table = chain.run(question=question).trace.table().set_index("name")
                call = table.loc["text_completion m"]
                rows.append({"chain": chain.name, "question": question, "repeat": repeat,
                             "prompt tokens": call["tokens_in"], "ttft ms": call["ttft_ms"],
                             "prefill ms": call["attributes.workbench.prefill_ms"],
                             "e2e ms": table.loc[f"chain {chain.name}", "duration_ms"],
                             "hop facts ms": table.loc["hop facts", "duration_ms"] if "hop facts" in table.index
                             else 0.0})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: the tiny model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=300, help="lookups per cell of part 2 and 3")
    parser.add_argument("--hops", type=int, default=1, help="the chain's knowledge hop (part 4)")
    parser.add_argument("--max-triples", type=int, default=50)
    args = parser.parse_args()
    model = args.model or str(wb.tiny_model())
    print(f"device {args.device}, model {model}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.repeats} repeats")

    print("\n1. cold start (fresh processes)")
    print(cold_start(args.repeats).describe().loc[["count", "50%", "min", "max"]].round(1).to_string())

    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        graph = bench.graph("countries")
        print(f"\n2. lookups on {graph!r}, {args.samples} each")
        print(lookups(graph, args.samples).round(1).to_string(index=False))

        inline, pooled = asyncio.run(inline_vs_pool(graph, args.samples))
        print(f"\n3. one lookup (1 hop, max 50): inline p50 {statistics.median(inline):.1f} µs, "
              f"through the pool p50 {statistics.median(pooled):.1f} µs "
              f"(+{statistics.median(pooled) - statistics.median(inline):.1f} µs)")

        bench.load("m", model, device=args.device)
        runs = chains(bench, args.repeats, args.hops, args.max_triples)
    print(f"\n4. knowledge ({args.hops} hop, max {args.max_triples} triples) -> LLM against the LLM hop alone")
    print(runs.groupby("chain")[["prompt tokens", "prefill ms", "ttft ms", "e2e ms", "hop facts ms"]].median()
          .round(2).to_string())
    pairs = runs.pivot_table(index=["repeat", "question"], columns="chain", values=["prefill ms", "ttft ms", "e2e ms"])
    prefill = (pairs["prefill ms"]["with_facts"] / pairs["prefill ms"]["without"]).tolist()
    ttft = (pairs["ttft ms"]["with_facts"] / pairs["ttft ms"]["without"]).tolist()
    e2e = (pairs["e2e ms"]["with_facts"] / pairs["e2e ms"]["without"]).tolist()
    hop = runs.loc[runs["chain"] == "with_facts", "hop facts ms"]
    print(f"ratios per pair: prefill {spread(prefill)}; TTFT {spread(ttft)}; e2e {spread(e2e)}")
    print(f"with the facts / without: prefill {statistics.median(prefill):.2f}x, TTFT {statistics.median(ttft):.2f}x, "
          f"e2e {statistics.median(e2e):.2f}x; the knowledge hop itself {hop.median():.2f} ms (p50)")


if __name__ == "__main__":
    main()
