"""SIGKILL `index --rebuild` at points of the write path, with the same model and with another one.

After each kill the old index must be complete and searchable with its old model (every image, its
captions, verify clean, a search by image finds that image, `search TEXT` exits 0); the same command
run again must finish the rebuild: every image under the new model, verify clean, no staging folder
left. With FAULTS_OUT=DIR the table is written to DIR/faults_kill_rebuild.json.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import faultkit as fk
import pytest
from conftest import write_photos

from retrieval.store.index import Index

OTHER = "tiny-clip-b:none"  # dim 32, vs tiny-clip's 64


def _counts(trace: Path) -> Counter:
    return Counter(line.split()[0] for line in trace.read_text().splitlines()) if trace.exists() else Counter()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("killrebuild")
    folder = root / "photos"
    write_photos(folder, 20)
    for i in range(3):
        (folder / f"img_{i:04d}.jpg.txt").write_text(f"sidecar caption {i}\n")
    base = root / "base"
    z = fk.zygote()
    r = z.start(fk.index_argv([folder], base), root / "logs")
    assert r.wait() == 0, r.stderr
    ref = fk.snapshot(base)
    assert ref["problems"] == [] and ref["rows"] == 20
    hits = {}
    for model in (fk.TINY, OTHER):  # how often each checkpoint is reached by an uninterrupted rebuild
        d, trace = root / f"ref_{model[:11]}", root / f"trace_{model[:11]}"
        shutil.copytree(base, d)
        r = z.start(
            fk.index_argv([folder], d, "--rebuild", model=model),
            root / "logs",
            env=fk.child_env(RETRIEVAL_FAULT_TRACE=trace),
        )
        assert r.wait() == 0, r.stderr
        hits[model] = _counts(trace)
        snap = fk.snapshot(d)
        assert snap["problems"] == [] and snap["images"] == ref["images"] and snap["captions"] == ref["captions"]
        assert not (d / "rebuild").exists()
    return {"root": root, "folder": folder, "base": base, "ref": ref, "hits": hits}


def _model(d: Path) -> str:
    with Index.open(d) as idx:
        return idx.identity.spec


def _case(w, i: int, model: str, point: str) -> dict:
    root, folder = w["root"], w["folder"]
    total = w["hits"][model][point]
    assert total > 0, (model, point, w["hits"][model])
    hit = max(1, total // 2)
    d = root / f"case{i:02d}"
    shutil.copytree(w["base"], d)
    argv = fk.index_argv([folder], d, "--rebuild", model=model)
    logs = root / f"logs{i:02d}"
    run = fk.zygote().start(argv, logs, env=fk.child_env(RETRIEVAL_FAULT=f"{point}:{hit}"))
    case = {"model": model, "kill_at": f"{point} #{hit}/{total}", "rc": run.wait()}
    failures = []
    if case["rc"] != -signal.SIGKILL:
        failures.append(f"not killed (rc {case['rc']})")
    # the old index, as it was
    snap = fk.snapshot(d)
    if snap["problems"]:
        failures.append(f"after kill, verify: {snap['problems']}")
    if snap["images"] != w["ref"]["images"] or snap["captions"] != w["ref"]["captions"]:
        failures.append(
            f"after kill, {len(snap['images'])} of {len(w['ref']['images'])} images, "
            f"{len(snap['captions'])} of {len(w['ref']['captions'])} captions"
        )
    case["model_after_kill"] = _model(d)
    if case["model_after_kill"] != fk.TINY:
        failures.append(f"after kill the index uses {case['model_after_kill']}")
    failures += fk.self_query_failures(d, [folder / "img_0003.jpg"], snap["images"])
    search = fk.zygote().start(["search", "a red square", "--index", str(d), "--device", "cpu", "-k", "3"], logs)
    if search.wait() != 0 or "Traceback" in search.stderr:
        failures.append(f"after kill, search failed: {search.stderr[-300:]}")
    case["staging_left"] = (d / "rebuild").exists()
    # the same command finishes it
    resume = fk.zygote().start(argv, logs)
    case["resume_rc"] = resume.wait()
    if case["resume_rc"] != 0:
        failures.append(f"resume exited {case['resume_rc']}: {resume.stderr[-500:]}")
    else:
        snap2 = fk.snapshot(d)
        failures += fk.invariant_failures(snap2, w["ref"])
        if _model(d) != model:
            failures.append(f"after resume the index uses {_model(d)}")
        if (d / "rebuild").exists():
            failures.append("the staging folder is left after the rebuild finished")
        failures += fk.self_query_failures(d, [folder / "img_0007.jpg"], snap2["images"])
    case["failures"] = failures
    shutil.rmtree(d, ignore_errors=True)
    return case


POINTS = ("encode", "sqlite_commit", "faiss_write", "publish", "switch")


def test_kill_during_rebuild_keeps_the_old_index_and_resumes(world):
    cases = []
    for model in (fk.TINY, OTHER):
        for point in POINTS:
            cases.append(_case(world, len(cases), model, point))
    for c in cases:
        print(
            f"  {c['model']:<17} kill at {c['kill_at']:<20} rc={c['rc']} staging left={c['staging_left']} "
            f"resume={c['resume_rc']} {'ok' if not c['failures'] else 'FAILED: ' + '; '.join(c['failures'])}"
        )
    survived = sum(not c["failures"] for c in cases)
    print(f"\nkilled rebuild: {survived} of {len(cases)} survived (same model and {OTHER})")
    out = os.environ.get("FAULTS_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "faults_kill_rebuild.json").write_text(
            json.dumps(
                {
                    "machine": "2-core CPU (no GPU)",
                    "corpus": "20 JPEGs 96x72, 3 sidecar captions, batch 8",
                    "headline": f"{survived} of {len(cases)} survived",
                    "table": cases,
                },
                indent=1,
            )
            + "\n"
        )
    assert all(not c["failures"] for c in cases), [c for c in cases if c["failures"]]


def test_rebuild_with_another_model_switches_a_running_searcher(world, tmp_path):
    """A long-lived reader (the server's Searcher) keeps working across the switch: it picks up the new
    model and its vectors instead of mixing a 64-dim query with 32-dim vectors."""
    from retrieval.query.searcher import Searcher

    d = tmp_path / "idx"
    shutil.copytree(world["base"], d)
    with Searcher.open(d, device="cpu") as s:
        assert len(s.search("a red square", k=3)) == 3 and s.index.dim == 64
        r = fk.zygote().start(fk.index_argv([world["folder"]], d, "--rebuild", model=OTHER), tmp_path / "logs")
        assert r.wait() == 0, r.stderr
        assert len(s.search("a red square", k=3)) == 3
        assert s.index.identity.spec == OTHER and s.index.dim == 32


def test_a_reader_searching_through_a_rebuild_never_fails(world, tmp_path):
    """A reader process searches in a loop (re-opening now and then) while a rebuild with another model
    runs and switches in: no search fails, every id it gets has a row, and it sees both models."""
    d = tmp_path / "idx"
    shutil.copytree(world["base"], d)
    proc, out, stop = fk.start_reader(d, tmp_path / "reader")
    try:
        r = fk.zygote().start(
            fk.index_argv([world["folder"]], d, "--rebuild", model=OTHER),
            tmp_path / "logs",
            env=fk.child_env(RETRIEVAL_FAULT="encode:1:sleep=0.2"),
        )  # a rebuild that takes a while
        assert r.wait() == 0, r.stderr
        deadline = time.monotonic() + 60
        while (
            not any('"dim": 32' in x for x in out.read_text().splitlines())
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    finally:
        stop.touch()
        proc.wait(60)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    summary = lines[-1]
    assert proc.returncode == 0 and summary["errors"] == 0, summary["first_error"]
    assert summary["missing_rows"] == 0
    assert {x["dim"] for x in lines if "dim" in x} == {64, 32}


def test_rebuild_keeps_the_ids_of_paths(tmp_path):
    """/file/ID links stay valid across a rebuild: a path keeps its id; a new path gets an unused one."""
    from conftest import build_index

    photos = write_photos(tmp_path / "p", 6)
    build_index(tmp_path / "idx", [tmp_path / "p"], batch_size=2)
    with Index.open(tmp_path / "idx") as idx:
        before = {r.path: r.id for r in idx.store.iter_images()}
    photos[0].unlink()
    write_photos(tmp_path / "p", 2, start=50)
    r = build_index(tmp_path / "idx", [tmp_path / "p"], model=OTHER, rebuild=True, batch_size=2)
    assert r.images_total == 7
    with Index.open(tmp_path / "idx") as idx:
        after = {r.path: r.id for r in idx.store.iter_images()}
        assert idx.verify() == [] and idx.identity.spec == OTHER
    assert all(after[p] == before[p] for p in before if p in after)
    new = [after[p] for p in after if p not in before]
    assert len(new) == 2 and not set(new) & set(before.values())


def test_ctrl_c_during_rebuild_keeps_the_old_index(world, tmp_path):
    """A Ctrl-C (SIGINT) mid-rebuild: exit 130 with the resume hint, the old index in force; rerun finishes."""
    d = tmp_path / "idx"
    shutil.copytree(world["base"], d)
    argv = fk.index_argv([world["folder"]], d, "--rebuild", model=OTHER)
    r = fk.zygote().start(argv, tmp_path / "logs", env=fk.child_env(RETRIEVAL_FAULT="encode:1:int"))
    assert r.wait() == 130 and "Run the same command to resume" in r.stderr and "Traceback" not in r.stderr
    snap = fk.snapshot(d)
    assert snap["problems"] == [] and snap["images"] == world["ref"]["images"] and _model(d) == fk.TINY
    assert (d / "rebuild").is_dir()
    r = fk.zygote().start(argv, tmp_path / "logs")
    assert r.wait() == 0, r.stderr
    assert _model(d) == OTHER and fk.invariant_failures(fk.snapshot(d), world["ref"]) == []


def test_a_staging_index_of_other_paths_is_not_resumed(world, tmp_path):
    """A killed `--rebuild EXTRA PHOTOS` followed by `--rebuild PHOTOS`: the result holds PHOTOS only."""
    d = tmp_path / "idx"
    shutil.copytree(world["base"], d)
    extra = write_photos(tmp_path / "extra", 4, start=300)
    argv = fk.index_argv([tmp_path / "extra", world["folder"]], d, "--rebuild", model=OTHER)
    r = fk.zygote().start(argv, tmp_path / "logs", env=fk.child_env(RETRIEVAL_FAULT="publish:1"))
    assert r.wait() == -signal.SIGKILL  # everything encoded into the staging index, not yet switched
    with Index.open(d / "rebuild") as st:
        assert any(row.path == str(extra[0]) for row in st.store.iter_images())  # the staging holds EXTRA
    r = fk.zygote().start(fk.index_argv([world["folder"]], d, "--rebuild", model=OTHER), tmp_path / "logs")
    assert r.wait() == 0, r.stderr
    assert fk.invariant_failures(fk.snapshot(d), world["ref"]) == []


def test_rebuild_of_a_folder_holding_the_index_skips_the_index(tmp_path):
    """The index inside the photo folder: a rebuild does not index its thumbnails (nor a photo folder
    that merely has the same name elsewhere is skipped)."""
    from conftest import build_index

    photos = tmp_path / "photos"
    write_photos(photos, 3)
    write_photos(photos / "deeper" / "idx", 1, start=40)  # a photo folder named like the index
    build_index(photos / "idx", [photos])
    write_photos(photos / "idx" / "thumbs" / "ab", 2, start=60)  # what the web UI caches there
    r = build_index(photos / "idx", [photos], model=OTHER, rebuild=True)
    with Index.open(photos / "idx") as idx:
        paths = [row.path for row in idx.store.iter_images()]
    assert r.images_total == 4 and not any("/idx/thumbs/" in p for p in paths), paths
    assert str(photos / "deeper" / "idx" / "img_0040.jpg") in paths


def test_a_failed_rebuild_creates_nothing_and_keeps_a_resumable_staging(world, tmp_path):
    """A typo'd PATH or a model that cannot load: one-line errors, the index as it was, and a staging
    index that was already under way stays resumable (a failed start leaves no staging folder)."""
    from index_data.options import IndexOptions
    from index_data.pipeline import run_index
    from retrieval.errors import RetrievalError

    d = tmp_path / "idx"
    shutil.copytree(world["base"], d)
    opts = dict(model=OTHER, rebuild=True, workers=0, progress=False, device="cpu")
    with pytest.raises(RetrievalError, match="no such file"):
        run_index(d, IndexOptions(paths=[str(tmp_path / "nope")], **opts))
    with pytest.raises(Exception):  # noqa: B017 - an unknown architecture: whatever load_encoder raises
        run_index(d, IndexOptions(paths=[str(world["folder"])], **{**opts, "model": "no-such-arch:none"}))
    assert not (d / "rebuild").exists()
    with pytest.raises(RetrievalError, match="no such file"):  # no index there: nothing created either
        run_index(tmp_path / "new", IndexOptions(paths=[str(tmp_path / "nope")], **opts))
    assert not (tmp_path / "new").exists()
    r = fk.zygote().start(
        fk.index_argv([world["folder"]], d, "--rebuild", model=OTHER),
        tmp_path / "logs",
        env=fk.child_env(RETRIEVAL_FAULT="encode:2"),
    )
    assert r.wait() == -signal.SIGKILL
    with pytest.raises(RetrievalError, match="no such file"):
        run_index(d, IndexOptions(paths=[str(world["folder"]), str(tmp_path / "nope")], **opts))
    assert _resumable_rows(d) > 0  # the staging index of the killed run is still there
    assert fk.snapshot(d)["images"] == world["ref"]["images"] and _model(d) == fk.TINY


def _resumable_rows(d: Path) -> int:
    with Index.open(d / "rebuild") as st:
        return st.store.count("images")
