"""`PgStore`: the embedded Store's interface on a PostgreSQL collection (psycopg 3).

The read SQL of the embedded store is shared: `PgDb.execute` takes its SQLite dialect (`?` markers, `[name]`
quoting, instr, TOTAL, `IS NOT x`) and runs the PostgreSQL equivalent, so query code written against
`store.db` serves both stores. Writes that SQLite spells differently (upserts, RETURNING ids) are overridden
here with unique constraints and ON CONFLICT, which is what lets several writers share one collection.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import numpy as np

from retrieval.faults import checkpoint
from retrieval.store.db import SCHEMA_VERSION, Store
from retrieval.store.pg.location import PgLocation
from retrieval.store.rows import path_to_db, text_hash

_REWRITES = (
    (re.compile(r"\[(\w+)\]"), r'"\1"'),
    (re.compile(r"\binstr\(", re.I), "strpos("),
    (re.compile(r"\bTOTAL\(", re.I), "SUM("),
    (re.compile(r"\bIS NOT (?!NULL\b)", re.I), "IS DISTINCT FROM "),
)
_CACHE: dict[str, str] = {}
# advisory lock (hashtext(collection), 2): every write transaction holds it shared, so that pruning the raw
# embeddings no row references (exclusive, and only when no other writer's transaction is open) never deletes
# one that another writer has just found or put and is about to reference
EMBEDDINGS_LOCK = 2
ITER_ROWS = 2000  # rows per round trip when a whole table is streamed
ID_TABLES = ("images", "captions", "errors")  # the tables whose id is an identity column


def pg_sql(sql: str) -> str:
    """The SQLite-dialect statement `sql` in PostgreSQL's (cached: the same few statements recur)."""
    out = _CACHE.get(sql)
    if out is None:
        out = sql.replace("%", "%%")
        for pat, rep in _REWRITES:
            out = pat.sub(rep, out)
        out = _CACHE[sql] = out.replace("?", "%s")
    return out


class PgDb:
    """What Store's SQL needs of sqlite_utils.Database: execute, executemany (as `.conn` too), atomic."""

    def __init__(self, conn):
        self.pg = conn
        self.conn = self  # Store calls self.db.conn.executemany
        self.reopen = None  # a reader's way to a new connection once this one is lost (None: a writer never reconnects)

    def execute(self, sql: str, params: Sequence = ()):
        if self.reopen is not None and self.pg.broken:
            # a long-lived reader (serve) whose server restarted: each statement stands alone, so a new
            # connection loses nothing; while the server is down this raises its one line
            old, self.pg = self.pg, self.reopen()
            old.close()
        return self.pg.execute(pg_sql(sql), list(params) if params else None)

    def executemany(self, sql: str, seq) -> None:
        rows = list(seq)
        if rows:
            with self.pg.cursor() as cur:
                cur.executemany(pg_sql(sql), rows)

    @property
    def in_transaction(self) -> bool:
        import psycopg

        return self.pg.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    @contextmanager
    def atomic(self) -> Iterator[None]:
        with self.pg.transaction():
            yield

    def close(self) -> None:
        self.pg.close()


