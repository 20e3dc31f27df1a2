"""Chain specs from YAML, dicts or Python objects, validated with errors that say where."""

from __future__ import annotations

import graphlib
import importlib
import functools
import inspect
import math
import sys
import re
import reprlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from workbench.chains import trust
from workbench.chains.templates import PromptTemplate
from workbench.engine.requests import GenerationParams, check_text
from workbench.chains.resilience import NO_RESILIENCE, Fallback, Resilience, RetryPolicy
from workbench.engine.failures import ERROR_KINDS
from workbench.errors import GraphError, InvalidInput, SpecError, did_you_mean, plain
from workbench.knowledge import DEFAULT_MAX_TRIPLES, DEMO_GRAPHS, GraphSource, GraphStore, resolve

CHAIN_FIELDS = ("name", "description", "inputs", "hops", "output", "history")
LLM_FIELDS = ("name", "kind", "model", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "seed",
              "truncate", "retry", "timeout_s", "fallback", "cache", "adapter")
PYTHON_FIELDS = ("name", "kind", "call", "uses", "retry", "timeout_s", "fallback")
KNOWLEDGE_FIELDS = ("name", "kind", "graph", "query", "hops", "max_triples")
KINDS = ("llm", "python", "knowledge")
MAX_KNOWLEDGE_HOPS = 4  # past four hops a walk reaches most of any small-world graph
MAX_TRIPLES_PER_HOP = 1_000  # what one knowledge hop may put into a prompt: a spec is untrusted input
MESSAGE_FIELDS = ("role", "content")
ROLES = ("system", "user", "assistant")
RETRY_FIELDS = ("attempts", "backoff_ms", "max_backoff_ms", "jitter", "max_total_s", "on")
RESERVED = frozenset({"history", "session"})
DEFAULT_HISTORY = 5
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# YAML aliases let a few bytes stand for a nest of billions of values ("billion laughs"); a spec
# has tens of values, so past this many the loader refuses rather than building them.
MAX_SPEC_VALUES = 100_000
MAX_SECONDS = 86_400  # a timeout or retry budget longer than a day is a typo, and past TIMEOUT_MAX Python refuses it
# More tries than this is a typo or an attack (retry: {attempts: 1000000000, backoff_ms: 0} on a failing hop never ends).
MAX_ATTEMPTS = 100
# A chain of more hops than this is generated or hostile: every run checks each hop against the earlier ones, and a
# Python hop without `uses` reads them all (3 000 hops held a served gateway's loop ~0.9 s a run).
MAX_HOPS = 500
MAX_SEED = 2**63 - 1  # what torch.manual_seed takes
# Values in error messages are shown cut short: a value may be a deep or shared nest that a full repr never finishes.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 120, 120, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def _show(value: Any) -> str:
    text = _SHORT.repr(value)
    return text if len(text) <= 160 else text[:159] + "…"


@dataclass(frozen=True)
class KnowledgeQuery:
    """A knowledge hop's settings: the graph, the query template, how many hops to walk, the cap on triples."""

    source: GraphSource
    query: PromptTemplate
    hops: int = 1
    max_triples: int = DEFAULT_MAX_TRIPLES


CACHE_MODES = ("off", "exact", "prefix")
CACHE_FIELDS = ("mode", "force")


@dataclass(frozen=True)
class HopCache:
    """How an LLM hop is cached: ``exact`` answers a repeated request from the data directory's SQLite,
    ``prefix`` reuses the KV of the prompt's fixed text (before its first ``{{``); ``force`` allows
    ``exact`` on a sampling hop."""

    exact: bool = False
    prefix: bool = False
    force: bool = False

    @property
    def mode(self) -> str:
        """``off``, ``exact``, ``prefix`` or ``exact+prefix``."""
        return "+".join(m for m, on in (("exact", self.exact), ("prefix", self.prefix)) if on) or "off"


NO_CACHE = HopCache()


@dataclass
class HopSpec:
    """One validated hop: an LLM call, a Python function or a knowledge-graph lookup, and the hops it depends on."""

    name: str
    kind: Literal["llm", "python", "knowledge"]
    deps: tuple[str, ...] = ()
    inputs: frozenset[str] = frozenset()
    model: str | None = None
    template: PromptTemplate | None = None
    # A chat hop's messages instead of a prompt: (role, content template) each.
    messages: tuple[tuple[str, PromptTemplate], ...] | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    call: Callable[..., Any] | None = None
    call_by_name: tuple[str, ...] | None = None  # parameter names, or None to pass the context
    context_as_keywords: bool = False  # the context goes as keywords (def hop(**values)), not as one argument
    line: int | None = None
    resilience: Resilience = NO_RESILIENCE
    # A fallback of another hop: it runs only when that hop fails, never in the normal walk.
    standby: bool = False
    knowledge: KnowledgeQuery | None = None  # a knowledge hop's graph, query and walk
    # The hop's ``cache:``: an exact response cache, a prefix (KV) cache, both, or neither.
    cache: HopCache = NO_CACHE
    # The named LoRA adapter of ``model`` this hop runs with (``adapter: sql``); None: the base model.
    adapter: str | None = None

    @property
    def prompt(self) -> str | None:
        return self.template.source if self.template else None

    @property
    def text_field(self) -> str:
        """The spec field a hop's template and the names it reads come from: ``prompt``, ``messages`` or ``query``."""
        if self.kind == "knowledge":
            return "query"
        return "messages" if self.messages is not None else "prompt"

    def needs(self) -> frozenset[str]:
        """Every name this hop reads: chain inputs, upstream hop outputs, ``history``."""
        return self.inputs | set(self.deps)


@dataclass
class ChainSpec:
    """A validated chain: hops in spec order, their dependencies, inputs and output."""

    name: str
    hops: list[HopSpec]
    output: str
    inputs: tuple[str, ...]
    history: int = DEFAULT_HISTORY
    description: str = ""
    source: Any = None
    # Which configuration this is (chains/live.py): set when a chain starts serving it, read by every run.
    version: Any = None

    def hop(self, name: str) -> HopSpec:
        return next(h for h in self.hops if h.name == name)

    def deps(self) -> dict[str, tuple[str, ...]]:
        return {h.name: h.deps for h in self.hops}

    def models(self) -> list[str]:
        return sorted({h.model for h in self.hops if h.model})

    def models_after(self, name: str) -> list[str]:
        """Models of the hops downstream of hop ``name`` (reading its output, directly or not), nearest first."""
        readers: dict[str, list[str]] = {}
        for hop in self.hops:
            for dep in hop.deps:
                readers.setdefault(dep, []).append(hop.name)
        models: list[str] = []
        seen, frontier = {name}, [name]
        while frontier:  # breadth first, so the models needed soonest come first
            next_frontier = []
            for reader in (r for n in frontier for r in readers.get(n, ())):
                if reader not in seen:
                    seen.add(reader)
                    next_frontier.append(reader)
                    model = self.hop(reader).model
                    if model and model not in models:
                        models.append(model)
            frontier = next_frontier
        return models


