"""Soak: hundreds of chain runs under injected failures and latency, with retries and fallbacks; nothing is lost."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import workbench as wb

SESSIONS = 3
RUNS_PER_SESSION = 100
SPEC = """
name: soak
hops:
  - name: plan
    model: tiny
    prompt: "Question: {{ question }}\\nPlan:"
    max_new_tokens: 6
    retry: {attempts: 3, backoff_ms: 2, max_backoff_ms: 20}
    timeout_s: 60
    fallback: backup
  - name: answer
    model: tiny
    prompt: "{{ plan }}\\nQuestion: {{ question }}\\nAnswer:"
    max_new_tokens: 6
    retry: {attempts: 2, backoff_ms: 2, on: [error, timeout, oom, breaker]}
    timeout_s: 60
    fallback: [backup, canned]
  - name: canned
    call: workbench.demo:canned_answer
output: answer
"""


def test_hundreds_of_runs_under_faults_lose_nothing_and_leak_no_thread(tiny_path: Path, tmp_path: Path) -> None:
    before = set(threading.enumerate())
    bench = wb.Workbench(data_dir=tmp_path)  # the durable SQLite session store
    try:
        for name, seed in (("tiny", 1), ("backup", 2)):
            bench.load(name, tiny_path, device="cpu", batching=wb.DynamicBatching(max_batch=16, max_wait_ms=5))
            bench.inject(name, error_rate=0.2, latency_ms=(0, 15), seed=seed)
        # The primary's breaker trips on a streak of failures; the fallback model stays in rotation.
        bench.set_breaker("tiny", failure_threshold=4, reset_timeout_s=0.1)
        bench.set_breaker("backup", failure_threshold=1_000)
        chain = bench.chain(SPEC)

        def session(index: int) -> list[wb.Run]:
            inputs = [{"question": f"s{index} #{i}: what is {i} + {index}?"} for i in range(RUNS_PER_SESSION)]
            return list(chain.map(inputs, concurrency=12, session=f"s{index}"))

        with ThreadPoolExecutor(SESSIONS) as pool:
            by_session = dict(enumerate(pool.map(session, range(SESSIONS))))

        runs = [run for session_runs in by_session.values() for run in session_runs]
        assert len(runs) == SESSIONS * RUNS_PER_SESSION and all(run is not None for run in runs)
        for run in runs:  # every run has an output, or a failure that says where and why
            if run.ok:
                assert isinstance(run.output, str) and set(run.served_by) == {"plan", "answer"}
            else:
                assert isinstance(run.error, wb.HopFailed) and run.error.hop in ("plan", "answer")
                assert run.error.cause is not None and str(run.error).startswith(f"hop {run.error.hop!r} failed: ")
        assert len({run.id for run in runs}) == len(runs)
        assert {run.id for run in bench.runs()} >= {run.id for run in runs}

        # The faults really happened, and retries, fallbacks and the breaker really answered them.
        events = Counter(bench.traces().events()["event"])
        assert events["attempt.failed"] > 0 and events["retry"] > 0 and events["fallback"] > 0
        for run in runs:
            if not run.ok:
                assert any(why in str(run.error) for why in ("injected fault", "circuit breaker", "no answer within"))
        served = Counter(path for run in runs if run.ok for path in run.served_by.values())
        # How the work splits depends on when the primary's breaker trips; both paths must have served.
        assert served["model:tiny"] > 0 and served["model:backup"] > 0
        # Unprotected, a run would succeed with probability 0.8 x 0.8; a plan whose primary and fallback both fail
        # (or whose primary's breaker is open) is what is left.
        assert sum(1 for run in runs if run.ok) >= 0.8 * len(runs)

        for index, session_runs in by_session.items():  # the store kept exactly the runs that finished
            records = bench.session(f"s{index}").records()
            assert len(records) == len(session_runs)
            assert Counter((r.run_id, r.status) for r in records) == Counter((r.id, r.status) for r in session_runs)
    finally:
        bench.close()

    started = [t for t in threading.enumerate() if t not in before]
    for thread in started:  # pools wind down after close; a worker or hop thread that hangs is a leak
        thread.join(timeout=30)
    assert not [t.name for t in started if t.is_alive()]
