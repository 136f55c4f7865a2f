"""Sidecar caption files: <image>.txt or <stem>.txt beside a photo, capped so a huge or hostile one is harmless."""

from __future__ import annotations

import os

# Caps on a sidecar caption file, so a huge or hostile one cannot blow memory.
SIDECAR_MAX_BYTES = 64 * 1024  # per file


SIDECAR_MAX_LINES = 20  # captions per image, all sidecar files together


SIDECAR_MAX_CHARS = 1000  # per caption


def sidecar_paths(image_path: str | os.PathLike[str]) -> list[str]:
    """Candidate sidecar caption files for an image: ``<image>.txt`` then ``<stem>.txt`` (existing or not)."""
    image = os.fspath(image_path)
    stem, _ = os.path.splitext(image)
    out = [image + ".txt"]
    other = stem + ".txt"
    if other not in out and os.path.normpath(other) != os.path.normpath(image):
        out.append(other)
    return out


def read_sidecar(image_path: str | os.PathLike[str]) -> list[str]:
    """Captions for an image from its sidecar text file(s), one caption per non-empty line.

    Reads ``<image>.txt`` (``photo.jpg.txt``) and ``<stem>.txt`` (``photo.txt``), in that order; only regular
    files are opened (never a FIFO or device). Bounded: at most ``SIDECAR_MAX_BYTES`` read per file (a line cut
    by that limit is dropped), ``SIDECAR_MAX_LINES`` captions in all, each cut to ``SIDECAR_MAX_CHARS``
    characters. Decoded as UTF-8 with ``errors="replace"``; exact duplicates are dropped. A missing or
    unreadable sidecar gives no captions rather than an error.
    """
    captions: list[str] = []
    seen: set[str] = set()
    for candidate in sidecar_paths(image_path):
        if len(captions) >= SIDECAR_MAX_LINES:
            break
        try:
            if not os.path.isfile(candidate):
                continue
            with open(candidate, "rb") as f:
                data = f.read(SIDECAR_MAX_BYTES + 1)
        except OSError:
            continue
        if len(data) > SIDECAR_MAX_BYTES:
            data = data[:SIDECAR_MAX_BYTES]
            cut = data.rfind(b"\n")
            if cut > 0:
                data = data[:cut]
        text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
        for line in text.splitlines():
            caption = line.strip()[:SIDECAR_MAX_CHARS].strip()
            if not caption or caption in seen:
                continue
            seen.add(caption)
            captions.append(caption)
            if len(captions) >= SIDECAR_MAX_LINES:
                break
    return captions
