"""A replica set that mixes kinds: two replicas of the tiny model in this process and one on a real `transformers serve`."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import workbench as wb
from workbench.engine import engine as engine_module
from workbench.errors import RemoteError
from workbench.tracing import attributes as attr

from helpers import Server, eventually, free_port

PROMPTS = ["Question: What is the capital of France?\nAnswer:", "The sea is", "Plan:"]
REPLICAS = ["m#0", "m#1", "m#2"]


def one_hop(model: str = "m") -> dict[str, object]:
    return {"name": f"on-{model}", "output": "answer",
            "hops": [{"name": "answer", "model": model, "prompt": "{{ prompt }}", "max_new_tokens": 12}]}


@pytest.fixture(scope="module")
def mixed(server: Server, tiny_path: Path) -> Iterator[wb.Workbench]:
    """'m' served by two CPU replicas (sharing the tiny model's weights) and the same model on the server."""
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("m", tiny_path, replicas=["cpu", "cpu", server.url])
        yield bench


@pytest.fixture
def bench(mixed: wb.Workbench) -> Iterator[wb.Workbench]:
    """The shared workbench, round robin, fresh breakers, no faults."""
    mixed.set_balance("m", "round_robin")
    mixed.set_breaker("m", failure_threshold=5, reset_timeout_s=5)
    yield mixed
    mixed.clear_faults()


def request_span(run: wb.Run) -> dict[str, object]:
    (span,) = [s for s in run.trace.spans if s.name.startswith(attr.TEXT_COMPLETION)]
    return dict(span.attributes or {})


def served_by(run: wb.Run) -> str:
    return str(request_span(run)[attr.REPLICA])


def attempt(chain: wb.Chain, **inputs: str) -> wb.Run:
    """Run ``chain`` once; a failed run is returned too (its trace says which replica failed it)."""
    try:
        return chain.run(**inputs)
    except wb.HopFailed as exc:
        return exc.run  # type: ignore[return-value]


def test_every_replica_writes_the_same_greedy_text_whichever_kind_serves(bench: wb.Workbench) -> None:
    for prompt in PROMPTS:
        texts = {replica: bench.generate(replica, prompt, max_new_tokens=12).text for replica in REPLICAS}
        assert len(set(texts.values())) == 1 and texts["m#2"], texts
    chain = bench.chain(one_hop())
    runs = [chain.run(prompt=PROMPTS[0]) for _ in range(3)]
    assert sorted(served_by(run) for run in runs) == REPLICAS
    assert len({run.output for run in runs}) == 1


def test_round_robin_spreads_requests_over_local_and_remote_replicas(bench: wb.Workbench, server: Server) -> None:
    chain = bench.chain(one_hop())
    runs = chain.map([{"prompt": p} for p in PROMPTS * 2], concurrency=1)
    assert Counter(served_by(run) for run in runs.finished) == {"m#0": 2, "m#1": 2, "m#2": 2}
    spans = {served_by(run): request_span(run) for run in runs.finished}
    assert spans["m#2"][attr.MODEL_DEVICE] == "remote"
    assert str(spans["m#2"][attr.REMOTE_URL]).startswith(server.url)  # the request went to the server
    assert spans["m#0"][attr.MODEL_DEVICE] == "cpu" and attr.REMOTE_URL not in spans["m#0"]
    assert {span[attr.BALANCE_POLICY] for span in spans.values()} == {"round_robin"}
    batches = {s.name for s in bench.traces().spans if s.name.startswith("batch m#")}
    assert batches == {"batch m#0", "batch m#1", "batch m#2"}


def test_replicas_table_shows_each_replicas_kind_and_where_it_runs(bench: wb.Workbench, server: Server) -> None:
    before = bench.replicas("m").set_index("replica")["served"]
    chain = bench.chain(one_hop())
    for _ in range(3):
        chain.run(prompt=PROMPTS[1])
    table = bench.replicas("m").set_index("replica")
    assert list(table.index) == REPLICAS
    assert table["kind"].tolist() == ["local", "local", "remote"]
    assert table["device"].tolist() == ["cpu", "cpu", "remote"]
    assert table["url"].isna().tolist() == [True, True, False] and table.loc["m#2", "url"] == server.url
    assert (table["served"] - before).tolist() == [1, 1, 1]
    row = bench.models().set_index("name").loc["m"]
    assert (row["replicas"], row["device"]) == (3, "cpu")  # the weights are on the CPU; one replica is elsewhere
    assert sorted(bench.breakers()["model"]) == REPLICAS
    assert bench.check_health("m").set_index("name")["health"].to_dict() == dict.fromkeys(REPLICAS, "healthy")


def test_errors_injected_on_the_remote_replica_open_its_breaker_and_the_local_ones_serve(bench: wb.Workbench) -> None:
    bench.set_breaker("m", failure_threshold=2, reset_timeout_s=2)  # long enough for the runs below to skip it
    bench.inject("m#2", error_rate=1.0, seed=0)
    chain = bench.chain(one_hop())
    runs = [attempt(chain, prompt=PROMPTS[2]) for _ in range(6)]
    assert [served_by(run) for run in runs if not run.ok] == ["m#2", "m#2"]  # two failures in a row open it
    assert bench.breakers().set_index("model").loc["m#2", "state"] == "open"
    later = [chain.run(prompt=PROMPTS[2]) for _ in range(4)]
    assert {served_by(run) for run in later} == {"m#0", "m#1"}  # skipped, so nothing fails
    bench.clear_faults("m#2")
    eventually(lambda: served_by(chain.run(prompt=PROMPTS[2])) == "m#2", "the server replica to serve again")
    assert bench.breakers().set_index("model").loc["m#2", "state"] == "closed"


def test_least_loaded_sends_less_to_the_replica_slowed_by_faults(bench: wb.Workbench) -> None:
    bench.inject("m#2", latency_ms=300)
    bench.set_balance("m", "least_loaded")
    batch = bench.chain(one_hop()).map([{"prompt": PROMPTS[1]}] * 9, concurrency=3)
    counts = Counter(served_by(run) for run in batch.finished)
    assert sum(counts.values()) == 9
    assert counts["m#2"] < min(counts["m#0"], counts["m#1"]), counts


def test_a_stalled_server_opens_its_replicas_breaker_and_the_local_one_serves_on(
    server: Server, tiny_path: Path
) -> None:
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("k", tiny_path, replicas=["cpu", server.url], read_timeout_s=1.0)
        bench.set_breaker("k", failure_threshold=1, reset_timeout_s=3)  # no trial while it is paused
        chain = bench.chain(one_hop("k"))
        with server.paused():  # the server takes the connection and sends nothing
            runs = [attempt(chain, prompt=PROMPTS[0]) for _ in range(2)]
            (failed,) = [run for run in runs if not run.ok]
            assert served_by(failed) == "k#1"
            error = failed.error.cause  # type: ignore[union-attr]
            assert isinstance(error, RemoteError) and error.kind == "no_first_byte"
            assert bench.breakers().set_index("model").loc["k#1", "state"] == "open"
            later = [chain.run(prompt=PROMPTS[0]) for _ in range(3)]
            assert {served_by(run) for run in later} == {"k#0"}
        eventually(lambda: served_by(attempt(chain, prompt=PROMPTS[0])) == "k#1" and
                   bench.breakers().set_index("model").loc["k#1", "state"] == "closed",
                   "the resumed server to serve again")


def test_a_model_on_a_server_lists_its_servers_and_batches_continuously(bench: wb.Workbench, server: Server) -> None:
    bench.load("r", server.url, replicas=[server.url, server.url], balance="least_loaded")
    try:
        assert bench.replicas("r")["kind"].tolist() == ["remote", "remote"]
        bench.set_batching("r", wb.ContinuousBatching(8))  # no weights here, so none shared between replicas
        texts = {bench.generate(replica, PROMPTS[0], max_new_tokens=12).text for replica in ("r#0", "r#1")}
        assert texts == {bench.generate("m#0", PROMPTS[0], max_new_tokens=12).text}
    finally:
        bench.unload("r", forget=True)


def test_a_registered_mixed_set_connects_its_server_replica_on_first_use(server: Server, tiny_path: Path) -> None:
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.register("lazy", tiny_path, replicas=["cpu", server.url])
        result = bench.generate("lazy#1", PROMPTS[1], max_new_tokens=12)  # loads on use, with its replicas
        assert result.text == bench.generate("lazy#0", PROMPTS[1], max_new_tokens=12).text
        (load,) = [s for s in bench.traces().spans if s.name == "load lazy#1"]  # connecting to the server
        assert load.attributes[attr.LOAD_TRIGGER] == "on_use"
        assert load.attributes[attr.MODEL_DEVICE] == "remote"
        assert bench.replicas("lazy")["kind"].tolist() == ["local", "remote"]


def test_until_a_policy_is_chosen_each_kind_of_replica_batches_its_own_way(server: Server, tiny_path: Path) -> None:
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("m", tiny_path, replicas=["cpu", server.url])
        assert bench.replicas("m")["batching"].tolist() == ["none", "continuous:64"]
        runs = bench.chain(one_hop()).map([{"prompt": p} for p in PROMPTS * 2], concurrency=6)
        assert [r.error for r in runs] == [None] * 6
        assert len({r.output for r in runs if r.inputs["prompt"] == PROMPTS[0]}) == 1  # same text from either kind
        bench.set_batching("m", wb.DynamicBatching(max_batch=4, max_wait_ms=5))  # chosen: every replica takes it
        assert bench.replicas("m")["batching"].tolist() == ["dynamic:4:5ms"] * 2
        assert bench.chain(one_hop()).run(prompt=PROMPTS[1]).error is None
        bench.unload("m")
        bench.load("m")  # loading the registered model again keeps the chosen policy
        assert bench.replicas("m")["batching"].tolist() == ["dynamic:4:5ms"] * 2
        bench.unload("m")
        bench.load("m", tiny_path, replicas=["cpu", server.url])  # a fresh load starts from the defaults
        assert bench.replicas("m")["batching"].tolist() == ["none", "continuous:64"]


def test_weights_in_a_child_process_may_have_a_server_replica_beside_them(server: Server, tiny_path: Path) -> None:
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("iso", tiny_path, replicas=["cpu", server.url], isolation="process")
        assert bench.replicas("iso")["kind"].tolist() == ["local", "remote"]
        texts = {bench.generate(replica, PROMPTS[0], max_new_tokens=12).text for replica in ("iso#0", "iso#1")}
        assert len(texts) == 1
        row = bench.models().set_index("name").loc["iso"]
        assert row["pid"] not in (None, os.getpid()) and row["restarts"] == 0  # the child's, not the server's
        with pytest.raises(wb.ModelLoadError, match="serves one replica: 2 were asked for") as info:
            bench.load("iso2", tiny_path, replicas=["cpu", "cpu", server.url], isolation="process")
        assert "servers may be listed beside it" in str(info.value.hint)


def test_a_bad_replica_entry_says_what_and_where(bench: wb.Workbench, tiny_path: Path) -> None:
    with pytest.raises(wb.SettingsError, match=r"'x': replicas\[1\] 'htp://127.0.0.1:8000/v1' is neither") as info:
        bench.load("x", tiny_path, replicas=["cpu", "htp://127.0.0.1:8000/v1"])
    assert "http://127.0.0.1:8000/v1" in str(info.value.hint)
    with pytest.raises(wb.SettingsError, match=r"replicas\[1\] 'http:///v1' names no host"):
        bench.load("x", tiny_path, replicas=["cpu", "http:///v1"])
    with pytest.raises(wb.SettingsError, match="only servers") as only:
        bench.load("x", tiny_path, replicas=["http://127.0.0.1:8000/v1"])
    assert 'replicas=["cpu", URL]' in str(only.value.hint)
    with pytest.raises(wb.SettingsError, match="loads from a server, so it has no weights here"):
        bench.load("x", "http://127.0.0.1:8000/v1", replicas=["http://127.0.0.1:8000/v1", "cpu"])
    # Which replica could not connect: the server is the second of two.
    with pytest.raises(wb.ModelLoadError, match="model 'x#1': cannot reach a model server"):
        bench.load("x", tiny_path, replicas=["cpu", f"http://127.0.0.1:{free_port()}/v1"])
    assert "x" not in bench.registry.names()  # nothing half-made by the refused loads


def test_ctrl_c_while_a_replica_connects_closes_the_replicas_connected_before(
    server: Server, tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No backend here fails to start on its own once its model is loaded: Ctrl-C (a KeyboardInterrupt) arrives
    # as the second replica's starts. Before, the first replica's (a client of the server's pool) was never closed.
    made = []
    start = engine_module.backend_for

    def interrupted_at_the_second(*args: object) -> object:
        if made:
            raise KeyboardInterrupt
        made.append(start(*args))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(engine_module, "backend_for", interrupted_at_the_second)
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        with pytest.raises(KeyboardInterrupt):
            bench.load("m", tiny_path, replicas=[server.url, "cpu"])
    assert len(made) == 1 and made[0]._closed
