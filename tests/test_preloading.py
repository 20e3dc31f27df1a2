"""Preloading strategies on the real tiny model: lazy, eager, prefetch, keep-warm, warm-up, unload and forget."""

from __future__ import annotations

import logging
import random
import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from opentelemetry.sdk.trace import ReadableSpan

import workbench as wb
from workbench.engine.preloading import format_bytes, parse_bytes, parse_preloading
from workbench.tracing import attributes as attr

PROMPT = "Question: What is the capital of France?\nPlan:"
THREE_HOPS = {
    "name": "three",
    "hops": [
        {"name": "one", "model": "a", "prompt": "Question: {{ q }}\nPlan:", "max_new_tokens": 8},
        {"name": "two", "model": "b", "prompt": "{{ one }}\nAnswer:", "max_new_tokens": 8},
        {"name": "three", "model": "c", "prompt": "{{ two }}\nSo:", "max_new_tokens": 8},
    ],
}


def register_abc(bench: wb.Workbench, tiny_path: Path, **settings: Any) -> None:
    """The tiny model registered (not loaded) under the names a, b and c."""
    for name in "abc":
        bench.register(name, tiny_path, device="cpu", **settings)


def spans_named(spans: list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name.startswith(prefix)), key=lambda s: s.start_time or 0)


def one_span(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    matching = [s for s in spans if s.name == name]
    assert len(matching) == 1, f"expected one {name!r} span, got {[s.name for s in spans]}"
    return matching[0]


def states(bench: wb.Workbench) -> dict[str, str]:
    return dict(zip(bench.models()["name"], bench.models()["state"], strict=True))


# -- strategies and budgets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lazy", wb.Lazy()),
        ("eager", wb.Eager()),
        (" Prefetch ", wb.Prefetch()),
        ("prefetch:4", wb.Prefetch(threads=4)),
        ("keep_warm:20GiB", wb.KeepWarm("20GiB")),
        ("keep-warm:512MiB", wb.KeepWarm(512 * 2**20)),
        ("keep_warm:1.5GB", wb.KeepWarm(1_500_000_000)),
    ],
)
def test_strategies_parse_from_their_names_and_back(text: str, expected: wb.PreloadingStrategy) -> None:
    strategy = parse_preloading(text)
    assert strategy == expected
    assert parse_preloading(strategy.name) == strategy  # the name is the short form that reads back
    assert parse_preloading(strategy) is strategy


def test_budgets_read_binary_and_decimal_sizes() -> None:
    assert wb.KeepWarm("20GiB").budget == 20 * 2**30
    assert wb.KeepWarm(4096).name == "keep_warm:4KiB"
    assert parse_bytes("512 mib") == 512 * 2**20
    assert parse_bytes("2GB") == 2 * 10**9
    assert format_bytes(1_500_000_000) == "1500MB" and format_bytes(1001) == "1001B"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("lazzy", "did you mean 'lazy'"),
        ("keep_warm", "needs a memory budget"),
        ("keep_warm:20XB", "'20XB' is not a memory size"),
        ("keep_warm:0", "more than 0 bytes"),
        ("eager:2", "eager takes no setting"),
        ("prefetch:many", "not a whole number"),
    ],
)
def test_unknown_strategies_are_refused_with_a_hint(bench: wb.Workbench, text: str, match: str) -> None:
    with pytest.raises(wb.StrategyError, match=match) as info:
        bench.set_preloading(text)
    assert "keep_warm:BUDGET" in str(info.value.hint)
    assert bench.preloading == wb.Lazy()  # unchanged


def test_set_preloading_takes_strings_and_objects(bench: wb.Workbench) -> None:
    assert bench.preloading == wb.Lazy()
    bench.set_preloading("prefetch")
    assert bench.preloading == wb.Prefetch()
    bench.set_preloading(wb.KeepWarm("1GiB"))
    assert str(bench.preloading) == "keep_warm:1GiB"
    with pytest.raises(wb.StrategyError, match="memory size"):
        wb.KeepWarm("lots")


# -- unload keeps the model registered; forget drops it ------------------------------------------


