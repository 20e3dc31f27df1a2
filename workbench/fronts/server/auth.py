"""Who may call the gateway, and how often: API keys (hashed at rest), JWT bearer tokens, roles, rate limits.

The gateway (REST, JSON-RPC, OpenAI-compatible and gRPC alike) asks one ``Auth`` three questions per call::

    who = auth.authenticate(headers, address)   # Unauthenticated (401): no, bad, revoked or expired credentials
    auth.authorize(who, "chains.invoke", "qa")  # Forbidden (403): the role may not, or not on this chain
    auth.admit(who)                             # RateLimited (429, retry_after_s): the caller's bucket is empty

and refuses a body over ``auth.max_body_bytes`` (PayloadTooLarge, 413) before it reads the rest. A request that
starts N runs (a batch) costs N from the bucket: the gateway admits one at the door and charges the rest
(``admit(who, N, paid=1)``) once it has read how many; a batch larger than the bucket could ever hold is a 413.

Failed logins are limited per client address (:class:`FailedLogins`): after ``login_failures`` 401s within
``login_window_s`` from one address, every request from it is a 429 for ``login_window_s``, valid credentials or
not. The address is the socket peer; ``X-Forwarded-For`` is believed only from ``trusted_proxies``
(:meth:`Auth.client_address`).

API keys look like ``agw_<id>_<secret>``: ``id`` finds the row without scanning, ``secret`` is 256 random bits.
At rest a key is ``HMAC-SHA256(pepper, salt || secret)`` with a per-key random salt and a pepper kept outside the
database (``$AUTOGLM_KEY_PEPPER``, else the file ``keys.pepper`` beside it, mode 0600). A slow password hash
(bcrypt, scrypt, Argon2) buys nothing here: it slows the guessing of low-entropy passwords, and nobody guesses 256
random bits; it would cost every request milliseconds of CPU. The keyed hash means a copy of ``keys.sqlite3``
alone cannot even check a guess, and hashes are compared with ``hmac.compare_digest`` (constant time).

JWTs are checked with the algorithms pinned in the configuration, all of one family (HMAC or public key), with
the key the configuration names: a token's header may only name one of those, so ``alg: none`` and HS/RS
confusion are refused. ``exp`` and ``sub`` are required, ``nbf``, ``aud`` and ``iss`` are checked, the role comes
from the ``role`` claim and an optional ``chains`` claim limits the caller to those chains.

Roles: viewer (list chains and models, read runs and metrics), runner (viewer + invoke chains), admin (every
action), and custom ones (``Auth(roles=...)``, or a YAML file: :func:`load_roles`, ``$AUTOGLM_ROLES``), each
optionally limited to some chains; a key may be limited to some chains too (``autoglm keys add --chains``).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from workbench.chains.sqlite_store import data_root
from workbench.errors import (
    Forbidden,
    PayloadTooLarge,
    RateLimited,
    SettingsError,
    StoreError,
    Unauthenticated,
)

log = logging.getLogger(__name__)

KEYS_FILE = "keys.sqlite3"
KEYS_SCHEMA_VERSION = 1  # PRAGMA user_version; a later schema adds its upgrade beside the CREATEs in KeyStore._open
PEPPER_FILE = "keys.pepper"
PEPPER_ENV = "AUTOGLM_KEY_PEPPER"
KEY_PREFIX = "agw_"

ACTIONS = frozenset(
    {"chains.list", "chains.invoke", "runs.read", "models.list", "models.admin", "chains.register", "metrics.read"}
)
_VIEWER = frozenset({"chains.list", "runs.read", "models.list", "metrics.read"})

# HMAC algorithms take a shared secret; the others a public key (and need the `cryptography` package).
_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES256K", "ES384", "ES512", "EdDSA"}
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
# Buckets kept for this many principals at most; the least recently seen go first (and come back full).
_MAX_BUCKETS = 10_000
# Client addresses whose failed logins are tracked at most; the least recently seen are forgotten first.
_MAX_ADDRESSES = 10_000


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling: a key's name or a JWT's subject, its role, how it proved it, and the chains it is limited
    to (None: every chain its role allows)."""

    name: str
    role: str
    via: str  # "key" | "jwt" | "open"
    chains: frozenset[str] | None = None

    @property
    def owner(self) -> str:
        """What owns the sessions and runs this caller starts: ``key:NAME`` or ``jwt:SUBJECT``, never shared
        between a key and a token that happen to have the same name."""
        return f"{self.via}:{self.name}"


