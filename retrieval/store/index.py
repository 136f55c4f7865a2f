"""`Index`: one directory holding the SQLite store, the FAISS files of the current generation, and the
fusion. Writers take a lock; readers never do and always see one whole generation.

Layout:
    meta.sqlite                 metadata, raw embeddings, manifest (source of truth)
    images.g<N>.faiss           fused image vectors, keyed by images.id
    captions.g<N>.faiss         caption vectors, keyed by captions.id
    fusion.<hash>.safetensors   trained fusion named by the manifest (optional; not generation-named,
                                so pruning old generations never removes the one in force)
    lock                        flock'd by the one writer
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import (
    IndexDamagedError,
    IndexLockedError,
    IndexNotFoundError,
    ModelMismatchError,
    RetrievalError,
)
from retrieval.modelspec import ModelIdentity
from retrieval.store.checks import Checks
from retrieval.store.db import DB_NAME, Store
from retrieval.store.disk_errors import _disk_full_hint, storage_error
from retrieval.store.layout import _vec_file, resolve_index
from retrieval.store.publish import PublishVectors


@dataclass(frozen=True)
class IndexInfo:
    path: str
    images: int
    captions: int
    errors: int
    model: str
    dim: int
    index_type: str
    index_params: dict  # the vector index's parameters (nlist, nprobe, efSearch, ...): what --probes overrides
    generation: int
    fusion: str | None
    vectors: int
    caption_vectors: int

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


# Lock fds held by writers in this process. A forked child (a decode worker) closes its copies at once:
# a flock belongs to the open file, so an orphaned worker of a SIGKILLed writer would otherwise keep
# the index locked for as long as it lives.
_HELD_LOCK_FDS: set[int] = set()


def _close_lock_fds_in_child() -> None:
    for fd in _HELD_LOCK_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_lock_fds_in_child)


class Index(PublishVectors, Checks):
    def __init__(self, root: Path, store: Store, writable: bool):
        self.root = root
        self.store = store
        self.writable = writable
        self._lock_fd: int | None = None
        self._vectors: dict[tuple[str, int], object] = {}
        self._fusion_cache: tuple[int, object] | None = None
        self._fusion_override: tuple[dict | None] | None = None
        self._pin = threading.local()  # this thread's (generation, fusion meta) while pinned()

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> "Index":
        """Open an existing index for reading. Raises IndexNotFoundError with a hint if there is none.
        A postgresql:// URL (or $RETRIEVAL_INDEX holding one) opens a PostgreSQL collection instead."""
        location = resolve_index(path)
        if isinstance(location, str):
            from retrieval.store.pg.index import PgIndex

            return PgIndex.open(location)
        root = location
        db = root / DB_NAME
        if not db.is_file():
            raise IndexNotFoundError(f"no index at {root} (create one with: retrieval index PHOTOS_DIR --index {root})")
        try:
            store = Store(db, readonly=True)  # readers never write: no schema check, no write lock, no sqlite_utils
            recorded = store.get_manifest("model") is not None
        except sqlite3.DatabaseError as e:  # not a database, or a damaged one
            raise RetrievalError(f"cannot read {db}: {e}") from None
        idx = cls(root, store, writable=False)
        if not recorded:
            raise IndexNotFoundError(f"{root} holds no finished index yet (no model recorded)")
        return idx

    @classmethod
    def open_for_write(cls, path: str | os.PathLike | None = None, create: bool = True) -> "Index":
        location = resolve_index(path)
        if isinstance(location, str):
            from retrieval.store.pg.index import PgIndex

            return PgIndex.open_for_write(location, create=create)
        root = location
        if root.exists() and not root.is_dir():
            raise RetrievalError(f"{root} exists and is not a directory")
        if not root.exists():
            if not create:
                raise IndexNotFoundError(f"no index at {root}")
            try:
                root.mkdir(parents=True)
            except OSError as e:
                raise RetrievalError(f"cannot create index directory {root}: {e.strerror}") from None
        if not os.access(root, os.W_OK):
            raise RetrievalError(f"index directory {root} is not writable")
        idx = cls(root, None, writable=True)  # type: ignore[arg-type]
        idx._acquire_lock()
        idx._remove_stale_temp_files()
        try:
            idx.store = Store(root / DB_NAME)
        except Exception as e:
            idx.close()
            if isinstance(e, OSError) or e.__class__.__name__ == "OperationalError":
                raise RetrievalError(f"cannot open {root / DB_NAME}: {e}{_disk_full_hint(root)}") from None
            raise
        return idx

    def _acquire_lock(self) -> None:
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexLockedError(
                f"another process is writing to the index at {self.root}; wait for it to finish"
            ) from None
        self._lock_fd = fd
        _HELD_LOCK_FDS.add(fd)

    def _remove_stale_temp_files(self) -> None:
        """Temp files of an atomic save that a killed writer never renamed (.images.g3.faiss.XXXX.tmp).
        Only a writer makes them and we hold the lock, so every one left is dead."""
        for p in self.root.glob(".*.tmp"):
            try:
                p.unlink()
            except OSError:
                pass

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        if self._lock_fd is not None:
            _HELD_LOCK_FDS.discard(self._lock_fd)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def local_dir(self) -> Path:
        """This machine's directory for the index's own files (thumbnails): the index directory itself."""
        return self.root

    @property
    def fusion_dir(self) -> Path:
        """Where fusion files are written before they are published."""
        return self.root

    def _fusion_path(self, name: str) -> Path:
        return self.root / name

    def storage_error(self, e: BaseException) -> RetrievalError | None:
        """One line for a storage failure the user can act on (a full or read-only disk), else None."""
        return storage_error(e, self.root)

    # -- manifest -------------------------------------------------------------------------------

    @property
    def identity(self) -> ModelIdentity | None:
        state = getattr(self._pin, "state", None)
        d = state[2] if state is not None else self.store.get_manifest("model")
        return ModelIdentity.from_dict(d) if d else None

    @property
    def dim(self) -> int:
        state = getattr(self._pin, "state", None)
        return int(state[3] or 0) if state is not None else int(self.store.get_manifest("dim", 0))

    @property
    def generation(self) -> int:
        state = getattr(self._pin, "state", None)
        return state[0] if state is not None else int(self.store.get_manifest("generation", 0))

    def _snapshot(self) -> tuple[int, dict | None, dict | None, int]:
        """The generation, fusion, model and dimension in force, from one SQLite statement (one read
        transaction), so they always belong together: a writer switches them in one transaction (a
        rebuild with another model changes all four at once)."""
        import json

        rows = {
            k: json.loads(v)
            for k, v in self.store.db.execute(
                "SELECT key, value FROM manifest WHERE key IN ('generation', 'fusion', 'model', 'dim')"
            )
        }
        return int(rows.get("generation") or 0), rows.get("fusion"), rows.get("model"), int(rows.get("dim") or 0)

    @contextmanager
    def pinned(self):
        """Within the block, this thread sees one published state: the vectors of one generation and the
        fusion and model that were published with them, even if a writer switches them meanwhile."""
        if getattr(self._pin, "state", None) is not None:  # already pinned by an outer call
            yield
            return
        self._pin.state = self._snapshot()
        try:
            yield
        finally:
            self._pin.state = None

    def set_model(self, identity: ModelIdentity) -> None:
        with self.store.transaction():
            self.store.set_manifest("model", identity.to_dict())
            self.store.set_manifest("dim", identity.dim)

    def check_identity(self, identity: ModelIdentity) -> None:
        mine = self.identity
        if mine is not None and not mine.matches(identity):
            raise ModelMismatchError(
                f"model mismatch: the index at {self.root} was built with {mine.spec} "
                f"(dim {mine.dim}) but the encoder is {identity.spec} (dim {identity.dim}); "
                f"use the index's own model, or re-index with --rebuild"
            )

    def info(self) -> IndexInfo:
        ident = self.identity
        cfg = self.store.get_manifest("index_type") or {}
        fusion = self.store.get_manifest("fusion")
        gen = self.generation
        return IndexInfo(
            path=str(self.root),
            images=self.store.count("images"),
            captions=self.store.count("captions"),
            errors=self.store.count("errors"),
            model=ident.spec if ident else "",
            dim=self.dim,
            index_type=cfg.get("kind", "none"),
            index_params=dict(cfg.get("params") or {}),
            generation=gen,
            fusion=(fusion or {}).get("version") if fusion else None,
            vectors=int(self.store.get_manifest("vectors_images", 0)),
            caption_vectors=int(self.store.get_manifest("vectors_captions", 0)),
        )

    # -- fusion --------------------------------------------------------------------------------

    def fusion(self):
        """The trained fusion in force for this generation, or None (identity)."""
        state = getattr(self._pin, "state", None)
        if self._fusion_override:
            meta = self._fusion_override[0]
        else:
            meta = state[1] if state is not None else self.store.get_manifest("fusion")
        if not meta:
            return None
        key = hash(str(sorted(meta.items())))
        if self._fusion_cache and self._fusion_cache[0] == key:
            return self._fusion_cache[1]
        from retrieval.fusion.model import load_fusion

        fusion = load_fusion(self._fusion_path(meta["file"]))
        ident = self.identity
        if ident is not None and fusion.identity is not None and not ident.matches(fusion.identity):
            raise ModelMismatchError(
                f"the fusion at {meta['file']} was trained for {fusion.identity.spec}, not {ident.spec}"
            )
        self._fusion_cache = (key, fusion)
        return fusion

    # -- vectors --------------------------------------------------------------------------------

    def vectors(self, kind: str = "images", mmap: bool = False):
        """The VectorIndex of the current generation (`images` or `captions`), or None if empty."""
        from retrieval.store.vectors import VectorIndex

        for _attempt in range(3):
            gen = self.generation
            if (kind, gen) in self._vectors:
                return self._vectors[(kind, gen)]
            path = _vec_file(self.root, kind, gen)
            if not path.exists():
                if gen == 0 or int(self.store.get_manifest(f"vectors_{kind}", 0)) == 0:
                    return None
                if getattr(self._pin, "state", None) is not None:
                    self._pin.state = self._snapshot()  # two publishes since the pin: move to the newest
                continue  # a writer moved on between our manifest read and the open: read again
            try:
                vi = VectorIndex.load(path, mmap=mmap)
            except FileNotFoundError:
                continue
            except (ValueError, RuntimeError) as e:  # truncated or damaged (faiss raises RuntimeError)
                detail = (str(e).splitlines() or [type(e).__name__])[0].replace(f"{path}: ", "")
                raise IndexDamagedError(
                    f"vector file {path.name} is damaged ({detail}); run: retrieval verify --repair --index {self.root}"
                ) from None
            self._vectors = {(kind, gen): vi, **{k: v for k, v in self._vectors.items() if k[0] != kind}}
            return vi
        raise IndexDamagedError(
            f"vector file {path.name} is missing; run: retrieval verify --repair --index {self.root}"
        )

    def image_vectors_for(self, rows: list[tuple[int, str]]) -> np.ndarray:
        """Vectors to index for images (id, hash): raw image embedding, blended with captions by the fusion."""
        dim = self.dim
        raw = self.store.get_embeddings("image", [h for _, h in rows], dim)
        fusion = self.fusion()
        if fusion is None or len(rows) == 0:
            return raw
        caps = self.store.captions_for_images([i for i, _ in rows])
        cap_vecs = []
        for image_id, _ in rows:
            texts = caps.get(image_id, [])
            if texts:
                from retrieval.store.rows import text_hash

                cap_vecs.append(self.store.get_embeddings("text", [text_hash(t) for _, t in texts], dim))
            else:
                cap_vecs.append(None)
        return fusion.document_vectors(raw, cap_vecs)

    def caption_vectors_for(self, rows: list[tuple[int, str]]) -> np.ndarray:
        raw = self.store.get_embeddings("text", [h for _, h in rows], self.dim)
        fusion = self.fusion()
        return raw if fusion is None or len(rows) == 0 else fusion.caption_vectors(raw)

    # -- checks ---------------------------------------------------------------------------------
