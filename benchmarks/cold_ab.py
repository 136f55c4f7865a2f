"""Cold CLI queries, two source trees A/B: the same `cli.py search` (text and image) from a baseline checkout
and from this one, interleaved run by run so that both meet the same machine load; medians of wall time.

    git archive HEAD~1 | tar -x -C /tmp/base                      # the baseline tree
    python benchmarks/cold_ab.py --base /tmp/base --n 20000 --runs 7

The index is benchmarks/cold_query.py's synthetic ViT-B-32:none index (built once under --workdir, with the
model's export in the cache); both trees use the same index and, by default, the same export. With
`--base-cache DIR` the baseline tree runs on its own export cache, which it fills itself (its own exporter) when
DIR holds none: a change to how exports are made is then measured too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cold_query import QUERY, SPEC, K, build_synthetic_index, child_env, query_image  # noqa: E402


def run(tree: Path, args: list[str], env: dict) -> tuple[float, float, list[dict]]:
    """One search in a new process: wall seconds, the child's CPU seconds (user + sys), the results."""
    env = {**env, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, str(tree / "cli.py"), "search", *args], env=env, capture_output=True, text=True, cwd=str(tree)
    )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        raise RuntimeError(f"search failed in {tree}: {p.stderr[-1500:]}")
    return wall, cpu, [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def base_export(tree: Path, cache: Path, env: dict) -> None:
    """The baseline tree's own export of SPEC in cache (made by its code, once)."""
    code = (
        "from retrieval.models.registry import load_encoder\n"
        "from retrieval.models.onnx_export import ensure_export\n"
        f"ensure_export(load_encoder({SPEC!r}, device='cpu'))\n"
    )
    env = {**env, "PYTHONPATH": str(tree), "RETRIEVAL_CACHE_DIR": str(cache)}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tree), check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the baseline source tree")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/retrieval-cold-ab"))
    ap.add_argument("--base-cache", type=Path, default=None, help="the baseline tree's own export cache")
    a = ap.parse_args()
    idx = build_synthetic_index(a.workdir / f"vitb32-{a.n}", a.n)
    photo = query_image(a.workdir)
    env = child_env(a.workdir / "pycache", False)
    envs = {"base": env, "new": env}
    if a.base_cache is not None:
        base_export(a.base.resolve(), a.base_cache.resolve(), env)
        envs["base"] = {**env, "RETRIEVAL_CACHE_DIR": str(a.base_cache.resolve())}
    cases = {"text": [QUERY], "image": ["--image", str(photo)]}
    trees = {"base": a.base.resolve(), "new": ROOT}
    times = {(c, t): [] for c in cases for t in trees}
    cpus = {(c, t): [] for c in cases for t in trees}
    results = {}
    for c, args in cases.items():  # warm-up (bytecode, page cache)
        for t, tree in trees.items():
            results[(c, t)] = run(tree, args + ["--index", str(idx), "--json", "-k", str(K)], envs[t])[2]
    for _ in range(a.runs):
        for c, args in cases.items():
            for t, tree in trees.items():
                wall, cpu, _ = run(tree, args + ["--index", str(idx), "--json", "-k", str(K)], envs[t])
                times[(c, t)].append(wall)
                cpus[(c, t)].append(cpu)
    load = os.getloadavg()
    out = {
        "n": a.n,
        "runs": a.runs,
        "loadavg": [round(x, 2) for x in load],
        "base_cache": bool(a.base_cache),
        "cases": {},
    }
    for c in cases:
        sa = {r["id"]: r["score"] for r in results[(c, "base")]}
        sb = {r["id"]: r["score"] for r in results[(c, "new")]}
        out["cases"][c] = {
            t: {
                "median_s": round(statistics.median(times[(c, t)]), 3),
                "cpu_median_s": round(statistics.median(cpus[(c, t)]), 3),
                "runs": [round(x, 3) for x in times[(c, t)]],
            }
            for t in trees
        }
        ids = {t: [r["id"] for r in results[(c, t)]] for t in trees}
        out["cases"][c]["same_top10"] = ids["base"] == ids["new"]
        out["cases"][c]["max_score_diff"] = max((abs(sa[i] - sb[i]) for i in set(sa) & set(sb)), default=0.0)
    print(json.dumps(out, indent=1))
    print("| query | base median (s) | new median (s) | CPU s base / new | same top 10 | max score diff |")
    print("|---|---|---|---|---|---|")
    for c, r in out["cases"].items():
        b, n = r["base"]["median_s"], r["new"]["median_s"]
        cb, cn = r["base"]["cpu_median_s"], r["new"]["cpu_median_s"]
        print(f"| {c} | {b} | {n} | {cb} / {cn} | {r['same_top10']} | {r['max_score_diff']:.1e} |")
    print(
        f"load average after: {out['loadavg']}; command: python benchmarks/cold_ab.py --base {a.base} --n {a.n} "
        f"--runs {a.runs} --workdir {a.workdir}" + (f" --base-cache {a.base_cache}" if a.base_cache else "")
    )


if __name__ == "__main__":
    main()
