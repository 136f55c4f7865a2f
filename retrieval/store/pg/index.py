"""`PgIndex`: an index whose store is a PostgreSQL collection (a schema in a database), with the Index
interface, so that indexing, search, info, verify, train-fusion, benchmarks and serve run on it unchanged.

What differs from the embedded store:
- no file lock: any number of writers share a collection; unique constraints and upserts keep one row per
  file, and publishing vectors is serialised by a transaction-scoped advisory lock;
- no generations of files: fused vectors live in pgvector tables that readers query in SQL, and a publish
  is one transaction, so readers see the old vectors or the new ones;
- fusion weights are rows of `files`, cached on this machine by their content-addressed name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from retrieval.errors import IndexNotFoundError, RetrievalError
from retrieval.faults import checkpoint
from retrieval.modelspec import ModelIdentity
from retrieval.store.index_base import IndexBase
from retrieval.store.pg.checks import PgChecks
from retrieval.store.pg.connect import connect, ensure_extension, pg_error
from retrieval.store.pg.db import PgStore
from retrieval.store.pg.location import PgLocation, parse_location
from retrieval.store.pg.schema import LATEST, VECTOR_TABLES, ensure_vector_tables, quoted, schema_exists, version
from retrieval.store.pg.vectors import KINDS, PgVectorIndex, config_for

PUBLISH_LOCK = 1  # advisory lock (hashtext(collection), 1): one publish at a time per collection
CHUNK = 2048  # rows per fused-vector batch while publishing


def open_connection(loc: PgLocation, write: bool):
    """An autocommit connection with the collection's schema first on its search path (pgvector created
    in the database first, for a writer)."""
    conn = connect(loc, autocommit=True)  # registers pgvector's types when the extension exists
    try:
        if write:
            ensure_extension(conn, loc)
        # the collection's tables first; public for pgvector's type and operators
        conn.execute(f"SET search_path TO {quoted(loc.collection)}, public")
    except BaseException:
        conn.close()
        raise
    return conn


class PgIndex(PgChecks, IndexBase):
    def __init__(self, loc: PgLocation, store: PgStore, writable: bool):
        super().__init__(loc.display, store, writable)  # type: ignore[arg-type]
        self.loc = loc

    @property
    def local_dir(self) -> Path:
        """This machine's files for the collection (thumbnails, cached fusion weights)."""
        env = os.environ.get("RETRIEVAL_CACHE_DIR")
        base = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        base = base if env else base / "retrieval"
        key = hashlib.sha256(f"{self.loc.dsn}\0{self.loc.collection}".encode()).hexdigest()[:16]
        return base / "pg" / f"{self.loc.collection}-{key}"

    @property
    def fusion_dir(self) -> Path:
        path = self.local_dir / "fusion"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def open(cls, path=None) -> "PgIndex":  # type: ignore[override]
        loc = parse_location(str(path))
        conn = open_connection(loc, write=False)
        try:
            if not schema_exists(conn, loc.collection) or version(conn, loc.collection) == 0:
                raise IndexNotFoundError(
                    f"no collection {loc.collection!r} at {loc.display} (create one with: retrieval index "
                    f"PHOTOS_DIR --index '{loc.display}')"
                )
            check_version(conn, loc)
            store = PgStore(loc, conn, readonly=True)
            store.db.reopen = lambda: open_connection(loc, write=False)
            recorded = store.get_manifest("model") is not None
        except BaseException:
            conn.close()
            raise
        idx = cls(loc, store, writable=False)
        if not recorded:
            idx.close()
            raise IndexNotFoundError(f"{loc.display} holds no finished index yet (no model recorded)")
        return idx

    @classmethod
    def open_for_write(cls, path=None, create: bool = True) -> "PgIndex":  # type: ignore[override]
        loc = parse_location(str(path))
        conn = open_connection(loc, write=True)
        try:
            exists = schema_exists(conn, loc.collection) and version(conn, loc.collection) > 0
            if not exists and not create:
                raise IndexNotFoundError(f"no collection {loc.collection!r} at {loc.display}")
            check_version(conn, loc)
            store = PgStore(loc, conn)
        except BaseException:
            conn.close()
            raise
        return cls(loc, store, writable=True)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    # -- manifest -------------------------------------------------------------------------------

    def set_model(self, identity: ModelIdentity) -> None:
        ensure_vector_tables(self.store.db.pg, self.loc.collection, identity.dim)
        super().set_model(identity)

    # -- fusion ---------------------------------------------------------------------------------

    def _fusion_path(self, name: str) -> Path:
        """The fusion file `name`, fetched from the collection into the local cache when not there yet
        (names are content hashes, so a cached file is always the right one)."""
        path = self.fusion_dir / name
        if not path.is_file():
            data = self.store.get_file(name)
            if data is not None:
                from retrieval.store.atomic import write_atomic

                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, data)
        return path

    # -- vectors --------------------------------------------------------------------------------

    def vectors(self, kind: str = "images", mmap: bool = False):
        n = int(self.store.get_manifest(f"vectors_{kind}", 0))
        if self.generation == 0 or n == 0:
            return None
        cfg = config_for(self.store.get_manifest("index_type_requested", "auto"))
        return PgVectorIndex(self.store.db.pg, kind, self.dim, n, cfg)

    def sync_vectors(self, requested_type=None, dirty_images=(), force_rebuild=False, fusion_meta=...) -> bool:
        """Give every row without a fused vector (new, or re-encoded in place) its vector, in one
        transaction with the manifest's counts and generation. A new fusion (fusion_meta) or force_rebuild
        remakes every vector. Returns True if anything changed."""
        assert self.writable
        store, pg = self.store, self.store.db.pg
        if requested_type is None:
            requested_type = store.get_manifest("index_type_requested", "auto")
        if requested_type not in KINDS:
            raise RetrievalError(
                f"--index-type {requested_type} is for the embedded store; a PostgreSQL collection uses "
                f"{', '.join(KINDS)} (auto is hnsw)"
            )
        if fusion_meta is not ...:
            force_rebuild = True  # a new fusion changes every vector
        self._fusion_override = None if fusion_meta is ... else (fusion_meta,)
        try:
            with store.transaction():
                pg.execute("SELECT pg_advisory_xact_lock(hashtext(%s), %s)", [self.loc.collection, PUBLISH_LOCK])
                if fusion_meta is not ... and fusion_meta:
                    store.put_file(fusion_meta["file"], (self.fusion_dir / fusion_meta["file"]).read_bytes())
                changed = self._write_vectors("images", force_rebuild, {int(i) for i in dirty_images})
                changed |= self._write_vectors("captions", force_rebuild, set())
                gen = self.generation
                if not changed and gen > 0 and requested_type == store.get_manifest("index_type_requested"):
                    return False
                counts = {k: store.count(t) for k, t in VECTOR_TABLES.items()}
                store.set_manifest("generation", gen + 1)
                store.set_manifest("index_type", config_for(requested_type).to_dict())
                store.set_manifest("index_type_requested", requested_type)
                store.set_manifest("vectors_images", counts["images"])
                store.set_manifest("vectors_captions", counts["captions"])
                if fusion_meta is not ...:
                    store.set_manifest("fusion", fusion_meta)
                checkpoint("publish")  # every vector and count written, the transaction not committed
        finally:
            self._fusion_override = None
        self._fusion_cache = None
        return True

    def _write_vectors(self, kind: str, everything: bool, dirty: set[int]) -> bool:
        store, pg, table = self.store, self.store.db.pg, VECTOR_TABLES[kind]
        rows_fn = store.image_ids_with_hash if kind == "images" else store.caption_ids_with_hash
        vec_fn = self.image_vectors_for if kind == "images" else self.caption_vectors_for
        if everything:
            rows = rows_fn()
        else:
            parent, key = ("images", "hash") if kind == "images" else ("captions", "text_hash")
            rows = [
                tuple(r)
                for r in pg.execute(
                    f"SELECT p.id, p.{key} FROM {parent} p LEFT JOIN {table} v ON v.id = p.id "
                    f"WHERE v.id IS NULL OR p.id = ANY(%s) ORDER BY p.id",
                    [sorted(dirty)],
                )
            ]
        for start in range(0, len(rows), CHUNK):
            part = rows[start : start + CHUNK]
            vecs = np.ascontiguousarray(vec_fn(part), dtype=np.float32)
            with pg.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {table} (id, embedding) VALUES (%s, %s) "
                    "ON CONFLICT (id) DO UPDATE SET embedding = excluded.embedding",
                    [(int(i), v) for (i, _), v in zip(part, vecs)],
                )
        return bool(rows)

    def storage_error(self, e: BaseException) -> RetrievalError | None:
        return pg_error(e, self.loc)

    def durable_transaction(self):
        return self.store.transaction()  # a PostgreSQL commit is durable (synchronous_commit on)

    def prune_fusion_files(self, keep: set[str]) -> None:
        with self.store.transaction():
            self.store.delete_files_except(keep)


def check_version(conn, loc: PgLocation) -> None:
    v = version(conn, loc.collection)
    if v > LATEST:
        raise RetrievalError(
            f"the collection {loc.display} was made by a newer version of retrieval (schema step {v}, this one "
            f"knows {LATEST}): upgrade retrieval"
        )
