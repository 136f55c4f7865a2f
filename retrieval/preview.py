"""Inline image previews in the terminal: the kitty graphics protocol or iTerm2's inline images, chosen from the
environment, for `search --preview`.

The two encoders are small and written here: the Python libraries that do this (term-image and others) pin
Pillow below the version this project uses, or pull in a whole TUI toolkit.

    kitty  (kitty, Ghostty, Konsole; WezTerm speaks both): ESC _G f=100,a=T,r=ROWS,m=1 ; <base64 PNG, 4096-byte
           chunks> ESC \\ ... the last chunk with m=0
    iTerm2 (iTerm2, WezTerm, VS Code, mintty): ESC ]1337;File=inline=1;size=N;height=ROWS;name=B64 : <base64> BEL

RETRIEVAL_PREVIEW=kitty|iterm2 forces a protocol (e.g. inside tmux with passthrough on), =none turns it off.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from typing import Mapping

KITTY_CHUNK = 4096
DEFAULT_ROWS = 8
THUMB_PX = 320
PROTOCOLS = ("kitty", "iterm2")


@dataclass(frozen=True)
class Detection:
    protocol: str | None  # "kitty", "iterm2", or None when the terminal cannot show images
    reason: str  # why: the variable that decided, or what is missing


def detect(environ: Mapping[str, str] | None = None, isatty: bool = True) -> Detection:
    env = os.environ if environ is None else environ
    forced = (env.get("RETRIEVAL_PREVIEW") or "").strip().lower()
    if forced in PROTOCOLS:
        return Detection(forced, f"RETRIEVAL_PREVIEW={forced}")
    if forced in ("none", "off", "0"):
        return Detection(None, "previews are off (RETRIEVAL_PREVIEW=none)")
    if forced:
        return Detection(None, f"RETRIEVAL_PREVIEW={forced!r} is not one of kitty, iterm2, none")
    if not isatty:
        return Detection(None, "the output is not a terminal (set RETRIEVAL_PREVIEW=kitty or iterm2 to force)")
    if env.get("TMUX") or env.get("TERM", "").startswith(("screen", "tmux")):
        return Detection(
            None,
            "tmux and screen do not pass images through by default "
            "(with tmux's allow-passthrough on, set RETRIEVAL_PREVIEW=kitty or iterm2)",
        )
    term, program = env.get("TERM", ""), env.get("TERM_PROGRAM", "")
    if env.get("KITTY_WINDOW_ID") or term == "xterm-kitty":
        return Detection("kitty", "kitty")
    if program == "ghostty" or term == "xterm-ghostty":
        return Detection("kitty", "Ghostty")
    if program in ("iTerm.app", "WezTerm", "vscode", "mintty") or env.get("LC_TERMINAL") == "iTerm2":
        return Detection("iterm2", program or "iTerm2")
    if env.get("WEZTERM_EXECUTABLE"):
        return Detection("iterm2", "WezTerm")
    if env.get("KONSOLE_VERSION"):
        return Detection("kitty", "Konsole")
    shown = f"TERM={term or 'unset'}" + (f", TERM_PROGRAM={program}" if program else "")
    return Detection(
        None,
        f"this terminal ({shown}) cannot show images inline; previews work in kitty, Ghostty, "
        "WezTerm, iTerm2, Konsole and VS Code",
    )


def kitty_escape(png: bytes, rows: int = DEFAULT_ROWS) -> str:
    """PNG bytes as kitty graphics protocol commands: transmit and display, scaled to `rows` text rows."""
    data = base64.standard_b64encode(png).decode("ascii")
    chunks = [data[i : i + KITTY_CHUNK] for i in range(0, len(data), KITTY_CHUNK)] or [""]
    out = []
    for n, chunk in enumerate(chunks):
        more = 1 if n < len(chunks) - 1 else 0
        keys = f"f=100,a=T,q=2,r={int(rows)},m={more}" if n == 0 else f"m={more}"
        out.append(f"\x1b_G{keys};{chunk}\x1b\\")
    return "".join(out)


def iterm2_escape(data: bytes, rows: int = DEFAULT_ROWS, name: str = "preview.png") -> str:
    """Image file bytes as an iTerm2 inline image, `rows` text rows high, aspect ratio kept."""
    b64name = base64.standard_b64encode(name.encode("utf-8", "replace")).decode("ascii")
    payload = base64.standard_b64encode(data).decode("ascii")
    return (
        f"\x1b]1337;File=inline=1;size={len(data)};name={b64name};height={int(rows)};"
        f"preserveAspectRatio=1:{payload}\x07"
    )


def thumbnail_png(path: str, max_px: int = THUMB_PX) -> bytes:
    """A small PNG of the image at `path` through the indexer's own loader (HEIC, RAW and EXIF rotation
    included). Raises ImageDecodeError for a file that cannot be shown."""
    from PIL import Image

    from retrieval.images import load_image

    img = load_image(path, target_size=max_px)
    img.thumbnail((max_px, max_px), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def escape_for(path: str, protocol: str, rows: int = DEFAULT_ROWS) -> str:
    png = thumbnail_png(path)
    if protocol == "kitty":
        return kitty_escape(png, rows)
    return iterm2_escape(png, rows, os.path.basename(path) + ".png")
