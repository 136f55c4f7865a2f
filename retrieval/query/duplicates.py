"""Near-duplicate photos: bursts, resized copies, light edits. Groups come from a FAISS range search over the
images' raw embeddings (what the encoder saw, not the caption fusion), one query per distinct content.

- Up to EXACT_MAX distinct images every pair is compared; above, an IVF range search (FAISS k-means lists,
  DUP_NPROBE lists probed per photo). Near-duplicates sit far closer to each other than to anything else, so
  they share a list or a neighbouring one (benchmarks/duplicates.py measures the speed, and the pairs found
  against exact search).
- Grouping is leader-based, not transitive: photos are taken best first (largest pixel count, then newest
  file), and each one not yet grouped gathers the ungrouped photos at least `threshold` similar to it. So
  every member is within the threshold of the group's first member, and a long burst cannot chain very
  different shots into one group. Byte-identical files are one content and always share a group.
- A member's score is its cosine similarity to the first member (1.0 for the first and its identical copies).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from retrieval.errors import RetrievalError

DEFAULT_THRESHOLD = 0.95
EXACT_MAX = 8_000  # distinct images compared exactly, pair by pair; beyond, IVF
DUP_NPROBE = 4
QUERY_BATCH = 4096
MIN_THRESHOLD = 0.5  # below this a "duplicate" is just a similar photo, and the pair count explodes


@dataclass(frozen=True)
class DuplicateMember:
    path: str
    id: int
    score: float
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class DuplicateGroup:
    members: list[DuplicateMember] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"members": [asdict(m) for m in self.members]}


def neighbours(
    vecs: np.ndarray, threshold: float, nprobe: int = DUP_NPROBE, exact_max: int = EXACT_MAX, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of `vecs` (unit vectors), the other rows with inner product >= threshold, as CSR arrays
    (lims [n+1], ids, scores), scores exact. Symmetric: a pair found from either side is listed for both.

    Up to `exact_max` rows every pair is compared. Above, an IVF range search: FAISS k-means cuts the vectors into
    lists, and each vector is compared with the members of the `nprobe` lists whose centroids are nearest to it,
    the candidates faiss's IndexIVFFlat.range_search would score. The comparisons are done list by list as
    blocked matrix products, several times faster than that per-query scan (benchmarks/RESULTS_duplicates.md)."""
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    n, dim = vecs.shape
    if n < 2:
        return np.zeros(n + 1, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    thr = np.float32(threshold) - np.float32(1e-6)
    rows, cols = [], []
    if n <= exact_max:
        everyone = np.arange(n, dtype=np.int64)
        for start in range(0, n, QUERY_BATCH):
            _collect(vecs, np.arange(start, min(n, start + QUERY_BATCH), dtype=np.int64), everyone, thr, rows, cols)
    else:
        import faiss

        # ~1.6 sqrt(n) lists (512 at 100k), a power of two, with the 39+ training points each faiss asks for
        nlist = 1 << max(2, min(int(round(math.log2(1.6 * math.sqrt(n)))), int(math.log2(max(n // 40, 4)))))
        km = faiss.Kmeans(dim, nlist, niter=8, spherical=True, seed=seed, verbose=False)
        km.train(vecs[np.random.default_rng(seed).choice(n, min(n, 40 * nlist), replace=False)])
        _, probe = km.index.search(vecs, min(nprobe, nlist))  # each vector's nearest lists, best first
        home = probe[:, 0]
        members = [np.flatnonzero(home == lst) for lst in range(nlist)]
        order = np.argsort(probe.ravel(), kind="stable")  # queries grouped by the lists they probe
        bounds = np.searchsorted(probe.ravel()[order], np.arange(nlist + 1))
        with _one_blas_thread():  # a few hundred rows per product: threads cost more than they give (10x here)
            for lst in range(nlist):
                queries = (order[bounds[lst] : bounds[lst + 1]] // probe.shape[1]).astype(np.int64)
                for start in range(0, len(queries), QUERY_BATCH):
                    _collect(vecs, queries[start : start + QUERY_BATCH], members[lst], thr, rows, cols)
    r = np.concatenate(rows) if rows else np.empty(0, np.int64)
    c = np.concatenate(cols) if cols else np.empty(0, np.int64)
    pairs = np.unique(np.concatenate([np.stack([r, c], 1), np.stack([c, r], 1)]), axis=0)
    scores = np.einsum("ij,ij->i", vecs[pairs[:, 0]], vecs[pairs[:, 1]]).astype(np.float32)
    ok = scores >= thr
    pairs, scores = pairs[ok], scores[ok]
    lims = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(pairs[:, 0], minlength=n), out=lims[1:])
    return lims, pairs[:, 1].copy(), scores


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # slower, same results
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _collect(vecs, queries: np.ndarray, candidates: np.ndarray, thr, rows: list, cols: list) -> None:
    """Append the (query, candidate) pairs, query != candidate, whose inner product is at least thr."""
    if len(queries) == 0 or len(candidates) == 0:
        return
    sims = vecs[queries] @ vecs[candidates].T
    qi, ci = np.nonzero(sims >= thr)
    q, c = queries[qi], candidates[ci]
    keep = q != c
    rows.append(q[keep])
    cols.append(c[keep])


def leader_groups(
    order: np.ndarray, lims: np.ndarray, ids: np.ndarray, scores: np.ndarray
) -> list[list[tuple[int, float]]]:
    """Leader clustering over nodes taken in `order` (best first): [[(leader, 1.0), (node, score), ...], ...],
    only groups of two or more."""
    taken = np.zeros(len(lims) - 1, dtype=bool)
    groups = []
    for node in order:
        if taken[node]:
            continue
        taken[node] = True
        lo, hi = lims[node], lims[node + 1]
        if lo == hi:
            continue
        nb, sc = ids[lo:hi], scores[lo:hi]
        free = ~taken[nb]
        if not free.any():
            continue
        nb, sc = nb[free], sc[free]
        taken[nb] = True
        groups.append([(int(node), 1.0)] + [(int(j), float(s)) for j, s in zip(nb, sc)])
    return groups


def find_duplicates(index, threshold: float = DEFAULT_THRESHOLD, exact_max: int = EXACT_MAX) -> list[DuplicateGroup]:
    """Near-duplicate groups of an open retrieval.store.index.Index, largest groups first."""
    if not (MIN_THRESHOLD <= threshold <= 1.0) or math.isnan(threshold):
        raise RetrievalError(f"--threshold must be between {MIN_THRESHOLD} and 1, got {threshold:g}")
    from retrieval.names import display_text

    store = index.store
    rows = list(store.db.execute("SELECT id, path_raw, hash, width, height, mtime_ns FROM images ORDER BY id"))
    if not rows:
        return []
    hashes = list(dict.fromkeys(r[2] for r in rows))
    node_of = {h: i for i, h in enumerate(hashes)}
    dim = index.dim
    vecs = np.zeros((len(hashes), dim), np.float32)  # a content without a stored vector stays 0: no pairs
    for key, blob in store.db.execute("SELECT key, vector FROM embeddings WHERE kind = 'image'"):
        node = node_of.get(key)
        if node is not None and len(blob) == 4 * dim:
            vecs[node] = np.frombuffer(blob, dtype=np.float32)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs = np.divide(vecs, norms, out=np.zeros_like(vecs), where=norms > 0)

    # quality of each image and of each node (its best image): pixels, then newest file
    def quality(r):
        return ((r[3] or 0) * (r[4] or 0), r[5] or 0)

    best: dict[int, tuple] = {}
    members_of: dict[int, list] = {}
    for r in rows:
        node = node_of[r[2]]
        members_of.setdefault(node, []).append(r)
        if node not in best or quality(r) > best[node]:
            best[node] = quality(r)
    order = np.array(sorted(range(len(hashes)), key=lambda n: best[n], reverse=True), dtype=np.int64)
    lims, ids, scores = neighbours(vecs, threshold, exact_max=exact_max)
    groups = leader_groups(order, lims, ids, scores)
    # identical copies with no near-duplicate of another content are a group too
    grouped = {n for g in groups for n, _ in g}
    groups += [[(n, 1.0)] for n, m in members_of.items() if len(m) > 1 and n not in grouped]

    out = []
    for g in groups:
        members = []
        for node, score in g:
            for r in members_of[node]:
                members.append((quality(r), score, r))
        members.sort(key=lambda m: (m[0], m[1]), reverse=True)
        out.append(
            DuplicateGroup(
                [
                    DuplicateMember(display_text(bytes(r[1])), int(r[0]), round(float(s), 6), r[3], r[4])
                    for _, s, r in members
                ]
            )
        )
    out.sort(key=lambda g: (-len(g.members), g.members[0].path))
    return out
