"""Publishing vectors: a new generation's FAISS files made from the stored raw embeddings, renamed into place,
then the manifest switched in one SQLite transaction. Part of retrieval.store.index.Index (a mixin)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from retrieval.faults import checkpoint
from retrieval.store.disk_errors import storage_error
from retrieval.store.layout import (
    KEEP_GENERATIONS,
    _caption_kind,
    _vec_file,
)


class PublishVectors:
    def sync_vectors(
        self,
        requested_type: str | None = None,
        dirty_images=(),
        force_rebuild: bool = False,
        fusion_meta: dict | None = ...,
    ) -> bool:
        """Bring the FAISS files in line with SQLite and publish them as a new generation.

        Only ids that differ are added or removed, unless the index kind must change or a rebuild is
        forced. Returns True if a new generation was written. Safe to call after a crash: the set
        difference is exactly what the interrupted run had not yet published.
        """
        assert self.writable
        store = self.store
        if requested_type is None:
            requested_type = store.get_manifest("index_type_requested", "auto")
        gen = self.generation
        if fusion_meta is not ...:
            force_rebuild = True  # a new fusion changes every vector
        # a new fusion is computed under, but published only with the manifest switch at the end
        self._fusion_override = None if fusion_meta is ... else (fusion_meta,)
        try:
            new, changed = self._updated_vectors(requested_type, dirty_images, force_rebuild, gen)
        finally:
            self._fusion_override = None
        if not changed and gen > 0:
            return False
        return self._publish(new, gen + 1, requested_type, fusion_meta)

    def _updated_vectors(self, requested_type, dirty_images, force_rebuild, gen):
        from retrieval.store.vector_kinds import choose_config
        from retrieval.store.vectors import VectorIndex

        store = self.store
        new = {}
        changed = False
        for kind, rows_fn, vec_fn in (
            ("images", store.image_ids_with_hash, self.image_vectors_for),
            ("captions", store.caption_ids_with_hash, self.caption_vectors_for),
        ):
            rows = rows_fn()
            want = {i for i, _ in rows}
            current = None
            if not force_rebuild and gen > 0 and _vec_file(self.root, kind, gen).exists():
                current = VectorIndex.load(_vec_file(self.root, kind, gen))
            cfg = choose_config(
                len(rows), self.dim, requested_type if kind == "images" else _caption_kind(requested_type)
            )
            if (
                current is not None
                and current.config.kind == cfg.kind
                and current.dim == self.dim
                and not current.needs_rebuild
            ):
                have = set(int(i) for i in current.ids())
                dirty = {int(i) for i in dirty_images} & want & have if kind == "images" else set()
                remove = (have - want) | dirty
                add = (want - have) | dirty
                if remove:
                    current.remove(np.fromiter(remove, dtype=np.int64))
                if add:
                    add_rows = [r for r in rows if r[0] in add]
                    current.add(np.array([r[0] for r in add_rows], dtype=np.int64), vec_fn(add_rows))
                if remove or add:
                    changed = True
                new[kind] = current
            else:
                vecs = vec_fn(rows) if rows else np.zeros((0, self.dim), np.float32)
                new[kind] = VectorIndex.build(self.dim, np.array([i for i, _ in rows], dtype=np.int64), vecs, cfg)
                changed = True
        return new, changed

    def _publish(self, new, next_gen, requested_type, fusion_meta) -> bool:
        store = self.store
        try:
            for kind, vi in new.items():
                vi.save(_vec_file(self.root, kind, next_gen))
            checkpoint("publish")
            with self.durable_transaction():
                store.set_manifest("generation", next_gen)
                store.set_manifest("index_type", new["images"].config.to_dict())
                store.set_manifest("index_type_requested", requested_type)
                store.set_manifest("vectors_images", int(new["images"].ntotal))
                store.set_manifest("vectors_captions", int(new["captions"].ntotal))
                if fusion_meta is not ...:
                    store.set_manifest("fusion", fusion_meta)
        except Exception as e:
            # the manifest still names the previous generation: drop the half-published one's files
            for kind in new:
                try:
                    _vec_file(self.root, kind, next_gen).unlink()
                except OSError:
                    pass
            err = storage_error(e, self.root)
            if err is not None:
                raise err from None
            raise
        self._fusion_cache = None
        self._vectors = {(k, next_gen): v for k, v in new.items()}
        self._prune_generations(next_gen)
        return True

    @contextmanager
    def durable_transaction(self):
        """A transaction that is on disk when it returns: the WAL runs with synchronous=NORMAL (a power
        cut may roll back the last commits), but a manifest switch must not be rolled back once the
        older generations' files are pruned, or the manifest would name files that are gone."""
        db = self.store.db
        if db.conn.in_transaction:  # SQLite cannot change the safety level inside one: the outer commit decides
            with self.store.transaction():
                yield
            return
        db.execute("PRAGMA synchronous = FULL")
        try:
            with self.store.transaction():
                yield
        finally:
            db.execute("PRAGMA synchronous = NORMAL")

    def _prune_generations(self, current: int) -> None:
        keep = {current - i for i in range(KEEP_GENERATIONS)}
        for p in self.root.glob("*.g*.*"):
            stem = p.name.split(".")
            if len(stem) >= 3 and stem[1].startswith("g") and stem[1][1:].isdigit():
                if int(stem[1][1:]) not in keep and not p.name.endswith(".tmp"):
                    try:
                        p.unlink()
                    except OSError:
                        pass
