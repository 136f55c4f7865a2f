"""Where an index lives and what its directory holds: the default location, file names per generation, how
many generations are kept, manifest keys the writer shares."""

from __future__ import annotations

import os
from pathlib import Path

ENV_INDEX = "RETRIEVAL_INDEX"


KEEP_GENERATIONS = (
    2  # the current one and the one before, so a reader that just read the manifest can still open its files
)


def resolve_index(value: str | os.PathLike | None) -> Path | str:
    """What --index (or $RETRIEVAL_INDEX, or the default) names: a directory (Path) for the embedded store,
    or a postgresql:// URL (str), kept as text since a Path would fold its `//`."""
    if not value:
        value = os.environ.get(ENV_INDEX) or None
    if isinstance(value, str) and "://" in value:  # a directory search does not import the URL parser (~2 ms)
        from retrieval.store.pg.location import is_database_url

        if is_database_url(value):
            return value
    return Path(value).expanduser() if value else default_index_dir()


def default_index_dir() -> Path:
    env = os.environ.get(ENV_INDEX)
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "retrieval" / "default"


# manifest key: ids of images re-encoded in place (same id, new content) whose new vectors are not yet
# published; the writer sets it with the rows and clears it after publishing (index_data/pipeline.py)
PENDING_DIRTY_KEY = "pending_dirty_images"


def _vec_file(root: Path, kind: str, gen: int) -> Path:
    return root / f"{kind}.g{gen}.faiss"


def _caption_kind(requested: str) -> str:
    return requested if requested in ("auto", "flat") else "auto"
