"""Ray replicas (``engine="ray"``): each replica of a model is a Ray actor, on a local Ray or an existing cluster.

The parent side (:class:`RayBackend`) tokenizes here with the model's tokenizer and sends token
ids and generation settings; the actor (:class:`ModelActor`) loads the model with the
registry's own loading code and runs a :class:`TransformersBackend`. Results, timings and
streamed tokens come back as plain data (lists, dicts of numbers and strings), never tensors;
Ray's actor calls carry them with Ray's own serialization. Ray is imported only when a model
asks for it, so the package imports without it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry.trace import INVALID_SPAN

from workbench.engine.backends.base import (
    BackendOutOfMemory,
    BatchTiming,
    OnError,
    OnResult,
    RowCancels,
    Scheduler,
    TokenSink,
    next_batch_id,
)
from workbench.engine.backends.codec import TextCodec
from workbench.engine.requests import GenerationParams, GenerationRequest, GenerationResult
from workbench.errors import ModelActorDied, ModelLoadError, StrategyError, WorkbenchError
from workbench.models.registry import LoadedModel
from workbench.models.settings import LoadSettings
from workbench.tracing import Tracing, mark_error
from workbench.tracing import attributes as attr

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from workbench.engine.batching import BatchingPolicy

RAY_HINT = "pip install 'autoglm-workbench[ray]'"
# How long a replica's actor may take to be placed and load its model before the load fails. Placing
# waits for resources the cluster may never have (num_gpus=1 on a CPU cluster), so it cannot wait forever.
READY_TIMEOUT_S = float(os.environ.get("AUTOGLM_RAY_READY_TIMEOUT_S", "300"))
# How long a cluster's address may take to accept a connection before the load fails. ray.init gives an address where
# nothing listens 20 tries of about 41 s each (14 minutes, in Ray 2.60), saying nothing but its own log lines meanwhile.
REACH_TIMEOUT_S = float(os.environ.get("AUTOGLM_RAY_REACH_TIMEOUT_S", "10"))
# How often a batch with a timeout on some row looks for rows to stop while it waits for the actor.
_CANCEL_POLL_S = 0.05


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ModelLoadError("engine='ray' needs Ray, which is not installed here", hint=RAY_HINT) from None
    return ray


# The connection to Ray that connect() made (not the caller's own ray.init): the address it was asked for (None: a
# local Ray started here) and the GCS address it reached; and how many replicas are open on Ray. release() ends
# that connection once none is, so closing a workbench leaves no Ray of its own running.
_connection_lock = threading.Lock()
_ours: tuple[str | None, str] | None = None
_open = 0


def connect(settings: LoadSettings) -> Any:
    """Ray, connected: this process's connection if it has one, else to ``settings.address``, else a new local Ray.

    A process connects to one Ray. An address that is not the one an earlier load of this process connected to
    is refused rather than ignored (its replicas would silently run on the other Ray).
    """
    global _ours
    ray = _ray()
    if ray.is_initialized():
        with _connection_lock:
            ours = _ours
        if ours is not None and settings.address is not None and settings.address != ours[0]:
            where = f"the Ray cluster at {ours[0]!r}" if ours[0] else "a local Ray started for an earlier load"
            raise ModelLoadError(
                f"address={settings.address!r}: this process is already connected to {where}, and a process "
                "connects to one Ray at a time",
                hint=f"load it on that Ray ({'address=' + repr(ours[0]) if ours[0] else 'leave address= out'}), or "
                "unload this workbench's Ray models and call ray.shutdown() first",
            )
        connected = _gcs(ray) if ours is None and settings.address not in (None, "auto") else ""
        if connected and not _names(ray, settings.address, connected):  # (a Ray Client connection has no GCS here)
            # Its replicas went to the Ray connected, with nothing said, wherever the address pointed.
            raise ModelLoadError(
                f"address={settings.address!r}: this process is already connected to the Ray at {connected} (by a "
                "ray.init of its own), and a process connects to one Ray at a time, so its replicas would run there",
                hint="leave address out to load it on the Ray connected, or call ray.shutdown() first to load it on "
                "the one at the address",
            )
        return ray  # the caller's own ray.init (a notebook's, a test cluster's) decides where replicas run
    if settings.address is not None:
        _check_reachable(ray, settings.address)
    # A local Ray's workers start from this machine's files; a cluster's image brings its own install.
    runtime_env = local_runtime_env() if settings.address is None else None
    try:
        attempts = LOCAL_START_ATTEMPTS if settings.address is None else 1  # a cluster's start is not ours to redo
        for attempt in range(attempts):
            try:
                ray.init(address=settings.address, include_dashboard=False, runtime_env=runtime_env,
                         log_to_driver=False, configure_logging=False)
                break
            except Exception as exc:
                if not _start_timed_out(exc):
                    raise
                ray.shutdown()  # what the failed start left running
                if attempt + 1 == attempts:
                    raise RuntimeError(
                        f"{exc} (Ray's raylet waits a fixed 15 s for its own helper processes to start, and on a busy "
                        f"machine they can take longer; {attempts} start(s) failed so)") from exc
                log.warning("a local Ray did not start (%s); starting it again", exc)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {settings.address!r}" if settings.address else "a local Ray"
        hint = ("check the address (ray://HEAD:10001 for a remote cluster, 'auto' for one started with ray start "
                "on this machine), or leave it out for a local Ray")
        if settings.address is None and _start_timed_out(exc):
            hint = ("load it again when the machine is less busy, or start Ray yourself (ray start --head) and load "
                    "with address='auto'")
        raise ModelLoadError(f"could not start or reach {where}: {type(exc).__name__}: {exc}", hint=hint) from exc
    with _connection_lock:
        _ours = (settings.address, _gcs(ray))
    return ray


def _names(ray: Any, address: str | None, connected: str) -> bool:
    """Whether ``address`` names the Ray whose GCS is at ``connected``: that GCS address as Ray reads it (a loopback
    host is this machine's address), or Ray Client on its host (``ray://HOST:10001``: Ray Client runs on the head)."""
    try:
        services = ray._private.services
        canonical, localhost = services.canonicalize_bootstrap_address, services.resolve_ip_for_localhost
    except AttributeError:  # a Ray whose private helpers moved: what the address names cannot be told, so not refused
        log.warning("cannot tell whether address=%r names the Ray connected at %s (this Ray's helpers moved): its "
                    "replicas run on the Ray connected", address, connected)
        return True
    try:
        if address is not None and address.startswith("ray://"):
            host = urlsplit(address).hostname
            return bool(host) and localhost(host) == urlsplit("//" + connected).hostname
        return str(canonical(address)) == connected
    except Exception:  # an address Ray cannot read names no Ray
        return False


def _check_reachable(ray: Any, address: str) -> None:
    """Raise ModelLoadError at once if nothing accepts a connection where ``address`` points: a head's GCS
    (``HOST:PORT``) or Ray Client (``ray://HOST:PORT``). ``auto`` and an address Ray cannot read are ray.init's to
    judge (it says so at once)."""
    client = address.startswith("ray://")
    if client:
        dialed = address[len("ray://"):]
    elif address in ("auto", "local"):
        return
    else:
        try:  # where Ray itself dials: a loopback host becomes this machine's address
            dialed = str(ray._private.services.canonicalize_bootstrap_address(address))
        except Exception:
            return
    try:
        parts = urlsplit("//" + dialed)
        host, port = parts.hostname, parts.port or (10001 if client else None)  # Ray Client's own default port
    except ValueError:
        return
    if not host or port is None:
        return
    hint = ("check that the cluster is up (ray status, on its head) and the address: ray://HEAD:10001 for Ray "
            "Client, HEAD:6379 for the head itself, 'auto' for a Ray started with ray start on this machine; or leave "
            "address out for a local Ray (AUTOGLM_RAY_REACH_TIMEOUT_S says how long a connection may take)")
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        timed_out = isinstance(exc, TimeoutError)
        why = f"no answer within {REACH_TIMEOUT_S:g} s" if timed_out else f"{type(exc).__name__}: {exc}"
        raise ModelLoadError(
            f"could not reach the Ray cluster at {address!r}: nothing accepted a connection at {host}:{port} ({why})",
            hint=hint,
        ) from None
    # Something listens there. A Ray head's GCS and Ray Client both speak gRPC; ray.init spent ~22 s on anything else
    # (a web server, another service) before its own error.
    if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):  # over TLS, a plain handshake proves nothing
        answer = _grpc_handshake(host, port, REACH_TIMEOUT_S)
        if answer != "READY":
            why = ("it broke off the handshake" if answer == "TRANSIENT_FAILURE"
                   else f"it said nothing within {REACH_TIMEOUT_S:g} s")
            raise ModelLoadError(
                f"could not reach the Ray cluster at {address!r}: something accepts connections at {host}:{port}, but "
                f"it does not answer as a Ray head or Ray Client does, in gRPC ({why})",
                hint=hint,
            )


