"""Models behind an OpenAI-compatible server: what the server lists, and the served model's tokenizer if it is here."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from workbench.errors import ModelLoadError
from workbench.models.settings import LoadSettings

REMOTE_DEVICE = "remote"
# Loading asks the server one cheap question; a server that takes longer is not ready to serve.
LIST_TIMEOUT_S = 10.0
# The most of a GET /models answer read: a list of thousands of models is a few MiB, and a server that sends more
# (or never stops) must not fill this machine's memory while a load waits for it.
LIST_BYTES = 16 << 20


def base_url(settings: LoadSettings) -> str:
    """The server's OpenAI base URL without a trailing slash: ``http://127.0.0.1:8000/v1``."""
    return settings.source.rstrip("/")


def headers(settings: LoadSettings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}


def list_models(settings: LoadSettings) -> list[dict[str, Any]]:
    """The server's ``GET /models`` entries; a ModelLoadError that says what is wrong when it cannot tell."""
    url = f"{base_url(settings)}/models"
    request = urllib.request.Request(url, headers={"Accept": "application/json", **headers(settings)})
    # The whole exchange (connect, status line, headers, body, any redirect) within one deadline: a socket's timeout is
    # per read, and a head or a body sent a byte a second kept the load waiting for as many seconds as it had bytes.
    exchange = _Exchange()
    answer: Future[bytes] = Future()
    threading.Thread(target=exchange.run, args=(request, answer), name="workbench-models-list", daemon=True).start()
    if not wait([answer], timeout=LIST_TIMEOUT_S).done:
        exchange.cut()
        raise ModelLoadError(f"model server {settings.source!r} took more than {LIST_TIMEOUT_S:g} s to answer "
                             "GET /models", hint="check the server's load and its log")
    try:
        body = answer.result()
    except urllib.error.HTTPError as exc:
        exc.close()
        hint = {
            401: "the server refused this api_key: check it" if settings.api_key
            else "the server wants an API key: pass api_key=... (--api-key)",
            403: "the server refused this API key: check api_key",
            404: "is the URL the server's OpenAI base? most end in /v1, e.g. http://127.0.0.1:8000/v1",
        }.get(exc.code, "check the server's log")
        raise ModelLoadError(f"model server {settings.source!r} answered GET /models with HTTP {exc.code}",
                             hint=hint) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelLoadError(
            f"cannot reach a model server at {settings.source!r}: {reason}",
            hint="start the server first (vLLM, SGLang, llama.cpp, Ollama or `transformers serve`), "
            "and check the host and port; a server may take a while to come up",
        ) from None
    if len(body) > LIST_BYTES:
        raise ModelLoadError(
            f"model server {settings.source!r} answered GET /models with more than {LIST_BYTES >> 20} MiB",
            hint="is this an OpenAI-compatible server? give its OpenAI base URL, e.g. http://127.0.0.1:8000/v1",
        )
    try:
        data = json.loads(body)["data"]
        if not isinstance(data, list):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: arrays nested past Python's stack
        raise ModelLoadError(
            f"{settings.source!r} answered GET /models, but not as an OpenAI-compatible server does",
            hint="give the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1",
        ) from None
    return [entry for entry in data if isinstance(entry, dict)]


