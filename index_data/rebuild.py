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

from retrieval.errors import ModelMismatchError
from retrieval.index import Index, storage_error
from retrieval.modelspec import parse_spec
from retrieval.switch import STAGING_KEY, staging_dir, switch_in


def _what(opts, spec: str) -> dict:
    """The inputs that decide a rebuild's result: a staging index started for other ones is not resumed
    (it could hold images of PATHs that this rebuild does not index)."""
    absolute = lambda p: os.path.abspath(os.path.expanduser(p)) if p else None  # noqa: E731
    return {"model": spec, "paths": sorted(absolute(p) for p in opts.paths), "captions": absolute(opts.captions_file),
            "fmt": opts.fmt, "split": opts.split, "images": absolute(opts.images_dir),
            "exclude": sorted(opts.exclude), "include_hidden": bool(opts.include_hidden)}


def _resumable(path, what: dict) -> bool:
    """Whether the staging index at `path` was started by this same rebuild (then it is resumed)."""
    try:
        with Index.open(path) as st:
            return st.store.get_manifest(STAGING_KEY) == what and st.identity is not None
    except Exception:  # noqa: BLE001 - no model recorded yet, or damaged: start it again
        return False


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
        what = _what(opts, spec)
        if os.path.lexists(stage) and not _resumable(stage, what):
            shutil.rmtree(stage) if stage.is_dir() and not stage.is_symlink() else os.unlink(stage)
        with Index.open_for_write(stage) as st, st.store.transaction():
            st.store.set_manifest(STAGING_KEY, what)
        index_type = opts.index_type or main.store.get_manifest("index_type_requested", "auto")
        staged = replace(opts, rebuild=False, model=spec, index_type=index_type)
        try:
            report = run_index(stage, staged)
        except ModelMismatchError:  # same spec, other weights (the file changed): start the staging afresh
            shutil.rmtree(stage)
            with Index.open_for_write(stage) as st, st.store.transaction():
                st.store.set_manifest(STAGING_KEY, what)
            report = run_index(stage, staged)
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