@dataclasses.dataclass(frozen=True)
class Role:
    """What a role may do: a set of actions, and optionally only on some chains (None: on every chain)."""

    actions: frozenset[str]
    chains: frozenset[str] | None = None

    @classmethod
    def of(cls, name: str, spec: Role | Iterable[str] | Mapping[str, Any]) -> Role:
        """A Role from a Role, a list of actions, or ``{"actions": [...], "chains": [...]}``, checked."""
        if isinstance(spec, Role):
            role = spec
        elif isinstance(spec, Mapping):
            unknown = set(spec) - {"actions", "chains"}
            if unknown:
                raise SettingsError(f"role {name!r}: unknown field {sorted(unknown)[0]!r}",
                                    hint='a role is {"actions": [...], "chains": [...]} (chains optional)')
            chains = spec.get("chains")
            role = cls(frozenset(spec.get("actions", ())), None if chains is None else frozenset(chains))
        elif isinstance(spec, str):
            raise SettingsError(f"role {name!r} is a string; give a list of actions", hint=f"e.g. [{spec!r}]")
        else:
            role = cls(frozenset(spec))
        unknown_actions = role.actions - ACTIONS - {"*"}
        if unknown_actions:
            raise SettingsError(f"role {name!r}: unknown action {sorted(unknown_actions)[0]!r}",
                                hint=f"actions: {', '.join(sorted(ACTIONS))}, or '*' for all")
        return role

    def allows(self, action: str, chain: str | None) -> bool:
        if "*" not in self.actions and action not in self.actions:
            return False
        return chain is None or self.chains is None or chain in self.chains


DEFAULT_ROLES: Mapping[str, Role] = {
    "viewer": Role(_VIEWER),
    "runner": Role(_VIEWER | {"chains.invoke"}),
    "admin": Role(frozenset({"*"})),
}


