"""What only a CUDA GPU shows: placement and dtype, peak memory in a comparison, a real out-of-memory split.

Every test here skips without CUDA (CI has none). The module imports nothing beyond torch,
pandas and the workbench, so it runs on a bare GPU machine with only the workbench's own
runtime dependencies: ``bash benchmarks/gpu_check.sh`` runs it there, with the benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import QA_SPEC, QUESTIONS

import workbench as wb
from workbench.engine import GenerationParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]



def test_auto_places_the_model_on_the_gpu_in_its_half_precision(bench: wb.Workbench, tiny_path: Path) -> None:
    loaded = bench.load("tiny", tiny_path, device="auto", dtype="auto")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert str(loaded.device) == "cuda:0" and loaded.dtype == expected
    assert all(p.device.type == "cuda" and p.dtype == expected for p in loaded.model.parameters())
    row = bench.models().set_index("name").loc["tiny"]
    assert row["device"] == "cuda:0" and row["dtype"] == str(expected).removeprefix("torch.")
    result = bench.generate("tiny", "Where do the weights live?", max_new_tokens=4)
    assert result.tokens_out >= 1
    span = [s for s in bench.traces().spans if s.name == "text_completion tiny"][-1]
    assert span.attributes["workbench.model.device"] == "cuda:0"


def test_batched_greedy_outputs_match_one_at_a_time_in_float32(bench: wb.Workbench, tiny_path: Path) -> None:
    # float32, so that batching (padding, other rows) cannot change a greedy argmax through rounding.
    bench.load("tiny", tiny_path, device="cuda", dtype="float32")
    chain = bench.chain(QA_SPEC)
    alone = [run.output for run in chain.map(QUESTIONS, concurrency=1)]
    bench.set_batching("tiny", wb.DynamicBatching(max_batch=4, max_wait_ms=50))
    together = [run.output for run in chain.map(QUESTIONS, concurrency=4)]
    assert together == alone
    sizes = [s.attributes["workbench.batch.size"] for s in bench.traces().spans if s.name == "batch tiny"]
    assert max(sizes) > 1  # they really shared batches


def test_on_a_gpu_the_table_reports_torchs_peak_allocation(bench: wb.Workbench, tiny_path: Path) -> None:
    bench.load("tiny", tiny_path, device="cuda")
    cmp = wb.compare(bench.chain(QA_SPEC), QUESTIONS, batching=["none", "dynamic:4:5ms"], repeats=1, progress=False)
    table = cmp.table()
    assert (table["peak_cuda_mb"] >= table["peak_weights_mb"]).all()
    assert cmp.environment["device"] == "cuda:0"
    assert cmp.environment["accelerator"] == torch.cuda.get_device_name()


def test_a_real_cuda_out_of_memory_is_split_away(bench: wb.Workbench, tiny_path: Path) -> None:
    bench.load("tiny", tiny_path, device="cuda", batching=wb.StaticBatching(size=256, timeout_ms=60_000))
    device = torch.device("cuda")
    torch.cuda.synchronize(device)
    total = torch.cuda.get_device_properties(device).total_memory
    # Cap this process at what it holds now plus 64 MiB: one row fits, 256 rows of 400 tokens do not.
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(device) + 64 * 2**20) / total, device)
    try:
        prompt = "Tokens in, tokens out, padding, batch size. " * 40
        params = GenerationParams(max_new_tokens=4, truncate="left")
        requests = [bench.engine.submit("tiny", prompt, params) for _ in range(256)]
        results = [r.future.result(timeout=300) for r in requests]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert all(r.tokens_out >= 1 for r in results)
    limit = bench.models().set_index("name").loc["tiny", "batch_limit"]
    assert not pd.isna(limit) and limit < 256  # it learned a batch size that fits
    assert any(s.name == "batch tiny" and not s.status.is_ok for s in bench.traces().spans)


def test_awaited_and_streamed_runs_on_the_gpu_match_the_blocking_run(bench: wb.Workbench, tiny_path: Path) -> None:
    # The async core and the token stream on CUDA: the worker's generate runs on the GPU while the
    # event loop walks the chains; every form gives the same greedy text.
    import asyncio

    bench.load("tiny", tiny_path, device="cuda", dtype="float32",
               batching=wb.DynamicBatching(max_batch=8, max_wait_ms=20))
    chain = bench.chain(QA_SPEC)
    blocking = [chain.run(**q).output for q in QUESTIONS]

    async def awaited() -> list[str]:
        runs = await asyncio.gather(*(chain.arun(**q) for q in QUESTIONS))
        return [run.output for run in runs]

    assert asyncio.run(awaited()) == blocking
    events = list(chain.stream(**QUESTIONS[0]))
    tokens = "".join(e.text for e in events if e.kind == "token" and e.hop == "answer")
    assert tokens.strip() == events[-1].run.output == blocking[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_workbench_greedy_loop_writes_what_generate_writes_on_the_gpu(bench: wb.Workbench, tiny_path: Path,
                                                                          dtype: str) -> None:
    """A lone greedy row decodes in the workbench's own loop (backends/transformers.py, _LeanGreedy) on CUDA too, to
    the tokens transformers' generate writes, in full and half precision."""
    loaded = bench.load("tiny", tiny_path, device="cuda", dtype=dtype)
    tokenizer, model = loaded.tokenizer, loaded.model
    for prompt in [q["question"] for q in QUESTIONS]:
        result = bench.generate("tiny", prompt, max_new_tokens=48)
        (batch,) = [s for s in bench.traces().spans
                    if s.name == "batch tiny" and s.attributes.get("workbench.batch.id") == result.batch_id]
        assert batch.attributes["workbench.decode_loop"] == "workbench"
        ids = tokenizer(prompt, return_tensors="pt").to("cuda")
        with torch.inference_mode():
            output = model.generate(**ids, max_new_tokens=48, do_sample=False, temperature=None, top_p=None,
                                    top_k=None, pad_token_id=tokenizer.pad_token_id)
        row = output[0, ids["input_ids"].shape[1]:].tolist()
        eos = model.generation_config.eos_token_id
        stop = next((i for i, t in enumerate(row) if t == eos), None)
        assert result.token_ids == (row[: stop + 1] if stop is not None else row), prompt
