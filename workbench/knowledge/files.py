"""The user's own triples from a CSV or JSON file: bounded in size, never executed, errors naming the file and row.

CSV: a header ``subject,relation,object``, then one triple a row. JSON: a list of
``[subject, relation, object]`` or of ``{"subject": ..., "relation": ..., "object": ...}``
(or an object whose ``"triples"`` is such a list). Two relations, in any case, are not facts but names:
``alias`` (``Paris,alias,City of Light``: the object is another name of the subject, matched
in any case) and ``code`` (``France,code,FR``: matched only as written).
"""

from __future__ import annotations

import csv
import io
import json
import re
import stat
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from workbench.errors import GraphError
from workbench.knowledge.graph import KnowledgeGraph

# A chain spec is untrusted input and may name a file: these bound what reading it can cost. A graph of
# 200,000 triples took ~10 s to build and ~200 MB on a busy 2-core machine (networkx keeps an edge twice).
MAX_GRAPH_BYTES = 32 * 1024 * 1024
MAX_TRIPLES = 250_000
MAX_VALUE_CHARS = 1_000  # one subject, relation or object; a fact is a line of a prompt
SUFFIXES = (".csv", ".json")
ALIAS, CODE = "alias", "code"
HEADER = ("subject", "relation", "object")
_FORMAT_HINT = ("CSV: a header subject,relation,object then one triple a row; JSON: a list of "
                "[subject, relation, object] or of {subject, relation, object}")


def check_path(path: Path, given: str | None = None, relative_to: str | None = None) -> int:
    """Refuse a graph file that is not a readable .csv or .json regular file within MAX_GRAPH_BYTES; its size.

    ``given``: the relative path a spec wrote, which ``path`` is read ``relative_to`` (for the error that it is not
    there: which file was looked for, and why there).
    """
    if path.suffix.lower() not in SUFFIXES:
        raise GraphError(f"graph file {shown(path)} is neither .csv nor .json", hint=_FORMAT_HINT)
    try:
        info = path.stat()
    except FileNotFoundError:
        where = f"graph file {shown(Path(given))} does not exist: looked for {shown(path)}, relative to {relative_to}" \
            if given is not None else f"graph file {shown(path)} does not exist"
        raise GraphError(where, hint="a relative graph: path is read from the folder of the spec file that names it "
                         "(the working directory for a spec given as text or a dict)") from None
    except OSError as exc:
        raise GraphError(f"graph file {shown(path)} cannot be read: {exc.strerror}") from None
    except ValueError as exc:  # a NUL in the path
        raise GraphError(f"graph file {shown(path)} is not a path: {exc}") from None
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
        raise GraphError(f"graph file {shown(path)} is not a regular file")
    if info.st_size > MAX_GRAPH_BYTES:
        raise GraphError(f"graph file {shown(path)} is {info.st_size:,} bytes, over the {MAX_GRAPH_BYTES:,} a "
                         "graph may take", hint="keep the triples a chain needs, or split the graph")
    return info.st_size


def load_file(path: str | Path) -> KnowledgeGraph:
    """Read a graph of triples from a .csv or .json file (see the module's docstring for the formats)."""
    path = Path(path)
    check_path(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_GRAPH_BYTES + 1)
    except OSError as exc:
        raise GraphError(f"graph file {shown(path)} cannot be read: {exc.strerror}") from None
    if len(raw) > MAX_GRAPH_BYTES:  # it grew since the check
        raise GraphError(f"graph file {shown(path)} is over the {MAX_GRAPH_BYTES:,} bytes a graph may take")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise GraphError(f"graph file {shown(path)}, line {line}: not UTF-8 text", hint="save it as UTF-8") from None
    rows = _csv_rows(text, path) if path.suffix.lower() == ".csv" else _json_rows(text, path)
    return _build(rows, path)


