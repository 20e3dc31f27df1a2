"""Replicas and load balancing on the real tiny model: each policy's choice, sick replicas skipped, compare by balance."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import workbench as wb
from workbench.engine.balancing import ReplicaLoad, parse_balance
from workbench.tracing import attributes as attr

from helpers import WAIT_S, eventually, free_port

ONE_HOP = {
    "name": "qa",
    "hops": [{"name": "answer", "model": "m", "prompt": "Question: {{ question }}\nAnswer:", "max_new_tokens": 2}],
    "output": "answer",
}


@pytest.fixture(scope="module")
def replicated(tiny_path: Path) -> Iterator[wb.Workbench]:
    """One workbench with the tiny model loaded as 'm' with two replicas on the CPU (sharing its weights)."""
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("m", tiny_path, device="cpu", replicas=2)
        yield bench


@pytest.fixture
def bench(replicated: wb.Workbench) -> Iterator[wb.Workbench]:
    """The shared workbench, round robin, fresh breakers, no faults, and both replicas healthy."""
    replicated.set_balance("m", "round_robin")
    replicated.set_breaker("m", failure_threshold=5, reset_timeout_s=5)
    yield replicated
    replicated.clear_faults()
    replicated.check_health()


def served_by(run: wb.Run) -> str:
    """The replica that served the run's one model call, as its span records it."""
    (span,) = [s for s in run.trace.spans if s.name.startswith(attr.TEXT_COMPLETION)]
    return str(span.attributes[attr.REPLICA])


def attempt(chain: wb.Chain, **inputs: str) -> wb.Run:
    """Run ``chain`` once; a failed run is returned too (its trace says which replica failed it)."""
    try:
        return chain.run(**inputs)
    except wb.HopFailed as exc:
        return exc.run  # type: ignore[return-value]


def test_round_robin_alternates_and_every_request_span_names_its_replica(bench: wb.Workbench) -> None:
    chain = bench.chain(ONE_HOP)
    runs = [chain.run(question=f"q{i}") for i in range(4)]
    first = served_by(runs[0])
    other = "m#1" if first == "m#0" else "m#0"
    assert [served_by(r) for r in runs] == [first, other, first, other]
    table = runs[0].trace.table()
    request = table[table["name"] == f"{attr.TEXT_COMPLETION} m"].iloc[0]
    assert request[f"attributes.{attr.REPLICA}"] == first
    assert request[f"attributes.{attr.BALANCE_POLICY}"] == "round_robin"
    assert request[f"attributes.{attr.MODEL_NAME}"] == "m"  # the model's own name, for per-model summaries
    batches = [s.name for s in bench.traces().spans if s.name.startswith("batch m")]
    assert {"batch m#0", "batch m#1"} <= set(batches)  # each replica runs batches of its own


def test_models_and_replicas_tables_count_per_replica(bench: wb.Workbench) -> None:
    before = bench.replicas("m").set_index("replica")["served"]
    chain = bench.chain(ONE_HOP)
    for i in range(4):
        chain.run(question=f"q{i}")
    table = bench.replicas("m").set_index("replica")
    assert list(table.index) == ["m#0", "m#1"]
    assert (table["served"] - before).tolist() == [2, 2]
    assert table["in_flight"].tolist() == [0, 0]
    assert table["device"].tolist() == ["cpu", "cpu"]
    row = bench.models().set_index("name").loc["m"]
    assert (row["replicas"], row["in_flight"], row["served"]) == (2, 0, table["served"].sum())
    assert sorted(bench.breakers()["model"]) == ["m#0", "m#1"]  # a breaker per replica
    # Health probes are no caller's work: two checks counted 4 more served before.
    bench.check_health("m")
    bench.check_health("m")
    assert bench.replicas("m").set_index("replica")["served"].tolist() == table["served"].tolist()
    assert bench.models().set_index("name").loc["m"]["served"] == table["served"].sum()


