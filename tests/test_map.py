"""chain.map: runs kept as they finish, interrupts that lose nothing, resume, and failures among many runs."""

from __future__ import annotations

import _thread
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import WAIT_S, eventually

import workbench as wb


class Calls:
    """A thread-safe tally of the inputs a Python hop was called with."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[str] = []

    def add(self, n: str) -> None:
        with self._lock:
            self.seen.append(n)

    def __len__(self) -> int:
        with self._lock:
            return len(self.seen)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.seen)


def inputs(count: int) -> list[dict[str, str]]:
    return [{"n": str(i)} for i in range(count)]


def model_calls(bench: wb.Workbench) -> int:
    return sum(1 for span in bench.traces().spans if span.name == "text_completion tiny")


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event that gated hops wait on; set at the end whatever happens, so no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def no_leaked_threads(tiny_bench: wb.Workbench) -> Iterator[None]:
    """Fail the test if a thread it started is still alive, or if one of the workbench's pooled threads is still at work."""
    before = set(threading.enumerate())
    yield
    # The workbench's long-lived threads: idle is fine, busy is not.
    pooled = ("workbench-hop", "workbench-io", "workbench-loop")
    started = [t for t in threading.enumerate() if t not in before and not t.name.startswith(pooled)]
    for thread in started:
        thread.join(timeout=WAIT_S)
    assert not [t.name for t in started if t.is_alive()]
    deadline = time.monotonic() + WAIT_S
    while tiny_bench.runs_in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tiny_bench.runs_in_flight == 0


# -- kept as each run finishes ---------------------------------------------------------------


def test_runs_in_flight_counts_the_runs_walking_now(tiny_bench: wb.Workbench, release: threading.Event) -> None:
    waiting = Calls()

    def held(n: str) -> str:
        waiting.add(n)
        release.wait(WAIT_S)
        return n

    chain = tiny_bench.chain({"name": "counted", "hops": [{"name": "hold", "call": held}]})
    assert tiny_bench.runs_in_flight == 0
    mapper = threading.Thread(target=chain.map, args=(inputs(5),), kwargs={"concurrency": 3})
    mapper.start()
    try:
        eventually(lambda: len(waiting) == 3, "three runs to be in flight")
        assert tiny_bench.runs_in_flight == 3  # it read 0 whatever ran
    finally:
        release.set()
        mapper.join(WAIT_S)
    eventually(lambda: tiny_bench.runs_in_flight == 0, "every run to end")


def test_each_run_is_kept_as_it_finishes(tiny_bench: wb.Workbench, no_leaked_threads: None) -> None:
    gates = {str(i): threading.Event() for i in range(4)}

    def gated(n: str) -> str:
        gates[n].wait(WAIT_S)
        return f"done {n}"

    chain = tiny_bench.chain({"name": "gated", "hops": [{"name": "work", "call": gated}]})
    returned: list[wb.RunBatch] = []
    mapper = threading.Thread(target=lambda: returned.append(chain.map(inputs(4), concurrency=4, session="kept")))
    mapper.start()
    eventually(lambda: chain.last_batch is not None, "the map to start")
    batch = chain.last_batch
    assert batch is not None and batch.missing == [0, 1, 2, 3]
    released: list[int] = []
    for index in (2, 0, 3):  # each finishes while the others still run
        gates[str(index)].set()
        released.append(index)
        eventually(lambda: len(batch.finished) == len(released), f"run {index} to be kept")
        assert sorted(i for i, run in enumerate(batch) if run is not None) == sorted(released)
        assert len(tiny_bench.session("kept").records()) == len(released)  # and in the session store
        assert not batch.complete and batch[1] is None
    gates["1"].set()
    mapper.join(WAIT_S)
    assert returned == [batch] and returned[0] is batch
    assert batch.complete and [run.output for run in batch] == ["done 0", "done 1", "done 2", "done 3"]
    assert batch.summary() == "4 inputs: 4 ok, 0 failed, 0 not run"


# -- interrupts ------------------------------------------------------------------------------


def _interrupted(
    chain: wb.Chain, count: int, release: threading.Event, calls: Calls, ready: Callable[[], bool], what: str
) -> pytest.ExceptionInfo[wb.MapInterrupted]:
    """``chain.map`` of ``count`` inputs, two at a time, stopped by a Ctrl-C (what the notebook's stop button does: a
    KeyboardInterrupt in the main thread) once ``ready()``; the MapInterrupted it raised."""
    missed: list[str] = []

    def ctrl_c() -> None:
        try:
            eventually(ready, what)
        except AssertionError as exc:  # say so, and let the map finish instead of waiting out every gate
            missed.append(f"{exc}; calls so far: {calls.counts()}")
            release.set()
            return
        _thread.interrupt_main()

    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        with pytest.raises(wb.MapInterrupted) as info:
            chain.map(inputs(count), concurrency=2)
    finally:
        assert not missed, missed[0]  # the interrupt was never sent: this, not the map, is what went wrong
    return info


