"""Decode-stage benchmark: which worker design, how many workers.

    python benchmarks/bench_decode.py [--n 256] [--models tiny-clip:none,ViT-B-32:none] [--repeat 3]

Writes 1600x1200 JPEGs (quality 90) to benchmarks/data/decode/ once, then reports images/s (median
of --repeat runs) for:
  - decode only (decode + preprocess, tensors ready), index_data.decode.decode_stream with workers 0/1/2
    and fork vs forkserver; plus two alternative designs:
      "torch-in-workers/spawn": workers import torch and run the encoder's preprocess themselves
      "parent-torch-preprocess": PIL workers, but the parent runs the torch preprocess (no numpy finish)
  - end to end (decode + encode in batches of 64) for each model, workers 0/1/2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault(
    "RETRIEVAL_MODEL_CONFIGS", os.path.join(ROOT, "tests", "model_configs")
)  # the tests' tiny-clip architectures
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def _spawn_init():
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _spawn_job(path, target, preprocess):
    from retrieval.images import load_image_with_size

    img, (w, h) = load_image_with_size(path, target)
    return preprocess(img).numpy(), w, h


def bench_torch_in_workers(paths, enc, workers, method="spawn"):
    """Alternative design: torch preprocess inside the workers; returns (startup_s, images/s)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    ctx = multiprocessing.get_context(method)
    c0 = _cpu()
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_spawn_init) as ex:
        list(ex.map(_spawn_job, paths[:workers], [enc.image_size] * workers, [enc._preprocess] * workers))
        t1 = time.perf_counter()
        futs = [ex.submit(_spawn_job, p, enc.image_size, enc._preprocess) for p in paths]
        for f in futs:
            torch.from_numpy(f.result()[0])
        t2 = time.perf_counter()
    LAST_CPU_MS[0] = (_cpu() - c0) * 1000 / len(paths)  # includes the workers' torch import
    return t1 - t0, len(paths) / (t2 - t1)


def run_stream(paths, enc, workers, method=None, encode=False, batch=64, parent_torch=False):
    import torch

    from index_data import decode as D
    from index_data import decode_plan as DP

    jobs = [(i, p) for i, p in enumerate(paths)]
    saved = DP._PLAN_CACHE.get(enc)
    if parent_torch:  # the variant where the parent runs the model's torch preprocess
        DP._PLAN_CACHE[enc] = DP.Plan(saved.pil if saved else ())
    t = time.perf_counter()
    c0 = _cpu()
    n = 0
    try:
        with D.decode_stream(jobs, enc.preprocess, enc.image_size, workers=workers, start_method=method) as s:
            buf = []
            for r in s:
                n += r.ok
                if encode:
                    buf.append(r.tensor)
                    if len(buf) == batch:
                        enc.encode_image_tensors(torch.stack(buf))
                        buf = []
            if encode and buf:
                enc.encode_image_tensors(torch.stack(buf))
    finally:
        if parent_torch:
            DP._PLAN_CACHE[enc] = saved
    assert n == len(paths)
    LAST_CPU_MS[0] = (_cpu() - c0) * 1000 / len(paths)
    return len(paths) / (time.perf_counter() - t)


LAST_CPU_MS = [0.0]


def _cpu() -> float:
    """CPU seconds of this process (all threads) plus its reaped children (the decode workers)."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def med(f, repeat):
    return statistics.median(f() for _ in range(repeat))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--n-e2e-big", type=int, default=128, help="images for the ViT end-to-end runs")
    ap.add_argument("--models", default="tiny-clip:none,ViT-B-32:none")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-alternatives", action="store_true")
    ap.add_argument("--skip-decode", action="store_true", help="end-to-end only")
    args = ap.parse_args()

    from corpus import make_photo_folder

    data = os.path.join(ROOT, "benchmarks", "data", "decode")
    paths = sorted(os.path.join(data, f) for f in os.listdir(data)) if os.path.isdir(data) else []
    if len(paths) < args.n:
        paths = make_photo_folder(data, args.n, (1600, 1200), 90)
    paths = paths[: args.n]

    import torch

    from retrieval.models.registry import load_encoder

    print(
        f"python={sys.version.split()[0]} cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} "
        f"load={os.getloadavg()[0]:.2f} n={len(paths)}"
    )
    for spec in args.models.split(","):
        enc = load_encoder(spec, device="cpu")
        enc.encode_image_tensors(torch.zeros(2, 3, enc.image_size, enc.image_size))  # parent has run torch ops
        print(f"\n== {spec} (image_size {enc.image_size})")
        for w in (0, 1, 2) if not args.skip_decode else ():
            r = med(lambda: run_stream(paths, enc, w), args.repeat)
            print(f"decode-only  workers={w} fork        {r:7.1f} img/s  cpu {LAST_CPU_MS[0]:5.1f} ms/img")
        for w in (1, 2) if not args.skip_decode else ():
            r = med(lambda: run_stream(paths, enc, w, method="forkserver"), args.repeat)
            print(
                f"decode-only  workers={w} forkserver  {r:7.1f} img/s (incl. start)  cpu n/a (forkserver's "
                f"children are not ours to reap)"
            )
        if not args.skip_alternatives and not args.skip_decode:
            for w in (0, 2):
                r = med(lambda: run_stream(paths, enc, w, parent_torch=True), args.repeat)
                print(
                    f"decode-only  workers={w} parent-torch-preprocess {r:7.1f} img/s  cpu {LAST_CPU_MS[0]:5.1f} ms/img"
                )
            for w in (1, 2):
                st, r = bench_torch_in_workers(paths, enc, w, "spawn")
                print(
                    f"decode-only  workers={w} torch-in-workers/spawn {r:7.1f} img/s after a pool start of "
                    f"{st:.1f} s  cpu {LAST_CPU_MS[0]:5.1f} ms/img incl. start"
                )
        n = len(paths) if enc.image_size < 100 else min(len(paths), args.n_e2e_big)
        rep = args.repeat if enc.image_size < 100 else 1
        threads0 = torch.get_num_threads()
        for th in sorted({threads0, 1}, reverse=True):
            torch.set_num_threads(th)
            for w in (0, 1, 2):
                r = med(lambda: run_stream(paths[:n], enc, w, encode=True), rep)
                print(
                    f"end-to-end   workers={w} torch_threads={th} {r:7.1f} img/s  cpu {LAST_CPU_MS[0]:5.1f} "
                    f"ms/img  (n={n})"
                )
        torch.set_num_threads(threads0)
    print(f"\nload={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
