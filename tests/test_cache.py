"""Caches and prefetch: the exact response cache (real SQLite), the prefix KV cache (the real tiny model), a map's
prefetch, and compare's cache arms."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from opentelemetry.trace import INVALID_SPAN

import workbench as wb
from workbench.chains.cache import CACHE_FILE, ResponseCache, response_key
from workbench.chains.spec import fixed_prefix, parse_spec
from workbench.engine.requests import GenerationParams, GenerationRequest
from workbench.errors import SpecError
from workbench.tracing import attributes as attr

from helpers import WAIT_S

LONG = ("You are a careful assistant that answers questions about geography, history and science in one short "
        "sentence, without any preamble, and never repeats the question. ")


def spec(cache: object = "exact", prompt: str = "Question: {{ question }}\nAnswer:", **hop: object) -> dict:
    return {"name": "qa", "hops": [{"name": "answer", "model": "tiny", "prompt": prompt, "max_new_tokens": 6,
                                    "cache": cache, **hop}]}


def model_calls(run: wb.Run) -> int:
    return sum(1 for s in run.trace.spans if s.name.startswith(attr.TEXT_COMPLETION))


def hop_span(run: wb.Run, hop: str = "answer"):
    return next(s for s in run.trace.spans if s.name == f"hop {hop}")


def served(bench: wb.Workbench) -> int:
    return int(bench.replicas("tiny")["served"].sum())


# -- the spec ------------------------------------------------------------------------------------


def test_spec_reads_cache_modes() -> None:
    assert parse_spec(spec("exact")).hops[0].cache.mode == "exact"
    assert parse_spec(spec("prefix")).hops[0].cache.mode == "prefix"
    assert parse_spec(spec(["exact", "prefix"])).hops[0].cache.mode == "exact+prefix"
    assert parse_spec(spec("off")).hops[0].cache.mode == "off"
    assert parse_spec("name: q\nhops:\n  - name: a\n    model: tiny\n    prompt: 'Q: {{ q }}'\n    cache: off\n"
                      ).hops[0].cache.mode == "off"  # YAML's unquoted off is false
    assert parse_spec(spec({"mode": "exact", "force": True}, temperature=0.7)).hops[0].cache.force


def test_a_sampling_hop_is_refused_exact_caching_unless_forced() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec("exact", temperature=0.7))
    assert caught.value.hop == "answer" and caught.value.field == "cache"
    assert "sampling" in str(caught.value) and "force: true" in str(caught.value)
    parse_spec(spec("prefix", temperature=0.7))  # a prefix cache changes no answer: sampling is fine


@pytest.mark.parametrize(
    ("cache", "prompt", "says"),
    [
        ("exactly", None, "did you mean 'exact'"),
        ({"mode": "exact", "forced": True}, None, "unknown field 'forced'"),
        ({"mode": "exact", "force": "yes"}, None, "cache.force must be true or false"),
        (["off", "exact"], None, "cannot be listed with other modes"),
        ("prefix", "{{ question }} is the question", "needs fixed text before"),
    ],
)
def test_bad_cache_settings_say_what_is_wrong(cache: object, prompt: str | None, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        parse_spec(spec(cache, **({"prompt": prompt} if prompt else {})))


def test_a_chat_hop_cannot_take_a_prefix_cache() -> None:
    raw = {"name": "qa", "hops": [{"name": "answer", "model": "tiny", "cache": "prefix",
                                   "messages": [{"role": "user", "content": "{{ q }}"}]}]}
    with pytest.raises(SpecError, match="chat hop"):
        parse_spec(raw)


def test_the_fixed_prefix_is_the_text_before_the_first_tag() -> None:
    hop = parse_spec(spec("prefix", prompt="Fixed text. {% if x %}x{% endif %}{{ question }}")).hops[0]
    assert fixed_prefix(hop.template) == "Fixed text. "


# -- the exact cache ------------------------------------------------------------------------------


def test_the_second_run_is_answered_from_the_cache_without_the_engine(loaded: wb.Workbench) -> None:
    chain = loaded.chain(spec("exact"))
    first = chain.run(question="What is the capital of France?")
    calls = served(loaded)
    second = chain.run(question="What is the capital of France?")
    assert second.output == first.output
    assert model_calls(first) == 1 and model_calls(second) == 0  # the engine was not called
    assert served(loaded) == calls
    assert hop_span(first).attributes[attr.CACHE_HIT] is False
    hit = hop_span(second).attributes
    assert hit[attr.CACHE_HIT] is True and hit[attr.CACHE_MODE] == "exact"
    assert hit[attr.CACHE_KEY] == hop_span(first).attributes[attr.CACHE_KEY]
    assert hit[attr.CACHE_SAVED_MS] > 0
    other = chain.run(question="What is the capital of Spain?")
    assert model_calls(other) == 1


def test_a_streamed_run_shows_a_cached_answer_as_one_piece(loaded: wb.Workbench) -> None:
    chain = loaded.chain(spec("exact"))
    first = chain.run(question="Why is the sky blue?")
    assert first.output  # a stream printing its token events showed nothing for a hop the cache answered
    events = list(chain.stream(question="Why is the sky blue?"))
    tokens = [e for e in events if isinstance(e, wb.Token)]
    assert [(t.hop, t.text, t.token_id) for t in tokens] == [("answer", first.output, -1)]
    assert model_calls(events[-1].run) == 0  # from the cache, not the model


def test_the_cache_outlives_the_workbench(tiny_path: Path, data_dir: Path) -> None:
    with wb.Workbench(data_dir=data_dir) as first:
        first.load("tiny", tiny_path, device="cpu")
        answer = first.chain(spec("exact")).run(question="Where is Lima?").output
    assert (data_dir / CACHE_FILE).is_file()
    with wb.Workbench(data_dir=data_dir) as second:
        second.load("tiny", tiny_path, device="cpu")
        run = second.chain(spec("exact")).run(question="Where is Lima?")
        assert run.output == answer and model_calls(run) == 0
        assert second.cache_stats().loc[0, "hits"] == 1


def test_a_hop_without_cache_calls_the_model_every_time(loaded: wb.Workbench) -> None:
    chain = loaded.chain(spec("off"))
    runs = [chain.run(question="Same question?") for _ in range(2)]
    assert [model_calls(r) for r in runs] == [1, 1]
    assert hop_span(runs[1]).attributes[attr.CACHE_MODE] == "off"
    assert attr.CACHE_HIT not in hop_span(runs[1]).attributes


def test_the_key_changes_with_every_parameter_prompt_and_model() -> None:
    identity = {"source": "/models/a", "revision": None, "fingerprint": "f1", "adapter": None}
    base = GenerationParams()
    keys = {
        response_key(identity, "prompt", None, base),
        response_key(identity, "prompt ", None, base),
        response_key(identity, "", [{"role": "user", "content": "prompt"}], base),
        response_key({**identity, "source": "/models/b"}, "prompt", None, base),
        response_key({**identity, "fingerprint": "f2"}, "prompt", None, base),
        response_key({**identity, "adapter": "/adapters/sql"}, "prompt", None, base),
        response_key(identity, "prompt", None, base, adapter="sql@v2"),
        *(response_key(identity, "prompt", None, GenerationParams(**{name: value}))
          for name, value in [("max_new_tokens", 33), ("temperature", 0.5), ("top_p", 0.9), ("top_k", 5),
                              ("seed", 1), ("truncate", "left")]),
    }
    assert len(keys) == 13
    assert response_key(identity, "prompt", None, base) == response_key(dict(identity), "prompt", None,
                                                                          GenerationParams())


def test_a_changed_max_new_tokens_misses(loaded: wb.Workbench) -> None:
    loaded.chain(spec("exact")).run(question="Why is the sky blue?")
    run = loaded.chain(spec("exact", max_new_tokens=7)).run(question="Why is the sky blue?")
    assert model_calls(run) == 1 and hop_span(run).attributes[attr.CACHE_HIT] is False


def test_a_new_model_version_misses(tiny_path: Path, tmp_path: Path, data_dir: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny_path, tmp_path / "tiny-copy"))
    with wb.Workbench(data_dir=data_dir) as bench:
        bench.load("tiny", copy, device="cpu")
        bench.chain(spec("exact")).run(question="Name a river.")
        config = copy / "config.json"
        config.write_text(config.read_text())  # a new version in place: same bytes, a new modification time
        os.utime(config, ns=(time.time_ns(), time.time_ns() + 10**9))
        bench.unload("tiny")
        bench.load("tiny", copy, device="cpu")
        run = bench.chain(spec("exact")).run(question="Name a river.")
        assert model_calls(run) == 1


def test_weights_rewritten_after_the_load_are_another_model_than_the_one_in_memory(
    tiny_path: Path, tmp_path: Path, data_dir: Path
) -> None:
    """A model loaded, its directory then rewritten (a training run saving its next checkpoint in place), then a cached
    hop: the answer of the weights in memory was stored under the new files' fingerprint, and the next kernel that
    loaded the new weights was answered from the cache with the old weights' answer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    copy = Path(shutil.copytree(tiny_path, tmp_path / "checkpoint"))
    with wb.Workbench(data_dir=data_dir) as bench:
        bench.load("tiny", copy, device="cpu")
        model = AutoModelForCausalLM.from_pretrained(copy)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std())
        model.save_pretrained(copy)  # the next version, in place; the old one still serves here
        old = bench.chain(spec("exact")).run(question="Name a river.")
    with wb.Workbench(data_dir=data_dir) as bench:
        bench.load("tiny", copy, device="cpu")
        new = bench.chain(spec("exact")).run(question="Name a river.")
        uncached = bench.chain(spec("off")).run(question="Name a river.")
    assert uncached.output != old.output  # the new weights answer otherwise
    assert model_calls(new) == 1 and new.output == uncached.output


