"""`--executor ray` into a PostgreSQL collection: embeddings written through the driver (`--ray-write driver`)
against written by the encode actors themselves (`--ray-write direct`).

    python benchmarks/ray_pg_write.py                         # 200 photos of 1600x1200, tiny-clip:none, 3 pairs
    python benchmarks/ray_pg_write.py --n 200 --model ViT-B-32:none --repeat 2

Two measurements, in one run, against one real PostgreSQL (pgserver):
- the commit ceilings: how many images/s the driver can commit per 64-image transaction when it writes the
  rows and their raw embeddings (driver mode), or the rows alone (direct mode), and how fast W concurrent
  writer processes (the actors' part in direct mode) commit embeddings alone;
- end to end: the same photo folder indexed into a fresh collection per run with a local Ray instance,
  alternating the two modes, medians reported, and both collections checked to hold the same vectors.
Writes benchmarks/out/ray_pg_write.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RETRIEVAL_MODEL_CONFIGS", str(ROOT / "tests" / "model_configs"))
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ray_index import _photos  # noqa: E402 -- the same generated JPEGs as the Ray benchmark

BATCH = 64


def _server(pgdata: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    return pgserver.get_server(pgdata, cleanup_mode="stop")


def _collection(uri: str) -> str:
    return f"{uri}{'&' if '?' in uri else '?'}collection=b_{uuid.uuid4().hex[:12]}"


def _writer(url: str, first: int, n: int, dim: int, rows: bool, embeddings: bool, out) -> None:
    """Commit n images in 64-row transactions: rows, embeddings or both. Puts the seconds taken on `out`."""
    from retrieval.store.index import Index

    rng = np.random.default_rng(first)
    with Index.open_for_write(url) as idx:
        store = idx.store
        t0 = time.perf_counter()
        for i in range(first, first + n, BATCH):
            m = min(BATCH, first + n - i)
            keys = [f"{j:064x}" for j in range(i, i + m)]
            with store.transaction():
                if embeddings:
                    store.put_embeddings("image", keys, rng.standard_normal((m, dim)).astype(np.float32))
                if rows:
                    for j, k in enumerate(keys):
                        store.upsert_image(f"/photos/img_{i + j:08d}.jpg", 1000, 1, k, 1600, 1200)
        out.put(time.perf_counter() - t0)


def commit_rates(uri: str, dim: int, n: int, writers: int) -> dict:
    res = {}
    for name, rows, emb in (("driver_rows_and_embeddings", True, True), ("driver_rows_only", True, False)):
        q = mp.Queue()
        _writer(_collection(uri), 0, n, dim, rows, emb, q)
        res[name] = round(n / q.get(), 1)
    url, q = _collection(uri), mp.Queue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from retrieval.store.index import Index

        Index.open_for_write(url).close()  # the schema first, as the driver makes it
    t0 = time.perf_counter()
    ps = [mp.Process(target=_writer, args=(url, w * n, n, dim, False, True, q)) for w in range(writers)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    res[f"{writers}_actors_embeddings_only"] = round(writers * n / (time.perf_counter() - t0), 1)
    return res


def _run(folder: Path, url: str, model: str, mode: str) -> dict:
    from index_data.options import IndexOptions
    from index_data.pipeline import run_index

    opts = IndexOptions(paths=[str(folder)], model=model, device="cpu", progress=False, executor="ray", ray_write=mode)
    t0 = time.perf_counter()
    r = run_index(url, opts)
    wall = time.perf_counter() - t0
    return {"mode": mode, "wall_s": round(wall, 2), "encoded": r.encoded, "images_per_s": round(r.encoded / wall, 2)}


def _vectors(url: str) -> dict:
    from retrieval.store.index import Index

    with Index.open(url) as idx:
        hashes = sorted(h for (h,) in idx.store.db.execute("SELECT DISTINCT hash FROM images"))
        return dict(zip(hashes, idx.store.get_embeddings("image", hashes, idx.identity.dim)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="photos (1600x1200 JPEG)")
    ap.add_argument("--model", default="tiny-clip:none")
    ap.add_argument("--repeat", type=int, default=3, help="alternated driver/direct pairs; medians reported")
    ap.add_argument("--commit-n", type=int, default=4096, help="images per commit-rate measurement")
    ap.add_argument("--writers", type=int, default=2, help="concurrent embedding writers (the actors)")
    ap.add_argument("--dim", type=int, default=512, help="vector size for the commit rates")
    ap.add_argument("--data", default=str(ROOT / "benchmarks" / "data" / "ray_index"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = ap.parse_args(argv)
    command = "python benchmarks/ray_pg_write.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"reproduce: {command}", flush=True)
    folder = _photos(Path(args.data), args.n)
    work = Path(tempfile.mkdtemp(prefix="rpw-", dir="/tmp"))
    os.environ.setdefault("RETRIEVAL_CACHE_DIR", str(work / "cache"))
    server = _server(work / "data")
    try:
        uri = server.get_uri()
        rates = commit_rates(uri, args.dim, args.commit_n, args.writers)
        print(f"  commit ceilings, images/s: {rates}", flush=True)
        _run(folder, _collection(uri), args.model, "driver")  # warm-up, not counted: makes the model's export
        runs, urls = [], {}
        for rnd in range(args.repeat):
            for mode in ("driver", "direct") if rnd % 2 == 0 else ("direct", "driver"):
                url = _collection(uri)
                r = _run(folder, url, args.model, mode)
                r["round"], r["load_avg"] = rnd, round(os.getloadavg()[0], 2)
                runs.append(r)
                urls.setdefault(mode, url)
                print(f"  round {rnd} {mode}: {r['wall_s']} s, {r['images_per_s']} images/s", flush=True)
        a, b = _vectors(urls["driver"]), _vectors(urls["direct"])
        assert a.keys() == b.keys()
        diff = max(float(np.abs(a[h] - b[h]).max()) for h in a)
    finally:
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    med = {m: float(np.median([r["wall_s"] for r in runs if r["mode"] == m])) for m in ("driver", "direct")}
    summary = {
        "command": command,
        "machine": f"{os.cpu_count()} cores",
        "model": args.model,
        "photos": args.n,
        "commit_ceilings_images_per_s": rates,
        "runs": runs,
        "median_wall_s": med,
        "direct_over_driver_speed": round(med["driver"] / med["direct"], 3),
        "max_abs_vector_diff": diff,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_pg_write.json").write_text(json.dumps(summary, indent=1))
    md = [
        f"# Ray into PostgreSQL: driver writes against actor writes ({args.n} photos, {args.model})",
        "",
        f"`{command}`",
        "",
        "| commit ceiling | images/s |",
        "|---|---|",
        *[f"| {k.replace('_', ' ')} | {v:,.0f} |" for k, v in rates.items()],
        "",
        "| mode | median wall s | runs (s) |",
        "|---|---|---|",
        *[
            f"| {m} | {med[m]:.1f} | {', '.join(str(r['wall_s']) for r in runs if r['mode'] == m)} |"
            for m in ("driver", "direct")
        ],
        "",
        f"direct ÷ driver speed: {summary['direct_over_driver_speed']}×; same vectors (max abs diff {diff:.1e}).",
        "",
    ]
    (out / "ray_pg_write.md").write_text("\n".join(md))
    print(f"wrote {out / 'ray_pg_write.json'} and .md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
