"""The default context store: session history in one SQLite file that outlives the kernel."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from workbench.chains.context import ContextStore, Evictions, RunRecord, SessionLimits
from workbench.chains.context import encode_record as _encode
from workbench.chains.context import encoded_bytes as _size
from workbench.errors import StoreError
from workbench.tracing.clock import now_ns

_T = TypeVar("_T")
SESSIONS_FILE = "sessions.sqlite3"

# Each entry takes the schema from version N to N + 1 (PRAGMA user_version). A change to the
# schema appends an entry; one that was released is never edited, so every older file upgrades.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE runs (
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            session     TEXT NOT NULL,
            run_id      TEXT NOT NULL,
            chain       TEXT NOT NULL,
            inputs      TEXT NOT NULL,
            outputs     TEXT NOT NULL,
            output      TEXT NOT NULL,
            started_at  REAL NOT NULL,
            duration_ms REAL NOT NULL,
            status      TEXT NOT NULL,
            error       TEXT,
            meta        TEXT NOT NULL
        )
        """,
        "CREATE INDEX runs_by_session ON runs (session, seq)",
    ),
    (
        # Each run's size, and per session and in all what the runs hold, kept by triggers in the same statement as
        # the write (any process's, forgets included), so a write checks the limits without counting the file.
        "ALTER TABLE runs ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0",
        "UPDATE runs SET bytes = length(CAST(run_id AS BLOB)) + length(CAST(chain AS BLOB)) + length(CAST(inputs AS "
        "BLOB)) + length(CAST(outputs AS BLOB)) + length(CAST(output AS BLOB)) + length(CAST(status AS BLOB)) + "
        "COALESCE(length(CAST(error AS BLOB)), 0) + length(CAST(meta AS BLOB))",
        "CREATE INDEX runs_by_start ON runs (started_at)",
        # born: the seq of the session's first run since it last had none. A forget deletes the row, and the next run
        # makes a new one, so a run that read the history under one born and finds another knows it was forgotten.
        """
        CREATE TABLE sessions (
            session  TEXT PRIMARY KEY,
            born     INTEGER NOT NULL,
            runs     INTEGER NOT NULL,
            bytes    INTEGER NOT NULL,
            last_seq INTEGER NOT NULL
        )
        """,
        "INSERT INTO sessions SELECT session, MIN(seq), COUNT(*), SUM(bytes), MAX(seq) FROM runs GROUP BY session",
        "CREATE INDEX sessions_by_activity ON sessions (last_seq)",
        "CREATE TABLE totals (id INTEGER PRIMARY KEY CHECK (id = 0), sessions INTEGER NOT NULL, runs INTEGER NOT NULL,"
        " bytes INTEGER NOT NULL)",
        "INSERT INTO totals SELECT 0, COUNT(*), COALESCE(SUM(runs), 0), COALESCE(SUM(bytes), 0) FROM sessions",
        """
        CREATE TRIGGER run_added AFTER INSERT ON runs BEGIN
            INSERT OR IGNORE INTO sessions (session, born, runs, bytes, last_seq)
                VALUES (NEW.session, NEW.seq, 0, 0, NEW.seq);
            UPDATE sessions SET runs = runs + 1, bytes = bytes + NEW.bytes, last_seq = NEW.seq
                WHERE session = NEW.session;
            UPDATE totals SET runs = runs + 1, bytes = bytes + NEW.bytes,
                sessions = sessions + (SELECT runs = 1 FROM sessions WHERE session = NEW.session);
        END
        """,
        """
        CREATE TRIGGER run_removed AFTER DELETE ON runs BEGIN
            UPDATE sessions SET runs = runs - 1, bytes = bytes - OLD.bytes WHERE session = OLD.session;
            UPDATE totals SET runs = runs - 1, bytes = bytes - OLD.bytes,
                sessions = sessions - (SELECT runs = 0 FROM sessions WHERE session = OLD.session);
            DELETE FROM sessions WHERE session = OLD.session AND runs = 0;
        END
        """,
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)
_COLUMNS = "run_id, chain, inputs, outputs, output, started_at, duration_ms, status, error, meta"
_INSERT = f"INSERT INTO runs (session, {_COLUMNS}, bytes)"


