"""Indexing with `--executor local` against `--executor ray` on this machine, plus a scaling model for N nodes.

    python benchmarks/ray_index.py                          # 200 photos of 1600x1200, tiny-clip:none
    python benchmarks/ray_index.py --n 1000 --model ViT-B-32:none
    python benchmarks/ray_index.py --gpu-img-s 2500 --gpus-per-node 8   # scaling model with a measured GPU figure

In one run, on the same freshly generated JPEGs (benchmarks/data/ray_index/, made once): a local index run
(decode workers + encoder in this process), then the same run on a local Ray instance started by the run
(Ray start-up timed on its own), each on a fresh index. Reported: wall time, images/s, Ray's overhead
(start-up and steady state), and that both indexes hold the same vectors (max abs difference).

The scaling model: the driver is the single SQLite writer, so a cluster of N nodes indexes at
    min(N x per-node encode rate, N x per-node decode rate, driver commit rate)
after a fixed start-up. The driver commit rate is measured here (Store writes of 64-row batches); the
per-node rates are parameters (--gpu-img-s, --decode-img-s-per-core, --cores-per-node): no GPU figure has
been measured for this project yet, so the default GPU rate is a placeholder to be replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault(
    "RETRIEVAL_MODEL_CONFIGS", str(ROOT / "tests" / "model_configs")
)  # the tests' tiny-clip architectures
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _photos(data: Path, n: int) -> Path:
    from corpus import make_photo_folder

    folder = data / f"photos_{n}"
    if len(list(folder.glob("*.jpg"))) != n:
        make_photo_folder(folder, n, size=(1600, 1200), distinct=32)
    return folder


def _index(folder: Path, index_dir: Path, model: str, executor: str, actors, batch_size: int) -> dict:
    from index_data.options import IndexOptions
    from index_data.pipeline import run_index

    opts = IndexOptions(
        paths=[str(folder)],
        model=model,
        device="cpu",
        progress=False,
        batch_size=batch_size,
        executor=executor,
        ray_actors=actors,
    )
    t0 = time.perf_counter()
    r = run_index(index_dir, opts)
    wall = time.perf_counter() - t0
    return {
        "wall_s": round(wall, 2),
        "encoded": r.encoded,
        "images_total": r.images_total,
        "errors": len(r.errors),
        "images_per_s": round(r.encoded / wall, 2) if wall else None,
    }


def _vectors(index_dir: Path) -> dict:
    from retrieval.store.index import Index

    with Index.open(index_dir) as idx:
        hashes = sorted(h for (h,) in idx.store.db.execute("SELECT DISTINCT hash FROM images"))
        return dict(zip(hashes, idx.store.get_embeddings("image", hashes, idx.identity.dim)))


def driver_commit_rate(dim: int, n: int = 4096, batch: int = 64) -> float:
    """Images/s the driver can commit (SQLite, one transaction per batch): the cluster's ceiling."""
    from retrieval.store.db import Store

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "meta.sqlite")
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            keys = [f"{j:064x}" for j in range(i, i + batch)]
            with store.transaction():
                store.put_embeddings("image", keys, rng.standard_normal((batch, dim)).astype(np.float32))
                for j, k in enumerate(keys):
                    store.upsert_image(f"/photos/img_{i + j:08d}.jpg", 1000, 1, k, 1600, 1200)
        secs = time.perf_counter() - t0
        store.close()
    return n / secs


