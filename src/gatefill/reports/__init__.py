"""Artifact rendering: Jinja2 templates for the Markdown reports, and a writer for JSON artifacts.

Templates only lay out numbers that the phase modules measured; they compute nothing beyond formatting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

__all__ = ["render", "write_json", "write_text"]

_ENV = Environment(
    loader=PackageLoader("gatefill", "reports/templates"),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,  # Markdown, not HTML
)


def _short(key: str) -> str:
    return key[:8]


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * 100:.{digits}f}%"


_ENV.filters["short"] = _short
_ENV.filters["pct"] = _pct
_ENV.filters["tojson"] = lambda v: json.dumps(v, ensure_ascii=False, sort_keys=True)


def render(template: str, **context: Any) -> str:
    """Renders ``templates/<template>`` with ``context``; unknown variables are errors, not blanks."""
    return _ENV.get_template(template).render(**context)


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path, value: Any) -> Path:
    return write_text(path, json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
