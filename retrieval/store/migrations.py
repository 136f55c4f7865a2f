"""Numbered schema steps for meta.sqlite; `PRAGMA user_version` records how many have run.

Plain SQL rather than sqlite-utils' create/add_column: those commit on their own, and each step here must
be one transaction (a step killed midway leaves the index at the step before, and the next writable open
runs it again). Every step is idempotent, so an index made before user_version was kept (user_version 0,
with or without the columns that were once added by ALTER TABLE) goes through all of them cleanly.
"""

from __future__ import annotations

import sqlite3
from typing import Callable

from retrieval.faults import checkpoint


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info([{table}])")}


def _add_columns(conn: sqlite3.Connection, table: str, cols: dict[str, str]) -> None:
    have = _columns(conn, table)
    for name, kind in cols.items():
        if name not in have:
            conn.execute(f"ALTER TABLE [{table}] ADD COLUMN [{name}] {kind}")


_CAPTIONS_INDEXES = (
    'CREATE INDEX IF NOT EXISTS "idx_captions_image_id" ON "captions" ("image_id")',
    'CREATE UNIQUE INDEX IF NOT EXISTS "idx_captions_image_id_text_hash" ON "captions" ("image_id", "text_hash")',
)


def _base(conn: sqlite3.Connection) -> None:
    """Version 1: the tables as the first released format had them."""
    for st in (
        'CREATE TABLE IF NOT EXISTS "manifest" ("key" TEXT PRIMARY KEY, "value" TEXT)',
        'CREATE TABLE IF NOT EXISTS "images" ("id" INTEGER PRIMARY KEY, "path" TEXT, "path_raw" BLOB NOT NULL, '
        '"size" INTEGER, "mtime_ns" INTEGER, "hash" TEXT NOT NULL, "width" INTEGER, "height" INTEGER, '
        '"added_at" REAL, "status" TEXT)',
        'CREATE UNIQUE INDEX IF NOT EXISTS "idx_images_path_raw" ON "images" ("path_raw")',
        'CREATE INDEX IF NOT EXISTS "idx_images_hash" ON "images" ("hash")',
        'CREATE TABLE IF NOT EXISTS "captions" ("id" INTEGER PRIMARY KEY, "image_id" INTEGER, '
        '"text" TEXT NOT NULL, "text_hash" TEXT NOT NULL, "source" TEXT)',
        *_CAPTIONS_INDEXES,
        # raw encoder outputs keyed by content: images by file hash, texts by text hash
        'CREATE TABLE IF NOT EXISTS "embeddings" ("kind" TEXT, "key" TEXT, "vector" BLOB, PRIMARY KEY ("kind", "key"))',
        'CREATE TABLE IF NOT EXISTS "errors" ("id" INTEGER PRIMARY KEY, "path" TEXT, "path_raw" BLOB, '
        '"reason" TEXT, "at" REAL)',
        'CREATE UNIQUE INDEX IF NOT EXISTS "idx_errors_path_raw" ON "errors" ("path_raw")',
    ):
        conn.execute(st)


def _error_stats(conn: sqlite3.Connection) -> None:
    """Version 2: failures remembered by the file's size and mtime (NULL in old rows: retried once)."""
    _add_columns(conn, "errors", {"size": "INTEGER", "mtime_ns": "INTEGER"})


PHOTO_META_COLUMNS = {
    "taken_at": "TEXT",
    "taken_source": "TEXT",
    "camera_make": "TEXT",
    "camera_model": "TEXT",
    "lens": "TEXT",
    "gps_lat": "REAL",
    "gps_lon": "REAL",
    "meta_hash": "TEXT",
}


def _photo_meta(conn: sqlite3.Connection) -> None:
    """Version 3: photo metadata (retrieval/exif.py), filled by the next `index` run for every row whose
    meta_hash is not its content hash."""
    _add_columns(conn, "images", PHOTO_META_COLUMNS)
    conn.execute('CREATE INDEX IF NOT EXISTS "idx_images_taken_at" ON "images" ("taken_at")')


def _caption_cascade(conn: sqlite3.Connection) -> None:
    """Version 4: captions.image_id references images.id, so deleting an image deletes its captions.
    SQLite cannot add a foreign key to a table: rebuild it (the documented create-copy-drop-rename, with
    foreign keys off on this connection, which is how migrate() runs). Rows are copied as they are; a
    caption already pointing at no image stays for `verify` to report."""
    if (
        "REFERENCES"
        in (conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'captions'").fetchone()[0])
    ):
        return
    conn.execute(
        'CREATE TABLE "captions_new" ("id" INTEGER PRIMARY KEY, '
        '"image_id" INTEGER REFERENCES "images"("id") ON DELETE CASCADE, '
        '"text" TEXT NOT NULL, "text_hash" TEXT NOT NULL, "source" TEXT)'
    )
    conn.execute(
        'INSERT INTO "captions_new" ("id", "image_id", "text", "text_hash", "source") '
        'SELECT "id", "image_id", "text", "text_hash", "source" FROM "captions"'
    )
    conn.execute('DROP TABLE "captions"')
    conn.execute('ALTER TABLE "captions_new" RENAME TO "captions"')
    for st in _CAPTIONS_INDEXES:
        conn.execute(st)


STEPS: tuple[Callable[[sqlite3.Connection], None], ...] = (_base, _error_stats, _photo_meta, _caption_cascade)
LATEST = len(STEPS)


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection) -> int:
    """Run the steps this database has not had, one transaction each; return the version it is now at.
    A database from newer code (a higher version) is left alone. Foreign keys are switched on after."""
    conn.execute("PRAGMA foreign_keys = OFF")  # a table rebuild must not cascade (a no-op inside a transaction)
    done = user_version(conn)
    for n in range(done + 1, LATEST + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if user_version(conn) >= n:  # another writer ran it between our read and our lock
                conn.rollback()
                continue
            STEPS[n - 1](conn)
            conn.execute(f"PRAGMA user_version = {n}")
            checkpoint("migrate")
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    conn.execute("PRAGMA foreign_keys = ON")
    return max(done, LATEST)