def test_the_same_model_reloaded_in_another_dtype_misses(tiny_path: Path, data_dir: Path) -> None:
    with wb.Workbench(data_dir=data_dir) as bench:
        bench.load("tiny", tiny_path, device="cpu", dtype="float32")
        bench.chain(spec("exact")).run(question="Name a river.")
        bench.unload("tiny")
        bench.load("tiny", tiny_path, device="cpu", dtype="bfloat16")  # other numbers: not the float32 answer
        run = bench.chain(spec("exact")).run(question="Name a river.")
        assert model_calls(run) == 1 and hop_span(run).attributes[attr.CACHE_HIT] is False
        bench.unload("tiny")
        bench.load("tiny", tiny_path, device="cpu", dtype="float32")
        assert model_calls(bench.chain(spec("exact")).run(question="Name a river.")) == 0


def test_the_key_holds_the_dtype_and_device_auto_chose_not_the_word_auto(tiny_path: Path, data_dir: Path) -> None:
    # dtype="auto" is float32 on the CPU and bfloat16 on a GPU: keyed by the setting, a GPU load's run took the
    # CPU's float32 answer as its own. Keyed by what was chosen, auto and float32 on the CPU are one model.
    with wb.Workbench(data_dir=data_dir) as bench:
        bench.load("tiny", tiny_path, device="cpu")  # dtype auto
        assert {k: bench.engine.identity("tiny")[k] for k in ("device", "dtype")} == {"device": "cpu",
                                                                                      "dtype": "float32"}
        bench.chain(spec("exact")).run(question="Name a river.")
        bench.unload("tiny")
        bench.load("tiny", tiny_path, device="cpu", dtype="float32")
        assert model_calls(bench.chain(spec("exact")).run(question="Name a river.")) == 0


