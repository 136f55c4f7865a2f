"""The image-caption pairs a fusion learns from, their split by image, and recall@k of a fusion on them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.eval.recall import recall_at_k
from retrieval.fusion.model import Fusion

MIN_PAIRS = 20


MIN_IMAGES = 10


KS = (1, 5, 10)


GAIN_EPS = 1e-9


@dataclass
class PairData:
    """Images (distinct content) and their captions, as raw embeddings."""

    image_keys: list[str]  # image content hashes, one per row of image_vecs
    image_vecs: np.ndarray  # [N, d] raw image embeddings
    text_vecs: np.ndarray  # [T, d] raw caption embeddings
    cap_image: np.ndarray  # [T] row in image_vecs of each caption

    @property
    def n_images(self) -> int:
        return len(self.image_vecs)

    @property
    def n_captions(self) -> int:
        return len(self.text_vecs)

    @property
    def dim(self) -> int:
        return int(self.image_vecs.shape[1])

    def captions_of(self) -> list[np.ndarray]:
        order = np.argsort(self.cap_image, kind="stable")
        bounds = np.searchsorted(self.cap_image[order], np.arange(self.n_images + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(self.n_images)]

    def subset(self, image_rows) -> "PairData":
        image_rows = np.asarray(image_rows, dtype=np.int64)
        remap = np.full(self.n_images, -1, np.int64)
        remap[image_rows] = np.arange(len(image_rows))
        keep = remap[self.cap_image] >= 0
        return PairData(
            [self.image_keys[i] for i in image_rows],
            self.image_vecs[image_rows],
            self.text_vecs[keep],
            remap[self.cap_image[keep]],
        )


def pairs_from_rows(store, dim: int, rows) -> PairData:
    """PairData from caption_pairs()-style rows (caption id, image id, image hash, text hash)."""
    image_index: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    text_keys: list[str] = []
    cap_image: list[int] = []
    for _cid, _iid, ihash, thash in rows:
        if (ihash, thash) in seen:  # the same sentence on two copies of one file: one pair
            continue
        seen.add((ihash, thash))
        text_keys.append(thash)
        cap_image.append(image_index.setdefault(ihash, len(image_index)))
    image_keys = list(image_index)
    if not image_keys:
        return PairData([], np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32), np.zeros(0, np.int64))
    try:
        image_vecs = store.get_embeddings("image", image_keys, dim)
        text_vecs = store.get_embeddings("text", text_keys, dim)
    except KeyError:
        raise RetrievalError(
            "some captions or images have no stored embedding; run: retrieval verify --repair"
        ) from None
    return PairData(image_keys, image_vecs, text_vecs, np.asarray(cap_image, np.int64))


def index_pairs(store, dim: int, image_ids=None) -> PairData:
    """All (image, caption) pairs of an index; optionally only those of the given image ids."""
    rows = store.caption_pairs()
    if image_ids is not None:
        image_ids = set(int(i) for i in image_ids)
        rows = [r for r in rows if r[1] in image_ids]
    return pairs_from_rows(store, dim, rows)


def check_enough(data: PairData) -> None:
    if data.n_captions < MIN_PAIRS or data.n_images < MIN_IMAGES:
        raise RetrievalError(
            f"too few caption pairs to train a fusion: {data.n_captions} captions on {data.n_images} images; "
            f"need at least {MIN_PAIRS} captions on {MIN_IMAGES} images (add captions with sidecar .txt files "
            f"or index --captions FILE)"
        )


def split_by_image(data: PairData, val_fraction: float, seed: int) -> tuple[PairData, PairData]:
    """Seeded split of IMAGES (with all their captions) into train and validation."""
    if not 0.0 < val_fraction < 1.0:
        raise RetrievalError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    n = data.n_images
    n_val = min(max(2, int(round(val_fraction * n))), n - 2)
    if n_val < 2:
        check_enough(data)
    perm = np.random.default_rng(seed).permutation(n)
    return data.subset(np.sort(perm[n_val:])), data.subset(np.sort(perm[:n_val]))


def _recall_dict(r: dict) -> dict[str, float]:
    return {f"R@{k}": round(float(v), 6) for k, v in r.items()}


def evaluate_fusion(fusion: Fusion | None, data: PairData, ks=KS, block: int = 4096) -> dict:
    """Recall on `data` under a fusion (None: no fusion). Returns ``{"t2i_mixed", "t2i_docs", "t2i_image",
    "i2t": {"R@k": ...}, "score": t2i_mixed R@1}``; see the module docstring for the protocol."""
    if fusion is None:
        fusion = Fusion.untrained(data.dim)
    img, txt, cap_image = data.image_vecs, data.text_vecs, data.cap_image
    A = fusion.query_image(img)
    Q = fusion.query_text(txt)
    n_img = len(A)

    def t2i(D: np.ndarray, D_pos: np.ndarray | None) -> dict:
        """Queries Q against candidates D; D_pos[j], if given, replaces query j's own positive."""
        hits = {k: 0.0 for k in ks}
        for s in range(0, len(Q), block):
            q = Q[s : s + block]
            scores = q @ D.T
            ci = cap_image[s : s + block]
            rows = np.arange(len(q))
            if D_pos is not None:
                scores[rows, ci] = np.einsum("ij,ij->i", q, D_pos[s : s + block])
            pos = np.zeros(scores.shape, bool)
            pos[rows, ci] = True
            for k, v in recall_at_k(scores, pos, ks).items():
                hits[k] += v * len(q)
        return {k: hits[k] / len(Q) for k in ks}

    t2i_image = t2i(A, None)
    i2t_hits = {k: 0.0 for k in ks}
    C = fusion.caption_vectors(txt)
    for s in range(0, n_img, block):
        scores = A[s : s + block] @ C.T
        pos = cap_image[None, :] == np.arange(s, s + len(scores))[:, None]
        for k, v in recall_at_k(scores, pos, ks).items():
            i2t_hits[k] += v * len(scores)
    i2t = {k: i2t_hits[k] / n_img for k in ks}

    if fusion.fuses_documents:
        caps_of = data.captions_of()
        D = fusion.document_vectors(img, [txt[c] for c in caps_of])
        loo = [txt[caps_of[cap_image[j]][caps_of[cap_image[j]] != j]] for j in range(len(txt))]
        D_loo = fusion.document_vectors(img[cap_image], [c if len(c) else None for c in loo])
        t2i_docs = t2i(D, D_loo)
        fused = np.zeros(n_img, bool)  # a fixed half of the images are documents with captions
        fused[np.random.default_rng(12345).permutation(n_img)[: (n_img + 1) // 2]] = True
        D_mixed = np.where(fused[:, None], D, A)
        D_mixed_pos = np.where(fused[cap_image][:, None], D_loo, A[cap_image])
        t2i_mixed = t2i(D_mixed, D_mixed_pos)
    else:
        t2i_docs = t2i_mixed = t2i_image
    return {
        "t2i_mixed": _recall_dict(t2i_mixed),
        "t2i_docs": _recall_dict(t2i_docs),
        "t2i_image": _recall_dict(t2i_image),
        "i2t": _recall_dict(i2t),
        "score": round(float(t2i_mixed[ks[0]]), 6),
    }
