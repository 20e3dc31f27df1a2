"""Run records and the context store that keeps a session's history between runs."""

from __future__ import annotations

import json
import logging
import math
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

from workbench.errors import SettingsError
from workbench.tracing.clock import now_ns
from workbench.tracing.openinference import unshown

if TYPE_CHECKING:
    from workbench.chains.run import Run

log = logging.getLogger(__name__)

# Where a value that JSON cannot hold was kept as its repr: meta[STORED_AS_REPR] lists the fields.
STORED_AS_REPR = "stored_as_repr"

# What a server's store keeps by default (autoglm serve): 1 GiB of runs (their stored JSON), then the least recently
# active sessions go. A notebook's keeps everything unless told: the sessions are its user's own, and an upgrade that
# began to drop a researcher's oldest sessions unasked would lose what they had.
SERVED_SESSION_BYTES = 1 << 30


@dataclass(frozen=True)
class SessionLimits:
    """Bounds on what a context store keeps; a run appended past one makes the oldest runs go, in the same write.

    - ``runs_per_session``: a session keeps its newest this many runs.
    - ``max_sessions``: past this many sessions, the least recently active ones (by their last run) go whole.
    - ``max_bytes``: past this many bytes of stored runs (inputs, outputs, output and notes, as the store keeps them),
      the least recently active sessions go whole; a session that alone holds more loses its oldest runs (its newest
      stays).
    - ``max_age_s``: runs that started longer ago than this go.

    None: no bound. The session being written is never the one that goes whole. The default is no bound at all, as a
    notebook's sessions are its user's own; ``autoglm serve`` bounds bytes (1 GiB) unless told, so callers who open
    session after session cannot fill its disk.
    """

    runs_per_session: int | None = None
    max_sessions: int | None = None
    max_bytes: int | None = None
    max_age_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("runs_per_session", "max_sessions", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SettingsError(f"SessionLimits {name} must be a whole number >= 1 or None (no bound), "
                                    f"not {value!r:.60}", hint="e.g. wb.SessionLimits(runs_per_session=1000)")
        age = self.max_age_s
        if age is not None and (isinstance(age, bool) or not isinstance(age, (int, float)) or not math.isfinite(age)
                                or age <= 0):
            raise SettingsError(f"SessionLimits max_age_s must be a number of seconds > 0 or None (no bound), "
                                f"not {age!r:.60}", hint="e.g. wb.SessionLimits(max_age_s=30 * 86400) keeps 30 days")


@dataclass(frozen=True)
class RunRecord:
    """What a session remembers of one run."""

    run_id: str
    chain: str
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    output: Any
    started_at: float
    duration_ms: float
    status: str = "ok"
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, run: Run) -> RunRecord:
        """What a session keeps of ``run``."""
        return cls(
            run_id=run.id, chain=run.chain, inputs=run.inputs, outputs=dict(run.outputs), output=run.output,
            started_at=run.started_at, duration_ms=run.duration_ms, status=run.status,
            error=run.error.message if run.error is not None else None,
            meta={"config_version": run.config_version.number, "config_hash": run.config_version.digest}
            if run.config_version is not None else {},
        )


class History(Sequence[RunRecord]):
    """A session's past runs as a template sees them: iterable, and readable as plain text."""

    def __init__(self, records: Sequence[RunRecord]) -> None:
        self._records = list(records)

    @overload
    def __getitem__(self, index: int) -> RunRecord: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[RunRecord]: ...
    def __getitem__(self, index: int | slice) -> RunRecord | Sequence[RunRecord]:
        return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[RunRecord]:
        return iter(self._records)

    def __str__(self) -> str:
        turns = []
        for record in self._records:
            lines = [f"{key}: {value}" for key, value in record.inputs.items()]
            lines.append(f"output: {record.output}")
            turns.append("\n".join(lines))
        return "\n\n".join(turns)


