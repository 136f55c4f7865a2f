"""Query latency: cold CLI searches (process start to printed results) and warm in-process queries.

What it measures, side by side in one run so that both paths meet the same machine load:

* cold `retrieval search "a sentence" --index DIR --json` and `retrieval search --image PHOTO ...`, as
  subprocesses, `--runs` times each, interleaved:
  - "before": torch (the child's RETRIEVAL_CACHE_DIR is an empty directory, so no ONNX export is found and
    the query loads torch and open_clip, as before exports existed);
  - "after": the model's ONNX export in the cache on onnxruntime (retrieval/models/onnx_runtime.py), no torch import;
  on a ViT-B-32:none index of `--n` images and on a starter-model index of the sample photos. Each pair of
  runs is checked: same top 10, scores within 1e-5, and no torch/open_clip import on the ONNX path
  (PYTHONPROFILEIMPORTTIME).
* warm queries through the Python API in one process (Searcher.search: encode, FAISS, SQLite join):
  p50/p95 for text and image, onnx and torch, with ANN recall@10 against exact search.
* `--parts index`: `retrieval index` end to end (new process, new index) over `--index-n` generated
  1600x1200 JPEGs, `--runtime torch` against `--runtime onnx`, interleaved, at the default batch and workers
  and at rclip's settings (batch 8, 2 decode workers); with `--index-bf16` also `--precision bf16` (torch over
  bfloat16 weights) at the default settings, with how far its vectors are from fp32.

The ViT-B-32 index holds synthetic image vectors (clustered, CLIP-like: benchmarks/speed_vectors.py's
generator) written straight through the Store/Index APIs under the real identity of ViT-B-32:none; its text
encoder is the real random-init ViT-B-32 text tower, exported as indexing does. Indexes are built once under
--workdir and reused. Child processes get PYTHONPYCACHEPREFIX (bytecode cached, as after an install) and
HF_HUB_OFFLINE=1.

    python benchmarks/cold_query.py                        # 100k index, 5 cold runs per path
    python benchmarks/cold_query.py --warm-n 1000000       # also warm queries on a 1M index (slow build)
    python benchmarks/cold_query.py --quick                # small and fast (smoke)
    python benchmarks/cold_query.py --parts index --index-n 200   # CPU indexing, torch vs onnx
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MACHINE = "2-core CPU machine (no GPU)"
QUERY = "a dog running on the beach at sunset"
SPEC = "ViT-B-32:none"
K = 10
WARM_TEMPLATES = [
    "a photo of {}",
    "a close-up picture of {}",
    "{} at night",
    "two {} in the snow",
    "a drawing of {}",
    "a blurry photo of {} on a table",
    "{} next to a red car",
    "an old photograph of {}",
]
WARM_THINGS = [
    "a dog",
    "a cat",
    "a bicycle",
    "the sea",
    "a mountain lake",
    "a birthday cake",
    "a city street",
    "a child",
    "an airplane",
    "a cup of coffee",
    "a horse",
    "a bridge",
    "flowers",
    "a laptop",
    "a bowl of soup",
    "a train",
    "a lighthouse",
    "a forest path",
    "a snowman",
    "a sailing boat",
    "a guitar",
    "an old church",
    "a parrot",
    "fireworks",
    "a football match",
]


def warm_queries(n: int) -> list[str]:
    qs = [t.format(x) for x in WARM_THINGS for t in WARM_TEMPLATES]
    return (qs * (n // len(qs) + 1))[:n]


# ------------------------------------------------------------------------------------------ building
def _meta_ok(root: Path, want: dict) -> bool:
    try:
        return json.loads((root / "bench_meta.json").read_text()) == want
    except (OSError, ValueError):
        return False


def build_synthetic_index(root: Path, n: int, seed: int = 0, index_type: str = "auto") -> Path:
    """A ViT-B-32:none index of n synthetic image vectors, plus the real exported text encoder."""
    from retrieval.models.onnx_export import ensure_export
    from retrieval.models.onnx_runtime import export_key
    from retrieval.models.registry import load_encoder
    from retrieval.store.index import Index
    from retrieval.store.vector_kinds import choose_config

    # the vector layer's current defaults are part of the key: an index built under older ones is rebuilt
    want = {
        "spec": SPEC,
        "n": n,
        "seed": seed,
        "index_type": index_type,
        "version": 1,
        "vectors": choose_config(n, 512, index_type).to_dict(),
    }
    if _meta_ok(root, want) and (root / "meta.sqlite").is_file():
        from retrieval.models.onnx_export import usable_export

        with Index.open(root) as idx:
            ident = idx.identity
        if usable_export(ident) is None:  # not in this user's cache yet
            ensure_export(load_encoder(SPEC, device="cpu"))
        return root
    import shutil

    from benchmarks.speed_vectors import make_vectors

    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    encoder = load_encoder(SPEC, device="cpu")
    vecs = make_vectors(n, encoder.dim, seed=seed)
    idx = Index.open_for_write(root)
    try:
        idx.set_model(encoder.identity)
        store = idx.store
        step = 20_000
        for s in range(0, n, step):
            e = min(n, s + step)
            hashes = [hashlib.sha256(f"synthetic-{i}".encode()).hexdigest() for i in range(s, e)]
            with store.transaction():
                store.put_embeddings("image", hashes, vecs[s:e])
                store.db.conn.executemany(
                    "INSERT INTO images(path, path_raw, size, mtime_ns, hash, width, height, added_at, status) "
                    "VALUES (?,?,?,?,?,?,?,?, 'ok')",
                    [
                        (p, p.encode(), 1000, 0, h, 640, 480, 0.0)
                        for p, h in ((f"/synthetic/photos/img_{i:07d}.jpg", hashes[i - s]) for i in range(s, e))
                    ],
                )
        del vecs
        print(
            f"  {n} rows written in {time.perf_counter() - t0:.0f}s; building vectors ...", file=sys.stderr, flush=True
        )
        idx.sync_vectors(requested_type=index_type)
        ensure_export(encoder)
        with idx.store.transaction():
            idx.store.set_manifest("onnx_export", {"key": export_key(encoder.identity)})
    finally:
        idx.close()
    (root / "bench_meta.json").write_text(json.dumps(want))
    print(f"  built {root} in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return root


def build_checkpoint_index(root: Path) -> Path:
    """The 18 sample photos indexed with ViT-B-32 loaded from a local checkpoint file (ARCH:/path), as a user
    with downloaded weights has it: loading then skips random init (retrieval/models/openclip.py). The checkpoint
    is the seeded random init saved to safetensors under --workdir (600 MB, never committed)."""
    want = {"spec": "ViT-B-32:checkpoint", "version": 1}
    ckpt = root / "vitb32.safetensors"
    if _meta_ok(root, want) and ckpt.is_file() and (root / "index" / "meta.sqlite").is_file():
        return root / "index"
    import shutil

    from safetensors.torch import save_file

    from benchmarks.samples import write_sample_photos
    from index_data.options import IndexOptions
    from index_data.pipeline import run_index
    from retrieval.models.registry import load_encoder

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    model = load_encoder(SPEC, device="cpu").model
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    del model
    write_sample_photos(root / "photos")
    run_index(
        root / "index",
        IndexOptions(paths=[str(root / "photos")], model=f"ViT-B-32:{ckpt}", workers=0, progress=False, device="cpu"),
    )
    (root / "bench_meta.json").write_text(json.dumps(want))
    return root / "index"


def cold_image_checkpoint(index: Path, image: Path, runs: int, pycache: Path) -> dict:
    """Cold image queries on a checkpoint-loaded model, interleaved: random init then load (before) against
    building without init (after, the default)."""
    base = ["--image", str(image), "--index", str(index), "--json", "-k", str(K)]
    before_env = {**child_env(pycache, True), "RETRIEVAL_INIT_BEFORE_LOAD": "1"}  # both on torch: what loading costs
    after_env = child_env(pycache, True)
    after_env.pop("RETRIEVAL_INIT_BEFORE_LOAD", None)
    run_cli(base, after_env)  # warm-up
    t = {"before": ([], []), "after": ([], [])}
    rows = {}
    for i in range(runs):
        for name, env in (("before", before_env), ("after", after_env)):
            wall, res, _, cpu = run_cli(base, env)
            t[name][0].append(wall)
            t[name][1].append(cpu)
            rows[name] = res
        print(
            f"[cold] image checkpoint: run {i + 1}/{runs} {t['before'][0][-1]:.2f}s / {t['after'][0][-1]:.2f}s",
            file=sys.stderr,
            flush=True,
        )
    return {
        "before_init": summary(*t["before"]),
        "after_no_init": summary(*t["after"]),
        "results": compare(rows["before"], rows["after"]),
    }


def build_starter_index(root: Path) -> Path:
    want = {"spec": "starter", "version": 1}
    if _meta_ok(root, want) and (root / "index" / "meta.sqlite").is_file():
        from index_data.options import IndexOptions
        from index_data.pipeline import run_index
        from retrieval.models.onnx_export import usable_export
        from retrieval.store.index import Index

        with Index.open(root / "index") as idx:
            ident = idx.identity
        if usable_export(ident) is None:  # not in this user's cache (any more): a re-run of index makes it
            run_index(
                root / "index",
                IndexOptions(paths=[str(root / "photos")], workers=0, progress=False, device="cpu"),
            )
        return root / "index"
    import shutil

    from benchmarks.samples import write_sample_photos
    from index_data.options import IndexOptions
    from index_data.pipeline import run_index

    shutil.rmtree(root, ignore_errors=True)
    photos = write_sample_photos(root / "photos")
    run_index(
        root / "index",
        IndexOptions(paths=[str(root / "photos")], model="starter", workers=0, progress=False, device="cpu"),
    )
    (root / "bench_meta.json").write_text(json.dumps(want))
    assert photos
    return root / "index"


def query_image(workdir: Path) -> Path:
    p = workdir / "query.jpg"
    if not p.is_file():
        from PIL import Image, ImageDraw

        im = Image.new("RGB", (640, 480), (30, 120, 200))
        d = ImageDraw.Draw(im)
        d.ellipse([200, 120, 440, 360], fill=(240, 200, 40))
        d.rectangle([0, 380, 640, 480], fill=(60, 160, 60))
        im.save(p, quality=92)
    return p


# ------------------------------------------------------------------------------------------ cold runs
def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("retrieval")
    return [str(script)] if script.is_file() else [sys.executable, str(ROOT / "cli.py")]


def child_env(pycache: Path, torch_path: bool, importtime: bool = False) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env["HF_HUB_OFFLINE"] = "1"
    if torch_path:  # no export to be found: the query runs on torch
        empty = pycache.parent / "empty-cache"
        empty.mkdir(parents=True, exist_ok=True)
        env["RETRIEVAL_CACHE_DIR"] = str(empty)
    if importtime:
        env["PYTHONPROFILEIMPORTTIME"] = "1"
    else:
        env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_cli(args: list[str], env: dict) -> tuple[float, list[dict], str, float]:
    """(wall seconds, result rows, stderr, CPU seconds of the child: user+sys, load-independent-ish)."""
    c = _children_cpu()
    t = time.perf_counter()
    p = subprocess.run(cli_command() + ["search"] + args, env=env, capture_output=True, text=True, cwd=str(ROOT))
    wall = time.perf_counter() - t
    cpu = _children_cpu() - c
    if p.returncode != 0:
        raise RuntimeError(f"search failed ({p.returncode}): {p.stderr[-2000:]}")
    return wall, [json.loads(line) for line in p.stdout.splitlines() if line.strip()], p.stderr, cpu


def compare(a: list[dict], b: list[dict]) -> dict:
    ids_a, ids_b = [r["id"] for r in a], [r["id"] for r in b]
    sa, sb = {r["id"]: r["score"] for r in a}, {r["id"]: r["score"] for r in b}
    common = set(sa) & set(sb)
    diff = max((abs(sa[i] - sb[i]) for i in common), default=0.0)
    return {"same_top10": ids_a == ids_b, "same_set": set(ids_a) == set(ids_b), "max_score_diff": diff}


def summary(times: list[float], cpu: list[float]) -> dict:
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": [round(t, 3) for t in times],
        "cpu_median_s": statistics.median(cpu),
    }


def cold_pair(index: Path, args: list[str], runs: int, pycache: Path, label: str) -> dict:
    """Interleaved torch ('before') and fast ('after') cold runs of the same query, after one warm-up each."""
    base = args + ["--index", str(index), "--json", "-k", str(K)]
    print(f"[cold] {label}: warm-up", file=sys.stderr, flush=True)
    before_res = run_cli(base, child_env(pycache, True))[1]
    after_res = run_cli(base, child_env(pycache, False))[1]
    before, after, before_cpu, after_cpu = [], [], [], []
    for i in range(runs):
        wall, _, _, cpu = run_cli(base, child_env(pycache, True))
        before.append(wall)
        before_cpu.append(cpu)
        wall, _, _, cpu = run_cli(base, child_env(pycache, False))
        after.append(wall)
        after_cpu.append(cpu)
        print(
            f"[cold] {label}: run {i + 1}/{runs} torch {before[-1]:.2f}s fast {after[-1]:.2f}s",
            file=sys.stderr,
            flush=True,
        )
    imports = run_cli(base, child_env(pycache, False, importtime=True))[2]
    heavy = sorted(
        {
            ln.split("|")[-1].strip()
            for ln in imports.splitlines()
            if ln.startswith("import time:")
            and ln.split("|")[-1].strip().split(".")[0] in ("torch", "open_clip", "torchvision", "transformers")
        }
    )
    return {
        "index": str(index),
        "args": args,
        "before_torch": summary(before, before_cpu),
        "after_fast": summary(after, after_cpu),
        "speedup_median": statistics.median(before) / statistics.median(after),
        "results": compare(before_res, after_res),
        "heavy_imports_on_fast_path": heavy,
    }


def cold_image(index: Path, image: Path, runs: int, pycache: Path, label: str) -> dict:
    return cold_pair(index, ["--image", str(image)], runs, pycache, f"image {label}")


# ------------------------------------------------------------------------------------------ indexing
def write_jpegs(folder: Path, n: int) -> Path:
    """n distinct 1600x1200 JPEGs (smooth gradients plus shapes, so they compress like photos), made once."""
    done = folder / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return folder
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1200, 0:1600].astype(np.float32)
    for i in range(n):
        c = rng.uniform(0, 255, (3, 3)).astype(np.float32)
        arr = np.stack(
            [c[k, 0] + (c[k, 1] - c[k, 0]) * xx / 1600 + (c[k, 2] - c[k, 0]) * yy / 1200 / 2 for k in range(3)], -1
        )
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, 1400)), int(rng.integers(0, 1000))
            d.ellipse(
                [x0, y0, x0 + int(rng.integers(50, 400)), y0 + int(rng.integers(50, 400))],
                fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
            )
        im.save(folder / f"photo_{i:05d}.jpg", quality=90)
    done.write_text(str(n))
    return folder


def _top10_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of each row's 10 nearest rows under a (itself excluded) that b finds too."""

    def top(x):
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :10]

    ta, tb = top(a), top(b)
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ta, tb)]))