def test_unload_keeps_the_model_registered_so_it_loads_again_on_use(bench: wb.Workbench, tiny_path: Path) -> None:
    bench.load("a", tiny_path, device="cpu")
    before = bench.generate("a", PROMPT, max_new_tokens=6)
    weights = weakref.ref(bench.registry.get("a").model)

    assert bench.unload("a") > 0
    assert weights() is None  # the weights are freed
    row = bench.models().set_index("name").loc["a"]
    assert row["state"] == "registered" and row["source"] == str(tiny_path) and pd.isna(row["memory_mb"])
    assert bench.unload("a") == 0  # unloading twice frees nothing and is no error

    again = bench.generate("a", PROMPT, max_new_tokens=6)  # lazy: loads on first use
    assert again.token_ids == before.token_ids
    assert states(bench) == {"a": "loaded"}
    assert [s.attributes[attr.LOAD_TRIGGER] for s in spans_named(bench.traces().spans, "load a")] == [
        "explicit", "on_use"]


def test_forget_drops_the_model_entirely(bench: wb.Workbench, tiny_path: Path) -> None:
    bench.load("a", tiny_path, device="cpu")
    bench.register("b", tiny_path, device="cpu")
    assert bench.unload("a", forget=True) > 0
    assert bench.unload("b", forget=True) == 0
    assert bench.models().empty
    with pytest.raises(wb.UnknownModelError, match="no model named 'a'"):
        bench.generate("a", PROMPT)
    with pytest.raises(wb.UnknownModelError, match="no model named 'b'"):
        bench.unload("b")
    assert not spans_named(bench.traces().spans, "text_completion")  # refused before any span


# -- lazy ------------------------------------------------------------------------------------------


def test_lazy_loads_each_model_on_first_use_inside_the_runs_trace(bench: wb.Workbench, tiny_path: Path) -> None:
    register_abc(bench, tiny_path)
    chain = bench.chain(THREE_HOPS)
    assert set(states(bench).values()) == {"registered"}

    run = chain.run(q="hi")
    spans = run.trace.spans
    for model in "abc":
        load = one_span(spans, f"load {model}")
        request = one_span(spans, f"text_completion {model}")
        # The cold start sits inside the request that caused it, in the run's own trace.
        assert load.parent is not None and load.parent.span_id == request.context.span_id
        assert load.attributes[attr.LOAD_TRIGGER] == "on_use"
        assert load.attributes[attr.COLD_START_S] == load.attributes[attr.LOAD_S] > 0
    table = bench.models().set_index("name")
    assert (table["state"] == "loaded").all()
    assert table["cold_start_s"].notna().all() and table["last_used"].notna().all()

    second = chain.run(q="hi")
    assert not spans_named(second.trace.spans, "load")  # warm now
    assert second.outputs == run.outputs


def test_concurrent_first_uses_load_the_model_once(bench: wb.Workbench, tiny_path: Path) -> None:
    bench.register("a", tiny_path, device="cpu")
    start = threading.Barrier(8)
    results: list[wb.GenerationResult] = []

    def use() -> None:
        start.wait()
        results.append(bench.generate("a", PROMPT, max_new_tokens=6))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 8 and len({tuple(r.token_ids) for r in results}) == 1
    assert len(spans_named(bench.traces().spans, "load a")) == 1


# -- eager -----------------------------------------------------------------------------------------


def test_prepare_is_a_no_op_unless_eager(bench: wb.Workbench, tiny_path: Path) -> None:
    register_abc(bench, tiny_path)
    chain = bench.chain(THREE_HOPS)
    for strategy in ("lazy", "prefetch", "keep_warm:1GiB"):
        bench.set_preloading(strategy)
        assert bench.prepare(chain) == {}
    assert set(states(bench).values()) == {"registered"}

    bench.set_preloading("eager")
    cold = bench.prepare(chain)
    assert sorted(cold) == ["a", "b", "c"] and all(seconds > 0 for seconds in cold.values())
    assert set(states(bench).values()) == {"loaded"}
    assert bench.prepare(chain) == {}  # nothing left to load


def test_eager_loads_every_model_before_the_first_run_starts(bench: wb.Workbench, tiny_path: Path) -> None:
    register_abc(bench, tiny_path)
    chain = bench.chain(THREE_HOPS)
    bench.set_preloading("eager")

    run = chain.run(q="hi")
    assert not spans_named(run.trace.spans, "load")  # no cold start inside the run
    every = bench.traces().spans
    prepare = one_span(every, "prepare three")
    loads = spans_named(every, "load")
    assert [s.name for s in sorted(loads, key=lambda s: s.name)] == ["load a", "load b", "load c"]
    root = one_span(run.trace.spans, "chain three")
    for load in loads:
        assert load.parent is not None and load.parent.span_id == prepare.context.span_id
        assert load.attributes[attr.LOAD_TRIGGER] == "eager"
        assert load.end_time is not None and root.start_time is not None and load.end_time <= root.start_time


