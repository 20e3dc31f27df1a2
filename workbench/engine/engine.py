"""The engine: a replica set of workers per loaded model, and the door requests come in through (blocking or awaited)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Span

from workbench.engine.backends.base import Backend, check_not_empty, fit_window, past_window
from workbench.engine.backends.codec import TextCodec
from workbench.engine.backends.process import ModelProcess, ProcessBackend
from workbench.engine.backends.ray import RayBackend
from workbench.engine.backends.transformers import TransformersBackend
from workbench.engine.balancing import BalancePolicy, RoundRobin
from workbench.engine.batching import BatchingPolicy, ContinuousBatching, NoBatching, default_policy
from workbench.engine.breaker import CLOSED, CircuitBreaker
from workbench.engine.faults import FaultInjector, Faults
from workbench.engine.preloading import Preloader
from workbench.engine.replicas import (
    REPLICA_NAME,
    Replica,
    ReplicaSet,
    continuous_on_shared,
    replica_name,
    replica_places,
)
from workbench.engine.requests import GenerationParams, GenerationRequest, GenerationResult, Messages
from workbench.engine.wakeups import Wakeups
from workbench.engine.worker import ModelWorker
from workbench.errors import (
    AdapterError,
    CircuitOpen,
    HopTimeout,
    ModelLoadError,
    ModelUnhealthy,
    RunCancelled,
    SettingsError,
    StrategyError,
    UnknownModelError,
    WorkbenchError,
)
from workbench.models.adapters import AdapterLease, AdapterSet
from workbench.models.registry import LoadedModel, ModelRegistry
from workbench.models.remote import REMOTE_DEVICE
from workbench.models.settings import SERVER_SETTINGS, LoadSettings, is_server_url
from workbench.tracing import Tracing, mark_error
from workbench.tracing import attributes as attr
from workbench.tracing import openinference


@dataclass
class Call:
    """One model call asked of the engine: the prompt (or a chat's messages), its settings, and where its span goes."""

    model: str
    prompt: str
    params: GenerationParams
    parent: Span | None = None
    hop: str | None = None
    attributes: Mapping[str, object] | None = None
    timeout_s: float | None = None
    probe: bool = False
    # Hears each token with the text it adds, from the worker's thread (None: not streamed).
    on_token: Callable[[int, str], None] | None = None
    # The run's session: the session_hash balance policy keeps a session's calls on one replica.
    session: str | None = None
    # A chat, sent instead of ``prompt`` (left ""): the model's chat template, or its server, makes the prompt.
    messages: Messages | None = None
    # The prompt's fixed leading text (a ``cache: prefix`` hop): a backend with a prefix cache reuses its KV.
    prefix: str | None = None
    # The named LoRA adapter to run with (its live version when queued); None: the base model.
    adapter: str | None = None
    # A long prompt (or chat) made ready off the loop before it was queued, by worker (the object: a model swapped in
    # since under the same name tokenizes it again): the text the model gets (a chat's as its template writes it)
    # and its token ids.
    tokens: Mapping[ModelWorker, tuple[str, list[int]]] | None = None


@dataclass(eq=False)
class _Pending:
    """A call awaiting the next flush of its event loop: its span is open, its request not queued yet."""

    call: Call
    span: Span
    done: asyncio.Future[GenerationResult]
    model: str  # the model the call names, without a replica
    index: int | None  # the replica the call pins (``m#1``), or None for the balancer to pick
    request: GenerationRequest | None = None
    started: float = field(default_factory=time.perf_counter)


def backend_for(
    loaded: LoadedModel, tracing: Tracing | None = None, replica: str | None = None, replicas: int = 1
) -> Backend:
    """The backend that runs ``loaded`` (as its ``replica``, ``m#1``, one of ``replicas``): transformers in the child
    process that loaded it, a model server's over HTTP, a Ray actor's (``engine="ray"``; its restarts are spans of
    ``tracing``), else transformers in this process."""
    if loaded.settings.isolation == "process":
        return ProcessBackend(loaded)
    if loaded.settings.remote:
        try:
            from workbench.engine.backends.openai import RemoteBackend  # aiohttp is needed for servers only
        except ImportError as exc:
            raise ModelLoadError(f"model {loaded.name!r} is on a server, and talking to one needs {exc.name}",
                                 hint="pip install 'autoglm-workbench[remote]'") from None
        return RemoteBackend(loaded)
    if loaded.settings.engine == "ray":
        return RayBackend(loaded, tracing, replica, replicas)  # each call starts one more actor: one per replica
    return TransformersBackend(loaded)


# What is configured for a model's next load: its batching policy, where its replicas run, its balance (None: unset).
_Configured = tuple["BatchingPolicy | None", "tuple[str | None, ...] | None", "BalancePolicy | None"]


class Engine:
    """Routes generation requests to a replica of the model they name, and the replica's worker.

    A model has a replica set: one worker (``replicas=1``, the default) or several, each with its
    own backend, queue, breaker, health and faults; its balance policy picks one per request.
    Two doors: :meth:`call` blocks its thread, :meth:`acall` is awaited on an event loop. Calls
    awaited in one tick of a loop reach the model together: they are tokenized in one call and
    queued with one wake-up of each worker, so the hops that a finished batch made ready form the
    next batch at once.
    """

    def __init__(self, registry: ModelRegistry, tracing: Tracing) -> None:
        self._registry = registry
        # isolation="process": the registry loads through a child process, whose restarts are engine spans.
        registry.spawner = functools.partial(ModelProcess, tracing=tracing)
        self._tracing = tracing
        self._lock = threading.Lock()
        self._sets: dict[str, ReplicaSet] = {}
        # Kept across unloads, so a reload batches, replicates and balances the same way.
        self._policies: dict[str, BatchingPolicy] = {}
        self._replicas: dict[str, tuple[str | None, ...]] = {}
        self._balance: dict[str, BalancePolicy] = {}
        self._pending: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        # Prompts tokenized ahead (a map's prefetch), by (worker, prompt), taken once by the request they were for; and
        # prefixes' ids. By the worker object, not its name: a model swapped in under the name never meets the old
        # tokenizer's ids, even those a prefetch still running in the swap stores after it.
        self._tokenized: OrderedDict[tuple[ModelWorker, str], list[int]] = OrderedDict()
        self._prefix_ids: OrderedDict[tuple[ModelWorker, str], list[int]] = OrderedDict()
        self._preparing: dict[tuple[ModelWorker, str], threading.Event] = {}  # prefetches tokenizing now
        self._wakeups: dict[asyncio.AbstractEventLoop, Wakeups] = {}
        self.preloader = Preloader(registry, tracing, self.start, self.stop)

    # -- workers -------------------------------------------------------------------------------

    def start(
        self, name: str, policy: BatchingPolicy | None = None, parent: Span | None = None, trigger: str = "explicit",
        replacing: ReplicaSet | None = None,
    ) -> ReplicaSet:
        """Start the workers of the loaded model ``name``, one per replica, under ``policy`` or the one configured.

        Replicas on the model's own device share its weights (read-only at inference, so one
        copy serves every worker thread); a replica on another device gets a copy there, and a
        replica on a server connects to it (a ``load`` span under ``parent``, for ``trigger``).
        Each worker of a set ``replacing`` another (a live swap) keeps its predecessor's breaker settings
        and injected faults: they belong to the model the user studies, not to one version of its weights.
        """
        loaded = self._registry.get(name)
        chosen = policy or self._policies.get(name)  # set by the user (set_batching), else each kind's default
        policy = chosen or default_policy(loaded.settings)
        with self._lock:
            places = self._replicas.get(name, (None,))
        self.check_replicas(name, loaded.settings)
        models = [
            self._registry.replica(loaded, place, replica_name(name, i, len(places)), parent, trigger)
            for i, place in enumerate(places)
        ]
        # Weights that serve more than one replica (servers and Ray actors hold none here).
        weights = [id(m.model) for m in models if m.model is not None]
        shared = len(set(weights)) < len(weights)
        if shared and policy.continuous:
            raise continuous_on_shared(name)
        backends: list[Backend] = []
        try:
            for i, m in enumerate(models):  # one by one: a failure (or Ctrl-C) at a replica closes those before it
                backends.append(backend_for(m, self._tracing, replica_name(name, i, len(models)), len(models)))
            for backend in backends:
                backend.check(policy)
        except BaseException:
            # Leave nothing running for a model that will not serve: a remote backend holds a client of its
            # server's pool, a Ray backend an actor.
            for backend in backends:
                backend.close()
            raise
        # Until a policy is chosen, a mixed set's replicas each run their kind's default: a server's replica sends
        # each request as it comes (continuous), a replica here generates one at a time.
        workers = [
            ModelWorker(replica_name(name, i, len(backends)), backend,
                        chosen or (ContinuousBatching() if backend.device == REMOTE_DEVICE else policy), self._tracing)
            for i, backend in enumerate(backends)
        ]
        for before, after in zip(replacing.workers if replacing is not None else (), workers):
            after.breaker = CircuitBreaker(after.name, before.breaker.failure_threshold, before.breaker.reset_timeout_s)
            if before.faults is not None:
                after.faults = FaultInjector(before.faults.faults)  # each worker thread draws from its own
        with self._lock:
            # Read now, not before the backends started (tens of seconds on Ray): a set_balance meanwhile counts.
            balance = self._balance.get(name) or RoundRobin()
            replicas = ReplicaSet(name, workers, balance, shared)
            self._sets[name] = replicas
            if chosen is not None:
                self._policies[name] = chosen
            self._balance[name] = balance
        return replicas

    def configure(
        self, name: str, replicas: int | Sequence[str] | None, balance: BalancePolicy | None, remote: bool = False
    ) -> tuple[str | None, ...] | None:
        """How many replicas ``name`` runs (or where: devices and server URLs) from its next load, and how they are
        balanced; ``remote`` says the model loads from a server. None leaves a setting as it is.

        Returns where each replica will run (None: where the model loads), or None if ``replicas`` was.
        """
        places = replica_places(name, replicas, remote) if replicas is not None else None
        if balance is None and places is not None:
            with self._lock:
                kept = self._balance.get(name)
            if kept is not None:  # the balance kept from before must fit the new number of replicas too
                try:
                    kept.check(name, len(places))
                except StrategyError as exc:
                    raise StrategyError(
                        f"model {name!r} keeps the balance {kept.name} from before, which does not fit the "
                        f"{len(places)} replicas asked for now: {exc.message}",
                        hint="give the load a balance for them (balance='round_robin'), or bench.set_balance first",
                    ) from None
        if balance is not None:
            balance.check(name, len(places) if places is not None else self.replica_count(name))
        with self._lock:
            if places is not None:
                self._replicas[name] = places
            if balance is not None:
                self._balance[name] = balance
        return places

    def check_replicas(self, name: str, settings: LoadSettings) -> None:
        """Refuse replicas configured for ``name`` that a model loaded with ``settings`` cannot run (before the load
        spends its time): a child process serves one replica, and Ray takes a count, not a list."""
        with self._lock:
            places = self._replicas.get(name, (None,))
        local = [place for place in places if place is None or not is_server_url(place)]
        if settings.isolation == "process" and len(local) > 1:
            raise ModelLoadError(
                f"model {name!r} runs in a child process (isolation='process'), which serves one replica: "
                f"{len(local)} were asked for",
                hint="load it with replicas=1 (servers may be listed beside it: replicas=['cpu', URL]), or with "
                "isolation='thread' to replicate it",
            )
        if settings.engine == "ray" and any(place is not None for place in places):
            raise SettingsError(f"model {name!r}: engine='ray' takes a count of replicas, not a list of devices",
                                hint="replicas=4 with num_gpus=1 gives each replica's actor a GPU of its own")
        if not settings.remote and len(local) == len(places):
            # No server among the replicas: a server's setting would be dropped without a word.
            given = [f.name for f in dataclasses.fields(settings)
                     if f.name in SERVER_SETTINGS and getattr(settings, f.name) != f.default]
            if given:
                raise ModelLoadError(
                    f"model {name!r}: {' and '.join(given)} {'is a setting' if len(given) == 1 else 'are settings'} "
                    f"of a model on a server (an http(s) URL), and this one loads {settings.source!r} here",
                    hint="drop it, or give the server's URL as the source (or among replicas=[...])",
                )

    def configuration(self, name: str) -> _Configured:
        """What is configured for ``name``'s next load (batching policy, replicas, balance; None: nothing), to put
        back with :meth:`restore` when a load that changed it fails."""
        with self._lock:
            return self._policies.get(name), self._replicas.get(name), self._balance.get(name)

    def restore(self, name: str, saved: _Configured) -> None:
        """Put back what :meth:`configuration` returned; running replicas are left as they are."""
        with self._lock:
            for table, value in zip((self._policies, self._replicas, self._balance), saved):
                if value is None:
                    table.pop(name, None)
                else:
                    table[name] = value

    def forget(self, name: str) -> None:
        """Drop the policies and replicas configured for ``name`` (the model is no longer known)."""
        with self._lock:
            self._policies.pop(name, None)
            self._replicas.pop(name, None)
            self._balance.pop(name, None)

    def stop(self, name: str) -> None:
        with self._lock:
            replicas = self._sets.pop(name, None)
            self._forget_tokens(name)
        if replicas is not None:
            for worker in replicas.workers:
                worker.stop()
                worker.backend.close()

    def close(self) -> None:
        """Stop every model now (the workbench is closing): each backend closes first, so work in flight elsewhere
        (a server's stream, a child process's batch, a Ray actor's call) fails at once, not after it is waited for
        (up to a minute a model, for a server that never answers); then the workers stop."""
        with self._lock:
            sets, self._sets = list(self._sets.values()), {}
        for replicas in sets:
            for worker in replicas.workers:
                worker.backend.close()
        for replicas in sets:
            for worker in replicas.workers:
                worker.stop()

    def swap(self, name: str, parent: Span | None = None) -> ReplicaSet | None:
        """Serve ``name`` from the model the registry holds now (a live swap): new workers take every new request,
        under the same policy, replicas and balance. Returns the old replica set, whose requests still run
        (:meth:`drain` it), or None if none ran."""
        with self._lock:
            old = self._sets.get(name)
        self.start(name, parent=parent, trigger="swap", replacing=old)
        with self._lock:
            self._forget_tokens(name)
        return old

    def _forget_tokens(self, name: str) -> None:
        """Drop the token ids remembered for ``name``'s workers (prompts tokenized ahead, prefixes): no request of
        theirs will take them now. Called holding the lock."""
        for remembered in (self._tokenized, self._prefix_ids):
            for key in [key for key in remembered if key[0].name == name or key[0].name.startswith(name + "#")]:
                del remembered[key]

    def drain(self, replicas: ReplicaSet, timeout: float = 60.0) -> None:
        """Let a replaced replica set finish its queued and running requests, then stop its workers."""
        for worker in replicas.workers:
            worker.drain(timeout)
            worker.backend.close()

    def replica_sets(self) -> dict[str, ReplicaSet]:
        """The running replica sets by model name (a snapshot)."""
        with self._lock:
            return dict(self._sets)

    def workers(self) -> dict[str, ModelWorker]:
        """Every running worker by its name (``m``, or ``m#0``, ``m#1`` for replicas; a snapshot)."""
        return {w.name: w for replicas in self.replica_sets().values() for w in replicas.workers}

    def _resolve(self, name: str) -> tuple[str, int | None]:
        """The model ``name`` names, and the replica it pins (``m#1``), or None for any replica."""
        match = REPLICA_NAME.match(name)
        if match is None or name in self._registry.names():
            return name, None
        model, index = match["model"], int(match["index"])
        with self._lock:
            replicas = self._sets.get(model)
        count = len(replicas.replicas) if replicas is not None else len(self._replicas.get(model, (None,)))
        if model not in self._registry.names() or count == 1:
            return name, None  # not a replica after all: the registry says the name is unknown
        if index >= count:
            raise UnknownModelError(f"model {model!r} has no replica {index}: it has {count}",
                                    hint=f"its replicas are {model}#0 to {model}#{count - 1}")
        return model, index

    def replicas_of(self, name: str) -> list[ModelWorker]:
        """The workers ``name`` stands for: every replica of a model, or the one replica ``m#1`` names."""
        model, index = self._resolve(name)
        with self._lock:
            replicas = self._sets.get(model)
        if replicas is None:
            self._registry.get(model)  # raises the user-facing error: unknown, or registered but not loaded
            raise RuntimeError(f"model {model!r} is loaded but has no workers")
        return replicas.workers if index is None else [replicas.workers[index]]

    def worker(self, name: str) -> ModelWorker:
        """The worker of a model with one replica, or of the replica ``name`` pins (``m#1``)."""
        workers = self.replicas_of(name)
        if len(workers) > 1:
            raise UnknownModelError(f"model {name!r} has {len(workers)} replicas: name one",
                                    hint=f"{name}#0 to {name}#{len(workers) - 1}")
        return workers[0]

    def set_policy(self, name: str, policy: BatchingPolicy) -> None:
        """Swap the batching policy of a model's workers, live: a worker waiting inside the old one gives way at once.

        For a registered model that is not loaded, the policy is kept for when it loads.
        """
        self.check_policy(name, policy)
        with self._lock:
            replicas = self._sets.get(name)
            if replicas is None:
                self._policies[name] = policy
                return
        for worker in replicas.workers:
            worker.set_policy(policy)
        with self._lock:
            self._policies[name] = policy

    def check_policy(self, name: str, policy: BatchingPolicy) -> None:
        """Raise a WorkbenchError if ``name``'s replicas cannot run under ``policy``; a model not loaded only if unknown
        (its backends are not made yet)."""
        with self._lock:
            replicas = self._sets.get(name)
        if replicas is None:
            self._registry.settings(name)  # an unknown model is a clear error
            return
        replicas.check(policy)
        for worker in replicas.workers:
            worker.backend.check(policy)

    def clear_policy(self, name: str) -> None:
        """Forget the policy chosen for ``name``: from its next start each replica runs its kind's default."""
        with self._lock:
            self._policies.pop(name, None)

    def policy(self, name: str) -> BatchingPolicy:
        """The policy ``name`` runs under, or will once it loads."""
        with self._lock:
            replicas = self._sets.get(name)
            configured = self._policies.get(name)
        if replicas is not None:
            return replicas.workers[0].policy
        settings = self._registry.settings(name)  # an unknown model is a clear error
        return configured or default_policy(settings)

    def set_balance(self, name: str, policy: BalancePolicy) -> None:
        """Change how ``name``'s replicas are picked, live; for a model not loaded, from its next load."""
        self.check_balance(name, policy)
        with self._lock:
            self._balance[name] = policy
            replicas = self._sets.get(name)
            if replicas is not None:
                replicas.policy = policy

    def check_balance(self, name: str, policy: BalancePolicy) -> None:
        """Raise StrategyError if ``policy`` cannot pick among the replicas ``name`` runs (or will at its next load)."""
        self._registry.settings(name)  # an unknown model is a clear error
        policy.check(name, self.replica_count(name))

    def replica_count(self, name: str) -> int:
        """How many replicas ``name`` runs now, or will at its next load."""
        with self._lock:
            running = self._sets.get(name)
            if running is not None:
                return len(running.replicas)
            return len(self._replicas.get(name) or (None,))

    def balance(self, name: str) -> BalancePolicy:
        """The balance policy ``name``'s replicas are picked by, or will be once it loads."""
        self._registry.settings(name)
        with self._lock:
            return self._balance.get(name) or RoundRobin()

    # -- resilience state ----------------------------------------------------------------------

    def inject(self, faults: Faults) -> None:
        """Inject ``faults`` into the batches of their model's replicas (or the one replica named), replacing earlier ones."""
        for worker in self.replicas_of(faults.model):
            worker.faults = FaultInjector(faults)

    def clear_faults(self, model: str | None = None) -> None:
        for worker in (self.workers().values() if model is None else self.replicas_of(model)):
            worker.faults = None

    def faults(self) -> dict[str, Faults]:
        return {name: w.faults.faults for name, w in self.workers().items() if w.faults is not None}

    def set_breaker(self, model: str, failure_threshold: int, reset_timeout_s: float) -> None:
        for worker in self.replicas_of(model):
            worker.breaker = CircuitBreaker(worker.name, failure_threshold, reset_timeout_s)

    # -- requests ------------------------------------------------------------------------------

    def _ready(self, name: str, parent: Span) -> ReplicaSet:
        """The replica set of ``name``, loading the model first if it is registered but not loaded (lazy on use)."""
        with self._lock:
            replicas = self._sets.get(name)
        if replicas is None:
            self.preloader.load(name, parent=parent, trigger="on_use")
            with self._lock:
                replicas = self._sets.get(name)
            if replicas is None:
                self._registry.get(name)  # unloaded again meanwhile: the user-facing error
                raise RuntimeError(f"model {name!r} is loaded but has no workers")
        return replicas

    def _open(self, call: Call, model: str) -> Span:
        """Start the request's span (``text_completion {model}``); the worker ends it, so it spans the whole request."""
        settings = self._registry.settings(model)  # an unknown model fails here, before any span
        params = call.params
        attributes: dict[str, object] = {
            attr.SPAN_KIND: attr.KIND_LLM,
            **openinference.request(settings.source, params),
            attr.OPERATION_NAME: attr.TEXT_COMPLETION if call.messages is None else attr.CHAT,
            attr.PROVIDER_NAME: attr.PROVIDER,
            attr.REQUEST_MODEL: model,
            attr.REQUEST_MAX_TOKENS: params.max_new_tokens,
            attr.REQUEST_TEMPERATURE: params.temperature,
            attr.REQUEST_TOP_P: params.top_p,
            attr.MODEL_NAME: model,
            **openinference.input_value(call.prompt if call.messages is None else call.messages),
        }
        if call.messages is not None:
            attributes.update(openinference.input_messages(call.messages))
        if call.hop:
            attributes[attr.HOP_NAME] = call.hop
        if params.top_k:
            attributes[attr.REQUEST_TOP_K] = params.top_k
        if params.seed is not None:
            attributes[attr.REQUEST_SEED] = params.seed
        if call.probe:
            attributes[attr.PROBE] = True
        if call.attributes:
            attributes.update(call.attributes)
        # Without a parent, a request asked for directly (bench.generate) is a run of its own.
        span = self._tracing.start_span(
            f"{attr.TEXT_COMPLETION} {call.model}", call.parent, attributes=attributes, run=True
        )
        self.preloader.begin_use(model)  # from here until served, keep-warm will not evict it
        return span

    def _place(
        self, replicas: ReplicaSet, calls: list[tuple[Call, Span, int | None]], started: float,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> list[GenerationRequest | BaseException]:
        """Pick a replica for each call (or the one it pins) and queue each replica's calls with one wake-up.

        Each call is counted in flight on its replica as it is picked, so the next pick of the
        same tick already sees it. Answers in the order of ``calls``, as :meth:`_enqueue` does.
        """
        groups: dict[int, tuple[Replica, list[int]]] = {}
        every_sick = _every_sick(replicas)
        for slot, (call, span, index) in enumerate(calls):
            replica = replicas.pick(call.session, index)
            if len(replicas.replicas) > 1:
                span.set_attributes({attr.REPLICA: replica.name, attr.BALANCE_POLICY: replicas.policy.name})
            groups.setdefault(replica.index, (replica, []))[1].append(slot)
        answers: list[GenerationRequest | BaseException | None] = [None] * len(calls)
        for replica, slots in groups.values():
            try:
                placed = self._enqueue(replicas.model, replica.worker, [calls[i][:2] for i in slots], started, loop)
            except BaseException as exc:  # the backend could not tokenize: every call of the group fails alike
                placed = [exc] * len(slots)
            for slot, answer in zip(slots, placed):
                # A call that pins its replica (m#1) asked for that one alone.
                if every_sick and isinstance(answer, (CircuitOpen, ModelUnhealthy)) and calls[slot][2] is None \
                        and every_sick not in answer.message:
                    answer.args = (f"{answer.message}; {every_sick}", *answer.args[1:])
                answers[slot] = answer
                # A health probe is in flight while it runs, but not served or failed work of the replica's callers.
                counted = not calls[slot][0].probe
                if isinstance(answer, GenerationRequest):
                    answer.future.add_done_callback(_finisher(replicas, replica, counted))
                else:
                    replicas.finished(replica, ok=False, counted=counted)
        return answers  # type: ignore[return-value]  # every slot is filled: each call is in one group

    def _enqueue(
        self, model: str, worker: ModelWorker, calls: list[tuple[Call, Span]], started: float,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> list[GenerationRequest | BaseException]:
        """Tokenize ``calls`` in one backend call and queue those that may run with one wake-up of ``model``'s worker
        (or, from ``loop``'s thread, on the worker's loop lane; see :meth:`ModelWorker.submit_many`).

        Each slot of the answer is the queued request, or the error that kept it out (its span
        then ended with that error).
        """
        backend = worker.backend
        try:
            ready = self._take_tokenized(worker, calls)
            ahead = [call.tokens.get(worker) if call.tokens is not None else None for call, _ in calls]
            prompts = _prompts(backend, model, [call for call, _ in calls], ready, _uncounted(worker), ahead)
        except BaseException as exc:
            for call, span in calls:
                self._refuse(model, span, exc)
            raise
        tokenize_ms = (time.perf_counter() - started) * 1e3
        answers: list[GenerationRequest | BaseException] = []
        queued: list[GenerationRequest] = []
        for (call, span), prompt in zip(calls, prompts):
            try:
                if isinstance(prompt, BaseException):
                    raise prompt
                text, counted = prompt
                if counted is not None:
                    check_not_empty(text, counted, model, call.hop)
                ids, truncated = ([], 0) if counted is None else fit_window(
                    counted, call.params, backend.context_window, model, call.hop)
                prefix_len = self._prefix_len(worker, call.prefix, ids) if call.prefix else 0
                lease = _adapter_lease(worker, call, model) if call.adapter is not None else None
                try:
                    trial = False if call.probe else _admit(worker, span)
                except BaseException:
                    _release_lease(backend, lease)
                    raise
            except Exception as exc:
                self._refuse(model, span, exc)
                # A refusal of the workbench's own says all in its message; its traceback would keep this frame, and
                # with it every prompt's token ids (megabytes for a prompt far past the window), for as long as the
                # run that holds the error is kept.
                answers.append(exc.with_traceback(None) if isinstance(exc, WorkbenchError) else exc)
                continue
            if lease is not None:
                span.set_attributes({attr.ADAPTER_NAME: lease.name, attr.ADAPTER_VERSION: lease.version,
                                     attr.ADAPTER_KEY: lease.key})
            span.set_attributes(
                {
                    attr.MODEL_DEVICE: backend.device,
                    attr.MODEL_DTYPE: backend.dtype,
                    # Sent uncounted: the server's usage says, when the request ends.
                    **({attr.USAGE_INPUT_TOKENS: len(ids), **openinference.token_counts(len(ids))}
                       if counted is not None else {attr.PROMPT_UNCOUNTED: True}),
                    attr.TOKENIZE_MS: tokenize_ms,
                    **({attr.TRUNCATED_TOKENS: truncated} if truncated else {}),
                    **({attr.PREFETCHED: True} if call.messages is None and call.prompt in ready else {}),
                }
            )
            request = GenerationRequest(
                worker.name, ids, call.params, span, hop=call.hop, truncated_tokens=truncated, prompt=text,
                messages=call.messages, probe=call.probe,
                # Awaited on a loop, a call is cancelled with its task too (a stream left early, a run cancelled or
                # cut off by its client), so its row must stop as a timed-out one does.
                cancellable=call.timeout_s is not None or loop is not None, trial=trial, on_token=call.on_token, prefix_len=prefix_len,
                adapter=lease.key if lease is not None else None,
            )
            request.future.add_done_callback(lambda _: self.preloader.end_use(model))
            if lease is not None:  # the version stays loaded until the request is done with it
                request.future.add_done_callback(functools.partial(_release_after, backend, lease))
            queued.append(request)
            answers.append(request)
        if queued:
            try:
                worker.submit_many(queued, loop)
            except BaseException as exc:
                for request in queued:
                    if request.trial:
                        worker.breaker.record(exc, request.span, True)  # never ran: hand the trial on
                    mark_error(request.span, exc)
                    request.span.end()
                    self.preloader.end_use(model)  # never queued, so the future's callback never runs
                    if request.adapter is not None:
                        _release_lease(backend, _lease_of(request))
                answers = [exc if isinstance(a, GenerationRequest) else a for a in answers]
        return answers

    # -- caches and prefetch --------------------------------------------------------------------

    def identity(self, name: str) -> dict[str, Any] | None:
        """What an answer of model ``name`` depends on (source, revision, device, dtype, adapter, file fingerprints),
        for cache keys; None while it is not loaded (where it runs, and in what dtype, is known once it has).

        Taken when the model loaded (a reload of a new version in its directory gives a new identity).
        """
        model, _ = self._resolve(name)
        try:
            return self._registry.get(model).identity
        except UnknownModelError:
            return None

    def adapter_identity(self, name: str, adapter: str) -> str | None:
        """What an answer of ``adapter`` on model ``name`` depends on, for cache keys: its name and the digest of its
        live version's files (so a hot swap to new weights is a new key; the same files again, the same key).
        None where no replica serves it, or the model is not loaded yet (the call itself then loads it or says why)."""
        model, _ = self._resolve(name)
        if not self._registry.is_loaded(model):
            return None
        for worker in self.replicas_of(name):
            adapters: AdapterSet | None = getattr(worker.backend, "adapters", None)
            live = adapters.live(adapter) if adapters is not None else None
            if live is not None:
                return f"{adapter}:{live.digest}"
        return None

    def _prefix_len(self, worker: ModelWorker, prefix: str, ids: list[int]) -> int:
        """How many leading ``ids`` are the tokens of ``prefix``, for a backend with a prefix cache (else 0).

        The prefix's last token is left to the suffix: the text after it may merge with it (``": "`` then
        ``"What"`` tokenizes as ``":"``, ``" What"``), and leaving it out gives every prompt of a template the
        same prefix, so one KV serves them all. Then compared token by token, so a prefix is never reused
        where the prompt's tokens differ; at least one token stays out, for the first step.
        """
        if getattr(worker.backend, "prefix_cache", None) is None:
            return 0
        prefix_ids = self._tokens_of_prefix(worker, prefix)[:-1]
        limit = min(len(prefix_ids), len(ids) - 1)
        count = 0
        while count < limit and ids[count] == prefix_ids[count]:
            count += 1
        return count

    def _tokens_of_prefix(self, worker: ModelWorker, prefix: str) -> list[int]:
        key = (worker, prefix)
        with self._lock:
            ids = self._prefix_ids.get(key)
        if ids is None:
            ids = worker.backend.tokenize([prefix])[0]
            with self._lock:  # the loop's thread and a map's prefetch (in the hop pool) both come here
                self._prefix_ids[key] = ids
                while len(self._prefix_ids) > _MAX_REMEMBERED:
                    self._prefix_ids.popitem(last=False)
        return ids

    def prepare_prompt(self, model: str, prompt: str, prefix: str | None = None, params: GenerationParams | None = None,
                       hop: str | None = None) -> None:
        """Get a prompt ready before it is sent (a map's prefetch): tokenize it for each replica of ``model`` and,
        where its backend has a prefix cache, make sure ``prefix``'s KV is cached. Blocks: call it off the loop.

        Given the call's ``params``, a replica that will not tokenize the prompt when it is queued is left out: one
        that refuses it by its length alone, or sends it uncounted (see :func:`_tokenizes`).
        """
        for worker in self.replicas_of(model):
            backend = worker.backend
            if params is not None and not _tokenizes(worker, prompt, params, model, hop, chat=False):
                continue
            key = (worker, prompt)
            with self._lock:  # one tokenizing of a prompt at a time; a long call's own waits for it (_prefetched)
                ids, tokenizing = self._tokenized.get(key), self._preparing.get(key)
                mine = ids is None and tokenizing is None
                if mine:
                    tokenizing = self._preparing[key] = threading.Event()
            if mine:
                assert tokenizing is not None
                try:
                    ids = backend.tokenize([prompt])[0]
                    with self._lock:
                        self._tokenized[key] = ids
                        while len(self._tokenized) > _MAX_REMEMBERED:
                            self._tokenized.popitem(last=False)
                finally:
                    with self._lock:
                        self._preparing.pop(key, None)
                    tokenizing.set()
            elif ids is None:
                ids = self._prefetched(worker, prompt)
                if ids is None:
                    continue  # the other prefetch failed; the call will say why
            if prefix and getattr(backend, "prefix_cache", None) is not None:
                count = self._prefix_len(worker, prefix, ids)
                if count:
                    backend.warm_prefix(ids[:count])  # type: ignore[attr-defined]

    def _prefetched(self, worker: ModelWorker, prompt: str) -> list[int] | None:
        """The ids a map's prefetch made of ``prompt`` for ``worker``, waiting for one that is tokenizing it now; left
        for the queueing to take (and say so on the span). Blocks: off the loop."""
        key = (worker, prompt)
        with self._lock:
            ids, tokenizing = self._tokenized.get(key), self._preparing.get(key)
        if ids is None and tokenizing is not None:
            tokenizing.wait()
            with self._lock:
                ids = self._tokenized.get(key)
        return ids

    def _take_tokenized(self, worker: ModelWorker, calls: list[tuple[Call, Span]]) -> dict[str, list[int]]:
        """The prompts of ``calls`` tokenized ahead for ``worker``, each taken once."""
        if not self._tokenized:
            return {}
        with self._lock:
            return {call.prompt: ids for call, _ in calls if call.messages is None
                    and (ids := self._tokenized.pop((worker, call.prompt), None)) is not None}

    def prefix_caches(self) -> dict[str, object]:
        """The prefix cache of each worker whose backend has one, by worker name."""
        return {name: cache for name, worker in self.workers().items()
                if (cache := getattr(worker.backend, "prefix_cache", None)) is not None}

    def clear_prefix_caches(self, model: str | None = None) -> None:
        """Drop the cached prefix KV of ``model``'s workers (or every worker), and prompts tokenized ahead."""
        workers = self.workers().values() if model is None else self.replicas_of(model)
        for worker in workers:
            cache = getattr(worker.backend, "prefix_cache", None)
            if cache is not None:
                cache.clear()
        with self._lock:
            self._tokenized.clear()

    def _refuse(self, model: str, span: Span, exc: BaseException) -> None:
        self.preloader.end_use(model)
        mark_error(span, exc)
        span.end()

    def submit(
        self,
        model: str,
        prompt: str,
        params: GenerationParams,
        parent: Span | None = None,
        hop: str | None = None,
        *,
        attributes: Mapping[str, object] | None = None,
        cancellable: bool = False,
        probe: bool = False,
        adapter: str | None = None,
    ) -> GenerationRequest:
        """Tokenize ``prompt`` here, in the caller's thread, and queue it for ``model``; the request's future answers.

        The request's span starts now, as a child of ``parent``, and the worker ends it, so its
        duration is the request's end-to-end latency. A registered model that is not loaded
        loads first, in a ``load`` span under the request's. A model out of rotation fails fast:
        ModelUnhealthy after a failed health probe, CircuitOpen while its breaker is open. A
        ``probe`` (health check) passes both gates and counts for neither; ``cancellable`` lets
        a timeout stop the request's row mid-batch.
        """
        call = Call(model, prompt, params, parent, hop, attributes, 0.0 if cancellable else None, probe,
                    adapter=adapter)
        model, index = self._resolve(model)
        span = self._open(call, model)
        started = time.perf_counter()
        try:
            replicas = self._ready(model, span)
        except BaseException as exc:
            self._refuse(model, span, exc)
            raise
        (answer,) = self._place(replicas, [(call, span, index)], started)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def call(
        self,
        model: str,
        prompt: str,
        params: GenerationParams,
        parent: Span | None = None,
        hop: str | None = None,
        *,
        timeout_s: float | None = None,
        attributes: Mapping[str, object] | None = None,
        probe: bool = False,
    ) -> GenerationResult:
        """Submit one prompt and wait for its result in this thread, at most ``timeout_s`` seconds.

        On timeout the request is cancelled, dropped from the queue if no batch took it yet, or
        its row stopped in the running batch while its batch-mates finish (under ContinuousBatching
        it leaves the scheduler at its next step), and HopTimeout is raised. A Ctrl-C cancels it alike.
        """
        request = self.submit(model, prompt, params, parent, hop, attributes=attributes, cancellable=True, probe=probe)
        return self._wait(request, model, hop, timeout_s)

    def generate(
        self, model: str, prompt: str, params: GenerationParams | None = None, adapter: str | None = None
    ) -> GenerationResult:
        """Submit one prompt and wait for its result (a convenience for scripts and tests); ``adapter`` names one.

        A Ctrl-C while it waits cancels the request (its row stops) and goes on as KeyboardInterrupt."""
        request = self.submit(model, prompt, params or GenerationParams(), cancellable=True, adapter=adapter)
        return self._wait(request, model, None, None)

    def _wait(
        self, request: GenerationRequest, model: str, hop: str | None, timeout_s: float | None
    ) -> GenerationResult:
        """Wait in this thread for ``request``, at most ``timeout_s`` (HopTimeout); a timeout or a Ctrl-C cancels it."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
                try:
                    return request.future.result(timeout=max(left, 0.0))  # wakes for a Ctrl-C between waits
                except FutureTimeout:
                    if deadline is None or time.monotonic() < deadline:
                        continue
                error = _timeout(model, hop, timeout_s)
                if self._cancel(request, error):
                    raise error from None
                return request.future.result()  # it finished just as the wait ran out
        except KeyboardInterrupt:
            self._cancel(request, RunCancelled(f"the call to model {model!r} was interrupted (Ctrl-C)"))
            raise

    async def acall(self, call: Call) -> GenerationResult:
        """Await one model call on the running event loop; the same gates, spans and timeout as :meth:`call`.

        The call is queued at the end of this tick of the loop together with every other call
        made in it. Cancelling the awaiting task cancels the request (RunCancelled on its span).
        """
        loop = asyncio.get_running_loop()
        model, index = self._resolve(call.model)
        span = self._open(call, model)
        started, timeout_s = time.perf_counter(), call.timeout_s
        if (len(call.prompt) if call.messages is None else sum(len(m["content"]) for m in call.messages)) \
                > LONG_PROMPT_CHARS:
            # Tokenized off the loop (a million characters take ~0.7 s here, in which no other chain on the loop
            # would move), within the call's timeout.
            try:
                ahead = await asyncio.wait_for(loop.run_in_executor(None, self._tokenize_ahead, model, index, call),
                                               timeout_s)
            except asyncio.TimeoutError:
                error = _timeout(call.model, call.hop, timeout_s)
                self._refuse(model, span, error)
                raise error from None
            except asyncio.CancelledError:
                self._refuse(model, span, RunCancelled(f"the run was cancelled while model {call.model!r} ran"))
                raise
            if ahead:
                call = dataclasses.replace(call, tokens=ahead)
            if timeout_s is not None:
                timeout_s = max(timeout_s - (time.perf_counter() - started), 1e-3)
        pending = _Pending(call, span, loop.create_future(), model, index, started=started)
        batch = self._pending.get(loop)
        if batch is None:
            batch = self._pending[loop] = []
            loop.call_soon(self._flush, loop)
        batch.append(pending)
        try:
            return await asyncio.wait_for(pending.done, timeout_s)
        except asyncio.TimeoutError:
            error = _timeout(call.model, call.hop, call.timeout_s)
            if pending.request is None or self._cancel(pending.request, error):
                raise error from None
            return pending.request.future.result()
        except asyncio.CancelledError:
            if pending.request is not None:
                self._cancel(pending.request, RunCancelled(f"the run was cancelled while model {call.model!r} ran"))
            raise

    def _tokenize_ahead(self, model: str, index: int | None, call: Call) -> dict[ModelWorker, tuple[str, list[int]]]:
        """A long prompt's text (a chat's by its template) and token ids for each replica of ``model`` (the one
        ``index`` pins) that would tokenize it when queued: not one that refuses it by its length, one that sends it
        uncounted, or a server that renders the chat. Blocks: off the loop. A prompt that fails to render or tokenize
        is left out, for the queueing to try again and say why."""
        with self._lock:
            replicas = self._sets.get(model)
        if replicas is None:  # not loaded yet: queued once it is
            return {}
        ahead: dict[ModelWorker, tuple[str, list[int]]] = {}
        for replica in replicas.replicas:
            worker = replica.worker
            if index is not None and replica.index != index:
                continue
            backend = worker.backend
            try:
                text = call.prompt if call.messages is None else backend.chat_prompt(call.messages, call.hop)
                if text is None or not _tokenizes(worker, text, call.params, model, call.hop, call.messages is not None):
                    continue
                ids = self._prefetched(worker, text) if call.messages is None else None
                ahead[worker] = (text, ids if ids is not None else
                                 backend.tokenize([text], special_tokens=call.messages is None)[0])
            except Exception:  # said when it is queued, on the loop
                continue
        return ahead

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Queue every call awaited in the loop's last tick: per replica, one tokenization and one wake-up."""
        batch = self._pending.pop(loop, [])
        by_model: dict[str, list[_Pending]] = {}
        for pending in batch:
            if pending.done.done():  # cancelled (or timed out) before it was queued
                self._refuse(pending.model, pending.span, RunCancelled("the call was cancelled before it ran"))
            else:
                by_model.setdefault(pending.model, []).append(pending)
        for model, pendings in by_model.items():
            with self._lock:
                replicas = self._sets.get(model)
            if replicas is None:  # registered, not loaded: load off the loop, then queue
                loop.run_in_executor(None, self._load_and_enqueue, loop, model, pendings)
            else:
                self._queue(loop, replicas, pendings)

    def _load_and_enqueue(self, loop: asyncio.AbstractEventLoop, model: str, pendings: list[_Pending]) -> None:
        try:
            replicas = self._ready(model, pendings[0].span)
        except BaseException as exc:
            loop.call_soon_threadsafe(self._fail_pending, pendings, exc)
            return
        loop.call_soon_threadsafe(self._queue, loop, replicas, pendings)

    def _fail_pending(self, pendings: list[_Pending], exc: BaseException) -> None:
        for pending in pendings:
            self._refuse(pending.model, pending.span, exc)
            if not pending.done.done():
                pending.done.set_exception(exc)

    def _queue(self, loop: asyncio.AbstractEventLoop, replicas: ReplicaSet, pendings: list[_Pending]) -> None:
        live = [p for p in pendings if not p.done.done()]
        for pending in pendings:
            if pending.done.done():
                self._refuse(pending.model, pending.span, RunCancelled("the call was cancelled before it ran"))
        if not live:
            return
        calls = [(p.call, p.span, p.index) for p in live]
        answers = self._place(replicas, calls, min(p.started for p in live), loop)
        for pending, answer in zip(live, answers):
            if isinstance(answer, BaseException):
                pending.done.set_exception(answer)
            else:
                pending.request = answer
                answer.future.add_done_callback(self._wakeups_for(loop).resolver(pending.done))

    def _wakeups_for(self, loop: asyncio.AbstractEventLoop) -> Wakeups:
        wakeups = self._wakeups.get(loop)  # only the loop's own thread adds its entry
        if wakeups is None:
            wakeups = self._wakeups[loop] = Wakeups(loop)
        return wakeups

    def _cancel(self, request: GenerationRequest, error: BaseException) -> bool:
        """Fail ``request`` with ``error`` now (its worker drops or stops it); False if it had finished."""
        worker = self.workers().get(request.model)  # the request names the replica that holds it
        if worker is None:
            return False
        return worker.cancel(request, error)


def _prompts(
    backend: Backend, model: str, calls: list[Call], ready: Mapping[str, list[int]] | None = None,
    uncounted: Callable[[str, int], bool] | None = None, ahead: Sequence[tuple[str, list[int]] | None] | None = None,
) -> list[tuple[str, list[int] | None] | BaseException]:
    """Each call's prompt text and token ids, or the error that keeps it out: a chat's by the model's chat template.

    Plain prompts tokenize in one backend call, chats in another (their template writes the special tokens).
    A chat its template refuses fails alone; a failed tokenization raises, failing every call alike.
    ``ready`` holds plain prompts tokenized ahead (a map's prefetch), which are not tokenized again.
    A plain prompt ``uncounted(prompt, max_new_tokens)`` lets through gets None for its ids: it goes out
    without being tokenized here (see :func:`_uncounted`). A long prompt (a chat's as its template writes it) that
    cannot fit ``model``'s window by its length alone gets ContextWindowExceeded, untokenized (see LONG_PROMPT_CHARS).
    ``ahead`` holds, by call, the text and ids of a long prompt made ready off the loop (see Engine.acall), or None.
    """
    if ahead is not None and any(a is not None for a in ahead):
        rest = [i for i, a in enumerate(ahead) if a is None]
        answers: list[tuple[str, list[int] | None] | BaseException] = list(ahead)  # type: ignore[arg-type]
        for i, answer in zip(rest, _prompts(backend, model, [calls[i] for i in rest], ready, uncounted) if rest else []):
            answers[i] = answer
        return answers
    codec = getattr(backend, "codec", None)
    token_chars = codec.token_chars if codec is not None else None
    if all(call.messages is None for call in calls):  # the common case, in one pass
        known = ready or {}
        refused = [past_window(call.prompt, call.params, backend.context_window, token_chars, model, call.hop)
                   if len(call.prompt) > LONG_PROMPT_CHARS and call.prompt not in known else None for call in calls]
        skip = [refusal is not None or uncounted is not None and call.prompt not in known
                and uncounted(call.prompt, call.params.max_new_tokens) for call, refusal in zip(calls, refused)]
        todo = [call.prompt for call, skipped in zip(calls, skip) if not skipped and call.prompt not in known]
        fresh = dict(zip(todo, backend.tokenize(todo))) if todo else {}
        return [refusal or (call.prompt, None if skipped else known.get(call.prompt, fresh.get(call.prompt)))
                for call, skipped, refusal in zip(calls, skip, refused)]
    answers = []
    for call in calls:
        try:
            text = call.prompt if call.messages is None else backend.chat_prompt(call.messages, call.hop)
        except Exception as exc:
            answers.append(exc)
            continue
        refusal = past_window(text, call.params, backend.context_window, token_chars, model, call.hop) \
            if text is not None and len(text) > LONG_PROMPT_CHARS else None
        # None: the server renders and counts it
        answers.append(refusal or ((text, []) if text is not None else ("", None)))
    for chat in (False, True):
        slots = [i for i, (call, answer) in enumerate(zip(calls, answers))
                 if (call.messages is not None) == chat and isinstance(answer, tuple) and (answer[0] or not chat)]
        if slots:
            texts = [answers[i][0] for i in slots]  # type: ignore[index]
            for i, text, ids in zip(slots, texts, backend.tokenize(texts, special_tokens=not chat)):
                answers[i] = (text, ids)
    return answers


def _tokenizes(worker: ModelWorker, text: str, params: GenerationParams, model: str, hop: str | None, chat: bool) -> bool:
    """Whether queueing a prompt of ``text`` on ``worker`` tokenizes it: not when the worker refuses it by its length
    alone, nor when a plain prompt goes out uncounted. Tokenizing it ahead (off the loop) is then worth doing."""
    backend = worker.backend
    codec = getattr(backend, "codec", None)
    if past_window(text, params, backend.context_window, codec.token_chars if codec is not None else None, model,
                   hop) is not None:
        return False
    uncounted = None if chat else _uncounted(worker)
    return uncounted is None or not uncounted(text, params.max_new_tokens)


def _uncounted(worker: ModelWorker) -> Callable[[str, int], bool] | None:
    """Which plain prompts may go to ``worker``'s backend untokenized: where it says a prompt surely fits (a
    server's, :meth:`~workbench.engine.backends.openai.RemoteBackend.fits_uncounted`) and the policy never
    weighs requests by their length (a continuous one, or one request at a time)."""
    fits: Callable[[str, int], bool] | None = getattr(worker.backend, "fits_uncounted", None)
    policy = worker.policy
    return fits if fits is not None and (policy.continuous or isinstance(policy, NoBatching)) else None


# How often a blocking call's wait returns to Python: a Ctrl-C (interrupt_main, or any signal on Windows) is only
# seen between bytecodes, not inside a lock's wait.
_POLL_S = 0.1

# A plain prompt longer than this that cannot fit the context window by its length alone is refused untokenized
# (see past_window); a shorter one is tokenized, so its refusal says how many tokens it is.
# The same length makes the codec let Python's lock go while it tokenizes (TextCodec.LONG_CHARS), and makes a call
# make its prompt ready off the loop (Engine.acall): a prompt the loop tokenizes itself is short.
LONG_PROMPT_CHARS = TextCodec.LONG_CHARS

# How many prompts tokenized ahead, and prefixes' token ids, the engine remembers.
_MAX_REMEMBERED = 4096


def _finisher(
    replicas: ReplicaSet, replica: Replica, counted: bool = True
) -> Callable[[Future[GenerationResult]], None]:
    """A done-callback that takes a finished request off its replica's in-flight count (and counts it served or
    failed, unless not ``counted``)."""

    def finished(future: Future[GenerationResult]) -> None:
        # exception() raises on a cancelled future, which would leave the request counted in flight for ever
        replicas.finished(replica, ok=not future.cancelled() and future.exception() is None, counted=counted)

    return finished


def _adapter_lease(worker: ModelWorker, call: Call, model: str) -> AdapterLease:
    """Pin the live version of ``call.adapter`` on ``worker``'s model; AdapterError where it serves none by that name.

    Only the in-process transformers backend serves named adapters (process, Ray and server backends
    refuse them), and only under padded batching (its ``check`` refuses continuous batching).
    """
    where = f"hop {call.hop!r}: " if call.hop else ""
    adapters: AdapterSet | None = getattr(worker.backend, "adapters", None)
    if adapters is None:
        raise AdapterError(
            f"{where}model {model!r} serves no named adapters, so it cannot run adapter {call.adapter!r}",
            hint="load it with adapters={NAME: PATH} (in this process: isolation='thread', engine='local')")
    return adapters.acquire(call.adapter or "", where)


def _lease_of(request: GenerationRequest) -> AdapterLease:
    name, _, version = (request.adapter or "").rpartition("@v")
    return AdapterLease(name, int(version), request.adapter or "")


def _release_lease(backend: Backend, lease: AdapterLease | None) -> None:
    adapters: AdapterSet | None = getattr(backend, "adapters", None)
    if lease is not None and adapters is not None:
        adapters.release(lease)


def _release_after(backend: Backend, lease: AdapterLease, _: Future[GenerationResult]) -> None:
    _release_lease(backend, lease)


def _timeout(model: str, hop: str | None, timeout_s: float | None) -> HopTimeout:
    where = f"hop {hop!r}" if hop else "the request"
    return HopTimeout(
        f"{where}: model {model!r} gave no answer within {timeout_s:g} s, so the request was cancelled",
        hint="raise the hop's timeout_s, or give the hop retry or a fallback",
    )


def _every_sick(replicas: ReplicaSet) -> str | None:
    """What a refusal adds when every replica of ``replicas`` (two or more) is out of rotation, so the one picked is
    as sick as the rest: each replica and why. None while any replica serves."""
    if len(replicas.replicas) < 2:
        return None
    why = []
    for replica in replicas.replicas:
        worker = replica.worker
        if worker.health.serving and worker.breaker.state == CLOSED:
            return None
        why.append(f"{replica.name} " + ("failed its last health probe" if not worker.health.serving else
                                         f"has its breaker {worker.breaker.state.replace('_', '-')}"))
    return f"every replica of {replicas.model!r} is out of rotation: {', '.join(why)}"


def _admit(worker: ModelWorker, span: Span) -> bool:
    """Fail fast if ``worker``'s model is out of rotation; True when the request is the breaker's half-open trial."""
    if not worker.health.serving:
        raise ModelUnhealthy(
            f"model {worker.name!r} is out of rotation: its last health probe failed ({worker.health.error})",
            hint="it returns when a probe passes (bench.check_health() probes now); give the hop a fallback",
        )
    return worker.breaker.admit(span)
