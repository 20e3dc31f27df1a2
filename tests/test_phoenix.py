"""Phoenix reads exported runs fully: a real Phoenix server, in an environment of its own, on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import workbench as wb
from workbench.models.tiny import cache_root

pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")

PHOENIX = "arize-phoenix==20.26.1"
# CI sets this: there a Phoenix that cannot be installed is a failure, where a laptop offline skips.
REQUIRE = "AUTOGLM_REQUIRE_PHOENIX"
WAIT_S = 120  # a generous bound on Phoenix starting, and on its ingesting what the workbench sent

SPEC = {
    "name": "qa",
    "hops": [
        {"name": "plan", "model": "tiny", "prompt": "Question: {{ question }}\nPlan:", "max_new_tokens": 6},
        {"name": "answer", "model": "tiny", "prompt": "{{ plan }}\nAnswer:", "max_new_tokens": 6},
        {"name": "stats", "call": "workbench.demo:answer_stats"},
    ],
    "output": "answer",
}


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE):
        pytest.fail(f"{reason} ({REQUIRE} is set)")
    pytest.skip(reason)


def _phoenix_python() -> Path:
    """The Python of a virtualenv with Phoenix in it, built once into the workbench's cache (pip needs an index then).

    Phoenix pins many packages, so it never shares the workbench's environment. The venv is built
    under a temporary name and renamed into place, so a concurrent session never sees half of one.
    """
    home = cache_root() / f"phoenix-{PHOENIX.partition('==')[2]}"
    if not (home / "bin" / "python").exists():
        home.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f"{home.name}.", dir=home.parent))
        try:
            subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, capture_output=True)
            # --no-compile: Python compiles what the server imports as it starts, not all 850 MB of it here (on this
            # 2-core machine: install 50 -> 31 s, first start 11 -> 18 s; 61 -> 50 s in all).
            pip = subprocess.run([str(building / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile",
                                  PHOENIX], check=False, capture_output=True, text=True)
            if pip.returncode:
                last = (pip.stderr.strip() or pip.stdout.strip()).splitlines()[-1:]
                _unavailable(f"pip could not install {PHOENIX}: {' '.join(last)}")
            building.rename(home)
        except OSError:
            if not (home / "bin" / "python").exists():
                raise
            # another session renamed its build into place first: use theirs
        finally:
            shutil.rmtree(building, ignore_errors=True)
    # Run as a module, not through bin/phoenix: a script's shebang names the path the venv was built at.
    return home / "bin" / "python"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _graphql(base: str, query: str) -> Any:
    request = urllib.request.Request(f"{base}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Phoenix server on 127.0.0.1 with free ports and a fresh working directory; its base URL."""
    python = _phoenix_python()
    work = tmp_path_factory.mktemp("phoenix")
    port = _free_port()
    env = {**os.environ, "PHOENIX_WORKING_DIR": str(work), "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(port),
           "PHOENIX_GRPC_PORT": str(_free_port()), "PHOENIX_TELEMETRY_ENABLED": "false"}
    log_path = work / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([str(python), "-m", "phoenix.server.main", "serve"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Phoenix did not start; its log ends:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def _spans(base: str, project: str, expected: int) -> list[dict[str, Any]]:
    """The project's spans once Phoenix has stored ``expected`` of them (it ingests in the background)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            spans = _get(f"{base}/v1/projects/{project}/spans?limit=1000")["data"]
        except urllib.error.HTTPError as exc:  # 404 until the project's first span is stored
            if exc.code != 404:
                raise
            spans = []
        if len(spans) >= expected or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


def test_phoenix_shows_each_run_as_one_trace_with_kinds_tokens_model_and_parents(
    phoenix: str, tiny_path: Path
) -> None:
    bench = wb.Workbench(otlp_endpoint=phoenix, project_name="wbtest")
    bench.load("tiny", tiny_path, device="cpu", batching=wb.DynamicBatching(max_batch=4, max_wait_ms=20))
    chain = bench.chain(SPEC)
    runs = chain.map([{"question": q} for q in ("Capital of France?", "How many hops?", "Why?")],
                     concurrency=3, session="s1")
    source = bench.registry.get("tiny").source
    local = bench.traces().spans
    bench.close()  # flushes the exporters

    def project(span: Any) -> str:
        return str(span.resource.attributes["openinference.project.name"])

    mine = {format(s.context.span_id, "016x"): s for s in local if project(s) == "wbtest"}
    engine = {format(s.context.span_id, "016x"): s for s in local if project(s) == "wbtest-engine"}
    stored = {s["context"]["span_id"]: s for s in _spans(phoenix, "wbtest", len(mine))}
    assert stored.keys() == mine.keys()  # every span of every run, nothing else

    # The trace list shows the runs and nothing else: one root per run, the chain's.
    roots = [s for s in stored.values() if s["parent_id"] is None]
    assert sorted(s["context"]["trace_id"] for s in roots) == sorted(format(r.trace_id, "032x") for r in runs)
    assert {(s["name"], s["span_kind"], s["status_code"]) for s in roots} == {("chain qa", "CHAIN", "OK")}
    for span_id, span in stored.items():
        parent = mine[span_id].parent
        assert span["parent_id"] == (format(parent.span_id, "016x") if parent else None), span["name"]
    kinds = {s["name"]: s["span_kind"] for s in stored.values()}
    assert kinds == {"chain qa": "CHAIN", "hop plan": "CHAIN", "hop answer": "CHAIN", "hop stats": "TOOL",
                     "text_completion tiny": "LLM"}

    llm = [s for s in stored.values() if s["span_kind"] == "LLM"]
    assert len(llm) == 2 * len(runs)
    for span in llm:
        a, mine_a = span["attributes"], mine[span["context"]["span_id"]].attributes
        assert a["llm.model_name"] == source
        assert a["llm.token_count.prompt"] == mine_a["gen_ai.usage.input_tokens"]
        assert a["llm.token_count.completion"] == mine_a["gen_ai.usage.output_tokens"]
        assert json.loads(a["llm.invocation_parameters"])["max_new_tokens"] == 6
    tool = next(s for s in stored.values() if s["span_kind"] == "TOOL")["attributes"]
    assert tool["tool.name"] == "workbench.demo:answer_stats"
    assert tool["input.mime_type"] == "application/json" and set(json.loads(tool["input.value"])) == {"plan", "answer"}

    # What the engine did besides (the load, the batches) is in a project of its own, each with a kind and a status.
    elsewhere = _spans(phoenix, "wbtest-engine", len(engine))
    assert {s["context"]["span_id"] for s in elsewhere} == engine.keys()
    assert {(s["name"], s["span_kind"], s["status_code"]) for s in elsewhere} == {
        ("load tiny", "CHAIN", "OK"), ("batch tiny", "LLM", "OK")
    }

    # Phoenix's own columns, which it fills from those attributes: traces, token totals, the session.
    calls = [s.attributes for s in mine.values() if s.name == "text_completion tiny"]
    prompt = sum(int(a["gen_ai.usage.input_tokens"]) for a in calls)
    completion = sum(int(a["gen_ai.usage.output_tokens"]) for a in calls)
    projects = {p["node"]["name"]: p["node"] for p in _graphql(
        phoenix, "{ projects { edges { node { name traceCount tokenCountPrompt tokenCountCompletion } } } }"
    )["projects"]["edges"]}
    assert projects["wbtest"]["traceCount"] == len(runs)
    assert (projects["wbtest"]["tokenCountPrompt"], projects["wbtest"]["tokenCountCompletion"]) == (prompt, completion)
    assert projects["wbtest-engine"]["traceCount"] == len(engine)  # each load and batch a trace of its own
    (session,) = _get(f"{phoenix}/v1/projects/wbtest/sessions")["data"]
    assert session["session_id"] == "s1"
    assert sorted(t["trace_id"] for t in session["traces"]) == sorted(format(r.trace_id, "032x") for r in runs)
