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
from pathlib import Path

from retrieval.errors import (
    IndexDamagedError,
    IndexLockedError,
    IndexNotFoundError,
    RetrievalError,
)
from retrieval.store.checks import Checks
from retrieval.store.db import DB_NAME, Store
from retrieval.store.disk_errors import _disk_full_hint, storage_error
from retrieval.store.index_base import IndexBase, IndexInfo  # noqa: F401 - IndexInfo is imported from here
from retrieval.store.layout import _vec_file, resolve_index
from retrieval.store.publish import PublishVectors

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


class Index(PublishVectors, Checks, IndexBase):
    def __init__(self, root: Path, store: Store, writable: bool):
        super().__init__(root, store, writable)
        self._lock_fd: int | None = None
        self._vectors: dict[tuple[str, int], object] = {}

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
