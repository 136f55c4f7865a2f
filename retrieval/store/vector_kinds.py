"""The FAISS index kinds, their parameters, and auto's choice of kind for a collection's size (docs/vectors.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

KINDS = ("flat", "hnsw", "ivfflat", "ivfsq", "ivfpq")


IVF_KINDS = ("ivfflat", "ivfsq", "ivfpq")


# Flat (exact) while one query scans at most this many floats: 50k x 512 = 25.6M floats (100 MB), a few ms
# per query on one core (docs/vectors.md).
FLAT_MAX_FLOATS = 50_000 * 512


# Past this many vectors auto picks IVF-PQ: 5M x 512 raw float32 alone is ~10 GB.
IVFPQ_MIN_N = 5_000_000


# HNSW defaults: recall@10 ~0.98 at 100k x 512; efConstruction 80 keeps a 1M build under ~20 min on two cores
# (docs/vectors.md).
HNSW_DEFAULTS = {"M": 32, "efConstruction": 80, "efSearch": 256}


# Above this tombstone fraction an HNSW index should be compacted (rebuilt from its live vectors).
REBUILD_FRACTION = 0.20


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

    ~4*sqrt(n) lists (twice IVF-Flat's), probing ~4*sqrt(nlist) of them as a power of two and at least 256
    (1024 lists -> 256, 4096 -> 256). Sentence queries lie off the image manifold (the modality gap;
    random-init towers even more so), so they need many probes; finer lists make each probe cheaper: at 1M,
    4096 lists probed 256 times read half the bytes of 2048 lists probed 256 times, at a higher recall@10
    (0.991 against 0.987; RESULTS_onnx.md). Training 4096 lists costs ~1 min more at 1M."""
    nlist = _pow2_nlist(n, 4)
    nprobe = max(256, int(2 ** round(math.log2(4 * math.sqrt(nlist)))))
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