def data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the workbench keeps what outlives a kernel: ``data_dir`` if given, else ``$AUTOGLM_DATA_DIR``, else the
    XDG data directory. Absolute: its files open on first use, and a relative path would follow a later chdir
    (a notebook's ``%cd``) to another directory's files."""
    explicit = data_dir if data_dir is not None else os.environ.get("AUTOGLM_DATA_DIR") or None
    if explicit is not None:
        return Path(explicit).expanduser().absolute()
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return (Path(xdg) / "autoglm-workbench").absolute()


class SQLiteContextStore(ContextStore):
    """Sessions in one SQLite file, in WAL mode: safe across threads, processes and a kill mid-write.

    Every value is stored as JSON; one that JSON cannot hold is stored as its ``repr`` and the
    record's ``meta["stored_as_repr"]`` names the field (``"outputs.stats"``, ``"output"``).
    The file is opened on first use, so a workbench that never uses sessions never touches it.
    ``limits`` bound what it keeps (:class:`SessionLimits`; by default no bound): each write drops what they no
    longer allow, in the same transaction.
    """

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 30.0,
                 limits: SessionLimits | None = None) -> None:
        self.path = Path(path).expanduser()
        self._timeout_s = timeout_s
        self._limits = limits if limits is not None else SessionLimits()
        self._evicted = Evictions(lambda: repr(str(self.path)))
        # One connection, used under a lock: SQLite serialises writers anyway, and a lock is
        # simpler to close than a connection per thread. Other processes wait on SQLite's own lock.
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._inode: int | None = None  # of the file the connection opened

    @property
    def limits(self) -> SessionLimits:
        return self._limits

    def set_limits(self, limits: SessionLimits) -> None:
        self._limits = limits

    def append(self, session: str, record: RunRecord) -> None:
        self._write(session, record, None)

    def _write(self, session: str, record: RunRecord, born: int | None) -> bool:
        """Insert ``record`` (unless ``born`` is given and the session is no longer the one it names: it was forgotten
        since) and drop what the limits no longer allow, in one transaction: a run is in the file whole or not at
        all, and no write leaves the file past its bounds. Whether the record was kept."""
        encoded = _encode(record)
        row = (session, *encoded, _size(encoded))
        values = "?, " * (len(row) - 1) + "?"
        limits = self._limits

        def write(connection: sqlite3.Connection) -> tuple[bool, int]:
            connection.execute("BEGIN IMMEDIATE")
            try:
                if born is None or born == 0:  # no mark, or the session had no runs when it was read
                    connection.execute(f"{_INSERT} VALUES ({values})", row)
                    kept = True
                else:
                    kept = bool(connection.execute(
                        f"{_INSERT} SELECT {values} WHERE (SELECT born FROM sessions WHERE session = ?) = ? "
                        "RETURNING seq", (*row, session, born)).fetchall())
                evicted = _trim(connection, session, limits) if kept else 0
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            return kept, evicted

        kept, evicted = self._run(write)
        self._evicted.add(evicted, limits)
        return kept

    def history(self, session: str, limit: int | None = None) -> list[RunRecord]:
        if limit is not None and limit <= 0:
            return []
        return self._decoded(self._execute(*_history_query(session, limit)), session)

    def marked_history(self, session: str, limit: int | None = None) -> tuple[list[RunRecord], object]:
        """The history, and the session's ``born`` then (0: it had no runs): a forget since, by any process, deletes
        the session, and its next run makes another, which :meth:`append_marked` sees (read in one transaction, so
        the two agree). The limits dropping a session's oldest runs leave it the same session."""

        def read(connection: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], tuple[int, int]]:
            connection.execute("BEGIN")
            try:
                rows = connection.execute(*_history_query(session, limit)).fetchall() \
                    if limit is None or limit > 0 else []
                born = connection.execute("SELECT born FROM sessions WHERE session = ?", (session,)).fetchone()
            finally:
                connection.execute("COMMIT")  # a read: nothing to keep or undo
            return rows, int(born[0]) if born else 0

        rows, mark = self._run(read)
        return self._decoded(rows, session), mark

    def append_marked(self, session: str, record: RunRecord, mark: object) -> bool:
        """Keep ``record`` unless the session is no longer the one ``mark`` names (it was forgotten since): checked in
        the write's own transaction, so no forget can come between the check and the write."""
        if not isinstance(mark, int) or isinstance(mark, bool):
            return super().append_marked(session, record, mark)
        return self._write(session, record, mark)

    def sessions(self) -> list[str]:
        return [row[0] for row in self._execute("SELECT DISTINCT session FROM runs ORDER BY session", ())]

    def forget(self, session: str) -> int:
        return len(self._execute("DELETE FROM runs WHERE session = ? RETURNING seq", (session,)))

    def stats(self) -> dict[str, int]:
        sessions, runs, size = self._execute("SELECT sessions, runs, bytes FROM totals", ())[0]
        return {"sessions": sessions, "runs": runs, "bytes": size, "evicted_runs": self._evicted.count}

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __repr__(self) -> str:
        return f"<SQLiteContextStore {str(self.path)!r}>"

    def _decoded(self, rows: list[tuple[Any, ...]], session: str) -> list[RunRecord]:
        return [_decode(row, session, self.path) for row in reversed(rows)]

    def _execute(self, sql: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._run(lambda connection: connection.execute(sql, parameters).fetchall())

    def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """``work`` on the store's connection (opened now if need be), under its lock; a StoreError if it fails."""
        with self._lock:
            if self._connection is not None and file_replaced(self.path, self._inode):
                # Deleted (or replaced) under us: writing on would go to a file no one can open again.
                self._connection.close()
                self._connection = None
            if self._connection is None:
                self._connection = self._open()
                self._inode = inode_of(self.path)
            try:
                return work(self._connection)
            except sqlite3.Error as exc:
                if is_read_only(exc):  # opened read-only (open_read_only): its sessions read, nothing is written
                    raise StoreError(
                        f"the session store {str(self.path)!r} is read-only here: runs cannot be kept in it nor "
                        "sessions forgotten, though its sessions read",
                        hint="make the file and its folder writable for this user, or pick a writable directory "
                        "with Workbench(data_dir=...) or $AUTOGLM_DATA_DIR (Workbench(store=InMemoryContextStore()) "
                        "keeps sessions in memory only)",
                    ) from exc
                raise StoreError(
                    f"the session store {str(self.path)!r} failed: {exc}",
                    hint=self._damaged_hint() if is_damaged(exc) else
                    "another process may hold it locked for long, or the disk is full",
                ) from exc

    def _open(self) -> sqlite3.Connection:
        try:
            try:
                connection = open_wal(self.path, self._timeout_s, _migrate)
            except sqlite3.Error:
                if not _read_only_here(self.path):
                    raise
                # A copy on a read-only disk, or one this user may not write: its sessions read all the same.
                connection = open_read_only(self.path, self._timeout_s)
                _check_version(connection, self.path)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open the session store {str(self.path)!r}: {exc}",
                hint=self._damaged_hint() if is_damaged(exc) else
                "Workbench(data_dir=...) or $AUTOGLM_DATA_DIR picks a writable directory;"
                " Workbench(store=InMemoryContextStore()) keeps sessions in memory only",
            ) from exc
        return connection

    def _damaged_hint(self) -> str:
        return (f"the file is damaged: move it aside and a new one starts (sqlite3 {str(self.path)!r} .recover may "
                "save its sessions), or Workbench(data_dir=...) picks another directory")