def test_a_hub_id_whose_revision_moved_to_another_commit_misses(tiny_path: Path, tmp_path: Path) -> None:
    # A hub id without a revision names whatever main pointed at when it loaded: keyed by the id alone, a load after
    # main moved on (a new commit downloaded into the hub cache) answered from the old weights' cache entries. Run
    # in a process of its own, whose hub cache (offline, as CI is) is laid out here the way huggingface_hub makes it.
    script = tmp_path / "hub.py"
    script.write_text(textwrap.dedent(f"""\
        import json, shutil
        from pathlib import Path
        import workbench as wb
        repo = Path({str(tmp_path / "hub" / "models--lab--tiny")!r})
        spec = {{"name": "qa", "hops": [{{"name": "answer", "model": "hub", "prompt": "Q: {{{{ question }}}}\\nA:",
                                        "max_new_tokens": 4, "cache": "exact"}}]}}
        calls = []
        with wb.Workbench(data_dir={str(tmp_path / "data")!r}) as bench:
            for commit in ("a" * 40, "a" * 40, "b" * 40):  # the same commit again, then main moves on
                shutil.copytree({str(tiny_path)!r}, repo / "snapshots" / commit, dirs_exist_ok=True)
                (repo / "refs").mkdir(parents=True, exist_ok=True)
                (repo / "refs" / "main").write_text(commit)
                bench.load("hub", "lab/tiny", device="cpu")
                run = bench.chain(spec).run(question="Name a river.")
                calls.append(sum(1 for s in run.trace.spans if s.name.startswith("text_completion")))
                bench.unload("hub", forget=True)
        print(json.dumps(calls))
    """))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[1, 0, 1]"  # called, a hit on the same commit, called again on the new one


def test_a_model_whose_weights_are_elsewhere_is_keyed_by_its_dtype_setting(tiny_path: Path) -> None:
    # A Ray model's LoadedModel has no dtype here (its weights are in its actors): its key takes the setting, so a
    # bfloat16 load and a float32 one do not share answers.
    from workbench.models.registry import LoadedModel
    from workbench.models.settings import LoadSettings

    def ray_model(dtype: str) -> LoadedModel:
        return LoadedModel(name="m", settings=LoadSettings(str(tiny_path), dtype=dtype, engine="ray"), model=None,
                           tokenizer=None, device="ray", dtype=None, params=None, memory_bytes=0, load_s=0.0,
                           context_window=None)

    assert ray_model("bfloat16").identity["dtype"] == "bfloat16"
    assert ray_model("float32").identity != ray_model("bfloat16").identity