def load_roles(path: str | os.PathLike[str]) -> dict[str, Role]:
    """Roles from a YAML (or JSON) file: ``NAME: {actions: [...], chains: [...]}`` or ``NAME: [actions]``."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"cannot read the roles file {str(path)!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"the roles file {str(path)!r} is not YAML: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(name, str) for name in raw):
        raise SettingsError(f"the roles file {str(path)!r} is not a mapping of role names",
                            hint="e.g. qa-runner: {actions: [chains.list, chains.invoke], chains: [qa]}")
    try:
        return {name: Role.of(name, spec if spec is not None else []) for name, spec in raw.items()}
    except SettingsError as error:
        error.hint = f"in {path}" + (f"; {error.hint}" if error.hint else "")
        raise
    except TypeError:
        raise SettingsError(f"the roles file {str(path)!r}: each role is a list of actions or "
                            "{actions: [...], chains: [...]}") from None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SettingsError(f"key name {name!r} is not allowed",
                            hint="1 to 64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit")
    return name


class KeyStore:
    """API keys in the SQLite file ``keys.sqlite3`` of a data directory, stored as salted, peppered HMACs.

    ``add`` returns the new key once; nothing can show it again. ``revoke`` takes effect on the next request.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *, roles: Iterable[str] | None = None,
                 pepper: bytes | None = None, timeout_s: float = 30.0) -> None:
        self.data_dir = data_root(data_dir)
        self.path = self.data_dir / KEYS_FILE
        self.roles = frozenset(roles) if roles is not None else frozenset(DEFAULT_ROLES)
        self._pepper = pepper
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"<KeyStore {str(self.path)!r}>"

    # -- the public API -------------------------------------------------------------------------

    def add(self, name: str, role: str, *, chains: Iterable[str] | None = None) -> str:
        """A new key for ``name`` with ``role`` (optionally limited to ``chains``); the key is returned only here."""
        _check_name(name)
        if role not in self.roles:
            raise SettingsError(f"unknown role {role!r}", hint=f"roles: {', '.join(sorted(self.roles))}")
        chain_list = None if chains is None else sorted(set(chains))
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        try:
            self._execute(
                "INSERT INTO keys (id, name, role, chains, salt, hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key_id, name, role, None if chain_list is None else json.dumps(chain_list), salt,
                 self._digest(salt, secret), time.time()),
            )
        except sqlite3.IntegrityError:
            raise SettingsError(f"a key named {name!r} exists", hint=f"autoglm keys revoke {name} first, or pick "
                                "another name") from None
        return f"{KEY_PREFIX}{key_id}_{secret}"

    def revoke(self, name: str) -> None:
        """Revoke ``name``'s key: it authenticates nothing from now on, and the name is free again."""
        rows = self._execute("UPDATE keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL RETURNING id",
                             (time.time(), name))
        if not rows:
            names = [row["name"] for row in self.list() if not row["revoked"]]
            raise SettingsError(f"no active key named {name!r}",
                                hint=f"active keys: {', '.join(names)}" if names else "there are no active keys")

    def list(self) -> list[dict[str, Any]]:
        """Every key, oldest first: name, id, role, chains, created_at, revoked, revoked_at (never the key)."""
        rows = self._execute("SELECT id, name, role, chains, created_at, revoked_at FROM keys ORDER BY created_at", ())
        return [
            {"name": name, "id": key_id, "role": role, "chains": None if chains is None else json.loads(chains),
             "created_at": created_at, "revoked": revoked_at is not None, "revoked_at": revoked_at}
            for key_id, name, role, chains, created_at, revoked_at in rows
        ]

    def verify(self, key: str) -> Principal | None:
        """The principal ``key`` belongs to, or None: unknown, malformed, revoked or wrong."""
        if not key.startswith(KEY_PREFIX):
            return None
        key_id, sep, secret = key[len(KEY_PREFIX):].partition("_")
        if not sep or not secret:
            return None
        rows = self._execute(
            "SELECT name, role, chains, salt, hash FROM keys WHERE id = ? AND revoked_at IS NULL", (key_id,)
        )
        if not rows:
            return None
        name, role, chains, salt, digest = rows[0]
        if not hmac.compare_digest(self._digest(salt, secret), digest):
            return None
        return Principal(name, role, "key", None if chains is None else frozenset(json.loads(chains)))

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # -- storage --------------------------------------------------------------------------------

    def _digest(self, salt: bytes, secret: str) -> bytes:
        return hmac.new(self._load_pepper(), salt + secret.encode(), hashlib.sha256).digest()

    def _load_pepper(self) -> bytes:
        if self._pepper is None:
            try:
                self._pepper = _pepper(self.data_dir)
            except OSError as exc:  # add() hashes its key before the store is opened
                raise self._cannot_open(exc) from exc
        return self._pepper

    def _cannot_open(self, exc: Exception) -> StoreError:
        return StoreError(f"cannot open the key store {str(self.path)!r}: {exc}",
                          hint="--data-dir D or $AUTOGLM_DATA_DIR picks a writable directory")

    def _execute(self, sql: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._connection is None:
                self._connection = self._open()
            try:
                return self._connection.execute(sql, parameters).fetchall()
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                raise StoreError(f"the key store {str(self.path)!r} failed: {exc}",
                                 hint="another process may hold it locked for long, or the disk is full") from exc

    def _open(self) -> sqlite3.Connection:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=self._timeout_s, isolation_level=None,
                                         check_same_thread=False)
            with contextlib.suppress(OSError):  # the hashes are no one else's business either
                os.chmod(self.path, 0o600)
            connection.execute("PRAGMA journal_mode=WAL")
            (version,) = connection.execute("PRAGMA user_version").fetchone()
            if version > KEYS_SCHEMA_VERSION:
                connection.close()
                raise StoreError(f"the key store {str(self.path)!r} has schema {version}, newer than this "
                                 f"workbench's {KEYS_SCHEMA_VERSION}", hint="upgrade autoglm-workbench")
            connection.execute(
                """CREATE TABLE IF NOT EXISTS keys (
                       id         TEXT PRIMARY KEY,
                       name       TEXT NOT NULL,
                       role       TEXT NOT NULL,
                       chains     TEXT,
                       salt       BLOB NOT NULL,
                       hash       BLOB NOT NULL,
                       created_at REAL NOT NULL,
                       revoked_at REAL
                   )"""
            )
            # One active key per name; a revoked name can be given a new key.
            connection.execute("CREATE UNIQUE INDEX IF NOT EXISTS active_names ON keys (name) WHERE revoked_at IS NULL")
            connection.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
            connection.execute(f"PRAGMA user_version = {KEYS_SCHEMA_VERSION}")
            check = hmac.new(self._load_pepper(), b"autoglm key store", hashlib.sha256).digest()
            connection.execute("INSERT OR IGNORE INTO meta VALUES ('pepper_check', ?)", (check,))
            (stored,) = connection.execute("SELECT value FROM meta WHERE key = 'pepper_check'").fetchone()
        except (OSError, sqlite3.Error) as exc:
            raise self._cannot_open(exc) from exc
        if not hmac.compare_digest(stored, check):
            connection.close()
            raise StoreError(
                f"the keys in {str(self.path)!r} were hashed with another pepper, so none of them would match",
                hint=f"use the ${PEPPER_ENV} (or {PEPPER_FILE} file) they were made with, or start a new data dir",
            )
        return connection


def _pepper(data_dir: Path) -> bytes:
    """The pepper: ``$AUTOGLM_KEY_PEPPER`` (its text), else ``keys.pepper`` in ``data_dir``, made once."""
    explicit = os.environ.get(PEPPER_ENV)
    if explicit:
        return explicit.encode()
    path = data_dir / PEPPER_FILE
    try:
        return base64.b64decode(path.read_bytes(), validate=True)
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    # Written aside and linked into place: two processes making it at once agree on one pepper.
    aside = data_dir / f".{PEPPER_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(base64.b64encode(secrets.token_bytes(32)))
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    finally:
        aside.unlink()
    return base64.b64decode(path.read_bytes(), validate=True)


