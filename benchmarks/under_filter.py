"""Cost of `search --under FOLDER` at 1M images: the path filter, and the filtered query it feeds.

The filter (`Searcher._allowed_ids`) turns a folder into the ids FAISS may return. Measured side by side in one
run, interleaved, on the same SQLite store:

* "full scan": what the filter did before: read every (id, path_raw) row of `images` into Python and keep
  those whose decoded path starts with the folder;
* "range": the code on PYTHONPATH (retrieval/query/searcher.py): an indexed range on the raw path
  (`path_raw >= 'folder/' AND path_raw < 'folder0'`), reading only the rows under the folder.

and the whole filtered query (filter + FAISS search restricted to those ids, k=10) over a flat index of random
unit vectors (`--dim`, default 32: the filter cost does not depend on it). The store is a real `Store` (the
engine's schema and indexes) with `--n` rows under /photos/album_AAA/day_DD/img_N.jpg: 100 albums of n/100,
each with 100 days. No model and no image is involved.

    python benchmarks/under_filter.py                 # 1M rows (about a minute to build on 2 cores)
    python benchmarks/under_filter.py --n 20000       # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval.query.searcher import Searcher  # noqa: E402
from retrieval.store.db import Store  # noqa: E402
from retrieval.store.rows import path_from_db  # noqa: E402


def full_scan(store, under: str) -> np.ndarray:
    """The filter as it was: every row into Python."""
    prefix = os.path.abspath(under)
    keep = []
    for i, raw in store.db.execute("SELECT id, path_raw FROM images"):
        p = path_from_db(raw)
        if p == prefix or p.startswith(prefix.rstrip(os.sep) + os.sep):
            keep.append(i)
    return np.array(keep, dtype=np.int64)


def build_store(path: Path, n: int) -> Store:
    store = Store(path)
    per_album = max(1, n // 100)
    per_day = max(1, per_album // 100)
    rows = []
    for i in range(n):
        a, d = i // per_album, (i % per_album) // per_day
        p = f"/photos/album_{a:03d}/day_{d:02d}/img_{i:07d}.jpg"
        rows.append((p, p.encode(), 1000 + i, i, f"{i:064x}", 640, 480, 0.0, "ok"))
    with store.transaction():
        store.db.conn.executemany(
            "INSERT INTO images(path, path_raw, size, mtime_ns, hash, width, height, added_at, status) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            rows,
        )
    return store


def timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "under_filter"))
    args = ap.parse_args()
    from retrieval.store.vector_kinds import VectorIndexConfig
    from retrieval.store.vectors import VectorIndex

    with tempfile.TemporaryDirectory(prefix="under-filter-") as tmp:
        t = time.perf_counter()
        store = build_store(Path(tmp) / "meta.sqlite", args.n)
        build_s = time.perf_counter() - t
        ids = np.fromiter((r[0] for r in store.db.execute("SELECT id FROM images ORDER BY id")), dtype=np.int64)
        rng = np.random.default_rng(0)
        vecs = rng.standard_normal((len(ids), args.dim), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        vi = VectorIndex.build(args.dim, ids, vecs, VectorIndexConfig("flat"))
        q = vecs[:1].copy()
        fake = SimpleNamespace(index=SimpleNamespace(store=store))
        cases = [
            ("one day folder", "/photos/album_042/day_07"),
            ("one album (1%)", "/photos/album_042"),
            ("whole library", "/photos"),
        ]
        results = []
        for label, under in cases:
            row = {"case": label, "under": under}
            for name, fn in (
                ("full_scan", lambda u=under: full_scan(store, u)),
                ("range", lambda u=under: Searcher._allowed_ids(fake, "images", u, None)),
            ):
                allowed, filt = timed(fn, args.repeats)
                _, query = timed(lambda a=allowed, f=fn: vi.search(q, 10, allowed_ids=f()), args.repeats)
                row[name] = {
                    "matches": int(len(allowed)),
                    "filter_ms": round(filt * 1e3, 2),
                    "filtered_query_ms": round(query * 1e3, 2),
                }
            assert row["full_scan"]["matches"] == row["range"]["matches"], row
            results.append(row)
            print(json.dumps(row), flush=True)
        store.close()
    report = {
        "n": args.n,
        "dim": args.dim,
        "repeats": args.repeats,
        "build_s": round(build_s, 1),
        "cases": results,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        "{platform.python_version()}",
        "command": "python benchmarks/under_filter.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"`{report['command']}` — {args.n:,} rows, median of {args.repeats}, {report['machine']}",
        "",
        "| under | matches | full scan: filter | range: filter | full scan: filtered query | range: filtered query |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        f, g = r["full_scan"], r["range"]
        lines.append(
            f"| {r['case']} | {g['matches']:,} | {f['filter_ms']} ms | {g['filter_ms']} ms | "
            f"{f['filtered_query_ms']} ms | {g['filtered_query_ms']} ms |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nreproduce: {report['command']}")


if __name__ == "__main__":
    main()
