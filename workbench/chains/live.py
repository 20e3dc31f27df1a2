"""Live configuration: versioned chain specs that change while they serve, and the file watcher that feeds them.

A chain's spec is a :class:`LiveSpec`: the last good version serves every run that starts; an
edit (a new file, ``chain.set``) is validated whole and either becomes the next version or is
refused, leaving the last good one in place. A run takes the spec object as it starts, so an edit
never reaches a run already going.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import stat
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workbench.chains.spec import (
    CHAIN_FIELDS,
    KNOWLEDGE_FIELDS,
    LLM_FIELDS,
    RETRY_FIELDS,
    ChainSpec,
    parse_spec,
)
from workbench.errors import SettingsError, SpecError, WorkbenchError, did_you_mean

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0
MAX_REFUSALS_KEPT = 50
# A spec or configuration file is read whole, on every change: a file past this (a log written to the wrong path)
# is refused rather than read into memory.
MAX_CONFIG_BYTES = 8 * 2**20
# Fields a live edit may change: values a spec allows, never code (``call``), names or the graph's shape (``uses``).
SETTABLE_CHAIN_FIELDS = tuple(f for f in CHAIN_FIELDS if f in ("description", "history", "output"))
SETTABLE_HOP_FIELDS = tuple(f for f in LLM_FIELDS if f not in ("name", "kind", "messages"))
# A knowledge hop's walk, not its graph (a new file is a new chain, loaded and checked as one).
SETTABLE_KNOWLEDGE_FIELDS = tuple(f for f in KNOWLEDGE_FIELDS if f not in ("name", "kind", "graph"))
# A file whose mtime is this recent is hashed on every poll: two writes within the file system's
# timestamp granularity, of one size, leave the same stat behind ("racy" timestamps, as git calls them).
_RACY_S = 2.0
# A file changed since the last poll and written this recently is read at the next poll, once it has held still: an
# editor that writes in pieces, caught between two, leaves a first piece that may parse as a smaller spec.
_SETTLE_S = 0.25
_GONE = (-1, -1, -1)  # FileWatcher's last look at a file that was not there


class ConfigWarning(UserWarning):
    """An edit of a watched chain spec or workbench configuration was refused; the last good version keeps serving."""


@dataclass(frozen=True)
class ConfigVersion:
    """Which configuration a run used: ``number`` counts the accepted versions from 1, ``digest`` hashes the content."""

    number: int
    digest: str

    def __str__(self) -> str:
        return f"v{self.number} ({self.digest})"


@dataclass(frozen=True)
class ConfigRefusal:
    """An edit that did not validate: when, where it came from (a file path, or ``set``), and the error."""

    at: float
    origin: str
    error: WorkbenchError
    serving: ConfigVersion | None

    @property
    def message(self) -> str:
        return self.error.message if isinstance(self.error, WorkbenchError) else str(self.error)


def digest_of(data: Any) -> str:
    """A short content hash of a configuration as parsed, so reformatting or a comment leaves it unchanged."""
    text = json.dumps(_str_keys(data), sort_keys=True, default=_describe, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _str_keys(value: Any) -> Any:
    """``value`` with every mapping key a string, so keys sort: YAML 1.1 reads ``on:`` (retry's) as the key True."""
    if isinstance(value, dict):
        return {key if isinstance(key, str) else repr(key): _str_keys(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_str_keys(item) for item in value]
    return value


def _describe(value: Any) -> str:
    """A function (a Python hop's ``call``) by its import path; anything else JSON cannot hold, by its type."""
    name = getattr(value, "__qualname__", None)
    if name is not None:
        return f"{getattr(value, '__module__', '?')}:{name}"
    return f"<{type(value).__name__}>"


def refuse(
    origin: str, error: WorkbenchError, serving: ConfigVersion | None, what: str, *, warn: bool = True
) -> ConfigRefusal:
    """Log a refused edit and, with ``warn``, warn about it (a notebook shows the warning); returns its record.

    An edit made by a call (``chain.set``) is refused by raising to its caller instead of a warning, and logged
    at INFO: at WARNING, Python's last-resort handler printed it beside the caller's own error, twice in a notebook.
    """
    text = f"{origin}: edit refused, {what} keeps serving {serving}: {error.message}" if serving else \
        f"{origin}: edit refused: {error.message}"
    logger.log(logging.WARNING if warn else logging.INFO, "%s", text)
    if warn:
        try:
            warnings.warn(text, ConfigWarning, stacklevel=2)
        except Warning:  # warnings turned into errors (pytest -W error): the log and the record still say it
            pass
    return ConfigRefusal(time.time(), origin, error, serving)


# -- one chain's spec, live ----------------------------------------------------------------------------------


class LiveSpec:
    """A chain's spec as it changes: the serving version, its base (file or text), live overrides, refused edits.

    ``parse`` validates a spec (text or dict) the way the workbench does, against the models it knows.
    """

    def __init__(self, spec: ChainSpec, parse: Callable[[str | Mapping[str, Any]], ChainSpec] | None = None) -> None:
        self._parse = parse or (lambda source: parse_spec(source))
        self._lock = threading.Lock()
        self._base = _data_of(spec.source)
        self._overrides: dict[str, Any] = {}
        self._counter = 0
        self.refusals: deque[ConfigRefusal] = deque(maxlen=MAX_REFUSALS_KEPT)
        self.current = spec
        self._accept(spec, self._base)

    @property
    def version(self) -> ConfigVersion:
        assert self.current.version is not None
        return self.current.version

    @property
    def overrides(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._overrides)

    def update(self, source: str | Mapping[str, Any], origin: str | None = None) -> ConfigVersion:
        """Make ``source`` (YAML text or a dict) the new base, under the live overrides; SpecError refuses it."""
        with self._lock:
            try:
                try:
                    spec = self._parse(source)  # errors name the line of the text itself
                    base = _data_of(source)
                    if self._overrides:
                        spec = self._parse(apply_overrides(base, self._overrides))
                except SpecError:
                    raise
                except Exception as exc:  # a check that failed itself: refused as any edit, never half taken
                    raise checking_failed(exc) from exc
            except SpecError as error:
                self.refusals.append(refuse(origin or "update", error, self.current.version,
                                            f"chain {self.current.name!r}", warn=origin is not None))
                raise
            self._base = base
            return self._accept(spec, base)

    def set(self, values: Mapping[str, Any]) -> ConfigVersion:
        """Override fields by path (``hop.field``, ``hop.retry.attempts``, or a chain field such as ``history``),
        all in one new version, or none if one does not validate."""
        return self._change(values, ())

    def unset(self, paths: Collection[str]) -> ConfigVersion:
        """Drop overrides set earlier: the fields take the base's values again."""
        return self._change({}, paths)

    def _change(self, values: Mapping[str, Any], unset: Collection[str]) -> ConfigVersion:
        with self._lock:
            overrides = dict(self._overrides)
            for path in unset:
                if path not in overrides:
                    raise SpecError(f"{path!r} is not set live", field=str(path),
                                    hint=f"set live now: {', '.join(overrides) or 'nothing'}")
                del overrides[path]
            for path, value in values.items():
                settable_path(path, self.current)
                overrides[path] = value
            origin = "set " + ", ".join([*values, *unset])
            try:
                try:
                    spec = self._parse(apply_overrides(self._base, overrides))
                except SpecError:
                    raise
                except Exception as exc:
                    raise checking_failed(exc) from exc
            except SpecError as error:
                self.refusals.append(refuse(origin, error, self.current.version, f"chain {self.current.name!r}",
                                            warn=False))
                raise
            self._overrides = overrides
            return self._accept(spec, self._base)

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The base and the live overrides now, as :meth:`replace` takes them (to put a chain back as it was)."""
        with self._lock:
            return _copy(self._base), dict(self._overrides)

    def replace(self, source: str | Mapping[str, Any], overrides: Mapping[str, Any]) -> ConfigVersion:
        """Make ``source`` the base and ``overrides`` all the live overrides, in one version (a configuration file's
        edit: the chain file as checked, under the file's overrides and chain.set's); SpecError changes nothing."""
        with self._lock:
            spec = self._parse(source)
            base = _data_of(source)
            for path in overrides:
                settable_path(path, spec)
            if overrides:
                spec = self._parse(apply_overrides(base, overrides))
            self._base, self._overrides = base, dict(overrides)
            return self._accept(spec, base)

    def _accept(self, spec: ChainSpec, base: dict[str, Any]) -> ConfigVersion:
        """Make ``spec`` the serving version (a new number only if its content changed)."""
        digest = digest_of(apply_overrides(base, self._overrides))
        previous = self.current.version
        if previous is not None and previous.digest == digest:
            return previous  # the same configuration again (a comment, a reformat): nothing to change
        self._counter += 1
        spec.version = ConfigVersion(self._counter, digest)
        self.current = spec  # one assignment: a run starting now sees the old spec or the new, whole
        if self._counter > 1:
            logger.info("chain %r now serves configuration %s", spec.name, spec.version)
        return spec.version


def checking_failed(exc: Exception) -> SpecError:
    """An edit whose check raised something other than a SpecError, as a refusal that says what failed."""
    logger.debug("checking an edit failed", exc_info=exc)
    return SpecError(f"checking the edit failed: {type(exc).__name__}: {exc}",
                     hint="the last good version keeps serving; fix the value the error names")


def _data_of(source: Any) -> dict[str, Any]:
    """A spec's source as plain data to edit: YAML text loaded (already validated, so safe), a mapping copied."""
    if isinstance(source, str):
        data = yaml.safe_load(source)
    else:
        data = source
    if not isinstance(data, Mapping):  # a spec parsed from Python objects keeps no source to edit
        return {}
    return _copy(data)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def settable_path(path: str, spec: ChainSpec) -> tuple[str, ...]:
    """Check ``path`` names a field a live edit may change: ``hop.field``, ``hop.retry.KEY`` or a chain field."""
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise SpecError(f"{path!r} is not a field path", hint="e.g. answer.temperature, or history")
    parts = tuple(path.split("."))
    hops = [h.name for h in spec.hops]
    if len(parts) == 1:
        if parts[0] in hops:
            raise SpecError(f"{path!r} names a hop; say which of its fields", field=path,
                            hint=f"e.g. {path}.temperature; fields: {', '.join(SETTABLE_HOP_FIELDS)}")
        if parts[0] not in SETTABLE_CHAIN_FIELDS:
            raise SpecError(f"{path!r} is not a field a live edit may change", field=path,
                            hint=f"chain fields: {', '.join(SETTABLE_CHAIN_FIELDS)}; or HOP.FIELD, e.g. "
                            f"{hops[0]}.temperature")
        return parts
    hop, field = parts[0], parts[1]
    if hop not in hops:
        raise SpecError(f"chain {spec.name!r} has no hop {hop!r}{did_you_mean(hop, hops)}", field=path, hint=f"hops: {', '.join(hops)}")
    kind = spec.hop(hop).kind
    allowed = {"llm": SETTABLE_HOP_FIELDS, "knowledge": SETTABLE_KNOWLEDGE_FIELDS}.get(kind, ("retry", "fallback"))
    if field not in allowed:
        why = "code is not set live" if field == "call" else "a live edit changes values, not names or the graph"
        raise SpecError(f"{path!r}: {field!r} of a {kind} hop cannot be set live ({why})", hop=hop, field=field,
                        hint=f"fields that can: {', '.join(allowed)}")
    if len(parts) > 2 and (field != "retry" or len(parts) != 3 or parts[2] not in RETRY_FIELDS):
        raise SpecError(f"{path!r} goes deeper than the spec does", hop=hop, field=".".join(parts[1:]),
                        hint=f"only retry has fields of its own: {', '.join(RETRY_FIELDS)}")
    return parts


def apply_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with each ``path: value`` of ``overrides`` set; the base is left as it was."""
    data = _copy(base)
    for path, value in overrides.items():
        parts = path.split(".")
        if len(parts) == 1:
            data[parts[0]] = value
            continue
        hops = data.get("hops")
        hop = next((h for h in hops if isinstance(h, dict) and h.get("name") == parts[0]), None) \
            if isinstance(hops, list) else None
        if hop is None:
            raise SpecError(f"override {path!r}: the spec has no hop {parts[0]!r} any more", field=path,
                            hint="chain.unset(PATH) drops the override")
        target = hop
        for key in parts[1:-1]:  # retry: attempts-only shorthand (retry: 3) becomes a mapping to set a key in
            nested = target.get(key)
            if isinstance(nested, int) and not isinstance(nested, bool) and key == "retry":
                nested = {"attempts": nested}
            target[key] = dict(nested) if isinstance(nested, Mapping) else {}
            target = target[key]
        target[parts[-1]] = value
    return data


# -- watching a file ---------------------------------------------------------------------------------------


class FileWatcher:
    """Polls one file on a daemon thread and hands its text to ``on_change`` whenever the content changes.

    The path is looked up on every poll (stat: mtime, size, inode), so editors that save by
    writing a new file and renaming it over the old one are seen; a stat that looks unchanged is
    trusted unless its mtime was recent when the content was read (then the content is hashed again). A file
    written within ``_SETTLE_S`` is read only once a poll finds it as the previous one did (not mid-save). A
    file that is missing (mid-save, deleted) changes nothing: the last content keeps serving until the file is
    back; missing at two polls in a row, it is reported once.

    ``retry_when()`` says what a content was checked against (the models a spec may name): a content
    ``on_change`` refused is handed on again, unchanged, once that differs (the model it named was loaded).
    ``what`` names the file in errors, as :func:`read_text` did on the first read ("chain spec file").
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        on_change: Callable[[str], None],
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        text: str | None = None,
        on_unreadable: Callable[[WorkbenchError], None] | None = None,
        retry_when: Callable[[], object] | None = None,
        what: str = "file",
    ) -> None:
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not 0 < interval_s <= 3600:
            raise SettingsError(f"interval_s must be a number of seconds > 0 and at most 3600, not {interval_s!r}",
                                hint="e.g. interval_s=1.0")
        self.path = Path(path).expanduser().absolute()  # looked up on every poll: a later %cd must not move it
        self.what = what
        self.interval_s = float(interval_s)
        self._on_change = on_change
        self._on_unreadable = on_unreadable
        self._retry_when = retry_when
        self._refused: tuple[str, object] | None = None  # a refused content, and the retry_when() it was refused under
        self._stat: tuple[int, int, int] | None = None  # of the content last read whole
        self._stat_trusted = False  # read past the racy window of its mtime: a later write would change that stat
        self._seen: tuple[int, int, int] | None = None  # at the last poll
        self._digest = _text_digest(text) if text is not None else None
        self._said: str | None = None  # the unreadable state last reported, so one that lasts is said once
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0  # how many times the file was looked at
        self.changes = 0  # how many new contents it handed on (a refused one included)

    def start(self) -> FileWatcher:
        self._thread = threading.Thread(target=self._loop, name=f"workbench-watch:{self.path.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """Stop polling; ``wait``: until a poll under way has ended (not from a finalizer, which may run anywhere)."""
        self._stop.set()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.interval_s))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def poll(self) -> bool:
        """Look at the file once; True if its content changed (and ``on_change`` heard it)."""
        self.polls += 1
        try:
            st = os.stat(self.path)
        except FileNotFoundError:  # mid-save (deleted, then written again) or gone: keep what serves
            if self._seen == _GONE:  # at the last poll too: gone, said once (a deleted file was never mentioned)
                self._report(SpecError(f"{self.what} {str(self.path)!r} is gone",
                                       hint="the last good version keeps serving; it is read again once it is back"))
            self._seen = _GONE
            return False
        except OSError as exc:
            self._unreadable(exc)
            return False
        now = time.time()
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._stat and self._stat_trusted:
            return self._retry()
        seen, self._seen = self._seen, key
        if key != seen and now - st.st_mtime < _SETTLE_S:
            return False  # written just now, maybe not to the end: read it at the next poll if it holds still
        try:
            raw = read_bounded(self.path)
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            self._unreadable(exc)
            return False
        if not raw.strip():
            return False  # caught mid-save (a write truncates first): keep what serves and look again next poll
        self._said = None
        # Trusted only if read when its mtime was already old: a save later in the same timestamp tick leaves the
        # same stat however long ago that tick was by the next poll (an interval_s of 5, a file system of 1 or 2 s).
        self._stat, self._stat_trusted = key, now - st.st_mtime > _RACY_S
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._digest:
            return self._retry()
        self._digest = digest
        self.changes += 1
        try:
            text = decode_utf8(raw, f"{self.what} {str(self.path)!r}")
        except SpecError as error:
            self._report(error)
            return False
        return self._hand_on(text)

    def _hand_on(self, text: str) -> bool:
        try:
            self._on_change(text)
        except WorkbenchError:
            self._refused = (text, self._retry_when()) if self._retry_when is not None else None
            raise
        self._refused = None
        return True

    def _retry(self) -> bool:
        """The file is unchanged: hand its refused content on again if what it was checked against has changed."""
        if self._refused is None or self._retry_when is None:
            return False
        text, context = self._refused
        if self._retry_when() == context:
            return False
        return self._hand_on(text)

    def _unreadable(self, exc: Exception) -> None:
        self._report(SpecError(f"cannot read {self.what} {str(self.path)!r}: {exc}",
                               hint="the last good version keeps serving"))

    def _report(self, error: SpecError) -> None:
        if error.message == self._said:
            return  # still unreadable for the same reason: said already, not again every poll
        self._said = error.message
        if self._on_unreadable is not None:
            self._on_unreadable(error)
        else:
            logger.warning("%s", error.message)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except WorkbenchError:
                pass  # refused: on_change recorded and warned about it; the last good version serves
            except Exception:  # a bug must not end the watching silently
                logger.exception("watching %s failed; still watching", self.path)


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def read_bounded(path: str | os.PathLike[str]) -> bytes:
    """A configuration file's bytes; ValueError if it is not a regular file (a FIFO would block the reader for good)
    or is over MAX_CONFIG_BYTES, OSError if it cannot be read."""
    # O_NONBLOCK: opening a FIFO put where the file was returns at once instead of waiting for a writer.
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ValueError("it is not a regular file")
        raw = file.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"it is over the {MAX_CONFIG_BYTES:,} bytes a configuration file may have")
    return raw


def decode_utf8(raw: bytes, what: str) -> str:
    """A spec or configuration file's bytes as text, or a SpecError naming the byte (and line) that is not UTF-8."""
    try:
        return raw.decode("utf-8")  # no newline translation: the watcher hashes these bytes
    except UnicodeDecodeError as exc:
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Windows PowerShell's > and Notepad write it
            raise SpecError(f"{what} is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8",
                            hint="save it as UTF-8: pick UTF-8 in the editor's Save As, or in PowerShell "
                            "Out-File -Encoding utf8") from None
        raise SpecError(f"{what} is not UTF-8 text: byte {raw[exc.start]:#04x} cannot be read",
                        line=raw.count(b"\n", 0, exc.start) + 1, hint="save it as UTF-8") from None


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """A configuration file's text, or a SpecError saying why it cannot be read."""
    try:
        raw = read_bounded(path)
    except FileNotFoundError:
        raise SpecError(f"{what} {str(path)!r} does not exist", hint="check the path (relative to the working "
                        f"directory {os.getcwd()!r})") from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read {what} {str(path)!r}: {exc}") from None
    return decode_utf8(raw, f"{what} {str(path)!r}")
