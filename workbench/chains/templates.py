"""Prompt templates: Jinja2 rendered in its sandbox, bounded in time and size, and the variables each one reads."""

from __future__ import annotations

import codecs
import collections
import functools
import html
import itertools
import json
import math
import operator
import pprint
import re
import string
import threading
import time
import types
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, Sized, ValuesView
from typing import Any
from urllib.parse import quote_from_bytes

from jinja2 import (
    StrictUndefined,
    TemplateSyntaxError,
    Undefined,
    UndefinedError,
    meta,
    nodes,
    pass_environment,
    pass_eval_context,
)
from jinja2.filters import (
    do_batch,
    do_center,
    do_forceescape,
    do_format,
    do_indent,
    do_int,
    do_replace,
    do_reverse,
    do_sort,
    do_title,
    do_tojson,
    do_wordwrap,
    do_xmlattr,
    make_attrgetter,
    sync_do_groupby,
    sync_do_join,
    sync_do_slice,
)
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter, SecurityError
from jinja2.utils import Namespace, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer
from markupsafe import Markup, escape, soft_str

from workbench.errors import TemplateError

# A prompt is text for a context window; ten million characters is past any model's, and far
# below what would strain the machine. Lists built in a template stay within MAX_ITEMS (Jinja's
# own cap on range), and integers within MAX_INT_BITS.
MAX_PROMPT_CHARS = 10_000_000
MAX_ITEMS = 100_000
MAX_INT_BITS = 100_000
MAX_JSON_INDENT = 64  # what |tojson may indent by: pretty JSON takes 2 or 4; each nested line repeats it
MAX_LIPSUM_WORDS = 1_000_000  # paragraphs times words per paragraph that lipsum() may make (some 7 MB of text)
# A list, tuple or mapping a template makes holds at most MAX_HELD_ITEMS items, counting those of the ones it holds
# (one held twice, twice), nested at most MAX_NESTING deep. Comparing, hashing or sorting one is a C loop no clock
# stops, and ``(t, t)`` made 60 times over is 2**60 items to compare in 60 small steps; hashing one nested some
# 200,000 deep overflows the C stack.
MAX_HELD_ITEMS = 10 * MAX_ITEMS
MAX_NESTING = 100
MAX_PPRINT_WORK = 2_000_000  # items times depth that |pprint may go through: it makes the text of each level again
MAX_PPRINT_TEXT = 1_000_000  # characters of a text |pprint may lay out: it splits a long one into words (27 bytes each)
MAX_WRAP_WORK = 10**10  # characters |wordwrap may copy breaking long words: it copies the rest of a word for each line
MAX_WRAP_LINE = 500_000  # characters of one line |wordwrap may wrap: it holds a string for each word (36 bytes each)
# The text encodings whose cost is linear in the text ('punycode' is quadratic), and the error handlers that write
# a few characters for one ('namereplace' writes a character's Unicode name).
_CODECS = frozenset({"utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be",
                     "ascii", "iso8859-1"})
_CODEC_ERRORS = frozenset({"strict", "ignore", "replace", "backslashreplace", "xmlcharrefreplace", "surrogateescape",
                           "surrogatepass"})
# What one render may make in all (characters of text, items of lists), kept or not: each step is bounded
# above, but a filter mapped over 100,000 items (|map('center', 10**7)|list) makes 100,000 bounded steps.
MAX_MADE = 20 * MAX_PROMPT_CHARS
DEFAULT_RENDER_S = 10.0  # the time a template may take to render when its hop has no timeout_s
_CHECK_EVERY = 1024  # items a filter goes through (or values a size check goes into) between looks at the clock
_TEXT_PIECE = 1 << 16  # characters a filter that goes through a text in Python steps takes between looks at the clock

# printf-style widths: '%20s', '%*s' (a width taken from the arguments). str.format's ('{:>20}', '{:{}}') are checked
# as it formats each field, when the arguments have filled them in (_BoundedFormatter).
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_WORD = re.compile(r"[^\t\n\x0b\x0c\r ]+")  # what textwrap (|wordwrap) keeps together: it breaks at ASCII white space


class _Exceeded(Exception):
    """A template went past a bound; PromptTemplate.render turns it into a TemplateError naming the hop."""


class _Budget(threading.local):
    """The deadline of the render running on this thread (hops render on many threads at once)."""

    deadline: float = math.inf
    seconds: float = DEFAULT_RENDER_S
    made: int = 0  # characters and items the render running on this thread has made so far
    held: _HeldSizes | None = None  # the sizes of the lists, tuples and mappings the render running here has sized


class _HeldSizes:
    """The sizes (items, depth) of the lists, tuples and mappings one render has sized, by id.

    Each entry keeps its object, so that the id stays its own, and its length, so that one a caller's code grew
    since is sized again. One held by another is kept for the render: a list grown a row at a time sizes each
    row once. What a step made is kept while it is among the last few made (_RECENT, _RECENT_ITEMS): the next
    step most likely builds on it (ns.rows + [row] sizes as the two it adds), and older ones would otherwise
    stay alive for the render.
    """

    def __init__(self) -> None:
        self._sizes: dict[int, tuple[int, int, Any, int]] = {}
        self._recent: collections.deque[tuple[int, int]] = collections.deque()  # (id, length) of what steps made
        self._recent_items = 0

    def recall(self, node: Any) -> tuple[int, int] | None:
        seen = self._sizes.get(id(node))
        if seen is not None and seen[2] is node and seen[3] == len(node):
            return seen[0], seen[1]
        return None

    def keep(self, node: Any, items: int, depth: int) -> None:
        """Keep the size of a container another holds, for the rest of the render."""
        self._sizes[id(node)] = (items, depth, node, len(node))

    def keep_made(self, node: Any, items: int, depth: int) -> None:
        """Keep the size of what a step made while it is among the last few made."""
        key, length = id(node), len(node)
        if key not in self._sizes:
            self._recent.append((key, length))
            self._recent_items += length
        self._sizes[key] = (items, depth, node, length)
        while len(self._recent) > _RECENT or self._recent_items > _RECENT_ITEMS:
            old, old_length = self._recent.popleft()
            self._recent_items -= old_length
            del self._sizes[old]


_RECENT = 256
_RECENT_ITEMS = 4 * MAX_ITEMS  # items kept alive at most (3 MB of a list's pointers)

_budget = _Budget()


def _tick() -> None:
    if time.monotonic() > _budget.deadline:
        raise _Exceeded(f"the prompt template ran longer than its {_budget.seconds:g} s")


_TEXT = (str, bytes, bytearray)  # bytes (``'x'.encode()``, ``(0).to_bytes(n)``) are bounded as text is


def _check_size(value: Any) -> Any:
    if isinstance(value, _TEXT) and len(value) > MAX_PROMPT_CHARS:
        raise _Exceeded(f"the prompt template made a text longer than {MAX_PROMPT_CHARS:,} characters")
    if isinstance(value, (list, tuple, dict, set)) and len(value) > MAX_ITEMS:
        raise _Exceeded(f"the prompt template made a collection of more than {MAX_ITEMS:,} items")
    return value


