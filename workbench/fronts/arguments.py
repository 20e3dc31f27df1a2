"""What the command line and the ``%autoglm`` magics parse alike: chain inputs as key=value, live settings as
CHAIN.FIELD=VALUE, and load options; and the errors of what they call, said in the flags their user typed."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from workbench.errors import ParseError, WorkbenchError
from workbench.models.settings import LoadSettings, number_setting
from workbench.models.tiny import resolve_source

if TYPE_CHECKING:
    from workbench.bench import Workbench
    from workbench.engine.balancing import BalancePolicy
    from workbench.models.registry import LoadedModel

# Every LoadSettings field but the source, which each front end takes its own way (SOURCE, --model NAME=PATH).
LOAD_OPTIONS = tuple(f for f in dataclasses.fields(LoadSettings) if f.name != "source")
LOAD_HELP = {option.name: option.metadata["help"] for option in LOAD_OPTIONS}
# The most of what a user typed that an error quotes back: a pasted document as one word would fill the screen twice.
SHOWN_CHARS = 200


class ExactOptionParser(argparse.ArgumentParser):
    """An ArgumentParser, with its subcommands' parsers, that takes no prefix of an option for the option.

    argparse's default reads ``--devic cpu`` as ``--device cpu``: a guess made for the user, which turns a typo into
    a setting. Here it is an unrecognized argument, said with the option it most likely meant.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)


def parse_key_values(words: Sequence[str]) -> dict[str, str]:
    """Chain inputs from ``key=value`` words, split and unquoted by shlex or by the shell; values stay strings."""
    inputs: dict[str, str] = {}
    for index, word in enumerate(words):
        key, sep, value = word.partition("=")
        if not sep and inputs:  # most likely the rest of the value before it: question=What is 2 + 2?
            last, following = list(inputs)[-1], list(words[index:])
            end = next((i for i, w in enumerate(following) if "=" in w), len(following))
            quoted = shlex.quote(" ".join([inputs[last], *following[:end]]))
            raise ParseError(f"input {word!r:.80} is not key=value: the value of {last!r:.80} seems to hold spaces",
                             hint=f"quote it: {last}={quoted}" if len(last) + len(quoted) <= SHOWN_CHARS else
                             f"quote the value of {last!r:.80}: {last[:80]}='...'")
        if not sep:
            example = word if word.isidentifier() and len(word) <= 80 else "question"
            raise ParseError(
                f"input {word!r:.80} is not key=value",
                hint=f'quote values that hold spaces, e.g. {example}="What is 2 + 2?"',
            )
        if not key.isidentifier():
            raise ParseError(f"input name {key!r:.80} is not an identifier", hint='e.g. question="What is 2 + 2?"')
        if key == "session":
            raise ParseError("'session' is not an input: it names the session", hint="use --session S")
        if key in inputs:
            raise ParseError(f"input {key!r:.80} is given twice", hint="give each input once")
        inputs[key] = value
    return inputs


def _flag(option: dataclasses.Field[Any]) -> str:
    return "--" + option.name.replace("_", "-")


def add_load_options(parser: argparse.ArgumentParser, title: str = "load options") -> None:
    """One flag per load setting (``--device D``, ``--allow-pickle``, ...), with its help, from LoadSettings."""
    group = parser.add_argument_group(title)
    for option in LOAD_OPTIONS:
        if isinstance(option.default, bool):
            group.add_argument(_flag(option), action="store_true", help=LOAD_HELP[option.name])
        else:
            # A number's flag parses as one (--restarts N, --read-timeout-s S), so a typo is argparse's clear
            # error, not a load's; the other settings are text.
            number = number_setting(option)
            group.add_argument(_flag(option), default=option.default, type=number and number[0],
                               metavar=option.metadata["metavar"],
                               help=LOAD_HELP[option.name])


def load_options_usage() -> str:
    """The load flags as a usage line writes them: ``[--device D] [--dtype T] ... [--allow-pickle]``."""
    metavars = (option.metadata["metavar"] for option in LOAD_OPTIONS)
    return " ".join(f"[{_flag(o)} {m}]" if m else f"[{_flag(o)}]" for o, m in zip(LOAD_OPTIONS, metavars))


