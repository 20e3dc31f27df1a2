"""Live configuration: watched chain spec files, chain.set and %autoglm set, the workbench configuration file.

Everything runs for real: the tiny model on the CPU, spec files on disk edited while a watcher
thread polls them, runs recorded in a real SQLite session store.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

import workbench as wb
from workbench.chains.configfile import LiveConfig, parse_config
from workbench.chains.live import ConfigVersion
from workbench.engine.batching import DynamicBatching, NoBatching
from workbench.errors import ConfigError, SpecError
from workbench.fronts.notebook.parsers import SetCommand, parse_command
from workbench.tracing import attributes as attr

from test_magics import magic, shell  # noqa: F401  (the magics' test harness: a real shell, a fresh workbench)

POLL_S = 0.05  # the watchers' interval in these tests
SPEC = """\
name: qa
hops:
  - name: answer
    model: tiny
    prompt: "Question: {{ question }}\\nAnswer:"
    max_new_tokens: 3
    temperature: 0
"""

# A Python hop that holds its run until the test lets it go (a run in flight while the spec changes).
ENTERED = threading.Event()
GATE = threading.Event()


def hold(question: str) -> str:
    ENTERED.set()
    GATE.wait(timeout=60)
    return "held"


SLOW_SPEC = """\
name: slow
hops:
  - name: wait
    call: test_live_config:hold
  - name: answer
    model: tiny
    prompt: "{{ wait }} first"
    max_new_tokens: 2
"""


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    """Poll ``condition`` until it is true (returned) or the deadline passes (the test fails, saying what)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"waited {timeout_s} s for {what}")


def request_attributes(run: wb.Run, hop: str) -> dict[str, Any]:
    """The attributes of the model request a hop made (its text_completion span)."""
    spans = [s for s in run.trace.spans if s.name.startswith("text_completion")
             and (s.attributes or {}).get(attr.HOP_NAME) == hop]
    assert len(spans) == 1
    return dict(spans[0].attributes or {})


def root_attributes(run: wb.Run) -> dict[str, Any]:
    return dict(next(s for s in run.trace.spans if s.name == f"chain {run.chain}").attributes or {})


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "qa.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture
def watched(loaded: wb.Workbench, spec_file: Path) -> wb.Chain:
    return loaded.chain(spec_file, watch=True, interval_s=POLL_S)


# -- a watched chain spec file ------------------------------------------------------------------------------


def test_an_edit_reaches_the_next_run_and_every_run_records_its_version(
    loaded: wb.Workbench, watched: wb.Chain, spec_file: Path
) -> None:
    first = watched.run(question="What is 2 + 2?", session="s1")
    assert first.config_version == watched.version
    assert first.config_version.number == 1
    assert request_attributes(first, "answer")[attr.REQUEST_TEMPERATURE] == 0.0

    spec_file.write_text(SPEC.replace("temperature: 0", "temperature: 0.7").replace("Answer:", "Reply:"))
    wait_for(lambda: watched.version.number == 2, "the edit to serve")

    second = watched.run(question="What is 2 + 2?", session="s1")
    request = request_attributes(second, "answer")
    assert request[attr.REQUEST_TEMPERATURE] == 0.7
    assert request[attr.INPUT_VALUE].endswith("Reply:")
    assert second.config_version.number == 2
    assert second.config_version.digest != first.config_version.digest

    # The version is on the Run, on its root span, and in the stored record of the session.
    for run in (first, second):
        root = root_attributes(run)
        assert (root[attr.CONFIG_VERSION], root[attr.CONFIG_HASH]) == (run.config_version.number,
                                                                       run.config_version.digest)
    records = loaded.session("s1").records()
    assert [(r.meta["config_version"], r.meta["config_hash"]) for r in records] == [
        (1, first.config_version.digest), (2, second.config_version.digest)]
    # The store is a real SQLite file: a fresh reader of it sees the same.
    reread = wb.SQLiteContextStore(loaded.data_dir / "sessions.sqlite3")
    assert [r.meta["config_version"] for r in reread.history("s1")] == [1, 2]
    reread.close()


def test_a_run_in_flight_keeps_the_version_it_started_with(loaded: wb.Workbench, tmp_path: Path) -> None:
    path = tmp_path / "slow.yaml"
    path.write_text(SLOW_SPEC)
    ENTERED.clear()
    GATE.clear()
    chain = loaded.chain(path, watch=True, interval_s=POLL_S)
    try:
        in_flight = loaded.start(chain.arun(question="q"))
        assert ENTERED.wait(timeout=30), "the slow hop never started"
        path.write_text(SLOW_SPEC.replace("first", "second"))
        wait_for(lambda: chain.version.number == 2, "the edit to serve")
    finally:
        GATE.set()
    old = in_flight.result(timeout=60)
    assert old.config_version is not None and old.config_version.number == 1
    assert request_attributes(old, "answer")[attr.INPUT_VALUE] == "held first"

    new = chain.run(question="q")
    assert new.config_version.number == 2
    assert request_attributes(new, "answer")[attr.INPUT_VALUE] == "held second"


def test_a_bad_edit_is_refused_while_the_last_good_version_serves_then_a_good_one_recovers(
    watched: wb.Chain, spec_file: Path
) -> None:
    good = watched.version
    # The watcher's thread warns (a notebook shows it under the cell that runs); the warning filters are global.
    with pytest.warns(wb.ConfigWarning, match=f"{spec_file}: edit refused, chain 'qa' keeps serving v1"):
        spec_file.write_text(SPEC.replace("temperature: 0", "temperature: -1"))
        refusal = wait_for(lambda: watched.config_errors and watched.config_errors[-1], "the refusal")
    assert isinstance(refusal.error, SpecError)
    assert refusal.error.line == 7 and refusal.error.field == "temperature"
    assert refusal.origin == str(spec_file)
    assert refusal.serving == good
    assert watched.version == good

    run = watched.run(question="Still there?")
    assert run.config_version == good
    assert request_attributes(run, "answer")[attr.REQUEST_TEMPERATURE] == 0.0

    spec_file.write_text(SPEC.replace("model: tiny", "model: tinny"))  # an unknown model is refused too
    wait_for(lambda: len(watched.config_errors) == 2, "the second refusal")
    assert "unknown model 'tinny'" in watched.config_errors[-1].message

    spec_file.write_text(SPEC.replace("max_new_tokens: 3", "max_new_tokens: 1"))
    wait_for(lambda: watched.version.number == 2, "the good edit to serve")
    recovered = watched.run(question="Back?")
    assert recovered.config_version.number == 2
    assert request_attributes(recovered, "answer")[attr.USAGE_OUTPUT_TOKENS] == 1


