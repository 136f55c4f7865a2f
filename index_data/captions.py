"""Captions of indexed images, from sidecar files and a caption corpus: encoded and attached in one step."""

from __future__ import annotations

from index_data.scan import ScannedFile
from retrieval.sidecar import read_sidecar


def sync_captions(idx, encoder, files: list[ScannedFile], corpus: dict[str, list[str]], dirty: set[int]) -> int:
    """Attach sidecar and corpus captions to indexed images. Each chunk's new texts are encoded first and
    committed together with their caption rows, so a killed run never leaves a caption without its vector."""
    from retrieval.store.rows import text_hash

    store = idx.store
    wanted: list[tuple[int, str, str]] = []  # (image id, text, source)
    for f in files:
        lines = read_sidecar(f.path)
        if lines:
            row = store.image_by_path(f.path)
            if row is not None:
                wanted += [(row.id, t, "sidecar") for t in lines]
    for path, texts in corpus.items():
        row = store.image_by_path(path)
        if row is not None:  # else the image failed to index; its error is recorded
            wanted += [(row.id, t, "corpus") for t in texts]
    added = 0
    step = 1024
    for i in range(0, len(wanted), step):
        chunk = wanted[i : i + step]
        texts = {text_hash(t): t for _, t, _ in chunk}
        have = store.has_embeddings("text", list(texts))
        missing = [h for h in texts if h not in have]
        vecs = encoder.encode_texts([texts[h] for h in missing]) if missing else None
        with store.transaction():
            if missing:
                store.put_embeddings("text", missing, vecs)
            gone = sorted(have - store.has_embeddings("text", list(have)))  # pruned by another writer since
            if gone:
                store.put_embeddings("text", gone, encoder.encode_texts([texts[h] for h in gone]))
            for image_id, t, source in chunk:
                if store.add_captions(image_id, [t], source):
                    dirty.add(image_id)
                    added += 1
    # texts of an older index that were committed without a vector (repair, not the normal path)
    missing = store.texts_missing_embeddings()
    for i in range(0, len(missing), step):
        chunk = missing[i : i + step]
        vecs = encoder.encode_texts([t for _, t in chunk])
        with store.transaction():
            store.put_embeddings("text", [h for h, _ in chunk], vecs)
    return added
