"""Content hashes: how moved files, duplicates and changed files are recognised."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

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


def sha256_file(path: str | os.PathLike, *, cache: bool = True) -> str:
    """sha256 of a weights file, cached beside it (or in ~/.cache) keyed by size and mtime."""
    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "retrieval" / "sha256.json"
    table: dict = {}
    if cache:
        try:
            table = json.loads(cache_file.read_text())
            if key in table:
                return table[key]
        except (OSError, ValueError):
            table = {}
    digest = hash_file(path)
    if cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            table[key] = digest
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table))
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return digest
