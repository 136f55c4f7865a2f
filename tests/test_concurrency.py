"""Readers during writes, and two writers at once.

(a) A reader process searches in a loop (Searcher, reopened every 25 searches) while index runs in
this process publish a new generation after every batch. Every vector set the reader ever used must
be exactly one that the writer published (same generation number, same ntotal, same ids), every id a
search returns must have its SQLite row (the workload only adds), and no search may fail.
(b) While one index run holds the index (stopped mid-run with SIGSTOP), a second one is refused with
IndexLockedError, exit 2 and one line; searches still work; the first then finishes and all is clean.

With FAULTS_OUT=DIR the figures go to DIR/faults_concurrency.json (benchmarks/RESULTS_faults.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import faultkit as fk
import numpy as np
import pytest
from conftest import build_index, machine, write_photos

from retrieval.errors import IndexLockedError
from retrieval.query.searcher import Searcher
from retrieval.store.index import Index


def test_readers_see_whole_generations_only(tmp_path, monkeypatch):
    import index_data.pipeline as pipeline

    folder = tmp_path / "photos"
    write_photos(folder, 8)
    d = tmp_path / "idx"
    published: dict[int, tuple[int, str]] = {}
    real_publish = Index._publish

    def recording_publish(self, new, next_gen, requested_type, fusion_meta):
        ok = real_publish(self, new, next_gen, requested_type, fusion_meta)
        ids = np.sort(new["images"].ids()).astype("<i8").tobytes()
        published[next_gen] = (int(new["images"].ntotal), hashlib.sha256(ids).hexdigest())
        return ok

    monkeypatch.setattr(Index, "_publish", recording_publish)
    build_index(d, [folder])
    monkeypatch.setattr(pipeline, "CHECKPOINT_SECONDS", 0.0)  # publish after every batch

    proc, out, stop = fk.start_reader(d, tmp_path / "reader")
    t0 = time.monotonic()
    try:
        write_photos(folder / "a", 24, start=100)
        build_index(d, [folder], batch_size=3, model=None)
        write_photos(folder / "b", 24, start=200)
        build_index(d, [folder], batch_size=4, model=None)
    finally:
        writing_s = time.monotonic() - t0
        stop.touch()
        proc.wait(60)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    summary = lines[-1]
    seen = [x for x in lines if "gen" in x]
    assert proc.returncode == 0 and summary["errors"] == 0, summary["first_error"]
    assert summary["missing_rows"] == 0
    for obs in seen:  # each vector set read is one the writer published, whole
        assert obs["gen"] in published, (obs, sorted(published))
        assert (obs["ntotal"], obs["digest"]) == published[obs["gen"]], obs
    gens = sorted({o["gen"] for o in seen})
    assert len(published) >= 15 and len(gens) >= 3, (len(published), gens)
    assert summary["searches"] >= 50
    with Index.open(d) as idx:
        assert idx.verify() == [] and idx.info().images == 56
    figures = {
        "machine": machine(),
        "writer": "2 index runs (24 + 24 new images, batch 3 then 4, a generation published after every batch)",
        "generations_published": len(published),
        "generations_observed_by_reader": len(gens),
        "searches_during_writes": summary["searches"],
        "reader_reopens": summary["reopens"],
        "writing_seconds": round(writing_s, 1),
        "search_errors": summary["errors"],
        "torn_or_foreign_vector_sets": 0,
        "result_ids_without_row": summary["missing_rows"],
        "searches_per_generation": summary["per_generation"],
    }
    print("\nconcurrency:", json.dumps({k: v for k, v in figures.items() if k != "searches_per_generation"}))
    if os.environ.get("FAULTS_OUT"):
        Path(os.environ["FAULTS_OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["FAULTS_OUT"]) / "faults_concurrency.json").write_text(json.dumps(figures, indent=1) + "\n")


def test_second_writer_is_refused_and_nothing_breaks(tmp_path):
    folder = tmp_path / "photos"
    write_photos(folder, 24)
    d = tmp_path / "idx"
    z = fk.zygote()
    r = z.start(fk.index_argv([folder], d), tmp_path / "logs")
    assert r.wait() == 0, r.stderr
    write_photos(folder / "more", 24, start=300)
    argv = fk.index_argv([folder], d, model=None)
    first = z.start(argv, tmp_path / "logs", env=fk.child_env(RETRIEVAL_FAULT="encode:2:stop"))
    try:
        deadline = time.monotonic() + 120
        while first.state() != "T" and time.monotonic() < deadline:  # stopped mid-run, holding the lock
            time.sleep(0.01)
        assert first.state() == "T", first.stderr
        second = fk.start_cli(argv, tmp_path / "logs2")  # the real `python cli.py index`
        assert second.wait() == 2
        err = [x for x in second.stderr.splitlines() if x.strip()]
        assert err == [f"error: another process is writing to the index at {d}; wait for it to finish"], err
        with pytest.raises(IndexLockedError):
            build_index(d, [folder], model=None)
        with Searcher.open(d, device="cpu") as s:  # readers carry on with the published generation
            assert s.search(image=str(folder / "img_0005.jpg"), k=1)[0].path == str(folder / "img_0005.jpg")
    finally:
        first.signal(signal.SIGCONT)
    assert first.wait() == 0, first.stderr
    snap = fk.snapshot(d)
    assert snap["problems"] == [] and snap["rows"] == 48


def test_writer_lock_dies_with_the_writer(tmp_path):
    """A SIGKILLed writer's forked children (decode workers, anything else) must not keep the index
    locked: the lock fd is closed in every forked child."""
    import subprocess
    import sys

    d = tmp_path / "idx"
    script = (
        "import os, signal, sys, time\n"
        "from retrieval.store.index import Index\n"
        "idx = Index.open_for_write(sys.argv[1])\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "print(pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = tmp_path / "out"
    with open(out, "w") as f:  # a file, not a pipe: the orphan keeps its copy open
        proc = subprocess.run(
            [sys.executable, "-c", script, str(d)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=fk.child_env(),
            cwd=fk.ROOT,
            timeout=60,
        )
    assert proc.returncode == -signal.SIGKILL, out.read_text()
    child = int(out.read_text().split()[0])
    try:
        assert Path(f"/proc/{child}").exists()  # the orphan is alive...
        with Index.open_for_write(d):  # ...and the index is free
            pass
    finally:
        os.kill(child, signal.SIGKILL)
