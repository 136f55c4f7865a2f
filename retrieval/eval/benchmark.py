"""Recall@k of an index, measured through the engine's own query path, with clip_benchmark's metric names.

    from retrieval.eval.benchmark import load_pairs, evaluate_index
    from retrieval.query.searcher import Searcher

    pairs = load_pairs("dataset_flickr30k.json", images_dir="flickr30k-images", split="test")
    with Searcher.open("f30k.idx") as s:
        print(evaluate_index(s, pairs, ks=(1, 5, 10), exact=True).to_dict())

What is measured, and how it maps onto clip_benchmark's ``zeroshot_retrieval``:

* ``image_retrieval_recall@K`` (text -> image): every caption of FILE is a query; its one positive is its image.
  The query vector is made the way :meth:`Searcher.embed_text` makes it (the Searcher's text encoder -- the
  index's torch-free export when present, else the torch encoder -- then the index's query fusion if one is
  trained), in batches; it is searched in the index's own FAISS file of the current
  generation through the same ``VectorIndex.search(..., allowed_ids=...)`` call that ``Searcher.search_vector``
  makes, with the candidates restricted (FAISS id selector) to the images FILE names.
* ``text_retrieval_recall@K`` (image -> text): every image of FILE is a query; it hits when any of its captions is
  in the top K. Candidates are restricted to the caption rows of FILE's images whose text FILE gives for that
  image (a sidecar caption the corpus does not name is not a candidate). The query vector is the image's
  **stored raw embedding** (``embeddings`` table) passed through the query fusion, exactly what
  :meth:`Searcher.embed_image` computes from the file: the write path stores the output of the same decode +
  preprocess + encoder (index_data/decode.py makes its tensors equal those ``encode_images`` builds). It skips
  decoding thousands of JPEGs a second time, and keeps this number a measure of the index, not of the decoder.
* The SQLite join and the de-duplication of identical content that :meth:`Searcher.search` does for people are
  not applied: the result ids are scored directly, so a dataset holding the same picture under two names (or the
  same caption on two images) counts exactly as clip_benchmark counts it, not hidden by de-duplication.

Ranking rule: the one of :mod:`retrieval.eval.recall` (optimistic ties): a query's rank is 1 + the number of
retrieved candidates scoring strictly more than its best positive, so an exact duplicate of the positive does not
push it down. The store keeps one caption row per (image, text); when FILE repeats a caption for the same image,
that row counts with its multiplicity, as clip_benchmark's candidate list would. With these two rules the numbers
over an exact (flat) index are the numbers :func:`~retrieval.eval.recall.evaluate_embeddings` gives on the same
vectors. Ties are resolved within the ``max(K) + TIE_MARGIN`` results fetched per query.

Missing pieces count as misses and stay in the denominators: an image of FILE that is not in the index (it failed
to decode, or the index was built from something else) misses as an image query, and its captions miss as text
queries. When the index lacks caption rows for FILE's captions of indexed images (it was built from the photos
alone, or from another corpus), image -> text is measured the way clip_benchmark measures it instead: over an
exact in-memory set of FILE's captions of indexed images, each vector the stored text embedding when the index has
one, else encoded now with the index's model, through the fusion's caption transform; the index is not changed,
and ``captions_encoded`` says how many were encoded. Both missing counts are reported.

``exact=True`` repeats the measurement over a flat (exact) copy of the same vectors, rebuilt from the stored raw
embeddings with the fusion applied exactly as the write path applies it (``Index.image_vectors_for`` /
``caption_vectors_for``), restricted to the candidates. The result carries it as a nested ``exact`` object with the
same key names; for a flat index both agree, for HNSW / IVF-PQ the difference is the ANN loss. Note that the vector
layer answers a filtered HNSW search exactly while the allowed set is small (``FLAT_MAX_FLOATS``), so ANN loss only
shows on datasets with more than ~50k candidates at dim 512.

``retrieval`` never imports ``index_data``: :func:`run_recall_benchmark` builds an index through a ``build``
callable that the caller (cli.py, benchmarks/recall.py) passes in, normally ``index_data.pipeline.run_index``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from retrieval.datasets import read_caption_pairs
from retrieval.errors import RetrievalError
from retrieval.eval.query_vectors import TEXT_BATCH, query_image_vectors, query_text_vectors
from retrieval.eval.recall import DEFAULT_KS, clip_benchmark_metrics

__all__ = [
    "RecallPairs",
    "IndexRecall",
    "load_pairs",
    "parse_ks",
    "query_text_vectors",
    "query_image_vectors",
    "evaluate_index",
]

TIE_MARGIN = 16  # extra results fetched per query so that ties at the K boundary are seen
QUERY_BATCH = 1024  # queries per FAISS call


@dataclass
class RecallPairs:
    """FILE's (image, caption) pairs: unique images (absolute paths, first-seen order), one entry per caption."""

    images: list[str]
    captions: list[str]
    caption_image: np.ndarray  # [n_captions] row in `images` of each caption's image
    source: str = ""

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_captions(self) -> int:
        return len(self.captions)


