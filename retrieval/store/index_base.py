"""What every index store shares, whatever holds its rows and vectors: the manifest read as one published state
(model, dimension, generation, fusion), the fusion in force, and the fused vectors made from raw embeddings.
`retrieval.store.index.Index` (the embedded store) and `retrieval.store.pg.index.PgIndex` build on it."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from retrieval.errors import ModelMismatchError
from retrieval.modelspec import ModelIdentity


@dataclass(frozen=True)
class IndexInfo:
    path: str
    images: int
    captions: int
    errors: int
    model: str
    dim: int
    index_type: str
    index_params: dict  # the vector index's parameters (nlist, nprobe, efSearch, ...): what --probes overrides
    generation: int
    fusion: str | None
    vectors: int
    caption_vectors: int

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


class IndexBase:
    """Subclasses open the store and provide close(), vectors(kind) and _fusion_path(name)."""

    def __init__(self, root, store, writable: bool):
        self.root = root
        self.store = store
        self.writable = writable
        self._fusion_cache: tuple[int, object] | None = None
        self._fusion_override: tuple[dict | None] | None = None
        self._pin = threading.local()  # this thread's (generation, fusion meta) while pinned()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- manifest -------------------------------------------------------------------------------

    @property
    def identity(self) -> ModelIdentity | None:
        state = getattr(self._pin, "state", None)
        d = state[2] if state is not None else self.store.get_manifest("model")
        return ModelIdentity.from_dict(d) if d else None

    @property
    def dim(self) -> int:
        state = getattr(self._pin, "state", None)
        return int(state[3] or 0) if state is not None else int(self.store.get_manifest("dim", 0))

    @property
    def generation(self) -> int:
        state = getattr(self._pin, "state", None)
        return state[0] if state is not None else int(self.store.get_manifest("generation", 0))

    def _snapshot(self) -> tuple[int, dict | None, dict | None, int]:
        """The generation, fusion, model and dimension in force, from one SQLite statement (one read
        transaction), so they always belong together: a writer switches them in one transaction (a
        rebuild with another model changes all four at once)."""
        import json

        rows = {
            k: json.loads(v)
            for k, v in self.store.db.execute(
                "SELECT key, value FROM manifest WHERE key IN ('generation', 'fusion', 'model', 'dim')"
            )
        }
        return int(rows.get("generation") or 0), rows.get("fusion"), rows.get("model"), int(rows.get("dim") or 0)

    @contextmanager
    def pinned(self):
        """Within the block, this thread sees one published state: the vectors of one generation and the
        fusion and model that were published with them, even if a writer switches them meanwhile."""
        if getattr(self._pin, "state", None) is not None:  # already pinned by an outer call
            yield
            return
        self._pin.state = self._snapshot()
        try:
            yield
        finally:
            self._pin.state = None

    def set_model(self, identity: ModelIdentity) -> None:
        with self.store.transaction():
            self.store.set_manifest("model", identity.to_dict())
            self.store.set_manifest("dim", identity.dim)

    def check_identity(self, identity: ModelIdentity) -> None:
        mine = self.identity
        if mine is not None and not mine.matches(identity):
            raise ModelMismatchError(
                f"model mismatch: the index at {self.root} was built with {mine.spec} "
                f"(dim {mine.dim}) but the encoder is {identity.spec} (dim {identity.dim}); "
                f"use the index's own model, or re-index with --rebuild"
            )

    def info(self) -> IndexInfo:
        ident = self.identity
        cfg = self.store.get_manifest("index_type") or {}
        fusion = self.store.get_manifest("fusion")
        gen = self.generation
        return IndexInfo(
            path=str(self.root),
            images=self.store.count("images"),
            captions=self.store.count("captions"),
            errors=self.store.count("errors"),
            model=ident.spec if ident else "",
            dim=self.dim,
            index_type=cfg.get("kind", "none"),
            index_params=dict(cfg.get("params") or {}),
            generation=gen,
            fusion=(fusion or {}).get("version") if fusion else None,
            vectors=int(self.store.get_manifest("vectors_images", 0)),
            caption_vectors=int(self.store.get_manifest("vectors_captions", 0)),
        )

    # -- fusion --------------------------------------------------------------------------------

    def fusion(self):
        """The trained fusion in force for this generation, or None (identity)."""
        state = getattr(self._pin, "state", None)
        if self._fusion_override:
            meta = self._fusion_override[0]
        else:
            meta = state[1] if state is not None else self.store.get_manifest("fusion")
        if not meta:
            return None
        key = hash(str(sorted(meta.items())))
        if self._fusion_cache and self._fusion_cache[0] == key:
            return self._fusion_cache[1]
        from retrieval.fusion.model import load_fusion

        fusion = load_fusion(self._fusion_path(meta["file"]))
        ident = self.identity
        if ident is not None and fusion.identity is not None and not ident.matches(fusion.identity):
            raise ModelMismatchError(
                f"the fusion at {meta['file']} was trained for {fusion.identity.spec}, not {ident.spec}"
            )
        self._fusion_cache = (key, fusion)
        return fusion

    def fusion_file(self, name: str) -> bytes | None:
        """The bytes of the fusion file `name` (an index directory's file, a collection's `files` row), or
        None when it is missing."""
        path = self._fusion_path(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    # -- fused vectors ---------------------------------------------------------------------------

    def image_vectors_for(self, rows: list[tuple[int, str]]) -> np.ndarray:
        """Vectors to index for images (id, hash): raw image embedding, blended with captions by the fusion."""
        dim = self.dim
        raw = self.store.get_embeddings("image", [h for _, h in rows], dim)
        fusion = self.fusion()
        if fusion is None or len(rows) == 0:
            return raw
        caps = self.store.captions_for_images([i for i, _ in rows])
        cap_vecs = []
        for image_id, _ in rows:
            texts = caps.get(image_id, [])
            if texts:
                from retrieval.store.rows import text_hash

                cap_vecs.append(self.store.get_embeddings("text", [text_hash(t) for _, t in texts], dim))
            else:
                cap_vecs.append(None)
        return fusion.document_vectors(raw, cap_vecs)

    def caption_vectors_for(self, rows: list[tuple[int, str]]) -> np.ndarray:
        raw = self.store.get_embeddings("text", [h for _, h in rows], self.dim)
        fusion = self.fusion()
        return raw if fusion is None or len(rows) == 0 else fusion.caption_vectors(raw)

    # -- checks ---------------------------------------------------------------------------------

    def _sampled_content_mismatches(self, kind: str, vi, ids: list[int], hashes: dict, n: int = 64):
        """(mismatches, sampled): whether the vectors stored for up to n ids (evenly spaced) equal the
        vectors SQLite's raw embeddings give them (a flipped byte in a FAISS file passes every other
        check). None when nothing could be compared."""
        if not ids:
            return None
        if len(ids) > n:
            ids = [ids[i] for i in np.linspace(0, len(ids) - 1, n).astype(int)]
        try:
            make = self.image_vectors_for if kind == "images" else self.caption_vectors_for
            expected = np.ascontiguousarray(make([(i, hashes[i]) for i in ids]), dtype=np.float32)
            scores, found = vi.search(expected, len(ids), allowed_ids=np.array(ids, dtype=np.int64))
        except Exception:  # lost or malformed raw embeddings are reported on their own
            return None
        norms = np.einsum("ij,ij->i", expected, expected)
        bad = 0
        for r, i in enumerate(ids):
            hit = np.flatnonzero(found[r] == i)
            if len(hit) == 0 or not abs(float(scores[r, hit[0]]) - norms[r]) <= 1e-3 * max(1.0, norms[r]):
                bad += 1
        return (bad, len(ids)) if bad else None
