"""Speed of the whole engine: indexing throughput, query latency through the Searcher, memory, cold CLI.

    python benchmarks/speed.py                 # everything, default sizes (tens of minutes on 2 cores)
    python benchmarks/speed.py --quick         # a few minutes
    python benchmarks/speed.py --tiny --out /tmp/x --data /tmp/x/data    # seconds; the smoke test runs this
    python benchmarks/speed.py --parts indexing --models ViT-B-32:none --device cuda --precision bf16
    python benchmarks/speed.py --device cuda --precision bf16 --parts indexing   # GPU vs PIL decode, 3 sizes

Parts (``--parts``, comma-separated; default all):

indexing   For each ``--models`` spec, in its own process: ``--n-images`` generated photographic-looking JPEGs
           (``--image-size`` 1600x1200, quality 90, smooth gradients + blurred shapes + texture + sensor noise, so
           files are ~400-550 KB like camera JPEGs; cached under ``--data``) are indexed end to end with
           ``run_index`` (scan, hash, decode workers, encode, SQLite, FAISS publish) into a fresh index. Reported:
           images/s end to end (model load included, and excluded), model-only images/s
           (``encode_image_tensors`` on preprocessed batches of ``--batch-size``), decode-only images/s
           (``decode_stream`` with the same workers), the unchanged re-run time, peak RSS.
           ``--decodes cpu,gpu`` indexes once per decode path (``index --decode``) side by side, and
           ``--image-sizes`` takes several JPEG sizes (large sizes and counts: a few generated photos, each copy
           made a distinct file by a JPEG comment). Per row also: CPU cores busy (process + worker CPU time / wall,
           end to end and decode-only), GPU peak memory (torch.cuda.max_memory_allocated), the device name and how
           many files each decode route took. ``--device cuda`` defaults to ViT-B-32:none, --decodes cpu,gpu,
           sizes 341x256,1600x1200,4000x3000 with 4000/2000/500 images (benchmarks/gpu_check.sh runs exactly that).
           The rows also go to ``--out``/speed_indexing.md.
rerun      ``--rerun-files`` small JPEGs indexed once with tiny-clip:none, then ``run_index`` again with nothing
           changed: median of 3 re-runs (scan + compare + sidecars + vector sync), and scan alone.
latency    For each ``--sizes`` x ``--kinds``: synthetic CLIP-like vectors (``speed_vectors.make_vectors``) are written
           into a real index (SQLite image rows + raw embeddings through the Store API, identity of
           ``--latency-model``), vectors published by ``Index.sync_vectors(kind)`` (the write path's own build).
           A fresh process then opens a Searcher and times: text queries end to end (``Searcher.search``: encode +
           fusion + FAISS + SQLite join), image queries end to end (decode a 1600x1200 JPEG + encode + search +
           join), text encoding alone, and ``search_vector`` (search + join) on held-out text-like synthetic
           queries, whose results give recall@10 against exact brute force. Memory: FAISS file bytes per vector,
           SQLite bytes per image, peak RSS of the build and of the query process.
cold       ``python cli.py search TEXT --index DIR`` as a new process, start to printed results, median of
           ``--cold-runs``, on the ``--cold-size`` index of the latency part (built if the latency part did not
           build it; auto index kind); ``info`` likewise; and one fresh process timed stage by stage.

The vector layer alone (all kinds at 10k/100k/1M, parameter sweeps, filtered search) is benchmarks/speed_vectors.py;
this script imports its data generator and ground truth. Results: ``--out``/speed.json and PNG plots; run
benchmarks/report.py afterwards to refresh RESULTS.md. On a CUDA machine ``--device cuda --precision bf16`` applies
to the model-only measurement; ``run_index`` itself picks bf16 autocast on CUDA (its default).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault(
    "RETRIEVAL_MODEL_CONFIGS", str(ROOT / "tests" / "model_configs")
)  # the tests' tiny-clip architectures
for p in (str(ROOT), str(ROOT / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MODELS = "tiny-clip:none,ViT-B-32:none,starter"
# --device cuda defaults: the GPU decode comparison (index --decode cpu vs gpu) at three JPEG sizes
CUDA_MODELS = "ViT-B-32:none"
CUDA_SIZES = "341x256,1600x1200,4000x3000"
CUDA_N_IMAGES = "4000,2000,500"
LATENCY_MODEL = "ViT-B-32:none"
K = 10
TEXT_QUERIES = [
    "a dog running on a beach",
    "two people walking in the rain",
    "a red bicycle leaning on a wall",
    "sunset over the mountains",
    "a cup of coffee on a wooden table",
    "children playing football in a park",
    "a cat sleeping on a sofa",
    "the skyline of a city at night",
    "a plate of pasta with tomato sauce",
    "an old car parked in the street",
    "snow on pine trees",
    "a bird sitting on a branch",
    "a man riding a horse",
    "boats in a harbour",
    "a bowl of fruit",
    "a woman reading a book in a cafe",
    "a train crossing a bridge",
    "flowers in a garden",
    "a birthday cake with candles",
    "waves crashing on rocks",
]


# ------------------------------------------------------------------------------------------------------------
# helpers


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / 1e6 if sys.platform == "darwin" else r / 1e3, 1)


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the PIL path's decode workers), user + system."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _cpu_name() -> str | None:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def pct(values, q) -> float:
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), 3)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def run_worker(task: dict, timeout: float | None = None) -> dict:
    """Run one task in a fresh Python process (own peak RSS, own imports); its last stdout line is JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker {task.get('task')} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------
# data


