"""Chain specs from YAML, dicts or Python objects, validated with errors that say where."""

from __future__ import annotations

import difflib
import graphlib
import importlib
import inspect
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from workbench.chains.templates import PromptTemplate
from workbench.engine.requests import GenerationParams
from workbench.errors import SpecError

CHAIN_FIELDS = ("name", "description", "inputs", "hops", "output", "history")
LLM_FIELDS = ("name", "kind", "model", "prompt", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "truncate")
PYTHON_FIELDS = ("name", "kind", "call", "uses")
RESERVED = frozenset({"history", "session"})
DEFAULT_HISTORY = 5
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class HopSpec:
    """One validated hop: an LLM call or a Python function, and the hops it depends on."""

    name: str
    kind: Literal["llm", "python"]
    deps: tuple[str, ...] = ()
    inputs: frozenset[str] = frozenset()
    model: str | None = None
    template: PromptTemplate | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    call: Callable[..., Any] | None = None
    call_by_name: tuple[str, ...] | None = None  # parameter names, or None to pass the context
    line: int | None = None

    @property
    def prompt(self) -> str | None:
        return self.template.source if self.template else None

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

    def hop(self, name: str) -> HopSpec:
        return next(h for h in self.hops if h.name == name)

    def deps(self) -> dict[str, tuple[str, ...]]:
        return {h.name: h.deps for h in self.hops}

    def models(self) -> list[str]:
        return sorted({h.model for h in self.hops if h.model})


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

    def walk(self, node: yaml.Node, path: tuple[Any, ...] = ()) -> None:
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
                self.by_path[(*path, key.value)] = line
                self.walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.by_path[(*path, index)] = item.start_mark.line + 1
                self.walk(item, (*path, index))


def parse_spec(
    spec: str | Mapping[str, Any],
    known_models: Collection[str] | None = None,
    default_name: str | None = None,
) -> ChainSpec:
    """Validate ``spec`` (YAML text or a dict) into a ChainSpec, or raise SpecError saying where."""
    lines = _Lines()
    if isinstance(spec, str):
        data = _load_yaml(spec, lines)
    elif isinstance(spec, Mapping):
        data = spec
    else:
        raise SpecError(f"a chain spec is YAML text or a dict, not {type(spec).__name__}")
    if not isinstance(data, Mapping):
        raise SpecError(
            f"a chain spec is a mapping with 'name' and 'hops', not {type(data).__name__}",
            line=lines.of(),
            hint="start with  name: my_chain  and  hops:  followed by a list of hops",
        )
    _reject_unknown(data, CHAIN_FIELDS, lines, hop=None, path=())
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise SpecError("the chain needs a name (a non-empty string)", field="name", line=lines.of("name"))
    hops_data = data.get("hops")
    if not isinstance(hops_data, list) or not hops_data:
        raise SpecError(
            "'hops' must be a non-empty list of hops",
            field="hops",
            line=lines.of("hops"),
            hint="each hop is a mapping with a name and either model + prompt, or call",
        )
    declared = _declared_inputs(data, lines)
    hop_names = _hop_names(hops_data, lines)
    hops = [
        _parse_hop(raw, index, hop_names, known_models, lines, declared)
        for index, raw in enumerate(hops_data)
    ]
    _check_graph(hops, lines)
    output = data.get("output", hops[-1].name)
    if output not in hop_names:
        raise SpecError(
            f"output {output!r} is not a hop{_did_you_mean(output, hop_names)}",
            field="output",
            line=lines.of("output"),
            hint=f"hops: {', '.join(hop_names)}",
        )
    history = data.get("history", DEFAULT_HISTORY)
    if not _is_int(history) or history < 0:
        raise SpecError("'history' is how many past runs a template sees: an integer >= 0", field="history",
                        line=lines.of("history"))
    inferred = sorted({v for h in hops for v in h.inputs} - RESERVED)
    inputs = tuple(declared) if declared is not None else tuple(inferred)
    description = data.get("description", "")
    return ChainSpec(
        name=name.strip(),
        hops=hops,
        output=output,
        inputs=inputs,
        history=history,
        description=str(description),
        source=spec,
    )


