"""Workloads and the strategy comparison harness, on the real tiny model and real traces."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import QA_SPEC as SPEC
from helpers import QUESTIONS
from hypothesis import given
from hypothesis import strategies as st
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from matplotlib.backends.backend_agg import FigureCanvasAgg

import workbench as wb
import workbench.bench
from workbench.engine.batching import parse_policy
from workbench.experiments import read_inputs
from workbench.experiments.compare import TABLE_COLUMNS
from workbench.fronts.notebook.parsers import CompareCommand, ParseError, parse_command

ENVIRONMENT = ["chain", "model", "model_source", "device", "dtype", "torch_version", "transformers_version",
               "workbench_version", "repeats", "platform"]


@pytest.fixture(scope="module")
def tiny(tiny_path: Path) -> Iterator[wb.Workbench]:
    """One workbench with 'tiny' on the CPU, shared by the module; comparisons put its policy back."""
    with wb.Workbench() as bench:
        bench.load("tiny", tiny_path, device="cpu")
        yield bench


@pytest.fixture(scope="module")
def qa(tiny: wb.Workbench) -> wb.Chain:
    return tiny.chain(SPEC)


# -- workloads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0, -1.0, float("nan"), float("inf"), True, "20"])
def test_an_arrival_rate_that_is_no_finite_number_above_zero_is_refused(rate: object) -> None:
    """An infinite rate ran every input at once, labelled 'inf/s'; a string or a bool failed deep inside."""
    with pytest.raises(wb.WorkloadError, match="arrival rate must be a finite number > 0") as info:
        wb.PoissonArrivals([{"q": "a"}], rate=rate)  # type: ignore[arg-type]
    assert "concurrency=N" in str(info.value)
    assert wb.PoissonArrivals([{"q": "a"}], rate=np.int64(20)).rate == 20  # numpy's numbers are numbers


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True, None])
def test_an_arrival_seed_that_is_no_whole_number_is_refused_before_any_run(qa: wb.Chain, seed: object) -> None:
    """numpy's own ValueError or TypeError came out of the first pass's measurement, after its warm-up had run."""
    with pytest.raises(wb.WorkloadError, match=f"seed must be (a whole number|at least 0), not {re.escape(repr(seed))}"):
        wb.PoissonArrivals([{"q": "a"}], rate=5, seed=seed)  # type: ignore[arg-type]
    with pytest.raises(wb.WorkloadError, match="seed"):
        wb.compare(qa, QUESTIONS, arrival_rate=50, seed=seed, repeats=1, progress=False)  # type: ignore[arg-type]
    assert wb.PoissonArrivals([{"q": "a"}], rate=5, seed=np.int64(3)).seed == 3  # numpy's numbers are numbers


def test_poisson_arrivals_are_seeded_and_reproducible() -> None:
    inputs = [{"question": "q"}] * 2000
    arrivals = wb.PoissonArrivals(inputs, rate=50.0, seed=7).arrival_times()
    assert np.array_equal(arrivals, wb.PoissonArrivals(inputs, rate=50.0, seed=7).arrival_times())
    assert not np.array_equal(arrivals, wb.PoissonArrivals(inputs, rate=50.0, seed=8).arrival_times())
    assert arrivals[0] == 0.0 and np.all(np.diff(arrivals) > 0)
    # 2000 exponential gaps of mean 1/50 s: the seeded draw lands within a few percent of the rate.
    assert 1999 / arrivals[-1] == pytest.approx(50.0, rel=0.05)
    gaps = np.diff(arrivals)
    assert np.std(gaps) == pytest.approx(np.mean(gaps), rel=0.1)  # exponential: std equals mean


def test_closed_loop_leaves_the_warmup_runs_out(qa: wb.Chain) -> None:
    result = wb.ClosedLoop(QUESTIONS, concurrency=2, warmup=3).run(qa)
    assert [r.inputs for r in result.runs] == QUESTIONS
    assert [r.inputs for r in result.warmup_runs] == [QUESTIONS[0], QUESTIONS[1], QUESTIONS[2]]
    assert all(r.ok for r in result.runs + result.warmup_runs)
    assert {r.id for r in result.runs}.isdisjoint({r.id for r in result.warmup_runs})
    # The measurement starts after the warm-up: no measured run began before it.
    assert all(arrival >= result.started_ns for arrival in result.arrivals_ns)
    assert result.wall_s > 0


def test_open_loop_runs_arrive_on_their_poisson_schedule(qa: wb.Chain) -> None:
    workload = wb.PoissonArrivals(QUESTIONS, rate=40.0, seed=3)
    result = workload.run(qa)
    assert [r.inputs for r in result.runs] == QUESTIONS and not result.warmup_runs
    offsets = (np.array(result.arrivals_ns) - result.started_ns) / 1e9
    assert np.allclose(offsets, workload.arrival_times(), atol=1e-6)
    # A run never starts before its arrival.
    assert all(r.started_at * 1e9 >= a - 1e6 for r, a in zip(result.runs, result.arrivals_ns))


def test_read_inputs_names_the_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "q.jsonl"
    good.write_text('{"question": "a"}\n\n{"question": "b"}\n')
    assert read_inputs(good) == [{"question": "a"}, {"question": "b"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(wb.WorkloadError, match=r"bad.jsonl, line 2: a JSON list, not an object"):
        read_inputs(bad)
    with pytest.raises(wb.WorkloadError, match="cannot read inputs file"):
        read_inputs(tmp_path / "missing.jsonl")


# -- compare ------------------------------------------------------------------------------------

POLICIES = ["none", "static:4:2s", "dynamic:4:300ms", "dynamic:8:300ms:len1.5", "continuous:4"]


@pytest.fixture(scope="module")
def comparison(tiny: wb.Workbench, qa: wb.Chain) -> wb.Comparison:
    """Every policy kind, two interleaved repeats, no warm-up (so every batch is a measured one)."""
    tiny.set_batching("tiny", wb.DynamicBatching(max_batch=2, max_wait_ms=1))
    return wb.compare(qa, QUESTIONS, batching=POLICIES, concurrency=4, repeats=2, warmup=0, progress=False)


def test_the_table_has_a_row_per_strategy_and_the_documented_columns(comparison: wb.Comparison) -> None:
    table = comparison.table()
    assert list(table.columns) == TABLE_COLUMNS
    assert [parse_policy(p).name for p in POLICIES] == table["batching"].tolist()
    assert set(table["preloading"]) == {"(as set)"}
    assert table["n"].tolist() == [len(QUESTIONS) * 2] * len(POLICIES)
    assert table["errors"].tolist() == [0] * len(POLICIES) and table["repeats"].tolist() == [2] * len(POLICIES)
    assert (table["e2e_p50_ms"] <= table["e2e_p95_ms"]).all() and (table["e2e_p95_ms"] <= table["e2e_p99_ms"]).all()
    assert (table["requests_per_s"] > 0).all() and (table["output_tokens_per_s"] > 0).all()
    assert (table["peak_weights_mb"] > 0).all() and table["peak_cuda_mb"].isna().all()


def test_repeats_are_interleaved(comparison: wb.Comparison) -> None:
    passes = comparison.passes()
    # Every strategy's first pass comes before any strategy's second.
    assert passes["repeat"].tolist() == [0] * len(POLICIES) + [1] * len(POLICIES)
    assert set(passes.loc[passes["repeat"] == 1, "batching"]) == set(passes.loc[passes["repeat"] == 0, "batching"])


def test_every_policy_gives_the_greedy_outputs_of_no_batching(comparison: wb.Comparison) -> None:
    samples = comparison.samples()
    outputs = {name: frame.sort_values(["repeat", "input"])["output"].tolist() for name, frame in
               samples.groupby("batching")}
    assert all(isinstance(o, str) for o in outputs["none"])
    for name in outputs:
        assert outputs[name] == outputs["none"], name


def test_batching_shows_in_batch_size_and_padding(comparison: wb.Comparison) -> None:
    table = comparison.table().set_index("batching")
    assert table.loc["none", "mean_batch_size"] == 1 and table.loc["none", "padding_fraction"] == 0
    # Four runs in lockstep, and a 2 s timeout: static batches fill up, and different prompt lengths pad.
    assert table.loc["static:4:2000ms", "mean_batch_size"] > 1
    assert table.loc["static:4:2000ms", "padding_fraction"] > 0
    assert table.loc["continuous:4", "padding_fraction"] == 0


def test_the_workbench_gets_its_policy_back(tiny: wb.Workbench, comparison: wb.Comparison) -> None:
    assert tiny.engine.policy("tiny") == wb.DynamicBatching(max_batch=2, max_wait_ms=1)


def test_policy_and_preloading_come_back_after_an_interrupt(tiny: wb.Workbench) -> None:
    calls = []

    def interrupt_on_third(answer: str) -> str:
        calls.append(answer)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises, from inside a run
        return answer

    spec = {**SPEC, "name": "interrupted", "hops": [*SPEC["hops"], {"name": "check", "call": interrupt_on_third}]}
    chain = tiny.chain(spec)
    before = wb.StaticBatching(size=3, timeout_ms=1)
    tiny.set_batching("tiny", before)
    tiny.set_preloading("prefetch")
    try:
        with pytest.raises(KeyboardInterrupt):
            wb.compare(chain, QUESTIONS, batching=["none", "dynamic:4:1ms"], preloading="eager", concurrency=1,
                       repeats=2, warmup=0, progress=False)
        assert tiny.engine.policy("tiny") is before
        assert tiny.preloading == wb.Prefetch()
    finally:
        tiny.set_preloading("lazy")


def _interrupted_at_run(number: int) -> dict[str, Any]:
    """The two-hop chain's spec with a last hop that raises KeyboardInterrupt, as Ctrl-C does, in run ``number``."""
    calls = []

    def interrupt(answer: str) -> str:
        calls.append(answer)
        if len(calls) == number:
            raise KeyboardInterrupt
        return answer

    return {**SPEC, "name": "stopped", "hops": [*SPEC["hops"], {"name": "check", "call": interrupt}]}


