"""Query vectors for recall, batched but made exactly as the Searcher makes them for one query."""

from __future__ import annotations

from typing import Sequence

import numpy as np

TEXT_BATCH = 256  # texts per encoder call


def _searcher_text_encoder(searcher):
    """The text encoder ``Searcher.embed_text`` uses: the index's encoder (its ONNX export on the CPU, else torch)."""
    return searcher.encoder


def query_text_vectors(searcher, texts: Sequence[str]) -> np.ndarray:
    """``Searcher.embed_text`` for many texts at once: the Searcher's text encoder, then the index's query fusion
    (if any). Each distinct text is encoded once."""
    texts = list(texts)
    dim = searcher.index.dim
    if not texts:
        return np.zeros((0, dim), np.float32)
    uniq = list(dict.fromkeys(texts))
    batched = getattr(searcher, "embed_texts", None)  # a batched Searcher API, should one be added
    if batched is not None:
        vecs = np.asarray(batched(uniq), dtype=np.float32)
    else:
        enc = _searcher_text_encoder(searcher)
        vecs = np.concatenate([enc.encode_texts(uniq[i : i + TEXT_BATCH]) for i in range(0, len(uniq), TEXT_BATCH)])
        fusion = searcher.index.fusion()
        if fusion is not None:
            vecs = np.asarray(fusion.query_text(vecs), dtype=np.float32)
    where = {t: i for i, t in enumerate(uniq)}
    return np.ascontiguousarray(vecs[[where[t] for t in texts]], dtype=np.float32)


def query_image_vectors(searcher, hashes: Sequence[str]) -> np.ndarray:
    """``Searcher.embed_image`` for indexed images, from their stored raw embeddings (no re-decoding): the raw
    image embedding, then the index's query fusion (if any)."""
    index = searcher.index
    raw = index.store.get_embeddings("image", list(hashes), index.dim)
    fusion = index.fusion()
    if fusion is not None and len(raw):
        raw = np.asarray(fusion.query_image(raw), dtype=np.float32)
    return np.ascontiguousarray(raw, dtype=np.float32)
