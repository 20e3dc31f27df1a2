"""Chains: spec validation that says where, the hop graph, Python hops, failures, map, sessions, sandbox."""

from __future__ import annotations

import asyncio
import argparse
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

import workbench as wb
from workbench.demo import DEMO_SPEC

from helpers import WAIT_S


def _hop_spans(run: wb.Run) -> dict[str, Any]:
    return {s.attributes["workbench.hop.name"]: s for s in run.trace.spans if s.name.startswith("hop ")}


# -- loading specs -----------------------------------------------------------------------------


def test_yaml_and_dict_specs_load_the_same_chain(tiny_bench: wb.Workbench) -> None:
    from_yaml = tiny_bench.chain(DEMO_SPEC)
    as_dict = {
        "name": "qa",
        "hops": [
            {"name": "plan", "model": "tiny", "prompt": "Question: {{ question }}\nPlan:", "max_new_tokens": 24},
            {"name": "answer", "model": "tiny", "prompt": "{{ plan }}\nQuestion: {{ question }}\nAnswer:",
             "max_new_tokens": 32},
            {"name": "stats", "call": "workbench.demo:answer_stats"},
        ],
        "output": "answer",
    }
    from_dict = tiny_bench.chain(as_dict)
    for chain in (from_yaml, from_dict):
        assert chain.hops == ["plan", "answer", "stats"]
        assert chain.inputs == ("question",)
        assert chain.graph() == {"plan": (), "answer": ("plan",), "stats": ("plan", "answer")}
        assert chain.spec.hop("answer").params.max_new_tokens == 32
    assert from_yaml.run(question="hi").outputs == from_dict.run(question="hi").outputs


# -- spec errors: each names the hop, the field and the YAML line ------------------------------

HOP_HEAD = """\
name: qa
hops:
  - name: plan
    model: tiny
    prompt: "Question: {{ question }}"
"""