def test_an_edit_refused_for_a_model_not_loaded_serves_once_the_model_is_loaded(
    loaded: wb.Workbench, watched: wb.Chain, spec_file: Path, tiny_path: Path
) -> None:
    # The refusal says to load the model; loading it changed nothing, nor did touching the file (the same
    # content): the chain served the old model until the file's content changed again.
    with pytest.warns(wb.ConfigWarning, match="unknown model 'spare'"):
        spec_file.write_text(SPEC.replace("model: tiny", "model: spare"))
        wait_for(lambda: watched.config_errors, "the edit to be refused")
    assert watched.spec.hop("answer").model == "tiny"
    loaded.load("spare", tiny_path, device="cpu")
    wait_for(lambda: watched.spec.hop("answer").model == "spare", "the file to serve once 'spare' is loaded")
    assert watched.version.number == 2 and len(watched.config_errors) == 1
    assert watched.run(question="q").config_version.number == 2


def test_an_editor_that_saves_by_renaming_a_new_file_over_the_old_is_followed(
    watched: wb.Chain, spec_file: Path
) -> None:
    for number, tokens in ((2, 2), (3, 1)):
        scratch = spec_file.with_name(f".qa.yaml.{number}.swp")
        scratch.write_text(SPEC.replace("max_new_tokens: 3", f"max_new_tokens: {tokens}"))
        os.replace(scratch, spec_file)
        wait_for(lambda: watched.version.number == number, f"version {number} after a rename")
        assert watched.spec.hop("answer").params.max_new_tokens == tokens