def run_index_bench(
    workdir: Path, n: int, rounds: int, pycache: Path, bf16: bool = False, base: Path | None = None
) -> dict:
    """`retrieval index` over n JPEGs into a new index per run: torch vs onnx, default and rclip-like settings
    (and torch with --precision bf16 at the default settings when bf16 is set; and torch fp32 and, with bf16,
    bf16 of an earlier version's source tree `base` at the default settings, interleaved with the others)."""
    import shutil

    photos = write_jpegs(workdir / f"jpegs-{n}", n)
    settings = {"default": [], "batch8-workers2": ["--batch-size", "8", "--workers", "2"]}
    env = child_env(pycache, False)
    # make sure the export is in the cache before timing (made once per user; not part of an index run)
    warm = workdir / "index-warmup"
    shutil.rmtree(warm, ignore_errors=True)
    subprocess.run(
        cli_command() + ["index", str(photos), "--index", str(warm), "--model", SPEC, "-q", "--device", "cpu"],
        env=env,
        check=True,
        cwd=str(ROOT),
        capture_output=True,
    )
    times: dict = {}
    vectors: dict = {}
    runtimes = {"torch": ["--runtime", "torch"], "onnx": ["--runtime", "onnx"]}
    if bf16:  # torch over bfloat16 weights (--precision bf16), at the default settings only
        runtimes["torch-bf16"] = ["--precision", "bf16"]
    if base is not None:  # the earlier version, run from its own tree (its cli.py imports its own packages)
        runtimes["torch-base"] = ["--runtime", "torch"]
        if bf16:
            runtimes["torch-bf16-base"] = ["--precision", "bf16"]
    for r in range(rounds):
        for name, extra in settings.items():
            for rt, rt_args in runtimes.items():
                if rt.startswith("torch-bf16") or rt.endswith("-base"):
                    if name != "default":
                        continue
                command = [sys.executable, str(base / "cli.py")] if rt.endswith("-base") else cli_command()
                target = workdir / f"index-{rt}"
                shutil.rmtree(target, ignore_errors=True)
                t = time.perf_counter()
                subprocess.run(
                    command
                    + [
                        "index",
                        str(photos),
                        "--index",
                        str(target),
                        "--model",
                        SPEC,
                        "-q",
                        "--device",
                        "cpu",
                        *rt_args,
                        *extra,
                    ],
                    env=env,
                    check=True,
                    cwd=str(base if rt.endswith("-base") else ROOT),
                    capture_output=True,
                )
                wall = time.perf_counter() - t
                times.setdefault(f"{rt} {name}", []).append(wall)
                print(
                    f"[index] round {r + 1}/{rounds} {rt} {name}: {n / wall:.1f} images/s", file=sys.stderr, flush=True
                )
                if r == 0 and name == "default":
                    from retrieval.store.index import Index

                    with Index.open(target) as idx:
                        rows = sorted(idx.store.image_ids_with_hash(), key=lambda x: x[1])
                        vectors[rt] = idx.store.get_embeddings("image", [h for _, h in rows], idx.dim)
    out = {
        "images": n,
        "size": "1600x1200 JPEG",
        "model": SPEC,
        "rounds": rounds,
        "max_abs_diff_onnx_vs_torch": float(np.abs(vectors["onnx"] - vectors["torch"]).max()),
    }
    if base is not None:
        out["base"] = str(base)
        out["torch_same_as_base"] = bool(np.array_equal(vectors["torch"], vectors["torch-base"]))
    if "torch-bf16" in vectors:
        a, b = vectors["torch"], vectors["torch-bf16"]
        out["bf16_vs_fp32"] = {
            "max_abs_diff": float(np.abs(a - b).max()),
            "min_cosine": float((a * b).sum(axis=1).min()),
            # each stored vector as an image query: how much of its fp32 top 10 the bf16 vectors find
            "top10_overlap": _top10_overlap(a, b),
        }
    out["runs"] = {
        k: {
            "median_s": statistics.median(v),
            "images_per_s": n / statistics.median(v),
            "runs_s": [round(x, 2) for x in v],
        }
        for k, v in times.items()
    }
    return out


