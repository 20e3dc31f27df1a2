"""Preloading strategies side by side: time to first result of a three-model chain, against the bound.

The chain has three hops in a row, each on its own model (a -> b -> c). Every repeat starts
with all three models registered but unloaded, then times one ``chain.run`` from the call to
its result under each strategy:

- lazy: each hop loads its model when its request arrives, so the loads add up;
- eager: ``bench.prepare`` (run by ``chain.run``) loads all three in parallel threads first;
- eager, one at a time: the same by hand with sequential ``bench.load`` calls, to show what
  the parallel threads buy;
- prefetch: when a hop starts, the models of the hops after it load in the background, two
  at a time (``prefetch:1``: one at a time, so each load overlaps the hop before it).

The bound is the best any strategy can do: the longest single load (each model loaded alone,
nothing else running) plus the chain's compute with all three models warm. Every load
includes a warm-up generate (``warmup=True``), so a load is the model's whole cold start. Both are measured
in every repeat, interleaved with the strategies (the order rotates), and each strategy's
time is divided by that repeat's bound; the table gives the median ratio with [min, max].

The models are random-weight Llama-shape checkpoints built once with ``save_pretrained``
(safetensors) next to the tiny model's cache, reusing its tokenizer; random weights rarely
emit EOS, so every hop generates exactly ``--max-new-tokens`` tokens.

    python benchmarks/preloading.py                          # ~24M-parameter models, CPU
    python benchmarks/preloading.py --device cuda --large    # ~0.36B-parameter (Qwen2-0.5B-like) models
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

import workbench as wb
from workbench.models.tiny import cache_root

MODELS = ("a", "b", "c")
# Llama-shape configs; the vocabulary is the tiny model's tokenizer's.
SMALL = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
         "num_key_value_heads": 4, "max_position_embeddings": 512}
LARGE = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
         "num_key_value_heads": 2, "max_position_embeddings": 2048}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build_models(config: dict[str, int], dtype: str, root: Path, count: int = len(MODELS)) -> list[Path]:
    """``count`` random-weight checkpoints of ``config`` (seeds 0, 1, ...), built once and cached under ``root``."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tiny = wb.tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    key = hashlib.sha256(json.dumps({"config": config, "dtype": dtype, "tiny": tiny.name}, sort_keys=True).encode())
    paths = []
    for seed in range(count):
        final = root / f"llama-{key.hexdigest()[:10]}-{seed}"
        paths.append(final)
        if (final / "model.safetensors").is_file() or any(final.glob("model-*.safetensors")):
            continue
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        torch.manual_seed(seed)
        model = LlamaForCausalLM(
            LlamaConfig(**config, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        ).to(getattr(torch, dtype))
        model.generation_config = GenerationConfig(
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
        )
        model.save_pretrained(scratch)
        for name in TOKENIZER_FILES:
            if (tiny / name).is_file():
                shutil.copy(tiny / name, scratch / name)
        os.replace(scratch, final)
        del model
    return paths


def chain_spec(max_new_tokens: int) -> dict[str, object]:
    return {
        "name": "three-models",
        "hops": [
            {"name": "plan", "model": "a", "prompt": "Question: {{ question }}\nPlan:", "max_new_tokens": max_new_tokens},
            {"name": "draft", "model": "b", "prompt": "{{ plan }}\nDraft:", "max_new_tokens": max_new_tokens},
            {"name": "answer", "model": "c", "prompt": "{{ draft }}\nAnswer:", "max_new_tokens": max_new_tokens},
        ],
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def unload_all(bench: wb.Workbench) -> None:
    for name in MODELS:
        bench.unload(name)  # stays registered
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--large", action="store_true", help="~0.36B-parameter models (for a GPU)")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens per hop (default: 4 on CPU, 128 on CUDA; either way a hop costs about one load)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the random-weight models are built (default: next to the tiny model)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    # Decode reads every weight per token, and so does a load: on a CPU a load costs a few tokens
    # of decode, on a GPU (host-to-device copies vs HBM reads) a hundred or more.
    max_new_tokens = args.max_new_tokens or (128 if cuda else 4)

    started = time.perf_counter()
    paths = build_models(LARGE if args.large else SMALL, dtype, args.cache_dir or cache_root() / "bench-preloading")
    built_s = time.perf_counter() - started
    question = {"question": "Which preloading strategy gives the first result soonest?"}

    with wb.Workbench() as bench:
        for name, path in zip(MODELS, paths):
            # Warm-up makes a load whole: on a CPU, safetensors weights are memory-mapped and
            # only read on first use, so without it the first hop would pay the real load.
            bench.register(name, path, device=args.device, dtype=dtype, warmup=True)
        chain = bench.chain(chain_spec(max_new_tokens))

        # Warm-up, excluded: page cache, allocator, kernels; reported as cold start.
        started = time.perf_counter()
        chain.run(**question)
        synchronize(args.device)
        cold_s = time.perf_counter() - started
        params = bench.registry.get("a").params
        print(
            f"models a, b, c: random-weight Llama shape, {params / 1e6:.1f}M params each, on {args.device} in {dtype};"
            f" {max_new_tokens} new tokens per hop, greedy; {args.repeats} repeats; torch {torch.__version__}"
            f" ({torch.get_num_threads()} threads, {os.cpu_count()} CPUs), transformers {transformers.__version__}"
        )
        print(f"build/find models {built_s:.1f}s; cold start (first lazy run, excluded) {cold_s:.2f}s")

        def first_result(strategy: str) -> float:
            unload_all(bench)
            bench.set_preloading("eager" if strategy == "eager, one at a time" else strategy)
            started = time.perf_counter()
            if strategy == "eager, one at a time":
                for name in MODELS:
                    bench.load(name)
            chain.run(**question)
            synchronize(args.device)
            return time.perf_counter() - started

        def bound() -> tuple[float, float, dict[str, float]]:
            unload_all(bench)
            bench.set_preloading("lazy")
            loads = {}
            for name in MODELS:
                started = time.perf_counter()
                bench.load(name)
                synchronize(args.device)
                loads[name] = time.perf_counter() - started
            started = time.perf_counter()
            chain.run(**question)
            synchronize(args.device)
            return max(loads.values()), time.perf_counter() - started, loads

        strategies = ["lazy", "eager", "eager, one at a time", "prefetch", "prefetch:1"]
        labels = [*strategies, "bound"]
        times: dict[str, list[float]] = {s: [] for s in strategies}
        bounds: list[float] = []
        longest: list[float] = []
        compute: list[float] = []
        loads: dict[str, list[float]] = {name: [] for name in MODELS}
        for repeat in range(args.repeats):
            shift = repeat % len(labels)
            for label in labels[shift:] + labels[:shift]:
                if label == "bound":
                    load_s, compute_s, each = bound()
                    longest.append(load_s)
                    compute.append(compute_s)
                    bounds.append(load_s + compute_s)
                    for name, seconds in each.items():
                        loads[name].append(seconds)
                else:
                    times[label].append(first_result(label))

        print("\nsingle loads (s): " + ", ".join(f"{n} {spread(v)}" for n, v in loads.items())
              + f"; chain compute, all warm (s): {spread(compute)}")
        print(f"\n{'strategy':<22} {'first result s':>22}   {'/ bound':<20}")
        print(f"{'bound':<22} {spread(bounds):>22}   {'1.00':<20}")
        ratios = {s: [t / b for t, b in zip(times[s], bounds)] for s in strategies}
        for strategy in strategies:
            print(f"{strategy:<22} {spread(times[strategy]):>22}   {spread(ratios[strategy]):<20}")
        print(
            f"\nheadline: prefetch / bound median {statistics.median(ratios['prefetch']):.2f}"
            f" [{min(ratios['prefetch']):.2f}, {max(ratios['prefetch']):.2f}] over {args.repeats} interleaved repeats"
            f" (goal <= 1.15; lazy {statistics.median(ratios['lazy']):.2f}, eager {statistics.median(ratios['eager']):.2f})"
        )


if __name__ == "__main__":
    main()
