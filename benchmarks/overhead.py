"""Orchestration overhead: the demo chain through the workbench against the same three calls made by hand.

The workbench runs the three-hop demo chain (plan and answer on the model, then the Python
hop ``answer_stats``) with tracing on, as ``chain.run`` does it: templates, spans, the
model's worker thread. By hand is what a user writes without it: the same two prompts formatted
with f-strings, tokenized, ``model.generate`` with the same greedy settings, decoded, then the
same Python function. All must write the same tokens; the script stops if they do not.

The workbench decodes a lone greedy row in its own loop over the model's forward, not through
``generate`` (see ``_LeanGreedy`` in ``workbench/engine/backends/transformers.py``), which saves
``generate``'s Python per call and per step. So a third variant, "by hand, loop", writes that
greedy loop out by hand (:func:`greedy_loop`): against it, what is left is the orchestration
alone, and the script prints that ratio beside the headline, and how the loop compares with
``generate`` by hand.

The variants run interleaved in one process, each round in the next of their orders (A B C,
A C B, ...), after one warm-up round that is reported apart as cold start. Latency is end to
end per chain; the headline is the median over rounds of workbench / by hand, with min and max.

Before the headline it says where the workbench's time outside ``generate`` goes, segment by
segment, read off the run's own spans (chain, hop, request and batch spans, and the batch's
prefill and decode times), beside the by-hand path's time outside its ``generate`` calls, and the floor
of the design: the same thread hand-offs timed with no work in them.

On a shared machine the median still wanders by a few percent from run to run; more pairs,
or pinning the process to one core with one torch thread, give a steadier figure.

``--null-model`` takes ``generate`` out of both paths (the workbench then decodes through the replaced
``generate``, and the loop by hand is left out): the model answers each prompt at once with the
tokens it wrote for it the first time (the workbench's step clock still hears every step), so what
is left is the orchestration alone, and the pairwise difference in microseconds is steady to a few
percent: the figure to watch while making the workbench's own Python cheaper.

    python benchmarks/overhead.py                      # tiny model, CPU, 100 pairs
    taskset -c 0 python benchmarks/overhead.py --threads 1 --pairs 200
    python benchmarks/overhead.py --device cuda --model /path/to/checkpoint --pairs 50
    taskset -c 0 python benchmarks/overhead.py --threads 1 --pairs 2000 --null-model
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import queue
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import transformers
import yaml

import workbench as wb
from workbench.demo import DEMO_QUESTION, DEMO_SPEC, answer_stats
from workbench.models.registry import LoadedModel
from workbench.tracing import attributes as attr


@dataclass
class Outcome:
    """What one chain produced: each hop's output and the model tokens it generated (EOS included)."""

    outputs: dict[str, Any]
    tokens: dict[str, int]


def demo_spec(max_new_tokens: int | None) -> dict[str, Any]:
    """The demo chain as a dict, with every LLM hop's ``max_new_tokens`` overridden if given."""
    spec = yaml.safe_load(DEMO_SPEC)
    if max_new_tokens is not None:
        for hop in spec["hops"]:
            if "model" in hop:
                hop["max_new_tokens"] = max_new_tokens
    return spec


def plan_prompt(question: str) -> str:
    return f"Question: {question}\nPlan:"


def answer_prompt(plan: str, question: str) -> str:
    return f"{plan}\nQuestion: {question}\nAnswer:"


def greedy_loop(model: Any, input_ids: torch.Tensor, max_new_tokens: int, eos_ids: set[int]) -> torch.Tensor:
    """Greedy decoding of one row by hand, as the workbench's loop does it (and generate does for one row): a dynamic
    cache, no attention mask (the row has no padding), positions counted on, the argmax of the last logits, until an
    end token. Returns the prompt and the new tokens."""
    cache = transformers.DynamicCache(config=model.config)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    tokens, step_input = [input_ids], input_ids
    for _ in range(max_new_tokens):
        logits = model(input_ids=step_input, position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=1).logits
        step_input = logits[:, -1].float().argmax(dim=-1, keepdim=True)
        tokens.append(step_input)
        if int(step_input) in eos_ids:
            break
        positions = positions[:, -1:] + 1
    return torch.cat(tokens, dim=1)


