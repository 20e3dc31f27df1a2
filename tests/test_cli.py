"""The ``autoglm`` command line: the demo, running a spec file, and short messages for mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.fronts.cli import main

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


def test_model_path_tiny_means_the_tiny_model(cached_tiny: Path, spec_file: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    outputs = []
    for source in ("tiny", str(cached_tiny)):
        assert main(["run", str(spec_file), "question=hi", "--model", f"tiny={source}", "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["outputs"])
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "{missing}", "question=hi"], "No such file"),
        (["run", "{dir}", "question=hi"], "Is a directory"),
        (["run", "{spec}", "question"], "input 'question' is not key=value"),
        (["run", "{spec}", "question=hi", "--model", "tiny"], "--model 'tiny' is not NAME=PATH"),
        (["run", "{spec}", "question=hi"], "unknown model 'tiny'"),
        (["run", "{spec}", "question=hi", "--model", "tiny={missing}"], "is not a directory"),
        (["run", "{spec}", "questoin=hi", "--model", "tiny={tiny}"], "did you mean 'question'"),
        (["run", "{latin1}", "question=hi"], "line 1: {latin1} is not UTF-8 text: byte 0xe9 cannot be read"),
    ],
    ids=["missing-file", "directory", "no-equals", "model-no-equals", "no-model", "bad-model-path", "typo-input",
         "not-utf8"],
)
def test_mistakes_exit_2_with_a_short_message(
    args: list[str], message: str, spec_file: Path, tiny_path: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(SPEC.replace("name: hello", "name: héllo").encode("latin-1"))
    paths = {"missing": tmp_path / "nope.yaml", "dir": tmp_path, "spec": spec_file, "tiny": tiny_path, "latin1": latin1}
    assert main([a.format(**paths) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("autoglm: ")
    assert message.format(**paths) in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
