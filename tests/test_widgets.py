"""The widgets' Python side: traits, button handlers and magics, with the real tiny model and no browser."""

from __future__ import annotations

import html
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import workbench as wb
from helpers import QA_SPEC, eventually
import workbench.bench
from workbench.demo import DEMO_SPEC
from workbench.models.devices import available_devices
from workbench.fronts.notebook.parsers import BuilderCommand, ModelsCommand, TraceCommand, parse_command
from workbench.fronts.notebook.widgets import ChainBuilder, ComparisonDashboard, ModelManager, TraceViewer
from workbench.tables import Readable
from workbench.tracing import attributes as attr

REPO = Path(__file__).resolve().parents[1]
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
SHORT_SPEC = {
    "name": "short",
    "hops": [{"name": "answer", "model": "tiny", "prompt": "Question: {{ question }}\nAnswer:", "max_new_tokens": 4}],
}

# A Python hop the tests hold open: the chain builder's run must return while it waits.
GATE = threading.Event()


def wait_for_gate(question: str) -> str:
    if not GATE.wait(timeout=60):
        raise TimeoutError("the test never opened the gate")
    return f"passed: {question}"


def explode(question: str) -> str:
    raise ValueError(f"cannot handle {question!r}")


def widget_tree(widgets: Any) -> list[Any]:
    """Widgets with everything they hold that is a widget too: children, layouts, styles."""
    found = []
    for widget in widgets:
        found += [widget, *widget_tree(getattr(widget, "children", ()))]
        found += [part for part in (getattr(widget, "layout", None), getattr(widget, "style", None)) if part is not None]
    return found


def is_open(widget: Any) -> bool:
    """Whether ipywidgets still holds ``widget`` (and its comm): it does until the widget is closed."""
    return widget.comm is not None


def cells(manager: ModelManager) -> list[str]:
    """The model table's text, cell by cell (header first)."""
    return [getattr(child, "value", "") for child in manager.table.children]


# -- model manager -------------------------------------------------------------------------------


def test_manager_lists_loaded_models_with_device_dtype_memory_and_state(loaded: wb.Workbench) -> None:
    manager = ModelManager(loaded)
    text = cells(manager)
    header = [c for c in text if c.startswith("<b>")]
    expected = [c for c in ("name", "device", "dtype", "params", "memory_mb", "health", "state")
                if c in loaded.models().columns]
    assert header == [f"<b>{c}</b>" for c in expected]
    assert {"tiny", "cpu", "float32", "loaded"} <= set(text)
    assert manager.actions["tiny"].description == "unload"
    cpu_bar, label = manager.memory.children[0].children
    assert cpu_bar.description == "cpu" and cpu_bar.value > 0
    assert "(1 loaded)" in label.value


def test_device_and_dtype_pickers_offer_what_this_machine_has(bench: wb.Workbench) -> None:
    manager = ModelManager(bench)
    assert list(manager.device.options) == ["auto", *available_devices()]
    assert [bar.children[0].description for bar in manager.memory.children] == available_devices()
    manager.device.value = "cpu"
    assert list(manager.dtype.options) == ["auto", "float32", "bfloat16", "float16"]
    assert manager.dtype.value == "auto"


def test_load_button_loads_the_model_and_the_table_follows(bench: wb.Workbench, tiny_path: Path) -> None:
    manager = ModelManager(bench)
    assert manager.actions == {}
    manager.name.value, manager.source.value = "m1", str(tiny_path)
    manager.device.value, manager.dtype.value = "cpu", "bfloat16"
    manager.load_button.click()
    manager.load_button.click()  # a double click: the second comes while the load runs, and is refused
    assert "still running" in manager.error
    manager.wait(120)
    assert manager.error == ""  # that line went with the load it spoke of
    assert "loaded 'm1' on cpu" in manager.status
    row = bench.models().set_index("name").loc["m1"]
    assert (row["device"], row["dtype"], row["state"]) == ("cpu", "bfloat16", "loaded")
    assert manager.actions["m1"].description == "unload"
    assert not manager.busy and not manager.load_button.disabled


def test_unload_button_frees_the_model(loaded: wb.Workbench) -> None:
    manager = ModelManager(loaded)
    manager.actions["tiny"].click()
    manager.wait(60)
    assert not loaded.registry.is_loaded("tiny")
    assert "unloaded 'tiny'" in manager.status
    # Unloaded models stay registered: the row stays, with a button that loads it again.
    assert manager.actions["tiny"].description == "load"
    assert "loaded" not in cells(manager)


def test_a_refresh_closes_the_cells_and_bars_it_no_longer_shows(loaded: wb.Workbench) -> None:
    # Before, each refresh (and each load or unload, which refreshes) left every cell, button and bar it replaced
    # open: 536 widgets more in the kernel per refresh of a 21-model table, and their models in the browser.
    manager = ModelManager(loaded)
    drawn = widget_tree([*manager.table.children, *manager.memory.children])
    assert drawn and all(map(is_open, drawn))
    manager.refresh_button.click()
    assert not any(map(is_open, drawn))
    shown = widget_tree([*manager.table.children, *manager.memory.children])
    assert all(map(is_open, shown)) and "tiny" in cells(manager)
    manager.actions["tiny"].click()  # the unload button: its job redraws the table too
    manager.wait(60)
    assert not any(map(is_open, shown))