def load_settings(args: argparse.Namespace, source: str) -> LoadSettings:
    """The LoadSettings of ``source`` with the load flags parsed into ``args``."""
    if isinstance(args.adapters, str):
        _check_adapters(args.adapters)
    return LoadSettings(source=source, **{option.name: getattr(args, option.name) for option in LOAD_OPTIONS})


def _check_adapters(text: str) -> None:
    """``--adapters``: NAME=PATH items, comma-separated (the load reads them, and checks the names and paths)."""
    for item in text.split(","):
        if item.strip() and "=" not in item:
            raise ParseError(f"--adapters {text!r:.200}: {item.strip()!r:.80} is not NAME=PATH",
                             hint="e.g. --adapters sql=/adapters/sql,chat=/adapters/chat")


def load_model(bench: Workbench, name: str, settings: LoadSettings, replicas: ReplicaOptions | None = None
               ) -> LoadedModel:
    """Load ``settings`` as ``name``, where a front end's SOURCE ``tiny`` means the offline tiny model, with
    ``replicas`` (``--replicas``, ``--balance``) where given; its errors say the flags (``--num-gpus``), not the
    keywords (``num_gpus=``) a Python caller is told."""
    options = {"replicas": replicas.replicas, "balance": replicas.balance} if replicas is not None else {}
    policy = options.get("balance")
    # A policy the load refuses is named as it is written: "--balance weighted:3,1", not "Weighted({0: 3.0, ...})".
    said = {repr(policy): f"--balance {policy.name}"} if policy is not None else {}
    with flag_words(LOAD_FLAGS, said):
        return bench.load(name, **(dataclasses.asdict(settings) | {"source": resolve_source(settings.source)}),
                          **options)


@dataclasses.dataclass(frozen=True)
class ReplicaOptions:
    """``--replicas`` and ``--balance`` as bench.load takes them: None where the flag was not given."""

    replicas: int | list[str] | None = None
    balance: BalancePolicy | None = None


REPLICAS_HELP = ("how many workers serve the model (N), or where each one runs (cpu,cuda:1,http://host:8000/v1); "
                 "default one")
# workbench.engine.balancing.BALANCE_FORMS, written out: importing the engine would import torch, and
# `autoglm --help` must answer at once (tests/test_cli.py checks the two agree).
BALANCE_HELP = ("which replica takes each request: round_robin (the default), least_loaded, power_of_two, "
                "session_hash, weighted:W0,W1,... (one weight per replica)")


def add_replica_options(parser: argparse.ArgumentParser, title: str = "replicas") -> None:
    """``--replicas N|PLACE,PLACE`` and ``--balance POLICY``, the two load options bench.load takes beside LoadSettings."""
    group = parser.add_argument_group(title)
    group.add_argument("--replicas", metavar="N|PLACE,...", help=REPLICAS_HELP)
    group.add_argument("--balance", metavar="POLICY", help=BALANCE_HELP)


REPLICA_OPTIONS_USAGE = "[--replicas N|PLACE,...] [--balance POLICY]"


# -- errors in the flags' words -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a front end's user types a setting that a Python caller passes as a keyword: ``--max-queued N``."""

    flag: str
    metavar: str = "VALUE"  # what a hint shows for a value it leaves open (adapters={...}: --adapters NAME=PATH,...)


# Every setting a load takes, as both front ends' load flags spell it.
LOAD_FLAGS: dict[str, Flag] = {
    **{option.name: Flag(_flag(option), option.metadata["metavar"] or "VALUE") for option in LOAD_OPTIONS},
    "replicas": Flag("--replicas", "N|PLACE,..."),
    "balance": Flag("--balance", "POLICY"),
}
SESSION_FLAGS = {"session": Flag("--session", "S")}


@contextmanager
def flag_words(flags: Mapping[str, Flag], said: Mapping[str, str] | None = None) -> Iterator[None]:
    """A WorkbenchError raised inside, its message and hint put in the words of a user who typed ``flags``
    (see :func:`in_flag_words`), and each text of ``said`` replaced by how the user wrote it."""
    try:
        yield
    except WorkbenchError as error:
        message, hint = error.message, error.hint
        for python, typed in (said or {}).items():
            message, hint = message.replace(python, typed), hint and hint.replace(python, typed)
        error.args = (in_flag_words(message, flags), *error.args[1:])
        if hint:
            error.hint = in_flag_words(hint, flags)
        raise


