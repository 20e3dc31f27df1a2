"""Live configuration: what a watched spec costs, and how soon an edit serves.

Prints three things, measured in one run on the tiny model:

1. the cost of one poll of an unchanged spec file (a stat), and of one whose mtime is recent
   (a stat, a read and a hash: the watcher's guard against coarse timestamps);
2. the time from an edit being written (at a random point between two polls) to the new version
   serving, per poll interval: about half the interval plus the parse, and one interval more when
   the first poll to see the edit finds it younger than the watcher's settle time (0.25 s: a file
   written that recently is read only once a second poll finds it unchanged): 1 to 2 intervals at
   0.05 s and 0.25 s; at 1 s, up to 0.75 s, or 1 to 1.25 s for an edit in the last 0.25 s before a poll;
3. chain runs of a watched chain against the same chain unwatched, interleaved (A B A B ...):
   the median of the pairwise ratios, which should sit at 1.0 (a run reads one attribute).

    python benchmarks/live_config.py [--runs 20] [--edits 5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import workbench as wb
from workbench.chains.live import FileWatcher

SPEC = """\
name: qa
hops:
  - name: answer
    model: tiny
    prompt: "Question: {{ question }}\\nAnswer:"
    max_new_tokens: 4
"""


def poll_cost(directory: Path, polls: int = 2000) -> tuple[float, float]:
    """Microseconds per poll of an unchanged file: an old mtime (stat only), a recent one (stat, read, hash)."""
    path = directory / "poll.yaml"
    path.write_text(SPEC)
    watcher = FileWatcher(path, lambda text: None)
    watcher.poll()
    fresh = _per_poll(watcher, polls)
    old = time.time() - 3600
    os.utime(path, (old, old))
    watcher.poll()
    settled = _per_poll(watcher, polls)
    return settled, fresh


def _per_poll(watcher: FileWatcher, polls: int) -> float:
    started = time.perf_counter()
    for _ in range(polls):
        watcher.poll()
    return (time.perf_counter() - started) / polls * 1e6


def edit_latency(bench: wb.Workbench, directory: Path, interval_s: float, edits: int) -> list[float]:
    """Milliseconds from writing an edit to the chain serving it, ``edits`` times."""
    path = directory / f"qa-{interval_s}.yaml"
    path.write_text(SPEC)
    chain = bench.chain(path, name=f"qa_{str(interval_s).replace('.', '_')}", watch=True, interval_s=interval_s)
    latencies = []
    phases = random.Random(0)
    for edit in range(edits):
        time.sleep(phases.uniform(0, interval_s))  # an edit lands anywhere between two polls, as a person's does
        target = chain.version.number + 1
        started = time.perf_counter()
        path.write_text(SPEC.replace("max_new_tokens: 4", f"max_new_tokens: {5 + edit}"))
        while chain.version.number < target:
            time.sleep(0.001)
        latencies.append((time.perf_counter() - started) * 1e3)
    chain.unwatch()
    return latencies


def run_ratio(bench: wb.Workbench, directory: Path, runs: int) -> list[float]:
    """Watched / unwatched run time, pairwise, interleaved."""
    path = directory / "ratio.yaml"
    path.write_text(SPEC)
    watched = bench.chain(path, name="watched", watch=True)
    plain = bench.chain(SPEC, name="plain")
    for chain in (watched, plain):  # warm-up, excluded
        chain.run(question="warm up")
    ratios = []
    for index in range(runs):
        question = f"What is {index} + {index}?"
        a = watched.run(question=question).duration_ms
        b = plain.run(question=question).duration_ms
        ratios.append(a / b)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--edits", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, wb.Workbench(data_dir=scratch) as bench:
        directory = Path(scratch)
        bench.load("tiny", wb.tiny_model(), device="cpu")
        settled, fresh = poll_cost(directory)
        print(f"poll of an unchanged file: {settled:.1f} us (old mtime: stat only), {fresh:.1f} us (recent mtime: "
              "stat, read, hash)")
        print("edit -> serving, ms (p50 [min-max]) by poll interval:")
        for interval in (0.05, 0.25, 1.0):
            latencies = edit_latency(bench, directory, interval, args.edits)
            print(f"  interval {interval:>5.2f} s: {statistics.median(latencies):7.1f} "
                  f"[{min(latencies):.1f}-{max(latencies):.1f}] over {len(latencies)} edits")
        ratios = run_ratio(bench, directory, args.runs)
        print(f"tiny model, cpu, float32, no batching, {args.runs} pairs; watched / unwatched run time: "
              f"median {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]")


if __name__ == "__main__":
    main()
