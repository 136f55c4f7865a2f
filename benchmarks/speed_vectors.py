"""Vector-index speed benchmark: build time, single-query latency, recall@10 vs exact, bytes per
vector, peak RSS, load time (plain and mmap) and filtered latency, for each size and index kind.

Data are synthetic but clustered, shaped like CLIP embeddings rather than uniform noise (uniform
random vectors in 512-d make every neighbour equidistant, which is not what ANN meets in practice):
a shared mean direction, ~sqrt(n) Zipf-sized clusters, a 64-d latent with a decaying spectrum, and a
little isotropic noise (random pairs cos ~0.3, nearest neighbour cos ~0.8 at 100k).
Two query sets:
  - "text": held-out points plus strong isotropic noise (top-1 cosine ~0.38, like CLIP text->image).
    Such queries sit off the data manifold, the harder case for graphs; this is the headline set.
  - "image": held-out points as they are (image->image search).

Each (size, kind) runs in its own subprocess so that peak RSS (getrusage) belongs to that kind.
Usage:
  python benchmarks/speed_vectors.py --sizes 10000,100000,1000000 --dim 512 --kinds flat,hnsw,ivfflat,ivfsq,ivfpq \
      --queries 200 --out benchmarks/out
  python benchmarks/speed_vectors.py --tiny --out /tmp/x      # seconds; the smoke test runs this
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MACHINE = "2-core CPU machine (no GPU)"
K = 10


# --------------------------------------------------------------------------- data
def make_vectors(n: int, dim: int, seed: int = 0, latent: int = 64, chunk: int = 100_000) -> np.ndarray:
    """Clustered, normalised float32 vectors (see module docstring). Deterministic in (n, dim, seed)
    for the generator state, so every worker process sees identical data."""
    rng = np.random.default_rng(seed)
    n_clusters = max(8, int(np.sqrt(n)))
    latent = min(latent, dim)
    mu = rng.standard_normal(dim)
    mu /= np.linalg.norm(mu)
    centers = rng.standard_normal((n_clusters, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.7
    weights /= weights.sum()
    basis, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
    spectrum = np.arange(1, latent + 1) ** -0.5
    spectrum /= np.sqrt((spectrum**2).sum())
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        c = rng.choice(n_clusters, m, p=weights)
        lat = (rng.standard_normal((m, latent)) * spectrum) @ basis.T
        noise = rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        x = 0.55 * mu + 0.6 * centers[c] + 0.55 * lat + 0.3 * noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + m] = x
    return out


def make_queries(held_out: np.ndarray, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = held_out + noise * rng.standard_normal(held_out.shape).astype(np.float32) / np.sqrt(held_out.shape[1])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return np.ascontiguousarray(q, dtype=np.float32)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int, allowed_mask: np.ndarray | None = None) -> np.ndarray:
    """Ground truth ids (= row numbers) by brute force, in blocks to bound memory."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for s in range(0, len(x), 200_000):
        block = x[s : s + 200_000]
        sc = q @ block.T
        if allowed_mask is not None:
            sc[:, ~allowed_mask[s : s + 200_000]] = -np.inf
        cs = np.concatenate([best_s, sc], axis=1)
        ci = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + len(block)), sc.shape)], axis=1)
        top = np.argpartition(-cs, k - 1, axis=1)[:, :k]
        ts, ti = np.take_along_axis(cs, top, 1), np.take_along_axis(ci, top, 1)
        order = np.argsort(-ts, axis=1)
        best_s, best_i = np.take_along_axis(ts, order, 1), np.take_along_axis(ti, order, 1)
    return best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [
        len(set(a[a >= 0].tolist()) & set(b[b >= 0].tolist())) / max(int((b >= 0).sum()), 1)
        for a, b in zip(found, truth)
    ]
    return float(np.mean(hits))


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return float("nan")


def ru_maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e6 if sys.platform == "darwin" else r / 1e3  # bytes on macOS, KiB elsewhere