class _Buckets:
    """A token bucket per principal: ``rate_per_s`` refill, ``burst`` capacity; thread-safe, bounded in size."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s, self.burst = rate_per_s, burst
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # owner -> (tokens, at)

    def take(self, owner: str, cost: float = 1.0, paid: float = 0.0) -> float:
        """0.0 when ``cost`` tokens were taken (``paid`` of them already were), else the seconds until the bucket
        holds all ``cost`` (``cost`` <= burst): a retry after that wait pays ``paid`` again and gets the rest."""
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.pop(owner, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
            wait = 0.0
            if tokens >= cost - paid:
                tokens -= cost - paid
            else:
                wait = (cost - tokens) / self.rate_per_s
            self._buckets[owner] = (tokens, now)
            if len(self._buckets) > _MAX_BUCKETS:
                self._buckets.popitem(last=False)
            return wait


class FailedLogins:
    """Failed logins per client address: ``limit`` failures within ``window_s`` lock the address out for
    ``window_s``. Thread-safe; at most ``max_addresses`` are tracked (the least recently seen are forgotten).

    A success does not clear an address's failures: else one valid key would let its holder guess others forever.
    """

    def __init__(self, limit: int, window_s: float, *, max_addresses: int = _MAX_ADDRESSES) -> None:
        if limit < 1 or not window_s > 0 or max_addresses < 1:
            raise SettingsError(f"a failed-login limit of {limit} per {window_s} s (tracking {max_addresses} "
                                "addresses) locks out everyone or no one",
                                hint="login_failures >= 1 and login_window_s > 0, or login_failures=None for none")
        self.limit, self.window_s, self.max_addresses = limit, window_s, max_addresses
        self._lock = threading.Lock()
        # address -> (times of its recent failures, the monotonic time its lockout ends; 0.0: not locked)
        self._addresses: OrderedDict[str, tuple[list[float], float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._addresses)

    def locked_for(self, address: str) -> float:
        """The seconds ``address`` stays locked out; 0.0 when it is not."""
        now = time.monotonic()
        with self._lock:
            entry = self._addresses.get(address)
            if entry is None:
                return 0.0
            self._addresses.move_to_end(address)
            failures, until = entry
            if until > now:
                return until - now
            if until:  # the lockout is over: start afresh
                del self._addresses[address]
            return 0.0

    def failed(self, address: str) -> bool:
        """Count a failed login from ``address``; True when this one locks it out."""
        now = time.monotonic()
        with self._lock:
            failures, until = self._addresses.pop(address, ([], 0.0))
            if until > now:  # locked out while this request was being checked: it stays locked as it was
                self._addresses[address] = (failures, until)
                return False
            failures = [at for at in failures if now - at < self.window_s] + [now]
            locked = len(failures) >= self.limit
            self._addresses[address] = ([], now + self.window_s) if locked else (failures, 0.0)
            while len(self._addresses) > self.max_addresses:
                self._addresses.popitem(last=False)
            return locked


def _networks(proxies: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if isinstance(proxies, str):
        proxies = [p for p in proxies.split(",") if p.strip()]
    networks = []
    for proxy in proxies:
        try:
            networks.append(ipaddress.ip_network(proxy.strip(), strict=False))
        except ValueError:
            raise SettingsError(f"trusted proxy {proxy!r} is not an IP address or network",
                                hint="e.g. trusted_proxies=['10.0.0.5', '10.1.0.0/16']") from None
    return tuple(networks)


def is_loopback(host: str) -> bool:
    """Whether a server on ``host`` is reached from this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(url: str) -> str:
    """The host of an origin or ``//host:port``, lower-case and without brackets; empty where there is none."""
    try:
        return urlsplit(url).hostname or ""
    except ValueError:  # a bracketed host that is not an IPv6 address, a port out of range
        return ""


