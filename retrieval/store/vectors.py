"""FAISS wrapper: build, add, remove, search, save and load vector indexes.

Vectors are L2-normalised float32, so inner product is cosine; ids are int64 SQLite row ids, and SQLite keeps
the raw embeddings, so a file can always be rebuilt. The kinds, how ids are kept and the measurements behind
the defaults: docs/vectors.md.
"""

from __future__ import annotations

from contextlib import contextmanager

import faiss
import numpy as np

from retrieval.store.vector_file import read_vector_file, write_vector_file
from retrieval.store.vector_kinds import (
    HNSW_DEFAULTS,
    IVF_KINDS,
    REBUILD_FRACTION,
    VectorIndexConfig,
    _pow2_nlist,
    default_params,
)
from retrieval.store.vector_search import FilteredSearch

# Single-query searches run on this many OpenMP threads (None: faiss's default): thread wake-up costs more than
# the split saves for one query (docs/vectors.md). Batches keep the default thread count.
SINGLE_QUERY_THREADS: int | None = 1


@contextmanager
def _omp_threads(n: int | None):
    """Temporarily run faiss on n OpenMP threads (None: unchanged). omp_set_num_threads only affects
    the calling thread, so this does not disturb searches running on other threads."""
    before = faiss.omp_get_max_threads()
    if n is None or n == before:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _threads_for(nq: int):
    """One query runs on SINGLE_QUERY_THREADS threads; batches on faiss's default."""
    return _omp_threads(SINGLE_QUERY_THREADS if nq <= 1 else None)


# Builds smaller than this many floats train/add on one thread: OpenMP spin under contention made small
# trainings 10x slower on two threads (docs/vectors.md).
SMALL_BUILD_FLOATS = 1 << 22


def _as_ids(ids) -> np.ndarray:
    if isinstance(ids, (set, frozenset)):
        ids = np.fromiter(ids, dtype=np.int64, count=len(ids))
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