def _grpc_handshake(host: str, port: int, timeout_s: float) -> str:
    """How a gRPC (HTTP/2) connection to ``host:port`` went: ``READY``, ``TRANSIENT_FAILURE`` (the far end broke the
    handshake), or ``SILENT`` (neither within ``timeout_s``); ``READY`` without grpc (Ray needs it), to let ray.init
    judge."""
    try:
        import grpc
    except ImportError:
        return "READY"
    states: queue.Queue[Any] = queue.Queue()
    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        channel.subscribe(states.put, try_to_connect=True)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                state = states.get(timeout=left)
            except queue.Empty:
                break
            if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
                return str(state.name)
        return "SILENT"
    finally:
        channel.close()


# A local Ray's start that timed out is tried this many times in all: its raylet gives its dashboard agent a fixed
# 15 s to write its port (not RAY_agent_register_timeout_ms, in Ray 2.60), and on a busy machine the agent's imports
# can take longer, which aborts the raylet and the start (seen under a full test suite on two cores). Ray's own files
# are in the page cache the second time.
LOCAL_START_ATTEMPTS = 2


def _start_timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is Ray's own "the current node timed out during startup" (a plain Exception, in Ray 2.60)."""
    return "timed out during startup" in str(exc)


def local_runtime_env() -> dict[str, Any] | None:
    """What a local Ray's workers need to import the workbench this process imports.

    Nothing, where this Python in this environment (which a local Ray's workers inherit) finds the same package: an
    installed or editable workbench, or one on PYTHONPATH. Else (a checkout on ``sys.path`` only, as a notebook
    started in it has) its directory on their PYTHONPATH, through a runtime env. A runtime env sends each new
    worker process through Ray's runtime-env agent: a load that starts a local Ray took 30.1 and 27.6 s with one,
    25.7 and 22.9 s without (tiny model, 2 cores, runs alternated).
    """
    package = Path(__file__).resolve().parents[2]
    probe = ("import sys; del sys.path[0]; import importlib.util as u; s = u.find_spec('workbench'); "
             "print(s.origin if s and s.origin else '')")  # del: -c puts the working directory first
    try:
        found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        found = ""
    if found.strip() and Path(found.strip()).resolve().parent == package:
        return None
    paths = [str(package.parent), os.environ.get("PYTHONPATH")]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, paths))}}


