"""`index --rebuild`: re-encode everything (e.g. with another model) without ever breaking the index.

The new index is built aside, in `<index>/rebuild/`, by the ordinary incremental pipeline, while the
index's lock is held (no other writer) and the index itself stays complete and searchable with its old
model. When the staging index is finished it is switched in with one transaction
(retrieval/switch.py). A killed rebuild leaves the old index untouched; running the same command again
resumes the staging index (only what it lacks is encoded); a rebuild with another model, or deleting
the folder, abandons it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

from retrieval.index import Index
from retrieval.modelspec import parse_spec
from retrieval.switch import staging_dir, switch_in


def _resumable(path, spec: str) -> bool:
    """Whether the staging index at `path` was started for this model (then the rebuild resumes it)."""
    try:
        with Index.open(path) as st:
            ident = st.identity
    except Exception:  # noqa: BLE001 - no model recorded yet, or damaged: start it again
        return False
    return ident is not None and ident.spec == spec


def run_rebuild(index_dir, opts, run_index):
    """Rebuild the index at `index_dir` with `opts` (opts.rebuild set); `run_index` is the pipeline's
    entry point, called on the staging directory. Returns the staging run's report, with the
    generation and image count of the index once switched."""
    main = Index.open_for_write(index_dir)
    try:
        if main.identity is None:  # nothing finished to keep: build in place
            main.close()
            main = None
            return run_index(index_dir, replace(opts, rebuild=False))
        spec = str(parse_spec(opts.model)) if opts.model else main.identity.spec
        stage = staging_dir(main.root)
        if os.path.lexists(stage) and not _resumable(stage, spec):
            shutil.rmtree(stage) if stage.is_dir() and not stage.is_symlink() else os.unlink(stage)
        index_type = opts.index_type or main.store.get_manifest("index_type_requested", "auto")
        report = run_index(stage, replace(opts, rebuild=False, model=spec, index_type=index_type))
        if report.interrupted:  # Ctrl-C: the old index stays in force; the same command resumes
            return report
        report.generation = switch_in(main, stage)
        report.images_total = main.store.count("images")
        return report
    finally:
        if main is not None:
            main.close()
