"""The read path: encode a query with the index's own model, search FAISS, join SQLite metadata.

    from retrieval.search import Searcher
    s = Searcher.open("~/photos.idx")
    for r in s.search("a dog on a beach", k=5):
        print(r.rank, r.score, r.path)
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from .errors import EmptyIndexError, RetrievalError
from .index import Index
from .store import path_from_db

MAX_OVERFETCH_ROUNDS = 8


@dataclass(frozen=True)
class ImageResult:
    rank: int
    score: float
    id: int
    path: str
    hash: str
    width: int | None = None
    height: int | None = None
    captions: list[str] = field(default_factory=list)
    kind: str = "image"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CaptionResult:
    rank: int
    score: float
    id: int
    caption: str
    image_id: int | None
    path: str | None
    source: str
    kind: str = "caption"

    def to_dict(self) -> dict:
        return asdict(self)


Result = Union[ImageResult, CaptionResult]


def _display(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "replace")


class Searcher:
    """Queries one index. Loads the encoder on the first query that needs it, never before."""

    def __init__(self, index: Index, device: str = "auto"):
        self.index = index
        self.device = device

    @classmethod
    def open(cls, path=None, device: str = "auto") -> "Searcher":
        return cls(Index.open(path), device=device)

    def close(self) -> None:
        self.index.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- query vectors --------------------------------------------------------------------------

    @property
    def encoder(self):
        return self.index.encoder(self.device)

    def _text_vector(self, text: str) -> np.ndarray:
        return self.encoder.encode_texts([text])[0]

    def embed_text(self, text: str) -> np.ndarray:
        vec = self._text_vector(text)
        fusion = self.index.fusion()
        return vec if fusion is None else fusion.query_text(vec[None])[0]

    def embed_image(self, image) -> np.ndarray:
        vec = self.encoder.encode_images([image])[0]
        fusion = self.index.fusion()
        return vec if fusion is None else fusion.query_image(vec[None])[0]

    def embed_query(self, text: str | None = None, image=None, weight: float = 0.5) -> np.ndarray:
        """One query vector. With both an image and text: weight·f_img + (1−weight)·f_txt, renormalised
        (or the trained query fusion, when the index has one)."""
        if text is None and image is None:
            raise RetrievalError("give a query: TEXT, --image PATH, or both")
        if not 0.0 <= weight <= 1.0:
            raise RetrievalError(f"--weight must be between 0 and 1, got {weight}")
        if image is None:
            return self.embed_text(text)
        if text is None:
            return self.embed_image(image)
        return self.combine(self.encoder.encode_images([image])[0], self._text_vector(text), weight)

    def combine(self, img: np.ndarray, txt: np.ndarray, weight: float) -> np.ndarray:
        """A composite query from raw image and text vectors: the trained query fusion when the index has
        one, else weight·img + (1−weight)·txt, renormalised."""
        fusion = self.index.fusion()
        if fusion is not None:
            return fusion.query_composite(img[None], txt[None], weight)[0]
        q = weight * img + (1.0 - weight) * txt
        return (q / max(np.linalg.norm(q), 1e-12)).astype(np.float32)

    # -- search ---------------------------------------------------------------------------------

    def search(self, text: str | None = None, image=None, *, weight: float = 0.5, to: str = "images", k: int = 10,
               min_score: float | None = None, under: str | None = None, glob: str | None = None,
               exclude_self: bool = False, dedupe: bool = True, probes: int | None = None) -> list[Result]:
        """probes: ANN effort for this query (IVF lists probed, or HNSW efSearch); None: the index's own."""
        if k < 1:
            raise RetrievalError("-k must be at least 1")
        if to not in ("images", "captions"):
            raise RetrievalError(f"--to must be 'images' or 'captions', not {to!r}")
        with self.index.pinned():  # the query's fusion and the vectors it meets come from one generation
            vectors = self.index.vectors(to, mmap=True)
            if vectors is None or vectors.ntotal == 0:
                what = "images" if to == "images" else "captions"
                raise EmptyIndexError(f"the index at {self.index.root} has no {what} to search")
            qvec = self.embed_query(text, image, weight)
            self_hash = _query_hash(image) if (exclude_self and image is not None) else None
            return self.search_vector(qvec, to=to, k=k, min_score=min_score, under=under, glob=glob,
                                      exclude_hash=self_hash, dedupe=dedupe, probes=probes)

    def search_vector(self, qvec: np.ndarray, *, to: str = "images", k: int = 10, min_score: float | None = None,
                      under: str | None = None, glob: str | None = None, exclude_hash: str | None = None,
                      dedupe: bool = True, probes: int | None = None) -> list[Result]:
        if probes is not None and probes < 1:
            raise RetrievalError(f"--probes must be at least 1, got {probes}")
        vectors = self.index.vectors(to, mmap=True)
        if vectors is None or vectors.ntotal == 0:
            return []
        allowed = self._allowed_ids(to, under, glob)
        if allowed is not None and len(allowed) == 0:
            return []
        total = vectors.ntotal if allowed is None else len(allowed)
        fetch = min(total, max(k * 2, k + 16))
        q = np.ascontiguousarray(qvec, dtype=np.float32).reshape(1, -1)
        for _ in range(MAX_OVERFETCH_ROUNDS):
            scores, ids = vectors.search(q, fetch, allowed_ids=allowed, probes=probes)
            results = self._materialise(to, scores[0], ids[0], k, min_score, exclude_hash, dedupe)
            exhausted = fetch >= total
            below = min_score is not None and len(scores[0]) and scores[0][-1] < min_score
            if len(results) >= k or exhausted or below:
                return results
            fetch = min(total, fetch * 4)
        return results

    def _allowed_ids(self, to: str, under: str | None, glob: str | None):
        if not under and not glob:
            return None
        prefix = os.path.abspath(os.path.expanduser(under)) if under else None
        store = self.index.store
        if to == "images":
            rows = store.db.execute("SELECT id, path_raw FROM images")
        else:
            rows = store.db.execute("SELECT c.id, i.path_raw FROM captions c JOIN images i ON i.id = c.image_id")
        keep = []
        for i, raw in rows:
            p = path_from_db(raw)
            if prefix and not (p == prefix or p.startswith(prefix.rstrip(os.sep) + os.sep)):
                continue
            if glob and not (fnmatch.fnmatch(p, glob) or fnmatch.fnmatch(os.path.basename(p), glob)):
                continue
            keep.append(i)
        return np.array(keep, dtype=np.int64)

    def _materialise(self, to, scores, ids, k, min_score, exclude_hash, dedupe) -> list[Result]:
        store = self.index.store
        valid = [(float(s), int(i)) for s, i in zip(scores, ids) if i >= 0]
        out: list[Result] = []
        if to == "images":
            rows = store.images_by_ids([i for _, i in valid])
            caps = store.captions_for_images(list(rows))
            seen: set[str] = set()
            for s, i in valid:
                row = rows.get(i)
                if row is None:  # deleted after this generation was published
                    continue
                if min_score is not None and s < min_score:
                    break
                if exclude_hash and row.hash == exclude_hash:
                    continue
                if dedupe:
                    if row.hash in seen:
                        continue
                    seen.add(row.hash)
                out.append(ImageResult(len(out) + 1, s, i, _display(row.path), row.hash, row.width, row.height,
                                       [t for _, t in caps.get(i, [])]))
                if len(out) == k:
                    break
        else:
            rows = store.captions_by_ids([i for _, i in valid])
            images = store.images_by_ids([r[0] for r in rows.values() if r[0] is not None])
            seen_text: set[tuple] = set()
            for s, i in valid:
                row = rows.get(i)
                if row is None:
                    continue
                if min_score is not None and s < min_score:
                    break
                image_id, text, source = row
                img = images.get(image_id) if image_id is not None else None
                if exclude_hash and img is not None and img.hash == exclude_hash:
                    continue
                if dedupe:
                    key = (text, img.hash if img else None)
                    if key in seen_text:
                        continue
                    seen_text.add(key)
                out.append(CaptionResult(len(out) + 1, s, i, text, image_id, _display(img.path) if img else None, source))
                if len(out) == k:
                    break
        return out


def _query_hash(image) -> str | None:
    if isinstance(image, (str, os.PathLike)) and Path(image).is_file():
        from .hashing import hash_file

        return hash_file(image)
    return None