class WeightsServer:
    """A real HTTP server on 127.0.0.1 that speaks enough of the OpenAI API for a remote model, as vLLM would with
    ``--served-model-name m``: it lists ``m`` with ``root``, the weights it loaded, and answers with their name."""

    def __init__(self, root: str, port: int = 0) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                # created: vLLM says the time of each answer, so it names no version of the weights.
                self._send(json.dumps({"object": "list", "data": [
                    {"id": "m", "object": "model", "root": root, "owned_by": "vllm", "created": time.time_ns(),
                     "max_model_len": 2048}]}).encode(), "application/json")

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["content-length"]))
                chunk = {"choices": [{"index": 0, "text": f" from {root}", "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 4, "completion_tokens": 2}}
                self._send(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode(), "text/event-stream")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_a_server_restarted_with_other_weights_under_the_same_name_misses(data_dir: Path) -> None:
    server = WeightsServer("/models/llama-a")
    try:
        with wb.Workbench(data_dir=data_dir) as bench:
            bench.load("tiny", server.url, served_model="m")
            first = bench.chain(spec("exact")).run(question="Name a sea.")
            assert first.output == "from /models/llama-a" and model_calls(first) == 1
            bench.unload("tiny")
            bench.load("tiny", server.url, served_model="m")  # the same server, the same weights: a hit
            assert model_calls(bench.chain(spec("exact")).run(question="Name a sea.")) == 0
            server.stop()
            server = WeightsServer("/models/llama-b", port=server.port)  # restarted: other weights, the same name
            bench.unload("tiny")
            bench.load("tiny", server.url, served_model="m")
            run = bench.chain(spec("exact")).run(question="Name a sea.")
            assert run.output == "from /models/llama-b" and model_calls(run) == 1
    finally:
        server.stop()


def test_a_model_that_loads_on_the_call_is_called_uncached_then_cached(tiny_path: Path, data_dir: Path) -> None:
    # Until it has loaded, where it runs and in what dtype are not known, so neither is its key.
    with wb.Workbench(data_dir=data_dir) as bench:
        bench.register("tiny", tiny_path, device="cpu")
        assert bench.engine.identity("tiny") is None
        first = bench.chain(spec("exact")).run(question="Name a lake.")
        assert model_calls(first) == 1 and attr.CACHE_HIT not in hop_span(first).attributes
        assert model_calls(bench.chain(spec("exact")).run(question="Name a lake.")) == 1  # a miss, now stored
        assert model_calls(bench.chain(spec("exact")).run(question="Name a lake.")) == 0


def test_a_damaged_cache_file_is_named_and_clear_cache_starts_a_new_one(tiny_path: Path, data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    damaged = b"not a database, whatever wrote it" * 100
    (data_dir / CACHE_FILE).write_bytes(damaged)
    with wb.Workbench(data_dir=data_dir) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        with pytest.raises(wb.HopFailed, match="not a database") as info:
            bench.chain(spec("exact")).run(question="Name a river.")
        assert "bench.clear_cache()" in str(info.value)
        assert bench.clear_cache() == 0
        assert (data_dir / f"{CACHE_FILE}.damaged").read_bytes() == damaged  # kept, not deleted
        bench.chain(spec("exact")).run(question="Name a river.")
        assert model_calls(bench.chain(spec("exact")).run(question="Name a river.")) == 0


@pytest.mark.parametrize("target", ["responses", "sqlite_autoindex_responses_1"])
def test_clear_cache_sets_aside_a_file_damaged_where_a_first_look_does_not_reach(
    tiny_path: Path, data_dir: Path, target: str
) -> None:
    # The damage check read one row, which SQLite answers from a small index: a damaged table or key index passed
    # it, and clear_cache(), the remedy every failed run's hint names, failed as they did.
    import sqlite3

    with wb.Workbench(data_dir=data_dir) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        bench.chain(spec("exact")).run(question="Name a river.")
    path = data_dir / CACHE_FILE
    with contextlib.closing(sqlite3.connect(path)) as connection:
        root = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (target,)).fetchone()[0]
        page = connection.execute("PRAGMA page_size").fetchone()[0]
    with path.open("r+b") as file:  # that b-tree's root page only, scribbled over
        file.seek((root - 1) * page)
        file.write(b"\xff" * page)
    with wb.Workbench(data_dir=data_dir) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        with pytest.raises(wb.HopFailed, match="malformed"):
            bench.chain(spec("exact")).run(question="Name a river.")
        assert bench.clear_cache() == 0
        assert (data_dir / f"{CACHE_FILE}.damaged").is_file()
        assert model_calls(bench.chain(spec("exact")).run(question="Name a river.")) == 1
        assert model_calls(bench.chain(spec("exact")).run(question="Name a river.")) == 0


def test_clear_cache_sets_aside_a_file_a_newer_workbench_wrote(tiny_path: Path, data_dir: Path) -> None:
    import sqlite3

    data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(data_dir / CACHE_FILE)) as connection:
        connection.execute("PRAGMA user_version = 99")
    with wb.Workbench(data_dir=data_dir) as bench:
        bench.load("tiny", tiny_path, device="cpu")
        with pytest.raises(wb.HopFailed, match="schema version 99, newer") as info:
            bench.chain(spec("exact")).run(question="Name a river.")
        assert "bench.clear_cache()" in str(info.value.hint)
        assert bench.clear_cache() == 0  # it raised the same error
        assert (data_dir / f"{CACHE_FILE}.newer").is_file()
        assert model_calls(bench.chain(spec("exact")).run(question="Name a river.")) == 1


def test_a_cache_file_deleted_from_outside_answers_nothing_more(loaded: wb.Workbench, data_dir: Path) -> None:
    """rm cache.sqlite3 (or the data directory) from a shell while the kernel runs: the open connection went on
    answering hits from the deleted file, and kept new answers where no one could read them again."""
    chain = loaded.chain(spec("exact"))
    chain.run(question="Name a river.")
    assert model_calls(chain.run(question="Name a river.")) == 0
    for suffix in ("", "-wal", "-shm"):
        Path(f"{data_dir / CACHE_FILE}{suffix}").unlink(missing_ok=True)
    assert model_calls(chain.run(question="Name a river.")) == 1
    assert (data_dir / CACHE_FILE).is_file() and loaded.cache.entries() == 1


def test_a_forced_sampling_hop_is_cached(loaded: wb.Workbench) -> None:
    chain = loaded.chain(spec({"mode": "exact", "force": True}, temperature=0.9, seed=3))
    first = chain.run(question="Say something.")
    second = chain.run(question="Say something.")
    assert second.output == first.output and model_calls(second) == 0


def test_cache_stats_and_clear(loaded: wb.Workbench) -> None:
    chain = loaded.chain(spec("exact"))
    for question in ["A?", "B?", "A?", "A?"]:
        chain.run(question=question)
    stats = loaded.cache_stats()
    assert list(stats.columns) == ["hop", "model", "hits", "misses", "hit_rate", "entries", "bytes", "saved_s"]
    row = stats.iloc[0]
    assert (row["hop"], row["model"], row["hits"], row["misses"], row["entries"]) == ("answer", "tiny", 2, 2, 2)
    assert row["hit_rate"] == pytest.approx(0.5) and row["bytes"] > 0 and row["saved_s"] > 0
    assert loaded.clear_cache() == 2
    assert loaded.cache_stats().empty
    assert model_calls(chain.run(question="A?")) == 1


def test_clearing_one_chains_answers_keeps_the_counts_of_the_others(loaded: wb.Workbench) -> None:
    # Before, clear_cache(chain="qa") dropped every hop's hits and misses, the other chain's too.
    qa = loaded.chain(spec("exact"))
    notes = loaded.chain({"name": "notes", "hops": [{"name": "summary", "model": "tiny", "prompt": "Note: {{ text }}",
                                                     "max_new_tokens": 4, "cache": "exact"}]})
    for _ in range(2):
        qa.run(question="Where is Oslo?")
        notes.run(text="Oslo is in Norway.")
    assert loaded.clear_cache(chain="qa") == 1
    stats = loaded.cache_stats()
    assert stats[["hop", "hits", "misses", "entries"]].values.tolist() == [["summary", 1, 1, 1]]


def test_the_same_call_made_by_runs_at_once_calls_the_model_once(loaded: wb.Workbench) -> None:
    # The README's "each question twice: the second is a hit", mapped at concurrency 8: both copies of a question
    # started together, both missed and both called the model. The second now waits for the first's answer.
    chain = loaded.chain(spec("exact", prompt="Q (together): {{ question }}\nA:"))
    questions = ["Where is Lima?", "Why is the sea salty?", "Who wrote Faust?"]
    calls = served(loaded)
    runs = chain.map([{"question": q} for q in questions * 2], concurrency=8)
    assert [run.output for run in runs[3:]] == [run.output for run in runs[:3]]
    assert served(loaded) - calls == 3  # one model call per question
    assert sorted(model_calls(run) for run in runs) == [0, 0, 0, 1, 1, 1]
    shared = [hop_span(run).attributes for run in runs if model_calls(run) == 0]
    assert all(a[attr.CACHE_HIT] is True and a[attr.CACHE_SHARED] is True and a[attr.CACHE_SAVED_MS] > 0
               for a in shared)
    stats = loaded.cache_stats().set_index("hop").loc["answer"]
    assert (stats["hits"], stats["misses"]) == (3, 3)


def test_a_run_waiting_for_the_same_call_calls_the_model_itself_when_that_call_fails(loaded: wb.Workbench) -> None:
    # Two chains with one hop alike but for its timeout: the first's call (slowed past its 0.1 s timeout) fails,
    # and the second, waiting for that answer, must not fail with it nor wait for good: it calls the model itself.
    prompt = "Q (alone): {{ question }}\nA:"
    hasty = loaded.chain({**spec("exact", prompt=prompt, timeout_s=0.1), "name": "hasty"})
    patient = loaded.chain({**spec("exact", prompt=prompt), "name": "patient"})
    loaded.inject("tiny", latency_ms=400)
    failed: list[wb.Run] = []
    first = threading.Thread(target=lambda: failed.append(hasty.map([{"question": "Where is Lima?"}])[0]))
    first.start()
    time.sleep(0.05)  # the first call is made, and is slow
    run = patient.run(question="Where is Lima?")
    first.join(WAIT_S)
    assert isinstance(failed[0].error.cause, wb.HopTimeout)
    assert run.ok and model_calls(run) == 1 and hop_span(run).attributes[attr.CACHE_HIT] is False
    loaded.inject("tiny")
    assert model_calls(patient.run(question="Where is Lima?")) == 0  # its answer was stored


def test_eviction_keeps_the_most_recently_used(loaded: wb.Workbench) -> None:
    loaded.set_cache_limits(max_entries=2)
    chain = loaded.chain(spec("exact"))
    chain.run(question="one?")
    chain.run(question="two?")
    chain.run(question="one?")  # a hit: "one" is now the most recently used
    chain.run(question="three?")  # a third entry: "two" goes
    assert loaded.cache.entries() == 2
    assert model_calls(chain.run(question="one?")) == 0
    assert model_calls(chain.run(question="two?")) == 1


def test_eviction_by_bytes(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / CACHE_FILE, max_bytes=2_000)
    for index in range(10):
        cache.put(f"key{index}", "c", "h", "m", "x" * 500, 1, 1.0)
    assert cache.bytes() <= 2_000 and cache.entries() == 3
    assert cache.get("key9", "h", "m") is not None and cache.get("key0", "h", "m") is None
    with pytest.raises(wb.WorkbenchError, match="whole number"):
        cache.set_limits(max_entries=0)
    cache.close()


def test_a_kill_mid_write_leaves_the_cache_readable(tmp_path: Path) -> None:
    path = tmp_path / CACHE_FILE
    writer = textwrap.dedent(f"""
        import sys
        from workbench.chains.cache import ResponseCache
        cache = ResponseCache({str(path)!r}, max_entries=500)
        i = 0
        while True:
            cache.put(f"key{{i}}", "c", "h", "m", "answer " * 200 + str(i), 3, 1.0)
            if i == 50:
                print("writing", flush=True)
            i += 1
    """)
    child = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(wb.__file__).parent.parent)})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "writing"
        time.sleep(0.3)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    cache = ResponseCache(path)
    count = cache.entries()
    assert 50 <= count <= 500
    for index in (0, count // 2):  # every entry is whole: written in one transaction each
        found = cache.get(f"key{index}", "h", "m")
        if found is not None:
            assert found.text.endswith(str(index))
    cache.put("after", "c", "h", "m", "still writable", 1, 1.0)
    assert cache.get("after", "h", "m").text == "still writable"  # type: ignore[union-attr]
    cache.close()


def test_a_read_only_cache_file_says_it_is_read_only_and_what_to_do(tmp_path: Path) -> None:
    # Before: "cannot open the response cache ...: attempt to write a readonly database", hint only data_dir=...
    cache = ResponseCache(tmp_path / CACHE_FILE)
    cache.put("k", "c", "h", "m", "kept", 1, 1.0)
    cache.close()
    shared = Path(tempfile.mkdtemp(prefix="autoglm-read-only-"))  # in /tmp, which nobody may pass through
    copy = shared / CACHE_FILE
    try:
        shared.chmod(0o755)
        shutil.copyfile(tmp_path / CACHE_FILE, copy)
        copy.chmod(0o444)
        user = textwrap.dedent(f"""
            import os
            from workbench.chains.cache import ResponseCache
            from workbench.errors import StoreError
            if os.geteuid() == 0:  # root may write any file: be nobody, whom the file keeps out
                os.setgid(65534)
                os.setuid(65534)
            cache = ResponseCache({str(copy)!r})
            for use in (lambda: cache.get("k", "h", "m"), lambda: cache.put("k2", "c", "h", "m", "t", 1, 1.0)):
                try:
                    use()
                except StoreError as exc:
                    print(exc.message, "|", exc.hint)
        """)
        done = subprocess.run([sys.executable, "-c", user], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(Path(wb.__file__).parent.parent)})
    finally:
        shutil.rmtree(shared)
    assert done.returncode == 0, done.stderr
    refusals = done.stdout.splitlines()
    assert len(refusals) == 2
    for refusal in refusals:
        message, hint = refusal.split(" | ")
        assert message.startswith(f"the response cache {str(copy)!r} is read-only here")
        assert "writable for this user" in hint and "Workbench(data_dir=...)" in hint