# ------------------------------------------------------------------------------------------ warm
def warm_worker(index: str, mode: str, n_queries: int, image: str) -> dict:
    """Runs in its own process: one Searcher, warm-up, then n distinct queries timed end to end."""
    from retrieval.query.searcher import Searcher

    out: dict = {"mode": mode}
    image_mode = mode.startswith("image")
    with Searcher.open(index, device="cpu") as s:
        out["runtime"] = s.encoder.runtime
        vi = s.index.vectors("images", mmap=True)
        out["n_vectors"] = int(vi.ntotal)
        out["index_kind"] = vi.kind
        queries = warm_queries(n_queries)
        if image_mode:
            from PIL import Image

            base = Image.open(image).convert("RGB")
            items = [base.rotate(i % 30, expand=False) for i in range(n_queries)]
        else:
            items = queries
        t = time.perf_counter()
        s.warm()  # the vector files into memory, as `serve` does when it starts
        out["warm_s"] = time.perf_counter() - t
        for it in items[:5]:  # warm-up: model load, the prepacked sessions
            s.search(image=it, k=K) if image_mode else s.search(it, k=K)
        tot, enc, vec, cpu = [], [], [], []
        qvecs = []
        for it in items:
            c0 = time.process_time()  # this process's CPU (all its threads)
            t0 = time.perf_counter()
            q = s.embed_query(image=it) if image_mode else s.embed_query(it)
            t1 = time.perf_counter()
            res = s.search_vector(q, k=K)
            t2 = time.perf_counter()
            cpu.append(time.process_time() - c0)
            tot.append(t2 - t0)
            enc.append(t1 - t0)
            vec.append(t2 - t1)
            qvecs.append(q)
            assert len(res) == min(K, vi.ntotal)
        ms = lambda a, p: float(np.percentile(np.array(a) * 1e3, p))  # noqa: E731
        out.update(
            {
                "queries": len(items),
                "total_p50_ms": ms(tot, 50),
                "total_p95_ms": ms(tot, 95),
                "encode_p50_ms": ms(enc, 50),
                "encode_p95_ms": ms(enc, 95),
                "search_join_p50_ms": ms(vec, 50),
                "search_join_p95_ms": ms(vec, 95),
                "cpu_p50_ms": ms(cpu, 50),
            }
        )
        # ANN recall@10 of these queries against exact search over the raw embeddings in SQLite (what the
        # vector file holds when no fusion is trained, as here)
        Q = np.ascontiguousarray(np.stack(qvecs), dtype=np.float32)
        _, found = vi.search(Q, K)
        rows = s.index.store.image_ids_with_hash()
        ids = np.array([i for i, _ in rows], dtype=np.int64)
        X = s.index.store.get_embeddings("image", [h for _, h in rows], s.index.dim)
        truth = []
        for s0 in range(0, len(Q), 64):
            sc = Q[s0 : s0 + 64] @ X.T
            top = np.argpartition(-sc, K - 1, axis=1)[:, :K]
            truth.append(ids[top])
        truth = np.concatenate(truth)
        recall = lambda f: float(np.mean([len(set(a) & set(b)) / K for a, b in zip(f.tolist(), truth.tolist())]))  # noqa: E731
        out["recall_at_10"] = recall(found)
        if mode in ("fast", "image"):
            out["sweep"] = _sweep(s, vi, Q, recall, items, mode, ms)
    return out


