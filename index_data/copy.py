"""`retrieval copy --from SRC --to DST`: an index moved between stores (an index directory, a PostgreSQL
collection) without encoding anything.

What moves as it is: every row of images (ids, photo metadata, status), captions (ids, image links), raw
embeddings (the float32 bytes), errors; the manifest (model, fusion record, requested index type, ONNX export
key); the fusion file in force. What the destination makes itself, through its own publish path: the fused
vectors (from the copied raw embeddings and fusion), its vector index and generation 1.

The source is read as one snapshot: one REPEATABLE READ, READ ONLY transaction (PostgreSQL), one SQLite read
transaction with the manifest pinned (a directory), so a writer running meanwhile is not half-seen.

The destination is never seen half-written:
- PostgreSQL: the whole collection (schema, rows, vectors, HNSW indexes) is written in one transaction under
  the collection's migration lock; a killed copy is rolled back by the server and leaves nothing;
- a directory: it is written as a hidden sibling `.NAME.copy-XXXX.tmp` and renamed into place when complete;
  a killed copy leaves only that temp directory, which the next copy into the same place removes.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from retrieval.errors import IndexExistsError, IndexNotFoundError, RetrievalError
from retrieval.store.db import DB_NAME
from retrieval.store.index import Index
from retrieval.store.layout import PENDING_DIRTY_KEY, resolve_index
from retrieval.store.switch import STAGING_KEY

# (table, order of its rows); images before captions (captions.image_id references images.id)
TABLES = (("images", "id"), ("captions", "id"), ("embeddings", "kind, key"), ("errors", "id"))
# manifest keys the destination's publish writes itself, or that describe the source's own state
NOT_COPIED = frozenset(
    {
        "schema_version",
        "generation",
        "index_type",
        "vectors_images",
        "vectors_captions",
        PENDING_DIRTY_KEY,  # every vector is made anew at the destination
        STAGING_KEY,
    }
)


@dataclass
class CopyReport:
    source: str
    destination: str
    images: int
    captions: int
    embeddings: int
    errors: int
    model: str
    fusion: str | None  # version of the fusion copied, or None
    index_type: str  # the destination's vector index kind
    generation: int  # the destination's, after its publish
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Source:
    index: object  # Index or PgIndex, inside its read snapshot
    manifest: dict
    fusion_name: str | None
    fusion_data: bytes | None
    fusion_config: bytes | None  # the JSON beside the weights in an index directory (a collection keeps none)


def copy_index(source, dest) -> CopyReport:
    """Copy the finished index at `source` (a directory or a postgresql:// URL) to `dest`, which must not
    hold an index yet. Nothing is encoded: no model is loaded."""
    t0 = time.perf_counter()
    src_loc, dst_loc = resolve_index(source), resolve_index(dest)
    if _same(src_loc, dst_loc):
        raise RetrievalError(f"the source and the destination are the same index ({_shown(src_loc)})")
    if not isinstance(dst_loc, str):
        _refuse_directory(Path(os.path.abspath(dst_loc)))
    with Index.open(src_loc) as s:
        try:
            with s.store.read_snapshot(), s.pinned():
                src = _read_source(s)
                if isinstance(dst_loc, str):
                    report = _copy_to_collection(src, dst_loc)
                else:
                    report = _copy_to_directory(src, Path(os.path.abspath(dst_loc)))
        except Exception as e:  # a dropped connection, a full disk: one line
            err = _storage_error(e, s, dst_loc)
            if err is None:
                raise
            raise err from None
    report.seconds = time.perf_counter() - t0
    return report


# -- source ---------------------------------------------------------------------------------------------------


def _read_source(s) -> _Source:
    if s.generation == 0:
        raise IndexNotFoundError(
            f"{s.root} holds no finished index yet (nothing published): let its `retrieval index` run finish first"
        )
    manifest = s.store.manifest()
    fusion = manifest.get("fusion") or None
    name = fusion.get("file") if isinstance(fusion, dict) else None
    data = config = None
    if name:
        from retrieval.fusion.model import config_path

        data = s.fusion_file(name)
        if data is None:
            raise RetrievalError(
                f"the fusion {name} that {s.root} names is missing: run: retrieval verify --index {s.root}"
            )
        config = s.fusion_file(config_path(name).name)
    return _Source(s, manifest, name, data, config)


# -- what both destinations do ------------------------------------------------------------------------------


def _copy_rows(src_store, dst_store) -> dict[str, int]:
    """Every row of TABLES, streamed from the source into the destination with the columns both have (an
    index from an older version may lack some; the next `index` run fills photo metadata)."""
    counts = {}
    for table, order in TABLES:
        have = set(dst_store.table_columns(table))
        cols = [c for c in src_store.table_columns(table) if c in have]
        counts[table] = dst_store.insert_rows(table, cols, src_store.iter_rows(table, cols, order))
    dst_store.move_id_sequences()
    return counts


def _write_manifest(src: _Source, dst_store, kinds: tuple[str, ...]) -> str:
    """The source's manifest less NOT_COPIED; returns the requested index type, kept when the destination
    knows it, else auto (an IVF kind has no PostgreSQL counterpart)."""
    for key, value in src.manifest.items():
        if key not in NOT_COPIED:
            dst_store.set_manifest(key, value)
    requested = src.manifest.get("index_type_requested") or "auto"
    if requested not in kinds:
        requested = "auto"
    dst_store.set_manifest("index_type_requested", requested)
    return requested


def _publish(idx, requested: str) -> None:
    """The destination's fused vectors from the copied raw embeddings and fusion, by its own publish path."""
    try:
        idx.sync_vectors(requested_type=requested, force_rebuild=True)
    except KeyError:  # a row whose raw embedding the source lacks
        raise RetrievalError(
            "the source has rows without a stored raw embedding: run `retrieval verify --repair` on it, then copy again"
        ) from None


def _report(src: _Source, dest_shown: str, counts: dict, idx) -> CopyReport:
    ident = src.index.identity
    fusion = src.manifest.get("fusion") or {}
    return CopyReport(
        source=str(src.index.root),
        destination=dest_shown,
        images=counts["images"],
        captions=counts["captions"],
        embeddings=counts["embeddings"],
        errors=counts["errors"],
        model=ident.spec if ident else "",
        fusion=fusion.get("version") if isinstance(fusion, dict) else None,
        index_type=(idx.store.get_manifest("index_type") or {}).get("kind", "none"),
        generation=idx.generation,
        seconds=0.0,
    )


# -- into a PostgreSQL collection -----------------------------------------------------------------------------


def _copy_to_collection(src: _Source, url: str) -> CopyReport:
    """The whole collection in one transaction, under its migration lock (a second copy, or an `index` run
    creating the same collection, waits for it and then finds it taken)."""
    from retrieval.store.pg.db import PgStore
    from retrieval.store.pg.index import PgIndex, check_version, open_connection
    from retrieval.store.pg.location import parse_location
    from retrieval.store.pg.schema import (
        drop_collection,
        drop_vector_indexes,
        ensure_vector_tables,
        has_recorded_model,
        lock_collection,
        raise_build_memory,
    )
    from retrieval.store.pg.vectors import KINDS

    loc = parse_location(url)
    conn = open_connection(loc, write=True)
    try:
        with conn.transaction():
            lock_collection(conn, loc.collection)
            check_version(conn, loc)
            if has_recorded_model(conn, loc.collection):
                raise IndexExistsError(
                    f"{loc.display} already holds an index: copy into a new collection (?collection=NEW), or "
                    f"drop this one first"
                )
            drop_collection(conn, loc.collection)  # an empty one (no model recorded): made anew
            store = PgStore(loc, conn)  # the tables, as savepoints of this transaction
            idx = PgIndex(loc, store, writable=True)
            ensure_vector_tables(conn, loc.collection, int(src.manifest.get("dim") or 0))
            drop_vector_indexes(conn)  # built once over all rows below, not row by row
            counts = _copy_rows(src.index.store, store)
            requested = _write_manifest(src, store, KINDS)
            if src.fusion_name:
                store.put_file(src.fusion_name, src.fusion_data)
            _publish(idx, requested)
            raise_build_memory(conn, max(counts["images"], counts["captions"]), idx.dim)
            ensure_vector_tables(conn, loc.collection, idx.dim)
            return _report(src, loc.display, counts, idx)
    finally:
        conn.close()


# -- into a directory -----------------------------------------------------------------------------------------


def _refuse_directory(dest: Path) -> None:
    if (dest / DB_NAME).exists():
        raise IndexExistsError(f"{dest} already holds an index: copy into a new directory, or delete this one first")
    if os.path.lexists(dest) and not dest.is_dir():
        raise RetrievalError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise IndexExistsError(f"{dest} exists and is not empty: copy into a new or empty directory")


def _copy_to_directory(src: _Source, dest: Path) -> CopyReport:
    """Written as a hidden sibling, renamed into place when complete (an empty `dest` is replaced)."""
    from retrieval.store.atomic import fsync_dir
    from retrieval.store.vector_kinds import KINDS

    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RetrievalError(f"cannot create {parent}: {e.strerror}") from None
    _remove_dead_copies(parent, dest.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.copy-", suffix=".tmp", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # what mkdir gives an index directory, not mkdtemp's 0700
    idx = None
    try:
        idx = Index.open_for_write(tmp)  # holds tmp/lock: a concurrent copy sees this one is alive
        with idx.store.transaction():
            counts = _copy_rows(src.index.store, idx.store)
            requested = _write_manifest(src, idx.store, ("auto", *KINDS))
        if src.fusion_name:
            _write_fusion(tmp, src)
        _publish(idx, requested)
        report = _report(src, str(dest), counts, idx)
        idx.store.close()  # SQLite's WAL checkpointed into meta.sqlite before the directory moves
        idx.store = None
        fsync_dir(tmp)
        _refuse_directory(dest)  # another process may have made it meanwhile
        try:
            os.rename(tmp, dest)
        except OSError as e:  # made non-empty at the last moment
            raise IndexExistsError(f"cannot move the copy into {dest}: {e.strerror}") from None
        fsync_dir(parent)
        return report
    except BaseException:
        if idx is not None:
            idx.close()
            idx = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if idx is not None:
            idx.close()  # the lock, released only once the directory is in place


def _write_fusion(root: Path, src: _Source) -> None:
    """The fusion's weights, and its JSON config beside them as an index directory keeps it (made from the
    weights when the source is a collection, which stores the weights alone)."""
    from retrieval.fusion.model import config_json, config_path, load_fusion
    from retrieval.store.atomic import write_atomic

    weights = root / src.fusion_name
    write_atomic(weights, src.fusion_data)
    config = src.fusion_config or config_json(load_fusion(weights), src.fusion_name).encode()
    write_atomic(config_path(weights), config)


def _remove_dead_copies(parent: Path, name: str) -> None:
    """Temp directories of copies into `parent/name` that were killed: their lock is free."""
    for p in parent.glob(f".{glob.escape(name)}.copy-*.tmp"):
        lock = p / "lock"
        if not lock.is_file():
            if time.time() - _mtime(p) > 60:  # never got as far as its lock
                shutil.rmtree(p, ignore_errors=True)
            continue
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            with _flocked(fd) as free:
                if free:
                    shutil.rmtree(p, ignore_errors=True)
        finally:
            os.close(fd)


@contextmanager
def _flocked(fd: int):
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return time.time()


# -- helpers --------------------------------------------------------------------------------------------------


def _same(a, b) -> bool:
    if isinstance(a, str) != isinstance(b, str):
        return False
    if isinstance(a, str):
        from retrieval.store.pg.location import parse_location

        la, lb = parse_location(a), parse_location(b)
        return (la.dsn, la.collection) == (lb.dsn, lb.collection)
    return os.path.realpath(a) == os.path.realpath(b)


def _shown(loc) -> str:
    if isinstance(loc, str):
        from retrieval.store.pg.location import parse_location

        return parse_location(loc).display
    return str(loc)


def _storage_error(e: BaseException, src, dst_loc) -> RetrievalError | None:
    """A failure of either store the user can act on, as one line naming the store that failed; None for a
    bug. A psycopg error names its connection; anything else (a full disk) is the destination directory's,
    since the source is only read."""
    src_conn = getattr(src.store.db, "pg", None)
    raised_by = getattr(e, "pgconn", None)
    if raised_by is not None and src_conn is not None and raised_by is src_conn.pgconn:
        return src.storage_error(e)
    if isinstance(dst_loc, str):
        from retrieval.store.pg.connect import pg_error
        from retrieval.store.pg.location import parse_location

        return pg_error(e, parse_location(dst_loc)) or src.storage_error(e)
    from retrieval.store.disk_errors import storage_error

    return storage_error(e, Path(dst_loc)) or src.storage_error(e)