def test_an_interrupted_comparison_keeps_the_passes_it_finished(tiny: wb.Workbench, tmp_path: Path) -> None:
    """A Ctrl-C raised a plain KeyboardInterrupt: every pass measured before it was lost."""
    spec = _interrupted_at_run(2 * len(QUESTIONS) + 1)  # the first run of the third pass
    with pytest.raises(wb.CompareInterrupted, match="interrupted after 2 of 4 passes") as stopped:
        wb.compare(tiny.chain(spec), QUESTIONS, batching=["none", "dynamic:4:1ms"], concurrency=1, repeats=2,
                   warmup=0, progress=False)
    assert isinstance(stopped.value, KeyboardInterrupt)  # it stops a script or a cell as Ctrl-C does
    kept = stopped.value.comparison
    assert kept is not None
    table = kept.table()
    assert table[["batching", "repeats", "n", "errors"]].values.tolist() == [
        ["none", 1, len(QUESTIONS), 0], ["dynamic:4:1ms", 1, len(QUESTIONS), 0]]
    assert len(kept.samples()) == 2 * len(QUESTIONS)  # the pass under way is left out, not half counted
    # Saved, it said what was asked for (repeats 2) where the table said what ran (1 each).
    saved = pd.read_csv(kept.save(tmp_path / "kept.csv"))
    assert saved["repeats"].tolist() == [1, 1] and saved["repeats_requested"].tolist() == [2, 2]


def test_open_loop_comparison(qa: wb.Chain) -> None:
    cmp = wb.compare(qa, QUESTIONS, batching="dynamic:4:5ms", arrival_rate=50, repeats=1, warmup=1, progress=False)
    table = cmp.table()
    assert table["n"].tolist() == [len(QUESTIONS)]
    assert cmp.environment["arrival_rate"] == 50 and cmp.environment["concurrency"] is None
    assert "Poisson arrivals at 50/s" in repr(cmp)


