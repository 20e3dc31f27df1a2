"""Durable sessions: the SQLite store across restarts, threads, processes and a kill mid-write."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

import workbench as wb
from workbench.chains.context import record_bytes
from workbench.chains.sqlite_store import SCHEMA_VERSION, SESSIONS_FILE

CHAT = dedent(
    """\
    name: chat
    hops:
      - name: reply
        model: tiny
        prompt: "{{ history }}\\nQuestion: {{ question }}\\nAnswer:"
        max_new_tokens: 4
    """
)


def record(run_id: str, **fields: Any) -> wb.RunRecord:
    values: dict[str, Any] = {"chain": "c", "inputs": {"q": run_id}, "outputs": {"a": f"answer {run_id}"},
                              "output": f"answer {run_id}", "started_at": time.time(), "duration_ms": 1.5}
    return wb.RunRecord(run_id=run_id, **{**values, **fields})


def reply_prompt(run: wb.Run) -> str:
    """The prompt the 'reply' hop rendered, as its span recorded it."""
    (span,) = [s for s in run.trace.spans if s.name == "hop reply"]
    return str(span.attributes["input.value"])


# -- across a restart ---------------------------------------------------------------------------


def test_sessions_survive_a_restart_on_the_same_data_dir(tiny_path: Path, tmp_path: Path) -> None:
    with wb.Workbench(data_dir=tmp_path) as first_kernel:
        first_kernel.load("tiny", tiny_path, device="cpu")
        chat = first_kernel.chain(CHAT)
        earlier = [chat.run(session="s1", question=q) for q in ("What is the capital of France?", "And of Italy?")]
        chat.run(session="other", question="Unrelated?")
        kept = first_kernel.session("s1").records()
    assert (tmp_path / SESSIONS_FILE).is_file()

    with wb.Workbench(data_dir=tmp_path) as second_kernel:
        assert second_kernel.sessions() == ["other", "s1"]
        assert second_kernel.session("s1").records() == kept  # every field, exactly as written
        history = second_kernel.session("s1").history()
        assert list(history["run_id"]) == [run.id for run in earlier]
        assert list(history["input.question"]) == ["What is the capital of France?", "And of Italy?"]
        assert list(history["output"]) == [run.output for run in earlier]
        assert list(history["status"]) == ["ok", "ok"]

        # The next run's template reads the history that the earlier kernel left.
        second_kernel.load("tiny", tiny_path, device="cpu")
        later = second_kernel.chain(CHAT).run(session="s1", question="And of Spain?")
        prompt = reply_prompt(later)
        assert prompt.index("question: What is the capital of France?") < prompt.index("question: And of Italy?")
        assert f"output: {earlier[1].output}" in prompt
        assert "Unrelated?" not in prompt  # another session's runs stay out
        assert [r.run_id for r in second_kernel.session("s1").records()] == [*(run.id for run in earlier), later.id]


@pytest.mark.parametrize("given", ["argument", "environment"])
def test_a_relative_data_dir_stays_where_it_was_when_the_working_directory_changes(
    given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data_dir="data" (or AUTOGLM_DATA_DIR=data), then a notebook's %cd: the files open on first use, so the session's
    history was read from, and its next runs kept in, another directory's data/."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOGLM_DATA_DIR", "data")
    with wb.Workbench(data_dir="data" if given == "argument" else None) as bench:
        chain = bench.chain({"name": "py", "hops": [{"name": "echo", "call": lambda q: q}]})
        chain.run(session="s1", q="before")
        monkeypatch.chdir(tmp_path / "sub")
        assert bench.data_dir.is_absolute() and bench.data_dir.samefile(tmp_path / "data")
        assert [r.output for r in bench.session("s1").records()] == ["before"]
        chain.run(session="s1", q="after")
    assert not (tmp_path / "sub" / "data").exists()
    with wb.Workbench(data_dir=tmp_path / "data") as later:
        assert [r.output for r in later.session("s1").records()] == ["before", "after"]


def test_the_file_is_created_on_first_use_in_wal_mode_with_its_schema_version(tmp_path: Path) -> None:
    path = tmp_path / SESSIONS_FILE
    with wb.Workbench(data_dir=tmp_path) as bench:
        assert isinstance(bench.store, wb.SQLiteContextStore)
        chain = bench.chain({"name": "py", "hops": [{"name": "echo", "call": lambda q: q}]})
        chain.run(q="no session")
        assert not path.exists()  # nothing asked for a session yet
        chain.run(session="s", q="hi")
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
        assert raw.execute("SELECT session, chain, output FROM runs").fetchall() == [("s", "py", '"hi"')]


def test_a_store_from_a_newer_workbench_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / SESSIONS_FILE
    with closing(sqlite3.connect(path)) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with wb.Workbench(data_dir=tmp_path) as bench:
        with pytest.raises(wb.StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer than") as info:
            bench.session("s1").records()
        assert "upgrade autoglm-workbench" in str(info.value.hint)
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert raw.execute("SELECT name FROM sqlite_master").fetchall() == []  # no table was added


def test_an_unusable_data_dir_is_a_store_error_before_any_hop_runs(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    calls: list[str] = []
    with wb.Workbench(data_dir=not_a_dir) as bench:
        chain = bench.chain({"name": "py", "hops": [{"name": "echo", "call": lambda q: calls.append(q) or q}]})
        with pytest.raises(wb.StoreError, match="cannot open the session store") as info:
            chain.run(session="s1", q="lost?")
        assert "InMemoryContextStore" in str(info.value.hint)
        assert calls == []
        assert chain.run(q="no session needs no store").output == "no session needs no store"


def test_a_damaged_store_file_is_named_as_damaged_with_what_to_do(tmp_path: Path) -> None:
    """A store file cut short (a copy interrupted, a disk gone bad): every session run was refused with a hint to pick
    a writable directory, which says nothing of the damage nor how to get the sessions back."""
    store = wb.SQLiteContextStore(tmp_path / SESSIONS_FILE)
    for index in range(200):
        store.append(f"s{index % 5}", record(f"r{index}", output="answer " * 200))
    store.close()  # the last connection checkpoints the log into the file
    path = tmp_path / SESSIONS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with wb.Workbench(data_dir=tmp_path) as bench:
        with pytest.raises(wb.StoreError, match="malformed") as info:
            bench.sessions()
    assert "damaged" in str(info.value.hint) and ".recover" in str(info.value.hint)
    assert path.stat().st_size > 0  # left as it was, for a recovery


def test_a_damaged_row_is_a_store_error_naming_the_run_and_the_column(tmp_path: Path) -> None:
    store = wb.SQLiteContextStore(tmp_path / SESSIONS_FILE)
    store.append("s1", record("r1"))
    store.append("s1", record("r2"))
    store.close()
    with closing(sqlite3.connect(tmp_path / SESSIONS_FILE)) as raw, raw:  # edited by hand, badly
        raw.execute("UPDATE runs SET outputs = '{broken' WHERE run_id = 'r1'")
    with pytest.raises(wb.StoreError, match="run 'r1' of session 's1' has a damaged outputs column") as info:
        store.history("s1")
    assert "DELETE FROM runs WHERE run_id = 'r1'" in str(info.value.hint)
    assert [r.run_id for r in store.history("s1", limit=1)] == ["r2"]  # the rows around it still read
    store.close()


def test_runs_after_the_file_was_deleted_in_use_land_in_a_new_file(tmp_path: Path) -> None:
    store = wb.SQLiteContextStore(tmp_path / SESSIONS_FILE)
    store.append("s1", record("before"))
    for leftover in tmp_path.glob(SESSIONS_FILE + "*"):
        leftover.unlink()  # someone cleans the data directory while the workbench runs
    store.append("s1", record("after"))
    assert [r.run_id for r in store.history("s1")] == ["after"]
    store.close()
    reopened = wb.SQLiteContextStore(tmp_path / SESSIONS_FILE)  # not lost with the deleted file's last handle
    assert [r.run_id for r in reopened.history("s1")] == ["after"]
    reopened.close()


def test_a_run_the_store_cannot_keep_is_still_answered_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / SESSIONS_FILE

    def sabotage(q: str) -> str:  # mid-run, the session file is taken away and its name made unusable
        for leftover in tmp_path.glob(SESSIONS_FILE + "*"):
            leftover.unlink()
        path.mkdir()
        return q

    with wb.Workbench(data_dir=tmp_path) as bench:
        chain = bench.chain({"name": "py", "hops": [{"name": "echo", "call": sabotage}]})
        with pytest.warns(RuntimeWarning, match="session 's1' finished, but the session store could not keep it"):
            run = chain.run(session="s1", q="kept?")
        assert run.ok and run.output == "kept?"
        assert bench.runs()[-1].id == run.id  # the workbench keeps it; only the session's history misses it


def test_an_empty_or_blank_session_id_is_refused_not_run_as_no_session(tmp_path: Path) -> None:
    with wb.Workbench(data_dir=tmp_path) as bench:
        chain = bench.chain({"name": "py", "hops": [{"name": "echo", "call": lambda q: q}]})
        with pytest.raises(wb.InvalidInput, match="the session id is empty"):
            chain.run(session="", q="where does this go?")
        with pytest.raises(wb.InvalidInput, match="the session id is empty"):
            chain.map([{"q": "a"}], session="")
        # Blank: a session nobody could tell apart from the next blank one in a table or the store's listing.
        with pytest.raises(wb.InvalidInput, match=re.escape("the session id ' \\t' is blank")):
            chain.run(session=" \t", q="and this?")
        # Not text: stored as its text, True, 1 and "1" were one conversation (and the memory store's listing raised
        # TypeError); a tuple was a "store failed" error.
        for odd in (True, 1, 1.5, b"1", ("t",)):
            with pytest.raises(wb.InvalidInput, match=f"the session id must be text, not {type(odd).__name__}"):
                chain.run(session=odd, q="whose?")
        with pytest.raises(wb.InvalidInput, match="must be text"):
            bench.session(1).records()
        assert bench.runs() == []


def test_a_session_id_a_run_refuses_is_refused_when_read_or_forgotten_too(tmp_path: Path) -> None:
    """A run refused it already; reading or forgetting it raised a raw UnicodeEncodeError from SQLite."""
    with wb.Workbench(data_dir=tmp_path) as bench:
        with pytest.raises(wb.InvalidInput, match="the session id is not valid text"):
            bench.session("notes \udcff").records()  # surrogateescape's reading of a file name that is not UTF-8
        with pytest.raises(wb.InvalidInput, match="the session id is empty"):
            bench.session("").forget()


def test_a_chain_named_by_a_file_name_that_is_not_utf8_is_refused_when_built(tmp_path: Path) -> None:
    """A spec file without a name is named after the file; réponse.yaml written in Latin-1 reads as 'r\\udce9ponse':
    the chain was built, and its first run in a session (or cache: exact answer) raised a raw UnicodeEncodeError."""
    path = Path(os.fsdecode(os.fsencode(tmp_path) + "/r\xe9ponse.yaml".encode("latin-1")))
    path.write_text("hops:\n  - name: echo\n    call: workbench.demo:answer_stats\n", encoding="utf-8")
    with wb.Workbench(data_dir=tmp_path) as bench:
        with pytest.raises(wb.SpecError, match="the chain's name is not valid text") as info:
            bench.chain(path)
        assert info.value.field == "name"
        spec = {"hops": [{"name": "echo", "call": "workbench.demo:answer_stats"}]}
        for name in ("r\udce9ponse", "", " "):  # bench.chain(spec, name=...) renames it: the same checks
            with pytest.raises(wb.SpecError, match="not valid text|needs a name") as info:
                bench.chain({**spec, "name": "ok"}, name=name)
            assert info.value.field == "name"
        assert "ok" not in bench.chains()


def test_the_write_ahead_log_shrinks_back_once_a_long_reader_lets_go(tmp_path: Path) -> None:
    from workbench.chains.sqlite_store import WAL_LIMIT_BYTES

    store = wb.SQLiteContextStore(tmp_path / SESSIONS_FILE)
    store.append("s", record("r0"))
    wal = tmp_path / (SESSIONS_FILE + "-wal")
    with closing(sqlite3.connect(tmp_path / SESSIONS_FILE, isolation_level=None)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM runs").fetchall()  # its snapshot keeps every later write in the log
        for i in range(100):
            store.append("s", record(f"r{i + 1}", output="x" * 100_000))
        reader.execute("COMMIT")
    grown = wal.stat().st_size
    for i in range(3):  # the next writes checkpoint, then start the log over
        store.append("s", record(f"after{i}"))
    assert grown > 2 * WAL_LIMIT_BYTES and wal.stat().st_size <= WAL_LIMIT_BYTES, (grown, wal.stat().st_size)
    assert len(store.history("s")) == 104
    store.close()


# -- the store contract, for both stores ----------------------------------------------------------


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[wb.ContextStore]:
    made = wb.SQLiteContextStore(tmp_path / SESSIONS_FILE) if request.param == "sqlite" else wb.InMemoryContextStore()
    yield made
    made.close()


def test_history_is_oldest_first_and_limit_keeps_the_latest(store: wb.ContextStore) -> None:
    for index in range(5):
        store.append("a", record(f"a{index}"))
        if index % 2:
            store.append("b", record(f"b{index}"))
    assert [r.run_id for r in store.history("a")] == ["a0", "a1", "a2", "a3", "a4"]
    assert [r.run_id for r in store.history("a", limit=2)] == ["a3", "a4"]
    assert [r.run_id for r in store.history("a", limit=50)] == ["a0", "a1", "a2", "a3", "a4"]
    assert store.history("a", limit=0) == []
    assert [r.run_id for r in store.history("b")] == ["b1", "b3"]
    assert store.history("nobody") == []
    assert store.sessions() == ["a", "b"]
    store.close()  # a later use reopens
    assert store.history("a", limit=1) == [store.history("a")[-1]]


def test_a_history_setting_past_sqlites_integers_reads_the_whole_history(tmp_path: Path) -> None:
    # history: 10**20 is "all of it"; SQLite's LIMIT holds 64 bits, and the run raised a raw OverflowError.
    with wb.Workbench(data_dir=tmp_path) as bench:
        counted = {"name": "echo", "call": lambda history, q: f"{len(history)}:{q}"}
        chain = bench.chain({"name": "py", "history": 10**20, "hops": [counted]})
        assert [chain.run(session="s1", q=q).output for q in ("a", "b")] == ["0:a", "1:b"]


def test_in_memory_store_keeps_sessions_in_memory_only(tmp_path: Path) -> None:
    with wb.Workbench(data_dir=tmp_path, store=wb.InMemoryContextStore()) as bench:
        counted = {"name": "echo", "call": lambda history, q: f"{len(history)}:{q}"}  # history: earlier runs
        chain = bench.chain({"name": "py", "hops": [counted]})
        assert [chain.run(session="s1", q=q).output for q in ("a", "b", "c")] == ["0:a", "1:b", "2:c"]
        assert list(bench.session("s1").history()["output"]) == ["0:a", "1:b", "2:c"]
        assert bench.sessions() == ["s1"]
    assert list(tmp_path.iterdir()) == []  # no file written
    with wb.Workbench(data_dir=tmp_path) as later:
        assert later.sessions() == []


def test_forget_deletes_one_sessions_runs_only(store: wb.ContextStore) -> None:
    for run_id in ("a1", "a2"):
        store.append("alice", record(run_id))
    store.append("bob", record("b1"))
    assert store.forget("alice") == 2
    assert store.history("alice") == [] and store.sessions() == ["bob"]
    assert [r.run_id for r in store.history("bob")] == ["b1"]
    assert store.forget("alice") == 0  # nothing left to forget is no error
    store.append("alice", record("a3"))  # the conversation starts over
    assert [r.run_id for r in store.history("alice")] == ["a3"]


def test_a_forgotten_session_runs_with_no_history(tiny_path: Path, tmp_path: Path) -> None:
    with wb.Workbench(data_dir=tmp_path) as bench:
        bench.load("tiny", tiny_path)
        chat = bench.chain(CHAT)
        chat.run(session="s1", question="first?")
        assert "first?" in reply_prompt(chat.run(session="s1", question="second?"))
        assert bench.session("s1").forget() == 2
        assert "first?" not in reply_prompt(chat.run(session="s1", question="third?"))
        assert len(bench.runs()) == 3  # the workbench's own record of the runs stays


@pytest.mark.parametrize("forgetter", ["sqlite", "in-memory", "another kernel"])
def test_a_run_in_flight_when_its_session_is_forgotten_is_not_written_back_into_it(
    tmp_path: Path, forgetter: str
) -> None:
    """session.forget() while a run of that session was in flight on another thread: the run, built on the forgotten
    history, was written back when it finished, and the next run read the forgotten conversation through it. And
    when another workbench on the same data directory (another kernel, a server) forgot it, it was written back even
    after that was mended here: only the workbench that forgot knew of the forget."""
    entered, release = threading.Event(), threading.Event()

    def reply(history: list[wb.RunRecord], q: str) -> str:
        if q == "held":
            entered.set()
            release.wait(60)
        return f"{len(history)}:{q}"

    store = wb.InMemoryContextStore() if forgetter == "in-memory" else None
    with wb.Workbench(data_dir=tmp_path, store=store) as bench, ExitStack() as others:
        other = others.enter_context(wb.Workbench(data_dir=tmp_path)) if forgetter == "another kernel" else bench
        chain = bench.chain({"name": "py", "hops": [{"name": "reply", "call": reply}]})
        assert chain.run(session="s1", q="a").output == "0:a"
        held: list[wb.Run] = []
        running = threading.Thread(target=lambda: held.append(chain.run(session="s1", q="held")))
        running.start()
        assert entered.wait(60)
        assert other.session("s1").forget() == 1
        release.set()
        running.join(60)
        assert [run.output for run in held] == ["1:held"]  # its caller has its answer, made from what it read
        assert bench.session("s1").records() == other.session("s1").records() == []  # the session does not keep it
        assert chain.run(session="s1", q="b").output == "0:b"  # the conversation starts over
        assert [r.output for r in other.session("s1").records()] == ["0:b"]
        assert {run.id for run in bench.runs()} >= {held[0].id}  # the workbench's own record of the run stays


# -- limits: what a store keeps --------------------------------------------------------------------------


def ids(store: wb.ContextStore, session: str) -> list[str]:
    return [r.run_id for r in store.history(session)]


def counted(store: wb.ContextStore) -> dict[str, int]:
    """The store's sessions, runs and bytes counted from what it holds, to check its running totals against."""
    sessions = store.sessions()
    records = [r for name in sessions for r in store.history(name)]
    return {"sessions": len(sessions), "runs": len(records), "bytes": sum(record_bytes(r) for r in records)}


