"""Parsing of ``%autoglm`` lines and cells into typed commands; no behaviour lives here."""

from __future__ import annotations

import argparse
import ast
import keyword
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from workbench.engine.balancing import BALANCE_FORMS, BalancePolicy, parse_balance
from workbench.engine.batching import POLICY_FORMS, BatchingPolicy, parse_policy
from workbench.engine.preloading import PRELOADING_FORMS, PreloadingStrategy, parse_preloading
from workbench.errors import ParseError, did_you_mean
from workbench.experiments.compare import CACHE_ARMS
from workbench.fronts.arguments import (
    LOAD_FLAGS,
    REPLICA_OPTIONS_USAGE,
    ExactOptionParser,
    ReplicaOptions,
    add_load_options,
    add_replica_options,
    load_options_usage,
    load_settings,
    parse_assignments,
    parse_key_values,
    replica_options,
)
from workbench.models.settings import LoadSettings

PROG = "%autoglm"


class MagicArgumentParser(ExactOptionParser):
    """An ArgumentParser that raises ParseError where argparse would print and exit the kernel."""

    def error(self, message: str) -> NoReturn:
        raise ParseError(f"{self.prog.split()[-1]}: {message}", hint=self.format_usage().strip())

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise ParseError((message or f"{self.prog} stopped").strip(), hint=self.format_usage().strip())


class _HelpRequested(Exception):
    """Raised by ``-h`` inside parsing, so that ``load -h`` means ``help load`` even without NAME SOURCE."""

    def __init__(self, topic: str) -> None:
        super().__init__(topic)
        self.topic = topic


