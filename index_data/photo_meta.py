"""Fill the images table's photo metadata (date taken, camera, lens, GPS) from EXIF, without decoding pixels or
touching the vectors: for new and changed images, and for every image of an index made before the columns
existed (the migration). Committed in chunks, so an interrupted run keeps what it read."""

from __future__ import annotations

from retrieval.exif import read_meta

CHUNK = 500


def fill_photo_meta(store, progress: bool = False) -> int:
    """Read the metadata of every image that needs it; returns how many were read."""
    todo = store.images_needing_meta()
    if not todo:
        return 0
    from tqdm import tqdm

    done = 0
    with tqdm(total=len(todo), unit="img", disable=not progress or len(todo) < 200, desc="reading EXIF") as bar:
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start : start + CHUNK]
            rows = [(i, h, read_meta(path, mtime_ns)) for i, path, mtime_ns, h in chunk]
            with store.transaction():
                store.set_photo_meta(rows)
            done += len(rows)
            bar.update(len(rows))
    return done
