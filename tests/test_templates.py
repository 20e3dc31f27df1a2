"""Prompt templates: the plain-text fast path renders exactly what Jinja's sandbox renders, and no step of a
template runs past its bounds."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from workbench.chains import templates
from workbench.chains.templates import _ENV, PromptTemplate
from workbench.errors import TemplateError

NAMES = ["question", "plan", "answer", "history"]
# Text between variables: anything but the characters that open Jinja syntax.
TEXT = st.text(st.characters(blacklist_characters="{}%#", blacklist_categories=("Cs",)), max_size=30)
VALUES = st.one_of(
    st.text(max_size=20),
    st.integers(),
    st.floats(allow_nan=False),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.sampled_from(NAMES), st.integers(), max_size=2),
)


@st.composite
def plain_templates(draw: st.DrawFn) -> str:
    parts = [draw(TEXT)]
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(NAMES))
        spaces = draw(st.sampled_from(["", " ", "  "]))
        parts += [f"{{{{{spaces}{name}{spaces}}}}}", draw(TEXT)]
    return "".join(parts)


@settings(max_examples=300, deadline=None)
@given(source=plain_templates(), values=st.fixed_dictionaries({n: VALUES for n in NAMES}))
def test_fast_path_renders_what_jinja_renders(source: str, values: dict[str, Any]) -> None:
    template = PromptTemplate(source, hop="h")
    assert template.render(values) == _ENV.from_string(source).render(**values)


@pytest.mark.parametrize(
    "source",
    [
        "{{ question | upper }}",
        "{% for r in history %}{{ r }};{% endfor %}{{ question }}",
        "{{ question }}{# a comment #}!",
        "{{ range(3) | list }} {{ question }}",
        "{{ plan.title() }}",
    ],
)
def test_templates_beyond_plain_text_render_through_jinja(source: str) -> None:
    values = {"question": "why?", "history": ["a", "b"], "plan": "first step"}
    assert PromptTemplate(source, hop="h").render(values) == _ENV.from_string(source).render(**values)


def test_a_missing_value_names_the_hop_and_what_is_available() -> None:
    with pytest.raises(TemplateError) as err:
        PromptTemplate("{{ plan }} then {{ question }}", hop="answer").render({"question": "q"})
    message = str(err.value)
    assert "answer" in message and "plan" in message and "question" in message


@pytest.mark.parametrize("value", [
    "word " * 2_100_000,  # a document an earlier hop returned, longer than any prompt may be
    [list(range(1_000))] * 3_000,  # one list held 3,000 times: its text would be 14.7 million characters
], ids=["long text", "list holding much"])
def test_a_value_too_large_for_a_prompt_is_refused_on_the_fast_path_as_through_jinja(value: Any) -> None:
    # {{ p }} took the fast path, which skipped the bounds: a hop's 10.5-million-character answer went on into
    # the prompt, was tokenized on the workbench's loop (30 s with every other run waiting) and only then refused
    # for the context window; a list's text was made in full before anything looked at its size.
    plain, through_jinja = PromptTemplate("{{ p }} Q: {{ q }}", hop="answer"), PromptTemplate(
        "{% if p %}{{ p }}{% endif %} Q: {{ q }}", hop="answer")
    assert plain.plain and not through_jinja.plain
    for template in (plain, through_jinja):
        with pytest.raises(TemplateError, match="longer than 10,000,000 characters") as err:
            template.render({"p": value, "q": "why?"})
        assert err.value.hop == "answer"


# -- bounds on what one step of a template may cost ---------------------------------------------

# The audit's templates that never stopped (or crashed the process: hashing a tuple nested 200,000 deep overflows the
# C stack), run in a child process so that this test stays bounded however the template behaves.
_SHARED_NESTS = r"""
import sys
from workbench.chains.templates import PromptTemplate
doubled = "{% set ns = namespace(a=(1,), b=(1,)) %}{% for i in range(60) %}{% set ns.a = (ns.a, ns.a) %}" \
          "{% set ns.b = (ns.b, ns.b) %}{% endfor %}"