def test_a_failing_run_is_counted_not_raised(tiny: wb.Workbench) -> None:
    def refuse_sevens(question: str) -> str:
        if "7" in question:
            raise ValueError("no sevens")
        return question

    chain = tiny.chain({"name": "picky", "hops": [{"name": "check", "call": refuse_sevens},
                                                 {"name": "answer", "model": "tiny", "prompt": "{{ check }}",
                                                  "max_new_tokens": 2}]})
    inputs = [{"question": q} for q in ("1 + 1", "7 + 7", "2 + 2")]
    cmp = wb.compare(chain, inputs, batching="none", repeats=1, warmup=0, progress=False)
    assert cmp.table()[["n", "errors"]].values.tolist() == [[2, 1]]
    # Which run failed and why, where they were only counted: a strategy's errors looked like a bug of one's own.
    samples = cmp.samples()
    assert samples.loc[~samples["ok"], ["input", "error"]].values.tolist() == [
        [1, "hop 'check' failed: ValueError: no sevens"]]
    assert samples.loc[samples["ok"], "error"].isna().all()
    assert any(".samples() has each failed run's error" in note for note in cmp.readable().notes)


def refuse_odd_questions(question: str, plan: str) -> str:
    if question[-1] in "13":
        raise ValueError("odd")
    return plan


def test_the_model_calls_of_a_failed_run_are_left_out_as_the_run_is(tiny: wb.Workbench) -> None:
    """A run that failed after its model call had that call's TTFT, TPOT and tokens counted beside the runs that
    finished (ttft_n 4 for n 2), while the table's note said failed runs were left out of the latency figures."""
    chain = tiny.chain({"name": "fails_late", "hops": [
        {"name": "plan", "model": "tiny", "prompt": "Q: {{ question }}", "max_new_tokens": 4},
        {"name": "check", "call": refuse_odd_questions}], "output": "check"})
    inputs = [{"question": f"q{i}"} for i in range(4)]
    cmp = wb.compare(chain, inputs, batching="none", repeats=1, warmup=0, progress=False)
    assert cmp.table()[["n", "errors", "ttft_n"]].values.tolist() == [[2, 2, 2]]
    assert len(cmp.calls()) == 2  # one model call per finished run
    tokens = float(cmp.calls()["tokens_out"].sum())
    (wall,) = cmp.passes()["wall_s"]
    assert cmp.table().at[0, "output_tokens_per_s"] == pytest.approx(tokens / wall)


def test_a_comparison_of_one_strategy_on_one_input_of_a_model_free_chain_reads_as_english(tiny: wb.Workbench) -> None:
    # It read "<Comparison of 1 strategies on chain 'echo': 1 inputs, ..., 1 repeat;  on  ()>".
    chain = tiny.chain({"name": "echo", "hops": [{"name": "say", "call": "workbench.demo:canned_answer"}]})
    cmp = wb.compare(chain, [{"question": "a"}], batching="none", repeats=1, warmup=0, progress=False)
    assert repr(cmp).startswith("<Comparison of 1 strategy on chain 'echo': 1 input, ")
    assert repr(cmp).endswith("1 repeat; no model>") and "1 strategy" in cmp._repr_html_()


def test_a_comparison_where_every_run_failed_still_reads_and_draws(tiny: wb.Workbench) -> None:
    """Its plot raised a RuntimeWarning (dividing an empty CDF's infinite limits): a dashboard's first pass could."""
    def refuse(question: str) -> str:
        raise ValueError("no")

    chain = tiny.chain({"name": "refuses", "hops": [{"name": "check", "call": refuse}]})
    cmp = wb.compare(chain, [{"question": "1"}, {"question": "2"}], repeats=2, warmup=0, progress=False)
    assert cmp.table()[["n", "errors", "requests_per_s"]].values.tolist() == [[0, 4, 0.0]]
    scatter, cdf = cmp.plot().axes
    assert cdf.get_lines() == [] and cdf.get_xscale() == "linear"
    assert "—" in cmp._repr_html_()


def test_save_round_trips_csv_and_parquet_with_the_environment(comparison: wb.Comparison, tmp_path: Path) -> None:
    expected = comparison.table()
    for name in ("cmp.csv", "cmp.parquet"):
        path = comparison.save(tmp_path / name)
        back = pd.read_csv(path) if name.endswith(".csv") else pd.read_parquet(path)
        assert list(back.columns[: len(TABLE_COLUMNS)]) == TABLE_COLUMNS
        assert set(ENVIRONMENT) - {"repeats"} | {"repeats_requested"} <= set(back.columns)
        assert back["batching"].tolist() == expected["batching"].tolist()
        assert np.allclose(back["e2e_p95_ms"], expected["e2e_p95_ms"])
        first = back.iloc[0]
        assert (first["device"], first["dtype"], first["model"]) == ("cpu", "float32", "tiny")
        assert first["torch_version"] == torch.__version__ and first["workbench_version"] == wb.__version__
        assert first["repeats"] == first["repeats_requested"] == 2 and first["chain"] == "qa"
    with pytest.raises(wb.StrategyError, match="unknown file type '.xlsx'"):
        comparison.save(tmp_path / "cmp.xlsx")


def test_saving_where_no_file_can_be_written_says_so_and_keeps_the_comparison(
    comparison: wb.Comparison, tmp_path: Path
) -> None:
    """A missing folder was a raw OSError from pandas; the dashboard then painted a finished comparison as failed."""
    with pytest.raises(wb.StrategyError, match="cannot save the comparison to .*missing.*non-existent directory"):
        comparison.save(tmp_path / "missing" / "cmp.csv")
    (tmp_path / "taken.parquet").mkdir()
    with pytest.raises(wb.StrategyError, match="Is a directory") as refused:
        comparison.save(tmp_path / "taken.parquet")
    assert "the comparison is kept" in refused.value.hint
    assert comparison.save(tmp_path / "cmp.csv").exists()


