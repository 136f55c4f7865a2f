"""Run every benchmark, then regenerate benchmarks/RESULTS.md.

    python benchmarks/run_all.py             # full sizes: hours (1M vectors, 1,000 photos per model)
    python benchmarks/run_all.py --quick     # minutes per step, small sizes; writes benchmarks/out_quick/
    python benchmarks/run_all.py --only speed,report
    python benchmarks/run_all.py --skip starter_quality --sizes 10000,100000

Steps (in order; each is its own process, and each prints the command that reproduces it):

  speed_vectors    benchmarks/speed_vectors.py   vector layer: latency / recall / memory per index kind and size
  bench_decode     benchmarks/bench_decode.py    decode stage designs (its text output -> out/bench_decode.txt)
  starter_quality  benchmarks/starter_quality.py offline starter model: recall on the sample photos, speed
  fusion           benchmarks/fusion_benchmark.py does learned fusion help (held-out recall; starter; tiny: --quick)
  fusion_tiny      the same with tiny-clip:none (full runs only)
  recall_synth     benchmarks/recall.py          recall on the fusion step's synthetic test split (full runs only)
  speed            benchmarks/speed.py           indexing throughput, Searcher latency, memory, cold CLI
  recall           benchmarks/recall.py          recall through the engine on the sample photos
  cold_query       benchmarks/cold_query.py      cold CLI and warm query latency, numpy vs torch text encoder
  malformed        benchmarks/malformed_report.py the malformed-input corpus, one row per case
  faults           pytest tests/test_kill.py tests/test_concurrency.py tests/test_diskfull.py with FAULTS_OUT
  cold_query_1m    benchmarks/cold_query.py      warm queries on a 1M-vector index (full runs only)
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault(
    "RETRIEVAL_MODEL_CONFIGS", str(ROOT / "tests" / "model_configs")
)  # the tests' tiny-clip architectures
B = "benchmarks"


SYNTH = f"{B}/data/synth_2400_0"  # written by the fusion step (benchmarks/synth_corpus.py)


@dataclass
class Step:
    name: str
    argv: list[str]  # after the interpreter: a script path, or -m pytest ...
    tee: str | None = None  # file to copy stdout into
    env: dict = field(default_factory=dict)
    remove: list[str] = field(default_factory=list)  # files the step appends to: removed first


def steps(args) -> list[Step]:
    out = args.out
    q = args.quick
    sizes = args.sizes or ("10000" if q else "10000,100000,1000000")
    s = [
        Step(
            "speed_vectors",
            [f"{B}/speed_vectors.py", "--sizes", sizes, "--queries", "100" if q else "200", "--out", out]
            + (["--ef-sweep", "32,64,128,256", "--nprobe-sweep", "16,64"] if q else []),
        ),
        Step(
            "bench_decode",
            [f"{B}/bench_decode.py"]
            + (["--n", "64", "--n-e2e-big", "32", "--repeat", "1", "--skip-alternatives"] if q else []),
            tee=str(Path(out) / "bench_decode.txt"),
        ),
        Step(
            "starter_quality",
            [f"{B}/starter_quality.py", "--out", str(Path(out) / "starter_quality.json")] + (["--quick"] if q else []),
        ),
        Step(
            "fusion",
            [f"{B}/fusion_benchmark.py", "--out", out, "--quiet"]
            + (
                ["--model", "tiny-clip:none", "--images", "400", "--val", "50", "--test", "100", "--epochs", "5"]
                if q
                else []
            ),
        ),
        Step(
            "speed",
            [f"{B}/speed.py", "--out", out]
            + (["--quick"] if q else [])
            + (["--sizes", args.sizes] if args.sizes else []),
        ),
        Step(
            "recall",
            [f"{B}/recall.py", "--models", "starter" if q else "starter,ViT-B-32:none", "--exact", "--out", out],
        ),
        Step("cold_query", [f"{B}/cold_query.py", "--out", out] + (["--quick"] if q else [])),
        Step("malformed", [f"{B}/malformed_report.py", "--out", out] + (["--tiny"] if q else [])),
        Step(
            "faults",
            [
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/test_kill.py",
                "tests/test_concurrency.py",
                "tests/test_diskfull.py",
            ],
            env={"FAULTS_OUT": out},
            remove=[str(Path(out) / "faults_diskfull.jsonl")],
        ),
    ]
    if not q:  # the full-size extras behind RESULTS.md
        s[4:4] = [
            Step("fusion_tiny", [f"{B}/fusion_benchmark.py", "--out", out, "--quiet", "--model", "tiny-clip:none"]),
            Step(
                "recall_synth",
                [
                    f"{B}/recall.py",
                    "--captions",
                    f"{SYNTH}/captions.json",
                    "--images",
                    SYNTH,
                    "--split",
                    "test",
                    "--models",
                    "starter",
                    "--exact",
                    "--name",
                    "synth_test",
                    "--out",
                    out,
                ],
            ),
        ]
        s.append(
            Step(
                "cold_query_1m",
                [
                    f"{B}/cold_query.py",
                    "--parts",
                    "warm",
                    "--warm-n",
                    "1000000",
                    "--skip-starter",
                    "--warm-index-types",
                    "auto,ivfflat",
                    "--name",
                    "cold_query_1m",
                    "--out",
                    out,
                ],
            )
        )
    s.append(Step("report", [f"{B}/report.py", "--out-dir", out, "--results", args.results]))
    return s


def run_step(step: Step) -> tuple[int, float]:
    argv = step.argv
    cmd = [sys.executable, *argv]
    print(f"\n=== {step.name}: python {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        **step.env,
    }
    for f in step.remove:
        Path(f).unlink(missing_ok=True)
    t = time.perf_counter()
    if step.tee is None:
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    else:
        Path(step.tee).parent.mkdir(parents=True, exist_ok=True)
        with open(step.tee, "w") as f:
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
    ap.add_argument(
        "--out",
        default=None,
        help="results folder (default benchmarks/out; with --quick benchmarks/out_quick, "
        "so a smoke run never replaces the committed full-size figures)",
    )
    ap.add_argument(
        "--results", default=None, help="Markdown to write (default benchmarks/RESULTS.md; with --quick OUT/RESULTS.md)"
    )
    args = ap.parse_args(argv)
    args.out = args.out or (f"{B}/out_quick" if args.quick else f"{B}/out")
    args.results = args.results or (str(Path(args.out) / "RESULTS.md") if args.quick else f"{B}/RESULTS.md")
    cmd = "python benchmarks/run_all.py" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))
    print(f"reproduce: {cmd}", flush=True)
    plan = steps(args)
    names = [st.name for st in plan]
    only = [s.strip() for s in args.only.split(",")] if args.only else names
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = (set(only) | skip) - set(names)
    if unknown:
        ap.error(f"unknown steps: {', '.join(sorted(unknown))} (steps: {', '.join(names)})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = {"title": "run_all.py: last run", "command": cmd, "steps": []}
    failed = []
    for st in plan:
        if st.name not in only or st.name in skip:
            continue
        script = st.argv[0]
        if script.endswith(".py") and not (ROOT / script).exists():
            print(f"\n=== {st.name}: {script} not found, skipped", flush=True)
            summary["steps"].append({"step": st.name, "command": "python " + " ".join(st.argv), "status": "missing"})
            continue
        if st.name == "report":  # the report should show this run's summary too
            (Path(args.out) / "run_all.json").write_text(json.dumps(summary, indent=1))
        rc, secs = run_step(st)
        prefix = "".join(f"{k}={v} " for k, v in st.env.items())
        summary["steps"].append(
            {
                "step": st.name,
                "command": prefix + "python " + " ".join(shlex.quote(a) for a in st.argv),
                "seconds": round(secs, 1),
                "exit_code": rc,
            }
        )
        if rc != 0:
            failed.append(st.name)
            print(f"=== {st.name} FAILED (exit {rc})", flush=True)
    (Path(args.out) / "run_all.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{len(summary['steps'])} steps, failed: {', '.join(failed) or 'none'}")
    print(f"reproduce: {cmd}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