def test_ctrl_c_returns_what_finished_and_resume_runs_only_the_rest(
    tiny_bench: wb.Workbench, release: threading.Event, no_leaked_threads: None, ctrl_c_raises: None
) -> None:
    calls = Calls()

    def work(n: str) -> str:
        calls.add(n)
        if int(n) >= 3:  # the first three finish at once; the next two hold their workers until released
            release.wait(WAIT_S)
        return f"work {n}"

    chain = tiny_bench.chain({"name": "interrupted", "hops": [
        {"name": "work", "call": work},
        {"name": "tag", "call": lambda n: n.upper()},  # runs beside 'work', on the hop pool
        {"name": "say", "model": "tiny", "prompt": "{{ work }} {{ tag }}", "max_new_tokens": 2},
    ]})

    info = _interrupted(chain, 10, release, calls, lambda: chain.last_batch is not None
                        and len(chain.last_batch.finished) == 3 and len(calls) == 5, "three runs, two in flight")
    batch = info.value.batch
    assert isinstance(info.value, KeyboardInterrupt)
    assert batch is chain.last_batch and batch.interrupted
    assert "interrupted with 3 of 10 inputs run" in str(info.value)
    assert "resume=chain.last_batch" in str(info.value)
    assert [i for i, run in enumerate(batch) if run is not None] == [0, 1, 2]  # returned at once: two still run
    assert batch.summary() == "10 inputs: 3 ok, 0 failed, 7 not run (interrupted)"
    assert list(batch.table()["status"]) == ["ok"] * 3 + ["not run"] * 7

    release.set()  # the runs in flight finish in the background and land in the batch
    eventually(lambda: batch[3] is not None and batch[4] is not None, "the runs in flight to land")
    assert batch[3].ok and batch[4].ok and batch[4].outputs["tag"] == "4"
    assert batch.missing == [5, 6, 7, 8, 9]
    assert calls.counts() == Counter(str(i) for i in range(5))  # inputs not started never start

    models_before = model_calls(tiny_bench)
    again = chain.map(inputs(10), concurrency=2, resume=batch)
    assert again.complete and not again.interrupted
    assert all(again[i] is batch[i] for i in range(5))  # the same runs, not re-runs
    assert calls.counts() == Counter(str(i) for i in range(10))  # each input ran exactly once
    assert model_calls(tiny_bench) == models_before + 5
    assert tiny_bench.generate("tiny", "still answering?", max_new_tokens=2).tokens_out == 2


def test_resuming_at_once_after_ctrl_c_waits_for_the_runs_still_in_flight_instead_of_running_them_again(
    tiny_bench: wb.Workbench, release: threading.Event, no_leaked_threads: None, ctrl_c_raises: None
) -> None:
    """The cell after an interrupt, run straight away: the runs the interrupt left in flight are the resumed map's,
    not run a second time beside themselves (the model's work twice, and their Python hops' side effects)."""
    calls = Calls()

    def work(n: str) -> str:
        calls.add(n)
        release.wait(WAIT_S)  # every run holds until released: the first two are in flight at the interrupt
        return f"work {n}"

    chain = tiny_bench.chain({"name": "resumed", "hops": [{"name": "work", "call": work}]})
    batch = _interrupted(chain, 4, release, calls, lambda: len(calls) == 2, "two runs in flight").value.batch
    assert batch.missing == [0, 1, 2, 3] and len(calls) == 2  # two in flight, none landed yet

    def release_once_resumed() -> None:  # the new map has read the old batch (it is chain.last_batch now)
        eventually(lambda: chain.last_batch is not batch, "the resumed map to start")
        release.set()

    threading.Thread(target=release_once_resumed, daemon=True).start()
    again = chain.map(inputs(4), concurrency=2, resume=batch)
    assert again.complete and [run.output for run in again] == [f"work {i}" for i in range(4)]
    assert calls.counts() == Counter(str(i) for i in range(4))  # each input ran exactly once
    eventually(lambda: batch[0] is not None and batch[1] is not None, "the old batch to get its runs too")
    assert again[0] is batch[0] and again[1] is batch[1]  # the very runs, in both batches