def test_model_table_reads_at_a_glance(bench: wb.Workbench, tiny_path: Path) -> None:
    bench.load("tiny", tiny_path, device="cpu")
    bench.register("later", tiny_path, device="cpu")
    params = bench.registry.get("tiny").params
    text = cells(ModelManager(bench))
    # A registered model has no parameter count yet; the loaded one's stays a whole number.
    assert f"{params:,}" in text and f"{params}.0" not in text and "—" in text
    shown = Readable(bench.models())
    assert shown.column("params") == [f"{params:,}", "—"]
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", shown.column("last_used")[0])  # a time, not a full timestamp
    assert re.fullmatch(r"\d+\.\d{3}", shown.column("load_s")[0])


def test_a_blank_name_in_the_form_loads_nothing_and_says_why(bench: wb.Workbench) -> None:
    manager = ModelManager(bench)
    manager.name.value = "   "
    assert manager.load() is True
    manager.wait(60)
    assert manager.error.startswith("model name '' is not text without spaces at its ends")
    assert bench.models().empty  # before, a model named '' was loaded


def test_registered_model_gets_a_load_button(bench: wb.Workbench, tiny_path: Path) -> None:
    bench.register("later", tiny_path, device="cpu")
    manager = ModelManager(bench)
    assert manager.actions["later"].description == "load"
    manager.actions["later"].click()
    manager.wait(120)
    assert bench.registry.is_loaded("later")
    assert manager.actions["later"].description == "unload"


def test_failed_load_shows_its_error_in_the_widget(bench: wb.Workbench, tmp_path: Path) -> None:
    manager = ModelManager(bench)
    manager.source.value = str(tmp_path / "missing")
    manager.load_button.click()  # must not raise: the error belongs in the widget
    manager.wait(60)
    assert "missing' does not exist" in manager.error and "hint:" in manager.error
    assert "missing&#x27; does not exist" in manager._error.value  # escaped in the HTML
    assert manager.status == "" and bench.registry.names() == []


# -- chain builder -------------------------------------------------------------------------------


def test_builder_starts_from_a_chain_and_round_trips_its_spec(loaded: wb.Workbench) -> None:
    chain = loaded.chain(DEMO_SPEC)
    builder = ChainBuilder(loaded, chain=chain)
    rebuilt = loaded.chain(builder.spec())
    assert rebuilt.hops == chain.hops == ["plan", "answer", "stats"]
    assert rebuilt.graph() == chain.graph()
    assert rebuilt.spec.output == "answer"
    for old, new in zip(chain.spec.hops, rebuilt.spec.hops):
        assert (new.prompt, new.params, new.model) == (old.prompt, old.params, old.model)
    assert list(builder.inputs) == ["question"]
    graph = builder.graph.value
    assert re.findall(r"data-hop='(\w+)'", graph) == ["plan", "answer", "stats"]
    assert graph.count("<line") == sum(len(d) for d in chain.graph().values())


def test_fields_the_form_does_not_edit_ride_along(loaded: wb.Workbench) -> None:
    spec = {**SHORT_SPEC, "description": "kept", "hops": [{**SHORT_SPEC["hops"][0], "seed": 3, "truncate": "left"}]}
    builder = ChainBuilder(loaded, chain=loaded.chain(spec))
    builder.hop_editors[0].temperature.value = 0.5
    rebuilt = loaded.chain(builder.spec())
    assert rebuilt.spec.description == "kept"
    params = rebuilt.spec.hops[0].params
    assert (params.seed, params.truncate, params.temperature) == (3, "left", 0.5)


def test_the_forms_sliders_reach_the_chains_values_and_a_run_keeps_them(loaded: wb.Workbench) -> None:
    # A slider clamps a value outside its range: the form gave back 256, 2.0, 0.05 and 200, and a run wrote them into
    # the chain without a word.
    values = {"max_new_tokens": 400, "temperature": 3.5, "top_p": 0.01, "top_k": 500}
    chain = loaded.chain({**SHORT_SPEC, "hops": [{**SHORT_SPEC["hops"][0], **values}]})
    builder = ChainBuilder(loaded, chain=chain)
    (hop,) = builder.spec()["hops"]
    assert {key: hop[key] for key in values} == values
    fresh = ChainBuilder(loaded).hop_editors[0]  # a new hop's sliders keep their usual ranges
    assert (fresh.max_new_tokens.max, fresh.temperature.max, fresh.top_p.min, fresh.top_k.max) == (256, 2.0, 0.05, 200)


def test_a_builder_does_not_undo_a_live_edit_made_since_it_showed_the_chain(loaded: wb.Workbench) -> None:
    # %autoglm set (chain.set) made qa v2; a run from a builder opened on v1 built v1's values again, without a word.
    chain = loaded.chain(SHORT_SPEC)
    builder = ChainBuilder(loaded, chain=chain)
    builder.inputs["question"].value = "hi"
    chain.set({"answer.max_new_tokens": 2})
    assert builder.run() is False and builder.last_run is None
    assert builder.error.startswith("chain 'short' changed since this builder showed it (v1") and "undo" in builder.error
    assert loaded.chains()["short"] is chain and chain.spec.hop("answer").params.max_new_tokens == 2
    assert ChainBuilder(loaded, chain=chain).spec()["hops"][0]["max_new_tokens"] == 2  # started again from it
    assert builder.run(replace=True) is True  # asked for in so many words
    builder.wait(60)
    assert builder.error == "" and loaded.chains()["short"].spec.hop("answer").params.max_new_tokens == 4
    assert builder.run() is True  # its own run's version is the one it shows now
    builder.wait(60)
    assert builder.error == ""