@pytest.mark.parametrize(
    ("spec", "hop", "field", "line", "words"),
    [
        pytest.param(HOP_HEAD.replace("model: tiny", "model: tinny"), "plan", "model", 4,
                     ["unknown model 'tinny'", "did you mean 'tiny'"], id="unknown-model"),
        pytest.param(HOP_HEAD + '  - name: plan\n    model: tiny\n    prompt: "again"\n', "plan", "name", 6,
                     ["two hops are named 'plan'", "first on line 3"], id="duplicate-hop"),
        pytest.param(HOP_HEAD.replace("hops:", "inputs: [question]\nhops:").replace("}}", "}} {{ questoin }}"),
                     "plan", "prompt", 6, ["'questoin' is used but is neither a chain input nor a hop",
                                           "did you mean 'question'"], id="undefined-variable"),
        pytest.param(HOP_HEAD + "    max_new_tokens: ten\n", "plan", "max_new_tokens", 6,
                     ["max_new_tokens must be an integer >= 1", "'ten'"], id="tokens-not-int"),
        pytest.param(HOP_HEAD + "    max_new_tokens: true\n", "plan", "max_new_tokens", 6,
                     ["max_new_tokens must be an integer"], id="tokens-bool"),
        pytest.param(HOP_HEAD + "    temperature: -1\n", "plan", "temperature", 6,
                     ["temperature must be a number >= 0"], id="negative-temperature"),
        pytest.param(HOP_HEAD + "    top_p: 2\n", "plan", "top_p", 6, ["top_p must be a number in (0, 1]"],
                     id="top-p-above-one"),
        pytest.param(HOP_HEAD + "    seed: yes\n", "plan", "seed", 6, ["seed must be an integer"], id="seed-bool"),
        pytest.param(HOP_HEAD + f"    seed: {10**30}\n", "plan", "seed", 6,
                     ["seed must be an integer from 0 to 2**63 - 1", str(10**30)], id="seed-too-big"),
        pytest.param(HOP_HEAD + "    temperature: .nan\n", "plan", "temperature", 6,
                     ["temperature must be a number >= 0", "nan"], id="temperature-nan"),
        pytest.param(HOP_HEAD + "    timeout_s: .inf\n", "plan", "timeout_s", 6,
                     ["timeout_s must be a number of seconds > 0 and at most 86400", "inf"], id="timeout-inf"),
        pytest.param(HOP_HEAD + "    timeout_s: .nan\n", "plan", "timeout_s", 6,
                     ["timeout_s must be a number of seconds > 0", "nan"], id="timeout-nan"),
        pytest.param(HOP_HEAD + "    retry: {attempts: 2, backoff_ms: .inf}\n", "plan", "retry.backoff_ms", 6,
                     ["retry.backoff_ms must be a number of milliseconds >= 0 and at most"], id="backoff-inf"),
        pytest.param(HOP_HEAD + "    retry: {attempts: 2, backoff_ms: .nan}\n", "plan", "retry.backoff_ms", 6,
                     ["retry.backoff_ms must be a number of milliseconds"], id="backoff-nan"),
        pytest.param(HOP_HEAD + "    retry:\n      max_total_s: .nan\n", "plan", "retry.max_total_s", 7,
                     ["retry.max_total_s must be a number of seconds > 0", "nan"], id="max-total-nan"),
        pytest.param(HOP_HEAD + "    retry:\n      max_total_s: .inf\n", "plan", "retry.max_total_s", 7,
                     ["retry.max_total_s must be a number of seconds > 0", "inf"], id="max-total-inf"),
        # An int too large for a float raised OverflowError (math.isfinite) for every number setting.
        pytest.param(HOP_HEAD + f"    temperature: {10**400}\n", "plan", "temperature", 6,
                     ["temperature must be a number >= 0", "0000...0000"], id="temperature-huge-int"),
        pytest.param(HOP_HEAD + f"    retry:\n      max_total_s: {10**400}\n", "plan", "retry.max_total_s", 7,
                     ["retry.max_total_s must be a number of seconds > 0"], id="max-total-huge-int"),
        pytest.param(HOP_HEAD + f"    retry: {{attempts: 2, backoff_ms: {-10**400}}}\n", "plan", "retry.backoff_ms", 6,
                     ["retry.backoff_ms must be a number of milliseconds"], id="backoff-huge-negative-int"),
        pytest.param(HOP_HEAD + "    max_new_token: 5\n", "plan", "max_new_token", 6,
                     ["unknown field 'max_new_token'", "did you mean 'max_new_tokens'"], id="unknown-hop-field"),
        pytest.param(HOP_HEAD + "ouptut: plan\n", None, "ouptut", 6,
                     ["unknown field 'ouptut'", "did you mean 'output'"], id="unknown-chain-field"),
        pytest.param(HOP_HEAD + "output: plna\n", None, "output", 6, ["output 'plna' is not a hop",
                                                                       "did you mean 'plan'"], id="unknown-output"),
        pytest.param(HOP_HEAD.replace("{{ question }}", "{{ question "), "plan", "prompt", 5,
                     ["does not parse"], id="template-syntax"),
        pytest.param("name: qa\nhops:\n  name: plan\n  model: tiny\n", None, "hops", 2,
                     ["'hops' must be a non-empty list"], id="hops-not-a-list"),
        pytest.param(HOP_HEAD + "  - name: count\n    call: no_such_module_xyz:count\n", "count", "call", 7,
                     ["cannot import module 'no_such_module_xyz'"], id="call-module-missing"),
        pytest.param(HOP_HEAD + "  - name: count\n    call: workbench.demo:no_such_function\n", "count", "call", 7,
                     ["has no function 'no_such_function'"], id="call-function-missing"),
        pytest.param(HOP_HEAD + "  - name: count\n    call: \"os.system('ls')\"\n", "count", "call", 7,
                     ["is not a dotted path"], id="call-not-a-path"),
        pytest.param(HOP_HEAD.replace("name: plan", "name: history"), "history", "name", 3,
                     ["'history' is reserved"], id="reserved-hop-name"),
        pytest.param(HOP_HEAD.replace("hops:", "inputs: [session]\nhops:"), None, "inputs", 2,
                     ["'session' is reserved"], id="reserved-input"),
        pytest.param("name: qa\nhops:\n" + "".join(f"  - {{name: h{i}, call: workbench.demo:canned_answer}}\n"
                                                      for i in range(501)), None, "hops", 2,
                     ["the chain has 501 hops; at most 500"], id="too-many-hops"),
    ],
)
def test_spec_errors_say_where(
    tiny_bench: wb.Workbench, spec: str, hop: str | None, field: str, line: int, words: list[str]
) -> None:
    with pytest.raises(wb.SpecError) as info:
        tiny_bench.chain(spec)
    error = info.value
    assert (error.hop, error.field, error.line) == (hop, field, line)
    for word in words:
        assert word in str(error)
    assert f"line {line}" in str(error)


def test_template_syntax_error_is_a_template_error(tiny_bench: wb.Workbench) -> None:
    with pytest.raises(wb.TemplateError, match="does not parse"):
        tiny_bench.chain(HOP_HEAD.replace("{{ question }}", "{% for x in %}"))


def test_a_cycle_is_refused_naming_a_hop_on_it(tiny_bench: wb.Workbench) -> None:
    spec = dedent(
        """\
        name: loop
        hops:
          - name: a
            model: tiny
            prompt: "{{ b }}"
          - name: b
            model: tiny
            prompt: "{{ a }}"
        """
    )
    with pytest.raises(wb.SpecError, match="cycle") as info:
        tiny_bench.chain(spec)
    assert info.value.hop in ("a", "b")
    assert info.value.line == {"a": 3, "b": 6}[info.value.hop]
    assert "a -> b" in str(info.value) or "b -> a" in str(info.value)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("name: qa\nhops:\n  - name: plan\n   model: tiny\n", 4, "not valid YAML"),
        ('name: qa\nhops:\n  - name: plan\n    prompt: "open\n', 5, "not valid YAML"),
        ("name: qa\nname: qb\nhops: []\n", 2, "'name' appears twice"),
        ("", None, "empty"),
        ("# only a comment\n", None, "empty"),
        ("- plan\n- answer\n", None, "a mapping with 'name' and 'hops'"),
    ],
)
def test_malformed_yaml_says_which_line(tiny_bench: wb.Workbench, text: str, line: int | None, words: str) -> None:
    with pytest.raises(wb.SpecError, match=words) as info:
        tiny_bench.chain(text)
    assert info.value.line == line