def test_a_keyboard_interrupt_raised_in_a_hop_stops_the_map_and_keeps_the_rest(
    tiny_bench: wb.Workbench, release: threading.Event, no_leaked_threads: None
) -> None:
    calls = Calls()

    def work(n: str) -> str:
        calls.add(n)
        if n == "3":
            raise KeyboardInterrupt
        if int(n) > 3:
            release.wait(WAIT_S)
        return f"work {n}"

    chain = tiny_bench.chain({"name": "stops", "hops": [{"name": "work", "call": work}]})
    with pytest.raises(wb.MapInterrupted) as info:
        chain.map(inputs(8), concurrency=1, session="stops")
    batch = info.value.batch
    assert batch is chain.last_batch and batch.interrupted
    assert [run.output for run in batch[:3]] == ["work 0", "work 1", "work 2"]
    assert batch[3] is None  # the interrupted run has no result
    release.set()
    eventually(lambda: len(calls) == 4 or batch[4] is not None, "the map's worker to settle")
    assert len(calls) <= 5  # at most the run that had started beside the interrupt; the rest were cancelled
    # The interrupted run's trace is closed, and says so.
    chains = tiny_bench.traces().table().query("name == 'chain stops'")
    assert list(chains["status_code"]).count("ERROR") == 1
    assert chains["status_message"].str.contains("interrupted: KeyboardInterrupt").any()
    assert [r.output for r in tiny_bench.session("stops").records()][:3] == ["work 0", "work 1", "work 2"]


# -- resume ----------------------------------------------------------------------------------