def by_hand(
    loaded: LoadedModel, max_new_tokens: dict[str, int], generate_s: list[float] | None = None, loop: bool = False
) -> Callable[[str], Outcome]:
    """The chain's work without the workbench: format, tokenize, generate, decode; twice; then the Python hop.

    ``generate`` is ``model.generate``, or with ``loop`` the greedy loop written out by hand (:func:`greedy_loop`).
    ``generate_s`` (if given) gets the seconds of each generate call, for the breakdown.
    """
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])

    def call(prompt: str, max_new_tokens: int) -> tuple[str, int]:
        encoded = tokenizer(prompt, return_tensors="pt").to(device)
        started = time.perf_counter()
        with torch.inference_mode():
            if loop:
                output = greedy_loop(model, encoded["input_ids"], max_new_tokens, eos_ids)
            else:
                output = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
        row = output[0, encoded["input_ids"].shape[1] :].tolist()  # copies to the host: synchronised on CUDA
        if generate_s is not None:
            generate_s.append(time.perf_counter() - started)
        stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
        row = row[: stop + 1] if stop is not None else row
        text = tokenizer.decode([t for t in row if t not in eos_ids], skip_special_tokens=True).strip()
        return text, len(row)

    def chain(question: str) -> Outcome:
        plan, plan_n = call(plan_prompt(question), max_new_tokens["plan"])
        answer, answer_n = call(answer_prompt(plan, question), max_new_tokens["answer"])
        stats = answer_stats(plan=plan, answer=answer)
        return Outcome({"plan": plan, "answer": answer, "stats": stats}, {"plan": plan_n, "answer": answer_n})

    return chain


def outcome_of(run: wb.Run) -> Outcome:
    """What the workbench's run produced, read from its outputs and its ``text_completion`` spans."""
    calls = [s.attributes for s in run.trace.spans if s.name.startswith(attr.TEXT_COMPLETION)]
    tokens = {str(a[attr.HOP_NAME]): int(a[attr.USAGE_OUTPUT_TOKENS]) for a in calls}  # type: ignore[call-overload]
    return Outcome(dict(run.outputs), tokens)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds ``fn`` took, synchronised on CUDA at both ends, and what it returned."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    outcome = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, outcome


# Where a chain's time goes outside ``generate``, read off the workbench's own spans (see ``breakdown``).
SEGMENTS = (
    "caller -> loop -> chain span starts",
    "chain span -> first hop",
    "hop -> request span (template, span)",
    "request -> batch (tokenize, queue, worker wakes)",
    "batch span less generate (tensors, detok, spans)",
    "batch end -> request end (results, request span)",
    "request end -> hop end (loop wakes, hop span)",
    "hop end -> next hop",
    "Python hop (pool thread and back)",
    "last hop -> chain span ends",
    "chain span ends -> caller returns",
)
(CALLER_TO_ROOT, ROOT_TO_HOP, HOP_TO_REQUEST, REQUEST_TO_BATCH, AROUND_GENERATE, BATCH_TO_REQUEST_END,
 REQUEST_TO_HOP_END, BETWEEN_HOPS, PYTHON_HOP, HOP_TO_ROOT_END, ROOT_TO_CALLER) = SEGMENTS


