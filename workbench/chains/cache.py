"""The exact response cache: a hop's answers kept in the data directory's SQLite, keyed by everything that made them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.chains.sqlite_store import file_replaced, inode_of, is_damaged, is_read_only, open_wal
from workbench.engine.requests import GenerationParams, Messages
from workbench.errors import SettingsError, StoreError

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

CACHE_FILE = "cache.sqlite3"
DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MAX_BYTES = 256 * 2**20
# The most a write the cache can do without (an answer kept, a hit marked used) waits for a lock another process
# holds (a second kernel's clear, an open sqlite3 shell), not the whole busy timeout: the hop it serves waits with it.
WRITE_WAIT_S = 1.0
# Bumped when what goes into a key changes, so old entries are never read under a new meaning.
KEY_VERSION = 2
SCHEMA_VERSION = 1
_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS responses (
        key        TEXT PRIMARY KEY,
        chain      TEXT NOT NULL,
        hop        TEXT NOT NULL,
        model      TEXT NOT NULL,
        text       TEXT NOT NULL,
        tokens_out INTEGER NOT NULL,
        bytes      INTEGER NOT NULL,
        cost_ms    REAL NOT NULL,
        created_at REAL NOT NULL,
        used_at    REAL NOT NULL,
        hits       INTEGER NOT NULL DEFAULT 0
    )
    """,
    "CREATE INDEX IF NOT EXISTS responses_by_use ON responses (used_at)",
    # What every put's eviction counts and sums is read from this index, not the table with every answer's text: at
    # 100,000 entries, a put took 25 ms (13 ms of it to sum), and a lookup 0.03 ms.
    "CREATE INDEX IF NOT EXISTS responses_by_size ON responses (bytes)",
)
_DAMAGED_HINT = "the file is damaged: bench.clear_cache() sets it aside (as .damaged) and starts an empty one"
STATS_COLUMNS = ["hop", "model", "hits", "misses", "hit_rate", "entries", "bytes", "saved_s"]


