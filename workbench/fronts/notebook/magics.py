"""The ``%autoglm`` line and cell magics: what each parsed subcommand does to the current workbench."""

from __future__ import annotations

import builtins
import re
import shlex
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.display import display

from workbench.bench import Workbench, current
from workbench.chains.chain import Chain
from workbench.chains.events import AttemptFailed, HopFinished, HopStarted, RunFinished, Token
from workbench.chains.run import Run, RunInterrupted
from workbench.errors import (
    HopFailed,
    MissingInputError,
    StrategyError,
    WorkbenchClosed,
    WorkbenchError,
    clipped,
    did_you_mean,
)
from workbench.experiments import CompareInterrupted, compare
from workbench.experiments.workloads import read_inputs
from workbench.fronts.arguments import SESSION_FLAGS, Flag, flag_words, load_model
from workbench.fronts.notebook.parsers import (
    PROG,
    BalanceCommand,
    BuilderCommand,
    ChainCommand,
    Command,
    CompareCommand,
    HelpCommand,
    LoadCommand,
    ModelsCommand,
    RunCommand,
    ServeCommand,
    SetCommand,
    TraceCommand,
    UnloadCommand,
    help_text,
    in_magic_words,
    parse_command,
)
from workbench.fronts.notebook.widgets import ChainBuilder, ComparisonDashboard, ModelManager, TraceViewer
from workbench.tables import Readable

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from workbench.tracing import Trace

RUN_VARIABLE = "_autoglm_run"
COMPARE_VARIABLE = "_autoglm_compare"
WIDGET_VARIABLE = "_autoglm_widget"
SERVER_VARIABLE = "_autoglm_server"
# The options of serve and compare, which the errors of bench.serve and compare() name as keywords (arrival_rate=20).
SERVE_FLAGS = {"port": Flag("--port", "P"), "grpc_port": Flag("--grpc-port", "G"), "host": Flag("--host", "H")}
COMPARE_FLAGS = {"concurrency": Flag("--concurrency", "N"), "repeats": Flag("--repeats", "N"),
                 "warmup": Flag("--warmup", "N"), "arrival_rate": Flag("--rate", "R"), "seed": Flag("--seed", "N"),
                 "batching": Flag("--batching", "P,..."), "preloading": Flag("--preload", "S,..."),
                 "cache": Flag("--cache", "A,...")}
# A visible mark per level: pandas' HTML strips leading whitespace (non-breaking too), which
# would flatten the span tree in a notebook.
_INDENT = "· "
_NOTHING = object()  # no notebook variable or builtin of that name


def report(error: WorkbenchError) -> None:
    """Print a user's mistake the short way: ``autoglm: message`` and its hint, no traceback."""
    # Cut short where a user's long word came back whole (a 20,000-character name made 60 kB of messages).
    print(f"autoglm: {clipped(error.message)}", file=sys.stderr)
    if error.hint:  # most hints name the Python call that helps: here, the subcommand that makes it where there is one
        print(f"hint: {clipped(in_magic_words(error.hint))}", file=sys.stderr)


def bench_of(chain: Chain) -> Workbench:
    """The workbench ``chain`` runs on (a notebook's Chain variable may be another than current()), or current()
    once that one is closed."""
    host = chain.bench
    return host if isinstance(host, Workbench) and not host.closed else current()


def span_table(trace: Trace) -> Readable:
    """The columns a latency reader wants first, names indented by depth in the span tree, read at a glance."""
    return Readable(trace.compact(indent=_INDENT))