def photo(seed: int, w: int = 1600, h: int = 1200):
    """A photographic-looking RGB image: smooth colour field, blurred shapes, mid-frequency texture and sensor
    noise. At 1600x1200, JPEG quality 90 gives ~400-550 KB, like a camera JPEG (flat synthetic drawings give
    ~50 KB, which would make decoding look far cheaper than it is)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (4, 3, 3), dtype=np.uint8), "RGB").resize((w, h), Image.BICUBIC)
    d = ImageDraw.Draw(base)
    sx, sy = w / 1600, h / 1200
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = int(rng.integers(-200, w)), int(rng.integers(-200, h))
        bw, bh = int(rng.integers(80, 700) * sx) + 2, int(rng.integers(80, 600) * sy) + 2
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = int(rng.integers(3))
        if shape == 0:
            d.ellipse([x0, y0, x0 + bw, y0 + bh], fill=col)
        elif shape == 1:
            d.rectangle([x0, y0, x0 + bw, y0 + bh], fill=col)
        else:
            d.polygon([(x0 + int(rng.integers(0, bw)), y0 + int(rng.integers(0, bh))) for _ in range(5)], fill=col)
    base = base.filter(ImageFilter.GaussianBlur(2))
    tex = Image.fromarray(rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1)), dtype=np.uint8)).resize(
        (w, h), Image.BILINEAR
    )
    arr = np.asarray(base, np.float32)
    arr += (np.asarray(tex, np.float32)[..., None] - 128.0) * rng.uniform(0.2, 0.5)
    arr += _noise(h, w, rng) * rng.uniform(3.5, 7.0)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


_NOISE: dict = {}


def _noise(h: int, w: int, rng) -> np.ndarray:
    """Gaussian sensor noise: one bank per size, shifted per image (drawing 6M normals per photo is the slow part)."""
    if (h, w) not in _NOISE:
        _NOISE[(h, w)] = np.random.default_rng(12345).standard_normal((h, w, 3), dtype=np.float32)
    return np.roll(_NOISE[(h, w)], (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))


def ensure_photos(folder: Path, n: int, size: tuple[int, int], quality: int = 90) -> list[Path]:
    """``n`` generated JPEGs in ``folder`` (kept between runs; only missing ones are written)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:05d}.jpg" for i in range(n)]
    missing = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    if missing:
        log(f"  writing {len(missing)} {size[0]}x{size[1]} JPEGs to {folder} …")
        t = time.perf_counter()
        for i, p in missing:
            tmp = p.with_suffix(".tmp")
            photo(i, *size).save(tmp, "JPEG", quality=quality)
            os.replace(tmp, p)
        log(f"  … {time.perf_counter() - t:.0f}s")
    return paths


def ensure_jpegs(folder: Path, n: int, size: tuple[int, int], distinct: int, quality: int = 90) -> list[Path]:
    """``n`` JPEGs of ``distinct`` generated photos, each file made unique by a JPEG comment segment (so the
    pipeline's content dedupe does not skip them; decoders ignore comments). Generating 4000x3000 photos
    takes seconds each, so the GPU comparison writes a few and varies them."""
    import io

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:05d}.jpg" for i in range(n)]
    missing = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    if missing:
        log(f"  writing {len(missing)} {size[0]}x{size[1]} JPEGs ({distinct} distinct photos) to {folder} …")
        t = time.perf_counter()
        bases: dict[int, bytes] = {}
        for i, p in missing:
            k = i % distinct
            if k not in bases:
                buf = io.BytesIO()
                photo(k, *size).save(buf, "JPEG", quality=quality)
                bases[k] = buf.getvalue()
            note = f"copy {i}".encode()
            com = b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note
            tmp = p.with_suffix(".tmp")
            tmp.write_bytes(bases[k][:2] + com + bases[k][2:])  # right after SOI
            os.replace(tmp, p)
        log(f"  … {time.perf_counter() - t:.0f}s")
    return paths