def test_least_loaded_sends_less_to_the_replica_slowed_by_faults(bench: wb.Workbench) -> None:
    bench.inject("m", replica=1, latency_ms=300)
    chain = bench.chain(ONE_HOP)
    inputs = [{"question": f"q{i}"} for i in range(8)]
    batch = chain.map(inputs, concurrency=4)
    round_robin = Counter(served_by(run) for run in batch.finished)
    bench.set_balance("m", "least_loaded")
    batch = chain.map(inputs, concurrency=4)
    least_loaded = Counter(served_by(run) for run in batch.finished)
    assert round_robin["m#0"] == round_robin["m#1"] == 4  # blind to load: half to the slow one
    assert least_loaded["m#1"] < least_loaded["m#0"]  # the slow one holds its requests longer, so gets fewer
    assert sum(least_loaded.values()) == 8


def test_session_hash_keeps_each_session_on_one_replica(bench: wb.Workbench) -> None:
    bench.set_balance("m", "session_hash")
    chain = bench.chain(ONE_HOP)
    sessions = [f"user-{i}" for i in range(6)]
    seen: dict[str, set[str]] = {s: set() for s in sessions}
    for _ in range(3):
        for session in sessions:
            seen[session].add(served_by(chain.run(question="hi", session=session)))
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    assert set.union(*seen.values()) == {"m#0", "m#1"}  # sessions spread over both replicas


def test_weighted_sends_only_to_weighted_replicas(bench: wb.Workbench) -> None:
    bench.set_balance("m", wb.Weighted({"m#1": 1}))
    chain = bench.chain(ONE_HOP)
    assert {served_by(chain.run(question=f"q{i}")) for i in range(6)} == {"m#1"}


@dataclass
class Load:
    """A replica as a policy reads it (the policy's input, not an imitation of a worker)."""

    index: int
    name: str
    in_flight: int = 0


def test_weighted_draws_match_the_weights_with_a_seeded_generator() -> None:
    replicas = [Load(0, "m#0"), Load(1, "m#1"), Load(2, "m#2")]
    policy = wb.Weighted([6, 3, 1], seed=7)
    picks = [policy.choose(replicas, None).name for _ in range(5000)]
    counts = Counter(picks)
    assert counts["m#0"] / 5000 == pytest.approx(0.6, abs=0.03)
    assert counts["m#1"] / 5000 == pytest.approx(0.3, abs=0.03)
    assert counts["m#2"] / 5000 == pytest.approx(0.1, abs=0.03)
    again = wb.Weighted([6, 3, 1], seed=7)
    assert [again.choose(replicas, None).name for _ in range(5000)] == picks  # the same seed draws the same
    assert wb.Weighted([6, 3, 1], seed=7).choose(replicas[1:], None).name in {"m#1", "m#2"}  # healthy ones only


def test_power_of_two_and_least_loaded_pick_the_emptier_replica() -> None:
    replicas = [Load(0, "m#0", in_flight=3), Load(1, "m#1", in_flight=0)]
    assert wb.LeastLoaded().choose(replicas, None).name == "m#1"
    assert wb.PowerOfTwo(seed=0).choose(replicas, None).name == "m#1"
    idle = [Load(0, "m#0"), Load(1, "m#1"), Load(2, "m#2")]
    policy = wb.LeastLoaded()
    assert [policy.choose(idle, None).name for _ in range(4)] == ["m#0", "m#1", "m#2", "m#0"]  # ties in turn


def test_policies_parse_by_name_and_round_trip() -> None:
    for text in ("round_robin", "least_loaded", "power_of_two", "power_of_two:3", "session_hash", "weighted:3,1"):
        assert parse_balance(text).name == text
    assert parse_balance("weighted:3,1") == wb.Weighted([3, 1])
    with pytest.raises(wb.StrategyError, match="did you mean 'least_loaded'"):
        parse_balance("least_lodaed")
    with pytest.raises(wb.StrategyError, match="weight"):
        parse_balance("weighted:3,x")
    with pytest.raises(wb.StrategyError, match="more than 0"):
        wb.Weighted([0, 0])


