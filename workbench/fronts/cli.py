"""The autoglm command line: the demo, and running a chain spec file; each prints the run's span table."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

# Only light modules here: `autoglm --help` must answer at once, so torch and transformers load
# inside the commands that need them.
from workbench._version import __version__
from workbench.chains.host import HOP_THREADS
from workbench.demo import DEMO_QUESTION
from workbench.errors import HopFailed, MissingInputError, SpecError, WorkbenchError, clipped, did_you_mean
from workbench.fronts.arguments import (
    LOAD_FLAGS,
    LOAD_HELP,
    SESSION_FLAGS,
    ExactOptionParser,
    Flag,
    ParseError,
    add_load_options,
    add_replica_options,
    flag_words,
    in_command_line_words,
    load_model,
    load_settings,
    parse_key_values,
    replica_options,
)
from workbench.models.tiny import TINY_SOURCE

if TYPE_CHECKING:
    from workbench.chains.chain import Chain
    from workbench.chains.run import Run

EXAMPLES = f"""\
examples:
  autoglm demo
  autoglm run chain.yaml question="What is 2 + 2?" --model tiny={TINY_SOURCE}
  autoglm run chain.yaml question=hi --model tiny=/models/tiny --device cpu --json
"""
HOP_EXIT_WAIT_S = 2.0  # at the command's exit, how long its idle hop threads get to see their pool closed
MODEL_HINT = f"give each model the spec names as --model NAME=PATH (PATH '{TINY_SOURCE}' is the offline tiny model)"
DESCRIPTION = """\
Run the demo chain, or a chain spec file, on local models, and print the run's
outputs, its span table (queue wait, TTFT, decode time, tokens) and a per-hop summary.
"""


def _print_run(run: Run) -> None:
    import pandas as pd

    table = run.trace.compact()
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        print(f"\nrun {run.id} of chain {run.chain!r} in {run.duration_ms:.1f} ms")
        for hop, value in run.outputs.items():
            print(f"  {hop}: {value!r}")
        print("\nspans:")
        print(table.to_string(index=False))
        print("\nper hop:")
        print(run.trace.summary().to_string())


def _demo(args: argparse.Namespace) -> int:
    from workbench.bench import Workbench
    from workbench.demo import DEMO_SPEC
    from workbench.models.tiny import tiny_model

    path = tiny_model()
    print(f"tiny model: {path}")
    with Workbench() as bench:
        with flag_words({"device": LOAD_FLAGS["device"]}):
            model = bench.load("tiny", path, device=args.device)
        print(f"loaded 'tiny' on {model.device} ({model.params:,} parameters) in {model.load_s:.2f} s")
        chain = bench.chain(DEMO_SPEC)
        chain.run(question=args.question)  # warm-up: the first call pays one-off costs
        _print_run(chain.run(question=args.question))
    return 0


def _read_spec(name: str) -> str:
    """The spec file's text (``-``: standard input's); a path that is not a readable file says what is near it."""
    from workbench.chains.live import decode_utf8
    if name == "-":
        raw = sys.stdin.buffer.read()
        if not raw.strip():
            raise SpecError("the spec on stdin is empty", hint="pipe a YAML chain spec in: autoglm run - ... < qa.yaml")
        name = "the spec on stdin"
    else:
        raw = _read_file(name)
    return decode_utf8(raw, name)


def _spec_folder(name: str) -> Path | None:
    """Where the spec's relative ``graph:`` paths are read from: its file's folder (stdin's: the working directory)."""
    return None if name == "-" else Path(name).parent


def _read_file(name: str) -> bytes:
    """A spec file's bytes; a path that is not a readable file says what is near it."""
    path = Path(name)
    try:
        return path.read_bytes()
    except OSError as exc:
        folder = path if path.is_dir() else path.parent
        nearby = sorted(p.name for p in folder.glob("*.y*ml")) if folder.is_dir() else []
        close = difflib.get_close_matches(path.name, nearby, n=1, cutoff=0.8)
        if close:
            hint = f"did you mean {folder / close[0]}?"
        elif nearby:
            hint = f"spec files in {folder}: {', '.join(nearby[:5])}"
        else:
            hint = "give the path of a YAML chain spec file (a list of hops); autoglm demo runs one without a file"
        raise WorkbenchError(f"cannot read spec file {name!r}: {exc.strerror or exc}", hint=hint) from None


def _models(items: Sequence[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ParseError(f"--model {item!r} is not NAME=PATH", hint=f"e.g. --model tiny={TINY_SOURCE}")
        if name in models:
            raise ParseError(f"--model {name!r} is given twice", hint="give each model one --model NAME=PATH")
        models[name] = source
    return models


def _session_limits(items: Sequence[str]) -> Any:
    """``--session-limit KEY=VALUE`` items as the SessionLimits of a server: max_bytes is SERVED_SESSION_BYTES unless
    an item gives it (``max_bytes=none`` lifts it)."""
    import dataclasses

    from workbench.chains.context import SERVED_SESSION_BYTES, SessionLimits

    names = [f.name for f in dataclasses.fields(SessionLimits)]
    given: dict[str, Any] = {"max_bytes": SERVED_SESSION_BYTES}
    named: set[str] = set()
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in names:
            raise ParseError(f"--session-limit {item!r} is not KEY=VALUE with KEY one of {', '.join(names)}"
                             + did_you_mean(key, names), hint="e.g. --session-limit runs_per_session=1000")
        if key in named:
            raise ParseError(f"--session-limit {key} is given twice", hint="give each bound once")
        named.add(key)
        try:
            given[key] = None if text.strip().lower() == "none" else (
                float(text) if key == "max_age_s" else int(text))
        except ValueError:
            raise ParseError(f"--session-limit {key}={text!r}: not a number",
                             hint=f"a whole number{' of seconds' if key == 'max_age_s' else ''}, or none for no "
                             "bound") from None
    return SessionLimits(**given)


def _run(args: argparse.Namespace) -> int:
    from workbench.bench import Workbench

    inputs = parse_key_values(args.inputs)
    models = _models(args.model)
    replicas = replica_options(args)
    spec = _read_spec(args.spec)
    with Workbench(allow_modules=args.allow_module) as bench:
        for name, source in models.items():
            load_model(bench, name, load_settings(args, source), replicas)
            if replicas.replicas is not None and not args.json:
                table = bench.replicas(name)
                print(f"model {name!r}: {len(table)} replicas ({', '.join(table['device'])}),"
                      f" picked by {table['balance'].iloc[0]}")
        try:
            chain = bench.chain(spec, base_dir=_spec_folder(args.spec))
        except SpecError as error:
            if error.field == "model":  # the spec's own hint speaks of bench.load and %autoglm load
                error.hint = MODEL_HINT + (f"; given: {', '.join(models)}" if models else "")
            raise
        try:
            with flag_words(SESSION_FLAGS):
                run = chain.run(session=args.session, **inputs)
        except MissingInputError as error:
            error.hint = f"autoglm run {args.spec} " + " ".join(f"{name}=..." for name in chain.inputs)
            raise
        except HopFailed as error:
            # The hops that finished, and the spans up to the failure, are what there is to read here.
            if error.run is not None and not args.json:
                _print_run(error.run)
            if not (isinstance(error.cause, WorkbenchError) and error.cause.hint):
                error.hint = ("run without --json to see the spans of the hops that finished" if args.json
                              else "the spans above show the hops that finished")
            raise
        if args.json:
            print(json.dumps({"id": run.id, "output": run.output, "outputs": run.outputs}, default=str, indent=2))
        else:
            _print_run(run)
    return 0


def _key_chains(text: str) -> list[str]:
    """``keys add --chains A,B``: the chains a key is limited to; an empty item is a typo, never "no chains"."""
    chains = [chain.strip() for chain in text.split(",")]
    if not all(chains):
        raise ParseError(f"--chains {text!r} has an empty item",
                         hint="name the chains separated by single commas (--chains qa,summary), or leave out "
                         "--chains for a key to every chain")
    return chains


def _keys(args: argparse.Namespace) -> int:
    import os

    from workbench.fronts.server.auth import DEFAULT_ROLES, KeyStore, load_roles

    roles_file = getattr(args, "roles", None) or os.environ.get("AUTOGLM_ROLES")
    roles = {**DEFAULT_ROLES, **(load_roles(roles_file) if roles_file else {})}
    store = KeyStore(args.data_dir, roles=roles)
    try:
        if args.keys_command == "add":
            chains = _key_chains(args.chains) if args.chains is not None else None
            key = store.add(args.name, args.role, chains=chains)
            print(key)
            print(f"key {args.name!r} ({args.role}) stored hashed in {store.path}; this is the only time it is shown",
                  file=sys.stderr)
        elif args.keys_command == "revoke":
            store.revoke(args.name)
            print(f"revoked key {args.name!r}")
        else:
            rows = store.list()
            if args.json:
                print(json.dumps(rows, indent=2))
            for row in [] if args.json else rows:
                chains = ",".join(row["chains"]) if row["chains"] is not None else "*"
                state = "revoked" if row["revoked"] else "active"
                created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(row["created_at"]))
                print(f"{row['name']:<24} {row['role']:<8} {state:<8} {created}  id={row['id']} chains={chains}")
            if not rows and not args.json:
                print(f"no keys in {store.path}")
    finally:
        store.close()
    return 0


def _add_keys_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from workbench.fronts.server.auth import DEFAULT_ROLES

    keys = sub.add_parser(
        "keys", help="add, list and revoke the API keys a served chain takes",
        description="Manage the API keys `autoglm serve` takes: stored hashed in keys.sqlite3 in the data directory.",
    )
    keys.add_argument("--data-dir", metavar="D", help="where keys.sqlite3 lives (default: $AUTOGLM_DATA_DIR, else "
                      "~/.local/share/autoglm-workbench)")
    keys.set_defaults(func=_keys)
    actions = keys.add_subparsers(dest="keys_command", title="actions", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="make a key for NAME and print it once")
    add.add_argument("name", metavar="NAME", help="who the key is for (letters, digits, _ . @ -)")
    add.add_argument("--role", required=True, metavar="ROLE",
                     help=f"{', '.join(sorted(DEFAULT_ROLES))} (viewer: list chains, read runs; runner: also invoke "
                     "chains; admin: everything), or a role from the roles file")
    add.add_argument("--roles", metavar="FILE", help="a YAML roles file defining custom roles (default: "
                     "$AUTOGLM_ROLES), as autoglm serve reads it")
    add.add_argument("--chains", metavar="A,B", help="limit the key to these chains (default: every chain)")
    revoke = actions.add_parser("revoke", help="revoke NAME's key at once")
    revoke.add_argument("name", metavar="NAME")
    listing = actions.add_parser("list", help="list the keys (names, roles, ids; never the keys)")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    # --data-dir after the action reads as well as before it.
    for action in (add, revoke, listing):
        action.add_argument("--data-dir", metavar="D", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _serve(args: argparse.Namespace) -> int:
    from workbench.fronts.server import check_serve_extra

    check_serve_extra()
    from workbench.bench import Workbench
    from workbench.fronts.server.auth import Auth, is_loopback
    from workbench.fronts.server.server import build, check_addresses, resolve_auth

    models = _models(args.model)
    specs = [_read_spec(path) for path in args.spec]
    session_limits = _session_limits(args.session_limit)
    with Workbench(data_dir=args.data_dir, allow_modules=args.allow_module, session_limits=session_limits) as bench:
        # What serving would refuse is refused before the models load (minutes for a large one). Keys live in the
        # data directory; JWT settings and limits come from the environment (a container's secrets).
        auth = resolve_auth(Auth.open() if args.no_auth else Auth.from_env(bench.data_dir), args.host, bench.data_dir)
        check_addresses(args.host, {"--port": args.port, "--grpc-port": args.grpc_port})  # its errors name them
        for name, source in models.items():
            load_model(bench, name, load_settings(args, source), replica_options(args))
        chains: dict[str, Chain] = {}
        files: dict[str, str] = {}  # chain name -> the spec file it came from
        for path, spec in zip(args.spec, specs):
            try:
                chain = bench.chain(spec, base_dir=_spec_folder(path))
            except SpecError as error:
                if error.field == "model":
                    error.hint = MODEL_HINT + (f"; given: {', '.join(models)}" if models else "")
                raise
            if chain.name in chains:  # the gateway keys chains by name: the later one would hide the earlier
                raise WorkbenchError(
                    f"--spec {path}: chain {chain.name!r} is also the chain of --spec {files[chain.name]}",
                    hint="give each spec file its own  name:  (or pass each file once)",
                )
            chains[chain.name], files[chain.name] = chain, path
        with flag_words(SERVE_FLAGS):
            server = build(bench, list(chains.values()), port=args.port, host=args.host, auth=auth,
                           log_level=args.log_level, grpc_port=args.grpc_port,
                           **{name: getattr(args, name) for name in ("max_in_flight", "max_queued")
                              if getattr(args, name) is not None})
        if not is_loopback(args.host):
            print(f"autoglm: note: {args.host} is {'every network' if args.host in ('0.0.0.0', '::') else 'a network'} "
                  "this machine is on, and calls and their keys travel unencrypted\nhint: put TLS in front (a reverse "
                  "proxy, an Ingress) of anything past a network you trust; --host 127.0.0.1 serves this machine only",
                  file=sys.stderr, flush=True)
        nobody = auth.admits_nobody()
        if nobody is not None and auth.keys is not None:
            folder = shlex.quote(str(auth.keys.data_dir))
            print(f"autoglm: warning: {nobody}, {Auth.NOBODY_MEANS}\n"
                  f"hint: autoglm keys add NAME --role runner --data-dir {folder} makes a key, which this server takes "
                  "at once; --no-auth serves this machine only, without credentials", file=sys.stderr, flush=True)
        if server.grpc is not None:
            server.grpc.start()  # before "serving" is said, and so its port (--grpc-port 0: the system's pick) is known
        print(f"serving {', '.join(chains)} on {server.url} (auth: {auth.describe()}); Ctrl-C stops", flush=True)
        if server.grpc is not None:
            print(f"gRPC (ChainService) on {server.grpc.target}", flush=True)
        server.run()  # until Ctrl-C or SIGTERM
        print("stopped", flush=True)
    return 0


# The settings `autoglm serve` takes as flags, which the gateway's errors name as keywords (max_queued=1024).
SERVE_FLAGS = {"port": Flag("--port", "P"), "grpc_port": Flag("--grpc-port", "N"), "host": Flag("--host", "H"),
               "max_in_flight": Flag("--max-in-flight", "N"), "max_queued": Flag("--max-queued", "N")}


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = sub.add_parser(
        "serve", help="serve chain spec files over HTTP: REST + SSE, JSON-RPC and OpenAI-compatible routes",
        description="Load the models, build the chains in the spec files, and serve them until Ctrl-C. Callers "
        "need an API key (autoglm keys add NAME --role runner) or a JWT (AUTOGLM_JWT_SECRET).",
        epilog=f"example:\n  autoglm serve --spec qa.yaml --model tiny={TINY_SOURCE} --port 8000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--spec", action="append", required=True, metavar="FILE",
                       help="a YAML chain spec file to serve; repeat for each chain")
    serve.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE",
                       help=f"a model the specs name: a directory, a hub id, or '{TINY_SOURCE}'; repeat for each")
    serve.add_argument("--port", type=int, default=8000, help="the port to listen on (default 8000; 0: any free one)")
    serve.add_argument("--grpc-port", type=int, metavar="N",
                       help="also serve the chains over gRPC on port N (ChainService; 0: any free one)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="the address to listen on (default 127.0.0.1; name another to be reachable from it)")
    serve.add_argument("--data-dir", metavar="D", help="where keys and sessions live (default: $AUTOGLM_DATA_DIR, "
                       "else ~/.local/share/autoglm-workbench)")
    serve.add_argument("--session-limit", action="append", default=[], metavar="KEY=VALUE",
                       help="bound what the sessions store keeps: runs_per_session, max_sessions, max_bytes, "
                       "max_age_s (none: no bound); repeat for each (max_bytes is 1073741824 unless given)")
    serve.add_argument("--no-auth", action="store_true",
                       help="take calls without credentials (every caller is an admin); loopback hosts only")
    serve.add_argument("--allow-module", action="append", default=[], metavar="MODULE",
                       help="let specs' call: name functions in MODULE; a spec an admin sends over the wire "
                       "(POST /v1/chains) may call only these; repeat for each")
    # No defaults here: the gateway's own apply (64 and 1024), and the server's modules load only when it serves.
    serve.add_argument("--max-in-flight", type=int, metavar="N",
                       help="runs served at once; the rest wait for a slot (default 64)")
    serve.add_argument("--max-queued", type=int, metavar="N",
                       help="calls that may wait for a slot; more are refused with 503 and Retry-After (default 1024)")
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level (default warning)")
    add_load_options(serve, "load options (for every --model)")
    add_replica_options(serve, "replicas (for every --model)")
    serve.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    """The `autoglm` argument parser: its commands, options and help."""
    parser = ExactOptionParser(
        prog="autoglm", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="run the three-hop demo chain on the offline tiny model and print its spans",
        description="Run the three-hop demo chain on the offline tiny model and print its output and spans.",
    )
    demo.add_argument("--question", default=DEMO_QUESTION, help=f"the question to ask (default: {DEMO_QUESTION!r})")
    demo.add_argument("--device", default="auto", metavar="D", help=LOAD_HELP["device"])
    demo.set_defaults(func=_demo)
    run = sub.add_parser(
        "run", help="run a chain spec file and print its outputs and spans", epilog=EXAMPLES,
        description="Run the chain in a YAML spec file, with the models it names, and print its outputs and spans.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("spec", metavar="SPEC", help="a YAML chain spec file (- reads it from stdin)")
    # A default, or argparse counts a "*" positional as required and names it among the missing arguments.
    run.add_argument("inputs", nargs="*", default=[], metavar="key=value",
                     help="chain inputs; quote values that hold spaces")
    run.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                     help=f"a model the spec names: a directory, a hub id, or '{TINY_SOURCE}'; repeat for each model")
    run.add_argument("--session", metavar="S", help="a session id: runs in one session share history")
    run.add_argument("--json", action="store_true", help="print the outputs as JSON instead of the span table")
    run.add_argument("--allow-module", action="append", default=[], metavar="MODULE",
                     help="let the spec's call: name functions in MODULE (besides your own code); repeat for each")
    add_load_options(run, "load options (for every --model)")
    add_replica_options(run, "replicas (for every --model)")
    run.set_defaults(func=_run)
    _add_keys_parser(sub)
    _add_serve_parser(sub)
    return parser


def _import_from_working_directory() -> None:
    """Let a spec's ``call:`` name a module in the working directory, as under ``python -m`` and in a notebook.

    The ``autoglm`` script's import path starts at its own bin/ folder. Appended, so that a file there never hides
    an installed package the workbench imports later.
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def _unrecognized(parser: argparse.ArgumentParser, command: str | None, extra: list[str]) -> NoReturn:
    """Exit 2 as argparse does for words nobody takes, but with the usage of the command they were given to and the
    option a misspelt one most likely meant."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            parser = action.choices[command]
    options = [option for action in parser._actions for option in action.option_strings]
    unknown = next((word.partition("=")[0] for word in extra if word.startswith("--")), None)
    parser.error(f"unrecognized arguments: {' '.join(extra)}{did_you_mean(unknown, options)}")


def main(argv: Sequence[str] | None = None) -> int:
    _import_from_working_directory()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "run" and not any(item.startswith("-") for item in extra):
        args.inputs = [*args.inputs, *extra]  # inputs written after an option: run SPEC --model tiny=tiny q=...
    elif extra:
        _unrecognized(parser, args.command, extra)
    if args.command is None:
        parser.print_help()
        return 0
    # SIGTERM (a container stopping) stops a command as Ctrl-C does, whatever it is doing: the workbench's with-block
    # closes on the way out, and so ends a model's child process that is still loading (it held its memory, a GPU's,
    # until it found itself orphaned). A running server puts its own handler in for its time.
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return int(args.func(args))
    except WorkbenchError as error:
        print(f"autoglm: {clipped(error.message)}", file=sys.stderr)
        if error.hint:  # a hint may name the Python call that helps: here, the flags that make it
            print(f"hint: {clipped(in_command_line_words(error.hint))}", file=sys.stderr)
        return 2
    except _Terminated:
        print("autoglm: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:  # Ctrl-C: the user stopping, not a crash; the workbench was closed on the way out
        print("autoglm: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped
    except BrokenPipeError:  # autoglm demo | head -1: the reader has what it wanted; nothing more goes to it
        _quiet_stdout()
        return 128 + signal.SIGPIPE  # as a shell reports a command whose pipe closed
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def console(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``autoglm`` command: :func:`main`, then exit, without waiting for a Python hop's function still running.

    A hop's function runs in a thread, which cannot be interrupted: a server stopped (Ctrl-C, SIGTERM) while one
    ran, a ten-minute one say, closed, and then Python waited at its exit for the function to return.
    """
    code = main(argv)
    deadline = time.monotonic() + HOP_EXIT_WAIT_S  # idle ones end as soon as they see their pool closed
    running = [thread for thread in threading.enumerate() if thread.name.startswith(HOP_THREADS)]
    for thread in running:
        thread.join(max(deadline - time.monotonic(), 0.0))
    running = [thread for thread in running if thread.is_alive()]
    if running:
        said = "1 Python hop was still running; its thread is" if len(running) == 1 else \
            f"{len(running)} Python hops were still running; their threads are"
        print(f"autoglm: note: {said} left unfinished (a thread cannot be interrupted)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)  # the workbench is closed: nothing is left that waits for them
    sys.exit(code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that what the command started is closed on the way out."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


if __name__ == "__main__":
    console()
