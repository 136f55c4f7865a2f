"""Nearest neighbours in SQL: a collection's fused vectors (pgvector) behind the VectorIndex search interface.

HNSW (inner product) answers unfiltered queries. pgvector 0.6 filters HNSW results after the graph walk,
so a filter could return fewer than k rows; filters are therefore answered like this (docs/postgres.md):
- few allowed rows (at most FILTER_EXACT_MAX): an exact scan of just those rows (a bitmap scan of the
  primary key, then a top-k sort), which is exact and cheap;
- many: HNSW with ef_search raised in proportion to how selective the filter is, and an exact scan of the
  allowed rows whenever that still comes back short of k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from retrieval.store.pg.schema import VECTOR_TABLES
from retrieval.store.vector_kinds import VectorIndexConfig

EF_SEARCH_DEFAULT = 700  # recall@10 >= 0.98 at 100k on text-like queries, with margin (benchmarks/RESULTS_postgres.md)
EF_SEARCH_MAX = 1000  # pgvector's limit
FILTER_EXACT_MAX = 20_000
KINDS = ("auto", "hnsw", "flat")


def config_for(requested: str | None) -> VectorIndexConfig:
    """`flat`: every query an exact scan; anything else: HNSW."""
    from retrieval.store.pg.schema import HNSW_EF_CONSTRUCTION, HNSW_M

    if requested == "flat":
        return VectorIndexConfig("flat", {})
    params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": EF_SEARCH_DEFAULT}
    return VectorIndexConfig("hnsw", params)


@dataclass
class SearchPlan:
    """How the last query was answered, for `search --json` and the benchmarks."""

    method: str  # "hnsw", "hnsw+ef" (ef_search raised for a filter) or "exact"
    ef_search: int | None = None
    fell_back: bool = False  # HNSW came back short of k and the exact scan answered


class PgVectorIndex:
    def __init__(self, pg, kind: str, dim: int, ntotal: int, config: VectorIndexConfig):
        self._pg = pg
        self.table = VECTOR_TABLES[kind]
        self.dim = int(dim)
        self.ntotal = int(ntotal)
        self.config = config
        self.last_plan: SearchPlan | None = None

    @property
    def kind(self) -> str:
        return self.config.kind

    def __len__(self) -> int:
        return self.ntotal

    @property
    def tombstone_fraction(self) -> float:
        return 0.0

    def ids(self) -> np.ndarray:
        rows = self._pg.execute(f"SELECT id FROM {self.table} ORDER BY id").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def search(self, queries: np.ndarray, k: int, allowed_ids=None, probes: int | None = None):
        """Top-k by inner product: (scores [q,k] float32, ids [q,k] int64), best first, padded with -inf / -1.
        With allowed_ids, only those are candidates, and k come back whenever k allowed rows have vectors.
        probes: HNSW ef_search for this call."""
        if probes is not None and int(probes) < 1:
            raise ValueError(f"probes must be at least 1, got {probes}")
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        k = int(k)
        scores = np.full((len(q), max(k, 0)), -np.inf, dtype=np.float32)
        out = np.full((len(q), max(k, 0)), -1, dtype=np.int64)
        if k <= 0 or len(q) == 0 or self.ntotal == 0:
            return scores, out
        allowed = None if allowed_ids is None else sorted({int(i) for i in np.asarray(allowed_ids).reshape(-1)})
        for r, vec in enumerate(q):
            rows = self._one(vec, k, allowed, probes)
            for c, (i, s) in enumerate(rows[:k]):
                out[r, c], scores[r, c] = i, s
        return scores, out

    def _one(self, vec: np.ndarray, k: int, allowed: list[int] | None, probes: int | None) -> list:
        exact = self.config.kind == "flat" or k > EF_SEARCH_MAX
        if allowed is not None and (len(allowed) <= FILTER_EXACT_MAX or len(allowed) <= k):
            exact = True
        if exact:
            self.last_plan = SearchPlan("exact")
            return self._query(vec, k, allowed, None)
        ef = int(probes) if probes is not None else int(self.config.params.get("efSearch", EF_SEARCH_DEFAULT))
        method = "hnsw"
        if allowed is not None:  # post-filtered: walk enough of the graph to expect k allowed rows
            ef = max(ef, math.ceil(2 * k * self.ntotal / max(1, len(allowed))))
            method = "hnsw+ef"
        ef = min(EF_SEARCH_MAX, max(ef, k))
        rows = self._query(vec, k, allowed, ef)
        want = min(k, self.ntotal if allowed is None else len(allowed))
        self.last_plan = SearchPlan(method, ef)
        if len(rows) < want:  # the graph walk met too few allowed (or live) rows
            self.last_plan = SearchPlan(method, ef, fell_back=True)
            rows = self._query(vec, k, allowed, None)
        return rows

    def _query(self, vec: np.ndarray, k: int, allowed: list[int] | None, ef: int | None) -> list:
        where, params = "", [vec]
        if allowed is not None:
            where = " WHERE id = ANY(%s)"
            params.append(allowed)
        # Exact search orders by an expression the HNSW index cannot serve (`+ 0`), so the planner scans the
        # rows (or the primary key, for a filter). A planner setting would not do: psycopg prepares a statement
        # that recurs, and PostgreSQL keeps a prepared plan when settings change.
        if ef is None:
            params = [*params, vec]  # select, filter, order
            sql = f"SELECT id, embedding <#> %s AS d FROM {self.table}{where} ORDER BY (embedding <#> %s) + 0"
        else:
            sql = f"SELECT id, embedding <#> %s AS d FROM {self.table}{where} ORDER BY d"
        sql += f" LIMIT {int(k)}"
        with self._pg.transaction():
            if ef is not None:
                self._pg.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(ef)])
            rows = self._pg.execute(sql, params).fetchall()
        return [(int(i), -float(d)) for i, d in rows]