def test_a_replica_whose_breaker_opened_is_skipped_until_it_recovers(bench: wb.Workbench) -> None:
    bench.set_breaker("m", failure_threshold=2, reset_timeout_s=0.3)
    bench.inject("m#1", error_rate=1.0, seed=0)
    chain = bench.chain(ONE_HOP)
    runs = [attempt(chain, question=f"q{i}") for i in range(4)]
    failed = [served_by(r) for r in runs if not r.ok]
    assert failed == ["m#1", "m#1"]  # two failures in a row open its breaker
    # The error names the replica whose faults failed it ("model 'm'" before, whichever replica it was).
    assert all("injected fault on model 'm#1'" in str(r.error) for r in runs if not r.ok)
    assert bench.breakers().set_index("model").loc["m#1", "state"] == "open"
    later = [chain.run(question=f"q{i}") for i in range(4)]
    assert all(r.ok for r in later) and {served_by(r) for r in later} == {"m#0"}  # skipped, so nothing fails
    bench.clear_faults("m#1")
    eventually(lambda: served_by(chain.run(question="again")) == "m#1", "the healed replica to serve again")
    assert bench.breakers().set_index("model").loc["m#1", "state"] == "closed"  # its trial request passed


def test_a_replica_that_fails_its_health_probe_is_skipped_until_one_passes(bench: wb.Workbench) -> None:
    bench.inject("m", replica=0, error_rate=1.0)
    health = bench.check_health("m").set_index("name")["health"]
    assert health.to_dict() == {"m#0": "unhealthy", "m#1": "healthy"}
    assert bench.models().set_index("name").loc["m", "health"] == "degraded"
    chain = bench.chain(ONE_HOP)
    runs = [chain.run(question=f"q{i}") for i in range(3)]
    assert all(r.ok for r in runs) and {served_by(r) for r in runs} == {"m#1"}
    bench.clear_faults()
    bench.check_health("m#0")
    assert {served_by(chain.run(question=f"q{i}")) for i in range(2)} == {"m#0", "m#1"}


def test_compare_puts_balance_policies_side_by_side_with_the_load_per_replica(bench: wb.Workbench) -> None:
    bench.inject("m#1", latency_ms=200)
    chain = bench.chain(ONE_HOP)
    inputs = [{"question": f"q{i}"} for i in range(6)]
    cmp = wb.compare(chain, inputs, balance=["round_robin", "least_loaded"], concurrency=3, repeats=1, warmup=0,
                     progress=False)
    table = cmp.table().set_index("balance")
    assert list(table.index) == ["round_robin", "least_loaded"]
    assert table.loc["round_robin", "replica_load"] == "m#0 50% · m#1 50%"
    load = cmp.replica_load().set_index(["balance", "replica"])
    assert load.loc[("round_robin", "m#0"), "calls"] == load.loc[("round_robin", "m#1"), "calls"] == 3
    assert load.loc[("least_loaded", "m#1"), "calls"] < load.loc[("least_loaded", "m#0"), "calls"]
    assert "replica_load" in cmp.readable().columns
    assert bench.engine.balance("m").name == "round_robin"  # put back afterwards


def test_replicas_may_be_listed_by_device_and_load_lazily(bench: wb.Workbench, tiny_path: Path) -> None:
    with wb.Workbench(store=wb.InMemoryContextStore()) as other:
        other.register("r", tiny_path, replicas=["cpu", "cpu"], balance="least_loaded")
        assert other.models().set_index("name").loc["r", "state"] == "registered"
        other.generate("r", "hello", max_new_tokens=1)  # loads on use, with its replicas
        table = other.replicas("r")
        assert table["replica"].tolist() == ["r#0", "r#1"]
        assert set(table["balance"]) == {"least_loaded"}
        assert other.generate("r#1", "hello", max_new_tokens=1).tokens_out == 1  # a replica by name
        assert other.replicas("r").set_index("replica").loc["r#1", "served"] == 1


def test_replica_mistakes_say_what_and_where(bench: wb.Workbench, tiny_path: Path) -> None:
    with pytest.raises(wb.SettingsError, match="replicas must be at least 1") as info:
        bench.load("other", tiny_path, replicas=0)
    assert "'other'" in str(info.value) and info.value.hint
    with pytest.raises(wb.SettingsError, match="list of devices"):
        bench.load("other", tiny_path, replicas="two")  # type: ignore[arg-type]
    with pytest.raises(wb.UnknownModelError, match="no replica 5: it has 2"):
        bench.inject("m", replica=5, latency_ms=1)
    with pytest.raises(wb.UnknownModelError, match="no model named 'mm'"):
        bench.set_balance("mm", "least_loaded")
    with pytest.raises(wb.StrategyError, match="unknown policy"):
        bench.set_balance("m", "fastest")
    assert "other" not in bench.registry.names()  # nothing half-made by the refused loads
    with pytest.raises(wb.StrategyError, match="share one copy of the model") as refused:
        bench.set_batching("m", wb.ContinuousBatching())
    assert "DynamicBatching" in str(refused.value.hint)
    assert bench.engine.policy("m").name == "none"  # the replicas run on as they were


