"""Resilience on the real tiny model: retries, timeouts, the circuit breaker, fallbacks, health checks, OOM, faults."""

from __future__ import annotations

import _thread
import asyncio
import math
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import workbench as wb
from workbench.engine import Call, GenerationParams, GenerationRequest, GenerationResult, InjectedFault
from workbench.engine.backends import BackendOutOfMemory
from workbench.engine.breaker import CircuitBreaker
from workbench.errors import ContextWindowExceeded
from workbench.tracing import Tracing
from workbench.tracing import attributes as attr

QUESTION = "What is the capital of France?"
PROMPT = "Question: {{ question }}\nAnswer:"
FAST_RETRY = {"attempts": 4, "backoff_ms": 1, "jitter": False}


@pytest.fixture(scope="module")
def pair(tiny_path: Path) -> Iterator[wb.Workbench]:
    """One workbench with the tiny model loaded twice: 'tiny' (the primary) and 'backup' (a fallback)."""
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        bench.load("backup", tiny_path, device="cpu")
        yield bench


@pytest.fixture
def models(pair: wb.Workbench) -> Iterator[wb.Workbench]:
    """The shared pair with no faults, healthy, and breakers that open only when a test asks them to."""
    for name in ("tiny", "backup"):
        pair.set_breaker(name, failure_threshold=1_000)  # a run of injected failures must not open one by chance
    yield pair
    pair.clear_faults()
    pair.check_health()


@pytest.fixture(scope="module")
def reference(pair: wb.Workbench) -> str:
    """The fault-free greedy answer to QUESTION (both models have the same weights)."""
    return pair.generate("tiny", f"Question: {QUESTION}\nAnswer:", max_new_tokens=8).text


def qa(bench: wb.Workbench, canned: bool = False, **settings: Any) -> wb.Chain:
    """A one-hop chain on 'tiny' with the given resilience settings; ``canned`` adds a standby Python hop."""
    hops: list[dict[str, Any]] = [
        {"name": "answer", "model": "tiny", "prompt": PROMPT, "max_new_tokens": 8, **settings}
    ]
    if canned:
        hops.append({"name": "canned", "call": "workbench.demo:canned_answer"})
    return bench.chain({"name": "qa", "hops": hops, "output": "answer"})


def spans(run: wb.Run, name: str) -> list[Any]:
    table = run.trace.table()
    return [row for _, row in table[table["name"] == name].iterrows()]


# -- chain spec keys --------------------------------------------------------------------------------


def test_resilience_keys_are_read_from_the_spec(pair: wb.Workbench) -> None:
    chain = pair.chain(
        """
name: qa
hops:
  - name: answer
    model: tiny
    prompt: "Q: {{ question }}"
    retry: {attempts: 5, backoff_ms: 20, max_backoff_ms: 200, jitter: false, max_total_s: 3, on: [error, breaker]}
    timeout_s: 2.5
    fallback: [backup, canned]
  - name: canned
    call: workbench.demo:canned_answer
  - name: short
    model: tiny
    prompt: "{{ answer }}"
    retry: 3
"""
    )
    answer, canned, short = chain.spec.hops
    policy = answer.resilience
    assert policy.retry == wb.RetryPolicy(
        attempts=5, backoff_ms=20, max_backoff_ms=200, jitter=False, max_total_s=3, on=("error", "breaker")
    )
    assert policy.timeout_s == 2.5
    assert [f.label for f in policy.fallback] == ["model:backup", "hop:canned"]
    assert canned.standby and not answer.standby
    assert short.resilience.retry == wb.RetryPolicy(attempts=3)
    assert chain.spec.output == "short"  # the last hop that is not a standby


BAD_HOPS = [
    ("retry: {attempts: 0}", "retry.attempts", "an integer from 1 to 100"),
    ("retry: {attempts: 1000000000, backoff_ms: 0}", "retry.attempts", "an integer from 1 to 100"),  # never ended
    ("retry: {attmpts: 3}", "attmpts", "did you mean 'attempts'"),
    ("retry: {on: [timout]}", "retry.on", "did you mean 'timeout'"),
    ("retry: {backoff_ms: 500, max_backoff_ms: 100}", "retry.max_backoff_ms", "at least backoff_ms"),
    ("retry: {jitter: maybe}", "retry.jitter", "true or false"),
    ("retry: many", "retry", "a number of attempts or a mapping"),
    ("timeout_s: -1", "timeout_s", "> 0"),
    ("fallback: bakup", "fallback", "did you mean 'backup'"),
    ("fallback: answer", "fallback", "its own fallback"),
    ("fallback: [backup, backup]", "fallback", "twice"),
]


@pytest.mark.parametrize(("line", "field", "message"), BAD_HOPS)
def test_bad_resilience_keys_name_the_hop_field_and_line(
    pair: wb.Workbench, line: str, field: str, message: str
) -> None:
    spec = f'name: qa\nhops:\n  - name: answer\n    model: tiny\n    prompt: "Q: {{{{ q }}}}"\n    {line}\n'
    with pytest.raises(wb.SpecError) as info:
        pair.chain(spec)
    error = info.value
    assert (error.hop, error.field, error.line) == ("answer", field, 6)
    assert message in str(error)