lists = "{% set ns = namespace(a=[1], b=[1]) %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}" \
        "{% set ns.b = [ns.b, ns.b] %}{% endfor %}"
deep = "{% set ns = namespace(a=(1,)) %}{% for j in range(3) %}{% for i in range(100000) %}{% set ns.a = (ns.a,) %}" \
       "{% endfor %}{% endfor %}"
for source in [doubled + "{{ ns.a in {} }}", doubled + "{{ ns.a == ns.b }}", doubled + "{{ ns.a < ns.b }}",
               doubled + "{{ [ns.a, ns.b]|sort|length }}", doubled + "{{ [ns.a, ns.b]|unique|list|length }}",
               doubled + "{{ [ns.a, ns.b]|max|length }}", lists + "{{ ns.a == ns.b }}", deep + "{{ ns.a in {} }}"]:
    try:
        PromptTemplate(source, hop="h").render({}, timeout_s=2)
        print("rendered")
    except Exception as exc:
        print(type(exc).__name__, str(exc).splitlines()[0])
"""


def test_comparing_or_hashing_lists_that_share_a_list_is_bounded() -> None:
    # (t, t) made 60 times over is 60 small tuples, and 2**60 items to compare or hash in one C loop that no clock
    # stops: `ns.a in {}` ran for ever. What a template makes is sized (a shared list each time it is held) as it
    # is made, and refused past a million items or 100 levels.
    done = subprocess.run([sys.executable, "-c", _SHARED_NESTS], capture_output=True, text=True, timeout=60,
                          check=False)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(lines) == 8
    assert all(line.startswith("TemplateError") and "holds another many times over" in line for line in lines[:7])
    assert lines[7].startswith("TemplateError") and "nested more than 100 deep" in lines[7]


@pytest.mark.parametrize("source", [
    "{% set a = (1,) %}" + "{% set a = (a, a) %}" * 25 + "{{ 1 }}",
    "{% set a = [1] %}" + "{% set a = [a, a] %}" * 25 + "{{ 1 }}",
    "{% set a = {'k': 1} %}" + "{% set a = {'x': a, 'y': a} %}" * 25 + "{{ 1 }}",
    "{% set a = [1] %}" + "{% set a = dict(x=a, y=a) %}" * 25 + "{{ 1 }}",
    "{% set xs = range(100000)|list %}{% set ys = [xs] * 100 %}{{ 1 }}",
    "{% set xs = range(1000)|list %}{% set ys = [[xs] * 1000] + [[xs] * 1000] %}{{ 1 }}",
    "{% set xs = [range(1000)|list] * 1000 %}{{ (xs|batch(2)|list)|length }}",
], ids=["tuple", "list", "dict", "dict-call", "repeat", "concat", "filter"])
def test_a_template_cannot_make_a_list_that_holds_another_many_times_over(source: str) -> None:
    with pytest.raises(TemplateError, match="more than 1,000,000 items.*holds another many times over"):
        PromptTemplate(source, hop="h").render({})


def test_lists_and_mappings_a_prompt_uses_work_as_before() -> None:
    source = ("{% set a = [q, 1] %}{% set b = [a, a, (q, 2)] %}{% set m = {'a': a, (q, 1): b} %}"
              "{{ b == [[q, 1], [q, 1], (q, 2)] }} {{ (q, 1) in m }} {{ [[q, 1], [q, 0]]|sort|first }} "
              "{{ (b * 1000)|length }} {{ m[(q, 1)][2] }} {{ [a]|pprint }} "
              "{% for k, v in {'y': 2, 'x': q}|dictsort %}{{ k }}={{ v }};{% endfor %}")
    assert PromptTemplate(source, hop="h").render({"q": "x"}) == (
        "True True ['x', 0] 3000 ('x', 2) [['x', 1]] x=x;y=2;")
    deep = [1]
    for _ in range(150):  # a value the caller passed is the caller's: only what the template makes is bounded
        deep = [deep]
    assert PromptTemplate("{{ d|length }} {{ d[0]|tojson|length }}", hop="h").render({"d": [deep]}) == "1 303"
    with pytest.raises(TemplateError, match="nested more than 100 deep"):
        PromptTemplate("{{ [1, d]|length }}", hop="h").render({"d": deep})


@pytest.mark.parametrize(("source", "values"), [
    ("{{ '{:{}}'.format('a', '70000000')|length }}", {}),
    ("{{ '{:.{}f}'.format(1.5, '70000000')|length }}", {}),
    ("{{ '{:{w}}'.format('a', w=w)|length }}", {"w": "70000000"}),
    ("{{ '{:{0[w]}}'.format({'w': '70000000'})|length }}", {}),
    ("{{ '{x:>{w}}'.format_map({'x': 'a', 'w': '70000000'})|length }}", {}),
    ("{{ '{:{}}'.format('a', 70000000)|length }}", {}),
    ("{{ '{:>70000000}'.format('a')|length }}", {}),
], ids=["width-text", "precision-text", "keyword", "item", "format_map", "width-number", "written"])
def test_a_format_width_from_any_argument_is_refused_before_it_pads(source: str, values: dict[str, Any]) -> None:
    # A width given as text ('7000000000') was never checked: 7 GB were made before the size check refused them.
    with pytest.raises(TemplateError, match="would make a text longer than 10,000,000 characters"):
        PromptTemplate(source, hop="h").render(values)
    ok = "{{ '{:{}}|{:.{}f}|{x:>{w}}'.format('a', '3', 1.25, 1, x='b', w=2) }} {{ '%5s|'|format('c') }}"
    assert PromptTemplate(ok, hop="h").render({}) == "a  |1.2| b     c|"


def test_translate_with_a_list_table_is_sized_before_it_translates() -> None:
    # Only a mapping table was sized: a list of long replacements made 8 GB.
    source = "{{ ('a' * n).translate([('x' * k)] * 98)|length }}"
    with pytest.raises(TemplateError, match="would make a text longer than 10,000,000 characters"):
        PromptTemplate(source, hop="h").render({"n": 1_000, "k": 20_000})
    assert PromptTemplate(source, hop="h").render({"n": 1_000, "k": 3}) == "3000"
    assert PromptTemplate("{{ 'abc'.translate('xyz') }}{{ 'abc'.translate({98: 'BB'}) }}", hop="h").render({}) == \
        "abcaBBc"


@pytest.mark.parametrize("source", [
    "{{ q.encode('punycode')|length }}",
    "{{ q.encode().decode('punycode')|length }}",
    "{{ q.encode('idna')|length }}",
    "{{ q.encode(encoding='utf-7')|length }}",
    "{{ q.encode('utf-8', 'namereplace')|length }}",
    "{{ q.encode('no-such-codec')|length }}",
])
def test_only_linear_text_encodings_are_allowed(source: str) -> None:
    # punycode is quadratic: 40,000 characters took 18.7 s against a 2 s budget, in one C call.
    with pytest.raises(TemplateError, match="is not allowed in a prompt template") as err:
        PromptTemplate(source, hop="h").render({"q": "\u4e00bc"})
    assert "punycode" in str(err.value)
    ok = ("{{ q.encode()|length }} {{ q.encode('UTF8')|length }} {{ q.encode('utf-16-le')|length }} "
          "{{ q.encode('latin-1', 'replace').decode('ascii') }} {{ q.encode('ascii', errors='xmlcharrefreplace') }}")
    assert PromptTemplate(ok, hop="h").render({"q": "\u4e00bc"}) == "5 5 6 ?bc b'&#19968;bc'"


def test_urlize_is_not_available() -> None:
    # Its pattern backtracks: 40,000 characters took 40 s against a 2 s budget. A prompt has no use for HTML links.
    for source in ("{{ q|urlize }}", "{{ [q]|map('urlize')|list }}"):
        with pytest.raises(TemplateError, match="the urlize filter is not available in prompt templates"):
            PromptTemplate(source, hop="h").render({"q": "see http://example.com"})


def test_wordwrap_refuses_a_word_too_long_to_break_in_time() -> None:
    # textwrap copies the rest of a long word for each line it cuts off: 2 million characters took 10 s.
    with pytest.raises(TemplateError, match="wordwrap\\(1\\) would break a word of 150,000 characters"):
        PromptTemplate("{{ s|wordwrap(1)|length }}", hop="h").render({"s": "a" * 150_000})
    ok = "{{ s|wordwrap(1, break_long_words=false)|length }} {{ 'ab cd ef'|wordwrap(5) }}"
    assert PromptTemplate(ok, hop="h").render({"s": "a" * 150_000}) == "150000 ab cd\nef"


def test_pprint_refuses_what_it_would_take_too_long_to_lay_out() -> None:
    # pformat makes the text of each level again for the level above: a list doubled 18 times took 5.6 s.
    source = "{% set a = [1] %}" + "{% set a = [a, a] %}" * 16 + "{{ a|pprint|length }}"
    with pytest.raises(TemplateError, match="pprint would go through 196,606 items 17 levels deep"):
        PromptTemplate(source, hop="h").render({})


@pytest.mark.parametrize("source", [
    "{{ s|list|length }}", "{{ s|batch(1)|list|length }}", "{{ s|sort|length }}", "{{ s|join(',')|length }}",
    "{{ s|slice(2)|list|length }}",
])
def test_a_text_is_not_made_into_a_list_past_the_bound(source: str) -> None:
    # A list was sized only once made: a 10-million-character text made 10 million items (900 MB) first.
    with pytest.raises(TemplateError, match="would make a list of more than 100,000 items"):
        PromptTemplate(source, hop="h").render({"s": "\u4e00" * 300_000})
    assert PromptTemplate(source, hop="h").render({"s": "ba"}) == {"{{ s|join(',')|length }}": "3"}.get(source, "2")


def test_a_list_grown_a_row_at_a_time_renders_within_its_budget() -> None:
    # Each new list was sized again in full: 1,000 rows of mappings took 276 ms (6 ms before lists were sized), and
    # 6,000 rows some 10 s. Growing one sizes what it adds. The budget is some 20 times what the render takes.
    source = ("{% set ns = namespace(rows=[]) %}{% for i in range(6000) %}"
              "{% set ns.rows = ns.rows + [{'i': i, 'name': q}] %}{% endfor %}{{ ns.rows|length }} {{ ns.rows[-1].i }}")
    assert PromptTemplate(source, hop="h").render({"q": "x"}, timeout_s=2) == "6000 5999"


@pytest.mark.parametrize("source", [
    "{% set ns = namespace(a=[range(1000)|list]) %}{% for i in range(12) %}{% set ns.a = ns.a + ns.a %}{% endfor %}",
    "{% set ns = namespace(a=(range(1000)|list,)) %}{% for i in range(12) %}{% set ns.a = ns.a + ns.a %}{% endfor %}",
    "{% set ns = namespace(a=[range(1000)|list]) %}{% for i in range(12) %}{% set ns.a = ns.a * 2 %}{% endfor %}",
    "{% set ns = namespace(a=[]) %}{% for i in range(1100) %}{% set ns.a = ns.a + [range(1000)|list] %}{% endfor %}",
    "{% set ns = namespace(a=[]) %}{% for i in range(11) %}{% set ns.a = ns.a + [range(100000)|list] %}"
    "{% for j in range(300) %}{% set other = [j] %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(a=[]) %}{% for i in range(200) %}{% set ns.a = ns.a + [i] %}{% endfor %}"
    "{% set b = [ns.a] * 5000 %}",
], ids=["list doubled", "tuple doubled", "repeated", "rows of lists", "rows among other lists", "grown then held"])
def test_a_list_grown_from_others_is_sized_as_what_they_hold(source: str) -> None:
    # Growing a list is sized from the sizes of its parts: a part held twice still counts twice, and one sized
    # long ago (hundreds of lists made since) is sized again.
    with pytest.raises(TemplateError, match="more than 1,000,000 items.*holds another many times over"):
        PromptTemplate(source + "{{ 1 }}", hop="h").render({})


def _render_peak(source: str, values: dict[str, Any]) -> tuple[str, int]:
    """What rendering ``source`` raised (or rendered), and the most memory Python held for it meanwhile."""
    template = PromptTemplate(source, hop="h")
    tracemalloc.start()
    try:
        try:
            outcome = template.render(values)
        except TemplateError as exc:
            outcome = str(exc)
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("source", "text"), [
    ("{{ s.split()|length }}", "ab " * 3_333_333),
    ("{{ s.split(' ')|length }}", "ab " * 3_333_333),
    ("{{ s.rsplit(sep=' ', maxsplit=-1)|length }}", "ab " * 3_333_333),
    ("{{ s.encode().split()|length }}", "ab " * 3_333_333),
    ("{{ s.splitlines()|length }}", "ab\n" * 3_333_333),
    ("{{ s.encode().splitlines(true)|length }}", "ab\n" * 3_333_333),
    ("{{ s|groupby(0)|length }}", "ab " * 3_333_333),
    ("{{ s|select|reverse|first }}", "ab " * 3_333_333),
], ids=["split", "split-sep", "rsplit", "bytes-split", "splitlines", "bytes-splitlines", "groupby", "reverse"])
def test_a_long_text_is_not_split_into_more_items_than_the_bound_allows(source: str, text: str) -> None:
    # The pieces were made, then found too many: 3.3 million words held 230 MB for a moment, and |groupby sorted
    # all ten million characters (10 s past a 2 s budget, 830 MB).
    outcome, peak = _render_peak(source, {"s": text})
    assert "more than 100,000 items" in outcome
    assert peak < 40 * 2**20  # the text itself is 10 MB (20 MB as bytes): no copy of it in pieces


def test_splitting_within_the_bound_works_as_before() -> None:
    source = ("{{ 'a b  c'.split() }} {{ 'a,b,c'.split(',', 1) }} {{ 'a,b,c'.rsplit(',', maxsplit=1) }} "
              "{{ 'a,b'.split(sep=',') }} {{ 'x\r\ny\n'.splitlines() }} {{ 'x\ny'.splitlines(true) }} "
              "{{ 'a b'.encode().split() }} {{ (',' * 99999).split(',')|length }} {{ ('a ' * 100000).split()|length }} "
              "{{ ('a\n' * 100000).splitlines()|length }} {{ [3, 1, 2]|reverse|list }} {{ 'ab'|reverse }} "
              "{{ [{'k': 2}, {'k': 1}, {'k': 2}]|groupby('k')|map(attribute='grouper')|list }}")
    assert PromptTemplate(source, hop="h").render({}) == (
        "['a', 'b', 'c'] ['a', 'b,c'] ['a,b', 'c'] ['a', 'b'] ['x', 'y'] ['x\\n', 'y'] [b'a', b'b'] 100000 100000 "
        "100000 [2, 1, 3] ba [1, 2]")
    with pytest.raises(TemplateError, match="more than 100,000 items"):
        PromptTemplate("{{ (',' * 100000).split(',')|length }}", hop="h").render({})
    with pytest.raises(TemplateError, match="more than 100,000 items"):
        PromptTemplate("{{ ('a\n' * 100001).splitlines()|length }}", hop="h").render({})


def test_indented_json_stops_at_the_bound_as_it_is_written() -> None:
    # Each line repeats the indent of its depth: 100,000 numbers nested 99 deep (600,000 characters as a list) are
    # 633 million characters indented by 64, all made (6.7 s past a 2 s budget, 1.5 GB) before the size check.
    deep = ("{% set ns = namespace(a=range(100000)|list) %}{% for i in range(98) %}{% set ns.a = [ns.a] %}"
            "{% endfor %}")
    for indent in (8, 64):
        outcome, peak = _render_peak(deep + f"{{{{ ns.a|tojson({indent})|length }}}}", {})
        assert "would make a text longer than 10,000,000 characters" in outcome
        assert peak < 100 * 2**20
    source = "{{ v|tojson(2) }}|{{ v|tojson }}|{{ v|tojson(' ') }}"
    value = {"b": [1, "<&'>"], "a": {"x": None}}
    assert PromptTemplate(source, hop="h").render({"v": value}) == (
        '{\n  "a": {\n    "x": null\n  },\n  "b": [\n    1,\n    "\\u003c\\u0026\\u0027\\u003e"\n  ]\n}|'
        '{"a": {"x": null}, "b": [1, "\\u003c\\u0026\\u0027\\u003e"]}|'
        '{\n "a": {\n  "x": null\n },\n "b": [\n  1,\n  "\\u003c\\u0026\\u0027\\u003e"\n ]\n}')


# -- what goes through a long input looks at the clock as it goes --------------------------------

# Each template goes through a caller's value that never ends (a generator, as a Python hop may hand on), or takes
# milliseconds a step with nothing between its steps that looked at the clock: it must stop at its budget, not at
# the end of its input. A child process runs them, so that one that never stops fails the test instead of hanging
# it, with its memory capped (one that never stops may also never stop growing).
_LONG_STEPS = r"""
import itertools, json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))
from markupsafe import Markup
from workbench.chains.templates import PromptTemplate