class ContextStore(ABC):
    """Where sessions keep their run history: SQLite by default (sqlite_store.py), or in memory."""

    @abstractmethod
    def append(self, session: str, record: RunRecord) -> None:
        """Add a finished run to a session."""

    @abstractmethod
    def history(self, session: str, limit: int | None = None) -> list[RunRecord]:
        """A session's runs, oldest first; the last ``limit`` if given."""

    @abstractmethod
    def sessions(self) -> list[str]:
        """Every session with at least one run."""

    def forget(self, session: str) -> int:
        """Delete a session's runs (the conversation starts over); returns how many there were.

        A store of your own that keeps sessions for good need not: it raises NotImplementedError.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot forget a session")

    def marked_history(self, session: str, limit: int | None = None) -> tuple[list[RunRecord], object]:
        """:meth:`history`, and a mark that :meth:`append_marked` takes back, to see whether the session was forgotten
        since (by anyone: another process on the same file). By default none: a store only this workbench uses,
        whose own forgets :class:`SessionWrites` counts."""
        return self.history(session, limit), None

    def append_marked(self, session: str, record: RunRecord, mark: object) -> bool:
        """:meth:`append`, unless the session was forgotten since :meth:`marked_history` gave ``mark``; whether the
        record was kept. By default it always is."""
        self.append(session, record)
        return True

    def close(self) -> None:
        """Release what the store holds open (the workbench calls it on close); a later use reopens."""

    @property
    def limits(self) -> SessionLimits:
        """The bounds on what the store keeps (see :class:`SessionLimits`); a store of your own keeps none."""
        raise NotImplementedError(f"{type(self).__name__} keeps no session limits")

    def set_limits(self, limits: SessionLimits) -> None:
        """Bound what the store keeps from its next write on."""
        raise NotImplementedError(f"{type(self).__name__} keeps no session limits")

    def stats(self) -> dict[str, int]:
        """How much the store holds: ``sessions``, ``runs`` and ``bytes``, and ``evicted_runs``, how many runs its
        limits made go since this object was made."""
        raise NotImplementedError(f"{type(self).__name__} keeps no statistics")


class Evictions:
    """A store's count of runs its limits made go, and the one warning that says the first time it happened."""

    def __init__(self, where: Callable[[], str]) -> None:
        self.count = 0
        self._where = where
        self._lock = threading.Lock()  # writes end on many threads

    def add(self, runs: int, limits: SessionLimits) -> None:
        if runs <= 0:
            return
        with self._lock:
            first = self.count == 0
            self.count += runs
        if first:
            log.warning("the session store %s reached its limits (%s): %d of its oldest runs went; later evictions "
                        "are counted in bench.session_stats()['evicted_runs'], and bench.set_session_limits(...) "
                        "changes the bounds", self._where(), limits, runs)


class InMemoryContextStore(ContextStore):
    """A thread-safe store that lives as long as the workbench, bounded by ``limits`` as the SQLite store is (its
    bytes are the runs' stored JSON, counted as the SQLite store counts them)."""

    def __init__(self, limits: SessionLimits | None = None) -> None:
        self._lock = threading.Lock()
        # Least recently active session first: a session moves to the end with each run appended.
        self._runs: OrderedDict[str, list[tuple[RunRecord, int]]] = OrderedDict()
        self._bytes = 0
        self._oldest = math.inf  # no run stored started before this (a bound: the age sweep skips until it passes)
        self._limits = limits if limits is not None else SessionLimits()
        self._evicted = Evictions(lambda: "in memory")

    @property
    def limits(self) -> SessionLimits:
        return self._limits

    def set_limits(self, limits: SessionLimits) -> None:
        self._limits = limits

    def append(self, session: str, record: RunRecord) -> None:
        size = record_bytes(record)  # as the SQLite store counts it, so both bound alike
        with self._lock:
            runs = self._runs.get(session)
            if runs is None:
                runs = self._runs[session] = []
            else:
                self._runs.move_to_end(session)
            runs.append((record, size))
            self._bytes += size
            self._oldest = min(self._oldest, record.started_at)
            evicted = self._trim(session)
        self._evicted.add(evicted, self._limits)

    def _trim(self, session: str) -> int:
        """Drop what the limits no longer let the store keep after an append to ``session``; how many runs went."""
        limits, dropped = self._limits, 0

        def drop(name: str, count: int) -> None:
            nonlocal dropped
            runs = self._runs[name]
            self._bytes -= sum(size for _, size in runs[:count])
            dropped += min(count, len(runs))
            del runs[:count]
            if not runs:
                del self._runs[name]

        if limits.runs_per_session is not None and len(self._runs[session]) > limits.runs_per_session:
            drop(session, len(self._runs[session]) - limits.runs_per_session)
        if limits.max_age_s is not None and self._oldest < (cutoff := now_ns() / 1e9 - limits.max_age_s):
            for name in list(self._runs):
                runs = self._runs[name]
                kept = [(record, size) for record, size in runs if record.started_at >= cutoff]
                if len(kept) < len(runs):  # by start, not place: a run that started first may have ended last
                    self._bytes -= sum(size for _, size in runs) - sum(size for _, size in kept)
                    dropped += len(runs) - len(kept)
                    if kept:
                        self._runs[name] = kept
                    else:
                        del self._runs[name]
            self._oldest = min((record.started_at for runs in self._runs.values() for record, _ in runs),
                               default=math.inf)
        over_sessions = len(self._runs) - limits.max_sessions if limits.max_sessions is not None else 0
        for name in list(self._runs):
            over_bytes = self._bytes - limits.max_bytes if limits.max_bytes is not None else 0
            if over_sessions <= 0 and over_bytes <= 0:
                break
            if name != session:
                drop(name, len(self._runs[name]))
                over_sessions -= 1
        if limits.max_bytes is not None and session in self._runs:
            runs = self._runs[session]
            over, count = self._bytes - limits.max_bytes, 0
            while over > 0 and count < len(runs) - 1:  # its newest run stays
                over -= runs[count][1]
                count += 1
            if count:
                drop(session, count)
        return dropped

    def history(self, session: str, limit: int | None = None) -> list[RunRecord]:
        with self._lock:
            runs = [record for record, _ in self._runs.get(session, ())]
        if limit is None:
            return runs
        return runs[-limit:] if limit > 0 else []

    def sessions(self) -> list[str]:
        with self._lock:
            return sorted(s for s, runs in self._runs.items() if runs)

    def forget(self, session: str) -> int:
        with self._lock:
            runs = self._runs.pop(session, [])
            self._bytes -= sum(size for _, size in runs)
            return len(runs)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"sessions": len(self._runs), "runs": sum(len(r) for r in self._runs.values()),
                    "bytes": self._bytes, "evicted_runs": self._evicted.count}


