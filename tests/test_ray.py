"""The Ray executor (index_data/ray_executor.py) on a local Ray instance: parity with the local executor,
an encode actor killed mid-batch, and a driver killed with SIGKILL then re-run.

One Ray instance (2 CPUs, no dashboard, its own temp dir) serves the whole module: in-process runs use
it directly and the CLI child joins it through RAY_ADDRESS.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

import faultkit as fk
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, build_index, draw_scene, write_photos

from retrieval.store.db import DB_NAME
from retrieval.store.index import Index
from retrieval.store.rows import path_from_db

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_address():
    import ray

    # the workers are children of this instance's raylet: they import the project from PYTHONPATH
    old = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), old["PYTHONPATH"]]))
    os.environ["OMP_NUM_THREADS"] = "1"
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ctx = ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tmp,
        object_store_memory=150 * 2**20,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _state(index_dir) -> dict:
    """Paths -> (hash, width, height), errors, captions and every image vector, by content hash."""
    with Index.open(index_dir) as idx:
        db = idx.store.db
        images = {
            path_from_db(raw): (h, w, ht)
            for raw, h, w, ht in db.execute("SELECT path_raw, hash, width, height FROM images")
        }
        rows = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        errors = sorted(
            (path_from_db(raw), reason) for raw, reason in db.execute("SELECT path_raw, reason FROM errors")
        )
        captions = sorted(db.execute("SELECT i.path, c.text FROM captions c JOIN images i ON i.id = c.image_id"))
        hashes = sorted({h for h, _, _ in images.values()})
        vecs = idx.store.get_embeddings("image", hashes, idx.identity.dim)
        problems = idx.verify()
    return {
        "images": images,
        "rows": rows,
        "errors": errors,
        "captions": captions,
        "vectors": dict(zip(hashes, vecs)),
        "problems": problems,
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["problems"] == [] and b["problems"] == []
    assert a["rows"] == len(a["images"]) and b["rows"] == len(b["images"])  # no file twice
    assert a["images"] == b["images"]
    assert a["errors"] == b["errors"]
    assert a["captions"] == b["captions"]
    assert a["vectors"].keys() == b["vectors"].keys()
    diff = max(float(np.abs(a["vectors"][h] - b["vectors"][h]).max()) for h in a["vectors"])
    assert diff < 1e-5


def _counts(r) -> tuple:
    return (
        r.scanned,
        r.unchanged,
        r.encoded,
        r.reused,
        r.moved,
        r.updated,
        r.removed,
        r.captions_added,
        sorted(r.errors),
        r.images_total,
    )


def _folder(root: Path, n: int = 20) -> Path:
    photos = root / "photos"
    write_photos(photos, n)
    shutil.copy(photos / "img_0003.jpg", photos / "copy_of_3.jpg")  # a duplicate within the first run
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (photos / "img_0001.jpg.txt").write_text("a sidecar caption\n")
    return photos


def test_parity_with_local_including_incremental_rerun(tmp_path, ray_address):
    photos = _folder(tmp_path)
    local, ray_idx = tmp_path / "local", tmp_path / "ray"
    r_local = build_index(local, [photos], batch_size=8)
    r_ray = build_index(ray_idx, [photos], batch_size=8, executor="ray", ray_batch_size=8)
    assert _counts(r_ray) == _counts(r_local)
    assert r_ray.encoded == 20 and r_ray.reused == 1 and len(r_ray.errors) == 1 and r_ray.captions_added == 1
    _assert_same(_state(ray_idx), _state(local))

    # the incremental re-run: deleted, moved, changed, added, duplicated files
    os.remove(photos / "img_0005.jpg")
    (photos / "sub").mkdir()
    shutil.move(photos / "img_0006.jpg", photos / "sub" / "moved_6.jpg")
    draw_scene(900).save(photos / "img_0007.jpg", quality=95)
    write_photos(photos / "new", 5, start=100)
    shutil.copy(photos / "new" / "img_0100.jpg", photos / "new" / "again_100.jpg")
    r_local = build_index(local, [photos], batch_size=8)
    r_ray = build_index(ray_idx, [photos], batch_size=8, executor="ray", ray_batch_size=8)
    assert _counts(r_ray) == _counts(r_local)
    assert (r_ray.removed, r_ray.moved, r_ray.updated, r_ray.encoded) == (1, 1, 1, 6)
    _assert_same(_state(ray_idx), _state(local))

    # search reads what the Ray run wrote like a local index
    from retrieval.query.searcher import Searcher

    def top(index_dir):
        with Searcher.open(index_dir, device="cpu") as s:
            return [(r.path, round(r.score, 4)) for r in s.search("a red circle", k=5)]

    assert top(ray_idx) == top(local)

    # nothing changed: the Ray run has nothing to ship
    r_ray = build_index(ray_idx, [photos], executor="ray")
    assert r_ray.encoded == 0 and not r_ray.changed


def test_unreadable_path_on_a_worker_is_a_recorded_skip(tmp_path, ray_address):
    from index_data.ray_executor import decode_rows

    ok = tmp_path / "ok.jpg"
    draw_scene(1).save(ok)
    gone = tmp_path / "not_on_this_node.jpg"
    out = decode_rows({"i": np.arange(2), "path": [os.fsencode(ok), os.fsencode(gone)]}, 64, ())
    assert out["error"][0] == "" and out["w"][0] == 96
    assert out["error"][1].startswith("cannot read on Ray node ") and "No such file" in out["error"][1]


def test_encode_actor_killed_mid_batch_is_retried(tmp_path, ray_address, monkeypatch):
    photos = tmp_path / "photos"
    write_photos(photos, 16)
    marker = tmp_path / "actor_died"
    reference = tmp_path / "local"
    build_index(reference, [photos], batch_size=4)
    # the actor process os._exit()s after encoding its second batch, before returning it (once)
    monkeypatch.setenv("RETRIEVAL_FAULT", f"ray_encode:2:exit={marker}")
    r = build_index(tmp_path / "ray", [photos], batch_size=4, executor="ray", ray_batch_size=4, ray_actors=1)
    assert marker.exists()  # the fault fired: an actor died mid-run
    assert r.encoded == 16 and r.errors == [] and r.images_total == 16
    _assert_same(_state(tmp_path / "ray"), _state(reference))


def test_driver_sigkill_then_rerun_resumes_without_duplicates(tmp_path, ray_address):
    photos = _folder(tmp_path, n=24)
    reference = tmp_path / "reference"
    build_index(reference, [photos], batch_size=4)
    idx = tmp_path / "ray"
    argv = fk.index_argv([photos], idx, "--executor", "ray", batch_size=4)
    # SIGKILL the CLI after its third encoded batch arrived, before that batch's commit
    # a fork of the suite's pre-imported interpreter (tests/faultkit.py), so the CLI pays no torch import
    run = fk.zygote().start(
        argv, tmp_path / "runs", env=fk.child_env(RAY_ADDRESS=ray_address, RETRIEVAL_FAULT="encode:3:kill")
    )
    assert run.wait(timeout=240) == -9, run.stderr[-2000:]
    with sqlite3.connect(idx / DB_NAME) as db:
        partial = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    assert 0 < partial < 24  # two batches were committed, the rest was not

    r = build_index(idx, [photos], batch_size=4, executor="ray")
    assert r.encoded + r.reused + r.unchanged == 25 and r.unchanged == partial
    snap, ref = fk.snapshot(idx), fk.snapshot(reference)
    assert fk.invariant_failures(snap, ref) == []
    _assert_same(_state(idx), _state(reference))


def test_missing_ray_is_a_one_line_error(tmp_path, monkeypatch):
    from retrieval.cli import main

    write_photos(tmp_path / "photos", 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the [distributed] extra sees
    r = CliRunner().invoke(
        main,
        [
            "index",
            str(tmp_path / "photos"),
            "--index",
            str(tmp_path / "idx"),
            "--model",
            TINY,
            "--executor",
            "ray",
            "-q",
        ],
    )
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        ("error: --executor ray needs Ray: pip install 'retrieval-engine[distributed]' (ray[data])")
    ]
    assert not (tmp_path / "idx").exists()


def test_ray_actors_needs_the_ray_executor(tmp_path):
    from retrieval.cli import main

    r = CliRunner().invoke(main, ["index", str(tmp_path), "--index", str(tmp_path / "idx"), "--ray-actors", "2"])
    assert r.exit_code == 2 and r.output.strip() == "error: --ray-actors and --ray-write only apply with --executor ray"
    r = CliRunner().invoke(main, ["index", str(tmp_path), "--index", str(tmp_path / "idx"), "--ray-write", "direct"])
    assert r.exit_code == 2 and "only apply with --executor ray" in r.output


def test_resources_decide_actors_and_batch():
    from index_data.ray_executor import plan_resources

    gpu = plan_resources({"CPU": 64.0, "GPU": 8.0})
    assert (gpu.actors, gpu.num_gpus, gpu.device, gpu.batch_size) == (8, 1.0, "cuda", 256)
    assert plan_resources({"CPU": 64.0, "GPU": 8.0}, device="cpu").device == "cpu"
    cpu = plan_resources({"CPU": 16.0})
    assert (cpu.actors, cpu.num_cpus, cpu.device) == (3, 4.0, "cpu")
    small = plan_resources({"CPU": 2.0}, actors=3, batch_size=5)
    assert small.actors == 3 and small.batch_size == 5 and 3 * small.num_cpus <= 1.0 + 1e-9


def test_direct_writes_to_a_postgresql_collection(tmp_path, ray_address, pg_url):
    """--ray-write direct: the encode actors commit the raw embeddings to the collection themselves; the
    collection ends exactly as the local executor's embedded index, and a re-run encodes nothing."""
    from retrieval.store.pg.location import parse_location

    photos = _folder(tmp_path)
    local = tmp_path / "local"
    r_local = build_index(local, [photos], batch_size=8)
    r_pg = build_index(pg_url, [photos], batch_size=8, executor="ray", ray_batch_size=8, ray_write="direct")
    assert _counts(r_pg) == _counts(r_local)
    _assert_same(_state(pg_url), _state(local))
    again = build_index(pg_url, [photos], executor="ray", ray_write="direct")
    assert again.encoded == 0 and not again.changed
    loc = parse_location(pg_url)
    import psycopg

    with psycopg.connect(loc.dsn) as conn:  # every embedding was written by an actor: one per content
        n = conn.execute(f'SELECT count(*) FROM "{loc.collection}".embeddings WHERE kind = %s', ["image"]).fetchone()
    assert n[0] == len(_state(local)["vectors"])
    r = CliRunner().invoke(
        __import__("retrieval.cli", fromlist=["main"]).main,
        [
            "index",
            str(photos),
            "--index",
            str(tmp_path / "dir"),
            "--model",
            TINY,
            "--executor",
            "ray",
            "--ray-write",
            "direct",
            "-q",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 2 and "needs a PostgreSQL index" in r.output


def test_a_direct_write_pruned_before_its_row_is_left_for_the_next_run(tmp_path, pg_url):
    """An actor's committed embedding that another writer pruned before the driver wrote its row: the row is not
    written (it would have no embedding); one whose embedding is there is written."""
    from index_data.pipeline import _restore_pruned, _Work
    from index_data.ray_executor import EncodedResult
    from index_data.scan import ScannedFile

    photos = write_photos(tmp_path / "photos", 2)
    build_index(pg_url, [tmp_path / "photos"])
    with Index.open_for_write(pg_url, create=False) as idx:
        (h,) = idx.store.db.execute("SELECT hash FROM images LIMIT 1").fetchone()
        f = ScannedFile(str(photos[0]), 1, 1)
        kept = EncodedResult(_Work(f, h), None, 8, 8, None, None, stored=True)
        lost = EncodedResult(_Work(f, "f" * 64), None, 8, 8, None, None, stored=True)
        with idx.store.transaction():
            assert _restore_pruned(idx.store, None, [kept, lost], [kept, lost]) == [kept]
