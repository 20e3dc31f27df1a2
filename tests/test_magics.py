"""The %autoglm magics, driven through a real IPython shell and the real tiny model."""

from __future__ import annotations

import _thread
import dataclasses
import re
import socket
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import CapturedIO, capture_output

import workbench as wb
import workbench.bench
from helpers import eventually
from workbench.engine.balancing import LeastLoaded, SessionHash, Weighted
from workbench.fronts.arguments import ReplicaOptions
from workbench.fronts.notebook.parsers import (
    COMMANDS,
    BalanceCommand,
    HelpCommand,
    LoadCommand,
    ModelsCommand,
    ParseError,
    RunCommand,
    ServeCommand,
    TraceCommand,
    help_text,
    in_magic_words,
    parse_command,
)
from workbench.models.settings import LoadSettings

REPO = Path(__file__).resolve().parents[1]

# Line 1 of the cell is "%%autoglm chain qa", so `model` sits on line 4 and the prompts on 5 and 9.
SPEC = """\
hops:
  - name: plan
    model: tiny
    prompt: "Question: {{ question }}\\nPlan:"
    max_new_tokens: 8
  - name: answer
    model: tiny
    prompt: "{{ plan }}\\nAnswer:"
    max_new_tokens: 8
"""


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    """A real shell with the extension loaded, and a fresh default workbench closed after the test."""
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "workbench")
    # Put back whatever default workbench there was, so no later test inherits this closed one.
    monkeypatch.setattr(workbench.bench, "_current", workbench.bench._current)
    bench = wb.set_current(wb.Workbench())
    try:
        yield ip
    finally:
        bench.close()
        ip.reset(new_session=False)


@pytest.fixture
def with_tiny(shell: InteractiveShell, tiny_path: Path) -> InteractiveShell:
    """The shell, with the tiny model loaded on the CPU as 'tiny' in the default workbench."""
    wb.current().load("tiny", tiny_path, device="cpu")
    return shell


@pytest.fixture
def with_qa(with_tiny: InteractiveShell) -> InteractiveShell:
    """The shell, with the two-hop chain 'qa' built by the cell magic."""
    with capture_output():
        with_tiny.run_cell_magic("autoglm", "chain qa", SPEC)
    return with_tiny


def shown(captured: CapturedIO, mime: str = "text/plain") -> list[str]:
    """What display() published, one entry per displayed object, in the given MIME type."""
    return [str(out.data[mime]) for out in captured.outputs if mime in out.data]


def magic(shell: InteractiveShell, line: str) -> CapturedIO:
    with capture_output() as captured:
        assert shell.run_line_magic("autoglm", line) is None  # nothing echoed as Out[n]
    return captured


# -- help ---------------------------------------------------------------------------------------


def test_bare_magic_prints_every_subcommand_with_an_example(shell: InteractiveShell) -> None:
    out = magic(shell, "").stdout
    for name, command in COMMANDS.items():
        assert f"autoglm {name}" in out
        assert f"e.g. {command.example}" in out
    assert "_autoglm_run" in out  # where a run's result goes is documented
    assert magic(shell, "help").stdout == out


def test_dash_h_shows_the_subcommands_options_even_without_its_arguments(shell: InteractiveShell) -> None:
    captured = magic(shell, "run -h")
    assert "--session" in captured.stdout
    assert 'question="What is 2 + 2?"' in captured.stdout
    assert captured.stderr == ""


# -- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "topic"),
                         [("-h", None), ("--help", None), ("-h run", "run"), ("--help load", "load")])
def test_dash_h_as_the_subcommand_is_help(line: str, topic: str | None) -> None:
    # Before: "unknown subcommand '-h'", though the help text itself says to use -h.
    assert parse_command(line) == HelpCommand(topic=topic)