class Auth:
    """The gateway's checks: authenticate a caller, authorize an action, admit it under its rate limit.

    ``data_dir`` holds the key store (``keys`` may give a KeyStore instead); ``jwt_secret`` (HS*) or
    ``jwt_public_key`` (RS*, PS*, ES*, EdDSA) verifies bearer JWTs with ``jwt_algorithms``, all of one family;
    ``roles`` adds or replaces roles (a list of actions, or ``{"actions": [...], "chains": [...]}``);
    ``rate_per_s`` and ``burst`` size each caller's token bucket (``rate_per_s=None``: no limit);
    ``login_failures`` failed logins within ``login_window_s`` lock a client address out for ``login_window_s``
    (None: no limit); ``trusted_proxies`` (addresses or networks) are the peers whose ``X-Forwarded-For`` names the
    client (none by default: the socket peer is the client).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        keys: KeyStore | None = None,
        jwt_secret: str | bytes | None = None,
        jwt_public_key: str | bytes | None = None,
        jwt_algorithms: Iterable[str] = ("HS256",),
        jwt_audience: str | Iterable[str] | None = None,
        jwt_issuer: str | None = None,
        roles: Mapping[str, Role | Iterable[str] | Mapping[str, Any]] | None = None,
        rate_per_s: float | None = 50.0,
        burst: int = 100,
        max_body_bytes: int = 1 << 20,
        login_failures: int | None = 10,
        login_window_s: float = 60.0,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.roles: dict[str, Role] = dict(DEFAULT_ROLES)
        for name, spec in (roles or {}).items():
            self.roles[name] = Role.of(name, spec)
        if keys is None and data_dir is not None:
            keys = KeyStore(data_dir, roles=self.roles)
        self.keys = keys
        self.jwt_algorithms = tuple(jwt_algorithms)
        self.jwt_audience = jwt_audience if jwt_audience is None or isinstance(jwt_audience, str) \
            else list(jwt_audience)
        self.jwt_issuer = jwt_issuer
        self._jwt_key = self._jwt_key_for(jwt_secret, jwt_public_key)
        if rate_per_s is not None and (not rate_per_s > 0 or burst < 1):
            raise SettingsError(f"rate limit {rate_per_s}/s with burst {burst} admits nothing",
                                hint="rate_per_s > 0 and burst >= 1, or rate_per_s=None for no limit")
        self._buckets = _Buckets(rate_per_s, burst) if rate_per_s is not None else None
        if max_body_bytes < 1:
            raise SettingsError(f"max_body_bytes={max_body_bytes} admits no body", hint="e.g. 1 << 20 (1 MiB)")
        self.max_body_bytes = max_body_bytes
        self.failed_logins = FailedLogins(login_failures, login_window_s) if login_failures is not None else None
        self.trusted_proxies = _networks(trusted_proxies)
        self.is_open = False

    @classmethod
    def open(cls, *, rate_per_s: float | None = None, burst: int = 100, max_body_bytes: int = 1 << 20) -> Auth:
        """No credentials needed: every caller is an admin named ``local``. For a server on loopback only
        (``check_host`` refuses any other address)."""
        auth = cls(rate_per_s=rate_per_s, burst=burst, max_body_bytes=max_body_bytes)
        auth.is_open = True
        return auth

    @classmethod
    def from_env(cls, data_dir: str | os.PathLike[str] | None = None,
                 environ: Mapping[str, str] | None = None) -> Auth:
        """An Auth configured from ``AUTOGLM_JWT_SECRET``, ``AUTOGLM_JWT_PUBLIC_KEY`` (a PEM file's path),
        ``AUTOGLM_JWT_ALGORITHMS`` (comma-separated), ``AUTOGLM_JWT_AUDIENCE``, ``AUTOGLM_JWT_ISSUER``,
        ``AUTOGLM_RATE_PER_S`` (``0``: no limit), ``AUTOGLM_BURST``, ``AUTOGLM_MAX_BODY_BYTES``,
        ``AUTOGLM_LOGIN_FAILURES`` (``0``: no limit), ``AUTOGLM_LOGIN_WINDOW_S``, ``AUTOGLM_TRUSTED_PROXIES``
        (comma-separated addresses or networks) and ``AUTOGLM_ROLES`` (a roles file, see :func:`load_roles`): what
        a container's secrets and settings give; keys come from ``data_dir``'s key store."""
        env = os.environ if environ is None else environ
        public_key = None
        if env.get("AUTOGLM_JWT_PUBLIC_KEY"):
            try:
                public_key = Path(env["AUTOGLM_JWT_PUBLIC_KEY"]).read_bytes()
            except OSError as exc:
                raise SettingsError(f"cannot read AUTOGLM_JWT_PUBLIC_KEY: {exc}",
                                    hint="give the path of a PEM public key file") from None

        def number(name: str, kind: type, default: Any) -> Any:
            try:
                value = kind(env[name]) if env.get(name) else default
            except ValueError:
                raise SettingsError(f"{name}={env[name]!r} is not a number", hint=f"e.g. {name}={default}") from None
            if not value >= 0:  # NaN too: a limit it took for "none" would be off without a word
                raise SettingsError(f"{name}={env[name]!r} is not a number >= 0", hint=f"e.g. {name}={default}")
            return value

        rate = number("AUTOGLM_RATE_PER_S", float, 50.0)
        login_failures = number("AUTOGLM_LOGIN_FAILURES", int, 10)
        algorithms = [a.strip() for a in env.get("AUTOGLM_JWT_ALGORITHMS", "").split(",") if a.strip()]
        default_algorithms = ("RS256",) if public_key is not None else ("HS256",)
        return cls(
            data_dir, jwt_secret=env.get("AUTOGLM_JWT_SECRET") or None, jwt_public_key=public_key,
            jwt_algorithms=algorithms or default_algorithms, jwt_audience=env.get("AUTOGLM_JWT_AUDIENCE") or None,
            jwt_issuer=env.get("AUTOGLM_JWT_ISSUER") or None, rate_per_s=rate if rate > 0 else None,
            burst=number("AUTOGLM_BURST", int, 100), max_body_bytes=number("AUTOGLM_MAX_BODY_BYTES", int, 1 << 20),
            roles=load_roles(env["AUTOGLM_ROLES"]) if env.get("AUTOGLM_ROLES") else None,
            login_failures=login_failures if login_failures > 0 else None,
            login_window_s=number("AUTOGLM_LOGIN_WINDOW_S", float, 60.0),
            trusted_proxies=env.get("AUTOGLM_TRUSTED_PROXIES", ""),
        )

    def describe(self) -> str:
        """What a caller needs, as a server says at its start: ``API keys from /data/keys.sqlite3 (2 active)``,
        ``JWTs signed HS256``, both, or none (an open server)."""
        if self.is_open:
            return "none, every caller is admin 'local'"
        ways = []
        if self.keys is not None:
            ways.append(f"API keys from {self.keys.path} ({self.active_keys()} active)")
        if self._jwt_key is not None:
            ways.append(f"JWTs signed {'/'.join(self.jwt_algorithms)}")
        return " or ".join(ways) or "no credentials accepted"

    def active_keys(self) -> int:
        """How many API keys authenticate now (revoked ones do not); 0 without a key store."""
        return 0 if self.keys is None else sum(not row["revoked"] for row in self.keys.list())

    # What follows admits_nobody() where a front end warns: what such a server does with every call.
    NOBODY_MEANS = "so every call but /health is refused as unauthenticated (401)"

    def admits_nobody(self) -> str | None:
        """Why no caller could authenticate, where none could: no active API key and no JWT key (a server started on
        an empty key store refuses every call but ``/health``); None where some caller can, or on an open server."""
        if self.is_open or self._jwt_key is not None or self.active_keys():
            return None
        where = f"the key store {self.keys.path} holds no active API key" if self.keys is not None \
            else "this server takes no API keys"
        return f"no caller can authenticate: {where} and no JWT key is set"

    def __repr__(self) -> str:
        if self.is_open:
            return "<Auth open: every caller is admin 'local'>"
        ways = [repr(self.keys)] if self.keys is not None else []
        if self._jwt_key is not None:
            ways.append(f"JWT {'/'.join(self.jwt_algorithms)}")
        return f"<Auth {' + '.join(ways) or 'no credentials accepted'}>"

    # -- the three questions --------------------------------------------------------------------

    def authenticate(self, headers: Mapping[str, str], address: str | None = None) -> Principal:
        """The caller named by ``authorization: Bearer <API key or JWT>`` or ``x-api-key: <API key>`` (lower-case
        header names); raises Unauthenticated.

        ``address`` (the client's, see :meth:`client_address`) counts a failure against it, and raises RateLimited
        while it is locked out for too many: then not even valid credentials are looked at.
        """
        if self.is_open:
            return Principal("local", "admin", "open")
        if address is None or self.failed_logins is None:
            return self._authenticate(headers)
        locked_for = self.failed_logins.locked_for(address)
        if locked_for > 0:
            raise RateLimited(
                f"too many failed logins from {address}: every request from it is refused for {locked_for:.0f} s "
                "more", retry_after_s=locked_for,
                hint=f"{self.failed_logins.limit} failed logins within {self.failed_logins.window_s:g} s lock an "
                     "address out; check the key or token this client sends",
            )
        try:
            return self._authenticate(headers)
        except Unauthenticated:
            if self.failed_logins.failed(address):
                log.warning("%s is locked out for %g s after %d failed logins", address,
                            self.failed_logins.window_s, self.failed_logins.limit)
            raise

    def client_address(self, peer: str | None, forwarded_for: str | None = None) -> str | None:
        """The client's address: the socket ``peer``, unless it is one of ``trusted_proxies``; then the
        ``X-Forwarded-For`` entries are read from the right (each one appended by the hop before), past the
        trusted ones, to the first that is not. None for no peer (a Unix socket)."""
        if peer is None or not self.trusted_proxies or not forwarded_for:
            return peer
        address = peer
        for entry in reversed(forwarded_for.split(",")):
            if not self._trusted(address):
                break
            try:
                address = str(ipaddress.ip_address(entry.strip()))
            except ValueError:
                break  # a trusted hop passed on something that is not an address: the hop is the client we know
        return address

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    def _authenticate(self, headers: Mapping[str, str]) -> Principal:
        credential = headers.get("x-api-key")
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthenticated("the authorization header is not 'Bearer <API key or JWT>'",
                                      hint="send 'authorization: Bearer <key>' or 'x-api-key: <key>'")
            credential = value.strip()
        if not credential:
            raise Unauthenticated("no credentials: this server needs an API key or a JWT",
                                  hint="send 'authorization: Bearer <key>' or 'x-api-key: <key>'; "
                                       "autoglm keys add NAME --role runner makes a key")
        if credential.startswith(KEY_PREFIX):
            if self.keys is None:
                raise Unauthenticated("this server takes no API keys", hint="send a JWT")
            principal = self.keys.verify(credential)
            if principal is None:
                raise Unauthenticated("the API key is not valid: unknown, revoked or mistyped",
                                      hint="autoglm keys list shows the active keys")
            return principal
        if credential.count(".") == 2:
            return self._verify_jwt(credential)
        raise Unauthenticated("the credential is neither an API key (agw_...) nor a JWT",
                              hint="autoglm keys add NAME --role runner makes a key")

    def authorize(self, who: Principal, action: str, chain: str | None = None) -> None:
        """Raise Forbidden unless ``who``'s role may do ``action`` (on ``chain``, when one is named)."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; actions: {sorted(ACTIONS)}")  # a gateway bug, not a user's
        role = self.roles.get(who.role)
        if role is None:
            raise Forbidden(f"{who.name!r} has role {who.role!r}, which this server does not define",
                            hint=f"roles here: {', '.join(sorted(self.roles))}")
        on = f" on chain {chain!r}" if chain is not None else ""
        if not role.allows(action, chain):
            can = sorted(role.actions)
            raise Forbidden(f"role {who.role!r} may not {action}{on}",
                            hint=f"role {who.role!r} may: {', '.join(can)}"
                                 + (f" on chains {', '.join(sorted(role.chains))}" if role.chains is not None else ""))
        if chain is not None and who.chains is not None and chain not in who.chains:
            raise Forbidden(f"{who.name!r} may not {action}{on}",
                            hint=f"its key is limited to chains: {', '.join(sorted(who.chains)) or '(none)'}")

    def admit(self, who: Principal, cost: int = 1, *, paid: int = 0) -> None:
        """Take ``cost`` requests (1; a batch of N runs costs N) from ``who``'s token bucket, ``paid`` of which were
        taken already (the gateway takes 1 per request before it reads a body that says how many runs it asks for).

        Raises RateLimited (with ``retry_after_s``: when the bucket will hold all ``cost``) when it holds fewer,
        PayloadTooLarge when ``cost`` is more than the bucket ever holds (its burst): no wait would let that in.
        """
        if self._buckets is None or cost <= paid:
            return
        burst = self._buckets.burst
        if cost > burst:
            raise PayloadTooLarge(f"a batch of {cost} runs is more than {who.name!r}'s burst of {burst}, the most "
                                  "it may start at once", hint=f"split it into batches of at most {burst}")
        wait = self._buckets.take(who.owner, float(cost), float(paid))
        if wait > 0:
            asked = f"a batch of {cost} runs is more than {who.name!r} has left" if cost > 1 else \
                f"{who.name!r} sent more than {self._buckets.rate_per_s:g} requests/s"
            raise RateLimited(
                f"{asked} (rate {self._buckets.rate_per_s:g}/s, burst {burst}); retry in {wait:.2f} s",
                retry_after_s=wait, hint="wait for the Retry-After seconds, or ask for a higher limit",
            )

    # -- limits the gateway applies -------------------------------------------------------------

    def check_size(self, length: int | None) -> None:
        """Raise PayloadTooLarge if a body of ``length`` bytes (a Content-Length, or what was read so far) is too
        large."""
        if length is not None and length > self.max_body_bytes:
            raise PayloadTooLarge(f"the request body is {length:,} bytes; this server takes at most "
                                  f"{self.max_body_bytes:,}", hint="send less, or split it into a batch of calls")

    def check_host(self, host: str) -> None:
        """Refuse to serve an open Auth (no credentials) on an address other machines can reach."""
        if not self.is_open or is_loopback(host):
            return
        raise SettingsError(f"a server without credentials must listen on loopback only, not {host!r}",
                            hint="serve on 127.0.0.1, or make keys (autoglm keys add NAME --role runner) and "
                                 "serve with them")

    def check_local(self, headers: Mapping[str, str]) -> None:
        """Without credentials, answer this machine's own clients only: Forbidden for a request a browser sent from
        a page of another site (an ``Origin`` that is not loopback; ``null`` included) or under another host name
        (a ``Host`` that is not loopback: DNS rebinding). A server with credentials leaves this to them."""
        if not self.is_open:
            return
        origin = headers.get("origin")
        if origin is not None and not is_loopback(_hostname(origin)):
            raise Forbidden(f"this server has no credentials and answers pages of this machine only, not origin "
                            f"{origin!r:.200}",
                            hint="call it from http://127.0.0.1 or http://localhost, or serve with keys "
                                 "(autoglm keys add NAME --role runner) to take calls from elsewhere")
        host = headers.get("host")
        if host is not None and not is_loopback(_hostname(f"//{host}")):
            raise Forbidden(f"this server has no credentials and answers loopback names only, not host "
                            f"{host!r:.200}",
                            hint="call it as 127.0.0.1, localhost or [::1]; a proxy in front of it must pass that "
                                 "Host, or serve with keys instead")

    # -- JWT ------------------------------------------------------------------------------------

    def _jwt_key_for(self, secret: str | bytes | None, public_key: str | bytes | None) -> str | bytes | None:
        if secret is None and public_key is None:
            return None
        algorithms = set(self.jwt_algorithms)
        if not algorithms or "none" in {a.lower() for a in algorithms}:
            raise SettingsError(f"jwt_algorithms={list(self.jwt_algorithms)} accepts unsigned tokens or none",
                                hint="pin the algorithms you sign with, e.g. ('HS256',) or ('RS256',)")
        unknown = algorithms - _HMAC_ALGORITHMS - _ASYMMETRIC_ALGORITHMS
        if unknown:
            raise SettingsError(f"unknown JWT algorithm {sorted(unknown)[0]!r}",
                                hint=f"one of {', '.join(sorted(_HMAC_ALGORITHMS | _ASYMMETRIC_ALGORITHMS))}")
        # One family only: with HS256 and RS256 both allowed, a token signed HS256 with the (public) RS key as its
        # secret would be the classic confusion attack.
        if algorithms <= _HMAC_ALGORITHMS:
            if secret is None or public_key is not None:
                raise SettingsError(f"JWT algorithms {sorted(algorithms)} need jwt_secret (and no jwt_public_key)",
                                    hint="HS* tokens are checked with a shared secret")
            key = secret.encode() if isinstance(secret, str) else secret
            # RFC 7518 3.2: a key at least as long as the hash (PyJWT warns below that).
            least = max(int(algorithm[2:]) // 8 for algorithm in algorithms)
            if len(key) < least:
                raise SettingsError(f"jwt_secret is {len(key)} bytes; {'/'.join(sorted(algorithms))} needs at "
                                    f"least {least}",
                                    hint=f"e.g. python -c 'import secrets; print(secrets.token_urlsafe({least}))'")
            return key
        if algorithms <= _ASYMMETRIC_ALGORITHMS:
            if public_key is None or secret is not None:
                raise SettingsError(f"JWT algorithms {sorted(algorithms)} need jwt_public_key (and no jwt_secret)",
                                    hint="RS*/PS*/ES*/EdDSA tokens are checked with the issuer's public key")
            from jwt.algorithms import has_crypto

            if not has_crypto:
                raise SettingsError(f"JWT algorithms {sorted(algorithms)} need the 'cryptography' package",
                                    hint="pip install 'PyJWT[crypto]', or sign with HS256 and a shared secret")
            return public_key
        raise SettingsError(f"jwt_algorithms mixes HMAC and public-key algorithms: {sorted(algorithms)}",
                            hint="pin one family, so a token cannot pick how it is checked")

    def _verify_jwt(self, token: str) -> Principal:
        import jwt

        if self._jwt_key is None:
            raise Unauthenticated("this server takes no JWTs", hint="send an API key (agw_...)")
        required = ["exp", "sub"] + (["aud"] if self.jwt_audience is not None else []) \
            + (["iss"] if self.jwt_issuer is not None else [])
        try:
            claims = jwt.decode(
                token, self._jwt_key, algorithms=list(self.jwt_algorithms), audience=self.jwt_audience,
                issuer=self.jwt_issuer, options={"require": required, "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the JWT has expired", hint="get a fresh token") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the JWT is not valid yet (nbf or iat in the future)",
                                  hint="check the clocks of the issuer and this server") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"the JWT is not for this audience ({self.jwt_audience!r})",
                                  hint="ask for a token with this server's audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"the JWT is not from the trusted issuer ({self.jwt_issuer!r})") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthenticated(f"the JWT is signed with an algorithm this server does not take (it takes "
                                  f"{', '.join(self.jwt_algorithms)})") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the JWT has no {exc.claim!r} claim",
                                  hint=f"tokens here need: {', '.join(required)} and role") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the JWT's signature does not verify", hint="it was signed with another key") \
                from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"the JWT is not valid: {exc}") from None
        role, subject = claims.get("role"), claims.get("sub")
        if not isinstance(role, str) or not role:
            raise Unauthenticated("the JWT has no 'role' claim", hint=f"roles: {', '.join(sorted(self.roles))}")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("the JWT's 'sub' claim is not a name")
        chains = claims.get("chains")
        if chains is not None and not (isinstance(chains, list) and all(isinstance(c, str) for c in chains)):
            raise Unauthenticated("the JWT's 'chains' claim is not a list of chain names")
        return Principal(subject, role, "jwt", None if chains is None else frozenset(chains))