def _sweep(s, vi, Q, recall, items, mode, ms) -> list[dict]:
    """The search-time knob (IVF nprobe / HNSW efSearch, as `search --probes`) raised until recall@10 >= 0.98
    on these queries; at that setting the end-to-end pass is timed again."""
    from retrieval.store.vector_kinds import probes_param

    key = probes_param(vi.kind)
    if key is None:
        return []
    start = int(vi.config.params.get(key, 16))
    cap = int(vi.faiss_index.nlist) if key == "nprobe" else 4096
    rows = []
    for value in sorted({v for v in (start, 2 * start, 4 * start, 8 * start, 16 * start, cap) if start <= v <= cap}):
        t = []
        for q in Q:
            t0 = time.perf_counter()
            s.search_vector(q, k=K, probes=value)
            t.append(time.perf_counter() - t0)
        _, found = vi.search(Q, K, probes=value)
        row = {
            key: value,
            "recall_at_10": recall(found),
            "search_join_p50_ms": ms(t, 50),
            "search_join_p95_ms": ms(t, 95),
        }
        rows.append(row)
        if row["recall_at_10"] >= 0.98:
            tot = []
            for it in items:
                t0 = time.perf_counter()
                q = s.embed_query(image=it) if mode == "image" else s.embed_query(it)
                s.search_vector(q, k=K, probes=value)
                tot.append(time.perf_counter() - t0)
            row.update({"total_p50_ms": ms(tot, 50), "total_p95_ms": ms(tot, 95)})
            break
    return rows


