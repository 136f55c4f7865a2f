"""A full disk or a read-only index directory: one line on stderr, exit 2, and nothing corrupted: the
previous generation stays in force and searchable, and once there is room the same command finishes.

Two kinds of test. Injected: ENOSPC / EROFS raised where the real ones surface (faiss's write error,
sqlite3's "database or disk is full", os.replace), always run. Real: a size-limited tmpfs filled up,
and a read-only bind mount, run when this machine lets the test mount (as root); the
indexing runs on the real tmpfs are child processes (tests/faultkit.py), so nothing in pytest's own
process touches a full disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess

import faultkit as fk
import pytest
from click.testing import CliRunner
from conftest import build_index, write_photos

from retrieval.cli import main
from retrieval.query.searcher import Searcher
from retrieval.store.index import Index

FAISS_ENOSPC = (
    "Error in void faiss::write_index(const Index*, IOWriter*, int) at /project/faiss/impl/index_write.cpp:499: "
    "Error: 'ret == (size * 4)' failed: write error in {}: 4051 != 256000 (No space left on device)"
)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    root = tmp_path_factory.mktemp("diskfull")
    old = write_photos(root / "photos", 8)
    new = write_photos(root / "more", 6, start=40)
    write_photos(root / "many", 40, start=100)  # for the real full disk: more data than the headroom
    build_index(root / "golden", [root / "photos"])
    return root, old, new


@pytest.fixture
def idx(golden, tmp_path):
    root, old, new = golden
    d = tmp_path / "idx"
    shutil.copytree(root / "golden", d)
    return d, root, old, new


def gen_of(d) -> int:
    with Index.open(d) as i:
        return i.generation


def index_cli(d, *paths):
    r = CliRunner().invoke(
        main, ["index", *map(str, paths), "--index", str(d), "--workers", "0", "-q", "--device", "cpu"]
    )
    return r.exit_code, r.stderr


def error_line(stderr: str) -> str:
    """The run's error message: exactly one line starting with "error:", the last one, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errs = [line for line in lines if line.startswith("error:")]
    assert len(errs) == 1 and lines[-1] == errs[0], stderr
    return errs[0]


def assert_old_generation_intact(d, gen_before, old_photos, allow_pending=True):
    snap = fk.snapshot(d)
    assert snap["quick_check"] == "ok"
    assert snap["generation"] == gen_before
    others = [p for p in snap["problems"] if not (allow_pending and "rows have no vector" in p)]
    assert others == [], snap["problems"]
    assert not [f for f in snap["files"] if f.endswith(".tmp") or f".g{gen_before + 1}." in f], snap["files"]
    with Searcher.open(d, device="cpu") as s:
        for p in (old_photos[0], old_photos[-1]):
            assert s.search(image=str(p), k=1)[0].path == str(p)
    return snap


def assert_resumes(d, paths, n_images):
    code, err = index_cli(d, *paths)
    assert code == 0, err
    snap = fk.snapshot(d)
    assert snap["problems"] == [] and snap["rows"] == n_images
    assert not [f for f in snap["files"] if f.endswith(".tmp")]


# ------------------------------------------------------------------------------------- injected faults


def test_faiss_write_fails_with_enospc(idx, monkeypatch):
    d, root, old, new = idx
    gen = gen_of(d)
    import faiss

    def full(index, path):
        raise RuntimeError(FAISS_ENOSPC.format(path))

    monkeypatch.setattr(faiss, "write_index", full)
    code, err = index_cli(d, root / "photos", root / "more")
    assert code == 2
    line = error_line(err)
    assert (
        f"cannot write to the index at {d}: No space left on device." in line and "run the same command again" in line
    )
    snap = assert_old_generation_intact(d, gen, old)
    assert snap["rows"] == 14 and any("6 rows have no vector" in p for p in snap["problems"])  # kept, not yet published
    monkeypatch.undo()
    assert_resumes(d, [root / "photos", root / "more"], 14)


def test_sqlite_write_fails_with_disk_full(idx, monkeypatch):
    d, root, old, new = idx
    gen = gen_of(d)
    from retrieval.store.db import Store

    def full(self, *a, **k):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Store, "put_embeddings", full)
    code, err = index_cli(d, root / "photos", root / "more")
    assert code == 2 and "database or disk is full" in error_line(err)
    snap = assert_old_generation_intact(d, gen, old, allow_pending=False)  # the batch was rolled back
    assert snap["rows"] == 8
    monkeypatch.undo()
    assert_resumes(d, [root / "photos", root / "more"], 14)


