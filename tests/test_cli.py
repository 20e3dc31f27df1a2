"""The ``autoglm`` command line: the demo, running a spec file, and short messages for mistakes."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import workbench as wb
from workbench.fronts.arguments import LOAD_FLAGS
from workbench.fronts.cli import build_parser, main

SPEC = """\
name: hello
hops:
  - name: plan
    model: tiny
    prompt: "Question: {{ question }}\\nPlan:"
    max_new_tokens: 8
  - name: answer
    model: tiny
    prompt: "{{ plan }}\\nAnswer:"
    max_new_tokens: 8
  - name: stats
    call: workbench.demo:answer_stats
output: answer
"""


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "hello.yaml"
    path.write_text(SPEC, encoding="utf-8")
    return path


@pytest.fixture
def cached_tiny(tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the CLI's own tiny_model() call at the already built model."""
    monkeypatch.setenv("AUTOGLM_CACHE_DIR", str(tiny_path.parent))
    return tiny_path


def _span_rows(out: str) -> list[list[str]]:
    table = out.split("\nspans:\n", 1)[1].split("\nper hop:\n", 1)[0]
    return [line.split() for line in table.strip().splitlines()[1:]]


def test_demo_prints_the_span_table(cached_tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert f"tiny model: {cached_tiny}" in out
    assert "loaded 'tiny' on cpu" in out or "loaded 'tiny' on cuda" in out
    rows = _span_rows(out)
    names = [" ".join(row[:2]) for row in rows]
    assert names == ["chain qa", "hop plan", "text_completion tiny", "hop answer", "text_completion tiny", "hop stats"]
    assert all(row[-1] == "OK" for row in rows)
    summary = out.split("\nper hop:\n", 1)[1]
    for hop in ("plan", "answer", "stats", "(chain)"):
        assert f"\n{hop} " in summary


def test_demo_with_a_cache_dir_that_cannot_be_written_exits_2_with_a_short_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: a FileExistsError traceback from mkdir (exit 1), where the tiny model was to be built; the same for
    # --model tiny=tiny and %autoglm load NAME tiny. A read-only home (a cluster, a container) meets it too.
    not_a_dir = tmp_path / "cache.txt"
    not_a_dir.write_text("a file, not a directory", encoding="utf-8")
    monkeypatch.setenv("AUTOGLM_CACHE_DIR", str(not_a_dir))
    assert main(["demo"]) == 2
    captured = capsys.readouterr()
    first, second = captured.err.splitlines()
    assert first.startswith(f"autoglm: cannot build the tiny model in {str(not_a_dir)!r}: ")
    assert second == "hint: set $AUTOGLM_CACHE_DIR to a directory you can write to"
    assert "Traceback" not in captured.err


def test_run_a_spec_file(spec_file: Path, tiny_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(spec_file), "question=What is the capital of France?", "--model", f"tiny={tiny_path}",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "of chain 'hello'" in out
    assert [" ".join(r[:2]) for r in _span_rows(out)] == ["chain hello", "hop plan", "text_completion tiny",
                                                           "hop answer", "text_completion tiny", "hop stats"]


def test_run_with_json_prints_the_outputs(spec_file: Path, tiny_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(spec_file), "question=What is the capital of France?", "--model", f"tiny={tiny_path}",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"id", "output", "outputs"}
    assert set(printed["outputs"]) == {"plan", "answer", "stats"}
    assert printed["output"] == printed["outputs"]["answer"]
    assert printed["outputs"]["stats"]["answer_words"] == len(printed["output"].split())


def test_run_reads_the_spec_from_stdin_when_it_is_a_dash(spec_file: Path, tiny_path: Path) -> None:
    # cat qa.yaml | autoglm run - ... (or a spec made by another program): '-' was looked for as a file.
    run = [sys.executable, "-m", "workbench.fronts.cli", "run", "-", "--model", f"tiny={tiny_path}"]
    how: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 120, "cwd": Path(wb.__file__).parents[1]}
    done = subprocess.run([*run, "question=hi", "--json"], input=spec_file.read_text(encoding="utf-8"), check=False,
                          **how)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)["outputs"]) == {"plan", "answer", "stats"}
    empty = subprocess.run(run, input="", check=False, **how)
    assert empty.returncode == 2 and "the spec on stdin is empty" in empty.stderr