def test_a_chat_hop_keeps_its_messages_and_its_spec_validates(loaded: wb.Workbench) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "{{ question }}"}]
    chat = loaded.chain({"name": "chat", "hops": [{"name": "answer", "model": "tiny", "messages": messages}]})
    builder = ChainBuilder(loaded, chain=chat)
    assert "spec ok" in builder._check.value
    rebuilt = loaded.chain(builder.spec())
    assert [(role, template.source) for role, template in rebuilt.spec.hops[0].messages] == [
        ("system", "Be brief."), ("user", "{{ question }}")]
    assert list(builder.inputs) == ["question"]


def test_a_python_hop_of_a_function_no_import_reaches_runs_from_the_builder(loaded: wb.Workbench) -> None:
    def shout(question: str) -> str:  # a closure, as a notebook cell defines one: no dotted path reaches it
        return question.upper()

    chain = loaded.chain({"name": "loud", "hops": [{"name": "shout", "call": shout},
                                                   {"name": "bang", "call": lambda shout: shout + "!"}]})
    builder = ChainBuilder(loaded, chain=chain)
    assert "spec ok" in builder._check.value
    builder.inputs["question"].value = "hi"
    assert builder.run() is True
    builder.wait(60)
    assert builder.error == "" and builder.last_run is not None and builder.last_run.output == "HI!"
    # A path typed in the call box replaces the function.
    builder.hop_editors[1].call.value = "workbench.demo:canned_answer"
    assert builder.spec()["hops"][1]["call"] == "workbench.demo:canned_answer"
    assert builder.run() is True
    builder.wait(60)
    assert builder.last_run.output == "(no model could answer 'hi' just now)"


def test_a_builder_does_not_replace_a_chain_of_its_name_it_was_not_started_from(loaded: wb.Workbench) -> None:
    # Before, a builder whose chain was named like one built elsewhere (qa, from a cell or a spec file) replaced it at
    # its first run, without a word: %autoglm run qa, bench.chains() and a served chain's name then found the builder's.
    qa = loaded.chain({"name": "qa", "hops": [{"name": "answer", "call": "workbench.demo:canned_answer"}]})
    builder = ChainBuilder(loaded)
    builder.hop_editors[0].kind.value = "python"
    builder.hop_editors[0].call.value = "workbench.demo:canned_answer"
    builder.inputs["question"].value = "hi"
    builder.chain_name.value = "qa"
    assert builder.run() is False and builder.last_run is None
    assert builder.error.startswith("chain 'qa' is built on this workbench already, not from this builder: running "
                                    "here would replace it")
    assert "ChainBuilder(bench, chain=bench.chains()['qa'])" in builder.error and "run(replace=True)" in builder.error
    assert loaded.chains()["qa"] is qa
    assert builder.run(replace=True) is True  # asked for in so many words
    builder.wait(60)
    assert builder.error == "" and loaded.chains()["qa"] is builder.chain is not qa
    assert builder.run() is True  # the chain it built itself is its own to replace, run after run
    builder.wait(60)
    # A builder started from a chain edits that chain: its runs replace it, as before.
    editor = ChainBuilder(loaded, chain=builder.chain)
    assert editor.run() is True
    editor.wait(60)
    assert editor.error == "" and loaded.chains()["qa"] is editor.chain


def test_add_move_and_remove_hops_keep_graph_and_inputs_in_step(loaded: wb.Workbench) -> None:
    builder = ChainBuilder(loaded)
    assert [e.hop_name.value for e in builder.hop_editors] == ["hop1"]
    builder.add_button.click()
    second = builder.hop_editors[1]
    assert second.hop_name.value == "hop2" and "{{ hop1 }}" in second.prompt.value
    assert builder.output_hop.value == "hop2"  # the output follows the last hop
    assert "<line" in builder.graph.value  # hop2 reads hop1
    second.prompt.value = "{{ hop1 }} and {{ topic }}"
    assert list(builder.inputs) == ["question", "topic"]
    second.up.click()
    assert [e.hop_name.value for e in builder.hop_editors] == ["hop2", "hop1"]
    second.remove.click()
    assert [e.hop_name.value for e in builder.hop_editors] == ["hop1"]
    assert list(builder.inputs) == ["question"]
    assert re.findall(r"data-hop='(\w+)'", builder.graph.value) == ["hop1"]


def test_a_removed_hop_closes_its_controls(loaded: wb.Workbench) -> None:
    # Before, a removed hop's editor (about 60 widgets: sliders, boxes, the forms of the kinds it did not show) stayed
    # open in the kernel for good.
    builder = ChainBuilder(loaded)
    kept, removed = builder.hop_editors[0], builder.add_hop()
    parts = widget_tree([removed, removed._llm, removed._python, removed._knowledge])
    assert all(map(is_open, parts))
    removed.remove.click()
    assert builder.hop_editors == [kept]
    assert not any(map(is_open, parts))
    assert all(map(is_open, widget_tree([kept])))
    kept.kind.value = "python"  # the hop left still edits the spec
    kept.call.value = "test_widgets:explode"
    assert builder.spec()["hops"][0]["call"] == "test_widgets:explode"


