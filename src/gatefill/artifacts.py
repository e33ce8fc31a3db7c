"""Artifact files: the Jinja2 templates of the Markdown reports (``reports/templates``), writers of text and JSON
artifacts, and the count phrases reports and check summaries share. A leaf: phases and ``reports/`` both use it.

Templates only lay out numbers that the phase modules measured; they compute nothing beyond formatting.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

__all__ = ["counts_text", "render", "write_json", "write_text"]

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


def counts_text(counts: Mapping[str, object], empty: str = "none") -> str:
    """Counts as people read them, ``written 39, failed 2``, in the mapping's order; ``empty`` when there are none.

    Summaries and terminal lines use this instead of a mapping's Python text (``{'written': 39}``).
    """
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or empty


_ENV.filters["short"] = _short
_ENV.filters["counts"] = counts_text
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
    return write_text(path, json_text(value))


def json_text(value: Any) -> str:
    """JSON laid out for people and written at C speed: objects indented a member per line, long lists (and lists
    of objects or lists) an item per line, each such item compact on its one line.

    ``json.dumps(indent=...)`` runs the pure-Python encoder: for a plan or a results file of 100k sessions that
    took seconds; here every item goes through the C encoder, and a session or candidate still reads as one line.
    Values JSON cannot represent are written as ``str(value)``, as before.
    """
    return _laid_out(value, "") + "\n"


def _laid_out(value: Any, pad: str) -> str:
    inner = pad + "  "
    if isinstance(value, dict) and value:
        members = ",\n".join(f"{inner}{_key(k)}: {_laid_out(v, inner)}" for k, v in value.items())
        return f"{{\n{members}\n{pad}}}"
    if isinstance(value, list | tuple) and (
        len(value) > _INLINE_ITEMS or any(isinstance(v, dict | list | tuple) for v in value)
    ):
        items = ",\n".join(inner + _compact(v) for v in value)
        return f"[\n{items}\n{pad}]"
    return _compact(value)


#: Lists of scalars up to this long stay on one line.
_INLINE_ITEMS = 8


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, separators=(", ", ": "))


def _key(key: Any) -> str:
    # As json.dumps names non-string keys: 1 -> "1", True -> "true", None -> "null".
    return _compact(key if isinstance(key, str) else _compact(key))
