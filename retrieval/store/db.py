"""SQLite metadata and raw embeddings, through sqlite-utils.

SQLite is the source of truth. FAISS files are derived from the `embeddings` table and can always be
rebuilt from it, which is what makes crash recovery and fusion retraining cheap.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from retrieval.faults import checkpoint
from retrieval.store.migrations import migrate
from retrieval.store.readonly import _connect_readonly, _ReadOnlyDatabase
from retrieval.store.rows import ImageRow, _chunks, path_from_db, path_to_db, text_hash

SCHEMA_VERSION = 1  # the read format; steps within it are counted by PRAGMA user_version (migrations.py)
DB_NAME = "meta.sqlite"


def _import_sqlite_utils():
    """sqlite_utils, imported without pandas when pandas is installed but not yet loaded: sqlite_utils imports
    it only to recognise pandas values in inserts, which the store never makes, and that import costs ~0.3 s of
    every `index` run (docs/fast-queries.md)."""
    import sys

    if "sqlite_utils" in sys.modules or "pandas" in sys.modules:
        import sqlite_utils

        return sqlite_utils
    sys.modules["pandas"] = None  # `import pandas` raises ImportError while this is set
    try:
        import sqlite_utils
    finally:
        del sys.modules["pandas"]
    return sqlite_utils


class Store:
    """One index's SQLite database. Writers hold the index lock; readers may run at any time (WAL)."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            conn = _connect_readonly(self.path)
        else:
            conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        conn.execute("PRAGMA busy_timeout = 30000")
        self.readonly = readonly
        if readonly:
            self.db = _ReadOnlyDatabase(conn)  # readers only execute(): no sqlite_utils import (~0.1 s cold)
        else:
            sqlite_utils = _import_sqlite_utils()
            self.db = sqlite_utils.Database(conn, execute_plugins=False)  # no entry-point scan (~50 ms per open)
            self.db.conn.execute("PRAGMA journal_mode = WAL")
            self.db.conn.execute("PRAGMA synchronous = NORMAL")
            self._ensure_schema()

    def close(self) -> None:
        self.db.conn.close()

    # -- schema ---------------------------------------------------------------------------------

    def _ensure_schema(self) -> None:
        # numbered steps (retrieval/store/migrations.py), each in its own transaction
        migrate(self.db.conn)
        if self.get_manifest("schema_version") is None:
            with self.db.atomic():
                self.set_manifest("schema_version", SCHEMA_VERSION)

    def has_photo_meta(self) -> bool:
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(images)")}
        return "meta_hash" in cols

    def images_needing_meta(self) -> list[tuple[int, str, int, str]]:
        """(id, path, mtime_ns, hash) of images whose metadata was not read from their current content."""
        return [
            (i, path_from_db(raw), m, h)
            for i, raw, m, h in self.db.execute(
                "SELECT id, path_raw, mtime_ns, hash FROM images WHERE meta_hash IS NOT hash ORDER BY id"
            )
        ]

    def set_photo_meta(self, rows: Sequence[tuple]) -> None:
        """rows: (id, hash, PhotoMeta)."""
        from retrieval.exif import META_COLUMNS

        sets = ", ".join(f"{c}=?" for c in META_COLUMNS)
        self.db.conn.executemany(
            f"UPDATE images SET {sets}, meta_hash=? WHERE id=?", [(*m.as_row(), h, i) for i, h, m in rows]
        )

    def photo_meta(self, ids: Sequence[int]) -> dict:
        """id -> PhotoMeta for images whose metadata has been read ({} for an index from before it existed)."""
        from retrieval.exif import META_COLUMNS, PhotoMeta

        if not self.has_photo_meta():
            return {}
        out = {}
        for chunk in _chunks([int(i) for i in ids], 900):
            q = (
                f"SELECT id, {', '.join(META_COLUMNS)} FROM images WHERE meta_hash IS NOT NULL "
                f"AND id IN ({','.join('?' * len(chunk))})"
            )
            for row in self.db.execute(q, chunk):
                out[row[0]] = PhotoMeta(*row[1:])
        return out

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.db.atomic():
            yield
            checkpoint("sqlite_commit")

    # -- whole tables (retrieval copy) -----------------------------------------------------------

    @contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Within the block, every read on this store sees one committed state (one SQLite read
        transaction: a writer may commit meanwhile, in WAL mode, unseen)."""
        conn = self.db.conn
        if conn.in_transaction:  # inside a caller's transaction: that one is the snapshot
            yield
            return
        conn.execute("BEGIN")
        try:
            yield
        finally:
            conn.rollback()  # only reads happened

    def table_columns(self, table: str) -> list[str]:
        """The columns of `table`, in their order (an index from an older version may lack some)."""
        return [r[1] for r in self.db.execute(f"PRAGMA table_info([{table}])")]

    def iter_rows(self, table: str, columns: Sequence[str], order_by: str) -> Iterator[tuple]:
        """Every row of `table` as a tuple of `columns`, streamed (not all read into memory at once)."""
        names = ", ".join(f"[{c}]" for c in columns)
        for row in self.db.execute(f"SELECT {names} FROM [{table}] ORDER BY {order_by}"):
            yield tuple(row)

    def insert_rows(self, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> int:
        """Insert `rows` (tuples of `columns`, ids given) as they come; returns how many. Inside a
        transaction of the caller's."""
        counted = _Counted(rows)
        names = ", ".join(f"[{c}]" for c in columns)
        marks = ",".join("?" * len(columns))
        self.db.conn.executemany(f"INSERT INTO [{table}] ({names}) VALUES ({marks})", counted)
        return counted.n

    def move_id_sequences(self) -> None:
        """After rows were inserted with their ids: the next row gets an id above them. SQLite's
        INTEGER PRIMARY KEY already does (max(id) + 1)."""

    # -- manifest -------------------------------------------------------------------------------

    def get_manifest(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM manifest WHERE key = ?", [key]).fetchone()
        return default if row is None else json.loads(row[0])

    def manifest(self) -> dict:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM manifest")}

    def set_manifest(self, key: str, value) -> None:
        self.db.execute(
            "INSERT INTO manifest(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, json.dumps(value, sort_keys=True)],
        )

    # -- images ---------------------------------------------------------------------------------

    _IMAGE_COLS = "id, path_raw, path, size, mtime_ns, hash, width, height"

    @staticmethod
    def _image(row) -> ImageRow:
        return ImageRow(row[0], path_from_db(row[1]), row[2], row[3], row[4], row[5], row[6], row[7])

    def image_stats(self) -> dict[str, tuple[int, int, int, str]]:
        """path -> (id, size, mtime_ns, hash) for every image: what an incremental scan compares against."""
        return {
            path_from_db(raw): (i, s, m, h)
            for i, raw, s, m, h in self.db.execute("SELECT id, path_raw, size, mtime_ns, hash FROM images")
        }

    def images_by_ids(self, ids: Sequence[int]) -> dict[int, ImageRow]:
        out: dict[int, ImageRow] = {}
        ids = [int(i) for i in ids]
        for chunk in _chunks(ids, 900):
            q = f"SELECT {self._IMAGE_COLS} FROM images WHERE id IN ({','.join('?' * len(chunk))})"
            for row in self.db.execute(q, chunk):
                out[row[0]] = self._image(row)
        return out

    def image_by_path(self, path: str) -> ImageRow | None:
        row = self.db.execute(
            f"SELECT {self._IMAGE_COLS} FROM images WHERE path_raw = ?", [os.fsencode(path)]
        ).fetchone()
        return None if row is None else self._image(row)

    def iter_images(self) -> Iterator[ImageRow]:
        for row in self.db.execute(f"SELECT {self._IMAGE_COLS} FROM images ORDER BY id"):
            yield self._image(row)

    def image_ids_with_hash(self) -> list[tuple[int, str]]:
        return list(self.db.execute("SELECT id, hash FROM images ORDER BY id"))

    def upsert_image(self, path: str, size: int, mtime_ns: int, hash_: str, width=None, height=None) -> int:
        text, raw = path_to_db(path)
        row = self.db.execute("SELECT id FROM images WHERE path_raw = ?", [raw]).fetchone()
        if row:
            self.db.execute(
                "UPDATE images SET size=?, mtime_ns=?, hash=?, width=COALESCE(?, width), height=COALESCE(?, "
                "height), status='ok' WHERE id=?",
                [size, mtime_ns, hash_, width, height, row[0]],
            )
            return int(row[0])
        cur = self.db.execute(
            "INSERT INTO images(path, path_raw, size, mtime_ns, hash, width, height, added_at, status) VALUES "
            "(?,?,?,?,?,?,?,?, 'ok')",
            [text, raw, size, mtime_ns, hash_, width, height, time.time()],
        )
        return int(cur.lastrowid)

    def move_image(self, image_id: int, new_path: str, size: int, mtime_ns: int) -> None:
        text, raw = path_to_db(new_path)
        self.db.execute(
            "UPDATE images SET path=?, path_raw=?, size=?, mtime_ns=? WHERE id=?", [text, raw, size, mtime_ns, image_id]
        )

    def touch_image(self, image_id: int, size: int, mtime_ns: int) -> None:
        self.db.execute("UPDATE images SET size=?, mtime_ns=? WHERE id=?", [size, mtime_ns, image_id])

    def delete_images(self, ids: Iterable[int]) -> None:
        """Their captions go with them (captions.image_id: ON DELETE CASCADE)."""
        ids = [int(i) for i in ids]
        for chunk in _chunks(ids, 900):
            marks = ",".join("?" * len(chunk))
            self.db.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)

    def count(self, table: str) -> int:
        return int(self.db.execute(f"SELECT COUNT(*) FROM [{table}]").fetchone()[0])

    # -- captions -------------------------------------------------------------------------------

    def add_captions(self, image_id: int | None, texts: Sequence[str], source: str) -> list[int]:
        """Insert captions not already attached to this image; return the ids of new ones."""
        new = []
        for t in texts:
            h = text_hash(t)
            cur = self.db.execute(
                "INSERT OR IGNORE INTO captions(image_id, text, text_hash, source) VALUES (?,?,?,?)",
                [image_id, t, h, source],
            )
            if cur.rowcount:
                new.append(int(cur.lastrowid))
        return new

    def captions_for_images(self, ids: Sequence[int]) -> dict[int, list[tuple[int, str]]]:
        out: dict[int, list[tuple[int, str]]] = {}
        for chunk in _chunks([int(i) for i in ids], 900):
            q = f"SELECT image_id, id, text FROM captions WHERE image_id IN ({','.join('?' * len(chunk))}) ORDER BY id"
            for image_id, cid, text in self.db.execute(q, chunk):
                out.setdefault(image_id, []).append((cid, text))
        return out

    def captions_by_ids(self, ids: Sequence[int]) -> dict[int, tuple[int | None, str, str]]:
        """caption id -> (image_id, text, source)"""
        out = {}
        for chunk in _chunks([int(i) for i in ids], 900):
            q = f"SELECT id, image_id, text, source FROM captions WHERE id IN ({','.join('?' * len(chunk))})"
            for cid, image_id, text, source in self.db.execute(q, chunk):
                out[cid] = (image_id, text, source)
        return out

    def caption_ids_with_hash(self) -> list[tuple[int, str]]:
        return list(self.db.execute("SELECT id, text_hash FROM captions ORDER BY id"))

    def caption_pairs(self) -> list[tuple[int, int, str, str]]:
        """(caption id, image id, image hash, text hash) for captions attached to an image: training pairs."""
        return list(
            self.db.execute(
                "SELECT c.id, c.image_id, i.hash, c.text_hash FROM captions c JOIN images i ON i.id = "
                "c.image_id ORDER BY c.id"
            )
        )

    def texts_missing_embeddings(self) -> list[tuple[str, str]]:
        return list(
            self.db.execute(
                "SELECT DISTINCT c.text_hash, c.text FROM captions c LEFT JOIN embeddings e "
                "ON e.kind = 'text' AND e.key = c.text_hash WHERE e.key IS NULL"
            )
        )

    # -- embeddings -----------------------------------------------------------------------------

    def put_embeddings(self, kind: str, keys: Sequence[str], vecs: np.ndarray) -> None:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        self.db.conn.executemany(
            "INSERT OR REPLACE INTO embeddings(kind, key, vector) VALUES (?,?,?)",
            [(kind, k, v.tobytes()) for k, v in zip(keys, vecs)],
        )

    def has_embeddings(self, kind: str, keys: Iterable[str]) -> set[str]:
        keys = list(keys)
        found: set[str] = set()
        for chunk in _chunks(keys, 900):
            q = f"SELECT key FROM embeddings WHERE kind = ? AND key IN ({','.join('?' * len(chunk))})"
            found.update(r[0] for r in self.db.execute(q, [kind, *chunk]))
        return found

    def get_embeddings(self, kind: str, keys: Sequence[str], dim: int) -> np.ndarray:
        """Vectors in the order of `keys`; a missing key raises KeyError (the index is inconsistent)."""
        found: dict[str, bytes] = {}
        uniq = list(dict.fromkeys(keys))
        for chunk in _chunks(uniq, 900):
            q = f"SELECT key, vector FROM embeddings WHERE kind = ? AND key IN ({','.join('?' * len(chunk))})"
            found.update(self.db.execute(q, [kind, *chunk]))
        out = np.empty((len(keys), dim), dtype=np.float32)
        for i, k in enumerate(keys):
            out[i] = np.frombuffer(found[k], dtype=np.float32)
        return out

    def drop_unreferenced_embeddings(self) -> int:
        cur = self.db.execute(
            "DELETE FROM embeddings WHERE (kind = 'image' AND key NOT IN (SELECT hash FROM images)) "
            "OR (kind = 'text' AND key NOT IN (SELECT text_hash FROM captions))"
        )
        return cur.rowcount

    def clear_embeddings(self) -> None:
        self.db.execute("DELETE FROM embeddings")

    # -- errors ---------------------------------------------------------------------------------

    def record_error(self, path: str, reason: str, size: int | None = None, mtime_ns: int | None = None) -> None:
        """size and mtime_ns: the file's when it failed to decode; an unchanged file is then not retried."""
        text, raw = path_to_db(path)
        self.db.execute(
            "INSERT INTO errors(path, path_raw, reason, at, size, mtime_ns) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(path_raw) DO UPDATE SET reason = excluded.reason, at = excluded.at, "
            "size = excluded.size, mtime_ns = excluded.mtime_ns",
            [text, raw, reason, time.time(), size, mtime_ns],
        )

    def remembered_failures(self) -> dict[str, tuple[int, int, str]]:
        """path -> (size, mtime_ns, reason) of files that failed to decode as they were then."""
        return {
            path_from_db(raw): (size, mtime, reason)
            for raw, size, mtime, reason in self.db.execute(
                "SELECT path_raw, size, mtime_ns, reason FROM errors WHERE size IS NOT NULL AND mtime_ns IS NOT NULL"
            )
        }

    def clear_errors(self, paths: Iterable[str]) -> None:
        raws = [os.fsencode(p) for p in paths]
        for chunk in _chunks(raws, 900):
            self.db.execute(f"DELETE FROM errors WHERE path_raw IN ({','.join('?' * len(chunk))})", chunk)

    def errors(self) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT path, reason FROM errors ORDER BY path"))


class _Counted:
    """An iterable that counts what it hands out (executemany and COPY consume it as it comes)."""

    def __init__(self, rows: Iterable[tuple]):
        self._rows = iter(rows)
        self.n = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        row = next(self._rows)
        self.n += 1
        return row