WAL_LIMIT_BYTES = 4 << 20  # the most a write-ahead log keeps on disk after a checkpoint


def open_wal(path: Path, timeout_s: float, prepare: Callable[[sqlite3.Connection, Path], object]) -> sqlite3.Connection:
    """Open (creating its folder) the SQLite file at ``path`` in WAL mode for use from any thread, and ``prepare``
    it (create or migrate its schema); raises OSError or sqlite3.Error for the caller to name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; each statement commits, BEGIN is explicit.
    connection = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
    try:
        # Another process opening or checkpointing the same file can make these fail at once
        # with "database is locked", without waiting out the busy timeout: wait here instead.
        deadline = time.monotonic() + timeout_s
        _while_busy(lambda: connection.execute("PRAGMA journal_mode=WAL"), deadline)
        # In WAL mode NORMAL loses no committed transaction when a process dies (only on power loss), and a
        # process killed mid-write loses at most the write it was making, never the file.
        connection.execute("PRAGMA synchronous=NORMAL")
        # A checkpoint truncates the WAL back to this: without it the file keeps its peak size for good (43 MB
        # beside a 1 MB cache after two processes wrote at once).
        connection.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        _while_busy(lambda: prepare(connection, path), deadline)
    except BaseException:
        connection.close()
        raise
    return connection


def open_read_only(path: Path, timeout_s: float) -> sqlite3.Connection:
    """Open the SQLite file at ``path`` for reading only, as a read-only copy of a WAL file can be, write-ahead log
    included wherever SQLite can read it.

    ``mode=ro`` reads the log through its shared-memory file (``-shm``), which must be there or be one the folder can
    take. A folder no one may write in that holds a ``-wal`` and no ``-shm`` (a copy, a backup: no process has the
    file open) has its log read with no shared memory: in EXCLUSIVE locking mode SQLite keeps the log's index in this
    process's memory. That mode takes a write lock, which a file opened read-only cannot, hence a VFS that takes no
    locks. Failing both, ``immutable=1`` reads the main file alone, and a RuntimeWarning says what the log held is
    not seen. The last two take no locks: they hold, as a folder no one may write in suggests, that nothing writes
    the file meanwhile.
    """
    uri = path.absolute().as_uri()
    wal, shm = path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")
    try:
        return _reading(f"{uri}?mode=ro", timeout_s)
    except sqlite3.Error:
        pass
    if wal.exists() and not shm.exists():  # a -shm there may be a writer's, whose log changes under a reader
        try:
            return _reading(f"{uri}?mode=ro&vfs={_NO_LOCKS_VFS}", timeout_s, "PRAGMA locking_mode=EXCLUSIVE")
        except sqlite3.Error:
            pass
    connection = _reading(f"{uri}?immutable=1", timeout_s)
    if wal.exists() and wal.stat().st_size > 0:
        warnings.warn(
            f"the session store {str(path)!r} is read-only here, and its write-ahead log {str(wal)!r} cannot be "
            f"read (that needs the log readable, and {shm.name} beside it readable or absent), so its sessions read "
            "without the runs written last, which may still be in that log; to see them, open the store once where "
            f"it can be written (SQLite then folds the log into the file), or copy {path.name} with its -wal file "
            "to a folder this user can write and read it there",
            RuntimeWarning, stacklevel=2,
        )
    return connection


# The unix VFS without its locks: SQLite's own, for a file that nothing else writes while it is open.
_NO_LOCKS_VFS = "unix-none"


def _reading(uri: str, timeout_s: float, first: str | None = None) -> sqlite3.Connection:
    """A connection for any thread to the database at ``uri``, after ``first`` (a PRAGMA), once a read succeeds."""
    connection = sqlite3.connect(uri, timeout=timeout_s, uri=True, isolation_level=None, check_same_thread=False)
    try:
        if first is not None:
            connection.execute(first)  # before the first read: a locking mode, say
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except BaseException:
        connection.close()
        raise
    return connection


def _read_only_here(path: Path) -> bool:
    """Whether ``path`` is a file this process may read but not write, or in a folder it may not write in."""
    return path.is_file() and os.access(path, os.R_OK) and not (
        os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def inode_of(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def file_replaced(path: Path, inode: int | None) -> bool:
    """Whether the file at ``path`` is gone, or is another file than the one whose inode is ``inode``."""
    now = inode_of(path)
    return now is None or now != inode


def is_damaged(exc: BaseException | None) -> bool:
    """Whether SQLite refused the file as not a database, or as malformed."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
    return "not a database" in str(exc) or "malformed" in str(exc)