def ensure_small(folder: Path, n: int) -> Path:
    """``n`` small distinct JPEGs (96x72) for the re-run measurement."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    existing = {p.name for p in folder.glob("*.jpg")}
    todo = [i for i in range(n) if f"s_{i:06d}.jpg" not in existing]
    if todo:
        log(f"  writing {len(todo)} small JPEGs to {folder} …")
    for i in todo:
        rng = np.random.default_rng(i)
        im = Image.new("RGB", (96, 72), tuple(int(c) for c in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(3):
            x, y = int(rng.integers(0, 80)), int(rng.integers(0, 56))
            d.ellipse(
                [x, y, x + int(rng.integers(5, 30)), y + int(rng.integers(5, 30))],
                fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
            )
        im.save(folder / f"s_{i:06d}.jpg", quality=90)
    return folder


# ------------------------------------------------------------------------------------------------------------
# worker tasks (each runs in a fresh process)


def task_indexing(t: dict) -> dict:
    t0 = time.perf_counter()
    import torch  # noqa: F401

    from index_data.gpu_stream import choose_decode_stream, resolve_decode
    from index_data.options import IndexOptions
    from index_data.pipeline import run_index
    from index_data.workers import affinity_workers as default_workers
    from retrieval.images import load_image
    from retrieval.models.registry import load_encoder

    import_s = time.perf_counter() - t0
    if t.get("torch_threads"):
        torch.set_num_threads(int(t["torch_threads"]))
    paths = [Path(p) for p in t["paths"]]
    folder = Path(t["folder"])
    n = len(paths)
    workers = default_workers() if t.get("workers") is None else int(t["workers"])
    bs = int(t["batch_size"])
    t1 = time.perf_counter()
    enc = load_encoder(t["model"], device=t["device"], precision=t["precision"])
    first_load_s = time.perf_counter() - t1
    t1 = time.perf_counter()  # what run_index pays: a load with every import already done
    enc = load_encoder(t["model"], device=t["device"], precision=t["precision"])
    load_s = time.perf_counter() - t1

    # model only: preprocessed real images, batches of bs, median rate over repeats
    sample = [enc.preprocess(load_image(p, enc.image_size)) for p in (paths * ((bs // max(n, 1)) + 1))[:bs]]
    batch = torch.stack(sample)
    enc.encode_image_tensors(batch)  # warm-up (allocations, cuDNN / oneDNN kernel choice)
    rates, spent = [], 0.0
    while len(rates) < t["model_repeats"] or (spent < t["model_min_s"] and len(rates) < 50):
        s = time.perf_counter()
        enc.encode_image_tensors(batch)
        dt = time.perf_counter() - s
        spent += dt
        rates.append(bs / dt)
    model_only = statistics.median(rates)

    # decode only, same workers and decode path (--decode) as the pipeline
    decode = t.get("decode", "cpu")
    cuda = str(enc.device).startswith("cuda")
    decode_fn = choose_decode_stream(decode, enc.device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cpu0, s = _cpu_seconds(), time.perf_counter()
    ok = 0
    with decode_fn([(i, str(p)) for i, p in enumerate(paths)], enc.preprocess, enc.image_size, workers=workers) as st:
        for r in st:
            ok += r.ok
        if cuda:
            torch.cuda.synchronize()
    decode_s = time.perf_counter() - s
    decode_cpu = (_cpu_seconds() - cpu0) / decode_s
    routes = dict(getattr(st, "stats", None) or {"pil": n})
    decode_gpu_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
    device_name = torch.cuda.get_device_name(enc.device) if cuda else (_cpu_name() or "cpu")
    agreement = _decode_agreement(enc, paths[:64], workers) if resolve_decode(decode, enc.device) == "gpu" else None
    del enc, st

    roots = [str(folder)] if t.get("whole_folder") else [str(p) for p in paths]
    with tempfile.TemporaryDirectory(dir=t.get("tmpdir"), prefix="speed_index_") as td:
        idx = Path(td) / "index"
        opts = dict(
            paths=roots,
            model=t["model"],
            workers=workers,
            batch_size=bs,
            device=t["device"],
            decode=decode,
            progress=False,
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        cpu0, s = _cpu_seconds(), time.perf_counter()
        rep = run_index(idx, IndexOptions(**opts))
        wall = time.perf_counter() - s
        index_cpu = (_cpu_seconds() - cpu0) / wall
        index_gpu_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
        s = time.perf_counter()
        rep2 = run_index(idx, IndexOptions(**opts))
        rerun = time.perf_counter() - s
        index_bytes = sum(f.stat().st_size for f in idx.iterdir() if f.is_file())
    if rep.encoded != n or rep.errors:
        raise RuntimeError(f"indexing encoded {rep.encoded} of {n} files, errors: {rep.errors[:3]}")
    if rep2.encoded or rep2.changed:
        raise RuntimeError("the unchanged re-run changed something")
    sizes = [p.stat().st_size for p in paths]
    return {
        "model": t["model"],
        "device": t["device"],
        "device_name": device_name,
        "precision": t["precision"],
        "decode": decode,
        "decode_path": resolve_decode(decode, t["device"]),
        "decode_routes": routes,
        "n_images": n,
        "image_size": t["image_size"],
        "jpeg_mean_kb": round(sum(sizes) / n / 1000, 1),
        "jpeg_min_kb": round(min(sizes) / 1000, 1),
        "jpeg_max_kb": round(max(sizes) / 1000, 1),
        "batch_size": bs,
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
        "torch_threads_setting": t.get("torch_threads") or "default",
        "import_s": round(import_s, 2),
        "model_first_load_s": round(first_load_s, 2),
        "model_load_s": round(load_s, 2),
        "model_only_images_per_s": round(model_only, 1),
        "model_only_repeats": len(rates),
        "decode_only_images_per_s": round(ok / decode_s, 1),
        "decode_only_cpu_cores": round(decode_cpu, 2),
        "decode_only_gpu_peak_mb": decode_gpu_mb,
        "index_cpu_cores": round(index_cpu, 2),
        "index_gpu_peak_mb": index_gpu_mb,
        "embedding_cosine_vs_pil": agreement,
        "wall_s": round(wall, 2),
        "images_per_s": round(n / wall, 2),
        "images_per_s_excl_load": round(n / (wall - load_s), 2) if wall > 1.5 * load_s else None,
        "rerun_unchanged_s": round(rerun, 2),
        "index_bytes_per_image": round(index_bytes / n),
        "peak_rss_mb": peak_rss_mb(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _decode_agreement(enc, paths: list, workers: int) -> dict:
    """Cosine between each image's embedding through the PIL path and through the tensor path (the
    tolerance the GPU decode path keeps), on up to 64 of the benchmark's JPEGs, at the run's precision."""
    import torch

    from index_data.decode import decode_stream
    from index_data.gpu_stream import gpu_decode_stream

    jobs = [(i, str(p)) for i, p in enumerate(paths)]
    with decode_stream(jobs, enc.preprocess, enc.image_size, workers=workers) as st:
        a = {r.key: r.tensor for r in st if r.ok}
    with gpu_decode_stream(
        jobs,
        enc.preprocess,
        enc.image_size,
        workers=workers,
        device=str(enc.device) if str(enc.device).startswith("cuda") else "cpu",
    ) as st:
        b = {r.key: r.tensor for r in st if r.ok}
    keys = sorted(set(a) & set(b))
    if not keys:
        return {"images": 0}
    ea = enc.encode_image_tensors(torch.stack([a[k] for k in keys]))
    eb = enc.encode_image_tensors(torch.stack([b[k].to(a[k].device) for k in keys]))
    cos = (ea * eb).sum(axis=1)
    return {"images": len(keys), "min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)}


def task_rerun(t: dict) -> dict:
    from index_data.options import IndexOptions
    from index_data.pipeline import run_index
    from index_data.scan import scan
    from retrieval.models.registry import load_encoder

    folder = t["folder"]
    s = time.perf_counter()
    load_encoder(t["model"], device="cpu")
    load_s = time.perf_counter() - s
    with tempfile.TemporaryDirectory(dir=t.get("tmpdir"), prefix="speed_rerun_") as td:
        idx = Path(td) / "index"
        opts = dict(paths=[folder], model=t["model"], device="cpu", progress=False)
        s = time.perf_counter()
        rep = run_index(idx, IndexOptions(**opts))
        first = time.perf_counter() - s
        runs = []
        for _ in range(t["repeats"]):
            s = time.perf_counter()
            rep2 = run_index(idx, IndexOptions(**opts))
            runs.append(time.perf_counter() - s)
            if rep2.changed or rep2.unchanged != rep.encoded:
                raise RuntimeError("the unchanged re-run changed something")
    scans = []
    for _ in range(t["repeats"]):
        s = time.perf_counter()
        files, _ = scan([folder])
        scans.append(time.perf_counter() - s)
    return {
        "files": len(files),
        "model": t["model"],
        "first_index_s": round(first, 2),
        "rerun_unchanged_s": round(statistics.median(runs), 3),
        "rerun_runs_s": [round(x, 3) for x in runs],
        "scan_only_s": round(statistics.median(scans), 3),
        "model_load_s": round(load_s, 2),
        "peak_rss_mb": peak_rss_mb(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _identity_and_export(spec: str, root: Path):
    """The model identity for the manifest, and whether its ONNX export is in the cache (made here if not, as
    run_index does), so that queries take the same path as on a real index."""
    from retrieval.models.onnx_export import ensure_export
    from retrieval.models.onnx_runtime import export_key
    from retrieval.models.onnx_towers import ExportFailed
    from retrieval.models.registry import load_encoder

    enc = load_encoder(spec, device="cpu")
    try:
        ensure_export(enc)
    except ExportFailed:
        return enc.identity, None
    return enc.identity, export_key(enc.identity)


def task_build(t: dict) -> dict:
    """Write a synthetic index of ``size`` vectors (first call: SQLite rows + embeddings) and publish ``kind``."""
    import speed_vectors as SV

    from retrieval.store.index import Index

    root = Path(t["index"])
    n, kind = int(t["size"]), t["kind"]
    res: dict = {"size": n, "kind": kind}
    idx = Index.open_for_write(root)
    try:
        if t.get("create"):
            ident, export = _identity_and_export(t["model"], root)
            res["text_export"] = export is not None
            dim = ident.dim
            s = time.perf_counter()
            allx = SV.make_vectors(n + t["queries"], dim, seed=t["seed"] + n)
            x, held = allx[:n], allx[n:]
            q = SV.make_queries(held, t["query_noise"], t["seed"] + 1)
            truth = SV.exact_topk(x, q, K) + 1  # vector row r is image id r + 1
            np.savez(root / "bench_queries.npz", q=q, truth=truth)
            res["data_s"] = round(time.perf_counter() - s, 2)
            s = time.perf_counter()
            idx.set_model(ident)
            if export is not None:
                with idx.store.transaction():
                    idx.store.set_manifest("onnx_export", {"key": export})
            store = idx.store
            now = time.time()
            step = 20_000
            for a in range(0, n, step):
                b = min(n, a + step)
                with store.transaction():
                    rows = []
                    for i in range(a, b):
                        p = f"/synthetic/{i // 1000:04d}/photo_{i:07d}.jpg"
                        rows.append(
                            (i + 1, p, os.fsencode(p), 400_000 + i % 1000, 0, f"syn{i:010d}", 1600, 1200, now, "ok")
                        )
                    store.db.conn.executemany(
                        "INSERT INTO images(id, path, path_raw, size, mtime_ns, hash, width, height, added_at, status) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?)",
                        rows,
                    )
                    store.put_embeddings("image", [f"syn{i:010d}" for i in range(a, b)], x[a:b])
            res["sqlite_write_s"] = round(time.perf_counter() - s, 2)
            del allx, x
        s = time.perf_counter()
        idx.sync_vectors(requested_type=kind, force_rebuild=True)
        res["build_s"] = round(time.perf_counter() - s, 2)
        info = idx.info()
        res["built_kind"] = info.index_type
        cfg = idx.store.get_manifest("index_type") or {}
        res["params"] = {k: v for k, v in (cfg.get("params") or {}).items()}
    finally:
        idx.close()
    res["build_peak_rss_mb"] = peak_rss_mb()
    return res


def task_query(t: dict) -> dict:
    from retrieval.query.searcher import Searcher

    root = Path(t["index"])
    data = np.load(root / "bench_queries.npz")
    q, truth = data["q"], data["truth"]
    res: dict = {}
    with Searcher.open(root, device=t["device"]) as s:
        gen = s.index.generation
        n = s.index.info().vectors
        st = time.perf_counter()
        s.search(TEXT_QUERIES[0], k=K)  # loads the model and the vectors
        res["first_query_s"] = round(time.perf_counter() - st, 2)
        for text in TEXT_QUERIES[:3]:
            s.search(text, k=K)
        text_ms, enc_ms = [], []
        for _rep in range(t["text_repeats"]):
            for text in TEXT_QUERIES:
                st = time.perf_counter()
                out = s.search(text, k=K)
                text_ms.append((time.perf_counter() - st) * 1e3)
                assert len(out) == K
                st = time.perf_counter()
                s.embed_text(text)
                enc_ms.append((time.perf_counter() - st) * 1e3)
        img_ms = []
        images = t.get("images") or []
        if images:
            s.search(image=images[0], k=K)
        for p in images:
            st = time.perf_counter()
            out = s.search(image=p, k=K)
            img_ms.append((time.perf_counter() - st) * 1e3)
        img1_ms = []
        if images:  # the same with one torch thread: on a busy machine two OpenMP threads wait on each other
            import torch

            saved = torch.get_num_threads()
            torch.set_num_threads(1)
            s.search(image=images[0], k=K)
            for p in images:
                st = time.perf_counter()
                s.search(image=p, k=K)
                img1_ms.append((time.perf_counter() - st) * 1e3)
            torch.set_num_threads(saved)
        sj_ms, found = [], []
        for v in q:
            st = time.perf_counter()
            out = s.search_vector(v, k=K)
            sj_ms.append((time.perf_counter() - st) * 1e3)
            found.append([r.id for r in out] + [-1] * (K - len(out)))
    import speed_vectors as SV

    vec_file = root / f"images.g{gen}.faiss"
    res.update(
        {
            "size": n,
            "model": t["model"],
            "text_queries": len(text_ms),
            "image_queries": len(img_ms),
            "text_p50_ms": pct(text_ms, 50),
            "text_p95_ms": pct(text_ms, 95),
            "image_p50_ms": pct(img_ms, 50) if img_ms else None,
            "image_p95_ms": pct(img_ms, 95) if img_ms else None,
            "image_p50_ms_1_torch_thread": pct(img1_ms, 50) if img1_ms else None,
            "encode_text_p50_ms": pct(enc_ms, 50),
            "search_join_p50_ms": pct(sj_ms, 50),
            "search_join_p95_ms": pct(sj_ms, 95),
            "recall_at_10": round(SV.recall_at_k(np.asarray(found), truth), 4),
            "synthetic_queries": len(q),
            "bytes_per_vector": round(vec_file.stat().st_size / n, 1),
            "sqlite_bytes_per_image": round((root / "meta.sqlite").stat().st_size / n, 1),
            "query_peak_rss_mb": peak_rss_mb(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        }
    )
    return res


def task_cold_breakdown(t: dict) -> dict:
    """One fresh process doing what `cli.py search TEXT` does, stage by stage (the Searcher's own calls)."""
    stages: dict[str, float] = {}
    s = time.perf_counter()
    import click  # noqa: F401

    from retrieval.query.searcher import Searcher

    stages["import click + retrieval.query.searcher"] = time.perf_counter() - s
    s = time.perf_counter()
    searcher = Searcher.open(t["index"], device="cpu")
    stages["open index (SQLite, manifest)"] = time.perf_counter() - s
    s = time.perf_counter()
    vi = searcher.index.vectors("images", mmap=True)
    stages[f"open vectors, mmap ({vi.ntotal:,} x {vi.dim}, {vi.config.kind})"] = time.perf_counter() - s
    s = time.perf_counter()
    qv = searcher.embed_query(TEXT_QUERIES[0])
    torch_loaded = "torch" in sys.modules
    how = "torch encoder" if torch_loaded else "torch-free text export"
    stages[f"embed query, first call: load + run the text encoder ({how})"] = time.perf_counter() - s
    s = time.perf_counter()
    out = searcher.search_vector(qv, k=K)
    stages["search + SQLite join, first call"] = time.perf_counter() - s
    s = time.perf_counter()
    searcher.search_vector(searcher.embed_query(TEXT_QUERIES[1]), k=K)
    stages["second query, warm (embed + search + join)"] = time.perf_counter() - s
    searcher.close()
    assert len(out) == K
    res = {k: round(v, 3) for k, v in stages.items()}
    res["torch imported"] = torch_loaded
    return res


TASKS = {
    "indexing": task_indexing,
    "rerun": task_rerun,
    "build": task_build,
    "query": task_query,
    "cold_breakdown": task_cold_breakdown,
}


# ------------------------------------------------------------------------------------------------------------
# driver


def cold_cli(index: Path, runs: int, text: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "cli.py", "search", text, "--index", str(index), "-k", str(K)]
    times = []
    for _ in range(runs):
        s = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - s)
        if proc.returncode != 0 or len(proc.stdout.strip().splitlines()) != K + 1:
            raise RuntimeError(f"cold search failed ({proc.returncode}): {proc.stderr[-500:]}")
    info_times = []
    for _ in range(runs):
        s = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "cli.py", "info", "--index", str(index)], capture_output=True, text=True, env=env, cwd=ROOT
        )
        info_times.append(time.perf_counter() - s)
        if proc.returncode != 0:
            raise RuntimeError(f"cold info failed: {proc.stderr[-500:]}")
    return {
        "command": "python " + " ".join(shlex.quote(c) for c in cmd[1:]).replace(str(index), "INDEX"),
        "runs": runs,
        "search_runs_s": [round(x, 3) for x in times],
        "search_median_s": round(statistics.median(times), 3),
        "info_median_s": round(statistics.median(info_times), 3),
    }