def test_a_session_keeps_its_newest_runs_per_session(store: wb.ContextStore) -> None:
    store.set_limits(wb.SessionLimits(runs_per_session=3))
    for index in range(5):
        store.append("a", record(f"a{index}"))
    store.append("b", record("b0"))
    assert ids(store, "a") == ["a2", "a3", "a4"] and ids(store, "b") == ["b0"]
    assert store.stats() == {**counted(store), "evicted_runs": 2}


def test_past_max_sessions_the_least_recently_active_session_goes_whole(store: wb.ContextStore) -> None:
    store.set_limits(wb.SessionLimits(max_sessions=2))
    store.append("a", record("a0"))
    store.append("b", record("b0"))
    store.append("a", record("a1"))  # a is now the more recently active
    store.append("c", record("c0"))  # a third session: b goes
    assert store.sessions() == ["a", "c"] and ids(store, "a") == ["a0", "a1"]
    store.append("c", record("c1"))  # nothing more goes: still two sessions
    assert store.stats() == {**counted(store), "evicted_runs": 1}


def test_past_max_bytes_other_sessions_go_then_the_written_sessions_oldest_runs(store: wb.ContextStore) -> None:
    size = record_bytes(record("x0"))
    assert size == record_bytes(record("y9")) > 40  # the records below are all this size
    store.set_limits(wb.SessionLimits(max_bytes=3 * size))
    for run_id in ("x0", "y0", "x1"):
        store.append(run_id[0], record(run_id))
    store.append("z", record("z0"))  # 4 runs' bytes: y, the least recently active, goes
    assert store.sessions() == ["x", "z"] and store.stats()["bytes"] == 3 * size
    store.set_limits(wb.SessionLimits(max_bytes=size // 2))  # less than one run: each write keeps its newest alone
    store.append("z", record("z1"))
    assert store.sessions() == ["z"] and ids(store, "z") == ["z1"]
    assert store.stats() == {**counted(store), "evicted_runs": 4}


def test_runs_older_than_max_age_go_at_the_next_write(store: wb.ContextStore) -> None:
    now = time.time()
    store.append("a", record("old", started_at=now - 3600))
    store.append("a", record("new", started_at=now - 10))
    store.append("b", record("older", started_at=now - 7200))
    store.set_limits(wb.SessionLimits(max_age_s=600))
    assert store.sessions() == ["a", "b"]  # from the next write on
    store.append("c", record("now"))
    assert store.sessions() == ["a", "c"] and ids(store, "a") == ["new"]
    assert store.stats()["evicted_runs"] == 2


@pytest.mark.parametrize("bad", [{"runs_per_session": 0}, {"max_sessions": True}, {"max_bytes": 1.5},
                                 {"max_age_s": 0}, {"max_age_s": float("inf")}, {"max_age_s": "1d"}])
def test_a_limit_that_is_no_bound_is_refused_naming_it(bad: dict[str, Any]) -> None:
    (name,) = bad
    with pytest.raises(wb.SettingsError, match=f"SessionLimits {name} must be"):
        wb.SessionLimits(**bad)


def test_a_run_in_flight_is_kept_when_limits_trim_its_session_but_not_when_it_is_forgotten(tmp_path: Path) -> None:
    """The limits dropping a session's oldest runs leave it the same session: a run that read its history before is
    written back (it was refused when the forget check counted the runs it had read)."""
    store = wb.SQLiteContextStore(tmp_path / SESSIONS_FILE, limits=wb.SessionLimits(runs_per_session=1))
    with closing(store):
        store.append("s", record("r0"))
        _, mark = store.marked_history("s")
        store.append("s", record("r1"))  # another run of the session, meanwhile: r0 goes
        assert ids(store, "s") == ["r1"]
        assert store.append_marked("s", record("r2"), mark)
        assert ids(store, "s") == ["r2"]
        _, mark = store.marked_history("s")
        store.forget("s")
        store.append("s", record("r3"))  # the conversation started over meanwhile
        assert not store.append_marked("s", record("r4"), mark)
        assert ids(store, "s") == ["r3"]


def test_totals_hold_across_two_connections_and_a_forget(tmp_path: Path) -> None:
    path = tmp_path / SESSIONS_FILE
    with closing(wb.SQLiteContextStore(path)) as one, closing(wb.SQLiteContextStore(path)) as two:
        for index in range(6):
            (one if index % 2 else two).append(f"s{index % 3}", record(f"r{index}"))
        assert two.forget("s1") == 2
        one.append("s1", record("again"))
        assert one.stats() == {**counted(one), "evicted_runs": 0} and two.stats()["runs"] == 5
        with closing(sqlite3.connect(path)) as raw:
            assert raw.execute("SELECT COUNT(*), SUM(bytes) FROM runs").fetchone() == (5, counted(one)["bytes"])


def test_a_store_of_the_first_schema_is_upgraded_with_its_sizes_and_totals(tmp_path: Path) -> None:
    """A sessions file written before the limits (schema 1) opens, and its runs are counted as new ones are."""
    path = tmp_path / SESSIONS_FILE
    with closing(wb.SQLiteContextStore(path)) as store:
        for index in range(4):
            store.append(f"s{index % 2}", record(f"r{index}", inputs={"q": "é" * index}))
        expected = counted(store)
    with closing(sqlite3.connect(path)) as raw:  # back to schema 1, as an older workbench left it
        for name in ("run_added", "run_removed"):
            raw.execute(f"DROP TRIGGER {name}")
        for name in ("sessions", "totals"):
            raw.execute(f"DROP TABLE {name}")
        raw.execute("DROP INDEX runs_by_start")
        raw.execute("ALTER TABLE runs DROP COLUMN bytes")
        raw.execute("PRAGMA user_version = 1")
        raw.commit()
    with closing(wb.SQLiteContextStore(path)) as store:
        assert store.stats() == {**expected, "evicted_runs": 0}
        assert ids(store, "s1") == ["r1", "r3"]
        store.append("s1", record("r4"))
        assert store.stats() == {**counted(store), "evicted_runs": 0}
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2


def test_a_notebooks_store_keeps_every_run_unless_told(tmp_path: Path) -> None:
    # An upgrade must not begin to drop a researcher's oldest sessions unasked: only a server bounds by default.
    with wb.Workbench(data_dir=tmp_path) as bench:
        assert bench.session_limits == wb.SessionLimits() == wb.SessionLimits(None, None, None, None)
        assert wb.InMemoryContextStore().limits == wb.SessionLimits()


def test_a_workbench_bounds_its_sessions_and_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with wb.Workbench(data_dir=tmp_path, session_limits=wb.SessionLimits(runs_per_session=2)) as bench:
        assert bench.session_limits == wb.SessionLimits(runs_per_session=2)
        echo = {"name": "echo", "call": lambda history, q: f"{len(history)}:{q}"}
        chain = bench.chain({"name": "py", "hops": [echo]})
        with caplog.at_level("WARNING", logger="workbench.chains.context"):
            outputs = [chain.run(session="s1", q=q).output for q in "abcd"]
        assert outputs == ["0:a", "1:b", "2:c", "2:d"]  # a run reads what its session still keeps
        assert list(bench.session("s1").history()["output"]) == ["2:c", "2:d"]
        assert bench.session_stats()["evicted_runs"] == 2
        (warning,) = [r.getMessage() for r in caplog.records if r.name == "workbench.chains.context"]
        assert "reached its limits" in warning and "runs_per_session=2" in warning
        with pytest.raises(wb.SettingsError, match="takes a wb.SessionLimits"):
            bench.set_session_limits({"runs_per_session": 5})  # type: ignore[arg-type]
        assert bench.session_limits == wb.SessionLimits(runs_per_session=2)  # unchanged by the refusal
        bench.set_session_limits(wb.SessionLimits(runs_per_session=None, max_bytes=None))  # no bound at all
        for q in "efg":
            chain.run(session="s1", q=q)
        assert bench.session_stats()["runs"] == 5


def test_a_store_of_your_own_is_told_to_bound_itself(tmp_path: Path) -> None:
    class Plain(wb.ContextStore):
        def append(self, session: str, record: wb.RunRecord) -> None: ...
        def history(self, session: str, limit: int | None = None) -> list[wb.RunRecord]: return []
        def sessions(self) -> list[str]: return []

    with wb.Workbench(data_dir=tmp_path, store=Plain()) as bench:
        with pytest.raises(wb.SettingsError, match="one of your own, which keeps no limits"):
            bench.set_session_limits(wb.SessionLimits(runs_per_session=3))
        with pytest.raises(wb.SettingsError, match="keeps no limits"):
            bench.session_stats()


# -- what JSON cannot hold --------------------------------------------------------------------------


class Opaque:
    """A value JSON cannot hold, that refuses to be pickled: the store must keep its repr instead."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __repr__(self) -> str:
        return f"Opaque({self.n})"

    def __reduce__(self) -> Any:
        raise AssertionError("the session store tried to pickle a value")


def test_values_json_cannot_hold_are_stored_as_their_repr_with_a_note(tmp_path: Path) -> None:
    with wb.Workbench(data_dir=tmp_path) as bench:
        chain = bench.chain({"name": "odd", "hops": [
            {"name": "text", "call": lambda q: f"about {q!r}"},
            {"name": "stats", "call": lambda text: {"words": len(text.split()), "raw": Opaque(7)}},
        ], "output": "stats"})
        run = chain.run(session="s1", q=Opaque(1))
        assert isinstance(run.output["raw"], Opaque)  # the Run itself keeps the real objects
        chain.run(session="s1", q="plain")
    with wb.Workbench(data_dir=tmp_path) as restarted:
        odd, plain = restarted.session("s1").records()
    assert odd.inputs == {"q": "Opaque(1)"}
    assert odd.outputs == {"text": "about Opaque(1)", "stats": "{'words': 2, 'raw': Opaque(7)}"}
    assert odd.output == "{'words': 2, 'raw': Opaque(7)}"
    assert odd.meta["stored_as_repr"] == ["inputs.q", "outputs.stats", "output"]
    assert odd.meta["config_version"] == plain.meta["config_version"] == 1  # the chain's configuration, never edited
    assert plain.inputs == {"q": "plain"} and plain.outputs["text"] == "about 'plain'"  # JSON values stay JSON
    assert plain.meta["stored_as_repr"] == ["outputs.stats", "output"]
    with closing(sqlite3.connect(tmp_path / SESSIONS_FILE)) as raw:  # every column is JSON text: nothing runs on read
        for row in raw.execute("SELECT typeof(inputs), typeof(outputs), typeof(output), typeof(meta),"
                               " inputs, outputs, output, meta FROM runs"):
            assert row[:4] == ("text",) * 4
            for column in row[4:]:
                json.loads(column)


class Unprintable:
    """A value whose repr raises, as a half-built object's may."""

    def __repr__(self) -> str:
        raise RuntimeError("not built yet")


def test_a_value_whose_repr_fails_too_is_kept_as_a_note_and_the_run_is_answered(tmp_path: Path) -> None:
    """JSON cannot hold them and their repr raises (or recurses too deep): the run in a session raised that raw
    RuntimeError or RecursionError, losing its answer, and kept nothing."""
    nested: list[Any] = []
    for _ in range(100_000):
        nested = [nested]
    with wb.Workbench(data_dir=tmp_path) as bench:
        chain = bench.chain({"name": "odd", "hops": [
            {"name": "half", "call": lambda q: Unprintable()},
            {"name": "deep", "call": lambda q: nested},
        ], "output": "half"})
        run = chain.run(session="s1", q="x")
        assert isinstance(run.output, Unprintable) and run.outputs["deep"] is nested
        (kept,) = bench.session("s1").records()
    assert kept.output == kept.outputs["half"] == "<Unprintable: its repr raised RuntimeError>"
    assert kept.outputs["deep"] == "<list: its repr raised RecursionError>"
    assert sorted(kept.meta["stored_as_repr"]) == ["output", "outputs.deep", "outputs.half"]


def test_text_that_utf8_cannot_encode_round_trips(tmp_path: Path) -> None:
    # A lone surrogate is what os.fsdecode and surrogateescape make of bytes that are not UTF-8.
    odd = "name \udcff from a file" + " 中文"
    store = wb.SQLiteContextStore(tmp_path / SESSIONS_FILE)
    try:
        store.append("s", record("r1", inputs={"path": odd}, output=odd, status="error", error=f"no file {odd}"))
        (kept,) = store.history("s")
        assert kept.inputs == {"path": odd} and kept.output == odd and kept.meta == {}
        assert kept.error == "no file name \\udcff from a file 中文"  # a message: the escape shows what was there
    finally:
        store.close()


# -- concurrency ---------------------------------------------------------------------------------


def test_concurrent_appends_from_many_threads_and_two_connections_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / SESSIONS_FILE
    stores = [wb.SQLiteContextStore(path), wb.SQLiteContextStore(path)]  # as two workbenches on one data_dir
    threads, per_thread = 8, 30
    start = threading.Barrier(threads)

    def writer(index: int) -> None:
        start.wait()
        for n in range(per_thread):
            stores[index % 2].append(f"s{index % 3}", record(f"t{index}-{n}", inputs={"thread": index, "n": n}))

    try:
        pool = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in pool)
        everything = [r for session in stores[0].sessions() for r in stores[1].history(session)]
        assert len(everything) == threads * per_thread
        assert len({r.run_id for r in everything}) == threads * per_thread
        for index in range(threads):  # each thread's runs, in the order it wrote them, in its session
            mine = [r for r in stores[0].history(f"s{index % 3}") if r.inputs["thread"] == index]
            assert [r.inputs["n"] for r in mine] == list(range(per_thread))
    finally:
        for made in stores:
            made.close()


def test_concurrent_chain_runs_in_one_session_all_land(tiny_path: Path, tmp_path: Path) -> None:
    with wb.Workbench(data_dir=tmp_path) as bench:
        bench.load("tiny", tiny_path, device="cpu", batching=wb.DynamicBatching(max_batch=8, max_wait_ms=2))
        chat = bench.chain(CHAT)
        results: dict[int, list[wb.Run]] = {}

        def mapper(index: int) -> None:
            batch = chat.map([{"question": f"m{index} q{i}"} for i in range(8)], concurrency=4, session="shared")
            results[index] = list(batch)

        pool = [threading.Thread(target=mapper, args=(i,)) for i in range(3)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(timeout=300)
        runs = [run for batch in results.values() for run in batch]
        assert len(runs) == 24 and all(run.ok for run in runs)
        records = bench.session("shared").records()
        assert sorted(r.run_id for r in records) == sorted(run.id for run in runs)
        by_id = {run.id: run for run in runs}
        assert all(r.output == by_id[r.run_id].output and r.inputs == by_id[r.run_id].inputs for r in records)


# A reader in a process of its own: as root (who may write any file) it reads as nobody, whom the copy keeps out.
AS_NOBODY = dedent(
    """\
    import os, sys
    from workbench.chains.sqlite_store import SQLiteContextStore
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    store = SQLiteContextStore(sys.argv[1])
    """
)
READER = AS_NOBODY + 'print(",".join(record.run_id for record in store.history("s1")))\n'


@contextmanager
def copied_read_only(files: list[Path]) -> Iterator[Path]:
    """``files`` (a store's) copied where the reader (nobody) may read them but not write; the copied store's path."""
    shared = Path(tempfile.mkdtemp(prefix="autoglm-read-only-"))  # in /tmp, which nobody may pass through
    copy = shared / "copy"
    try:
        shared.chmod(0o755)
        copy.mkdir()
        for file in files:
            shutil.copyfile(file, copy / file.name)
            (copy / file.name).chmod(0o444)
        copy.chmod(0o555)  # nor may the reader make the shared-memory file WAL mode reads with
        yield copy / SESSIONS_FILE
    finally:
        copy.chmod(0o755)
        shutil.rmtree(shared)


@pytest.fixture
def read_only_copy(tmp_path: Path) -> Iterator[Path]:
    """A store of two runs (r1, r2 in session s1), copied where the reader (nobody) may read it but not write."""
    with wb.Workbench(data_dir=tmp_path) as bench:
        for run_id in ("r1", "r2"):
            bench.store.append("s1", record(run_id))
    with copied_read_only([tmp_path / SESSIONS_FILE]) as copy:
        yield copy


@pytest.fixture
def read_only_copy_with_its_log(tmp_path: Path) -> Iterator[Path]:
    """A store in use copied as a backup copies it, its write-ahead log (-wal) without the shared-memory file (-shm),
    where the reader (nobody) may read it but not write: run r1 in the main file, r2 in the log alone."""
    live, staged = tmp_path / "live", tmp_path / "staged"
    staged.mkdir()
    with wb.Workbench(data_dir=live) as bench:
        bench.store.append("s1", record("r1"))
        with closing(sqlite3.connect(live / SESSIONS_FILE)) as raw:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # r1 into the main file, and the log emptied
        bench.store.append("s1", record("r2"))
        for name in (SESSIONS_FILE, f"{SESSIONS_FILE}-wal"):
            shutil.copyfile(live / name, staged / name)  # while the store is open: its log is not folded in yet
    assert (staged / f"{SESSIONS_FILE}-wal").stat().st_size > 0
    with copied_read_only(sorted(staged.iterdir())) as copy:
        yield copy


def test_a_read_only_copy_of_the_store_opens_for_reading(read_only_copy: Path) -> None:
    # Before: "cannot open the session store ...: attempt to write a readonly database", for reading alone.
    done = subprocess.run([sys.executable, "-c", READER, str(read_only_copy)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "r1,r2\n"


def test_a_read_only_copy_with_its_write_ahead_log_but_no_shm_reads_the_runs_in_the_log(
    read_only_copy_with_its_log: Path,
) -> None:
    # Before: opened with immutable=1, which reads the main file alone: "r1", the run in the log silently missing.
    copy = read_only_copy_with_its_log
    before = {file.name: file.read_bytes() for file in copy.parent.iterdir()}
    done = subprocess.run([sys.executable, "-c", READER, str(copy)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "r1,r2\n" and "Warning" not in done.stderr, done.stderr
    assert {file.name: file.read_bytes() for file in copy.parent.iterdir()} == before  # read, and left as it was


def test_a_write_ahead_log_the_reader_cannot_read_is_named_in_a_warning_with_what_to_do(
    read_only_copy_with_its_log: Path,
) -> None:
    # A log its writer's umask kept to itself (0600): the runs in it cannot be read, and before nothing said so.
    log = read_only_copy_with_its_log.with_name(f"{SESSIONS_FILE}-wal")
    log.chmod(0o000)
    done = subprocess.run([sys.executable, "-c", READER, str(read_only_copy_with_its_log)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "r1\n"  # the main file's runs still read
    assert "RuntimeWarning" in done.stderr and f"its write-ahead log {str(log)!r}" in done.stderr, done.stderr
    assert "without the runs written last" in done.stderr
    assert "open the store once where it can be written" in done.stderr


def test_writing_to_a_read_only_store_says_it_is_read_only_and_what_to_do(read_only_copy: Path) -> None:
    # Before: "... failed: attempt to write a readonly database", hint: "another process may hold it locked for
    # long, or the disk is full", neither of which it was.
    writer = AS_NOBODY + dedent(
        """\
        from workbench.chains.context import RunRecord
        from workbench.errors import StoreError
        for write in (lambda: store.append("s1", RunRecord("r3", "qa", {}, {}, "", 0.0, 1.0, "ok")),
                      lambda: store.forget("s1")):
            try:
                write()
            except StoreError as exc:
                print(exc.message, "|", exc.hint)
        print(",".join(record.run_id for record in store.history("s1")))
        """
    )
    done = subprocess.run([sys.executable, "-c", writer, str(read_only_copy)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    *refusals, kept = done.stdout.splitlines()
    assert len(refusals) == 2 and kept == "r1,r2"  # both writes refused, the sessions there still read
    for refusal in refusals:
        message, hint = refusal.split(" | ")
        assert message.startswith(f"the session store {str(read_only_copy)!r} is read-only here")
        assert "locked" not in hint and "Workbench(data_dir=...)" in hint and "writable" in hint


# -- a writer killed mid-write ---------------------------------------------------------------------

def test_opening_waits_for_another_process_that_holds_the_file_mid_write(tmp_path: Path) -> None:
    # A fresh file in rollback-journal mode, another connection in the middle of a write: switching
    # to WAL then fails at once with "database is locked" (SQLite's deadlock avoidance, which skips
    # the busy timeout), which two kernels opening one data_dir together ran into.
    path = tmp_path / SESSIONS_FILE
    with closing(sqlite3.connect(path, isolation_level=None, check_same_thread=False)) as other:
        other.execute("CREATE TABLE scratch (x)")
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO scratch VALUES (1)")
        finish = threading.Timer(0.3, other.execute, args=("COMMIT",))
        finish.start()
        try:
            with wb.Workbench(data_dir=tmp_path) as bench:
                bench.store.append("s", record("r1"))
                assert [r.run_id for r in bench.session("s").records()] == ["r1"]
        finally:
            finish.join()
    with closing(sqlite3.connect(path)) as check:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


WRITER = dedent(
    """\
    import sys, time
    from workbench.chains.context import RunRecord
    from workbench.chains.sqlite_store import SQLiteContextStore

    store, name, payload = SQLiteContextStore(sys.argv[1]), sys.argv[2], "x" * 50_000
    n = 0
    while True:
        text = f"{payload}{name}-{n}"
        store.append("killed", RunRecord(run_id=f"{name}-{n}", chain="writer", inputs={"writer": name, "n": n},
                                         outputs={"text": text}, output=text, started_at=time.time(),
                                         duration_ms=float(n)))
        print(n, flush=True)  # acknowledged: append returned
        n += 1
    """
)


def _acknowledge(writer: subprocess.Popen[str], at_least: int) -> int:
    """Read the writer's acknowledgements until ``at_least`` appends returned; the count read."""
    assert writer.stdout is not None
    acknowledged = 0
    while acknowledged < at_least:
        line = writer.stdout.readline()
        if not line:
            raise AssertionError(f"the writer stopped early: {writer.communicate()[1]}")
        acknowledged = int(line) + 1
    return acknowledged


def test_writers_killed_mid_write_leave_the_store_readable_and_whole(tmp_path: Path) -> None:
    path = tmp_path / SESSIONS_FILE
    writers = {
        name: subprocess.Popen([sys.executable, "-c", WRITER, str(path), name], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for name in ("A", "B")  # two processes at once, so each also contends with the other for the lock
    }
    acknowledged: dict[str, int] = {}
    try:
        for name, writer in writers.items():
            acknowledged[name] = _acknowledge(writer, at_least=30)
            os.kill(writer.pid, signal.SIGKILL)  # while it is writing its next record
    finally:
        for writer in writers.values():
            if writer.poll() is None:
                writer.kill()
            writer.communicate()
    assert all(writer.returncode == -signal.SIGKILL for writer in writers.values())

    store = wb.SQLiteContextStore(path)
    try:
        records = store.history("killed")
        for name, count in acknowledged.items():
            mine = [r for r in records if r.inputs["writer"] == name]
            assert len(mine) >= count  # nothing acknowledged was lost
            for n, kept in enumerate(mine):  # and every record is whole, in order, with no gap
                text = f"{'x' * 50_000}{name}-{n}"
                assert (kept.run_id, kept.inputs, kept.outputs, kept.output) == (
                    f"{name}-{n}", {"writer": name, "n": n}, {"text": text}, text)
        store.append("killed", record("after"))  # and it takes writes again
        assert store.history("killed", limit=1)[0].run_id == "after"
    finally:
        store.close()
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_a_reader_in_another_workbench_sees_runs_as_they_are_written(tmp_path: Path) -> None:
    with wb.Workbench(data_dir=tmp_path) as writer, wb.Workbench(data_dir=tmp_path) as reader:
        chain = writer.chain({"name": "py", "hops": [{"name": "echo", "call": lambda q: q}]})
        assert reader.session("s1").records() == []
        chain.run(session="s1", q="one")
        assert [r.output for r in reader.session("s1").records()] == ["one"]
        chain.run(session="s1", q="two")
        assert [r.output for r in reader.session("s1").records()] == ["one", "two"]