def test_an_input_that_leaves_the_prompts_for_a_while_keeps_what_was_typed(loaded: wb.Workbench) -> None:
    # Before, its box was dropped with the value: a prompt edited from {{ question }} to {{ q }} and back emptied
    # the question the user had typed.
    builder = ChainBuilder(loaded)
    prompt = builder.hop_editors[0].prompt
    builder.inputs["question"].value = "What is the capital of France?"
    prompt.value = "Question: {{ q }}\nAnswer:"
    assert list(builder.inputs) == ["q"]
    prompt.value = "Question: {{ question }}\nAnswer:"
    assert list(builder.inputs) == ["question"]
    assert builder.inputs["question"].value == "What is the capital of France?"
    assert list(builder._inputs_box.children) == [builder.inputs["question"]]


def test_an_invalid_spec_is_reported_in_the_widget_and_does_not_run(loaded: wb.Workbench) -> None:
    builder = ChainBuilder(loaded)
    builder.hop_editors[0].prompt.value = "{{ unclosed"
    shown = html.unescape(builder._check.value)
    assert "hop 'hop1'" in shown and "'prompt'" in shown
    assert builder.run() is False
    assert "hop 'hop1'" in builder.error
    assert builder.last_run is None


def test_run_shows_output_and_spans_and_sliders_apply_without_reloading(loaded: wb.Workbench) -> None:
    model_before = loaded.registry.get("tiny").model
    builder = ChainBuilder(loaded, chain=loaded.chain(SHORT_SPEC))
    builder.inputs["question"].value = "What is 2 + 2?"
    editor = builder.hop_editors[0]
    for temperature, max_tokens in ((0.0, 4), (0.7, 6)):
        editor.temperature.value, editor.max_new_tokens.value = temperature, max_tokens
        assert builder.run() is True
        builder.wait(120)
        assert builder.error == "" and builder.last_run is not None and builder.last_run.ok
        calls = [s for s in builder.last_run.trace.spans if s.name == "text_completion tiny"]
        assert len(calls) == 1
        recorded = calls[0].attributes or {}
        assert recorded[attr.REQUEST_TEMPERATURE] == temperature
        assert recorded[attr.REQUEST_MAX_TOKENS] == max_tokens
    assert loaded.registry.get("tiny").model is model_before  # no reload between runs
    assert builder.last_run.id in builder.output.value
    # Span names left-aligned under their depth marks, milliseconds to one decimal.
    assert re.search(r'text-align: left[^"]*">· · text_completion tiny</td>', builder.span_table.value)
    duration = Readable(builder.last_run.trace.compact()).column("duration_ms")[0]
    assert re.fullmatch(r"\d{1,3}(,\d{3})*\.\d", duration) and f">{duration}</td>" in builder.span_table.value
    assert builder.status.startswith(f"run {builder.last_run.id}")


def _watched_run(builder: ChainBuilder, question: str) -> tuple[wb.Run, list[str]]:
    """Run the builder on ``question``; its run, and every value its output area took meanwhile."""
    builder.inputs["question"].value = question
    seen: list[str] = []
    builder.output.observe(lambda change: seen.append(change["new"]), "value")
    assert builder.run() is True
    builder.wait(120)
    run = builder.last_run
    assert run is not None and run.ok
    return run, seen


def test_run_shows_each_hops_tokens_while_they_arrive(loaded: wb.Workbench) -> None:
    run, seen = _watched_run(ChainBuilder(loaded, chain=loaded.chain(QA_SPEC)), "What is 2 + 2?")
    growing = [value for value in seen if "<b>plan</b>" in value]
    assert len(growing) > 1  # the first hop's answer was shown as it grew, token by token
    assert run.outputs["plan"] in growing[-1]
    assert seen[-1] == run._repr_html_()  # and the run replaced it at the end


def test_a_long_answer_is_redrawn_at_most_every_redraw_s_and_whole_as_its_hop_ends(loaded: wb.Workbench) -> None:
    # The output, one HTML value sent whole, was redrawn at every token: 189,340 characters sent for an answer of
    # 1,254. A redraw_s no run outlasts leaves the first token's redraw and the hop's end: the same text, in two.
    spec = {"name": "long_say", "hops": [{"name": "say", "model": "tiny", "prompt": "Question: {{ question }}\nAnswer:",
                                          "max_new_tokens": 400, "temperature": 5.0, "seed": 0}]}
    builder = ChainBuilder(loaded, chain=loaded.chain(spec))
    builder.redraw_s = 3600
    run, seen = _watched_run(builder, "Tell me everything.")
    assert seen[-1] == run._repr_html_()  # the run replaced the streamed text at the end
    streamed = [value for value in seen[:-1] if "<b>say</b>" in value]
    assert len(streamed) == 2  # was one a token: 400
    assert html.escape(run.output) in streamed[-1]  # the whole answer, as the hop ended
    assert len(streamed[0]) < len(streamed[-1])