def test_load_tiny_then_models_shows_it(
    shell: InteractiveShell, tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SOURCE 'tiny' means wb.tiny_model(); point its cache at the one already built.
    monkeypatch.setenv("AUTOGLM_CACHE_DIR", str(tiny_path.parent))
    # As the README writes it, with a comment after the arguments.
    loaded = magic(shell, "load tiny tiny --device cpu --dtype float32 --warmup  # NAME SOURCE; 'tiny' is ...")
    assert loaded.stderr == ""
    assert "loaded 'tiny' on cpu in float32" in loaded.stdout
    assert wb.current().registry.settings("tiny").warmup is True

    tables = shown(magic(shell, "models"), "text/html")  # what a notebook shows: every column
    assert len(tables) == 1
    assert "tiny" in tables[0] and "loaded" in tables[0]
    assert wb.current().models()["source"].tolist() == [str(tiny_path)]


def test_unload_frees_the_model_and_keeps_it_registered(with_tiny: InteractiveShell) -> None:
    captured = magic(with_tiny, "unload tiny")
    assert "unloaded 'tiny'" in captured.stdout
    assert not wb.current().registry.is_loaded("tiny")
    assert wb.current().models()["state"].tolist() == ["registered"]  # it loads again on first use


def test_a_hint_names_the_subcommand_that_helps_not_the_python_call(with_tiny: InteractiveShell) -> None:
    """Hints are written for Python (``bench.unload('tiny') first``), where a magics user has no ``bench``."""
    captured = magic(with_tiny, "load tiny tiny --device cpu")
    assert captured.stderr.splitlines() == [
        f"autoglm: a model named 'tiny' is already loaded (from {wb.current().models()['source'][0]})",
        "hint: pick another name, or %autoglm unload tiny first",
    ]


@pytest.mark.parametrize(("hint", "words"), [
    ("bench.load('m', ...) again", "%autoglm load m SOURCE again"),
    ("load it: bench.load('m')", "load it: %autoglm load m SOURCE"),
    ("load it again (bench.unload('m') then bench.load), or raise restarts",
     "load it again (%autoglm unload m then %autoglm load), or raise restarts"),
    ("as text, bench.set_balance(NAME, 'weighted:3,1')", "as text, %autoglm balance NAME weighted:3,1"),
    ("bench.load(NAME, 'http://127.0.0.1:8000/v1', served_model='my-model')",
     "%autoglm load NAME http://127.0.0.1:8000/v1 --served-model my-model"),
    ("bench.load('m', PATH, adapters={NAME: DIR}) (in this process)",
     "%autoglm load m PATH --adapters NAME=DIR (in this process)"),
    # Before, a list kept the call in Python: wb.current().load(NAME, PATH, replicas=["cpu", ...]).
    ('mix them: bench.load(NAME, PATH, replicas=["cpu", "http://127.0.0.1:8000/v1"])',
     "mix them: %autoglm load NAME PATH --replicas cpu,http://127.0.0.1:8000/v1"),
    # No subcommand makes these: a call on the workbench the magics act on.
    ("bench.set_health_checks(None) turns periodic checks off",
     "wb.current().set_health_checks(None) turns periodic checks off"),
    ("(bench.watch_adapter), or reload it", "(wb.current().watch_adapter), or reload it"),
    ("bench.load('m', pickle=True)", "wb.current().load('m', pickle=True)"),  # no such load option
    ("bench.load('a b') or bench.load(", "wb.current().load('a b') or wb.current().load("),
    ("bench.unload('m#1')", "wb.current().unload('m#1')"),  # a magic line would end at the #
    ("bench.unload('x), g(y')", "wb.current().unload('x), g(y')"),
    ("bench.unload('bench.load') first", "%autoglm unload bench.load first"),  # its call once, not what it quotes
    ("bench.unload('" + "a" * 1000 + "')", "wb.current().unload('" + "a" * 1000 + "')"),  # past what a call takes
    ("the chain's chain.bench.name and %autoglm run qa", "the chain's chain.bench.name and %autoglm run qa"),
])
def test_hints_in_magic_words(hint: str, words: str) -> None:
    assert in_magic_words(hint) == words


def test_a_hint_quoting_many_unclosed_calls_is_read_once_through() -> None:
    """Each unclosed call was read to the end of the hint, and ran again from every call inside one: a name made of
    "bench.load(" 20,000 times took 378 s to show."""
    hint = "pick another name, or bench.unload('" + "bench.load(" * 5000 + "') first"
    assert in_magic_words(hint).startswith("pick another name, or wb.current().unload('")
    quoted = "bench.unload('bench.load(x') or bench.load"  # brackets inside a quoted name are the name's
    assert in_magic_words(quoted) == "%autoglm unload bench.load(x or %autoglm load"


# -- chains and runs ----------------------------------------------------------------------------


def test_chain_cell_builds_the_chain_and_binds_its_name(with_tiny: InteractiveShell) -> None:
    with capture_output() as captured:
        with_tiny.run_cell_magic("autoglm", "chain qa", SPEC)
    chain = with_tiny.user_ns["qa"]
    assert isinstance(chain, wb.Chain)
    assert chain.hops == ["plan", "answer"] and chain.inputs == ("question",)
    assert wb.current().chains()["qa"] is chain
    assert "Chain 'qa'" in shown(captured)[0]
    assert "prompt" in shown(captured, "text/html")[0]


def test_run_with_quoted_values_shows_output_and_span_table(with_qa: InteractiveShell) -> None:
    with_qa.user_ns["x"] = "EXPANDED"
    captured = magic(with_qa, """run qa question="What is {x} in $HOME?" """)
    assert captured.stderr == ""
    run = with_qa.user_ns["_autoglm_run"]
    assert isinstance(run, wb.Run) and run.ok
    # Quotes group the words, and braces and dollars stay literal: no IPython variable expansion.
    assert run.inputs == {"question": "What is {x} in $HOME?"}
    assert set(run.outputs) == {"plan", "answer"}
    run_repr, table = shown(captured)
    assert run.id in run_repr
    for span in ("chain qa", "hop plan", "hop answer", "text_completion tiny"):
        assert span in table
    html_table = shown(captured, "text/html")[1]
    assert "ttft_ms" in html_table and "tokens_out" in html_table
    # Each span is marked with its depth under the chain, in the notebook's HTML too, and left-aligned.
    assert 'left; white-space: nowrap">· hop plan</td>' in html_table
    assert 'left; white-space: nowrap">· · text_completion tiny</td>' in html_table


def test_run_stream_prints_each_hops_tokens_as_they_arrive(with_qa: InteractiveShell) -> None:
    captured = magic(with_qa, "run qa question=hello --stream")
    assert captured.stderr == ""
    run = with_qa.user_ns["_autoglm_run"]
    assert isinstance(run, wb.Run) and run.ok
    lines = captured.stdout.splitlines()
    # One line per LLM hop, its tokens joined into its output; then the run and its span table as without --stream.
    assert f"[plan] {run.outputs['plan']}" in [line.rstrip() for line in lines]
    assert f"[answer] {run.outputs['answer']}" in [line.rstrip() for line in lines]
    assert run.id in shown(captured)[0]


def test_run_stream_heads_each_hops_text_with_that_hop(with_tiny: InteractiveShell) -> None:
    # Two hops at once under one batching policy, one answered from the cache on the second run, and a Python hop:
    # each line of text is headed by the hop that wrote it, and a hop that streamed nothing prints its output.
    wb.current().set_batching("tiny", wb.DynamicBatching(max_batch=4, max_wait_ms=50))
    spec = {"name": "par", "hops": [
        {"name": "left", "model": "tiny", "prompt": "A {{ question }}", "max_new_tokens": 6, "cache": "exact"},
        {"name": "right", "model": "tiny", "prompt": "B {{ question }}", "max_new_tokens": 6},
        {"name": "both", "call": "workbench.demo:canned_answer", "uses": ["left", "right"]},
    ]}
    wb.current().clear_cache(chain="par")
    with_tiny.user_ns["par"] = wb.current().chain(spec)
    for _ in range(2):
        captured = magic(with_tiny, "run par question=hello --stream")
        assert captured.stderr == ""
        run = with_tiny.user_ns["_autoglm_run"]
        text: dict[str, str] = {}
        for line in captured.stdout.splitlines():
            match = re.match(r"\[(\w+)\] (.*)$", line)
            assert match, f"text under no hop's heading: {line!r}"
            text[match[1]] = text.get(match[1], "") + match[2]
        assert {hop: text.get(hop, "").strip() for hop in ("left", "right", "both")} == {
            hop: str(run.outputs[hop]).strip() for hop in ("left", "right", "both")}


def test_run_finds_a_chain_variable_and_keeps_the_session(with_qa: InteractiveShell) -> None:
    with_qa.user_ns["other"] = wb.current().chain(SPEC, name="other_qa")
    captured = magic(with_qa, "run other --session s1 question=hello")
    assert captured.stderr == ""
    assert with_qa.user_ns["_autoglm_run"].chain == "other_qa"
    assert [r.chain for r in wb.current().session("s1").records()] == ["other_qa"]


def test_a_failed_hop_prints_a_short_error_and_keeps_the_partial_run(with_qa: InteractiveShell) -> None:
    wb.current().unload("tiny", forget=True)
    captured = magic(with_qa, "run qa question=hi")
    assert captured.stderr.startswith("autoglm: hop 'plan' failed: no model named 'tiny'")
    assert "Traceback" not in captured.stderr + captured.stdout
    partial = with_qa.user_ns["_autoglm_run"]
    assert not partial.ok and partial.outputs == {}


@pytest.mark.parametrize("line", ["run qa question=hi", "run qa question=hi --stream", "set qa.answer.temperature=0.5",
                                  "serve qa --port 0 --no-auth", "compare qa --inputs q.jsonl"])
def test_a_chain_of_a_closed_workbench_says_to_build_it_again(with_qa: InteractiveShell, line: str) -> None:
    # Before, after bench.close() the magics moved to a fresh workbench while the notebook's `qa` stayed the closed
    # one's: run said to start `bench = wb.Workbench()` (which the magics do not use, and `qa` stayed dead after
    # loading the model again), set said "unknown model 'tiny'", serve "not built on this workbench".
    wb.current().close()
    with wb.set_current(wb.Workbench()):
        wb.current().load("tiny", wb.tiny_model(), device="cpu")
        with capture_output() as captured:
            result = with_qa.run_cell(f"%autoglm {line}")
        assert result.error_in_exec is None
        assert captured.stderr.splitlines() == [
            "autoglm: chain 'qa' was built on a workbench that is closed",
            "hint: run the cell that built it (%%autoglm chain qa) again, to build it on the current workbench",
        ]
        with capture_output():
            with_qa.run_cell_magic("autoglm", "chain qa", SPEC)  # what the hint says: then it runs
        assert magic(with_qa, "run qa question=hi").stderr == ""
        assert with_qa.user_ns["_autoglm_run"].ok


def _cut_chain(shell: InteractiveShell, released: threading.Event, when: Callable[[], None] = lambda: None) -> None:
    """Bind ``cut``: a model hop, then a Python hop that presses the notebook's stop button (a Ctrl-C in the main
    thread) once ``when()`` returns, and waits for ``released``."""

    def halt(plan: str) -> str:
        when()
        _thread.interrupt_main()
        released.wait(30)
        return plan

    shell.user_ns["cut"] = wb.current().chain({"name": "cut", "hops": [
        {"name": "plan", "model": "tiny", "prompt": "Question: {{ question }}", "max_new_tokens": 4},
        {"name": "halt", "call": halt, "uses": ["plan"]}]})


def test_a_ctrl_c_mid_stream_ends_the_line_it_cut(with_tiny: InteractiveShell, ctrl_c_raises: None) -> None:
    # Before, the interrupted hop's line stayed open, and the KeyboardInterrupt's traceback began on it: "[halt] ---".
    released = threading.Event()

    def heading_printed() -> None:  # pressed while this hop's line is open
        printed = sys.stdout  # the cell's captured output
        eventually(lambda: printed.getvalue().endswith("[halt] "), "this hop's heading")

    _cut_chain(with_tiny, released, heading_printed)
    try:
        with capture_output() as captured, pytest.raises(KeyboardInterrupt):
            with_tiny.run_line_magic("autoglm", "run cut question=hi --stream")
    finally:
        released.set()
    assert captured.stdout.endswith("[halt] \n")
    assert [line[:7] for line in captured.stdout.splitlines()] == ["[plan] ", "[halt] "]


@pytest.mark.parametrize("stream", ["", " --stream"], ids=["run", "stream"])
def test_a_ctrl_c_on_run_binds_what_the_run_had_done(with_tiny: InteractiveShell, ctrl_c_raises: None,
                                                     stream: str) -> None:
    # Before, the stop button left _autoglm_run as it was (another run, or none) and the finished hops were lost;
    # with --stream it still did (a bare KeyboardInterrupt) after the plain run kept them.
    released = threading.Event()
    _cut_chain(with_tiny, released)
    try:
        with capture_output(), pytest.raises(wb.RunInterrupted) as info:
            with_tiny.run_line_magic("autoglm", "run cut question=hi" + stream)
    finally:
        released.set()
    bound = with_tiny.user_ns["_autoglm_run"]
    assert bound is info.value.run and list(bound.outputs) == ["plan"] and bound.error.hop == "halt"


@pytest.mark.parametrize("stream", ["", " --stream"], ids=["run", "stream"])
def test_a_failed_hops_hint_says_where_the_partial_run_is(with_qa: InteractiveShell, stream: str) -> None:
    # Before: "kept on the error's .run", an error the magic had already caught, so nothing a user could read.
    wb.current().inject("tiny", error_rate=1.0, seed=0)
    captured = magic(with_qa, "run qa question=hi" + stream)
    message, hint = captured.stderr.splitlines()
    assert message.startswith("autoglm: hop 'plan' failed: InjectedFault")
    assert hint == "hint: the outputs of the hops that finished are in _autoglm_run; %autoglm trace shows its spans"
    assert not with_qa.user_ns["_autoglm_run"].ok
    trace = shown(magic(with_qa, "trace"))[0]
    assert "chain qa" in trace and "ERROR" in trace


def test_a_hint_that_names_the_run_names_the_one_the_magic_bound(with_tiny: InteractiveShell) -> None:
    # "run.trace.events() lists every attempt": there is no run in the notebook; the magic binds it as _autoglm_run.
    wb.current().chain({"name": "retried", "hops": [
        {"name": "say", "model": "tiny", "prompt": "hi", "max_new_tokens": 2, "retry": {"attempts": 2}}]})
    wb.current().inject("tiny", error_rate=1.0, seed=0)
    hint = magic(with_tiny, "run retried").stderr.splitlines()[-1]
    assert hint.startswith("hint: _autoglm_run.trace.events() lists every attempt")
    assert "wb.current().clear_faults()" in hint


def test_a_long_word_said_back_in_an_error_is_cut_short(shell: InteractiveShell) -> None:
    # A 20,000-character name came back whole in the message (and again in its hint): 20-60 kB of stderr.
    name = "n" * 20_000
    for line in (name, f"run {name}", f"unload {name}", f"balance {name} round_robin"):
        captured = magic(shell, line)
        assert captured.stderr.startswith("autoglm: ") and len(captured.stderr) < 5_000, line[:20]
        assert "more characters)" in captured.stderr


def test_hints_say_a_way_once() -> None:
    assert in_magic_words("no model is loaded: bench.load(NAME, PATH) or %autoglm load NAME PATH") == \
        "no model is loaded: %autoglm load NAME PATH"


def test_an_unquoted_value_with_spaces_gets_the_quoted_line_as_its_hint(with_qa: InteractiveShell) -> None:
    # The commonest slip. Before: "input 'is' is not key=value", hint: is="What is 2 + 2?", a nonsense input.
    captured = magic(with_qa, "run qa question=What is the capital of France --session s1")
    assert captured.stderr.splitlines() == [
        "autoglm: input 'is' is not key=value: the value of 'question' seems to hold spaces",
        "hint: quote it: question='What is the capital of France'",
    ]
    assert "_autoglm_run" not in with_qa.user_ns


@pytest.mark.parametrize("line", [
    "run qa question=" + "word " * 20_000,  # a pasted document, unquoted
    "run qa " + "w" * 100_000,  # one huge word that is no key=value
    "run qa question=a " + "k" * 100_000 + "=b",  # a huge input name
])
def test_a_huge_word_typed_by_mistake_is_quoted_back_in_a_few_lines_only(with_qa: InteractiveShell, line: str) -> None:
    """The error quoted the whole word twice, in its message and its hint: 200 KB on the screen for a 100 KB paste."""
    captured = magic(with_qa, line)
    assert captured.stderr.startswith("autoglm: ") and len(captured.stderr) < 800, captured.stderr[:1000]


# -- traces -------------------------------------------------------------------------------------


def test_trace_summary_has_a_row_per_hop(with_qa: InteractiveShell) -> None:
    magic(with_qa, "run qa question=hi")
    summaries = shown(magic(with_qa, "trace --summary"), "text/html")
    assert len(summaries) == 1
    assert all(f">{label}</td>" in summaries[0] for label in ("plan", "answer", "(chain)"))
    assert all(f">{label}</th>" in summaries[0] for label in ("hop", "p95_ms", "ttft_p50_ms"))


def test_trace_reads_the_workbench_a_chain_variable_ran_on(shell: InteractiveShell, tiny_path: Path) -> None:
    # Tutorials 03, 05, 06 and 07 keep a workbench of their own. Before, `%autoglm run qa` ran a chain of it, and the
    # `%autoglm trace` right after said "no chain has run yet" (it read the default workbench), even where the failed
    # run's own hint said "%autoglm trace shows its spans".
    with wb.Workbench() as bench:
        bench.load("tiny", tiny_path, device="cpu")
        shell.user_ns["qa"] = bench.chain(SPEC, name="qa")
        magic(shell, "run qa question=hi")
        ran = shell.user_ns["_autoglm_run"]
        for line in ("trace", "trace last", f"trace {ran.id}"):
            captured = magic(shell, line)
            assert captured.stderr == ""
            assert "hop answer" in shown(captured)[0]
        assert magic(shell, "trace --summary").stderr == ""
        bench.inject("tiny", error_rate=1.0)
        assert magic(shell, "run qa question=hi").stderr.endswith("%autoglm trace shows its spans\n")
        captured = magic(shell, "trace")  # the failed run's spans, not the first run's
        assert captured.stderr == "" and "ERROR" in shown(captured)[0]


def test_trace_of_a_run_id_and_of_every_span(with_qa: InteractiveShell) -> None:
    magic(with_qa, "run qa question=one")
    first = with_qa.user_ns["_autoglm_run"]
    magic(with_qa, "run qa question=two")
    one = shown(magic(with_qa, f"trace {first.id[:6]}"))[0]
    assert one.count("chain qa") == 1
    every = shown(magic(with_qa, "trace --all"))[0]
    assert every.count("chain qa") == 2 and "load tiny" in every


def test_trace_waterfall_displays_the_figure_as_an_image(with_qa: InteractiveShell) -> None:
    magic(with_qa, "run qa question=hi")
    captured = magic(with_qa, "trace last --waterfall")
    (png,) = [out.data["image/png"] for out in captured.outputs if "image/png" in out.data]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Figure" in shown(captured)[0]


def test_unload_ext_removes_the_magic(shell: InteractiveShell) -> None:
    shell.run_line_magic("unload_ext", "workbench")
    assert shell.find_line_magic("autoglm") is None and shell.find_cell_magic("autoglm") is None
    shell.run_line_magic("load_ext", "workbench")
    assert shell.find_line_magic("autoglm") is not None and shell.find_cell_magic("autoglm") is not None


def listening(url: str) -> bool:
    """Whether something accepts connections at a server's URL."""
    address = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((address.hostname, address.port), timeout=5).close()
    except OSError:
        return False
    return True


def test_closing_the_workbench_or_unloading_the_extension_stops_what_serve_started(shell: InteractiveShell) -> None:
    # Before, the server outlived both: after close() every call to it hung on a stopped loop, and after
    # %unload_ext / %load_ext "%autoglm serve stop" said that no server was running.
    with capture_output():
        shell.run_cell(ECHO_CHAIN + "%autoglm serve echo --port 0 --no-auth")
    first = shell.user_ns["_autoglm_server"]
    assert listening(first.url)
    wb.current().close()
    assert not listening(first.url)
    # Before, this said "stopped http://...": a server the close had stopped already.
    assert magic(shell, "serve stop").stdout == "no server is running; start one with %autoglm serve CHAIN\n"

    with wb.set_current(wb.Workbench()):
        with capture_output():
            shell.run_cell(ECHO_CHAIN + "%autoglm serve echo --port 0 --no-auth")
        second = shell.user_ns["_autoglm_server"]
        assert second is not first and listening(second.url)
        shell.run_line_magic("unload_ext", "workbench")
        assert not listening(second.url)
        shell.run_line_magic("load_ext", "workbench")


def test_serve_serves_a_chain_variable_on_the_workbench_it_was_built_on(shell: InteractiveShell) -> None:
    # Before: "chain 'echo' was not built on this workbench, so it cannot serve here", for a chain of the notebook's
    # own workbench, which %autoglm run runs.
    with wb.Workbench() as bench:
        shell.user_ns["echo"] = bench.chain({"name": "echo", "hops": [{"name": "say",
                                                                      "call": "workbench.demo:canned_answer"}]})
        captured = magic(shell, "serve echo --port 0 --no-auth")
        assert captured.stderr == ""
        server = shell.user_ns["_autoglm_server"]
        answer = httpx.post(f"{server.url}/v1/chains/echo/invoke", json={"inputs": {"question": "hi"}}, timeout=30)
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
        assert magic(shell, "serve stop").stdout == f"stopped {server.url}\n"
        assert not listening(server.url)


def test_serve_stop_comes_alone_and_anything_after_it_is_refused_with_the_server_left_running(
        shell: InteractiveShell) -> None:
    # Before, "serve stop stop" read both words as chain names ("no chain named 'stop'"), and "serve stop --port 9"
    # stopped every server, the --port dropped without a word.
    with capture_output():
        shell.run_cell(ECHO_CHAIN + "%autoglm serve echo --port 0 --no-auth")
    server = shell.user_ns["_autoglm_server"]
    for line, got in [("serve stop stop", "'stop'"), ("serve stop echo", "'echo'"),
                      ("serve stop --port 9 --no-auth", "'--port 9 --no-auth'")]:
        refused = magic(shell, line)
        assert refused.stderr.splitlines() == [
            f"autoglm: serve stop stops every server %autoglm serve started, and takes nothing after it: got {got}",
            "hint: %autoglm serve stop, alone; to serve chains: %autoglm serve CHAIN ...",
        ], line
        assert refused.stdout == "" and listening(server.url), line
    assert magic(shell, "serve stop").stdout == f"stopped {server.url}\n"
    assert not listening(server.url)
    assert parse_command("serve echo --port 0 --host ::1") == ServeCommand(chains=("echo",), port=0, host="::1")
    assert parse_command("serve echo") == ServeCommand(chains=("echo",), port=8000, host="127.0.0.1")


def test_serve_with_keys_on_an_empty_key_store_warns_that_every_call_is_refused(shell: InteractiveShell,
                                                                                data_dir: Path) -> None:
    # Before, it said only "serving echo on ...": a notebook's fresh key store is empty, and every call got a 401.
    with capture_output() as started:
        shell.run_cell(ECHO_CHAIN + "%autoglm serve echo --port 0")
    server = shell.user_ns["_autoglm_server"]
    try:
        assert started.stdout.startswith(f"serving echo on {server.url} ")
        assert started.stderr.splitlines() == [
            f"autoglm: warning: no caller can authenticate: the key store {data_dir / 'keys.sqlite3'} holds no "
            "active API key and no JWT key is set, so every call but /health is refused as unauthenticated (401)",
            f"hint: make a key in a terminal: autoglm keys add NAME --role runner --data-dir {data_dir} (this server "
            "takes it at once); or serve this machine only, without credentials: %autoglm serve echo --no-auth"]
        assert httpx.post(f"{server.url}/v1/chains/echo/invoke", json={"inputs": {"question": "hi"}},
                          timeout=30).status_code == 401
    finally:
        magic(shell, "serve stop")
    with capture_output() as open_:
        shell.run_line_magic("autoglm", "serve echo --port 0 --no-auth")
    magic(shell, "serve stop")
    assert open_.stderr == ""  # an open server lets this machine in: nothing to warn of


def test_builder_opens_a_chain_variable_on_its_own_workbench(shell: InteractiveShell, tiny_path: Path) -> None:
    # Before, the builder got wb.current(): its model pickers listed no model, and its run said "unknown model 'tiny'".
    with wb.Workbench() as bench:
        bench.load("tiny", tiny_path, device="cpu")
        shell.user_ns["qa"] = bench.chain(SPEC, name="qa")
        assert magic(shell, "builder qa").stderr == ""
        builder = shell.user_ns["_autoglm_widget"]
        assert builder.bench is bench
        builder.inputs["question"].value = "hi"
        assert builder.run(), builder.error
        builder.wait()
        assert builder.last_run is not None and builder.last_run.ok


# -- mistakes -----------------------------------------------------------------------------------

BAD_YAML = "%%autoglm chain qa\nhops:\n  - name: plan\n    prompt: {{ question }}\n    model: tiny\n"
UNKNOWN_MODEL = "%%autoglm chain qa\nhops:\n  - name: plan\n    model: nope\n    prompt: hi\n"
# A cell that builds a model-free chain 'echo' in Python before its magic line.
ECHO_CHAIN = (
    "import workbench\n"
    "echo = workbench.current().chain({'name': 'echo',"
    " 'hops': [{'name': 'say', 'call': 'workbench.demo:canned_answer'}]})\n"
)


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        pytest.param("%autoglm lod tiny tiny", "unknown subcommand 'lod' (did you mean 'load'?)", id="unknown-sub"),
        pytest.param("%autoglm load tiny", "load: the following arguments are required: SOURCE", id="load-no-source"),
        pytest.param("%autoglm run nope question=x", "no chain named 'nope'", id="run-unknown-chain"),
        pytest.param("%autoglm run qa question", "input 'question' is not key=value", id="run-no-equals"),
        pytest.param("%autoglm run qa session=s1", "'session' is not an input", id="run-session-as-input"),
        pytest.param("%autoglm run qa 'question=x", "No closing quotation", id="unclosed-quote"),
        pytest.param(BAD_YAML, "chain spec, line 4: not valid YAML", id="bad-yaml-names-the-cell-line"),
        pytest.param(UNKNOWN_MODEL, "hop 'plan', field 'model', line 4: unknown model 'nope'", id="unknown-model"),
        pytest.param("%autoglm chain qa", "chain is a cell magic", id="chain-as-line-magic"),
        # Before, bound to user_ns['class'], a variable no code can name.
        pytest.param("%%autoglm chain class\nhops:\n  - name: say\n    call: workbench.demo:canned_answer\n",
                     "chain name 'class' is a Python keyword", id="chain-named-a-keyword"),
        # Before, bound over the builtin (print() then called the chain) or over the notebook's own variable.
        pytest.param("%%autoglm chain print\nhops:\n  - name: say\n    call: workbench.demo:canned_answer\n",
                     "'print' already names builtin_function_or_method", id="chain-over-a-builtin"),
        pytest.param("%%autoglm chain In\nhops:\n  - name: say\n    call: workbench.demo:canned_answer\n",
                     "'In' already names list", id="chain-over-a-variable"),  # IPython's input history
        pytest.param("%autoglm load x /nonexistent", "'/nonexistent' does not exist", id="load-missing-dir"),
        pytest.param("%autoglm trace", "no chain has run yet", id="trace-before-any-run"),
        # Before, argparse took the prefix --al for --all, a guess made for the user.
        pytest.param("%autoglm trace --al", "trace: unrecognized arguments: --al", id="trace-option-prefix"),
        pytest.param("%autoglm trace abc --all", "a run id or --all, not both", id="trace-id-and-all"),
        pytest.param("%autoglm unload nope", "no model named 'nope'", id="unload-unknown"),
        pytest.param("%autoglm compare qa", "compare: the following arguments are required: --inputs",
                     id="compare-without-inputs"),
        pytest.param("%autoglm compare qa --inputs q.jsonl --batching none,dynamic:16:soon",
                     "batching 'dynamic:16:soon': max_wait 'soon' is not a time", id="compare-bad-batching"),
        pytest.param("%autoglm compare qa --inputs q.jsonl --batching dynamic:16:infms",
                     "batching 'dynamic:16:infms': max_wait 'infms' is not a time", id="compare-infinite-wait"),
        pytest.param("%autoglm compare qa --inputs q.jsonl --preload lazy,sometimes",
                     "preloading 'sometimes': unknown strategy 'sometimes'", id="compare-bad-preload"),
        pytest.param("%autoglm compare qa --inputs q.jsonl --ui --rate 0", "compare: --rate must be above 0",
                     id="compare-ui-bad-rate"),
        pytest.param(ECHO_CHAIN + "%autoglm compare echo --inputs /nonexistent/q.jsonl",
                     "cannot read inputs file '/nonexistent/q.jsonl'", id="compare-missing-inputs-file"),
        pytest.param("%autoglm builder nope", "no chain named 'nope'", id="builder-unknown-chain"),
        pytest.param("%autoglm builder qa other", "builder: unrecognized arguments: other", id="builder-two-chains"),
        pytest.param("%autoglm models --ui all", "models: unrecognized arguments: all", id="models-ui-extra"),
        pytest.param("%autoglm trace --ui", "no chain has run yet", id="trace-ui-before-any-run"),
        pytest.param("%autoglm load m tiny --replicas 0", "--replicas 0: a model needs at least one replica",
                     id="load-zero-replicas"),
        pytest.param("%autoglm load m tiny --replicas cpu,", "--replicas 'cpu,' has an empty place",
                     id="load-empty-place"),
        pytest.param('%autoglm load "" tiny', "model name '' is not text without spaces at its ends",
                     id="load-blank-name"),
        pytest.param('%autoglm load " m" tiny', "model name ' m' is not text without spaces at its ends",
                     id="load-name-with-a-space"),
        pytest.param("%autoglm load m tiny --replicas 99999999999999",
                     "model 'm': --replicas must be at most 1024, got 99999999999999", id="load-replicas-typo"),
        pytest.param("%autoglm load m tiny --balance fastest", "unknown policy 'fastest'", id="load-unknown-balance"),
        pytest.param("%autoglm balance m", "balance: the following arguments are required: POLICY",
                     id="balance-no-policy"),
        pytest.param("%autoglm balance m least_loded", "unknown policy 'least_loded' (did you mean 'least_loaded'?)",
                     id="balance-typo"),
        pytest.param("%autoglm balance nope round_robin", "no model named 'nope'", id="balance-unknown-model"),
        pytest.param(ECHO_CHAIN + "%autoglm serve echo echo --port 0", "serve: chain 'echo' is named twice",
                     id="serve-one-chain-twice"),
        pytest.param(ECHO_CHAIN + "again = echo\n%autoglm serve echo again --port 0",
                     "serve: chain 'echo' is named twice (echo again)", id="serve-two-variables-one-chain"),
    ],
)
def test_a_mistake_prints_a_short_message_and_no_traceback(shell: InteractiveShell, cell: str, expected: str) -> None:
    with capture_output() as captured:
        result = shell.run_cell(cell)  # the path a notebook cell takes, where a raise would print a traceback
    assert result.error_in_exec is None
    first, *rest = captured.stderr.splitlines()
    assert first.startswith("autoglm: ") and expected in first
    assert all(line.startswith("hint: ") for line in rest) and len(rest) <= 1
    assert "Traceback" not in captured.stdout + captured.stderr
    assert "qa" not in shell.user_ns  # a spec that failed binds nothing