def _made(value: Any) -> Any:
    """Count what a call, operator or filter made against the render's MAX_MADE; returns ``value``."""
    if _budget.deadline != math.inf and isinstance(value, (*_TEXT, list, tuple, dict, set)):
        _budget.made += len(value)
        if _budget.made > MAX_MADE:
            raise _Exceeded(f"the prompt template made more than {MAX_MADE:,} characters and items in all")
    return value


_CONTAINERS = (list, tuple, set, frozenset, dict, KeysView, ValuesView, Namespace)
# Exact types answered without the ABC checks KeysView and ValuesView cost on every value (most are text).
_PLAIN_CONTAINERS = frozenset({list, tuple, set, frozenset, dict})
_PLAIN_LEAVES = frozenset({str, bytes, bytearray, int, float, bool, type(None)})


def _is_container(value: Any) -> bool:
    kind = type(value)
    if kind in _PLAIN_CONTAINERS:
        return True
    return kind not in _PLAIN_LEAVES and isinstance(value, _CONTAINERS)


def _check_text_of(*values: Any) -> None:
    """Refuse values whose text would pass MAX_PROMPT_CHARS, before anything makes it.

    A list may hold another many times over at no cost (``[xs] * 100000``, ``[a, a]`` nested), and its
    text repeats each copy: one ``str()`` of a few kilobytes of lists can be gigabytes, made in a C loop
    no clock can stop. This sizes the text each container would show, once per container (a copy held
    again costs one lookup), and stops at the bound.
    """
    sizes: dict[int, int] = {}  # id of a container -> the length of its text, as far as counted
    for value in values:
        if _is_container(value):
            _text_size(value, sizes)


def _text_size(root: Any, sizes: dict[int, int]) -> None:
    on_path: set[int] = set()  # containers whose children are being sized: one met again is a cycle, shown '[...]'
    stack: list[tuple[Any, bool]] = [(root, False)]
    steps = 0
    while stack:
        node, children_sized = stack.pop()
        steps += 1
        if steps % _CHECK_EVERY == 0:
            _tick()
        key = id(node)
        if children_sized:
            on_path.discard(key)
            children = _children(node)
            total = 2 + (4 if type(node) is dict or isinstance(node, Mapping) else 2) * len(children)
            for child in _looked_at(children):
                total += sizes.get(id(child), 5) if _is_container(child) else _leaf_size(child)
                if total > MAX_PROMPT_CHARS:
                    raise _Exceeded(f"the prompt template would make a text longer than {MAX_PROMPT_CHARS:,} "
                                    "characters (of a list or mapping that holds another many times over)")
            sizes[key] = total
        elif key not in sizes and key not in on_path:
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _looked_at(_children(node))
                         if _is_container(child) and id(child) not in sizes and id(child) not in on_path)


def _children(node: Any) -> list[Any]:
    if type(node) is dict:
        return [*node.keys(), *node.values()]
    if isinstance(node, Namespace):
        return [object.__getattribute__(node, "_Namespace__attrs")]
    if isinstance(node, Mapping):
        return [*node.keys(), *node.values()]
    return list(node)


def _leaf_size(value: Any) -> int:
    if isinstance(value, _TEXT):
        return len(value) + 2
    if _is_int(value):
        return 1 + value.bit_length() * 3 // 10
    return 1


_NESTING = (list, tuple, dict, set, frozenset, KeysView, ValuesView, ItemsView)  # what compares and hashes item by item


def _is_nesting(value: Any) -> bool:
    kind = type(value)
    if kind in _PLAIN_CONTAINERS:
        return True
    return kind not in _PLAIN_LEAVES and isinstance(value, _NESTING)


def _held(value: Any) -> tuple[int, int]:
    """The items ``value`` holds, counting those of the lists, tuples and mappings it holds (a shared one each
    time it is held), and how deep they nest; refused past MAX_HELD_ITEMS or MAX_NESTING.

    Each container is sized once (a shared one costs a lookup), so this is linear in what the template made.
    A namespace is one item: it compares and hashes by identity.
    """
    if not _is_nesting(value):
        return 0, 0
    known = _budget.held
    if known is not None:
        seen = known.recall(value) or _held_shallow(value, known)
        if seen is not None:
            return seen
    sizes: dict[int, tuple[int, int]] = {}  # id of a container -> (items, depth)
    on_path: set[int] = set()  # containers whose children are being sized: one met again is a cycle (a user's value)
    sized: list[Any] = []  # the containers sized here that ``value`` holds, for this render's later calls
    stack: list[tuple[Any, list[Any] | None]] = [(value, None)]
    steps = 0
    while stack:
        node, children = stack.pop()
        steps += 1
        if steps % _CHECK_EVERY == 0:
            _tick()
        key = id(node)
        if children is None:
            if key in sizes:
                continue
            if known is not None and node is not value:
                seen = known.recall(node)
                if seen is not None:
                    sizes[key] = seen
                    continue
                sized.append(node)
            children = _held_children(node)
            if set(map(type, children)) <= _PLAIN_LEAVES:  # the common case: text and numbers, nothing to go into
                sizes[key] = len(children), 1
                continue
            children = [c if _is_nesting(c) else None for c in _looked_at(children)]  # None: a leaf
            on_path.add(key)
            stack.append((node, children))
            stack.extend((c, None) for c in _looked_at(children)
                         if c is not None and id(c) not in sizes and id(c) not in on_path)
            continue
        on_path.discard(key)
        items, depth = len(children), 0
        for child in _looked_at(children):
            if child is not None and id(child) in sizes:
                held, nested = sizes[id(child)]
                items, depth = items + held, max(depth, nested)
        _check_held_size(items, depth + 1)
        sizes[key] = items, depth + 1
    if known is not None:
        for node in sized:
            if id(node) in sizes:
                known.keep(node, *sizes[id(node)])
        known.keep_made(value, *sizes[id(value)])
    return sizes[id(value)]


def _held_shallow(value: Any, known: _HeldSizes) -> tuple[int, int] | None:
    """_held for what holds only text, numbers and containers this render has sized: what a template makes,
    built from the inside out (``[{'i': i}]``), in one pass; None for anything else."""
    children = _held_children(value)
    items, depth = len(children), 0
    if set(map(type, children)) <= _PLAIN_LEAVES:  # text and numbers only: nothing to go into
        known.keep_made(value, items, 1)
        return items, 1
    for child in _looked_at(children):
        if type(child) in _PLAIN_LEAVES or not _is_nesting(child):
            continue
        seen = known.recall(child)
        if seen is None:
            return None
        items, depth = items + seen[0], max(depth, seen[1])
    _check_held_size(items, depth + 1)
    known.keep_made(value, items, depth + 1)
    return items, depth + 1


def _check_held_size(items: int, depth: int) -> None:
    if items > MAX_HELD_ITEMS:
        raise _Exceeded(f"the prompt template would make a list or mapping of more than {MAX_HELD_ITEMS:,} items, "
                        "counting those of the lists and mappings it holds (one that holds another many times over)")
    if depth > MAX_NESTING:
        raise _Exceeded(f"the prompt template would make lists or mappings nested more than {MAX_NESTING} deep")


