"""The async core: chains walk on the workbench's event loop; arun, amap and astream beside run, map and stream."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import workbench as wb
from workbench.chains.events import AttemptFailed, HopFinished, HopStarted, RunFinished, Token
from workbench.demo import DEMO_QUESTION
from workbench.engine import Call, GenerationParams
from tests.helpers import QA_SPEC, QUESTIONS, eventually


@pytest.fixture
def qa(tiny_bench: wb.Workbench) -> wb.Chain:
    return tiny_bench.chain(QA_SPEC)


def test_arun_gives_the_same_run_as_run(qa: wb.Chain) -> None:
    blocking = qa.run(question=DEMO_QUESTION)
    awaited = asyncio.run(qa.arun(question=DEMO_QUESTION))
    assert awaited.output == blocking.output and awaited.outputs == blocking.outputs
    assert awaited.id != blocking.id
    assert [s.name for s in awaited.trace.spans] == [s.name for s in blocking.trace.spans]
    assert qa.bench.run("last") is awaited  # awaited runs are kept like the others


def test_amap_keeps_input_order_and_matches_map(qa: wb.Chain) -> None:
    mapped = qa.map(QUESTIONS, concurrency=4)
    awaited = asyncio.run(qa.amap(QUESTIONS, concurrency=4))
    assert [r.output for r in awaited] == [r.output for r in mapped]
    assert [r.inputs for r in awaited] == QUESTIONS


def test_runs_awaited_together_from_another_loop_share_batches(tiny_bench: wb.Workbench, qa: wb.Chain) -> None:
    tiny_bench.set_batching("tiny", wb.DynamicBatching(max_batch=8, max_wait_ms=50))

    async def main() -> list[wb.Run]:
        return await asyncio.gather(*(qa.arun(**q) for q in QUESTIONS))

    runs = asyncio.run(main())
    sizes = {row for run in runs for row in run.trace.table()["batch_size"].dropna()}
    assert max(sizes) > 1  # the hops of the four runs reached the model together


def test_an_async_hop_is_awaited_on_the_loop_and_a_blocking_hop_runs_in_the_pool(tiny_bench: wb.Workbench) -> None:
    seen: dict[str, str] = {}

    async def shout(answer: str) -> str:
        seen["async"] = threading.current_thread().name
        await asyncio.sleep(0)
        return answer.upper()

    def count(shout: str) -> int:
        seen["sync"] = threading.current_thread().name
        return len(shout)

    chain = tiny_bench.chain({**QA_SPEC, "name": "loud", "hops": [
        *QA_SPEC["hops"], {"name": "shout", "call": shout}, {"name": "count", "call": count}], "output": "count"})
    run = chain.run(question="hi")
    assert run.outputs["shout"] == run.outputs["answer"].upper() and run.output == len(run.outputs["shout"])
    assert seen["async"] == "workbench-loop"
    assert seen["sync"].startswith("workbench-hop")


def test_a_blocking_call_from_an_async_hop_says_to_await(tiny_bench: wb.Workbench, qa: wb.Chain) -> None:
    async def nested(question: str) -> str:
        return qa.run(question=question).output  # would wait for the loop it runs on

    chain = tiny_bench.chain({"name": "nested", "hops": [{"name": "inner", "call": nested}]})
    with pytest.raises(wb.HopFailed, match="await chain.arun"):
        chain.run(question="hi")

    async def awaited(question: str) -> str:
        return (await qa.arun(question=question)).output

    fixed = tiny_bench.chain({"name": "awaited", "hops": [{"name": "inner", "call": awaited}]})
    assert fixed.run(question="hi").output == qa.run(question="hi").output


def test_a_blocking_stream_from_an_async_hop_says_to_await_instead_of_hanging(
    tiny_bench: wb.Workbench, qa: wb.Chain
) -> None:
    async def nested(question: str) -> list[str]:
        return [e.kind for e in qa.stream(question=question)]  # would wait for the loop it runs on, forever

    chain = tiny_bench.chain({"name": "nested_stream", "hops": [{"name": "inner", "call": nested}]})
    with pytest.raises(wb.HopFailed, match="astream"):
        asyncio.run(asyncio.wait_for(chain.arun(question="hi"), 30))
    assert qa.run(question="hi").output  # the loop was never blocked

    async def awaited(question: str) -> list[str]:
        return [e.kind async for e in qa.astream(question=question)]

    fixed = tiny_bench.chain({"name": "awaited_stream", "hops": [{"name": "inner", "call": awaited}]})
    assert fixed.run(question="hi").output[-1] == "run_finished"


def test_stream_yields_hops_tokens_and_the_run(qa: wb.Chain) -> None:
    events = list(qa.stream(question=DEMO_QUESTION))
    kinds = [e.kind for e in events]
    assert kinds[0] == "hop_started" and kinds[-1] == "run_finished"
    run = events[-1].run
    assert isinstance(events[-1], RunFinished) and run.output == qa.run(question=DEMO_QUESTION).output
    for hop in ("plan", "answer"):
        tokens = [e for e in events if isinstance(e, Token) and e.hop == hop]
        assert "".join(t.text for t in tokens).strip() == run.outputs[hop]
        started = next(i for i, e in enumerate(events) if isinstance(e, HopStarted) and e.hop == hop)
        finished = next(i for i, e in enumerate(events) if isinstance(e, HopFinished) and e.hop == hop)
        assert started < events.index(tokens[0]) < finished  # tokens arrive while the hop runs


def test_astream_matches_stream(qa: wb.Chain) -> None:
    async def collect() -> list[object]:
        return [e async for e in qa.astream(question=DEMO_QUESTION)]

    awaited = asyncio.run(collect())
    blocking = list(qa.stream(question=DEMO_QUESTION))
    assert [(e.kind, getattr(e, "text", None)) for e in awaited] == [(e.kind, getattr(e, "text", None)) for e in blocking]


def test_a_timeout_cancels_an_awaited_request_and_the_model_goes_on(tiny_bench: wb.Workbench) -> None:
    tiny_bench.inject("tiny", latency_ms=400)
    chain = tiny_bench.chain({"name": "slow", "hops": [
        {"name": "say", "model": "tiny", "prompt": "hi", "max_new_tokens": 2, "timeout_s": 0.05}]})
    with pytest.raises(wb.HopFailed) as info:
        asyncio.run(chain.arun())
    assert isinstance(info.value.cause, wb.HopTimeout)
    tiny_bench.clear_faults()
    assert tiny_bench.generate("tiny", "still there?", max_new_tokens=2).finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "mistake",
    [
        lambda bench: wb.DynamicBatching(max_wait_ms=-1),
        lambda bench: bench.inject("tiny", error_rate=2.0),
        lambda bench: bench.inject("tiny", replica=-1),
        lambda bench: bench.set_breaker("tiny", failure_threshold=0),
        lambda bench: bench.set_health_checks(-1),
        lambda bench: bench.set_cache_limits(max_entries=0),
        lambda bench: bench.allow_modules("not a module"),
    ],
    ids=["batching-setting", "fault-rate", "fault-replica", "breaker", "health-checks", "cache-limits",
         "allow-modules"],
)
def test_a_settings_mistake_is_a_settings_error(tiny_bench: wb.Workbench, mistake: Callable[[wb.Workbench], object]
                                                 ) -> None:
    # Not a bare WorkbenchError outside every branch: a caller (or a gateway) catches it as SettingsError.
    with pytest.raises(wb.SettingsError):
        mistake(tiny_bench)


def test_errors_form_a_tree_a_caller_can_catch_by_branch() -> None:
    assert issubclass(wb.HopTimeout, wb.ServingError) and issubclass(wb.CircuitOpen, wb.ServingError)
    assert issubclass(wb.RetriesExhausted, wb.ServingError) and issubclass(wb.ModelUnhealthy, wb.ServingError)
    assert issubclass(wb.UnknownModelError, wb.ModelError) and issubclass(wb.ModelOutOfMemory, wb.ModelError)
    assert issubclass(wb.HopFailed, wb.RunError) and issubclass(wb.MissingInputError, wb.RunError)
    assert issubclass(wb.ContextWindowExceeded, wb.RunError)
    assert issubclass(wb.TemplateError, wb.SpecError) and issubclass(wb.ParseError, wb.SpecError)
    assert issubclass(wb.StrategyError, wb.SettingsError) and issubclass(wb.WorkloadError, wb.SettingsError)
    statuses = {cls: cls.http_status for cls in (wb.SpecError, wb.UnknownModelError, wb.HopTimeout, wb.CircuitOpen,
                                                 wb.WorkbenchClosed, wb.ModelOutOfMemory)}
    assert statuses == {wb.SpecError: 422, wb.UnknownModelError: 404, wb.HopTimeout: 504, wb.CircuitOpen: 503,
                        wb.WorkbenchClosed: 503, wb.ModelOutOfMemory: 507}
    assert str(wb.ParseError("load: bad", hint="%autoglm load NAME SOURCE")) == "load: bad\nhint: %autoglm load NAME SOURCE"


def test_closing_the_workbench_under_an_awaited_or_streamed_run_says_so(tmp_path: Path) -> None:
    async def awaited(chain: wb.Chain) -> object:
        return await chain.arun(q="a")

    async def streamed(chain: wb.Chain) -> object:
        return [e async for e in chain.astream(q="a")]

    ways: dict[str, Callable[[wb.Chain], object]] = {
        "arun": lambda chain: asyncio.run(awaited(chain)),
        "astream": lambda chain: asyncio.run(streamed(chain)),
        "stream": lambda chain: list(chain.stream(q="a")),
    }
    for way, call in ways.items():
        bench, started = wb.Workbench(data_dir=tmp_path / way), threading.Event()

        async def held(q: str) -> str:
            started.set()
            await asyncio.sleep(60)
            return q

        chain = bench.chain({"name": "held", "hops": [{"name": "hold", "call": held}]})
        closer = threading.Thread(target=lambda: started.wait(30) and bench.close())
        closer.start()
        try:
            with pytest.raises(wb.WorkbenchClosed, match="finish what it was running"):  # not a bare CancelledError
                call(chain)
        finally:
            closer.join(30)


def test_cancelling_an_awaited_run_is_still_a_cancel(tiny_bench: wb.Workbench) -> None:
    started = threading.Event()

    async def held(q: str) -> str:
        started.set()
        await asyncio.sleep(60)
        return q

    chain = tiny_bench.chain({"name": "held", "hops": [{"name": "hold", "call": held}]})

    async def main() -> None:
        task = asyncio.ensure_future(chain.arun(q="a"))
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
    eventually(lambda: tiny_bench.runs_in_flight == 0, "the cancelled run to end on the workbench's loop")


def test_a_hop_whose_awaited_task_was_cancelled_fails_its_run_not_the_caller(bench: wb.Workbench) -> None:
    async def lookup(question: str) -> str:
        job = asyncio.ensure_future(asyncio.sleep(60))
        job.cancel()  # say, a client library cancelled its own request
        return await job  # raises CancelledError inside the hop

    def blocking(question: str) -> str:
        raise asyncio.CancelledError  # say, a helper that ran its own event loop

    def count(question: str) -> int:
        return len(question)

    for call in (lookup, blocking):
        chain = bench.chain({"name": f"cancelled_{call.__name__}", "hops": [
            {"name": "look", "call": call}, {"name": "count", "call": count},
            {"name": "both", "call": lambda look, count: f"{look} {count}"}], "output": "both"})
        with pytest.raises(wb.HopFailed, match="hop 'look' failed: .*CancelledError") as info:
            chain.run(question="hi")
        assert info.value.run.outputs == {"count": 2}  # the hop beside it finished and is kept
        batch = chain.map([{"question": "a"}, {"question": "bb"}])
        assert [run.error.hop for run in batch] == ["look", "look"] and not batch.interrupted


def test_a_hop_that_returns_a_coroutine_is_awaited_not_kept_as_its_output(bench: wb.Workbench) -> None:
    class Shout:  # a tool as an object whose __call__ is async def
        async def __call__(self, question: str) -> str:
            await asyncio.sleep(0)
            return question.upper()

    async def exclaim(text: str) -> str:
        return text + "!"

    chain = bench.chain({"name": "tools", "hops": [
        {"name": "shout", "call": Shout()},
        {"name": "exclaim", "call": lambda shout: exclaim(shout)}]})
    run = chain.run(question="hi")
    assert run.outputs == {"shout": "HI", "exclaim": "HI!"}


def test_leaving_a_stream_early_stops_its_row_instead_of_generating_on_for_nobody(tiny_bench: wb.Workbench) -> None:
    # Breaking out of chain.stream (or cancelling an awaited run) on a hop with no timeout_s left its row generating
    # to max_new_tokens: 400 steps for nobody, and every request behind it waited for them.
    from workbench.tracing import attributes as attr

    chain = tiny_bench.chain({"name": "long", "hops": [  # seeded so that it runs to 400 tokens
        {"name": "say", "model": "tiny", "prompt": "Hello", "max_new_tokens": 400, "temperature": 5.0, "seed": 0}]})

    async def leave_early() -> None:
        async for event in chain.astream():
            if event.kind == "token":
                break

    for leave in (lambda: next(e for e in chain.stream() if e.kind == "token"), lambda: asyncio.run(leave_early())):
        leave()
        tiny_bench.generate("tiny", "next", max_new_tokens=1)  # queued behind it (one at a time), so it has ended
        batch = [s for s in tiny_bench.traces().spans if s.name == "batch tiny"][-2]
        assert batch.attributes[attr.BATCH_STEPS] < 400


def test_a_streamed_hop_says_when_an_attempt_failed_so_its_tokens_are_not_taken_for_the_answer(
    tiny_path: Path,
) -> None:
    # A hop whose attempt timed out mid-answer and was retried streamed both attempts' tokens with nothing between
    # them: joined, a hop's tokens read 635 characters where its answer was 137 (14 attempts), and the magics, the
    # builder widget and an SSE client showed that. Each failed attempt is now an AttemptFailed event, and tokens
    # its request still sends after it are dropped, so the tokens after a hop's last AttemptFailed are its answer.
    with wb.Workbench() as bench:
        bench.load("tiny", tiny_path, device="cpu")
        bench.set_breaker("tiny", failure_threshold=10_000, reset_timeout_s=0.01)  # timeouts here are the point
        hop = {"name": "a", "model": "tiny", "prompt": "{{ q }}", "max_new_tokens": 100}
        chain = bench.chain({"name": "retried", "hops": [hop]})
        question = "The chain of hops and the latency of " * 5
        timeout_s = min(chain.run(q=question).duration_ms for _ in range(3)) / 1e3 / 2  # half a warm answer
        for _ in range(30):
            # Cut short partway through, an attempt streams some tokens first; a longer timeout each time, until an
            # attempt answers after others failed.
            chain.set({"a.timeout_s": timeout_s, "a.retry": {"attempts": 20, "backoff_ms": 0, "on": ["timeout"]}})
            timeout_s *= 1.25
            events = list(chain.stream(q=question))
            run = events[-1].run
            failed = [i for i, e in enumerate(events) if isinstance(e, AttemptFailed)]
            attempts = len(run.trace.table().query("name == 'text_completion tiny'"))
            assert len(failed) == attempts - (1 if run.ok else 0)
            if failed and run.ok:
                tokens = [e for e in events[failed[-1]:] if isinstance(e, Token)]
                assert "".join(t.text for t in tokens).strip() == run.output
                assert all(e.hop == "a" and e.route == "model:tiny" and "0." in e.error for e in
                           (events[i] for i in failed))  # "gave no answer within 0.0.. s"
                return
        pytest.skip("no attempt timed out before another answered, in 30 runs on this machine")


@pytest.mark.parametrize("policy", [wb.NoBatching(), wb.ContinuousBatching(max_batch=4)], ids=["padded", "continuous"])
def test_a_streamed_answer_cut_off_inside_a_character_streams_its_last_bytes_too(
    bench: wb.Workbench, tiny_path: Path, policy: wb.BatchingPolicy,
) -> None:
    # A byte-level tokenizer's answer that max_new_tokens cuts off inside a character ends in U+FFFD, and the stream
    # held that character's bytes back for a token that never came: the tokens joined to "twoance" where the hop's
    # output was "twoance\ufffd" (9 of 24 seeded answers here), so a client that printed the stream missed its end.
    bench.load("tiny", tiny_path, device="cpu")
    bench.set_batching("tiny", policy)
    cut = 0
    for seed in range(8):
        chain = bench.chain({"name": f"hot{seed}", "hops": [{"name": "say", "model": "tiny", "prompt": "你好 {{ q }}",
                                                             "max_new_tokens": 13, "temperature": 3.0, "seed": seed}]})
        events = list(chain.stream(q="x"))
        run = events[-1].run
        tokens = [e for e in events if isinstance(e, Token)]
        assert "".join(t.text for t in tokens) == run.output
        if run.output.endswith("\ufffd"):
            cut += 1
            assert len(tokens) == 13  # still one token event per token
    assert cut  # the seeds above end some answers inside a character


def test_leaving_an_astream_early_logs_no_error_for_the_tokens_still_on_their_way(
    tiny_bench: wb.Workbench, caplog: pytest.LogCaptureFixture,
) -> None:
    # Breaking out of `async for ... in chain.astream()` in asyncio.run(...) closed the caller's loop while tokens the
    # model had made were still queued on the workbench's loop: each one logged "Exception in callback
    # _TokenSink._emit ... RuntimeError: Event loop is closed" with a traceback (in 3 runs of 5 here), in the cell's
    # output, though nothing had gone wrong.
    chain = tiny_bench.chain({"name": "left", "hops": [
        {"name": "say", "model": "tiny", "prompt": "Hello", "max_new_tokens": 400, "temperature": 5.0, "seed": 0}]})

    async def leave_early() -> None:
        async for event in chain.astream():
            if event.kind == "token":
                break

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(10):
            asyncio.run(leave_early())
        tiny_bench.generate("tiny", "next", max_new_tokens=1)  # queued behind the last one, so it has ended
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_continuous_stream_given_up_mid_token_leaves_no_stream_state_behind(bench: wb.Workbench,
                                                                               tiny_path: Path) -> None:
    """A stream given up on while the continuous scheduler's collector was handing it a token: the collector wrote
    the request's stream state back after the cancel had taken the request out, and it stayed for good, one per
    abandoned stream (and it read that state outside the scheduler's lock, where a cancel could pop it first)."""
    bench.load("tiny", tiny_path, device="cpu", batching=wb.ContinuousBatching(max_batch=4))
    tokens: list[str] = []

    async def give_up() -> None:
        loop = asyncio.get_running_loop()
        task: asyncio.Task[Any] | None = None

        def on_token(_: int, text: str) -> None:  # on the collector's thread
            tokens.append(text)
            if len(tokens) == 1:
                assert task is not None
                loop.call_soon_threadsafe(task.cancel)
                time.sleep(0.3)  # the cancel takes the request out while the collector is still in its tokens

        call = Call("tiny", f"Question: {DEMO_QUESTION}\nPlan:", GenerationParams(max_new_tokens=24), on_token=on_token)
        task = asyncio.ensure_future(bench.engine.acall(call))
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(give_up())
    scheduler = bench.engine.worker("tiny")._continuous
    assert scheduler is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (scheduler._inflight or scheduler._streamed):
        time.sleep(0.02)
    assert tokens and not scheduler._inflight
    assert scheduler._streamed == {}


def test_a_stream_its_consumer_leaves_mid_run_leaves_no_pending_task_behind(
    tiny_bench: wb.Workbench, caplog: pytest.LogCaptureFixture
) -> None:
    # A served stream's client that left while the run went on: its waiting event getter was never cancelled, and
    # asyncio logged "Task was destroyed but it is pending!" for each (38 lines for 40 clients gone).
    import gc

    slow = tiny_bench.chain({"name": "slow", "hops": [{"name": "nap", "call": _nap}]})  # cancelled with the stream

    async def leave_mid_run() -> None:
        seen: list[str] = []

        async def consume() -> None:
            async for event in slow.astream(question="hi"):
                seen.append(event.kind)

        task = asyncio.ensure_future(consume())
        while not seen:
            await asyncio.sleep(0.01)
        task.cancel()  # waiting for the next event, which never comes: the run is cancelled with it
        with pytest.raises(asyncio.CancelledError):
            await task
        del task
        await asyncio.sleep(0.2)
        gc.collect()
        await asyncio.sleep(0.05)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(leave_mid_run())
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


async def _nap(question: str) -> str:
    await asyncio.sleep(30)
    return question