def test_one_policy_object_on_two_models_keeps_a_turn_per_model(bench: wb.Workbench, tiny_path: Path) -> None:
    # wb.compare sets each balance item on every model of the chain; round robin's turn must be each model's own,
    # or two models picked in step and each always landed on the same replica (a on a#0, b on b#1).
    with wb.Workbench(store=wb.InMemoryContextStore()) as other:
        other.load("a", tiny_path, device="cpu", replicas=2)
        other.load("b", tiny_path, device="cpu", replicas=2)
        chain = other.chain({
            "name": "ab",
            "hops": [{"name": "x", "model": "a", "prompt": "Q: {{ question }}", "max_new_tokens": 1},
                     {"name": "y", "model": "b", "prompt": "{{ x }} A:", "max_new_tokens": 1}],
            "output": "y",
        })
        cmp = wb.compare(chain, [{"question": f"q{i}"} for i in range(4)], balance=["round_robin", "least_loaded"],
                         concurrency=1, repeats=1, warmup=0, progress=False)
        load = cmp.replica_load().set_index(["balance", "replica"])["calls"]
        for policy in ("round_robin", "least_loaded"):
            assert {replica: load[(policy, replica)] for replica in ("a#0", "a#1", "b#0", "b#1")} == {
                "a#0": 2, "a#1": 2, "b#0": 2, "b#1": 2}, policy
        shared = parse_balance("round_robin")
        other.set_balance("a", shared)
        other.set_balance("b", shared)
        runs = [chain.run(question=f"q{i}") for i in range(4)]
        served = Counter(str(s.attributes[attr.REPLICA]) for r in runs for s in r.trace.spans
                         if s.name.startswith(attr.TEXT_COMPLETION))
        assert served == {"a#0": 2, "a#1": 2, "b#0": 2, "b#1": 2}


def test_weighted_refuses_an_infinite_weight_when_set_not_on_every_request(bench: wb.Workbench) -> None:
    # An infinite weight passed the check and then failed each request in the draw ("Total of weights must be finite").
    for weights in ([float("inf"), 1], {"m#0": 1e308, "m#1": 1e308}, [10**400, 1]):
        with pytest.raises(wb.StrategyError, match="must be finite") as info:
            wb.Weighted(weights)
        assert info.value.hint
    with pytest.raises(wb.StrategyError, match="must be finite"):
        bench.set_balance("m", "weighted:inf,1")
    assert bench.engine.balance("m").name == "round_robin"  # the policy in force stays
    assert bench.generate("m", "hello", max_new_tokens=1).tokens_out == 1


def test_weighted_refuses_weights_that_are_not_a_list_or_keys_that_are_no_replica(bench: wb.Workbench) -> None:
    # None raised a raw TypeError; a string was read letter by letter; a key neither an index nor a name (1.5, -1,
    # True) weighed no replica, with nothing said, so its share went to the others.
    for weights, says in [(None, "a list of weights"), (3, "a list of weights"), ("3,1", "a list of weights"),
                          ({1.5: 1, 0: 1}, "1.5 is neither"), ({-1: 1, 0: 1}, "-1 is neither"),
                          ({True: 1, 0: 1}, "True is neither")]:
        with pytest.raises(wb.StrategyError, match=says) as info:
            wb.Weighted(weights)  # type: ignore[arg-type]
        assert info.value.hint
    assert wb.Weighted((3, 1)).weights == {0: 3.0, 1: 1.0}


