"""Tracing: one trace per run with the right parentage, GenAI attributes, batch links, tables and plots."""

from __future__ import annotations

import _thread
import gc
import json
import re
import sys
import threading
import time
import unicodedata
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path
from textwrap import dedent

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags, set_span_in_context

import workbench as wb
from workbench.chains.runner import TRACE_PARENT
from workbench.tables import Readable
from workbench.tracing import attributes as attr
from workbench.tracing import openinference
from workbench.tracing.trace import COLUMNS

WAIT_S = 10  # a generous bound on how long an interrupt may take to arrive

FAN_SPEC = dedent(
    """\
    name: fan
    hops:
      - name: plan
        model: tiny
        prompt: "Question: {{ question }}\\nPlan:"
        max_new_tokens: 6
      - name: answer
        model: tiny
        prompt: "Answer: {{ question }}"
        max_new_tokens: 6
      - name: both
        model: tiny
        prompt: "{{ plan }} {{ answer }}"
        max_new_tokens: 6
      - name: stats
        call: workbench.demo:answer_stats
    """
)
QUESTIONS = ["What is the capital of France?", "How many hops?", "A chain", "Tokens in", "Latency", "Plan"]


@pytest.fixture(scope="module")
def fan_runs(tiny_bench: wb.Workbench) -> list[wb.Run]:
    """One run on its own, then six through map with four at a time: hops on pool threads, calls on the worker."""
    chain = tiny_bench.chain(FAN_SPEC)
    assert chain.graph() == {"plan": (), "answer": (), "both": ("answer", "plan"), "stats": ("plan", "answer")}
    return [chain.run(question=QUESTIONS[0]), *chain.map([{"question": q} for q in QUESTIONS], concurrency=4)]


def test_a_run_is_one_trace_of_chain_hop_and_model_spans(fan_runs: list[wb.Run]) -> None:
    for run in fan_runs:
        table = run.trace.table()
        assert set(table["context.trace_id"]) == {format(run.trace_id, "032x")}
        chains = table[table["name"] == "chain fan"]
        hops = table[table["name"].str.startswith("hop ")]
        calls = table[table["name"] == "text_completion tiny"]
        assert len(table) == len(chains) + len(hops) + len(calls)
        assert len(chains) == 1 and chains["parent_id"].isna().all()
        assert sorted(hops["hop"]) == ["answer", "both", "plan", "stats"]
        assert (hops["parent_id"] == chains["context.span_id"].iloc[0]).all()
        assert len(calls) == 3
        hop_ids = dict(zip(hops["hop"], hops["context.span_id"], strict=True))
        for _, call in calls.iterrows():
            assert call["parent_id"] == hop_ids[call["hop"]]
        assert list(table["depth"]) == [0 if n.startswith("chain") else 1 if n.startswith("hop") else 2
                                        for n in table["name"]]


def test_model_call_spans_carry_genai_attributes(tiny_bench: wb.Workbench, fan_runs: list[wb.Run]) -> None:
    run = fan_runs[0]
    calls = [s for s in run.trace.spans if s.name == "text_completion tiny"]
    assert len(calls) == 3
    tokenizer = tiny_bench.registry.get("tiny").tokenizer
    for span in calls:
        a = span.attributes
        assert span.kind == SpanKind.INTERNAL
        assert a["gen_ai.operation.name"] == "text_completion"
        assert a["gen_ai.provider.name"] == "transformers"
        assert a["gen_ai.request.model"] == "tiny"
        assert a["gen_ai.request.max_tokens"] == 6
        assert a["gen_ai.usage.input_tokens"] == len(tokenizer(a["input.value"]).input_ids)
        assert 1 <= a["gen_ai.usage.output_tokens"] <= 6
        assert list(a["gen_ai.response.finish_reasons"]) in (["stop"], ["length"])
        assert a["output.value"] == run.outputs[a["workbench.hop.name"]]
    assert run.trace.table().set_index("name").loc["chain fan", "span_kind"] == "CHAIN"


def test_spans_carry_openinference_attributes_phoenix_reads(tiny_bench: wb.Workbench, fan_runs: list[wb.Run]) -> None:
    run = fan_runs[0]
    source = tiny_bench.registry.get("tiny").source
    spans = {s.name: s for s in run.trace.spans if not s.name.startswith("text_completion")}
    root = spans["chain fan"].attributes
    assert root["openinference.span.kind"] == "CHAIN"
    assert root["input.mime_type"] == "application/json"
    assert json.loads(root["input.value"]) == {"question": QUESTIONS[0]}
    assert "session.id" not in root  # a run outside any session

    for span in (s for s in run.trace.spans if s.name == "text_completion tiny"):
        a = span.attributes
        assert a["openinference.span.kind"] == "LLM"
        assert a["llm.model_name"] == source  # the model itself, not only the workbench's alias for it
        assert (a["llm.system"], a["llm.provider"]) == ("transformers", "local")
        assert json.loads(a["llm.invocation_parameters"])["max_new_tokens"] == 6
        assert a["llm.token_count.prompt"] == a["gen_ai.usage.input_tokens"]
        assert a["llm.token_count.completion"] == a["gen_ai.usage.output_tokens"]
        assert a["llm.token_count.total"] == a["llm.token_count.prompt"] + a["llm.token_count.completion"]
        assert (a["input.mime_type"], a["output.mime_type"]) == ("text/plain", "text/plain")

    hop = spans["hop both"].attributes
    assert (hop["openinference.span.kind"], hop["input.mime_type"]) == ("CHAIN", "text/plain")
    assert hop["input.value"].startswith(run.outputs["plan"])  # the rendered prompt

    tool = spans["hop stats"].attributes
    assert tool["openinference.span.kind"] == "TOOL"
    assert tool["tool.name"] == "workbench.demo:answer_stats"
    assert tool["input.mime_type"] == tool["output.mime_type"] == "application/json"
    assert json.loads(tool["input.value"]) == {"plan": run.outputs["plan"], "answer": run.outputs["answer"]}
    assert json.loads(tool["output.value"]) == run.outputs["stats"]
    assert run.output == run.outputs["stats"] and json.loads(root["output.value"]) == run.output