def test_a_cache_another_process_holds_locked_still_answers_hits_and_model_calls(loaded: wb.Workbench,
                                                                                 tmp_path: Path) -> None:
    """The cache is bookkeeping: when another process holds its file locked for long (a second kernel's clear, an
    open sqlite3 shell; a full disk fails the same way), a hit is still answered from it, and an answer the model
    made and the cache could not keep is still the hop's answer, with a warning. Both failed the hop; and with the
    busy timeout a cache opens with (30 s), each waited that long for the lock first."""
    path = tmp_path / CACHE_FILE
    loaded.use_cache(ResponseCache(path))
    chain = loaded.chain(spec("exact"))
    stored = chain.run(question="Name a river.")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, time
        connection = sqlite3.connect({str(path)!r}, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        hit = chain.run(question="Name a river.")
        assert hit.output == stored.output and model_calls(hit) == 0
        with pytest.warns(RuntimeWarning, match="could not keep"):
            fresh = chain.run(question="Name a lake.")
        assert model_calls(fresh) == 1 and fresh.output
        # A behaviour bound, not a speed one: neither run waited out the 30 s busy timeout for the lock.
        assert time.monotonic() - started < 30
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert model_calls(chain.run(question="Name a lake.")) == 1  # not kept: the model answers it again


# -- the prefix cache -----------------------------------------------------------------------------


def _requests(bench: wb.Workbench, prompts: list[str], prefix: str | None) -> list[GenerationRequest]:
    backend = bench.engine.worker("tiny").backend
    requests = []
    for ids in backend.tokenize(prompts):
        count = 0
        if prefix is not None:
            prefix_ids = backend.tokenize([prefix])[0][:-1]  # as the engine does: the last token may merge
            while count < min(len(prefix_ids), len(ids) - 1) and ids[count] == prefix_ids[count]:
                count += 1
        requests.append(GenerationRequest("tiny", ids, GenerationParams(max_new_tokens=12), INVALID_SPAN,
                                          prefix_len=count))
    return requests


@pytest.mark.parametrize("questions", [
    ["What is the capital of France?"],
    ["Hi?", "What is the tallest mountain on Earth and where is it?", "Why?"],  # suffixes of different lengths
])
def test_prefix_cache_output_equals_no_cache_output_token_for_token(loaded: wb.Workbench, questions: list[str]) -> None:
    backend = loaded.engine.worker("tiny").backend
    prompts = [f"{LONG}Question: {q}\nAnswer:" for q in questions]
    plain, _ = backend.generate(_requests(loaded, prompts, None))
    cold, _ = backend.generate(_requests(loaded, prompts, LONG))  # prefills the prefix
    # What the model's first forward of a batch is given: the whole prompt, or the part after the prefix.
    widths: list[int] = []
    embeddings = loaded.registry.get("tiny").model.get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda module, args, output: widths.append(args[0].shape[1]))
    try:
        warm, timing = backend.generate(_requests(loaded, prompts, LONG))  # reuses it
    finally:
        hook.remove()
    assert [r.token_ids for r in cold] == [r.token_ids for r in plain]
    assert [r.token_ids for r in warm] == [r.token_ids for r in plain]
    assert all(r.prefix_tokens > 20 and r.prefix_saved_ms > 0 for r in warm)
    assert widths[0] == timing.padded_len - warm[0].prefix_tokens  # the prefix was not prefilled again
    assert all(r.prefix_tokens == 0 for r in cold)
    assert timing.size == len(questions)