def test_dict_spec_errors_name_hop_and_field_without_a_line(tiny_bench: wb.Workbench) -> None:
    with pytest.raises(wb.SpecError, match="top_p") as info:
        tiny_bench.chain({"name": "d", "hops": [{"name": "say", "model": "tiny", "prompt": "x", "top_p": 0}]})
    assert (info.value.hop, info.value.field, info.value.line) == ("say", "top_p", None)


# -- the graph and what a run returns ----------------------------------------------------------


def slow_left(question: str) -> str:
    time.sleep(0.2)
    return f"left:{question}"


def slow_right(question: str) -> str:
    time.sleep(0.2)
    return f"right:{question}"


def join(slow_left: str, slow_right: str) -> str:
    return f"{slow_left}+{slow_right}"


def test_independent_hops_run_concurrently(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain({"name": "fan", "hops": [
        {"name": "slow_left", "call": slow_left},
        {"name": "slow_right", "call": slow_right},
        {"name": "join", "call": join},
    ]})
    assert chain.graph() == {"slow_left": (), "slow_right": (), "join": ("slow_left", "slow_right")}
    run = chain.run(question="q")
    assert run.output == "left:q+right:q"
    spans = _hop_spans(run)
    left, right, last = spans["slow_left"], spans["slow_right"], spans["join"]
    assert max(left.start_time, right.start_time) < min(left.end_time, right.end_time)  # they overlapped
    assert last.start_time >= max(left.end_time, right.end_time)  # join waited for both


def test_llm_hop_dependencies_come_from_template_variables(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain(dedent(
        """\
        name: fan
        hops:
          - name: left
            model: tiny
            prompt: "Question: {{ question }}\\nPlan:"
            max_new_tokens: 6
          - name: right
            model: tiny
            prompt: "Answer: {{ question }}"
            max_new_tokens: 6
          - name: both
            model: tiny
            prompt: "{{ right }} {{ left }}"
            max_new_tokens: 6
        output: left
        """
    ))
    assert chain.graph() == {"left": (), "right": (), "both": ("left", "right")}
    assert chain.inputs == ("question",)
    run = chain.run(question="What is the capital of France?")
    assert set(run.outputs) == {"left", "right", "both"}
    assert run.output == run.outputs["left"]
    prompt = _hop_spans(run)["both"].attributes["input.value"]
    assert prompt == f"{run.outputs['right']} {run.outputs['left']}"


def test_output_defaults_to_the_last_hop(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain({"name": "two", "hops": [
        {"name": "first", "call": lambda word: word.upper()},
        {"name": "second", "call": lambda first: first + "!"},
    ]})
    run = chain.run(word="hi")
    assert run.outputs == {"first": "HI", "second": "HI!"}
    assert run.output == "HI!"


def whole_context(context: dict[str, Any]) -> list[str]:
    return sorted(context)


def test_python_hops_by_callable_by_dotted_path_by_name_and_whole_context(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain({"name": "py", "hops": [
        {"name": "plan", "call": lambda question: f"plan for {question}"},
        {"name": "answer", "call": lambda plan, question: f"{plan} answers {question} here"},
        {"name": "stats", "call": "workbench.demo:answer_stats"},
        {"name": "stats_dotted", "call": "workbench.demo.answer_stats"},
        {"name": "everything", "call": whole_context},
    ], "output": "stats"})
    assert chain.graph()["everything"] == ("plan", "answer", "stats", "stats_dotted")  # all earlier hops
    run = chain.run(question="why")
    assert run.outputs["answer"] == "plan for why answers why here"
    assert run.output == {"plan_words": 3, "answer_words": 6}
    assert run.outputs["stats_dotted"] == run.output
    assert run.outputs["everything"] == ["answer", "history", "plan", "question", "session", "stats", "stats_dotted"]


def test_a_python_hop_that_takes_no_arguments_is_called_with_none(tiny_bench: wb.Workbench) -> None:
    # A source of data (a clock, a counter, a fixed document): it was handed the whole context and failed with
    # "TypeError: <lambda>() takes 0 positional arguments but 1 was given".
    chain = tiny_bench.chain({"name": "py", "hops": [
        {"name": "seed", "call": lambda: 10**50},
        {"name": "half", "call": lambda seed: seed // 2},
    ]})
    assert chain.graph()["seed"] == ()  # needs nothing, so it waits for nothing
    assert chain.run().output == 5 * 10**49


def test_python_hops_that_block_every_hop_thread_do_not_hold_up_other_runs_bookkeeping(tiny_path: Path) -> None:
    # Sync Python hops waiting on something slow (an API, a lock) filled the hop threads, and every other run then
    # waited for one too: to read its session's history, store its record, look up or fill the response cache.
    release, order = threading.Event(), []
    entered = threading.Semaphore(0)

    def wait() -> str:
        entered.release()
        release.wait(WAIT_S)
        order.append("blocked hop")
        return "done"

    with wb.Workbench(hop_threads=2, store=wb.InMemoryContextStore()) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        blocked = bench.chain({"name": "blocked", "hops": [{"name": "wait", "call": wait}]})
        qa = bench.chain({"name": "qa", "hops": [
            {"name": "answer", "model": "tiny", "prompt": "Q: {{ question }}\nA:", "max_new_tokens": 2,
             "cache": "exact"}]})
        waiting = [threading.Thread(target=blocked.run) for _ in range(2)]
        for thread in waiting:
            thread.start()
        for _ in waiting:
            assert entered.acquire(timeout=WAIT_S)  # both hop threads are taken
        try:
            qa.run(question="Why?", session="s1")  # history read, cache looked up and filled, record stored
            order.append("session run")
        finally:
            release.set()
            for thread in waiting:
                thread.join(WAIT_S)
        assert order[0] == "session run"
        assert len(bench.session("s1").records()) == 1


@pytest.mark.parametrize("how", ["run", "stream", "arun", "amap", "astream"])
def test_python_hops_that_run_another_chain_finish_when_they_hold_every_hop_thread(tiny_path: Path, how: str) -> None:
    # A Python hop that runs a sub-chain (chain.run inside it) waits on a hop thread; with as many such hops in
    # flight as there are hop threads (a map at concurrency >= hop_threads, 64 by default), the sub-chains' own
    # Python hops and templates found no thread, and the map hung forever. The waiting hop thread now runs them.
    # chain.stream inside a hop hung the same way after chain.run was mended; its waiting thread runs them too.
    # So did asyncio.run(chain.arun(...)) (amap, astream) in a sync hop: the loop it runs takes the work.
    with wb.Workbench(hop_threads=2, store=wb.InMemoryContextStore()) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        inner = bench.chain({"name": "inner", "hops": [
            {"name": "shout", "call": lambda word: word.upper()},
            {"name": "answer", "model": "tiny", "max_new_tokens": 2,
             "prompt": "{% if shout %}{{ shout }}{% endif %}: {{ word }}"}],  # rendered in the hop pool too
            "output": "shout"})

        async def streamed(word: str) -> str:
            return [e.run.output async for e in inner.astream(word=word) if e.kind == "run_finished"][0]

        def sub(word: str) -> str:
            if how == "stream":
                return [e.run.output for e in inner.stream(word=word) if e.kind == "run_finished"][0]
            if how == "arun":
                return asyncio.run(inner.arun(word=word)).output
            if how == "amap":
                return asyncio.run(inner.amap([{"word": word}]))[0].output
            return asyncio.run(streamed(word)) if how == "astream" else inner.run(word=word).output

        outer = bench.chain({"name": "outer", "hops": [{"name": "sub", "call": sub}]})
        result: dict[str, Any] = {}
        mapping = threading.Thread(target=lambda: result.update(batch=outer.map(
            [{"word": w} for w in "abcdef"], concurrency=4)), daemon=True)
        mapping.start()
        mapping.join(WAIT_S)
        assert not mapping.is_alive(), "the map hung"
        assert [run.output for run in result["batch"]] == list("ABCDEF")


def test_settings_swept_with_numpy_are_taken_as_the_numbers_they_hold(tiny_bench: wb.Workbench) -> None:
    # for n in np.arange(...): every such setting was refused ("max_new_tokens must be an integer >= 1, got
    # np.int64(4)"), or passed a check and failed later ("Object of type int64 is not JSON serializable").
    import numpy as np

    tokens, temperature, seed = np.arange(4, 5)[0], np.float32(0.5), np.int64(3)
    assert tiny_bench.generate("tiny", "Hi", max_new_tokens=tokens, temperature=temperature, seed=seed).tokens_out <= 4
    params = wb.GenerationParams(max_new_tokens=tokens, top_k=np.int64(5), temperature=temperature)
    assert (type(params.max_new_tokens), type(params.top_k), type(params.temperature)) == (int, int, float)
    assert type(wb.DynamicBatching(max_batch=np.int64(8), max_wait_ms=np.float32(5)).max_batch) is int
    chain = tiny_bench.chain({"name": "swept", "hops": [
        {"name": "answer", "model": "tiny", "prompt": "Q: {{ question }}\nA:", "max_new_tokens": tokens}]})
    assert chain.spec.hop("answer").params.max_new_tokens == 4
    assert len(chain.map([{"question": "Why?"}] * 2, concurrency=np.int64(2))) == 2
    with pytest.raises(wb.InvalidInput, match="top_k must be an integer"):
        wb.GenerationParams(top_k=np.bool_(True))  # a numpy bool is no number setting, as a bool is not


# -- inputs and failures -----------------------------------------------------------------------


def test_missing_input_is_refused_before_any_hop_runs(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain(DEMO_SPEC)
    spans_before = len(tiny_bench.traces())
    with pytest.raises(wb.MissingInputError, match="needs input 'question'") as info:
        chain.run()
    assert "plan, answer" in str(info.value)
    with pytest.raises(wb.MissingInputError, match="did you mean 'question'"):
        chain.run(questoin="What?")
    with pytest.raises(wb.MissingInputError, match="takes no input 'quest'"):
        chain.run(question="What?", quest="x")
    with pytest.raises(wb.MissingInputError):
        chain.map([{"question": "ok"}, {"questoin": "typo"}])
    assert len(tiny_bench.traces()) == spans_before  # no chain, hop or model span was started


def test_a_template_that_misspells_a_hop_is_told_so_not_asked_for_an_input(tiny_bench: wb.Workbench) -> None:
    # {{ paln }} for {{ plan }}: the spec takes it for a chain input, and the run said only "needs input 'paln'",
    # with the hint to pass chain.run(paln=..., question=...).
    chain = tiny_bench.chain("""
name: typo
hops:
  - {name: plan, model: tiny, prompt: "Q: {{ question }}", max_new_tokens: 2}
  - {name: answer, model: tiny, prompt: "{{ paln }} {{ question }}", max_new_tokens: 2}
""")
    with pytest.raises(wb.MissingInputError, match="did you mean hop 'plan'") as info:
        chain.run(question="What?")
    assert "hop 'answer'" in str(info.value) and "line 5" in str(info.value)
    assert "paln=..." not in str(info.value)


def test_a_python_hop_that_takes_keywords_only_gets_the_context_as_keywords(tiny_bench: wb.Workbench) -> None:
    # def collect(**values): it takes the whole context, like def collect(context), but was called with the context
    # as one positional argument, and every run failed: "TypeError: collect() takes 0 positional arguments but 1
    # was given".
    def collect(**values: Any) -> list[str]:
        return sorted(values)

    chain = tiny_bench.chain({"name": "keywords", "hops": [
        {"name": "answer", "model": "tiny", "prompt": "Q: {{ question }}\nA:", "max_new_tokens": 2},
        {"name": "collect", "call": collect}]})
    assert chain.run(question="Why?").output == ["answer", "history", "question", "session"]


def _explode(plan: str) -> str:
    raise ValueError(f"cannot use {plan!r}")


def test_failing_hop_raises_hop_failed_keeping_finished_outputs(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain({"name": "breaks", "hops": [
        {"name": "plan", "call": lambda question: f"plan:{question}"},
        {"name": "boom", "call": _explode},
        {"name": "after", "call": lambda boom: boom},
    ]})
    with pytest.raises(wb.HopFailed) as info:
        chain.run(question="q")
    error = info.value
    assert error.hop == "boom"
    assert isinstance(error.cause, ValueError)
    assert "hop 'boom' failed: ValueError: cannot use 'plan:q'" in str(error)
    assert error.run is not None and error.run.outputs == {"plan": "plan:q"}
    assert error.run.status == "error"
    table = error.run.trace.table().set_index("name")
    assert table.loc["hop boom", "status_code"] == "ERROR"
    assert "cannot use" in table.loc["hop boom", "status_message"]
    assert table.loc["chain breaks", "status_code"] == "ERROR"
    assert table.loc["hop plan", "status_code"] == "OK"
    assert "hop after" not in table.index


def _double_or_fail(n: str) -> str:
    time.sleep(0.02 * (6 - int(n)))  # early inputs finish last
    if n == "3":
        raise RuntimeError("three is unlucky")
    return n * 2


def test_map_keeps_input_order_and_failures_do_not_lose_the_others(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain({"name": "m", "hops": [{"name": "double", "call": _double_or_fail}]})
    runs = chain.map([{"n": str(i)} for i in range(6)], concurrency=4)
    assert [r.inputs["n"] for r in runs] == [str(i) for i in range(6)]
    assert [r.output for r in runs] == ["00", "11", "22", None, "44", "55"]
    assert [r.ok for r in runs] == [True, True, True, False, True, True]
    assert runs[3].error is not None and runs[3].error.hop == "double"
    assert "three is unlucky" in str(runs[3].error)
    assert len({r.id for r in runs}) == len({r.trace_id for r in runs}) == 6
    assert chain.map([]) == []


# -- sessions and the sandbox ------------------------------------------------------------------


def test_session_history_reaches_the_next_runs_template(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain(dedent(
        """\
        name: chat
        hops:
          - name: reply
            model: tiny
            prompt: "{{ history }}\\nQuestion: {{ question }}\\nAnswer:"
            max_new_tokens: 12
        """
    ))
    first = chain.run(session="s1", question="What is the capital of France?")
    assert first.output
    assert _hop_spans(first)["reply"].attributes["input.value"].startswith("\nQuestion:")  # no history yet
    second = chain.run(session="s1", question="How many hops does this chain have?")
    prompt = _hop_spans(second)["reply"].attributes["input.value"]
    assert "question: What is the capital of France?" in prompt
    assert f"output: {first.output}" in prompt

    history = tiny_bench.session("s1").history()
    assert list(history["run_id"]) == [first.id, second.id]
    assert list(history["output"]) == [first.output, second.output]
    assert list(history["input.question"]) == ["What is the capital of France?", "How many hops does this chain have?"]
    assert tiny_bench.session("other").history().empty
    alone = chain.run(question="What is the capital of France?")  # no session: no history
    assert _hop_spans(alone)["reply"].attributes["input.value"].startswith("\nQuestion:")


@pytest.mark.parametrize(
    "prompt",
    ["{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}", "{{ lipsum.__globals__['os'] }}"],
)
def test_templates_are_sandboxed(tiny_bench: wb.Workbench, prompt: str) -> None:
    chain = tiny_bench.chain({"name": "escape", "hops": [{"name": "probe", "model": "tiny", "prompt": prompt}]})
    with pytest.raises(wb.HopFailed, match="sandbox refused") as info:
        chain.run()
    assert info.value.hop == "probe"
    assert isinstance(info.value.cause, wb.TemplateError)
    names = [s.name for s in info.value.run.trace.spans]
    assert "text_completion tiny" not in names  # nothing reached the model


def test_a_closed_workbench_says_so_for_every_way_in(tiny_path: Any, tmp_path: Any) -> None:
    bench = wb.Workbench(data_dir=tmp_path)
    bench.load("tiny", tiny_path, device="cpu")
    chain = bench.chain({"name": "after", "hops": [{"name": "say", "model": "tiny", "prompt": "{{ q }}",
                                                     "max_new_tokens": 2}]})
    chain.run(q="before", session="kept")
    bench.close()
    bench.close()  # twice is harmless
    assert bench.closed
    attempts = {
        "run chain 'after'": lambda: chain.run(q="a"),
        "run chain 'after' ": lambda: chain.map([{"q": "a"}, {"q": "b"}]),
        "load 'tiny'": lambda: bench.load("tiny", tiny_path, device="cpu"),
        "register 'other'": lambda: bench.register("other", tiny_path),
        "generate": lambda: bench.generate("tiny", "a"),
        "build a chain": lambda: bench.chain({"name": "later", "hops": [{"name": "say", "model": "tiny",
                                                                         "prompt": "hi"}]}),
        "compare strategies on chain 'after'": lambda: wb.compare(chain, [{"q": "a"}], progress=False),
    }
    for doing, attempt in attempts.items():
        with pytest.raises(wb.WorkbenchClosed) as info:
            attempt()
        assert info.value.message == f"this workbench is closed, so it cannot {doing.strip()}"
        assert "wb.Workbench()" in str(info.value.hint)
    # What it wrote stays for the next one on the same data_dir.
    with wb.Workbench(data_dir=tmp_path) as again:
        assert len(again.session("kept").records()) == 1


def test_the_default_workbench_comes_back_after_it_was_closed() -> None:
    first = wb.current()
    first.close()
    second = wb.current()
    try:
        assert second is not first and not second.closed
    finally:
        second.close()


def test_a_refused_nan_retry_budget_leaves_the_models_breaker_closed(tiny_bench: wb.Workbench) -> None:
    with pytest.raises(wb.SpecError, match="retry.max_total_s must be a number"):
        tiny_bench.chain(HOP_HEAD + "    retry:\n      max_total_s: .nan\n")
    assert tiny_bench.breakers().set_index("model").loc["tiny", "state"] == "closed"
    assert tiny_bench.chain(HOP_HEAD).run(question="still fine?").ok  # an unrelated chain still runs


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"question": "caf\udce9"}, "input 'question' of chain 'qa' is not valid text: it holds a lone surrogate"),
        ({"question": "q", "session": "s\ud800"}, "the session id is not valid text: it holds a lone surrogate"),
    ],
    ids=["input", "session"],
)
def test_text_that_is_not_valid_unicode_is_refused_before_any_hop(
    tiny_bench: wb.Workbench, inputs: dict[str, str], message: str
) -> None:
    chain = tiny_bench.chain(HOP_HEAD)
    with pytest.raises(wb.InvalidInput, match=message) as info:
        chain.run(**inputs)
    assert "errors='replace'" in str(info.value.hint)
    with pytest.raises(wb.InvalidInput, match=message):
        chain.map([{"question": inputs["question"]}], session=inputs.get("session"))
    assert chain.run(question="café").ok


def test_a_hop_output_that_is_not_valid_unicode_fails_its_reader_clearly(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain({"name": "bad", "hops": [
        {"name": "decode", "call": lambda question: b"caf\xe9".decode("utf-8", "surrogateescape")},
        {"name": "ask", "model": "tiny", "prompt": "{{ decode }}?", "max_new_tokens": 2},
    ]})
    with pytest.raises(wb.HopFailed, match="the prompt of hop 'ask' is not valid text") as info:
        chain.run(question="q")
    assert info.value.hop == "ask" and isinstance(info.value.cause, wb.InvalidInput)
    with pytest.raises(wb.InvalidInput, match="the prompt is not valid text"):  # a direct call says so too
        tiny_bench.generate("tiny", "caf\udce9")


def test_a_spec_file_path_given_as_text_is_told_to_be_a_path(tiny_bench: wb.Workbench, tmp_path: Path) -> None:
    path = tmp_path / "qa.yaml"
    path.write_text("name: qa\nhops:\n  - {name: n, call: workbench.demo:canned_answer}\n", encoding="utf-8")
    with pytest.raises(wb.SpecError, match="not str") as info:
        tiny_bench.chain(str(path))  # text is YAML, and a lone path parses as a string
    assert f"bench.chain(Path({str(path)!r}))" in str(info.value.hint)
    assert tiny_bench.chain(path).name == "qa"  # as the hint says


def test_a_hop_calling_sys_exit_fails_its_hop_and_the_workbench_runs_on(bench: wb.Workbench) -> None:
    def cli(question: str) -> str:  # a command-line tool's entry point, reused as a hop
        argparse.ArgumentParser().parse_args(["--bad"])  # exits with status 2
        return question

    async def done(question: str) -> str:
        sys.exit(0)

    for call in (cli, done):
        chain = bench.chain({"name": f"exits_{call.__name__}", "hops": [{"name": "tool", "call": call}]})
        with pytest.raises(wb.HopFailed, match=r"hop 'tool' failed: .*sys.exit\((2|0)\)"):
            chain.run(question="hi")
    echo = bench.chain({"name": "echo", "hops": [{"name": "say", "call": lambda question: question}]})
    assert echo.run(question="still here").output == "still here"  # the workbench's loop did not stop


def test_a_hop_error_with_a_huge_message_is_described_in_bounded_size_and_kept_whole(bench: wb.Workbench) -> None:
    page = "<html>" + "Service Unavailable. " * 50_000 + "</html>"  # a client library quoting a whole error page

    def fetch(question: str) -> str:
        raise RuntimeError(page)

    chain = bench.chain({"name": "fetcher", "hops": [
        {"name": "fetch", "call": fetch, "retry": {"attempts": 3, "backoff_ms": 1}}]})
    with pytest.raises(wb.HopFailed) as info:
        chain.run(question="q")
    error = info.value
    assert len(error.message) < 2_500 and "more characters)" in error.message
    assert page in str(error.cause.__cause__ or error.cause)  # the exception itself keeps it whole
    assert isinstance(error.run, wb.Run)
    hop = next(s for s in error.run.trace.spans if s.name == "hop fetch")
    failed = [e for e in hop.events if e.name == "attempt.failed"]
    assert len(failed) == 3 and all(len(str(e.attributes["exception.message"])) < 2_500 for e in failed)


def test_an_error_with_no_text_is_described_by_its_name_alone() -> None:
    # A cancelled hop's span status read "CancelledError: ", with nothing after the colon.
    from workbench.errors import describe

    assert describe(asyncio.CancelledError()) == "CancelledError"
    assert describe(KeyError()) == "KeyError" and describe(KeyError("k")) == "KeyError: 'k'"


def test_a_run_or_batch_with_a_huge_output_shows_a_page_of_bounded_size(bench: wb.Workbench) -> None:
    document = "word " * 200_000  # a hop that returns a whole document: 1 MB
    chain = bench.chain({"name": "reader", "hops": [
        {"name": "read", "call": lambda question: document}, {"name": "count", "call": lambda read: len(read)}]})
    run = chain.run(question="q")
    assert run.outputs["read"] == document  # kept whole; only its display is cut
    page = run._repr_html_()
    assert len(page) < 10_000 and "<b>count</b>" in page and "1000000" in page
    chain.update({**chain.spec.source, "output": "read"})
    batch = chain.map([{"question": str(n)} for n in range(300)])
    page = batch._repr_html_()
    assert len(page) < 50_000 and "300 inputs: 300 ok" in page  # not 300 documents, nor 300 rows


def test_a_hop_output_json_cannot_hold_is_kept_and_traced_not_a_failure(bench: wb.Workbench) -> None:
    def graph(question: str) -> dict[str, Any]:
        node: dict[str, Any] = {"name": question}
        node["parent"] = node  # a cycle
        return node

    chain = bench.chain({"name": "pairs", "hops": [
        {"name": "scores", "call": lambda question: {("a", "b"): 0.5}},  # tuple keys
        {"name": "graph", "call": graph},
        {"name": "best", "call": lambda scores, graph: max(scores, key=scores.get)}]})
    run = chain.run(question="q")
    assert run.output == ("a", "b") and run.outputs["graph"]["parent"] is run.outputs["graph"]
    shown = run.trace.table().set_index("name")["attributes.output.value"]
    assert shown["hop scores"] == "{('a', 'b'): 0.5}" and shown["hop graph"].startswith("{'name': 'q', 'parent': {")


def test_a_hop_output_whose_repr_raises_too_is_kept_and_traced_not_a_failure(bench: wb.Workbench) -> None:
    # An int of more than 4,300 digits (sys.get_int_max_str_digits) has no str or repr: the trace's preview of the
    # output failed the run with that ValueError, losing an answer the hop had given.
    chain = bench.chain({"name": "big", "hops": [{"name": "power", "call": lambda: 10**5000}]})
    run = chain.run()
    assert run.output == 10**5000
    shown = run.trace.table().set_index("name")["attributes.output.value"]
    assert shown["hop power"] == "<int: its repr raised ValueError>"


def test_tracing_a_huge_input_reads_no_more_of_it_than_its_preview_shows(bench: wb.Workbench) -> None:
    """A 50 MB document as a chain's input cost 555 ms of the event loop per run against 2 ms for a small one (every
    concurrent run stalled): its JSON preview encoded the whole text (and a bytes value's whole str) once per span
    it reached, to keep 4000 characters of it."""
    document, scan = "word " * 4_000_000, b"%PDF" * 5_000_000  # 20 MB each
    chain = bench.chain({"name": "reader", "hops": [
        {"name": "count", "call": lambda document, scan: len(document) + len(scan)}]})
    chain.run(document="warm", scan=b"up")
    tracemalloc.start()
    try:
        run = chain.run(document=document, scan=scan)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert run.output == 40_000_000
    assert peak < 2_000_000  # not one more copy of either
    shown = run.trace.table().set_index("name")["attributes.input.value"]
    for name in ("chain reader", "hop count"):
        assert shown[name].startswith('{"document": "word word') and len(shown[name]) == 4001  # 4000 and the "…"


def test_a_python_hop_that_yields_is_refused_not_run_into_a_generator_output(bench: wb.Workbench) -> None:
    def passages(question: str) -> Any:
        yield f"about {question}"

    async def apassages(question: str) -> Any:
        yield f"about {question}"

    for call in (passages, apassages):
        with pytest.raises(wb.SpecError, match=f"{call.__name__} yields: a Python hop returns its output") as info:
            bench.chain({"name": "gen", "hops": [{"name": "find", "call": call}]})
        assert (info.value.hop, info.value.field) == ("find", "call")


def test_a_hop_reads_the_reserved_session_as_the_runs_session_id(bench: wb.Workbench) -> None:
    chain = bench.chain({"name": "per_user", "hops": [
        {"name": "greet", "call": lambda question, session: f"{question} for {session}"}]})
    assert chain.inputs == ("question",)  # session is no input of the chain, but the run's own
    assert chain.run(question="hi", session="alice").output == "hi for alice"
    assert chain.run(question="hi").output == "hi for None"


def _echo(text: str) -> str:
    return text


def test_the_runs_kept_are_bounded_by_what_their_inputs_and_outputs_hold(
    bench: wb.Workbench, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only their number was bounded (10,000): a served chain given 1 MB inputs held ~10 GB of runs.
    import workbench.bench

    monkeypatch.setattr(workbench.bench, "MAX_RUN_BYTES_KEPT", 2 * 2**20)
    chain = bench.chain({"name": "echo", "hops": [{"name": "e", "call": _echo}]})
    runs = [chain.run(text=f"{i}" * 500_000) for i in range(10)]  # ~0.5 MB each, kept once though output too
    kept = bench.runs()
    assert kept == runs[-len(kept):] and 3 <= len(kept) <= 4  # the newest, within the bound
    assert bench.run().id == runs[-1].id
    alone = chain.run(text="x" * 3_000_000)  # one run past the bound alone is still the last run
    assert bench.runs() == [alone]
    small = [chain.run(text="small") for _ in range(20)]
    assert bench.runs() == small  # the big one made way for the next, and small runs are kept by the thousand


def test_a_prompt_that_its_sessions_history_pushed_past_the_window_says_so_in_its_hint(
    tiny_bench: wb.Workbench,
) -> None:
    # Each run of a session adds to the next one's prompt: past the window every later run failed alike, and the hint
    # said to shorten the prompt, which the caller had not lengthened.
    chain = tiny_bench.chain(dedent(
        """\
        name: chat_long
        history: 5
        hops:
          - name: reply
            model: tiny
            prompt: "{{ history }}\\nQuestion: {{ question }}\\nAnswer:"
            max_new_tokens: 4
        """
    ))
    question = "Tell me about the capital cities of every country " * 6
    assert chain.run(question=question).ok  # alone, it fits
    failed = None
    for _ in range(10):
        try:
            chain.run(session="long", question=question)
        except wb.HopFailed as exc:
            failed = exc
            break
    assert failed is not None and isinstance(failed.cause, wb.ContextWindowExceeded)
    hint = failed.cause.hint or ""
    assert "its prompt holds the last" in hint and "of session 'long'" in hint
    assert "history: (5 now)" in hint and "bench.session('long').forget()" in hint
    with pytest.raises(wb.HopFailed) as plain:  # no session: the hint of any prompt too long
        chain.run(question=question * 8)
    assert "session" not in (plain.value.cause.hint or "")