def test_a_run_in_a_session_names_it_for_phoenix(tiny_bench: wb.Workbench) -> None:
    run = tiny_bench.chain(FAN_SPEC).run(question="q", session="phoenix-session")
    root = next(s for s in run.trace.spans if s.name == "chain fan")
    assert root.attributes["session.id"] == root.attributes["workbench.session.id"] == "phoenix-session"


def test_runs_and_engine_work_go_to_two_phoenix_projects(tiny_path: Path) -> None:
    with wb.Workbench(project_name="study") as bench:
        bench.load("tiny", tiny_path, device="cpu")
        run = bench.chain(FAN_SPEC).run(question="q")
        direct = bench.generate("tiny", "hello", max_new_tokens=2)
        spans = bench.traces().spans

    def project(span: ReadableSpan) -> object:
        return span.resource.attributes["openinference.project.name"]

    assert {project(s) for s in run.trace.spans} == {"study"}
    (asked,) = [s for s in spans if s.name == "text_completion tiny" and s.parent is None]
    assert project(asked) == "study" and asked.attributes["output.value"] == direct.text  # a request of its own
    engine = [s for s in spans if s.name in ("load tiny", "batch tiny")]
    assert {project(s) for s in engine} == {"study-engine"}
    assert {s.name for s in engine} == {"load tiny", "batch tiny"}
    for span in engine:  # each a trace of its own in the engine project, with a kind and a status Phoenix shows
        assert span.parent is None
        assert span.attributes["openinference.span.kind"] == ("LLM" if span.name == "batch tiny" else "CHAIN")
        assert span.status.status_code is StatusCode.OK


def test_each_batch_span_links_to_the_requests_it_served(tiny_bench: wb.Workbench, fan_runs: list[wb.Run]) -> None:
    batches = [s for s in tiny_bench.traces().spans if s.name == "batch tiny"]
    served = {link.context.span_id: batch for batch in batches for link in batch.links}
    for run in fan_runs:
        calls = [s for s in run.trace.spans if s.name == "text_completion tiny"]
        assert len(calls) == 3
        for call in calls:
            batch = served[call.context.span_id]
            assert batch.attributes["workbench.batch.id"] == call.attributes["workbench.batch.id"]
            assert batch.attributes["workbench.batch.size"] == len(batch.links)
            assert batch.start_time >= call.start_time and batch.end_time <= call.end_time


def test_table_has_the_documented_columns_and_types(fan_runs: list[wb.Run]) -> None:
    run = fan_runs[0]
    table = run.trace.table()
    assert list(table.columns[: len(COLUMNS)]) == COLUMNS
    assert len(table) == len(run.trace.spans) == table["context.span_id"].nunique()
    for column in ("start_time", "end_time"):
        assert str(table[column].dtype) == "datetime64[ns, UTC]"
    for column in ("offset_ms", "duration_ms", "self_ms", "gc_ms", "queue_ms", "ttft_ms", "decode_ms", "tpot_ms"):
        assert table[column].dtype == "float64", column
    for column in ("tokens_in", "tokens_out", "batch_size"):
        assert table[column].dtype == "Int64", column
    assert pd.api.types.is_integer_dtype(table["depth"])
    assert (table["offset_ms"] >= 0).all() and table["offset_ms"].iloc[0] == 0
    assert (table["self_ms"] >= 0).all()
    assert (table["self_ms"] <= table["duration_ms"]).all()
    assert ((table["gc_ms"] >= 0) & (table["gc_ms"] <= table["duration_ms"])).all()
    assert (table["end_time"] >= table["start_time"]).all()

    calls = table[table["name"] == "text_completion tiny"]
    assert calls[["queue_ms", "ttft_ms", "decode_ms", "tokens_in", "tokens_out", "batch_size"]].notna().all().all()
    assert (calls["ttft_ms"] >= calls["queue_ms"]).all()
    several = calls[calls["tokens_out"] > 1]
    assert (several["tpot_ms"] - several["decode_ms"] / (several["tokens_out"] - 1)).abs().max() < 1e-9
    assert table.loc[table["name"] == "chain fan", "tokens_out"].isna().all()


