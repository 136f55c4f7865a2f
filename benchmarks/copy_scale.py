"""Cost of `retrieval copy` at scale: a synthetic directory index of --n images (one caption each, --dim raw
embeddings, random unit vectors) copied into PostgreSQL (pgserver, local socket) and back into a directory,
each copy a `python cli.py copy` child whose wall time and peak memory (ru_maxrss) are measured.

No model and no image is involved: rows are written straight into a real `Store` (the engine's schema), and
the source's vectors published once by its own path. The copies are checked (counts, `verify`).

    python benchmarks/copy_scale.py                   # 100k images, 512-d
    python benchmarks/copy_scale.py --n 5000          # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval.modelspec import ModelIdentity  # noqa: E402
from retrieval.store.index import Index  # noqa: E402
from retrieval.store.rows import text_hash  # noqa: E402

IMAGE_COLS = ("id", "path", "path_raw", "size", "mtime_ns", "hash", "width", "height", "added_at", "status")


def _unit(rng, n, dim):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def build_source(root: Path, n: int, dim: int, chunk: int = 10_000) -> float:
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    with Index.open_for_write(root) as idx:
        idx.set_model(ModelIdentity("synthetic:none", "synthetic", "none", None, dim))
        store = idx.store
        with store.transaction():
            for start in range(0, n, chunk):
                ids = range(start + 1, min(n, start + chunk) + 1)
                paths = [f"/photos/album_{i % 100:03d}/img_{i:07d}.jpg" for i in ids]
                hashes = [f"{i:064x}" for i in ids]
                store.insert_rows(
                    "images",
                    IMAGE_COLS,
                    (
                        (i, p, p.encode(), 100_000 + i, 1_700_000_000_000_000_000 + i, h, 640, 480, 1.7e9, "ok")
                        for i, p, h in zip(ids, paths, hashes)
                    ),
                )
                texts = [f"caption of photo {i}" for i in ids]
                store.insert_rows(
                    "captions",
                    ("id", "image_id", "text", "text_hash", "source"),
                    ((i, i, t, text_hash(t), "corpus") for i, t in zip(ids, texts)),
                )
                store.put_embeddings("image", hashes, _unit(rng, len(hashes), dim))
                store.put_embeddings("text", [text_hash(t) for t in texts], _unit(rng, len(texts), dim))
        idx.sync_vectors(requested_type="auto")
    return time.perf_counter() - t0


def timed_cli(*args) -> dict:
    """One `python cli.py ...` child: wall seconds, peak RSS (VmHWM, polled: ru_maxrss of a child forked from
    this big process would count the parent's pages) and its last output line."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "cli.py", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    peak = 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                peak = max(peak, next(int(line.split()[1]) for line in f if line.startswith("VmHWM")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.2)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {err.decode()[-2000:]}")
    return {
        "seconds": round(wall, 1),
        "peak_rss_mib": round(peak / 1024),
        "output": out.decode().strip().splitlines()[-1:],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    a = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    # a short directory: the server's unix socket lives in it
    base = Path(tempfile.mkdtemp(prefix="copyscale-", dir="/tmp"))
    server = pgserver.get_server(base / "pg", cleanup_mode="stop")
    try:
        url = f"{server.get_uri()}&collection=copy_scale"
        result = {"n": a.n, "dim": a.dim, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
        result["load_average"] = [round(x, 2) for x in os.getloadavg()]
        result["build_source_s"] = round(build_source(base / "src", a.n, a.dim), 1)
        runs = {}
        for name, src, dst in (("dir_to_pg", base / "src", url), ("pg_to_dir", url, base / "back")):
            r = timed_cli("copy", "--from", src, "--to", dst, "--json")
            rep = json.loads(r["output"][0])
            runs[name] = {
                "seconds": r["seconds"],
                "peak_rss_mib": r["peak_rss_mib"],
                "images": rep["images"],
                "captions": rep["captions"],
                "embeddings": rep["embeddings"],
                "index_type": rep["index_type"],
            }
        for name, index in (("verify_pg", url), ("verify_dir", base / "back")):
            t0 = time.perf_counter()
            p = subprocess.run(
                [sys.executable, "cli.py", "verify", "--index", str(index)], cwd=ROOT, capture_output=True
            )
            runs[name] = {"ok": p.stdout.decode().strip() == "ok", "seconds": round(time.perf_counter() - t0, 1)}
        result["runs"] = runs
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        print(json.dumps(result, indent=1))
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
