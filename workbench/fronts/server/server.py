"""A gateway running on uvicorn: in a background thread (``bench.serve``, the magics) or in the foreground (the CLI)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import uvicorn

from workbench.errors import did_you_mean
from workbench.fronts.server.app import create_app, sse_error
from workbench.fronts.server.gateway import ServeError, ServerStopping, bound_socket
from workbench.fronts.server.protocol import head_deadline_protocol

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.types import ASGIApp, Receive, Scope, Send

    from workbench.bench import Workbench
    from workbench.chains.chain import Chain
    from workbench.fronts.server.auth import Auth
    from workbench.fronts.server.grpc_server import GrpcServer

SERVER_OPTIONS = ("port", "host", "auth", "log_level", "grpc_port")
GATEWAY_OPTIONS = ("max_in_flight", "max_queued", "body_timeout_s")  # create_app's own
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def resolve_auth(auth: Auth | bool | None, host: str, data_dir: Any) -> Auth:
    """The Auth a server on ``host`` uses: None requires API keys (kept in ``data_dir``), False lets anyone in,
    which only a loopback host may do."""
    from workbench.fronts.server.auth import Auth

    if auth is False:
        auth = Auth.open()
    elif auth is None or auth is True:
        auth = Auth(data_dir)
    auth.check_host(host)  # an open Auth on an address other machines reach: refused
    if auth.keys is not None:
        auth.keys.list()  # opens the key store: a data dir that cannot hold it is refused now, not on every call
    return auth


class Server:
    """A gateway serving on ``url`` until :meth:`stop` (or the end of a ``with`` block).

    ``app`` is the ASGI app, ``app.state.gateway`` its Gateway (chains served, metrics).
    """

    def __init__(self, app: Starlette, host: str, port: int, bench: Workbench, *, log_level: str = "warning") -> None:
        self.app = app
        self.host = host
        self._bench = bench
        self._socket = bound_socket(host, port)
        # Accepted connections inherit it (Linux): a response goes out as headers, then body, in two writes, and
        # with Nagle on the second waited for the client's delayed ACK, 40 ms a request on loopback.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = int(self._socket.getsockname()[1])
        # A request's head has as long to arrive as its body (see protocol.py): a trickling client is cut off.
        # proxy_headers off: uvicorn would otherwise take X-Forwarded-For from any loopback peer as the client's
        # address; the Auth believes it only from the proxies it is told to trust (trusted_proxies).
        config = uvicorn.Config(_ended_when_stopped(app, self), log_level=log_level, access_log=False, lifespan="off", proxy_headers=False,
                                timeout_keep_alive=5, timeout_graceful_shutdown=2,
                                http=head_deadline_protocol(app.state.gateway.body_timeout_s))
        self._server = uvicorn.Server(config)
        self._serving: Future[None] | None = None
        self.grpc: GrpcServer | None = None  # the gRPC front on the same Gateway, when grpc_port was given

    @property
    def url(self) -> str:
        """The server's base URL, ``http://127.0.0.1:PORT``; its OpenAI base is ``url + "/v1"``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._serving is not None and not self._serving.done() and not self._server.should_exit

    def start(self) -> Server:
        """Serve on the workbench's own event loop; returns once the server accepts connections.

        The loop the chains walk on serves their requests too, so a request's run starts and
        answers without a hand-off between threads (see benchmarks/served.py).
        """
        if self.grpc is not None:
            self.grpc.start()
        self._serving = self._bench.start(self._server.serve(sockets=[self._socket]))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if self._serving.done() or time.monotonic() > deadline:
                failure = self._serving.exception() if self._serving.done() else None
                self.stop()
                raise ServeError(f"the server on {self.url} did not start" + (f": {failure}" if failure else ""),
                                 hint="its log above says why")
            time.sleep(0.01)
        return self

    def run(self) -> None:
        """Serve until Ctrl-C or SIGTERM (the command line's way): this thread waits while the workbench's loop serves."""
        previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() \
            else None
        try:
            self.start()
            assert self._serving is not None
            while not self._serving.done():
                try:
                    self._serving.result(timeout=0.5)  # wakes for a Ctrl-C between waits
                except FutureTimeout:
                    continue
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def stop(self) -> None:
        """Stop serving: open streams get a moment to end, then connections close. Stopping twice is harmless."""
        self._server.should_exit = True
        if self._serving is not None and not _on_a_loop():
            try:
                self._serving.result(STOP_TIMEOUT_S)
            except BaseException:  # cancelled with a closed workbench, or it failed to start: stopped either way
                pass
        self._socket.close()
        if self.grpc is not None:
            self.grpc.stop()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        chains = sorted(self.app.state.gateway.chains)
        return f"<Server {self.url} chains={chains} {'running' if self.running else 'stopped'}>"