def scaling_model(args, startup_s: float, commit_rate: float) -> list[dict]:
    rows = []
    for nodes in args.nodes:
        encode = nodes * args.gpus_per_node * args.gpu_img_s
        decode = nodes * args.cores_per_node * args.decode_img_s_per_core
        rate = min(encode, decode, commit_rate)
        bound = {encode: "GPU encode", decode: "decode CPUs", commit_rate: "driver commit"}[rate]
        rows.append(
            {
                "nodes": nodes,
                "gpus": nodes * args.gpus_per_node,
                "images_per_s": round(rate),
                "bound_by": bound,
                "hours_for_photos": round((startup_s + args.model_photos / rate) / 3600, 2),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="photos (1600x1200 JPEG)")
    ap.add_argument("--model", default="tiny-clip:none")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads of the local run (default: torch's, the core count); Ray's CPU actors use their CPU share",
    )
    ap.add_argument("--repeat", type=int, default=3, help="alternated local/ray pairs; medians are reported")
    ap.add_argument("--ray-actors", type=int, default=None)
    ap.add_argument("--data", default=str(ROOT / "benchmarks" / "data" / "ray_index"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument(
        "--gpu-img-s",
        type=float,
        default=2000.0,
        help="per-GPU encode images/s for the model (placeholder until the GPU issue measures it)",
    )
    ap.add_argument("--gpus-per-node", type=int, default=1)
    ap.add_argument("--cores-per-node", type=int, default=16)
    ap.add_argument(
        "--decode-img-s-per-core",
        type=float,
        default=None,
        help="default: this run's local decode rate per core (measured on 1600x1200 JPEGs)",
    )
    ap.add_argument("--nodes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--model-photos", type=int, default=50_000_000, help="photo count for the hours column")
    args = ap.parse_args()
    cmd = "python benchmarks/ray_index.py " + shlex.join(sys.argv[1:])

    import ray
    from report import machine_info

    from index_data.decode import decode_stream
    from index_data.workers import affinity_workers as default_workers
    from retrieval.models.registry import load_encoder

    folder = _photos(Path(args.data), args.n)
    enc = load_encoder(args.model, device="cpu")
    if args.decode_img_s_per_core is None:  # decode alone, in this process: one core's rate
        paths = sorted(str(p) for p in folder.glob("*.jpg"))[:64]
        t0 = time.perf_counter()
        for _ in decode_stream([(p, p) for p in paths], enc.preprocess, enc.image_size, workers=0):
            pass
        args.decode_img_s_per_core = round(len(paths) / (time.perf_counter() - t0), 1)

    import statistics

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    runs = {"local": [], "ray": [], "startup": []}
    max_diff = 0.0
    for _rep in range(args.repeat):  # alternated, so both executors meet the same machine load
        with tempfile.TemporaryDirectory(prefix="rb", dir="/tmp") as tmp:
            tmp = Path(tmp)
            runs["local"].append(_index(folder, tmp / "local", args.model, "local", None, args.batch_size))
            t0 = time.perf_counter()
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", _temp_dir=str(tmp / "r"))
            runs["startup"].append(time.perf_counter() - t0)
            resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            try:
                runs["ray"].append(_index(folder, tmp / "ray", args.model, "ray", args.ray_actors, args.batch_size))
            finally:
                ray.shutdown()
            a, b = _vectors(tmp / "local"), _vectors(tmp / "ray")
            assert a.keys() == b.keys(), "the two indexes hold different contents"
            max_diff = max(max_diff, max(float(np.abs(a[h] - b[h]).max()) for h in a))

    def median_run(rs):
        return min(rs, key=lambda r: abs(r["wall_s"] - statistics.median(x["wall_s"] for x in rs)))

    local, on_ray = median_run(runs["local"]), median_run(runs["ray"])
    startup = statistics.median(runs["startup"])

    from index_data.ray_executor import plan_resources

    settings = plan_resources(resources, args.ray_actors, None)
    commit = driver_commit_rate(enc.dim)
    overhead = on_ray["wall_s"] - local["wall_s"]
    doc = {
        "title": "Indexing: local executor vs Ray executor",
        "command": cmd,
        "machine": machine_info(),
        "photos": args.n,
        "size": "1600x1200 JPEG q90",
        "model": args.model,
        "decode_workers_local": default_workers(),
        "torch_threads_local": torch.get_num_threads(),
        "repeat": args.repeat,
        "all_runs": {
            "local_wall_s": [r["wall_s"] for r in runs["local"]],
            "ray_wall_s": [r["wall_s"] for r in runs["ray"]],
            "ray_startup_s": [round(x, 2) for x in runs["startup"]],
        },
        "local": local,
        "ray": {
            **on_ray,
            "startup_s": round(startup, 2),
            "resources": resources,
            "actors": settings.actors,
            "batch_size": settings.batch_size,
        },
        "ray_overhead_s": round(overhead + startup, 2),
        "ray_overhead_after_startup_s": round(overhead, 2),
        "max_abs_vector_diff": max_diff,
        "driver_commit_images_per_s": round(commit),
        "scaling_params": {
            "gpu_img_s": args.gpu_img_s,
            "gpus_per_node": args.gpus_per_node,
            "cores_per_node": args.cores_per_node,
            "decode_img_s_per_core": args.decode_img_s_per_core,
            "startup_s": round(startup, 2),
            "gpu_figure": "placeholder (not measured)",
        },
        "scaling": scaling_model(args, startup, commit),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = args.model.replace(":", "_").replace("/", "_")
    (out / f"ray_index_{slug}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [
        f"# {doc['title']}",
        "",
        f"`{cmd}` on {doc['machine'].get('cpu')} ({doc['machine'].get('cores')} cores)",
        "",
        (
            f"{args.n} photos, {doc['size']}, model {args.model}, fresh index each; median of {args.repeat} alternated "
            f"local/ray pairs (all walls: local {doc['all_runs']['local_wall_s']}, ray "
            f"{doc['all_runs']['ray_wall_s']})."
        ),
        "",
        "| executor | wall s | images/s |",
        "|---|---|---|",
        f"| local ({doc['decode_workers_local']} decode workers, {doc['torch_threads_local']} torch threads) | "
        f"{local['wall_s']} | {local['images_per_s']} |",
        (
            f"| ray ({settings.actors} actor(s) of {settings.num_cpus:g} CPU, batch {settings.batch_size}, "
            f"{resources}) | {on_ray['wall_s']} "
            f"(+{startup:.1f} s Ray start-up) | {on_ray['images_per_s']} |"
        ),
        "",
        (
            f"Ray overhead: {doc['ray_overhead_s']} s in all, {doc['ray_overhead_after_startup_s']} s after start-up. "
            f"Max |vector difference|: {max_diff:.2e}. Driver commit ceiling: "
            f"{doc['driver_commit_images_per_s']} images/s."
        ),
        "",
        (
            f"## Scaling model ({args.gpus_per_node} GPU(s) of {args.gpu_img_s:g} img/s per node - placeholder; "
            f"{args.cores_per_node} decode cores of {args.decode_img_s_per_core} img/s), {args.model_photos:,} photos"
        ),
        "",
        "| nodes | GPUs | images/s | bound by | hours |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {r['nodes']} | {r['gpus']} | {r['images_per_s']} | {r['bound_by']} | {r['hours_for_photos']} |"
        for r in doc["scaling"]
    ]
    (out / f"ray_index_{slug}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nreproduce: {cmd}")


if __name__ == "__main__":
    main()