def test_a_batch_whose_requests_do_not_share_a_prefix_runs_plain(loaded: wb.Workbench) -> None:
    backend = loaded.engine.worker("tiny").backend
    prompts = [f"{LONG}Question: Why?\nAnswer:", "Another text entirely: why?"]
    mixed = _requests(loaded, prompts[:1], LONG) + _requests(loaded, prompts[1:], "Another text")
    plain, _ = backend.generate(_requests(loaded, prompts, None))
    results, _ = backend.generate(mixed)
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]
    assert all(r.prefix_tokens == 0 for r in results)


def test_a_prefix_hop_matches_the_uncached_chain_under_batching(tiny_path: Path, data_dir: Path) -> None:
    questions = [{"question": q} for q in ["Hi?", "What is the tallest mountain on Earth?", "Why is snow white?",
                                           "Name a planet.", "Where is the longest river in Africa and Asia?"]]
    prompt = LONG + "Question: {{ question }}\nAnswer:"
    with wb.Workbench(data_dir=data_dir) as bench:
        bench.load("tiny", tiny_path, device="cpu", batching=wb.StaticBatching(size=5, timeout_ms=2000))
        plain = bench.chain(spec("off", prompt=prompt)).map(questions, concurrency=5)
        cached = bench.chain(spec("prefix", prompt=prompt)).map(questions, concurrency=5)
        again = bench.chain(spec("prefix", prompt=prompt)).map(questions, concurrency=5)
        assert [r.output for r in cached] == [r.output for r in plain]
        assert [r.output for r in again] == [r.output for r in plain]
        requests = [s for run in again for s in run.trace.spans if s.name.startswith(attr.TEXT_COMPLETION)]
        assert {s.attributes[attr.BATCH_SIZE] for s in requests} == {5}
        assert all(s.attributes[attr.PREFIX_TOKENS] > 20 for s in requests)
        hop = hop_span(again[0]).attributes
        assert hop[attr.CACHE_MODE] == "prefix" and hop[attr.PREFIX_TOKENS] > 20 and hop[attr.PREFIX_SAVED_MS] > 0
        table = bench.prefix_cache_stats()
        assert len(table) == 1 and table.loc[0, "uses"] >= 1 and table.loc[0, "bytes"] > 0