@pytest.mark.parametrize(("line", "said"), [
    ("load m tiny --adapters foo", ["autoglm: --adapters 'foo': 'foo' is not NAME=PATH",
                                    "hint: e.g. --adapters sql=/adapters/sql,chat=/adapters/chat"]),
    ("load m tiny --hang-timeout-s 5",
     ["autoglm: --hang-timeout-s is a setting of --isolation process, and this load has --isolation thread",
      "hint: add --isolation process, or drop --hang-timeout-s"]),
    ("load m tiny --num-gpus -1", ["autoglm: --num-gpus must be a number >= 0, got -1.0",
                                   "hint: what each replica's Ray actor asks of the cluster: 1, or 0.5 to share one"]),
    ("run echo question=x --session ''", ["autoglm: the session id is empty",
                                          "hint: leaving out --session runs without a session; to keep a "
                                          "conversation's history, name it: --session alice"]),
    ("run echo question=x --stream --session ' '", ["autoglm: the session id ' ' is blank",
                                                    "hint: leaving out --session runs without a session; to keep a "
                                                    "conversation's history, name it: --session alice"]),
    ("compare echo --inputs {inputs} --rate inf", ["autoglm: arrival rate must be a finite number > 0 runs/s, not inf",
                                                   "hint: e.g. --rate 20; for every run at once, a closed loop: "
                                                   "--concurrency N"]),
    ("serve echo --grpc-port 70000 --no-auth", ["autoglm: serve: --grpc-port 70000 is not a TCP port (0 to 65535)",
                                                "hint: a port from 1 to 65535, or 0 for any free one"]),
    ("load m tiny --replicas http://127.0.0.1:9/v1",
     ["autoglm: model 'm': --replicas lists only servers, so the weights it loads here would serve nothing",
      "hint: list a device for them too (--replicas cpu,URL), or load from a server URL as the source: "
      "%autoglm load NAME URL --replicas URL,OTHER_URL"]),
], ids=["adapters-not-pairs", "hang-timeout-without-process", "num-gpus-negative", "session-empty",
        "stream-session-blank", "compare-rate", "serve-grpc-port", "replicas-only-servers"])
