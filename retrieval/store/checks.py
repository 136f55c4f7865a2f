"""`verify` and `verify --repair`: an index's files checked against each other and against SQLite, and what
can be rebuilt from the stored raw embeddings rebuilt. Part of retrieval.store.index.Index (a mixin)."""

from __future__ import annotations

import sqlite3

from retrieval.errors import (
    RetrievalError,
)
from retrieval.store.disk_errors import storage_error
from retrieval.store.layout import (
    PENDING_DIRTY_KEY,
    _vec_file,
)


class Checks:
    def verify(self) -> list[str]:
        """Problems found, one line each (empty: all is well). Checks SQLite's own integrity; the manifest
        (model, dimension, schema version, the generation's vector files, their counts and kind, the
        fusion file); that the ids in SQLite and in FAISS agree, and a sample of the vectors' contents;
        that every row has a raw embedding of the right size, and every caption an image."""
        try:
            return self._verify()
        except sqlite3.DatabaseError as e:
            return [f"sqlite: {self.store.path.name} is damaged: {e}"]

    def _verify(self) -> list[str]:
        from retrieval.store.db import SCHEMA_VERSION
        from retrieval.store.vectors import VectorIndex

        problems: list[str] = []
        store = self.store
        db = store.db
        quick = [r[0] for r in db.execute("PRAGMA quick_check(5)")]
        if quick != ["ok"]:
            problems.append(f"sqlite: {store.path.name} is damaged: {'; '.join(quick)}")
        manifest = store.manifest()
        ident = self.identity
        dim = self.dim
        if ident is None:
            problems.append("manifest: no model recorded")
        if dim <= 0:
            problems.append("manifest: no vector dimension recorded")
        elif ident is not None and ident.dim != dim:
            problems.append(f"manifest: dim {dim} but the model {ident.spec} has dim {ident.dim}")
        if manifest.get("schema_version") != SCHEMA_VERSION:
            problems.append(f"manifest: schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}")
        dangling = db.execute(
            "SELECT COUNT(*) FROM captions WHERE image_id IS NOT NULL AND image_id NOT IN (SELECT id FROM images)"
        ).fetchone()[0]
        if dangling:
            problems.append(f"captions: {dangling} rows point at an image that does not exist")
        gen = self.generation
        for kind, rows in (("images", store.image_ids_with_hash()), ("captions", store.caption_ids_with_hash())):
            ekind = "image" if kind == "images" else "text"
            keys = {h for _, h in rows}
            missing = keys - store.has_embeddings(ekind, keys)
            if missing:
                problems.append(f"{kind}: {len(missing)} rows lack a stored raw embedding")
            if dim > 0:
                wrong = db.execute(
                    "SELECT COUNT(*) FROM embeddings WHERE kind = ? AND length(vector) != ?", [ekind, 4 * dim]
                ).fetchone()[0]
                if wrong:
                    problems.append(f"{kind}: {wrong} stored raw embeddings are not {dim} float32 values")
            want = {i for i, _ in rows}
            path = _vec_file(self.root, kind, gen)
            if gen == 0:
                if want:
                    problems.append(f"{kind}: {len(want)} rows but no vector files were ever written")
                continue
            if not path.exists():
                problems.append(f"{kind}: vector file {path.name} of generation {gen} is missing")
                continue
            try:
                vi = VectorIndex.load(path)
                file_ids = vi.ids()
            except Exception as e:  # a corrupt file is exactly what verify is for
                problems.append(f"{kind}: cannot read {path.name}: {' '.join(str(e).split())[:300]}")
                continue
            have = {int(i) for i in file_ids}
            if len(have) != len(file_ids):
                problems.append(f"{kind}: {len(file_ids) - len(have)} duplicate ids in {path.name}")
            if have - want:
                problems.append(f"{kind}: {len(have - want)} orphan vectors (in FAISS, not in SQLite)")
            if want - have:
                problems.append(
                    f"{kind}: {len(want - have)} rows have no vector (in SQLite, not in FAISS; "
                    f"an interrupted run: the next index run or verify --repair adds them)"
                )
            if vi.dim != dim:
                problems.append(f"{kind}: vector dim {vi.dim} != manifest dim {dim}")
            counted = manifest.get(f"vectors_{kind}")
            if counted is not None and int(counted) != vi.ntotal:
                problems.append(f"{kind}: the manifest counts {counted} vectors, {path.name} holds {vi.ntotal}")
            cfg = manifest.get("index_type") or {}
            if kind == "images" and cfg.get("kind") and cfg["kind"] != vi.config.kind:
                problems.append(f"images: the manifest says {cfg['kind']}, {path.name} is {vi.config.kind}")
            pending = set()
            if kind == "images":
                pending = {int(i) for i in manifest.get(PENDING_DIRTY_KEY) or []} & have & want
                if pending:
                    problems.append(
                        f"images: {len(pending)} rows changed in place have no new vector yet (an "
                        f"interrupted run: the next index run or verify --repair publishes them)"
                    )
            if vi.dim == dim and not missing and vi.config.kind != "ivfpq":  # ivfpq stores approximations
                off = self._sampled_content_mismatches(kind, vi, sorted((have & want) - pending), dict(rows))
                if off:
                    problems.append(
                        f"{kind}: {off[0]} of {off[1]} sampled vectors in {path.name} differ from what "
                        f"the raw embeddings in SQLite give (one of the two is corrupt)"
                    )
        fusion = manifest.get("fusion")
        if isinstance(fusion, dict) and fusion.get("file") and not (self.root / fusion["file"]).is_file():
            problems.append(f"fusion: {fusion['file']} named by the manifest is missing")
        return problems

    def repair(self) -> list[str]:
        """Rebuild every vector file from the raw embeddings in SQLite, as a new generation. Rows that
        cannot get a vector (raw embedding lost or of the wrong size, caption of a deleted image) are
        removed, so that the next index run re-encodes their files. Returns what was done, one line each."""
        assert self.writable
        store, db, dim = self.store, self.store.db, self.dim
        if self.identity is None or dim <= 0:
            raise RetrievalError(
                f"cannot repair {self.root}: no model recorded; re-index with: retrieval index PATH --rebuild "
                f"--model SPEC"
            )
        done = []
        try:
            with store.transaction():
                bad = db.execute("DELETE FROM embeddings WHERE length(vector) != ?", [4 * dim]).rowcount
                if bad:
                    done.append(f"removed {bad} raw embeddings of the wrong size")
                lost = [
                    r[0]
                    for r in db.execute(
                        "SELECT id FROM images WHERE hash NOT IN (SELECT key FROM embeddings WHERE kind = 'image')"
                    )
                ]
                if lost:
                    store.delete_images(lost)
                    done.append(
                        f"removed {len(lost)} image rows without a raw embedding (the next index run re-encodes "
                        f"those files)"
                    )
                n = db.execute(
                    "DELETE FROM captions WHERE text_hash NOT IN (SELECT key FROM embeddings WHERE kind = 'text') "
                    "OR (image_id IS NOT NULL AND image_id NOT IN (SELECT id FROM images))"
                ).rowcount
                if n:
                    done.append(
                        f"removed {n} caption rows without a raw embedding or an image (the next index run "
                        f"re-adds sidecar captions)"
                    )
            self.sync_vectors(force_rebuild=True)
            if store.get_manifest(PENDING_DIRTY_KEY):  # every vector was just made anew
                with store.transaction():
                    store.set_manifest(PENDING_DIRTY_KEY, None)
        except Exception as e:
            err = storage_error(e, self.root)
            if err is None:
                raise
            raise err from None
        done.append(f"vector files rebuilt from the stored raw embeddings as generation {self.generation}")
        return done
