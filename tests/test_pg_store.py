"""The PostgreSQL store against a real server (pgserver): every command on a collection URL, and the same
results as the embedded store."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, write_photos

from retrieval.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def index_cmd(photos, index, *extra):
    return run("index", photos, "--index", index, "--model", TINY, "--workers", "0", "-q", "--device", "cpu", *extra)


@pytest.fixture
def corpus(tmp_path):
    photos = write_photos(tmp_path / "photos", 24)
    caps = tmp_path / "captions.csv"
    caps.write_text(
        "image,caption\n" + "".join(f"{p},photo number {i} of a test scene\n" for i, p in enumerate(photos))
    )
    return tmp_path, photos, caps


def _hits(index, *query):
    r = run("search", *query, "--index", index, "-k", "10", "--json")
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.output.strip().splitlines()]


def test_exact_search_matches_the_embedded_store(corpus, pg_url):
    root, photos, _ = corpus
    assert index_cmd(root / "photos", root / "idx", "--index-type", "flat").exit_code == 0
    r = index_cmd(root / "photos", pg_url, "--index-type", "flat")
    assert r.exit_code == 0, r.output
    for query in (["a red square"], ["--image", photos[3]], ["a blue circle", "--under", root / "photos"]):
        a, b = _hits(str(root / "idx"), *query), _hits(pg_url, *query)
        assert [h["path"] for h in a] == [h["path"] for h in b]
        assert np.allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-5)


def test_every_command_runs_on_a_collection(corpus, pg_url):
    root, photos, caps = corpus
    r = index_cmd(root / "photos", pg_url, "--captions", caps)
    assert r.exit_code == 0, r.output
    info = json.loads(run("info", "--index", pg_url, "--json").output)
    assert info["images"] == 24 and info["captions"] == 24 and info["index_type"] == "hnsw"
    assert "***" not in pg_url and info["vectors"] == 24 and info["caption_vectors"] == 24
    r = run("verify", "--index", pg_url)
    assert r.exit_code == 0 and r.output.strip() == "ok", r.output
    hits = _hits(pg_url, "--image", photos[5])
    assert hits[0]["path"] == str(photos[5]) and len(hits) == 10
    r = run("search", "--image", photos[5], "--to", "captions", "--index", pg_url, "-k", "3", "--json")
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 3
    # a second run finds nothing new, and adds no row
    assert index_cmd(root / "photos", pg_url).exit_code == 0
    assert json.loads(run("info", "--index", pg_url, "--json").output)["images"] == 24
    r = run("benchmark", "recall", "--captions", caps, "--index", pg_url, "--json")
    assert r.exit_code == 0, r.output


def test_verify_repair_remakes_lost_vectors(corpus, pg_url):
    import psycopg

    from retrieval.store.pg.location import parse_location

    root, photos, _ = corpus
    assert index_cmd(root / "photos", pg_url).exit_code == 0
    loc = parse_location(pg_url)
    with psycopg.connect(loc.dsn, autocommit=True) as conn:
        conn.execute(
            f'DELETE FROM "{loc.collection}".image_vectors WHERE id IN (SELECT id FROM '
            f'"{loc.collection}".image_vectors LIMIT 3)'
        )
    r = run("verify", "--index", pg_url)
    assert r.exit_code == 1 and "3 rows have no vector" in r.output
    r = run("verify", "--repair", "--index", pg_url)
    assert r.exit_code == 0, r.output
    assert run("verify", "--index", pg_url).output.strip() == "ok"
    assert _hits(pg_url, "--image", photos[0])[0]["path"] == str(photos[0])


def test_deleted_and_changed_files_are_never_served(corpus, pg_url):
    root, photos, _ = corpus
    assert index_cmd(root / "photos", pg_url).exit_code == 0
    photos[2].unlink()
    from conftest import draw_scene

    draw_scene(999).save(photos[4], quality=95)  # new content under the same name
    assert index_cmd(root / "photos", pg_url).exit_code == 0
    hits = _hits(pg_url, "--image", photos[4])
    assert hits[0]["path"] == str(photos[4]) and hits[0]["score"] > 0.999
    assert all(h["path"] != str(photos[2]) for h in _hits(pg_url, "a photo"))
    assert json.loads(run("info", "--index", pg_url, "--json").output)["images"] == 23


def test_a_missing_collection_is_one_line(pg_url):
    r = run("search", "a cat", "--index", pg_url)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "no collection" in r.output


def test_photo_filters_and_duplicates_match_the_embedded_store(tmp_path, pg_url):
    """Date, camera and place filters, --under/--glob and near-duplicates run their SQL on PostgreSQL and give
    what the embedded store gives."""
    import os

    from photo_files import make_exif_jpeg
    from test_photo_meta import PARIS, ROME, SHOTS

    from retrieval.query.duplicates import find_duplicates
    from retrieval.query.searcher import Searcher

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (name, taken, make, model, lens, gps) in enumerate(SHOTS):
        make_exif_jpeg(photos / name, seed=i, taken=taken, make=make, model=model, lens=lens, gps=gps)
    from PIL import Image

    Image.open(photos / SHOTS[0][0]).resize((80, 60)).save(photos / "copy_small.jpg", quality=90)
    for index in (tmp_path / "idx", pg_url):
        assert index_cmd(photos, index).exit_code == 0
    queries = [
        dict(after="2019-07", before="2019-08"),
        dict(camera="eos r5"),
        dict(near=PARIS, km=5),
        dict(camera="iphone", near=ROME, km=1),
        dict(glob="r5_*"),
        dict(under=str(photos)),
    ]
    found = []
    for index in (str(tmp_path / "idx"), pg_url):
        with Searcher.open(index, device="cpu") as s:
            found.append([sorted(os.path.basename(r.path) for r in s.search("a photo", k=50, **q)) for q in queries])
            groups = find_duplicates(s.index, threshold=0.9)
            found[-1].append(sorted(sorted(os.path.basename(m.path) for m in g.members) for g in groups))
    assert found[0] == found[1]
    assert found[1][1] == ["r5_paris_2019_07.jpg", "r5_paris_2019_08.jpg", "r5_rome_2019_09.jpg"]
    assert any({"copy_small.jpg", SHOTS[0][0]} <= set(g) for g in found[1][-1])  # the resized copy and its original


def test_two_serve_replicas_read_one_collection(corpus, pg_url, monkeypatch, tmp_path):
    """`serve` on a collection: search, thumbnails and files; a second replica on the same collection answers
    the same, and both see photos that a writer adds while they run."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from retrieval.server.app import create_app

    monkeypatch.setenv("RETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))
    root, photos, caps = corpus
    assert index_cmd(root / "photos", pg_url, "--captions", caps).exit_code == 0
    apps = [create_app(pg_url, device="cpu", for_tests=True) for _ in range(2)]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        assert a.get("/api/info").json()["images"] == 24
        found = []
        for c in (a, b):
            r = c.get("/api/search", params={"q": "a red circle", "k": 5})
            assert r.status_code == 200, r.text
            found.append([(x["id"], round(x["score"], 5)) for x in r.json()["results"]])
        assert found[0] == found[1] and len(found[0]) == 5
        top = a.get("/api/search", params={"q": "a red circle", "k": 1}).json()["results"][0]
        assert a.get(top["thumb"]).headers["content-type"] == "image/jpeg"
        assert b.get(top["file"]).content == open(top["path"], "rb").read()
        caps_hits = b.get("/api/search", params={"q": "photo number 3", "to": "captions", "k": 3}).json()["results"]
        assert len(caps_hits) == 3 and all(x["kind"] == "caption" for x in caps_hits)

        from conftest import draw_scene

        later = root / "later"
        later.mkdir()
        draw_scene(4242).save(later / "new_one.jpg", quality=95)
        assert index_cmd(later, pg_url).exit_code == 0
        for c in (a, b):
            with open(later / "new_one.jpg", "rb") as fh:
                r = c.post("/api/search", files={"image": ("q.jpg", fh.read())}, data={"k": "1"})
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["path"] == str(later / "new_one.jpg")
        assert b.get("/api/info").json()["images"] == 25
