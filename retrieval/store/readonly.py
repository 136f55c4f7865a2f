"""Read-only SQLite connections for searches: no write lock, no sqlite_utils import, safe while a writer works."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


class _ReadOnlyDatabase:
    """The part of sqlite_utils.Database that readers use (execute, conn), for read-only stores."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def execute(self, sql: str, parameters=None) -> sqlite3.Cursor:
        return self.conn.execute(sql) if parameters is None else self.conn.execute(sql, parameters)

    def atomic(self):
        raise sqlite3.OperationalError("attempt to write a readonly database (this store was opened for reading)")


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """mode=ro. On a read-only filesystem a WAL database cannot get its -shm file and would not open at
    all, so there it is opened immutable (nothing can change it while that mount is read-only)."""
    from urllib.parse import quote

    uri = "file:" + quote(os.fsencode(os.path.abspath(path)))
    conn = sqlite3.connect(uri + "?mode=ro", uri=True, check_same_thread=False, timeout=30)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        try:
            read_only_fs = bool(os.statvfs(os.path.dirname(os.path.abspath(path))).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            read_only_fs = False
        if not read_only_fs:
            raise
        conn.close()
    return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, check_same_thread=False, timeout=30)