def test_a_refused_option_is_named_as_typed_not_as_a_python_keyword(shell: InteractiveShell, tmp_path: Path,
                                                                    line: str, said: list[str]) -> None:
    # Before: "adapters={'sql': '/adapters/sql'}", "hang_timeout_s is a setting of isolation='process'",
    # "session=None runs without a session", "e.g. arrival_rate=20", "grpc port 70000": a Python caller's words.
    inputs = tmp_path / "q.jsonl"
    inputs.write_text('{"question": "a"}\n')
    with capture_output() as captured:
        shell.run_cell(ECHO_CHAIN + "%autoglm " + line.format(inputs=inputs))
    assert captured.stderr.splitlines() == said


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param('{"question": "ok"}\n{"question": "caf\xe9"}\n'.encode("latin-1"),
                     "bad.jsonl, line 2: not UTF-8 text (byte 0xe9)", id="latin-1"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000 + b"\n", "bad.jsonl, line 1: JSON nested too deeply to read",
                     id="nested-too-deep"),
    ],
)
def test_compare_says_which_line_of_an_unreadable_inputs_file(shell: InteractiveShell, tmp_path: Path,
                                                              content: bytes, expected: str) -> None:
    # Before, a UnicodeDecodeError or a RecursionError came out of the magic with a traceback.
    inputs = tmp_path / "bad.jsonl"
    inputs.write_bytes(content)
    with capture_output() as captured:
        result = shell.run_cell(ECHO_CHAIN + f"%autoglm compare echo --inputs {inputs}")
    assert result.error_in_exec is None
    assert captured.stderr.splitlines()[0] == f"autoglm: {expected}"
    assert "Traceback" not in captured.stdout + captured.stderr