def in_flag_words(text: str, flags: Mapping[str, Flag]) -> str:
    """``text``, an error's message or hint as written for a Python caller, as read by one who typed ``flags``:
    a setting's keyword (``max_queued=1024``) as its flag (``--max-queued 1024``), ``adapters={'sql': '/a'}`` as
    ``--adapters sql=/a``, ``replicas=['cpu', URL]`` as ``--replicas cpu,URL``, ``allow_pickle=True`` as
    ``--allow-pickle``, ``session=None`` as ``leaving out --session``; a setting named alone as its subject
    (``hang_timeout_s must be``, ``restarts must be``) as its flag. A Python call written out (``bench.load(...)``),
    and quoted text, stay as they are: the magics put the one in their own words, and the other is the user's."""
    if not flags:
        return text
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))
    pattern = re.compile(
        r"(?P<call>[A-Za-z_][\w.]*\((?:[^()'\"]|'[^']*'|\"[^\"]*\")*\))"
        r"|(?P<quoted>(?<!\w)'[^']*'(?!\w)|(?<!\w)\"[^\"]*\"(?!\w))"
        # keyword=VALUE, VALUE a dict, a list, quoted text or a word; never a call (session=str(user_id))
        rf"|(?<![\w.\-/])(?P<keyword>{names})=(?![\w.]+\()"
        r"(?P<value>\{[^{}]*\}|\[[^\[\]]*\]|'[^']*'|\"[^\"]*\"|[^\s,;)\]}]+)?"
        rf"|(?<![\w.\-/])(?P<name>{names})(?![\w=])"
        rf"(?P<subject>(?= must\b| lists\b| is a setting\b|, (?:{names})\b))?(?P<heading>(?=: ))?"
    )

    def reword(match: re.Match[str]) -> str:
        if match["keyword"] is not None:
            return _as_flag(flags[match["keyword"]], match["value"])
        name = match["name"]
        # A name with "_" is a keyword in any prose; a plain word (restarts) only as a sentence's subject, or as
        # the heading of the message ("adapters: ...").
        if name is not None and ("_" in name or match["subject"] is not None
                                 or (match["heading"] is not None and match.start() == 0)):
            return flags[name].flag
        return match[0]

    said = pattern.sub(reword, text)
    # "add --engine ray (--engine ray)", "pass --served-model M (--served-model)": the flag once.
    return re.sub(r"(--[\w-]+)((?: [^\s,;()]+)?) \(\1(?: [^\s,;()]+)?\)", r"\1\2", said)


def _as_flag(flag: Flag, value: str | None) -> str:
    """A keyword's value as its flag takes it: ``True`` is a switch's flag alone (``--allow-pickle``)."""
    if value is None or value == "True":
        return flag.flag
    if value == "None":
        return f"leaving out {flag.flag}"
    if value == "False":
        return f"without {flag.flag}"
    if value[0] in "{[":
        inner = value[1:-1].strip()
        if inner in ("", "..."):
            return f"{flag.flag} {flag.metavar}"
        items = [item.strip() for item in inner.split(",")]
        if value[0] == "{":
            items = ["=".join(_unquoted(part) for part in item.split(":", 1)) for item in items]
        return f"{flag.flag} {','.join(_unquoted(item) for item in items)}"
    if value == "...":
        return f"{flag.flag} {flag.metavar}"
    word = _unquoted(value)
    return f"{flag.flag} {shlex.quote(word) if word else repr(word)}"