class PgStore(Store):
    """One collection's tables. Connections run in autocommit; `transaction()` groups statements, and a
    reader sees only what writers have committed."""

    def __init__(self, loc: PgLocation, conn, readonly: bool = False):
        self.loc = loc
        self.path = loc.display
        self.readonly = readonly
        self.db = PgDb(conn)
        if not readonly:
            self._ensure_schema()

    def close(self) -> None:
        self.db.close()

    def _ensure_schema(self) -> None:
        from retrieval.store.pg.schema import migrate

        migrate(self.db.pg, self.loc.collection)
        if self.get_manifest("schema_version") is None:
            self.db.execute(
                "INSERT INTO manifest(key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                ["schema_version", json.dumps(SCHEMA_VERSION)],
            )

    def has_photo_meta(self) -> bool:
        return True

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.db.atomic():
            if not self.readonly:
                self.db.execute(
                    "SELECT pg_advisory_xact_lock_shared(hashtext(?), ?)", [self.loc.collection, EMBEDDINGS_LOCK]
                )
            yield
            checkpoint("sqlite_commit")

    def count(self, table: str) -> int:
        return int(self.db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0])

    # -- whole tables (retrieval copy) -----------------------------------------------------------

    @contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Within the block, every read on this store sees one state: one REPEATABLE READ, READ ONLY
        transaction (a writer's commits meanwhile are not seen)."""
        if self.db.in_transaction:  # inside a caller's transaction: that one is the snapshot
            yield
            return
        with self.db.pg.transaction():
            self.db.pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield

    def table_columns(self, table: str) -> list[str]:
        return [
            r[0]
            for r in self.db.pg.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                "ORDER BY ordinal_position",
                [self.loc.collection, table],
            )
        ]

    def iter_rows(self, table: str, columns: Sequence[str], order_by: str) -> Iterator[tuple]:
        """Streamed through a server-side cursor (ITER_ROWS at a time); needs a transaction (read_snapshot)."""
        names = ", ".join(f'"{c}"' for c in columns)
        with self.db.pg.cursor(name=f"rows_{table}") as cur:
            cur.itersize = ITER_ROWS
            cur.execute(f'SELECT {names} FROM "{table}" ORDER BY {order_by}')
            for row in cur:
                yield tuple(row)

    def insert_rows(self, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> int:
        """One COPY, fed as the rows come. Explicit ids go into the identity columns (GENERATED BY DEFAULT);
        move_id_sequences() then moves their sequences past them."""
        n = 0
        names = ", ".join(f'"{c}"' for c in columns)
        with self.db.pg.cursor() as cur, cur.copy(f'COPY "{table}" ({names}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row(row)
                n += 1
        return n

    def move_id_sequences(self) -> None:
        """The identity sequences of images, captions and errors set to their tables' largest id, so the
        next row an `index` run adds gets an id above every copied one."""
        for table in ID_TABLES:
            self.db.pg.execute(
                "SELECT setval(pg_get_serial_sequence(%s, 'id'), COALESCE(max(id), 1), max(id) IS NOT NULL) "
                f'FROM "{table}"',
                [f'"{self.loc.collection}"."{table}"'],
            )

    # -- writes in PostgreSQL's words --------------------------------------------------------------

    def upsert_image(self, path: str, size: int, mtime_ns: int, hash_: str, width=None, height=None) -> int:
        """One row per path whoever writes it (the unique path_raw). New content drops the row's fused
        vector in the same statement group, so a search never meets the old vector under the new file."""
        text, raw = path_to_db(path)
        with self.db.atomic():
            old = self.db.execute("SELECT id, hash FROM images WHERE path_raw = ? FOR UPDATE", [raw]).fetchone()
            row = self.db.execute(
                "INSERT INTO images(path, path_raw, size, mtime_ns, hash, width, height, added_at, status) "
                "VALUES (?,?,?,?,?,?,?,?, 'ok') ON CONFLICT (path_raw) DO UPDATE SET size = excluded.size, "
                "mtime_ns = excluded.mtime_ns, hash = excluded.hash, width = COALESCE(excluded.width, images.width), "
                "height = COALESCE(excluded.height, images.height), status = 'ok' RETURNING id",
                [text, raw, size, mtime_ns, hash_, width, height, time.time()],
            ).fetchone()
            if old is not None and old[1] != hash_:
                self.db.execute("DELETE FROM image_vectors WHERE id = ?", [row[0]])
        return int(row[0])

    def add_captions(self, image_id: int | None, texts: Sequence[str], source: str) -> list[int]:
        new = []
        for t in texts:
            row = self.db.execute(
                "INSERT INTO captions(image_id, text, text_hash, source) VALUES (?,?,?,?) "
                "ON CONFLICT (image_id, text_hash) DO NOTHING RETURNING id",
                [image_id, t, text_hash(t), source],
            ).fetchone()
            if row is not None:
                new.append(int(row[0]))
        return new

    def put_embeddings(self, kind: str, keys: Sequence[str], vecs: np.ndarray) -> None:
        """Rows in key order: two writers putting overlapping keys lock them in the same order (no deadlock)."""
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        self.db.executemany(
            "INSERT INTO embeddings(kind, key, vector) VALUES (?,?,?) "
            "ON CONFLICT (kind, key) DO UPDATE SET vector = excluded.vector",
            sorted((kind, k, v.tobytes()) for k, v in zip(keys, vecs)),
        )

    def drop_unreferenced_embeddings(self) -> int:
        """Delete the raw embeddings no row references, in the caller's transaction, only if no other writer has
        a transaction open (it may hold an embedding it is about to reference): else nothing now (-1), the next
        run prunes them."""
        got = self.db.execute(
            "SELECT pg_try_advisory_xact_lock(hashtext(?), ?)", [self.loc.collection, EMBEDDINGS_LOCK]
        ).fetchone()[0]
        if not got:
            return -1
        return super().drop_unreferenced_embeddings()

    def set_manifest(self, key: str, value) -> None:
        self.db.execute(
            "INSERT INTO manifest(key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, json.dumps(value, sort_keys=True)],
        )

    # -- files the embedded store keeps beside meta.sqlite (fusion weights) -------------------------

    def put_file(self, name: str, data: bytes) -> None:
        self.db.execute(
            "INSERT INTO files(name, data) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET data = excluded.data",
            [name, data],
        )

    def get_file(self, name: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM files WHERE name = ?", [name]).fetchone()
        return None if row is None else bytes(row[0])

    def delete_files_except(self, keep: set[str]) -> None:
        self.db.execute("DELETE FROM files WHERE NOT (name = ANY(?))", [sorted(keep)])