def _load_yaml(text: str, lines: _Lines) -> Any:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(
            f"not valid YAML: {problem}",
            line=mark.line + 1 if mark is not None else None,
            hint="check indentation and quote prompts that contain ': ' or start with '{'",
        ) from None
    if node is None:
        raise SpecError("the chain spec is empty", hint="start with  name: my_chain  and  hops:")
    lines.walk(node)
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _did_you_mean(word: Any, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _reject_unknown(
    data: Mapping[str, Any], allowed: Collection[str], lines: _Lines, hop: str | None, path: tuple[Any, ...]
) -> None:
    for key in data:
        if key not in allowed:
            raise SpecError(
                f"unknown field {key!r}{_did_you_mean(key, allowed)}",
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
                f"hop #{index + 1} needs a name that is an identifier (letters, digits, _), got {name!r}",
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


def _parse_hop(
    raw: Mapping[str, Any],
    index: int,
    hop_names: list[str],
    known_models: Collection[str] | None,
    lines: _Lines,
    declared: list[str] | None,
) -> HopSpec:
    name = raw["name"]
    path = ("hops", index)
    kind = raw.get("kind") or ("python" if "call" in raw else "llm")
    if kind not in ("llm", "python"):
        raise SpecError(f"kind must be 'llm' or 'python', not {kind!r}", hop=name, field="kind",
                        line=lines.of(*path, "kind"))
    _reject_unknown(raw, LLM_FIELDS if kind == "llm" else PYTHON_FIELDS, lines, name, path)
    available = set(hop_names) | RESERVED | set(declared or ())
    if kind == "llm":
        hop = _parse_llm_hop(raw, name, path, known_models, lines)
    else:
        hop = _parse_python_hop(raw, name, path, hop_names, lines)
    hop.line = lines.of(*path)
    missing = sorted(hop.inputs - available) if declared is not None else []
    if missing:
        variable = missing[0]
        raise SpecError(
            f"{variable!r} is used but is neither a chain input nor a hop{_did_you_mean(variable, available)}",
            hop=name,
            field="prompt" if kind == "llm" else "call",
            line=lines.of(*path, "prompt" if kind == "llm" else "call"),
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
            f"unknown model {model!r}{_did_you_mean(model, known_models)}",
            hop=name,
            field="model",
            line=lines.of(*path, "model"),
            hint=f"known models: {', '.join(sorted(known_models))}" if known_models
            else "no model is loaded: bench.load(NAME, PATH) or %autoglm load NAME PATH",
        )
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecError("an LLM hop needs 'prompt', a template string", hop=name, field="prompt",
                        line=lines.of(*path, "prompt"))
    template = PromptTemplate(prompt, hop=name, line=lines.of(*path, "prompt"))
    params = _generation_params(raw, name, path, lines)
    hop_vars = set(template.variables)
    return HopSpec(
        name=name,
        kind="llm",
        model=model,
        template=template,
        params=params,
        deps=(),  # resolved once every hop name is known, in _check_graph
        inputs=frozenset(hop_vars),
    )


def _generation_params(raw: Mapping[str, Any], name: str, path: tuple[Any, ...], lines: _Lines) -> GenerationParams:
    def bad(key: str, what: str) -> SpecError:
        return SpecError(f"{key} must be {what}, got {raw[key]!r}", hop=name, field=key, line=lines.of(*path, key))

    values: dict[str, Any] = {}
    if "max_new_tokens" in raw:
        if not _is_int(raw["max_new_tokens"]) or raw["max_new_tokens"] < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        values["max_new_tokens"] = raw["max_new_tokens"]
    if "temperature" in raw:
        t = raw["temperature"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
            raise bad("temperature", "a number >= 0 (0 is greedy)")
        values["temperature"] = float(t)
    if "top_p" in raw:
        p = raw["top_p"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        values["top_p"] = float(p)
    if "top_k" in raw:
        if not _is_int(raw["top_k"]) or raw["top_k"] < 0:
            raise bad("top_k", "an integer >= 0 (0 turns it off)")
        values["top_k"] = raw["top_k"]
    if "seed" in raw:
        if not _is_int(raw["seed"]):
            raise bad("seed", "an integer")
        values["seed"] = raw["seed"]
    if "truncate" in raw:
        if raw["truncate"] not in ("error", "left"):
            raise bad("truncate", "'error' or 'left'")
        values["truncate"] = raw["truncate"]
    return GenerationParams(**values)


def _parse_python_hop(
    raw: Mapping[str, Any], name: str, path: tuple[Any, ...], hop_names: list[str], lines: _Lines
) -> HopSpec:
    call = raw.get("call")
    line = lines.of(*path, "call")
    if isinstance(call, str):
        call = import_callable(call, hop=name, line=line)
    if not callable(call):
        raise SpecError(
            "a Python hop needs 'call': a function, or its dotted path like 'package.module:function'",
            hop=name,
            field="call",
            line=line,
        )
    by_name, required = _parameter_names(call)
    uses = raw.get("uses")
    earlier = hop_names[: hop_names.index(name)]
    if uses is not None:
        if not isinstance(uses, list) or not all(isinstance(u, str) for u in uses):
            raise SpecError("'uses' must be a list of hop names", hop=name, field="uses", line=lines.of(*path, "uses"))
        for used in uses:
            if used not in hop_names:
                raise SpecError(f"'uses' names {used!r}, which is not a hop{_did_you_mean(used, hop_names)}",
                                hop=name, field="uses", line=lines.of(*path, "uses"))
        deps = tuple(uses)
    elif by_name is not None:
        deps = tuple(n for n in by_name if n in hop_names)
    else:
        deps = tuple(earlier)
    names = frozenset(required) - set(hop_names)
    return HopSpec(name=name, kind="python", call=call, call_by_name=by_name, deps=deps, inputs=names)


def import_callable(path: str, hop: str | None = None, line: int | None = None) -> Callable[..., Any]:
    """Import ``package.module:function`` or ``package.module.function``; never evaluates code."""
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute or not all(_NAME.match(p) for p in (*module_name.split("."), attribute)):
        raise SpecError(
            f"{path!r} is not a dotted path to a function",
            hop=hop,
            field="call",
            line=line,
            hint="write it as 'package.module:function'",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"cannot import module {module_name!r}: {exc}", hop=hop, field="call", line=line) from None
    target = getattr(module, attribute, None)
    if target is None or not callable(target):
        raise SpecError(f"module {module_name!r} has no function {attribute!r}", hop=hop, field="call", line=line)
    return target  # type: ignore[no-any-return]


def _parameter_names(call: Callable[..., Any]) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """Names to bind by keyword (None: pass the whole context) and which of them are required."""
    try:
        parameters = list(inspect.signature(call).parameters.values())
    except (TypeError, ValueError):
        return None, ()
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not named or (len(named) == 1 and named[0].name in ("context", "ctx")):
        return None, ()
    return tuple(p.name for p in named), tuple(p.name for p in named if p.default is p.empty)


def _check_graph(hops: list[HopSpec], lines: _Lines) -> None:
    """Resolve LLM hops' dependencies from their templates, then refuse cycles."""
    names = {h.name for h in hops}
    for index, hop in enumerate(hops):
        if hop.kind == "llm":
            hop.deps = tuple(sorted(hop.inputs & names))
            hop.inputs = frozenset(hop.inputs - names)
        if hop.name in hop.deps:
            raise SpecError(
                "the hop uses its own output", hop=hop.name, field="prompt" if hop.kind == "llm" else "uses",
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