def test_exact_and_prefix_together(loaded: wb.Workbench) -> None:
    chain = loaded.chain(spec(["exact", "prefix"], prompt=LONG + "Q: {{ question }}\nA:"))
    first = chain.run(question="Where is Oslo?")
    second = chain.run(question="Where is Bergen?")
    third = chain.run(question="Where is Oslo?")
    assert model_calls(third) == 0 and third.output == first.output
    assert hop_span(second).attributes[attr.PREFIX_TOKENS] > 20


# -- prefetch ---------------------------------------------------------------------------------------


def test_a_prefetching_map_answers_as_a_plain_one(loaded: wb.Workbench) -> None:
    chain = loaded.chain(spec("prefix", prompt=LONG + "Q: {{ question }}\nA:"))
    questions = [{"question": f"What is {n} plus {n}?"} for n in range(8)]
    plain = chain.map(questions, concurrency=2)
    ahead = chain.map(questions, concurrency=2, prefetch=True)
    assert [r.output for r in ahead] == [r.output for r in plain]
    prepared = [s for run in ahead for s in run.trace.spans
                if s.name.startswith(attr.TEXT_COMPLETION) and s.attributes.get(attr.PREFETCHED)]
    assert prepared  # later inputs were tokenized ahead and their request found them ready
    assert not any(s.attributes.get(attr.PREFETCHED) for run in plain for s in run.trace.spans)


# -- compare ---------------------------------------------------------------------------------------


def test_compare_measures_cache_arms_side_by_side(loaded: wb.Workbench) -> None:
    chain = loaded.chain(spec("off", prompt=LONG + "Q: {{ question }}\nA:"))
    inputs = [{"question": q} for q in ["A?", "B?", "A?", "C?", "A?", "B?"]]  # half are repeats; one at a time, so each repeat finds its first copy stored (at 2, one in flight misses)
    result = wb.compare(chain, inputs, cache=["off", "exact", "prefix"], concurrency=1, repeats=1, warmup=0,
                        progress=False)
    table = result.table().set_index("cache")
    assert list(table.index) == ["off", "exact", "prefix"]
    assert table.loc["off", "cache_hit_rate"] == 0 and table.loc["prefix", "cache_hit_rate"] == 0
    assert table.loc["exact", "cache_hit_rate"] == pytest.approx(0.5)
    assert table.loc["prefix", "prefix_tokens_reused"] > 0 and table.loc["off", "prefix_tokens_reused"] == 0
    assert (table["n"] == 6).all()
    shown = result.readable()
    assert shown.column("cache") == ["off", "exact", "prefix"] and "cache_hit_rate" in shown.to_html()
    with pytest.raises(wb.WorkbenchError, match="cache"):
        wb.compare(chain, inputs, cache=["exactly"], repeats=1, progress=False)


def test_compare_counts_the_tokens_an_exact_hit_delivers_as_output(loaded: wb.Workbench) -> None:
    """An exact hit calls no model, and output_tokens_per_s counted only model calls: an arm answering every measured
    run from the cache read 0 tokens/s, the slowest of all, while its requests/s was the highest."""
    chain = loaded.chain(spec("off"))
    inputs = [{"question": "Same?"}] * 4
    result = wb.compare(chain, inputs, cache=["off", "exact"], concurrency=1, repeats=1, warmup=0, progress=False)
    passes = result.passes().set_index("cache")
    assert result.table().set_index("cache").loc["exact", "cache_hit_rate"] == pytest.approx(0.75)
    # The same answer four times in both arms: the same tokens delivered, over each arm's own wall time.
    for arm in ("off", "exact"):
        delivered = passes.loc[arm, "output_tokens_per_s"] * passes.loc[arm, "wall_s"]
        assert delivered == pytest.approx(passes.loc["off", "output_tokens_per_s"] * passes.loc["off", "wall_s"])
    assert delivered > 0
    hits = loaded.traces().table().query("`attributes.workbench.cache.hit` == True")
    assert len(hits) >= 3 and (hits["attributes.workbench.cache.tokens_out"] > 0).all()