def test_fallback_hops_are_checked_against_what_the_failed_hop_sees(pair: wb.Workbench) -> None:
    def chain(hops: list[dict[str, Any]], **spec: Any) -> wb.Chain:
        return pair.chain({"name": "c", "hops": hops, **spec})

    plan = {"name": "plan", "model": "tiny", "prompt": "{{ q }}"}
    reads_plan = {"name": "summary", "model": "backup", "prompt": "{{ plan }}"}
    with pytest.raises(wb.SpecError, match="'summary' reads 'plan', which hop 'plan' does not read") as info:
        chain([{**plan, "fallback": "summary"}, reads_plan])
    assert (info.value.hop, info.value.field) == ("plan", "fallback")
    with pytest.raises(wb.SpecError, match="a Python hop has no prompt") as info:
        chain([plan, {"name": "stats", "call": "workbench.demo:canned_answer", "fallback": "backup"}])
    assert info.value.hop == "stats"
    with pytest.raises(wb.SpecError, match="a plain Python function cannot be cancelled") as info:
        chain([plan, {"name": "stats", "call": "workbench.demo:canned_answer", "timeout_s": 1}])
    assert info.value.field == "timeout_s"
    standby = {"name": "canned", "call": "workbench.demo:canned_answer"}
    with pytest.raises(wb.SpecError, match="output 'canned' is a fallback hop"):
        chain([{**plan, "fallback": "canned"}, standby], output="canned")
    with pytest.raises(wb.SpecError, match="reads 'canned', a fallback hop") as info:
        chain([{**plan, "fallback": "canned"}, standby, {"name": "after", "model": "tiny", "prompt": "{{ canned }}"}])
    assert info.value.hop == "after"


# -- retries ----------------------------------------------------------------------------------------


def test_retries_recover_from_injected_errors_and_every_attempt_is_in_the_trace(
    models: wb.Workbench, reference: str
) -> None:
    models.inject("tiny", error_rate=0.6, seed=3)
    runs = [qa(models, retry=FAST_RETRY).run(question=QUESTION) for _ in range(4)]

    assert [r.output for r in runs] == [reference] * 4  # retried to the same answer a fault-free call gives
    retried = [r for r in runs if len(spans(r, "text_completion tiny")) > 1]
    assert retried, "seed 3 makes some first attempts fail"
    for run in retried:
        calls = spans(run, "text_completion tiny")
        assert [c["attributes.workbench.attempt"] for c in calls] == list(range(1, len(calls) + 1))
        assert [c["status_code"] for c in calls] == ["ERROR"] * (len(calls) - 1) + ["OK"]
        assert all(c["attributes.workbench.fault.error"] is True for c in calls[:-1])
        events = run.trace.events()
        assert list(events["event"]).count("attempt.failed") == len(calls) - 1
        assert list(events["event"]).count("retry") == len(calls) - 1
        hop = spans(run, "hop answer")[0]
        assert hop["attributes.workbench.served_by"] == "model:tiny"
        assert hop["attributes.workbench.attempts"] == len(calls)
        assert run.served_by == {"answer": "model:tiny"} and run.fallbacks == {}


def test_when_retries_run_out_the_error_lists_every_attempt(models: wb.Workbench) -> None:
    models.inject("tiny", error_rate=1.0)
    with pytest.raises(wb.HopFailed) as info:
        qa(models, retry={"attempts": 3, "backoff_ms": 5, "max_backoff_ms": 8}).run(question=QUESTION)
    cause = info.value.cause
    assert isinstance(cause, wb.RetriesExhausted)
    assert [(n, route, type(e)) for n, route, e in cause.failures] == [
        (1, "model:tiny", InjectedFault), (2, "model:tiny", InjectedFault), (3, "model:tiny", InjectedFault)
    ]
    assert "all 3 attempts failed: model:tiny failed 3 attempts (last: InjectedFault: injected fault" in str(cause)
    assert str(info.value).startswith("hop 'answer' failed: all 3 attempts failed")
    run = info.value.run
    events = run.trace.events()
    waits = events.loc[events["event"] == "retry", "attributes.workbench.retry.wait_ms"]
    assert len(waits) == 2 and all(0 <= w <= 8 for w in waits)  # jittered, capped at max_backoff_ms
    assert all(c["attributes.workbench.error.kind"] == "error" for c in spans(run, "text_completion tiny"))


def test_retry_on_names_the_failures_worth_retrying(models: wb.Workbench) -> None:
    models.inject("tiny", error_rate=1.0)
    with pytest.raises(wb.HopFailed) as info:
        qa(models, retry={"attempts": 4, "backoff_ms": 1, "on": ["timeout"]}).run(question=QUESTION)
    assert isinstance(info.value.cause, InjectedFault)  # an error is not a timeout: one attempt, raised as it was
    assert len(spans(info.value.run, "text_completion tiny")) == 1


def test_a_caller_mistake_is_never_retried(models: wb.Workbench) -> None:
    chain = qa(models, retry=FAST_RETRY)
    with pytest.raises(wb.HopFailed) as info:
        chain.run(question="too long " * 400)
    assert isinstance(info.value.cause, ContextWindowExceeded)
    assert len(spans(info.value.run, "text_completion tiny")) == 1


def test_max_total_s_stops_retrying_before_the_budget_runs_out(models: wb.Workbench) -> None:
    models.inject("tiny", error_rate=1.0)
    retry = {"attempts": 50, "backoff_ms": 100, "jitter": False, "max_total_s": 1.0}
    with pytest.raises(wb.HopFailed) as info:
        qa(models, retry=retry).run(question=QUESTION)
    failures = info.value.cause.failures if isinstance(info.value.cause, wb.RetriesExhausted) else [info.value.cause]
    assert 1 <= len(failures) < 50
    events = info.value.run.trace.events()
    assert events.loc[events["event"] == "retry", "attributes.workbench.retry.wait_ms"].sum() < 1000


def test_max_total_s_bounds_a_hop_that_has_a_single_attempt(models: wb.Workbench, reference: str) -> None:
    # Only a policy with retries cut its attempts to max_total_s: with attempts 1 the call ran as long as the model
    # took (here its injected latency), and the budget was never spent on the fallback.
    models.inject("tiny", latency_ms=1500)
    run = qa(models, retry={"attempts": 1, "max_total_s": 0.05}, fallback="backup").run(question=QUESTION)
    assert run.output == reference and run.fallbacks == {"answer": "model:backup"}
    (primary,) = spans(run, "text_completion tiny")
    assert primary["attributes.workbench.error.kind"] == "timeout"