class _Lines:
    """YAML line numbers by path, e.g. ("hops", 1, "model") -> 7."""

    def __init__(self) -> None:
        self.by_path: dict[tuple[Any, ...], int] = {}

    def of(self, *path: Any) -> int | None:
        while path:
            if path in self.by_path:
                return self.by_path[path]
            path = path[:-1]
        return None

    def walk(self, root: yaml.Node) -> None:
        """Record the line of every key and item; iterative, and each node once, so aliases cannot blow it up."""
        seen_nodes: set[int] = set()
        stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())]
        while stack:
            node, path = stack.pop()
            if id(node) in seen_nodes:  # an alias of a node already walked (or of one that contains it)
                continue
            seen_nodes.add(id(node))
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key, value in node.value:
                    line = key.start_mark.line + 1
                    if key.value in seen:
                        raise SpecError(
                            f"key {key.value!r} appears twice (first on line {seen[key.value]})",
                            field=str(key.value),
                            line=line,
                        )
                    seen[key.value] = line
                    self.by_path.setdefault((*path, key.value), line)
                    stack.append((value, (*path, key.value)))
            elif isinstance(node, yaml.SequenceNode):
                for index, item in enumerate(node.value):
                    self.by_path.setdefault((*path, index), item.start_mark.line + 1)
                    stack.append((item, (*path, index)))


def check_chain_name(name: object, line: int | None = None) -> None:
    """Refuse a chain name that is not a non-empty string, or one UTF-8 cannot hold (a file's name read with
    surrogateescape, say): the session store and the cache keep it as UTF-8."""
    if not isinstance(name, str) or not name.strip():
        raise SpecError("the chain needs a name (a non-empty string)", field="name", line=line)
    try:
        check_text(name, "the chain's name")
    except InvalidInput as exc:
        raise SpecError(exc.message, field="name", line=line, hint="name: my_chain names it in the spec; "
                        + str(exc.hint)) from None


def parse_spec(
    spec: str | Mapping[str, Any],
    known_models: Collection[str] | None = None,
    default_name: str | None = None,
    allowed_modules: Collection[str] = (),
    graphs: GraphStore | None = None,
    known_adapters: Mapping[str, Collection[str]] | None = None,
    base_dir: Path | None = None,
) -> ChainSpec:
    """Validate ``spec`` (YAML text or a dict) into a ChainSpec, or raise SpecError saying where.

    ``allowed_modules``: modules a ``call:`` may name besides the user's own (see ``chains/trust.py``).
    ``graphs``: where knowledge hops' graphs load and stay; given, each is read now, so a bad file
    of triples fails here (naming the hop and line) rather than at the first run.
    ``known_adapters``: the named LoRA adapters of each model, which a hop's ``adapter:`` must be one of.
    ``base_dir``: where a relative ``graph:`` path is read from (the spec file's folder); None: the working directory.
    """
    lines = _Lines()
    if isinstance(spec, str):
        data = _load_yaml(spec, lines)
    elif isinstance(spec, Mapping):
        data = spec
    else:
        raise SpecError(f"a chain spec is YAML text or a dict, not {type(spec).__name__}")
    if not isinstance(data, Mapping):
        looks_like_a_file = isinstance(spec, str) and "\n" not in spec.strip() and spec.strip().endswith((".yaml", ".yml"))
        raise SpecError(
            f"a chain spec is a mapping with 'name' and 'hops', not {type(data).__name__}",
            line=lines.of(),
            hint=(f"text is read as YAML itself; to read the file, pass a path: bench.chain(Path({spec.strip()!r:.200}))"
                  if looks_like_a_file else "start with  name: my_chain  and  hops:  followed by a list of hops"),
        )
    _reject_unknown(data, CHAIN_FIELDS, lines, hop=None, path=())
    name = data.get("name", default_name)
    check_chain_name(name, lines.of("name"))
    hops_data = data.get("hops")
    if not isinstance(hops_data, list) or not hops_data:
        raise SpecError(
            "'hops' must be a non-empty list of hops",
            field="hops",
            line=lines.of("hops"),
            hint="each hop is a mapping with a name and either model + prompt, or call",
        )
    if len(hops_data) > MAX_HOPS:
        raise SpecError(f"the chain has {len(hops_data)} hops; at most {MAX_HOPS} are allowed", field="hops",
                        line=lines.of("hops"), hint="split it into several chains, or join steps into fewer hops")
    declared = _declared_inputs(data, lines)
    hop_names = _hop_names(hops_data, lines)
    hops = [
        _parse_hop(raw, index, hop_names, known_models, lines, declared, allowed_modules, base_dir)
        for index, raw in enumerate(hops_data)
    ]
    _check_graph(hops, lines)
    _check_fallbacks(hops, hops_data, lines)
    if graphs is not None:
        _load_graphs(hops, graphs, lines)
    _adapters(hops, hops_data, known_adapters, lines)
    output = data.get("output", [h for h in hops if not h.standby][-1].name)
    if output not in hop_names:
        raise SpecError(
            f"output {_show(output)} is not a hop{did_you_mean(output, hop_names)}",
            field="output",
            line=lines.of("output"),
            hint=f"hops: {', '.join(hop_names)}",
        )
    if next(h for h in hops if h.name == output).standby:
        raise SpecError(
            f"output {output!r} is a fallback hop, which runs only when the hop it stands in for fails",
            field="output",
            line=lines.of("output"),
            hint="make the chain's output the hop that names it as a fallback",
        )
    history = data.get("history", DEFAULT_HISTORY)
    if not _is_int(history) or history < 0:
        raise SpecError("'history' is how many past runs a template sees: an integer >= 0", field="history",
                        line=lines.of("history"))
    inferred = sorted({v for h in hops for v in h.inputs} - RESERVED)
    inputs = tuple(declared) if declared is not None else tuple(inferred)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"'description' must be text, got {_show(description)}", field="description",
                        line=lines.of("description"))
    return ChainSpec(
        name=name.strip(),
        hops=hops,
        output=output,
        inputs=inputs,
        history=int(history),
        description=description,
        source=spec,
    )


