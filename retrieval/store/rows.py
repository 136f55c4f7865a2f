"""How rows hold what they hold: image rows, exact path bytes beside display text, text hashes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from retrieval.names import display_text


def path_to_db(path: str) -> tuple[str, bytes]:
    """(display text, exact bytes). Non-UTF-8 names keep their bytes; the text is for people."""
    raw = os.fsencode(path)
    return display_text(raw), raw


def path_from_db(raw: bytes) -> str:
    return os.fsdecode(bytes(raw))


@dataclass(frozen=True)
class ImageRow:
    id: int
    path: str  # filesystem path (round-trips non-UTF-8 names)
    display_path: str  # UTF-8 text for printing and JSON
    size: int
    mtime_ns: int
    hash: str
    width: int | None
    height: int | None


def text_hash(text: str) -> str:
    import hashlib

    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