def test_compare_keeps_the_warm_up_runs_answers_out_of_the_measured_runs_cache(loaded: wb.Workbench) -> None:
    """The warm-up runs are the first inputs again, and they filled the pass's scratch cache: with the default one
    warm-up, four distinct inputs showed an exact hit rate of 25%, and with as many warm-up runs as inputs 100%, every
    measured run answered from the warm-up's answers (no model call, throughput 15x)."""
    chain = loaded.chain(spec("off"))
    inputs = [{"question": f"Question {i}?"} for i in range(4)]
    result = wb.compare(chain, inputs, cache=["off", "exact"], concurrency=1, repeats=1, warmup=len(inputs),
                        progress=False)
    table = result.table().set_index("cache")
    assert table.loc["exact", "cache_hit_rate"] == 0  # no input repeats within the measured runs
    assert (table["ttft_n"] == len(inputs)).all()  # every measured run called the model
    assert loaded.cache.entries() == 0


def test_compare_counts_a_passs_own_prefix_kv_not_one_left_by_an_earlier_pass(loaded: wb.Workbench) -> None:
    """The second repeat runs 'off' after 'prefix' (the order rotates): 'off' left the prefix arm's KV where it was and
    reported it as its own prefix_kv_mb, so the table said the arm that caches nothing held as much as the one that
    does."""
    chain = loaded.chain(spec("off", prompt=LONG + "Q: {{ question }}\nA:"))
    loaded.chain(spec("prefix", prompt="Another chain's long and fixed preamble. Q: {{ question }}\nA:")).run(
        question="Q?")  # prefix KV of the user's own, held before the comparison
    inputs = [{"question": f"Q{i}?"} for i in range(3)]
    result = wb.compare(chain, inputs, cache=["off", "prefix"], concurrency=1, repeats=2, warmup=0, progress=False)
    passes = result.passes()
    assert passes[["cache", "repeat"]].values.tolist() == [["off", 0], ["prefix", 0], ["prefix", 1], ["off", 1]]
    assert (passes.loc[passes["cache"] == "off", "prefix_kv_mb"] == 0).all()
    held = passes.loc[passes["cache"] == "prefix", "prefix_kv_mb"]
    assert (held > 0).all() and held.nunique() == 1  # the same prompts build the same KV in every pass
    assert result.table().set_index("cache").loc["off", "prefix_kv_mb"] == 0


def test_compare_without_cache_arms_runs_every_pass_of_a_cached_chain_cold(loaded: wb.Workbench) -> None:
    """Batching compared on a chain whose hop has cache: exact: the first pass filled the user's cache and every later
    pass was answered from it, so the policy that ran later looked 3x faster, with no TTFT at all (no model call)."""
    chain = loaded.chain(spec("exact"))
    inputs = [{"question": f"Question {i}?"} for i in range(4)]
    result = wb.compare(chain, inputs, batching=["none", "static:4"], concurrency=4, repeats=2, warmup=0,
                        progress=False)
    table = result.table().set_index("batching")
    assert (table["ttft_n"] == 8).all()  # every run of every pass called the model
    assert (table["cache_hit_rate"] == 0).all()
    assert loaded.cache.entries() == 0  # the user's stored answers are neither read nor added to


def test_the_compare_magic_takes_cache_arms() -> None:
    from workbench.errors import ParseError
    from workbench.fronts.notebook.parsers import CompareCommand, parse_command

    command = parse_command("compare qa --inputs q.jsonl --cache off,exact,prefix")
    assert isinstance(command, CompareCommand) and command.cache == ("off", "exact", "prefix")
    with pytest.raises(ParseError, match="'exactly' is not a cache arm"):
        parse_command("compare qa --inputs q.jsonl --cache off,exactly")


def test_the_prefix_cache_keeps_within_its_byte_budget(loaded: wb.Workbench) -> None:
    from workbench.engine.backends.prefix_cache import PrefixCache

    model = loaded.registry.get("tiny").model
    backend = loaded.engine.worker("tiny").backend
    prefixes = [backend.tokenize([f"{LONG} Variant {i}."])[0] for i in range(3)]
    one = PrefixCache(model, "cpu").get(prefixes[0])[0].bytes
    cache = PrefixCache(model, "cpu", max_bytes=int(2.5 * one))
    for ids in prefixes:
        cache.get(ids)
    assert len(cache.rows()) == 2 and cache.bytes <= cache.max_bytes  # the oldest went for the third
    assert cache.get(prefixes[2])[1] and not cache.get(prefixes[0])[1]  # newest kept, oldest prefilled again
    lone = PrefixCache(model, "cpu", max_bytes=one // 2)
    entry, hit = lone.get(prefixes[0])
    assert not hit and entry.layers and len(lone.rows()) == 1  # alone past the budget, kept for its batch
    lone.clear()
    assert lone.bytes == 0


def test_eviction_counts_and_sums_the_cache_from_an_index_not_every_answers_text(tmp_path: Path) -> None:
    # Each put counted and summed the whole table, every answer's text with it: 25 ms a put at 100,000 entries, 6 ms
    # with the index. A cache file made before the index gets it when it is opened.
    path = tmp_path / "cache.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, chain TEXT NOT NULL, hop TEXT NOT NULL, model TEXT "
                    "NOT NULL, text TEXT NOT NULL, tokens_out INTEGER NOT NULL, bytes INTEGER NOT NULL, cost_ms REAL NOT "
                    "NULL, created_at REAL NOT NULL, used_at REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0)")
        old.commit()
    cache = ResponseCache(path)
    cache.put("k", "chain", "hop", "model", "an answer", 2, 1.0)
    with contextlib.closing(sqlite3.connect(path)) as connection:
        plan = " ".join(row[-1] for row in connection.execute(
            "EXPLAIN QUERY PLAN SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM responses"))
    assert "COVERING INDEX responses_by_size" in plan, plan
    assert cache.get("k", "hop", "model") is not None
