"""JavaScript number semantics, reproduced bit for bit in pure Python.

The PRISM scores gatefill recomputes were produced by TypeScript running on V8. To get the *same* JSON values (not
merely close ones) every primitive the original used must behave exactly as V8's does:

``to_fixed``
    ``Number(x.toFixed(n))``: rounds the exact binary value of ``x`` with ties away from zero. Python's ``round()``
    rounds ties to even and differs on values such as 2.0625. ``to_fixed_decimal`` is the obvious reference
    implementation (Decimal, ROUND_HALF_UP); ``to_fixed`` computes the same result with integer arithmetic because it
    sits on the hot path.
``js_exp`` / ``js_log2``
    V8's ``Math.exp`` and ``Math.log2`` are fdlibm/FreeBSD algorithms (``__ieee754_exp`` with V8's exp(1) = E special
    case, and ``e_log2.c`` with ``k_log1p``). The C library behind ``math.exp``/``math.log2`` differs in the last bit
    on a few percent of inputs, which changes softmax shares. Both are written here in plain double arithmetic, using
    ``struct`` to reach the high and low 32-bit words as the C code does.
``js_to_number`` / ``js_number``
    ``Number(v)`` on the JSON-like values a ``text`` column or a ``jsonb`` value can hold: whitespace trimming with
    JavaScript's whitespace set, ``""`` → 0, ``0x``/``0o``/``0b`` literals, no numeric separators, arrays through
    ``join(",")``.
``js_string`` / ``js_number_to_string``
    ``String(v)``: object keys (``scoringKey[String(question_id)]``) and JSON output need JavaScript's number
    formatting (``7`` not ``7.0``, ``1e+21``, ``1e-7``).
``js_dumps``
    ``JSON.stringify`` without indentation: JavaScript number formatting, NaN/Infinity as ``null``, integer-like keys
    first as JavaScript objects order them, lone surrogates escaped.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import Final, final

__all__ = [
    "UNDEFINED",
    "js_dumps",
    "js_exp",
    "js_key_order",
    "js_log2",
    "js_number",
    "js_number_to_string",
    "js_string",
    "js_to_number",
    "js_truthy",
    "to_fixed",
    "to_fixed_decimal",
]


@final
class _Undefined:
    """The JavaScript ``undefined`` value (a missing property), distinct from ``None`` (JSON ``null``)."""

    _instance: _Undefined | None = None

    def __new__(cls) -> _Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __bool__(self) -> bool:
        return False


UNDEFINED: Final = _Undefined()

_INF: Final = math.inf
_NAN: Final = math.nan

# --------------------------------------------------------------------------------------------------------------------
# Number.prototype.toFixed


_POW10: Final[tuple[int, ...]] = tuple(10**i for i in range(101))
_DEC_CONTEXT: Final = Context(prec=200)


def to_fixed(x: float, n: int) -> float:
    """``Number(x.toFixed(n))``: the exact binary value of ``x`` rounded to ``n`` decimals, ties away from zero.

    ``x = num/den`` exactly (``den`` a power of two), so ``x·10^n`` is rounded with integer arithmetic and the final
    ``q / 10^n`` is a correctly rounded int/int division, which is what ``Number()`` of the decimal string gives.
    """
    if x != x or x == _INF or x == -_INF or x >= 1e21 or x <= -1e21:
        # toFixed falls back to ToString for |x| >= 1e21, and Number() of that string is x again.
        return x
    if x == 0.0:
        # (-0).toFixed(n) is "0.00…": JavaScript drops the sign of zero here (but not for -0.0001 → "-0.00").
        return 0.0
    num, den = x.as_integer_ratio()
    p = _POW10[n]
    if num < 0:
        q, r = divmod(-num * p, den)
        if r + r >= den:
            q += 1
        return -(q / p)
    q, r = divmod(num * p, den)
    if r + r >= den:
        q += 1
    return q / p


def to_fixed_decimal(x: float, n: int) -> float:
    """Reference implementation of :func:`to_fixed` with ``Decimal`` (slow; used to test the fast one)."""
    if x != x or x == _INF or x == -_INF or abs(x) >= 1e21:
        return x
    if x == 0.0:
        return 0.0
    q = Decimal(x).quantize(Decimal(1).scaleb(-n), rounding=ROUND_HALF_UP, context=_DEC_CONTEXT)
    return float(q)


# --------------------------------------------------------------------------------------------------------------------
# fdlibm exp / log2 (V8 src/base/ieee754.cc). Constants are given as the bit patterns of the C sources.

_D: Final = struct.Struct("<d")
_Q: Final = struct.Struct("<Q")
_d_pack = _D.pack
_d_unpack = _D.unpack
_q_pack = _Q.pack
_q_unpack = _Q.unpack


def _from_words(hi: int, lo: int) -> float:
    """INSERT_WORDS: the double whose high/low 32-bit words are ``hi``/``lo``."""
    v: float = _d_unpack(_q_pack(((hi & 0xFFFFFFFF) << 32) | (lo & 0xFFFFFFFF)))[0]
    return v


_EXP_HALF: Final = (0.5, -0.5)
_EXP_O_THRESHOLD: Final = _from_words(0x40862E42, 0xFEFA39EF)  # 7.09782712893383973096e+02
_EXP_U_THRESHOLD: Final = _from_words(0xC0874910, 0xD52D3051)  # -7.45133219101941108420e+02
_EXP_LN2HI: Final = (_from_words(0x3FE62E42, 0xFEE00000), _from_words(0xBFE62E42, 0xFEE00000))
_EXP_LN2LO: Final = (_from_words(0x3DEA39EF, 0x35793C76), _from_words(0xBDEA39EF, 0x35793C76))
_EXP_INVLN2: Final = _from_words(0x3FF71547, 0x652B82FE)
_EXP_P1: Final = _from_words(0x3FC55555, 0x5555553E)
_EXP_P2: Final = _from_words(0xBF66C16C, 0x16BEBD93)
_EXP_P3: Final = _from_words(0x3F11566A, 0xAF25DE2C)
_EXP_P4: Final = _from_words(0xBEBBBD41, 0xC5D26BF1)
_EXP_P5: Final = _from_words(0x3E663769, 0x72BEA4D0)
_EXP_E: Final = _from_words(0x4005BF0A, 0x8B145769)  # 2.718281828459045
_EXP_HUGE: Final = 1.0e300
_EXP_TWOM1000: Final = _from_words(0x01700000, 0)  # 2**-1000
_EXP_TWO1023: Final = _from_words(0x7FE00000, 0)  # 2**1023
# twopk for every k the reduction can produce: 2**k for k >= -1021, else 2**(k+1000) (scaled back by twom1000).
_EXP_TWOPK: Final = {k: math.ldexp(1.0, k if k >= -1021 else k + 1000) for k in range(-1100, 1024)}


def js_exp(x: float) -> float:
    """V8 ``Math.exp``: fdlibm ``__ieee754_exp`` with V8's exp(1) = E special case, in plain double arithmetic."""
    hx: int = _q_unpack(_d_pack(x))[0] >> 32
    xsb = hx >> 31
    hx &= 0x7FFFFFFF
    k = 0
    hi = 0.0
    lo = 0.0
    if hx >= 0x40862E42:  # |x| >= 709.78...
        if hx >= 0x7FF00000:
            if x != x:
                return x + x  # NaN
            return x if xsb == 0 else 0.0  # exp(+-inf) = {inf, 0}
        if x > _EXP_O_THRESHOLD:
            return _EXP_HUGE * _EXP_HUGE  # overflow → inf
        if x < _EXP_U_THRESHOLD:
            return _EXP_TWOM1000 * _EXP_TWOM1000  # underflow → 0
    if hx > 0x3FD62E42:  # |x| > 0.5 ln2
        if hx < 0x3FF0A2B2:  # and |x| < 1.5 ln2
            if x == 1.0:
                return _EXP_E
            hi = x - _EXP_LN2HI[xsb]
            lo = _EXP_LN2LO[xsb]
            k = 1 - xsb - xsb
        else:
            k = int(_EXP_INVLN2 * x + _EXP_HALF[xsb])  # C cast: truncation toward zero
            t = float(k)
            hi = x - t * _EXP_LN2HI[0]  # t*ln2HI is exact here
            lo = t * _EXP_LN2LO[0]
        x = hi - lo
    elif hx < 0x3E300000:  # |x| < 2**-28
        return 1.0 + x  # (the C code's `huge + x > one` test is always true)
    t = x * x
    c = x - t * (_EXP_P1 + t * (_EXP_P2 + t * (_EXP_P3 + t * (_EXP_P4 + t * _EXP_P5))))
    if k == 0:
        return 1.0 - ((x * c) / (c - 2.0) - x)
    y = 1.0 - ((lo - (x * c) / (2.0 - c)) - hi)
    if k >= -1021:
        if k == 1024:
            return y * 2.0 * _EXP_TWO1023
        return y * _EXP_TWOPK[k]
    return y * _EXP_TWOPK[k] * _EXP_TWOM1000


