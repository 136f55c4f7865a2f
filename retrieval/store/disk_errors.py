"""A full, read-only or failing disk as one line for the user: what happened and what to free or fix."""

from __future__ import annotations

import errno
import os

from retrieval.errors import (
    RetrievalError,
)

_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


_SQLITE_STORAGE = ("database or disk is full", "readonly database", "disk I/O error", "unable to open database file")


def storage_error(e: BaseException, root) -> RetrievalError | None:
    """A write to the index that failed because of the disk (full, read-only, quota, permissions, I/O) as
    a one-line user error; None for any other exception (a bug keeps its traceback). Knows OSError,
    sqlite3 errors and the RuntimeError faiss raises with the C library's strerror in parentheses."""
    why = None
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
        why = e.strerror or str(e)
    elif e.__class__.__name__ in ("OperationalError", "DatabaseError") and any(s in str(e) for s in _SQLITE_STORAGE):
        why = str(e)
    elif isinstance(e, RuntimeError):
        why = next((os.strerror(n) for n in _STORAGE_ERRNOS if f"({os.strerror(n)})" in str(e)), None)
    if why is None:
        return None
    why += _disk_full_hint(root) if "space" not in why and "full" not in why else ""
    return RetrievalError(
        f"cannot write to the index at {root}: {why}. What was written before is intact; "
        f"free some space (or make it writable) and run the same command again to finish"
    )


def _disk_full_hint(root) -> str:
    """ " (the disk is full)" when it is: SQLite says only "disk I/O error" when it cannot grow its -shm."""
    try:
        import shutil

        free = shutil.disk_usage(root).free
    except OSError:
        return ""
    return f" (the disk is full: {free // 1024} KiB free)" if free < (1 << 20) else ""
