"""The console's HTML: the Jinja2 environment of its templates (autoescaped), its filters, and Markdown reports
rendered to HTML with raw HTML escaped (markdown-it-py, already installed with Rich)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markdown_it import MarkdownIt
from markupsafe import Markup

from gatefill.console.reads import age_text

__all__ = ["markdown_html", "page"]

_ENV = Environment(
    loader=PackageLoader("gatefill", "console/templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
# "html": False escapes any HTML a report carries instead of passing it through; tables are GitHub's.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


def _when(at: datetime | None) -> str:
    return "-" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return age_text(value) if value >= 60 else f"{value:.1f} s"


_ENV.filters["when"] = _when
_ENV.filters["seconds"] = _seconds
_ENV.filters["short"] = lambda text: str(text)[:12]


def markdown_html(text: str) -> Markup:
    """A Markdown report as HTML; HTML inside the report is shown as text, never interpreted."""
    return Markup(_MARKDOWN.render(text))


def page(template: str, **context: Any) -> str:
    """Renders ``templates/<template>``; unknown variables are errors, not blanks."""
    return _ENV.get_template(template).render(**context)