class SessionWrites:
    """A store's appends and forgets, in one order: a run whose session was forgotten while it ran (between reading
    its history and finishing) is not written back, for it was built on the history that was forgotten."""

    def __init__(self, store: ContextStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._forgets: dict[str, int] = {}  # per session forgotten in this workbench: how many times

    def read(self, session: str, limit: int | None) -> tuple[list[RunRecord], tuple[int, object]]:
        """A run's session history (its last ``limit`` runs), and the mark that :meth:`append` takes back."""
        with self._lock:
            forgets = self._forgets.get(session, 0)
        records, marked = self.store.marked_history(session, limit)
        return records, (forgets, marked)

    def append(self, session: str, record: RunRecord, mark: tuple[int, object]) -> bool:
        """Keep ``record`` unless its session was forgotten since ``mark`` (here, or by another process on the
        store's file); whether it was kept."""
        forgets, marked = mark
        with self._lock:  # held through the write, so a forget cannot come between the check and the append
            if self._forgets.get(session, 0) != forgets:
                return False
            return self.store.append_marked(session, record, marked)

    def forget(self, session: str) -> int:
        """Delete the session's runs, and keep out those in flight now; returns how many were deleted."""
        with self._lock:
            forgotten = self.store.forget(session)  # first: a store that cannot forget keeps every run as before
            self._forgets[session] = self._forgets.get(session, 0) + 1
            return forgotten


# -- how a store writes a record: JSON text, a value JSON cannot hold as its repr --------------------------


def encode_record(record: RunRecord) -> tuple[Any, ...]:
    """``record`` as a store keeps it: run_id, chain, inputs, outputs, output (JSON text), started_at, duration_ms,
    status, error, meta (JSON text; ``meta[STORED_AS_REPR]`` names the values kept as their repr)."""
    as_repr: list[str] = []
    inputs = _json_values(record.inputs, "inputs", as_repr)
    outputs = _json_values(record.outputs, "outputs", as_repr)
    output = _json_value(record.output, "output", as_repr)
    meta = _json_values(record.meta, "meta", as_repr)
    if as_repr:
        meta[STORED_AS_REPR] = as_repr
    return (
        record.run_id,
        record.chain,
        _dumps(inputs),
        _dumps(outputs),
        _dumps(output),
        record.started_at,
        record.duration_ms,
        record.status,
        # A message for people, not a value: a character UTF-8 cannot hold is shown as its escape.
        None if record.error is None else record.error.encode("utf-8", "backslashreplace").decode("utf-8"),
        _dumps(meta),
    )


def _dumps(value: Any) -> str:
    """JSON text that SQLite can store as UTF-8: readable as written, or \\u-escaped where UTF-8 cannot hold it."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (what surrogateescape makes of bytes that are not UTF-8) has no UTF-8 form;
        # JSON's \u escape keeps it, and the value reads back exactly.
        return json.dumps(value)
    return text


def _json_values(values: Mapping[str, Any], where: str, as_repr: list[str]) -> dict[str, Any]:
    return {str(key): _json_value(value, f"{where}.{key}", as_repr) for key, value in values.items()}


def _json_value(value: Any, where: str, as_repr: list[str]) -> Any:
    """``value`` if JSON holds it as it is, else its repr (never pickle: reading a store runs no code)."""
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        as_repr.append(where)
        try:
            return repr(value)
        except Exception as exc:  # a repr that raises, or recurses too deep: the run is kept all the same
            return unshown(value, exc)
    return value


def encoded_bytes(encoded: tuple[Any, ...]) -> int:
    """The bytes an encoded record's text columns take (UTF-8), as the schema's backfill counts them."""
    return sum(len(value.encode("utf-8", "surrogatepass")) for value in encoded if isinstance(value, str))


def record_bytes(record: RunRecord) -> int:
    """What ``record`` takes in the store, as its limits count it."""
    return encoded_bytes(encode_record(record))