def test_summary_has_a_row_per_hop_and_the_chain(fan_runs: list[wb.Run]) -> None:
    run = fan_runs[0]
    summary = run.trace.summary()
    assert set(summary.index) == {"plan", "answer", "both", "stats", "(chain)"}
    assert (summary["count"] == 1).all()
    assert (summary["errors"] == 0).all()
    table = run.trace.table()
    for hop in ("plan", "answer", "both"):
        call = table[(table["name"] == "text_completion tiny") & (table["hop"] == hop)]
        assert summary.loc[hop, "tokens_out"] == call["tokens_out"].sum()
    assert summary.loc["stats", "tokens_out"] == 0
    assert summary.loc["(chain)", "tokens_out"] == table["tokens_out"].sum()
    chain_ms = table.loc[table["name"] == "chain fan", "duration_ms"].iloc[0]
    assert summary.loc["(chain)", "p50_ms"] == pytest.approx(chain_ms)

    merged = wb.Trace([s for r in fan_runs[1:] for s in r.trace.spans]).summary()
    assert (merged["count"] == len(fan_runs) - 1).all()  # six runs of every hop


def test_the_chain_row_of_a_summary_counts_only_the_model_calls_of_its_chain_runs(tiny_path: Path) -> None:
    """bench.traces().summary() put the tokens of bench.generate calls, made outside any chain, in the '(chain)' row:
    one run of 3 tokens beside three direct calls of 2 read 9 tokens, and three times the chain's tokens/s."""
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        for _ in range(3):
            bench.generate("tiny", "hello there", max_new_tokens=2)
        run = bench.chain({"name": "one", "hops": [{"name": "answer", "model": "tiny", "prompt": "Q: {{ q }}\nA:",
                                                    "max_new_tokens": 3}]}).run(q="a")
        everything, own = bench.traces().summary(), run.trace.summary()
    assert len(bench.traces().table().query("name == 'text_completion tiny'")) == 4
    assert everything.loc["(chain)", "tokens_out"] == own.loc["(chain)", "tokens_out"] == run.trace.table()[
        "tokens_out"].sum()
    assert everything.loc["(chain)", "tokens_per_s"] == pytest.approx(own.loc["(chain)", "tokens_per_s"])
    assert everything.loc["(chain)", "ttft_p50_ms"] == pytest.approx(own.loc["(chain)", "ttft_p50_ms"])


def test_a_chain_with_no_model_calls_has_a_summary() -> None:
    """A chain of plain calls only: the (chain) row's model calls were selected with an empty list, which picked no
    columns, and summary() raised KeyError: 'tokens_out' (the CLI printing a failed run's trace hit it)."""
    with wb.Workbench(store=wb.InMemoryContextStore(), allow_modules=["json"]) as bench:
        run = bench.chain({"name": "parse", "hops": [{"name": "decode", "call": "json:loads"}]}).run(s="[1, 2]")
    summary = run.trace.summary()
    assert list(summary.index) == ["decode", "(chain)"]
    assert summary.loc["(chain)", "count"] == 1
    assert summary.loc["(chain)", "tokens_out"] == 0
    assert pd.isna(summary.loc["(chain)", "ttft_p50_ms"])


ONE_DECIMAL = r"\d{1,3}(,\d{3})*\.\d"


def test_the_summary_reads_at_a_glance(fan_runs: list[wb.Run]) -> None:
    summary = wb.Trace([s for r in fan_runs for s in r.trace.spans]).summary()
    shown = Readable(summary)
    assert shown.columns[0] == "hop" and shown.column("hop") == list(summary.index)
    for column in ("mean_ms", "p50_ms", "p95_ms", "ttft_p50_ms", "tokens_per_s"):
        assert all(re.fullmatch(ONE_DECIMAL, cell) or cell == "—" for cell in shown.column(column)), column
    assert shown.column("ttft_p50_ms")[shown.column("hop").index("stats")] == "—"  # a Python hop has no TTFT
    assert shown.column("count") == ["7"] * len(summary)
    page = repr(shown) + shown.to_html()
    assert "e+" not in page and "nan" not in page.lower()


def test_span_names_are_left_aligned_so_the_depth_markers_line_up(fan_runs: list[wb.Run]) -> None:
    trace = fan_runs[0].trace
    shown = Readable(trace.compact(indent="· "))
    depths = trace.table()["depth"].tolist()
    lines = repr(shown).splitlines()
    assert lines[0].startswith("name ")
    for line, depth in zip(lines[1:], depths, strict=True):
        assert line.startswith("· " * depth) and line[2 * depth] not in "· ", line  # the name starts after its marks
    page = shown.to_html()
    assert re.search(r'<td style="text-align: left[^"]*">· · text_completion tiny</td>', page)
    assert re.search(rf'<td style="text-align: right[^"]*">{ONE_DECIMAL}</td>', page)  # figures right-aligned


def test_figures_read_as_people_write_them(fan_runs: list[wb.Run]) -> None:
    table = fan_runs[0].trace.table().head(3)
    # The values a long run or a gap in a column gives: ms in the thousands, counts widened to floats.
    frame = table[["name", "start_time", "duration_ms", "tokens_out"]].assign(
        duration_ms=[1290.4567, 0.04, float("nan")],
        tokens_out=[158016.0, float("nan"), 3.0],
        temperature=[0.000123, 2.5, 1234.6],
        padding_fraction=[0.0, 0.125, 1.0],
        load_s=[0.0371234, 12.0, float("nan")],
    )
    shown = Readable(frame)
    assert shown.column("duration_ms") == ["1,290.5", "0.0", "—"]  # not 1.29e+03
    assert shown.column("tokens_out") == ["158,016", "—", "3"]  # not 158016.0
    assert shown.column("temperature") == ["0.000123", "2.5", "1,235"]
    assert shown.column("padding_fraction") == ["0.0%", "12.5%", "100.0%"]
    assert shown.column("load_s") == ["0.037", "12.000", "—"]
    # A time of day, on this machine's clock, to the millisecond.
    started = table["start_time"].iloc[0].floor("us").to_pydatetime().astimezone()
    assert shown.column("start_time")[0] == started.strftime("%H:%M:%S.%f")[:-3]