class _Exchange:
    """One GET /models, run on a thread of its own, and every connection it opens (a redirect opens another): a load
    that stops waiting for it cuts them, so that nothing is left reading what a slow server still sends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []
        # Each connection's socket once connected: urllib lets go of it (its sock is None) while the body is read.
        self._sockets: list[socket.socket] = []
        self._cut = False

    def run(self, request: urllib.request.Request, answer: Future[bytes]) -> None:
        """Ask, and set ``answer`` to the body (its first LIST_BYTES + 1 bytes) or to the error."""
        try:
            # A new opener reads HTTP(S)_PROXY now, as the backend does; urlopen's own keeps what it read first.
            opener = urllib.request.build_opener(_KeyStaysHome(), _WatchedHTTP(self), _WatchedHTTPS(self))
            with opener.open(request, timeout=LIST_TIMEOUT_S) as response:  # noqa: S310
                answer.set_result(response.read(LIST_BYTES + 1))
        except BaseException as exc:  # the load that waits for the answer says what it means
            answer.set_exception(exc)

    def watched(self, connection_class: type[http.client.HTTPConnection]) -> Callable[..., http.client.HTTPConnection]:
        """``connection_class``, made so that :meth:`cut` reaches the connection."""

        def connection(host: str, **settings: Any) -> http.client.HTTPConnection:
            made = connection_class(host, **settings)
            connect = made.connect

            def connect_unless_cut() -> None:
                connect()
                with self._lock:
                    self._sockets.append(made.sock)
                    cut = self._cut
                if cut:  # cut while it connected, before there was a socket to shut
                    made.close()
                    raise TimeoutError("the load stopped waiting for GET /models")

            made.connect = connect_unless_cut  # type: ignore[method-assign]
            with self._lock:
                self._connections.append(made)
            return made

        return connection

    def cut(self) -> None:
        """End the exchange: shut its sockets down, which ends a read blocked on one (closing it would not)."""
        with self._lock:
            self._cut = True
            sockets = self._sockets + [made.sock for made in self._connections if made.sock is not None]
        for sock in sockets:
            try:  # socket.socket's own: an SSL socket's would also drop its TLS state under the reading thread
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass  # closed meanwhile, or its TLS handshake under way: its own timeout ends that


class _Watched:
    """A handler that opens connections an :class:`_Exchange` can cut (mixed into urllib's HTTP and HTTPS ones)."""

    def __init__(self, exchange: _Exchange) -> None:
        super().__init__()
        self._exchange = exchange

    def do_open(self, http_class: Any, req: urllib.request.Request, **http_conn_args: Any) -> Any:
        return super().do_open(self._exchange.watched(http_class), req, **http_conn_args)  # type: ignore[misc]


class _WatchedHTTP(_Watched, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPS(_Watched, urllib.request.HTTPSHandler):
    pass


class _KeyStaysHome(urllib.request.HTTPRedirectHandler):
    """Follows a redirect of GET /models, but sends the API key only to the origin it was given for: urllib
    copied the Authorization header onto a redirect to any other host."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        followed = super().redirect_request(req, fp, code, msg, headers, newurl)
        if followed is not None and _origin(newurl) != _origin(req.full_url):
            followed.remove_header("Authorization")
        return followed


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())


def pick_model(settings: LoadSettings, listed: list[dict[str, Any]]) -> str:
    """The model to ask the server for: ``served_model``, else the one model the server lists by a name.

    An entry whose ``id`` is not text (a number, null, an object, none) names no model: it is passed over, so one bad
    entry leaves the server's other models usable, and a load never asks for a model by some such id made text.
    """
    if settings.served_model:
        # Not checked against the list: some servers (transformers serve, Ollama) serve models they do not list.
        return settings.served_model
    names = [entry["id"] for entry in listed if _named(entry)]
    if len(names) == 1:
        return names[0]
    nameless = [entry for entry in listed if not _named(entry)]
    if not names and nameless:
        raise ModelLoadError(
            f"model server {settings.source!r} lists no model whose id is text: its entries are "
            + ", ".join(f"{entry!r:.100}" for entry in nameless[:3]) + (" ..." if len(nameless) > 3 else ""),
            hint="pass served_model=... (--served-model), the model's name on the server; is this an "
            "OpenAI-compatible server?",
        )
    listing = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") if names else "none"
    raise ModelLoadError(
        f"model server {settings.source!r} serves {len(names) or 'no'} models, so say which: it lists {listing}",
        hint=f"bench.load(NAME, {settings.source!r}, served_model={names[0]!r})" if names else
        "pass served_model=... (--served-model), the model's name on the server",
    )


def _named(entry: dict[str, Any]) -> bool:
    """Whether a GET /models entry names a model: its ``id`` is text, and not empty."""
    return isinstance(entry.get("id"), str) and bool(entry["id"])


def listed_entry(listed: list[dict[str, Any]], served: str) -> dict[str, Any] | None:
    """What the server lists of ``served`` (None for a model it serves but does not list)."""
    return next((entry for entry in listed if _named(entry) and entry["id"] == served), None)


def listed_window(listed: list[dict[str, Any]], served: str) -> int | None:
    """The context window the server lists for ``served`` (vLLM and SGLang say ``max_model_len``)."""
    entry = listed_entry(listed, served) or {}
    value = entry.get("max_model_len") or entry.get("context_length")
    return value if type(value) is int and value > 0 else None  # not True, which is an int 1


def local_tokenizer(served: str, settings: LoadSettings) -> tuple[Any, Any]:
    """The served model's tokenizer and config from this machine (no download); None for what is not here.

    A local directory or a hub id already in the Hugging Face cache has them; anything else
    (an Ollama tag, a name only the server knows) has not, and that is not an error.
    """
    from transformers import AutoConfig, AutoTokenizer

    source = os.path.expanduser(served)
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "revision": settings.revision}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except Exception:  # not here, or not a tokenizer transformers reads: the server's usage counts tokens
        return None, None
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except Exception:  # a tokenizer without a model config: the tokenizer's own limit is all there is
        config = None
    return tokenizer, config
