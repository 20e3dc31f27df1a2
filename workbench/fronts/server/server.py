"""A gateway running on uvicorn: in a background thread (``bench.serve``, the magics) or in the foreground (the CLI)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import uvicorn

from workbench.errors import WorkbenchError
from workbench.fronts.server.app import create_app

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from workbench.bench import Workbench
    from workbench.chains.chain import Chain
    from workbench.fronts.server.auth import Auth

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class ServeError(WorkbenchError):
    """A gateway that cannot start: an unsafe host and auth pairing, a port in use."""


def resolve_auth(auth: Auth | bool | None, host: str, data_dir: Any) -> Auth:
    """The Auth a server on ``host`` uses: None requires API keys (kept in ``data_dir``), False lets anyone in,
    which only a loopback host may do."""
    from workbench.fronts.server.auth import Auth

    if auth is False:
        auth = Auth.open()
    elif auth is None or auth is True:
        auth = Auth(data_dir)
    auth.check_host(host)  # an open Auth on an address other machines reach: refused
    return auth


class Server:
    """A gateway serving on ``url`` until :meth:`stop` (or the end of a ``with`` block).

    ``app`` is the ASGI app, ``app.state.gateway`` its Gateway (chains served, metrics).
    """

    def __init__(self, app: Starlette, host: str, port: int, *, log_level: str = "warning") -> None:
        self.app = app
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it (Linux): a response goes out as headers, then body, in two writes, and
        # with Nagle on the second waited for the client's delayed ACK, 40 ms a request on loopback.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                             hint="pick another port, or port=0 for any free one") from None
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                                timeout_keep_alive=5, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The server's base URL, ``http://127.0.0.1:PORT``; its OpenAI base is ``url + "/v1"``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._server.should_exit

    def start(self) -> Server:
        """Serve from a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name=f"workbench-server:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"the server on {self.url} did not start", hint="its log above says why")
            time.sleep(0.01)
        return self

    def run(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C, SIGTERM): the command line's way."""
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._socket.close()

    def stop(self) -> None:
        """Stop serving: open streams get a moment to end, then connections close. Stopping twice is harmless."""
        self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_S)
        self._socket.close()

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
    **options: Any,
) -> Server:
    """A Server for ``chains`` on ``host:port``, not started yet (see :func:`serve`)."""
    app = create_app(bench, chains, resolve_auth(auth, host, bench.data_dir), **options)
    return Server(app, host, port, log_level=log_level)


def serve(bench: Workbench, chains: Collection[Chain] = (), **settings: Any) -> Server:
    """``bench.serve(...)``: serve ``chains`` from a background thread; the running Server.

    ``port`` (8000; 0 picks a free one), ``host`` (127.0.0.1: another host must be named), ``auth``
    (None: API keys from ``bench.data_dir``; an Auth; False: no credentials, loopback only),
    ``max_in_flight`` runs at once, ``body_timeout_s``.
    """
    return build(bench, chains, **settings).start()
