"""Filtered search over a VectorIndex's faiss index: which strategy a filter gets, per index kind.

A mixin of retrieval.store.vectors.VectorIndex; it reads the index's slots, live bits and config."""

from __future__ import annotations

import math

import faiss
import numpy as np

from retrieval.store.vector_kinds import FLAT_MAX_FLOATS, HNSW_DEFAULTS


def _bitmap_selector(mask: np.ndarray):
    """IDSelectorBitmap over positions; returns (selector, bits) and the caller must keep bits alive."""
    bits = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)), bits


class FilteredSearch:
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
