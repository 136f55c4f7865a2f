"""Switch a finished rebuild into an index in one step.

`index --rebuild` builds a complete second index in `<index>/rebuild/` (its own meta.sqlite, vector files
and text export) while the index itself stays as it was: complete and searchable with its old model. When
the rebuild is finished, `switch_in` makes it the index's content in one SQLite transaction that also
switches the manifest to a new generation, so a reader sees either the old index or the new one, never a
mix. A kill before that commit leaves the old index untouched and the staging index resumable; a kill
after it leaves only a staging directory that the next rebuild removes or resumes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from retrieval.errors import RetrievalError
from retrieval.faults import checkpoint
from retrieval.store.atomic import fsync_dir, replacing
from retrieval.store.db import DB_NAME
from retrieval.store.index import Index
from retrieval.store.layout import _vec_file

STAGING_DIR = "rebuild"
STAGING_KEY = "rebuild_of"  # the staging manifest's record of what the rebuild indexes; not switched in
_TABLES = ("images", "captions", "embeddings", "errors")


def staging_dir(root: Path) -> Path:
    return Path(root) / STAGING_DIR


def _columns(db, schema: str, table: str) -> list[str]:
    return [r[1] for r in db.execute(f"PRAGMA {schema}.table_info([{table}])")]


def _copy_file(src: Path, dest: Path) -> None:
    """Copy (a hard link when possible) into dest atomically and durably; src stays, so a kill before
    the switch commits leaves the staging index complete."""
    try:
        if os.path.samefile(src, dest):  # linked by a switch that was killed: rename() would be a no-op
            return
    except FileNotFoundError:
        pass
    with replacing(dest) as tmp:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())


def planned_id_moves(main_store, staging_store) -> tuple[list[tuple[int, int]], int]:
    """(staging id, id to take) for each staging image whose id is not the one its path has in `main_store`
    (a path new to main gets an id above every id in use in either), and an id above all of them. Both
    stores' images are read with the shared SQL, so this serves the embedded store and a collection alike."""
    old = {bytes(raw): int(i) for i, raw in main_store.db.execute("SELECT id, path_raw FROM images")}
    rows = [(int(i), bytes(raw)) for i, raw in staging_store.db.execute("SELECT id, path_raw FROM images")]
    top = max([0, *old.values(), *(i for i, _ in rows)]) + 1
    moves = []
    for i, raw in rows:
        new = old.get(raw)
        if new is None:
            new, top = top, top + 1
        if new != i:
            moves.append((i, new))
    return moves, top


def keep_ids(main: Index, staging: Path) -> int:
    """Give each image of the staging index the id its path has in `main` (new paths get ids above both),
    so /file/ID links and a reader's in-flight results keep naming the same files across the switch.
    Re-keys the staging vectors (rebuilt from its raw embeddings, no encoding). Returns how many rows
    moved. A kill halfway leaves rows ahead of the vectors, which the resumed run publishes."""
    with Index.open_for_write(staging, create=False) as st:
        db = st.store.db
        planned, top = planned_id_moves(main.store, st.store)
        moves = [(new, i) for i, new in planned]
        if not moves:
            return 0
        shift = top  # above every id in use: the two-step renumbering never collides
        with st.store.transaction():
            for table, col in (("images", "id"), ("captions", "image_id")):
                db.conn.executemany(f"UPDATE {table} SET {col} = ? WHERE {col} = ?", [(i + shift, i) for _, i in moves])
                db.conn.executemany(f"UPDATE {table} SET {col} = ? WHERE {col} = ?", [(n, i + shift) for n, i in moves])
        st.sync_vectors(force_rebuild=True)
    return len(moves)


def require_complete(staging, where: str) -> int:
    """The staging index's generation; RetrievalError (nothing changes) when verify finds a problem in it."""
    with Index.open(staging) as st:
        problems = st.verify()
        if problems:
            raise RetrievalError(f"the rebuild in {where} is not complete ({problems[0]}); run the same command again")
        return st.generation


def switch_in(main: Index, staging: Path) -> int:
    """Make the finished index at `staging` the content of `main` (opened for write, its lock held),
    under a new generation of `main`. Returns that generation. Raises RetrievalError if the staging
    index is not complete (verify finds a problem); then nothing changes."""
    assert main.writable
    keep_ids(main, staging)
    sgen = require_complete(staging, str(staging))
    next_gen = main.generation + 1
    # vector files go in place first: nothing names them until the commit below (the model's ONNX export
    # lives in the per-user cache; the manifest copied below names it)
    for kind in ("images", "captions"):
        _copy_file(_vec_file(staging, kind, sgen), _vec_file(main.root, kind, next_gen))
    fsync_dir(main.root)
    checkpoint("switch")

    db = main.store.db
    db.execute("ATTACH DATABASE ? AS staging", [str(staging / DB_NAME)])
    try:
        with main.durable_transaction():
            for table in _TABLES:
                cols = [c for c in _columns(db, "main", table) if c in set(_columns(db, "staging", table))]
                names = ", ".join(f"[{c}]" for c in cols)
                db.execute(f"DELETE FROM main.[{table}]")
                db.execute(f"INSERT INTO main.[{table}] ({names}) SELECT {names} FROM staging.[{table}]")
            db.execute("DELETE FROM main.manifest WHERE key NOT IN ('schema_version')")
            db.execute(
                "INSERT INTO main.manifest(key, value) SELECT key, value FROM staging.manifest "
                "WHERE key NOT IN ('schema_version', 'generation', ?)",
                [STAGING_KEY],
            )
            main.store.set_manifest("generation", next_gen)
    finally:
        db.execute("DETACH DATABASE staging")
    main._vectors = {}
    main._fusion_cache = None
    main._prune_generations(next_gen)
    for p in main.root.glob("text_encoder.*"):  # an older version's per-index export of the old model
        try:
            p.unlink()
        except OSError:
            pass
    shutil.rmtree(staging, ignore_errors=True)
    return next_gen