def _unquoted(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


# A Python call of bench.load in a hint: the command line loads a model with --model NAME=SOURCE and the load flags.
_LOAD_CALL = re.compile(r"(?<![\w.])bench\.load\((?P<arguments>(?:[^()'\"]|'[^']*'|\"[^\"]*\")*)\)")


def in_command_line_words(hint: str) -> str:
    """``hint`` as the command line's user acts on it: a ``bench.load(...)`` call it names written as the flags that
    load the model (``bench.load(NAME, URL, served_model='m')`` is ``--model NAME=URL --served-model m``)."""
    return _LOAD_CALL.sub(lambda match: _load_flags(match["arguments"]) or match[0], hint)


def _load_flags(arguments: str) -> str | None:
    """A call's arguments as ``--model NAME=SOURCE`` and load flags; None where they are not that plain."""
    import ast

    try:  # parsed, never run
        call = ast.parse(f"f({arguments})", mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(call, ast.Call) or len(call.args) > 2:
        return None
    words = []
    for node in call.args:
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip():
            words.append(node.value)
        elif isinstance(node, ast.Name) and node.id.isupper():
            words.append(node.id)
        elif not (isinstance(node, ast.Constant) and node.value is Ellipsis):
            return None
    name, source = [*words, *["NAME", "PATH"][len(words):]]
    said = [f"--model {shlex.quote(f'{name}={source}')}"]
    for keyword in call.keywords:
        flag = LOAD_FLAGS.get(keyword.arg or "")
        value = ast.get_source_segment(f"f({arguments})", keyword.value)
        if flag is None or value is None:
            return None
        said.append(_as_flag(flag, value))
    return " ".join(said)


def parse_replicas(text: str) -> int | list[str]:
    """``--replicas``: a whole number of workers on the model's device, or a comma-separated list of places."""
    text = text.strip()
    if _INTEGER.fullmatch(text):
        if int(text) < 1:
            raise ParseError(f"--replicas {text}: a model needs at least one replica", hint="e.g. --replicas 2")
        return int(text)
    if _DECIMAL.fullmatch(text):  # not a device either
        raise ParseError(f"--replicas {text}: a number of replicas is a whole number", hint="e.g. --replicas 2")
    places = [place.strip() for place in text.split(",")]
    if not all(places):
        raise ParseError(f"--replicas {text!r} has an empty place",
                         hint="give a number (--replicas 2) or places separated by single commas (--replicas cpu,cpu)")
    return places


def replica_options(args: argparse.Namespace) -> ReplicaOptions:
    """The replica options parsed into ``args`` by :func:`add_replica_options`; a bad policy name fails here."""
    from workbench.engine.balancing import parse_balance

    return ReplicaOptions(
        replicas=parse_replicas(args.replicas) if args.replicas is not None else None,
        balance=parse_balance(args.balance) if args.balance is not None else None,
    )


def parse_assignments(words: Sequence[str]) -> list[tuple[str, str, Any]]:
    """Live settings from ``CHAIN.HOP.FIELD=VALUE`` words: (chain, ``HOP.FIELD``, value) each.

    A value is a number (``0.7``, ``3``), ``true``/``false``, ``null``, a list or mapping in YAML's flow form
    (``[a, b]``, ``{attempts: 3}``); anything else, a template (``{{ ... }}``) too, is text as typed.
    """
    assignments: list[tuple[str, str, Any]] = []
    for word in words:
        key, sep, text = word.partition("=")
        chain, dot, path = key.partition(".")
        if not sep or not dot or not chain.isidentifier() or not path:
            raise ParseError(f"{word!r} is not CHAIN.FIELD=VALUE",
                             hint="e.g. qa.answer.temperature=0.7; quote a value that holds spaces")
        if any(existing[:2] == (chain, path) for existing in assignments):
            raise ParseError(f"{key!r} is given twice", hint="give each field once")
        assignments.append((chain, path, setting_value(text)))
    return assignments


def setting_value(text: str) -> Any:
    """A value typed on a line, as a spec would hold it: a number, ``true``/``false``, ``null``, a flow list or
    mapping; else the text as typed.

    Only those forms are read as YAML: YAML's reading of other text loses what was typed (``Ticket #42`` is
    ``Ticket`` and a comment, ``yes`` and ``off`` are booleans, ``---`` and ``|`` are nothing), and a quoted value
    reaches here with its quotes gone, so nothing says it was meant as text.
    """
    import yaml

    if not text.strip():
        raise ParseError("the value is empty", hint='quote text, e.g. qa.answer.prompt="Q: {{ question }}"')
    word = text.strip()
    if word.lower() in _WORDS:
        return _WORDS[word.lower()]
    if _INTEGER.fullmatch(word):
        return int(word)
    if _DECIMAL.fullmatch(word):
        return float(word)
    if word.startswith(("[", "{")) and "{{" not in text and "{%" not in text:  # a template's braces are text
        try:
            value = yaml.safe_load(word)
        except yaml.YAMLError:
            return text
        return value if isinstance(value, (list, dict)) else text
    return text


_WORDS: dict[str, Any] = {"true": True, "false": False, "null": None, "~": None}
_INTEGER = re.compile(r"[-+]?\d+")
_DECIMAL = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?")