# -- parsing ------------------------------------------------------------------------------------


def test_run_parses_into_typed_inputs_with_flags_anywhere() -> None:
    command = parse_command("run qa --session s1 question='a b' topic=c")
    assert command == RunCommand(chain="qa", inputs={"question": "a b", "topic": "c"}, session="s1")


def test_run_without_a_chain_names_only_what_is_missing() -> None:
    # argparse counts a bare nargs="*" positional as required: it said "required: CHAIN, key=value".
    with pytest.raises(ParseError) as error:
        parse_command("run")
    assert error.value.message == "run: the following arguments are required: CHAIN"


def test_trace_defaults_to_the_last_run() -> None:
    assert parse_command("trace --summary") == TraceCommand(run="last", summary=True)


def test_a_word_starting_with_a_hash_starts_a_comment_as_in_a_shell() -> None:
    assert parse_command("run qa question='a # b' topic=C#  # the rest is a comment 'unclosed") == RunCommand(
        chain="qa", inputs={"question": "a # b", "topic": "C#"}
    )
    assert parse_command("trace --summary # per hop") == TraceCommand(summary=True)


def test_every_magic_line_of_the_readme_pastes_as_written() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    lines = [line for line in readme.splitlines() if line.startswith("%autoglm") or line.startswith("%%autoglm")]
    assert len(lines) >= 10
    for line in lines:
        cell = "hops: []" if line.startswith("%%") else None
        command = parse_command(line.removeprefix("%%autoglm").removeprefix("%autoglm"), cell)
        assert command.subcommand in COMMANDS
        # IPython reads a line ending in ? as a request for help and never runs the magic.
        assert not re.sub(r"\s+#.*$", "", line).rstrip().endswith("?"), line


