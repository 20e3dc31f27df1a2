"""Property-based: any chain spec, valid, mutated or random, loads or raises SpecError saying where."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.chains.spec import ChainSpec, parse_spec
from workbench.errors import SpecError

KNOWN_MODELS = frozenset({"tiny", "small"})

VALID: dict[str, Any] = {
    "name": "qa",
    "description": "a spec that loads; every test mutates a copy of it",
    "inputs": ["question"],
    "history": 2,
    "hops": [
        {
            "name": "plan",
            "model": "tiny",
            "prompt": "Question: {{ question }}\nPlan:",
            "max_new_tokens": 8,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 5,
            "seed": 1,
            "truncate": "left",
        },
        {"name": "answer", "kind": "llm", "model": "small", "prompt": "{{ history }}{{ plan }}\nAnswer:"},
        {"name": "stats", "kind": "python", "call": "workbench.demo:answer_stats", "uses": ["plan", "answer"]},
    ],
    "output": "answer",
}

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Letters that YAML gives meaning to, so random text often gets as far as the parser's corners.
YAML_ALPHABET = st.sampled_from(list("abcnhopsmel:_-[]{}&*!|>'\"%@`#,? \n\t{}0123456789.~\u200b\u202e\U0001f600"))
# Any character (NUL, bidi overrides, zero-width, emoji) mixed with template brackets.
ODD_TEXT = st.lists(
    st.characters(codec="utf-8", exclude_categories=["Cs"])
    | st.sampled_from(["\u202e", "\u200b", "\x00", "\ufeff", "{{", "}}", "{%", "%}"]),
    max_size=10,
).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ODD_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


YAML_LINE_BREAKS = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def assert_loads_or_says_where(spec: Any) -> ChainSpec | None:
    """The property: a ChainSpec, or a SpecError whose message names the hop, the field or the line."""
    try:
        parsed = parse_spec(spec, known_models=KNOWN_MODELS)
    except SpecError as error:
        located = error.hop is not None or error.field is not None or error.line is not None
        # Only a spec that is wrong as a whole has no place inside it to name.
        whole = error.message.startswith(("chain spec: the chain spec is empty", "chain spec: a chain spec is"))
        assert located or whole, f"no hop, field or line in: {error}"
        if error.hop is not None:
            assert f"hop {error.hop!r}" in error.message
        if error.field is not None:
            assert f"field {error.field!r}" in error.message
        if error.line is not None:
            assert f"line {error.line}" in error.message
            if isinstance(spec, str):
                breaks = len(YAML_LINE_BREAKS.findall(spec))  # YAML counts CR, CR LF, NEL, LS, PS as line breaks too
                assert 1 <= error.line <= breaks + 1, f"line {error.line} is outside the text"
        return None
    assert isinstance(parsed, ChainSpec) and parsed.hops
    assert parsed.output in [h.name for h in parsed.hops]
    return parsed


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in a nest of dicts and lists, the root excluded."""
    found: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found.append((*prefix, key))
        found += paths(value, (*prefix, key))
    return found