def breakdown(bench: wb.Workbench, calls: list[tuple[int, int, wb.Run]]) -> tuple[dict[str, list[float]], list[float]]:
    """Per chain, the microseconds of each of SEGMENTS and the chain's time outside ``generate`` (prefill + decode).

    ``calls`` holds each ``chain.run``'s wall clock before and after (``time.time_ns``) and its Run. Segments
    of the two LLM hops are summed. The batch spans live in the engine's trace; a request span names its batch.
    """
    batches = {s.attributes[attr.BATCH_ID]: s for s in bench.traces().spans if s.name.startswith("batch ")}
    segments: dict[str, list[float]] = {name: [] for name in SEGMENTS}
    outside: list[float] = []
    for called, returned, run in calls:
        spans = run.trace.spans
        (root,) = [s for s in spans if s.parent is None]
        hops = sorted((s for s in spans if s.name.startswith("hop ")), key=lambda s: s.start_time)
        requests = {s.attributes[attr.HOP_NAME]: s for s in spans if s.name.startswith(attr.TEXT_COMPLETION)}
        ns: dict[str, float] = dict.fromkeys(SEGMENTS, 0.0)
        generate_ns = 0.0
        ns[CALLER_TO_ROOT] = root.start_time - called
        ns[ROOT_TO_HOP] = hops[0].start_time - root.start_time
        for hop, after in zip(hops, [*hops[1:], None]):
            request = requests.get(hop.attributes[attr.HOP_NAME])
            if request is None:
                ns[PYTHON_HOP] += hop.end_time - hop.start_time
            else:
                batch = batches[request.attributes[attr.BATCH_ID]]
                generate = (batch.attributes[attr.PREFILL_MS] + batch.attributes[attr.DECODE_MS]) * 1e6
                generate_ns += generate
                ns[HOP_TO_REQUEST] += request.start_time - hop.start_time
                ns[REQUEST_TO_BATCH] += batch.start_time - request.start_time
                ns[AROUND_GENERATE] += batch.end_time - batch.start_time - generate
                ns[BATCH_TO_REQUEST_END] += request.end_time - batch.end_time
                ns[REQUEST_TO_HOP_END] += hop.end_time - request.end_time
            if after is not None:
                ns[BETWEEN_HOPS] += after.start_time - hop.end_time
        ns[HOP_TO_ROOT_END] = root.end_time - hops[-1].end_time
        ns[ROOT_TO_CALLER] = returned - root.end_time
        for name, value in ns.items():
            segments[name].append(value / 1e3)
        outside.append((returned - called - generate_ns) / 1e3)
    return segments, outside


