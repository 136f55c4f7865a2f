"""The read path: encode a query with the index's own model, search FAISS, join SQLite metadata.

from retrieval.query.searcher import Searcher
s = Searcher.open("~/photos.idx")
for r in s.search("a dog on a beach", k=5):
    print(r.rank, r.score, r.path)
"""

from __future__ import annotations

import base64
import fnmatch
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from retrieval.errors import EmptyIndexError, RetrievalError
from retrieval.names import display_text
from retrieval.query.arithmetic import QueryTerm, parse_terms, weighted_sum
from retrieval.query.encoder import QueryEncoder
from retrieval.query.photo_filters import PhotoFilter
from retrieval.store.index import Index
from retrieval.store.rows import path_from_db
from retrieval.vecmath import l2_normalize

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
    path_b64: str | None = None  # exact bytes of a name that is not UTF-8 (`path` then shows U+FFFD)
    # photo metadata (retrieval/exif.py); None when not read or not in the file
    taken_at: str | None = None
    taken_source: str | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None

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
    path_b64: str | None = None  # as ImageResult.path_b64

    def to_dict(self) -> dict:
        return asdict(self)


Result = Union[ImageResult, CaptionResult]


def _path_b64(path: str) -> str | None:
    """base64 of the exact name when it is not valid UTF-8, so JSON consumers can rebuild it; else None."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii")


def _check_query(text: str | None, min_score: float | None) -> None:
    if text is not None and not text.strip():
        raise RetrievalError("the query text is empty: give words to search for, or --image PATH")
    if min_score is not None and not math.isfinite(min_score):
        raise RetrievalError(f"--min-score must be a finite number (cosine similarity, -1..1), got {min_score}")


class Searcher:
    """Queries one index. Loads the encoder on the first query that needs it, never before."""

    def __init__(self, index: Index, device: str = "auto"):
        self.index = index
        self.device = device
        self.query_encoder = QueryEncoder(index, device)

    @classmethod
    def open(cls, path=None, device: str = "auto") -> "Searcher":
        return cls(Index.open(path), device=device)

    def close(self) -> None:
        self.index.close()

    def warm(self) -> None:
        """Bring the vector files into memory (VectorIndex.touch) so that the first queries of a long-lived
        process answer as fast as later ones; `serve` calls it as it starts. A one-off query does not need
        it: it reads only the lists it probes."""
        for kind in ("images", "captions"):
            vectors = self.index.vectors(kind, mmap=True)
            if vectors is not None:
                vectors.touch()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- query vectors --------------------------------------------------------------------------

    @property
    def encoder(self):
        return self.query_encoder.get()

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
        _check_query(text, None)
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
        return l2_normalize(q)

    def apply_terms(self, base: np.ndarray | None, terms) -> np.ndarray:
        """The normalised sum of `base` (weight 1; None for none) and each QueryTerm's vector times its weight."""
        parts = [] if base is None else [(1.0, base)]
        return weighted_sum(parts + [(t.weight, self.term_vector(t)) for t in terms])

    def term_vector(self, term: QueryTerm) -> np.ndarray:
        if term.text is not None:
            return self.embed_text(term.text)
        if term.image_id is not None:
            row = self.index.store.images_by_ids([term.image_id]).get(term.image_id)
            if row is None:
                raise RetrievalError(f"no image with id {term.image_id} in the index (query term id:{term.image_id})")
            try:
                vec = self.index.store.get_embeddings("image", [row.hash], self.index.dim)[0]
            except KeyError:
                return self.embed_image(row.path)
            fusion = self.index.fusion()
            return vec if fusion is None else fusion.query_image(vec[None])[0]
        return self.embed_image(term.image)

    # -- search ---------------------------------------------------------------------------------

    def search(
        self,
        text: str | None = None,
        image=None,
        *,
        weight: float = 0.5,
        to: str = "images",
        k: int = 10,
        min_score: float | None = None,
        under: str | None = None,
        glob: str | None = None,
        exclude_self: bool = False,
        dedupe: bool = True,
        probes: int | None = None,
        after=None,
        before=None,
        camera: str | None = None,
        near=None,
        km: float | None = None,
        photo: PhotoFilter | None = None,
        add=(),
        subtract=(),
    ) -> list[Result]:
        """probes: ANN effort for this query (IVF lists probed, or HNSW efSearch); None: the index's own.
        after/before (ISO dates, inclusive), camera (substring of make and model), near=(lat, lon) with km:
        photo metadata filters (retrieval/query/photo_filters.py); they also apply to captions' images.
        add/subtract: query arithmetic terms, "[W:]TEXT", "[W:]IMAGE_PATH", "id:N", PIL images or (W, Q) pairs
        (retrieval/query/arithmetic.py), summed with the base query and normalised."""
        terms = parse_terms(add, subtract)
        if photo is None:
            photo = PhotoFilter.make(after, before, camera, near, km)
        if k < 1:
            raise RetrievalError("-k must be at least 1")
        if to not in ("images", "captions"):
            raise RetrievalError(f"--to must be 'images' or 'captions', not {to!r}")
        _check_query(text, min_score)
        with self.index.pinned():  # the query's fusion and the vectors it meets come from one generation
            vectors = self.index.vectors(to, mmap=True)
            if vectors is None or vectors.ntotal == 0:
                what = "images" if to == "images" else "captions"
                raise EmptyIndexError(f"the index at {self.index.root} has no {what} to search")
            if terms and text is None and image is None:
                qvec = self.apply_terms(None, terms)
            else:
                qvec = self.embed_query(text, image, weight)
                if terms:
                    qvec = self.apply_terms(qvec, terms)
            self_hash = _query_hash(image) if (exclude_self and image is not None) else None
            return self.search_vector(
                qvec,
                to=to,
                k=k,
                min_score=min_score,
                under=under,
                glob=glob,
                exclude_hash=self_hash,
                dedupe=dedupe,
                probes=probes,
                photo=photo,
            )

    def search_vector(
        self,
        qvec: np.ndarray,
        *,
        to: str = "images",
        k: int = 10,
        min_score: float | None = None,
        under: str | None = None,
        glob: str | None = None,
        exclude_hash: str | None = None,
        dedupe: bool = True,
        probes: int | None = None,
        photo: PhotoFilter | None = None,
    ) -> list[Result]:
        if probes is not None and probes < 1:
            raise RetrievalError(f"--probes must be at least 1, got {probes}")
        _check_query(None, min_score)
        vectors = self.index.vectors(to, mmap=True)
        if vectors is None or vectors.ntotal == 0:
            return []
        allowed = self._allowed_ids(to, under, glob, photo)
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

    def _allowed_ids(self, to: str, under: str | None, glob: str | None, photo: PhotoFilter | None = None):
        photo_ok = set(photo.image_ids(self.index.store)) if photo is not None and photo.active else None
        if not under and not glob and photo_ok is None:
            return None
        if not under and not glob and to == "images":
            return np.array(sorted(photo_ok), dtype=np.int64)
        store = self.index.store
        where, params = "", []
        if under:
            # a range on the indexed raw path: only the rows under the folder are read (BLOBs compare
            # bytewise, and "0" is the byte after "/")
            prefix = os.fsencode(os.path.abspath(os.path.expanduser(under))).rstrip(b"/")
            where = " WHERE (i.path_raw >= ? AND i.path_raw < ?) OR i.path_raw = ?"
            params = [prefix + b"/", prefix + b"0", prefix or b"/"]
        if to == "images":
            rows = store.db.execute("SELECT i.id, i.id, i.path_raw FROM images i" + where, params)
        else:
            rows = store.db.execute(
                "SELECT c.id, i.id, i.path_raw FROM captions c JOIN images i ON i.id = c.image_id" + where, params
            )
        keep = []
        for i, image_id, raw in rows:
            if photo_ok is not None and image_id not in photo_ok:
                continue
            if glob:
                p = path_from_db(raw)
                if not (fnmatch.fnmatch(p, glob) or fnmatch.fnmatch(os.path.basename(p), glob)):
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
            metas = store.photo_meta(list(rows))
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
                meta = metas.get(i)
                out.append(
                    ImageResult(
                        len(out) + 1,
                        s,
                        i,
                        display_text(row.path),
                        row.hash,
                        row.width,
                        row.height,
                        [t for _, t in caps.get(i, [])],
                        path_b64=_path_b64(row.path),
                        **(meta.to_dict() if meta else {}),
                    )
                )
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
                out.append(
                    CaptionResult(
                        len(out) + 1,
                        s,
                        i,
                        text,
                        image_id,
                        display_text(img.path) if img else None,
                        source,
                        path_b64=_path_b64(img.path) if img else None,
                    )
                )
                if len(out) == k:
                    break
        return out


def _query_hash(image) -> str | None:
    if isinstance(image, (str, os.PathLike)) and Path(image).is_file():
        from retrieval.hashing import hash_file

        return hash_file(image)
    return None
