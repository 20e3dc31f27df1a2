"""Prompt templates: the plain-text fast path renders exactly what Jinja's sandbox renders."""

from __future__ import annotations

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