def test_plot_draws_the_scatter_with_error_bars_and_the_cdfs(comparison: wb.Comparison) -> None:
    fig = comparison.plot()
    scatter, cdf = fig.axes
    assert scatter.get_xlabel() == "E2E p95 latency (ms)" and "throughput" in scatter.get_ylabel()
    assert len(cdf.get_lines()) == len(POLICIES)
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # draws itself in a notebook, no pyplot needed
    # Each strategy's point carries its two intervals as bars, drawn from the table's bounds.
    table = comparison.table()
    bars = [c for c in scatter.containers if c.has_xerr and c.has_yerr]
    assert len(bars) == len(POLICIES)
    (x_segments, y_segments) = bars[0].lines[2]
    (x_lo, _), (x_hi, _) = x_segments.get_segments()[0]
    (_, y_lo), (_, y_hi) = y_segments.get_segments()[0]
    first = table.iloc[0]
    assert (x_lo, x_hi) == pytest.approx((first["e2e_p95_ms_lo"], first["e2e_p95_ms_hi"]))
    assert (y_lo, y_hi) == pytest.approx((first["requests_per_s_lo"], first["requests_per_s_hi"]))
    # Names go in one legend beside the panels: inside the figure, over neither panel, no two on each other.
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == table["batching"].tolist()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lays the figure out as a notebook draws it
    renderer = canvas.get_renderer()
    page, box = fig.bbox, legend.get_window_extent(renderer)
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
    assert not any(box.overlaps(axes.get_window_extent(renderer)) for axes in (scatter, cdf))
    texts = [t.get_window_extent(renderer) for t in legend.get_texts()]
    assert not any(a.overlaps(b) for i, a in enumerate(texts) for b in texts[i + 1:])
    # After drawing, the latency axis has labelled ticks, whether its range spans a decade (log) or not (linear).
    labels = [t.get_text() for t in cdf.get_xticklabels() if t.get_text()]
    lo, hi = cdf.dataLim.intervalx
    assert len(labels) >= 2 and cdf.get_xscale() == ("log" if hi / lo >= 10 else "linear")


def test_html_repr_shows_the_workload_and_the_table(comparison: wb.Comparison) -> None:
    page = comparison._repr_html_()
    assert "closed loop at concurrency 4" in page and "2 repeats" in page
    assert all(f'left; white-space: nowrap">{parse_policy(p).name}</td>' in page for p in POLICIES)
    assert "bootstrap" in page and "min–max over repeats" in page  # the interval is named where it shows


# -- spread -------------------------------------------------------------------------------------

BOUNDED = [c.removesuffix("_lo") for c in TABLE_COLUMNS if c.endswith("_lo")]


def test_every_figure_has_an_interval_that_holds_it(comparison: wb.Comparison) -> None:
    table = comparison.table()
    assert set(BOUNDED) == {"requests_per_s", "output_tokens_per_s", "e2e_p50_ms", "e2e_p95_ms", "e2e_p99_ms",
                            "ttft_p50_ms", "ttft_p95_ms", "tpot_ms", "cold_start_s", "first_result_s"}
    for column in BOUNDED:
        lo, point, hi = table[f"{column}_lo"], table[column], table[f"{column}_hi"]
        assert lo.notna().all() and hi.notna().all(), column
        assert ((lo <= point) & (point <= hi)).all(), column
    # Throughput's interval is the min-max of the passes, one per repeat.
    passes = comparison.passes().groupby("batching")["requests_per_s"]
    by_policy = table.set_index("batching")
    assert by_policy["requests_per_s_lo"].to_dict() == passes.min().to_dict()
    assert by_policy["requests_per_s_hi"].to_dict() == passes.max().to_dict()
    # The bootstrap is seeded: the same runs give the same intervals every time the table is read.
    pd.testing.assert_frame_equal(table, comparison.table())


def test_each_percentile_comes_with_its_sample_count_and_a_small_p99_is_flagged(comparison: wb.Comparison) -> None:
    table = comparison.table()
    runs = len(QUESTIONS) * 2
    assert table["n"].tolist() == [runs] * len(POLICIES)
    assert table["ttft_n"].tolist() == [2 * runs] * len(POLICIES)  # two model calls per run
    assert (table["tpot_n"] <= table["ttft_n"]).all() and (table["tpot_n"] > 0).all()
    assert table["p99_few_samples"].tolist() == [True] * len(POLICIES)  # 8 runs: far from the 100 a p99 needs
    shown = comparison.readable()
    assert all(cell.endswith(" *") for cell in shown.column("e2e_p99_ms"))
    assert table["ttft_p95_few_samples"].tolist() == [True] * len(POLICIES)  # 16 model calls
    assert "* p95 from fewer than 20 runs, p99 from fewer than 100 runs, ttft_p95 from fewer than 20 model calls: " \
        "little more than the slowest one." in shown.notes
    assert shown.columns.index("n") == shown.columns.index("e2e_p99_ms") + 1  # the count beside its percentiles


def test_the_readable_table_shows_each_figure_with_its_interval(comparison: wb.Comparison) -> None:
    shown = comparison.readable()
    number = r"\d{1,3}(,\d{3})*"
    for column in ("requests_per_s", "e2e_p50_ms", "ttft_p95_ms", "tpot_ms"):
        for cell in shown.column(column):
            assert re.fullmatch(rf"{number}\.\d \({number}\.\d–{number}\.\d\)( \*)?", cell), (column, cell)
    assert all(re.fullmatch(rf"{number}\.\d{{3}} \(.+–.+\)", c) for c in shown.column("first_result_s"))
    assert all(re.fullmatch(r"\d+\.\d%", c) for c in shown.column("padding_fraction"))
    assert shown.column("peak_cuda_mb") == ["—"] * len(POLICIES)  # no GPU here: said, not NaN
    assert "e+" not in repr(shown) and "nan" not in repr(shown).lower()