_LOG_TWO54: Final = _from_words(0x43500000, 0)  # 2**54
_LOG_IVLN2HI: Final = _from_words(0x3FF71547, 0x65200000)
_LOG_IVLN2LO: Final = _from_words(0x3DE705FC, 0x2EEFA200)
_LG1: Final = _from_words(0x3FE55555, 0x55555593)
_LG2: Final = _from_words(0x3FD99999, 0x9997FA04)
_LG3: Final = _from_words(0x3FD24924, 0x94229359)
_LG4: Final = _from_words(0x3FCC71C5, 0x1D8E78AF)
_LG5: Final = _from_words(0x3FC74664, 0x96CB03DE)
_LG6: Final = _from_words(0x3FC39A09, 0xD078C69F)
_LG7: Final = _from_words(0x3FC2F112, 0xDF3E5244)


def js_log2(x: float) -> float:
    """V8 ``Math.log2``: FreeBSD ``e_log2.c`` with ``k_log1p``, in plain double arithmetic."""
    bits: int = _q_unpack(_d_pack(x))[0]
    hx = bits >> 32
    lx = bits & 0xFFFFFFFF
    if hx & 0x80000000:
        hx -= 1 << 32  # the C code holds the high word in a signed int32
    k = 0
    if hx < 0x00100000:  # x < 2**-1022 (negative, zero or subnormal)
        if ((hx & 0x7FFFFFFF) | lx) == 0:
            return -_INF  # log(+-0) = -inf
        if hx < 0:
            return _NAN  # log(-#) = NaN
        k -= 54
        x *= _LOG_TWO54  # subnormal: scale up
        bits = _q_unpack(_d_pack(x))[0]
        hx = bits >> 32
        lx = bits & 0xFFFFFFFF
    if hx >= 0x7FF00000:
        return x + x
    if x == 1.0:
        return 0.0
    k += (hx >> 20) - 1023
    hx &= 0x000FFFFF
    i = (hx + 0x95F64) & 0x100000
    xn: float = _d_unpack(_q_pack(((hx | (i ^ 0x3FF00000)) << 32) | lx))[0]  # normalize x or x/2
    k += i >> 20
    y = float(k)
    f = xn - 1.0
    hfsq = 0.5 * f * f
    # k_log1p(f)
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (_LG2 + w * (_LG4 + w * _LG6))
    t2 = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7)))
    r = s * (hfsq + (t2 + t1))
    hi: float = _d_unpack(_q_pack(_q_unpack(_d_pack(f - hfsq))[0] & 0xFFFFFFFF00000000))[0]  # SET_LOW_WORD(hi, 0)
    lo = (f - hi) - hfsq + r
    val_hi = hi * _LOG_IVLN2HI
    val_lo = (lo + hi) * _LOG_IVLN2LO + lo * _LOG_IVLN2HI
    w = y + val_hi
    val_lo += (y - w) + val_hi
    val_hi = w
    return val_lo + val_hi