def _csv_rows(text: str, path: Path) -> Iterator[tuple[str, list[Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or tuple(h.strip().lower() for h in header) != HEADER:
            raise GraphError(f"graph file {shown(path)}, row 1: the header must be subject,relation,object, got "
                             f"{_short(','.join(header or []))}", hint=_FORMAT_HINT)
        for row in reader:
            if row and any(cell.strip() for cell in row):
                yield f"row {reader.line_num}", row
    except csv.Error as exc:
        raise GraphError(f"graph file {shown(path)}, row {reader.line_num}: not valid CSV: {exc}") from None


def _json_rows(text: str, path: Path) -> Iterator[tuple[str, list[Any]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraphError(f"graph file {shown(path)}, line {exc.lineno}: not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise GraphError(f"graph file {shown(path)}: the JSON nests too deeply", hint=_FORMAT_HINT) from None
    except ValueError:  # an integer past sys.get_int_max_str_digits(): json.loads says only that, not where
        number = re.search(f"[0-9]{{{sys.get_int_max_str_digits() + 1},}}", text)
        if number is None:
            raise
        line = text.count("\n", 0, number.start()) + 1
        raise GraphError(f"graph file {shown(path)}, line {line}: not valid JSON: a number of "
                         f"{len(number.group()):,} digits is too long to read", hint=_FORMAT_HINT) from None
    if isinstance(data, Mapping) and "triples" in data:
        data = data["triples"]
    if not isinstance(data, list):
        raise GraphError(f"graph file {shown(path)}: the JSON must be a list of triples, not "
                         f"{type(data).__name__}", hint=_FORMAT_HINT)
    for index, item in enumerate(data):
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - set(HEADER), key=str)
            if unknown:
                raise GraphError(f"graph file {shown(path)}, item {index + 1}: unknown key {_short(unknown[0])}",
                                 hint="each triple has the keys subject, relation and object")
            item = [item.get(key) for key in HEADER]
        elif not isinstance(item, list):
            raise GraphError(f"graph file {shown(path)}, item {index + 1}: a triple is a list or an object, not "
                             f"{type(item).__name__}", hint=_FORMAT_HINT)
        yield f"item {index + 1}", item


def _build(rows: Iterator[tuple[str, list[Any]]], path: Path) -> KnowledgeGraph:
    triples: list[tuple[str, str, str]] = []
    aliases: dict[str, str] = {}
    codes: dict[str, str] = {}
    for where, row in rows:
        if len(row) != 3:
            raise GraphError(f"graph file {shown(path)}, {where}: a triple has 3 values (subject, relation, "
                             f"object), this has {len(row)}", hint=_FORMAT_HINT)
        values = []
        for name, value in zip(HEADER, row):
            if not isinstance(value, str) or not value.strip():
                raise GraphError(f"graph file {shown(path)}, {where}: the {name} must be non-empty text, got "
                                 f"{_short(value)}")
            if len(value) > MAX_VALUE_CHARS:
                raise GraphError(f"graph file {shown(path)}, {where}: the {name} is {len(value):,} characters, over "
                                 f"the {MAX_VALUE_CHARS:,} a value may have")
            # JSON's \ud800 escapes decode to text no encoder takes: a fact with one broke every table of the traces
            # it went into (pyarrow), the workbench's whole trace table and the session's history with them.
            bad = None if value.isascii() else _LONE_SURROGATE.search(value)
            if bad is not None:
                raise GraphError(f"graph file {shown(path)}, {where}: the {name} is not valid text: it holds a lone "
                                 f"surrogate ({bad.group()!r}) at character {bad.start()}",
                                 hint="write the character itself, or a pair of surrogates (\\ud83d\\ude00)")
            values.append(" ".join(value.split()))
        subject, relation, obj = values
        if relation.casefold() == ALIAS:  # in any case, as the header is: "Alias" is no fact
            aliases.setdefault(obj, subject)
        elif relation.casefold() == CODE:
            codes.setdefault(obj, subject)
        else:
            triples.append((subject, relation, obj))
        if len(triples) + len(aliases) + len(codes) > MAX_TRIPLES:
            raise GraphError(f"graph file {shown(path)}, {where}: more than {MAX_TRIPLES:,} triples",
                             hint="keep the triples a chain needs, or split the graph")
    if not triples:
        raise GraphError(f"graph file {shown(path)} holds no triples", hint=_FORMAT_HINT)
    return KnowledgeGraph(triples, aliases=aliases, codes=codes, name=path.name)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def shown(path: Path) -> str:
    """A path as an error names it: quoted, and cut short if someone wrote a very long one."""
    text = repr(str(path))
    return text if len(text) <= 200 else text[:199] + "…"


def _short(value: Any) -> str:
    """``repr(value)``, cut short: a file's content echoed in an error stays a glimpse."""
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"
