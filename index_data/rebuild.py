"""`index --rebuild`: re-encode everything (e.g. with another model) without ever breaking the index.

The new index is built aside, in `<index>/rebuild/`, by the ordinary incremental pipeline, while the
index's lock is held (no other writer) and the index itself stays complete and searchable with its old
model. When the staging index is finished it is switched in with one transaction
(retrieval/store/switch.py). A killed rebuild leaves the old index untouched; running the same command again
resumes the staging index (only what it lacks is encoded); a rebuild with another model, or deleting
the folder, abandons it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from index_data.rebuild_inputs import check_inputs, rebuild_inputs, resumable
from retrieval.errors import ModelMismatchError
from retrieval.modelspec import parse_spec
from retrieval.store.db import DB_NAME
from retrieval.store.disk_errors import storage_error
from retrieval.store.index import Index
from retrieval.store.layout import resolve_index
from retrieval.store.switch import STAGING_KEY, staging_dir, switch_in


def _index_dir_excludes(root, paths) -> list[str]:
    """Exclude globs for the index directory under any of the PATHs (its thumbnails are no photos). The
    staging run's own index is `<index>/rebuild/`, so it would not know the directory above it."""
    import glob

    root = os.path.abspath(root)
    out = []
    for p in paths:
        p = os.path.abspath(os.fsdecode(p))
        if root.startswith(p.rstrip(os.sep) + os.sep):
            out.append(f"/{glob.escape(os.path.relpath(root, p))}/")  # that folder only, not its namesakes
    return out


def _run_staged(run_index, stage: Path, opts, what: dict):
    """Run the pipeline on the staging folder, recording what it rebuilds first. A run that fails before
    any model is recorded there (a model that cannot load, say) leaves no staging folder behind."""
    with Index.open_for_write(stage) as st, st.store.transaction():
        st.store.set_manifest(STAGING_KEY, what)
    try:
        return run_index(stage, opts)
    except Exception:
        try:
            with Index.open(stage) as st:
                started = st.identity is not None
        except Exception:  # no model recorded yet (IndexNotFoundError), or unreadable
            started = False
        if not started:
            shutil.rmtree(stage, ignore_errors=True)
        raise


def run_rebuild(index_dir, opts, run_index):
    """Rebuild the index at `index_dir` with `opts` (opts.rebuild set); `run_index` is the pipeline's
    entry point, called on the staging directory. Returns the staging run's report, with the
    generation and image count of the index once switched."""
    root = resolve_index(index_dir)
    if isinstance(root, str):
        from index_data.pg_rebuild import run_pg_rebuild

        return run_pg_rebuild(root, opts, run_index)
    if not (root / DB_NAME).is_file():  # no index yet: nothing to keep, build in place
        return run_index(index_dir, replace(opts, rebuild=False))
    main = Index.open_for_write(root, create=False)
    try:
        if main.identity is None:  # nothing finished to keep: build in place
            main.close()
            main = None
            return run_index(index_dir, replace(opts, rebuild=False))
        spec = str(parse_spec(opts.model)) if opts.model else main.identity.spec
        check_inputs(opts)  # a typo'd PATH must not discard a resumable staging index
        stage = staging_dir(main.root)
        what = rebuild_inputs(opts, spec)
        if os.path.lexists(stage) and not resumable(stage, what):
            shutil.rmtree(stage) if stage.is_dir() and not stage.is_symlink() else os.unlink(stage)
        index_type = opts.index_type or main.store.get_manifest("index_type_requested", "auto")
        staged = replace(
            opts,
            rebuild=False,
            model=spec,
            index_type=index_type,
            exclude=[*opts.exclude, *_index_dir_excludes(main.root, opts.paths)],
        )
        try:
            report = _run_staged(run_index, stage, staged, what)
        except ModelMismatchError:  # same spec, other weights (the file changed): start the staging afresh
            shutil.rmtree(stage)
            report = _run_staged(run_index, stage, staged, what)
        if report.interrupted:  # Ctrl-C: the old index stays in force; the same command resumes
            return report
        try:
            report.generation = switch_in(main, stage)
        except Exception as e:  # a full or read-only disk: one line; the old index is still in force
            err = storage_error(e, main.root)
            if err is None:
                raise
            raise err from None
        report.images_total = main.store.count("images")
        return report
    finally:
        if main is not None:
            main.close()