def measured(throughputs: dict[str, list[float]], runs: int = 12) -> wb.Comparison:
    """A Comparison of known figures (the real class, fed numbers instead of a machine's noise), one row per name.

    Each strategy gets one pass per throughput given and ``runs`` runs of latency 100..100+runs-1 ms.
    """
    names = list(throughputs)
    passes = pd.DataFrame([
        {"batching": name, "preloading": "(as set)", "balance": "(as set)", "repeat": repeat, "wall_s": 1.0, "requests_per_s": value,
         "output_tokens_per_s": 10 * value, "cold_start_s": 0.0, "first_result_s": 0.1, "peak_weights_mb": 1.0,
         "peak_cuda_mb": float("nan")}
        for name in names for repeat, value in enumerate(throughputs[name])
    ])
    samples = pd.DataFrame([
        {"batching": name, "preloading": "(as set)", "balance": "(as set)", "repeat": 0, "input": i, "ok": True, "e2e_ms": 100.0 + i,
         "output": "x"}
        for name in names for i in range(runs)
    ])
    calls = pd.DataFrame([
        {"batching": name, "preloading": "(as set)", "balance": "(as set)", "repeat": 0, "hop": "answer",
         "ttft_ms": 10.0 + i, "tpot_ms": 1.0, "tokens_in": 5, "tokens_out": 4, "batch_id": i, "batch_size": 1,
         "padding_tokens": 0, "replica": None, "e2e_ms": 20.0 + i}
        for name in names for i in range(runs)
    ])
    return wb.Comparison("known", [(name, "(as set)", "(as set)") for name in names], samples, calls, passes,
                         {"inputs": runs, "repeats": len(next(iter(throughputs.values())))})


def test_overlapping_intervals_are_not_a_ranking() -> None:
    cmp = measured({"slow": [10.0, 11.0, 12.0], "close": [11.5, 13.0, 14.0], "fast": [30.0, 31.0, 33.0]})
    table = cmp.table().set_index("batching")
    assert table["rank"].to_dict() == {"fast": 1, "close": 2, "slow": 3}
    # slow and close overlap (11.5-12): one group, neither told apart; fast stands alone.
    assert table["rank_group"].to_dict() == {"fast": 1, "close": 2, "slow": 2}
    assert table["distinguishable"].to_dict() == {"fast": True, "close": False, "slow": False}
    shown = cmp.readable()
    ranks = dict(zip(shown.column("batching"), shown.column("rank")))
    assert ranks == {"slow": "3 ≈2", "close": "2 ≈3", "fast": "1"}
    assert any("not distinguishable" in note for note in shown.notes)


def test_one_repeat_gives_no_interval_and_so_no_ranking() -> None:
    cmp = measured({"a": [10.0], "b": [40.0]})
    table = cmp.table()
    assert table[["requests_per_s_lo", "requests_per_s_hi", "first_result_s_lo"]].isna().all().all()
    assert table["rank"].tolist() == [2, 1]  # the order of the medians is still there to read
    assert table["rank_group"].isna().all() and table["distinguishable"].isna().all()
    shown = cmp.readable()
    assert shown.column("rank") == ["—", "—"] and shown.column("requests_per_s") == ["10.0", "40.0"]
    assert any("one repeat gives no spread" in note for note in shown.notes)


def test_a_p95_of_too_few_runs_is_flagged_as_a_p99_is() -> None:
    # Before, a p95 of 12 runs (little more than the slowest) was shown as plainly as one of a thousand.
    few, enough = measured({"a": [1.0, 2.0]}, runs=12), measured({"a": [1.0, 2.0]}, runs=40)
    assert few.table()["p95_few_samples"].tolist() == [True] and enough.table()["p95_few_samples"].tolist() == [False]
    assert few.readable().column("e2e_p95_ms")[0].endswith(" *")
    assert not enough.readable().column("e2e_p95_ms")[0].endswith(" *")
    assert "* p99 from fewer than 100 runs: little more than the slowest one." in enough.readable().notes


def test_a_ttft_p95_of_too_few_model_calls_is_flagged_as_the_run_percentiles_are() -> None:
    # Before, ttft_p95_ms from 12 model calls was shown as plainly as one from a thousand, beside a flagged e2e p95.
    few, enough = measured({"a": [1.0, 2.0]}, runs=12), measured({"a": [1.0, 2.0]}, runs=40)  # one call per run
    assert few.table()["ttft_p95_few_samples"].tolist() == [True]
    assert enough.table()["ttft_p95_few_samples"].tolist() == [False]
    assert few.readable().column("ttft_p95_ms")[0].endswith(" *")
    assert not enough.readable().column("ttft_p95_ms")[0].endswith(" *")
    assert "* p95 from fewer than 20 runs, p99 from fewer than 100 runs, ttft_p95 from fewer than 20 model calls: " \
        "little more than the slowest one." in few.readable().notes


def test_a_p99_of_enough_runs_is_not_flagged_and_its_interval_narrows() -> None:
    few, many = measured({"a": [1.0, 2.0]}, runs=20).table(), measured({"a": [1.0, 2.0]}, runs=400).table()
    assert few["p99_few_samples"].tolist() == [True] and many["p99_few_samples"].tolist() == [False]
    assert "*" not in measured({"a": [1.0, 2.0]}, runs=400).readable().column("e2e_p99_ms")[0]
    # Latencies 100..499 ms: the p50's interval holds the true median and is a few percent of it wide.
    lo, hi = many.loc[0, "e2e_p50_ms_lo"], many.loc[0, "e2e_p50_ms_hi"]
    assert lo <= 299.5 <= hi and hi - lo < 0.15 * 299.5


# -- preloading --------------------------------------------------------------------------------