# --------------------------------------------------------------------------------------------------------------------
# Number(v) and String(v)

# StrWhiteSpaceChar: WhiteSpace (incl. every Zs character) and LineTerminator. Python's str.strip() knows more.
_JS_WS: Final = (
    "\t\n\v\f\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
# StrDecimalLiteral without Infinity; [0-9] because \d would also accept non-ASCII digits.
_DECIMAL_RE: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NONDECIMAL_RE: Final = re.compile(r"0(?:[xX][0-9a-fA-F]+|[oO][0-7]+|[bB][01]+)")
_RADIX: Final = {"x": 16, "X": 16, "o": 8, "O": 8, "b": 2, "B": 2}


def _int_to_float(i: int) -> float:
    """An integer as the nearest double, ±Infinity beyond the double range (Python would raise)."""
    try:
        return float(i)
    except OverflowError:
        return _INF if i > 0 else -_INF


def _string_to_number(s: str) -> float:
    """StringToNumber: the ``Number(string)`` grammar."""
    if s.isdigit() and s.isascii():
        return float(s)  # the common case, an unsigned decimal integer
    t = s.strip(_JS_WS)
    if not t:
        return 0.0
    if _DECIMAL_RE.fullmatch(t):
        return float(t)  # fully validated first: float() alone would accept "1_0", "inf", "nan"
    if _NONDECIMAL_RE.fullmatch(t):
        return _int_to_float(int(t[2:], _RADIX[t[1]]))
    if t == "Infinity" or t == "+Infinity":
        return _INF
    if t == "-Infinity":
        return -_INF
    return _NAN


def js_to_number(v: object) -> float:
    """JavaScript ``Number(v)`` for JSON-like values: may return NaN or ±Infinity.

    ``None`` is JSON ``null`` (→ 0); :data:`UNDEFINED` is ``undefined`` (→ NaN); lists convert through
    ``Array.prototype.join`` like JavaScript arrays; any other object is NaN.
    """
    if type(v) is float:
        return v
    if type(v) is str:
        return _string_to_number(v)
    if type(v) is bool:
        return 1.0 if v else 0.0
    if type(v) is int:
        return _int_to_float(v)
    if v is None:
        return 0.0
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int):
        return _int_to_float(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return _string_to_number(str(v))
    if isinstance(v, list | tuple):
        return _string_to_number(js_string(v))
    return _NAN


def js_number(v: object) -> float | None:
    """``Number(v)`` when it is a finite number, else ``None`` (NaN and ±Infinity both count as "not a number").

    Note ``js_number(None)`` is 0.0 as in JavaScript (``Number(null) === 0``); callers that must skip nulls check first.
    """
    if type(v) is int and -9007199254740992 <= v <= 9007199254740992:
        return float(v)
    f = float(v) if type(v) is str and v.isdigit() and v.isascii() else js_to_number(v)
    if f - f == 0.0:  # false for NaN and ±Infinity
        return f
    return None


def js_number_to_string(x: float) -> str:
    """``Number.prototype.toString()`` (radix 10): shortest round-trip digits in JavaScript's layout."""
    if x != x:
        return "NaN"
    if x == 0.0:
        return "0"  # also for -0
    if x < 0.0:
        return "-" + js_number_to_string(-x)
    if x == _INF:
        return "Infinity"
    if x < 9007199254740992.0 and x.is_integer():
        return str(int(x))  # exact below 2**53; above it the shortest digits are not the integer's digits
    return _format_shortest(x)


def _format_shortest(x: float) -> str:
    """The general path of :func:`js_number_to_string` for a finite ``x > 0``."""
    # repr() gives the shortest digit string that round-trips (ties to the nearer value), as V8 does.
    r = repr(x)
    if "e" in r:
        mant, _, e = r.partition("e")
        exp = int(e)
    else:
        mant, exp = r, 0
    ip, _, fp = mant.partition(".")
    digits = ip + fp
    n = len(ip) + exp  # the value is 0.<digits> × 10^n
    stripped = digits.lstrip("0")
    n -= len(digits) - len(stripped)
    s = stripped.rstrip("0")
    k = len(s)
    if k <= n <= 21:
        return s + "0" * (n - k)
    if 0 < n <= 21:
        return s[:n] + "." + s[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + s
    e1 = n - 1
    sign = "+" if e1 >= 0 else "-"
    if k == 1:
        return f"{s}e{sign}{abs(e1)}"
    return f"{s[0]}.{s[1:]}e{sign}{abs(e1)}"


def js_string(v: object) -> str:
    """JavaScript ``String(v)`` for JSON-like values (``None`` is ``null``, lists join with commas)."""
    if type(v) is str:
        return v
    if type(v) is int and -9007199254740992 <= v <= 9007199254740992:
        return str(v)
    if v is None:
        return "null"
    if v is UNDEFINED:
        return "undefined"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return js_number_to_string(_int_to_float(v))
    if isinstance(v, float):
        return js_number_to_string(v)
    if isinstance(v, str):
        return str(v)
    if isinstance(v, list | tuple):
        # Array.prototype.join: null and undefined elements become empty strings.
        return ",".join("" if e is None or e is UNDEFINED else js_string(e) for e in v)
    return "[object Object]"


def js_truthy(v: object) -> bool:
    """JavaScript truthiness: ``null``, ``undefined``, ``false``, 0, -0, NaN and ``""`` are falsy."""
    if v is None or v is UNDEFINED:
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v != 0
    if isinstance(v, float):
        return v == v and v != 0.0
    if isinstance(v, str):
        return v != ""
    return True  # every object and array, even empty ones


# --------------------------------------------------------------------------------------------------------------------
# JSON.stringify

_encode_str = json.encoder.encode_basestring
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")


def _quote(s: str) -> str:
    if _SURROGATE_RE.search(s):
        # A JavaScript string is UTF-16: an adjacent high+low surrogate pair *is* the astral character, and
        # well-formed JSON.stringify escapes the surrogates left alone (Python strings can hold them; UTF-8 cannot).
        s = s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
        return _SURROGATE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", _encode_str(s))
    out: str = _encode_str(s)
    return out


def _is_array_index(k: str) -> bool:
    """A canonical array index ("0", "17", not "01"), which JavaScript objects enumerate first, ascending."""
    return k.isdigit() and k.isascii() and (k == "0" or k[0] != "0") and int(k) < 4294967295


def js_key_order(keys: Iterable[str]) -> list[str]:
    """Own-property order of a JavaScript object created with ``keys`` in this insertion order."""
    ks = list(keys)
    idx = [k for k in ks if k[:1].isdigit() and _is_array_index(k)]
    if not idx:
        return ks
    idx_set = set(idx)
    return sorted(idx, key=int) + [k for k in ks if k not in idx_set]


def _dump(v: object, out: list[str]) -> None:
    if type(v) is str:
        out.append(_quote(v))
    elif type(v) is float:
        out.append(js_number_to_string(v) if v - v == 0.0 else "null")
    elif v is None:
        out.append("null")
    elif type(v) is bool:
        out.append("true" if v else "false")
    elif type(v) is int:
        out.append(js_number_to_string(_int_to_float(v)))
    elif isinstance(v, Mapping):
        out.append("{")
        first = True
        for k in js_key_order(v):
            if type(k) is not str:
                raise TypeError(f"js_dumps: object key {k!r} is not a string")
            val = v[k]
            if val is UNDEFINED:
                continue  # JSON.stringify omits undefined-valued properties
            if not first:
                out.append(",")
            first = False
            out.append(_quote(k))
            out.append(":")
            _dump(val, out)
        out.append("}")
    elif isinstance(v, list | tuple):
        out.append("[")
        for i, e in enumerate(v):
            if i:
                out.append(",")
            if e is UNDEFINED:
                out.append("null")
            else:
                _dump(e, out)
        out.append("]")
    elif isinstance(v, bool):
        out.append("true" if v else "false")
    elif isinstance(v, int):
        out.append(js_number_to_string(_int_to_float(v)))
    elif isinstance(v, float):
        out.append(js_number_to_string(v) if v - v == 0.0 else "null")
    elif isinstance(v, str):
        out.append(_quote(str(v)))
    else:
        raise TypeError(f"js_dumps: {type(v).__name__} is not JSON-serialisable")


def js_dumps(obj: object) -> str:
    """``JSON.stringify(obj)``: compact, JavaScript number formatting, NaN/±Infinity as ``null``, key order as JS.

    Mapping keys must be strings (as they are in JSON). A top-level :data:`UNDEFINED` is not supported.
    """
    out: list[str] = []
    _dump(obj, out)
    return "".join(out)