def parent(spec: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        spec = spec[key]
    return spec


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    """The valid spec after one to three mutations: deletions, wrong types, unknown keys, odd text,
    duplicate hop names, cycles."""
    spec = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        candidates = paths(spec)
        operation = draw(st.sampled_from(["delete", "replace", "unknown", "text", "duplicate", "cycle", "rename"]))
        if operation in ("delete", "replace", "text") and candidates:
            path = draw(st.sampled_from(candidates))
            container = parent(spec, path)
            if operation == "delete":
                del container[path[-1]]
            else:
                container[path[-1]] = draw(JSON_VALUES if operation == "replace" else ODD_TEXT)
        elif operation == "unknown":
            targets = [p for p in [(), *candidates] if isinstance(parent(spec, (*p, None)), dict)]
            target = parent(spec, (*draw(st.sampled_from(targets)), None))
            target[draw(st.text(min_size=1, max_size=8))] = draw(JSON_VALUES)
        elif isinstance(spec.get("hops"), list) and spec["hops"]:
            hops = spec["hops"]
            index = draw(st.integers(0, len(hops) - 1))
            if operation == "duplicate":
                hops.append(copy.deepcopy(hops[index]))
            elif operation == "cycle" and isinstance(hops[0], dict):
                # plan reads a later hop, which (directly or through others) reads plan.
                hops[0]["prompt"] = "{{ " + draw(st.sampled_from(["answer", "stats", "plan"])) + " }}"
            elif operation == "rename" and isinstance(hops[index], dict):
                hops[index]["name"] = draw(st.sampled_from(["plan", "answer", "history", "session", "", "2x"])
                                           | ODD_TEXT)
    return spec


def test_the_valid_spec_loads_as_a_dict_and_as_yaml() -> None:
    for spec in (VALID, yaml.safe_dump(VALID, sort_keys=False)):
        parsed = assert_loads_or_says_where(spec)
        assert parsed is not None and [h.name for h in parsed.hops] == ["plan", "answer", "stats"]
        assert parsed.hop("stats").deps == ("plan", "answer")


@FAST
@given(mutated_specs())
def test_mutated_dict_specs(spec: dict[str, Any]) -> None:
    assert_loads_or_says_where(spec)


@FAST
@given(mutated_specs())
def test_mutated_specs_as_yaml(spec: dict[str, Any]) -> None:
    assert_loads_or_says_where(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))


@st.composite
def edited_yaml(draw: st.DrawFn) -> str:
    """The valid spec's YAML text with a few characters or lines cut, inserted or re-indented."""
    text = yaml.safe_dump(VALID, sort_keys=False)
    for _ in range(draw(st.integers(1, 3))):
        lines = text.split("\n")
        operation = draw(st.sampled_from(["cut", "insert", "drop_line", "copy_line", "tab", "truncate"]))
        at = draw(st.integers(0, max(0, len(text) - 1)))
        row = draw(st.integers(0, len(lines) - 1))
        if operation == "cut":
            text = text[:at] + text[at + draw(st.integers(1, 8)):]
        elif operation == "insert":
            text = text[:at] + draw(st.text(YAML_ALPHABET, min_size=1, max_size=6)) + text[at:]
        elif operation == "drop_line":
            text = "\n".join(lines[:row] + lines[row + 1:])
        elif operation == "copy_line":
            text = "\n".join(lines[: row + 1] + lines[row:])
        elif operation == "tab":
            text = "\n".join(lines[:row] + ["\t" + lines[row].lstrip(" ")] + lines[row + 1:])
        else:
            text = text[:at]
    return text


@FAST
@given(edited_yaml())
def test_edited_yaml_text(text: str) -> None:
    assert_loads_or_says_where(text)


@FAST
@given(st.text(YAML_ALPHABET, max_size=60) | st.text(max_size=30))
def test_random_text(text: str) -> None:
    assert_loads_or_says_where(text)


@FAST
@given(JSON_VALUES)
def test_random_values(value: Any) -> None:
    assert_loads_or_says_where(value if not isinstance(value, str) else {"name": value, "hops": value})


def test_aliases_that_nest_or_loop_do_not_hang_or_overflow() -> None:
    # Each level doubles the last: walked naively it is 2**30 nodes; a self-referencing anchor loops.
    laughs = "a0: &a0 [x, y]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 30))
    loop = "name: &n\n  - *n\nhops: []\n"
    deep = "name: " + "[" * 5000 + "]" * 5000 + "\n"
    for text in (laughs, loop, deep):
        assert_loads_or_says_where(text)


@pytest.mark.parametrize("text", [
    "name: x\nhops: " + "[" * 100_000 + "]" * 100_000 + "\n",  # past libyaml's own 1,000 flow levels
    "name: x\nhops: " + "{a: " * 5_000 + "}" * 5_000 + "\n",
    "name: x\nhops:\n" + "".join("  " * i + "-\n" for i in range(1, 3_000)),  # block style, a level a line
])
def test_yaml_nested_past_any_spec_is_refused_before_it_is_composed(text: str) -> None:
    # Composed first, 100,000 flow levels took ~0.9 s to reach Python's recursion limit; the scan stops at level 101.
    with pytest.raises(SpecError, match="the YAML nests too deeply to read") as info:
        parse_spec(text, known_models=KNOWN_MODELS)
    assert info.value.line == (102 if text.endswith("-\n") else 2)