def test_a_traces_html_shows_its_span_count_as_text(fan_runs: list[wb.Run]) -> None:
    """The line above a trace's table in a notebook was '<p><Trace 8 spans in 1 trace(s)></p>' unescaped: the browser
    read '<Trace ...>' as an unknown tag, so the count never showed."""
    texts: list[str] = []
    parser = HTMLParser()
    parser.handle_data = texts.append  # type: ignore[method-assign]
    parser.feed(fan_runs[0].trace._repr_html_())
    assert texts[0] == "<Trace 8 spans in 1 trace(s)>"


def test_a_trace_of_many_runs_shows_its_first_and_last_rows_not_every_span(bench: wb.Workbench) -> None:
    """Every span was a row of HTML: bench.traces() after a 10,000-run map put 6.4 MB into the notebook."""
    chain = bench.chain({"name": "many", "hops": [{"name": "say", "call": "workbench.demo:canned_answer"}]})
    runs = chain.map([{"question": str(i)} for i in range(150)])
    trace = bench.traces()
    assert len(trace) == 300  # a chain span and a hop span per run
    page = trace._repr_html_()
    assert page.count("<tr>") == 1 + 200 + 1  # the header, the first and last 100 spans, and the line between
    assert "⋮ 100 more rows, not shown: the DataFrame holds all 300" in page
    table = trace.table()
    assert f"<td style=\"text-align: left; white-space: nowrap\">{table['name'].iloc[-1]}</td>" in page
    text = repr(span_table := Readable(trace.compact()))
    assert len(text.splitlines()) == 1 + 200 + 1 and len(span_table.column("name")) == 300
    assert len(runs) == 150 and len(table) == 300  # the DataFrame keeps every row


def test_waterfall_draws_one_bar_row_per_span(fan_runs: list[wb.Run]) -> None:
    run = fan_runs[0]
    figure = run.trace.waterfall()
    assert isinstance(figure, Figure)
    (axes,) = figure.axes
    labels = [label.get_text().strip() for label in axes.get_yticklabels()]
    assert labels == [name for name in run.trace.table()["name"]]
    assert len(labels) == len(run.trace.spans) == 8  # chain, four hops, three model calls


def test_a_waterfall_of_a_map_folds_the_spans_that_repeat_into_a_row_each(fan_runs: list[wb.Run]) -> None:
    """bench.traces().waterfall() after a map drew a row per span, up to 400: a PNG 12,900 px tall, measured after
    a map of 70 runs of a three-hop chain, that no notebook shows readably."""
    everything = wb.Trace(span for run in fan_runs for span in run.trace.spans)
    figure = everything.waterfall()
    (axes,) = figure.axes
    labels = [label.get_text() for label in axes.get_yticklabels()]
    assert labels[0] == "chain fan ×7"
    assert sorted(labels[1:]) == sorted(
        [f"  hop {hop} ×7" for hop in ("plan", "answer", "both", "stats")] + ["    text_completion tiny ×7"] * 3)
    for above, label in zip(labels, labels[1:], strict=False):  # a model call's row is under its hop's
        if "text_completion" in label:
            assert above.startswith("  hop ") and "stats" not in above
    assert len(axes.collections[0].get_paths()) == 7  # the chain row: a bar per run
    assert axes.get_title(loc="left") == "chain fan: 56 spans in 8 rows (×n: spans of one name under one path, folded)"
    height = Image.open(BytesIO(figure._repr_png_())).size[1]
    assert height < Image.open(BytesIO(fan_runs[0].trace.waterfall()._repr_png_())).size[1] * 2  # not 56 rows tall


def test_a_waterfall_draws_a_chain_name_with_dollar_signs_as_written(bench: wb.Workbench) -> None:
    """A chain named 'cost $5 vs $6' drew '5 vs ' as matplotlib math, and one named 'a $\\frac{$ b' failed the PNG
    with matplotlib's 'ParseSyntaxException: Expected \\frac{num}{den}': the notebook showed a traceback."""
    for name in ("cost $5 vs $6", "a $\\frac{$ b"):
        chain = bench.chain({"name": name, "hops": [{"name": "say", "call": "workbench.demo:canned_answer"}]})
        figure = chain.run(question="hi").trace.waterfall()
        assert Image.open(BytesIO(figure._repr_png_())).size[0] > 0
        (axes,) = figure.axes
        assert [label.get_text() for label in axes.get_yticklabels()] == [f"chain {name}", "  hop say"]
        assert axes.get_title(loc="left") == f"chain {name}: 2 spans"