class _HelpAction(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        raise _HelpRequested(parser.prog.split()[-1])


@dataclass(frozen=True)
class Command:
    """Base of the parsed subcommands: each names itself and says how it is used, with an example."""

    subcommand: ClassVar[str]
    usage: ClassVar[str]
    about: ClassVar[str]
    example: ClassVar[str]
    takes_cell: ClassVar[bool] = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Declare the subcommand's arguments (none by default)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, cell: str | None) -> Command:
        return cls(**vars(args))


@dataclass(frozen=True)
class HelpCommand(Command):
    subcommand = "help"
    usage = "help [SUBCOMMAND]"
    about = "this summary, or every option of one subcommand"
    example = "%autoglm help run"

    topic: str | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("topic", nargs="?", metavar="SUBCOMMAND")

    @classmethod
    def from_args(cls, args: argparse.Namespace, cell: str | None) -> Command:
        if args.topic is not None:
            _check_subcommand(args.topic)
        return cls(topic=args.topic)


@dataclass(frozen=True)
class LoadCommand(Command):
    subcommand = "load"
    usage = "load NAME SOURCE " + load_options_usage() + " " + REPLICA_OPTIONS_USAGE
    about = "load a model directory or hub id as NAME; SOURCE 'tiny' is the offline tiny model"
    example = "%autoglm load tiny tiny --device cpu"

    name: str
    settings: LoadSettings
    replicas: ReplicaOptions = field(default_factory=ReplicaOptions)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", metavar="NAME", help="the name chain specs use for this model")
        parser.add_argument("source", metavar="SOURCE", help="a local directory, a hub id, or 'tiny'")
        add_load_options(parser)
        add_replica_options(parser)

    @classmethod
    def from_args(cls, args: argparse.Namespace, cell: str | None) -> Command:
        return cls(name=args.name, settings=load_settings(args, args.source), replicas=replica_options(args))


@dataclass(frozen=True)
class ModelsCommand(Command):
    subcommand = "models"
    usage = "models [--ui]"
    about = "the table of known models: device, dtype, parameters, memory, load time, state"
    example = "%autoglm models --ui"

    ui: bool = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ui", action="store_true", help="the model manager widget: load, unload, memory bars")


@dataclass(frozen=True)
class UnloadCommand(Command):
    subcommand = "unload"
    usage = "unload NAME"
    about = "stop a model's worker and free its memory"
    example = "%autoglm unload tiny"

    name: str

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", metavar="NAME")


@dataclass(frozen=True)
class ChainCommand(Command):
    subcommand = "chain"
    usage = "chain NAME"
    about = "(cell magic) build a chain from the YAML spec in the cell and bind it to NAME in the notebook"
    example = "%%autoglm chain qa"
    takes_cell = True

    name: str
    spec: str

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", metavar="NAME")

    @classmethod
    def from_args(cls, args: argparse.Namespace, cell: str | None) -> Command:
        if cell is None:
            raise ParseError(
                "chain is a cell magic: its spec is the body of the cell",
                hint="start a cell with  %%autoglm chain " + args.name + "  and write the YAML spec below it",
            )
        # The chain becomes a notebook variable, so its name must be one.
        if not args.name.isidentifier():
            raise ParseError(
                f"chain name {args.name!r} is not a Python identifier",
                hint="use letters, digits and underscores, e.g. %%autoglm chain my_chain",
            )
        if keyword.iskeyword(args.name):
            raise ParseError(f"chain name {args.name!r} is a Python keyword, so no code could name the variable",
                             hint=f"e.g. %%autoglm chain {args.name}_chain")
        if not cell.strip():
            raise ParseError(
                "the cell holds no chain spec",
                hint="under %%autoglm chain NAME write  hops:  and a list of hops (model + prompt, or call)",
            )
        return cls(name=args.name, spec=cell)


@dataclass(frozen=True)
class RunCommand(Command):
    subcommand = "run"
    usage = "run CHAIN key=value ... [--session S] [--stream]"
    about = "run a chain; shows its output and span table, and binds the Run to _autoglm_run"
    example = '%autoglm run qa question="What is 2 + 2?"'

    chain: str
    inputs: dict[str, str] = field(default_factory=dict)
    session: str | None = None
    stream: bool = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("chain", metavar="CHAIN", help="a chain built on this workbench, or a Chain variable")
        # A default, or argparse counts a "*" positional as required and names it among the missing arguments.
        parser.add_argument("inputs", nargs="*", default=[], metavar="key=value",
                            help="chain inputs; quote values with spaces")
        parser.add_argument("--session", metavar="S", help="a session id: runs in one session share history")
        parser.add_argument("--stream", action="store_true", help="print each hop's tokens as they arrive")

    @classmethod
    def from_args(cls, args: argparse.Namespace, cell: str | None) -> Command:
        return cls(chain=args.chain, inputs=parse_key_values(args.inputs), session=args.session, stream=args.stream)


@dataclass(frozen=True)
class TraceCommand(Command):
    subcommand = "trace"
    usage = "trace [last|RUN_ID] [--summary] [--waterfall] [--all] [--ui]"
    about = "a run's span table (the last run by default), its per-hop summary or its waterfall"
    example = "%autoglm trace --summary"

    run: str = "last"
    summary: bool = False
    waterfall: bool = False
    all: bool = False
    ui: bool = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run", nargs="?", metavar="last|RUN_ID", help="a run id (a unique prefix will do)")
        parser.add_argument("--summary", action="store_true", help="per-hop latency summary")
        parser.add_argument("--waterfall", action="store_true", help="draw the spans as a waterfall")
        parser.add_argument("--all", action="store_true", help="every span the workbench recorded, not one run's")
        parser.add_argument("--ui", action="store_true", help="the interactive waterfall and span table widget")

    @classmethod
    def from_args(cls, args: argparse.Namespace, cell: str | None) -> Command:
        if args.all and args.run is not None:
            raise ParseError(
                f"trace: give a run id or --all, not both (got {args.run!r} and --all)",
                hint=f"usage: {PROG} {cls.usage}",
            )
        return cls(run=args.run or "last", summary=args.summary, waterfall=args.waterfall, all=args.all, ui=args.ui)


def _strategy_list(text: str, option: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if not all(names):
        raise ParseError(
            f"compare: {option} {text!r} has an empty item", hint=f"separate names by single commas: {option} a,b"
        )
    return names


@dataclass(frozen=True)
class CompareCommand(Command):
    subcommand = "compare"
    usage = (
        "compare CHAIN --inputs FILE.jsonl [--batching P,...] [--preload S,...] [--concurrency N] [--rate R]"
        " [--repeats N] [--warmup N] [--seed N] [--save PATH] [--ui] [--cache A,...]"
    )
    about = "compare batching and preloading strategies on a chain; binds the Comparison to _autoglm_compare"
    example = "%autoglm compare qa --inputs q.jsonl --batching none,static:8,dynamic:16:5ms --preload lazy,eager"

    chain: str
    inputs: str
    batching: tuple[BatchingPolicy, ...] | None = None
    preload: tuple[PreloadingStrategy, ...] | None = None
    concurrency: int = 8
    rate: float | None = None
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    save: str | None = None
    ui: bool = False
    cache: tuple[str, ...] | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("chain", metavar="CHAIN", help="a chain built on this workbench, or a Chain variable")
        parser.add_argument("--inputs", required=True, metavar="FILE.jsonl", help="one JSON object of inputs per line")
        parser.add_argument("--batching", metavar="P,...", help=f"policies to compare: {POLICY_FORMS}")
        parser.add_argument("--preload", metavar="S,...", help=f"preloading strategies to compare: {PRELOADING_FORMS}")
        parser.add_argument("--cache", metavar="A,...", help=f"cache arms to compare: {', '.join(CACHE_ARMS)}")
        parser.add_argument("--concurrency", type=int, default=8, metavar="N", help="runs in flight (closed loop)")
        parser.add_argument("--rate", type=float, metavar="R", help="open loop instead: Poisson arrivals, runs/s")
        parser.add_argument("--repeats", type=int, default=3, metavar="N", help="passes per strategy, interleaved")
        parser.add_argument("--warmup", type=int, default=1, metavar="N", help="unmeasured runs before each pass")
        parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the Poisson arrivals")
        parser.add_argument("--save", metavar="PATH", help="write the table to a .csv or .parquet file")
        parser.add_argument("--ui", action="store_true", help="run in the dashboard widget; the kernel stays free")

    @classmethod
    def from_args(cls, args: argparse.Namespace, cell: str | None) -> Command:
        for option in ("concurrency", "repeats"):
            value = getattr(args, option)
            if value < 1:
                raise ParseError(f"compare: --{option} must be at least 1, not {value}", hint=cls.example)
        if args.warmup < 0:
            raise ParseError(
                f"compare: --warmup must be 0 or more, not {args.warmup}", hint="--warmup 0 measures every run"
            )
        if args.rate is not None and not args.rate > 0:
            raise ParseError(f"compare: --rate must be above 0 runs/s, not {args.rate:g}", hint="e.g. --rate 20")
        # As Comparison.save reads it: '.csv' alone is a file named so, with no suffix (it was refused after the run).
        if args.save is not None and Path(args.save).suffix.lower() not in (".csv", ".parquet"):
            raise ParseError(
                f"compare: --save {args.save!r}: the file must end in .csv or .parquet", hint="e.g. --save out.csv"
            )
        batching = args.batching and tuple(parse_policy(n) for n in _strategy_list(args.batching, "--batching"))
        preload = args.preload and tuple(parse_preloading(n) for n in _strategy_list(args.preload, "--preload"))
        cache = args.cache and _strategy_list(args.cache, "--cache")
        for arm in cache or ():
            if arm not in CACHE_ARMS:
                raise ParseError(f"compare: --cache {arm!r} is not a cache arm", hint=f"arms: {', '.join(CACHE_ARMS)}")
        if cache and args.ui:
            raise ParseError("compare: --cache is not in the dashboard yet", hint="drop --ui to compare cache arms")
        return cls(
            chain=args.chain,
            inputs=args.inputs,
            batching=batching or None,
            preload=preload or None,
            concurrency=args.concurrency,
            rate=args.rate,
            repeats=args.repeats,
            warmup=args.warmup,
            seed=args.seed,
            save=args.save,
            ui=args.ui,
            cache=cache or None,
        )


@dataclass(frozen=True)
class BuilderCommand(Command):
    subcommand = "builder"
    usage = "builder [CHAIN]"
    about = "the chain builder widget: edit hops, see the hop graph, run, read output and spans in place"
    example = "%autoglm builder qa"

    chain: str | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("chain", nargs="?", metavar="CHAIN", help="start from this chain (else from one blank hop)")


@dataclass(frozen=True)
class BalanceCommand(Command):
    subcommand = "balance"
    usage = "balance NAME POLICY"
    about = "change how a loaded model's replicas are picked, live: " + BALANCE_FORMS
    example = "%autoglm balance m least_loaded"

    name: str
    policy: BalancePolicy

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("name", metavar="NAME", help="a model loaded with replicas")
        parser.add_argument("policy", metavar="POLICY", help=BALANCE_FORMS)

    @classmethod
    def from_args(cls, args: argparse.Namespace, cell: str | None) -> Command:
        return cls(name=args.name, policy=parse_balance(args.policy))


@dataclass(frozen=True)
class SetCommand(Command):
    subcommand = "set"
    usage = "set CHAIN.HOP.FIELD=VALUE ..."
    about = "change a chain's values live, for runs that start from now on; validated like its spec, a new version"
    example = "%autoglm set qa.answer.temperature=0.7"

    assignments: tuple[tuple[str, str, Any], ...]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("assignments", nargs="+", metavar="CHAIN.HOP.FIELD=VALUE",
                            help="a field of a hop (or of the chain: CHAIN.history=3) and its new value")

    @classmethod
    def from_args(cls, args: argparse.Namespace, cell: str | None) -> Command:
        return cls(assignments=tuple(parse_assignments(args.assignments)))


# The dispatch order of `help`; a later subcommand is one more Command subclass here.
COMMANDS: dict[str, type[Command]] = {
    c.subcommand: c
    for c in (
        HelpCommand, LoadCommand, ModelsCommand, UnloadCommand, ChainCommand, RunCommand, TraceCommand, CompareCommand,
        BuilderCommand, BalanceCommand, SetCommand,
    )
}


@dataclass(frozen=True)
class ServeCommand(Command):
    subcommand = "serve"
    usage = "serve CHAIN ... [--port P] [--grpc-port G] [--host H] [--no-auth] | serve stop"
    about = ("serve chains over HTTP (REST, JSON-RPC, OpenAI-compatible) and optionally gRPC from the kernel; binds the "
             "Server to _autoglm_server. serve stop, alone, stops every server serve started")
    example = "%autoglm serve qa --port 8000"

    chains: tuple[str, ...] = ()
    stop: bool = False
    port: int = 8000
    host: str = "127.0.0.1"
    no_auth: bool = False
    grpc_port: int | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("chains", nargs="+", metavar="CHAIN",
                            help="chains to serve; or stop, alone, to stop every server serve started")
        # No defaults here (see from_args): serve stop refuses an option it was given, and needs to see it.
        parser.add_argument("--port", type=int, help=f"the port (default {cls.port}; 0: any free one)")
        parser.add_argument("--grpc-port", type=int,
                            help="also serve them over gRPC (ChainService) on this port (0: any free one)")
        parser.add_argument("--host", help=f"the address to listen on (default {cls.host})")
        parser.add_argument("--no-auth", action="store_true",
                            help="take calls without credentials (every caller is an admin); loopback only")

    @classmethod
    def from_args(cls, args: argparse.Namespace, cell: str | None) -> Command:
        if args.chains[0] == "stop":  # the action: a chain named stop cannot be served as the first name
            options = {"--port": args.port, "--grpc-port": args.grpc_port, "--host": args.host}
            extra = [*args.chains[1:], *(f"{flag} {value}" for flag, value in options.items() if value is not None),
                     *(["--no-auth"] if args.no_auth else [])]
            if extra:
                raise ParseError(f"serve stop stops every server {PROG} serve started, and takes nothing after it: "
                                 f"got {' '.join(extra)!r:.200}",
                                 hint=f"{PROG} serve stop, alone; to serve chains: {PROG} serve CHAIN ...")
            return cls(stop=True)
        for flag, port in (("--port", args.port), ("--grpc-port", args.grpc_port)):
            if port is not None and not 0 <= port <= 65535:  # as the flag was typed; serving says "grpc port"
                raise ParseError(f"serve: {flag} {port} is not a TCP port (0 to 65535)",
                                 hint="a port from 1 to 65535, or 0 for any free one")
        return cls(chains=tuple(args.chains), port=cls.port if args.port is None else args.port,
                   host=cls.host if args.host is None else args.host, no_auth=args.no_auth, grpc_port=args.grpc_port)


COMMANDS[ServeCommand.subcommand] = ServeCommand


def magic_name(command: type[Command]) -> str:
    """``%%autoglm`` for a subcommand whose input is the cell, ``%autoglm`` for the others."""
    return "%" + PROG if command.takes_cell else PROG


def _build_parsers() -> dict[str, MagicArgumentParser]:
    # Each line is parsed by its subcommand's parser directly, after _check_subcommand has had the
    # first word: that gives a did-you-mean, and lets parse_intermixed_args (no subparser support) run.
    root = MagicArgumentParser(prog=PROG, add_help=False)
    sub = root.add_subparsers(dest="subcommand", parser_class=MagicArgumentParser)
    parsers: dict[str, MagicArgumentParser] = {}
    for name, command in COMMANDS.items():
        prog = f"{magic_name(command)} {name}"
        # argparse %-formats usage strings, and every magic name starts with a percent sign.
        usage = f"{magic_name(command)} {command.usage}".replace("%", "%%")
        parser = sub.add_parser(name, prog=prog, usage=usage, description=command.about, add_help=False)
        parser.add_argument("-h", "--help", action=_HelpAction, help="show this subcommand's options")
        command.add_arguments(parser)
        parsers[name] = parser
    return parsers


PARSERS = _build_parsers()


def _check_subcommand(word: str) -> None:
    if word in COMMANDS:
        return
    raise ParseError(
        f"unknown subcommand {word!r}{did_you_mean(word, COMMANDS)}",
        hint=f"the subcommands are {', '.join(COMMANDS)}; %autoglm help shows an example of each",
    )


def split_line(line: str) -> list[str]:
    """A magic's line as a shell splits it: quotes group words, and a word starting with ``#`` starts a comment."""
    # shlex, not str.split: a quoted value such as question="What is 2 + 2?" is one word. shlex's own
    # comments would also cut `C#` short; a shell, and this, only take a `#` that starts a word.
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    words: list[str] = []
    try:
        while True:
            start = lexer.instream.tell()
            word = lexer.get_token()
            if word is None or line[start:].lstrip().startswith("#"):
                return words
            words.append(word)
    except ValueError as exc:
        raise ParseError(f"cannot split the line: {exc}", hint="close every quote you open") from exc


def parse_command(line: str, cell: str | None = None) -> Command:
    """Parse a magic's line (and, for ``%%autoglm``, its cell body) into a Command, or raise ParseError."""
    words = split_line(line)
    if not words:
        if cell is not None:
            raise ParseError("%%autoglm needs a subcommand", hint="e.g. %%autoglm chain qa")
        return HelpCommand()
    name, rest = words[0], words[1:]
    if name in ("-h", "--help"):  # what a shell command takes; the help text says SUBCOMMAND -h, so people try it
        name = HelpCommand.subcommand
    _check_subcommand(name)
    command = COMMANDS[name]
    try:
        # intermixed: `run qa --session s1 question=x` must work as well as flags at the end.
        args = PARSERS[name].parse_intermixed_args(rest)
    except _HelpRequested as requested:
        return HelpCommand(topic=requested.topic)
    # A blank body is harmless (a cell holding only `%%autoglm models`); anything else would be lost.
    if cell is not None and cell.strip() and not command.takes_cell:
        raise ParseError(
            f"{name} takes no cell body",
            hint=f"use the line magic: {PROG} {command.usage}",
        )
    return command.from_args(args, cell)


def help_text(topic: str | None = None) -> str:
    """The usage summary of every subcommand with an example each, or one subcommand's full options."""
    if topic is not None:
        command = COMMANDS[topic]
        return f"{PARSERS[topic].format_help().rstrip()}\n\nexample:\n  {command.example}\n"
    lines = [
        "%autoglm: load models, build and run chains, read their traces.",
        "The magics and Python share one workbench: workbench.current().",
        "",
    ]
    for command in COMMANDS.values():
        lines += [f"  {magic_name(command)} {command.usage}", f"      {command.about}", f"      e.g. {command.example}"]
    lines += [
        "",
        "%%autoglm chain NAME binds the Chain to NAME; %autoglm run binds the Run (even a failed",
        "one, with the outputs that finished) to _autoglm_run. Values are taken literally: no",
        "$var or {var} expansion, so prompts may hold braces and dollars. Quote values that hold",
        "spaces, ? or # (a line ending in ? asks IPython for help instead); a # that starts a word",
        "starts a comment. Mistakes print a short 'autoglm:' message. %autoglm SUBCOMMAND -h lists",
        "every option. A widget opened with --ui (or by builder) is bound to _autoglm_widget; it",
        "works off the kernel's thread.",
    ]
    return "\n".join(lines) + "\n"


# -- hints in the magics' words -----------------------------------------------------------------

# A hint names the Python call that fixes its error (``bench.load('m', ...) again``); in a notebook driven by magics
# the workbench is wb.current(), and some of those calls are subcommands.
_BENCH_CALL = re.compile(r"(?<![\w.])bench\.(\w+)(\()?")


def in_magic_words(hint: str) -> str:
    """``hint`` as a magics user acts on it: a ``bench.`` call that a subcommand makes (``load``, ``unload``,
    ``set_balance``) written as that subcommand, any other as a call on ``wb.current()``."""
    out, at = [], 0
    for match in _BENCH_CALL.finditer(hint):
        if match.start() < at:
            continue  # inside a call already written (a name that reads "bench.load", say)
        out.append(hint[at:match.start()])
        method, called = match.group(1), match.group(2) is not None
        end = _closing(hint, match.end()) if called else match.end()
        magic = _as_subcommand(method, hint[match.end():end - 1] if called and end > 0 else None)
        if magic is None or end < 0:
            at = end if end > 0 else match.end()  # a call's arguments as written, quoted names and all
            out.append("wb.current()." + hint[match.start() + len("bench."):at])
        else:
            out.append(magic)
            at = end
    out.append(hint[at:])
    # A hint that offered both ways ("bench.load(NAME, PATH) or %autoglm load NAME PATH") says the one way once.
    return _TWICE.sub(r"\1", "".join(out))


_TWICE = re.compile(r"(%autoglm [^;,()]+?) or \1(?=$|[;,.)])")

# A hint's call closes within this many characters, or it is left as a Python call: each call is looked at once, so
# a hint that quotes a user's long text costs no more than this a call.
_CALL_CHARS = 400


def _closing(text: str, start: int) -> int:
    """The index just past the ``)`` that closes the call whose arguments start at ``start`` (brackets inside its
    quoted text aside), or -1."""
    depth, quote, escaped = 1, "", False
    for index in range(start, min(len(text), start + _CALL_CHARS)):
        char = text[index]
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        else:
            depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(char, 0)
            if depth == 0:
                return index + 1
    return -1


def _as_subcommand(method: str, arguments: str | None) -> str | None:
    """The subcommand that does ``bench.METHOD(ARGUMENTS)`` (None: not called), or None where there is none."""
    if method not in ("load", "unload", "set_balance"):
        return None
    if arguments is None:  # named, not called: "bench.unload then bench.load"
        return f"{PROG} {'balance' if method == 'set_balance' else method}"
    try:  # parsed, never run
        call = ast.parse(f"f({arguments})", mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(call, ast.Call):
        return None
    words = [_word(arg) for arg in call.args]
    if None in words:
        return None
    if method == "load":  # bench.load(...), bench.load('m', ...), bench.load(NAME, PATH, adapters={NAME: DIR})
        given = [w for w in words if w != "..."]
        if len(given) > 2:
            return None
        words = given + ["NAME", "SOURCE"][len(given):]
        for keyword_ in call.keywords:
            flag = LOAD_FLAGS.get(keyword_.arg or "")
            value = _word(keyword_.value)
            if value is None and isinstance(keyword_.value, ast.List):  # replicas=["cpu", URL]: --replicas cpu,URL
                items = [_word(item) for item in keyword_.value.elts]
                value = ",".join(item for item in items if item is not None) if items and None not in items else None
            if flag is None or value is None:
                return None
            words += [flag.flag, value]
        return " ".join([PROG, "load", *words])
    if call.keywords or len(words) != (1 if method == "unload" else 2):
        return None
    return " ".join([PROG, "unload" if method == "unload" else "balance", *words])


def _word(node: ast.expr) -> str | None:
    """An argument as a magic line writes it: text as it is, a placeholder (NAME) by its name, ``...``, a dict of
    placeholders as NAME=VALUE; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value \
            and not any(c.isspace() or c in "#'\"" for c in node.value):  # a word a magic line reads as written
        return node.value
    if isinstance(node, ast.Constant) and node.value is Ellipsis:
        return "..."
    if isinstance(node, ast.Name) and node.id.isupper():
        return node.id
    if isinstance(node, ast.Dict) and node.keys:
        pairs = [(_word(k) if k is not None else None, _word(v)) for k, v in zip(node.keys, node.values)]
        if all(k is not None and v is not None for k, v in pairs):
            return ",".join(f"{k}={v}" for k, v in pairs)
    return None