def test_the_stop_button_cancels_a_long_run_at_its_next_token_and_keeps_what_it_streamed(
    loaded: wb.Workbench,
) -> None:
    # There was no way to stop a run from the widget: a Ctrl-C does not reach its background thread.
    spec = {"name": "long_stop", "hops": [{"name": "say", "model": "tiny", "prompt": "Question: {{ question }}\nAnswer:",
                                           "max_new_tokens": 400, "temperature": 5.0, "seed": 0}]}
    builder = ChainBuilder(loaded, chain=loaded.chain(spec))
    assert builder.stop_button.disabled and builder.stop() is False  # nothing to stop
    builder.inputs["question"].value = "Tell me everything."
    shown: list[str] = []

    def first_token(change: dict[str, Any]) -> None:
        shown.append(change["new"])
        if len(shown) == 1:
            assert not builder.stop_button.disabled
            builder.stop_button.click()  # as the first token shows

    builder.output.observe(first_token, "value")
    assert builder.run() is True
    builder.wait(120)
    assert builder.status.startswith("stopped 'long_stop'") and builder.error == ""
    assert builder.last_run is None and "<b>say</b>" in builder.output.value  # what it streamed stays
    assert len(shown) <= 2 and not builder.running and builder.stop_button.disabled

    def cancelled() -> bool:  # the worker ends the request's span at its next step, after the stream has closed
        spans = [s for s in loaded.traces().spans if s.name == "text_completion tiny"
                 and (s.attributes or {}).get(attr.HOP_NAME) == "say"]
        return bool(spans) and (spans[-1].attributes or {}).get(attr.CANCELLED) == "running"

    eventually(cancelled, "the stopped run's model call to end cancelled")


def test_the_stop_button_stops_a_hop_that_streams_nothing_while_it_runs(loaded: wb.Workbench) -> None:
    # The stop was heard only at the run's next event: a Python hop of a minute (or a long prefill) ran on to its
    # end, the builder showing "stopping ..." the while.
    entered, release = threading.Event(), threading.Event()

    def slow(question: str) -> str:
        entered.set()
        release.wait(60)
        return question

    builder = ChainBuilder(loaded, chain=loaded.chain({"name": "slow_stop", "hops": [{"name": "work", "call": slow}]}))
    builder.inputs["question"].value = "q"
    try:
        assert builder.run() is True
        assert entered.wait(30)
        assert builder.stop() is True
        builder.wait(10)
        assert not builder.running and not release.is_set()  # stopped while the hop still runs
        assert builder.status == "stopped 'slow_stop': the run was cancelled" and builder.error == ""
        assert builder.last_run is None
    finally:
        release.set()


def test_run_returns_at_once_while_the_chain_runs_in_the_background(loaded: wb.Workbench) -> None:
    builder = ChainBuilder(loaded)
    builder.hop_editors[0].kind.value = "python"
    builder.hop_editors[0].call.value = "test_widgets:wait_for_gate"
    builder.inputs["question"].value = "hi"
    GATE.clear()
    try:
        assert builder.run() is True
        # The hop is still waiting on the gate, so run() came back before the chain finished.
        assert builder.running and builder.last_run is None
        assert builder.run_button.disabled
        assert builder.run() is False and "still going" in builder.error
    finally:
        GATE.set()
    builder.wait(60)
    assert not builder.running and not builder.run_button.disabled
    assert builder.last_run is not None and builder.last_run.output == "passed: hi"
    assert builder.error == ""  # the refused click's line went with the run it spoke of


def test_a_failing_run_shows_its_error_and_partial_trace_in_the_widget(loaded: wb.Workbench) -> None:
    builder = ChainBuilder(loaded, chain=loaded.chain(SHORT_SPEC))
    boom = builder.add_hop("boom", kind="python", call="test_widgets:explode")
    assert boom.kind.value == "python"
    builder.inputs["question"].value = "x"
    builder.output_hop.value = "boom"
    assert builder.run() is True  # the failure comes later, in the background, and stays in the widget
    builder.wait(120)
    assert "hop 'boom' failed: ValueError: cannot handle 'x'" in builder.error
    assert builder.last_run is not None and not builder.last_run.ok
    assert "answer" in builder.last_run.outputs  # the hop that finished is kept
    assert "hop boom" in builder.span_table.value and "ERROR" in builder.span_table.value


# -- trace viewer --------------------------------------------------------------------------------


def test_viewer_has_one_span_per_span_of_the_run_nested_by_parent(loaded: wb.Workbench) -> None:
    run = loaded.chain(DEMO_SPEC).run(question="What is the capital of France?")
    viewer = TraceViewer(run)
    assert len(viewer.spans) == len(run.trace) == len(run.trace.table())
    ids = {s["id"] for s in viewer.spans}
    assert len(ids) == len(viewer.spans)
    roots = [s for s in viewer.spans if s["parent"] is None]
    assert [r["name"] for r in roots] == ["chain qa"]
    assert all(s["parent"] in ids for s in viewer.spans if s["parent"] is not None)
    assert {s["kind"] for s in viewer.spans} >= {"CHAIN", "LLM", "TOOL"}
    assert set(viewer.colours) >= {s["kind"] for s in viewer.spans}
    assert min(s["start_ms"] for s in viewer.spans) == 0.0
    assert viewer.title == f"{len(run.trace)} spans in 1 trace"
    call = next(s for s in viewer.spans if s["name"] == "text_completion tiny")
    assert call["attributes"][attr.REQUEST_MAX_TOKENS] == 24  # an int stays an int
    table = run.trace.table()
    assert [s["gc_ms"] for s in viewer.spans] == table["gc_ms"].tolist()  # the hover text's collector time
    json.dumps(viewer.spans)  # what goes to the browser is plain JSON


