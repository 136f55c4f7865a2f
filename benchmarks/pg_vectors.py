"""PostgreSQL + pgvector against the embedded store, side by side on the same vectors and queries: HNSW recall@10
against exact search, single-query latency (p50/p95) across `hnsw.ef_search`, the exact scan, a 10% filter, and
the embedded store's ivfsq (FAISS) tuned to the same recall target.

Data, queries and ground truth are speed_vectors.py's (clustered CLIP-like vectors, text-like noisy queries and
image-like clean ones). The PostgreSQL side is a real server from pgserver; vectors go through the collection
schema of retrieval/store/pg (schema.py) and queries through PgVectorIndex.search, the code `retrieval search`
runs, so each query pays what a user's query pays (a transaction that sets ef_search, the SELECT, the round
trips over the unix socket). The HNSW index is built after a bulk COPY, as `retrieval copy` and a first
publish of many rows would meet it.

Usage:
  python benchmarks/pg_vectors.py --sizes 100000,1000000 --queries 200 --out benchmarks/out
  python benchmarks/pg_vectors.py --tiny --out /tmp/x       # seconds; the smoke test runs this
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import speed_vectors as sv  # noqa: E402 -- data, ground truth, latency and recall helpers shared with it

K = sv.K
COLLECTION = "bench"


def _server(pgdata: Path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    return pgserver.get_server(pgdata, cleanup_mode="stop")


def load_collection(
    uri: str, x: np.ndarray, maintenance_mem: str, workers: int, m: int | None = None, efc: int | None = None
) -> tuple[object, dict]:
    """A fresh collection holding x as image vectors (ids 1..n), its HNSW index built after the COPY."""
    from retrieval.store.pg.db import PgStore
    from retrieval.store.pg.index import open_connection
    from retrieval.store.pg.location import parse_location
    from retrieval.store.pg.schema import (
        HNSW_EF_CONSTRUCTION,
        HNSW_M,
        drop_collection,
        drop_vector_indexes,
        ensure_vector_tables,
    )

    loc = parse_location(f"{uri}{'&' if '?' in uri else '?'}collection={COLLECTION}")
    conn = open_connection(loc, write=True)  # creates pgvector in the database when it is missing
    drop_collection(conn, COLLECTION)
    PgStore(loc, conn)  # creates the schema by its migrations
    ensure_vector_tables(conn, COLLECTION, x.shape[1])
    drop_vector_indexes(conn)  # built once after the COPY, below
    n, res = len(x), {}
    m, efc = m or HNSW_M, efc or HNSW_EF_CONSTRUCTION  # the store's own unless exploring others
    t = time.perf_counter()
    with conn.cursor() as cur:
        with cur.copy("COPY images (id, path, path_raw, hash) FROM STDIN WITH (FORMAT BINARY)") as cp:
            cp.set_types(["int8", "text", "bytea", "text"])
            for i in range(n):
                name = f"/bench/{i:07d}.jpg"
                cp.write_row([i + 1, name, name.encode(), f"{i:016x}"])
        with cur.copy("COPY image_vectors (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as cp:
            cp.set_types(["int8", "vector"])
            for i in range(n):
                cp.write_row([i + 1, x[i]])
    res["copy_s"] = round(time.perf_counter() - t, 2)
    conn.execute(f"SET maintenance_work_mem = '{maintenance_mem}'")
    conn.execute(f"SET max_parallel_maintenance_workers = {int(workers)}")
    t = time.perf_counter()
    conn.execute(
        f"CREATE INDEX image_vectors_hnsw ON image_vectors USING hnsw (embedding vector_ip_ops) "
        f"WITH (m = {int(m)}, ef_construction = {int(efc)})"
    )
    res["hnsw_build_s"] = round(time.perf_counter() - t, 2)
    conn.execute("VACUUM ANALYZE images")
    conn.execute("VACUUM ANALYZE image_vectors")
    size = conn.execute("SELECT pg_relation_size('image_vectors_hnsw'), pg_total_relation_size('image_vectors')")
    hnsw_bytes, table_bytes = size.fetchone()
    res["hnsw_bytes_per_vector"] = round(hnsw_bytes / n, 1)
    res["table_bytes_per_vector"] = round(table_bytes / n, 1)
    res["hnsw_params"] = {"m": m, "ef_construction": efc}
    return conn, res


def _pg_point(vi, qs, truth, ids_of, allowed=None, probes=None) -> dict:
    """Latency and recall of one setting over the query set (ids 1..n ↔ rows 0..n-1)."""
    found, times, cpu, plans = [], [], [], set()
    for q in qs:
        c, t = time.process_time(), time.perf_counter()
        _, i = vi.search(q[None], K, allowed_ids=allowed, probes=probes)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        found.append(i[0] - 1)
        plan = vi.last_plan
        plans.add(f"{plan.method}{'+exact fallback' if plan.fell_back else ''}")
    found = np.array(found)
    ms = np.array(times) * 1e3
    return {
        "recall_at_10": round(sv.recall_at_k(found, truth), 4),
        "p50_ms": round(float(np.median(ms)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "client_cpu_p50_ms": round(float(np.median(cpu)) * 1e3, 3),
        "min_results": int((found >= 0).sum(axis=1).min()),
        "plans": sorted(plans),
        "only_allowed": None if allowed is None else bool(set((found[found >= 0] + 1).ravel()) <= set(allowed)),
    }


def run_pg(uri: str, cache: Path, n: int, args) -> dict:
    from retrieval.store.pg.vectors import PgVectorIndex, config_for

    data = np.load(cache / "data.npz")
    x = data["x"]
    conn, res = load_collection(uri, x, args.maintenance_mem, args.build_workers, args.m, args.ef_construction)
    del x
    res.update({"size": n, "store": "postgresql", "kind": "hnsw"})
    q_text, q_image = data["q_text"], data["q_image"]
    vi = PgVectorIndex(conn, "images", q_text.shape[1], n, config_for("hnsw"))
    vi.search(q_text[:5], K)  # warm the cache
    sweep = []
    for ef in args.ef_sweep:
        point = _pg_point(vi, q_text, data["gt_text"], None, probes=ef)
        sweep.append({"ef_search": ef, **point})
    res["sweep"] = sweep
    ok = [p for p in sweep if p["recall_at_10"] >= args.target_recall]
    tuned = ok[0] if ok else max(sweep, key=lambda p: p["recall_at_10"])
    res["tuned"] = {**tuned, "target_recall": args.target_recall, "reached": bool(ok)}
    res["image_at_tuned"] = _pg_point(vi, q_image, data["gt_image"], None, probes=tuned["ef_search"])
    res["default"] = _pg_point(vi, q_text, data["gt_text"], None)  # the shipped EF_SEARCH_DEFAULT
    nq = min(len(q_text), args.exact_queries)
    exact = PgVectorIndex(conn, "images", q_text.shape[1], n, config_for("flat"))
    res["exact"] = _pg_point(exact, q_text[:nq], data["gt_text"][:nq], None)
    res["exact"]["queries"] = nq
    allowed = (data["allowed"] + 1).tolist()  # 10% of the rows, as a path filter selects them
    res["filtered"] = {
        "allowed_fraction": round(len(allowed) / n, 4),
        **_pg_point(vi, q_text, data["gt_filtered"], None, allowed=allowed),
    }
    conn.close()
    return res


def run_embedded(cache: Path, n: int, args) -> dict:
    ns = argparse.Namespace(
        hnsw_m=None,
        hnsw_efc=None,
        ef_sweep=args.ef_sweep,
        nprobe_sweep=args.nprobe_sweep,
        target_recall=args.target_recall,
        tmpdir=args.tmpdir,
    )
    res = sv.run_worker(cache, n, "ivfsq", ns)
    res["store"] = "embedded"
    return res


def table(results: list[dict]) -> str:
    head = (
        "| size | store | index | setting at recall target | recall@10 text | recall@10 image | p50 ms | p95 ms "
        "| filtered 10%: p50 ms, recall@10, plan | build s | bytes/vector |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(results, key=lambda r: (r["size"], r["store"])):
        tu = r["tuned"]
        f = r["filtered"]
        if r["store"] == "postgresql":
            setting = f"ef_search={tu['ef_search']}"
            build = f"{r['copy_s']:.0f} COPY + {r['hnsw_build_s']:.0f} HNSW"
            size = f"{r['hnsw_bytes_per_vector'] + r['table_bytes_per_vector']:.0f} (table+HNSW)"
            plan = "; ".join(f["plans"])
            kind = f"HNSW m={r['hnsw_params']['m']}, efc={r['hnsw_params']['ef_construction']}"
        else:
            setting = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k in ("nlist", "nprobe"))
            build = f"{r['build_s']:.0f}"
            size = f"{r['bytes_per_vector']:.0f}"
            plan = "FAISS id selector"
            kind = r["built_kind"]
        lines.append(
            f"| {r['size']:,} | {r['store']} | {kind} | {setting} | {tu['recall_at_10']:.3f} "
            f"| {r['image_at_tuned']['recall_at_10']:.3f} | {tu['p50_ms']:.2f} | {tu['p95_ms']:.2f} "
            f"| {f['p50_ms']:.2f}, {f['recall_at_10']:.3f}, {plan} | {build} | {size} |"
        )
    return "\n".join(lines)


def sweep_table(results: list[dict]) -> str:
    lines = ["| size | ef_search | recall@10 text | p50 ms | p95 ms |", "|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["size"]):
        if r["store"] != "postgresql":
            continue
        for p in r["sweep"]:
            lines.append(
                f"| {r['size']:,} | {p['ef_search']} | {p['recall_at_10']:.3f} | {p['p50_ms']:.2f} "
                f"| {p['p95_ms']:.2f} |"
            )
        e = r["exact"]
        lines.append(
            f"| {r['size']:,} | exact scan ({e['queries']} queries) | {e['recall_at_10']:.3f} | "
            f"{e['p50_ms']:.2f} | {e['p95_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--exact-queries", type=int, default=50, help="queries for the (slow) exact scan")
    ap.add_argument("--ef-sweep", default="40,100,200,400,700,1000")
    ap.add_argument("--nprobe-sweep", default="4,8,16,32,64,128,256")
    ap.add_argument("--target-recall", type=float, default=0.98)
    ap.add_argument("--query-noise", type=float, default=2.0)
    ap.add_argument("--maintenance-mem", default="8GB", help="maintenance_work_mem for the HNSW build")
    ap.add_argument("--build-workers", type=int, default=1, help="max_parallel_maintenance_workers")
    ap.add_argument("--m", type=int, default=None, help="HNSW m (default: the store's, schema.py)")
    ap.add_argument("--ef-construction", type=int, default=None, help="HNSW ef_construction (default: the store's)")
    ap.add_argument("--stores", default="postgresql,embedded")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--name", default="pg_vectors")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--tiny", action="store_true", help="2,000 vectors, dim 32, 20 queries: a smoke test")
    args = ap.parse_args(argv)
    if args.tiny:
        args.sizes, args.dim, args.queries, args.exact_queries = "2000", 32, 20, 10
    sizes = sv.parse_ints(args.sizes)
    args.ef_sweep = sv.parse_ints(args.ef_sweep)
    args.nprobe_sweep = sv.parse_ints(args.nprobe_sweep)
    stores = args.stores.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/pg_vectors.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"reproduce: {command}", flush=True)
    results = []
    work = Path(tempfile.mkdtemp(prefix="pgb-", dir=args.tmpdir or ("/tmp" if Path("/tmp").is_dir() else None)))
    server = _server(work / "data") if "postgresql" in stores else None
    try:
        for n in sizes:
            cache = work / f"n{n}"
            cache.mkdir()
            sv.prepare(n, args.dim, args.queries, cache, args.seed, args.query_noise)
            for store in stores:
                t = time.perf_counter()
                r = run_pg(server.get_uri(), cache, n, args) if store == "postgresql" else run_embedded(cache, n, args)
                r["wall_s"] = round(time.perf_counter() - t, 1)
                r["load_avg"] = [round(v, 2) for v in os.getloadavg()]
                results.append(r)
                tu = r["tuned"]
                print(
                    f"  n={n:,} {store}: recall@10 {tu['recall_at_10']:.3f} p50 {tu['p50_ms']:.2f} ms "
                    f"(load {r['load_avg'][0]})",
                    flush=True,
                )
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    meta = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "dim": args.dim,
        "queries": args.queries,
        "k": K,
    }
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = [
        f"# PostgreSQL + pgvector against the embedded store ({args.dim}-d, {args.queries} queries, k={K})",
        "",
        f"`{command}` on {meta['machine']}.",
        "",
        table(results),
        "",
        "HNSW sweep (text-like queries):",
        "",
        sweep_table(results),
        "",
    ]
    (out / f"{args.name}.md").write_text("\n".join(md))
    print(f"wrote {out / args.name}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