# The line breaks YAML reads as a newline in every context: CR LF, a lone CR (old Mac files), NEL.
_NEWLINES = re.compile("\r\n?|\x85")


def _load_yaml(text: str, lines: _Lines) -> Any:
    # As "\n", so a line number counted here (a ReaderError's position) is the line YAML and an editor name.
    text = _NEWLINES.sub("\n", text)
    _check_size(text)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_expansion(node)
        data = yaml.safe_load(text)
    except RecursionError:
        raise SpecError(
            "the YAML nests too deeply to read",
            line=_deep_line(text),
            hint="a chain spec needs only a few levels: name, hops, their fields",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = mark.line + 1 if mark is not None else None
        position = getattr(exc, "position", None)  # a ReaderError (a character YAML does not allow) has no mark
        if line is None and isinstance(position, int):
            line = text.count("\n", 0, position) + 1
        raise SpecError(
            f"not valid YAML: {problem}",
            line=line,
            hint="check indentation and quote prompts that contain ': ' or start with '{'",
        ) from None
    if node is None:
        raise SpecError("the chain spec is empty", hint="start with  name: my_chain  and  hops:")
    lines.walk(node)
    return data


# Events of a YAML stream whose composed values number MAX_SPEC_VALUES at most: a mapping or a list starts and ends
# (two), a scalar or an alias is one, and the stream and its document start and end.
_MAX_YAML_EVENTS = 2 * MAX_SPEC_VALUES + 4
_MAX_YAML_DEPTH = 100  # as _deep_line looks for: far past any spec's few levels, far short of Python's stack


def _check_size(text: str) -> None:
    """Refuse YAML with more values than a spec may have before it is composed: composing all of one (8 MB of
    ``[1,1,...]``) took 110 s and 3.3 GB before the count refused it. The scan stops at the limit; YAML it cannot
    read is left for the load to say where."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML has it: 10 times faster
    depth = 0
    try:
        for count, event in enumerate(yaml.parse(text, Loader=loader), 1):
            if count > _MAX_YAML_EVENTS:
                raise SpecError(f"the YAML holds more than {MAX_SPEC_VALUES:,} values",
                                line=event.start_mark.line + 1,
                                hint="a chain spec or configuration needs a few dozen values")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > _MAX_YAML_DEPTH:  # composing 100,000 levels took ~0.9 s to find them too deep
                    raise SpecError("the YAML nests too deeply to read", line=event.start_mark.line + 1,
                                    hint="a chain spec needs only a few levels: name, hops, their fields")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own bound (1,000 flow levels), met scanning ahead
            mark = getattr(exc, "problem_mark", None)
            raise SpecError("the YAML nests too deeply to read", line=mark.line + 1 if mark is not None else None,
                            hint="a chain spec needs only a few levels: name, hops, their fields") from None
        return
    except RecursionError:
        return


def _check_expansion(root: yaml.Node) -> None:
    """Refuse aliases that would expand to more than MAX_SPEC_VALUES values, or that contain themselves.

    Counts each node once, with the size of what it stands for, so a bomb costs as many steps as
    it has lines.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # nodes whose children are still being counted: their ancestors' chain
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_counted = stack.pop()
        children = (
            node.value if isinstance(node, yaml.SequenceNode)
            else [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else []
        )
        if children_counted:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_SPEC_VALUES:
                raise SpecError(
                    f"the YAML's aliases (*name) expand to more than {MAX_SPEC_VALUES:,} values",
                    line=node.start_mark.line + 1,
                    hint="a chain spec needs a few dozen values; write them out instead of nesting aliases",
                )
            continue
        if id(node) in sizes:
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise SpecError(
                    "a YAML alias (*name) refers to a value that contains it, so it never ends",
                    line=child.start_mark.line + 1,
                    hint="an alias may repeat an earlier value, not the one it sits in",
                )
            if id(child) not in sizes:
                stack.append((child, False))


def _deep_line(text: str, depth: int = 100) -> int | None:
    """The line on which flow brackets or indentation first nest ``depth`` deep, if any."""
    open_brackets = 0
    for number, line in enumerate(text.splitlines(), 1):
        if len(line) - len(line.lstrip(" -")) >= depth:
            return number
        for char in line:
            open_brackets += char in "[{"
            open_brackets -= char in "]}"
            if open_brackets >= depth:
                return number
    return None


def _is_int(value: Any) -> bool:
    """An int, not a bool; a numpy integer counts (a dict spec built in a sweep): its holder stores ``int(value)``."""
    value = plain(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_unknown(
    data: Mapping[str, Any], allowed: Collection[str], lines: _Lines, hop: str | None, path: tuple[Any, ...]
) -> None:
    for key in data:
        if key not in allowed:
            raise SpecError(
                f"unknown field {key!r}{did_you_mean(key, allowed)}",
                hop=hop,
                field=str(key),
                line=lines.of(*path, key),
                hint=f"fields here: {', '.join(allowed)}",
            )


def _declared_inputs(data: Mapping[str, Any], lines: _Lines) -> list[str] | None:
    if "inputs" not in data:
        return None
    declared = data["inputs"]
    if not isinstance(declared, list) or not all(isinstance(x, str) and _NAME.match(x) for x in declared):
        raise SpecError("'inputs' must be a list of identifiers", field="inputs", line=lines.of("inputs"))
    bad = RESERVED.intersection(declared)
    if bad:
        raise SpecError(f"{sorted(bad)[0]!r} is reserved and cannot be an input", field="inputs",
                        line=lines.of("inputs"))
    return declared


def _hop_names(hops_data: list[Any], lines: _Lines) -> list[str]:
    names: list[str] = []
    first_line: dict[str, int | None] = {}
    for index, raw in enumerate(hops_data):
        if not isinstance(raw, Mapping):
            raise SpecError(
                f"hop #{index + 1} must be a mapping, not {type(raw).__name__}",
                field="hops",
                line=lines.of("hops", index),
            )
        name = raw.get("name")
        line = lines.of("hops", index, "name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise SpecError(
                f"hop #{index + 1} needs a name that is an identifier (letters, digits, _), got {_show(name)}",
                field="name",
                line=line,
                hint="templates refer to a hop's output by its name, as {{ name }}",
            )
        if name in RESERVED:
            raise SpecError(f"{name!r} is reserved and cannot name a hop", hop=name, field="name", line=line)
        if name in first_line:
            raise SpecError(
                f"two hops are named {name!r}" + (f" (the first on line {first_line[name]})" if first_line[name] else ""),
                hop=name,
                field="name",
                line=line,
            )
        first_line[name] = line
        names.append(name)
    return names


def _adapters(
    hops: list[HopSpec], hops_data: list[Any], known: Mapping[str, Collection[str]] | None, lines: _Lines
) -> None:
    """Set each LLM hop's ``adapter:``, which must name an adapter its model was loaded with (when they are known)."""
    for index, (hop, raw) in enumerate(zip(hops, hops_data)):
        if hop.kind != "llm" or raw.get("adapter") is None:
            continue
        adapter, line = raw["adapter"], lines.of("hops", index, "adapter")
        if not isinstance(adapter, str) or not adapter.isidentifier():
            raise SpecError(f"adapter must be the name of one of the model's LoRA adapters, not {_show(adapter)}",
                            hop=hop.name, field="adapter", line=line, hint="e.g. adapter: sql")
        choices = sorted(known.get(hop.model or "", ())) if known is not None else None
        if choices is not None and adapter not in choices:
            raise SpecError(
                f"model {hop.model!r} has no adapter {adapter!r}{did_you_mean(adapter, choices)}",
                hop=hop.name, field="adapter", line=line,
                hint=f"its adapters: {', '.join(choices)}; leave adapter: out for the base model" if choices
                else f"load it with adapters: bench.load({hop.model!r}, PATH, adapters={{{adapter!r}: DIR}})",
            )
        hop.adapter = adapter


def _parse_hop(
    raw: Mapping[str, Any],
    index: int,
    hop_names: list[str],
    known_models: Collection[str] | None,
    lines: _Lines,
    declared: list[str] | None,
    allowed_modules: Collection[str],
    base_dir: Path | None = None,
) -> HopSpec:
    name = raw["name"]
    path = ("hops", index)
    kind = raw.get("kind") or ("python" if "call" in raw else "knowledge" if "graph" in raw else "llm")
    if kind not in KINDS:
        raise SpecError(f"kind must be 'llm', 'python' or 'knowledge', not {_show(kind)}{did_you_mean(kind, KINDS)}",
                        hop=name, field="kind", line=lines.of(*path, "kind"))
    fields = {"llm": LLM_FIELDS, "python": PYTHON_FIELDS, "knowledge": KNOWLEDGE_FIELDS}[kind]
    _reject_unknown(raw, fields, lines, name, path)
    available = set(hop_names) | RESERVED | set(declared or ())
    if kind == "llm":
        hop = _parse_llm_hop(raw, name, path, known_models, lines)
    elif kind == "knowledge":
        hop = _parse_knowledge_hop(raw, name, path, lines, base_dir)
    else:
        hop = _parse_python_hop(raw, name, path, hop_names, lines, allowed_modules)
        if "timeout_s" in raw and not inspect.iscoroutinefunction(hop.call):
            raise SpecError("timeout_s applies to model calls and async def hops; a plain Python function cannot be "
                            "cancelled once it runs", hop=name, field="timeout_s", line=lines.of(*path, "timeout_s"),
                            hint="make it async def, put the timeout inside the function, or give the hop retry and "
                            "a fallback hop")
    hop.line = lines.of(*path)
    hop.resilience = _resilience(raw, name, kind, path, hop_names, known_models, lines)
    missing = sorted(hop.inputs - available) if declared is not None else []
    if missing:
        variable = missing[0]
        field = hop.text_field if kind != "python" else "call"
        raise SpecError(
            f"{variable!r} is used but is neither a chain input nor a hop{did_you_mean(variable, available)}",
            hop=name,
            field=field,
            line=lines.of(*path, field),
            hint=f"inputs: {', '.join(declared or ()) or 'none'}; hops: {', '.join(hop_names)}",
        )
    return hop


def _parse_llm_hop(
    raw: Mapping[str, Any],
    name: str,
    path: tuple[Any, ...],
    known_models: Collection[str] | None,
    lines: _Lines,
) -> HopSpec:
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise SpecError("an LLM hop needs 'model', the name of a loaded model", hop=name, field="model",
                        line=lines.of(*path, "model"))
    if known_models is not None and model not in known_models:
        raise SpecError(
            f"unknown model {model!r}{did_you_mean(model, known_models)}",
            hop=name,
            field="model",
            line=lines.of(*path, "model"),
            hint=f"known models: {', '.join(sorted(known_models))}" if known_models
            else "no model is loaded: bench.load(NAME, PATH) or %autoglm load NAME PATH",
        )
    if "prompt" in raw and "messages" in raw:
        raise SpecError("a hop takes 'prompt' or 'messages', not both", hop=name, field="messages",
                        line=lines.of(*path, "messages"),
                        hint="'prompt' is one template sent as text; 'messages' is a chat, a list of {role, content}")
    template, messages = None, None
    if "messages" in raw:
        messages = _messages(raw["messages"], name, path, lines)
        hop_vars = {v for _, content in messages for v in content.variables}
    else:
        prompt = raw.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SpecError("an LLM hop needs 'prompt', a template string, or 'messages', a list of chat messages",
                            hop=name, field="prompt", line=lines.of(*path, "prompt"),
                            hint='e.g. prompt: "Question: {{ question }}\\nAnswer:"  or  '
                            'messages: [{role: user, content: "{{ question }}"}]')
        template = PromptTemplate(prompt, hop=name, line=lines.of(*path, "prompt"))
        hop_vars = set(template.variables)
    params = _generation_params(raw, name, path, lines)
    cache = _cache(raw, name, path, lines, params, template) if "cache" in raw else NO_CACHE
    if messages is not None and params.truncate == "left":
        # The cut would fall in the chat template's own text (its role markers), not in what a message says.
        raise SpecError("truncate: left cuts a prompt's oldest tokens, and a chat's messages cannot be cut that way",
                        hop=name, field="truncate", line=lines.of(*path, "truncate"),
                        hint="shorten the messages, or lower max_new_tokens")
    return HopSpec(
        name=name,
        kind="llm",
        model=model,
        template=template,
        messages=messages,
        params=params,
        cache=cache,
        deps=(),  # resolved once every hop name is known, in _check_graph
        inputs=frozenset(hop_vars),
    )


def _messages(value: Any, name: str, path: tuple[Any, ...], lines: _Lines) -> tuple[tuple[str, PromptTemplate], ...]:
    """A chat hop's ``messages``: each a role and a content template, checked like a prompt."""
    example = 'e.g. messages: [{role: system, content: "You answer briefly."}, {role: user, content: "{{ question }}"}]'
    if not isinstance(value, list) or not value:
        raise SpecError(f"'messages' must be a non-empty list of {{role, content}}, got {_show(value)}", hop=name,
                        field="messages", line=lines.of(*path, "messages"), hint=example)
    messages = []
    for index, message in enumerate(value):
        where = (*path, "messages", index)
        field = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise SpecError(f"message #{index + 1} must be a mapping with role and content, got {_show(message)}",
                            hop=name, field=field, line=lines.of(*where), hint=example)
        _reject_unknown(message, MESSAGE_FIELDS, lines, name, where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise SpecError(f"message #{index + 1} needs a role: {', '.join(ROLES)}; got {_show(role)}"
                            f"{did_you_mean(role, ROLES)}", hop=name, field=f"{field}.role",
                            line=lines.of(*where, "role"))
        if not isinstance(content, str) or not content.strip():
            raise SpecError(f"message #{index + 1} needs 'content', a template string, got {_show(content)}",
                            hop=name, field=f"{field}.content", line=lines.of(*where, "content"))
        template = PromptTemplate(content, hop=name, line=lines.of(*where, "content"), field=f"{field}.content")
        messages.append((role, template))
    return tuple(messages)


def _generation_params(raw: Mapping[str, Any], name: str, path: tuple[Any, ...], lines: _Lines) -> GenerationParams:
    def bad(key: str, what: str) -> SpecError:
        return SpecError(f"{key} must be {what}, got {_show(raw[key])}", hop=name, field=key,
                         line=lines.of(*path, key))

    values: dict[str, Any] = {}
    if "max_new_tokens" in raw:
        if not _is_int(raw["max_new_tokens"]) or raw["max_new_tokens"] < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        values["max_new_tokens"] = raw["max_new_tokens"]
    if "temperature" in raw:
        t = raw["temperature"]
        if not _number(t) or t < 0:
            raise bad("temperature", "a number >= 0 (0 is greedy)")
        values["temperature"] = float(t)
    if "top_p" in raw:
        p = raw["top_p"]
        if not _number(p) or not 0 < p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        values["top_p"] = float(p)
    if "top_k" in raw:
        if not _is_int(raw["top_k"]) or raw["top_k"] < 0:
            raise bad("top_k", "an integer >= 0 (0 turns it off)")
        values["top_k"] = raw["top_k"]
    if "seed" in raw:
        if not _is_int(raw["seed"]) or not 0 <= raw["seed"] <= MAX_SEED:
            raise bad("seed", f"an integer from 0 to 2**63 - 1 ({MAX_SEED})")
        values["seed"] = raw["seed"]
    if "truncate" in raw:
        if raw["truncate"] not in ("error", "left"):
            raise bad("truncate", "'error' or 'left'")
        values["truncate"] = raw["truncate"]
    return GenerationParams(**values)


def fixed_prefix(template: PromptTemplate) -> str:
    """The text a prompt template renders the same for every input: what comes before its first tag."""
    source = template.source
    return source[:min((i for i in (source.find(t) for t in ("{{", "{%", "{#")) if i >= 0), default=len(source))]


def _cache(
    raw: Mapping[str, Any], name: str, path: tuple[Any, ...], lines: _Lines, params: GenerationParams,
    template: PromptTemplate | None,
) -> HopCache:
    """The hop's ``cache:``: a mode (``off``, ``exact``, ``prefix``), a list of them, or ``{mode: ..., force: ...}``."""
    value, line = raw["cache"], lines.of(*path, "cache")
    example = "e.g. cache: exact, cache: prefix, cache: [exact, prefix] or cache: {mode: exact, force: true}"
    force = False
    if isinstance(value, Mapping):
        _reject_unknown(value, CACHE_FIELDS, lines, name, (*path, "cache"))
        force = value.get("force", False)
        if not isinstance(force, bool):
            raise SpecError(f"cache.force must be true or false, got {_show(force)}", hop=name, field="cache.force",
                            line=lines.of(*path, "cache", "force"))
        if "mode" not in value:
            raise SpecError("cache needs a mode", hop=name, field="cache.mode", line=line, hint=example)
        value = value["mode"]
    modes = value if isinstance(value, list) else [value]
    for mode in modes:
        if mode is False or mode is None:  # YAML 1.1 reads an unquoted off as false
            mode = "off"
        if not isinstance(mode, str) or mode not in CACHE_MODES:
            raise SpecError(f"cache mode must be one of {', '.join(CACHE_MODES)}, got {_show(mode)}"
                            f"{did_you_mean(mode, CACHE_MODES)}", hop=name, field="cache", line=line, hint=example)
    chosen = {"off" if m is False or m is None else m for m in modes}
    if "off" in chosen and len(chosen) > 1:
        raise SpecError("cache: off cannot be listed with other modes", hop=name, field="cache", line=line)
    cache = HopCache(exact="exact" in chosen, prefix="prefix" in chosen, force=force)
    if cache.exact and not params.greedy and not force:
        raise SpecError(
            f"cache: exact on a sampling hop (temperature {params.temperature:g}) would give every later run the "
            "first run's sample, where the hop asks for a fresh one each time",
            hop=name, field="cache", line=line,
            hint="set temperature: 0 (greedy, the same answer each time anyway), or cache: {mode: exact, force: true} "
            "if one stored sample per prompt is what you want",
        )
    if cache.prefix:
        if template is None:
            raise SpecError("cache: prefix reuses a prompt's fixed text, and a chat hop (messages:) has none here",
                            hop=name, field="cache", line=line, hint="give the hop prompt: instead, or cache: exact")
        if not fixed_prefix(template).strip():
            raise SpecError("cache: prefix needs fixed text before the prompt's first {{ ... }}, and this prompt "
                            "starts with one", hop=name, field="cache", line=line,
                            hint="put the instructions every input shares first, the {{ variables }} after them")
    return cache


def _number(value: Any) -> bool:
    """A finite int or float: YAML's .inf and .nan are floats, but no setting means them. A numpy number counts. An
    int too large for a float is none either (every setting is read as a float: OverflowError)."""
    value = plain(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isfinite(value) if isinstance(value, float) else -_FLOAT_MAX <= value <= _FLOAT_MAX


_FLOAT_MAX = int(sys.float_info.max)


def _resilience(
    raw: Mapping[str, Any],
    name: str,
    kind: str,
    path: tuple[Any, ...],
    hop_names: list[str],
    known_models: Collection[str] | None,
    lines: _Lines,
) -> Resilience:
    """The hop's ``retry``, ``timeout_s`` and ``fallback`` keys, checked."""
    retry = _retry(raw["retry"], name, path, lines) if raw.get("retry") is not None else None
    timeout = raw.get("timeout_s")
    if timeout is not None and (not _number(timeout) or not 0 < timeout <= MAX_SECONDS):
        raise SpecError(f"timeout_s must be a number of seconds > 0 and at most {MAX_SECONDS} (a day), "
                        f"got {_show(timeout)}", hop=name, field="timeout_s",
                        line=lines.of(*path, "timeout_s"), hint="it bounds each attempt of the hop's model call")
    fallback = _fallbacks(raw.get("fallback"), name, kind, path, hop_names, known_models, lines)
    if retry is None and timeout is None and not fallback:
        return NO_RESILIENCE
    return Resilience(retry=retry, timeout_s=float(timeout) if timeout is not None else None, fallback=fallback)


def _retry(value: Any, name: str, path: tuple[Any, ...], lines: _Lines) -> RetryPolicy:
    line = lines.of(*path, "retry")
    if _is_int(value):
        value = {"attempts": value}
    if not isinstance(value, Mapping):
        raise SpecError(f"retry must be a number of attempts or a mapping, got {_show(value)}", hop=name, field="retry",
                        line=line, hint="e.g. retry: {attempts: 4, backoff_ms: 50, on: [error, timeout]}")
    # YAML 1.1 (PyYAML's) reads an unquoted key ``on`` as the boolean true.
    value = {("on" if key is True else key): item for key, item in value.items()}
    _reject_unknown(value, RETRY_FIELDS, lines, name, (*path, "retry"))

    def bad(key: str, what: str) -> SpecError:
        return SpecError(f"retry.{key} must be {what}, got {_show(value[key])}", hop=name, field=f"retry.{key}",
                         line=lines.of(*path, "retry", key))

    settings: dict[str, Any] = {}
    if "attempts" in value:
        if not _is_int(value["attempts"]) or not 1 <= value["attempts"] <= MAX_ATTEMPTS:
            raise bad("attempts", f"an integer from 1 to {MAX_ATTEMPTS} (every try, the first included)")
        settings["attempts"] = int(value["attempts"])
    for key in ("backoff_ms", "max_backoff_ms"):
        if key in value:
            if not _number(value[key]) or not 0 <= value[key] <= MAX_SECONDS * 1e3:
                raise bad(key, f"a number of milliseconds >= 0 and at most {MAX_SECONDS * 1000} (a day)")
            settings[key] = float(value[key])
    backoff = settings.get("backoff_ms", RetryPolicy.backoff_ms)
    if settings.setdefault("max_backoff_ms", max(backoff, RetryPolicy.max_backoff_ms)) < backoff:
        raise bad("max_backoff_ms", f"at least backoff_ms ({backoff:g})")
    if "jitter" in value:
        if not isinstance(value["jitter"], bool):
            raise bad("jitter", "true or false")
        settings["jitter"] = value["jitter"]
    if "max_total_s" in value:
        if not _number(value["max_total_s"]) or not 0 < value["max_total_s"] <= MAX_SECONDS:
            raise bad("max_total_s", f"a number of seconds > 0 and at most {MAX_SECONDS} (a day)")
        settings["max_total_s"] = float(value["max_total_s"])
    if "on" in value:
        kinds = [value["on"]] if isinstance(value["on"], str) else value["on"]
        if not isinstance(kinds, list) or not kinds or not all(isinstance(k, str) for k in kinds):
            raise bad("on", f"a list of failure kinds from {', '.join(ERROR_KINDS)}")
        for kind in kinds:
            if kind not in ERROR_KINDS:
                raise SpecError(
                    f"retry.on names {kind!r}, which is not a kind of failure{did_you_mean(kind, ERROR_KINDS)}",
                    hop=name, field="retry.on", line=lines.of(*path, "retry", "on"),
                    hint=f"kinds: {', '.join(ERROR_KINDS)}",
                )
        settings["on"] = tuple(dict.fromkeys(kinds))
    return RetryPolicy(**settings)


def _fallbacks(
    value: Any,
    name: str,
    kind: str,
    path: tuple[Any, ...],
    hop_names: list[str],
    known_models: Collection[str] | None,
    lines: _Lines,
) -> tuple[Fallback, ...]:
    if value is None:
        return ()
    line = lines.of(*path, "fallback")
    targets = [value] if isinstance(value, str) else value
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise SpecError(f"fallback must be a model or hop name, or a list of them, got {_show(value)}", hop=name,
                        field="fallback", line=line, hint="e.g. fallback: [small_model, canned_answer]")
    fallbacks = []
    for index, target in enumerate(targets):
        is_hop, is_model = target in hop_names, known_models is not None and target in known_models
        if target == name:
            raise SpecError("a hop cannot be its own fallback", hop=name, field="fallback", line=line)
        if target in targets[:index]:
            raise SpecError(f"fallback names {target!r} twice", hop=name, field="fallback", line=line)
        if is_hop and is_model:
            raise SpecError(f"fallback {target!r} names both a hop and a model", hop=name, field="fallback", line=line,
                            hint="rename the hop, so the fallback says which it means")
        if not is_hop and known_models is not None and not is_model:
            choices = [*hop_names, *known_models]
            raise SpecError(f"fallback {target!r} is neither a hop nor a known model{did_you_mean(target, choices)}",
                            hop=name, field="fallback", line=line,
                            hint=f"hops: {', '.join(hop_names)}; models: {', '.join(sorted(known_models)) or 'none'}")
        if not is_hop and kind == "python":
            raise SpecError(f"fallback {target!r} is a model, but a Python hop has no prompt to send it", hop=name,
                            field="fallback", line=line, hint="name a fallback hop instead")
        fallbacks.append(Fallback("hop" if is_hop else "model", target))
    return tuple(fallbacks)


def _check_fallbacks(hops: list[HopSpec], hops_data: list[Any], lines: _Lines) -> None:
    """Mark fallback hops as standby and refuse what could not run: they see only what the failed hop saw.

    A standby hop runs in place of the hop that failed, with that hop's values, so it may read
    only chain inputs and the hops that hop reads; no hop may read a standby hop's output. A
    Python hop that takes the whole context (no ``uses``, no named parameters) needs nothing in
    particular: as a standby it reads what its hops (every hop naming it) all read, and otherwise it no
    longer waits for standby hops.
    """
    by_name = {h.name: h for h in hops}
    whole_context = {
        h.name for h, raw in zip(hops, hops_data) if h.kind == "python" and h.call_by_name is None and "uses" not in raw
    }
    standby: set[str] = set()
    for index, hop in enumerate(hops):
        for fallback in hop.resilience.fallback:
            if fallback.kind != "hop":
                continue
            target = by_name[fallback.name]
            if any(f.kind == "hop" for f in target.resilience.fallback):
                raise SpecError(f"{target.name!r} is a fallback of hop {hop.name!r}, so it cannot name fallback hops "
                                "of its own", hop=target.name, field="fallback",
                                line=lines.of("hops", hops.index(target), "fallback"),
                                hint="list every fallback on the first hop, in the order to try them")
            if target.name in whole_context:
                # It reads what every hop it stands in for reads, whichever of them the spec lists first.
                target.deps = hop.deps if target.name not in standby else tuple(
                    d for d in target.deps if d in hop.deps)
            unseen = sorted(set(target.deps) - set(hop.deps))
            if unseen:
                raise SpecError(
                    f"fallback hop {target.name!r} reads {unseen[0]!r}, which hop {hop.name!r} does not read",
                    hop=hop.name, field="fallback", line=lines.of("hops", index, "fallback"),
                    hint="a fallback hop runs in place of the failed hop and sees only the values that hop sees",
                )
            target.standby = True
            standby.add(target.name)
    for hop in hops:
        if hop.name in whole_context and not hop.standby:
            hop.deps = tuple(d for d in hop.deps if d not in standby)
        readers = sorted(standby.intersection(hop.deps))
        if readers:
            raise SpecError(
                f"the hop reads {readers[0]!r}, a fallback hop that runs only when the hop it stands in for fails",
                hop=hop.name, field=hop.text_field if hop.kind != "python" else "uses",
                line=lines.of("hops", hops.index(hop)),
                hint="read the output of the hop that names it as a fallback instead",
            )


def _parse_python_hop(
    raw: Mapping[str, Any],
    name: str,
    path: tuple[Any, ...],
    hop_names: list[str],
    lines: _Lines,
    allowed_modules: Collection[str],
) -> HopSpec:
    call = raw.get("call")
    line = lines.of(*path, "call")
    if isinstance(call, str):
        call = import_callable(call, hop=name, line=line, allowed=allowed_modules)
    if not callable(call):
        raise SpecError(
            "a Python hop needs 'call': a function, or its dotted path like 'package.module:function'",
            hop=name,
            field="call",
            line=line,
        )
    if inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call):
        # Called, it returns a generator that nothing iterates: the hop's output would be "<generator object ...>".
        raise SpecError(
            f"{getattr(call, '__qualname__', 'the function')} yields: a Python hop returns its output, once",
            hop=name,
            field="call",
            line=line,
            hint="collect what it yields and return that, e.g. return list(...)",
        )
    by_name, required = _parameter_names(call)
    uses = raw.get("uses")
    earlier = hop_names[: hop_names.index(name)]
    if uses is not None:
        if not isinstance(uses, list) or not all(isinstance(u, str) for u in uses):
            raise SpecError("'uses' must be a list of hop names", hop=name, field="uses", line=lines.of(*path, "uses"))
        for used in uses:
            if used not in hop_names:
                raise SpecError(f"'uses' names {used!r}, which is not a hop{did_you_mean(used, hop_names)}",
                                hop=name, field="uses", line=lines.of(*path, "uses"))
        deps = tuple(uses)
    elif by_name is not None:
        deps = tuple(n for n in by_name if n in hop_names)
    else:
        deps = tuple(earlier)
    names = frozenset(required) - set(hop_names)
    return HopSpec(name=name, kind="python", call=call, call_by_name=by_name, deps=deps, inputs=names,
                   context_as_keywords=by_name is None and _keywords_only(call))


def import_callable(
    path: str, hop: str | None = None, line: int | None = None, allowed: Collection[str] = ()
) -> Callable[..., Any]:
    """Import ``package.module:function`` or ``package.module.function`` from a module the user may call into.

    Never evaluates code from the string; a module that ``trust.refusal`` refuses is not even imported.
    ``allowed`` lists the modules (and packages) the user opened besides their own code.
    """
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute or not all(_NAME.match(p) for p in (*module_name.split("."), attribute)):
        raise SpecError(
            f"{path!r} is not a dotted path to a function",
            hop=hop,
            field="call",
            line=line,
            hint="write it as 'package.module:function'",
        )
    _check_trusted(path, module_name, allowed, hop, line)
    if attribute.startswith("__"):
        raise SpecError(f"{path!r} names {attribute!r}, a module's internals, not a function", hop=hop, field="call",
                        line=line)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"cannot import module {module_name!r}: {exc}", hop=hop, field="call", line=line) from None
    except Exception as exc:  # the module's own code failed as it ran: a SyntaxError, or any raise at import
        raise SpecError(
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}",
            hop=hop,
            field="call",
            line=line,
            hint=f"fix the module (python -c 'import {module_name}' shows the traceback), then build the chain again",
        ) from None
    target = getattr(module, attribute, None)
    if target is None or not callable(target):
        raise SpecError(f"module {module_name!r} has no function {attribute!r}", hop=hop, field="call", line=line)
    owner = _code_module(target)
    if owner is not None and owner != module_name:
        # Your module may import os.system; naming it through your module does not make it yours, nor does allowing
        # your module (a server's --allow-module) open what it imports.
        _check_trusted(path, owner, allowed, hop, line, via=module_name)
    return target  # type: ignore[no-any-return]


def _code_module(target: Any) -> str | None:
    """The module whose code runs when ``target`` is called: a function's or class's own; a callable object's class's
    (a notebook's ``exit`` is IPython's ExitAutocall: calling it ends the kernel); a partial's function's."""
    while isinstance(target, functools.partial):
        target = target.func
    owner = getattr(target if inspect.isroutine(target) or inspect.isclass(target) else type(target), "__module__",
                    None)
    return owner if isinstance(owner, str) else None


def _check_trusted(
    path: str, module: str, allowed: Collection[str], hop: str | None, line: int | None, via: str | None = None
) -> None:
    reason = trust.refusal(module, allowed)
    if reason is None:
        return
    top = module.partition(".")[0]
    found = f"{path!r} comes from module {module!r} (imported into {via!r})" if via else \
        f"{path!r} is in module {module!r}"
    raise SpecError(
        f"{found}, and {reason}: a spec may call only your own code",
        hop=hop,
        field="call",
        line=line,
        hint=f"if you trust every spec you run to call into {top!r}, allow it: "
        f"wb.Workbench(allow_modules=[{top!r}]), bench.allow_modules({top!r}) or autoglm run --allow-module {top}",
    )


def _parameter_names(call: Callable[..., Any]) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """Names to bind by keyword (None: pass the whole context) and which of them are required."""
    try:
        parameters = list(inspect.signature(call).parameters.values())
    except (TypeError, ValueError):
        return None, ()
    if not parameters:
        return (), ()  # takes nothing (a clock, a fixed document): called with nothing
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not named or (len(named) == 1 and named[0].name in ("context", "ctx")):
        return None, ()
    return tuple(p.name for p in named), tuple(p.name for p in named if p.default is p.empty)


def _keywords_only(call: Callable[..., Any]) -> bool:
    """Whether ``call`` takes nothing but ``**keywords``: it is handed the context that way."""
    try:
        kinds = {p.kind for p in inspect.signature(call).parameters.values()}
    except (TypeError, ValueError):
        return False
    return kinds == {inspect.Parameter.VAR_KEYWORD}


def _check_graph(hops: list[HopSpec], lines: _Lines) -> None:
    """Resolve LLM and knowledge hops' dependencies from their templates, then refuse cycles."""
    names = {h.name for h in hops}
    for index, hop in enumerate(hops):
        if hop.kind in ("llm", "knowledge"):
            hop.deps = tuple(sorted(hop.inputs & names))
            hop.inputs = frozenset(hop.inputs - names)
        if hop.name in hop.deps:
            raise SpecError(
                "the hop uses its own output", hop=hop.name, field=hop.text_field if hop.kind != "python" else "uses",
                line=lines.of("hops", index),
            )
    sorter = graphlib.TopologicalSorter({h.name: h.deps for h in hops})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        first = cycle[0]
        raise SpecError(
            f"the hops form a cycle: {' -> '.join(cycle)}",
            hop=first,
            line=lines.of("hops", [h.name for h in hops].index(first)),
            hint="a hop can only use the outputs of hops that do not, in turn, use it",
        ) from None


def _parse_knowledge_hop(
    raw: Mapping[str, Any], name: str, path: tuple[Any, ...], lines: _Lines, base_dir: Path | None
) -> HopSpec:
    """A ``kind: knowledge`` hop: ``graph`` (a demo graph or a file), ``query`` (a template), ``hops``,
    ``max_triples``."""
    if "graph" not in raw:
        raise SpecError("a knowledge hop needs 'graph': a demo graph's name or a path to a .csv or .json file",
                        hop=name, field="graph", line=lines.of(*path), hint="e.g. graph: countries")
    if trust.serving() and not (isinstance(raw["graph"], str) and raw["graph"] in DEMO_GRAPHS):
        # A client's spec must not read the server's files into a prompt (and its answer): only shipped graphs.
        raise GraphError(f"a spec sent to a server may name only the shipped graphs ({', '.join(DEMO_GRAPHS)}), "
                         f"not {_show(raw['graph'])}", hop=name, field="graph", line=lines.of(*path, "graph"),
                         hint="load your own triples in the server's notebook or spec file instead")
    try:
        source = resolve(raw["graph"], base_dir)
    except GraphError as exc:
        raise GraphError(exc.message, hop=name, field="graph", line=lines.of(*path, "graph"), hint=exc.hint) from None
    query = raw.get("query")
    if not isinstance(query, str) or not query.strip():
        raise SpecError("a knowledge hop needs 'query', a template whose text names the entities to look up",
                        hop=name, field="query", line=lines.of(*path, "query"),
                        hint='e.g. query: "{{ question }}"')
    template = PromptTemplate(query, hop=name, line=lines.of(*path, "query"), field="query")
    hops, max_triples = raw.get("hops", 1), raw.get("max_triples", DEFAULT_MAX_TRIPLES)
    if not _is_int(hops) or not 1 <= hops <= MAX_KNOWLEDGE_HOPS:
        raise SpecError(f"hops must be an integer from 1 to {MAX_KNOWLEDGE_HOPS}, got {_show(hops)}", hop=name,
                        field="hops", line=lines.of(*path, "hops"),
                        hint="1: the facts that name what the query mentions; 2: also the facts about those")
    if not _is_int(max_triples) or not 1 <= max_triples <= MAX_TRIPLES_PER_HOP:
        raise SpecError(f"max_triples must be an integer from 1 to {MAX_TRIPLES_PER_HOP}, got {_show(max_triples)}",
                        hop=name, field="max_triples", line=lines.of(*path, "max_triples"),
                        hint="it caps the facts (one line each) the hop hands the next prompt")
    return HopSpec(name=name, kind="knowledge", inputs=frozenset(template.variables),
                   knowledge=KnowledgeQuery(source, template, int(hops), int(max_triples)))


def _load_graphs(hops: list[HopSpec], graphs: GraphStore, lines: _Lines) -> None:
    """Read each knowledge hop's graph into ``graphs``, so a malformed file fails with the hop that names it."""
    for index, hop in enumerate(hops):
        if hop.knowledge is None:
            continue
        try:
            graphs.get(hop.knowledge.source)
        except GraphError as exc:
            raise GraphError(exc.message, hop=hop.name, field="graph", line=lines.of("hops", index, "graph"),
                             hint=exc.hint) from None