def test_selecting_a_span_exposes_it_to_the_kernel(loaded: wb.Workbench) -> None:
    run = loaded.chain(SHORT_SPEC).run(question="hi")
    viewer = TraceViewer(run)
    assert viewer.selected_span is None
    call = next(s for s in viewer.spans if s["kind"] == "LLM")
    viewer.selected = call["id"]  # what a click in the browser sets
    assert viewer.selected_span is not None and viewer.selected_span["name"] == "text_completion tiny"
    viewer.show(loaded.chain(SHORT_SPEC).run(question="again"))
    assert viewer.selected == "" and viewer.selected_span is None


def test_viewer_draws_dozens_of_concurrent_runs(loaded: wb.Workbench) -> None:
    runs = loaded.chain(SHORT_SPEC).map([{"question": f"q{i}"} for i in range(24)], concurrency=12)
    viewer = TraceViewer(runs)
    assert len(viewer.spans) == sum(len(r.trace) for r in runs)
    assert len({s["trace"] for s in viewer.spans}) == 24
    assert viewer.title.endswith("in 24 traces")
    assert len([s for s in viewer.spans if s["parent"] is None]) == 24


def stop_at_two(n: str) -> str:
    if n == "2":
        raise KeyboardInterrupt  # as Ctrl-C does in the middle of a map
    return f"done {n}"


def test_viewer_draws_an_interrupted_maps_batch_and_says_what_it_cannot_draw(loaded: wb.Workbench) -> None:
    chain = loaded.chain({"name": "stops", "hops": [{"name": "work", "call": stop_at_two}]})
    with pytest.raises(wb.MapInterrupted) as info:
        chain.map([{"n": str(i)} for i in range(5)], concurrency=1)
    batch = info.value.batch
    assert batch.missing  # the inputs that never ran are None in the batch
    viewer = TraceViewer(batch)
    assert len({s["trace"] for s in viewer.spans}) == len(batch.finished) == 2
    with pytest.raises(wb.WorkbenchError, match="a trace viewer shows a Run, several Runs or a Trace, not Chain"):
        TraceViewer(chain)


def test_viewer_front_end_is_shipped_and_imports_nothing() -> None:
    shipped = TraceViewer()._esm
    assert shipped == (REPO / "extensions" / "trace_viewer.js").read_text()
    assert re.search(r"^\s*import\b", shipped, re.MULTILINE) is None  # no CDN, no bundle: runs offline
    assert "export default" in shipped
    assert TraceViewer()._css == (REPO / "extensions" / "trace_viewer.css").read_text()


# -- comparison dashboard ------------------------------------------------------------------------


def test_dashboard_fills_in_table_and_plot_as_passes_finish(loaded: wb.Workbench) -> None:
    chain = loaded.chain(SHORT_SPEC)
    dashboard = ComparisonDashboard(chain, [{"question": f"q{i}"} for i in range(4)],
                                    batching=["none", "static:4"], repeats=1, warmup=0)
    seen: list[tuple[int, str]] = []
    dashboard.progress.observe(lambda change: seen.append((change["new"], dashboard.table.value)), "value")
    assert dashboard.run() is True
    dashboard.wait(300)
    assert dashboard.error == ""
    assert dashboard.progress.max == 2 and dashboard.progress.bar_style == "success"
    passes = [value for value, _ in seen if value > 0]
    assert passes == [1, 2]
    first_table = next(table for value, table in seen if value == 1)
    assert "none" in first_table and "static:4" in first_table  # both rows show while one is still to run
    assert dashboard.comparison is not None
    assert list(dashboard.comparison.table()["batching"]) == ["none", "static:4:50ms"]
    assert dashboard.plot.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert dashboard.status == "done"
    # One repeat: the table says there is no spread to rank by, rather than ranking noise.
    assert "one repeat gives no spread" in dashboard.table.value
    assert html.escape(dashboard.comparison.readable().column("e2e_p50_ms")[0]) in dashboard.table.value


def test_dashboard_shows_intervals_and_ranks_after_repeats(loaded: wb.Workbench) -> None:
    dashboard = ComparisonDashboard(loaded.chain(SHORT_SPEC), [{"question": f"q{i}"} for i in range(3)],
                                    batching=["none", "dynamic:4:5ms"], repeats=2, warmup=0)
    dashboard.run()
    dashboard.wait(300)
    assert dashboard.error == "" and dashboard.comparison is not None
    shown = dashboard.comparison.readable()
    assert all(re.fullmatch(r".+ \(.+–.+\)", cell) for cell in shown.column("requests_per_s"))
    assert sorted(rank.split()[0] for rank in shown.column("rank")) == ["1", "2"]
    for cell in shown.column("requests_per_s") + shown.column("rank"):
        assert f">{html.escape(cell)}</td>" in dashboard.table.value


