"""engine="ray" across machines, honestly on one: Ray's own multi-node test cluster (a head and two worker raylets).

Replicas land on different nodes, and a node removed mid-map is a fault the chain survives: the
lost replica's requests are retried on the other one and every run of the map succeeds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import eventually, need_ray, ray_runtime_env, ray_started, ray_turn

import workbench as wb
from workbench.engine.backends import ray as ray_backend
from workbench.tracing import attributes as attr

SPEC = {
    "name": "qa",
    "hops": [
        {"name": "answer", "model": "m", "prompt": "Question: {{ question }}\nAnswer:", "max_new_tokens": 12,
         "retry": {"attempts": 4, "backoff_ms": 10}},
    ],
    "output": "answer",
}
# Enough of them that the node goes while m#1 still has runs of the map to serve.
QUESTIONS = [{"question": f"What is {i} + {i}?"} for i in range(64)]
STORE = 80 * 2**20  # the smallest object store Ray accepts, per node: replicas send token ids, not tensors


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Any, list[Any]]]:
    """A head that runs no replica (no CPU) and two worker nodes with two CPUs each.

    Its raylets start from this process, so their workers import the workbench this test does
    (PYTHONPATH set as for a local Ray), as a cluster's image would bring its own install.
    """
    ray = need_ray()
    from ray.cluster_utils import Cluster

    with ray_turn():
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PYTHONPATH", ray_runtime_env()["env_vars"]["PYTHONPATH"])

            def start() -> tuple[Any, list[Any]]:
                cluster = Cluster(initialize_head=True,
                                  head_node_args={"num_cpus": 0, "object_store_memory": STORE, "include_dashboard": False})
                return cluster, [cluster.add_node(num_cpus=2, object_store_memory=STORE) for _ in range(2)]

            cluster, workers = ray_started(ray, start)
        cluster.wait_for_nodes()
        yield cluster, workers
        ray.shutdown()  # the workbench connected this process to the cluster
        cluster.shutdown()


@pytest.fixture(scope="module")
def bench(cluster: tuple[Any, list[Any]], tiny_path: Path) -> Iterator[wb.Workbench]:
    """'m' as two Ray replicas, the workbench joining the cluster by its address as it would a remote one."""
    handle, _ = cluster
    with wb.Workbench(store=wb.InMemoryContextStore()) as bench:
        bench.load("m", tiny_path, device="cpu", engine="ray", replicas=2, address=handle.address)
        yield bench


def test_replicas_land_on_different_nodes_and_their_spans_say_which(
    cluster: tuple[Any, list[Any]], bench: wb.Workbench
) -> None:
    _, workers = cluster
    replicas = bench.replicas("m").set_index("replica")
    assert set(replicas["node"]) == {w.node_id for w in workers}  # one on each worker node, none on the head
    run = bench.chain(SPEC).run(question="Why?")
    (span,) = [s for s in run.trace.spans if s.name.startswith(attr.TEXT_COMPLETION)]
    assert span.attributes[attr.RAY_NODE] == replicas.loc[span.attributes[attr.REPLICA], "node"]


def test_a_node_removed_mid_map_loses_no_run(cluster: tuple[Any, list[Any]], bench: wb.Workbench) -> None:
    handle, workers = cluster
    replicas = bench.replicas("m").set_index("replica")
    doomed = next(w for w in workers if w.node_id == replicas.loc["m#1", "node"])
    chain = bench.chain(SPEC)
    batches: list[wb.RunBatch] = []
    # Four at once over two replicas: each holds a request queued behind the one it runs, so m#1 is rarely idle
    # at the instant its node goes (with two at once CI caught it between requests).
    mapping = threading.Thread(target=lambda: batches.append(chain.map(QUESTIONS, concurrency=4)))
    served_before = int(replicas.loc["m#1", "served"])
    mapping.start()
    # Mid-map: once m#1 has served part of this map, its node goes, raylet, actor and all.
    eventually(lambda: int(bench.replicas("m").set_index("replica").loc["m#1", "served"]) >= served_before + 2,
               "m#1 to serve part of the map")
    handle.remove_node(doomed, allow_graceful=False)
    assert mapping.is_alive(), "the map ended before the node went: the test did not test the fault"
    mapping.join()
    (batch,) = batches
    assert batch.complete and not batch.failed, batch.table()
    assert all(run.output for run in batch)
    # Whether m#1 held a request at the instant its node went is timing (concurrency 2 over two replicas: CI saw
    # it between requests once); that such requests fail over and are retried is test_ray.py's actor-killed-mid-map
    # test, held deterministically. Here: the map lost nothing, and the replica came back.
    # Its actor starts again on the node that is left (SPREAD is a preference; one free CPU there takes it).
    # If no request of the map found m#1 gone (timing again: the map may end first), nothing has told the workbench
    # yet: it learns an actor is gone from a call to it. So calls pinned to m#1 go until one finds the actor gone and
    # restarts it: more than one, as a call made while the node's worker process still lives answers, and one that
    # m#1's open breaker refuses reaches nothing. More than one restart if a new actor was placed on the node as it went.
    poked: list[str] = []  # the errors of those calls, by type

    def restarted() -> bool:
        if bench.replicas("m").set_index("replica").loc["m#1", "restarts"] >= 1:
            return True
        try:
            bench.generate("m#1", "Why?", max_new_tokens=4)
        except wb.WorkbenchError as e:
            poked.append(type(e).__name__)
        time.sleep(0.2)
        return False

    eventually(restarted, "m#1's actor to restart")
    survivor = next(w for w in workers if w is not doomed)
    # A new actor starts a Python worker, imports torch and loads the model: longer than eventually's minute
    # on a loaded machine, so the bound here is the workbench's own for a replica to be ready.
    deadline = time.monotonic() + ray_backend.READY_TIMEOUT_S
    while bench.replicas("m").set_index("replica").loc["m#1", "node"] != survivor.node_id:
        restarts = [s for s in bench.traces().spans if s.name == "restart m"]
        assert time.monotonic() < deadline, f"m#1 did not restart on the node that is left: {restarts}"
        assert not any(s.status.status_code.name == "ERROR" for s in restarts), restarts[-1].events
        time.sleep(0.1)
    errors = [s for run in batch for s in run.trace.spans
              if s.name.startswith(attr.TEXT_COMPLETION) and s.attributes.get(attr.REPLICA) == "m#1"
              and s.status.status_code.name == "ERROR"]
    # Requests of the map that m#1 held as its node went (most runs have some; timing decides, as above) failed
    # over: each failed attempt is a ModelActorDied, translated at the seam, and no raw Ray error reached the chain.
    kinds = {str(e.attributes["exception.type"]).rpartition(".")[2] for s in errors for e in s.events
             if e.name == "exception"}
    assert kinds <= {"ModelActorDied"}, kinds
    # The restart came from a call that found the actor gone: one of the map's, or one of the calls above.
    assert "ModelActorDied" in kinds | set(poked), (kinds, poked)