def run_warm(index: Path, mode: str, n_queries: int, image: Path, pycache: Path) -> dict:
    print(f"[warm] {index.name}: {mode}", file=sys.stderr, flush=True)
    env = child_env(pycache, torch_path=mode.endswith("torch"))
    p = subprocess.run(
        [sys.executable, __file__, "--_warm", str(index), mode, str(n_queries), str(image)],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(ROOT),
    )
    if p.returncode != 0:
        raise RuntimeError(f"warm worker failed: {p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ report
def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def write_report(out: Path, res: dict, cmd: str, name: str = "cold_query") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    lines = [
        f"# Query latency and CPU indexing ({MACHINE})",
        "",
        f"`{cmd}`",
        "",
        f"Load average at start / end: {res['load_start']} / {res['load_end']} (2 cores, shared with other work).",
        "Cold = new process to printed results (`retrieval search ... --json -k 10`), interleaved runs. CPU = the",
        "child's user+sys seconds (what the work costs, whatever the load); wall = what a user waits.",
        "",
        "| index | query | before: torch, median [min-max] s | after: onnxruntime, median [min-max] s | speedup "
        "| CPU s before / after | same top-10 | max score diff | torch imported on the onnx path |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cold"] + res.get("cold_image", []):
        b, a = c["before_torch"], c["after_fast"]
        query = "image" if "--image" in c["args"] else "text"
        lines.append(
            f"| {c['label']} | {query} | {b['median_s']:.2f} [{b['min_s']:.2f}-{b['max_s']:.2f}] | "
            f"{a['median_s']:.2f} [{a['min_s']:.2f}-{a['max_s']:.2f}] | {c['speedup_median']:.1f}x | "
            f"{b['cpu_median_s']:.2f} / {a['cpu_median_s']:.2f} | "
            f"{c['results']['same_top10']} | {c['results']['max_score_diff']:.1e} | "
            f"{'no' if not c['heavy_imports_on_fast_path'] else ', '.join(c['heavy_imports_on_fast_path'][:3])} |"
        )
    ix = res.get("index")
    if ix:
        lines += [
            "",
            f"`retrieval index` end to end (new process, new index, model {ix['model']}, export already in the "
            f"cache) over {ix['images']} {ix['size']}s, {ix['rounds']} interleaved rounds; max abs difference of the "
            f"stored vectors onnx vs torch: {ix['max_abs_diff_onnx_vs_torch']:.1e}.",
            "",
            "| runtime, settings | median s | images/s | runs s |",
            "|---|---|---|---|",
        ]
        for k, v in ix["runs"].items():
            lines.append(f"| {k} | {v['median_s']:.1f} | {v['images_per_s']:.1f} | {v['runs_s']} |")
        q = ix.get("bf16_vs_fp32")
        if q:
            lines += [
                "",
                f"--precision bf16 against torch fp32 (stored vectors): max abs difference {q['max_abs_diff']:.1e}, "
                f"lowest cosine {q['min_cosine']:.5f}, image-to-image top-10 overlap {q['top10_overlap']:.3f}.",
            ]
        if ix.get("base"):
            lines += [
                "",
                f"`-base` rows: the source tree {ix['base']}; torch fp32 vectors identical to this version's: "
                f"{ix['torch_same_as_base']}.",
            ]
    ck = res.get("cold_image_checkpoint")
    if ck:
        b, a = ck["before_init"], ck["after_no_init"]
        lines += [
            "",
            f"Cold image query, {ck['label']}: random init then load (before) vs building without init "
            "(after), interleaved:",
            "",
            "| before, median [min-max] s | after, median [min-max] s | CPU s before / after | same top-10 | "
            "max score diff |",
            "|---|---|---|---|---|",
            f"| {b['median_s']:.2f} [{b['min_s']:.2f}-{b['max_s']:.2f}] | {a['median_s']:.2f} "
            f"[{a['min_s']:.2f}-{a['max_s']:.2f}] | "
            f"{b['cpu_median_s']:.2f} / {a['cpu_median_s']:.2f} | {ck['results']['same_top10']} | "
            f"{ck['results']['max_score_diff']:.1e} |",
        ]
    lines += (
        []
        if not res["warm"]
        else [
            "",
            "Warm: one process, Searcher.search end to end (encode + FAISS + SQLite join), distinct queries, after",
            "Searcher.warm() (the vector files read into memory, as `serve` does at start) and 5 warm-up queries;",
            "CPU p50 = process CPU time per query (all threads).",
            "",
            "| index | vectors | kind | query | queries | p50 ms | p95 ms | CPU p50 ms | encode p50 ms | "
            "FAISS+SQLite p50 ms | recall@10 vs exact |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    )
    for w in res["warm"]:
        mode = {
            "fast": "text, onnxruntime",
            "torch": "text, torch",
            "image": "image, onnxruntime",
            "image-torch": "image, torch",
        }[w["mode"]]
        lines.append(
            f"| {w['label']} | {w['n_vectors']:,} | {w['index_kind']} | {mode} | {w['queries']} | "
            f"{w['total_p50_ms']:.1f} | "
            f"{w['total_p95_ms']:.1f} | {w['cpu_p50_ms']:.1f} | {w['encode_p50_ms']:.1f} | "
            f"{w['search_join_p50_ms']:.2f} | {w['recall_at_10']:.3f} |"
        )
    sweeps = [w for w in res["warm"] if w.get("sweep")]
    if sweeps:
        lines += [
            "",
            "Search-time knob raised until recall@10 >= 0.98 on the same queries (FAISS+SQLite timed alone; "
            "end to end re-timed at the first setting that reaches it):",
            "",
            "| index | query | setting | recall@10 | FAISS+SQLite p50 / p95 ms | end-to-end p50 / p95 ms |",
            "|---|---|---|---|---|---|",
        ]
        for w in sweeps:
            for r in w["sweep"]:
                knob = next(k for k in ("nprobe", "efSearch") if k in r)
                e2e = f"{r['total_p50_ms']:.1f} / {r['total_p95_ms']:.1f}" if "total_p50_ms" in r else ""
                lines.append(
                    f"| {w['label']} | {w['mode']} | {knob}={r[knob]} | {r['recall_at_10']:.3f} | "
                    f"{r['search_join_p50_ms']:.2f} / {r['search_join_p95_ms']:.2f} | {e2e} |"
                )
    lines.append("")
    (out / f"{name}.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="images in the ViT-B-32 index (cold runs and warm)")
    ap.add_argument("--runs", type=int, default=5, help="cold runs per path")
    ap.add_argument("--image-runs", type=int, default=3, help="cold image-query runs")
    ap.add_argument("--warm-queries", type=int, default=200)
    ap.add_argument("--warm-n", default="", help="extra index sizes for warm queries only, e.g. 1000000")
    ap.add_argument(
        "--warm-index-types", default="auto", help="vector index kinds for the --warm-n indexes, e.g. auto,ivfflat"
    )
    ap.add_argument(
        "--modes",
        default="fast,torch,image,image-torch",
        help="warm query modes: fast (text, onnx), torch (text, torch), image (onnx), image-torch",
    )
    ap.add_argument("--skip-starter", action="store_true")
    ap.add_argument(
        "--parts",
        default="cold,image,image-checkpoint,warm",
        help="comma-separated subset of cold,image,image-checkpoint,warm",
    )
    ap.add_argument("--quick", action="store_true", help="small index, 2 runs: a smoke run")
    ap.add_argument("--index-n", type=int, default=200, help="1600x1200 JPEGs for --parts index")
    ap.add_argument("--index-rounds", type=int, default=2, help="interleaved rounds of --parts index")
    ap.add_argument(
        "--index-bf16", action="store_true", help="--parts index: also torch with --precision bf16 (default settings)"
    )
    ap.add_argument(
        "--index-base",
        type=Path,
        help="--parts index: also index with this earlier source tree (torch fp32, and bf16 with --index-bf16), "
        "interleaved; make it with `git archive REV | tar -x -C DIR`",
    )
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "retrieval_cold_query"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--name", default="cold_query", help="output files: NAME.json and NAME.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.runs, args.image_runs, args.warm_queries = min(args.n, 5000), 2, 1, 30
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pycache = workdir / "pycache"
    cmd = "python benchmarks/cold_query.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    res: dict = {
        "machine": MACHINE,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "query": QUERY,
        "command": cmd,
        "load_start": load_average(),
        "cold": [],
        "cold_image": [],
        "warm": [],
    }
    image = query_image(workdir)

    parts = set(args.parts.split(","))
    vit = starter = None
    if parts - {"index"}:
        print(f"[build] {SPEC} x {args.n}", file=sys.stderr, flush=True)
        vit = build_synthetic_index(workdir / f"vitb32-{args.n}", args.n)
        starter = None if args.skip_starter else build_starter_index(workdir / "starter")
    if "cold" in parts:
        c = cold_pair(vit, [QUERY], args.runs, pycache, f"{SPEC}, {args.n:,} images")
        c["label"] = f"{SPEC}, {args.n:,} images (synthetic vectors)"
        res["cold"].append(c)
        if starter is not None:
            c = cold_pair(starter, ["a cat"], args.runs, pycache, "starter")
            c["label"] = "starter, 18 sample photos"
            res["cold"].append(c)
    if args.image_runs and "image-checkpoint" in parts:
        print("[build] ViT-B-32 from a local checkpoint, 18 photos", file=sys.stderr, flush=True)
        ck = build_checkpoint_index(workdir / "vitb32-checkpoint")
        c = cold_image_checkpoint(ck, image, args.runs, pycache)
        c["label"] = "ViT-B-32 from a local .safetensors checkpoint, 18 sample photos"
        res["cold_image_checkpoint"] = c
    if args.image_runs and "image" in parts:
        c = cold_image(vit, image, args.image_runs, pycache, SPEC)
        c["label"] = f"{SPEC}, {args.n:,} images"
        res["cold_image"].append(c)
        if starter is not None:
            c = cold_image(starter, image, args.image_runs, pycache, "starter")
            c["label"] = "starter, 18 sample photos"
            res["cold_image"].append(c)
    if "index" in parts:
        res["index"] = run_index_bench(
            workdir, args.index_n, args.index_rounds, pycache, bf16=args.index_bf16, base=args.index_base
        )

    warm_sets = [(vit, f"{SPEC}, {args.n:,}")] if "warm" in parts else []
    for n in [int(x) for x in args.warm_n.split(",") if x.strip() and "warm" in parts]:
        for kind in args.warm_index_types.split(","):
            print(f"[build] {SPEC} x {n} ({kind})", file=sys.stderr, flush=True)
            root = workdir / (f"vitb32-{n}" if kind == "auto" else f"vitb32-{n}-{kind}")
            warm_sets.append((build_synthetic_index(root, n, index_type=kind), f"{SPEC}, {n:,}"))
    if starter is not None and "warm" in parts:
        warm_sets.append((starter, "starter, 18"))
    for index, label in warm_sets:
        for mode in args.modes.split(","):
            w = run_warm(
                index,
                mode,
                args.warm_queries if mode.startswith("fast") else max(20, args.warm_queries // 4),
                image,
                pycache,
            )
            w["label"] = label
            res["warm"].append(w)

    res["load_end"] = load_average()
    out = Path(args.out)
    write_report(out, res, cmd, args.name)
    print((out / f"{args.name}.md").read_text())
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}\nreproduce: {cmd}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_warm":
        print(json.dumps(warm_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])))
        sys.exit(0)
    sys.exit(main())