def test_dashboard_shows_a_failing_comparison_as_an_error(loaded: wb.Workbench) -> None:
    dashboard = ComparisonDashboard(loaded.chain(SHORT_SPEC), [{"topic": "x"}], repeats=1, warmup=0)
    assert dashboard.run() is True
    dashboard.wait(60)
    assert "needs input 'question'" in dashboard.error
    assert dashboard.progress.bar_style == "danger"
    assert dashboard.comparison is None and not dashboard.run_button.disabled


def test_a_refused_comparison_keeps_the_last_one_the_table_still_shows(loaded: wb.Workbench) -> None:
    """Picking a strategy compare refuses lost the finished comparison: .comparison went None while its table stayed."""
    dashboard = ComparisonDashboard(loaded.chain(SHORT_SPEC), [{"question": "q"}], batching=["none"],
                                    preloading=["lazy", "keep_warm:1KiB"], repeats=1, warmup=0)
    dashboard.preloading.value = ("lazy",)
    dashboard.run()
    dashboard.wait(120)
    finished, shown = dashboard.comparison, dashboard.table.value
    assert finished is not None and dashboard.error == ""
    dashboard.preloading.value = ("keep_warm:1KiB",)  # smaller than the model: refused before the first pass
    dashboard.run()
    dashboard.wait(120)
    assert "more than the whole keep-warm budget of 1KiB" in dashboard.error
    assert dashboard.comparison is finished and dashboard.table.value == shown
    assert dashboard.status == "the table shows the last comparison that finished"


def test_a_click_while_a_comparison_runs_says_so_until_it_ends(loaded: wb.Workbench) -> None:
    """The 'still running' line stayed beside 'done' after the comparison it spoke of had finished."""
    dashboard = ComparisonDashboard(loaded.chain(SHORT_SPEC), [{"question": "q"}], batching=["none"], repeats=1,
                                    warmup=0)
    assert dashboard.run() is True
    assert dashboard.run() is False and dashboard.error == "a comparison is still running; wait for it to finish"
    dashboard.wait(120)
    assert dashboard.status == "done" and dashboard.error == ""


@pytest.mark.parametrize("rate", ["20", [5]])
def test_an_arrival_rate_that_is_no_number_is_refused_in_the_error_line(loaded: wb.Workbench, rate: object) -> None:
    """The dashboard raised Python's 'Unknown format code 'g' for object of type 'str'' as it was made."""
    dashboard = ComparisonDashboard(loaded.chain(SHORT_SPEC), [{"question": "q"}], batching=["none"],
                                    arrival_rate=rate, repeats=1, warmup=0)  # type: ignore[arg-type]
    dashboard.run()
    dashboard.wait(60)
    assert f"arrival rate must be a finite number > 0 runs/s, not {rate!r}" in dashboard.error
    assert dashboard.comparison is None


def test_a_save_that_fails_leaves_the_finished_comparison_shown_as_done(loaded: wb.Workbench, tmp_path: Path) -> None:
    """save= into a missing folder turned the finished comparison's bar red, as if the comparison had failed."""
    target = tmp_path / "missing" / "cmp.csv"
    dashboard = ComparisonDashboard(loaded.chain(SHORT_SPEC), [{"question": "q"}], batching=["none"], repeats=1,
                                    warmup=0, save=str(target))
    assert dashboard.run() is True
    dashboard.wait(60)
    assert dashboard.comparison is not None and dashboard.progress.bar_style == "success"
    assert dashboard.status == "done" and not target.exists()
    assert "cannot save the comparison to" in dashboard.error and "the comparison is kept" in dashboard.error


def test_dashboard_runs_the_workload_asked_for_beyond_its_sliders_range(loaded: wb.Workbench) -> None:
    chain = loaded.chain(SHORT_SPEC)
    dashboard = ComparisonDashboard(chain, [{"question": "q"}], batching=["none"], concurrency=100, repeats=12,
                                    warmup=20)
    assert (dashboard.concurrency.value, dashboard.repeats.value, dashboard.warmup.value) == (100, 12, 20)
    dashboard.repeats.value, dashboard.warmup.value = 1, 0
    dashboard.run()
    dashboard.wait(120)
    assert dashboard.error == "" and dashboard.comparison is not None
    assert dashboard.comparison.environment["concurrency"] == 100
    # Below the range: compare refuses it in the error line, rather than the slider quietly running 1.
    refused = ComparisonDashboard(chain, [{"question": "q"}], batching=["none"], concurrency=0, repeats=1, warmup=0)
    refused.run()
    refused.wait(60)
    assert "concurrency must be at least 1, not 0" in refused.error


# -- magics --------------------------------------------------------------------------------------


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch, loaded: wb.Workbench) -> Iterator[InteractiveShell]:
    """A real shell with the extension loaded and the `loaded` workbench as the default one."""
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "workbench")
    monkeypatch.setattr(workbench.bench, "_current", loaded)
    try:
        yield ip
    finally:
        ip.reset(new_session=False)


def magic_widget(shell: InteractiveShell, line: str) -> Any:
    """Run ``%autoglm line``; return the widget it bound, after checking that it was displayed."""
    with capture_output() as captured:
        shell.run_line_magic("autoglm", line)
    assert captured.stderr == ""
    widget = shell.user_ns["_autoglm_widget"]
    assert [out.data[WIDGET_MIME]["model_id"] for out in captured.outputs if WIDGET_MIME in out.data] == [
        widget.model_id
    ]
    return widget


