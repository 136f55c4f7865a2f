"""Near-duplicate grouping speed and completeness (retrieval/query/duplicates.py).

Data: n clustered 512-d vectors shaped like CLIP image embeddings (benchmarks/speed_vectors.make_vectors), of
which a share are planted near-duplicate groups: an original plus 1-4 copies at cosine ~0.97-0.99 to it (as
resized copies and light edits score with CLIP). They are written to a real index store (SQLite images rows +
embeddings, no encoder), and `find_duplicates` runs on it end to end: reading the vectors from SQLite, the FAISS
range search (IVF above EXACT_MAX distinct images), leader grouping and building the result rows.

Reported: seconds for the whole call and for the pair search (retrieval.query.duplicates.neighbours) alone, groups
found, and how many planted copies
landed in their original's group (recall), plus pairs found by exact search that the IVF search missed, checked
on a subset small enough to search exactly.

Usage:
  python benchmarks/duplicates.py --n 100000 --out benchmarks/out
  python benchmarks/duplicates.py --tiny --out /tmp/x        # seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from speed_vectors import MACHINE, make_vectors  # noqa: E402


def plant_duplicates(base: np.ndarray, fraction: float, seed: int = 1):
    """Replace rows after each chosen original with noisy copies of it. Returns (vectors, group id per row
    (-1: not planted))."""
    rng = np.random.default_rng(seed)
    n, dim = base.shape
    vecs = base.copy()
    group = np.full(n, -1, np.int64)
    i, g = 0, 0
    while i < n:
        if rng.random() < fraction / 3.5:  # ~fraction of rows end up in planted groups of 2-5
            copies = int(rng.integers(1, 5))
            for j in range(i + 1, min(n, i + 1 + copies)):
                target = rng.uniform(0.97, 0.99)
                noise = rng.standard_normal(dim).astype(np.float32)
                noise -= noise @ vecs[i] * vecs[i]
                noise /= np.linalg.norm(noise)
                vecs[j] = target * vecs[i] + np.sqrt(1 - target**2) * noise
                group[j] = g
            group[i] = g
            g += 1
            i += 1 + copies
        else:
            i += 1
    return vecs.astype(np.float32), group


def fake_index(root: Path, vecs: np.ndarray, widths):
    """A real index store holding `vecs` as image embeddings, one image row each (no encoder, no FAISS files)."""
    from retrieval.store.db import Store

    store = Store(root / "meta.sqlite")
    n = len(vecs)
    with store.transaction():
        store.db.conn.executemany(
            "INSERT INTO images(path, path_raw, size, mtime_ns, hash, width, height, added_at, status) "
            "VALUES (?,?,?,?,?,?,?,0,'ok')",
            [
                (f"/photos/{i:07d}.jpg", f"/photos/{i:07d}.jpg".encode(), 1000, i, f"{i:064x}", w, 3 * w // 4)
                for i, w in enumerate(widths)
            ],
        )
        store.put_embeddings("image", [f"{i:064x}" for i in range(n)], vecs)
        store.set_manifest("dim", int(vecs.shape[1]))
    return SimpleNamespace(store=store, dim=int(vecs.shape[1]))


def run(n: int, dim: int, threshold: float, fraction: float, check: int) -> dict:
    import faiss

    from retrieval.query import duplicates as dup

    vecs, planted = plant_duplicates(make_vectors(n, dim), fraction)
    out = {
        "n": n,
        "dim": dim,
        "threshold": threshold,
        "planted_groups": int(planted.max() + 1),
        "planted_rows": int((planted >= 0).sum()),
        "exact_max": dup.EXACT_MAX,
        "nprobe": dup.DUP_NPROBE,
    }
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        # originals full size, their copies half size (resized copies, the usual case)
        is_copy = np.zeros(n, bool)
        for g in range(int(planted.max() + 1)):
            is_copy[np.flatnonzero(planted == g)[1:]] = True
        idx = fake_index(Path(tmp), vecs, np.where(is_copy, 2000, 4000).tolist())
        out["store_write_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        groups = dup.find_duplicates(idx, threshold=threshold)
        out["find_duplicates_s"] = round(time.perf_counter() - t, 2)
        idx.store.close()
    t = time.perf_counter()
    dup.neighbours(vecs, threshold)
    out["range_search_s"] = round(time.perf_counter() - t, 2)
    # planted copies found in their original's group
    where = {}
    for gi, g in enumerate(groups):
        for m in g.members:
            where[m.id - 1] = gi  # SQLite ids start at 1
    hit = total = 0
    for g in range(int(planted.max() + 1)):
        rows = np.flatnonzero(planted == g)
        original = rows[0]
        for r in rows[1:]:
            if float(vecs[r] @ vecs[original]) >= threshold:
                total += 1
                hit += int(r in where and original in where and where[r] == where[original])
    out["groups_found"] = len(groups)
    out["planted_copies_recall"] = round(hit / max(total, 1), 4)
    # IVF against exact on a subset (the IVF path is forced there)
    m = min(check, n)
    sub = vecs[:m]
    exact = dup.neighbours(sub, threshold, exact_max=m)
    ivf = dup.neighbours(sub, threshold, exact_max=0)
    pairs = lambda lims, ids: {(i, int(j)) for i in range(len(lims) - 1) for j in ids[lims[i] : lims[i + 1]]}  # noqa: E731
    pe, pi = pairs(*exact[:2]), pairs(*ivf[:2])
    out["subset_checked"] = m
    out["subset_exact_pairs"] = len(pe)
    out["subset_ivf_pair_recall"] = round(len(pe & pi) / max(len(pe), 1), 4)
    out["subset_ivf_extra_pairs"] = len(pi - pe)
    out["faiss_version"] = faiss.__version__
    return out


def markdown(doc: dict) -> str:
    r = doc["result"]
    return "\n".join(
        [
            "# Near-duplicate grouping speed",
            "",
            f"Machine: {doc['machine']}; faiss {r['faiss_version']}. Command: `{doc['command']}`",
            "",
            "| images | dim | threshold | find_duplicates (s) | pair search alone (s) | groups | planted copies "
            "found | "
            f"IVF pair recall vs exact ({r['subset_checked']} images) |",
            "|---|---|---|---|---|---|---|---|",
            f"| {r['n']} | {r['dim']} | {r['threshold']} | {r['find_duplicates_s']} | {r['range_search_s']} | "
            f"{r['groups_found']} ({r['planted_groups']} planted) | {r['planted_copies_recall']} | "
            f"{r['subset_ivf_pair_recall']} |",
            "",
        ]
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--dup-fraction", type=float, default=0.1)
    ap.add_argument("--check", type=int, default=20_000, help="Images in the exact-vs-IVF subset check.")
    ap.add_argument("--tiny", action="store_true", help="2000 vectors of dim 32: seconds.")
    ap.add_argument("--out", default="benchmarks/out")
    a = ap.parse_args(argv)
    if a.tiny:
        a.n, a.dim, a.check = 2000, 32, 2000
    command = "python benchmarks/duplicates.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    doc = {
        "machine": f"{MACHINE}, {platform.processor() or platform.machine()}",
        "command": command,
        "result": run(a.n, a.dim, a.threshold, a.dup_fraction, a.check),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "duplicates.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "duplicates.md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"reproduce: {command}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