def test_python_hops_retry_too(models: wb.Workbench) -> None:
    calls: list[int] = []

    def flaky(question: str) -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("the tool's server hung up")
        return f"looked up {question}"

    chain = models.chain({"name": "tool", "hops": [{"name": "lookup", "call": flaky, "retry": FAST_RETRY}]})
    run = chain.run(question="x")
    assert run.output == "looked up x" and len(calls) == 3
    hop = spans(run, "hop lookup")[0]
    assert hop["attributes.workbench.attempts"] == 3 and hop["attributes.workbench.served_by"] == "hop:lookup"
    failed = run.trace.events().query("event == 'attempt.failed'")
    assert list(failed["attributes.exception.type"]) == ["ConnectionError", "ConnectionError"]


# -- timeouts ---------------------------------------------------------------------------------------


@pytest.fixture
def long_answers(bench: wb.Workbench, tiny_path: Path) -> tuple[wb.Workbench, GenerationParams, float]:
    """A fresh 'tiny' that writes exactly 64 tokens per request, and how long one such request takes alone."""
    bench.load("tiny", tiny_path, device="cpu")
    # A real generation setting (no fake): no row ends before 64 tokens, so a batch runs long enough to time out in.
    bench.registry.get("tiny").model.generation_config.min_new_tokens = 64
    params = GenerationParams(max_new_tokens=64)
    bench.engine.generate("tiny", "A chain", params)  # warm-up, so the timing below is a warm request's
    started = time.perf_counter()
    assert bench.engine.generate("tiny", "A chain", params).tokens_out == 64
    return bench, params, time.perf_counter() - started


def test_a_queued_request_that_times_out_leaves_the_queue(
    long_answers: tuple[wb.Workbench, GenerationParams, float],
) -> None:
    bench, params, alone_s = long_answers
    ahead = [bench.engine.submit("tiny", "A chain", params) for _ in range(3)]  # one at a time: these run first
    chain = bench.chain({"name": "slow", "hops": [{"name": "answer", "model": "tiny", "prompt": "{{ q }}",
                                                   "max_new_tokens": 64, "timeout_s": alone_s / 2}]})
    with pytest.raises(wb.HopFailed) as info:
        chain.run(q="Paris")
    cause = info.value.cause
    assert isinstance(cause, wb.HopTimeout)
    assert "hop 'answer': model 'tiny' gave no answer within" in str(cause) and "cancelled" in str(cause)
    call = spans(info.value.run, "text_completion tiny")[0]
    assert call["attributes.workbench.cancelled"] == "queued"
    assert call["attributes.workbench.error.kind"] == "timeout"
    assert pd_missing(call, "attributes.workbench.batch.id")  # it never ran
    assert [r.future.result(timeout=120).tokens_out for r in ahead] == [64, 64, 64]
    assert len(bench.engine.worker("tiny").queue) == 0


def pd_missing(row: Any, column: str) -> bool:
    return column not in row.index or row[column] != row[column] or row[column] is None


def test_a_running_request_that_times_out_stops_its_row_and_its_batch_mates_finish(
    long_answers: tuple[wb.Workbench, GenerationParams, float],
) -> None:
    bench, params, alone_s = long_answers
    prompts = ["A chain", "Paris", "Tokens in, tokens out"]
    expected = [bench.engine.generate("tiny", p, params).token_ids for p in prompts[:2]]
    # The batch forms when the third request arrives, so the one with the timeout is running when it fires.
    bench.set_batching("tiny", wb.DynamicBatching(max_batch=3, max_wait_ms=60_000))
    mates = [bench.engine.submit("tiny", p, params) for p in prompts[:2]]
    with pytest.raises(wb.HopTimeout, match="the request: model 'tiny' gave no answer"):
        bench.engine.call("tiny", prompts[2], params, timeout_s=alone_s / 3)
    assert [m.future.result(timeout=120).token_ids for m in mates] == expected  # as if it had never been there
    assert {m.future.result().batch_size for m in mates} == {3}
    cancelled = [s for s in bench.traces().spans if (s.attributes or {}).get(attr.CANCELLED)]
    assert [s.attributes[attr.CANCELLED] for s in cancelled] == ["running"]
    assert batch_of(bench, cancelled[0]).attributes["workbench.batch.steps"] == 64  # the mates ran to the end

    # Alone in its batch, a timed-out request ends the batch early: its row was the last one running.
    bench.set_batching("tiny", wb.NoBatching())
    with pytest.raises(wb.HopTimeout):
        bench.engine.call("tiny", prompts[0], params, timeout_s=alone_s / 3)
    bench.engine.generate("tiny", prompts[0], params)  # queued behind it, so the timed-out one has ended
    alone = [s for s in bench.traces().spans if (s.attributes or {}).get(attr.CANCELLED)][-1]
    assert batch_of(bench, alone).attributes["workbench.batch.steps"] < 64


def batch_of(bench: wb.Workbench, request_span: Any) -> Any:
    """The batch span linked to a request's span."""
    span_id = request_span.context.span_id
    return next(s for s in bench.traces().spans if s.name.startswith("batch ")
                and any(link.context.span_id == span_id for link in s.links))


# -- the circuit breaker ----------------------------------------------------------------------------


def test_breaker_opens_fails_fast_lets_one_trial_through_and_closes() -> None:
    tracing = Tracing()
    now = [0.0]
    breaker = CircuitBreaker("m", failure_threshold=2, reset_timeout_s=10, clock=lambda: now[0])
    fault = InjectedFault("boom")

    def outcome(error: BaseException | None) -> bool:
        span = tracing.start_span("request")
        trial = breaker.admit(span)
        breaker.record(error, span, trial)
        span.end()
        return trial

    outcome(fault)
    outcome(None)  # a success resets the count
    outcome(fault)
    outcome(ContextWindowExceeded("too long"))  # the caller's mistake: not the model's failure
    assert (breaker.state, breaker.failures) == ("closed", 1)
    outcome(fault)
    assert (breaker.state, breaker.opened) == ("open", 1)
    with pytest.raises(wb.CircuitOpen, match="circuit breaker is open; it opened .* after 2 failures in a row"):
        breaker.admit(tracing.start_span("refused"))

    now[0] = 10.0
    trial_span = tracing.start_span("trial")
    assert breaker.admit(trial_span) is True and breaker.state == "half_open"
    with pytest.raises(wb.CircuitOpen, match="half-open; a trial request is in flight"):
        breaker.admit(tracing.start_span("refused"))
    breaker.record(fault, trial_span, True)
    trial_span.end()
    assert (breaker.state, breaker.opened) == ("open", 2)

    now[0] = 20.0
    assert outcome(None) is True
    assert breaker.state == "closed" and breaker.row()["opened"] == 2
    changes = [e.name for s in tracing.index.spans() for e in s.events if e.name.startswith("breaker.")]
    assert changes == ["breaker.open", "breaker.half_open", "breaker.open", "breaker.half_open", "breaker.closed"]