def test_resume_reuses_finished_runs_and_makes_no_model_call_for_them(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain({"name": "resumable", "hops": [
        {"name": "say", "model": "tiny", "prompt": "Q: {{ q }}\nA:", "max_new_tokens": 2},
    ]})
    first = chain.map([{"q": q} for q in ("a", "b", "c")], concurrency=3)
    before = model_calls(tiny_bench)
    more = [{"q": q} for q in ("c", "a", "d", "b", "e")]
    second = chain.map(more, concurrency=3, resume=first)
    assert model_calls(tiny_bench) == before + 2  # only 'd' and 'e' ran
    assert [run.inputs["q"] for run in second] == ["c", "a", "d", "b", "e"]
    assert second[0] is first[2] and second[1] is first[0] and second[3] is first[1]

    before = model_calls(tiny_bench)
    from_history = chain.map(more, resume=tiny_bench.runs())  # any Runs will do, e.g. the workbench's
    assert model_calls(tiny_bench) == before and [r.id for r in from_history] == [r.id for r in second]

    other = tiny_bench.chain({"name": "other", "hops": [
        {"name": "say", "model": "tiny", "prompt": "Q: {{ q }}\nA:", "max_new_tokens": 2},
    ]})
    before = model_calls(tiny_bench)
    other.map([{"q": "a"}], resume=first)  # same inputs, another chain: not reused
    assert model_calls(tiny_bench) == before + 1


def test_resume_reruns_runs_of_an_edited_chain(tiny_bench: wb.Workbench) -> None:
    spec = {"name": "edited",
            "hops": [{"name": "say", "model": "tiny", "prompt": "Q: {{ q }}\nA:", "max_new_tokens": 2}]}
    chain = tiny_bench.chain(spec)
    first = chain.map([{"q": "a"}, {"q": "b"}])
    chain.set({"say.max_new_tokens": 5})  # another answer length: the first runs answered another configuration
    before = model_calls(tiny_bench)
    second = chain.map([{"q": "a"}, {"q": "b"}], resume=first)
    assert model_calls(tiny_bench) == before + 2
    assert all(run.config_version == chain.version for run in second)
    chain.unset("say.max_new_tokens")  # back to the first configuration: its runs serve again
    before = model_calls(tiny_bench)
    assert [r.id for r in chain.map([{"q": "a"}], resume=first)] == [first[0].id] and model_calls(tiny_bench) == before

    other_prompt = tiny_bench.chain({**spec, "hops": [{**spec["hops"][0], "prompt": "Say {{ q }}:"}]})
    before = model_calls(tiny_bench)
    other_prompt.map([{"q": "a"}], resume=first)  # same name and inputs, another prompt: not reused
    assert model_calls(tiny_bench) == before + 1


def test_resume_tells_inputs_apart_by_their_keys_types(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain({"name": "keys", "hops": [{"name": "echo", "call": lambda q: repr(q)}]})
    first = chain.map([{"q": {1: "one"}}, {"q": {1: "mixed", "b": 2}}])
    second = chain.map([{"q": {"1": "one"}}, {"q": {"b": 2, 1: "mixed"}}], resume=first)
    assert second[0] is not first[0] and second[0].output == "{'1': 'one'}"  # a str key is another input
    assert second[1] is first[1]  # keys of mixed types, in another order: the same input


def test_resume_reruns_failed_runs_and_counts_repeated_inputs(tiny_bench: wb.Workbench) -> None:
    calls = Calls()
    flaky = {"fails": True}

    def work(n: str) -> str:
        calls.add(n)
        if n == "2" and flaky["fails"]:
            raise RuntimeError("not this time")
        return f"work {n}"

    chain = tiny_bench.chain({"name": "flaky", "hops": [{"name": "work", "call": work}]})
    first = chain.map([{"n": "1"}, {"n": "2"}, {"n": "1"}], concurrency=2)
    assert [run.ok for run in first] == [True, False, True]
    flaky["fails"] = False
    second = chain.map([{"n": "1"}, {"n": "2"}, {"n": "1"}, {"n": "1"}], resume=first)
    assert [run.ok for run in second] == [True, True, True, True]
    assert second[0] is first[0] and second[2] is first[2]  # each earlier run is reused once
    assert second[1] is not first[1]
    assert calls.counts() == Counter({"1": 3, "2": 2})  # the failed input and the third '1' ran again


# -- failures among many runs ----------------------------------------------------------------


def _fails_on_two(n: str) -> str:
    if n == "2":
        raise ValueError(f"cannot use {n}")
    return f"work {n}"


def test_errors_keep_records_the_failure_and_finishes_every_other_run(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain({"name": "keeps", "hops": [{"name": "work", "call": _fails_on_two}]})
    batch = chain.map(inputs(5), concurrency=3, session="keeps")  # errors="keep" is the default
    assert batch.complete and not batch.interrupted
    assert [run.ok for run in batch] == [True, True, False, True, True]
    assert batch.failed == [batch[2]] and batch[2].error is not None and batch[2].error.hop == "work"
    assert batch.summary() == "5 inputs: 4 ok, 1 failed, 0 not run"
    table = batch.table()
    assert list(table["status"]) == ["ok", "ok", "error", "ok", "ok"]
    assert "cannot use 2" in table["error"][2]
    records = {r.run_id: r for r in tiny_bench.session("keeps").records()}
    assert records[batch[2].id].status == "error" and "cannot use 2" in str(records[batch[2].id].error)
    assert sorted(records) == sorted(run.id for run in batch)


def test_errors_raise_stops_at_the_first_failure_and_keeps_what_finished(
    tiny_bench: wb.Workbench, release: threading.Event, no_leaked_threads: None
) -> None:
    calls = Calls()

    def work(n: str) -> str:
        calls.add(n)
        if int(n) > 2:
            release.wait(WAIT_S)  # nothing after the failure can finish before map has raised
        return _fails_on_two(n)

    chain = tiny_bench.chain({"name": "raises", "hops": [{"name": "work", "call": work}]})
    with pytest.raises(wb.HopFailed, match="hop 'work' failed: ValueError: cannot use 2") as info:
        chain.map(inputs(6), concurrency=1, errors="raise")
    batch = chain.last_batch
    assert batch is not None and not batch.interrupted
    assert info.value.run is batch[2] and batch[2].outputs == {}
    assert [run.output for run in batch[:2]] == ["work 0", "work 1"]
    assert batch[4] is None and batch[5] is None  # cancelled: at most input 3 had started
    release.set()
    eventually(lambda: len(calls) == 3 or batch[3] is not None, "the map's worker to settle")
    assert calls.counts()["4"] == calls.counts()["5"] == 0

    with pytest.raises(wb.WorkbenchError, match="errors='skip' is not a choice"):
        chain.map(inputs(1), errors="skip")  # type: ignore[arg-type]


def test_an_interrupted_batch_shows_itself() -> None:
    batch = wb.RunBatch("qa", [{"question": "a"}, {"question": "b"}])
    batch.interrupted = True
    assert repr(batch) == "<RunBatch of 'qa', 2 inputs: 0 ok, 0 failed, 2 not run (interrupted)>"
    page: Any = batch._repr_html_()
    assert "RunBatch of <b>qa</b>" in page and page.count("not run") == 3


# -- mistakes and closing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda chain: chain.map(["q1", "q2"]), wb.InvalidInput,
         "chain.map takes one mapping of inputs per run; item 0 is str 'q1'"),
        (lambda chain: chain.map([{0: "q1", 1: "a1"}]), wb.InvalidInput,  # a CSV row read without its header
         "takes inputs by name, and int 0 is not a name"),
        (lambda chain: chain.map(inputs(2), concurrency="8"), wb.WorkloadError,
         "concurrency must be a whole number >= 1, not '8'"),
        (lambda chain: chain.map(inputs(2), concurrency=0), wb.WorkloadError, "concurrency must be a whole number"),
        (lambda chain: chain.map(inputs(2), errors="skip"), wb.WorkloadError, "errors='skip' is not a choice"),
        (lambda chain: chain.map(inputs(2), resume=[1, 2]), wb.WorkloadError,
         "resume= takes Runs \\(or None\\); item 0 is int 1"),
        (lambda chain: asyncio.run(chain.amap(inputs(2), resume=True)), wb.WorkloadError,
         "resume= takes a RunBatch or a list of Runs, not bool"),
    ],
    ids=["strings-not-mappings", "keys-not-names", "concurrency-text", "concurrency-zero", "errors-choice", "resume-not-runs",
         "resume-not-iterable"],
)
def test_map_mistakes_are_refused_before_any_run(
    tiny_bench: wb.Workbench, call: Any, error: type, message: str
) -> None:
    chain = tiny_bench.chain({"name": "echo", "hops": [{"name": "echo", "call": lambda n: n}]})
    with pytest.raises(error, match=message) as info:
        call(chain)
    assert info.value.hint
    assert chain.last_batch is None  # nothing started
    assert [run.output for run in chain.map(inputs(2), concurrency=2)] == ["0", "1"]