def is_read_only(exc: BaseException) -> bool:
    """Whether SQLite refused a write because the file was opened for reading only, or cannot be written."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_READONLY
    return "readonly database" in str(exc)


def _while_busy(action: Callable[[], object], deadline: float) -> None:
    """Run ``action``, again after a short sleep while SQLite answers busy or locked, until ``deadline``."""
    delay = 0.005
    while True:
        try:
            action()
            return
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
            busy = code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) if code is not None else (
                "locked" in str(exc) or "busy" in str(exc))
            if not busy or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _migrate(connection: sqlite3.Connection, path: Path) -> None:
    """Bring the file's schema to SCHEMA_VERSION, in one transaction that another process cannot race."""
    if _version(connection) == SCHEMA_VERSION:
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        version = _check_version(connection, path, at_most=True)  # again under the write lock: another may have won
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def _check_version(connection: sqlite3.Connection, path: Path, at_most: bool = False) -> int:
    """The file's schema version; StoreError if it is newer than this workbench's, or (unless ``at_most``: the
    caller migrates it) older."""
    version = _version(connection)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the session store {str(path)!r} has schema version {version}, newer than this"
            f" workbench's {SCHEMA_VERSION}",
            hint="upgrade autoglm-workbench, or point Workbench(data_dir=...) at another directory",
        )
    if version < SCHEMA_VERSION and not at_most:
        raise StoreError(f"the session store {str(path)!r} is read-only here and has schema version {version}, "
                         f"older than this workbench's {SCHEMA_VERSION}",
                         hint="open it once where it can be written, to bring it up to date")
    return version