def test_a_breaker_that_could_never_half_open_is_refused(models: wb.Workbench) -> None:
    # reset_timeout_s=NaN was taken, and no clock reading is ever NaN seconds past the opening: the breaker stayed
    # open for good, its error saying "it lets a trial through nan s after opening".
    for timeout in (math.nan, math.inf):
        with pytest.raises(wb.SettingsError, match="reset_timeout_s must be a finite number >= 0"):
            models.set_breaker("tiny", reset_timeout_s=timeout)
    assert set(models.breakers()["reset_timeout_s"]) == {5.0}  # the breakers in place are kept


def test_an_open_breaker_sends_hops_to_their_fallback_and_shows_in_breakers(
    models: wb.Workbench, reference: str
) -> None:
    models.set_breaker("tiny", failure_threshold=2, reset_timeout_s=600)
    models.inject("tiny", error_rate=1.0)
    chain = qa(models, fallback="backup")
    for _ in range(2):
        assert chain.run(question=QUESTION).fallbacks == {"answer": "model:backup"}
    table = models.breakers().set_index("model")
    assert table.loc["tiny", "state"] == "open" and table.loc["backup", "state"] == "closed"
    assert table.loc["tiny", "opened"] == 1 and "injected fault" in table.loc["tiny", "last_error"]

    run = chain.run(question=QUESTION)  # fails fast at the breaker: the fault injector never sees it
    assert run.output == reference and run.served_by == {"answer": "model:backup"}
    refused = spans(run, "text_completion tiny")[0]
    assert "circuit breaker is open" in refused["status_message"]
    assert pd_missing(refused, "attributes.workbench.fault.error")
    with pytest.raises(wb.CircuitOpen):
        models.generate("tiny", "A chain")
    opened = models.traces().events().query("event == 'breaker.open'")
    assert list(opened["model"]) == ["tiny"]

    # A breaker that resets quickly: after reset_timeout_s the next request is the trial, and closes it.
    models.set_breaker("tiny", failure_threshold=1, reset_timeout_s=0.2)
    assert chain.run(question=QUESTION).fallbacks == {"answer": "model:backup"}
    assert models.breakers().set_index("model").loc["tiny", "state"] == "open"
    models.clear_faults()
    time.sleep(0.25)
    assert chain.run(question=QUESTION).served_by == {"answer": "model:tiny"}
    assert models.breakers().set_index("model").loc["tiny", "state"] == "closed"


def test_a_retry_on_the_breaker_waits_until_the_breaker_lets_its_trial_through(
    models: wb.Workbench, reference: str
) -> None:
    # CircuitOpen says when the breaker lets its trial through (retry_after_s); a hop retrying on "breaker" waited only
    # its own backoff (1 ms here), so each retry met the open breaker again and the run failed.
    models.set_breaker("tiny", failure_threshold=1, reset_timeout_s=0.4)
    models.inject("tiny", error_rate=1.0)
    with pytest.raises(wb.HopFailed):
        qa(models).run(question=QUESTION)  # opens it
    models.clear_faults()
    chain = qa(models, retry={"attempts": 2, "backoff_ms": 1, "jitter": False, "on": ["breaker"]})
    started = time.perf_counter()
    run = chain.run(question=QUESTION)
    assert run.output == reference and run.served_by == {"answer": "model:tiny"}
    assert time.perf_counter() - started >= 0.3  # it waited the breaker out, not 1 ms
    attempts = spans(run, "text_completion tiny")
    assert len(attempts) == 2 and "circuit breaker is open" in attempts[0]["status_message"]
    # A breaker that would let no trial through within the retries' max_total_s ends them at once.
    models.inject("tiny", error_rate=1.0)
    models.set_breaker("tiny", failure_threshold=1, reset_timeout_s=30)
    with pytest.raises(wb.HopFailed):
        qa(models).run(question=QUESTION)
    models.clear_faults()
    started = time.perf_counter()
    bounded = qa(models, retry={"attempts": 5, "backoff_ms": 1, "max_total_s": 2, "on": ["breaker"]})
    with pytest.raises(wb.HopFailed) as info:
        bounded.run(question=QUESTION)
    assert isinstance(info.value.cause, wb.CircuitOpen) and time.perf_counter() - started < 1.5


# -- fallbacks --------------------------------------------------------------------------------------


def test_fallback_model_then_fallback_hop_serve_a_degraded_answer(models: wb.Workbench, reference: str) -> None:
    chain = qa(models, canned=True, retry={"attempts": 2, "backoff_ms": 1}, fallback=["backup", "canned"])
    healthy = chain.run(question=QUESTION)
    assert healthy.output == reference and healthy.served_by == {"answer": "model:tiny"}
    assert not spans(healthy, "hop canned")  # a standby hop runs only in place of a failed one

    models.inject("tiny", error_rate=1.0)
    run = chain.run(question=QUESTION)
    assert run.output == reference and run.fallbacks == {"answer": "model:backup"}
    events = run.trace.events()
    assert list(events.query("event == 'fallback'")["attributes.workbench.route"]) == ["model:backup"]
    hop = spans(run, "hop answer")[0]
    assert hop["attributes.workbench.fallback"] is True and hop["attributes.workbench.attempts"] == 3

    models.inject("backup", error_rate=1.0)
    run = chain.run(question=QUESTION)
    assert run.output == f"(no model could answer {QUESTION!r} just now)"
    assert run.fallbacks == {"answer": "hop:canned"} and run.outputs == {"answer": run.output}
    canned = spans(run, "hop canned")[0]
    assert canned["parent_id"] == spans(run, "hop answer")[0]["context.span_id"]
    assert [c["attributes.workbench.route"] for c in spans(run, "text_completion tiny")] == ["model:tiny"] * 2
    assert list(run.trace.events().query("event == 'fallback'")["attributes.workbench.route"]) == [
        "model:backup", "hop:canned"
    ]