@dataclass
class IndexRecall:
    """What :func:`evaluate_index` measured. ``metrics`` uses clip_benchmark's key names."""

    metrics: dict[str, float]
    n_images: int
    n_captions: int
    ks: tuple[int, ...]
    missing_images: int = 0
    missing_captions: int = 0
    index_type: str = ""
    model: str = ""
    fusion: str | None = None
    exact: dict[str, float] | None = None
    eval_seconds: float = 0.0
    index: str | None = None  # the index directory, or None when it was a temporary one
    built: bool = False
    index_seconds: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """One flat JSON-able object: the metric keys first, then the context; ``exact`` nested when measured."""
        d: dict = dict(self.metrics)
        d.update(
            n_images=self.n_images,
            n_captions=self.n_captions,
            k=list(self.ks),
            missing_images=self.missing_images,
            missing_captions=self.missing_captions,
            index_type=self.index_type,
            model=self.model,
            fusion=self.fusion,
            index=self.index,
            built=self.built,
            index_seconds=None if self.index_seconds is None else round(self.index_seconds, 3),
            eval_seconds=round(self.eval_seconds, 3),
        )
        if self.exact is not None:
            d["exact"] = dict(self.exact)
        d.update(self.extra)
        return d


# --------------------------------------------------------------------------------------------------------------
# inputs


