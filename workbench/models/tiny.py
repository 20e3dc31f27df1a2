"""The offline tiny model: a small Llama-architecture causal LM with a locally trained tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from workbench.errors import ModelLoadError

# A few paragraphs for the byte-level BPE tokenizer to learn merges from. The model's weights
# are random, so what it says is nonsense; what matters is that it loads, tokenizes and
# generates through exactly the same code paths as a real checkpoint.
_CORPUS = """\
A chain is a graph of hops. Each hop reads the question and the answers of earlier hops,
then writes an answer of its own. The plan hop writes a plan; the answer hop follows it.
Latency is measured per span: queue wait, prefill, decode, and the time to first token.
Researchers compare batching policies and preloading strategies to find the fastest chain.
Question: What is the capital of France? Plan: recall the country, then its capital city.
Answer: Paris is the capital of France. Question: How many hops does this chain have?
Plan: count the hops in the spec. Answer: three hops, two language model calls and one function.
The model is small, the tokenizer is trained on this text, and everything runs offline.
Tokens in, tokens out, padding, batch size, throughput in tokens per second.
"""

BUILD_VERSION = 1
_BUILD_LOCK = threading.Lock()
FIT_STEPS = 300
DEFAULT_SEED = 0
TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "vocab_size": 512,
}


def cache_root() -> Path:
    """Where built artefacts live: ``$AUTOGLM_CACHE_DIR``, else the XDG cache directory."""
    explicit = os.environ.get("AUTOGLM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg) / "autoglm-workbench"


def tiny_model(seed: int = DEFAULT_SEED, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Build the tiny model once (or find it built) and return its directory.

    The directory holds ``config.json``, ``model.safetensors`` and a tokenizer, so it loads
    with ``AutoModelForCausalLM.from_pretrained`` like any checkpoint. The same seed always
    gives the same weights; concurrent builders are safe (each writes a temporary directory
    and renames it into place).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    key = hashlib.sha256(
        json.dumps({"v": BUILD_VERSION, "steps": FIT_STEPS, "seed": seed, "config": TINY_CONFIG, "corpus": _CORPUS}, sort_keys=True).encode()
    ).hexdigest()[:12]
    final = root / f"tiny-llama-{key}"
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        # One build at a time in this process: the fit sets torch's global thread count.
        with _BUILD_LOCK:
            if not (final / "model.safetensors").is_file():
                _build_into(root, final, seed)
    except OSError as exc:  # a read-only home, a cache path that is a file, a full disk
        raise ModelLoadError(
            f"cannot build the tiny model in {str(root)!r}: {exc.strerror or exc}",
            hint="set $AUTOGLM_CACHE_DIR to a directory you can write to" if cache_dir is None
            else "pass a cache_dir you can write to",
        ) from exc
    return final


TINY_SOURCE = "tiny"


def resolve_source(source: str) -> str:
    """A model source as a front end takes it: the word ``tiny`` means the offline tiny model's directory."""
    return str(tiny_model()) if source == TINY_SOURCE else source


def _build_into(root: Path, final: Path, seed: int) -> None:
    """Build in a scratch directory next to ``final`` and rename it into place (atomic)."""
    _remove_stale_scratch(root)
    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        _build(scratch, seed)
        try:
            os.rename(scratch, final)
        except OSError:
            # Another process finished first; its copy is identical (same seed, same config).
            if not (final / "model.safetensors").is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def _remove_stale_scratch(root: Path, older_than_s: float = 3600.0) -> None:
    """Scratch directories of builds that were killed part-way; a live build is never this old."""
    cutoff = time.time() - older_than_s
    for stale in root.glob(".build-*"):
        try:
            if stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass


def _fit(model, tokenizer, generator) -> None:  # type: ignore[no-untyped-def]
    """A few hundred deterministic optimiser steps on the corpus, so the model writes words and stops.

    Random weights emit raw byte tokens and never end a sequence; a model that has seen the
    corpus writes corpus-like text and emits EOS, which exercises early stopping and uneven
    row lengths in a batch the way a real model does. Single-threaded, so the result is the
    same on every machine with the same torch build.
    """
    import torch

    lines = [line for line in _CORPUS.splitlines() if line]
    rows = [[tokenizer.bos_token_id, *tokenizer(line)["input_ids"], tokenizer.eos_token_id] for line in lines]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        model.train()
        for _ in range(FIT_STEPS):
            pick = torch.randint(0, len(rows), (8,), generator=generator)
            loss = model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick]).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)


def _build(target: Path, seed: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_CONFIG["vocab_size"],
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )
    tokenizer.save_pretrained(target)

    config = LlamaConfig(
        **{**TINY_CONFIG, "vocab_size": len(tokenizer)},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # Re-draw every weight from our own generator so the bytes depend on the seed alone,
        # not on the order in which a transformers version happens to initialise modules.
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
        _fit(model, tokenizer, generator)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    from transformers.utils import logging as hf_logging

    # A one-shard "Writing model shards" bar is noise in a demo's or a notebook's output.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(target)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def tiny_lora(
    base: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    seed: int = 0,
    rank: int = 4,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    scale: float = 0.5,
    safe: bool = True,
) -> Path:
    """Save a real PEFT LoRA adapter for the model at ``base`` into ``target`` and return ``target``.

    Its B matrices are drawn from ``seed`` (times ``scale``), not left at peft's zeros, so the adapter
    changes what the model says: the same seed always gives the same adapter, another seed another
    one. ``safe=False`` saves pickled weights (``adapter_model.bin``), for tests that must refuse them.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # peft draws the A matrices from the global generator
            tuned = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules)))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in sorted(tuned.named_parameters()):
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
        tuned.save_pretrained(target, safe_serialization=safe)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return Path(target)