def test_when_every_path_fails_the_run_records_why(models: wb.Workbench) -> None:
    models.inject("tiny", error_rate=1.0)
    models.inject("backup", error_rate=1.0)
    runs = qa(models, fallback="backup").map([{"question": QUESTION}] * 3, concurrency=3)
    for run in runs:
        assert not run.ok and run.output is None
        assert isinstance(run.error.cause, wb.RetriesExhausted)
        assert "model:tiny failed 1 attempt" in str(run.error) and "model:backup failed 1 attempt" in str(run.error)


# -- health checks ----------------------------------------------------------------------------------


def test_an_unhealthy_model_leaves_rotation_until_a_probe_passes(models: wb.Workbench, reference: str) -> None:
    checked = models.check_health().set_index("name")
    assert list(checked["health"]) == ["healthy", "healthy"]
    assert models.models().set_index("name").loc["tiny", "health"] == "healthy"

    models.inject("tiny", error_rate=1.0)
    assert models.check_health("tiny").loc[0, "health"] == "unhealthy"
    assert models.models().set_index("name")["health"].to_dict() == {"backup": "healthy", "tiny": "unhealthy"}
    with pytest.raises(wb.ModelUnhealthy, match="model 'tiny' is out of rotation: its last health probe failed"):
        models.generate("tiny", "A chain")
    run = qa(models, fallback="backup").run(question=QUESTION)
    assert run.output == reference and run.fallbacks == {"answer": "model:backup"}
    assert pd_missing(spans(run, "text_completion tiny")[0], "attributes.workbench.fault.error")  # failed fast

    models.clear_faults("tiny")
    assert models.check_health("tiny").loc[0, "health"] == "healthy"
    assert qa(models, fallback="backup").run(question=QUESTION).served_by == {"answer": "model:tiny"}
    probes = [s for s in models.traces().spans if s.name == "health_check tiny"]
    assert [s.attributes["workbench.health"] for s in probes[-3:]] == ["healthy", "unhealthy", "healthy"]
    changes = [e.name for s in probes for e in s.events if e.name.startswith("health.")]
    assert changes[-2:] == ["health.unhealthy", "health.healthy"]


def test_periodic_health_checks_run_in_the_background_until_turned_off(models: wb.Workbench) -> None:
    def probes() -> int:
        return sum(1 for s in models.traces().spans if s.name.startswith("health_check"))

    before = probes()
    models.set_health_checks(0.05, timeout_s=30)
    try:
        deadline = time.monotonic() + 60
        while probes() < before + 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert probes() >= before + 4  # both models, at least twice
    finally:
        models.set_health_checks(None)
    assert not [t for t in threading.enumerate() if t.name == "workbench-health"]
    with pytest.raises(wb.WorkbenchError, match="interval_s must be a number of seconds > 0"):
        models.set_health_checks(0)
    # NaN made the checker probe without a pause (hundreds of probes a second, each a generate), inf killed its
    # thread with an OverflowError; a NaN timeout_s was taken too.
    for interval, timeout in ((math.nan, 5.0), (math.inf, 5.0), (1e300, 5.0), (1.0, math.nan), (1.0, math.inf)):
        with pytest.raises(wb.SettingsError, match=r"must be a number of seconds > 0 \(and finite\)"):
            models.set_health_checks(interval, timeout_s=timeout)
    assert not [t for t in threading.enumerate() if t.name == "workbench-health"]


# -- out of memory ----------------------------------------------------------------------------------


def test_an_out_of_memory_batch_is_split_and_the_safe_size_remembered(bench: wb.Workbench, tiny_path: Path) -> None:
    bench.load("tiny", tiny_path, device="cpu")
    prompts = [f"Question {i}: what is a chain?" for i in range(8)]
    params = GenerationParams(max_new_tokens=6)
    expected = [bench.engine.generate("tiny", p, params).text for p in prompts]
    bench.set_batching("tiny", wb.StaticBatching(size=8, timeout_ms=60_000))
    bench.inject("tiny", oom_above=2)  # a fake CUDA OOM for any batch of more than 2

    requests = [bench.engine.submit("tiny", p, params) for p in prompts]
    results = [r.future.result(timeout=120) for r in requests]
    assert [r.text for r in results] == expected
    assert [r.batch_size for r in results] == [2] * 8
    assert bench.models().set_index("name").loc["tiny", "batch_limit"] == 2
    batches = [s for s in bench.traces().spans if s.name == "batch tiny"]
    failed = [s for s in batches if not s.status.is_ok]
    assert [s.attributes["workbench.batch.size"] for s in failed] == [8, 4, 4]
    assert all("out-of-memory" in (s.status.description or "") for s in failed)
    assert [e.name for e in failed[0].events] == ["fault.injected", "exception", "oom.split"]
    assert all(r.span.attributes[attr.OOM_SPLIT] for r in requests)

    bench.clear_faults()  # the limit stays: the policy asks for 8, the queue gives 2
    more = [bench.engine.submit("tiny", p, params) for p in prompts]
    assert {r.future.result(timeout=120).batch_size for r in more} == {2}


