"""FAISS wrapper: choose, build, add, remove, search, save and load vector indexes atomically.

Vectors are L2-normalised float32, so inner product is cosine; every kind uses METRIC_INNER_PRODUCT.
Ids are int64 SQLite row ids. The SQLite store keeps the raw embeddings, so a FAISS file can always be
rebuilt from it; this module only has to make sure a reader never sees a half-written file.

Three kinds (figures from benchmarks/RESULTS_vectors.md, 2-core CPU sandbox):

- ``flat``: exact. Fast enough while the scan is small (n * dim <= FLAT_MAX_FLOATS, about 50k vectors at
  dim 512, ~5 ms per query on one core).
- ``ivfflat``: inverted lists over exact vectors. On 1M x 512 with text-like (off-manifold) queries it
  reached recall@10 0.989 probing 64 of 2048 lists and built in ~3 min, where HNSW (M=32,
  efConstruction=80) took 19 min to build and topped out at 0.93 (efSearch 1024, 11.6 ms). Real
  removal, and filters need no special casing.
- ``ivfsq``: the same lists over vectors stored as float16 (faiss ``IVF...,SQfp16``); auto's choice past
  the flat threshold. A probe reads half the bytes, so a query costs about half (1M x 512, nprobe 256:
  4.7 ms vs 9.9 ms on one core) and the index takes half the memory, with the same neighbours (recall@10
  0.987 for both there); scores carry float16 rounding, about 1e-4. It probes 4x more lists than
  IVF-Flat by default (``_ivfsq_params``), for sentence queries, which need more probes than image ones.
- ``hnsw``: graph ANN, on request. Great for in-distribution (image->image) queries; FAISS HNSW cannot
  delete, so removal keeps a tombstone set that search excludes through an IDSelector;
  ``needs_rebuild`` says when to ``compact()``.
- ``ivfpq``: compressed (m bytes per vector) for very large collections or when memory matters; its
  scores are approximate (PQ), so recall is capped well below the others (~0.74 at m = dim/4).

How ids are kept. ``flat`` and ``hnsw`` store vectors at internal positions ("slots") 0..n-1 and this
wrapper keeps ``slot -> id`` as a numpy array (the job IndexIDMap2 would do). Owning the map lets HNSW
tombstone a *slot*, so an id can be removed and re-added (an updated image) without the old vector
coming back, and lets filters become a bitmap over slots (or, for exact scans, the slot list, which
faiss's flat search visits directly). The IVF kinds store the SQLite ids natively (add_with_ids) and
support real removal.

File format (one file, so faiss data and our metadata can never come from two different states):
``[faiss index bytes, as faiss.write_index writes them][meta JSON][slot ids int64][live bits]``
followed by a fixed footer. ``faiss.read_index`` ignores the trailing bytes, and because the faiss
part starts at offset 0, ``load(mmap=True)`` can hand the path to faiss with IO_FLAG_MMAP_IFC.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from retrieval.faults import checkpoint
from retrieval.store.atomic import fsync_dir as _fsync_dir
from retrieval.store.atomic import replacing

KINDS = ("flat", "hnsw", "ivfflat", "ivfsq", "ivfpq")
IVF_KINDS = ("ivfflat", "ivfsq", "ivfpq")

# Flat (exact) while one query scans at most this many floats: 50k x 512 = 25.6M floats (100 MB),
# measured ~4.5-8 ms per query on one core of the 2-core sandbox (100k x 512: ~9-15 ms).
FLAT_MAX_FLOATS = 50_000 * 512
# Past this many vectors auto picks IVF-PQ: 5M x 512 raw float32 alone is ~10 GB.
IVFPQ_MIN_N = 5_000_000
# HNSW defaults. efSearch 256 reached recall@10 0.981 (text-like queries) / 0.999 (image queries) at
# 100k x 512 in 0.9 ms. At 1M the same graph needs efSearch >= 1024 for text-like queries and still
# tops out at 0.93 (image queries: 0.98), one reason auto prefers ivfflat. efConstruction 80 keeps the
# 1M build under ~20 min on the shared 2-core sandbox (it took 19 min under load).
HNSW_DEFAULTS = {"M": 32, "efConstruction": 80, "efSearch": 256}
# Above this tombstone fraction an HNSW index should be compacted (rebuilt from its live vectors).
REBUILD_FRACTION = 0.20
# Single-query searches run on this many OpenMP threads (None: leave faiss's default). On the 2-core
# sandbox, flat 100k x 512 took p50 9.4 ms on 1 thread vs 15-40 ms on 2 (thread wake-up and
# contention cost more than the split saves for one query). Batches keep the default thread count.
SINGLE_QUERY_THREADS: int | None = 1

_MAGIC = b"RVECIDX1"
_FOOTER = struct.Struct("<8sQQQQI")  # magic, faiss_len, meta_len, ids_len, live_len, crc32(trailer)
_FORMAT_VERSION = 1


@dataclass
class VectorIndexConfig:
    """Which FAISS index to use and its parameters; stored in the manifest and inside the index file."""

    kind: str
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown vector index kind {self.kind!r}; expected one of {', '.join(KINDS)}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict) -> "VectorIndexConfig":
        return cls(kind=str(d["kind"]), params=dict(d.get("params") or {}))


def _ivfpq_params(n: int, dim: int) -> dict:
    """IVF-PQ parameters for n vectors: ~4*sqrt(n) lists, dim/4 one-byte sub-quantizers.

    nbits shrinks for tiny collections so the PQ codebooks (2**nbits centroids) still get ~39 training
    points each, which is also what keeps faiss from warning.
    """
    n = max(int(n), 1)
    nlist = _pow2_nlist(n, 4)
    m = _pick_m(dim, max(1, dim // 4))
    nbits = 8
    while nbits > 4 and n < 39 * (1 << nbits):
        nbits -= 1
    # PQ error, not probing, caps ivfpq recall: at 100k x 512 (nlist 1024) recall@10 was 0.736 at
    # nprobe 16 and 0.738 at 128, at 5x the latency.
    nprobe = max(1, min(nlist, max(8, nlist // 64)))
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": nprobe}


def _pow2_nlist(n: int, per_sqrt: float) -> int:
    """per_sqrt * sqrt(n) lists rounded to a power of two, with >= 39 training points per list."""
    n = max(int(n), 1)
    nlist = int(2 ** round(math.log2(max(per_sqrt * math.sqrt(n), 1))))
    return max(1, min(nlist, 65536, n // 39 or 1))


def _ivfflat_params(n: int, dim: int) -> dict:
    """~2*sqrt(n) lists; probe ~1.5*sqrt(nlist) of them (a power of two, at least 16).

    Measured recall@10 on text-like queries (RESULTS_vectors.md): 100k, nlist 512: nprobe 16 -> 0.977,
    32 -> 0.990; 1M, nlist 2048: nprobe 32 -> 0.981, 64 -> 0.989, 128 -> 0.993. The needed fraction of
    lists shrinks as n grows, hence sqrt(nlist) rather than a fixed fraction: 512 -> 32, 2048 -> 64."""
    nlist = _pow2_nlist(n, 2)
    nprobe = int(2 ** round(math.log2(1.5 * math.sqrt(nlist))))
    return {"nlist": nlist, "nprobe": max(1, min(nlist, max(16, nprobe)))}


def _ivfsq_params(n: int, dim: int) -> dict:
    """IVF-Flat's lists over vectors stored as float16 (faiss IVF,SQfp16): half the memory and half the
    bytes a probe reads, with the same neighbours at every nprobe (1M x 512, 2048 lists, sentence queries
    from the numpy ViT-B-32 text tower: recall@10 0.952 at nprobe 128 and 0.987 at 256 for both kinds;
    4.7 ms vs 9.9 ms per query at 256 on one core). Scores carry float16 rounding (~1e-4).

    The saving goes into probing more lists than IVF-Flat's 1.5*sqrt(nlist): ~6*sqrt(nlist) as a power of
    two, and at least 256 (512 lists -> 256, 2048 -> 256, 4096 -> 512). Sentence queries lie off the image
    manifold (the modality gap; random-init towers even more so): there 1.5*sqrt gave recall@10 0.84
    (100k) and 0.91 (1M), and 6*sqrt without the floor 0.959 at 100k (nprobe 128; 256: 0.992, 2.1 ms)."""
    nlist = _pow2_nlist(n, 2)
    nprobe = max(256, int(2 ** round(math.log2(6 * math.sqrt(nlist)))))
    return {"nlist": nlist, "nprobe": max(1, min(nlist, nprobe)), "qtype": "fp16"}


def _pick_m(dim: int, target: int) -> int:
    """Largest divisor of dim that is <= target (PQ needs dim % m == 0)."""
    for m in range(max(1, min(target, dim)), 0, -1):
        if dim % m == 0:
            return m
    return 1


def default_params(kind: str, n: int, dim: int) -> dict:
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return dict(HNSW_DEFAULTS)
    if kind == "ivfflat":
        return _ivfflat_params(n, dim)
    if kind == "ivfsq":
        return _ivfsq_params(n, dim)
    if kind == "ivfpq":
        return _ivfpq_params(n, dim)
    raise ValueError(f"unknown vector index kind {kind!r}")


def probes_param(kind: str) -> str | None:
    """The config parameter that `search(..., probes=N)` overrides for a kind: nprobe (IVF), efSearch
    (hnsw), or None (exact kinds)."""
    return "nprobe" if kind in IVF_KINDS else "efSearch" if kind == "hnsw" else None


def choose_config(n: int, dim: int, requested: str = "auto") -> VectorIndexConfig:
    """Pick the index kind and parameters for n vectors of size dim.

    auto: exact ``flat`` while n*dim <= FLAT_MAX_FLOATS (about 50k vectors at dim 512), ``ivfpq`` from
    IVFPQ_MIN_N vectors, ``ivfsq`` in between (IVF over float16 vectors: measured better than hnsw here
    for text queries, and than ivfflat for speed and memory; see the module docstring). An explicit kind
    always wins."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        if n * dim <= FLAT_MAX_FLOATS:
            kind = "flat"
        elif n >= IVFPQ_MIN_N:
            kind = "ivfpq"
        else:
            kind = "ivfsq"
    elif requested in KINDS:
        kind = requested
    else:
        raise ValueError(f"unknown index type {requested!r}; expected auto, {', '.join(KINDS)}")
    return VectorIndexConfig(kind=kind, params=default_params(kind, n, dim))


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