def test_ui_flags_and_builder_parse() -> None:
    assert parse_command("models --ui") == ModelsCommand(ui=True)
    assert parse_command("trace abc --ui") == TraceCommand(run="abc", ui=True)
    assert parse_command("builder") == BuilderCommand()
    assert parse_command("builder qa") == BuilderCommand(chain="qa")
    assert parse_command("compare qa --inputs q.jsonl --ui").ui is True


def test_models_ui_magic_opens_the_model_manager(shell: InteractiveShell) -> None:
    manager = magic_widget(shell, "models --ui")
    assert isinstance(manager, ModelManager) and list(manager.actions) == ["tiny"]


def test_builder_magic_opens_the_builder_on_a_chain(shell: InteractiveShell, loaded: wb.Workbench) -> None:
    loaded.chain(DEMO_SPEC)
    builder = magic_widget(shell, "builder qa")
    assert isinstance(builder, ChainBuilder)
    assert [e.hop_name.value for e in builder.hop_editors] == ["plan", "answer", "stats"]
    with capture_output() as captured:
        shell.run_line_magic("autoglm", "builder nope")
    assert "no chain named 'nope'" in captured.stderr and "Traceback" not in captured.stderr


def test_trace_ui_magic_opens_the_viewer_on_the_last_run(shell: InteractiveShell, loaded: wb.Workbench) -> None:
    run = loaded.chain(SHORT_SPEC).run(question="hi")
    viewer = magic_widget(shell, "trace --ui")
    assert isinstance(viewer, TraceViewer) and len(viewer.spans) == len(run.trace)


def test_compare_ui_magic_runs_in_the_dashboard(
    shell: InteractiveShell, loaded: wb.Workbench, tmp_path: Path
) -> None:
    loaded.chain(SHORT_SPEC)
    inputs = tmp_path / "questions.jsonl"
    inputs.write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(3)))
    dashboard = magic_widget(shell, f"compare short --inputs {inputs} --batching none --repeats 1 --warmup 0 --ui")
    assert isinstance(dashboard, ComparisonDashboard)
    dashboard.wait(300)
    assert dashboard.error == "" and dashboard.comparison is not None
    assert list(dashboard.comparison.table()["batching"]) == ["none"]


def test_compare_ui_magic_hands_the_dashboard_strategy_names(
    shell: InteractiveShell, loaded: wb.Workbench, tmp_path: Path
) -> None:
    loaded.chain(SHORT_SPEC)
    inputs = tmp_path / "questions.jsonl"
    inputs.write_text(json.dumps({"question": "q"}) + "\n")
    dashboard = magic_widget(
        shell,
        f"compare short --inputs {inputs} --batching none,static:2 --preload lazy,eager --repeats 1 --warmup 0 --ui",
    )
    # The pickers list names, the ones asked for picked, as when the dashboard is built by hand.
    assert dashboard.batching.value == ("none", "static:2:50ms")
    assert dashboard.preloading.value == ("lazy", "eager")
    assert all(isinstance(option, str) for option in (*dashboard.batching.options, *dashboard.preloading.options))
    dashboard.wait(300)
    assert dashboard.error == "" and dashboard.comparison is not None
    table = dashboard.comparison.table()
    assert sorted(zip(table["batching"], table["preloading"])) == [
        ("none", "eager"), ("none", "lazy"), ("static:2:50ms", "eager"), ("static:2:50ms", "lazy")
    ]


# -- text fallback -------------------------------------------------------------------------------


def test_each_widget_reads_as_text_where_it_cannot_be_drawn(loaded: wb.Workbench) -> None:
    chain = loaded.chain(DEMO_SPEC)
    run = chain.run(question="hi")
    widgets = {
        ModelManager(loaded): "ModelManager widget: tiny loaded on cpu",
        ChainBuilder(loaded, chain=chain): "ChainBuilder widget: chain 'qa': plan -> answer -> stats",
        TraceViewer(run): f"TraceViewer widget: {len(run.trace)} spans in 1 trace",
        ComparisonDashboard(chain, [{"question": "q"}], batching=[wb.NoBatching()], preloading=["lazy"]):
            "ComparisonDashboard widget: chain 'qa', 1 input; batching none; preloading lazy",
    }
    for widget, text in widgets.items():
        bundle = widget._repr_mimebundle_()
        plain = (bundle[0] if isinstance(bundle, tuple) else bundle)["text/plain"]
        assert plain.startswith(text), plain
        assert "object at 0x" not in plain and "children=" not in plain


def test_the_widget_notebook_as_shipped_shows_readable_text_before_it_runs() -> None:
    notebook = nbformat.read(REPO / "notebooks" / "04-widgets.ipynb", as_version=4)
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    plain = [output.get("data", {}).get("text/plain", "") for output in outputs]
    widgets = [output["data"]["text/plain"] for output in outputs if WIDGET_MIME in output.get("data", {})]
    assert len(widgets) >= 4
    assert all(re.match(r"\w+ widget: ", text) for text in widgets), widgets
    assert not [text for text in plain if "object at 0x" in text or "(children=" in text]