def test_rename_fails_with_erofs(idx, monkeypatch):
    d, root, old, new = idx
    gen = gen_of(d)
    real_replace = os.replace

    def ro(src, dst, *a, **k):
        if str(dst).endswith(".faiss"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", ro)
    code, err = index_cli(d, root / "photos", root / "more")
    assert code == 2 and "Read-only file system" in error_line(err)
    assert_old_generation_intact(d, gen, old)
    monkeypatch.undo()
    assert_resumes(d, [root / "photos", root / "more"], 14)


def test_repair_on_a_full_disk_is_one_line_and_harmless(idx, monkeypatch):
    d, root, old, new = idx
    gen = gen_of(d)
    os.remove(d / f"captions.g{gen}.faiss")
    import faiss

    monkeypatch.setattr(
        faiss, "write_index", lambda index, path: (_ for _ in ()).throw(RuntimeError(FAISS_ENOSPC.format(path)))
    )
    r = CliRunner().invoke(main, ["verify", "--repair", "--index", str(d)])
    assert r.exit_code == 2 and "No space left on device" in error_line(r.stderr)
    assert "problem: captions: vector file" in r.stdout
    monkeypatch.undo()
    r = CliRunner().invoke(main, ["verify", "--repair", "--index", str(d)])
    assert r.exit_code == 0 and "repaired:" in r.stdout


def test_a_bug_is_not_disguised_as_a_disk_error(idx, monkeypatch):
    """Only storage errors become one-line user errors; anything else keeps its traceback (under --debug)."""
    d, root, old, new = idx
    from retrieval.store.db import Store

    monkeypatch.setattr(
        Store,
        "put_embeddings",
        lambda self, *a, **k: (_ for _ in ()).throw(sqlite3.OperationalError("no such column: vectorz")),
    )
    r = CliRunner().invoke(main, ["index", str(root / "more"), "--index", str(d), "--workers", "0", "-q"])
    assert r.exit_code != 2 and isinstance(r.exception, sqlite3.OperationalError)


# ------------------------------------------------------------------------------------------ real mounts


def _mount(*args) -> tuple[bool, str]:
    try:
        r = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return r.returncode == 0, r.stderr.strip()


def _umount(path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok, why = _mount("-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt))
    if not ok:
        pytest.skip(f"cannot mount a tmpfs here ({why}); the injected-fault tests cover the same code")
    yield mnt
    _umount(mnt)


def _fill(mnt, headroom: int):
    st = os.statvfs(mnt)
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - headroom))


@pytest.mark.parametrize("headroom_kib", [16, 48, 96])
def test_real_full_tmpfs(tmpfs, golden, headroom_kib):
    """8 images indexed on a 32 MiB tmpfs, the rest of it filled but `headroom_kib`, then 40 more images:
    depending on where the space runs out, SQLite cannot open, cannot commit the first batch, or
    commits batches but cannot publish their vectors. Each way: one line, exit 2, old generation
    intact; after freeing the space the same command finishes."""
    root, old, new = golden
    d = tmpfs / "idx"
    z = fk.zygote()
    r = z.start(fk.index_argv([root / "photos"], d, batch_size=2), tmpfs.parent / "logs")
    assert r.wait() == 0, r.stderr
    gen = gen_of(d)
    _fill(tmpfs, headroom_kib * 1024)
    argv = fk.index_argv([root / "photos", root / "many"], d, batch_size=2, model=None)
    r = z.start(argv, tmpfs.parent / "logs")
    assert r.wait() == 2, r.stderr
    line = error_line("\n".join(x for x in r.stderr.splitlines() if not x.startswith("WARNING:")))
    assert "disk is full" in line or "No space left on device" in line, line
    os.remove(tmpfs / "filler")
    after = assert_old_generation_intact(d, gen, old)
    r = z.start(argv, tmpfs.parent / "logs")
    assert r.wait() == 0, r.stderr
    snap = fk.snapshot(d)
    assert snap["problems"] == [] and snap["rows"] == 48
    record = {
        "headroom_kib": headroom_kib,
        "exit_code": 2,
        "error": line.replace(str(d), "IDX"),
        "rows_after_failure": after["rows"],
        "generation_after_failure": after["generation"],
        "verify_after_failure": [p.split(" (")[0] for p in after["problems"]],
        "resumed_rows": snap["rows"],
        "verify_after_resume": snap["problems"],
    }
    print("\n" + json.dumps(record))
    if os.environ.get("FAULTS_OUT"):
        with open(os.path.join(os.environ["FAULTS_OUT"], "faults_diskfull.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def test_real_read_only_mount(golden, tmp_path):
    root, old, new = golden
    src, ro = tmp_path / "src", tmp_path / "ro"
    shutil.copytree(root / "golden", src / "idx")
    ro.mkdir()
    ok, why = _mount("--bind", str(src), str(ro))
    if not ok:
        pytest.skip(f"cannot bind-mount here ({why}); the injected-fault tests cover the same code")
    try:
        ok, why = _mount("-o", "remount,bind,ro", str(ro))
        assert ok, why
        d = ro / "idx"
        code, err = index_cli(d, root / "photos", root / "more")
        assert code == 2 and error_line(err) == f"error: index directory {d} is not writable"
        r = CliRunner().invoke(main, ["verify", "--index", str(d)])
        assert (r.exit_code, r.stdout) == (0, "ok\n"), r.output
        r = CliRunner().invoke(
            main, ["search", "--image", str(old[3]), "--index", str(d), "--paths", "-k", "1", "--device", "cpu"]
        )
        assert (r.exit_code, r.stdout.strip()) == (0, str(old[3])), r.output
        r = CliRunner().invoke(main, ["verify", "--repair", "--index", str(d)])
        assert r.exit_code == 2 and "not writable" in error_line(r.stderr)
    finally:
        _umount(ro)
    assert fk.snapshot(src / "idx")["problems"] == []