def test_load_takes_every_load_setting_as_an_option() -> None:
    command = parse_command("load big org/big --device cuda:1 --dtype bfloat16 --adapter /a --trust-remote-code"
                            " --allow-pickle --revision v2 --warmup")
    assert command == LoadCommand(
        name="big",
        settings=LoadSettings(source="org/big", device="cuda:1", dtype="bfloat16", adapter="/a",
                              trust_remote_code=True, allow_pickle=True, revision="v2", warmup=True),
    )
    assert parse_command("load tiny tiny") == LoadCommand(name="tiny", settings=LoadSettings(source="tiny"))
    options = help_text("load")
    for setting in dataclasses.fields(LoadSettings)[1:]:
        flag = "--" + setting.name.replace("_", "-")
        assert flag in options and flag in LoadCommand.usage
        assert " ".join(setting.metadata["help"].split()) in " ".join(options.split())


def test_a_line_subcommand_refuses_a_cell_body_but_not_a_blank_one() -> None:
    with pytest.raises(ParseError, match="run takes no cell body"):
        parse_command("run qa question=x", "hops: []")
    assert parse_command("models", "\n") == ModelsCommand()


def test_a_compare_that_cannot_save_keeps_its_result_and_says_so(shell: InteractiveShell, tmp_path: Path) -> None:
    (tmp_path / "q.jsonl").write_text('{"question": "a"}\n{"question": "b"}\n')
    wb.current().chain({"name": "echo", "hops": [{"name": "say", "call": "workbench.demo:canned_answer"}]})
    missing = tmp_path / "no-such-dir" / "out.csv"
    with capture_output() as captured:
        result = shell.run_cell(f"%autoglm compare echo --inputs {tmp_path / 'q.jsonl'} --repeats 1 --warmup 0"
                                f" --save {missing}")
    assert result.error_in_exec is None
    assert "Traceback" not in captured.stdout + captured.stderr
    ours = [line for line in captured.stderr.splitlines() if line.startswith(("autoglm: ", "hint: "))]
    assert len(ours) == 2 and ours[0].startswith(f"autoglm: compare: cannot save the comparison to {str(missing)!r}: ")
    assert ours[1] == "hint: the comparison is kept in _autoglm_compare; _autoglm_compare.save(PATH) writes it"
    comparison = shell.user_ns["_autoglm_compare"]
    assert isinstance(comparison, wb.Comparison) and list(comparison.table()["n"]) == [2]
    assert not missing.parent.exists()