def parse_ks(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,5,10"`` -> ``(1, 5, 10)``; raises RetrievalError on anything that is not positive integers."""
    if not isinstance(text, str):
        values = list(text)
    else:
        try:
            values = [int(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise RetrievalError(f"--k must be a comma-separated list of positive integers, got {text!r}") from None
    if not values or any(int(v) < 1 for v in values):
        raise RetrievalError(f"--k must be a comma-separated list of positive integers, got {text!r}")
    return tuple(dict.fromkeys(int(v) for v in values))


def load_pairs(
    captions_file: str | os.PathLike, images_dir: str | None = None, fmt: str = "auto", split: str | None = None
) -> RecallPairs:
    """Read a caption corpus (any format of :func:`~retrieval.datasets.read_captions`) into evaluation pairs.

    Image references resolve exactly as the indexing pipeline resolves them (``resolve_image_path`` then
    ``abspath``), so they match the paths stored in the index.
    """
    rows: dict[str, int] = {}
    captions: list[str] = []
    owner: list[int] = []
    for path, caption in read_caption_pairs(captions_file, fmt, split, images_dir):
        owner.append(rows.setdefault(path, len(rows)))
        captions.append(caption)
    return RecallPairs(list(rows), captions, np.asarray(owner, dtype=np.int64), source=os.fspath(captions_file))


# --------------------------------------------------------------------------------------------------------------
# query vectors: the Searcher's own recipe, batched


# --------------------------------------------------------------------------------------------------------------
# scoring


def _search(vectors, queries: np.ndarray, depth: int, allowed: np.ndarray | None):
    scores = np.empty((len(queries), depth), np.float32)
    ids = np.empty((len(queries), depth), np.int64)
    for s in range(0, len(queries), QUERY_BATCH):
        sc, ix = vectors.search(queries[s : s + QUERY_BATCH], depth, allowed_ids=allowed)
        scores[s : s + QUERY_BATCH], ids[s : s + QUERY_BATCH] = sc, ix
    return scores, ids


def _hit_counts(
    scores: np.ndarray,
    ids: np.ndarray,
    positives: Sequence[frozenset],
    ks: tuple[int, ...],
    weight: dict[int, int] | None = None,
) -> np.ndarray:
    """Hits per k over ranked (scores, ids) rows: rank = 1 + (sum of the weights of returned candidates scoring
    strictly more than the best returned positive); a query whose positives were not returned misses."""
    ks_arr = np.asarray(ks)
    hits = np.zeros(len(ks), dtype=np.int64)
    for row_s, row_i, pos in zip(scores, ids, positives):
        if not pos:
            continue
        is_pos = np.fromiter((int(i) in pos for i in row_i), dtype=bool, count=len(row_i))
        if not is_pos.any():
            continue
        best = row_s[is_pos].max()
        better = (row_s > best) & (row_i >= 0)
        if weight is None:
            rank = 1 + int(better.sum())
        else:
            rank = 1 + sum(weight.get(int(i), 1) for i in row_i[better])
        hits += ks_arr >= rank
    return hits


def _flat_copy(dim: int, ids: np.ndarray, vecs: np.ndarray):
    from retrieval.store.vector_kinds import VectorIndexConfig
    from retrieval.store.vectors import VectorIndex

    return VectorIndex.build(dim, np.asarray(ids, np.int64), np.asarray(vecs, np.float32), VectorIndexConfig("flat"))


def evaluate_index(searcher, pairs: RecallPairs, ks: Sequence[int] = DEFAULT_KS, exact: bool = False) -> IndexRecall:
    """Recall@k of the index behind ``searcher`` on ``pairs`` (see the module docstring for every rule)."""
    from retrieval.store.rows import text_hash

    ks_t = parse_ks(ks)
    if pairs.n_images == 0 or pairs.n_captions == 0:
        raise RetrievalError("the caption file gives no (image, caption) pairs to evaluate")
    t0 = time.perf_counter()
    index = searcher.index
    store = index.store
    depth_want = max(ks_t) + TIE_MARGIN

    # FILE's images -> index rows
    rows = [store.image_by_path(p) for p in pairs.images]
    present = [i for i, r in enumerate(rows) if r is not None]
    image_ids = np.array([rows[i].id for i in present], dtype=np.int64)
    # FILE's captions -> caption rows of their image (one row per (image, text); FILE may repeat a pair)
    by_image = store.captions_for_images(image_ids.tolist()) if len(image_ids) else {}
    caption_row: dict[tuple[int, str], int] = {}
    for image_id, caps in by_image.items():
        for cid, text in caps:
            caption_row.setdefault((image_id, text), cid)
    multiplicity: Counter = Counter()
    positives_i2t: list[set] = [set() for _ in pairs.images]
    missing_captions = 0
    unindexed = 0  # captions of indexed images that the index holds no caption row for
    for text, img in zip(pairs.captions, pairs.caption_image):
        row = rows[img]
        cid = caption_row.get((row.id, text)) if row is not None else None
        if cid is None:
            missing_captions += 1
            unindexed += row is not None
            continue
        multiplicity[cid] += 1
        positives_i2t[img].add(cid)
    caption_ids = np.array(sorted(multiplicity), dtype=np.int64)
    file_captions = None
    if unindexed:
        # the index lacks FILE's captions (built from photos alone, or from another corpus): image -> text is
        # measured over FILE's own captions, encoded here as clip_benchmark does; the index is not changed
        file_captions = _file_caption_candidates(searcher, pairs, rows)
        missing_captions -= unindexed

    # text -> image: every caption of FILE is a query
    q_text = query_text_vectors(searcher, pairs.captions)
    positives_t2i = [
        frozenset((rows[img].id,)) if rows[img] is not None else frozenset() for img in pairs.caption_image
    ]
    # image -> text: every present image of FILE is a query (absent ones are misses)
    q_image = query_image_vectors(searcher, [rows[i].hash for i in present])
    positives_i2t_present = [frozenset(positives_i2t[i]) for i in present]
    weight = {c: n for c, n in multiplicity.items() if n > 1} or None
    if file_captions is not None:
        cand = file_captions[1]
        caption_ids = np.arange(len(cand), dtype=np.int64)
        owner = {}
        for j, c in enumerate(cand):
            owner.setdefault(int(pairs.caption_image[c]), set()).add(j)
        positives_i2t_present = [frozenset(owner.get(i, ())) for i in present]
        weight = None

    def measure(img_vectors, cap_vectors, allowed_img, allowed_cap):
        t2i_hits = np.zeros(len(ks_t), np.int64)
        i2t_hits = np.zeros(len(ks_t), np.int64)
        if img_vectors is not None and len(image_ids):
            depth = min(depth_want, len(image_ids))
            sc, ix = _search(img_vectors, q_text, depth, allowed_img)
            t2i_hits = _hit_counts(sc, ix, positives_t2i, ks_t)
        if cap_vectors is not None and len(caption_ids) and len(present):
            depth = min(depth_want, len(caption_ids))
            sc, ix = _search(cap_vectors, q_image, depth, allowed_cap)
            i2t_hits = _hit_counts(sc, ix, positives_i2t_present, ks_t, weight)
        t2i = {k: float(h) / pairs.n_captions for k, h in zip(ks_t, t2i_hits)}
        i2t = {k: float(h) / pairs.n_images for k, h in zip(ks_t, i2t_hits)}
        return clip_benchmark_metrics(t2i, i2t)

    if file_captions is not None:
        metrics = measure(index.vectors("images"), file_captions[0], image_ids, None)
    else:
        metrics = measure(index.vectors("images"), index.vectors("captions"), image_ids, caption_ids)
    exact_metrics = None
    if exact:
        img_flat = cap_flat = None
        if len(image_ids):
            img_flat = _flat_copy(
                index.dim, image_ids, index.image_vectors_for([(rows[i].id, rows[i].hash) for i in present])
            )
        if file_captions is not None:
            cap_flat = file_captions[0]  # already exact
        elif len(caption_ids):
            texts = store.captions_by_ids(caption_ids.tolist())
            cap_rows = [(int(c), text_hash(texts[int(c)][1])) for c in caption_ids]
            cap_flat = _flat_copy(index.dim, caption_ids, index.caption_vectors_for(cap_rows))
        exact_metrics = measure(img_flat, cap_flat, None, None)

    info = index.info()
    return IndexRecall(
        metrics=metrics,
        n_images=pairs.n_images,
        n_captions=pairs.n_captions,
        ks=ks_t,
        missing_images=pairs.n_images - len(present),
        missing_captions=missing_captions,
        index_type=info.index_type,
        model=info.model,
        fusion=info.fusion,
        exact=exact_metrics,
        eval_seconds=time.perf_counter() - t0,
        index=str(index.root),
        extra={"captions_encoded": unindexed} if file_captions is not None else {},
    )


def _file_caption_candidates(searcher, pairs: RecallPairs, rows):
    """(flat VectorIndex over FILE's captions of indexed images, their positions in FILE): each caption's
    stored text embedding when the index has one, else encoded now with the index's model (the encoder the
    write path uses), then the fusion's caption transform, as the write path makes caption vectors."""
    from retrieval.store.rows import text_hash

    index = searcher.index
    store = index.store
    cand = [j for j, img in enumerate(pairs.caption_image) if rows[img] is not None]
    uniq = list(dict.fromkeys(pairs.captions[j] for j in cand))
    hashes = [text_hash(t) for t in uniq]
    have = store.has_embeddings("text", hashes)
    raw = np.empty((len(uniq), index.dim), np.float32)
    stored = [i for i, h in enumerate(hashes) if h in have]
    if stored:
        raw[stored] = store.get_embeddings("text", [hashes[i] for i in stored], index.dim)
    todo = [i for i, h in enumerate(hashes) if h not in have]
    for s in range(0, len(todo), TEXT_BATCH):
        part = todo[s : s + TEXT_BATCH]
        raw[part] = searcher.encoder.encode_texts([uniq[i] for i in part])
    fusion = index.fusion()
    if fusion is not None and len(raw):
        raw = np.asarray(fusion.caption_vectors(raw), dtype=np.float32)
    where = {t: i for i, t in enumerate(uniq)}
    vecs = raw[[where[pairs.captions[j]] for j in cand]] if cand else raw[:0]
    return _flat_copy(index.dim, np.arange(len(cand), dtype=np.int64), vecs), cand


# --------------------------------------------------------------------------------------------------------------
# the whole command


BuildFn = Callable[[Path, dict], object]
