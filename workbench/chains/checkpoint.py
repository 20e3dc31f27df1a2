"""A map's checkpoint file: each successful run as one line of JSON, written as it finishes.

``chain.map(inputs, checkpoint="runs.jsonl")`` keeps its runs there, and the same call again
reuses them: a map of thousands of inputs that the process's death cut short (a kernel restarted,
the out-of-memory killer, a closed laptop) runs only the rest, as ``resume=`` does within one
process. A run is reused as ``resume=`` reuses one: same chain, same inputs, same configuration
(by its content hash). A reused run comes back without its trace, which stayed in the process that
made it; its id, outputs, timing and configuration version are the file's.

The file is text a person may read (one JSON object a line, ASCII). Each line is flushed as the run
finishes, so it outlives the process, not the machine (no fsync). A run whose inputs or outputs
JSON cannot hold as they are (a set, a tuple, a key 1 that would read back "1") is not kept (it runs
again next time). A last line cut short by the process's
death is left out when read and cut off before the next write. Maps of one file at once (in this
process or others) each write under an advisory lock (flock), so none cuts off or splits another's lines.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from workbench.chains.batch import inputs_key
from workbench.chains.live import ConfigVersion
from workbench.chains.run import Run
from workbench.errors import WorkloadError

try:
    import fcntl
except ImportError:  # Windows: no flock; there two processes' maps of one file may cut off each other's lines
    fcntl = None  # type: ignore[assignment]

FORMAT = 1  # the "checkpoint" field of every line: what a later workbench reads
_LINE_START = f'{{"checkpoint": {FORMAT}, '  # how keep() begins every line (json.dumps, the field first)
_HINT = "give chain.map another checkpoint= file, or delete this one to run every input again"


class Checkpoint:
    """The checkpoint file of one chain's maps: the runs it holds, and each new successful run appended."""

    def __init__(self, path: str | os.PathLike[str], chain: str) -> None:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise WorkloadError(f"checkpoint= takes a file path, not {path!r:.80}",
                                hint="e.g. chain.map(inputs, checkpoint='runs.jsonl')")
        self.path = Path(path).expanduser()
        self.chain = chain
        self.left_out = 0  # successful runs not kept: their inputs or outputs are not JSON
        self._lock = threading.Lock()  # two maps of one file in one process write whole lines

    def runs(self) -> list[Run]:
        """The successful runs of this chain the file holds, oldest first (none if there is no file yet)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise WorkloadError(f"cannot read the checkpoint file {str(self.path)!r}: {exc}", hint=_HINT) from None
        lines = text.split("\n")
        tail = lines.pop()  # "" after a whole last line; else one the process's death cut short, never kept
        if tail and not (tail.startswith(_LINE_START) or _LINE_START.startswith(tail)):
            # Not a line of ours cut short: another file (one JSON object with no newline after it, say), which
            # prepare() would cut back to its last newline, to nothing.
            raise WorkloadError(f"line {len(lines) + 1} of the checkpoint file {str(self.path)!r} is not a run of a "
                                f"map's checkpoint (format {FORMAT}): is it a checkpoint file?", hint=_HINT)
        runs = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                run = self._read(line, number)
                if run is not None:
                    runs.append(run)
        return runs

    def prepare(self) -> None:
        """Make sure the file can be written (created if need be), before any run starts; cut off a last line an
        earlier process's death left half written, so the next line starts on a line of its own."""
        with self._writing() as file:
            _cut_to_whole_lines(file)

    def keep(self, run: Run) -> None:
        """Append ``run`` if it succeeded (a failed one runs again next time), so that the next map sees it."""
        if not run.ok:
            return
        version = run.config_version
        try:
            line = json.dumps({
                "checkpoint": FORMAT, "chain": run.chain, "run_id": run.id, "inputs": run.inputs,
                "outputs": run.outputs, "output": run.output, "started_at": run.started_at,
                "duration_ms": run.duration_ms,
                "config": None if version is None else {"number": version.number, "digest": version.digest},
                "models": run._models,  # what answered it (None: not known)
            }, allow_nan=False)  # ASCII: any text, a lone surrogate included, goes out as escapes and comes back
            written = json.loads(line)
            # What JSON changes (a tuple comes back a list, a mapping's key 1 as "1") is not kept: the inputs read back
            # would match no input (the run ran again at every map, and the file grew by its line each time), and the
            # outputs would not be the run's (a reused run's output[1] a KeyError where a fresh one's answered).
            same = inputs_key(written["inputs"]) == inputs_key(run.inputs) and written["outputs"] == run.outputs \
                and written["output"] == run.output
        except (TypeError, ValueError, RecursionError):
            same = False  # not JSON (an array, an object, NaN), a cycle, or nested deeper than Python's stack
        if not same:
            self.left_out += 1
            return
        # Opened for each line: one write of a whole line each, however the map ends (runs in flight at a Ctrl-C
        # land after it returned). A line another process's death left half written since prepare() is cut off
        # first: written after it, this line would join it, and the file would no longer read.
        with self._writing() as file:
            _cut_to_whole_lines(file)
            file.write(line.encode("ascii") + b"\n")

    @contextmanager
    def _writing(self) -> Iterator[IO[bytes]]:
        """The file opened to append to, held against every other writer of it: a map of this file in another
        process, or another map in this one (each map has a Checkpoint of its own). Without the lock one map's
        prepare() cut off the lines another wrote between its look at the file's end and its truncate."""
        with self._lock, self._opened() as file:
            if fcntl is not None:
                fcntl.flock(file, fcntl.LOCK_EX)  # released as the file closes, or as its process dies
            yield file

    def _opened(self) -> IO[bytes]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self.path.open("a+b")
        except OSError as exc:
            raise WorkloadError(f"cannot write the checkpoint file {str(self.path)!r}: {exc}",
                                hint="give checkpoint= a path in a folder you may write") from None

    def _read(self, line: str, number: int) -> Run | None:
        """The run on ``line`` (None if it is another chain's); WorkloadError if the line is no run this wrote."""
        where = f"line {number} of the checkpoint file {str(self.path)!r}"
        try:
            entry = json.loads(line, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested deeper than Python's stack
            raise WorkloadError(f"{where} is not JSON ({exc}): is it a checkpoint file?", hint=_HINT) from None
        if not isinstance(entry, dict) or entry.get("checkpoint") != FORMAT:
            raise WorkloadError(f"{where} is not a run of a map's checkpoint (format {FORMAT})", hint=_HINT)
        try:
            if entry["chain"] != self.chain:
                return None
            config = entry["config"]
            models = entry.get("models")  # not in a line of a workbench before it
            run = Run(id=_text(entry["run_id"]), chain=self.chain, inputs=_mapping(entry["inputs"]),
                      outputs=_mapping(entry["outputs"]), output=entry["output"], trace_id=0,
                      started_at=_number(entry["started_at"]), duration_ms=_number(entry["duration_ms"]),
                      config_version=None if config is None else
                      ConfigVersion(int(_number(config["number"])), _text(config["digest"])))
            run._models = None if models is None else _text(models)
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkloadError(f"{where} is not a whole run: {type(exc).__name__} {exc}", hint=_HINT) from None
        return run


def _cut_to_whole_lines(file: IO[bytes]) -> None:
    """Cut off a last line that has no newline after it (its writer died writing it)."""
    end = file.seek(0, os.SEEK_END)
    if end > 0:
        file.seek(end - 1)
        if file.read(1) != b"\n":
            file.truncate(_whole_lines(file))


def _whole_lines(file: IO[bytes]) -> int:
    """How many bytes of ``file`` its whole lines take: up to its last newline, read back from its end."""
    end = file.seek(0, os.SEEK_END)
    while end > 0:
        start = max(end - (1 << 16), 0)
        file.seek(start)
        cut = file.read(end - start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r:.40} is not text")
    return value


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{value!r:.40} is not a mapping")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{value!r:.40} is not a number")
    return value
