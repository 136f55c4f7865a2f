"""Durable writes: a temp file, fsync and rename, and the directory fsync that makes a rename durable."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make a rename durable. Not possible on Windows, where opening a directory fails."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def replacing(path: Path):
    """Yields a temp file name in `path`'s directory for the caller to fill (and fsync); on a clean exit it
    replaces `path` in one rename, on any error it is removed. A crash or a full disk leaves the old file
    or the new one, never a half-written one. (Call fsync_dir after, to make the rename durable.)"""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_atomic(path: Path, data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
