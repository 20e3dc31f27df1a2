"""A model's replicas: one worker each (its own backend, queue, breaker, health and faults), and the policy that picks."""

from __future__ import annotations

import copy
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from workbench.engine.balancing import BalancePolicy, LeastLoaded
from workbench.engine.batching import BatchingPolicy
from workbench.engine.breaker import CLOSED
from workbench.engine.worker import ModelWorker
from workbench.errors import ModelLoadError, SettingsError, StrategyError
from workbench.models.devices import resolve_device
from workbench.models.remote import REMOTE_DEVICE
from workbench.models.settings import is_server_url


log = logging.getLogger(__name__)

# How a name points at one replica of a replicated model: "m#1" is replica 1 of model "m".
REPLICA_NAME = re.compile(r"^(?P<model>.+)#(?P<index>\d+)$")


def replica_name(model: str, index: int, count: int) -> str:
    """What a replica's worker is called: the model's own name when it has one replica, else ``model#index``."""
    return model if count == 1 else f"{model}#{index}"


# Far above any useful count (each replica is a worker thread, with a queue, a breaker and a health record).
MAX_REPLICAS = 1024
_EXAMPLE = 'e.g. replicas=["cpu", "cpu"], ["cuda:0", "cuda:1"], or ["cpu", "http://127.0.0.1:8000/v1"] (a server)'