def plot(latency: list[dict], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    written = []
    kinds = sorted({r["kind"] for r in latency})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, kind in enumerate(kinds):
        rs = sorted((r for r in latency if r["kind"] == kind), key=lambda r: r["size"])
        c = f"C{i}"
        ax.plot(
            [r["size"] for r in rs],
            [r["text_p50_ms"] for r in rs],
            "o-",
            color=c,
            label=f"{kind}: text query end to end",
        )
        ax.plot(
            [r["size"] for r in rs],
            [r["search_join_p50_ms"] for r in rs],
            "s--",
            color=c,
            alpha=0.7,
            label=f"{kind}: search + join",
        )
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("vectors in the index"), ax.set_ylabel("p50 latency, ms (k=10)")
    ax.set_title("Query latency through the Searcher vs index size")
    ax.grid(True, which="both", alpha=0.3), ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "speed_latency.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(str(p))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, kind in enumerate(kinds):
        rs = sorted((r for r in latency if r["kind"] == kind), key=lambda r: r["size"])
        ax.plot([r["search_join_p50_ms"] for r in rs], [r["recall_at_10"] for r in rs], "o-", color=f"C{i}", label=kind)
        for r in rs:
            ax.annotate(
                f"{r['size']:,}",
                (r["search_join_p50_ms"], r["recall_at_10"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, 4),
            )
    ax.set_xscale("log")
    ax.set_xlabel("search + join p50, ms"), ax.set_ylabel("recall@10 vs exact")
    ax.set_title("Recall vs latency (engine defaults per kind)")
    ax.grid(True, alpha=0.3), ax.legend()
    fig.tight_layout()
    p = out / "speed_recall.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    written.append(str(p))
    return written


def indexing_markdown(rows: list[dict], cmd: str, machine: dict) -> str:
    """The indexing rows as a Markdown table: decode paths side by side per JPEG size."""
    cols = [
        ("image_size", "JPEG size"),
        ("decode_path", "decode"),
        ("model", "model"),
        ("precision", "precision"),
        ("n_images", "images"),
        ("images_per_s", "end-to-end img/s"),
        ("images_per_s_excl_load", "excl. load img/s"),
        ("model_only_images_per_s", "model-only img/s"),
        ("decode_only_images_per_s", "decode-only img/s"),
        ("decode_only_cpu_cores", "decode-only CPU cores"),
        ("index_cpu_cores", "end-to-end CPU cores"),
        ("decode_only_gpu_peak_mb", "decode-only GPU MB"),
        ("index_gpu_peak_mb", "end-to-end GPU MB"),
        ("workers", "PIL workers"),
        ("decode_routes", "files per route"),
        ("embedding_cosine_vs_pil", "embedding cosine vs PIL path"),
    ]
    lines = [
        "## Indexing: decode paths side by side",
        "",
        f"Reproduce: `{cmd}`",
        "",
        f"Device: {', '.join(sorted({str(r.get('device_name')) for r in rows}))} (`--device` "
        f"{', '.join(sorted({str(r.get('device')) for r in rows}))}); CPU: {machine.get('cpu')}, "
        f"{machine.get('cores')} cores. CPU cores = process + decode-worker CPU time / wall time. GPU MB = "
        "torch.cuda.max_memory_allocated during the run.",
        "",
        "| " + " | ".join(c[1] for c in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            cells.append(
                ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else ("" if v is None else str(v))
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(out: Path, doc: dict) -> Path:
    path = out / "speed.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="indexing,rerun,latency,cold")
    ap.add_argument("--models", default=None, help=f"default: {DEFAULT_MODELS}; with --device cuda: {CUDA_MODELS}")
    ap.add_argument(
        "--n-images",
        default=None,
        help="images per indexing run: N, or one N per --image-sizes entry (default 1000; with "
        f"--device cuda: {CUDA_N_IMAGES})",
    )
    ap.add_argument("--image-size", default="1600x1200")
    ap.add_argument(
        "--image-sizes",
        default=None,
        help=f"JPEG sizes for the indexing part (default: --image-size; with --device cuda: {CUDA_SIZES})",
    )
    ap.add_argument(
        "--decodes",
        default=None,
        help="decode paths indexed side by side, from cpu,gpu,auto (index --decode; default cpu; "
        "with --device cuda: cpu,gpu)",
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: the pipeline's, cores - 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (auto picks cuda when present)")
    ap.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (model-only measurement)")
    ap.add_argument("--model-repeats", type=int, default=5)
    ap.add_argument(
        "--torch-threads",
        default="default",
        help="comma list of torch intra-op thread counts to index with, e.g. default,1",
    )
    ap.add_argument("--rerun-files", type=int, default=10_000)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--kinds", default=None, help="index kinds (default: every kind retrieval.store.vectors knows)")
    ap.add_argument("--latency-model", default=LATENCY_MODEL)
    ap.add_argument("--queries", type=int, default=200, help="synthetic queries for search+join latency and recall")
    ap.add_argument("--text-repeats", type=int, default=2, help="passes over the 20 text queries")
    ap.add_argument("--image-queries", type=int, default=10)
    ap.add_argument("--query-noise", type=float, default=2.0)
    ap.add_argument("--cold-size", type=int, default=100_000)
    ap.add_argument("--cold-runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--data", default=str(ROOT / "benchmarks" / "data" / "speed"), help="generated images (kept)")
    ap.add_argument("--tmpdir", default=None, help="where indexes are built while running")
    ap.add_argument("--merge", action="store_true", help="keep results of parts not run from an existing speed.json")
    ap.add_argument("--quick", action="store_true", help="a few minutes: 100 images, 2,000 re-run files, 10k vectors")
    ap.add_argument("--tiny", action="store_true", help="seconds, for the smoke test: tiny model and sizes")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        task = json.loads(args.worker)
        print(json.dumps(TASKS[task["task"]](task)), flush=True)
        return 0

    cuda = args.device.startswith("cuda")
    args.models = args.models or (CUDA_MODELS if cuda else DEFAULT_MODELS)
    args.decodes = args.decodes or ("cpu,gpu" if cuda else "cpu")
    args.image_sizes = args.image_sizes or (CUDA_SIZES if cuda else None)
    args.n_images = args.n_images or (CUDA_N_IMAGES if cuda and args.image_sizes == CUDA_SIZES else "1000")
    if args.quick:
        args.n_images, args.rerun_files, args.sizes, args.kinds = 100, 2000, "10000", "flat,hnsw,ivfflat"
        args.cold_size, args.cold_runs, args.queries, args.model_repeats = 10000, 3, 100, 3
    if args.tiny:
        args.models, args.n_images, args.image_size, args.rerun_files = "tiny-clip:none", 6, "400x300", 40
        args.sizes, args.kinds, args.latency_model = "2000", "flat,hnsw", "tiny-clip:none"
        args.queries, args.text_repeats, args.image_queries = 20, 1, 2
        args.cold_size, args.cold_runs, args.model_repeats, args.batch_size = 2000, 1, 2, 4
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = set(parts) - {"indexing", "rerun", "latency", "cold"}
    if bad:
        ap.error(f"unknown parts: {', '.join(sorted(bad))}")
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    index_sizes = [
        tuple(int(v) for v in x.lower().split("x"))
        for x in (args.image_sizes or args.image_size).split(",")
        if x.strip()
    ]
    counts = [int(v) for v in str(args.n_images).split(",") if v.strip()]
    counts = counts if len(counts) == len(index_sizes) else [counts[0]] * len(index_sizes)
    args.n_images = counts[0]
    decodes = [v.strip() for v in args.decodes.split(",") if v.strip()]
    if set(decodes) - {"cpu", "gpu", "auto"}:
        ap.error(f"--decodes: cpu, gpu or auto, not {args.decodes}")
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/speed.py" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))
    print(f"reproduce: {cmd}", flush=True)
    from report import GPU_NOTE, machine_info

    machine = machine_info()
    doc: dict = {}
    if args.merge and (out / "speed.json").exists():
        doc = json.loads((out / "speed.json").read_text())
    doc.update(
        {
            "title": "Speed: indexing, query latency, memory, cold CLI",
            "command": cmd,
            "machine": machine,
            "k": K,
            "gpu_note": None if machine.get("gpu") else GPU_NOTE,
        }
    )
    commands = doc.setdefault("commands", {})  # the commands whose results each part holds (parts merge)
    for part in parts:
        prev = commands.get(part) if args.merge else None
        prev = [prev] if isinstance(prev, str) else list(prev or [])
        commands[part] = [c for c in prev if c != cmd] + [cmd]
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if args.device.startswith("cuda") else "fp32"

    photos_dir = data / f"jpeg_{w}x{h}_q90"
    photos: list[Path] = []
    if "latency" in parts:  # image queries (the indexing part writes its own JPEGs below)
        photos = ensure_photos(photos_dir, args.image_queries, (w, h))

    if "indexing" in parts:
        specs = [m.strip() for m in args.models.split(",") if m.strip()]
        threads = [v.strip() for v in args.torch_threads.split(",") if v.strip()]
        key = lambda r: (
            r.get("model"),
            str(r.get("torch_threads_setting", "default")),
            r.get("image_size"),  # noqa: E731
            r.get("decode", "cpu"),
        )
        todo = {
            (m, th, f"{iw}x{ih}", dec) for m in specs for th in threads for iw, ih in index_sizes for dec in decodes
        }
        rows = [r for r in doc.get("indexing", []) if key(r) not in todo] if args.merge else []
        for (iw, ih), n_img in zip(index_sizes, counts):
            if (iw, ih) == (w, h) and n_img <= 1000:
                folder, files = photos_dir, ensure_photos(photos_dir, n_img, (w, h))
            else:  # large sizes or counts: a few generated photos, made distinct files (see ensure_jpegs)
                distinct = 8 if iw * ih > 4_000_000 else 32
                folder = data / f"jpeg_{iw}x{ih}_q90_d{distinct}"
                files = ensure_jpegs(folder, n_img, (iw, ih), distinct)
            whole = len(list(folder.glob("*.jpg"))) == n_img
            for spec, th, dec in [(m, th, d) for m in specs for th in threads for d in decodes]:
                log(f"indexing {n_img} {iw}x{ih} images with {spec}, --decode {dec} (torch threads: {th}) …")
                r = run_worker(
                    {
                        "task": "indexing",
                        "model": spec,
                        "paths": [str(p) for p in files[:n_img]],
                        "torch_threads": None if th == "default" else int(th),
                        "decode": dec,
                        "folder": str(folder),
                        "whole_folder": whole,
                        "image_size": f"{iw}x{ih}",
                        "batch_size": args.batch_size,
                        "workers": args.workers,
                        "device": args.device,
                        "precision": precision,
                        "model_repeats": args.model_repeats,
                        "model_min_s": 3.0,
                        "tmpdir": args.tmpdir,
                    }
                )
                rows.append(r)
                rows.sort(
                    key=lambda r: (
                        specs.index(r["model"]) if r["model"] in specs else 99,
                        _pixels(r.get("image_size")),
                        str(r.get("torch_threads_setting")),
                        str(r.get("decode")),
                    )
                )
                log(
                    f"  {spec} {iw}x{ih} decode {r['decode_path']}: {r['images_per_s']} img/s end to end "
                    f"({r['images_per_s_excl_load']} excl. load), model only {r['model_only_images_per_s']} img/s, "
                    f"decode only {r['decode_only_images_per_s']} img/s, CPU {r['index_cpu_cores']} cores busy, "
                    f"unchanged re-run {r['rerun_unchanged_s']} s"
                )
                doc["indexing"] = rows
                write(out, doc)
                (out / "speed_indexing.md").write_text(indexing_markdown(rows, cmd, machine))  # kept if cut short
        log(f"wrote {out / 'speed_indexing.md'}")

    if "rerun" in parts:
        folder = ensure_small(data / f"small_{args.rerun_files}", args.rerun_files)
        log(f"unchanged re-run over {args.rerun_files} files …")
        doc["rerun"] = run_worker(
            {"task": "rerun", "folder": str(folder), "model": "tiny-clip:none", "repeats": 3, "tmpdir": args.tmpdir}
        )
        log(f"  re-run {doc['rerun']['rerun_unchanged_s']} s (first index {doc['rerun']['first_index_s']} s)")
        write(out, doc)

    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    from retrieval.store.vector_kinds import KINDS, choose_config

    kinds = [k.strip() for k in (args.kinds or ",".join(KINDS)).split(",") if k.strip()]

    latency = (
        [r for r in doc.get("latency", []) if not (r["size"] in sizes and r["kind"] in kinds)] if args.merge else []
    )
    with tempfile.TemporaryDirectory(dir=args.tmpdir, prefix="speed_latency_") as td:
        built_cold = None
        if "latency" in parts or "cold" in parts:
            dim = _dim(args.latency_model)
            todo = sizes if "latency" in parts else []
            if "cold" in parts and args.cold_size not in todo:
                todo = todo + [args.cold_size]
            for n in todo:
                root = Path(td) / f"n{n}"
                auto = choose_config(n, dim, "auto").kind
                run_kinds = kinds if ("latency" in parts and n in sizes) else []
                if "cold" in parts and n == args.cold_size:
                    run_kinds = [k for k in run_kinds if k != auto] + [auto]  # leave the auto kind published
                first, export = True, None
                for kind in run_kinds:
                    log(f"latency: {n:,} vectors, {kind} …")
                    b = run_worker(
                        {
                            "task": "build",
                            "index": str(root),
                            "size": n,
                            "kind": kind,
                            "create": first,
                            "model": args.latency_model,
                            "queries": args.queries,
                            "seed": args.seed,
                            "query_noise": args.query_noise,
                        }
                    )
                    first = False
                    export = b.pop("text_export", export)
                    b["text_export"] = export
                    if "latency" in parts and n in sizes and kind in kinds:
                        qr = run_worker(
                            {
                                "task": "query",
                                "index": str(root),
                                "model": args.latency_model,
                                "device": args.device,
                                "text_repeats": args.text_repeats,
                                "images": [str(p) for p in photos[: args.image_queries]],
                            }
                        )
                        row = {**b, **qr, "size": n, "kind": kind}
                        latency = [r for r in latency if not (r["size"] == n and r["kind"] == kind)] + [row]
                        log(
                            f"  text p50 {row['text_p50_ms']} ms, image p50 {row['image_p50_ms']} ms, search+join p50 "
                            f"{row['search_join_p50_ms']} ms, recall@10 {row['recall_at_10']}, build {row['build_s']} s"
                        )
                        doc["latency"] = sorted(latency, key=lambda r: (r["size"], r["kind"]))
                        write(out, doc)
                if n == args.cold_size:
                    built_cold = (root, auto)
        if "cold" in parts and built_cold:
            root, kind = built_cold
            log(f"cold CLI search on {args.cold_size:,} vectors ({kind}) × {args.cold_runs} …")
            c = cold_cli(root, args.cold_runs, TEXT_QUERIES[0])
            c.update({"size": args.cold_size, "kind": kind, "model": args.latency_model})
            c["breakdown"] = run_worker({"task": "cold_breakdown", "index": str(root), "model": args.latency_model})
            doc["cold_cli"] = c
            log(f"  median {c['search_median_s']} s (info {c['info_median_s']} s)")
    if latency:
        doc["plots"] = plot(latency, out)
    path = write(out, doc)
    print(f"wrote {path}")
    print(f"reproduce: {cmd}")
    return 0


def _pixels(size) -> int:
    try:
        a, b = str(size).lower().split("x")
        return int(a) * int(b)
    except ValueError:
        return 0


def _dim(spec: str) -> int:
    """Embedding size of a spec without loading torch when the config is ours or open_clip's."""
    if spec == "starter":
        return 384
    arch = spec.split(":")[0]
    cfg = ROOT / "tests" / "model_configs" / f"{arch}.json"
    if cfg.exists():
        return int(json.loads(cfg.read_text())["embed_dim"])
    try:
        import open_clip

        return int(open_clip.get_model_config(arch)["embed_dim"])
    except Exception:
        return 512


if __name__ == "__main__":
    sys.exit(main())