def _held_children(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [*node.keys(), *node.values()]
    if isinstance(node, ItemsView):  # its (key, value) pairs are made afresh each time: count what they hold
        return [*itertools.chain.from_iterable(node)]
    return list(node)


def _check_held(value: Any) -> Any:
    """Refuse a list, tuple or mapping too large to compare or hash (see MAX_HELD_ITEMS); returns ``value``."""
    if type(value) not in _PLAIN_LEAVES:
        _held(value)
    return value


def _check_held_grown(value: Any, op: str, left: Any, right: Any) -> Any:
    """_check_held for ``left + right`` or ``seq * n``, sized from the sizes of its parts: a list grown a row at a
    time (ns.rows + [row]) costs the row, not the whole list again (1,000 rows of mappings took 276 ms, now 11 ms)."""
    kind, known = type(value), _budget.held
    if kind not in (list, tuple) or known is None:
        return _check_held(value)
    if op == "+" and type(left) is kind and type(right) is kind:
        (left_items, left_depth), (right_items, right_depth) = _held(left), _held(right)
        items, depth = left_items + right_items, max(left_depth, right_depth)
    elif op == "*" and ((type(left) is kind and _is_int(right)) or (type(right) is kind and _is_int(left))):
        seq, times = (left, right) if type(left) is kind else (right, left)
        items, depth = _held(seq) if times > 0 else (0, 1)
        items *= max(times, 0)
    else:
        return _check_held(value)
    _check_held_size(items, depth)
    known.keep_made(value, items, depth)
    return value


def _check_chars(count: int) -> None:
    if count > MAX_PROMPT_CHARS:
        raise _Exceeded(f"the prompt template would make a text longer than {MAX_PROMPT_CHARS:,} characters")


def _check_format(text: str, args: Iterable[Any]) -> None:
    """Refuse a printf-style format whose widths (written, or taken from ``args``) would pad past the bound."""
    for width in (w for m in _PERCENT_SPEC.finditer(text) for w in m.groups() if w):
        _check_chars(max((a for a in args if _is_int(a)), default=0) if width == "*" else int(width))


def _check_spec(spec: str) -> None:
    """Refuse a str.format field spec (its nested fields filled in) whose width or precision would pass the bound."""
    for number in re.findall(r"\d+", spec):
        _check_chars(int(number) if len(number) < 20 else math.inf)


class _BoundedFormatter(SandboxedFormatter):
    """The sandbox's str.format, refusing a width or precision past the bound before the field is padded to it.

    A width may come from the arguments, as a number or as text (``'{:{}}'.format(x, '7000000000')``), or from
    an item or attribute of one (``'{:{0[w]}}'``): only the spec as filled in says what it is.
    """

    def format_field(self, value: Any, format_spec: str) -> Any:
        _check_spec(format_spec)
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    """_BoundedFormatter for ``Markup.format``: escapes what it formats, sized before it is escaped."""

    def __init__(self, env: Any, escape: Callable[[Any], Markup]) -> None:
        def sized_escape(value: Any) -> Markup:
            _check_escaped("", [value])
            return escape(value)

        super().__init__(env, escape=sized_escape)


def _bounded_iter(iterable: Iterable[Any]) -> Iterator[Any]:
    """What every ``{% for %}`` loops over: the same items, with a look at the clock before each.

    One step may be one C call of milliseconds (``-1 in xs`` over a caller's million items, a copy of a long text):
    looking every 1,024 steps let 100,000 of them run 7 s past a 2 s budget.
    """
    for item in iterable:
        _tick()
        yield item


def _ticking(iterable: Iterable[Any]) -> Iterator[Any]:
    """The items of ``iterable`` one at a time, with a look at the clock every _CHECK_EVERY of them.

    For what a filter goes through in one loop no clock stops (max's key on each character of a text, select's
    test on each item). It reads nothing ahead, so a generator handed on is left where the filter left it, and it
    costs a C step an item (some 15 ns) where a generator would cost a Python one.
    """
    looks = itertools.chain.from_iterable(map(_look_at_the_clock, itertools.repeat(_CHECK_EVERY)))
    return map(operator.itemgetter(0), zip(iterable, looks))


def _look_at_the_clock(count: int) -> Iterator[None]:
    _tick()
    return itertools.repeat(None, count)


def _looked_at(items: list[Any]) -> Iterable[Any]:
    """``items``, with a look at the clock every _CHECK_EVERY of them if there are more: a caller's list may hold a
    million, and going through them is a Python step each."""
    return _ticking(items) if len(items) > _CHECK_EVERY else items


def _pieces(text: Any, boundary: re.Pattern[str] | None = None) -> Iterator[Any]:
    """``text`` in consecutive pieces of some _TEXT_PIECE characters, with a look at the clock before each.

    Each piece but the last ends just before a match of ``boundary`` (a word's or a tag's start), so that what a
    filter does to each piece, joined, is what it does to the whole.
    """
    start = 0
    while start < len(text):
        _tick()
        end = start + _TEXT_PIECE
        if boundary is not None and end < len(text):
            found = boundary.search(text, end)
            end = found.start() if found else len(text)
        yield text[start:end]
        start = end


def _compared(result: Any) -> Any:
    """What every comparison (``==``, ``<``, ``in``) passes: a look at the clock after it. One is a C loop of
    milliseconds on a caller's long list or text, and a template may write hundreds with no loop or call between."""
    _tick()
    return result


def _finalize(value: Any) -> Any:
    """What every ``{{ value }}`` passes before Jinja makes it text."""
    _check_text_of(value)
    return value


def _bounded_concat(parts: Iterable[str]) -> str:
    """Joins a template's output as it streams in, and that of macros and ``{% set %}`` blocks: stops at the bound.

    Only the size is checked per part; the time is, in the loops and calls that make the parts.
    """
    joined, size = [], 0
    for part in parts:
        size += len(part)
        if size > MAX_PROMPT_CHARS:
            _check_chars(size)
        joined.append(part)
    _tick()
    return "".join(joined)


# Filters whose output can dwarf their input: each checks what it would make before making it.
def _center(value: Any, width: int = 80) -> str:
    _check_chars(width)
    return do_center(value, width)


def _indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> Any:
    text = str(s)
    prefix = width if isinstance(width, int) else len(str(width))
    _check_chars(len(text) + prefix * (sum(map(text.count, _LINE_BREAKS)) - text.count("\r\n") + 1))
    if not isinstance(s, str) or not isinstance(width, (int, str)) or isinstance(width, Markup):
        return do_indent(s, width, first, blank)  # which refuses what is not text, and escapes lines for Markup
    # Jinja indents every line in one Python expression: 3.3 million short lines took 0.37 s with no look at the
    # clock, and 268 MB. This indents a piece of whole lines at a time, every line as Jinja indents the second on
    # (blank ones only if ``blank``), then puts the first line as Jinja does.
    indention = width if isinstance(width, str) else " " * width
    indented = "\n".join("\n".join(indention + line if blank or line else line for line in piece.splitlines())
                         for piece in _pieces(text + "\n", _LINE_START))
    if blank or text[:1] not in ("", *_LINE_BREAKS):  # the first line was indented: Jinja indents it only if ``first``
        indented = indented[len(indention):]
    indented = indention + indented if first else indented
    return Markup(indented) if isinstance(s, Markup) else indented


def _batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if linecount > MAX_ITEMS:
        raise _Exceeded(f"batch({linecount}) is past the {MAX_ITEMS:,} items a template may make")
    return do_batch(value, linecount, fill_with)


def _slice(value: Any, slices: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if slices > MAX_ITEMS:
        raise _Exceeded(f"slice({slices}) is past the {MAX_ITEMS:,} items a template may make")
    return sync_do_slice(_listed(value), slices, fill_with)


@pass_eval_context
def _join(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
    items = _listed(value)
    _check_chars(len(str(d)) * max(len(items) - 1, 0) + sum(len(x) for x in items if isinstance(x, str)))
    return _check_size(sync_do_join(eval_ctx, items, d, attribute))


@pass_eval_context
def _replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    text, old_text, new_text = str(s), str(old), str(new)
    times = text.count(old_text) if old_text else len(text) + 1
    if count is not None:
        times = min(times, max(count, 0))
    _check_chars(len(text) + times * max(len(new_text) - len(old_text), 0))
    return do_replace(eval_ctx, s, old, new, count)


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_format(str(value), [*args, *kwargs.values()])
    return do_format(value, *args, **kwargs)


@pass_environment
def _wordwrap(environment: Any, s: str, width: int = 79, break_long_words: bool = True, wrapstring: str | None = None,
              break_on_hyphens: bool = True) -> str:
    breaks = len(s) // max(width, 1) + s.count(" ") + 1
    _check_chars(len(s) + breaks * len(wrapstring or environment.newline_sequence))
    if break_long_words:  # textwrap copies the rest of a long word for each line it cuts off: quadratic in the word
        line = max(width, 1)
        long_words = [n for n in (m.end() - m.start() for m in _ticking(_WORD.finditer(s))) if n > line]
        if sum(n * n // line for n in long_words) > MAX_WRAP_WORK:
            raise _Exceeded(f"wordwrap({width}) would break a word of {max(long_words):,} characters, which takes "
                            "time quadratic in its length: use break_long_words=false, or a wider width")
    # textwrap wraps each line on its own, holding a string for each word and space of it (36 bytes a character) and
    # laying them out a Python step each: one line of 4.8 million characters took 1.3 s with no look at the clock,
    # and 171 MB. Lines are wrapped a piece of whole lines at a time, and one may be at most MAX_WRAP_LINE long.
    wrapped = []
    for piece in _pieces(s, _LINE_START):
        longest = max(map(len, piece.splitlines()), default=0)
        if longest > MAX_WRAP_LINE:
            raise _Exceeded(f"wordwrap wraps a line of at most {MAX_WRAP_LINE:,} characters, not {longest:,}: "
                            "break the text into lines first")
        wrapped.append(do_wordwrap(environment, piece, width, break_long_words, wrapstring, break_on_hyphens))
    return (environment.newline_sequence if wrapstring is None else wrapstring).join(wrapped)


@pass_environment
def _sum(environment: Any, iterable: Iterable[Any], attribute: Any = None, start: Any = 0) -> Any:
    # Summing lists or strings copies the total at every step: quadratic time in a C loop no clock can stop.
    if not isinstance(start, (int, float)) or isinstance(start, bool):
        raise _Exceeded("sum adds numbers; join text with |join")
    items = _listed(iterable)
    if attribute is not None:
        items = list(map(make_attrgetter(environment, attribute), items))
    if any(not isinstance(x, (int, float)) for x in items):
        raise _Exceeded("sum adds numbers; join text with |join")
    return sum(items, start)


@pass_eval_context
def _tojson(eval_ctx: Any, value: Any, indent: int | str | None = None) -> Any:
    width = len(indent) if isinstance(indent, str) else indent if _is_int(indent) else 0
    if width > MAX_JSON_INDENT:
        raise _Exceeded(f"tojson indents by at most {MAX_JSON_INDENT}, not {width}")
    return do_tojson(eval_ctx, value, indent)


_JSON_PIECES = 256  # pieces of indented JSON written between looks at its size and the clock (a line, or less, each)


def _bounded_dumps(value: Any, **kwargs: Any) -> str:
    """json.dumps for |tojson, stopped at MAX_PROMPT_CHARS and by the clock as it indents.

    Indented JSON repeats the indent of each line's depth: 100,000 numbers nested 99 deep, a list whose own text is
    600,000 characters, are 633 million indented by 64 (6.7 s past a 2 s budget, 1.5 GB). Python's encoder writes
    it a piece at a time, so it is taken a piece at a time. Unindented JSON is one C pass over a value whose text
    _check_text_of has sized.
    """
    if kwargs.get("indent") is None:
        text = json.dumps(value, **kwargs)
    else:
        written = json.JSONEncoder(**kwargs).iterencode(value)
        pieces: list[str] = []
        size = 0
        while batch := list(itertools.islice(written, _JSON_PIECES)):
            size += sum(map(len, batch))
            _check_chars(size)
            _tick()
            pieces += batch
        text = "".join(pieces)
    _check_chars(len(text))  # first: counting in 120 million characters (ten million emoji, escaped) takes 0.3 s
    _check_chars(len(text) + 5 * sum(map(text.count, "<>&'")))  # which |tojson then writes as \u003c and the like
    return text


def _pprint(value: Any) -> str:
    # pformat makes the text of every level again for the level above: its time is items times depth.
    items, depth = _held(value)
    if items * depth > MAX_PPRINT_WORK:
        raise _Exceeded(f"pprint would go through {items:,} items {depth} levels deep, past the {MAX_PPRINT_WORK:,} "
                        "(items times depth) it may: use |tojson")
    return _BoundedPrettyPrinter().pformat(value)


class _BoundedPrettyPrinter(pprint.PrettyPrinter):
    """pprint's printer (what |pprint lays out with), looking at the clock for each value it makes the text of.

    It goes through a caller's list of a million items in Python steps (1.1 s with no look at the clock), splits each
    long text into words to lay it out (a 10-million-character one: 1.1 s and 268 MB) and sorts a mapping's keys with
    a Python comparison each (600,000 keys: 3.1 s): a text is refused past MAX_PPRINT_TEXT characters, a mapping
    past MAX_ITEMS items.
    """

    def format(self, value: Any, context: dict[int, int], maxlevels: int, level: int) -> tuple[str, bool, bool]:
        _tick()
        if isinstance(value, _TEXT) and len(value) > MAX_PPRINT_TEXT:
            raise _Exceeded(f"pprint lays out a text of at most {MAX_PPRINT_TEXT:,} characters, not {len(value):,}: "
                            "show the text itself, or |tojson")
        if isinstance(value, dict) and len(value) > MAX_ITEMS:  # it sorts the keys, comparing them in Python
            raise _Exceeded(f"pprint sorts a mapping of at most {MAX_ITEMS:,} items, not {len(value):,}: use |tojson")
        return super().format(value, context, maxlevels, level)


_WORD_CHARS = re.compile(r"\w+")  # what |wordcount counts (Jinja's pattern)
_NOT_WORD_CHAR = re.compile(r"\W")
# Where |title starts a new word: after a run of these (Jinja's pattern); a piece may end just before such a run.
_TITLE_BREAKS = r"-\s({\[<"
_TITLE_RUN_START = re.compile(f"(?<![{_TITLE_BREAKS}])[{_TITLE_BREAKS}]")
_SPACE = re.compile(r"\s")  # what str.split() splits at (the same characters as str.isspace)
_AMPERSAND = re.compile("&")  # where an HTML character reference starts; none holds another '&'


def _upper(s: Any) -> Any:
    return _case_mapped(soft_str(s), "upper")


def _lower(s: Any) -> Any:
    return _case_mapped(soft_str(s), "lower")


def _capitalize(s: Any) -> Any:
    return _case_mapped(soft_str(s), "capitalize")


def _wordcount(s: Any) -> int:
    # findall made a list of every word: a 10-million-character text, 3.3 million words (230 MB) with no look at
    # the clock. Each piece ends before a character that is not a word's, so no word is counted twice.
    return sum(len(_WORD_CHARS.findall(piece)) for piece in _pieces(soft_str(s), _NOT_WORD_CHAR))


def _title(s: Any) -> str:
    # Jinja splits the text into words and joins them again, a Python step a word: 10 million characters took 1.4 s
    # with no look at the clock, and 714 MB. Each piece ends where a run of word breaks starts, as Jinja splits.
    return "".join(map(do_title, _pieces(soft_str(s), _TITLE_RUN_START)))


def _striptags(value: Any) -> str:
    """|striptags and Markup.striptags: markupsafe's, with a look at the clock every _CHECK_EVERY tags and pieces.

    markupsafe removes one tag a Python step (2.5 million tags: 0.8 s with no look at the clock), collapses white
    space by splitting the text into words (10 million characters: 258 MB), and unescapes one character reference a
    Python step. This does each the same way, a piece at a time.
    """
    if hasattr(value, "__html__"):
        value = value.__html__()
    text = str(value)
    kept: list[str] = []  # the text between tags, joined every _CHECK_EVERY pieces
    parts: list[str] = []
    pos = 0
    while (start := text.find("<", pos)) != -1:
        if text.startswith("<!--", start):  # a comment: it may hold '>'
            if (end := text.find("-->", start + 4)) == -1:
                break
            end += 3
        else:
            if (end := text.find(">", start)) == -1:
                break
            end += 1
        parts.append(text[pos:start])
        pos = end
        if len(parts) == _CHECK_EVERY:
            _tick()
            kept.append("".join(parts))
            parts.clear()
    if pos > 0:
        text = "".join([*kept, *parts, text[pos:]])
    words = [" ".join(piece.split()) for piece in _pieces(text, _SPACE)]
    return _unescape(" ".join(word for word in words if word))


def _unescape(text: str) -> str:
    """Markup.unescape (html.unescape), a piece at a time: it calls Python for each character reference."""
    return "".join(map(html.unescape, _pieces(str(text), _AMPERSAND)))


def _escaped_size(text: str) -> int:
    """The length of ``text`` once markupsafe escapes it: & ' " become five characters, < > four."""
    return len(text) + 4 * sum(map(text.count, "&'\"")) + 3 * sum(map(text.count, "<>"))


def _check_escaped(markup: str, values: Iterable[Any]) -> None:
    """Refuse escaping ``values`` into ``markup`` (|e, Markup's % and format) past the bound, before it is made: ten
    million '<' and one emoji are 160 MB of text to refuse (305 MB in all)."""
    texts = [value for value in values if isinstance(value, str) and not hasattr(value, "__html__")]
    _check_chars(len(markup) + sum(map(_escaped_size, texts)))


def _escape(value: Any) -> Markup:
    _check_escaped("", [value])
    return escape(value)


def _forceescape(value: Any) -> Markup:
    text = value.__html__() if hasattr(value, "__html__") else value
    if isinstance(text, str):
        _check_chars(_escaped_size(text))
    return do_forceescape(value)


_URL_SAFE = (string.ascii_letters + string.digits + "_.-~").encode()  # what urllib never quotes


def _url_quote(value: Any, for_qs: bool = False) -> str:
    """What |urlencode makes of one value (Jinja's url_quote), sized before it is made and quoted a piece at a time.

    urllib quotes a byte a Python step and holds a string for each: 10 million emoji (40 million bytes) took 1.5 s
    with no look at the clock and 458 MB, to make 120 million characters and refuse them.
    """
    data = value if isinstance(value, bytes) else (value if isinstance(value, str) else str(value)).encode("utf-8")
    safe = b"" if for_qs else b"/"
    _check_chars(len(data) + 2 * len(data.translate(None, _URL_SAFE + safe)))  # each byte quoted is three characters
    quoted = "".join(quote_from_bytes(piece, safe) for piece in _pieces(data))
    return quoted.replace("%20", "+") if for_qs else quoted


def _urlencode(value: Any) -> str:
    """|urlencode as Jinja's, quoting with _url_quote, going through a mapping or pairs with looks at the clock."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        return _url_quote(value)
    pairs = value.items() if isinstance(value, dict) else value
    parts, size = [], 0
    for key, item in _ticking(pairs):
        parts.append(f"{_url_quote(key, for_qs=True)}={_url_quote(item, for_qs=True)}")
        size += len(parts[-1]) + 1
        _check_chars(size)
    return "&".join(parts)


@pass_eval_context
def _xmlattr(eval_ctx: Any, d: Any, autospace: bool = True) -> str:
    # Jinja goes through the items in one Python loop: a caller's mapping of 600,000 took 0.7 s with no look.
    return do_xmlattr(eval_ctx, _ItemsLookedAt(d), autospace)


class _ItemsLookedAt:
    """A mapping whose ``items()`` go by with _ticking, for a filter that loops over them (|xmlattr)."""

    def __init__(self, mapping: Any) -> None:
        self._mapping = mapping

    def items(self) -> Iterator[tuple[Any, Any]]:
        return _ticking(self._mapping.items())


def _listed(value: Iterable[Any]) -> list[Any]:
    """``list(value)``, refused past MAX_ITEMS before it is made (a text is a character an item; ``|batch(1)`` of
    one makes a list an item)."""
    items = list(itertools.islice(value, MAX_ITEMS + 1))
    _check_items(len(items))
    return items


@pass_environment
def _groupby(environment: Any, value: Iterable[Any], attribute: Any, default: Any = None,
             case_sensitive: bool = False) -> list[Any]:
    # It sorts all it is given, looking up the attribute of each item in a C loop no clock stops: a text of
    # 10 million characters took 10 s against a 2 s budget, and 830 MB.
    return sync_do_groupby(environment, _listed(value), attribute, default, case_sensitive)


def _reverse(value: Any) -> Any:
    # What cannot be reversed where it is (a text's |map or |select) is made into a list first: all of it.
    return do_reverse(_listed(value) if isinstance(value, Iterator) else value)


@pass_environment
def _sort(environment: Any, value: Iterable[Any], reverse: bool = False, case_sensitive: bool = False,
          attribute: Any = None) -> list[Any]:
    return do_sort(environment, _listed(value), reverse, case_sensitive, attribute)


def _urlize(*args: Any, **kwargs: Any) -> str:
    raise SecurityError("the urlize filter is not available in prompt templates: it makes HTML links, which a prompt "
                        "has no use for, and takes minutes on some text (its pattern backtracks)")


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 - Jinja's names
    if _is_int(n) and _is_int(max) and n * max > MAX_LIPSUM_WORDS:
        raise _Exceeded(f"lipsum({n}, max={max}) would make up to {n * max:,} words, past the "
                        f"{MAX_LIPSUM_WORDS:,} a template may make")
    return generate_lorem_ipsum(n, html, min, max)


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with a look at the clock before it runs and a size check on what it made.

    Filters are called directly, not through the sandbox's ``call``; a filter that makes a few times
    its input (``escape``, ``urlencode``, ``tojson``) would otherwise grow text without bound when chained.
    """

    text_of = name not in _FILTERS_THAT_MAKE_NO_TEXT

    @functools.wraps(function)  # keeps Jinja's pass_context / pass_eval_context marks
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        if text_of:
            _check_text_of(*args, *kwargs.values())
        return _check_held(_made(_check_size(function(*args, **kwargs))))

    bounded.__name__ = f"bounded_{name}"
    return bounded


def _going_through(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, a filter that goes through what it is given in one loop, given it with _ticking."""
    at = 0 if getattr(function, "jinja_pass_arg", None) is None else 1  # after Jinja's context, if it passes one

    @functools.wraps(function)
    def going_through(*args: Any, **kwargs: Any) -> Any:
        value = args[at] if len(args) > at else None
        # An empty one is left as it is: Jinja's |map and |select look at its arguments only if it is not empty.
        if isinstance(value, Iterable) and not isinstance(value, Undefined) and \
                not (isinstance(value, Sized) and len(value) == 0):
            args = (*args[:at], _ticking(value), *args[at + 1:])
        return function(*args, **kwargs)

    return going_through


def _bounded_test(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, a test, with a look at the clock before it runs.

    |select runs one for each item, and one may be a C loop of milliseconds: ``range(100000)|select('in', xs)`` over
    a caller's million items ran minutes with no look at the clock.
    """

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        return function(*args, **kwargs)

    return bounded


def _int(value: Any, default: int = 0, base: int = 10) -> int:
    # Python bounds the decimal digits int() reads, not binary ones: ten million make an integer of as many bits,
    # and dividing one such by another is a C loop quadratic in their length.
    number = do_int(value, default, base)
    if _is_int(number):
        _check_bits(number.bit_length())
    return number


_STR_METHODS_WITH_WIDTH = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
# Filters that count, pick or regroup what they are given and make no text of it (the filters they map,
# select or test with are checked on each item); every other filter's arguments pass _check_text_of.
_FILTERS_THAT_MAKE_NO_TEXT = frozenset({"length", "count", "first", "last", "random", "list", "map", "select", "reject",
                                        "selectattr", "rejectattr", "batch", "slice", "default", "d", "attr",
                                        "items"})
# Filters that go through what they are given in one loop no clock stops, a C or Python step an item (max calls its
# key on each: 1.3 s for a 10-million-character text); they go through it with _ticking.
_FILTERS_GOING_THROUGH = frozenset({"max", "min", "unique", "map", "select", "reject", "selectattr", "rejectattr",
                                    "batch"})


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox, with a clock on each loop step, call and operator, and a size check on what they make.

    A template is text from a spec, perhaps someone else's: the sandbox already keeps it from
    Python's internals, and this keeps it from running forever or filling memory before the
    context-window check could refuse the prompt. It is the immutable sandbox: a template cannot
    change a list or dict (``l.extend(l)`` doubles a list in one call, past any check on what calls return).
    """

    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.concat = _bounded_concat  # type: ignore[assignment]
        self.filters.update(center=_center, indent=_indent, batch=_batch, slice=_slice, join=_join, replace=_replace,
                            format=_format, wordwrap=_wordwrap, sum=_sum, tojson=_tojson, pprint=_pprint, list=_listed,
                            sort=_sort, urlize=_urlize, groupby=_groupby, reverse=_reverse, wordcount=_wordcount,
                            title=_title, striptags=_striptags, e=_escape, escape=_escape, forceescape=_forceescape,
                            urlencode=_urlencode, int=_int, xmlattr=_xmlattr, upper=_upper, lower=_lower,
                            capitalize=_capitalize)
        self.filters.update({name: _going_through(self.filters[name]) for name in _FILTERS_GOING_THROUGH})
        self.policies["json.dumps_function"] = _bounded_dumps
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.tests = {name: _bounded_test(f) for name, f in self.tests.items()}
        self.globals["lipsum"] = _lipsum

    # What _WithChecks makes templates call: environment attributes, so no template variable can shadow them.
    bounded_iter = staticmethod(_bounded_iter)
    bounded_held = staticmethod(_check_held)
    bounded_compare = staticmethod(_compared)

    @staticmethod
    def bounded_tilde(*parts: Any) -> str:
        _check_text_of(*parts)
        return _made(_bounded_concat(str(part) for part in parts))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (*_TEXT, list, tuple)) and isinstance(times, int):
                    (_check_chars if isinstance(seq, _TEXT) else _check_items)(len(seq) * times)
            if _is_int(left) and _is_int(right):
                _check_bits(abs(left).bit_length() + abs(right).bit_length())
        elif operator == "+" and isinstance(left, (*_TEXT, list, tuple)) and isinstance(right, (*_TEXT, list, tuple)):
            (_check_chars if isinstance(left, _TEXT) else _check_items)(len(left) + len(right))
        elif operator == "**" and _is_int(left) and _is_int(right) and abs(left) > 1 and right > 0:
            _check_bits(abs(left).bit_length() * right)
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, tuple) else [right])
            _check_text_of(right)
            if isinstance(left, Markup):  # it escapes what it formats
                _check_escaped(left, right if isinstance(right, tuple) else
                               right.values() if isinstance(right, Mapping) else [right])
        made = _made(_check_size(super().call_binop(context, operator, left, right)))
        return _check_held_grown(made, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - as Jinja names it
        if __obj is _bounded_iter:  # a {% for %} makes no text of what it loops over: nothing to size
            return _bounded_iter(*args)
        if __obj is _check_held:  # a literal list, tuple or dict: it sizes what it holds
            return _check_held(*args)
        if __obj is _compared:
            return _compared(*args)
        _tick()
        name = getattr(__obj, "__name__", None)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, Markup) and name in ("striptags", "unescape") and not args and not kwargs:
            return _made(_check_size(_striptags(owner) if name == "striptags" else _unescape(owner)))
        if isinstance(owner, _TEXT) and name in _STR_METHODS_WITH_WIDTH:
            tab = owner.count(b"\t" if isinstance(owner, (bytes, bytearray)) else "\t") + 1 \
                if name == "expandtabs" else 1
            _check_chars(len(owner) + tab * max([a for a in (*args, *kwargs.values()) if _is_int(a)], default=0))
        elif isinstance(owner, _TEXT) and name == "join" and args:
            items = list(args[0])
            _check_chars(len(owner) * max(len(items) - 1, 0) + sum(len(x) for x in items if isinstance(x, _TEXT)))
            args = (items, *args[1:])
        elif isinstance(owner, _TEXT) and name == "replace" and len(args) >= 2:
            times = owner.count(args[0]) if args[0] else len(owner) + 1
            _check_chars(len(owner) + times * max(len(args[1]) - len(args[0]), 0))
        elif isinstance(owner, _TEXT) and name in ("split", "rsplit"):
            args, kwargs = _split_args(args, kwargs)
        elif isinstance(owner, _TEXT) and name == "splitlines" and len(owner) > MAX_ITEMS:
            _check_items(_line_count(owner))
        elif isinstance(owner, str) and name == "translate" and args:
            _check_chars(len(owner) * _longest_replacement(owner, args[0]))
        elif (name == "encode" and isinstance(owner, str)) or \
                (name == "decode" and isinstance(owner, (bytes, bytearray))):
            _check_codec(name, args[0] if args else kwargs.get("encoding", "utf-8"),
                         args[1] if len(args) > 1 else kwargs.get("errors", "strict"))
        elif _is_int(owner) and name == "to_bytes":
            length = args[0] if args else kwargs.get("length", 1)
            if _is_int(length):
                _check_chars(length)
        _check_text_of(*args, *kwargs.values())
        made = _in_pieces(owner, name, args, kwargs) if type(owner) is str and name in _PIECEWISE_METHODS and \
            len(owner) > _TEXT_PIECE and not owner.isascii() else None
        if made is None:
            made = super().call(__context, __obj, *args, **kwargs)
        if _is_int(made):  # int.from_bytes: ten million bytes are an integer of 80 million bits
            _check_bits(made.bit_length())
        return _check_held(_made(_check_size(made)))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Jinja's sandboxed ``str.format`` and ``format_map``, formatting with _BoundedFormatter."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or \
                value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
            return None
        text, is_format_map = value.__self__, value.__name__ == "format_map"
        formatter = _BoundedEscapeFormatter(self, escape=text.escape) if isinstance(text, Markup) else \
            _BoundedFormatter(self)

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument, a mapping")
                args, kwargs = (), args[0]
            return type(text)(formatter.vformat(text, args, kwargs))

        return functools.update_wrapper(bounded_format, value)

    # Each lookup looks at the clock: |sort, |groupby, |selectattr look up an attribute of each item, a few
    # microseconds each (|groupby of 100,000 items: 0.9 s with no look), and ``s[1:]`` copies a text.
    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return _check_size(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return _check_size(super().getitem(obj, argument))


# What a str method makes of a long text that is not ASCII may be many times it, made in one C call and only then
# refused: 'ß'.upper() is 'SS' (ten million: 0.45 s), and encode's xmlcharrefreplace writes '&#128512;' for an emoji
# (0.44 s). These are made a piece at a time, each looked at the clock and sized.
_CASE_METHODS = frozenset({"upper", "lower", "casefold", "swapcase", "title", "capitalize"})
_PIECEWISE_METHODS = _CASE_METHODS | {"encode"}


# Characters that are neither cased nor case-ignorable (as "'", '.', ':', '^', '`' are): no case mapping looks past one.
_CASE_BREAK = re.compile(r"[\s0-9!\"#$%&()*+,\-/;<=>?@\[\\\]_{|}~]")


def _in_pieces(text: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``getattr(text, name)(*args, **kwargs)`` made a piece at a time, or None where the call is not one this
    knows (str's own method then refuses it)."""
    if name in _CASE_METHODS:
        return None if args or kwargs else _case_mapped(text, name)
    if len(args) > 2 or not kwargs.keys() <= {"encoding", "errors"} or (args and "encoding" in kwargs) or \
            (len(args) == 2 and "errors" in kwargs):
        return None
    encoding = args[0] if args else kwargs.get("encoding", "utf-8")
    errors = args[1] if len(args) == 2 else kwargs.get("errors", "strict")
    # An incremental encoder writes a byte order mark once (utf-16, utf-32, utf-8-sig), as encode does.
    encoder = codecs.getincrementalencoder(encoding)(errors)
    made: list[bytes] = []
    size = done = 0
    for piece in _pieces(text):
        try:
            made.append(encoder.encode(piece))
        except UnicodeEncodeError as exc:  # where in the text, not in the piece
            raise UnicodeEncodeError(exc.encoding, text, done + exc.start, done + exc.end, exc.reason) from None
        done += len(piece)
        size += len(made[-1])
        _check_chars(size)
    made.append(encoder.encode("", True))
    return b"".join(made)


def _case_mapped(text: Any, method: str) -> Any:
    """``getattr(text, method)()`` (upper, lower...), a piece at a time for a long text that is not ASCII.

    upper and casefold map each character on its own. The others look at their neighbours (lower's final sigma,
    title's word start), but never past white space, a digit or most ASCII punctuation, which each piece ends
    before: the pieces, joined, are what the whole would be. (A long text with none of these is one piece.)
    """
    if type(text) is not str or len(text) <= _TEXT_PIECE or text.isascii():
        return getattr(text, method)()
    made: list[str] = []
    size = 0
    for piece in _pieces(text, None if method in ("upper", "casefold") else _CASE_BREAK):
        made.append(getattr(piece, "lower" if method == "capitalize" and made else method)())
        size += len(made[-1])
        _check_chars(size)
    return "".join(made)


def _split_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """split's (and rsplit's) arguments, splitting at most MAX_ITEMS times: the list then stops one piece past the
    bound, which the size check refuses, instead of holding every piece first (a 10-million-character text split
    into 3.3 million words took 230 MB)."""
    if len(args) > 2 or not kwargs.keys() <= {"sep", "maxsplit"} or (args and "sep" in kwargs) or \
            (len(args) == 2 and "maxsplit" in kwargs):
        return args, kwargs  # split refuses these itself
    try:
        maxsplit = operator.index(args[1] if len(args) == 2 else kwargs.get("maxsplit", -1))
    except TypeError:
        return args, kwargs
    if maxsplit < 0 or maxsplit > MAX_ITEMS:
        maxsplit = MAX_ITEMS
    return (args[0] if args else kwargs.get("sep"), maxsplit), {}


_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines breaks; bytes break at \n, \r
# Just after a line break, where a piece of whole lines may end ('\r\n' is one break).
_LINE_START = re.compile(rf"(?<=[{_LINE_BREAKS.replace(chr(13), '')}])|(?<=\r)(?!\n)")


def _line_count(text: str | bytes | bytearray) -> int:
    """The lines splitlines would make of ``text``, counted without making them."""
    if isinstance(text, str):
        breaks: Any = _LINE_BREAKS
        crlf, last = "\r\n", text[-1:]
    else:
        breaks, crlf, last = (b"\n", b"\r"), b"\r\n", bytes(text[-1:])
    return sum(map(text.count, breaks)) - text.count(crlf) + (1 if text and last not in breaks else 0)


def _longest_replacement(text: str, table: Any) -> int:
    """The longest text that str.translate's ``table`` (a mapping, list, text...) puts for a character of ``text``."""
    longest = 1
    for char in set(text):
        try:
            replacement = table[ord(char)]
        except LookupError:  # translate keeps the character
            continue
        if isinstance(replacement, str):
            longest = max(longest, len(replacement))
    return longest


def _check_codec(method: str, encoding: Any, errors: Any) -> None:
    try:
        codec = codecs.lookup(encoding).name
    except (LookupError, TypeError):
        codec = None
    if codec not in _CODECS or not isinstance(errors, str) or errors not in _CODEC_ERRORS:
        raise SecurityError(
            f"{method}({str(encoding)[:40]!r}, errors={str(errors)[:40]!r}) is not allowed in a prompt template: "
            "it may use utf-8, utf-16, utf-32 (and their -le, -be forms), ascii and latin-1, with errors='strict', "
            "'ignore', 'replace', 'backslashreplace', 'xmlcharrefreplace', 'surrogateescape' or 'surrogatepass' "
            "(other codecs, such as punycode, take time quadratic in the text)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_items(count: int) -> None:
    if count > MAX_ITEMS:
        raise _Exceeded(f"the prompt template would make a list of more than {MAX_ITEMS:,} items")


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise _Exceeded(f"the prompt template would make an integer of more than {MAX_INT_BITS:,} bits")


class _WithChecks(NodeTransformer):
    """Loops, ``~``, comparisons and literals as calls the sandbox sees:
    ``{% for x in environment.bounded_iter(xs) %}``, ``environment.bounded_tilde(a, b)`` for ``a ~ b``, which Jinja
    would otherwise join unchecked,
    ``environment.bounded_compare(a in b)``, which Jinja would otherwise run with no look at the clock, and
    ``environment.bounded_held([a, a])`` for a list, tuple or dict that Jinja would otherwise make unsized."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = _environment_call("bounded_iter", [node.iter], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return _environment_call("bounded_tilde", node.nodes, node.lineno)

    def visit_Compare(self, node: nodes.Compare) -> nodes.Call:
        self.generic_visit(node)
        return _environment_call("bounded_compare", [node], node.lineno)

    def visit_List(self, node: nodes.List) -> nodes.Expr:
        return self._held(node, node.items)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Expr:
        return node if node.ctx != "load" else self._held(node, node.items)

    def visit_Dict(self, node: nodes.Dict) -> nodes.Expr:
        return self._held(node, [part for pair in node.items for part in (pair.key, pair.value)])

    def _held(self, node: nodes.Expr, parts: list[nodes.Expr]) -> nodes.Expr:
        """``[a, a]`` as ``environment.bounded_held([a, a])``, unless it holds only constants."""
        self.generic_visit(node)
        if all(isinstance(part, nodes.Const) for part in parts):
            return node
        return _environment_call("bounded_held", [node], node.lineno)


def _environment_call(name: str, args: list[nodes.Expr], lineno: int) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute(name, lineno=lineno), args, [], None, None, lineno=lineno)


# One sandboxed environment for every template: attribute access to internals, code
# execution through format strings and similar escapes are refused by the sandbox.
_ENV = _BoundedSandbox(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False, finalize=_finalize)


class PromptTemplate:
    """A compiled prompt template and the names it reads."""

    def __init__(self, source: str, hop: str, line: int | None = None, field: str = "prompt") -> None:
        self.source = source
        self.hop = hop
        self.field = field  # where the spec wrote it: "prompt", or a chat message's "messages[1].content"
        try:
            parsed = _ENV.parse(source)
        except TemplateSyntaxError as exc:
            where = f"{exc.message} (line {exc.lineno} of the prompt)"
            raise TemplateError(
                f"the prompt template does not parse: {where}",
                hop=hop,
                field=field,
                line=line,
                hint="variables are written {{ name }}; blocks {% for x in xs %}...{% endfor %}",
            ) from None
        except RecursionError:
            raise self._too_deep(line) from None
        try:
            self.variables: frozenset[str] = frozenset(meta.find_undeclared_variables(parsed))
            self._parts = _plain_parts(parsed, self.variables)
            self._template = _ENV.from_string(_WithChecks().visit(parsed))
        except (RecursionError, SyntaxError):  # Python's compiler refuses more than 20 nested blocks
            raise self._too_deep(line) from None

    def _too_deep(self, line: int | None) -> TemplateError:
        return TemplateError("the prompt template nests too deeply to compile (brackets, or blocks such as "
                             "{% for %} and {% if %} inside one another)", hop=self.hop, field=self.field, line=line,
                             hint="a prompt needs a few levels at most: build deep structures in a Python hop")

    @property
    def plain(self) -> bool:
        """True if the template is only text and ``{{ name }}``s: it renders at once, without Jinja's runtime."""
        return self._parts is not None

    def render(self, values: Mapping[str, Any], timeout_s: float | None = None) -> str:
        """The prompt for ``values``; a template that runs past ``timeout_s`` (default 10 s) or makes more than
        MAX_PROMPT_CHARS characters raises TemplateError."""
        try:
            if self._parts is not None and self.variables <= values.keys():
                # Text and bare {{ name }}s render as Jinja renders them (str of each value), within the same
                # bounds, without the cost of its runtime on every hop of every run.
                return _join_plain(self._parts, values)
            return self._render_bounded(values, timeout_s or DEFAULT_RENDER_S)
        except UndefinedError as exc:
            raise TemplateError(
                f"the prompt needs a value that is missing: {exc.message}",
                hop=self.hop,
                field=self.field,
                hint=f"values available to this hop: {', '.join(sorted(values)) or 'none'}",
            ) from None
        except SecurityError as exc:
            raise TemplateError(f"the sandbox refused the template: {exc}", hop=self.hop, field=self.field) from None
        except _Exceeded as exc:
            raise TemplateError(
                str(exc),
                hop=self.hop,
                field=self.field,
                hint="the hop's timeout_s (10 s without one) bounds rendering; a prompt is at most "
                f"{MAX_PROMPT_CHARS:,} characters: build large or repeated text in a Python hop",
            ) from None
        except RecursionError:
            raise TemplateError("the prompt template recurses too deeply (a macro that calls itself?)",
                                hop=self.hop, field=self.field) from None
        except Exception as exc:  # the template's own arithmetic or a value's method failed: 1/0, int('x')
            raise TemplateError(f"rendering the prompt failed: {type(exc).__name__}: {exc}", hop=self.hop,
                                field=self.field) from None

    def _render_bounded(self, values: Mapping[str, Any], seconds: float) -> str:
        previous = _budget.deadline, _budget.seconds, _budget.made, _budget.held
        _budget.deadline, _budget.seconds, _budget.made, _budget.held = time.monotonic() + seconds, seconds, 0, \
            _HeldSizes()
        try:
            return self._template.render(**values)  # joined by _bounded_concat as it streams
        finally:
            _budget.deadline, _budget.seconds, _budget.made, _budget.held = previous


def _join_plain(parts: tuple[tuple[str, bool], ...], values: Mapping[str, Any]) -> str:
    """A plain template's text: ``str`` of each value, as Jinja makes it, refused past MAX_PROMPT_CHARS as Jinja's
    render refuses it (a list's size before its text is made: an earlier hop's output may be any size)."""
    texts, size = [], 0
    for part, is_name in parts:
        if is_name:
            part = str(_finalize(values[part]))
        size += len(part)
        _check_chars(size)
        texts.append(part)
    return "".join(texts)


def _plain_parts(parsed: nodes.Template, variables: frozenset[str]) -> tuple[tuple[str, bool], ...] | None:
    """The template as (text, False) and (variable, True) parts, or None if it is more than text and ``{{ variable }}``.

    Only names the caller supplies count: Jinja resolves ``self``, ``range`` and its other
    globals itself, so a template that reads one of those renders through Jinja.
    """
    parts: list[tuple[str, bool]] = []
    for output in parsed.body:
        if not isinstance(output, nodes.Output):
            return None
        for node in output.nodes:
            if isinstance(node, nodes.TemplateData):
                parts.append((node.data, False))
            elif isinstance(node, nodes.Name) and node.ctx == "load" and node.name in variables:
                parts.append((node.name, True))
            else:
                return None
    return tuple(parts)