def _oom_after(bench: wb.Workbench, steps: int) -> list[int]:
    """Make the model's next batch run out of memory mid-decode, after ``steps`` decode steps (as a GPU does at a later
    step, when the KV has grown); the model really generates, before and after. Returns each batch's size."""
    backend = bench.engine.worker("tiny").backend
    real, sizes = backend.generate, []

    def generate(batch: list[GenerationRequest], on_token: Any = None, on_beat: Any = None) -> Any:
        sizes.append(len(batch))
        if len(sizes) > 1:
            return real(batch, on_token, on_beat)
        beats = 0

        def beat() -> None:  # once for the prefill, then after each step's tokens were streamed
            nonlocal beats
            beats += 1
            if beats == steps + 1:
                raise BackendOutOfMemory(f"out of memory at decode step {steps} (injected by the test)")

        return real(batch, on_token, beat)

    backend.generate = generate
    return sizes


def test_a_stream_split_by_out_of_memory_sends_no_token_twice(bench: wb.Workbench, tiny_path: Path) -> None:
    """A batch that ran out of memory mid-decode ran again as halves from each request's first token, and streamed
    the tokens it had already sent a second time: the stream read "ab" + "abcd" where the answer was "abcd"."""
    bench.load("tiny", tiny_path, device="cpu")
    prompts = ["Question 1: what is a chain?", "Question 2: what is a hop?"]
    params = GenerationParams(max_new_tokens=8)
    expected = [bench.engine.generate("tiny", p, params).text for p in prompts]
    bench.set_batching("tiny", wb.StaticBatching(size=2, timeout_ms=60_000))
    sizes = _oom_after(bench, steps=3)
    streams: list[list[str]] = [[], []]

    async def both() -> list[GenerationResult]:
        return await asyncio.gather(*(
            bench.engine.acall(Call("tiny", prompt, params, on_token=lambda _, text, i=i: streams[i].append(text)))
            for i, prompt in enumerate(prompts)))

    results = asyncio.run(both())
    assert sizes == [2, 1, 1]
    assert [r.text for r in results] == expected
    assert ["".join(s).strip() for s in streams] == expected


def test_a_stream_whose_re_run_writes_other_tokens_fails_rather_than_contradict_itself(
        bench: wb.Workbench, tiny_path: Path) -> None:
    bench.load("tiny", tiny_path, device="cpu")
    bench.set_batching("tiny", wb.StaticBatching(size=2, timeout_ms=60_000))
    sizes = _oom_after(bench, steps=3)
    # Unseeded sampling at a high temperature: each run draws other tokens, as a re-run may on a GPU.
    params = GenerationParams(max_new_tokens=12, temperature=5.0)
    streams: list[list[str]] = [[], []]

    async def both() -> list[GenerationResult | BaseException]:
        return await asyncio.gather(*(
            bench.engine.acall(Call("tiny", f"Question {i}: why?", params,
                                    on_token=lambda _, text, i=i: streams[i].append(text)))
            for i in range(2)), return_exceptions=True)

    outcomes = asyncio.run(both())
    assert sizes == [2, 1, 1]
    for outcome, stream in zip(outcomes, streams):
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, wb.ModelOutOfMemory)
            assert re.search(r"ran out of memory after streaming \d+ tokens of this request", str(outcome))
            assert "cannot be taken back" in str(outcome)
        else:  # the re-run happened to draw the same first tokens: its stream is its answer
            assert "".join(stream).strip() == outcome.text
    assert any(isinstance(o, BaseException) for o in outcomes)


def test_out_of_memory_on_a_single_request_fails_it_and_the_model_serves_on(models: wb.Workbench) -> None:
    models.inject("tiny", oom_every=1)
    with pytest.raises(wb.HopFailed) as info:
        qa(models).run(question=QUESTION)
    cause = info.value.cause
    assert isinstance(cause, wb.ModelOutOfMemory)
    assert "model 'tiny' ran out of memory on a single request" in str(cause) and "max_new_tokens 8" in str(cause)
    assert cause.hint and "smaller dtype" in cause.hint
    models.clear_faults()
    assert qa(models).run(question=QUESTION).ok
    assert models.engine.worker("tiny").alive


# -- fault injection --------------------------------------------------------------------------------


def test_faults_are_seeded_visible_and_removable(models: wb.Workbench) -> None:
    def pattern(seed: int) -> list[bool]:
        models.inject("tiny", error_rate=0.5, latency_ms=(1, 3), seed=seed)
        outcomes = []
        for _ in range(12):
            try:
                models.generate("tiny", "A chain", max_new_tokens=2)
                outcomes.append(True)
            except InjectedFault:
                outcomes.append(False)
        return outcomes

    first = pattern(7)
    assert pattern(7) == first and True in first and False in first
    assert pattern(8) != first
    assert models.faults()["tiny"] == wb.Faults("tiny", error_rate=0.5, latency_ms=(1, 3), seed=8)
    calls = [s for s in models.traces().spans if s.name == "text_completion tiny"][-12:]
    assert all(1 <= s.attributes[attr.FAULT_LATENCY_MS] <= 3 for s in calls)
    assert {bool(s.attributes.get(attr.FAULT_ERROR)) for s in calls} == {True, False}

    models.clear_faults("tiny")
    assert models.faults() == {}
    assert all(models.generate("tiny", "A chain", max_new_tokens=2).tokens_out for _ in range(5))


def test_bad_fault_settings_say_what_is_wrong(models: wb.Workbench) -> None:
    with pytest.raises(wb.WorkbenchError, match=r"bench.inject\('tiny', ...\): error_rate must be a probability"):
        models.inject("tiny", error_rate=1.5)
    with pytest.raises(wb.WorkbenchError, match="latency_ms must be a number >= 0 or a"):
        models.inject("tiny", latency_ms=(5, 1))
    with pytest.raises(wb.WorkbenchError, match="oom_every must be an integer >= 1"):
        models.inject("tiny", oom_every=0)
    with pytest.raises(wb.UnknownModelError):
        models.inject("tinny", error_rate=0.1)
    # An endless or absurd latency killed the model's worker thread (time.sleep overflowed): the model never
    # answered again, clear_faults or not.
    for latency in (math.inf, (0, math.inf), 1e300, math.nan):
        with pytest.raises(wb.SettingsError, match="latency_ms must be a number >= 0 .* at most 3600000"):
            models.inject("tiny", latency_ms=latency)
    assert models.faults() == {}
    assert models.generate("tiny", "A chain", max_new_tokens=2).tokens_out == 2