def test_a_waterfall_draws_at_most_max_rows_and_says_how_many_it_left_out(bench: wb.Workbench) -> None:
    """Spans that do not repeat cannot fold: a chain of 60 Python hops still draws 40 rows, titled as the first."""
    hops = [{"name": f"step{i:02}", "call": "workbench.demo:canned_answer"} for i in range(60)]
    run = bench.chain({"name": "long", "hops": hops}).run(question="hi")
    (axes,) = run.trace.waterfall().axes
    labels = [label.get_text() for label in axes.get_yticklabels()]
    assert len(labels) == 40 and labels[0] == "chain long" and all("×" not in label for label in labels)
    assert axes.get_title(loc="left") == "chain long: 61 spans; the first 40 rows shown"
    (axes,) = run.trace.waterfall(max_rows=100).axes
    assert len(axes.get_yticklabels()) == 61
    assert axes.get_title(loc="left") == "chain long: 61 spans"


def nap(ms: str) -> str:
    time.sleep(int(ms) / 1000)
    return ms


def test_a_folded_waterfall_row_is_labelled_with_the_median_of_its_spans(bench: wb.Workbench) -> None:
    """Of an even count it read the upper middle span: 'p50 30 ms' for naps of 10, 20, 30 and 400 ms (median 25)."""
    chain = bench.chain({"name": "naps", "hops": [{"name": "nap", "call": nap}]})
    trace = wb.Trace(span for ms in ("10", "20", "30", "400") for span in chain.run(ms=ms).trace.spans)
    (axes,) = trace.waterfall(max_rows=1).axes  # 8 spans over one row: folded
    table = trace.table()
    median = table.loc[table["name"] == "chain naps", "duration_ms"].median()
    assert [text.get_text() for text in axes.texts] == [f" p50 {median:.1f} ms"]


@pytest.mark.parametrize("max_rows", [0, -1, 2.5, True, "40"])
def test_a_waterfall_of_no_rows_or_a_negative_count_is_refused(bench: wb.Workbench, max_rows: object) -> None:
    """max_rows=0 drew 'empty trace' for a trace of spans; -1 left out the last row and said 'the first 1 rows'."""
    trace = bench.chain({"name": "one", "hops": [{"name": "say", "call": "workbench.demo:canned_answer"}]}).run(
        question="hi").trace
    with pytest.raises(wb.SettingsError, match=f"max_rows must be a whole number of at least 1, not {max_rows!r}"):
        trace.waterfall(max_rows=max_rows)  # type: ignore[arg-type]
    (axes,) = trace.waterfall(max_rows=np.int64(1)).axes  # numpy's whole numbers are whole numbers
    assert [label.get_text() for label in axes.get_yticklabels()] == ["chain one"]
    assert axes.get_title(loc="left") == "chain one: 2 spans; the first 1 rows shown"


def test_workbench_traces_hold_every_run_load_and_batch(tiny_bench: wb.Workbench, fan_runs: list[wb.Run]) -> None:
    everything = tiny_bench.traces()
    trace_ids = {s.context.trace_id for s in everything.spans}
    assert {r.trace_id for r in fan_runs} <= trace_ids
    names = [s.name for s in everything.spans]
    assert names.count("chain fan") >= len(fan_runs)
    assert names.count("text_completion tiny") >= 3 * len(fan_runs)

    (load,) = [s for s in everything.spans if s.name == "load tiny"]
    loaded = tiny_bench.registry.get("tiny")
    assert load.attributes["workbench.model.name"] == "tiny"
    assert load.attributes["workbench.model.source"] == loaded.source
    assert load.attributes["workbench.model.device"] == "cpu"
    assert load.attributes["workbench.model.dtype"] == "float32"
    assert load.attributes["workbench.model.params"] == loaded.params
    assert load.attributes["workbench.model.memory_bytes"] == loaded.memory_bytes
    assert load.status.is_ok


def test_the_engines_traces_never_push_a_runs_trace_out(bench: wb.Workbench, tiny_path: Path) -> None:
    """Each batch is a trace of the engine's: a map of thousands of runs made as many, and the first runs' traces went."""
    bench.load("tiny", tiny_path, device="cpu")
    bench.tracing.index.max_traces = 4  # the bound, made small: 10,000 runs' traces (and as many of the engine's)
    chain = bench.chain({"name": "one", "hops": [{"name": "a", "model": "tiny", "prompt": "{{ q }}",
                                                  "max_new_tokens": 1}]})
    runs = [chain.run(q=str(i)) for i in range(6)]
    assert [len(run.trace) for run in runs] == [0, 0, 3, 3, 3, 3]  # chain, hop, request: the newest four runs kept
    everything = bench.traces().spans
    assert sum(s.name == "chain one" for s in everything) == 4
    assert sum(s.name.startswith("batch ") for s in everything) == 4  # the engine's own, bounded alike