def test_a_failed_or_refused_load_leaves_the_replicas_and_balance_configured_before(tiny_path: Path) -> None:
    with wb.Workbench(store=wb.InMemoryContextStore()) as other:
        other.register("r", tiny_path, replicas=2, balance="least_loaded")
        with pytest.raises(wb.ModelLoadError, match="cannot reach a model server"):
            other.load("r", f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
        other.load("r")
        table = other.replicas("r")
        assert table["replica"].tolist() == ["r#0", "r#1"] and set(table["balance"]) == {"least_loaded"}
        with pytest.raises(wb.ModelLoadError, match="already loaded"):
            other.load("r", replicas=3, balance="power_of_two")  # refused: it changes nothing, now or later
        assert other.engine.balance("r").name == "least_loaded"
        other.unload("r")
        other.load("r")
        table = other.replicas("r")
        assert table["replica"].tolist() == ["r#0", "r#1"] and set(table["balance"]) == {"least_loaded"}
        with pytest.raises(wb.ModelLoadError, match="serves one replica: 2 were asked for"):
            other.load("iso", tiny_path, device="cpu", isolation="process", replicas=2)
        other.register("iso", tiny_path, device="cpu")  # the refused load's two replicas are not kept for it
        other.generate("iso", "hello", max_new_tokens=1)
        assert other.replicas("iso")["replica"].tolist() == ["iso"]


def test_weighted_that_names_a_replica_the_model_lacks_or_weighs_none_of_its_replicas_is_refused(
    bench: wb.Workbench, tiny_path: Path
) -> None:
    # Both were accepted, and every request then went to least-loaded with nothing said.
    for weights, why in ([{"m#5": 3, "x": 1}, "weighs replica 'm#5', but 'm' has 2 replicas: m#0, m#1"],
                         [[1, 2, 3], "weighs replica 2, but 'm' has 2 replicas"],
                         # One weight per replica, in order: the one left out would never serve (20 of 20 went to
                         # m#0), where a mapping leaves a replica out on purpose.
                         [[1], "weighted:1 gives 1 weight for the 2 replicas of 'm': one weight per replica"],
                         [{"x": 1, "other#0": 2}, "gives none of the replicas of 'm' a weight above 0"]):
        with pytest.raises(wb.StrategyError, match=why) as info:
            bench.set_balance("m", wb.Weighted(weights))
        assert info.value.hint
        assert bench.engine.balance("m").name == "round_robin"  # the policy in force stays
    # Weights for other models' replicas beside this one's are fine: one policy may weigh every model of a chain.
    bench.set_balance("m", wb.Weighted({"m#1": 1, "other#0": 2}))
    assert bench.engine.balance("m").name == "weighted:m#1=1,other#0=2"
    with pytest.raises(wb.StrategyError, match="weighs replica 2, but 'n' has 2 replicas"):
        bench.load("n", tiny_path, device="cpu", replicas=2, balance="weighted:1,1,1")
    with pytest.raises(wb.StrategyError, match="gives 1 weight for the 2 replicas of 'n'"):
        bench.load("n", tiny_path, device="cpu", replicas=2, balance="weighted:1")
    bench.set_balance("m", "weighted:m#0=1")  # by name: the other left out on purpose
    bench.set_balance("m", wb.Weighted({0: 3}))
    assert "n" not in set(bench.models()["name"])


def test_a_replica_due_for_its_breaker_trial_takes_one_request_of_a_burst_and_the_rest_go_to_the_healthy_one(
    bench: wb.Workbench,
) -> None:
    """A map's runs reach the model in one tick: the recovering replica gets its one trial request, not a share of
    the burst that its half-open breaker would refuse with CircuitOpen while the other replica is healthy."""
    bench.set_breaker("m", failure_threshold=1, reset_timeout_s=0.2)
    bench.inject("m#1", error_rate=1.0, seed=0)
    chain = bench.chain(ONE_HOP)
    assert [run.ok for run in (attempt(chain, question=f"q{i}") for i in range(2))].count(False) == 1
    bench.clear_faults("m#1")
    assert bench.breakers().set_index("model").loc["m#1", "state"] == "open"
    eventually(lambda: bench.breakers().set_index("model").loc["m#1", "since_s"] >= 0.2, "m#1 to be due for a trial")
    batch = chain.map([{"question": f"q{i}"} for i in range(8)], concurrency=8)
    assert [run.error for run in batch.failed] == []
    assert Counter(served_by(run) for run in batch)["m#1"] == 1  # the trial; the other seven went to m#0
    assert bench.breakers().set_index("model").loc["m#1", "state"] == "closed"


def test_a_model_name_that_names_a_replica_is_refused(bench: wb.Workbench, tiny_path: Path) -> None:
    """'m#1' is replica 1 of 'm' wherever a name is read (generate, inject, set_breaker, the breakers table): a model
    of that name would take the replica's place in some of them and share its rows in the others."""
    for load in (bench.load, bench.register):
        with pytest.raises(wb.SettingsError, match=r"model name 'm#1' ends in #1, which names replica 1 of a model"):
            load("m#1", tiny_path, device="cpu")
    assert "m#1" not in bench.registry.names()
    assert list(bench.breakers()["model"]) == ["m#0", "m#1"]
    assert served_by(bench.chain(ONE_HOP).run(question="q")) in {"m#0", "m#1"}


def test_with_every_weighted_replica_sick_the_replicas_of_weight_0_share_the_load(tiny_path: Path) -> None:
    # The fallback took the first of the tied zero-weight replicas every time: one request after another, 8 of 8 went
    # to w#1 while w#2 stood idle.
    with wb.Workbench(store=wb.InMemoryContextStore()) as other:
        other.load("w", tiny_path, device="cpu", replicas=3, balance=wb.Weighted([1, 0, 0]))
        other.set_breaker("w#0", failure_threshold=1, reset_timeout_s=3600)
        other.inject("w#0", error_rate=1.0, seed=0)
        with pytest.raises(wb.InjectedFault):
            other.generate("w#0", "hello", max_new_tokens=1)
        assert other.breakers().set_index("model").loc["w#0", "state"] == "open"
        for _ in range(8):
            other.generate("w", "hello", max_new_tokens=1)
        served = other.replicas("w").set_index("replica")["served"]
        assert served["w#0"] == 0 and served["w#1"] >= 2 and served["w#2"] >= 2


def test_weighted_refuses_a_replica_weighed_twice_and_a_seed_it_cannot_draw_from(bench: wb.Workbench) -> None:
    # {0: 1, "m#0": 3} kept the index's 1 and dropped the name's 3 with nothing said; a list as the seed failed with
    # random's bare TypeError.
    with pytest.raises(wb.StrategyError, match=r"weighs replica 'm#0' twice: 1 as index 0 and 3 as 'm#0'") as info:
        bench.set_balance("m", wb.Weighted({0: 1, "m#0": 3, "m#1": 1}))
    assert info.value.hint
    assert bench.engine.balance("m").name == "round_robin"
    for make in (lambda: wb.Weighted([3, 1], seed=[1]), lambda: wb.PowerOfTwo(seed={"a": 1})):
        with pytest.raises(wb.StrategyError, match="seed must be a whole number") as info:
            make()
        assert "seed=0" in (info.value.hint or "")


class _Raising(wb.BalancePolicy):
    """A policy of a user's own with a bug: it raises on every pick."""

    @property
    def name(self) -> str:
        return "raising"

    def choose(self, healthy: Sequence[ReplicaLoad], session: str | None) -> ReplicaLoad:
        raise KeyError("no such replica")


class _Stray(_Raising):
    """A policy of a user's own that returns something other than one of the replicas offered."""

    def choose(self, healthy: Sequence[ReplicaLoad], session: str | None) -> ReplicaLoad:
        return None  # type: ignore[return-value]


class _Nameless(wb.BalancePolicy):
    """A policy of a user's own that forgot its name."""

    def choose(self, healthy: Sequence[ReplicaLoad], session: str | None) -> ReplicaLoad:
        return healthy[0]


def test_a_balance_policy_of_the_users_own_that_fails_to_pick_is_logged_and_its_requests_still_served(
    bench: wb.Workbench, caplog: pytest.LogCaptureFixture
) -> None:
    # A policy that raised failed a blocking call with its raw KeyError, and an awaited run never finished: the error
    # escaped the engine's queueing on the event loop, and the run waited for an answer that never came.
    chain = bench.chain(ONE_HOP)
    for policy, why in [(_Raising(), "raised KeyError: 'no such replica'"),
                        (_Stray(), "returned None, none of the replicas it was offered")]:
        caplog.clear()
        bench.set_balance("m", policy)
        run = asyncio.run(asyncio.wait_for(chain.arun(question="q"), WAIT_S))
        assert run.ok
        assert chain.run(question="q").ok
        assert bench.generate("m", "hello", max_new_tokens=1).tokens_out == 1
        failures = [r.getMessage() for r in caplog.records if "balance policy" in r.getMessage()]
        assert len(failures) == 1, failures  # once per policy set, not per request
        assert f"balance policy 'raising' of model 'm' {why}" in failures[0]
        assert "least loaded replica" in failures[0]
    assert bench.replicas("m")["in_flight"].tolist() == [0, 0]


def test_a_balance_policy_of_the_users_own_without_a_name_or_choose_is_refused_when_set(bench: wb.Workbench) -> None:
    # One without a name was taken, and then every request failed with a bare NotImplementedError (and
    # bench.replicas() with it).
    with pytest.raises(wb.StrategyError, match=r"balance policy _Nameless has no name \(its name raised "
                                               "NotImplementedError\\)") as info:
        bench.set_balance("m", _Nameless())
    assert "name property" in (info.value.hint or "")
    with pytest.raises(wb.StrategyError, match="balance policy BalancePolicy defines no choose"):
        bench.set_balance("m", wb.BalancePolicy())
    assert bench.engine.balance("m").name == "round_robin"
    assert set(bench.replicas("m")["balance"]) == {"round_robin"}


def test_a_balance_set_while_the_model_loads_is_the_one_it_serves_by(tiny_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The load read the balance before its backends started (tens of seconds on Ray) and wrote that one back after:
    # a set_balance meanwhile was lost, and the model served round robin.
    import workbench.engine.engine as engine_module

    with wb.Workbench(store=wb.InMemoryContextStore()) as other:
        other.register("r", tiny_path, device="cpu", replicas=2)
        start_backend = engine_module.backend_for
        set_once: list[bool] = []

        def backend_for(*args: Any, **kwargs: Any) -> Any:
            if not set_once:
                set_once.append(True)
                other.set_balance("r", "least_loaded")  # as a notebook cell would, while the load runs
            return start_backend(*args, **kwargs)

        monkeypatch.setattr(engine_module, "backend_for", backend_for)
        other.load("r")
        assert set_once
        assert other.engine.balance("r").name == "least_loaded"
        assert set(other.replicas("r")["balance"]) == {"least_loaded"}


def test_a_balance_kept_from_before_must_fit_the_replicas_of_the_next_load(tiny_path: Path) -> None:
    # Weighted([0, 0, 1]) kept from a load of three replicas was taken by a load of two, which then weighed none.
    # (A load from a source starts afresh, round robin; a load by name keeps what was configured.)
    with wb.Workbench(store=wb.InMemoryContextStore()) as other:
        other.load("r", tiny_path, device="cpu", replicas=3, balance=wb.Weighted([0, 0, 1]))
        other.unload("r")
        with pytest.raises(wb.StrategyError, match=r"keeps the balance weighted:0,0,1 from before, which does not fit the 2 replicas") as info:
            other.load("r", replicas=2)
        assert info.value.hint
        assert other.engine.balance("r").name == "weighted:0,0,1"  # the refused load changed nothing
        other.load("r", replicas=2, balance="round_robin")  # a balance for two: loads
        assert other.replicas("r")["replica"].tolist() == ["r#0", "r#1"]


def test_with_every_replica_sick_the_refusal_names_each_and_why(bench: wb.Workbench) -> None:
    # It named the one replica picked ("model 'm#0' is not taking requests"), as if the other might serve.
    bench.set_breaker("m", failure_threshold=1, reset_timeout_s=60)
    bench.inject("m", error_rate=1.0, seed=0)
    chain = bench.chain(ONE_HOP)
    for i in range(2):  # one failure each opens both breakers
        attempt(chain, question=f"q{i}")
    assert set(bench.breakers().set_index("model").loc[["m#0", "m#1"], "state"]) == {"open"}
    run = attempt(chain, question="again")
    assert isinstance(run.error, wb.HopFailed)
    said = str(run.error)
    assert "is not taking requests" in said
    assert "every replica of 'm' is out of rotation: m#0 has its breaker open, m#1 has its breaker open" in said
    bench.set_breaker("m", failure_threshold=5, reset_timeout_s=5)  # closes both for the next test
