"""`retrieval copy`: an index moved between an index directory and PostgreSQL collections (real server), in
every direction, with its rows, ids, raw embeddings, manifest and fusion, and nothing re-encoded."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, write_photos
from pg_support import collection_url

from retrieval.cli import main

ROOT = Path(__file__).resolve().parent.parent
TABLES = {"images": "id", "captions": "id", "embeddings": "kind, key", "errors": "id"}
QUERIES = (["a red square"], ["--image", "QUERY_IMAGE"], ["a blue circle", "--to", "captions"])


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def copy(src, dst, *extra):
    return run("copy", "--from", src, "--to", dst, *extra)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A directory index of 12 photos (two with EXIF date, camera and GPS), a caption each, and a broken file."""
    from photo_files import make_exif_jpeg

    root = tmp_path_factory.mktemp("copy")
    photos = root / "photos"
    write_photos(photos, 10)
    shots = (("exif_a.jpg", datetime(2019, 7, 14, 10), "Canon", "EOS R5", "RF 24-70", (48.8584, 2.2945)),
             ("exif_b.jpg", datetime(2021, 1, 2, 8, 30), "Apple", "iPhone 12", None, (41.8902, 12.4922)))  # fmt: skip
    for n, (name, taken, make, model, lens, gps) in enumerate(shots):
        make_exif_jpeg(photos / name, seed=100 + n, taken=taken, make=make, model=model, lens=lens, gps=gps)
    (photos / "broken.jpg").write_bytes(b"not an image at all")
    caps = root / "captions.csv"
    caps.write_text(
        "image,caption\n" + "".join(f"{p},photo {i} of a test scene\n" for i, p in enumerate(sorted(photos.glob("*"))))
    )
    r = run("index", photos, "--index", root / "idx", "--captions", caps, "--model", TINY, "--workers", "0", "-q",
            "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    shutil.copy(photos / "img_0003.jpg", root / "query.jpg")  # the image query, kept when photos/ is moved away
    return root


def _queries(root):
    return [[str(root / "query.jpg") if a == "QUERY_IMAGE" else a for a in q] for q in QUERIES]


def _hits(index, query):
    r = run("search", *query, "--index", index, "-k", "8", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.output.strip().splitlines()]


def _assert_same_results(root, a, b):
    for q in _queries(root):
        ha, hb = _hits(a, q), _hits(b, q)
        assert len(ha) == len(hb) > 0
        assert [(h.get("path"), h.get("text"), h.get("id")) for h in ha] == [
            (h.get("path"), h.get("text"), h.get("id")) for h in hb
        ]
        assert np.allclose([h["score"] for h in ha], [h["score"] for h in hb], atol=1e-6, rtol=0)


def _rows(index) -> dict:
    """Every row of the copied tables, read with plain SQL (not the code under test): table -> list of
    {column: value}, paths and embeddings as bytes."""
    out = {}
    if str(index).startswith("postgresql://"):
        import psycopg

        from retrieval.store.pg.location import parse_location

        loc = parse_location(str(index))
        with psycopg.connect(loc.dsn) as conn:
            for table, order in TABLES.items():
                cur = conn.execute(f'SELECT * FROM "{loc.collection}"."{table}" ORDER BY {order}')
                names = [d.name for d in cur.description]
                out[table] = [_plain(dict(zip(names, r))) for r in cur]
            out["manifest"] = dict(conn.execute(f'SELECT key, value FROM "{loc.collection}".manifest').fetchall())
        return out
    conn = sqlite3.connect(Path(index) / "meta.sqlite")
    try:
        for table, order in TABLES.items():
            cur = conn.execute(f"SELECT * FROM [{table}] ORDER BY {order}")
            names = [d[0] for d in cur.description]
            out[table] = [_plain(dict(zip(names, r))) for r in cur]
        out["manifest"] = dict(conn.execute("SELECT key, value FROM manifest").fetchall())
    finally:
        conn.close()
    return out


def _plain(row: dict) -> dict:
    return {k: bytes(v) if isinstance(v, memoryview) else v for k, v in row.items()}


def _assert_same_rows(a, b):
    ra, rb = _rows(a), _rows(b)
    for table in TABLES:
        assert ra[table] == rb[table], table
    ma, mb = ({k: json.loads(v) for k, v in r["manifest"].items()} for r in (ra, rb))
    for key in ("model", "dim", "fusion", "onnx_export"):
        assert ma.get(key) == mb.get(key), key
    return ra


def _verify_ok(index):
    r = run("verify", "--index", index)
    assert r.exit_code == 0 and r.output.strip() == "ok", r.output


def _info(index):
    r = run("info", "--index", index, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.fixture
def second_url(pg_server):
    collection = f"t_{uuid.uuid4().hex}"
    yield collection_url(pg_server.uri, collection)
    pg_server.start()
    with pg_server.admin() as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {collection} CASCADE")


def test_dir_to_pg_to_dir_round_trip(source, pg_url, tmp_path):
    src, back = source / "idx", tmp_path / "back"
    r = copy(src, pg_url)
    assert r.exit_code == 0, r.output
    assert "copied 12 images, 12 captions" in r.output and "nothing re-encoded" in r.output
    r = copy(pg_url, back, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert (rep["images"], rep["captions"], rep["errors"], rep["generation"]) == (12, 12, 1, 1)
    for index in (pg_url, back):
        _verify_ok(index)
        _assert_same_results(source, src, index)
    rows = _assert_same_rows(src, pg_url)
    _assert_same_rows(src, back)
    # what could have been lost on the way is really there
    meta = [r for r in rows["images"] if r["camera_model"] == "EOS R5"]
    assert len(meta) == 1 and meta[0]["taken_at"].startswith("2019-07-14") and abs(meta[0]["gps_lat"] - 48.8584) < 1e-3
    assert rows["errors"][0]["path"].endswith("broken.jpg") and rows["errors"][0]["size"] == 19
    assert len({r["key"] for r in rows["embeddings"]}) == len(rows["embeddings"]) >= 24
    r = run("search", "a photo", "--camera", "canon", "--index", pg_url, "--json", "--device", "cpu")
    assert r.exit_code == 0 and [json.loads(x)["path"] for x in r.output.splitlines()] == [meta[0]["path"]]
    assert not list(tmp_path.glob(".*.tmp"))  # the temp directory became the copy


def test_nothing_is_encoded(source, pg_url, tmp_path, monkeypatch):
    """With the photos gone and every way to load a model broken, the copies still answer exactly as the source."""
    import retrieval.models.registry as registry
    import retrieval.models.runtime as runtime

    def no_model(*a, **k):
        raise AssertionError("copy loaded a model")

    photos, away = source / "photos", source / "photos-away"
    photos.rename(away)
    try:
        with monkeypatch.context() as m:
            for mod, name in ((registry, "load_encoder"), (runtime, "index_encoder"), (runtime, "query_encoder")):
                m.setattr(mod, name, no_model)
            assert copy(source / "idx", pg_url).exit_code == 0
            r = copy(pg_url, tmp_path / "back")
            assert r.exit_code == 0, r.output
        for index in (pg_url, tmp_path / "back"):
            _assert_same_results(source, source / "idx", index)
    finally:
        away.rename(photos)


def test_index_after_a_copy_adds_nothing_and_new_rows_get_higher_ids(source, pg_url, tmp_path):
    assert copy(source / "idx", pg_url).exit_code == 0
    before = _rows(pg_url)
    r = run("index", source / "photos", "--index", pg_url, "--workers", "0", "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    after = _rows(pg_url)
    for table in TABLES:
        assert after[table] == before[table], table  # nothing encoded, moved, re-read or re-recorded
    top = max(r["id"] for r in before["images"])
    new = write_photos(tmp_path / "later", 2, start=700)
    (tmp_path / "later" / "img_0700.jpg.txt").write_text("a late sidecar caption\n")
    r = run("index", tmp_path / "later", "--index", pg_url, "--workers", "0", "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    rows = _rows(pg_url)
    ids = {r["path"]: r["id"] for r in rows["images"]}
    assert len(ids) == 14 and all(ids[str(p)] > top for p in new)
    assert max(r["id"] for r in rows["captions"]) > max(r["id"] for r in before["captions"])
    _verify_ok(pg_url)
    assert _hits(pg_url, ["--image", new[0]])[0]["path"] == str(new[0])


def test_pg_to_pg_and_dir_to_dir(source, pg_url, second_url, tmp_path):
    assert copy(source / "idx", pg_url).exit_code == 0
    r = copy(pg_url, second_url)
    assert r.exit_code == 0, r.output
    r = copy(source / "idx", tmp_path / "a" / "b")  # parents made as needed
    assert r.exit_code == 0, r.output
    for index in (second_url, tmp_path / "a" / "b"):
        _verify_ok(index)
        _assert_same_rows(source / "idx", index)
        _assert_same_results(source, source / "idx", index)
    assert _info(second_url)["index_type"] == "hnsw" and _info(tmp_path / "a" / "b")["index_type"] == "flat"


def test_a_fusion_is_kept(source, pg_url, tmp_path):
    from test_fusion import perturbed

    from retrieval.fusion.install import install_fusion
    from retrieval.fusion.model import Fusion
    from retrieval.store.index import Index

    fused = tmp_path / "fused"
    shutil.copytree(source / "idx", fused)
    with Index.open_for_write(fused, create=False) as idx:
        meta = install_fusion(idx, perturbed(Fusion.untrained(idx.dim, idx.identity)))
    q = ["--image", str(source / "query.jpg")]
    assert [h["score"] for h in _hits(fused, q)] != pytest.approx([h["score"] for h in _hits(source / "idx", q)])
    assert copy(fused, pg_url).exit_code == 0
    assert copy(pg_url, tmp_path / "back").exit_code == 0
    for index in (pg_url, tmp_path / "back"):
        assert _info(index)["fusion"] == meta["version"]
        _verify_ok(index)
        _assert_same_rows(fused, index)
        _assert_same_results(source, fused, index)
    assert (tmp_path / "back" / meta["file"]).read_bytes() == (fused / meta["file"]).read_bytes()
    config = meta["file"].replace(".safetensors", ".json")  # made again from the weights (PostgreSQL keeps none)
    assert json.loads((tmp_path / "back" / config).read_text()) == json.loads((fused / config).read_text())


def test_refusals_are_one_line(source, pg_url, second_url, tmp_path):
    from retrieval.store.index import Index

    assert copy(source / "idx", pg_url).exit_code == 0
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    Index.open_for_write(tmp_path / "unfinished").close()  # a database, no model recorded
    cases = [
        ((source / "idx", source / "idx"), "the same index"),
        ((pg_url, pg_url), "the same index"),
        ((tmp_path / "nothing", tmp_path / "x"), "no index at"),
        ((second_url, tmp_path / "x"), "no collection"),
        ((tmp_path / "unfinished", tmp_path / "x"), "no finished index"),
        ((pg_url, source / "idx"), "already holds an index"),
        ((source / "idx", pg_url), "already holds an index"),
        ((source / "idx", tmp_path / "full"), "not empty"),
    ]
    for (src, dst), words in cases:
        r = copy(src, dst)
        assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: "), r.output
        assert words in r.output, r.output
    assert not (tmp_path / "x").exists() and (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert _info(pg_url)["images"] == 12


@pytest.mark.parametrize("into", ["pg", "dir"])
def test_a_killed_copy_leaves_nothing_and_the_next_one_succeeds(source, pg_url, tmp_path, into):
    """SIGKILL inside the copy, after every row is written (PostgreSQL: at the publish transaction; a
    directory: its vector files written, the manifest not switched)."""
    dst = pg_url if into == "pg" else str(tmp_path / "copy")
    env = {**os.environ, "RETRIEVAL_FAULT": "sqlite_commit:1" if into == "pg" else "publish:1"}
    p = subprocess.run(
        [sys.executable, "cli.py", "copy", "--from", str(source / "idx"), "--to", dst],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    if into == "pg":
        r = run("info", "--index", pg_url)
        assert r.exit_code == 2 and "no collection" in r.output  # the transaction was rolled back
    else:
        assert not (tmp_path / "copy").exists() and len(list(tmp_path.glob(".copy.copy-*.tmp"))) == 1
    r = copy(source / "idx", dst)
    assert r.exit_code == 0, r.output
    _verify_ok(dst)
    _assert_same_rows(source / "idx", dst)
    assert not list(tmp_path.glob(".*.tmp"))  # the dead copy's temp directory was removed