# Builds smaller than this many floats train/add on one thread: on the shared 2-core sandbox a
# 3000 x 64 IVF-PQ training took 0.3 s on 1 thread and 3-11 s on 2 (OpenMP spin under contention).
SMALL_BUILD_FLOATS = 1 << 22


def _as_ids(ids) -> np.ndarray:
    if isinstance(ids, (set, frozenset)):
        ids = np.fromiter(ids, dtype=np.int64, count=len(ids))
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


def _bitmap_selector(mask: np.ndarray):
    """IDSelectorBitmap over positions; returns (selector, bits) and the caller must keep bits alive."""
    bits = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)), bits


class VectorIndex:
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

    def _search_slots(self, q: np.ndarray, k: int, allowed: np.ndarray | None, probes: int | None = None):
        """flat / hnsw: search over slots, map slots to ids."""
        hnsw = self.kind == "hnsw"
        ef = int(probes or self.config.params.get("efSearch", HNSW_DEFAULTS["efSearch"])) if hnsw else 0
        n_slots = len(self._slot_ids)
        if allowed is None and self._n_live == n_slots:
            mask, count = None, n_slots
        elif allowed is None:
            mask, count = self._live, self._n_live
        else:
            mask = self._slot_mask(allowed)
            if self._n_live != n_slots:
                mask &= self._live
            count = int(mask.sum())
        if count == 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        kk = min(k, count)
        if mask is None:
            if hnsw:
                D, L = self._index.search(q, kk, params=faiss.SearchParametersHNSW(efSearch=max(ef, kk)))
            else:
                D, L = self._index.search(q, kk)
            return D, np.where(L >= 0, self._slot_ids[np.maximum(L, 0)], -1)
        if not hnsw or count * self.dim <= FLAT_MAX_FLOATS:
            # Exact over the allowed vectors. Given an IDSelectorArray, faiss's flat search visits just
            # those slots (1M x 512, 10% allowed: 76 ms vs 95 ms with a bitmap, 270 ms unfiltered,
            # under heavy load), so a selective filter costs about a flat index of its size.
            D, L = self._exact(q, kk, mask)
        else:
            sel, _bits = _bitmap_selector(mask)
            # Graph search keeps only allowed nodes as results; widen the beam as the filter narrows.
            frac = count / n_slots
            ef_f = int(min(max(ef, kk, ef / max(frac, 1e-6) ** 0.5), 4096))
            D, L = self._index.search(q, kk, params=faiss.SearchParametersHNSW(efSearch=ef_f, sel=sel))
            short = (L < 0).any(axis=1)
            if short.any():  # promise: k results whenever k allowed items exist
                D[short], L[short] = self._exact(q[short], kk, mask)
            del _bits
        return D, np.where(L >= 0, self._slot_ids[np.maximum(L, 0)], -1)

    def _exact(self, q: np.ndarray, k: int, mask: np.ndarray):
        """Exact top-k over the slots in mask (flat storage only: IDSelectorArray.is_member is a linear
        scan, fine here because flat search special-cases it, never for graph or IVF search)."""
        flat = self._index if self.kind == "flat" else faiss.downcast_index(self._index.storage)
        slots = np.flatnonzero(mask).astype(np.int64)
        sel = faiss.IDSelectorArray(slots)
        return flat.search(q, k, params=faiss.SearchParameters(sel=sel))

    def _search_ivf(self, q: np.ndarray, k: int, allowed: np.ndarray | None, probes: int | None = None):
        """IVF kinds: ids are native. A filter becomes a bitmap over ids (hash set when ids are sparse).
        nprobe grows as 1/fraction allowed: the scanner tests the bitmap before scoring, so this keeps
        the number of scored vectors about constant (10% filter at 10k: recall 0.93 with 1/sqrt
        scaling). Rows still short of k are redone over every list."""
        nlist = int(self._index.nlist)
        nprobe = min(int(probes or self.config.params.get("nprobe", 16)), nlist)
        if allowed is None:
            kk = min(k, self._n_live)
            return self._index.search(q, kk, params=faiss.SearchParametersIVF(nprobe=nprobe))
        if self._dense():
            lut = self._allowed_lut(allowed)
            if self._present_cache is None:
                self._present_cache = np.zeros(len(lut), dtype=bool)
                self._present_cache[self._slot_ids] = True
            lut &= self._present_cache
            count = int(lut.sum())
            sel, keep = _bitmap_selector(lut) if count else (None, None)
        else:
            present = np.intersect1d(allowed, self._slot_ids)
            count = len(present)
            sel, keep = (faiss.IDSelectorBatch(present), present) if count else (None, None)
        if count == 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        kk = min(k, count)
        frac = count / len(self._slot_ids)
        probe = int(min(nlist, math.ceil(nprobe / max(frac, 1e-9))))
        D, I = self._index.search(q, kk, params=faiss.SearchParametersIVF(nprobe=probe, sel=sel))
        short = (I < 0).any(axis=1)
        if short.any() and probe < nlist:  # scan every list: then every allowed id is a candidate
            D[short], I[short] = self._index.search(
                q[short], kk, params=faiss.SearchParametersIVF(nprobe=nlist, sel=sel)
            )
        del keep
        return D, I

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write atomically: temp file in the same directory, fsync, os.replace, fsync the directory.
        A crash leaves either the old file or the new one, never a mix."""
        path = Path(path)
        directory = path.parent if str(path.parent) else Path(".")
        directory.mkdir(parents=True, exist_ok=True)
        meta = json.dumps(
            {
                "format": _FORMAT_VERSION,
                "dim": self.dim,
                "config": self.config.to_dict(),
                "n_slots": len(self._slot_ids),
                "n_live": self._n_live,
            },
            sort_keys=True,
        ).encode()
        ids_bytes = self._slot_ids.astype("<i8").tobytes()
        live_bytes = np.packbits(self._live, bitorder="little").tobytes()
        crc = zlib.crc32(live_bytes, zlib.crc32(ids_bytes, zlib.crc32(meta)))
        with replacing(path) as tmp:
            faiss.write_index(self._index, tmp)
            checkpoint("faiss_write")
            faiss_len = os.path.getsize(tmp)
            with open(tmp, "ab") as f:
                f.write(meta)
                f.write(ids_bytes)
                f.write(live_bytes)
                f.write(_FOOTER.pack(_MAGIC, faiss_len, len(meta), len(ids_bytes), len(live_bytes), crc))
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(directory)

    @classmethod
    def load(cls, path, mmap: bool = False) -> "VectorIndex":
        """Load an index file. mmap=True maps the vector data (faiss IO_FLAG_MMAP_IFC, supported for
        every kind here) so a cold start does not read the whole file; the first add/remove then
        copies it into memory."""
        path = Path(path)
        for _attempt in range(5):
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                meta, slot_ids, live = _read_trailer(f, st.st_size, path)
                flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
                index = faiss.read_index(str(path), flags)
                # The file we read the trailer from was open the whole time, so its inode could not be
                # reused: if the path still names it, faiss read the same file (no concurrent replace).
                if os.stat(path).st_ino == st.st_ino:
                    break
        else:
            raise RuntimeError(f"{path} kept changing while being loaded")
        if index.d != meta["dim"] or len(slot_ids) != meta["n_slots"]:
            raise ValueError(f"{path}: index file is inconsistent")
        expected = meta["n_slots"]
        if index.ntotal != expected:
            raise ValueError(f"{path}: faiss holds {index.ntotal} vectors, metadata says {expected}")
        config = VectorIndexConfig.from_dict(meta["config"])
        if config.kind == "hnsw":
            index.hnsw.efSearch = int(config.params.get("efSearch", HNSW_DEFAULTS["efSearch"]))
        elif config.kind in IVF_KINDS:
            index.nprobe = int(config.params.get("nprobe", 16))
        return cls(meta["dim"], config, index, slot_ids, live, mapped=mmap)


def _read_trailer(f, size: int, path: Path):
    if size < _FOOTER.size:
        raise ValueError(f"{path}: not a vector index file (too short)")
    f.seek(size - _FOOTER.size)
    magic, faiss_len, meta_len, ids_len, live_len, crc = _FOOTER.unpack(f.read(_FOOTER.size))
    if magic != _MAGIC or faiss_len + meta_len + ids_len + live_len + _FOOTER.size != size:
        raise ValueError(f"{path}: not a vector index file (bad footer)")
    f.seek(faiss_len)
    meta_b = f.read(meta_len)
    ids_b = f.read(ids_len)
    live_b = f.read(live_len)
    if zlib.crc32(live_b, zlib.crc32(ids_b, zlib.crc32(meta_b))) != crc:
        raise ValueError(f"{path}: index metadata is corrupt (checksum)")
    meta = json.loads(meta_b)
    if meta.get("format") != _FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported vector index format {meta.get('format')}")
    slot_ids = np.frombuffer(ids_b, dtype="<i8").astype(np.int64)
    live = np.unpackbits(np.frombuffer(live_b, dtype=np.uint8), bitorder="little")[: len(slot_ids)].astype(bool)
    return meta, slot_ids, live