def peak_rss_mb() -> float:
    """This process's own peak RSS. Linux's ru_maxrss survives fork+exec, so a worker would report the
    parent's peak when that is higher; VmHWM belongs to the worker's own address space."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e3
    except OSError:
        pass
    return ru_maxrss_mb()


# --------------------------------------------------------------------------- worker
def _latencies(vi, queries: np.ndarray, allowed=None, cpu: list | None = None):
    """Wall ms per single query; CPU ms of the calling thread go to `cpu` when given. Single queries
    run on one OpenMP thread, so CPU time is what the wall time would be on an idle core: the
    shared machine's load inflates wall times several-fold."""
    ids, times = [], []
    for q in queries:
        c = time.thread_time()
        t = time.perf_counter()
        _, i = vi.search(q[None], K, allowed_ids=allowed)
        times.append(time.perf_counter() - t)
        if cpu is not None:
            cpu.append(time.thread_time() - c)
        ids.append(i[0])
    return np.array(ids), np.array(times) * 1e3


def run_worker(cache: Path, n: int, kind: str, args) -> dict:
    import faiss

    from retrieval.store import vector_kinds as VK
    from retrieval.store import vectors as V

    data = np.load(cache / "data.npz")
    x = data["x"]
    qsets = {"text": data["q_text"], "image": data["q_image"]}
    truth = {"text": data["gt_text"], "image": data["gt_image"]}
    allowed, gt_filtered = data["allowed"], data["gt_filtered"]
    del data
    ids = np.arange(len(x), dtype=np.int64)
    dim = x.shape[1]
    cfg = VK.choose_config(n, dim, kind)
    if kind == "hnsw":
        cfg.params.update({"M": args.hnsw_m, "efConstruction": args.hnsw_efc})
    rss0 = rss_mb()
    t = time.perf_counter()
    vi = V.VectorIndex.build(dim, ids, x, cfg)
    build_s = time.perf_counter() - t
    index_rss = rss_mb() - rss0
    real_kind = vi.config.kind
    res: dict = {
        "size": n,
        "kind": kind,
        "built_kind": real_kind,
        "dim": dim,
        "params": dict(vi.config.params),
        "build_s": round(build_s, 3),
        "index_rss_mb": round(index_rss, 1),
        "faiss_threads_default": faiss.omp_get_max_threads(),
    }
    del x

    with tempfile.TemporaryDirectory(dir=args.tmpdir) as td:
        path = Path(td) / "bench.faiss"
        t = time.perf_counter()
        vi.save(path)
        res["save_s"] = round(time.perf_counter() - t, 3)
        res["file_bytes"] = path.stat().st_size
        res["bytes_per_vector"] = round(path.stat().st_size / n, 1)
        t = time.perf_counter()
        loaded = V.VectorIndex.load(path)
        res["load_ms"] = round((time.perf_counter() - t) * 1e3, 2)
        del loaded
        t = time.perf_counter()
        mm = V.VectorIndex.load(path, mmap=True)
        res["load_mmap_ms"] = round((time.perf_counter() - t) * 1e3, 2)
        t = time.perf_counter()
        mm.search(qsets["text"][:1], K)
        res["first_query_after_mmap_ms"] = round((time.perf_counter() - t) * 1e3, 2)
        del mm

    # Sweep the speed/recall knob; the tuned point is the cheapest that reaches the target recall.
    knob = VK.probes_param(real_kind)
    values = {"efSearch": args.ef_sweep, "nprobe": args.nprobe_sweep}.get(knob, [None])
    if knob == "nprobe":
        values = [v for v in values if v <= vi.config.params["nlist"]] or [vi.config.params["nlist"]]
    sweeps = {}
    for name, qs in qsets.items():
        pts = []
        for v in values:
            if knob:
                vi.config.params[knob] = int(v)
            vi.search(qs[:5], K)  # warm
            cpu: list = []
            found, ms = _latencies(vi, qs, cpu=cpu)
            pts.append(
                {
                    knob or "exact": v,
                    "recall_at_10": round(recall_at_k(found, truth[name]), 4),
                    "p50_ms": round(float(np.median(ms)), 3),
                    "p95_ms": round(float(np.percentile(ms, 95)), 3),
                    "cpu_p50_ms": round(float(np.median(cpu)) * 1e3, 3),
                }
            )
        sweeps[name] = pts
    res["sweep"] = sweeps
    text_pts = sweeps["text"]
    ok = [p for p in text_pts if p["recall_at_10"] >= args.target_recall]
    if ok:
        tuned = ok[0]
    else:  # target out of reach (ivfpq: PQ caps recall): the cheapest point within 0.005 of the best
        best = max(p["recall_at_10"] for p in text_pts)
        tuned = next(p for p in text_pts if p["recall_at_10"] >= best - 0.005)
    res["tuned"] = {**tuned, "target_recall": args.target_recall, "reached": bool(ok)}
    if knob:
        vi.config.params[knob] = int(tuned[knob])
        res["params"][knob] = int(tuned[knob])
    img = next(p for p in sweeps["image"] if (p.get(knob or "exact") == tuned.get(knob or "exact")))
    res["image_at_tuned"] = img

    # Default OpenMP threads for single queries (the module uses 1 thread for them; see vectors.py).
    saved = V.SINGLE_QUERY_THREADS
    V.SINGLE_QUERY_THREADS = None
    _, ms = _latencies(vi, qsets["text"])
    V.SINGLE_QUERY_THREADS = saved
    res["default_threads_p50_ms"] = round(float(np.median(ms)), 3)
    res["default_threads_p95_ms"] = round(float(np.percentile(ms, 95)), 3)

    # Filter: 10% of ids allowed (what a path filter does).
    cpu = []
    found, ms = _latencies(vi, qsets["text"], allowed=allowed, cpu=cpu)
    allowed_set = set(allowed.tolist())
    res["filtered"] = {
        "allowed_fraction": round(len(allowed) / n, 4),
        "p50_ms": round(float(np.median(ms)), 3),
        "cpu_p50_ms": round(float(np.median(cpu)) * 1e3, 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "recall_at_10": round(recall_at_k(found, gt_filtered), 4),
        "min_results": int((found >= 0).sum(axis=1).min()),
        "only_allowed": bool(all(int(i) in allowed_set for i in found[found >= 0].ravel())),
    }
    # Batch throughput with default threads, for the indexing / evaluation paths.
    t = time.perf_counter()
    vi.search(qsets["text"], K)
    res["batch_qps"] = round(len(qsets["text"]) / (time.perf_counter() - t), 1)
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)  # includes the raw input vectors (n * dim * 4 bytes)
    res["ru_maxrss_mb"] = round(ru_maxrss_mb(), 1)
    return res


