"""Row images as values: how a column's values compare (its kind), and the digest the ledger keeps of what a run wrote.

The ledger does not store a whole after-image per change: it stores a digest of the row as the batch wrote it, and
rollback, its dry run, the apply gate and the rollback script compare a row read back now with that digest (a row
changed since the run wrote it is a conflict). Both sides normalise every value by its column's kind first
(``normal_value``), so a row read back through gatefill's logical types digests exactly as the image the job handed
over, whatever Python types each side happened to hold (a timestamp as text or as a datetime, 90 or 90.0 in JSON).

The digest is BLAKE2b with a 16-byte output over the normalised values' canonical JSON texts in column order, followed
by a 16-bit mark per column. 128 bits make an accidental match of a changed row as unlikely as a hardware fault, and a
live writer cannot aim for one (a second preimage costs about 2**128 work); 32 hex characters instead of SHA-256's 64,
and hashlib's BLAKE2b is as fast or faster in CPython. The marks (4 hex characters a column) only name which columns
of a changed row differ, as conflicts always have; whether it changed is the 128-bit digest's to say. Most of the cost
is the normalisation and JSON encoding, which any digest of the image needs.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from gatefill.db import JSONValue, TextArray, UTCTimestamp, UUIDText, parse_utc

__all__ = [
    "KIND_ARRAY",
    "KIND_BOOL",
    "KIND_FLOAT",
    "KIND_INT",
    "KIND_JSON",
    "KIND_TEXT",
    "KIND_TIMESTAMP",
    "KIND_UUID",
    "column_kind",
    "differing_columns",
    "image_columns",
    "normal_value",
    "row_digest",
]

KIND_TIMESTAMP, KIND_JSON, KIND_ARRAY, KIND_UUID, KIND_FLOAT, KIND_BOOL, KIND_INT, KIND_TEXT = (
    "timestamp",
    "json",
    "array",
    "uuid",
    "float",
    "bool",
    "int",
    "text",
)


def column_kind(column: sa.Column[Any]) -> str:
    """How a column's values are compared and written as literals."""
    t = column.type
    if isinstance(t, UTCTimestamp):
        return KIND_TIMESTAMP
    if isinstance(t, JSONValue):
        return KIND_JSON
    if isinstance(t, TextArray):
        return KIND_ARRAY
    if isinstance(t, UUIDText):
        return KIND_UUID
    if isinstance(t, sa.Boolean):
        return KIND_BOOL
    if isinstance(t, sa.Float):
        return KIND_FLOAT
    if isinstance(t, sa.Integer):
        return KIND_INT
    return KIND_TEXT


def _canon_json(value: Any) -> Any:
    # Value semantics: 90 and 90.0 are the same JSON number (jsonb and JSON.stringify agree), true is not 1.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        f = float(value)
        return int(f) if f.is_integer() and abs(f) < 1e21 else f
    if isinstance(value, Mapping):
        return {str(k): _canon_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canon_json(v) for v in value]
    return value


def normal_value(kind: str, value: Any) -> Any:
    """A value in a form where equality means "the same stored value" for the column's kind."""
    if value is None:
        return None
    if kind == KIND_TIMESTAMP:
        instant = parse_utc(value) if isinstance(value, str) else value
        if isinstance(instant, datetime):
            return instant.astimezone(UTC) if instant.tzinfo else instant.replace(tzinfo=UTC)
        return instant
    if kind in (KIND_JSON, KIND_ARRAY):
        return json.dumps(_canon_json(value), sort_keys=True, ensure_ascii=False)
    if kind == KIND_FLOAT and isinstance(value, int | float) and not isinstance(value, bool):
        return repr(float(value))  # exact: repr round-trips, and NaN equals itself as text
    if kind == KIND_BOOL:
        return bool(value)
    if kind == KIND_UUID:
        return str(value).lower()
    return value


def _kinds(table: sa.Table) -> dict[str, str]:
    cached: dict[str, str] | None = table.info.get("gatefill_kinds")
    if cached is None:
        # Read for every row digested: worked out once per table definition.
        cached = {c.name: column_kind(c) for c in table.columns}
        table.info["gatefill_kinds"] = cached
    return cached


def image_columns(table: sa.Table, image: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The columns an image covers, as the ledger records them: None when it is the whole row (every column of the
    table, as most jobs write it), else the image's columns in order (a partial image: the columns a job sets)."""
    names = tuple(sorted(image))
    return None if names == tuple(sorted(table.c.keys())) else names


def _tokens(table: sa.Table, values: Mapping[str, Any], columns: Iterable[str] | None) -> tuple[list[str], list[str]]:
    """The digested columns in order, and each one's value normalised by its kind, as canonical JSON text."""
    kinds = _kinds(table)
    names = sorted(columns) if columns is not None else sorted(kinds)
    tokens = []
    for name in names:
        value = normal_value(kinds.get(name, KIND_TEXT), values.get(name))
        if isinstance(value, datetime):
            value = value.isoformat()
        tokens.append(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str))
    return names, tokens


def row_digest(table: sa.Table, values: Mapping[str, Any], columns: Iterable[str] | None = None) -> str:
    """The digest of ``values`` over ``columns`` (default: every column of the table), each normalised by its kind
    (a column the table does not define is taken as text): ``<row>.<marks>``, the row's 128-bit BLAKE2b and a 16-bit
    mark (CRC-32's low bits) per column, in column order, so a row that differs can name the columns that do."""
    _, tokens = _tokens(table, values, columns)
    whole = hashlib.blake2b("\x1e".join(tokens).encode("utf-8"), digest_size=16).hexdigest()
    marks = "".join(f"{zlib.crc32(t.encode('utf-8')) & 0xFFFF:04x}" for t in tokens)
    return f"{whole}.{marks}"


def differing_columns(
    table: sa.Table, digest: str, values: Mapping[str, Any], columns: Iterable[str] | None = None
) -> tuple[str, ...] | None:
    """None when ``values`` digest to ``digest`` (the row holds what was written); else the columns whose marks
    differ (empty in the rare case that every changed column's 16-bit mark collided: the row differs all the same)."""
    names = sorted(columns) if columns is not None else sorted(_kinds(table))
    now = row_digest(table, values, names)
    if now.partition(".")[0] == digest.partition(".")[0]:
        return None
    was, seen = digest.partition(".")[2], now.partition(".")[2]
    return tuple(n for i, n in enumerate(names) if was[4 * i : 4 * i + 4] != seen[4 * i : 4 * i + 4])