class EndlessMapping:
    def items(self):
        return itertools.repeat(("k", "v"))


values = {"big": list(range(1_000_000)), "keys": dict.fromkeys(range(300_000)).keys(), "ints": list(range(100_000)),
          "tags": "<b>" * 16_000_000, "markup": Markup("<b>" * 16_000_000), "references": Markup("&amp;" * 10_000_000)}
endless = {"chars": lambda: itertools.cycle("ab"), "rows": lambda: itertools.repeat({"a": 1}),
           "pairs": lambda: itertools.repeat(("k", "v")), "negatives": lambda: itertools.count(-1, -1),
           "mapping": EndlessMapping}
for source, budget in json.loads(sys.argv[1]):
    template = PromptTemplate(source, hop="h")
    given = {**values, **{name: make() for name, make in endless.items()}}
    start = time.monotonic()
    try:
        outcome = "rendered " + template.render(given, timeout_s=budget)[:40]
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    print(json.dumps([source, budget, time.monotonic() - start, outcome]), flush=True)
"""

_LONG_STEP_SOURCES = [
    # Filters that go through what they are given in one loop: max's key on each character took 1.3 s for a
    # 10-million-character text, select's test 6 s, with no look at the clock; over an endless one they never ended.
    ("{{ chars|max }}", 0.5), ("{{ chars|min }}", 0.5), ("{{ chars|unique|list }}", 0.5),
    ("{{ chars|select('eq', 'z')|first }}", 0.5), ("{{ chars|reject|first }}", 0.5),
    ("{{ rows|map(attribute='a')|select('eq', 2)|first }}", 0.5), ("{{ rows|selectattr('a', 'eq', 2)|first }}", 0.5),
    ("{{ rows|rejectattr('a')|first }}", 0.5),
    ("{{ chars|batch(100000)|list|length }}", 0.5),
    ("{{ pairs|urlencode }}", 0.5), ("{{ mapping|xmlattr }}", 0.5),
    # A caller's text of 16 million tags or 10 million character references, removed or unescaped a Python step each.
    ("{{ tags|striptags|length }}", 0.5), ("{{ markup.striptags()|length }}", 0.5),
    ("{{ references.unescape()|length }}", 0.5),
    # A test on each item that is itself a C loop of milliseconds (`in` over a million items).
    ("{{ negatives|select('in', big)|first }}", 0.5),
    # A loop step of milliseconds (a set made of 300,000 keys): the loop looked every 1,024 steps.
    ("{% for i in negatives %}{% set d = keys - keys %}{% endfor %}", 0.5),
    # A thousand comparisons written out, each over a million items, with no call or loop between them.
    ("{% if -1 in big %}{% endif %}" * 1000, 0.5),
    # An attribute looked up for each of 100,000 items to sort and group them (0.9 s with no look).
    ("{{ ints|groupby('real')|length }}", 0.2),
]


def test_a_template_going_through_a_long_or_endless_value_stops_at_its_budget() -> None:
    done = subprocess.run([sys.executable, "-c", _LONG_STEPS, json.dumps(_LONG_STEP_SOURCES)], capture_output=True,
                          text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(_LONG_STEP_SOURCES)
    for source, budget, seconds, outcome in results:
        assert outcome.startswith("TemplateError") and f"ran longer than its {budget:g} s" in outcome, (source, outcome)
        assert seconds < 3 * budget, (source[:60], seconds)  # generous: it stops at the first look past its budget


@pytest.mark.parametrize(("source", "value", "expected"), [
    ("{{ s|title|length }}", "ab " * 1_000_000, "3000000"),
    ("{{ s|wordcount }}", "ab " * 1_666_666, "1666666"),
    ("{{ s|striptags|length }}", "ab " * 1_666_666, "4999997"),
    ("{{ s|indent(1)|length }}", "a\n" * 1_650_000, "4949999"),
    ("{{ s|urlencode|length }}", "\U0001f600" * 3_000_000, "longer than 10,000,000 characters"),
    ("{{ s|e|length }}", "<" * 9_999_999 + "\U0001f600", "longer than 10,000,000 characters"),
    ("{{ (('%s'|e) % s)|length }}", "<" * 9_999_999 + "\U0001f600", "longer than 10,000,000 characters"),
    ("{{ ('{}'|e).format(s)|length }}", "<" * 9_999_999 + "\U0001f600", "longer than 10,000,000 characters"),
    ("{{ s|pprint|length }}", "ab " * 3_333_333, "pprint lays out a text of at most 1,000,000 characters"),
    ("{{ s|wordwrap(80)|length }}", "ab\t" * 1_000_000, "wordwrap wraps a line of at most 500,000 characters"),
    ("{{ s|upper|length }}", "\u00df" * 10_000_000, "longer than 10,000,000 characters"),
    ("{{ s.encode('ascii', 'xmlcharrefreplace')|length }}", "\U0001f600" * 10_000_000,
     "longer than 10,000,000 characters"),
], ids=["title", "wordcount", "striptags", "indent", "urlencode", "escape", "markup-percent", "markup-format", "pprint",
        "wordwrap", "upper", "encode"])
def test_a_long_text_is_gone_through_without_a_copy_of_it_in_pieces(source: str, value: Any, expected: str) -> None:
    # Jinja's filters split the text into words or lines in one step and join them again (|title of a
    # 10-million-character text held 714 MB), and escaping, quoting, upper-casing ('ß' is 'SS') and encoding made
    # 20 to 160 MB of text in one step only to refuse it.
    outcome, peak = _render_peak(source, {"s": value})
    assert expected in outcome
    assert peak < 50 * 2**20


@pytest.mark.parametrize(("source", "value", "message"), [
    ("{{ s|pprint }}", "word " * 250_000, "pprint lays out a text of at most 1,000,000 characters, not 1,250,000"),
    ("{{ s|pprint }}", dict.fromkeys(range(150_000), 0), "pprint sorts a mapping of at most 100,000 items"),
    ("{{ s|wordwrap(80) }}", "word " * 150_000, "wordwrap wraps a line of at most 500,000 characters, not 750,000"),
    ("{% set x = s|int(base=2) %}{{ x // (x // 2 ** 50000) }}", "1" * 1_000_000,
     "an integer of more than 100,000 bits"),
    ("{% set x = (0).from_bytes(s.encode(), 'big') %}{{ x // (x // 2 ** 50000) }}", "1" * 1_000_000,
     "an integer of more than 100,000 bits"),
], ids=["pprint-text", "pprint-mapping", "wordwrap-line", "int-binary", "int-from-bytes"])
def test_a_step_that_would_take_long_in_one_c_or_python_loop_is_refused(source: str, value: Any,
                                                                         message: str) -> None:
    # pprint splits a long text into words and sorts a mapping with a Python comparison each, textwrap holds a string
    # for each word of a line, and an integer of a million bits divides by another in time quadratic in both.
    with pytest.raises(TemplateError, match=message.replace("(", r"\(")):
        PromptTemplate(source, hop="h").render({"s": value})
    ok = ("{{ 'a b'|pprint }} {{ {'b': 1, 'a': 2}|pprint }} {{ ('word ' * 4)|wordwrap(10) }} {{ '101'|int(base=2) }} "
          "{{ (0).from_bytes('ab'.encode(), 'big') }}")
    assert PromptTemplate(ok, hop="h").render({}) == "'a b' {'a': 2, 'b': 1} word word\nword word 5 24930"


# Jinja's own sandbox, without the bounds: what each bounded filter must render the same as.
_JINJA = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_PIECEWISE = ["{{ s|title }}", "{{ s|wordcount }}", "{{ s|striptags }}", "{{ (s|safe).striptags() }}",
              "{{ (s|safe).unescape() }}", "{{ s|urlencode }}", "{{ {s: s, 'k': 1}|urlencode }}",
              "{{ [(s, s)]|urlencode }}", "{{ s|e }}", "{{ s|forceescape }}", "{{ ('%s|'|e) % s }}",
              "{{ ('{}|'|e).format(s) }}", "{{ s|indent(2) }}", "{{ s|indent('> ', first=true, blank=true) }}",
              "{{ (s|safe)|indent(1, blank=true) }}", "{{ s|wordwrap(3) }}",
              "{{ s|wordwrap(5, break_long_words=false, break_on_hyphens=false, wrapstring='') }}",
              "{{ [s, {s: [s, 1]}]|pprint }}",
              ("{{ ('x' ~ s)|max }}|{{ ('x' ~ s)|min }}|{{ s|unique|join }}|{{ s|select('ne', 'a')|join }}|"
               "{{ s|batch(3)|list }}"),
              "{{ d|xmlattr }}",
              "{{ s|upper }}|{{ s|lower }}|{{ s|capitalize }}|{{ s.title() }}|{{ s.swapcase() }}|{{ s.casefold() }}",
              "{{ s.encode('ascii', 'xmlcharrefreplace') }}|{{ s.encode('utf-16', errors='surrogatepass') }}"]
_PIECEWISE_PAIRS = [(PromptTemplate(source, hop="h"), _JINJA.from_string(source)) for source in _PIECEWISE]
_TEXT_PARTS = ["a", "b", "Z", " ", "  ", "-", "(", "{", "[", "<", ">", "!", "/", "&", ";", "#", "x", "1", "\t", "\n",
               "\r", "\r\n", "\x0c", "\u00a0", "\u2028", "\u00e9", "\u03a3", "\u00df", "<b>", "</i>", "<!--", "-->",
               "&amp;", "&#65;", "&#x41;", "&lt", " -- ", "a-b", "\U0001f600", "'", ".", ":", "^", "\u0345", "\u01c5",
               "\u0130", "\ufb01", "\u03c3"]


@settings(max_examples=200, deadline=None)
@given(text=st.lists(st.sampled_from(_TEXT_PARTS), max_size=30).map("".join), piece=st.sampled_from([1, 2, 3, 7]))
def test_filters_that_go_through_a_text_in_pieces_render_what_jinja_renders(text: str, piece: int) -> None:
    # Pieces of a few characters, so that every boundary a piece may end at (a word, a tag, a line, a reference)
    # is met: the bounded filters must render exactly what Jinja's do.
    values = {"s": text, "d": {"id": text, "k": 1, "none": None}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(templates, "_TEXT_PIECE", piece)
        for bounded, jinja in _PIECEWISE_PAIRS:
            assert bounded.render(values) == jinja.render(**values), bounded.source
