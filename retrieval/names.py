"""File names as output: exact bytes for machines, escaped text for people.

A name on disk is bytes. It may hold a newline, an escape sequence, or bytes that are not UTF-8. Machine
output (`--null`, `--paths`) writes the exact bytes; terminal output escapes what would otherwise move
the cursor, change colours or print as U+FFFD.
"""

from __future__ import annotations

import base64
import os

_NAMED = {0x07: "\\a", 0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0B: "\\v", 0x0C: "\\f", 0x0D: "\\r", 0x1B: "\\e"}


def display_text(path: str | bytes) -> str:
    """A path as UTF-8 text for people and JSON: bytes that are not UTF-8 become U+FFFD."""
    return (path if isinstance(path, bytes) else os.fsencode(path)).decode("utf-8", "replace")


def result_bytes(path: str, path_b64: str | None) -> bytes:
    """The exact name of a search result: `path_b64` when the name is not UTF-8, else `path` itself."""
    return base64.b64decode(path_b64) if path_b64 else path.encode("utf-8", "surrogateescape")


def escape_name(raw: bytes | str, backslash: bool = False) -> str:
    """Printable text for a name: control characters (C0, DEL, C1) as \\n, \\e, \\x7f, \\u0085, bytes
    that are not UTF-8 as \\xHH. With backslash=True a backslash is doubled, so the text is unambiguous."""
    if isinstance(raw, str):
        raw = os.fsencode(raw)
    out = []
    i = 0
    while i < len(raw):
        b = raw[i]
        if b < 0x80:
            ch = chr(b)
            if b in _NAMED:
                out.append(_NAMED[b])
            elif b < 0x20 or b == 0x7F:
                out.append(f"\\x{b:02x}")
            elif ch == "\\" and backslash:
                out.append("\\\\")
            else:
                out.append(ch)
            i += 1
            continue
        n = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 0
        try:
            ch = raw[i : i + n].decode("utf-8") if n else None
        except UnicodeDecodeError:
            ch = None
        if ch is None:
            out.append(f"\\x{b:02x}")
            i += 1
        elif 0x80 <= ord(ch) < 0xA0 or ch in "\u2028\u2029":  # C1 controls (e.g. CSI) and line separators
            out.append(f"\\u{ord(ch):04x}")
            i += n
        else:
            out.append(ch)
            i += n
    return "".join(out)


def needs_quoting(raw: bytes) -> bool:
    """True when a name cannot be written on one line of `--paths` output as it is."""
    return b"\n" in raw or b"\r" in raw


def shell_quote(raw: bytes) -> str:
    """bash/zsh $'...' quoting of a name, escapes included: pasting it into a shell names the file."""
    return "$'" + escape_name(raw, backslash=True).replace("'", "\\'") + "'"