def test_a_fault_seed_may_be_any_integer_and_nothing_else(models: wb.Workbench) -> None:
    # A numpy integer (from np.arange, say) passed the checks and failed as a bare TypeError of random.Random's.
    import numpy as np

    assert models.inject("tiny", error_rate=0.5, seed=np.int64(7)) == wb.Faults("tiny", error_rate=0.5, seed=7)
    assert models.faults()["tiny"].seed == 7
    for seed in ([7], 7.5, "7", True):
        with pytest.raises(wb.SettingsError, match=r"seed must be an integer or None, got "):
            models.inject("tiny", error_rate=0.5, seed=seed)


def test_the_replicas_of_a_model_draw_their_seeded_faults_apart(bench: wb.Workbench, tiny_path: Path) -> None:
    # One seed gave every replica the same stream: they failed in step, so a retry that the balancer sent to the other
    # replica failed exactly when the first attempt had.
    bench.load("m", tiny_path, device="cpu", replicas=2)
    bench.set_breaker("m", failure_threshold=1_000)

    def outcomes(seed: int) -> dict[str, list[bool]]:
        bench.inject("m", error_rate=0.5, seed=seed)
        drawn: dict[str, list[bool]] = {"m#0": [], "m#1": []}
        for _ in range(12):
            for replica, seen in drawn.items():
                try:
                    seen.append(bench.generate(replica, "A chain", max_new_tokens=1).tokens_out == 1)
                except InjectedFault:
                    seen.append(False)
        return drawn

    first = outcomes(11)
    assert first["m#0"] != first["m#1"]
    assert outcomes(11) == first  # each replica's stream is still the seed's


def test_a_request_finishes_once_even_when_its_worker_and_its_caller_race(models: wb.Workbench) -> None:
    request = models.engine.submit("tiny", "A chain", GenerationParams(max_new_tokens=2))
    request.future.result(timeout=60)
    assert models.engine.worker("tiny").cancel(request, wb.HopTimeout("late")) is False
    assert request.future.exception() is None
    stray = GenerationRequest("tiny", [1], GenerationParams(), models.tracing.start_span("stray"))
    assert stray.settle() is True and stray.settle() is False


def test_a_bad_call_setting_or_prompt_is_refused_before_the_model_and_never_counts_against_its_breaker(
    tiny_path: Path,
) -> None:
    # temperature=-1 or max_new_tokens=0 used to reach generate, whose ValueError counted as the model's failure: a
    # few such calls opened the breaker for every other caller. max_new_tokens=1.5 failed as a bare TypeError inside
    # the batch, True ran as 1 token, truncate="right" ran as "error" without a word, and a prompt that is not text
    # failed deep in the engine (an AttributeError) or in the tokenizer (a TypeError).
    refused = [(settings, "temperature|top_p|top_k") for settings in (
        {"temperature": -1}, {"temperature": float("nan")}, {"temperature": 0.7, "top_p": 0}, {"top_p": 1.5},
        {"top_k": -1})]
    refused += [({"max_new_tokens": tokens}, "max_new_tokens must be a whole number >= 1")
                for tokens in (0, -1, 1.5, True, "8")]
    refused += [({"truncate": "right"}, "truncate must be 'error' or 'left', not 'right'"),
                ({"max_new_token": 2}, "no setting 'max_new_token' \\(did you mean 'max_new_tokens'\\?\\)")]
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        bench.set_breaker("tiny", failure_threshold=2)
        for settings, message in refused:
            with pytest.raises(wb.InvalidInput, match=message):
                bench.generate("tiny", "Hello", **{"max_new_tokens": 2, **settings})
        for prompt in (None, b"Hello", ["Hello"]):
            with pytest.raises(wb.InvalidInput, match="generate\\(\\) takes the prompt as text \\(a str\\)"):
                bench.generate("tiny", prompt, max_new_tokens=2)
        breaker = bench.breakers().set_index("model").loc["tiny"]
        assert (breaker["state"], breaker["failures"]) == ("closed", 0)
        assert bench.generate("tiny", "Hello", max_new_tokens=2, truncate="left").tokens_out == 2


def test_a_run_refused_for_a_huge_prompt_keeps_its_error_but_not_the_prompts_token_ids(models: wb.Workbench) -> None:
    # The refusal's traceback held the engine's frames, and with them the prompt's 180 000 token ids (about 12 MB a
    # failed run, kept with the run: a served gateway's memory, filled by one caller's failing requests).
    import gc
    import traceback
    import tracemalloc

    chain = qa(models)
    question = "word " * 180_000  # 0.9 MB of text

    def fail() -> wb.HopFailed:
        with pytest.raises(wb.HopFailed) as info:
            chain.run(question=question)
        assert isinstance(info.value.cause, ContextWindowExceeded)
        return info.value

    fail()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(4):
            fail()
        gc.collect()
        per_run = (tracemalloc.get_traced_memory()[0] - before) / 4
    finally:
        tracemalloc.stop()
    assert per_run < 3 * len(question), f"{per_run / 2**20:.1f} MB kept per failed run"
    error = models.runs()[-1].error
    assert isinstance(error.cause, ContextWindowExceeded) and "context window" in str(error.cause)
    assert "self.engine.acall(call)" in "".join(traceback.format_exception(error.cause))  # its traceback still prints