# --------------------------------------------------------------------------- driver
def prepare(n: int, dim: int, n_queries: int, cache: Path, seed: int, query_noise: float) -> None:
    t = time.perf_counter()
    allx = make_vectors(n + n_queries, dim, seed=seed + n)
    x, held = allx[:n], allx[n:]
    q_text = make_queries(held, query_noise, seed + 1)
    q_image = make_queries(held, 0.0, seed + 2)
    rng = np.random.default_rng(seed + 3)
    allowed = np.sort(rng.choice(n, max(K, n // 10), replace=False)).astype(np.int64)
    mask = np.zeros(n, bool)
    mask[allowed] = True
    gt_text = exact_topk(x, q_text, K)
    gt_image = exact_topk(x, q_image, K)
    gt_filtered = exact_topk(x, q_text, K, mask)
    np.savez(
        cache / "data.npz",
        x=x,
        q_text=q_text,
        q_image=q_image,
        gt_text=gt_text,
        gt_image=gt_image,
        allowed=allowed,
        gt_filtered=gt_filtered,
    )
    print(f"  data n={n} dim={dim}: generated + ground truth in {time.perf_counter() - t:.1f}s", flush=True)


def fmt_table(results: list[dict]) -> str:
    head = (
        "| size | kind | params | build s | bytes/vec | p50 ms | p95 ms | CPU p50 ms | recall@10 text | "
        "recall@10 image "
        "| p50 ms (default threads) | filtered 10% p50 ms | filtered recall@10 | load ms | mmap load ms "
        "| index RSS MB | peak RSS MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(results, key=lambda r: (r["size"], r["kind"])):
        p = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k not in ("reason",))
        kind = r["kind"] if r["built_kind"] == r["kind"] else f"{r['kind']}→{r['built_kind']}"
        tu = r["tuned"]
        lines.append(
            f"| {r['size']:,} | {kind} | {p} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} | {tu['p50_ms']:.2f} "
            f"| {tu['p95_ms']:.2f} | {_f(tu.get('cpu_p50_ms'))} | {tu['recall_at_10']:.3f} | "
            f"{r['image_at_tuned']['recall_at_10']:.3f} "
            f"| {r['default_threads_p50_ms']:.2f} | {r['filtered']['p50_ms']:.2f} | "
            f"{r['filtered']['recall_at_10']:.3f} "
            f"| {r['load_ms']:.0f} | {r['load_mmap_ms']:.1f} | {r['index_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def plot(results: list[dict], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # matplotlib is optional (the `bench` extra)
        return []
    written = []
    kinds = sorted({r["kind"] for r in results})
    colors = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(kinds)}
    sizes = sorted({r["size"] for r in results})
    markers = dict(zip(sizes, "osD^vP*X"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in kinds:
        rs = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["size"])
        ax.plot([r["size"] for r in rs], [r["tuned"]["p50_ms"] for r in rs], "-", color=colors[kind], label=kind)
        for r in rs:  # hollow marker: target recall not reached, the best point is shown
            ax.plot(
                r["size"],
                r["tuned"]["p50_ms"],
                "o",
                color=colors[kind],
                markerfacecolor=colors[kind] if r["tuned"]["reached"] else "white",
            )
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("vectors"), ax.set_ylabel("single-query p50 ms, wall (k=10)")
    ax.set_title("Latency vs size (cheapest setting with recall@10 ≥ target;\nhollow: target not reached)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speed_vectors_latency.png", dpi=120)
    written.append(str(out / "speed_vectors_latency.png"))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in sorted(results, key=lambda r: (r["kind"], r["size"])):
        pts = r["sweep"]["text"]
        ax.plot(
            [p["p50_ms"] for p in pts],
            [p["recall_at_10"] for p in pts],
            "-",
            marker=markers[r["size"]],
            color=colors[r["kind"]],
            label=f"{r['kind']} {r['size']:,}",
            markersize=4,
        )
    ax.set_xscale("log")
    ax.set_xlabel("single-query p50 ms, wall"), ax.set_ylabel("recall@10 vs exact (text-like queries)")
    ax.set_title("Recall vs latency (colour: kind, marker: size)")
    ax.grid(True, alpha=0.3), ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "speed_vectors_recall.png", dpi=120)
    written.append(str(out / "speed_vectors_recall.png"))
    plt.close(fig)
    return written


def parse_ints(s: str) -> list[int]:
    return [int(float(v)) for v in s.split(",") if v.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--kinds", default="flat,hnsw,ivfflat,ivfsq,ivfpq")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--tiny", action="store_true", help="sizes 2000, dim 32, 20 queries: a smoke test")
    ap.add_argument("--hnsw-m", type=int, default=None, help="HNSW M (default: retrieval.store.vectors default)")
    ap.add_argument("--hnsw-efc", type=int, default=None, help="HNSW efConstruction")
    ap.add_argument("--ef-sweep", default="16,32,64,128,256,512")
    ap.add_argument("--nprobe-sweep", default="4,8,16,32,64,128,256")
    ap.add_argument("--target-recall", type=float, default=0.98)
    ap.add_argument("--query-noise", type=float, default=2.0, help="isotropic noise of text-like queries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge", action="store_true", help="keep other (size, kind) results already in the JSON")
    ap.add_argument("--tmpdir", default=None, help="where data and index files go while running")
    ap.add_argument("--replot", action="store_true", help="only rewrite the Markdown and plots from the JSON")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.sizes, args.dim, args.queries = "2000", 32, 20
        args.ef_sweep, args.nprobe_sweep = "16,64", "4,16"
    from retrieval.store import vector_kinds as VK

    args.hnsw_m = args.hnsw_m or VK.HNSW_DEFAULTS["M"]
    args.hnsw_efc = args.hnsw_efc or VK.HNSW_DEFAULTS["efConstruction"]
    args.ef_sweep, args.nprobe_sweep = parse_ints(args.ef_sweep), parse_ints(args.nprobe_sweep)

    if args.worker:  # internal: one (size, kind) in its own process
        cache, n, kind = args.worker.split("|")
        print(json.dumps(run_worker(Path(cache), int(n), kind, args)))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/speed_vectors.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    print(f"reproduce: {cmd}", flush=True)
    json_path = out / "speed_vectors.json"
    results: list[dict] = []
    commands: list[str] = []
    if (args.merge or args.replot) and json_path.exists():
        prev = json.loads(json_path.read_text())
        results = prev.get("results", [])
        commands = prev.get("commands", [prev["command"]] if "command" in prev else [])
    if args.replot:
        _write(out, json_path, results, commands, args, plots=True)
        print(f"rewrote {out / 'speed_vectors.md'} and plots from {json_path}")
        return 0
    commands = [c for c in commands if c != cmd] + [cmd]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for n in parse_ints(args.sizes):
        with tempfile.TemporaryDirectory(dir=args.tmpdir, prefix="speed_vectors_") as td:
            prepare(n, args.dim, args.queries, Path(td), args.seed, args.query_noise)
            for kind in kinds:
                passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
                wcmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--worker", f"{td}|{n}|{kind}"]
                t = time.perf_counter()
                proc = subprocess.run(wcmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"worker for n={n} kind={kind} failed ({proc.returncode})")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results = [x for x in results if not (x["size"] == n and x["kind"] == kind)] + [r]
                tu = r["tuned"]
                print(
                    f"  n={n:>9,} {kind:6s} build {r['build_s']:7.1f}s  p50 {tu['p50_ms']:7.2f} ms  "
                    f"recall@10 {tu['recall_at_10']:.3f}  filtered p50 {r['filtered']['p50_ms']:.2f} ms  "
                    f"{r['bytes_per_vector']:.0f} B/vec  ({time.perf_counter() - t:.0f}s)",
                    flush=True,
                )
                _write(out, json_path, results, commands, args)
    _write(out, json_path, results, commands, args, plots=True)
    print(f"wrote {json_path} and {out / 'speed_vectors.md'}")
    print(f"reproduce: {cmd}")
    return 0


def _write(out: Path, json_path: Path, results: list[dict], commands: list[str], args, plots: bool = False) -> None:
    import faiss

    doc = {
        "machine": MACHINE,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "faiss_version": faiss.__version__,
        "numpy_version": np.__version__,
        "command": commands[-1] if commands else "",
        "commands": commands,  # every run merged into these results
        "k": K,
        "queries": args.queries,
        "query_noise": args.query_noise,
        "target_recall": args.target_recall,
        "results": sorted(results, key=lambda r: (r["size"], r["kind"])),
    }
    if plots:
        doc["plots"] = plot(results, out)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, json_path)
    cmds = "\n".join(f"    {c}" for c in commands)
    md = (
        f"# Vector index speed ({MACHINE})\n\nProduced by:\n\n{cmds}\n\nfaiss {faiss.__version__}, k={K}, "
        f"{args.queries} queries, single-query latency on 1 OpenMP thread unless noted; recall@10 vs exact. "
        "p50/p95 are wall times on a shared, often overloaded machine; CPU p50 is the calling thread's CPU "
        "time (what one idle core would take). Tuned = cheapest setting reaching the target recall on "
        "text-like queries.\n\n" + fmt_table(results) + "\n"
    )
    (out / "speed_vectors.md").write_text(md)


if __name__ == "__main__":
    sys.exit(main())
