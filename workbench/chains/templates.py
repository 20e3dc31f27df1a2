"""Prompt templates: Jinja2 rendered in its sandbox, with the variables each template needs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta
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

    def render(self, values: Mapping[str, Any]) -> str:
        try:
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