def handoff_floor(chains: int = 2000) -> list[float]:
    """Microseconds per chain of the demo chain's thread hand-offs alone, with no work in them: the caller to an event
    loop on its own thread, the loop to a model worker thread and back (twice, one per LLM hop), the loop to a pool
    thread and back (the Python hop), the loop back to the caller. What no chain on this design can go below here."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    jobs: queue.SimpleQueue[asyncio.Future[int] | None] = queue.SimpleQueue()

    def worker() -> None:
        while (done := jobs.get()) is not None:
            loop.call_soon_threadsafe(done.set_result, 1)

    threading.Thread(target=worker, daemon=True).start()
    pool = ThreadPoolExecutor(1)

    async def model() -> int:
        done = loop.create_future()
        jobs.put(done)
        return await done

    async def chain() -> None:
        await model()
        await model()
        await loop.run_in_executor(pool, int)

    took = []
    for i in range(chains + chains // 10):
        started = time.perf_counter()
        asyncio.run_coroutine_threadsafe(chain(), loop).result()
        if i >= chains // 10:  # the first tenth warms up
            took.append((time.perf_counter() - started) * 1e6)
    jobs.put(None)
    pool.shutdown()
    loop.call_soon_threadsafe(loop.stop)
    return took


def null_model(model: Any) -> None:
    """Make ``model.generate`` answer each prompt at once with the tokens it wrote for it the first time, putting each
    step to the streamer as generate does: ``generate`` then costs next to nothing on either path."""
    generate, written = model.generate, {}

    def replay(input_ids: torch.Tensor, streamer: Any = None, **kwargs: Any) -> torch.Tensor:
        key = tuple(input_ids.flatten().tolist())
        if key not in written:
            written[key] = generate(input_ids=input_ids, **kwargs)
        output = written[key]
        if streamer is not None:
            streamer.put(input_ids)
            for step in output[:, input_ids.shape[1]:].unbind(1):
                streamer.put(step)
            streamer.end()
        return output

    model.generate = replay


def usable_cpus() -> int:
    """CPUs this process may run on (fewer than the machine's under ``taskset``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto (default cpu)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default=None, help="a checkpoint directory or hub id (default: the tiny model)")
    parser.add_argument("--pairs", type=int, default=100, help="measured pairs, after one warm-up pair (default 100)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="for both LLM hops (default: the demo's)")
    parser.add_argument("--question", default=DEMO_QUESTION)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--null-model", action="store_true",
                        help="generate answers at once, on both paths: the orchestration alone (see above)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with wb.Workbench() as bench:
        loaded = bench.load("tiny", args.model or wb.tiny_model(), device=args.device, dtype=args.dtype)
        chain = bench.chain(demo_spec(args.max_new_tokens))
        for hop, prompt in (("plan", plan_prompt("Q?")), ("answer", answer_prompt("P.", "Q?"))):
            template = chain.spec.hop(hop).template
            if template is None or template.render({"question": "Q?", "plan": "P."}) != prompt:
                raise SystemExit(f"the by-hand prompt of hop {hop!r} is not the one the chain renders; fix it first")
        max_new_tokens = {h.name: h.params.max_new_tokens for h in chain.spec.hops if h.model}
        if args.null_model:
            null_model(loaded.model)
        print(
            f"model {args.model or 'tiny'} ({loaded.params:,} params) on {loaded.device},"
            f" dtype {str(loaded.dtype).removeprefix('torch.')}; policy {bench.engine.policy('tiny').name};"
            f" greedy, max_new_tokens {max_new_tokens}; tracing on;"
            f"{' NULL MODEL (generate answers at once);' if args.null_model else ''} {args.pairs} pairs after 1"
            " warm-up pair;"
            f" torch {torch.__version__} ({torch.get_num_threads()} threads),"
            f" transformers {transformers.__version__}, {usable_cpus()} of {os.cpu_count()} CPUs"
        )
        hand_generate: list[float] = []
        hand = by_hand(loaded, max_new_tokens, hand_generate)
        hand_loop = by_hand(loaded, max_new_tokens, loop=True)
        calls: list[tuple[int, int, wb.Run]] = []

        def run_chain() -> wb.Run:
            called = time.time_ns()
            run = chain.run(question=args.question)
            calls.append((called, time.time_ns(), run))
            return run

        # Only the call is timed; reading the workbench's outcome off its trace comes after the clock.
        variants: dict[str, tuple[Callable[[], Any], Callable[[Any], Outcome]]] = {
            "workbench": (run_chain, outcome_of),
            "by hand": (lambda: hand(args.question), lambda outcome: outcome),
        }
        if not args.null_model:  # the null model replaces generate; a loop by hand would run the real model
            variants["by hand, loop"] = (lambda: hand_loop(args.question), lambda outcome: outcome)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        reference: Outcome | None = None
        orders = list(itertools.permutations(variants))
        for pair in range(args.pairs + 1):
            order = orders[pair % len(orders)]
            for name in order:
                call, read = variants[name]
                took, result = timed(call, loaded.device)
                outcome = read(result)
                reference = reference or outcome
                if outcome != reference:
                    raise SystemExit(
                        f"{name} (pair {pair}) wrote other tokens than the workbench's first run; the comparison"
                        f" would be unfair:\n  {outcome}\n  {reference}"
                    )
                seconds[name].append(took)
        assert reference is not None
        cold = {name: runs.pop(0) for name, runs in seconds.items()}
        print(
            "cold start (first call of each, excluded; the workbench's is the model's first call): "
            + ", ".join(f"{name} {s * 1e3:.1f} ms" for name, s in cold.items())
        )
        print(
            f"outputs equal in all {2 * (args.pairs + 1)} calls: {sum(reference.tokens.values())} model tokens"
            f" per chain {reference.tokens}"
        )

        print(f"\n{'variant':<13} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'min ms':>8}")
        for name, runs in seconds.items():
            ms = [s * 1e3 for s in runs]
            print(
                f"{name:<13} {len(ms):>4} {percentile(ms, 0.5):8.2f} {percentile(ms, 0.95):8.2f}"
                f" {percentile(ms, 0.99):8.2f} {min(ms):8.2f}"
            )
        if args.pairs < 100:
            print("(p99 from fewer than 100 samples)")
        ratios = [w / h for w, h in zip(seconds["workbench"], seconds["by hand"])]
        print(f"pairwise ratio quartiles: {percentile(ratios, 0.25):.3f} / {percentile(ratios, 0.75):.3f}")
        added = [(w - h) * 1e6 for w, h in zip(seconds["workbench"], seconds["by hand"])]
        print(f"added by the workbench per chain (pairwise difference): p50 {statistics.median(added):.0f} us"
              f" [quartiles {percentile(added, 0.25):.0f} / {percentile(added, 0.75):.0f}]")

        # Where the workbench's time outside generate goes, from its spans; by hand, its chain less its generates.
        segments, outside = breakdown(bench, calls[1:])
        calls_per_chain = len(hand_generate) // (args.pairs + 1)
        hand_generate_s = [sum(hand_generate[i:i + calls_per_chain])
                           for i in range(calls_per_chain, len(hand_generate), calls_per_chain)]
        hand_outside = [(t - g) * 1e6 for t, g in zip(seconds["by hand"], hand_generate_s)]
        wb_generate = [(returned - called) / 1e3 - o for (called, returned, _), o in zip(calls[1:], outside)]
        print(f"\nper chain, p50 us: generate (prefill + decode) workbench {statistics.median(wb_generate):.0f},"
              f" by hand {statistics.median(hand_generate_s) * 1e6:.0f}; outside generate workbench"
              f" {statistics.median(outside):.0f}, by hand {statistics.median(hand_outside):.0f}"
              " (tokenize, decode, the Python function)")
        print("  the workbench's, from its spans (LLM hops summed):")
        for name, values in segments.items():
            print(f"    {name:<50} {statistics.median(values):7.0f}")
        floor = statistics.median(handoff_floor())
        hand_p50 = statistics.median(seconds["by hand"]) * 1e6
        print(f"  the same thread hand-offs with no work in them (caller -> loop, loop -> worker -> loop twice,"
              f" loop -> pool -> loop, loop -> caller): p50 {floor:.0f} us, so no chain of this design goes"
              f" below {1 + floor / hand_p50:.3f} of by hand here")
        print(
            f"\noverhead ratio (workbench / by hand): median {statistics.median(ratios):.3f}"
            f" [min {min(ratios):.2f}, max {max(ratios):.2f}] over {len(ratios)} pairs"
        )
        if "by hand, loop" in seconds:
            # The workbench decodes a lone greedy row in its own loop (no generate): against the same loop by hand,
            # what is left is the orchestration alone.
            same = [w / h for w, h in zip(seconds["workbench"], seconds["by hand, loop"])]
            added = [(w - h) * 1e6 for w, h in zip(seconds["workbench"], seconds["by hand, loop"])]
            loops = [g / h for g, h in zip(seconds["by hand, loop"], seconds["by hand"])]
            print(f"orchestration ratio (workbench / by hand with the same greedy loop): median"
                  f" {statistics.median(same):.3f} [quartiles {percentile(same, 0.25):.3f} / {percentile(same, 0.75):.3f}],"
                  f" adding {statistics.median(added):.0f} us a chain at p50")
            print(f"the greedy loop by hand / generate by hand: median {statistics.median(loops):.3f}"
                  f" [quartiles {percentile(loops, 0.25):.3f} / {percentile(loops, 0.75):.3f}]")


if __name__ == "__main__":
    main()
