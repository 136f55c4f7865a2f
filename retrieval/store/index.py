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

import errno
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
from retrieval.faults import checkpoint
from retrieval.modelspec import ModelIdentity
from retrieval.store.db import DB_NAME, Store

ENV_INDEX = "RETRIEVAL_INDEX"
KEEP_GENERATIONS = (
    2  # the current one and the one before, so a reader that just read the manifest can still open its files
)


def default_index_dir() -> Path:
    env = os.environ.get(ENV_INDEX)
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "retrieval" / "default"


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


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
_SQLITE_STORAGE = ("database or disk is full", "readonly database", "disk I/O error", "unable to open database file")


def storage_error(e: BaseException, root) -> RetrievalError | None:
    """A write to the index that failed because of the disk (full, read-only, quota, permissions, I/O) as
    a one-line user error; None for any other exception (a bug keeps its traceback). Knows OSError,
    sqlite3 errors and the RuntimeError faiss raises with the C library's strerror in parentheses."""
    why = None
    if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
        why = e.strerror or str(e)
    elif e.__class__.__name__ in ("OperationalError", "DatabaseError") and any(s in str(e) for s in _SQLITE_STORAGE):
        why = str(e)
    elif isinstance(e, RuntimeError):
        why = next((os.strerror(n) for n in _STORAGE_ERRNOS if f"({os.strerror(n)})" in str(e)), None)
    if why is None:
        return None
    why += _disk_full_hint(root) if "space" not in why and "full" not in why else ""
    return RetrievalError(
        f"cannot write to the index at {root}: {why}. What was written before is intact; "
        f"free some space (or make it writable) and run the same command again to finish"
    )


def _disk_full_hint(root) -> str:
    """ " (the disk is full)" when it is: SQLite says only "disk I/O error" when it cannot grow its -shm."""
    try:
        import shutil

        free = shutil.disk_usage(root).free
    except OSError:
        return ""
    return f" (the disk is full: {free // 1024} KiB free)" if free < (1 << 20) else ""


# manifest key: ids of images re-encoded in place (same id, new content) whose new vectors are not yet
# published; the writer sets it with the rows and clears it after publishing (index_data/pipeline.py)
PENDING_DIRTY_KEY = "pending_dirty_images"


def _vec_file(root: Path, kind: str, gen: int) -> Path:
    return root / f"{kind}.g{gen}.faiss"


class Index:
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
        """Open an existing index for reading. Raises IndexNotFoundError with a hint if there is none."""
        root = Path(path).expanduser() if path else default_index_dir()
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
        root = Path(path).expanduser() if path else default_index_dir()
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

        fusion = load_fusion(self.root / meta["file"])
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
                from retrieval.store.db import text_hash

                cap_vecs.append(self.store.get_embeddings("text", [text_hash(t) for _, t in texts], dim))
            else:
                cap_vecs.append(None)
        return fusion.document_vectors(raw, cap_vecs)

    def caption_vectors_for(self, rows: list[tuple[int, str]]) -> np.ndarray:
        raw = self.store.get_embeddings("text", [h for _, h in rows], self.dim)
        fusion = self.fusion()
        return raw if fusion is None or len(rows) == 0 else fusion.caption_vectors(raw)

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

    # -- checks ---------------------------------------------------------------------------------

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

    def _sampled_content_mismatches(self, kind: str, vi, ids: list[int], hashes: dict, n: int = 64):
        """(mismatches, sampled): whether the vectors stored for up to n ids (evenly spaced) equal the
        vectors SQLite's raw embeddings give them (a flipped byte in a FAISS file passes every other
        check). None when nothing could be compared."""
        if not ids:
            return None
        if len(ids) > n:
            ids = [ids[i] for i in np.linspace(0, len(ids) - 1, n).astype(int)]
        try:
            make = self.image_vectors_for if kind == "images" else self.caption_vectors_for
            expected = np.ascontiguousarray(make([(i, hashes[i]) for i in ids]), dtype=np.float32)
            scores, found = vi.search(expected, len(ids), allowed_ids=np.array(ids, dtype=np.int64))
        except Exception:  # lost or malformed raw embeddings are reported on their own
            return None
        norms = np.einsum("ij,ij->i", expected, expected)
        bad = 0
        for r, i in enumerate(ids):
            hit = np.flatnonzero(found[r] == i)
            if len(hit) == 0 or not abs(float(scores[r, hit[0]]) - norms[r]) <= 1e-3 * max(1.0, norms[r]):
                bad += 1
        return (bad, len(ids)) if bad else None

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


def _caption_kind(requested: str) -> str:
    return requested if requested in ("auto", "flat") else "auto"