# -- replicas -----------------------------------------------------------------------------------


def test_load_parses_replicas_as_a_count_or_places_and_a_balance_policy() -> None:
    assert parse_command("load m tiny --replicas 2 --balance least_loaded") == LoadCommand(
        name="m", settings=LoadSettings(source="tiny"), replicas=ReplicaOptions(replicas=2, balance=LeastLoaded()))
    command = parse_command("load m tiny --replicas cpu,cuda:1,http://127.0.0.1:8000/v1 --balance weighted:3,1,1")
    assert command.replicas == ReplicaOptions(replicas=["cpu", "cuda:1", "http://127.0.0.1:8000/v1"],
                                              balance=Weighted([3, 1, 1]))
    assert parse_command("balance m session_hash") == BalanceCommand(name="m", policy=SessionHash())
    options = help_text("load")
    assert "--replicas" in LoadCommand.usage and "--balance" in LoadCommand.usage
    assert "--replicas N|PLACE,..." in options and "least_loaded" in options


def test_load_with_replicas_then_balance_changes_the_policy_live(
    shell: InteractiveShell, tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOGLM_CACHE_DIR", str(tiny_path.parent))
    loaded = magic(shell, "load m tiny --device cpu --replicas 2 --balance least_loaded")
    assert loaded.stderr == ""
    assert loaded.stdout.rstrip().endswith(", 2 replicas (least_loaded)")
    table = wb.current().replicas("m")
    assert table["replica"].tolist() == ["m#0", "m#1"] and set(table["balance"]) == {"least_loaded"}

    switched = magic(shell, "balance m session_hash")
    assert switched.stdout == "'m': replicas picked by session_hash\n" and switched.stderr == ""
    assert set(wb.current().replicas("m")["balance"]) == {"session_hash"}
    # The model keeps serving under the new policy: a session's requests stay on one replica.
    chain = wb.current().chain({"name": "ask", "hops": [{"name": "a", "model": "m", "prompt": "{{ q }}",
                                                         "max_new_tokens": 2}]})
    served = {chain.run(q="hi", session="alice").trace.table().loc[lambda t: t["name"] == "text_completion m",
                                                                    "attributes.workbench.replica"].item()
              for _ in range(3)}
    assert len(served) == 1


def test_balance_on_a_model_with_one_replica_is_kept_and_says_it_changes_nothing_yet(
    shell: InteractiveShell, tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOGLM_CACHE_DIR", str(tiny_path.parent))
    magic(shell, "load one tiny --device cpu")
    said = magic(shell, "balance one least_loaded")
    assert said.stderr == ""
    assert said.stdout == ("'one': replicas picked by least_loaded (it has one replica, so every request goes to it; "
                           "load it with --replicas N to spread them)\n")
    assert wb.current().replicas("one")["balance"].tolist() == ["least_loaded"]
