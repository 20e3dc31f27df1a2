"""Prompt templates: the plain-text fast path renders exactly what Jinja's sandbox renders, and no step of a
template runs past its bounds."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