def test_a_file_watched_by_a_relative_path_is_followed_after_the_working_directory_moves(
    bench: wb.Workbench, spec_file: Path, tiny_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bench.chain('qa.yaml', watch=True), then %cd elsewhere: the watcher looked for the other folder's qa.yaml.
    monkeypatch.chdir(spec_file.parent)
    config_file = spec_file.with_name("workbench.yaml")
    config_file.write_text(_config("  tiny: {source: tiny, device: cpu, batching: none}"))
    config = bench.configure("workbench.yaml", watch=True, interval_s=POLL_S)
    chain = bench.chain("qa.yaml", name="mine", watch=True, interval_s=POLL_S)
    monkeypatch.chdir("/")
    assert chain.watching == spec_file
    spec_file.write_text(SPEC.replace("max_new_tokens: 3", "max_new_tokens: 1"))
    wait_for(lambda: chain.spec.hop("answer").params.max_new_tokens == 1, "the spec edit after the chdir")
    config_file.write_text(_config("  tiny: {source: tiny, device: cpu, batching: none}", "qa.answer.temperature: 0.3"))
    wait_for(lambda: config.version.number == 2, "the configuration edit after the chdir")
    assert not chain.config_errors and not config.errors


def test_a_watched_file_replaced_by_a_fifo_or_a_huge_file_is_refused_and_watching_goes_on(
    watched: wb.Chain, spec_file: Path
) -> None:
    from workbench.chains.live import MAX_CONFIG_BYTES

    fifo = spec_file.with_name("qa.fifo")
    os.mkfifo(fifo)
    os.replace(fifo, spec_file)  # a FIFO where the spec was: reading it would wait for a writer for good
    try:
        wait_for(lambda: watched.config_errors, "the FIFO to be refused")
        assert "not a regular file" in watched.config_errors[-1].message
    finally:
        try:  # before the fix the watcher is stuck in the FIFO's open: a writer lets it go
            os.close(os.open(spec_file, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    spec_file.unlink()
    with open(spec_file, "wb") as file:
        file.truncate(MAX_CONFIG_BYTES + 1)  # sparse: no disk, and nothing worth reading
    wait_for(lambda: len(watched.config_errors) == 2, "the huge file to be refused")
    assert "over the 8,388,608 bytes" in watched.config_errors[-1].message
    assert watched.version.number == 1  # the last good version serves throughout
    spec_file.unlink()
    spec_file.write_text(SPEC.replace("max_new_tokens: 3", "max_new_tokens: 2"))
    wait_for(lambda: watched.version.number == 2, "a good edit after the refusals")


def test_a_watched_file_that_stays_unreadable_is_reported_once_until_it_changes(tmp_path: Path) -> None:
    from workbench.chains.live import MAX_CONFIG_BYTES, FileWatcher

    path = tmp_path / "qa.yaml"
    path.write_text(SPEC)
    texts: list[str] = []
    errors: list[wb.WorkbenchError] = []
    watcher = FileWatcher(path, texts.append, POLL_S, on_unreadable=errors.append)
    assert (watcher.poll() or watcher.poll()) and texts == [SPEC]  # a file just written is read once it holds still
    with open(path, "wb") as file:
        file.truncate(MAX_CONFIG_BYTES + 1)
    for _ in range(5):  # five polls of one huge file: one refusal, not a warning a poll
        watcher.poll()
    assert len(errors) == 1 and "over the 8,388,608 bytes" in errors[0].message
    path.unlink()
    os.mkfifo(path)
    for _ in range(3):
        watcher.poll()
    assert len(errors) == 2 and "not a regular file" in errors[1].message
    path.unlink()
    path.write_text(SPEC.replace("max_new_tokens: 3", "max_new_tokens: 2"))
    assert (watcher.poll() or watcher.poll()) and len(texts) == 2
    os.replace(path, tmp_path / "elsewhere.yaml")
    os.mkfifo(path)  # unreadable again after a good read: said again
    watcher.poll()
    watcher.poll()  # (a file just made is looked into once it holds still)
    assert len(errors) == 3


def test_building_a_watched_chain_again_stops_the_watcher_it_replaces(loaded: wb.Workbench, spec_file: Path) -> None:
    # A notebook cell chain = bench.chain("qa.yaml", watch=True) run three times left three watchers on the file:
    # three threads, and three ConfigWarnings for each bad edit.
    chains = [loaded.chain(spec_file, watch=True, interval_s=POLL_S) for _ in range(3)]
    assert [c.watching for c in chains] == [None, None, spec_file]
    assert sum(t.name == "workbench-watch:qa.yaml" and t.is_alive() for t in threading.enumerate()) == 1
    # Another name for the same file is another chain, and keeps its own watcher.
    other = loaded.chain(spec_file, name="qa2", watch=True, interval_s=POLL_S)
    assert other.watching == chains[-1].watching == spec_file


def test_a_file_caught_half_written_is_not_handed_on_until_it_holds_still(tmp_path: Path) -> None:
    from workbench.chains.live import FileWatcher

    # A save that writes in pieces, caught between two: the first piece is a valid spec of one hop fewer. It served
    # (or, cut mid-line, was refused with a ConfigWarning) before the rest landed.
    two_hops = SPEC + '  - name: check\n    model: tiny\n    prompt: "Is {{ answer }} right?"\n'
    path = tmp_path / "qa.yaml"
    texts: list[str] = []
    watcher = FileWatcher(path, texts.append, POLL_S)
    future = time.time() + 3600  # an mtime that stays "just written" however slowly this test runs
    with open(path, "w") as file:
        file.write(SPEC)  # the first piece
        file.flush()
        os.utime(path, (future, future))
        assert not watcher.poll()
        file.write(two_hops[len(SPEC):])
    os.utime(path, (future + 1, future + 1))
    assert not watcher.poll()  # changed again since the last look: still being written, maybe
    assert watcher.poll() and texts == [two_hops]  # unchanged since the last look: whole
    assert not watcher.poll() and texts == [two_hops]


def test_a_spec_file_without_a_name_is_named_after_the_file(loaded: wb.Workbench, tmp_path: Path) -> None:
    path = tmp_path / "ask.yaml"
    path.write_text(SPEC.replace("name: qa\n", ""))
    chain = loaded.chain(path)  # a Path is a file, watched or not
    assert chain.name == "ask" and chain.watching is None
    assert loaded.chain(str(path), watch=True, interval_s=POLL_S).watching == path
    with pytest.raises(SpecError, match="does not exist"):
        loaded.chain(tmp_path / "missing.yaml")
    with pytest.raises(wb.WorkbenchError, match="watch=True follows a spec file"):
        loaded.chain({"name": "d", "hops": [{"name": "a", "call": hold}]}, watch=True)


def test_a_spec_file_saved_as_utf16_says_so_and_to_save_it_as_utf8(bench: wb.Workbench, tmp_path: Path) -> None:
    # Before: "cannot read chain spec file '...': 'utf-8' codec can't decode byte 0xff in position 0", and no hint.
    path = tmp_path / "ask.yaml"
    path.write_text(SPEC, encoding="utf-16")  # a byte-order mark first, as Windows PowerShell's > writes
    with pytest.raises(SpecError) as info:
        bench.chain(path)
    assert info.value.message == f"chain spec: chain spec file {str(path)!r} is UTF-16 text (it starts with a " \
        "UTF-16 byte-order mark), not UTF-8"
    assert info.value.hint is not None and info.value.hint.startswith("save it as UTF-8")


def test_a_watched_spec_file_resaved_as_utf16_is_refused_as_the_first_read_refuses_it(
    loaded: wb.Workbench, watched: wb.Chain, spec_file: Path
) -> None:
    # Before: the watcher said "cannot read '...': 'utf-8' codec can't decode byte 0xff in position 0: invalid start
    # byte", where building the chain from the same file says it is UTF-16 and to save it as UTF-8.
    spec_file.write_text(SPEC, encoding="utf-16")
    with pytest.raises(SpecError) as first_read:
        loaded.chain(spec_file)
    wait_for(lambda: watched.config_errors, "the UTF-16 edit to be refused")
    refused = watched.config_errors[-1].error
    assert (refused.message, refused.hint) == (first_read.value.message, first_read.value.hint)
    assert watched.version.number == 1  # the last good version serves


def test_a_comment_or_reformat_is_no_new_version_and_close_stops_the_watcher(
    loaded: wb.Workbench, watched: wb.Chain, spec_file: Path
) -> None:
    watcher = watched._watcher
    assert watcher is not None
    wait_for(lambda: watcher.changes == 1, "the first look at the file")  # what the chain was built from
    spec_file.write_text("# the same chain, reformatted\n" + SPEC.replace("max_new_tokens: 3", "max_new_tokens:    3"))
    wait_for(lambda: watcher.changes == 2, "the watcher to read the reformatted file")
    assert watched.version.number == 1 and not watched.config_errors
    # The next real change is version 2: the reformat took no number.
    spec_file.write_text(SPEC.replace("max_new_tokens: 3", "max_new_tokens: 2"))
    wait_for(lambda: watched.version.number > 1, "the real edit")
    assert watched.version.number == 2
    assert watched.watching == spec_file
    loaded.close()
    assert watched.watching is None
    assert not any(t.name.startswith("workbench-watch") and t.is_alive() for t in threading.enumerate())


# -- chain.set and %autoglm set -------------------------------------------------------------------------------


def test_chain_set_changes_one_value_for_new_runs_and_refuses_what_the_spec_refuses(
    loaded: wb.Workbench
) -> None:
    chain = loaded.chain(SPEC)
    assert chain.version.number == 1
    version = chain.set("answer.temperature", 0.7)
    assert version == chain.version == ConfigVersion(2, version.digest)
    assert request_attributes(chain.run(question="q"), "answer")[attr.REQUEST_TEMPERATURE] == 0.7

    with pytest.raises(SpecError, match="temperature must be a number >= 0"):
        chain.set("answer.temperature", "hot")
    with pytest.raises(SpecError, match="cannot be set live"):
        chain.set("answer.name", "other")
    with pytest.raises(SpecError, match="has no hop 'anwser'.*did you mean 'answer'"):
        chain.set("anwser.temperature", 0.1)
    assert chain.version == version  # nothing changed
    assert chain.overrides == {"answer.temperature": 0.7}
    assert len(chain.config_errors) == 1  # the value that did not validate; path mistakes never got that far

    chain.set({"answer.max_new_tokens": 1, "answer.retry.attempts": 2})  # several values: one version
    assert chain.version.number == 3
    assert chain.spec.hop("answer").resilience.retry is not None
    assert chain.spec.hop("answer").resilience.retry.attempts == 2
    chain.unset("answer.temperature")
    assert chain.spec.hop("answer").params.temperature == 0.0
    assert chain.version.number == 4


def test_a_value_set_live_stays_over_later_edits_of_the_file(watched: wb.Chain, spec_file: Path) -> None:
    watched.set("answer.temperature", 0.5)
    spec_file.write_text(SPEC.replace("max_new_tokens: 3", "max_new_tokens: 2"))
    wait_for(lambda: watched.version.number == 3, "the file edit to serve")
    params = watched.spec.hop("answer").params
    assert (params.max_new_tokens, params.temperature) == (2, 0.5)


def test_the_set_magic_changes_a_value_live_and_refuses_a_bad_one(
    shell: InteractiveShell, tiny_path: Path, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    bench = wb.current()
    bench.load("tiny", tiny_path, device="cpu")
    chain = bench.chain(SPEC)
    captured = magic(shell, "set qa.answer.temperature=0.7")
    assert captured.stderr == ""
    assert "answer.temperature = 0.7" in captured.stdout and "v2" in captured.stdout
    assert chain.spec.hop("answer").params.temperature == 0.7

    with caplog.at_level(logging.INFO, logger="workbench"):
        refused = magic(shell, "set qa.answer.temperature=-3")
    assert refused.stderr.startswith("autoglm: chain spec, hop 'answer', field 'temperature'")
    assert refused.stderr.endswith("hint: chain 'qa' is unchanged: it keeps serving " f"{chain.version}\n")
    # Said once, by the magic: the refusal is logged at INFO, which a notebook's last-resort handler does not print
    # (at WARNING it printed the same refusal again above the magic's own message).
    (record,) = [r for r in caplog.records if "edit refused" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert chain.version.number == 2 and chain.spec.hop("answer").params.temperature == 0.7

    prompt = magic(shell, 'set qa.answer.prompt="Q: {{ question }} A:"')
    assert prompt.stderr == ""
    assert chain.spec.hop("answer").prompt == "Q: {{ question }} A:"
    assert "no chain named 'qb'" in magic(shell, "set qb.answer.temperature=1").stderr


def test_set_lines_parse_into_typed_values() -> None:
    command = parse_command('set qa.answer.temperature=0.7 qa.answer.fallback=[a,b] qa.history=3 '
                            'qa.answer.prompt="x: {{ y }}" qa.answer.truncate=left')
    assert isinstance(command, SetCommand)
    assert command.assignments == (("qa", "answer.temperature", 0.7), ("qa", "answer.fallback", ["a", "b"]),
                                   ("qa", "history", 3), ("qa", "answer.prompt", "x: {{ y }}"),
                                   ("qa", "answer.truncate", "left"))
    # YAML read the rest of a value as text's loss: a quoted 'Ticket #42: check' was 'Ticket' (a comment), yes and off
    # booleans, --- and | nothing, with no word said.
    typed = parse_command("set qa.description='Ticket #42: check' qa.a.prompt=yes qa.b.prompt='a # b' qa.c.prompt=--- "
                          "qa.d.prompt='|' qa.e.prompt=off qa.f.max_new_tokens=1e3 qa.g.stop=null")
    assert isinstance(typed, SetCommand)
    assert [value for _, _, value in typed.assignments] == ["Ticket #42: check", "yes", "a # b", "---", "|", "off",
                                                            1000.0, None]
    for line, message in (("set qa", "not CHAIN.FIELD=VALUE"), ("set qa.answer.temperature=", "empty"),
                          ("set qa.x=1 qa.x=2", "given twice")):
        with pytest.raises(wb.ParseError, match=message):
            parse_command(line)


# -- the workbench configuration file -------------------------------------------------------------------------


def _config(models: str, overrides: str = "qa.answer.temperature: 0.7") -> str:
    return f"models:\n{models}\nchains:\n  qa: qa.yaml\noverrides:\n  {overrides}\n"


def _configure(bench: wb.Workbench, spec_file: Path, models: str, **options: Any) -> tuple[Path, LiveConfig]:
    """Write a configuration of ``models`` (and chain qa) beside the chain file, and apply it to ``bench``."""
    path = spec_file.with_name("workbench.yaml")
    path.write_text(_config(models))
    return path, bench.configure(path, **options)


DYNAMIC = "  tiny: {source: tiny, device: cpu, batching: {policy: dynamic, max_batch_size: 4, max_wait_ms: 5}}"


@pytest.fixture
def tiny_cache(tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Source ``tiny`` means wb.tiny_model(); point its cache at the one already built."""
    monkeypatch.setenv("AUTOGLM_CACHE_DIR", str(tiny_path.parent))


def test_a_configuration_file_loads_models_chains_and_overrides_and_follows_edits(
    bench: wb.Workbench, spec_file: Path, tiny_cache: None
) -> None:
    path, config = _configure(bench, spec_file, DYNAMIC, watch=True, interval_s=POLL_S)
    assert config.version is not None and config.version.number == 1
    assert "tiny" in set(bench.models()["name"])
    assert bench.engine.policy("tiny") == DynamicBatching(max_batch=4, max_wait_ms=5)
    chain = bench.chains()["qa"]
    assert chain is config.chains["qa"]
    assert chain.overrides == {"answer.temperature": 0.7}
    run = chain.run(question="q")
    assert request_attributes(run, "answer")[attr.REQUEST_TEMPERATURE] == 0.7
    assert run.config_version == chain.version

    # A new policy and a new override: applied live, the model not loaded again.
    loaded_at = bench.registry.get("tiny")
    path.write_text(_config("  tiny: {source: tiny, device: cpu, batching: none}", "qa.answer.temperature: 0.3"))
    wait_for(lambda: config.version.number == 2, "the configuration edit to serve")
    assert isinstance(bench.engine.policy("tiny"), NoBatching)
    assert bench.registry.get("tiny") is loaded_at
    assert chain.spec.hop("answer").params.temperature == 0.3
    assert bench.chains()["qa"] is chain

    # A bad edit names the file, the line and the field; the last good configuration keeps serving.
    path.write_text(_config("  tiny: {source: tiny, device: cpu, batching: {policy: dynamic, max_batchsize: 4}}"))
    refusal = wait_for(lambda: config.errors and config.errors[-1], "the refusal")
    assert isinstance(refusal.error, ConfigError)
    assert refusal.error.line == 2 and refusal.error.field == "models.tiny.batching.max_batchsize"
    assert str(path) in refusal.message
    assert config.version.number == 2 and isinstance(bench.engine.policy("tiny"), NoBatching)
    assert chain.run(question="q").ok

    # A chain file edit is followed too (the configuration watches its chain files).
    spec_file.write_text(SPEC.replace("max_new_tokens: 3", "max_new_tokens: 1"))
    wait_for(lambda: chain.spec.hop("answer").params.max_new_tokens == 1, "the chain file edit")
    assert chain.spec.hop("answer").params.temperature == 0.3  # the override stays on top


def test_a_changed_model_source_loads_it_again(
    bench: wb.Workbench, spec_file: Path, tiny_path: Path, tiny_cache: None
) -> None:
    _, config = _configure(bench, spec_file, "  tiny: {source: tiny, device: cpu}")
    before = bench.registry.get("tiny")
    config.apply(_config(f"  tiny: {{source: {str(tiny_path)!r}, device: cpu, dtype: float32}}"))
    after = bench.registry.get("tiny")
    assert after is not before and after.settings.dtype == "float32"
    assert bench.chains()["qa"].run(question="q").ok


def test_a_changed_balance_policy_applies_live_to_the_replicas(
    bench: wb.Workbench, spec_file: Path, tiny_cache: None
) -> None:
    _, config = _configure(
        bench, spec_file, "  tiny: {source: tiny, device: cpu, replicas: 2, balance: round_robin}"
    )
    model = bench.registry.get("tiny")
    assert bench.engine.balance("tiny").name == "round_robin"
    assert config.apply(_config("  tiny: {source: tiny, device: cpu, replicas: 2, balance: least_loaded}")).number == 2
    assert bench.engine.balance("tiny").name == "least_loaded"
    assert bench.registry.get("tiny") is model and len(bench.replicas("tiny")) == 2
    assert set(bench.replicas("tiny")["balance"]) == {"least_loaded"}


def test_a_configuration_whose_chain_does_not_validate_changes_nothing(
    bench: wb.Workbench, spec_file: Path, tiny_cache: None
) -> None:
    _, config = _configure(bench, spec_file, "  tiny: {source: tiny, device: cpu}")
    with pytest.raises(ConfigError, match="chain 'qa'.*unknown model 'tiny'"):
        config.apply(_config("  small: {source: tiny, device: cpu}"))  # qa.yaml still names 'tiny'
    with pytest.raises(ConfigError, match="field 'overrides'.*'chains' does not list"):
        config.apply(_config("  tiny: {source: tiny, device: cpu}", "other.answer.temperature: 1"))
    with pytest.raises(ConfigError, match="temperature must be a number"):
        config.apply(_config("  tiny: {source: tiny, device: cpu}", "qa.answer.temperature: hot"))
    assert bench.registry.names() == ["tiny"] and config.version.number == 1
    assert [type(r.error) for r in config.errors] == [ConfigError] * 3


def test_a_chain_file_saved_while_its_configuration_applies_does_not_leave_it_half_applied(
    bench: wb.Workbench, spec_file: Path, tiny_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chain files are checked, then the models change, then the chains are built: a chain file saved in between
    (here half-written, while a model loads again) was read again at the build, and its error escaped with the models
    changed and the configuration's version and chains not. The build takes the text that was checked; the watch
    then refuses the half-written file as any other edit, and the checked version serves."""
    path, config = _configure(bench, spec_file, "  tiny: {source: tiny, device: cpu}", watch=True,
                              interval_s=POLL_S)
    other = spec_file.with_name("qb.yaml")
    other.write_text(SPEC.replace("name: qa", "name: qb"))
    load = bench.load

    def load_then_save_half(*args: Any, **kwargs: Any) -> Any:
        loaded = load(*args, **kwargs)
        other.write_text("name: qb\nhops:\n  - name: answer\n    model: ti")
        return loaded

    monkeypatch.setattr(bench, "load", load_then_save_half)
    text = "models:\n  tiny: {source: tiny, device: cpu, dtype: float32}\nchains:\n  qa: qa.yaml\n  qb: qb.yaml\n"
    path.write_text(text)  # as saved (the watch, should it read it first, applies the same), applied at once
    assert config.apply(text).number == 2
    assert bench.registry.get("tiny").settings.dtype == "float32"
    chain = config.chains["qb"]
    assert bench.chains()["qb"] is chain and chain.watching == other
    refusal = wait_for(lambda: chain.config_errors and chain.config_errors[-1], "the half-written file refused")
    assert isinstance(refusal.error, SpecError)
    run = chain.run(question="q")
    assert run.ok and chain.spec.hop("answer").model == "tiny"


def test_a_configuration_whose_last_model_fails_to_load_leaves_the_others_as_they_were(
    bench: wb.Workbench, spec_file: Path, tiny_cache: None
) -> None:
    path = spec_file.with_name("workbench.yaml")
    first = _config(f"  tiny: {{source: tiny, device: cpu}}\n{DYNAMIC.replace('tiny:', 'spare:', 1)}")
    path.write_text(first)
    config = bench.configure(path)
    tiny, policy = bench.registry.get("tiny"), bench.engine.policy("spare")
    missing = spec_file.with_name("no-such-model")
    with pytest.raises(wb.ModelLoadError):  # each change before it works: a reload, a new policy, a new model
        config.apply(_config("  tiny: {source: tiny, device: cpu, dtype: float32}\n"
                             "  spare: {source: tiny, device: cpu, batching: none}\n"
                             "  fresh: {source: tiny, device: cpu}\n"
                             f"  broken: {{source: {str(missing)!r}, device: cpu}}"))
    assert config.version.number == 1 and len(config.errors) == 1
    # The refused configuration changed nothing: the one in force is what serves, and reapplies as is.
    assert bench.registry.get("tiny").settings == tiny.settings
    assert bench.engine.policy("spare") == policy
    assert sorted(bench.registry.names()) == ["spare", "tiny"]
    assert config.apply(first).number == 1
    assert bench.chains()["qa"].run(question="q").ok


def test_a_chain_edit_refused_for_a_model_the_configuration_then_adds_serves_once_it_is_added(
    bench: wb.Workbench, spec_file: Path, tiny_cache: None
) -> None:
    path, config = _configure(bench, spec_file, "  tiny: {source: tiny, device: cpu}", watch=True,
                              interval_s=POLL_S)
    chain = config.chains["qa"]
    spec_file.write_text(SPEC.replace("model: tiny", "model: spare"))  # the chain first: 'spare' is not there yet
    wait_for(lambda: chain.config_errors, "the chain edit to be refused")
    assert "unknown model 'spare'" in chain.config_errors[-1].message
    path.write_text(_config("  tiny: {source: tiny, device: cpu}\n  spare: {source: tiny, device: cpu}"))
    wait_for(lambda: config.version.number == 2, "the configuration that adds 'spare'")
    # The chain file as it is now serves, not the version before the refused edit.
    wait_for(lambda: chain.spec.hop("answer").model == "spare", "the chain edit to serve once 'spare' is there")
    assert chain.run(question="q").ok


def test_a_configuration_adding_a_chain_whose_adapter_the_model_lacks_is_refused_before_anything_loads(
    bench: wb.Workbench, spec_file: Path, tiny_cache: None
) -> None:
    # The chain files were checked without the models' adapters: such an edit loaded 'spare', then failed to build
    # the chain, and the watcher swallowed the error: no refusal, no warning, version 1, 'spare' loaded.
    path, config = _configure(bench, spec_file, "  tiny: {source: tiny, device: cpu}", watch=True,
                              interval_s=POLL_S)
    spec_file.with_name("qa2.yaml").write_text(SPEC.replace("temperature: 0", "temperature: 0\n    adapter: sql"))
    with pytest.warns(wb.ConfigWarning, match="model 'tiny' has no adapter 'sql'"):
        path.write_text("models:\n  tiny: {source: tiny, device: cpu}\n  spare: {source: tiny, device: cpu}\n"
                        "chains:\n  qa: qa.yaml\n  qa2: qa2.yaml\n")
        refusal = wait_for(lambda: config.errors and config.errors[-1], "the refusal")
    assert isinstance(refusal.error, ConfigError) and refusal.error.field == "chains.qa2"
    assert config.version.number == 1 and bench.registry.names() == ["tiny"] and "qa2" not in bench.chains()


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        ("models:\n  tiny: {source: tiny, batching: fast}\n", 2, "models.tiny.batching", "unknown policy"),
        ("models:\n  tiny:\n    source: tiny\n    trust_remote_code: true\n", 4, "models.tiny.trust_remote_code",
         "unknown field"),
        ("models:\n  tiny: {source: tiny, replicas: 0}\n", 2, "models.tiny.replicas", "replicas must be"),
        ("models:\n  tiny: {source: tiny, hang_timeout_s: soon}\n", 2, "models.tiny.hang_timeout_s",
         "must be a number >= 0"),
        ("models:\n  tiny: {device: cpu}\n", 2, "models.tiny.source", "needs a source"),
        # What a load refuses is refused as the file is read: before, an edit applied it, unloading the model
        # for a load that then failed.
        ("models:\n  tiny: {source: tiny, isolation: process, hang_timeout_s: 0.001}\n", 2,
         "models.tiny.hang_timeout_s", "hang_timeout_s must be a finite number of seconds >= 1, got 0.001"),
        ("models:\n  tiny:\n    source: tiny\n    read_timeout_s: 0\n", 4, "models.tiny.read_timeout_s",
         "read_timeout_s must be a finite number of seconds > 0"),
        ("models:\n  tiny: {source: tiny, isolation: sandbox}\n", 2, "models.tiny.isolation", "isolation must be one"),
        ("models:\n  tiny: {source: tiny, num_gpus: 1}\n", 2, "models.tiny",
         "address, num_gpus and num_cpus are settings of engine='ray'"),
        ("modles: {}\n", 1, "modles", "did you mean 'models'"),
        ("chains:\n  qa: 3\n", 2, "chains.qa", "path of its spec file"),
        ("models:\n  a: tiny\n  a: tiny\n", 3, "a", "appears twice"),
        ("models: [\n", 2, None, "not valid YAML"),
    ],
)
def test_configuration_errors_name_the_file_line_and_field(
    text: str, line: int, field: str | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_config(text, "/etc/wb.yaml")
    assert (caught.value.line, caught.value.field) == (line, field)
    assert str(caught.value).startswith(f"/etc/wb.yaml, line {line}")


def test_a_configuration_takes_a_setting_that_is_off_by_default_as_a_number_or_null() -> None:
    # hang_timeout_s (None: off) was read as text, so a number of seconds was refused as "must be text".
    text = "models:\n  iso: {source: tiny, isolation: process, hang_timeout_s: 30}\n  other: {source: tiny, " \
        "hang_timeout_s: null}\n"
    models = parse_config(text, "/etc/wb.yaml").models
    assert models["iso"].settings.hang_timeout_s == 30.0 and models["other"].settings.hang_timeout_s is None


def test_a_spec_whose_yaml_has_non_text_keys_gets_a_version(loaded: wb.Workbench) -> None:
    """YAML 1.1 reads retry's ``on:`` as the key True: the content hash must still sort the keys (a TypeError did)."""
    spec = SPEC.replace("max_new_tokens", "retry: {attempts: 2, on: [error, timeout]}\n    max_new_tokens", 1)
    assert "retry" in spec
    chain = loaded.chain(spec)
    other = loaded.chain(spec.replace("attempts: 2", "attempts: 3"))
    assert chain.version.number == 1 and len(chain.version.digest) == 12
    assert other.version.digest != chain.version.digest


# -- what the audit found: values no check foresaw, checks that failed, an edit applied halfway ---------------------

HUGE = "1" + "0" * 400  # an integer YAML reads whole, and no float holds


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        # int too large to convert to float (OverflowError), as the file was read
        (f"models:\n  tiny: {{source: tiny, hang_timeout_s: {HUGE}}}\n", 2, "models.tiny.hang_timeout_s",
         "hang_timeout_s must be a number >= 0 and at most 1.8e"),
        (f"models:\n  tiny: {{source: tiny, batching: {{policy: dynamic, max_wait_ms: {HUGE}}}}}\n", 2,
         "models.tiny.batching.max_wait_ms", "max_wait_ms must be a number"),
        # a complex key: TypeError (unhashable type: 'list') as its line was recorded
        ("models:\n  tiny: tiny\n? [a]\n: 1\n", 3, "[a]", "a key is a list"),
        ("models:\n  tiny: {source: tiny, ? {a: 1} : 2}\n", 2, "models.tiny.{a: 1}", "a key is a mapping"),
        # ValueError (embedded null byte) from Path.resolve
        ('chains:\n  qa: "qa\\0.yaml"\n', 2, "chains.qa", "holds a NUL character"),
        # adapters as text passed the "text" check, then failed to unpack as NAME=PATH pairs (ValueError)
        ("models:\n  tiny: {source: tiny, adapters: abc}\nchains:\n  qa: qa.yaml\n", 2, "models.tiny.adapters",
         "'abc'.* is not NAME=PATH"),
        ("models:\n  tiny: {source: tiny, adapters: [a, b]}\n", 2, "models.tiny.adapters",
         "adapters is a mapping from names to adapter directories"),
        # more digits than Python reads an int of: ValueError from yaml.safe_load
        ("models:\n  tiny: {source: tiny, restarts: 1" + "0" * 5000 + "}\n", 2, "models.tiny.restarts",
         "a number of 5,001 digits is more than Python reads"),
    ],
)
def test_a_configuration_file_with_a_value_no_check_foresaw_is_refused_naming_the_file_and_field(
    bench: wb.Workbench, spec_file: Path, text: str, line: int, field: str, message: str
) -> None:
    path = spec_file.with_name("workbench.yaml")
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        bench.configure(path)
    assert (caught.value.line, caught.value.field) == (line, field)
    assert str(caught.value).startswith(f"{path}, line {line}")
    assert bench.registry.names() == [] and bench.chains() == {}


def test_a_configuration_names_a_models_adapters_as_a_mapping(tmp_path: Path) -> None:
    models = parse_config("models:\n  tiny: {source: tiny, adapters: {sql: /adapters/sql, chat: /adapters/chat}}\n",
                          str(tmp_path / "wb.yaml")).models
    assert models["tiny"].settings.adapters == (("sql", "/adapters/sql"), ("chat", "/adapters/chat"))


def test_a_batching_policy_refuses_a_wait_no_float_holds() -> None:
    # It was taken, and its name (dynamic:16:...ms, on every span) then raised OverflowError.
    with pytest.raises(wb.StrategyError, match="max_wait_ms must be a finite number"):
        DynamicBatching(max_wait_ms=int(HUGE))
    with pytest.raises(wb.StrategyError, match="timeout_ms must be a finite number"):
        wb.StaticBatching(timeout_ms=int(HUGE))


def parse_spec_with_a_fault(parse: Callable[..., Any], armed: threading.Event) -> Callable[..., Any]:
    """A FAKE fault: the spec parser raising what no check translates (as a value too large for a float once did),
    once ``armed`` is set; the real parser once it is not."""

    def parse_spec(source: Any, *args: Any, **kwargs: Any) -> Any:
        if armed.is_set():
            raise RuntimeError("injected fault in the check")
        return parse(source, *args, **kwargs)

    return parse_spec


def test_a_chain_edit_whose_check_fails_is_refused_and_warned_about_while_the_last_good_version_serves(
    watched: wb.Chain, spec_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that raised something other than a SpecError was logged as a watcher failure ("watching ... failed;
    still watching"): no refusal in config_errors, no warning."""
    import workbench.bench

    armed = threading.Event()
    monkeypatch.setattr(workbench.bench, "parse_spec", parse_spec_with_a_fault(workbench.bench.parse_spec, armed))
    good = watched.version
    armed.set()
    with pytest.warns(wb.ConfigWarning, match="checking the edit failed: RuntimeError: injected fault"):
        spec_file.write_text(SPEC.replace("max_new_tokens: 3", "max_new_tokens: 2"))
        refusal = wait_for(lambda: watched.config_errors and watched.config_errors[-1], "the refusal")
    assert isinstance(refusal.error, SpecError) and refusal.serving == good
    armed.clear()
    assert watched.version == good and watched.run(question="q").config_version == good
    with pytest.raises(SpecError, match="checking the edit failed: RuntimeError"):  # chain.set says so too
        armed.set()
        watched.set("answer.max_new_tokens", 1)
    armed.clear()
    assert watched.version == good and len(watched.config_errors) == 2


def test_a_configuration_edit_whose_check_fails_is_refused_and_warned_about_while_the_last_good_one_serves(
    bench: wb.Workbench, spec_file: Path, tiny_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workbench.chains import configfile

    path, config = _configure(bench, spec_file, "  tiny: {source: tiny, device: cpu, batching: none}", watch=True,
                              interval_s=POLL_S)
    armed = threading.Event()
    monkeypatch.setattr(configfile, "parse_spec", parse_spec_with_a_fault(configfile.parse_spec, armed))
    armed.set()
    with pytest.warns(wb.ConfigWarning, match="checking the edit failed: RuntimeError: injected fault"):
        path.write_text(_config("  tiny: {source: tiny, device: cpu, batching: 'dynamic:8:5ms'}"))
        refusal = wait_for(lambda: config.errors and config.errors[-1], "the refusal")
    assert isinstance(refusal.error, ConfigError) and str(path) in refusal.message
    assert config.version.number == 1 and isinstance(bench.engine.policy("tiny"), NoBatching)


def test_a_configuration_edit_refused_with_the_values_set_live_changes_no_model(
    bench: wb.Workbench, spec_file: Path, tiny_cache: None
) -> None:
    """The chains were checked with the file's overrides alone: the model went to dynamic batching, then chain.set's
    cache: exact refused temperature 0.7 as the chain was changed, and the edit was recorded nowhere (version 1, no
    error); saving the file back then changed nothing, as its content was version 1's."""
    path = spec_file.with_name("workbench.yaml")
    first = "models:\n  tiny: {source: tiny, device: cpu, batching: none}\nchains:\n  qa: qa.yaml\n"
    path.write_text(first)
    config = bench.configure(path, watch=True, interval_s=POLL_S)
    chain = config.chains["qa"]
    chain.set("answer.cache", "exact")  # fine while the hop is greedy (temperature 0)
    edit = _config("  tiny: {source: tiny, device: cpu, batching: 'dynamic:8:5ms'}", "qa.answer.temperature: 0.7")
    with pytest.warns(wb.ConfigWarning, match="cache: exact on a sampling hop"):
        path.write_text(edit)
        refusal = wait_for(lambda: config.errors and config.errors[-1], "the refusal")
    assert isinstance(refusal.error, ConfigError) and refusal.error.field == "chains.qa"
    assert "answer.cache" in (refusal.error.hint or "")  # it says which value set live was in the way
    assert config.version.number == 1 and isinstance(bench.engine.policy("tiny"), NoBatching)
    assert chain.overrides == {"answer.cache": "exact"} and chain.version.number == 2

    # Without the value set live, the same edit serves whole.
    chain.unset("answer.cache")
    path.write_text(edit + "# saved again\n")  # new bytes for the watcher to hand on; the same configuration
    wait_for(lambda: config.version.number == 2, "the edit to serve")
    assert bench.engine.policy("tiny") == DynamicBatching(max_batch=8, max_wait_ms=5)
    assert chain.spec.hop("answer").params.temperature == 0.7 and chain.overrides == {"answer.temperature": 0.7}


def test_a_chain_that_fails_after_the_models_changed_puts_the_models_back(
    bench: wb.Workbench, spec_file: Path, tiny_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If building the chains fails once the models changed (here a chain.set lands between the check and the
    change), the models are put back: what serves is the recorded version, and saving it again is no change."""
    path = spec_file.with_name("workbench.yaml")
    first = "models:\n  tiny: {source: tiny, device: cpu, batching: none}\nchains:\n  qa: qa.yaml\n"
    path.write_text(first)
    config = bench.configure(path)
    chain = config.chains["qa"]
    set_batching, raced = bench.set_batching, threading.Event()

    def set_batching_then_a_chain_set(*args: Any, **kwargs: Any) -> None:
        set_batching(*args, **kwargs)
        if not raced.is_set():
            raced.set()
            chain.set("answer.cache", "exact")

    monkeypatch.setattr(bench, "set_batching", set_batching_then_a_chain_set)
    with pytest.raises(ConfigError, match="chain 'qa'.*cache: exact on a sampling hop") as caught:
        config.apply(_config("  tiny: {source: tiny, device: cpu, batching: 'dynamic:8:5ms'}",
                             "qa.answer.temperature: 0.7"))
    assert raced.is_set() and caught.value.field == "chains.qa"
    assert config.version.number == 1 and len(config.errors) == 1
    assert isinstance(bench.engine.policy("tiny"), NoBatching)
    assert chain.overrides == {"answer.cache": "exact"} and chain.spec.hop("answer").params.temperature == 0
    assert config.apply(first).number == 1 and isinstance(bench.engine.policy("tiny"), NoBatching)
    assert chain.run(question="q").ok


def test_a_model_change_that_fails_unexpectedly_is_refused_and_put_back(
    bench: wb.Workbench, spec_file: Path, tiny_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a WorkbenchError put the models back: anything else escaped raw, the new policy kept, nothing recorded."""
    _, config = _configure(bench, spec_file, "  tiny: {source: tiny, device: cpu, batching: none}")
    set_batching, failed = bench.set_batching, threading.Event()

    def set_batching_with_a_fault(*args: Any, **kwargs: Any) -> None:
        """A FAKE fault: the policy swap raising what no real part raises on demand, once, after it took effect."""
        set_batching(*args, **kwargs)
        if not failed.is_set():
            failed.set()
            raise RuntimeError("injected fault in the swap")

    monkeypatch.setattr(bench, "set_batching", set_batching_with_a_fault)
    with pytest.raises(ConfigError, match="applying the edit failed: RuntimeError: injected fault"):
        config.apply(_config("  tiny: {source: tiny, device: cpu, batching: 'dynamic:8:5ms'}"))
    assert config.version.number == 1 and len(config.errors) == 1
    assert isinstance(bench.engine.policy("tiny"), NoBatching)


# -- a fresh audit: a save the stat hid, a refusal never retried, a watch of nothing, a watcher nobody held ----------


def test_a_save_in_the_timestamp_tick_of_the_content_read_is_seen_however_late_the_next_poll(tmp_path: Path) -> None:
    from workbench.chains.live import FileWatcher

    # A file system that keeps mtimes to the second or two (HFS+, FAT, many network mounts): a save in the tick of
    # the content read, of the same size, leaves the same stat. The stat was trusted once its mtime was 2 s old at
    # the next poll, whenever the content was read: a watcher polling every 3 s never saw the second save.
    path = tmp_path / "qa.yaml"
    texts: list[str] = []
    watcher = FileWatcher(path, texts.append, 3.0)
    tick = time.time() - 0.5
    path.write_text(SPEC)
    os.utime(path, (tick, tick))
    assert watcher.poll() and texts == [SPEC]
    edit = SPEC.replace("max_new_tokens: 3", "max_new_tokens: 2")
    path.write_text(edit)  # the same size, the same inode
    os.utime(path, (tick, tick))  # the same tick
    time.sleep(1.6)  # the next poll comes when the tick is 2 s old
    assert watcher.poll() and texts == [SPEC, edit]
    assert not watcher.poll() and texts == [SPEC, edit]


def test_an_edit_refused_beside_a_value_set_live_serves_once_chain_unset_drops_it(
    watched: wb.Chain, spec_file: Path
) -> None:
    # The refused file was retried only when the models changed: after chain.unset the chain served the file's
    # previous content (temperature 0) while the file, unchanged since, said 0.7, until the file was saved again.
    watched.set("answer.cache", "exact")  # fine while the hop is greedy
    with pytest.warns(wb.ConfigWarning, match="cache: exact on a sampling hop"):
        spec_file.write_text(SPEC.replace("temperature: 0", "temperature: 0.7"))
        wait_for(lambda: watched.config_errors, "the edit to be refused")
    assert watched.spec.hop("answer").params.temperature == 0
    watched.unset("answer.cache")
    wait_for(lambda: watched.spec.hop("answer").params.temperature == 0.7, "the file's edit to serve")
    run = watched.run(question="q")
    assert request_attributes(run, "answer")[attr.REQUEST_TEMPERATURE] == 0.7
    assert run.config_version == watched.version and watched.version.number == 4  # v2 set, v3 unset, v4 the file


def test_watching_a_spec_file_that_is_not_there_says_so(loaded: wb.Workbench, tmp_path: Path) -> None:
    # chain.watch("qa.yml") for qa.yaml watched nothing, for good, without a word; chain.watching named the path.
    chain = loaded.chain(SPEC)
    with pytest.raises(SpecError, match="does not exist"):
        chain.watch(tmp_path / "qa.yml", POLL_S)
    assert chain.watching is None
    assert not any(t.name == "workbench-watch:qa.yml" for t in threading.enumerate())


def test_a_watched_chain_that_nothing_holds_any_more_stops_its_watcher(loaded: wb.Workbench, spec_file: Path) -> None:
    # The watcher's thread held the chain: a chain replaced by another of its name, and dropped, kept polling its
    # file, and warned of every bad edit, for as long as the kernel ran.
    other = spec_file.with_name("other.yaml")
    other.write_text(SPEC)
    chain = loaded.chain(spec_file, name="x", watch=True, interval_s=POLL_S)
    loaded.chain(other, name="x", watch=True, interval_s=POLL_S)  # the workbench's chain 'x' from now on
    dropped = weakref.ref(chain)
    del chain
    gc.collect()
    assert dropped() is None
    wait_for(lambda: not any(t.name == "workbench-watch:qa.yaml" and t.is_alive() for t in threading.enumerate()),
             "the dropped chain's watcher to stop")
    assert loaded.chains()["x"].watching == other


def test_a_spec_file_with_more_yaml_values_than_a_spec_may_have_is_refused_before_it_is_composed(
    loaded: wb.Workbench, watched: wb.Chain, spec_file: Path
) -> None:
    # 8 MB of [1,1,...] was composed whole (110 s, 3.3 GB) before the count of its values refused it.
    flood = "hops: [" + "1," * 400_000 + "1]\n"
    big = spec_file.with_name("big.yaml")
    big.write_text(flood)
    for spec in (big, flood):  # a file, and the same as text
        with pytest.raises(SpecError, match="the YAML holds more than 100,000 values") as caught:
            loaded.chain(spec)
        assert caught.value.line == 1
    spec_file.write_text(flood)
    refusal = wait_for(lambda: watched.config_errors and watched.config_errors[-1], "the refusal")
    assert "the YAML holds more than 100,000 values" in refusal.message and refusal.serving == watched.version
    assert watched.run(question="q").config_version.number == 1


def test_a_watched_file_that_is_gone_is_reported_once_and_read_again_when_back(
    watched: wb.Chain, spec_file: Path
) -> None:
    # A deleted (or moved) spec file was never mentioned: the chain served its last version without a word.
    spec_file.unlink()
    refusal = wait_for(lambda: watched.config_errors and watched.config_errors[-1], "the file to be missed")
    assert refusal.message.endswith(f"{str(spec_file)!r} is gone") and refusal.serving == watched.version
    time.sleep(10 * POLL_S)
    assert len(watched.config_errors) == 1  # said once, not at every poll
    spec_file.write_text(SPEC.replace("max_new_tokens: 3", "max_new_tokens: 1"))
    wait_for(lambda: watched.version.number == 2, "the file back")
    assert watched.run(question="q").config_version.number == 2