@pytest.fixture
def two_models(bench: wb.Workbench, tiny_path: Path) -> wb.Chain:
    """A chain whose hops use two models (the tiny one, loaded under two names), so loads can overlap."""
    bench.load("first", tiny_path, device="cpu")
    bench.load("second", tiny_path, device="cpu")
    return bench.chain({
        "name": "two",
        "hops": [
            {"name": "plan", "model": "first", "prompt": "Question: {{ question }}\nPlan:", "max_new_tokens": 3},
            {"name": "answer", "model": "second", "prompt": "{{ plan }}\nAnswer:", "max_new_tokens": 3},
        ],
    })


def test_every_preloading_pass_starts_cold(bench: wb.Workbench, two_models: wb.Chain) -> None:
    one_model_mb = bench.registry.get("first").memory_bytes / 2**20
    budget = wb.KeepWarm(int(1.5 * bench.registry.get("first").memory_bytes))  # room for one model, not two
    bench.set_preloading(wb.Prefetch(threads=1))
    bench.set_batching("second", wb.StaticBatching(size=2, timeout_ms=5))
    cmp = wb.compare(two_models, QUESTIONS[:2], batching=["none", "dynamic:2:5ms"],
                     preloading=["lazy", "eager", "prefetch", budget], repeats=1, warmup=0, progress=False)
    table = cmp.table()
    assert table[["preloading", "batching"]].values.tolist() == [
        [p, b] for p in ("lazy", "eager", "prefetch", budget.name) for b in ("none", "dynamic:2:5ms")
    ]
    assert table["errors"].tolist() == [0] * 8 and table["n"].tolist() == [2] * 8
    # The models were unloaded before every pass, so every pass paid for loading them again.
    assert (table["cold_start_s"] > 0).all() and (table["first_result_s"] > 0).all()
    peak = table.set_index(["preloading", "batching"])["peak_weights_mb"]
    assert peak["eager", "none"] == pytest.approx(2 * one_model_mb)
    assert peak[budget.name, "none"] == pytest.approx(one_model_mb)  # keep-warm evicted one to load the other
    # What the workbench had before comes back: its preloading strategy and each model's policy.
    assert bench.preloading == wb.Prefetch(threads=1)
    assert bench.engine.policy("first").name == "none"
    assert bench.engine.policy("second") == wb.StaticBatching(size=2, timeout_ms=5)


def test_models_not_loaded_yet_are_loaded_once_before_cold_starts_are_measured(bench: wb.Workbench,
                                                                               tiny_path: Path) -> None:
    # The process's first load pays once for what later ones find ready (~1.2 s against ~0.01 s for the tiny model):
    # left to the first pass, it went to whichever strategy came first, whatever the order.
    bench.register("late", tiny_path, device="cpu")
    chain = bench.chain({"name": "late", "hops": [{"name": "say", "model": "late", "prompt": "{{ question }}",
                                                   "max_new_tokens": 2}]})
    cmp = wb.compare(chain, QUESTIONS[:2], preloading=["lazy", "eager"], repeats=1, warmup=0, progress=False)
    loads = sorted((s.start_time or 0, (s.attributes or {}).get("workbench.load.trigger"))
                   for s in bench.traces().spans if s.name == "load late")
    assert len(loads) == 3  # one before the passes, one in each pass
    first_pass = cmp.table()
    assert (first_pass["cold_start_s"] > 0).all() and first_pass["errors"].tolist() == [0, 0]


def test_keep_warm_passes_leave_the_models_outside_the_chain_loaded(
    bench: wb.Workbench, two_models: wb.Chain, tiny_path: Path
) -> None:
    # Before, a keep-warm pass evicted an idle model the chain does not use, to reload cold on its next use.
    bench.load("other", tiny_path, device="cpu")
    budget = wb.KeepWarm(int(1.5 * bench.registry.get("first").memory_bytes))  # room for one model, not two
    cmp = wb.compare(two_models, QUESTIONS[:1], preloading=[budget], repeats=1, warmup=0, progress=False)
    assert cmp.table()["errors"].tolist() == [0]
    assert bench.registry.is_loaded("other")
    evicted = bench.traces().table().query("name.str.startswith('evict ')", engine="python")["name"]
    assert "evict other" not in evicted.tolist() and len(evicted) > 0  # the chain's own models were held to it


def test_eager_passes_load_before_the_first_run(bench: wb.Workbench, two_models: wb.Chain) -> None:
    cmp = wb.compare(two_models, QUESTIONS[:2], preloading=["eager", "lazy"], repeats=1, warmup=0, progress=False)
    loads = bench.traces().table().query("name.str.startswith('load ')", engine="python")
    triggers = loads["attributes.workbench.load.trigger"].tolist()
    assert triggers[:2] == ["explicit", "explicit"]  # the fixture's own loads
    assert sorted(triggers[2:]) == ["eager", "eager", "on_use", "on_use"]
    assert cmp.table()["batching"].tolist() == ["(as set)", "(as set)"]


def test_a_model_that_fails_to_load_eagerly_fails_that_passs_runs_not_the_comparison(
    bench: wb.Workbench, tiny_path: Path, tmp_path: Path
) -> None:
    """The eager pass's load raised out of compare: the lazy passes measured before it were lost, where under lazy the
    same failed load was counted as each run's error."""
    (tmp_path / "config.json").write_text("{}")  # a model folder without weights: it registers, and fails to load
    bench.load("good", tiny_path, device="cpu")
    bench.register("broken", tmp_path, device="cpu")
    chain = bench.chain({"name": "half", "hops": [
        {"name": "plan", "model": "good", "prompt": "{{ question }}", "max_new_tokens": 2},
        {"name": "answer", "model": "broken", "prompt": "{{ plan }}", "max_new_tokens": 2}]})
    cmp = wb.compare(chain, QUESTIONS[:2], preloading=["lazy", "eager"], repeats=1, warmup=0, progress=False)
    assert cmp.table()[["preloading", "n", "errors"]].values.tolist() == [["lazy", 0, 2], ["eager", 0, 2]]
    assert cmp.samples()["error"].str.contains("has a config.json but no weights").all()


