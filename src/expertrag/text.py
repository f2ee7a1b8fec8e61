"""Making untrusted text safe to print: ids, titles and messages come from user data."""

from __future__ import annotations

import math
import unicodedata
from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\x1b"}


def escape_controls(text: str) -> str:
    """`text` with control and format characters (newline, ESC, bidi overrides, ...) as visible escapes,
    so data can never move the cursor, recolour the terminal or split one record over several lines."""
    out = []
    for ch in text:
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def one_line(text: str) -> str:
    """A message as exactly one printable line."""
    return escape_controls(text.strip())


def printable_body(text: str) -> str:
    """Passage text for a terminal: whitespace runs become one space, other controls are escaped."""
    return escape_controls(" ".join(text.split()))


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±Infinity: not JSON) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