def replica_places(model: str, replicas: int | Sequence[str], remote_source: bool = False) -> tuple[str | None, ...]:
    """Where each replica of ``model`` runs: None where the model loads, a device name, or a server's URL.

    A list may mix devices and servers (``["cpu", "cpu", "http://127.0.0.1:8000/v1"]``): a device
    runs the model's weights here, a URL is the same model on that OpenAI-compatible server.
    ``remote_source`` says the model itself loads from a server, so it has no weights here.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, (int, list, tuple)):
        raise SettingsError(
            f"model {model!r}: replicas must be a count or a list of devices and server URLs, got {replicas!r}",
            hint='e.g. replicas=2 (both on the model\'s device) or replicas=["cuda:0", "cuda:1"]',
        )
    if isinstance(replicas, int):
        if replicas < 1:
            raise SettingsError(f"model {model!r}: replicas must be at least 1, got {replicas}",
                                hint="replicas=1 (the default) serves from one worker")
        if replicas > MAX_REPLICAS:  # each is a worker thread: a stray digit would exhaust memory or threads
            raise SettingsError(f"model {model!r}: replicas must be at most {MAX_REPLICAS}, got {replicas}",
                                hint="each replica is a worker of its own; a few per device is the usual count")
        return (None,) * replicas
    if not replicas:
        raise SettingsError(f"model {model!r}: replicas lists no devices or servers", hint=_EXAMPLE)
    if len(replicas) > MAX_REPLICAS:
        raise SettingsError(f"model {model!r}: replicas lists {len(replicas)} places, more than {MAX_REPLICAS}",
                            hint=_EXAMPLE)
    places = tuple(_place(model, index, entry) for index, entry in enumerate(replicas))
    devices = [place for place in places if not is_server_url(place)]
    if remote_source and devices:
        raise SettingsError(
            f"model {model!r} loads from a server, so it has no weights here for a replica on {devices[0]!r}",
            hint="load the model's weights (a directory or hub id) to mix local replicas with servers: "
            'bench.load(NAME, PATH, replicas=["cpu", "http://127.0.0.1:8000/v1"])',
        )
    if not remote_source and not devices:
        raise SettingsError(
            f"model {model!r}: replicas lists only servers, so the weights it loads here would serve nothing",
            hint='list a device for them too (replicas=["cpu", URL]), or load from a server URL as the source: '
            "bench.load(NAME, URL, replicas=[URL, OTHER_URL])",
        )
    return places


def _place(model: str, index: int, entry: object) -> str:
    """One entry of a replicas list, checked: a device this machine has, or an http(s) URL with a host."""
    where = f"model {model!r}: replicas[{index}]"
    if not isinstance(entry, str) or not entry.strip():
        raise SettingsError(f"{where} is {entry!r}, neither a device nor a server URL", hint=_EXAMPLE)
    entry = entry.strip()
    if is_server_url(entry):
        try:
            host = urlsplit(entry).hostname
        except ValueError:
            host = None
        if not host:
            raise SettingsError(f"{where} {entry!r} names no host to reach a server at",
                                hint='a server\'s OpenAI base URL, e.g. "http://127.0.0.1:8000/v1"')
        return entry
    try:
        resolve_device(entry)
    except ModelLoadError as exc:
        raise SettingsError(f"{where} {entry!r} is neither a device here nor a server URL: {exc.message}",
                            hint=f"{exc.hint}; a server is an http(s) URL, e.g. \"http://127.0.0.1:8000/v1\"") from None
    return entry


def continuous_on_shared(model: str) -> StrategyError:
    return StrategyError(
        f"model {model!r}: continuous batching cannot run on replicas that share one copy of the model, because "
        "its scheduler switches the model's attention implementation under the other replicas' feet",
        hint="use DynamicBatching with replicas on one device, or give each replica a device of its own "
        '(replicas=["cuda:0", "cuda:1"])',
    )


@dataclass(eq=False)
class Replica:
    """One replica of a model as the balancer sees it: its worker and the requests it holds and served."""

    index: int
    worker: ModelWorker
    in_flight: int = 0  # picked and not finished yet: queued, in a batch, or being admitted
    served: int = 0  # finished without error
    failed: int = 0

    @property
    def name(self) -> str:
        return self.worker.name

    @property
    def available(self) -> bool:
        """Whether it may take requests: health serving and breaker letting requests through.

        A replica whose breaker is not closed takes one request at a time, its trial: the breaker admits the
        requests of a tick only after all are picked, so a burst would otherwise pile onto it and all but one fail
        with CircuitOpen while the other replicas are well.
        """
        breaker = self.worker.breaker
        return self.worker.health.serving and breaker.available and (breaker.state == CLOSED or self.in_flight == 0)


class ReplicaSet:
    """A model's replicas and its balance policy: picks a replica per request, skipping sick ones until they recover.

    A replica is sick while its last health probe failed or its circuit breaker is open; once
    the breaker's reset timeout passes, it is offered again, and the request it gets is the
    breaker's half-open trial. When every replica is sick, the policy picks among them all, so
    the request fails fast with that replica's own error (CircuitOpen, ModelUnhealthy).
    """

    def __init__(
        self, model: str, workers: Sequence[ModelWorker], policy: BalancePolicy, shared_weights: bool = False
    ) -> None:
        self.model = model
        self.replicas = [Replica(i, worker) for i, worker in enumerate(workers)]
        self.policy = policy  # a copy of its own: see the setter
        self.shared_weights = shared_weights  # some replicas run one model object between them
        self._lock = threading.Lock()
        self._fallback = LeastLoaded()  # picks while the policy fails: see _choose

    @property
    def policy(self) -> BalancePolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: BalancePolicy) -> None:
        # Each set keeps its own copy: a policy's state (round robin's turn, a generator) is per set, and one
        # policy object often goes to several models (wb.compare's balance axis sets it on every model of a chain,
        # and a notebook may too); shared, two models picked in step, each always landing on the same replica.
        try:
            self._policy = copy.deepcopy(policy)
        except Exception:  # a policy of the user's own that cannot be copied keeps its state as it is
            self._policy = policy
        self._failing = False  # the new policy's failure is logged once, when it first fails

    def check(self, policy: BatchingPolicy) -> None:
        """Raise StrategyError if the replicas cannot all run under ``policy``."""
        if self.shared_weights and policy.continuous:
            raise continuous_on_shared(self.model)

    @property
    def workers(self) -> list[ModelWorker]:
        return [r.worker for r in self.replicas]

    def pick(self, session: str | None, index: int | None = None) -> Replica:
        """The replica for one request (``index`` pins one); it counts as in flight until :meth:`finished`."""
        with self._lock:
            if index is not None:
                chosen = self.replicas[index]
            elif len(self.replicas) == 1:
                chosen = self.replicas[0]
            else:
                healthy = [r for r in self.replicas if r.available]
                chosen = self._choose(healthy or self.replicas, session)
            chosen.in_flight += 1
            return chosen

    def _choose(self, offered: list[Replica], session: str | None) -> Replica:
        """The policy's pick among ``offered``; the least loaded of them if the policy raised or picked none of them.

        A policy of the user's own may fail on a request. The request is served rather than failed: an error here
        would escape the engine's queueing, where an awaited request waits for an answer that never comes.
        """
        policy = self.policy
        error: Exception | None = None
        try:
            chosen = policy.choose(offered, session)
        except Exception as exc:
            error, why = exc, f"raised {type(exc).__name__}: {exc}"
        else:
            picked = next((replica for replica in offered if replica is chosen), None)
            if picked is not None:
                return picked
            why = f"returned {chosen!r:.80}, none of the replicas it was offered"
        if not self._failing:
            self._failing = True
            log.error("balance policy %r of model %r %s; its requests go to the least loaded replica until it is "
                      "fixed (this is logged once; bench.set_balance(%r, ...) sets another)",
                      policy.name, self.model, why, self.model, exc_info=error)
        fallback = self._fallback.choose(offered, session)
        return next(replica for replica in offered if replica is fallback)

    def finished(self, replica: Replica, ok: bool, counted: bool = True) -> None:
        """A request of ``replica`` ended; counted as served or failed unless not ``counted`` (a health probe)."""
        with self._lock:
            replica.in_flight -= 1
            if not counted:
                return
            if ok:
                replica.served += 1
            else:
                replica.failed += 1

    def rows(self) -> list[dict[str, Any]]:
        """One row per replica for ``bench.replicas()``: kind ``local`` (a device here) or ``remote`` (a server)."""
        with self._lock:
            loads = [(r.index, r.worker, r.in_flight, r.served, r.failed) for r in self.replicas]
        return [
            {"model": self.model, "replica": worker.name, "index": index, **_where(worker),
             # node: the Ray node a replica's actor runs on (engine="ray"); None in this process.
             "node": getattr(worker.backend, "node", None),
             "balance": self.policy.name, "batching": worker.policy.name, "in_flight": in_flight, "served": served, "failed": failed,
             "health": worker.health.state, "breaker": worker.breaker.state,
             "faults": worker.faults is not None,
             # restarts: how often the replica's model process or Ray actor was started again after dying.
             "restarts": getattr(worker.backend, "restarts", None)}
            for index, worker, in_flight, served, failed in loads
        ]


def _where(worker: ModelWorker) -> dict[str, str | None]:
    """Where a replica runs: a device here, a Ray actor (its node says where), or the server it sends to."""
    backend = worker.backend
    if backend.device == REMOTE_DEVICE:
        return {"kind": "remote", "device": backend.device, "url": backend.source}
    kind = "ray" if getattr(backend, "node", None) is not None else "local"
    return {"kind": kind, "device": backend.device, "url": None}
