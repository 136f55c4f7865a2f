"""Run every benchmark, then regenerate benchmarks/RESULTS.md.

    python benchmarks/run_all.py             # full sizes: hours on a 2-core machine (1M vectors, 1,000 photos per model)
    python benchmarks/run_all.py --quick     # a few minutes per step: 10k vectors, 100 photos, small corpora
    python benchmarks/run_all.py --only speed,report
    python benchmarks/run_all.py --skip starter_quality --sizes 10000,100000

Steps (in order; each is its own script, run as a subprocess, and prints the command that reproduces it):

  speed_vectors    benchmarks/speed_vectors.py   vector layer: latency / recall / memory per index kind and size
  bench_decode     benchmarks/bench_decode.py    decode stage designs (its text output -> out/bench_decode.txt)
  starter_quality  benchmarks/starter_quality.py offline starter model: recall on the sample photos, speed
  fusion           benchmarks/fusion_benchmark.py does learned fusion help (held-out recall)
  speed            benchmarks/speed.py           indexing throughput, Searcher latency, memory, cold CLI
  recall           benchmarks/recall.py          recall through the engine on the sample photos (starter)
  report           benchmarks/report.py          RESULTS.md from every JSON in the out folder

A failing step is reported and the others still run; the exit code is 1 if any failed. A summary of the run
(commands, seconds, exit codes) goes to out/run_all.json, which the report shows too.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
B = "benchmarks"


def steps(args) -> list[tuple[str, list[str], str | None]]:
    """(name, argv after the interpreter, file to copy stdout into or None)."""
    out = args.out
    q = args.quick
    sizes = args.sizes or ("10000" if q else "10000,100000,1000000")
    s = [
        ("speed_vectors", [f"{B}/speed_vectors.py", "--sizes", sizes, "--queries", "100" if q else "200", "--out", out]
         + (["--ef-sweep", "32,64,128,256", "--nprobe-sweep", "16,64"] if q else []), None),
        ("bench_decode", [f"{B}/bench_decode.py"] + (["--n", "64", "--n-e2e-big", "32", "--repeat", "1",
                                                       "--skip-alternatives"] if q else []),
         str(Path(out) / "bench_decode.txt")),
        ("starter_quality", [f"{B}/starter_quality.py", "--out", str(Path(out) / "starter_quality.json")]
         + (["--quick"] if q else []), None),
        ("fusion", [f"{B}/fusion_benchmark.py", "--out", out, "--quiet"]
         + (["--model", "tiny-clip:none", "--images", "400", "--val", "50", "--test", "100", "--epochs", "5"] if q else []),
         None),
        ("speed", [f"{B}/speed.py", "--out", out] + (["--quick"] if q else [])
         + (["--sizes", args.sizes] if args.sizes else []), None),
        ("recall", [f"{B}/recall.py", "--models", "starter", "--exact", "--out", out], None),
        ("report", [f"{B}/report.py", "--out-dir", out]
         + (["--results", args.results] if args.results else []), None),
    ]
    return s


def run_step(name: str, argv: list[str], tee: str | None) -> tuple[int, float]:
    cmd = [sys.executable, *argv]
    print(f"\n=== {name}: python {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    if tee is None:
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    else:
        Path(tee).parent.mkdir(parents=True, exist_ok=True)
        with open(tee, "w") as f:
            f.write(f"$ python {' '.join(shlex.quote(a) for a in argv)}\n")
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            rc = proc.wait()
    return rc, time.perf_counter() - t


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: minutes per step instead of hours")
    ap.add_argument("--sizes", default=None, help="vector counts for speed_vectors and speed's latency part")
    ap.add_argument("--only", default=None, help="comma-separated step names")
    ap.add_argument("--skip", default="", help="comma-separated step names")
    ap.add_argument("--out", default=f"{B}/out")
    ap.add_argument("--results", default=None, help="RESULTS.md to write (default benchmarks/RESULTS.md)")
    args = ap.parse_args(argv)
    cmd = "python benchmarks/run_all.py" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))
    print(f"reproduce: {cmd}", flush=True)
    plan = steps(args)
    names = [n for n, _, _ in plan]
    only = [s.strip() for s in args.only.split(",")] if args.only else names
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = (set(only) | skip) - set(names)
    if unknown:
        ap.error(f"unknown steps: {', '.join(sorted(unknown))} (steps: {', '.join(names)})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = {"title": "run_all.py: last run", "command": cmd, "steps": []}
    failed = []
    for name, step_argv, tee in plan:
        if name not in only or name in skip:
            continue
        if not (ROOT / step_argv[0]).exists():
            print(f"\n=== {name}: {step_argv[0]} not found, skipped", flush=True)
            summary["steps"].append({"step": name, "command": "python " + " ".join(step_argv), "status": "missing"})
            continue
        if name == "report":  # the report should show this run's summary too
            (Path(args.out) / "run_all.json").write_text(json.dumps(summary, indent=1))
        rc, secs = run_step(name, step_argv, tee)
        summary["steps"].append({"step": name, "command": "python " + " ".join(shlex.quote(a) for a in step_argv),
                                 "seconds": round(secs, 1), "exit_code": rc})
        if rc != 0:
            failed.append(name)
            print(f"=== {name} FAILED (exit {rc})", flush=True)
    (Path(args.out) / "run_all.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{len(summary['steps'])} steps, failed: {', '.join(failed) or 'none'}")
    print(f"reproduce: {cmd}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
