"""`index --rebuild` on a PostgreSQL collection."""

from __future__ import annotations

from dataclasses import replace

from retrieval.errors import IndexNotFoundError, RetrievalError
from retrieval.store.index import Index


def run_pg_rebuild(url: str, opts, run_index):
    try:
        Index.open(url).close()
    except IndexNotFoundError:  # nothing finished to keep: build in place
        return run_index(url, replace(opts, rebuild=False))
    raise RetrievalError(
        "--rebuild of an existing PostgreSQL collection is not supported: index into a new collection "
        "(?collection=NEW) instead"
    )