# -- mistakes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stat:8", "unknown policy 'stat' (did you mean 'static'?)"),
        ("static:x", "size 'x' is not a whole number"),
        ("dynamic:8:soon", "max_wait 'soon' is not a time such as 5ms or 0.5s"),
        ("dynamic:16:infms", "max_wait 'infms' is not a time such as 5ms or 0.5s"),
        ("static:8:nan", "timeout 'nan' is not a time such as 5ms or 0.5s"),
        ("dynamic:8:5ms:big", "setting 'big' is neither a token budget (512tok) nor a length ratio (len1.5)"),
        ("none:4", "none takes no settings, got 1"),
        ("static:8:5ms:9", "static takes at most 2 settings, got 3"),
    ],
)
def test_a_bad_policy_name_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(wb.StrategyError) as raised:
        parse_policy(text)
    assert raised.value.message == f"batching {text!r}: {message}"
    assert "static:SIZE[:TIMEOUT]" in str(raised.value.hint)


def test_compare_refuses_bad_strategies_and_inputs_before_running(tiny: wb.Workbench, qa: wb.Chain) -> None:
    runs = len(tiny.runs())
    with pytest.raises(wb.StrategyError, match="unknown policy 'dynamc'"):
        wb.compare(qa, QUESTIONS, batching=["none", "dynamc:8"], progress=False)
    with pytest.raises(wb.StrategyError, match="'dynamic:16:5ms' is listed twice"):
        wb.compare(qa, QUESTIONS, batching=["dynamic", "dynamic:16:5ms"], progress=False)
    with pytest.raises(wb.StrategyError, match="unknown strategy 'lazzy' \\(did you mean 'lazy'\\?\\)"):
        wb.compare(qa, QUESTIONS, preloading=["eager", "lazzy"], progress=False)
    with pytest.raises(wb.StrategyError, match="not a policy"):
        wb.compare(qa, QUESTIONS, batching=[16], progress=False)  # type: ignore[list-item]
    with pytest.raises(wb.MissingInputError, match="needs input 'question'"):
        wb.compare(qa, [{"query": "hi"}], batching="none", progress=False)
    with pytest.raises(wb.WorkloadError, match="concurrency must be at least 1"):
        wb.compare(qa, QUESTIONS, batching="none", concurrency=0, progress=False)
    with pytest.raises(wb.StrategyError, match="repeats must be a whole number, not 2.5"):  # was a raw TypeError
        wb.compare(qa, QUESTIONS, batching="none", repeats=2.5, progress=False)  # type: ignore[arg-type]
    with pytest.raises(wb.WorkloadError, match="concurrency must be a whole number, not 2.5"):  # ran as 3
        wb.compare(qa, QUESTIONS, batching="none", concurrency=2.5, progress=False)  # type: ignore[arg-type]
    with pytest.raises(wb.WorkloadError, match="warmup must be a whole number, not True"):
        wb.compare(qa, QUESTIONS, batching="none", warmup=True, progress=False)
    assert len(tiny.runs()) == runs


@pytest.mark.parametrize("axis", ["batching", "preloading", "balance", "cache"])
def test_an_axis_given_neither_a_strategy_nor_a_list_of_them_says_which(qa: wb.Chain, axis: str) -> None:
    """batching=16 (for static:16, say) raised a bare TypeError: 'int' object is not iterable."""
    with pytest.raises(wb.StrategyError, match=f"^{axis}=16 is neither a ") as raised:
        wb.compare(qa, QUESTIONS, **{axis: 16}, progress=False)
    assert f"{axis}=[" in str(raised.value.hint)


def test_a_strategy_a_model_cannot_run_is_refused_before_any_pass(bench: wb.Workbench, tiny_path: Path) -> None:
    """Each was found only at its own first pass: the passes before it were run, then lost with the error (or, for a
    budget smaller than the model, every run of its passes failed and the table showed it as 0 requests/s)."""
    bench.load("tiny", tiny_path, device="cpu", replicas=2)  # two replicas sharing one copy of the weights
    chain = bench.chain(SPEC)
    refusals = [
        (wb.StrategyError, "continuous batching cannot run on replicas that share", {"batching": ["none", "continuous"]}),
        (wb.StrategyError, "weighs replica 2, but 'tiny' has 2 replicas", {"balance": ["round_robin", "weighted:1,0,3"]}),
        (wb.ModelLoadError, "more than the whole keep-warm budget of 1KiB", {"preloading": ["lazy", "keep_warm:1KiB"]}),
    ]
    for error, message, strategies in refusals:
        with pytest.raises(error, match=message):
            wb.compare(chain, QUESTIONS, repeats=1, warmup=0, progress=False, **strategies)  # type: ignore[arg-type]
    assert bench.runs() == [] and bench.registry.is_loaded("tiny")


def test_balance_policies_on_models_of_one_replica_are_refused(tiny: wb.Workbench, qa: wb.Chain) -> None:
    """They ran and were ranked against each other, though every policy sent every call to the one replica."""
    runs = len(tiny.runs())
    with pytest.raises(wb.StrategyError, match="'tiny' runs one replica, so every balance policy") as refused:
        wb.compare(qa, QUESTIONS, balance=["round_robin", "least_loaded"], repeats=1, progress=False)
    assert "replicas=2" in str(refused.value.hint)
    assert len(tiny.runs()) == runs


