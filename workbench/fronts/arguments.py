"""What the command line and the ``%autoglm`` magics parse alike: chain inputs as key=value, live settings as
CHAIN.FIELD=VALUE, and load options."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workbench.errors import ParseError
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
    return LoadSettings(source=source, **{option.name: getattr(args, option.name) for option in LOAD_OPTIONS})


def load_model(bench: Workbench, name: str, settings: LoadSettings, replicas: ReplicaOptions | None = None
               ) -> LoadedModel:
    """Load ``settings`` as ``name``, where a front end's SOURCE ``tiny`` means the offline tiny model, with
    ``replicas`` (``--replicas``, ``--balance``) where given."""
    options = {"replicas": replicas.replicas, "balance": replicas.balance} if replicas is not None else {}
    return bench.load(name, **(dataclasses.asdict(settings) | {"source": resolve_source(settings.source)}), **options)


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