def test_closing_the_workbench_during_a_map_says_so_on_the_runs_in_flight(tiny_path: Any, tmp_path: Any) -> None:
    bench = wb.Workbench(data_dir=tmp_path)
    bench.load("tiny", tiny_path, device="cpu")
    gate, waiting = threading.Event(), Calls()

    def held(n: str) -> str:
        waiting.add(n)
        gate.wait(WAIT_S)
        return n

    chain = bench.chain({"name": "held", "hops": [
        {"name": "hold", "call": held},
        {"name": "ask", "model": "tiny", "prompt": "{{ hold }}", "max_new_tokens": 2},
    ]})
    outcome: list[BaseException] = []

    def mapping() -> None:
        try:
            chain.map(inputs(6), concurrency=2)
        except wb.WorkbenchError as exc:
            outcome.append(exc)

    mapper = threading.Thread(target=mapping)
    mapper.start()
    try:
        eventually(lambda: len(waiting) == 2, "two runs to be in flight")
        bench.close()
    finally:
        gate.set()
        mapper.join(WAIT_S)
    assert len(outcome) == 1 and isinstance(outcome[0], wb.WorkbenchClosed)  # the map says why it stopped
    assert "this workbench is closed" in str(outcome[0])
    batch = chain.last_batch
    assert batch is not None and not any(run.ok for run in batch.finished)
    for run in batch.finished:  # a run that ended as the models went says so too, not "no model named 'tiny'"
        assert isinstance(run.error, wb.HopFailed) and isinstance(run.error.cause, wb.WorkbenchClosed)


def test_cancelling_an_awaited_map_marks_its_batch_interrupted_at_once(bench: wb.Workbench) -> None:
    async def work(n: str) -> str:
        if n != "0":
            await asyncio.sleep(60)
        return f"work {n}"

    chain = bench.chain({"name": "cancelled_map", "hops": [{"name": "work", "call": work}]})

    async def main() -> wb.RunBatch:
        task = asyncio.ensure_future(chain.amap(inputs(6), concurrency=2))
        while chain.last_batch is None or not chain.last_batch.finished:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert chain.last_batch is not None
        return chain.last_batch

    batch = asyncio.run(main())
    assert batch.interrupted and repr(batch).endswith("(interrupted)>")  # as the caller's cancel returned
    assert batch[0] is not None and batch[0].output == "work 0"
    eventually(lambda: bench.runs_in_flight == 0, "the cancelled runs to end")
    assert batch.missing == [1, 2, 3, 4, 5]  # runs in flight were cancelled with the map, none started after


def test_resume_never_takes_a_run_of_another_array_for_this_one(tiny_bench: wb.Workbench) -> None:
    chain = tiny_bench.chain({"name": "vectors", "hops": [{"name": "total", "call": lambda v: float(v.sum())}]})
    a = np.arange(2000.0)
    b = a.copy()
    b[1000] = 1e6  # differs in the middle, which numpy's repr of a long array leaves out
    first = chain.map([{"v": a}])
    again = chain.map([{"v": b}], resume=first)
    assert again[0] is not first[0] and again[0].output == float(b.sum())


# -- a checkpoint file: what finished outlives the process ------------------------------------------------------

STEPS = '''\
import os

CALLS = []


def step(n: str) -> object:
    if n == os.environ.get("DIE_AT"):
        os._exit(3)  # the process dies in the middle of the map, as the out-of-memory killer would end it
    CALLS.append(n)
    return {"set": {1, 2}} if n == "odd" else n * 2  # a set: no JSON holds it
'''
STEPS_SPEC = {"name": "steps", "hops": [{"name": "step", "call": "steps:step"}]}