def test_a_pass_of_more_runs_than_traces_kept_is_refused_before_running(
    tiny: wb.Workbench, qa: wb.Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass's first runs lost their traces before it was measured: a KeyError after the whole pass."""
    monkeypatch.setattr(tiny.tracing.index, "max_traces", 3)  # the bound (10,000 runs' traces), made small
    runs = len(tiny.runs())
    inputs = [{"question": q} for q in ("one", "two", "three", "four")]
    with pytest.raises(wb.WorkloadError, match="4 inputs are more runs per pass than the 3 whose traces") as refused:
        wb.compare(qa, inputs, batching="none", repeats=1, progress=False)
    assert "at most 3 inputs" in refused.value.hint
    assert len(tiny.runs()) == runs
    wb.compare(qa, inputs[:3], batching="none", repeats=1, warmup=1, progress=False)  # three measured runs fit


@given(
    size=st.integers(1, 512),
    wait=st.sampled_from([0.0, 0.5, 5.0, 20.0, 1500.0]),
    tokens=st.one_of(st.none(), st.integers(1, 10_000)),
    ratio=st.one_of(st.none(), st.sampled_from([1.0, 1.25, 1.5, 3.0])),
)
def test_every_policy_name_parses_back_to_the_policy(
    size: int, wait: float, tokens: int | None, ratio: float | None
) -> None:
    for policy in (
        wb.StaticBatching(size, wait),
        wb.DynamicBatching(size, wait, max_batch_tokens=tokens, max_length_ratio=ratio),
        wb.ContinuousBatching(max_batch=size),
    ):
        assert parse_policy(policy.name) == policy


# -- the magic ----------------------------------------------------------------------------------


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch, tiny_path: Path) -> Iterator[InteractiveShell]:
    """A real shell with the extension loaded and a default workbench holding 'tiny' and the chain 'qa'."""
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "workbench")
    monkeypatch.setattr(workbench.bench, "_current", workbench.bench._current)
    bench = wb.set_current(wb.Workbench())
    bench.load("tiny", tiny_path, device="cpu")
    bench.chain(SPEC)
    try:
        yield ip
    finally:
        bench.close()
        ip.reset(new_session=False)


def _jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def test_compare_magic_parses_into_a_typed_command() -> None:
    command = parse_command("compare qa --inputs q.jsonl --batching none,static:8,dynamic:16:5ms --preload lazy,eager")
    assert command == CompareCommand(
        chain="qa",
        inputs="q.jsonl",
        batching=(command.batching[0], wb.StaticBatching(8), wb.DynamicBatching(16, 5)),  # type: ignore[index]
        preload=(wb.Lazy(), wb.Eager()),
    )
    assert isinstance(command.batching[0], wb.NoBatching)  # type: ignore[index]


def test_compare_magic_runs_shows_binds_and_saves(shell: InteractiveShell, tmp_path: Path) -> None:
    inputs = _jsonl(tmp_path / "questions.jsonl", QUESTIONS[:2])
    out = tmp_path / "result.csv"
    with capture_output() as captured:
        shell.run_line_magic(
            "autoglm", f"compare qa --inputs {inputs} --batching none,dynamic:4:5ms --repeats 1 --warmup 0 --save {out}"
        )
    assert "autoglm:" not in captured.stderr
    comparison = shell.user_ns["_autoglm_compare"]
    assert isinstance(comparison, wb.Comparison)
    assert comparison.table()["batching"].tolist() == ["none", "dynamic:4:5ms"]
    (page,) = [o.data["text/html"] for o in captured.outputs if "text/html" in o.data]
    assert ">dynamic:4:5ms</td>" in page
    assert f"saved to {out}" in captured.stdout
    assert pd.read_csv(out)["n"].tolist() == [2, 2]
    assert wb.current().engine.policy("tiny").name == "none"  # the policy it had before


def test_an_interrupted_compare_magic_binds_the_passes_it_finished(shell: InteractiveShell, tmp_path: Path) -> None:
    wb.current().chain(_interrupted_at_run(3))  # the first run of the second pass
    inputs = _jsonl(tmp_path / "questions.jsonl", QUESTIONS[:2])
    with capture_output() as captured, pytest.raises(wb.CompareInterrupted, match="after 1 of 2 passes"):
        shell.run_line_magic("autoglm", f"compare stopped --inputs {inputs} --batching none,dynamic:4:5ms --repeats 1 "
                                        "--warmup 0 --concurrency 1")
    assert "the passes that finished are kept in _autoglm_compare" in captured.stderr
    assert shell.user_ns["_autoglm_compare"].table()["n"].tolist() == [2, 0]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("compare qa", "compare: the following arguments are required: --inputs"),
        ("compare qa --inputs q.jsonl --batching none,stattic:8", "batching 'stattic:8': unknown policy 'stattic'"),
        ("compare qa --inputs q.jsonl --batching none,,static", "compare: --batching 'none,,static' has an empty item"),
        ("compare qa --inputs q.jsonl --concurrency 0", "compare: --concurrency must be at least 1, not 0"),
        ("compare qa --inputs q.jsonl --repeats many", "argument --repeats: invalid int value: 'many'"),
        ("compare qa --inputs q.jsonl --save out.xlsx", "compare: --save 'out.xlsx': the file must end in .csv"),
        # A file named '.csv' has no suffix: refused before the comparison ran, not after.
        ("compare qa --inputs q.jsonl --save .csv", "compare: --save '.csv': the file must end in .csv"),
        ("compare qa --inputs /nonexistent/q.jsonl", "cannot read inputs file '/nonexistent/q.jsonl'"),
        ("compare nope --inputs q.jsonl", "no chain named 'nope'"),
    ],
)
def test_a_bad_compare_line_prints_a_short_message(shell: InteractiveShell, line: str, expected: str) -> None:
    with capture_output() as captured:
        result = shell.run_cell(f"%autoglm {line}")
    assert result.error_in_exec is None
    first, *rest = captured.stderr.splitlines()
    assert first.startswith("autoglm: ") and expected in first
    assert all(r.startswith("hint: ") for r in rest) and len(rest) <= 1
    assert "Traceback" not in captured.stdout + captured.stderr


def test_parse_errors_are_parse_errors() -> None:
    with pytest.raises(ParseError, match="--warmup must be 0 or more"):
        parse_command("compare qa --inputs q.jsonl --warmup -1")