def _version(connection: sqlite3.Connection) -> int:
    return int(connection.execute("PRAGMA user_version").fetchone()[0])


def _history_query(session: str, limit: int | None) -> tuple[str, tuple[Any, ...]]:
    """The SELECT of a session's last ``limit`` runs (all: None), newest first."""
    # LIMIT takes a 64-bit integer: a spec's history: 10**20 ("all of it") would overflow it.
    return (f"SELECT {_COLUMNS} FROM runs WHERE session = ? ORDER BY seq DESC LIMIT ?",
            (session, -1 if limit is None or limit >= 2**63 else limit))


def _trim(connection: sqlite3.Connection, session: str, limits: SessionLimits) -> int:
    """After a run was appended to ``session``, delete what ``limits`` no longer allow (see SessionLimits), in the
    caller's transaction; how many runs went."""
    dropped = 0
    if limits.runs_per_session is not None:
        edge = connection.execute("SELECT seq FROM runs WHERE session = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                                  (session, limits.runs_per_session)).fetchone()
        if edge is not None:
            dropped += connection.execute("DELETE FROM runs WHERE session = ? AND seq <= ?",
                                          (session, edge[0])).rowcount
    if limits.max_age_s is not None:
        dropped += connection.execute("DELETE FROM runs WHERE started_at < ?",
                                      (now_ns() / 1e9 - limits.max_age_s,)).rowcount
    sessions, total = connection.execute("SELECT sessions, bytes FROM totals").fetchone()
    over_sessions = sessions - limits.max_sessions if limits.max_sessions is not None else 0
    over_bytes = total - limits.max_bytes if limits.max_bytes is not None else 0
    if over_sessions > 0 or over_bytes > 0:
        going: list[tuple[str]] = []
        others = connection.execute("SELECT session, bytes FROM sessions WHERE session != ? ORDER BY last_seq",
                                    (session,))
        for name, size in others:  # least recently active first
            if over_sessions <= 0 and over_bytes <= 0:
                break
            going.append((name,))
            over_sessions -= 1
            over_bytes -= size
        others.close()
        for name in going:
            dropped += connection.execute("DELETE FROM runs WHERE session = ?", name).rowcount
    if over_bytes > 0:  # the session written holds more than max_bytes alone: its oldest runs go, its newest stays
        edge = None
        for seq, size in connection.execute("SELECT seq, bytes FROM runs WHERE session = ? ORDER BY seq DESC "
                                            "LIMIT -1 OFFSET 1", (session,)).fetchall()[::-1]:
            if over_bytes <= 0:
                break
            edge, over_bytes = seq, over_bytes - size
        if edge is not None:
            dropped += connection.execute("DELETE FROM runs WHERE session = ? AND seq <= ?", (session, edge)).rowcount
    return dropped


def _decode(row: tuple[Any, ...], session: str, path: Path) -> RunRecord:
    run_id, chain, inputs, outputs, output, started_at, duration_ms, status, error, meta = row
    values = {}
    for name, text in (("inputs", inputs), ("outputs", outputs), ("output", output), ("meta", meta)):
        try:
            values[name] = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:  # a row edited or damaged outside the workbench
            raise StoreError(
                f"the session store {str(path)!r}: run {run_id!r} of session {session[:100]!r} has a damaged "
                f"{name} column ({type(exc).__name__}: {str(exc)[:100]})",
                hint=f"delete that row (sqlite3: DELETE FROM runs WHERE run_id = '{run_id}'), or use another session",
            ) from None
    return RunRecord(run_id=run_id, chain=chain, started_at=started_at, duration_ms=duration_ms, status=status,
                     error=error, **values)
