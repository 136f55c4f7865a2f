"""What a rebuild is of, for both stores (index_data/rebuild.py, index_data/pg_rebuild.py): the inputs that
decide its result, and the pipeline's input checks made before any staging index is touched."""

from __future__ import annotations

import os

from retrieval.errors import RetrievalError
from retrieval.store.index import Index
from retrieval.store.switch import STAGING_KEY


def rebuild_inputs(opts, spec: str) -> dict:
    """The inputs that decide a rebuild's result: a staging index started for other ones is not resumed
    (it could hold images of PATHs that this rebuild does not index)."""

    def absolute(p):
        return os.path.abspath(os.path.expanduser(p)) if p else None

    return {
        "model": spec,
        "paths": sorted(absolute(p) for p in opts.paths),
        "captions": absolute(opts.captions_file),
        "fmt": opts.fmt,
        "split": opts.split,
        "images": absolute(opts.images_dir),
        "exclude": sorted(opts.exclude),
        "include_hidden": bool(opts.include_hidden),
    }


def check_inputs(opts) -> None:
    """The pipeline's own input checks, made before the staging folder is touched."""
    if not opts.paths and not opts.captions_file:
        raise RetrievalError("nothing to index: give one or more PATHs or --captions FILE")
    for p in [*opts.paths, *([opts.captions_file] if opts.captions_file else [])]:
        if not os.path.lexists(p):
            raise RetrievalError(f"no such file or directory: {os.path.abspath(p)}")


def resumable(staging, what: dict) -> bool:
    """Whether the staging index (a directory or a collection URL) was started by this same rebuild: then
    it is resumed."""
    try:
        with Index.open(staging) as st:
            return st.store.get_manifest(STAGING_KEY) == what and st.identity is not None
    except Exception:  # no model recorded yet, or damaged: start it again
        return False
