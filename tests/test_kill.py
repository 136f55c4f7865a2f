"""Kill the indexer at seeded random points, resume, and check that nothing was lost or doubled.

Each case SIGKILLs one `cli.py index` run, either at the N-th hit of a named checkpoint of the write
path (retrieval/faults.py: decode, encode, sqlite_commit, faiss_write, publish) or after a random
delay, on a fresh index or while updating an existing one (files deleted, moved, changed, added,
duplicated). Then the same command is run to completion and the index must equal an uninterrupted
run's: every file indexed exactly once, captions attached once, the bad file recorded, no orphan
vectors, `Index.verify() == []`, no temp files, at most two generations on disk, no process left
behind, and a search by image finds that image first.

Runs are children of the zygote (tests/faultkit.py), except one time-based kill that runs the real
`python cli.py index`. The summary ("N of N survived") is printed; with FAULTS_OUT=DIR it is also
written to DIR/faults_kill.json (benchmarks/RESULTS_faults.md quotes it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import faultkit as fk
import pytest
from conftest import draw_scene, machine, write_photos

from retrieval.store.index import Index

SEED = 11
# (phase, how many cases); "time" is a kill after a random delay, "time-cli" the same on `python cli.py`
PLAN = [
    ("decode", 4),
    ("encode", 4),
    ("sqlite_commit", 4),
    ("faiss_write", 3),
    ("publish", 2),
    ("time", 6),
    ("time-cli", 1),
]
PHASES = ("decode", "encode", "sqlite_commit", "faiss_write", "publish")


def _corpus_state_a(folder: Path) -> None:
    write_photos(folder, 40)
    for i in range(6):
        (folder / f"img_{i:04d}.jpg.txt").write_text(f"sidecar caption {i}\nsecond line for {i}\n")


def _corpus_state_b(folder: Path) -> None:
    """Deleted, moved, changed, added, duplicated, a new sidecar, and one bad file."""
    for i in (1, 2, 3):
        os.remove(folder / f"img_{i:04d}.jpg")
    (folder / "sub").mkdir()
    shutil.move(folder / "img_0004.jpg", folder / "sub" / "moved_0004.jpg")
    shutil.move(folder / "img_0004.jpg.txt", folder / "sub" / "moved_0004.jpg.txt")
    draw_scene(500).save(folder / "img_0005.jpg", quality=95)
    write_photos(folder / "new", 24, start=100)
    for i in range(100, 104):
        (folder / "new" / f"img_{i:04d}.jpg.txt").write_text(f"new caption {i}\n")
    shutil.copy(folder / "img_0010.jpg", folder / "dup_0010.jpg")
    (folder / "broken.jpg").write_bytes(b"")


def _trace_counts(path: Path) -> Counter:
    return Counter(line.split()[0] for line in path.read_text().splitlines()) if path.exists() else Counter()


def _last_checkpoint(path: Path) -> str:
    """Where a time-based kill landed: after the last checkpoint the run reached ("encode #3")."""
    lines = path.read_text().splitlines() if path.exists() else []
    if not lines:
        return "startup (before the first checkpoint)"
    name, n = lines[-1].split()
    return f"{name} #{n}"


def _wait_first_checkpoint(trace: Path, run) -> float:
    """Block until the run reaches its first checkpoint (the trace file gets a line); return when."""
    deadline = time.monotonic() + 120
    while run.state() and time.monotonic() < deadline:
        if trace.exists() and trace.stat().st_size > 0:
            break
        time.sleep(0.005)
    return time.monotonic()


def _pending_only(index_dir: Path) -> list[str]:
    """State right after a kill: SQLite must be intact and whatever verify reports must be work that the
    next run publishes (rows ahead of FAISS), never a missing or unreadable generation."""
    if not (index_dir / "meta.sqlite").exists():
        return []
    try:
        with Index.open(index_dir) as idx:
            quick = idx.store.db.execute("PRAGMA quick_check").fetchone()[0]
            problems = idx.verify()
    except Exception as e:  # noqa: BLE001 - only "no model recorded yet" is acceptable
        return [] if "no finished index" in str(e) else [f"cannot open after kill: {e}"]
    bad = [] if quick == "ok" else [f"quick_check: {quick}"]
    return bad + [p for p in problems if not any(k in p for k in fk.PENDING_PATTERNS)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    folder = root / "photos"
    z = fk.zygote()
    _corpus_state_a(folder)
    base = root / "base"
    r = z.start(fk.index_argv([folder], base), root / "logs")
    assert r.wait() == 0, r.stderr
    _corpus_state_b(folder)
    refs, hits, walls = {}, {}, {}
    for start in ("fresh", "incremental"):
        d = root / f"ref_{start}"
        if start == "incremental":
            shutil.copytree(base, d)
        trace = root / f"trace_ref_{start}"
        r = z.start(fk.index_argv([folder], d), root / "logs", env=fk.child_env(RETRIEVAL_FAULT_TRACE=trace))
        first = _wait_first_checkpoint(trace, r)
        assert r.wait() == 0, r.stderr
        # time-based kills are drawn over the working part of a run: first checkpoint to exit
        refs[start], hits[start], walls[start] = fk.snapshot(d), _trace_counts(trace), r.t0 + r.seconds - first
        assert refs[start]["problems"] == []
    # both ways end in the same index
    for key in ("images", "captions", "errors"):
        assert refs["fresh"][key] == refs["incremental"][key], key
    assert len(refs["fresh"]["images"]) == 40 - 3 + 24 + 1 and refs["fresh"]["errors"] == [str(folder / "broken.jpg")]
    return {"root": root, "folder": folder, "base": base, "ref": refs["fresh"], "hits": hits, "walls": walls}


def _cases(hits: dict, walls: dict) -> list[dict]:
    rnd = random.Random(SEED)
    cases = []
    for phase, n in PLAN:
        for _ in range(n):
            start = rnd.choice(["fresh", "incremental"])
            case = {"phase": phase, "start": start}
            if phase in PHASES:
                total = hits[start][phase]
                assert total > 0, (phase, start, hits[start])
                case["hit"] = rnd.randint(1, total)
                case["of"] = total
            else:
                case["delay_s"] = round(rnd.uniform(0.02, 0.7) * walls[start], 3)
            cases.append(case)
    return cases


def _run_case(w: dict, i: int, case: dict) -> dict:
    root, folder = w["root"], w["folder"]
    t_case = time.monotonic()
    d = root / f"case{i:02d}"
    if case["start"] == "incremental":
        shutil.copytree(w["base"], d)
    trace = root / f"trace{i:02d}"
    fault = f"{case['phase']}:{case['hit']}" if "hit" in case else None
    argv = fk.index_argv([folder], d)
    env = fk.child_env(RETRIEVAL_FAULT=fault, RETRIEVAL_FAULT_TRACE=trace)
    logs = root / f"logs{i:02d}"
    if case["phase"].startswith("time"):
        # the clock starts at the run's first checkpoint (the model is loaded by then): the real
        # interpreter of "time-cli" spends seconds importing torch first
        run = fk.start_cli(argv, logs, env) if case["phase"] == "time-cli" else fk.zygote().start(argv, logs, env)
        _wait_first_checkpoint(trace, run)
        time.sleep(case["delay_s"])
        run.signal(signal.SIGKILL)
    else:
        run = fk.zygote().start(argv, logs, env)
    case["rc"] = run.wait()
    case["run_s"] = round(run.seconds, 2)
    case["killed"] = case["rc"] == -signal.SIGKILL
    case["landed"] = _last_checkpoint(trace)
    t = time.monotonic()
    case["after_kill"] = _pending_only(d)
    case["pending_check_s"] = round(time.monotonic() - t, 2)
    resume = fk.zygote().start(argv, logs)  # the same command, no fault
    failures = list(case["after_kill"])
    case["resume_rc"] = resume.wait()
    case["resume_s"] = round(resume.seconds, 2)
    t_check = time.monotonic()
    if case["resume_rc"] != 0:
        failures.append(f"resume exited {case['resume_rc']}: {resume.stderr[-500:]}")
    else:
        snap = fk.snapshot(d)
        failures += fk.invariant_failures(snap, w["ref"])
        probe = [folder / "img_0000.jpg", folder / "new" / f"img_{100 + i:04d}.jpg"]
        failures += fk.self_query_failures(d, probe, snap["images"])
    case["check_s"] = round(time.monotonic() - t_check, 2)
    case["failures"] = failures
    case["survived"] = not failures
    shutil.rmtree(d, ignore_errors=True)
    case["case_s"] = round(time.monotonic() - t_case, 2)
    return case


def test_kill_at_random_points_and_resume(world):
    t0 = time.monotonic()
    cases = _cases(world["hits"], world["walls"])
    assert len(cases) >= 20
    for i, case in enumerate(cases):
        _run_case(world, i, case)
    killed = [c for c in cases if c["killed"]]
    survived = [c for c in killed if c["survived"]]
    summary = {
        "machine": machine(),
        "seed": SEED,
        "corpus": "61 good JPEGs 96x72 (+1 zero-byte file), 10 sidecar captions, batch size 8, 1 decode worker",
        "cases": len(cases),
        "killed": len(killed),
        "survived": len(survived),
        "headline": f"{len(survived)} of {len(killed)} survived",
        "all_cases_passed": all(c["survived"] for c in cases),
        "by_phase": dict(Counter(c["phase"] for c in killed)),
        "landed_after": dict(Counter(c["landed"].split()[0] for c in killed if c["phase"].startswith("time"))),
        "checkpoint_hits_per_run": {k: dict(v) for k, v in world["hits"].items()},
        "orphan_process_groups": len(fk.ORPHANS_REAPED),
        "seconds": round(time.monotonic() - t0, 1),
        "table": cases,
    }
    print(
        f"\nkill suite: {summary['headline']} ({len(cases)} cases, {len(killed)} SIGKILLed mid-run; by phase "
        f"{summary['by_phase']}; "
        f"time-based kills landed after {summary['landed_after']}; {summary['seconds']} s)"
    )
    for c in cases:
        where = (
            f"{c['phase']} #{c['hit']}/{c['of']}"
            if "hit" in c
            else f"{c['phase']} +{c['delay_s']}s: after {c['landed']}"
        )
        print(
            f"  {c['start']:<11} {where:<40} rc={c['rc']:<4} {c['run_s']:5.2f}s  resume={c['resume_rc']} "
            f"{c['resume_s']:5.2f}s check {c['check_s']:4.2f}s pend {c['pending_check_s']:4.2f}s "
            f"all {c['case_s']:5.2f}s "
            f"{'ok' if c['survived'] else 'FAILED: ' + '; '.join(c['failures'])}"
        )
    out = os.environ.get("FAULTS_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "faults_kill.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    assert all(c["killed"] for c in cases if c["phase"] in PHASES), [c for c in cases if not c["killed"]]
    assert len(killed) >= 20, f"only {len(killed)} runs were killed mid-way"
    assert fk.ORPHANS_REAPED == [], "decode workers outlived a killed indexer"
    assert all(c["survived"] for c in cases), [c for c in cases if not c["survived"]]


def test_ctrl_c_stops_after_the_batch_and_keeps_it(tmp_path):
    """One SIGINT to the process group (a terminal's Ctrl-C) of a real `python cli.py index`: it
    finishes the batch in hand, publishes what it has, says so, exits 130; a rerun completes."""
    folder = tmp_path / "photos"
    write_photos(folder, 48)
    d, trace = tmp_path / "idx", tmp_path / "trace"
    argv = fk.index_argv([folder], d)
    # slow each batch down (0.25 s) so the signal lands mid-run whatever the machine's speed
    env = fk.child_env(RETRIEVAL_FAULT="encode:1:sleep=0.25", RETRIEVAL_FAULT_TRACE=trace)
    run = fk.start_cli(argv, tmp_path / "logs", env)
    deadline = time.monotonic() + 120
    while _trace_counts(trace)["encode"] < 2 and run.state() and time.monotonic() < deadline:
        time.sleep(0.01)
    run.signal_group(signal.SIGINT)
    assert run.wait() == 130, run.stderr
    assert "stopped early by Ctrl-C" in run.stderr and "Traceback" not in run.stderr
    snap = fk.snapshot(d)
    assert snap["problems"] == [] and 0 < snap["rows"] < 48, (snap["problems"], snap["rows"])
    assert snap["rows"] % 8 == 0  # whole batches only
    print(
        f"\nctrl-c: exit 130, {snap['rows']} of 48 images kept and published (generation {snap['generation']}), "
        f"verify clean"
    )
    rerun = fk.zygote().start(argv, tmp_path / "logs")
    assert rerun.wait() == 0, rerun.stderr
    snap2 = fk.snapshot(d)
    assert snap2["problems"] == [] and snap2["rows"] == 48
    assert {p: h for p, h in snap["images"].items()}.items() <= snap2["images"].items()
    assert fk.self_query_failures(d, [folder / "img_0047.jpg"], snap2["images"]) == []