# -- prefetch --------------------------------------------------------------------------------------


def test_prefetch_starts_loading_hop_twos_model_before_hop_one_ends(bench: wb.Workbench, tiny_path: Path) -> None:
    register_abc(bench, tiny_path)
    # Hop one's lone request waits out the batch timeout: a hop that computes for a while, on any machine.
    bench.set_batching("a", wb.StaticBatching(size=2, timeout_ms=300))
    chain = bench.chain(THREE_HOPS)
    bench.set_preloading("prefetch")

    run = chain.run(q="hi")
    spans = run.trace.spans  # the background loads belong to the run's trace
    root = one_span(spans, "chain three")
    hop_one = one_span(spans, "hop one")
    for model in "bc":
        load = one_span(spans, f"load {model}")
        assert load.attributes[attr.LOAD_TRIGGER] == "prefetch"
        assert load.parent is not None and load.parent.span_id == root.context.span_id
        assert load.start_time is not None and hop_one.end_time is not None
        assert load.start_time < hop_one.end_time
    # Hop one's own model loads in the hop, first: the prefetches wait for it rather than slow it down.
    load_a = one_span(spans, "load a")
    assert load_a.attributes[attr.LOAD_TRIGGER] == "on_use"
    assert load_a.parent is not None and load_a.parent.span_id == hop_one.context.span_id
    assert all((load_a.end_time or 0) <= (one_span(spans, f"load {m}").start_time or 0) for m in "bc")


def test_prefetch_overlaps_the_load_with_the_running_hop(bench: wb.Workbench, tiny_path: Path) -> None:
    """Hop one only returns once hop two's model is in memory: that can only happen by prefetching."""
    register_abc(bench, tiny_path)

    def first(q: str) -> str:
        deadline = time.monotonic() + 60
        while not bench.registry.is_loaded("b"):
            if time.monotonic() > deadline:
                raise AssertionError("model b was not loaded while hop 'first' ran")
            time.sleep(0.005)
        return q.upper()

    chain = bench.chain(
        {
            "name": "overlap",
            "hops": [
                {"name": "first", "call": first},
                {"name": "second", "model": "b", "prompt": "{{ first }}\nAnswer:", "max_new_tokens": 4},
            ],
        }
    )
    bench.set_preloading("prefetch")
    run = chain.run(q="hi")
    assert run.outputs["first"] == "HI"
    load = one_span(run.trace.spans, "load b")
    assert load.end_time is not None and load.end_time <= (one_span(run.trace.spans, "hop first").end_time or 0)
    assert not spans_named(run.trace.spans, "load a")  # only downstream models are prefetched


def test_a_failed_prefetch_is_reported_by_the_hop_that_needs_the_model(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    bench.register("a", tiny_path, device="cpu")
    bench.register("b", tmp_path / "missing", device="cpu")
    bench.register("c", tiny_path, device="cpu")
    bench.set_preloading("prefetch")
    with pytest.raises(wb.HopFailed, match="missing' does not exist") as info:
        bench.chain(THREE_HOPS).run(q="hi")
    assert info.value.hop == "two"
    assert info.value.run is not None and info.value.run.outputs.keys() == {"one"}


# -- keep warm -------------------------------------------------------------------------------------


@pytest.fixture
def model_bytes(tiny_path: Path) -> int:
    """What one tiny model takes in memory, measured by loading it."""
    with wb.Workbench() as bench:
        return bench.load("m", tiny_path, device="cpu").memory_bytes


def test_keep_warm_evicts_the_least_recently_used_model(
    bench: wb.Workbench, tiny_path: Path, model_bytes: int
) -> None:
    register_abc(bench, tiny_path)
    budget = model_bytes * 5 // 2  # room for two models
    bench.set_preloading(wb.KeepWarm(budget))
    uses = list("abacbbcaacbab") + random.Random(0).choices("abc", k=6)

    warm: list[str] = []  # the reference: least recently used first
    expected_evictions: list[str] = []
    for model in uses:
        if model in warm:
            warm.remove(model)
        elif len(warm) == 2:
            expected_evictions.append(warm.pop(0))
        warm.append(model)

        assert bench.generate(model, PROMPT, max_new_tokens=2).tokens_out >= 1
        loaded = bench.registry.loaded()
        assert sorted(m.name for m in loaded) == sorted(warm)
        assert sum(m.memory_bytes for m in loaded) <= budget

    spans = bench.traces().spans
    evictions = spans_named(spans, "evict")
    assert [s.name.removeprefix("evict ") for s in evictions] == expected_evictions
    for evict in evictions:  # each eviction happened for the request that needed room, inside its trace
        assert evict.attributes[attr.BUDGET_BYTES] == budget
        request = next(s for s in spans if evict.parent and s.context.span_id == evict.parent.span_id)
        assert request.name == f"text_completion {evict.attributes[attr.EVICTED_FOR]}"
    reloads = [s for s in spans_named(spans, "load") if s.attributes[attr.MODEL_NAME] in expected_evictions]
    assert len(reloads) >= len(set(expected_evictions))


def test_keep_warm_never_exceeds_its_budget_under_concurrent_load(
    bench: wb.Workbench, tiny_path: Path, model_bytes: int
) -> None:
    register_abc(bench, tiny_path)
    budget = model_bytes * 5 // 2
    bench.set_preloading(wb.KeepWarm(budget))
    expected = bench.generate("a", PROMPT, max_new_tokens=4).token_ids
    done = threading.Event()
    peak = 0

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(m.memory_bytes for m in bench.registry.loaded()))
            time.sleep(0.001)  # a model stays loaded for a load's length at least; a busy loop only starves the GIL

    def client(seed: int) -> list[list[int]]:
        return [bench.generate(m, PROMPT, max_new_tokens=4).token_ids for m in random.Random(seed).choices("abc", k=6)]

    watcher = threading.Thread(target=watch)
    watcher.start()
    outcomes: list[list[list[int]]] = []
    clients = [threading.Thread(target=lambda s=s: outcomes.append(client(s))) for s in range(4)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=300)
    done.set()
    watcher.join()

    assert len(outcomes) == 4 and all(ids == expected for client in outcomes for ids in client)
    assert 0 < peak <= budget
    assert spans_named(bench.traces().spans, "evict")


