"""Models behind an OpenAI-compatible server: what the server lists, and the served model's tokenizer if it is here."""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import urllib.error
import urllib.request
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
    deadline = time.monotonic() + LIST_TIMEOUT_S
    try:
        # A new opener reads HTTP(S)_PROXY now, as the backend does; urlopen's own keeps what it read first.
        with urllib.request.build_opener(_KeyStaysHome()).open(request, timeout=LIST_TIMEOUT_S) as response:  # noqa: S310
            # Read as it comes, within one deadline: a socket's timeout is per read, and a body sent a byte a
            # second kept the load waiting for as many seconds as it had bytes.
            pieces, size = [], 0
            while size <= LIST_BYTES and (piece := response.read1(LIST_BYTES + 1 - size)):
                pieces.append(piece)
                size += len(piece)
                if time.monotonic() > deadline:
                    raise ModelLoadError(f"model server {settings.source!r} took more than {LIST_TIMEOUT_S:g} s to "
                                         "answer GET /models", hint="check the server's load and its log")
            body = b"".join(pieces)
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
    """The model to ask the server for: ``served_model``, else the one model the server lists."""
    names = [str(entry.get("id")) for entry in listed if entry.get("id")]
    if settings.served_model:
        # Not checked against the list: some servers (transformers serve, Ollama) serve models they do not list.
        return settings.served_model
    if len(names) == 1:
        return names[0]
    listing = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") if names else "none"
    raise ModelLoadError(
        f"model server {settings.source!r} serves {len(names) or 'no'} models, so say which: it lists {listing}",
        hint=f"bench.load(NAME, {settings.source!r}, served_model={names[0]!r})" if names else
        "pass served_model=... (--served-model), the model's name on the server",
    )


def listed_entry(listed: list[dict[str, Any]], served: str) -> dict[str, Any] | None:
    """What the server lists of ``served`` (None for a model it serves but does not list)."""
    return next((entry for entry in listed if entry.get("id") == served), None)


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