def build(
    bench: Workbench,
    chains: Collection[Chain] = (),
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    auth: Auth | bool | None = None,
    log_level: str = "warning",
    grpc_port: int | None = None,
    **options: Any,
) -> Server:
    """A Server for ``chains`` on ``host:port``, not started yet (see :func:`serve`)."""
    for option in options:
        if option not in GATEWAY_OPTIONS:  # else a raw TypeError from create_app
            known = [*SERVER_OPTIONS, *GATEWAY_OPTIONS]
            raise ServeError(f"serving takes no option {option!r}{did_you_mean(option, known)}",
                             hint=f"its options: {', '.join(known)}")
    _check_port("port", port)
    if grpc_port is not None:
        _check_port("grpc_port", grpc_port)  # gRPC would take 70000 as 4464, silently
    app = create_app(bench, chains, resolve_auth(auth, host, bench.data_dir), **options)
    server = Server(app, host, port, bench, log_level=log_level)
    if grpc_port is not None:
        from workbench.fronts.server.grpc_server import GrpcServer  # grpcio loads only when gRPC is asked for

        server.grpc = GrpcServer(app.state.gateway, host=host, port=grpc_port)
    return server


def _ended_when_stopped(app: Starlette, server: Server) -> ASGIApp:
    """``app``, whose requests still running when uvicorn's grace on stopping runs out end with a 503 ServerStopping:
    an error body, or for a stream that has begun an ``error`` event and its end, where uvicorn would cancel them,
    log 'Exception in ASGI application' with a traceback and cut a stream off mid-body."""
    from starlette.requests import Request

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        streaming: list[bool] = []  # once the response began: whether it is an event stream

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                streaming.append(dict(message.get("headers", ())).get(b"content-type", b"")
                                 .startswith(b"text/event-stream"))
            await send(message)

        try:
            await app(scope, receive, sending)
        except asyncio.CancelledError:
            if not server._server.should_exit or scope["type"] != "http":
                raise
            if not streaming:
                await app.state.gateway.error(Request(scope, receive), ServerStopping())(scope, receive, send)
            elif streaming[0]:
                await send({"type": "http.response.body", "body": sse_error(ServerStopping()), "more_body": False})
            # else a body that began and is not a stream: uvicorn closes the connection, which says it broke off

    return serve


def check_addresses(host: str, ports: dict[str, int | None]) -> None:
    """Refuse now, with the ServeError serving would raise, a host or a port (by its option's name; None: not served)
    that serving would refuse, before the slow work ahead of it (loading models) is done for nothing."""
    named = [(name, port) for name, port in ports.items() if port]
    for (first, port), (second, other) in itertools.combinations(named, 2):
        if port == other:  # each binds alone here; serving would find the clash only once the models had loaded
            raise ServeError(f"{first} and {second} are both {port}: one port serves one protocol",
                             hint="give each its own port (0: any free one)")
    for name, port in ports.items():
        if port is not None:
            _check_port(name, port)
            bound_socket(host, port).close()


def _check_port(name: str, port: object) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        # In every front end's words: grpc_port is --grpc-port on a command line.
        raise ServeError(f"{name.replace('_', ' ')} {port!r:.40} is not a TCP port (0 to 65535)",
                         hint="a port from 1 to 65535, or 0 for any free one")


def serve(bench: Workbench, chains: Collection[Chain] = (), **settings: Any) -> Server:
    """``bench.serve(...)``: serve ``chains`` from a background thread; the running Server.

    ``port`` (8000; 0 picks a free one), ``host`` (127.0.0.1: another host must be named), ``auth``
    (None: API keys from ``bench.data_dir``; an Auth; False: no credentials, loopback only),
    ``max_in_flight`` runs at once, ``max_queued`` waiting for a slot (more: 503), ``body_timeout_s``; ``grpc_port``
    also serves them over gRPC (``server.grpc.target``; see grpc_server.py), same Auth, sessions and runs.
    """
    return build(bench, chains, **settings).start()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (a container stopping) stops the server as Ctrl-C does


def _on_a_loop() -> bool:
    """True inside a running event loop (a hop, a handler), where waiting for the server to end would block it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