def test_inputs_may_come_after_the_options(spec_file: Path, tiny_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(spec_file), "question=hi", "--model", f"tiny={tiny_path}", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)["outputs"]
    assert main(["run", str(spec_file), "--model", f"tiny={tiny_path}", "--json", "question=hi"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == before  # not "unrecognized arguments: question=hi"
    with pytest.raises(SystemExit) as info:
        main(["run", str(spec_file), "question=hi", "--model", f"tiny={tiny_path}", "--frobnicate"])
    assert info.value.code == 2 and "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_a_call_may_name_a_module_in_the_working_directory(tmp_path: Path, tiny_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # The README lets a call: name "your own code (the working directory, ...)", but the autoglm script's import
    # path starts at its bin/ folder, not the working directory: such a spec failed with "cannot import module".
    (tmp_path / "shouting_hops.py").write_text("def shout(plan: str) -> str:\n    return plan.upper()\n",
                                               encoding="utf-8")
    (tmp_path / "shout.yaml").write_text(SPEC.replace("workbench.demo:answer_stats", "shouting_hops:shout"),
                                         encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # as the script has it
    monkeypatch.setitem(sys.modules, "shouting_hops", None)  # so that the module imported below is dropped after
    del sys.modules["shouting_hops"]
    assert main(["run", "shout.yaml", "question=hi", "--model", f"tiny={tiny_path}", "--json"]) == 0, \
        capsys.readouterr().err
    outputs = json.loads(capsys.readouterr().out)["outputs"]
    assert outputs["stats"] == outputs["plan"].upper()


def test_model_path_tiny_means_the_tiny_model(cached_tiny: Path, spec_file: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    outputs = []
    for source in ("tiny", str(cached_tiny)):
        assert main(["run", str(spec_file), "question=hi", "--model", f"tiny={source}", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["outputs"])
    assert outputs[0] == outputs[1]


def test_session_keeps_the_history_of_runs_across_invocations(spec_file: Path, tiny_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    for question in ("one", "two"):
        assert main(["run", str(spec_file), f"question={question}", "--model", f"tiny={tiny_path}",
                     "--session", "s1", "--json"]) == 0
    capsys.readouterr()
    with wb.Workbench() as bench:  # the same data directory: sessions persist in its SQLite file
        assert [record.inputs["question"] for record in bench.session("s1").records()] == ["one", "two"]


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (["run", "{missing}", "question=hi"], "cannot read spec file", "did you mean {spec}?"),
        (["run", "{dir}", "question=hi"], "Is a directory", "spec files in {dir}: hello.yaml"),
        (["run", "{dir}/sub/x.yaml"], "No such file", "give the path of a YAML chain spec file"),
        (["run", "{spec}", "question"], "input 'question' is not key=value", 'question="What is 2 + 2?"'),
        (["run", "{spec}", "session=s1"], "'session' is not an input", "--session S"),
        (["run", "{spec}", "question=hi", "--model", "tiny"], "--model 'tiny' is not NAME=PATH",
         "--model tiny=tiny"),
        (["run", "{spec}", "question=hi", "--model", "tiny=tiny", "--model", "tiny=x"], "--model 'tiny' is given twice",
         "one --model NAME=PATH"),
        (["run", "{spec}", "question=hi"], "unknown model 'tiny'", "--model NAME=PATH"),
        (["run", "{spec}", "question=hi", "--model", "tiny={missing}"], "does not exist", "config.json"),
        (["run", "{spec}", "questoin=hi", "--model", "tiny={tiny}"], "did you mean 'question'",
         "autoglm run {spec} question=..."),
        (["run", "{latin1}", "question=hi"], "line 1: {latin1} is not UTF-8 text: byte 0xe9 cannot be read",
         "save it as UTF-8"),
    ],
    ids=["missing-file", "directory", "no-spec-near", "no-equals", "session-as-input", "model-no-equals",
         "model-twice", "no-model", "bad-model-path", "typo-input", "not-utf8"],
)
def test_mistakes_exit_2_with_a_short_message_and_a_hint_in_command_line_terms(
    args: list[str], message: str, hint: str, spec_file: Path, tiny_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    latin1 = spec_file.parent / "encodings" / "latin1.yaml"  # apart, so the directory case lists hello.yaml alone
    latin1.parent.mkdir(exist_ok=True)
    latin1.write_bytes(SPEC.replace("name: hello", "name: héllo").encode("latin-1"))
    paths = {"missing": spec_file.with_name("helo.yaml"), "dir": spec_file.parent, "spec": spec_file,
             "tiny": tiny_path, "latin1": latin1}
    assert main([a.format(**paths) for a in args]) == 2
    captured = capsys.readouterr()
    first, second = captured.err.splitlines()
    assert first.startswith("autoglm: ") and message.format(**paths) in first
    assert second.startswith("hint: ") and hint.format(**paths) in second
    # The hint names what to type here, not the Python API or the magics.
    assert "bench." not in second and "chain.run" not in second and "%autoglm" not in second
    assert captured.out == ""


# The load settings and --session as Python keywords: what a command-line error must not say.
KEYWORDS = re.compile(r"\b(?:" + "|".join(sorted([*LOAD_FLAGS, "session", "max_in_flight", "max_queued"], key=len,
                                                  reverse=True)) + r")=|\b[a-z]+_[a-z_]+\b")


@pytest.mark.parametrize(("flags", "said"), [
    (["--adapters", "foo"], ["autoglm: --adapters 'foo': 'foo' is not NAME=PATH",
                             "hint: e.g. --adapters sql=/adapters/sql,chat=/adapters/chat"]),
    (["--adapter", "{dir}", "--adapters", "a={dir}"],
     ["autoglm: a load takes --adapter PATH (one adapter, always on) or --adapters NAME=PATH (hops pick one by name), "
      "not both", "hint: put the one adapter in --adapters too"]),
    (["--adapters", "a={dir}", "--isolation", "process"],
     ["autoglm: named adapters are served in this process only, and this model runs in a child process "
      "(--isolation process)",
      "hint: load it with --isolation thread and --engine local, or serve the adapters from the server itself"]),
    (["--num-gpus", "-1"], ["autoglm: --num-gpus must be a number >= 0, got -1.0",
                            "hint: what each replica's Ray actor asks of the cluster: 1, or 0.5 to share one"]),
    (["--num-gpus", "1"], ["autoglm: --address, --num-gpus and --num-cpus are settings of --engine ray, and this load "
                           "has --engine local", "hint: add --engine ray, or drop them"]),
    (["--hang-timeout-s", "5"], ["autoglm: --hang-timeout-s is a setting of --isolation process, and this load has "
                                 "--isolation thread", "hint: add --isolation process, or drop --hang-timeout-s"]),
    (["--hang-timeout-s", "0.5", "--isolation", "process"],
     ["autoglm: --hang-timeout-s must be a finite number of seconds >= 1, got 0.5",
      "hint: how long a model process may go without ending a decoding step (default: no limit); set it above the "
      "longest prefill"]),
    (["--restarts", "-1"], ["autoglm: --restarts must be a whole number >= 0, got -1",
                            "hint: it is how often a model process that died is started again (0: never)"]),
    (["--replicas", "2", "--isolation", "process"],
     ["autoglm: model 'tiny' runs in a child process (--isolation process), which serves one replica: 2 were asked for",
      "hint: load it with --replicas 1 (servers may be listed beside it: --replicas cpu,URL), or with --isolation "
      "thread to replicate it"]),
    (["--session", ""], ["autoglm: the session id is empty",
                         "hint: leaving out --session runs without a session; to keep a conversation's history, name "
                         "it: --session alice"]),
    (["--replicas", "2", "--balance", "weighted:1,2,3"],  # before: "Weighted({0: 1.0, 1: 2.0, 2: 3.0}, seed=0) weighs"
     ["autoglm: --balance weighted:1,2,3 weighs replica 2, but 'tiny' has 2 replicas: tiny#0, tiny#1 (or indexes 0-1)",
      "hint: weigh the replicas the model has, by index or by name"]),
    # A hint that names the Python call that helps names the flags that make it.
    (["--replicas", "http://127.0.0.1:9/v1"],
     ["autoglm: model 'tiny': --replicas lists only servers, so the weights it loads here would serve nothing",
      "hint: list a device for them too (--replicas cpu,URL), or load from a server URL as the source: "
      "--model NAME=URL --replicas URL,OTHER_URL"]),
], ids=["adapters-not-pairs", "adapter-and-adapters", "adapters-in-a-process", "num-gpus-negative",
        "ray-setting-without-ray", "hang-timeout-without-process", "hang-timeout-too-short", "restarts-negative",
        "replicas-in-a-process", "session-empty", "balance-as-typed", "load-call-as-flags"])
def test_a_refused_flag_is_named_as_typed_not_as_a_python_keyword(flags: list[str], said: list[str], tmp_path: Path,
                                                                  tiny_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Before, "--adapters foo" hinted "adapters={'sql': '/adapters/sql'}", "--session ''" hinted "session=None runs
    # without a session", "--num-gpus -1" said "num_gpus must be ...": the Python API's words, at a shell prompt.
    spec = tmp_path / "hello.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    argv = ["run", str(spec), "question=hi", "--model", f"tiny={tiny_path}", "--device", "cpu",
            *(flag.format(dir=tmp_path) for flag in flags)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == said
    assert not KEYWORDS.search(err), err


def test_the_python_api_keeps_its_keywords_in_the_same_errors(tiny_path: Path) -> None:
    # The command line says the flags; a Python caller, who passed keywords, is still told the keywords.
    with wb.Workbench() as bench:
        with pytest.raises(wb.ModelLoadError) as refused:
            bench.load("tiny", tiny_path, device="cpu", hang_timeout_s=5)
        assert refused.value.message == ("hang_timeout_s is a setting of isolation='process', and this load has "
                                         "isolation='thread'")
        assert refused.value.hint == "add isolation='process' (--isolation process), or drop hang_timeout_s"


def test_a_failed_hop_prints_what_finished_and_a_short_message(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "parse.yaml"
    spec.write_text("name: parse\nhops:\n  - name: decode\n    call: json:loads\n", encoding="utf-8")
    assert main(["run", str(spec), "s=not json", "--allow-module", "json"]) == 2
    captured = capsys.readouterr()
    assert [" ".join(r[:2]) for r in _span_rows(captured.out)] == ["chain parse", "hop decode"]
    assert captured.err.splitlines() == [
        "autoglm: hop 'decode' failed: JSONDecodeError: Expecting value: line 1 column 1 (char 0)",
        "hint: the spans above show the hops that finished",
    ]


# -- the command line itself ----------------------------------------------------------------------


def test_bare_autoglm_prints_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: autoglm")
    assert "demo" in out and "run" in out and "examples:" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"autoglm {wb.__version__}\n"


@pytest.mark.parametrize("command", [[], ["demo"], ["run"]], ids=["autoglm", "demo", "run"])
def test_help_explains_every_option_in_plain_text(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out  # reST markup is for docstrings, not a terminal
    parser = build_parser()
    if not command:
        for name in ("demo", "run"):
            assert f"\n    {name} " in out  # each command with its one-line help
    else:
        (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = subparsers.choices[command[0]]
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):  # its commands' help is checked above
            assert action.help, f"{action.option_strings or action.dest} has no help"
            assert action.help in " ".join(out.split())


def test_run_offers_every_load_setting_as_an_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for setting in ("--device", "--dtype", "--adapter", "--trust-remote-code", "--allow-pickle", "--revision",
                    "--warmup"):
        assert setting in out


def test_help_imports_neither_torch_nor_transformers() -> None:
    # `autoglm --help` must answer at once; importing torch alone takes seconds.
    script = (
        "import sys\n"
        "from workbench.fronts.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          cwd=Path(wb.__file__).parents[1])
    assert "usage: autoglm" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"


def test_every_public_name_resolves_and_type_checkers_see_the_same_names() -> None:
    for name in wb.__all__:
        assert getattr(wb, name) is not None
    # The names imported under TYPE_CHECKING are what type checkers and IDEs know of the package.
    tree = ast.parse(Path(wb.__file__).read_text(encoding="utf-8"))
    (block,) = [node for node in tree.body if isinstance(node, ast.If)]
    typed = {alias.asname or alias.name for node in block.body for alias in node.names}  # type: ignore[attr-defined]
    assert typed == set(wb.__all__) - {"__version__", "load_ipython_extension"}


# -- replicas -------------------------------------------------------------------------------------


def test_run_loads_every_model_with_replicas_and_a_balance_policy(spec_file: Path, tiny_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(spec_file), "question=hi", "--model", f"tiny={tiny_path}", "--device", "cpu",
                 "--replicas", "cpu,cpu", "--balance", "least_loaded"]) == 0
    out = capsys.readouterr().out
    assert "model 'tiny': 2 replicas (cpu, cpu), picked by least_loaded" in out
    assert all(row[-1] == "OK" for row in _span_rows(out))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "0"], "--replicas 0: a model needs at least one replica"),
        (["--replicas=-1"], "--replicas -1: a model needs at least one replica"),  # was "unknown device '-1'"
        (["--replicas", "1.5"], "--replicas 1.5: a number of replicas is a whole number"),
        (["--replicas", "cpu,,cpu"], "--replicas 'cpu,,cpu' has an empty place"),
        (["--balance", "fastest"], "balance 'fastest': unknown policy 'fastest'"),
        (["--replicas", "2", "--balance", "weighted"], "weighted needs a weight per replica"),
    ],
    ids=["zero", "negative", "fraction", "empty-place", "unknown-policy", "weighted-without-weights"],
)
def test_bad_replica_options_exit_2_before_anything_loads(flags: list[str], message: str, spec_file: Path,
                                                          tiny_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(spec_file), "question=hi", "--model", f"tiny={tiny_path}", *flags]) == 2
    captured = capsys.readouterr()
    first, *rest = captured.err.splitlines()
    assert first.startswith("autoglm: ") and message in first
    assert [line.startswith("hint: ") for line in rest] == [True]
    assert captured.out == ""


def test_the_balance_help_names_every_policy() -> None:
    from workbench.engine.balancing import BALANCE_FORMS, BALANCE_POLICIES
    from workbench.fronts.arguments import BALANCE_HELP

    assert " ".join(BALANCE_HELP.split()).replace(" (the default)", "").endswith(BALANCE_FORMS)
    assert all(name in BALANCE_HELP for name in BALANCE_POLICIES)


def test_serve_takes_the_replica_options_too() -> None:
    from workbench.engine.balancing import LeastLoaded
    from workbench.fronts.arguments import ReplicaOptions, replica_options

    args = build_parser().parse_args(["serve", "--spec", "qa.yaml", "--model", "tiny=tiny", "--replicas", "cpu,cpu",
                                      "--balance", "least_loaded", "--grpc-port", "50051"])
    assert replica_options(args) == ReplicaOptions(replicas=["cpu", "cpu"], balance=LeastLoaded())
    assert args.grpc_port == 50051


@pytest.mark.parametrize("chains", [",", "", "qa,,summary", "qa,"])
def test_keys_add_refuses_a_chains_list_with_an_empty_item(chains: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Before, the empty items were dropped: --chains , made a key for no chain at all, printed as if all was well.
    assert main(["keys", "add", "bot", "--role", "runner", "--chains", chains, "--data-dir", str(tmp_path)]) == 2
    first, second = capsys.readouterr().err.splitlines()
    assert first == f"autoglm: --chains {chains!r} has an empty item"
    assert second.startswith("hint: name the chains separated by single commas")
    assert main(["keys", "list", "--json", "--data-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == []  # no key was made


@pytest.mark.parametrize("action", [["add", "bot", "--role", "runner"], ["list"]], ids=["add", "list"])
def test_keys_in_a_data_dir_that_is_a_file_exit_2_with_a_short_message(action: list[str], tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Before, keys add raised NotADirectoryError with a traceback: the key's hash read the pepper file before the
    # store was opened, where keys list said what was wrong.
    not_a_dir = tmp_path / "notes.txt"
    not_a_dir.write_text("a file, not a directory", encoding="utf-8")
    assert main(["keys", *action, "--data-dir", str(not_a_dir)]) == 2
    captured = capsys.readouterr()
    first, second = captured.err.splitlines()
    assert first.startswith(f"autoglm: cannot open the key store {str(not_a_dir / 'keys.sqlite3')!r}: ")
    assert second == "hint: --data-dir D or $AUTOGLM_DATA_DIR picks a writable directory"
    assert captured.out == ""


def test_serve_refuses_two_spec_files_with_one_chain_name(spec_file: Path, tiny_path: Path, tmp_path: Path) -> None:
    # Before, it served on: the gateway keys chains by name, so the second file's chain hid the first's. A child
    # process, so that a server that does start is stopped by the timeout rather than holding the test.
    other = tmp_path / "other.yaml"
    other.write_text(SPEC.replace("Answer:", "Reply:"), encoding="utf-8")
    command = ["serve", "--spec", str(spec_file), "--spec", str(other), "--model", f"tiny={tiny_path}", "--port", "0",
               "--data-dir", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "workbench.fronts.cli", *command], capture_output=True, text=True,
                          timeout=120, cwd=Path(wb.__file__).parents[1])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"autoglm: --spec {other}: chain 'hello' is also the chain of --spec {spec_file}",
        "hint: give each spec file its own  name:  (or pass each file once)",
    ]
    assert "serving" not in done.stdout


def test_serve_with_a_data_dir_that_cannot_hold_the_keys_exits_2_before_serving(spec_file: Path, tiny_path: Path,
                                                                                 tmp_path: Path) -> None:
    # Before, it printed "serving ..." and answered every call that carried a key with a 500 StoreError. A child
    # process, so that a server that does start is stopped by the timeout rather than holding the test.
    not_a_dir = tmp_path / "data.txt"
    not_a_dir.write_text("a file, not a directory", encoding="utf-8")
    command = ["serve", "--spec", str(spec_file), "--model", f"tiny={tiny_path}", "--port", "0",
               "--data-dir", str(not_a_dir)]
    done = subprocess.run([sys.executable, "-m", "workbench.fronts.cli", *command], capture_output=True, text=True,
                          timeout=120, cwd=Path(wb.__file__).parents[1])
    assert done.returncode == 2
    first, second = done.stderr.splitlines()
    assert first.startswith(f"autoglm: cannot open the key store {str(not_a_dir / 'keys.sqlite3')!r}: ")
    assert second == "hint: --data-dir D or $AUTOGLM_DATA_DIR picks a writable directory"
    assert "serving" not in done.stdout


@pytest.mark.parametrize(("limits", "said"), [
    (["--max-in-flight", "4", "--max-queued", "-1"], ["autoglm: --max-queued -1 is not a whole number of at least 0",
                                                      "hint: e.g. --max-queued 1024 (the default)"]),
    (["--max-in-flight", "0"], ["autoglm: --max-in-flight 0 is not a whole number of at least 1",
                                "hint: e.g. --max-in-flight 64 (the default)"]),
    (["--session-limit", "runs_per_sesion=5"], [
        "autoglm: --session-limit 'runs_per_sesion=5' is not KEY=VALUE with KEY one of runs_per_session, "
        "max_sessions, max_bytes, max_age_s (did you mean 'runs_per_session'?)",
        "hint: e.g. --session-limit runs_per_session=1000"]),
    (["--session-limit", "max_bytes=0"], [
        "autoglm: SessionLimits max_bytes must be a whole number >= 1 or None (no bound), not 0",
        "hint: e.g. wb.SessionLimits(runs_per_session=1000)"]),
], ids=["max-queued", "max-in-flight", "session-limit-key", "session-limit-value"])
def test_serve_takes_the_gateways_limits_and_refuses_a_bad_one_before_serving(limits: list[str], said: list[str],
                                                                              spec_file: Path, tiny_path: Path,
                                                                              tmp_path: Path) -> None:
    # --max-in-flight and --max-queued reach the gateway, which checks them before anything listens; refused, they
    # are named as typed (before: "max_queued=-1 ...", "e.g. max_queued=1024", the Python keyword). A child
    # process, so that a server that does start is stopped by the timeout rather than holding the test.
    command = ["serve", "--spec", str(spec_file), "--model", f"tiny={tiny_path}", "--port", "0",
               "--data-dir", str(tmp_path), *limits]
    done = subprocess.run([sys.executable, "-m", "workbench.fronts.cli", *command], capture_output=True, text=True,
                          timeout=120, cwd=Path(wb.__file__).parents[1], check=False)
    assert done.returncode == 2
    assert done.stderr.splitlines() == said
    assert "serving" not in done.stdout


@pytest.mark.parametrize(("items", "limits"), [
    ([], wb.SessionLimits(max_bytes=1 << 30)),  # a server keeps 1 GiB of runs unless told
    (["runs_per_session=100", "max_age_s=86400.5"],
     wb.SessionLimits(runs_per_session=100, max_age_s=86400.5, max_bytes=1 << 30)),
    (["max_bytes=none", "max_sessions=7"], wb.SessionLimits(max_bytes=None, max_sessions=7)),
])
def test_serves_session_limits_are_read_as_typed(items: list[str], limits: wb.SessionLimits) -> None:
    from workbench.fronts.cli import _session_limits

    assert _session_limits(items) == limits


@pytest.mark.parametrize(("items", "said"), [
    (["max_age_s=a day"], "--session-limit max_age_s='a day': not a number"),
    (["max_sessions=3", "max_sessions=4"], "--session-limit max_sessions is given twice"),
    (["max_bytes"], "--session-limit 'max_bytes' is not KEY=VALUE"),
])
def test_a_session_limit_that_cannot_be_read_says_which_and_why(items: list[str], said: str) -> None:
    from workbench.fronts.cli import _session_limits

    with pytest.raises(wb.WorkbenchError) as info:
        _session_limits(items)
    assert info.value.message.startswith(said)


def test_ctrl_c_during_a_run_exits_130_with_a_short_message(tmp_path: Path) -> None:
    # A Python hop that says when it has started, so Ctrl-C lands while the chain runs, not while modules import.
    (tmp_path / "napping.py").write_text(
        "import pathlib, time\n"
        "def nap(question: str) -> str:\n"
        f"    pathlib.Path({str(tmp_path / 'started')!r}).touch()\n"
        "    time.sleep(3)\n"
        "    return question\n",
        encoding="utf-8",
    )
    spec = tmp_path / "nap.yaml"
    spec.write_text("name: nap\nhops:\n  - name: nap\n    call: napping:nap\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(wb.__file__).parents[1]), str(tmp_path)])}
    child = subprocess.Popen(
        [sys.executable, "-m", "workbench.fronts.cli", "run", str(spec), "question=hi", "--allow-module", "napping"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # Python takes Ctrl-C as KeyboardInterrupt only where SIGINT was not ignored when it started (a shell's
        # background job ignores it).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for _ in range(1200):
            if (tmp_path / "started").exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert (tmp_path / "started").exists(), child.communicate(timeout=60)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130
    # The hop's function sleeps on in its thread; the command does not wait for it (see console()).
    assert err.splitlines()[-2:] == ["autoglm: interrupted", "autoglm: note: 1 Python hop was still running; its "
                                     "thread is left unfinished (a thread cannot be interrupted)"]
    assert "Traceback" not in err and out == ""


def test_run_without_a_spec_names_only_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse counts a bare nargs="*" positional as required: it said "required: SPEC, key=value".
    with pytest.raises(SystemExit) as exited:
        main(["run"])
    assert exited.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "autoglm run: error: the following arguments are required: SPEC"


def _serve_one_python_hop(tmp_path: Path, source: str) -> tuple[subprocess.Popen[bytes], str, str, Path]:
    """``autoglm serve`` of the chain 'nap', one hop calling ``napping.nap`` from ``source``, with a runner's key;
    once it serves: its process, URL, key and log."""
    from workbench.fronts.server.auth import KeyStore

    (tmp_path / "napping.py").write_text(source, encoding="utf-8")
    spec = tmp_path / "nap.yaml"
    spec.write_text("name: nap\nhops:\n  - name: nap\n    call: napping:nap\n", encoding="utf-8")
    key = KeyStore(tmp_path / "data").add("cli", "runner")
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(wb.__file__).parents[1]), str(tmp_path)])}
    with log_path.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "workbench.fronts.cli", "serve", "--spec", str(spec), "--port", "0",
             "--data-dir", str(tmp_path / "data"), "--allow-module", "napping"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a shell's foreground job
    deadline = time.monotonic() + 120
    while (found := re.search(r"serving nap on (\S+)", log_path.read_text())) is None:
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"autoglm serve did not come up:\n{log_path.read_text()}")
        time.sleep(0.2)
    return child, found.group(1), key, log_path


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_serve_with_a_stream_in_flight_ends_the_stream_and_exits_0_without_a_traceback(
        stop: signal.Signals, tmp_path: Path) -> None:
    # Before, uvicorn cancelled the stream after its 2 s of grace and logged 'Exception in ASGI application' with a
    # 25-line CancelledError traceback, and the client's stream broke off mid-body (httpx: 'incomplete chunked read').
    import httpx

    child, url, key, log_path = _serve_one_python_hop(
        tmp_path, "import asyncio\nasync def nap(question: str) -> str:\n    await asyncio.sleep(60)\n"
                  "    return question\n")
    try:
        with httpx.stream("POST", f"{url}/v1/chains/nap/stream", json={"inputs": {"question": "hi"}},
                          headers={"x-api-key": key}, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines) == "event: hop_started"
            child.send_signal(stop)
            rest = list(lines)  # raises httpx.RemoteProtocolError where the stream broke off
        code = child.wait(60)
    finally:
        child.kill()
    said = log_path.read_text()
    assert code == 0 and "Traceback" not in said, said
    assert said.rstrip().endswith("stopped")
    error = next(json.loads(line[6:]) for line in rest if line.startswith("data: {\"error\""))
    assert error["error"]["type"] == "ServerStopping" and error["error"]["status"] == 503


@pytest.mark.parametrize(("flags", "said"), [
    (["--port", "{taken}"], ["autoglm: cannot listen on 127.0.0.1:{taken}: the port is in use",
                             "hint: stop what holds it, or pick another port (0: any free one)"]),
    (["--port", "0", "--grpc-port", "{taken}"],
     ["autoglm: cannot listen on 127.0.0.1:{taken}: the port is in use",
      "hint: stop what holds it, or pick another port (0: any free one)"]),
    (["--port", "0", "--host", "192.0.2.1"],
     ["autoglm: cannot listen on 192.0.2.1:0: Cannot assign requested address",
      "hint: '192.0.2.1' is no address of this machine: 127.0.0.1 serves this machine only, 0.0.0.0 every network "
      "it is on"]),
    (["--port", "0", "--host", "0.0.0.0", "--no-auth"],
     ["autoglm: a server without credentials must listen on loopback only, not '0.0.0.0'",
      "hint: serve on 127.0.0.1, or make keys (autoglm keys add NAME --role runner) and serve with them"]),
    (["--port", "0", "--grpc-port", "70000"], ["autoglm: --grpc-port 70000 is not a TCP port (0 to 65535)",
                                               "hint: a port from 1 to 65535, or 0 for any free one"]),
    (["--port", "{free}", "--grpc-port", "{free}"],
     ["autoglm: --port and --grpc-port are both {free}: one port serves one protocol",
      "hint: give each its own port (0: any free one)"]),
], ids=["port-in-use", "grpc-port-in-use", "host-not-here", "open-on-every-network", "port-out-of-range",
        "one-port-twice"])
def test_serve_says_where_it_cannot_listen_before_loading_any_model(flags: list[str], said: list[str],
                                                                    spec_file: Path, tmp_path: Path) -> None:
    # Before, the models loaded first (minutes for a large one), then a port in use failed with a hint in Python
    # terms ('port=0'), a host not on this machine with 'pick another port', and a gRPC port in use after
    # 'serving ... on' had been printed. The model here cannot load, so an answer about it means it loaded first.
    with socket.socket() as holder, socket.socket() as probe:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        probe.bind(("127.0.0.1", 0))
        ports = {"taken": str(holder.getsockname()[1]), "free": str(probe.getsockname()[1])}
        probe.close()  # free again: each port alone could be served
        command = ["serve", "--spec", str(spec_file), "--model", f"tiny={tmp_path / 'no-model-here'}",
                   "--data-dir", str(tmp_path / "data"), *(flag.format(**ports) for flag in flags)]
        done = subprocess.run([sys.executable, "-m", "workbench.fronts.cli", *command], capture_output=True,
                              text=True, timeout=120, cwd=Path(wb.__file__).parents[1])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [line.format(**ports) for line in said]
    assert done.stdout == ""


@pytest.mark.parametrize(("argv", "said"), [
    (["serve", "--spec", "qa.yaml", "--prot", "9000"], "--prot 9000 (did you mean '--port'?)"),
    (["run", "qa.yaml", "--modle", "tiny=tiny"], "--modle tiny=tiny (did you mean '--model'?)"),
    # Before, argparse took an unambiguous prefix as the option it starts: --por ran serve on port 9000.
    (["serve", "--spec", "qa.yaml", "--por", "9000"], "--por 9000 (did you mean '--port'?)"),
], ids=["serve", "run", "serve-prefix"])
def test_a_misspelt_option_names_the_command_and_the_option_meant(argv: list[str], said: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # Before: 'usage: autoglm [-h] [--version] COMMAND ...' and 'autoglm: error: unrecognized arguments: --prot
    # 9000', the top-level usage, with nothing said of --port.
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: autoglm {argv[0]} ")
    assert err.splitlines()[-1] == f"autoglm {argv[0]}: error: unrecognized arguments: {said}"


def test_a_python_hop_still_running_when_serve_stops_does_not_hold_the_exit(tmp_path: Path) -> None:
    # Before, the process stopped serving and closed, then waited at its exit for the hop's function to return (a
    # thread cannot be interrupted): 20.6 s for a 20 s hop, and here ten minutes.
    import httpx

    child, url, key, log_path = _serve_one_python_hop(
        tmp_path, "import time\ndef nap(question: str) -> str:\n    time.sleep(600)\n    return question\n")
    try:
        with httpx.stream("POST", f"{url}/v1/chains/nap/stream", json={"inputs": {"question": "hi"}},
                          headers={"x-api-key": key}, timeout=60) as response:
            assert next(response.iter_lines()) == "event: hop_started"
            child.send_signal(signal.SIGTERM)
        code = child.wait(120)  # the hop sleeps for ten minutes
    finally:
        child.kill()
    said = log_path.read_text()
    assert code == 0 and "Traceback" not in said, said
    assert said.splitlines()[-2:] == [
        "stopped", ("autoglm: note: 1 Python hop was still running; its thread is left unfinished (a thread cannot "
                    "be interrupted)")], said


def test_sigterm_while_serve_loads_its_models_ends_the_model_process_it_started(spec_file: Path, tiny_path: Path,
                                                                               tmp_path: Path) -> None:
    # Before, SIGTERM before the server ran (while the models loaded) killed the command at once (rc -15), and a
    # model's child process went on loading, holding its memory (a GPU's), until it found its parent gone.
    import psutil

    command = [sys.executable, "-m", "workbench.fronts.cli", "serve", "--spec", str(spec_file), "--model",
               f"tiny={tiny_path}", "--device", "cpu", "--isolation", "process", "--port", "0", "--no-auth"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(wb.__file__).parents[1])
    try:
        parent = psutil.Process(child.pid)
        deadline = time.monotonic() + 60
        while not (loading := parent.children()):  # the model's process, started and loading
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM and out == "", (child.returncode, out, err)
    assert err.splitlines()[-1] == "autoglm: stopped by SIGTERM", err
    _, alive = psutil.wait_procs(loading, timeout=1)
    running = [process for process in alive if _running(process)]  # a zombie has ended: only its reaping is left
    assert not running, f"{running} outlived the command"


def _running(process: Any) -> bool:
    import psutil

    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_serve_on_every_network_says_that_calls_and_keys_travel_unencrypted(spec_file: Path, tiny_path: Path,
                                                                           tmp_path: Path) -> None:
    # Before, --host 0.0.0.0 with keys said nothing: the keys in every call's headers crossed the network in the clear.
    from workbench.fronts.server.auth import KeyStore

    KeyStore(tmp_path).add("caller", "runner")  # else it warns, too, that no caller can authenticate
    command = [sys.executable, "-m", "workbench.fronts.cli", "serve", "--spec", str(spec_file), "--model",
               f"tiny={tiny_path}", "--device", "cpu", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(wb.__file__).parents[1])
    try:
        assert child.stdout is not None
        serving = child.stdout.readline()
        assert "serving hello on http://0.0.0.0:" in serving, serving
        assert f"(auth: API keys from {tmp_path / 'keys.sqlite3'} (1 active)); Ctrl-C stops" in serving, serving
        port = serving.split("http://0.0.0.0:", 1)[1].split()[0]
        for _ in range(600):  # until it answers, so SIGTERM finds the server running
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0 and out == "stopped\n"
    assert err.splitlines() == [
        "autoglm: note: 0.0.0.0 is every network this machine is on, and calls and their keys travel unencrypted",
        "hint: put TLS in front (a reverse proxy, an Ingress) of anything past a network you trust; --host 127.0.0.1 "
        "serves this machine only"]


def test_serve_on_an_empty_key_store_warns_that_no_caller_can_authenticate_until_a_key_is_added(
        tmp_path: Path) -> None:
    # Before, it said "(auth: <Auth <KeyStore '/.../keys.sqlite3'>>)", a Python repr, and nothing about an empty store,
    # on which every call but /health is refused: a server that looked up and took no call.
    import httpx

    from workbench.fronts.server.auth import KeyStore

    spec = tmp_path / "echo.yaml"
    spec.write_text("name: echo\nhops:\n  - name: say\n    call: workbench.demo:canned_answer\n", encoding="utf-8")
    data = tmp_path / "data dir"  # a space, so the hint's --data-dir must be quoted to paste
    env = {name: value for name, value in os.environ.items() if not name.startswith("AUTOGLM_JWT")}
    child = subprocess.Popen([sys.executable, "-m", "workbench.fronts.cli", "serve", "--spec", str(spec), "--port", "0",
                              "--data-dir", str(data)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(wb.__file__).parents[1], env=env)
    try:
        assert child.stdout is not None and child.stderr is not None
        serving = child.stdout.readline()
        store = data / "keys.sqlite3"
        assert re.fullmatch(rf"serving echo on (http://127\.0\.0\.1:\d+) \(auth: API keys from {re.escape(str(store))} "
                            r"\(0 active\)\); Ctrl-C stops\n", serving), serving
        url = serving.split()[3]
        assert [child.stderr.readline(), child.stderr.readline()] == [
            f"autoglm: warning: no caller can authenticate: the key store {store} holds no active API key and no JWT "
            "key is set, so every call but /health is refused as unauthenticated (401)\n",
            f"hint: autoglm keys add NAME --role runner --data-dir '{data}' makes a key, which this server takes at "
            "once; --no-auth serves this machine only, without credentials\n"]
        body = {"inputs": {"question": "2 + 2?"}}
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        assert httpx.post(f"{url}/v1/chains/echo/invoke", json=body, timeout=30).status_code == 401
        # What the warning says: a key added while it serves is taken at once, without a restart.
        key = KeyStore(data).add("late", "runner")
        answer = httpx.post(f"{url}/v1/chains/echo/invoke", json=body, headers={"x-api-key": key}, timeout=30)
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0 and out == "stopped\n"


def test_serving_without_the_serve_extra_says_what_to_install(spec_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    # A bare ModuleNotFoundError (No module named 'uvicorn') from the middle of the web stack's imports, exit 1.
    script = ("import sys; sys.modules['uvicorn'] = None; from workbench.fronts.cli import main; "
              f"sys.exit(main(['serve', '--spec', {str(spec_file)!r}, '--port', '0', '--no-auth']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AUTOGLM_DATA_DIR": str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["autoglm: serving chains needs packages this environment lacks: uvicorn",
                                        "hint: pip install 'autoglm-workbench[serve]'"]
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # the same from Python (bench.serve, %autoglm serve)
    with wb.Workbench() as bench, pytest.raises(wb.WorkbenchError, match="lacks: uvicorn") as info:
        bench.serve(port=0, auth=False)
    assert info.value.hint == "pip install 'autoglm-workbench[serve]'"


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path: Path) -> None:
    # autoglm demo | head -1: a BrokenPipeError traceback, exit 1.
    command = [sys.executable, "-c", "import sys; from workbench.fronts.cli import console; console(['demo'])"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, "AUTOGLM_DATA_DIR": str(tmp_path)}) as process:
        assert process.stdout is not None and process.stderr is not None
        assert process.stdout.readline()  # what the reader wanted; then it goes
        process.stdout.close()
        error = process.stderr.read().decode()
        code = process.wait(timeout=120)
    assert "Traceback" not in error and "BrokenPipe" not in error, error
    assert code == 141
