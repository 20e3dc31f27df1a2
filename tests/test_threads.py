"""ChainThreads: the reusable threads chain.map walks its runs on, and how maps use them."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import WAIT_S, eventually

import workbench as wb
from workbench.chains.threads import ChainThreads


def test_a_finished_thread_takes_the_next_task_instead_of_a_new_one_starting() -> None:
    threads = ChainThreads(name="t-reuse")
    try:
        names = [threads.submit(lambda: threading.current_thread().name).result(WAIT_S) for _ in range(5)]
        eventually(lambda: threads.busy == 0, "the thread to go idle")
        assert set(names) == {"t-reuse-1"} and threads.threads == 1
    finally:
        threads.close()


def test_results_and_exceptions_reach_the_future() -> None:
    threads = ChainThreads(name="t-result")
    try:
        assert threads.submit(lambda a, b: a + b, 2, 3).result(WAIT_S) == 5
        with pytest.raises(ZeroDivisionError):
            threads.submit(lambda: 1 / 0).result(WAIT_S)
        assert threads.submit(lambda: "still serving").result(WAIT_S) == "still serving"
    finally:
        threads.close()


def test_a_task_that_waits_on_another_task_never_deadlocks() -> None:
    # A map inside a Python hop of another map: every thread busy must not stop a new task starting.
    threads = ChainThreads(name="t-nested")
    try:

        def outer(depth: int) -> int:
            return depth if depth == 0 else threads.submit(outer, depth - 1).result(WAIT_S) + 1

        assert threads.submit(outer, 4).result(WAIT_S) == 4
        assert threads.threads == 5  # one per level, each busy while the next ran
    finally:
        threads.close()


def test_idle_threads_leave_after_idle_s_and_new_work_still_runs() -> None:
    threads = ChainThreads(name="t-idle", idle_s=0.05)
    try:
        gate = threading.Event()
        futures = [threads.submit(gate.wait, WAIT_S) for _ in range(3)]
        eventually(lambda: threads.busy == 3, "three threads at work")
        gate.set()
        assert all(f.result(WAIT_S) for f in futures)
        eventually(lambda: threads.threads == 0, "idle threads to leave")
        assert not [t for t in threading.enumerate() if t.name.startswith("t-idle")]
        assert threads.submit(lambda: 7).result(WAIT_S) == 7
    finally:
        threads.close()


def test_close_lets_idle_threads_go_now_and_busy_ones_after_their_task() -> None:
    threads = ChainThreads(name="t-close")
    gate = threading.Event()
    slow = threads.submit(gate.wait, WAIT_S)
    threads.submit(lambda: None).result(WAIT_S)
    eventually(lambda: threads.busy == 1 and threads.threads == 2, "one busy thread and one idle")
    threads.close()
    eventually(lambda: threads.threads == 1, "the idle thread to leave")
    with pytest.raises(wb.WorkbenchClosed, match="closed"):
        threads.submit(lambda: None)
    gate.set()
    assert slow.result(WAIT_S) is True  # the task in flight finished
    eventually(lambda: threads.threads == 0, "the busy thread to leave after its task")


def test_limited_runs_at_most_its_limit_at_once_and_leaves_no_lane_behind() -> None:
    threads = ChainThreads(name="t-limited")
    try:
        limited = threads.limited(3)
        lock = threading.Lock()
        gate = threading.Event()
        running, peak, order = [0], [0], []

        def task(i: int) -> int:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                order.append(i)
            gate.wait(WAIT_S)
            with lock:
                running[0] -= 1
            return i * i

        futures = [limited.submit(task, i) for i in range(20)]
        eventually(lambda: running[0] == 3, "three tasks running")
        time.sleep(0.05)  # room for a fourth to start, were the limit not kept
        assert running[0] == 3 and sum(f.done() for f in futures) == 0
        gate.set()
        assert [f.result(WAIT_S) for f in futures] == [i * i for i in range(20)]
        assert peak[0] == 3 and sorted(order) == list(range(20))
        eventually(lambda: threads.busy == 0, "every lane to end once the queue is empty")
        assert threads.threads <= 3
        assert limited.submit(task, 5).result(WAIT_S) == 25  # a later submit starts a lane again
    finally:
        threads.close()


def test_cancel_queued_drops_what_has_not_started_and_lets_the_rest_finish() -> None:
    threads = ChainThreads(name="t-cancel")
    try:
        limited = threads.limited(1)
        gate = threading.Event()
        first = limited.submit(gate.wait, WAIT_S)
        queued = [limited.submit(lambda: "ran") for _ in range(3)]
        eventually(lambda: first.running(), "the first task to start")
        limited.cancel_queued()
        gate.set()
        assert first.result(WAIT_S) is True
        assert all(f.cancelled() for f in queued)
        eventually(lambda: threads.busy == 0, "the lane to end")
    finally:
        threads.close()


# -- as chain.map uses them --------------------------------------------------------------------


def test_maps_reuse_the_workbench_threads_and_never_exceed_their_concurrency(tiny_bench: wb.Workbench) -> None:
    lock = threading.Lock()
    running = [0]
    peak = [0]
    walkers: set[str] = set()

    def tracked(n: str) -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return n

    def walk(work: str) -> str:  # a second hop, fed by the first
        with lock:
            walkers.add(threading.current_thread().name)
        return work

    chain = tiny_bench.chain(
        {"name": "bounded", "hops": [{"name": "work", "call": tracked}, {"name": "after", "call": walk, "uses": ["work"]}]}
    )
    first = chain.map([{"n": str(i)} for i in range(12)], concurrency=3)
    eventually(lambda: tiny_bench.chain_threads.busy == 0, "the map's threads to go idle")
    pooled = tiny_bench.chain_threads.threads
    second = chain.map([{"n": str(i)} for i in range(12, 24)], concurrency=3)
    assert [run.output for run in first] == [str(i) for i in range(12)]
    assert [run.output for run in second] == [str(i) for i in range(12, 24)]
    assert 1 <= peak[0] <= 3
    assert tiny_bench.chain_threads.threads <= pooled + 1  # the second map ran on the threads the first left
    assert walkers and all(name.startswith(("workbench-map-", "workbench-hop")) for name in walkers)


def test_a_map_inside_a_python_hop_of_a_map_finishes(tiny_bench: wb.Workbench) -> None:
    inner = tiny_bench.chain({"name": "inner", "hops": [{"name": "double", "call": lambda n: str(2 * int(n))}]})

    def fan_out(n: str) -> str:
        batch = inner.map([{"n": n}, {"n": str(int(n) + 1)}], concurrency=2)
        return ",".join(run.output for run in batch)

    outer = tiny_bench.chain({"name": "outer", "hops": [{"name": "fan", "call": fan_out}]})
    batch = outer.map([{"n": str(i)} for i in range(4)], concurrency=4)
    assert [run.output for run in batch] == ["0,2", "2,4", "4,6", "6,8"]