def response_key(
    identity: Mapping[str, Any], prompt: str, messages: Messages | None, params: GenerationParams,
    adapter: str | None = None, scope: str | None = None,
) -> str:
    """The key of one model call: the model's identity, the hop's adapter, the prompt or messages, every sampling
    parameter, and whose answers they are (``scope``: a served caller's; None, the workbench's own). A change to any
    of them is another key."""
    material = {
        "v": KEY_VERSION,
        "model": dict(identity),
        "adapter": adapter,
        "prompt": prompt,
        "messages": messages,
        "params": {
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "seed": params.seed,
            "truncate": params.truncate,
            # Settings other engineers add to GenerationParams (stop strings, say) count too.
            **{k: v for k, v in sorted(vars(params).items()) if k not in ("max_new_tokens", "temperature", "top_p",
                                                                          "top_k", "seed", "truncate")},
        },
    }
    if scope is not None:  # not in the material at all without one: the keys of a notebook's answers stay as they were
        material["scope"] = scope
    text = json.dumps(material, sort_keys=True, ensure_ascii=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CachedResponse:
    """An answer found in the cache, and what producing it cost the first time."""

    text: str
    tokens_out: int
    cost_ms: float


class ResponseCache:
    """Answers of ``cache: exact`` hops in one SQLite file (WAL: safe across threads, processes and a kill mid-write).

    Bounded by ``max_entries`` and ``max_bytes``: past either, the least recently used entries go.
    Hit and miss counts are this workbench's (since it started or :meth:`clear`); entries and bytes
    are the file's. The file is opened on first use.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout_s: float = 30.0,
    ) -> None:
        self.path = Path(path).expanduser()
        self._timeout_s = timeout_s
        self._write_wait_s = min(WRITE_WAIT_S, timeout_s)
        self.set_limits(max_entries, max_bytes)
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._inode: int | None = None  # of the file the connection opened
        # (hop, model) -> [hits, misses, saved_ms]
        self._counts: dict[tuple[str, str], list[float]] = {}
        self._counts_lock = threading.Lock()

    def set_limits(self, max_entries: int | None = None, max_bytes: int | None = None) -> None:
        """Bound the cache (None leaves a bound as it is); evicts at the next write."""
        for name, value in (("max_entries", max_entries), ("max_bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SettingsError(f"cache {name} must be a whole number >= 1, not {value!r:.60}",
                                    hint="e.g. bench.set_cache_limits(max_entries=10_000, max_bytes=64 * 2**20)")
        if max_entries is not None:
            self.max_entries = max_entries
        if max_bytes is not None:
            self.max_bytes = max_bytes

    def get(self, key: str, hop: str, model: str, count: bool = True) -> CachedResponse | None:
        """The answer stored under ``key`` (counted as a hit, and marked used now), or None (a miss); ``count=False``
        leaves the counting to the caller (:meth:`count`)."""
        rows = self._execute("SELECT text, tokens_out, cost_ms FROM responses WHERE key = ?", (key,))
        found = CachedResponse(*rows[0]) if rows else None
        if found is not None:
            try:
                self._execute("UPDATE responses SET used_at = ?, hits = hits + 1 WHERE key = ?", (time.time(), key),
                              wait_s=self._write_wait_s)
            except StoreError as exc:  # the answer was found: only its place in the eviction order is lost
                logger.warning("a hit in the response cache %s was not marked used: %s", self.path, exc.message)
        if count:
            self.count(hop, model, found.cost_ms if found is not None else None)
        return found

    def count(self, hop: str, model: str, saved_ms: float | None) -> None:
        """Count a lookup of ``hop`` on ``model``: a hit that saved ``saved_ms`` of the model's time, or (None) a miss."""
        with self._counts_lock:
            counts = self._counts.setdefault((hop, model), [0, 0, 0.0])
            if saved_ms is None:
                counts[1] += 1
            else:
                counts[0] += 1
                counts[2] += saved_ms

    def put(self, key: str, chain: str, hop: str, model: str, text: str, tokens_out: int, cost_ms: float) -> None:
        """Store an answer, then evict the least recently used entries past the bounds, in one transaction."""
        size = len(text.encode("utf-8", "surrogatepass")) + len(key) + len(chain) + len(hop) + len(model)
        now = time.time()
        with self._lock:
            connection = self._open_locked()
            try:
                with self._waiting_at_most(connection, self._write_wait_s):
                    connection.execute("BEGIN IMMEDIATE")
                    try:
                        connection.execute(
                            "INSERT OR REPLACE INTO responses (key, chain, hop, model, text, tokens_out, bytes,"
                            " cost_ms, created_at, used_at, hits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                            (key, chain, hop, model, text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
                             tokens_out, size, cost_ms, now, now),
                        )
                        self._evict(connection)
                        connection.execute("COMMIT")
                    except BaseException:
                        connection.execute("ROLLBACK")
                        raise
            except sqlite3.Error as exc:
                raise self._failed(exc) from exc

    def _evict(self, connection: sqlite3.Connection) -> None:
        count, total = connection.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM responses").fetchone()
        if count > self.max_entries:
            connection.execute("DELETE FROM responses WHERE key IN (SELECT key FROM responses ORDER BY used_at, "
                               "created_at LIMIT ?)", (count - self.max_entries,))
            total = connection.execute("SELECT COALESCE(SUM(bytes), 0) FROM responses").fetchone()[0]
        if total > self.max_bytes:
            over, dropped = total - self.max_bytes, []
            for key, size in connection.execute("SELECT key, bytes FROM responses ORDER BY used_at, created_at"):
                if over <= 0:
                    break
                dropped.append((key,))
                over -= size
            connection.executemany("DELETE FROM responses WHERE key = ?", dropped)

    def clear(self, chain: str | None = None, hop: str | None = None) -> int:
        """Drop stored answers (of one chain, or one hop) and this workbench's counts of them; returns how many went."""
        where, args = [], []
        for column, value in (("chain", chain), ("hop", hop)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "DELETE FROM responses" + (f" WHERE {' AND '.join(where)}" if where else "")
        if not where:
            # A damaged file cannot be emptied, nor one a newer workbench wrote: a new one takes its place. The check
            # reads every page (a SELECT reads only those it needs: damage elsewhere passed it, and every clear failed).
            try:
                damaged = [tuple(row) for row in self._execute("PRAGMA quick_check", ())] != [("ok",)]
            except _NewerSchema:
                self._set_aside("newer")
                damaged = False
            except StoreError as exc:
                if not is_damaged(exc.__cause__):
                    raise
                damaged = True
            if damaged:
                self._set_aside()
        count = self._execute("SELECT COUNT(*) FROM responses" + sql[len("DELETE FROM responses"):], tuple(args))[0][0]
        # Counts are kept by hop and model, not chain: those of one chain are its stored hops' (clearing one chain
        # wiped every chain's counts).
        hops = None if hop is not None or chain is None else {row[0] for row in self._execute(
            "SELECT DISTINCT hop FROM responses WHERE chain = ?", (chain,))}
        self._execute(sql, tuple(args))
        with self._counts_lock:
            for key in [k for k in self._counts if (hop is None or k[0] == hop) and (hops is None or k[0] in hops)]:
                del self._counts[key]
        return int(count)

    def stats(self) -> pd.DataFrame:
        """One row per hop and model: hits, misses, hit rate (this workbench's), entries and bytes stored, time saved.

        ``saved_s`` adds up, over the hits, what the stored answer cost when the model made it.
        """
        import pandas as pd

        stored = {(hop, model): (entries, size) for hop, model, entries, size in self._execute(
            "SELECT hop, model, COUNT(*), SUM(bytes) FROM responses GROUP BY hop, model", ())}
        rows = []
        with self._counts_lock:
            counted = {key: tuple(value) for key, value in self._counts.items()}
        for key in sorted(set(stored) | set(counted)):
            hits, misses, saved_ms = counted.get(key, (0, 0, 0.0))
            entries, size = stored.get(key, (0, 0))
            lookups = hits + misses
            rows.append({"hop": key[0], "model": key[1], "hits": int(hits), "misses": int(misses),
                         "hit_rate": hits / lookups if lookups else float("nan"), "entries": entries,
                         "bytes": int(size), "saved_s": saved_ms / 1e3})
        return pd.DataFrame(rows, columns=STATS_COLUMNS)

    def entries(self) -> int:
        return int(self._execute("SELECT COUNT(*) FROM responses", ())[0][0])

    def bytes(self) -> int:
        return int(self._execute("SELECT COALESCE(SUM(bytes), 0) FROM responses", ())[0][0])

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __repr__(self) -> str:
        return f"<ResponseCache {str(self.path)!r}>"

    def _execute(self, sql: str, parameters: tuple[Any, ...], wait_s: float | None = None) -> list[tuple[Any, ...]]:
        """Run one statement; ``wait_s``: how long it waits for another process's lock (else the busy timeout)."""
        with self._lock:
            connection = self._open_locked()
            try:
                with self._waiting_at_most(connection, wait_s) if wait_s is not None else nullcontext():
                    return connection.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                raise self._failed(exc) from exc

    @contextmanager
    def _waiting_at_most(self, connection: sqlite3.Connection, seconds: float) -> Iterator[None]:
        """Within it, the connection's statements wait at most ``seconds`` for a lock another process holds; then the
        busy timeout again."""
        connection.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")
        try:
            yield
        finally:
            connection.execute(f"PRAGMA busy_timeout = {int(self._timeout_s * 1000)}")

    def _set_aside(self, why: str = "damaged") -> None:
        """Move the damaged (or newer) file and its WAL to ``*.damaged`` (``*.newer``), kept for a look, so that the
        next use starts anew."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
            for suffix in ("", "-wal", "-shm"):
                path = Path(f"{self.path}{suffix}")
                if path.exists():
                    os.replace(path, f"{self.path}.{why}{suffix}")
        logger.warning("the response cache %s was %s; it is kept as %s.%s and a new one starts", self.path,
                       "damaged" if why == "damaged" else "written by a newer workbench", self.path, why)

    def _read_only(self) -> StoreError:
        return StoreError(
            f"the response cache {str(self.path)!r} is read-only here: answers can neither be looked up in it nor "
            "kept", hint="make the file and its folder writable for this user, or pick a writable directory with "
            "Workbench(data_dir=...) or $AUTOGLM_DATA_DIR",
        )

    def _failed(self, exc: sqlite3.Error) -> StoreError:
        if is_read_only(exc):
            return self._read_only()
        return StoreError(f"the response cache {str(self.path)!r} failed: {exc}",
                          hint=_DAMAGED_HINT if is_damaged(exc) else "another process may hold it locked for long, or "
                          "the disk is full; bench.clear_cache() empties it")

    def _open_locked(self) -> sqlite3.Connection:
        if self._connection is not None and file_replaced(self.path, self._inode):
            # Deleted (rm from a shell) or replaced under us: reading on would answer from a cache that is gone.
            self._connection.close()
            self._connection = None
        if self._connection is not None:
            return self._connection
        try:
            connection = open_wal(self.path, self._timeout_s, _create)
        except (OSError, sqlite3.Error) as exc:
            if is_read_only(exc):
                raise self._read_only() from exc
            raise StoreError(
                f"cannot open the response cache {str(self.path)!r}: {exc}",
                hint=_DAMAGED_HINT if is_damaged(exc) else
                "Workbench(data_dir=...) or $AUTOGLM_DATA_DIR picks a writable directory",
            ) from exc
        self._connection = connection
        self._inode = inode_of(self.path)
        return connection


def _create(connection: sqlite3.Connection, path: Path) -> None:
    version = int(connection.execute("PRAGMA user_version").fetchone()[0])
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise _NewerSchema(f"the response cache {str(path)!r} has schema version {version}, newer than this "
                           f"workbench's {SCHEMA_VERSION}", hint="upgrade autoglm-workbench, or bench.clear_cache() "
                           "(it sets the file aside, as .newer, and starts an empty one)")
    connection.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


class _NewerSchema(StoreError):
    """A cache file a newer workbench wrote: read by none of this one's queries; clear() sets it aside."""