@pytest.mark.parametrize("value", [
    {"question": "What is the capital of France?"},
    {"plan_words": 3, "answer_words": 0, "ratio": 0.5, "ok": True, "none": None, "nan": float("nan")},
    {"text": 'quotes " and \\ and \n, \u2028, é, 日本, \udcff'},  # escapes, non-ASCII, a lone surrogate
    {"big": 10**40, "neg": -1.5e300},
    {"zeros": "\x00" * 3000},  # 3000 characters that JSON writes as 18000: past the preview
    {"edge": "x" * (openinference.PREVIEW_CHARS - 4)},
    {},
])
def test_a_small_flat_value_is_shown_as_the_bounded_walk_shows_it(
    value: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small flat mappings (a chain's inputs, a Python hop's counts) are written by the C encoder at once, 37 us a
    chain cheaper than the walk that bounds big values; what a span shows is the same text either way."""
    assert openinference._small_flat(value)
    fast = openinference.input_value(value)
    monkeypatch.setattr(openinference, "_small_flat", lambda _: False)
    assert fast == openinference.input_value(value)


@pytest.mark.parametrize("value", [{"mean": float("nan")}, [1.0, float("inf")], {"deep": [{"x": -float("inf")}]}])
def test_a_value_holding_nan_or_infinity_is_shown_as_text_not_as_json_no_parser_reads(value: object) -> None:
    shown = openinference.output_value(value)
    assert shown[attr.OUTPUT_MIME_TYPE] == attr.MIME_TEXT
    assert any(word in shown[attr.OUTPUT_VALUE] for word in ("nan", "inf"))
    finite = openinference.output_value({"mean": 0.5, "items": [1.0, 2.0]})
    assert finite[attr.OUTPUT_MIME_TYPE] == attr.MIME_JSON
    assert json.loads(finite[attr.OUTPUT_VALUE], parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == {
        "mean": 0.5, "items": [1.0, 2.0]}


def test_a_hop_that_raises_with_a_huge_message_leaves_a_bounded_span(bench: wb.Workbench) -> None:
    """A Python hop that raised with its 10 MB input in the message (ValueError(f"bad: {text}")) left the message whole
    in its span three times, status, exception.message and exception.stacktrace: 30 MB in one span, kept in the
    workbench's index and sent whole to every exporter."""
    text = "word " * 2_000_000

    def check(q: str) -> str:
        raise ValueError(f"bad value: {q}")

    with pytest.raises(wb.HopFailed) as failure:
        bench.chain({"name": "big", "hops": [{"name": "check", "call": check}]}).run(q=text)
    assert str(failure.value.cause) == f"bad value: {text}"  # the error itself keeps it whole
    (span,) = [s for s in failure.value.run.trace.spans if s.name == "hop check"]
    assert span.status.description.startswith("ValueError: bad value: word word")
    assert span.status.description.endswith(f"({len(text) + 11 + 12 - 2000:,} more characters)")
    (event,) = [event for event in span.events if event.name == "exception"]
    message, stacktrace = event.attributes["exception.message"], event.attributes["exception.stacktrace"]
    assert message.startswith("bad value: word") and len(message) < 2100
    assert "in check" in stacktrace and "ValueError: bad value: word" in stacktrace and len(stacktrace) < 10_000


def test_failed_load_leaves_an_error_span(bench: wb.Workbench, tiny_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(wb.ModelLoadError):
        bench.load("broken", broken, device="cpu")
    (load,) = [s for s in bench.traces().spans if s.name == "load broken"]
    assert load.status.status_code.name == "ERROR"


def test_otlp_without_the_exporter_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail exactly as it does when the package is not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(wb.WorkbenchError, match="OTLP export needs the exporter package") as info:
        wb.Workbench(otlp_endpoint="http://127.0.0.1:4318")
    assert "pip install 'autoglm-workbench[otlp]'" in str(info.value)


def test_a_garbage_collection_inside_a_span_shows_as_its_gc_ms(tmp_path: Path) -> None:
    with wb.Workbench(data_dir=tmp_path, allow_modules=["gc"]) as bench:
        # A Python hop that runs a full collection (the builtin gc.collect, imported by dotted path once allowed).
        chain = bench.chain({"name": "g", "hops": [{"name": "collect", "call": "gc:collect"},
                                                   {"name": "after", "call": "workbench.demo:canned_answer"}]})
        run = chain.run(question="q")
    table = run.trace.table().set_index("name")
    hop = table.loc["hop collect"]
    full = wb.gc_pauses()
    full = full[(full["generation"] == 2) & (full["start_time"] >= hop["start_time"])
                & (full["start_time"] <= hop["end_time"])]
    assert len(full) == 1  # the log saw the collection the hop ran, inside the hop's span
    assert full["duration_ms"].iloc[0] <= hop["gc_ms"] <= hop["duration_ms"]
    assert table.loc["chain g", "gc_ms"] >= hop["gc_ms"]  # the run's root span was open throughout
    assert list(full.columns) == ["start_time", "duration_ms", "generation", "collected", "uncollectable", "thread"]


def ctrl_c_during_collections() -> list[float]:
    """Have a timer press Ctrl-C while this (the main) thread collects garbage; when each interrupt was heard."""
    timer = threading.Timer(0.01, _thread.interrupt_main)
    armed, got = False, []
    started = time.monotonic()
    while True:  # an interrupt can be raised at any bytecode, the loop's own jumps too: all of it sits in the try
        try:
            while True:
                if not armed:
                    armed = True
                    timer.start()
                now = time.monotonic()
                if got and now > got[0] + 0.1 or now > started + WAIT_S:
                    timer.join()
                    return got  # heard it (and listened a little longer for a second one), or never will
                if now < started + 0.3 and not got:
                    gc.collect()  # most of the main thread's time is inside a collection
                sum(range(10_000))  # Python outside any collection, where an interrupt is raised
        except KeyboardInterrupt:
            got.append(time.monotonic())


def test_a_ctrl_c_during_a_garbage_collection_still_interrupts(ctrl_c_raises: None) -> None:
    # The gc-pause log runs Python inside every collection, and Python handles a pending Ctrl-C
    # there, where gc can only drop the KeyboardInterrupt: a stop button pressed during a
    # collection in the main thread went unheard (a chain.map test saw it once in CI).
    from workbench.tracing import gcpauses

    gcpauses.install()
    saved = list(gc.callbacks)
    gc.callbacks[:] = [gcpauses._callback]  # only the workbench's callback: another could drop it too
    # Garbage earlier tests left (a server's objects in a WeakKeyDictionary, say) runs weakref callbacks when
    # collected, and Python code there can drop a Ctrl-C just the same: collect it first, so the collections
    # measured below run the workbench's callback and no one else's Python.
    gc.collect()
    gc.collect()
    junk = [[i] for i in range(200_000)]  # so that a collection takes a while, and a Ctrl-C lands inside one
    try:
        heard = [len(ctrl_c_during_collections()) for _ in range(5)]
    finally:
        gc.callbacks[:] = saved
        del junk
    assert heard == [1] * 5  # each Ctrl-C heard once: none lost, none doubled


def test_a_collection_deep_in_a_recursion_prints_no_error_from_the_pause_log() -> None:
    # A hop's deeply nested output walked to the recursion limit (its repr, its preview) allocates at every level, so
    # collections start there, with no frame left for the log's callback: gc printed "Exception ignored in garbage
    # collection callback", then failed to print even that (a CI run failed on it, through pytest's unraisable hook).
    from workbench.tracing import gcpauses

    gcpauses.install()
    seen: list[BaseException | None] = []
    saved_hook, saved_threshold = sys.unraisablehook, gc.get_threshold()

    def walk(depth: int) -> int:
        junk = [[] for _ in range(3)]  # allocations: a collection may start at any depth
        return walk(depth + 1) + len(junk)

    sys.unraisablehook = lambda unraisable: seen.append(unraisable.exc_value)
    gc.set_threshold(1)  # a collection at nearly every allocation
    try:
        for _ in range(10):
            with pytest.raises(RecursionError):
                walk(0)
    finally:
        gc.set_threshold(*saved_threshold)
        sys.unraisablehook = saved_hook
    assert seen == []
    last = gcpauses._pauses[-1] if gcpauses._pauses else None
    gc.collect()
    assert gcpauses._pauses[-1] != last and gcpauses._pauses[-1][2] == 2  # and the log goes on logging


def test_runs_that_keep_joining_one_trace_keep_its_newest_spans_not_every_span(bench: wb.Workbench) -> None:
    """The index bounded traces, not spans: a client that sent one traceparent (or envelope trace_id) with every
    request put every run in one trace, which grew for as long as the server ran."""
    bench.tracing.index.max_spans_per_trace = 6  # the bound, made small: three runs of a one-hop chain
    caller = SpanContext(0xAB << 96, 0xCD, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    chain = bench.chain({"name": "echo", "hops": [{"name": "say", "call": "workbench.demo:canned_answer"}]})
    token = TRACE_PARENT.set(set_span_in_context(NonRecordingSpan(caller), Context()))
    try:
        runs = [chain.run(question=str(i)) for i in range(5)]
    finally:
        TRACE_PARENT.reset(token)
    assert {run.trace_id for run in runs} == {caller.trace_id}
    assert len(bench.tracing.index.spans(caller.trace_id)) == 6
    assert [len(run.trace) for run in runs] == [0, 0, 2, 2, 2]  # chain and hop: the newest runs are whole
    assert len(bench.traces()) == 6


def test_text_tables_line_up_on_a_terminal_with_chinese_and_accented_text() -> None:
    """Columns were padded by characters, and a Chinese character takes two terminal columns: every column after a
    Chinese cell stood out of line. Widths are now terminal columns (two for wide characters, none for combining)."""
    frame = pd.DataFrame({"hop": ["plan", "回答问题", "re\u0301sume\u0301"], "output": ["ok", "巴黎是法国的首都", "fine"],
                          "duration_ms": [1.5, 12.25, 100.0]})
    lines = repr(Readable(frame)).splitlines()

    def width(text: str) -> int:  # terminal columns, as wcwidth counts them for these characters
        return sum(2 if unicodedata.east_asian_width(c) == "W" else 0 if unicodedata.combining(c) else 1 for c in text)

    def columns_before(line: str, marker: str) -> int:
        return width(line[: line.index(marker)])

    assert [columns_before(line, cell) for line, cell in zip(lines[1:], ["ok", "巴黎", "fine"])] == [10, 10, 10]
    assert {width(line) for line in lines} == {width(lines[0])}  # the figures end in one column, on every line


def test_a_wall_clock_step_mid_run_leaves_every_duration_true(bench: wb.Workbench,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Spans were stamped with time.time_ns(): the wall clock set back an hour while a hop ran (NTP stepping it, a
    # laptop waking) gave the chain and the hop durations of minus an hour in every table.
    real_ns, real_s = time.time_ns, time.time
    hour_ns = 3600 * 10**9

    def set_back(question: str) -> str:
        monkeypatch.setattr(time, "time_ns", lambda: real_ns() - hour_ns)  # as the system clock then reads
        monkeypatch.setattr(time, "time", lambda: real_s() - 3600.0)
        time.sleep(0.05)
        return question

    run = bench.chain({"name": "stepped", "hops": [{"name": "nap", "call": set_back}]}).run(question="hi")
    table = run.trace.table().set_index("name")
    for name in ("chain stepped", "hop nap"):
        assert 40 <= table.loc[name, "duration_ms"] < 10_000, name
    assert table.loc["chain stepped", "duration_ms"] == pytest.approx(run.duration_ms, abs=50)


def test_a_run_whose_spans_the_index_dropped_says_so_in_the_trace_viewer(bench: wb.Workbench) -> None:
    """A map of more runs than the index keeps traces of: the viewer showed an early run as "0 spans in 0 traces",
    as if it had done nothing, and a batch's view left the dropped runs out without a word."""
    from workbench.fronts.notebook.widgets import TraceViewer

    bench.tracing.index.max_traces = 3  # the bound, made small: 10,000 runs' traces
    chain = bench.chain({"name": "echo", "hops": [{"name": "say", "call": "workbench.demo:canned_answer"}]})
    runs = [chain.run(question=str(i)) for i in range(5)]
    dropped = TraceViewer(runs[0]).title
    assert dropped.startswith("0 spans in 0 traces: this run's spans were dropped from the workbench's span index, "
                              "which keeps the traces of the latest 3 runs")
    assert all(way in dropped for way in ("bench.tracing.index.max_traces", "AUTOGLM_MAX_TRACES", "otlp_endpoint"))
    assert TraceViewer(runs).title.startswith("6 spans in 3 traces: the spans of 2 runs were dropped")
    assert TraceViewer(runs[-1]).title == "2 spans in 1 trace"  # a kept run: nothing to explain
    assert TraceViewer(runs[-1].trace).title == "2 spans in 1 trace"
    # The run's own trace says it too: its repr, its HTML view and its (empty) waterfall.
    assert repr(runs[0].trace).startswith("<Trace 0 spans in 0 trace(s): this run's spans were dropped from the "
                                          "workbench's span index")
    assert "this run&#x27;s spans were dropped" in runs[0].trace._repr_html_()
    title = runs[0].trace.waterfall().axes[0].get_title()
    assert title.startswith("empty trace: this run's spans were dropped") and "AUTOGLM_MAX_TRACES" in title
    assert runs[-1].trace.note is None and repr(runs[-1].trace) == "<Trace 2 spans in 1 trace(s)>"


def test_a_run_pushed_out_of_a_trace_many_runs_share_says_its_spans_were_dropped(bench: wb.Workbench) -> None:
    """Runs joining one caller's trace keep its newest spans: an early run's view said "0 spans in 0 traces"."""
    from workbench.fronts.notebook.widgets import TraceViewer

    bench.tracing.index.max_spans_per_trace = 4  # two runs of a one-hop chain
    caller = SpanContext(0xAB << 96, 0xCD, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    chain = bench.chain({"name": "echo", "hops": [{"name": "say", "call": "workbench.demo:canned_answer"}]})
    token = TRACE_PARENT.set(set_span_in_context(NonRecordingSpan(caller), Context()))
    try:
        runs = [chain.run(question=str(i)) for i in range(3)]
    finally:
        TRACE_PARENT.reset(token)
    assert "this run's spans were dropped" in TraceViewer(runs[0]).title
    assert TraceViewer(runs).title.startswith("4 spans in 1 trace: the spans of 1 run were dropped")


def test_the_number_of_runs_whose_traces_are_kept_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The index kept 10,000 runs' traces, and only setting an attribute of a running workbench could change that."""
    from workbench.tracing.provider import SpanIndex

    monkeypatch.setenv("AUTOGLM_MAX_TRACES", "50000")
    assert SpanIndex().max_traces == 50_000
    monkeypatch.setenv("AUTOGLM_MAX_TRACES", "lots")
    with pytest.raises(wb.SettingsError, match=r"AUTOGLM_MAX_TRACES='lots' is not a whole number of at least 1"):
        SpanIndex()
    monkeypatch.delenv("AUTOGLM_MAX_TRACES")
    assert SpanIndex().max_traces == 10_000


def test_the_trace_viewer_sends_an_infinite_attribute_as_json_the_browser_reads(bench: wb.Workbench) -> None:
    """The viewer turned NaN into None but sent an infinity as it was: Python writes it as ``Infinity``, which the
    browser's JSON.parse refuses (the kernel warned that the message was not JSON and sent it cleaned)."""
    from workbench.fronts.notebook.widgets import TraceViewer

    with bench.tracing.span("score", attributes={"best": float("inf"), "worst": np.float64("-inf"),
                                                 "range": (0.5, float("inf")), "none": float("nan")}):
        pass
    (span,) = TraceViewer(bench.traces()).spans
    json.dumps(span, allow_nan=False)  # as the kernel sends a widget's state
    assert {key: span["attributes"][key] for key in ("best", "worst", "range", "none")} == {
        "best": "inf", "worst": "-inf", "range": [0.5, "inf"], "none": None}
