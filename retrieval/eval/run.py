"""`retrieval benchmark recall`: build the index when asked, measure it, print the figures."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

from retrieval.errors import ModelMismatchError, RetrievalError
from retrieval.eval.benchmark import BuildFn, IndexRecall, evaluate_index, load_pairs, parse_ks
from retrieval.eval.recall import DEFAULT_KS


def _index_exists(path) -> bool:
    from retrieval.store.db import DB_NAME

    if isinstance(path, str):  # a PostgreSQL collection
        from retrieval.errors import IndexNotFoundError
        from retrieval.store.index import Index

        try:
            Index.open(path).close()
        except IndexNotFoundError:
            return False
        return True
    return (path / DB_NAME).is_file()


def run_recall_benchmark(
    captions_file: str | os.PathLike,
    *,
    index_dir: str | os.PathLike | None = None,
    images_dir: str | None = None,
    fmt: str = "auto",
    split: str | None = None,
    model: str | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    exact: bool = False,
    device: str = "auto",
    build: BuildFn | None = None,
) -> IndexRecall:
    """``benchmark recall``: evaluate ``index_dir`` on FILE's pairs, indexing FILE first when needed.

    * ``index_dir`` names an existing index: evaluate it as it is (``model``, if given, must be its model).
    * ``index_dir`` names no index yet: build one there from FILE, keep it, evaluate it.
    * ``index_dir`` is None: build in a temporary directory, evaluate, delete it.

    ``build(path, options)`` indexes FILE into ``path``; ``options`` holds ``captions_file``, ``fmt``, ``split``,
    ``images_dir``, ``model`` and ``device`` (the field names of ``index_data.pipeline.IndexOptions``).
    """
    from retrieval.modelspec import parse_spec
    from retrieval.query.searcher import Searcher

    ks_t = parse_ks(ks)
    pairs = load_pairs(captions_file, images_dir, fmt, split)
    options = dict(
        captions_file=os.fspath(captions_file), fmt=fmt, split=split, images_dir=images_dir, model=model, device=device
    )

    def build_into(path: Path) -> float:
        if build is None:
            raise RetrievalError(f"no index at {path}, and no way to build one was given")
        t = time.perf_counter()
        build(path, options)
        return time.perf_counter() - t

    if index_dir is not None:
        from retrieval.store.layout import resolve_index

        path = resolve_index(index_dir)
        built_seconds = None
        if not _index_exists(path):
            built_seconds = build_into(path)
        with Searcher.open(path, device=device) as s:
            ident = s.index.identity
            if model and built_seconds is None and ident is not None and str(parse_spec(model)) != ident.spec:
                raise ModelMismatchError(
                    f"the index at {path} was built with {ident.spec}, not {model}; leave out --model to evaluate "
                    f"it, or give a new --index directory to build one with {model}"
                )
            result = evaluate_index(s, pairs, ks_t, exact=exact)
        result.built = built_seconds is not None
        result.index_seconds = built_seconds
        return result

    with tempfile.TemporaryDirectory(prefix="retrieval-recall-") as tmp:
        path = Path(tmp) / "index"
        built_seconds = build_into(path)
        with Searcher.open(path, device=device) as s:
            result = evaluate_index(s, pairs, ks_t, exact=exact)
    result.index, result.built, result.index_seconds = None, True, built_seconds
    return result


def format_recall(r: IndexRecall) -> str:
    """A small human-readable table (recall in %)."""
    lines = [
        f"{r.n_images} images, {r.n_captions} captions; model {r.model}; index {r.index_type}"
        + (f"; fusion {r.fusion}" if r.fusion else "")
    ]
    cols = ["index"] + (["exact"] if r.exact is not None else [])
    lines.append(f"{'':>10}  {'k':>4}  " + "  ".join(f"{c:>7}" for c in cols))
    for prefix, label in (("image_retrieval", "text→image"), ("text_retrieval", "image→text")):
        for k in r.ks:
            key = f"{prefix}_recall@{k}"
            vals = [r.metrics[key]] + ([r.exact[key]] if r.exact is not None else [])
            lines.append(f"{label:>10}  {k:>4}  " + "  ".join(f"{100 * v:6.2f}%" for v in vals))
    if r.missing_images or r.missing_captions:
        lines.append(
            f"counted as misses: {r.missing_images} images not in the index, "
            f"{r.missing_captions} captions with no caption row"
        )
    return "\n".join(lines)
