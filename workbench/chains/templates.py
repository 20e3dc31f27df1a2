"""Prompt templates: Jinja2 rendered in its sandbox, with the variables each template needs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from workbench.errors import TemplateError

# One sandboxed environment for every template: attribute access to internals, code
# execution through format strings and similar escapes are refused by the sandbox.
_ENV = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


class PromptTemplate:
    """A compiled prompt template and the names it reads."""

    def __init__(self, source: str, hop: str, line: int | None = None) -> None:
        self.source = source
        self.hop = hop
        try:
            parsed = _ENV.parse(source)
        except TemplateSyntaxError as exc:
            where = f"{exc.message} (line {exc.lineno} of the prompt)"
            raise TemplateError(
                f"the prompt template does not parse: {where}",
                hop=hop,
                field="prompt",
                line=line,
                hint="variables are written {{ name }}; blocks {% for x in xs %}...{% endfor %}",
            ) from None
        self.variables: frozenset[str] = frozenset(meta.find_undeclared_variables(parsed))
        self._template = _ENV.from_string(source)
        self._parts = _plain_parts(parsed, self.variables)

    def render(self, values: Mapping[str, Any]) -> str:
        try:
            if self._parts is not None and self.variables <= values.keys():
                # Text and bare {{ name }}s render as Jinja renders them (str of each value),
                # without the cost of its runtime on every hop of every run.
                return "".join(str(values[part]) if is_name else part for part, is_name in self._parts)
            return self._template.render(**values)
        except UndefinedError as exc:
            raise TemplateError(
                f"the prompt needs a value that is missing: {exc.message}",
                hop=self.hop,
                field="prompt",
                hint=f"values available to this hop: {', '.join(sorted(values)) or 'none'}",
            ) from None
        except SecurityError as exc:
            raise TemplateError(f"the sandbox refused the template: {exc}", hop=self.hop, field="prompt") from None


def _plain_parts(parsed: nodes.Template, variables: frozenset[str]) -> tuple[tuple[str, bool], ...] | None:
    """The template as (text, False) and (variable, True) parts, or None if it is more than text and ``{{ variable }}``.

    Only names the caller supplies count: Jinja resolves ``self``, ``range`` and its other
    globals itself, so a template that reads one of those renders through Jinja.
    """
    parts: list[tuple[str, bool]] = []
    for output in parsed.body:
        if not isinstance(output, nodes.Output):
            return None
        for node in output.nodes:
            if isinstance(node, nodes.TemplateData):
                parts.append((node.data, False))
            elif isinstance(node, nodes.Name) and node.ctx == "load" and node.name in variables:
                parts.append((node.name, True))
            else:
                return None
    return tuple(parts)