def test_a_model_bigger_than_the_whole_budget_is_refused(bench: wb.Workbench, tiny_path: Path) -> None:
    register_abc(bench, tiny_path)
    bench.set_preloading("keep_warm:1KiB")
    with pytest.raises(wb.HopFailed, match="more than the whole keep-warm budget of 1KiB") as info:
        bench.chain(THREE_HOPS).run(q="hi")
    assert isinstance(info.value.cause, wb.ModelLoadError)
    assert "raise the budget" in str(info.value.hint)
    assert set(states(bench).values()) == {"registered"}
    with pytest.raises(wb.ModelLoadError, match="keep-warm budget"):
        bench.load("big", tiny_path, device="cpu")
    assert "big" not in bench.registry.names()


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda data: data[:8] + b"{not json" + data[17:], "JSONDecodeError"),
        (lambda data: (2**62).to_bytes(8, "little") + data[8:], "header claims"),  # no 4 EiB read is tried
        (lambda data: b"", "header claims"),
    ],
    ids=["garbled", "hostile-length", "empty"],
)
def test_keep_warm_refuses_a_damaged_weights_header_clearly(
    damage: Any, said: str, bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    bench.load("kept", tiny_path, device="cpu")
    bench.set_preloading("keep_warm:1GiB")
    source = tmp_path / "damaged"
    shutil.copytree(tiny_path, source)
    weights = source / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(wb.ModelLoadError, match=said) as info:
        bench.load("damaged", source, device="cpu")
    assert "model.safetensors" in str(info.value) and "damaged" in str(info.value.hint)
    assert "damaged" not in bench.registry.names()
    assert bench.generate("kept", PROMPT, max_new_tokens=2).tokens_out == 2  # what was loaded still serves


def test_choosing_keep_warm_evicts_down_to_the_budget_at_once(
    bench: wb.Workbench, tiny_path: Path, model_bytes: int
) -> None:
    register_abc(bench, tiny_path)
    for model in "cab":
        bench.generate(model, PROMPT, max_new_tokens=2)
    bench.set_preloading(wb.KeepWarm(model_bytes * 3 // 2))
    assert [m.name for m in bench.registry.loaded()] == ["b"]  # the most recently used stays
    assert [s.name for s in spans_named(bench.traces().spans, "evict")] == ["evict c", "evict a"]


def test_choosing_keep_warm_waits_for_no_busy_model_and_says_which_stay_over_the_budget(
    bench: wb.Workbench, tiny_path: Path, model_bytes: int, caplog: pytest.LogCaptureFixture
) -> None:
    register_abc(bench, tiny_path)
    for model in "cab":
        bench.generate(model, PROMPT, max_new_tokens=2)
    preloader = bench.engine.preloader
    for model in "ac":
        preloader.begin_use(model)  # a request on its way to each: busy
    try:
        # Before, this held the cell for 300 s waiting for a or c to finish, then raised "no room".
        with caplog.at_level(logging.WARNING, logger="workbench.engine.preloading"):
            bench.set_preloading(wb.KeepWarm(model_bytes * 3 // 2))
    finally:
        for model in "ac":
            preloader.end_use(model)
    assert sorted(m.name for m in bench.registry.loaded()) == ["a", "c"]  # the idle one went at once
    assert "keep_warm:" in caplog.text and "'a', 'c', over the budget, serving requests now" in caplog.text
    bench.generate("b", PROMPT, max_new_tokens=2)  # the next load makes the room, now that they are idle
    assert [m.name for m in bench.registry.loaded()] == ["b"]


# -- warm-up and batching settings survive reloads -----------------------------------------------


def test_warmup_counts_as_cold_start(bench: wb.Workbench, tiny_path: Path) -> None:
    bench.load("cold", tiny_path, device="cpu")
    bench.load("warm", tiny_path, device="cpu", warmup=True)
    bench.register("later", tiny_path, device="cpu", warmup=True)
    bench.generate("later", PROMPT, max_new_tokens=2)

    spans = bench.traces().spans
    cold = one_span(spans, "load cold").attributes
    assert cold[attr.WARMUP_S] == 0 and cold[attr.COLD_START_S] == cold[attr.LOAD_S]
    table = bench.models().set_index("name")
    for name in ("warm", "later"):
        load = one_span(spans, f"load {name}").attributes
        assert load[attr.WARMUP_S] > 0
        assert load[attr.COLD_START_S] == pytest.approx(load[attr.LOAD_S] + load[attr.WARMUP_S])
        assert table.loc[name, "cold_start_s"] == pytest.approx(load[attr.COLD_START_S], abs=1e-3)
        assert table.loc[name, "cold_start_s"] > table.loc[name, "load_s"]
    assert table.loc["cold", "cold_start_s"] == table.loc["cold", "load_s"]


def test_a_registered_batching_policy_is_used_on_every_load(bench: wb.Workbench, tiny_path: Path) -> None:
    policy = wb.DynamicBatching(max_batch=4, max_wait_ms=1)
    bench.register("a", tiny_path, device="cpu", batching=policy)
    assert bench.engine.policy("a") == policy

    def policy_of_last_request() -> Any:
        return spans_named(bench.traces().spans, "text_completion a")[-1].attributes[attr.BATCH_POLICY]

    bench.generate("a", PROMPT, max_new_tokens=2)
    assert policy_of_last_request() == policy.name
    bench.unload("a")
    bench.set_batching("a", wb.StaticBatching(size=2, timeout_ms=1))  # set while unloaded: kept for the reload
    bench.generate("a", PROMPT, max_new_tokens=2)
    assert policy_of_last_request() == wb.StaticBatching(size=2, timeout_ms=1).name
    with pytest.raises(wb.UnknownModelError):
        bench.set_batching("nope", policy)



def test_a_load_refused_when_its_workers_start_keeps_the_registration_before(
    bench: wb.Workbench, tiny_path: Path
) -> None:
    bench.register("a", tiny_path, device="cpu", batching="dynamic:4:5ms")
    before = bench.registry.settings("a")
    # The weights load, then the workers refuse: continuous batching cannot share one copy between two replicas.
    with pytest.raises(wb.StrategyError, match="continuous batching cannot run on replicas that share"):
        bench.load("a", tiny_path, device="cpu", dtype="bfloat16", replicas=2, batching="continuous")
    assert bench.registry.settings("a") == before  # was the refused load's settings (bfloat16)
    assert states(bench) == {"a": "registered"}
    assert bench.generate("a", PROMPT, max_new_tokens=2).tokens_out == 2
    assert bench.models().set_index("name").loc["a", "dtype"] == "float32"


def test_unload_cancels_a_prefetch_of_the_model_not_started_yet(bench: wb.Workbench, tiny_path: Path) -> None:
    register_abc(bench, tiny_path)
    bench.set_preloading(wb.Prefetch(threads=1))
    preloader = bench.engine.preloader
    preloader.prefetch(["a", "c"])  # one thread: c's prefetch waits behind a's load
    bench.unload("c")  # c was not loaded yet; the prefetch queued before must not load it back afterwards
    deadline = time.monotonic() + 120
    while preloader._pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not preloader._pending
    assert states(bench) == {"a": "loaded", "b": "registered", "c": "registered"}
