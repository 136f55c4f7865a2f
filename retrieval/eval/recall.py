"""Retrieval recall@k, compatible with clip_benchmark's ``zeroshot_retrieval``.

clip_benchmark scores every caption against every image (``scores = texts @ images.T``) and reports

* ``image_retrieval_recall@K`` -- text -> image: each caption is a query whose single positive is its image;
* ``text_retrieval_recall@K`` -- image -> text: each image is a query; it is a hit if ANY of its captions is in
  the top K.

For each query it takes ``torch.topk(scores, K)`` and counts a hit when at least one positive is among those K.
The metric is the fraction of queries that hit. A query with no positive counts as a miss (clip_benchmark
divides 0 by 0, and ``nan > 0`` is False), but stays in the denominator.

Tie rule (optimistic). ``torch.topk`` breaks ties arbitrarily, so clip_benchmark's number is not defined when a
positive ties with a negative at the K boundary. Here the rule is explicit: the rank of a candidate is
``1 + (number of candidates with a score STRICTLY greater)``, so tied candidates share the best rank, and a query
hits at K when its best-scoring positive has rank <= K. Equivalently: among all tie-breaking orders, the one that
puts positives first. With real float embeddings exact ties are rare and both agree; ties do happen with
duplicate images or captions in the corpus, and this rule counts those as hits. ``K`` larger than the number of
candidates means "all candidates" (torch.topk would raise instead).

Pure numpy: importing this module does not import torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

import numpy as np

__all__ = [
    "DEFAULT_KS",
    "recall_at_k",
    "recall_from_ranked",
    "clip_benchmark_metrics",
    "evaluate_embeddings",
    "RecallReport",
]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)

# Bound on the elements of one temporary [rows, n] block.
_BLOCK_ELEMENTS = 1 << 22


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = tuple(int(k) for k in ks)
    if not out or any(k < 1 for k in out):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {out!r}")
    return out


def _hit_counts(scores: np.ndarray, positives: np.ndarray, ks: tuple[int, ...]) -> np.ndarray:
    """Number of hitting queries for each k, under the optimistic tie rule (see module docstring)."""
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    low = np.iinfo(scores.dtype).min if np.issubdtype(scores.dtype, np.integer) else -np.inf
    has_pos = positives.any(axis=1)
    best_pos = np.where(positives, scores, low).max(axis=1, initial=low)
    n_better = (scores > best_pos[:, None]).sum(axis=1)
    return np.array([np.count_nonzero(has_pos & (n_better < k)) for k in ks], dtype=np.int64)


def recall_at_k(scores: np.ndarray, positives: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Recall@k from a dense score matrix ``[queries, candidates]`` and a same-shaped boolean positive mask.

    Returns ``{k: fraction of queries with a positive in the top k}`` for each k, in the order given. Ties follow
    the optimistic rule in the module docstring; a query without positives is a miss.
    """
    ks_t = _check_ks(ks)
    scores = np.asarray(scores)
    positives = np.asarray(positives, dtype=bool)
    if scores.ndim != 2 or scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must be 2-D and the same shape")
    n_queries, n_candidates = scores.shape
    if n_queries == 0:
        raise ValueError("no queries")
    rows = max(1, _BLOCK_ELEMENTS // max(n_candidates, 1))
    hits = np.zeros(len(ks_t), dtype=np.int64)
    for start in range(0, n_queries, rows):
        hits += _hit_counts(scores[start : start + rows], positives[start : start + rows], ks_t)
    return {k: float(h) / n_queries for k, h in zip(ks_t, hits)}


def recall_from_ranked(
    ranked_ids: Sequence[Sequence[Hashable]] | np.ndarray,
    positive_sets: Sequence[set],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[int, float]:
    """Recall@k from ranked result ids per query (best first), as a search path returns them.

    ``ranked_ids[i]`` holds query i's retrieved ids in rank order (a list, a 1-D array, or a row of a 2-D array;
    it may be shorter than k). Query i hits at k when any of its first k ids is in ``positive_sets[i]``. The
    order is taken as given, so ties were already broken by whoever ranked; FAISS's ``-1`` padding matches
    nothing as long as no positive set contains -1.
    """
    ks_t = _check_ks(ks)
    if len(ranked_ids) != len(positive_sets):
        raise ValueError(f"{len(ranked_ids)} ranked lists but {len(positive_sets)} positive sets")
    if len(positive_sets) == 0:
        raise ValueError("no queries")
    depth = max(ks_t)
    hits = np.zeros(len(ks_t), dtype=np.int64)
    ks_arr = np.array(ks_t)
    for row, pos in zip(ranked_ids, positive_sets):
        head = row[:depth]
        if isinstance(head, np.ndarray):
            head = head.tolist()
        first = next((i for i, x in enumerate(head) if x in pos), None)
        if first is not None:
            hits += ks_arr > first
    return {k: float(h) / len(positive_sets) for k, h in zip(ks_t, hits)}


def clip_benchmark_metrics(t2i: dict[int, float], i2t: dict[int, float]) -> dict[str, float]:
    """Name recalls the clip_benchmark way: ``image_retrieval_recall@K`` is text->image (``t2i``),
    ``text_retrieval_recall@K`` is image->text (``i2t``); interleaved per k as clip_benchmark does."""
    out: dict[str, float] = {}
    for k in dict.fromkeys([*t2i, *i2t]):
        if k in t2i:
            out[f"image_retrieval_recall@{k}"] = float(t2i[k])
        if k in i2t:
            out[f"text_retrieval_recall@{k}"] = float(i2t[k])
    return out


@dataclass
class RecallReport:
    """Recall metrics (clip_benchmark key names) plus the size of the evaluation set."""

    metrics: dict[str, float]
    n_images: int
    n_captions: int

    def to_json(self) -> str:
        """One flat JSON object: the metric keys, then ``n_images`` and ``n_captions``."""
        return json.dumps({**self.metrics, "n_images": self.n_images, "n_captions": self.n_captions})


def evaluate_embeddings(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_image_index: Sequence[int] | np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> RecallReport:
    """Both directions from embeddings, exactly as clip_benchmark pairs them.

    ``image_emb`` is ``[n_images, d]``, ``text_emb`` is ``[n_captions, d]`` (normalise them first for cosine),
    and ``text_image_index[j]`` is the row of caption j's image. Scores are dot products, computed in blocks so
    the full ``[n_captions, n_images]`` matrix is never held at once.
    """
    ks_t = _check_ks(ks)
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    idx = np.asarray(text_image_index, dtype=np.int64)
    n_images, n_captions = len(image_emb), len(text_emb)
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding shapes {image_emb.shape} and {text_emb.shape} do not match")
    if idx.shape != (n_captions,) or (n_captions and (idx.min() < 0 or idx.max() >= n_images)):
        raise ValueError("text_image_index must give, for every caption, a valid image row")
    if n_images == 0 or n_captions == 0:
        raise ValueError("need at least one image and one caption")

    t2i_hits = np.zeros(len(ks_t), dtype=np.int64)
    rows = max(1, _BLOCK_ELEMENTS // n_images)
    for s in range(0, n_captions, rows):
        block = text_emb[s : s + rows] @ image_emb.T
        pos = np.zeros(block.shape, dtype=bool)
        pos[np.arange(len(block)), idx[s : s + rows]] = True
        t2i_hits += _hit_counts(block, pos, ks_t)

    i2t_hits = np.zeros(len(ks_t), dtype=np.int64)
    rows = max(1, _BLOCK_ELEMENTS // n_captions)
    for s in range(0, n_images, rows):
        block = image_emb[s : s + rows] @ text_emb.T
        pos = idx[None, :] == np.arange(s, s + len(block))[:, None]
        i2t_hits += _hit_counts(block, pos, ks_t)

    t2i = {k: float(h) / n_captions for k, h in zip(ks_t, t2i_hits)}
    i2t = {k: float(h) / n_images for k, h in zip(ks_t, i2t_hits)}
    return RecallReport(clip_benchmark_metrics(t2i, i2t), n_images=n_images, n_captions=n_captions)