@magics_class
class AutoglmMagics(Magics):
    """``%autoglm SUBCOMMAND ...`` and ``%%autoglm chain NAME``, acting on ``workbench.current()``."""

    def __init__(self, shell: InteractiveShell) -> None:
        super().__init__(shell)
        # Keyed by subcommand name, like parsers.COMMANDS; a new subcommand adds one entry to each.
        self._handlers: dict[str, Callable[[Any], None]] = {
            HelpCommand.subcommand: self._help,
            LoadCommand.subcommand: self._load,
            ModelsCommand.subcommand: self._models,
            UnloadCommand.subcommand: self._unload,
            ChainCommand.subcommand: self._chain,
            RunCommand.subcommand: self._run,
            TraceCommand.subcommand: self._trace,
            CompareCommand.subcommand: self._compare,
            BuilderCommand.subcommand: self._builder,
            BalanceCommand.subcommand: self._balance,
            SetCommand.subcommand: self._set,
        }
        self._handlers[ServeCommand.subcommand] = self._serve
        self._servers: list[Any] = []  # started by %autoglm serve, stopped by %autoglm serve stop
        # The chain %autoglm run ran last (a Chain variable may be another workbench's than current()): %autoglm trace
        # reads the runs of its workbench, where that run is.
        self._ran: Chain | None = None

    # No $var / {var} expansion: prompts and questions hold braces and dollars that must stay literal.
    @no_var_expand
    @line_cell_magic
    def autoglm(self, line: str, cell: str | None = None) -> None:
        """Load models, build and run chains, read traces; ``%autoglm help`` lists the subcommands."""
        try:
            command: Command = parse_command(line, cell)
            self._handlers[command.subcommand](command)
        except WorkbenchError as error:
            report(error)

    @property
    def _user_ns(self) -> dict[str, Any]:
        assert self.shell is not None
        return self.shell.user_ns

    def _help(self, command: HelpCommand) -> None:
        print(help_text(command.topic), end="")

    def _load(self, command: LoadCommand) -> None:
        bench = current()
        before = next((m for m in bench.registry.loaded() if m.name == command.name), None)
        model = load_model(bench, command.name, command.settings, command.replicas)
        if model is before:  # the same load again (a cell run twice): nothing loaded
            print(f"{command.name!r} is already loaded with these settings, from these files: nothing to load")
            return
        if model.settings.remote:  # no weights here: say which server and model answer instead
            print(f"loaded {command.name!r}: {model.settings.served_model!r} on {model.source} in {model.load_s:.2f} s"
                  + self._replica_note(command))
            return
        if model.params is None:  # engine="ray": the weights are in the actors (bench.replicas() says where)
            print(f"loaded {command.name!r} on {model.device} in {model.load_s:.2f} s" + self._replica_note(command))
            return
        dtype = str(model.dtype).removeprefix("torch.")
        print(
            f"loaded {command.name!r} on {model.device} in {dtype} ({model.params:,} parameters)"
            f" in {model.load_s:.2f} s" + self._replica_note(command)
        )

    @staticmethod
    def _replica_note(command: LoadCommand) -> str:
        """', 2 replicas (least_loaded)' after a load that asked for replicas; nothing after a plain load."""
        if command.replicas.replicas is None and command.replicas.balance is None:
            return ""
        table = current().replicas(command.name)
        return f", {len(table)} replica{'s' * (len(table) != 1)} ({table['balance'].iloc[0]})"

    def _balance(self, command: BalanceCommand) -> None:
        bench = current()
        with flag_words({}, {repr(command.policy): command.policy.name}):  # the policy as typed, not its repr
            bench.set_balance(command.name, command.policy)
        # Accepted on one replica too (it is kept for a load with more, and wb.compare sets it on every model of a
        # chain), but said: a user who expected it to spread requests learns why nothing changes.
        one = bench.registry.is_loaded(command.name) and len(bench.replicas(command.name)) == 1
        print(f"{command.name!r}: replicas picked by {command.policy.name}"
              + (" (it has one replica, so every request goes to it; load it with --replicas N to spread them)"
                 if one else ""))

    def _models(self, command: ModelsCommand) -> None:
        if command.ui:
            self._show_widget(ModelManager(current()))
            return
        table = current().models()
        if table.empty:
            print("no models yet; load one with %autoglm load NAME SOURCE")
        else:
            display(Readable(table))

    def _unload(self, command: UnloadCommand) -> None:
        freed = current().unload(command.name)
        print(f"unloaded {command.name!r}, freed {freed / 2**20:.1f} MiB")

    def _chain(self, command: ChainCommand) -> None:
        held = self._user_ns.get(command.name, _NOTHING)
        if held is _NOTHING and hasattr(builtins, command.name):
            held = getattr(builtins, command.name)
        if held is not _NOTHING and not isinstance(held, Chain):  # a chain of that name is redefined, as expected
            raise WorkbenchError(
                f"{command.name!r} already names {type(held).__name__} {held!r:.60} in the notebook, and the chain "
                "would replace it",
                hint=f"pick another name, e.g. %%autoglm chain {command.name}_chain (or del {command.name} first)")
        # A leading newline makes the spec's line numbers the cell's: line 1 is the %%autoglm line.
        chain = current().chain("\n" + command.spec, name=command.name)
        self._user_ns[command.name] = chain
        display(chain)

    def _find_chain(self, name: str, *, closed_ok: bool = False) -> Chain:
        """The chain ``name`` of the current workbench, else the notebook's Chain variable of that name.

        A variable may hold a chain of a workbench closed since (after ``bench.close()`` the magics use a fresh one):
        it can run nothing, so that is said, unless ``closed_ok`` (the builder reads only its spec).
        """
        chains = current().chains()
        if name in chains:
            return chains[name]
        candidate = self._user_ns.get(name)
        if isinstance(candidate, Chain):
            if not closed_ok:
                try:
                    candidate.bench.check_open(f"run chain {name!r}")
                except WorkbenchClosed:
                    raise WorkbenchError(
                        f"chain {name!r} was built on a workbench that is closed",
                        hint=f"run the cell that built it (%%autoglm chain {name}) again, to build it on the current "
                        "workbench") from None
            return candidate
        known = sorted(
            set(chains) | {k for k, v in self._user_ns.items() if isinstance(v, Chain) and not k.startswith("_")}
        )
        raise WorkbenchError(
            f"no chain named {name!r}{did_you_mean(name, known)}",
            hint=f"chains: {', '.join(known)}" if known else "build one in a cell starting with %%autoglm chain NAME",
        )

    def _run(self, command: RunCommand) -> None:
        chain = self._find_chain(command.chain)
        self._ran = chain
        try:
            with flag_words(SESSION_FLAGS):
                run = self._stream(chain, command) if command.stream else \
                    chain.run(session=command.session, **command.inputs)
        except RunInterrupted as stopped:  # the stop button: what the run had done is bound, as a failed run's is
            self._user_ns[RUN_VARIABLE] = stopped.run
            raise
        except MissingInputError as missing:
            example = " ".join(f"{name}=..." for name in chain.inputs)
            raise MissingInputError(missing.message, hint=f"{PROG} run {command.chain} {example}") from None
        except HopFailed as failed:
            # The partial run keeps the outputs that finished; bind it so it can be read and traced.
            if failed.run is not None:
                self._user_ns[RUN_VARIABLE] = failed.run
                # Not "the error's .run": the magic catches the error, so the bound run is what the user can read.
                if not (isinstance(failed.cause, WorkbenchError) and failed.cause.hint):
                    failed.hint = (f"the outputs of the hops that finished are in {RUN_VARIABLE}; "
                                   f"{PROG} trace shows its spans")
                elif failed.hint:  # "run.trace.events() lists every attempt": the run is the one bound here
                    failed.hint = re.sub(r"\brun\.trace\b", f"{RUN_VARIABLE}.trace", failed.hint)
            raise
        self._user_ns[RUN_VARIABLE] = run
        display(run)
        display(span_table(run.trace))

    @staticmethod
    def _stream(chain: Chain, command: RunCommand) -> Run:
        """Run ``chain``, printing each LLM hop's tokens as they arrive under a ``[hop]`` heading.

        Hops that run at once take turns on the output: a token of another hop than the line's starts a line
        headed by its hop. A hop that streamed no tokens (a Python or knowledge hop, a cached answer) prints its
        output when it finishes.
        """
        line: str | None = None  # the hop whose heading the current line has
        streamed: set[str] = set()

        def heading(hop: str) -> None:
            nonlocal line
            if line != hop:
                if line is not None:
                    print(flush=True)
                print(f"[{hop}] ", end="", flush=True)
                line = hop

        try:
            for event in chain.stream(session=command.session, **command.inputs):
                if isinstance(event, HopStarted):
                    if line is None:  # else another hop's line is open: this one's heading waits for its first token
                        heading(event.hop)
                elif isinstance(event, Token):
                    heading(event.hop)
                    streamed.add(event.hop)
                    print(event.text, end="", flush=True)
                elif isinstance(event, AttemptFailed) and event.hop in streamed:  # its tokens were no answer: say so
                    heading(event.hop)
                    print(f" (attempt {event.attempt} failed: {event.error})", flush=True)
                    line = None
                    streamed.discard(event.hop)
                elif isinstance(event, HopFinished):
                    if event.hop not in streamed:
                        heading(event.hop)
                        print(event.output, end="", flush=True)
                    if line == event.hop:
                        print(flush=True)
                        line = None
                elif isinstance(event, RunFinished):
                    if event.run.error is not None:
                        raise event.run.error
                    return event.run
        finally:  # the run's end, a failure or a Ctrl-C mid-line: what is printed next starts on a line of its own
            if line is not None:
                print(flush=True)
        raise AssertionError("a stream ends with its run")

    def _trace(self, command: TraceCommand) -> None:
        bench = current() if self._ran is None else bench_of(self._ran)
        trace = bench.traces() if command.all else bench.run(command.run).trace
        if not len(trace):
            print("no spans recorded yet")
            return
        if command.summary:
            display(Readable(trace.summary()))
        if command.waterfall:
            display(trace.waterfall())
        if command.ui:
            self._show_widget(TraceViewer(trace))
        elif not (command.summary or command.waterfall):
            display(span_table(trace))

    def _compare(self, command: CompareCommand) -> None:
        chain = self._find_chain(command.chain)
        inputs = read_inputs(command.inputs)
        workload = {
            "concurrency": command.concurrency,
            "repeats": command.repeats,
            "warmup": command.warmup,
            "arrival_rate": command.rate,
            "seed": command.seed,
        }
        if command.ui:
            with flag_words(COMPARE_FLAGS):
                dashboard = ComparisonDashboard(chain, inputs, batching=command.batching or (),
                                                preloading=command.preload or (), save=command.save, **workload)
            self._show_widget(dashboard)
            dashboard.run()
            return
        try:
            with flag_words(COMPARE_FLAGS):
                comparison = compare(chain, inputs, batching=command.batching, preloading=command.preload,
                                     cache=command.cache, **workload)
        except CompareInterrupted as stopped:  # the passes that finished stay bound, as a finished comparison is
            if stopped.comparison is not None:
                self._user_ns[COMPARE_VARIABLE] = stopped.comparison
                print(f"autoglm: the passes that finished are kept in {COMPARE_VARIABLE}", file=sys.stderr)
            raise
        self._user_ns[COMPARE_VARIABLE] = comparison
        display(comparison)
        if command.save is not None:
            try:
                saved = comparison.save(command.save)
            except StrategyError as exc:  # a missing directory, no permission, a full disk: the results stay bound
                raise WorkbenchError(
                    f"compare: {exc.message}",
                    hint=f"the comparison is kept in {COMPARE_VARIABLE}; {COMPARE_VARIABLE}.save(PATH) writes it",
                ) from None
            print(f"saved to {saved}")

    def _builder(self, command: BuilderCommand) -> None:
        chain = self._find_chain(command.chain, closed_ok=True) if command.chain is not None else None
        self._show_widget(ChainBuilder(current() if chain is None else bench_of(chain), chain=chain))

    def _set(self, command: SetCommand) -> None:
        by_chain: dict[str, dict[str, Any]] = {}
        for chain, path, value in command.assignments:
            by_chain.setdefault(chain, {})[path] = value
        chains = {name: self._find_chain(name) for name in by_chain}  # every chain known before any changes
        for name, values in by_chain.items():
            try:
                version = chains[name].set(values)  # all of a chain's values in one version, or none
            except WorkbenchError as error:
                if error.hint is None:
                    error.hint = f"chain {name!r} is unchanged: it keeps serving {chains[name].version}"
                raise
            print(f"{name}: {', '.join(f'{path} = {value!r}' for path, value in values.items())}; now {version}")

    def _serve(self, command: ServeCommand) -> None:
        if command.stop:
            # A server whose workbench was closed is stopped already: nothing to stop, or to say stopped.
            running = [server for server in reversed(self._servers) if server.running]
            self._servers.clear()
            if not running:
                print("no server is running; start one with %autoglm serve CHAIN")
            for server in running:
                server.stop()
                print(f"stopped {server.url}")
            return
        chains = [self._find_chain(name) for name in command.chains]
        names = [chain.name for chain in chains]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:  # the gateway keys chains by name: one would hide the other
            raise WorkbenchError(f"serve: chain {twice!r} is named twice ({' '.join(command.chains)})",
                                 hint="serve each chain once; chains from different cells need names of their own")
        # Through bench.serve, so that closing the workbench stops the server too: else it stays up and every call
        # to it waits for a loop that has stopped. On the chains' own workbench where they share one (Chain variables
        # of the notebook's bench = wb.Workbench(...)), as %autoglm run runs them; else current() says which is not its.
        one_host = len({id(chain.bench) for chain in chains}) == 1
        bench = bench_of(chains[0]) if one_host else current()
        with flag_words(SERVE_FLAGS):
            server = bench.serve(chains, port=command.port, host=command.host,
                                 auth=False if command.no_auth else None, grpc_port=command.grpc_port)
        self._servers.append(server)
        self._user_ns[SERVER_VARIABLE] = server
        names = ", ".join(c.name for c in chains)
        print(f"serving {names} on {server.url} (POST {server.url}/v1/chains/{chains[0].name}/invoke); "
              f"%autoglm serve stop stops it")
        if server.grpc is not None:
            print(f"gRPC (ChainService) on {server.grpc.target}")
        auth = server.app.state.gateway.auth
        nobody = auth.admits_nobody()
        if nobody is not None and auth.keys is not None:  # it serves, and refuses every call: say so
            report(WorkbenchError(
                f"warning: {nobody}, {type(auth).NOBODY_MEANS}",
                hint=f"make a key in a terminal: autoglm keys add NAME --role runner --data-dir "
                     f"{shlex.quote(str(auth.keys.data_dir))} (this server takes it at once); or serve this machine "
                     f"only, without credentials: {PROG} serve {' '.join(command.chains)} --no-auth"))

    def _show_widget(self, widget: Any) -> None:
        """Display a widget and bind it to _autoglm_widget, where cells (and tests) can read its state."""
        self._user_ns[WIDGET_VARIABLE] = widget
        display(widget)


def register(ipython: InteractiveShell) -> None:
    """Add ``%autoglm`` / ``%%autoglm`` to ``ipython`` (called by ``%load_ext workbench``)."""
    ipython.register_magics(AutoglmMagics(ipython))


def unregister(ipython: InteractiveShell) -> None:
    """Remove what :func:`register` added (called by ``%unload_ext workbench``)."""
    # IPython has no unregister_magics; dropping the entries makes %autoglm unknown again.
    manager = ipython.magics_manager
    for kind in ("line", "cell"):
        manager.magics[kind].pop("autoglm", None)
    magics = manager.registry.pop(AutoglmMagics.__name__, None)
    # The servers %autoglm serve started: a later %load_ext makes magics that do not know them, so stop them now.
    while isinstance(magics, AutoglmMagics) and magics._servers:
        magics._servers.pop().stop()