def _gcs(ray: Any) -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # a Ray Client connection (ray://) has no GCS address of its own here
        return ""


def release() -> None:
    """End the connection to Ray that :func:`connect` made, once no replica is open on it (a workbench's close).

    A local Ray started here stops; a cluster is only disconnected from. The caller's own ``ray.init`` is left
    alone, as is a connection the caller replaced with one of its own.
    """
    global _ours
    ray = sys.modules.get("ray")  # never imported just to find it was not used
    with _connection_lock:
        if _ours is None or _open or ray is None:
            return
        ours, _ours = _ours, None
    if ray.is_initialized() and _gcs(ray) == ours[1]:
        ray.shutdown()


def _opened(change: int) -> None:
    global _open
    with _connection_lock:
        _open += change


class ModelActor:
    """One replica of a model inside a Ray actor: loads it as the registry loads any model, generates for the parent.

    Every method takes and returns plain data. A load that fails is kept and reported by
    :meth:`info` (what, and the hint), so the parent raises the same ModelLoadError a local load would.
    """

    def __init__(self, name: str, settings: dict[str, Any]) -> None:
        from workbench.engine.backends.transformers import TransformersBackend
        from workbench.models.registry import ModelRegistry
        from workbench.tracing import Tracing

        self._backend: TransformersBackend | None = None
        self._error: dict[str, str | None] | None = None
        self._cancels = RowCancels()  # rows whose requests timed out in the parent, stopped at their next step
        local = dataclasses.replace(LoadSettings(**settings), engine="local", address=None, num_gpus=0,
                                    num_cpus=1)
        try:
            self._loaded = ModelRegistry(Tracing()).load(name, local)
        except WorkbenchError as exc:
            self._error = {"message": exc.message, "hint": exc.hint}
            return
        self._backend = TransformersBackend(self._loaded)

    def info(self) -> dict[str, Any]:
        """Where and what this replica is, or the error its load ended in."""
        import ray

        context = ray.get_runtime_context()
        where = {"node_id": context.get_node_id(), "actor_id": context.get_actor_id(), "pid": os.getpid()}
        if self._backend is None:
            return {**where, "error": self._error}
        loaded = self._loaded
        return {**where, "device": self._backend.device, "dtype": self._backend.dtype, "params": loaded.params,
                "memory_bytes": loaded.memory_bytes, "load_s": loaded.load_s, "warmup_s": loaded.warmup_s,
                "context_window": loaded.context_window, "eos_ids": sorted(self._backend.eos_ids)}

    def _batch(self, seq: int, rows: list[dict[str, Any]], params: dict[str, Any], received: float,
               on_token: Any = None) -> list[GenerationRequest]:
        # The parent's clock is not ours: each request is dated back by the time it had waited there.
        settings = GenerationParams(**params)
        batch = [GenerationRequest(self._loaded.name, row["input_ids"], settings, INVALID_SPAN,
                                   submitted=received - row["waited_s"], on_token=on_token if row["stream"] else None,
                                   cancellable=row["cancellable"])
                 for row in rows]
        self._cancels.running(seq, batch)
        return batch

    def _run(self, batch: list[GenerationRequest], received: float, sink: TokenSink | None) -> dict[str, Any]:
        assert self._backend is not None  # the parent sends batches only after info() reported a loaded model
        try:
            results, timing = self._backend.generate(batch, sink)
        except BackendOutOfMemory as exc:
            self._backend.release_memory()
            return {"oom": str(exc)}
        return {"results": [dataclasses.asdict(r) for r in results], "timing": dataclasses.asdict(timing),
                "received": received, "returned": time.perf_counter()}

    def generate(self, seq: int, rows: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
        """Generate batch ``seq``: each row's token ids and how long it waited in the parent; results and timings."""
        received = time.perf_counter()
        return self._run(self._batch(seq, rows, params, received), received, None)

    def stream(self, seq: int, rows: list[dict[str, Any]], params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """:meth:`generate`, yielding each decode step's tokens of the streaming rows first (``tokens``: row, id, text)."""
        received = time.perf_counter()
        steps: queue.Queue[dict[str, Any]] = queue.Queue()
        batch = self._batch(seq, rows, params, received, on_token=True)
        index = {id(request): row for row, request in enumerate(batch)}

        def sink(request: GenerationRequest, token: int, text: str) -> None:
            steps.put({"tokens": [index[id(request)], token, text]})

        def run() -> None:
            try:
                steps.put({"done": self._run(batch, received, sink)})
            except BaseException as exc:  # re-raised in the generator, where Ray reports it to the parent
                steps.put({"raised": exc})

        threading.Thread(target=run, name="workbench-actor-generate", daemon=True).start()
        while True:
            item = steps.get()
            if "raised" in item:
                raise item["raised"]
            yield item
            if "done" in item:
                return

    def cancel(self, seq: int, rows: list[int]) -> None:
        """Stop ``rows`` of batch ``seq`` at their next step (their requests timed out); called while it runs."""
        self._cancels.cancel(seq, rows)


@functools.cache
def _actor_class(ray: Any) -> Any:
    """ModelActor as a Ray actor class, made once: Ray exports a class's definition to the cluster each time."""
    return ray.remote(ModelActor)


class RayBackend:
    """A replica whose model runs in a Ray actor (a :class:`Backend`): tokenizes here, generates there.

    The actor is created at once and loads in the background, so a model's replicas load in
    parallel; :meth:`check` waits for it. When the actor dies (its node left the cluster, its
    process was killed, ``ray.kill``), its batch fails with ModelActorDied, which opens the
    replica's circuit breaker at once, so the balancer sends retries to the other replicas; and a
    new actor starts in its place (a ``restart NAME`` span), up to the model's ``restarts`` times
    (``restarts`` counts them). The breaker lets the replica back in once the new actor serves.

    The workbench restarts the actor itself rather than through Ray's ``max_restarts``: ``ray.kill``
    forbids Ray's own restart by default, and a restart here is counted, traced and capped the
    same way as a model process's (isolation="process").
    """

    def __init__(self, loaded: LoadedModel, tracing: Tracing | None = None, replica: str | None = None,
                 replicas: int = 1) -> None:
        settings = loaded.settings
        self.model = loaded.name
        self.replica = replica or loaded.name  # "m#1": which of the model's replicas this is, for its errors
        self.source = loaded.source
        self.dtype = settings.dtype
        self.device = "ray"  # until the actor says where it loaded
        self.context_window: int | None = None
        self.node: str | None = None
        self.actor_id: str | None = None
        self.pid: int | None = None  # the actor's process, on its node
        self.restarts = 0
        self._batches = 0  # batches sent; a cancel names its batch, so it never stops a row of the next one
        self._memory = 0
        self._dead: str | None = None  # why the last actor died
        self._gone: ModelActorDied | None = None  # dead, with no restart left or the restart failed
        self._closed = False
        self._lock = threading.Lock()  # the actor handle, its readiness and the restart count change together
        self._ready_lock = threading.Lock()  # held by the one caller that waits for the actor to load
        self._tracing = tracing
        self._settings = settings
        self._tokenizer = loaded.tokenizer
        self._tokens: TextCodec | None = None
        self._ray = connect(settings)
        self._gcs = _gcs(self._ray)  # the Ray its actors live on: a ray.shutdown() (or another ray.init) ends them
        self._check_placeable(replicas)
        self._spawn()
        _opened(+1)  # closed in close(); release() waits for none to be open

    @property
    def _who(self) -> str:
        """What its errors call this replica: ``model 'm'``, or ``model 'm' (replica 'm#1')`` for one of several."""
        return f"model {self.model!r}" + (f" (replica {self.replica!r})" if self.replica != self.model else "")

    # -- the actor's state -----------------------------------------------------------------------

    def _shut_down(self) -> ModelActorDied | None:
        """Why this replica's actors are gone with the Ray they ran on (the user's ray.shutdown(), or a ray.init of
        another Ray since), or None. A call on one of their handles then would start a new local Ray behind the
        user's back, and fail with a raw Exception (or end the process, once that Ray's GCS is unreachable)."""
        ray = self._ray
        if ray.is_initialized() and _gcs(ray) == self._gcs:
            return None
        return ModelActorDied(
            f"the Ray this process was connected to was shut down (ray.shutdown(), or ray.init of another Ray), and "
            f"the Ray actor of {self._who} with it",
            hint=f"load the model again on the Ray connected now: bench.unload({self.model!r}), then bench.load(...)",
        )

    @property
    def actor(self) -> Any:
        """The handle of the Ray actor this replica calls now (a new one after each restart)."""
        return self._actor

    def _check_placeable(self, replicas: int) -> None:
        """Refuse at once a model whose ``replicas`` actors no local Ray could ever hold together: num_gpus=1 on a
        machine without a GPU, or replicas=3 with num_cpus=1 on two CPUs (the third waits for a CPU that only an
        unload of this same model would free).

        A local Ray (started by this process, the workbench's or the user's own ``ray.init()``) never grows, so
        such an actor would wait for READY_TIMEOUT_S (300 s) and then fail. A cluster may add a node that holds
        it (an autoscaler), so there it is waited for as before.
        """
        ray = self._ray
        node = getattr(getattr(ray, "_private", None), "worker", None)
        if not getattr(getattr(node, "_global_node", None), "head", False):
            return  # connected to a cluster started elsewhere (or through Ray Client): it may grow
        ask = {"GPU": float(self._settings.num_gpus), "CPU": float(self._settings.num_cpus)}
        asked = {key: amount for key, amount in ask.items() if amount > 0}
        if not asked:
            return
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        fits = sum(min(int(have.get(key, 0.0) // amount) for key, amount in asked.items()) for have in nodes)
        if fits >= replicas:
            return
        if fits == 0:
            largest = ", ".join(f"{max((have.get(key, 0.0) for have in nodes), default=0.0):g} {key}" for key in ask)
            why = f"no node of this Ray has that much (the most a node has: {largest})"
        else:
            why = f"this Ray holds at most {fits} of them at once"
        raise ModelLoadError(
            f"model {self.model!r}: replicas={replicas}, each a Ray actor asking for num_gpus={ask['GPU']:g} and "
            f"num_cpus={ask['CPU']:g}, and {why}; a local Ray does not grow, so the load could never finish",
            hint="lower num_gpus (0 runs on CPUs), num_cpus (each actor then shares the CPUs) or replicas, or "
            "connect to a cluster that has the resources (address='ray://HEAD:10001')",
        )

    def _spawn(self) -> None:
        """Create the actor (it is placed and loads in the background) and ask for its info once it has loaded."""
        settings = self._settings
        actor = _actor_class(self._ray).options(
            num_gpus=float(settings.num_gpus),
            # Ray Serve's default too: generating keeps a core busy, so each replica holds one while it lives.
            num_cpus=float(settings.num_cpus),
            # Replicas go to different nodes where the cluster has several: scale-out, and one node lost
            # takes only its own replicas with it.
            scheduling_strategy="SPREAD",
            max_restarts=0,  # restarted by _lost, see the class docstring
            max_concurrency=2,  # a cancel is heard while a batch runs (the parent sends one batch at a time)
        )
        self._actor = actor.remote(self.model, dataclasses.asdict(settings))
        self._info = self._actor.info.remote()
        self._ready = False

    def _wait_ready(self) -> None:
        """Wait for the actor to be placed and to load its model; a ModelLoadError if it cannot."""
        # One caller waits for the actor's info, the others for that caller; none holds the state lock while it
        # waits, so close() and a death seen elsewhere never wait for a load.
        with self._ready_lock:
            while not self._ready:
                with self._lock:
                    if self._ready:
                        return
                    ref = self._info
                info = self._wait_info(ref)
                with self._lock:
                    if ref is self._info:  # else the actor died and was replaced while it loaded: wait for the new one
                        self.device, self.dtype = info["device"], info["dtype"]
                        self.context_window, self._memory = info["context_window"], info["memory_bytes"]
                        self.node, self.actor_id, self.pid = info["node_id"], info["actor_id"], info["pid"]
                        if self._tokens is None:
                            self._tokens = TextCodec(self._tokenizer, set(info["eos_ids"]))
                        self._ready = True

    def _wait_info(self, ref: Any) -> dict[str, Any]:
        """What a loaded actor says of itself (``ref``, its info() call), or the ModelLoadError its load ended in."""
        ray = self._ray
        try:
            info: dict[str, Any] = ray.get(ref, timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ModelLoadError(
                f"a Ray replica of model {self.model!r} was not ready within {READY_TIMEOUT_S:g} s: it may be waiting "
                "for resources the cluster does not have (ray.cluster_resources() lists them)",
                hint="lower num_gpus, num_cpus or replicas, add nodes, or raise AUTOGLM_RAY_READY_TIMEOUT_S for a slow load",
            ) from None
        except ray.exceptions.RayError as exc:
            raise ModelLoadError(f"the Ray actor of a replica of model {self.model!r} failed to start: {exc}",
                                 hint="on a cluster, each node needs autoglm-workbench installed (in its image) as "
                                 "here; the actor's log (ray logs, or /tmp/ray/session_latest/logs) says why") from exc
        if info.get("error"):
            raise ModelLoadError(info["error"]["message"], hint=info["error"]["hint"])
        return info

    def _call(self, ref: Any, actor: Any, cancels: _Told | None = None) -> Any:
        """The value of a call to ``actor``; a dead actor or a lost node becomes ModelActorDied here, at the seam.

        With ``cancels``, rows whose requests time out meanwhile are stopped in the actor.
        """
        try:
            if cancels is not None:
                while not self._ray.wait([ref], timeout=_CANCEL_POLL_S)[0]:
                    cancels.tell()
            return self._ray.get(ref)
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.WorkerCrashedError,
                self._ray.exceptions.ObjectLostError) as exc:
            raise self._lost(actor, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

    def _lost(self, actor: Any, why: str) -> ModelActorDied:
        """``actor`` died: start another in its place if restarts are left, and say what happened to its batch."""
        with self._lock:
            node = self.node
            if actor is self._actor and self._gone is None and not self._closed:  # the first to see it go
                self._dead = why
                self._gone = self._shut_down()  # no restart on a Ray that is gone: it would start a new one
                if self._gone is None and self.restarts < self._settings.restarts:
                    self.restarts += 1
                    self._spawn()
                    # Waited for off the worker's thread, so bench.replicas() shows the new actor once it loads;
                    # the breaker keeps requests away meanwhile.
                    threading.Thread(target=self._await_restart, args=(node,), daemon=True,
                                     name=f"workbench-ray-restart-{self.model}").start()
                elif self._gone is None:
                    self._gone = ModelActorDied(
                        f"the Ray actor of {self._who} on node {node} is gone ({why}); it was restarted "
                        f"{self.restarts} times already, so it stays down",
                        hint="its requests go to the other replicas (give hops retry); load the model again "
                        "(bench.unload then bench.load), or raise restarts",
                    )
            if self._gone is not None:
                return self._gone
            if self._closed:  # close() ended it: no restart comes
                return ModelActorDied(f"the Ray actor of {self._who} was ended: the model was unloaded",
                                      hint=f"bench.load({self.model!r}, ...) again")
            return ModelActorDied(
                f"the Ray actor of {self._who} on node {node} is gone ({self._dead})",
                hint=f"a new actor is starting in its place (restart {self.restarts} of {self._settings.restarts}); "
                "meanwhile its requests go to the other replicas (give hops retry)",
            )

    def _await_restart(self, died_on: str | None) -> None:
        """Wait for a restarted actor to load, in a ``restart NAME`` span of the engine's trace; one whose load failed
        is ended, as it serves nothing but holds what it asked the cluster for (close() leaves a gone replica be)."""
        span = None
        if self._tracing is not None:
            span = self._tracing.start_span(f"restart {self.model}", attributes={
                attr.SPAN_KIND: attr.KIND_CHAIN, attr.MODEL_NAME: self.model, attr.REPLICA: self.replica,
                attr.RAY_RESTARTS: self.restarts, attr.RAY_PREVIOUS_NODE: died_on or ""})
        try:
            while True:
                try:
                    self._wait_ready()
                except ModelLoadError as exc:
                    with self._lock:
                        # A new actor that died before it loaded (placed on a node that was going too) is started
                        # again while restarts are left; a load that failed in the actor would fail the same way.
                        again = (isinstance(exc.__cause__, self._ray.exceptions.RayError) and not self._closed
                                 and self.restarts < self._settings.restarts)
                        if again:
                            self.restarts += 1
                            self._spawn()
                        elif not self._closed:
                            self._ray.kill(self._actor)  # first: a request that reads it gone finds it ended
                            self._gone = ModelActorDied(
                                f"the Ray actor of {self._who} died and could not be started again: "
                                f"{exc.message}", hint=exc.hint or f"load it again: bench.load({self.model!r}, ...)",
                            )
                    if again:
                        if span is not None:
                            span.set_attribute(attr.RAY_RESTARTS, self.restarts)
                        continue
                    if span is not None:
                        mark_error(span, exc)
                else:
                    if span is not None:
                        span.set_attributes({attr.RAY_NODE: self.node or "", attr.RAY_ACTOR: self.actor_id or ""})
                return
        finally:
            if span is not None:
                span.end()

    # -- the Backend seam ------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        if self._tokens is None:  # the first actor's info gives the codec; a restart does not change it
            self._wait_ready()
        assert self._tokens is not None
        return self._tokens.tokenize(prompts)

    def detokenize(self, tokens: Sequence[int]) -> str:
        if self._tokens is None:
            self._wait_ready()
        assert self._tokens is not None
        return self._tokens.detokenize(tokens)

    def check(self, policy: BatchingPolicy) -> None:
        """Wait until the actor has loaded its model (so replicas load in parallel), and refuse continuous batching."""
        self._wait_ready()
        if policy.continuous:
            raise StrategyError(
                f"model {self.model!r}: continuous batching runs in this process only, not in Ray actors",
                hint="use DynamicBatching (e.g. wb.DynamicBatching(max_batch=16, max_wait_ms=5)) with engine='ray'",
            )

    def scheduler(self, policy: BatchingPolicy, on_result: OnResult, on_error: OnError) -> Scheduler:
        raise AssertionError("check() refuses continuous batching, so no scheduler is ever asked for")

    def release_memory(self) -> None:
        pass  # the actor gives back what an out-of-memory batch left cached before it answers

    def memory_bytes(self) -> int:
        return self._memory

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            actor, gone = self._actor, self._gone
        _opened(-1)
        if gone is None and self._shut_down() is None:
            self._ray.kill(actor)  # the live one, or the restart that is still loading

    def generate(
        self, batch: list[GenerationRequest], on_token: TokenSink | None = None
    ) -> tuple[list[GenerationResult], BatchTiming]:
        if self._gone is None and (shut := self._shut_down()) is not None:
            with self._lock:
                self._gone = self._gone or shut
        if self._gone is not None:
            raise self._gone
        try:
            self._wait_ready()  # a batch that reaches a restarted replica waits for its new actor to load
        except ModelLoadError:
            if self._gone is not None:
                raise self._gone from None
            raise
        actor = self._actor
        seq = self._batches = self._batches + 1
        # A row whose request times out here is stopped in the actor too, as in-process; batches with no timeout
        # on any row skip the looking.
        cancels = _Told(actor, seq, batch) if any(r.cancellable for r in batch) else None
        sent = time.perf_counter()
        rows = [{"input_ids": r.input_ids, "waited_s": sent - r.submitted, "stream": on_token is not None and r.stream,
                 "cancellable": r.cancellable} for r in batch]
        params = dataclasses.asdict(batch[0].params)
        if on_token is not None and any(r.stream for r in batch):
            reply = self._streamed(actor.stream.remote(seq, rows, params), actor, batch, on_token, cancels)
        else:
            reply = self._call(actor.generate.remote(seq, rows, params), actor, cancels)
        back = time.perf_counter()
        if "oom" in reply:
            raise BackendOutOfMemory(reply["oom"])
        return self._results(batch, reply, sent, back)

    def _streamed(self, replies: Any, actor: Any, batch: list[GenerationRequest], on_token: TokenSink,
                  cancels: _Told | None) -> dict[str, Any]:
        """Hand each streamed token to ``on_token`` as it arrives; the final reply."""
        try:
            for ref in replies:
                item = self._call(ref, actor, cancels)
                if "done" in item:
                    return item["done"]  # type: ignore[no-any-return]
                row, token, text = item["tokens"]
                on_token(batch[row], token, text)
                if cancels is not None:
                    cancels.tell()  # a stream's next item waits for the next step: look between steps too
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.WorkerCrashedError,
                self._ray.exceptions.ObjectLostError):  # raised by the generator itself, between items
            raise self._lost(actor, "the actor died while it streamed") from None
        raise RuntimeError(f"the Ray actor of model {self.model!r} ended its stream without a result")

    def _results(
        self, batch: list[GenerationRequest], reply: dict[str, Any], sent: float, back: float
    ) -> tuple[list[GenerationResult], BatchTiming]:
        """The actor's results on this process's clock, numbered among this process's batches, with their cost."""
        batch_id = next_batch_id()  # the actor's own count would collide with other replicas' in one trace
        timing = BatchTiming(**{**reply["timing"], "batch_id": batch_id})
        timing.started = sent + (timing.started - reply["received"])
        actor_ms = (reply["returned"] - reply["received"]) * 1e3
        attributes = {attr.RAY_NODE: self.node or "", attr.RAY_ACTOR: self.actor_id or "", attr.RAY_ACTOR_MS: actor_ms,
                      attr.RAY_OVERHEAD_MS: (back - sent) * 1e3 - actor_ms, attr.RAY_RESTARTS: self.restarts}
        results = []
        for request, fields in zip(batch, reply["results"]):
            # The actor timed end to end up to its reply; the way back counts too.
            results.append(GenerationResult(**{**fields, "batch_id": batch_id, "e2e_ms": (back - request.submitted) * 1e3}))
            request.span.set_attributes(attributes)
        return results, timing


class _Told:
    """The rows of one batch on an actor that were told to stop, and the telling."""

    def __init__(self, actor: Any, seq: int, batch: list[GenerationRequest]) -> None:
        self.actor, self.seq, self.batch = actor, seq, batch
        self.told: set[int] = set()

    def tell(self) -> None:
        """Tell the actor to stop the rows whose requests timed out since the last look (not waiting for its answer)."""
        stopped = [row for row, r in enumerate(self.batch) if r.cancelled and row not in self.told]
        if stopped:
            self.actor.cancel.remote(self.seq, stopped)
            self.told.update(stopped)