class VectorIndex(FilteredSearch):
    """One FAISS index plus the id bookkeeping around it. Not thread-safe for concurrent writes."""

    def __init__(
        self,
        dim: int,
        config: VectorIndexConfig,
        index,
        slot_ids: np.ndarray,
        live: np.ndarray | None = None,
        mapped: bool = False,
    ) -> None:
        self.dim = int(dim)
        self.config = config
        self._index = index
        self._slot_ids = _as_ids(slot_ids)
        # live only matters for hnsw (tombstones); other kinds remove for real.
        self._live = np.ones(len(self._slot_ids), dtype=bool) if live is None else np.asarray(live, dtype=bool)
        self._n_live = int(self._live.sum())
        self._mapped = mapped  # faiss data is a read-only mmap view: copy before mutating
        self._max_id_cache: int | None = None
        self._present_cache: np.ndarray | None = None  # ivf kinds: bool table id -> present

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, dim: int, config: VectorIndexConfig) -> "VectorIndex":
        """An empty index of the given kind (IVF kinds need training data, so they start as flat)."""
        if config.kind in IVF_KINDS:
            config = VectorIndexConfig("flat", {"fallback_from": config.kind, "reason": "no training data"})
        return cls(dim, config, cls._new_faiss(dim, config), np.empty(0, np.int64))

    @staticmethod
    def _new_faiss(dim: int, config: VectorIndexConfig):
        if config.kind == "flat":
            return faiss.IndexFlatIP(dim)
        if config.kind == "hnsw":
            p = {**HNSW_DEFAULTS, **config.params}
            index = faiss.IndexHNSWFlat(dim, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(p["efConstruction"])
            index.hnsw.efSearch = int(p["efSearch"])
            return index
        raise ValueError(f"cannot create an untrained {config.kind} index")

    @classmethod
    def build(cls, dim: int, ids: np.ndarray, vecs: np.ndarray, config: VectorIndexConfig) -> "VectorIndex":
        """Build an index from scratch. IVF kinds train on vecs; with too few vectors to train the
        coarse quantizer (and PQ codebooks) they fall back to flat and say so in config.params."""
        ids = _as_ids(ids)
        vecs = cls._check_vecs(vecs, dim)
        if len(ids) != len(vecs):
            raise ValueError(f"{len(ids)} ids for {len(vecs)} vectors")
        cls._check_unique(ids)
        config = VectorIndexConfig.from_dict(config.to_dict())
        with _omp_threads(1 if vecs.size < SMALL_BUILD_FLOATS else None):
            return cls._build(dim, ids, vecs, config)

    @classmethod
    def _build(cls, dim: int, ids: np.ndarray, vecs: np.ndarray, config: VectorIndexConfig) -> "VectorIndex":
        if config.kind in IVF_KINDS:
            pq = config.kind == "ivfpq"
            p = {**default_params(config.kind, len(vecs), dim), **config.params}
            nlist = int(p["nlist"])
            min_train = max(nlist, 1 << int(p["nbits"])) if pq else nlist
            if pq and dim % int(p["m"]) != 0:
                raise ValueError(f"ivfpq: dim {dim} is not divisible by m={p['m']}")
            if len(vecs) < min_train:
                config = VectorIndexConfig(
                    "flat",
                    {"fallback_from": config.kind, "reason": f"{len(vecs)} vectors < {min_train} needed to train"},
                )
            else:
                config.params = p
                quantizer = faiss.IndexFlatIP(dim)
                if pq:
                    index = faiss.IndexIVFPQ(
                        quantizer, dim, nlist, int(p["m"]), int(p["nbits"]), faiss.METRIC_INNER_PRODUCT
                    )
                    n_train = 256 * max(nlist, 1 << int(p["nbits"]))
                else:
                    if config.kind == "ivfsq":
                        if p["qtype"] != "fp16":
                            raise ValueError(f"ivfsq: unsupported qtype {p['qtype']!r} (fp16)")
                        index = faiss.IndexIVFScalarQuantizer(
                            quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT, False
                        )
                    else:
                        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
                    # 10 k-means iterations on ~50 points per list: 1M x 512, nlist 2048 trained in
                    # ~1 min; recall figures above were measured with exactly this.
                    index.cp.niter = 10
                    n_train = 50 * nlist
                if n_train < len(vecs):  # faiss would subsample anyway; doing it here saves a copy
                    rng = np.random.default_rng(0)
                    train = vecs[np.sort(rng.choice(len(vecs), n_train, replace=False))]
                else:
                    train = vecs
                index.train(train)
                index.nprobe = int(p["nprobe"])
                index.add_with_ids(vecs, ids)
                return cls(dim, config, index, ids)
        if config.kind == "hnsw":
            config.params = {**HNSW_DEFAULTS, **config.params}
        index = cls._new_faiss(dim, config)
        if len(vecs):
            index.add(vecs)
        return cls(dim, config, index, ids)

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def ntotal(self) -> int:
        """Live vectors (tombstones excluded)."""
        return self._n_live

    def __len__(self) -> int:
        return self._n_live

    def ids(self) -> np.ndarray:
        """Live ids, in storage order."""
        if self._n_live == len(self._slot_ids):
            return self._slot_ids.copy()
        return self._slot_ids[self._live]

    @property
    def tombstone_fraction(self) -> float:
        n = len(self._slot_ids)
        return 0.0 if n == 0 else (n - self._n_live) / n

    @property
    def needs_rebuild(self) -> bool:
        """True when a rebuild (VectorIndex.build on the current vectors) would pay off:
        hnsw: more than REBUILD_FRACTION of the slots are tombstones that search still walks through;
        IVF kinds: the collection grew or shrank ~4x since training, so the list count no longer fits
        (lists 4x longer make every probe 4x dearer; auto's nlist follows sqrt(n))."""
        if self.tombstone_fraction > REBUILD_FRACTION:
            return True
        if self.kind in IVF_KINDS:
            nlist = int(self._index.nlist)
            per_sqrt = 4 if self.kind == "ivfpq" else 2
            ideal = _pow2_nlist(max(self._n_live, 1), per_sqrt)
            return ideal >= 2 * nlist or (self._n_live >= 39 and ideal * 4 <= nlist)
        return False

    @property
    def faiss_index(self):
        """The underlying faiss index (read-only use; positions are slots, not ids, for flat/hnsw)."""
        return self._index

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_vecs(vecs, dim: int) -> np.ndarray:
        vecs = np.ascontiguousarray(np.asarray(vecs, dtype=np.float32))
        if vecs.ndim == 1 and vecs.size == dim:
            vecs = vecs.reshape(1, dim)
        if vecs.ndim != 2 or vecs.shape[1] != dim:
            raise ValueError(f"expected vectors of shape (n, {dim}), got {vecs.shape}")
        return vecs

    @staticmethod
    def _check_unique(ids: np.ndarray) -> None:
        if len(ids) > 1 and len(np.unique(ids)) != len(ids):
            raise ValueError("duplicate ids in one batch")

    def _materialize(self) -> None:
        """An mmap-loaded faiss index aborts the process if mutated; copy it into memory first."""
        if self._mapped:
            self._index = faiss.deserialize_index(faiss.serialize_index(self._index))
            self._mapped = False

    def _changed(self) -> None:
        self._n_live = int(self._live.sum())
        self._max_id_cache = None
        self._present_cache = None

    def _max_id(self) -> int:
        if self._max_id_cache is None:
            self._max_id_cache = int(self._slot_ids.max()) if len(self._slot_ids) else -1
        return self._max_id_cache

    def _dense(self) -> bool:
        """Ids small enough for a lookup table of max_id+1 bools (SQLite row ids are)."""
        n = len(self._slot_ids)
        return n > 0 and int(self._slot_ids.min()) >= 0 and self._max_id() < 16 * n + (1 << 22)

    def _allowed_lut(self, allowed: np.ndarray) -> np.ndarray:
        max_id = self._max_id()
        lut = np.zeros(max_id + 1, dtype=bool)
        lut[allowed[(allowed >= 0) & (allowed <= max_id)]] = True
        return lut

    def _slot_mask(self, allowed: np.ndarray) -> np.ndarray:
        """Boolean mask over slots whose id is in allowed (a lookup table when ids are dense)."""
        if len(self._slot_ids) == 0 or len(allowed) == 0:
            return np.zeros(len(self._slot_ids), dtype=bool)
        if self._dense():
            return self._allowed_lut(allowed)[self._slot_ids]
        return np.isin(self._slot_ids, allowed)

    # ------------------------------------------------------------------ mutation
    def add(self, ids, vecs) -> None:
        """Add vectors. An id that is already present is replaced (upsert)."""
        ids = _as_ids(ids)
        vecs = self._check_vecs(vecs, self.dim)
        if len(ids) != len(vecs):
            raise ValueError(f"{len(ids)} ids for {len(vecs)} vectors")
        if len(ids) == 0:
            return
        self._check_unique(ids)
        if self._n_live and np.isin(ids, self.ids()).any():
            self.remove(ids)
        self._materialize()
        with _omp_threads(1 if vecs.size < SMALL_BUILD_FLOATS else None):
            if self.kind in IVF_KINDS:
                self._index.add_with_ids(vecs, ids)
            else:
                self._index.add(vecs)
        self._slot_ids = np.concatenate([self._slot_ids, ids])
        self._live = np.concatenate([self._live, np.ones(len(ids), dtype=bool)])
        self._changed()

    def remove(self, ids) -> int:
        """Remove ids; returns how many were present. hnsw only tombstones (see needs_rebuild)."""
        ids = _as_ids(ids)
        if len(ids) == 0 or self._n_live == 0:
            return 0
        hit = np.isin(self._slot_ids, ids) & self._live
        count = int(hit.sum())
        if count == 0:
            return 0
        if self.kind == "hnsw":
            self._live = self._live & ~hit
        else:
            self._materialize()
            if self.kind == "flat":
                slots = np.flatnonzero(hit).astype(np.int64)  # IndexFlat removes by position
                removed = self._index.remove_ids(faiss.IDSelectorBatch(slots))
            else:
                removed = self._index.remove_ids(faiss.IDSelectorBatch(self._slot_ids[hit]))
            if removed != count:
                raise RuntimeError(f"faiss removed {removed} vectors, expected {count}")
            self._slot_ids = self._slot_ids[~hit]
            self._live = np.ones(len(self._slot_ids), dtype=bool)
        self._changed()
        return count

    def _stored_vectors(self) -> np.ndarray:
        """Raw vectors of every slot (flat/hnsw keep them exactly), as a read-only view."""
        flat = self._index if self.kind == "flat" else faiss.downcast_index(self._index.storage)
        n = flat.ntotal
        if n == 0:
            return np.empty((0, self.dim), np.float32)
        return faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)

    def compact(self) -> None:
        """Rebuild an hnsw index from its live vectors, dropping tombstones; no-op for other kinds."""
        if self.kind != "hnsw" or self._n_live == len(self._slot_ids):
            return
        vecs = np.array(self._stored_vectors()[self._live])
        ids = self._slot_ids[self._live]
        index = self._new_faiss(self.dim, self.config)
        if len(vecs):
            index.add(vecs)
        self._index, self._mapped = index, False
        self._slot_ids = ids
        self._live = np.ones(len(ids), dtype=bool)
        self._changed()

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None, probes: int | None = None):
        """Top-k by inner product. Returns (scores [q,k] float32, ids [q,k] int64), best first,
        padded with -inf / -1. With allowed_ids, only those ids are candidates, and k results come
        back whenever k allowed live items exist (exact fallback when the ANN comes back short).
        probes overrides the search effort for this call: IVF lists probed (nprobe) or HNSW efSearch;
        exact kinds ignore it."""
        if probes is not None and int(probes) < 1:
            raise ValueError(f"probes must be at least 1, got {probes}")
        q = self._check_vecs(queries, self.dim)
        nq, k = len(q), int(k)
        scores = np.full((nq, max(k, 0)), -np.inf, dtype=np.float32)
        out = np.full((nq, max(k, 0)), -1, dtype=np.int64)
        if k <= 0 or nq == 0 or self._n_live == 0:
            return scores, out
        allowed = None if allowed_ids is None else _as_ids(allowed_ids)
        with _threads_for(nq):
            if self.kind in IVF_KINDS:
                D, I = self._search_ivf(q, k, allowed, probes)
            else:
                D, I = self._search_slots(q, k, allowed, probes)
        kk = I.shape[1]
        valid = I >= 0
        scores[:, :kk] = np.where(valid, D, -np.inf)
        out[:, :kk] = np.where(valid, I, -1)
        return scores, out

    def touch(self) -> None:
        """Read every stored vector once: an IVF search over all lists, or the exact scan. A mapped index
        file is then in memory and in this process's page tables, so that the first real queries of a
        long-lived searcher do not pay for faulting it in (a first pass of 200 queries at 1M: FAISS 8.2 ms
        p50 against 4.1 ms once touched). HNSW, whose search follows the graph, is left as it is."""
        if self._n_live == 0 or self.kind == "hnsw":
            return
        q = np.zeros((1, self.dim), dtype=np.float32)
        if self.kind in IVF_KINDS:
            self._index.search(q, 1, params=faiss.SearchParametersIVF(nprobe=int(self._index.nlist)))
        else:
            self._index.search(q, 1)

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write atomically (retrieval/store/vector_file.py): a crash leaves the old file or the new one."""
        meta = {
            "dim": self.dim,
            "config": self.config.to_dict(),
            "n_slots": len(self._slot_ids),
            "n_live": self._n_live,
        }
        write_vector_file(path, self._index, meta, self._slot_ids, self._live)

    @classmethod
    def load(cls, path, mmap: bool = False) -> "VectorIndex":
        """Load an index file. mmap=True maps the vector data (faiss IO_FLAG_MMAP_IFC, supported for
        every kind here) so a cold start does not read the whole file; the first add/remove then
        copies it into memory."""
        meta, index, slot_ids, live = read_vector_file(path, mmap)
        config = VectorIndexConfig.from_dict(meta["config"])
        if config.kind == "hnsw":
            index.hnsw.efSearch = int(config.params.get("efSearch", HNSW_DEFAULTS["efSearch"]))
        elif config.kind in IVF_KINDS:
            index.nprobe = int(config.params.get("nprobe", 16))
        return cls(meta["dim"], config, index, slot_ids, live, mapped=mmap)