@pytest.fixture
def steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The module ``steps`` (in tmp_path, importable here and in a child process), fresh for the test."""
    (tmp_path / "steps.py").write_text(STEPS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "steps", raising=False)
    import steps as module

    return module


def test_a_map_whose_process_died_runs_only_the_rest_from_its_checkpoint(tmp_path: Path, steps: Any) -> None:
    """Before, what a map had finished lived in its process only (chain.last_batch): a kernel that died an hour into
    a map of thousands of inputs lost every run."""
    path = tmp_path / "runs" / "steps.jsonl"  # its folder is made
    script = ("import sys, workbench as wb\n"
              "with wb.Workbench(store=wb.InMemoryContextStore(), allow_modules=['steps']) as bench:\n"
              f"    bench.chain({STEPS_SPEC!r}).map([{{'n': str(i)}} for i in range(5)], concurrency=1, "
              "checkpoint=sys.argv[1])\n")
    env = {**os.environ, "DIE_AT": "2",
           "PYTHONPATH": os.pathsep.join([str(Path(wb.__file__).parents[1]), str(tmp_path)])}
    died = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert died.returncode == 3, died.stderr
    written = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(line["inputs"], line["output"]) for line in written] == [({"n": "0"}, "00"), ({"n": "1"}, "11")]
    with wb.Workbench(store=wb.InMemoryContextStore(), allow_modules=["steps"]) as bench:
        chain = bench.chain(STEPS_SPEC)
        batch = chain.map([{"n": str(i)} for i in range(5)], concurrency=1, checkpoint=path)
        assert [run.output for run in batch] == ["00", "11", "22", "33", "44"]
        assert steps.CALLS == ["2", "3", "4"]  # the two the dead process finished are not run again
        assert [run.id for run in batch[:2]] == [line["run_id"] for line in written]
        assert batch[0].config_version == chain.version and batch[0].trace.spans == []  # its trace died with it
        assert len(path.read_text(encoding="utf-8").splitlines()) == 5
        assert chain.map([{"n": "4"}, {"n": "5"}], checkpoint=path).finished[0].id == batch[4].id
        assert steps.CALLS == ["2", "3", "4", "5"]


def test_a_checkpoint_line_cut_short_is_left_out_and_outputs_json_cannot_hold_run_again(
    tmp_path: Path, steps: Any
) -> None:
    path = tmp_path / "steps.jsonl"
    with wb.Workbench(store=wb.InMemoryContextStore(), allow_modules=["steps"]) as bench:
        chain = bench.chain(STEPS_SPEC)
        chain.map([{"n": "a"}, {"n": "odd"}], checkpoint=path)
        with path.open("a", encoding="utf-8") as file:
            file.write('{"checkpoint": 1, "chain": "steps", "run_id": "ab')  # the process died writing it
        batch = chain.map([{"n": "a"}, {"n": "odd"}, {"n": "b"}], checkpoint=path)
        assert batch.table()["output"].tolist() == ["aa", {"set": {1, 2}}, "bb"]
        assert steps.CALLS == ["a", "odd", "odd", "b"]  # "odd" was not kept, so it ran again
        assert [json.loads(line)["inputs"]["n"] for line in path.read_text(encoding="utf-8").splitlines()] == \
            ["a", "b"]  # whole lines only: the cut one is gone


def test_a_run_whose_inputs_json_changes_is_not_written_to_the_checkpoint(tmp_path: Path) -> None:
    # A mapping's key 1 is "1" once read back: the line matched no input, so the run ran again at every map and the
    # file grew by its line each time (2, 3, 4 lines).
    path, calls = tmp_path / "keyed.jsonl", []

    def answer(q: str, meta: dict) -> str:  # type: ignore[type-arg]
        calls.append(q)
        return q.upper()

    items = [{"q": "a", "meta": {1: "x"}}, {"q": "b", "meta": {"k": "y"}}]
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        chain = bench.chain({"name": "keyed", "hops": [{"name": "answer", "call": answer}]})
        for _ in range(3):
            assert [run.output for run in chain.map(items, checkpoint=path)] == ["A", "B"]
    assert calls == ["a", "b", "a", "a"]  # b was kept and reused; a, never reusable, ran each time
    assert [json.loads(line)["inputs"]["q"] for line in path.read_text(encoding="utf-8").splitlines()] == ["b"]


@pytest.mark.parametrize("text, said", [
    ("hello\n", "line 1 of the checkpoint file '{path}' is not JSON"),
    ("[" * 100_000 + "\n", "line 1 of the checkpoint file '{path}' is not JSON"),  # was a bare RecursionError
    ('{"checkpoint": 1, "chain": "steps"}\n', "line 1 of the checkpoint file '{path}' is not a whole run: KeyError"),
    ("[1, 2]\n", "line 1 of the checkpoint file '{path}' is not a run of a map's checkpoint (format 1)"),
    # One line with no newline after it (as json.dump writes a file) read as a line cut short: the map cut the file
    # back to its last newline, to nothing.
    ('{"question": "a", "notes": "mine"}', "line 1 of the checkpoint file '{path}' is not a run of a map's "
                                           "checkpoint (format 1): is it a checkpoint file?"),
    ("x" * 10, "line 1 of the checkpoint file '{path}' is not a run of a map's checkpoint"),
], ids=["text", "deep", "part", "list", "json-dumped", "no-newline"])
def test_a_file_that_is_no_checkpoint_is_refused_before_any_run(tmp_path: Path, steps: Any, text: str,
                                                                  said: str) -> None:
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    with wb.Workbench(store=wb.InMemoryContextStore(), allow_modules=["steps"]) as bench:
        with pytest.raises(wb.WorkloadError, match=re.escape(said.format(path=path))) as refused:
            bench.chain(STEPS_SPEC).map([{"n": "a"}], checkpoint=path)
    assert "delete this one" in str(refused.value.hint) and steps.CALLS == []
    assert path.read_text(encoding="utf-8") == text  # nothing written into someone's file


@pytest.mark.parametrize("answer", [
    lambda n: {"pair": (n, len(n))},  # a tuple read back as a list
    lambda n: {"by_id": {1: n}},  # the key 1 read back as "1"
    lambda n: __import__("functools").reduce(lambda nested, _: [nested], range(5000), n),  # deeper than the stack
], ids=["tuple", "int-key", "deep"])
def test_outputs_json_would_change_are_not_reused_from_a_checkpoint(tmp_path: Path, answer: Callable) -> None:
    """Before, a reused run's outputs were what JSON made of them: {"by_id": {"1": "a"}} beside fresh runs'
    {"by_id": {1: "b"}}, so output["by_id"][1] failed on reused runs only; and an output nested deeper than Python's
    stack raised a bare RecursionError out of the map."""
    path, calls = tmp_path / "runs.jsonl", []

    def hop(n: str) -> object:
        calls.append(n)
        return answer(n)

    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        chain = bench.chain({"name": "parsed", "hops": [{"name": "parse", "call": hop}]})
        first = chain.map([{"n": "a"}], checkpoint=path)
        again = chain.map([{"n": "a"}, {"n": "b"}], checkpoint=path)
    assert [_shape(run.output) for run in (first[0], *again)] == [_shape(answer(n)) for n in "aab"]
    assert calls == ["a", "a", "b"]  # run again, not reused in another shape
    assert not path.exists() or path.read_text(encoding="utf-8") == ""


def _shape(value: Any) -> Any:
    """``value`` as == compares it, a list nested deeper than the stack as its depth and innermost item."""
    depth = 0
    while isinstance(value, list) and len(value) == 1:
        value, depth = value[0], depth + 1
    return (depth, value) if depth else value


def test_a_map_starting_on_a_checkpoint_another_process_writes_cuts_off_none_of_its_runs(
    tmp_path: Path, steps: Any
) -> None:
    """Before, a map's prepare() looked at where the file's whole lines ended, then cut the file there: a line that
    another process's map wrote in between was cut off, though that map had reported its run done (1,291 of 20,000
    lost to a second process starting maps on the file)."""
    from workbench.chains.checkpoint import Checkpoint

    path = tmp_path / "steps.jsonl"
    script = ("import sys, workbench as wb\n"
              "with wb.Workbench(store=wb.InMemoryContextStore(), allow_modules=['steps']) as bench:\n"
              f"    batch = bench.chain({STEPS_SPEC!r}).map([{{'n': str(i)}} for i in range(3000)], concurrency=4, "
              "checkpoint=sys.argv[1])\n"
              "    print(sum(run.ok for run in batch))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(wb.__file__).parents[1]), str(tmp_path)])}
    writer = subprocess.Popen([sys.executable, "-c", script, str(path)], env=env, stdout=subprocess.PIPE, text=True)
    starts = 0
    while writer.poll() is None:  # this process starts maps on the file all the while
        Checkpoint(path, "steps").prepare()
        starts += 1
    assert writer.returncode == 0 and writer.stdout is not None
    done = int(writer.stdout.read())
    writer.stdout.close()
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert done == 3000 and starts > 100
    assert sorted(int(line["inputs"]["n"]) for line in lines) == list(range(3000))


def test_a_line_another_process_left_half_written_during_a_map_does_not_swallow_the_maps_next_run(
    tmp_path: Path
) -> None:
    """Before, only a map's start cut off a half-written last line: one that another process's death left while the
    map ran was joined by the map's next run on one line, which no later map could read."""
    path = tmp_path / "runs.jsonl"

    def answer(n: str) -> str:
        if n == "b":  # another map of the file, in another process, dies as it writes a line
            with path.open("a", encoding="utf-8") as file:
                file.write('{"checkpoint": 1, "chain": "half", "run_id": "ab')
        return n * 2

    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        chain = bench.chain({"name": "half", "hops": [{"name": "answer", "call": answer}]})
        chain.map([{"n": "a"}, {"n": "b"}, {"n": "c"}], concurrency=1, checkpoint=path)
        again = chain.map([{"n": "a"}, {"n": "b"}, {"n": "c"}], checkpoint=path)
    assert [run.output for run in again] == ["aa", "bb", "cc"] and all(run.trace.spans == [] for run in again)
    assert [json.loads(line)["inputs"]["n"] for line in path.read_text(encoding="utf-8").splitlines()] == \
        ["a", "b", "c"]


