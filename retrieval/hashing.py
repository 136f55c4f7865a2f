"""Content hashes: how moved files, duplicates and changed files are recognised."""

from __future__ import annotations

import hashlib

_CHUNK = 1 << 20


def hash_file(path) -> str:
    """Hex SHA-256 of the file's bytes. Shared by the write path and the query path (--exclude-self).

    SHA-256 rather than BLAKE2b: with the CPU's SHA extensions it is faster here (measured), and any
    change of algorithm changes every stored hash."""
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
        return h.hexdigest()