def test_a_keyboard_interrupt_in_a_hop_is_not_retried_nor_served_by_its_fallback(bench: wb.Workbench) -> None:
    calls: list[str] = []

    def work(n: str) -> str:
        calls.append(n)
        raise KeyboardInterrupt  # the user stopping, from inside the hop

    chain = bench.chain({"name": "stops", "hops": [
        {"name": "work", "call": work, "retry": {"attempts": 3, "backoff_ms": 1}, "fallback": "canned"},
        {"name": "canned", "call": lambda n: "canned"}]})
    with pytest.raises(KeyboardInterrupt):
        chain.run(n="0")
    assert calls == ["0"]
    with pytest.raises(wb.MapInterrupted) as info:
        chain.map([{"n": str(i)} for i in range(4)], concurrency=1)
    assert calls == ["0", "0"] and info.value.batch.missing == [0, 1, 2, 3]  # the map stopped at its first input


def test_a_ctrl_c_during_chain_run_keeps_what_the_run_had_done(bench: wb.Workbench, ctrl_c_raises: None) -> None:
    # Before, chain.run raised a bare KeyboardInterrupt and the run was gone: the first hop's output, the trace.
    release = threading.Event()

    def halt(plan: str) -> str:
        _thread.interrupt_main()  # the notebook's stop button, pressed while this hop runs
        release.wait(30)
        return plan

    chain = bench.chain({"name": "cut", "hops": [
        {"name": "plan", "call": lambda question: f"plan for {question}"},
        {"name": "halt", "call": halt, "uses": ["plan"]}]})
    try:
        with pytest.raises(wb.RunInterrupted) as info:
            chain.run(question="hi")
    finally:
        release.set()
    run = info.value.run
    assert isinstance(info.value, KeyboardInterrupt)
    assert run.outputs == {"plan": "plan for hi"} and not run.ok
    assert run.error.hop == "halt" and isinstance(run.error.cause, wb.RunCancelled)
    assert "('plan')" in str(info.value) and run.id in str(info.value)
    assert {s.name for s in run.trace.spans} >= {"chain cut", "hop plan", "hop halt"}
    assert bench.runs()[-1] is run


def test_a_ctrl_c_during_chain_stream_keeps_what_the_run_had_done(bench: wb.Workbench, ctrl_c_raises: None) -> None:
    release = threading.Event()

    def halt(plan: str) -> str:
        _thread.interrupt_main()
        release.wait(30)
        return plan

    chain = bench.chain({"name": "cut_stream", "hops": [
        {"name": "plan", "call": lambda question: f"plan for {question}"},
        {"name": "halt", "call": halt, "uses": ["plan"]}]})
    seen: list[str] = []
    try:
        with pytest.raises(wb.RunInterrupted) as info:
            for event in chain.stream(question="hi"):
                seen.append(type(event).__name__)
    finally:
        release.set()
    run = info.value.run
    assert "RunFinished" not in seen  # the Ctrl-C may land before the events already queued were read
    assert run.outputs == {"plan": "plan for hi"} and run.error.hop == "halt"
    assert bench.runs()[-1] is run


def test_an_async_hop_that_never_answers_times_out_and_falls_back(bench: wb.Workbench) -> None:
    calls: list[str] = []

    async def lookup(question: str) -> str:
        calls.append(question)
        await asyncio.sleep(3600)  # a remote API that never answers
        return question

    async def own_timeout(question: str) -> str:
        raise TimeoutError("the API's own timeout")

    chain = bench.chain({"name": "hangs", "hops": [
        {"name": "lookup", "call": lookup, "timeout_s": 0.05, "fallback": "canned",
         "retry": {"attempts": 2, "backoff_ms": 1, "on": ["timeout"]}},
        {"name": "canned", "call": lambda question: "canned"}]})
    run = chain.run(question="q")
    assert run.output == "canned" and run.fallbacks == {"lookup": "hop:canned"} and calls == ["q", "q"]
    alone = bench.chain({"name": "alone", "hops": [{"name": "lookup", "call": lookup, "timeout_s": 0.05}]})
    with pytest.raises(wb.HopFailed) as info:
        alone.run(question="q")
    assert isinstance(info.value.cause, wb.HopTimeout) and "within 0.05 s" in info.value.message
    own = bench.chain({"name": "own", "hops": [{"name": "lookup", "call": own_timeout, "timeout_s": 30}]})
    with pytest.raises(wb.HopFailed, match="TimeoutError: the API's own timeout"):  # not taken for timeout_s
        own.run(question="q")


def test_one_whole_context_fallback_hop_serves_several_hops_in_any_order(bench: wb.Workbench) -> None:
    def plan(question: str) -> str:
        raise ValueError("no plan")

    def answer(plan: str) -> str:
        raise ValueError("no answer")

    def canned(context: dict[str, Any]) -> str:
        return f"canned: {sorted(context)}"

    hops = [{"name": "plan", "call": plan, "fallback": "canned"},
            {"name": "answer", "call": answer, "fallback": "canned"}]
    for order in (hops, hops[::-1]):  # listing the hop that reads more first was refused
        chain = bench.chain({"name": "shared", "hops": [*order, {"name": "canned", "call": canned}],
                             "output": "answer"})
        run = chain.run(question="q")
        assert run.fallbacks == {"plan": "hop:canned", "answer": "hop:canned"}
        assert run.output == "canned: ['history', 'question', 'session']"  # what both hops read, whichever failed


def test_injected_latency_is_the_models_slowness_in_ttft_not_a_wait_in_its_queue(models: wb.Workbench) -> None:
    # The worker sleeps the injected latency before the batch starts, and queue_ms counted it: 300 ms injected on an
    # idle model read as 300 ms of queueing.
    models.inject("tiny", latency_ms=300)
    result = models.generate("tiny", f"Question: {QUESTION}\nAnswer:", max_new_tokens=2)
    request = models.traces().table().query("name == 'text_completion tiny'").iloc[-1]
    assert request[f"attributes.{attr.FAULT_LATENCY_MS}"] == 300
    assert result.queue_ms < 150 and request[f"attributes.{attr.QUEUE_MS}"] == result.queue_ms
    assert result.ttft_ms >= 300 and result.e2e_ms >= 300  # the caller still waited it out