def _other_weights(tiny_path: Path, target: Path, seed: int) -> Path:
    """A copy of the tiny model whose weights carry seeded noise: another model that answers otherwise."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_path, target)
    weights = load_file(target / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    save_file({name: tensor + 0.5 * torch.randn(tensor.shape, generator=generator) for name, tensor in weights.items()},
              target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_a_checkpoint_resumed_after_the_model_changed_runs_again_rather_than_reuse_the_other_models_answers(
    tiny_path: Path, tmp_path: Path
) -> None:
    # The file kept the spec's digest, not the model's: a map resumed with other weights under the same name returned
    # the old model's answers beside the new one's, without a word.
    from helpers import QA_SPEC

    other = _other_weights(tiny_path, tmp_path / "other", seed=7)
    path = tmp_path / "runs.jsonl"
    questions = [{"question": f"What is {i} + {i}?"} for i in range(3)]
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        first = bench.chain(QA_SPEC).map(questions, checkpoint=path)
        assert [run.id for run in bench.chain(QA_SPEC).map(questions, checkpoint=path)] == [run.id for run in first]
        bench.unload("tiny", forget=True)
        bench.load("tiny", other, device="cpu")
        chain = bench.chain(QA_SPEC)  # the same spec, the same digest
        with pytest.warns(RuntimeWarning, match=r"3 runs of the checkpoint file .* were answered by another version "
                                                r"of the models of chain 'qa' .*: they run again"):
            resumed = chain.map(questions, checkpoint=path)
        assert not {run.id for run in resumed} & {run.id for run in first}
        assert [run.output for run in resumed] == [chain.run(**q).output for q in questions]
        assert [run.output for run in resumed] != [run.output for run in first]
        # What the new model answered is what the file now gives back, for this model.
        assert [run.id for run in chain.map(questions, checkpoint=path)] == [run.id for run in resumed]
        # resume= with the first batch itself: the same (it reused the old model's runs as well).
        with pytest.warns(RuntimeWarning, match=r"3 runs given to resume= were answered by another version of the "
                                                r"models of chain 'qa'"):
            again = chain.map(questions, resume=first)
        assert [run.output for run in again] == [run.output for run in resumed]
        assert [run.id for run in chain.map(questions, resume=resumed)] == [run.id for run in resumed]
        # Runs resume= gives go into a new checkpoint file too: a crash then keeps them.
        fresh = tmp_path / "fresh.jsonl"
        assert [run.id for run in chain.map(questions, resume=resumed, checkpoint=fresh)] == [r.id for r in resumed]
        assert [json.loads(line)["run_id"] for line in fresh.read_text().splitlines()] == [r.id for r in resumed]


def test_runs_of_chain_run_given_to_resume_are_reused_only_if_the_models_of_now_answered_them(
    tiny_path: Path, tmp_path: Path
) -> None:
    # Only a map noted what answered its runs: runs made one at a time (chain.run, arun, a served invoke) counted as
    # "not known" and were reused after the model was reloaded from other weights.
    from helpers import QA_SPEC

    other = _other_weights(tiny_path, tmp_path / "other", seed=7)
    questions = [{"question": f"What is {i} + {i}?"} for i in range(2)]
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        chain = bench.chain(QA_SPEC)
        singles = [chain.run(**q) for q in questions]
        assert [run.id for run in chain.map(questions, resume=singles)] == [run.id for run in singles]
        bench.unload("tiny", forget=True)
        bench.load("tiny", other, device="cpu")
        chain = bench.chain(QA_SPEC)
        with pytest.warns(RuntimeWarning, match=r"2 runs given to resume= were answered by another version"):
            again = chain.map(questions, resume=singles)
        assert not {run.id for run in again} & {run.id for run in singles}
        assert [run.output for run in again] != [run.output for run in singles]
