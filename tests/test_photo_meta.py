"""EXIF metadata: read from real files written with Pillow (and pillow-heif), stored in the images table, filled
into an index made before the columns existed without re-encoding, and used by the date, camera and place
filters of the CLI, the Python API and the HTTP API, which still return k results when k match."""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_index, draw_scene
from photo_files import make_exif_jpeg
from PIL import Image

from retrieval.cli import main
from retrieval.errors import EmptyIndexError, RetrievalError
from retrieval.exif import read_meta
from retrieval.query.photo_filters import PhotoFilter, haversine_km
from retrieval.query.searcher import Searcher

PARIS = (48.8584, 2.2945)
ROME = (41.8902, 12.4922)
# (name, taken, make, model, lens, gps)
SHOTS = [
    ("r5_paris_2019_07.jpg", datetime(2019, 7, 14, 10, 30), "Canon", "Canon EOS R5", "RF24-105mm F4 L", PARIS),
    ("r5_paris_2019_08.jpg", datetime(2019, 8, 31, 23, 59), "Canon", "Canon EOS R5", "RF24-105mm F4 L", (48.86, 2.30)),
    ("r5_rome_2019_09.jpg", datetime(2019, 9, 1, 0, 0), "Canon", "Canon EOS R5", None, ROME),
    ("x100_2018.jpg", datetime(2018, 12, 31, 12, 0), "FUJIFILM", "X100V", None, None),
    ("iphone_2020.jpg", datetime(2020, 3, 1, 8, 0), "Apple", "iPhone 12", "iPhone 12 back camera", ROME),
    ("iphone_2021.jpg", datetime(2021, 6, 1, 8, 0), "Apple", "iPhone 12", None, None),
]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    photos = root / "photos"
    photos.mkdir()
    for i, (name, taken, make, model, lens, gps) in enumerate(SHOTS):
        make_exif_jpeg(photos / name, seed=i, taken=taken, make=make, model=model, lens=lens, gps=gps)
    draw_scene(50).save(photos / "no_exif.png")
    os.utime(photos / "no_exif.png", (1_500_000_000, 1_500_000_000))  # 2017-07-14 (UTC)
    r = build_index(root / "idx", [photos])
    assert r.encoded == len(SHOTS) + 1 and r.metadata_read == len(SHOTS) + 1
    return root


def names(results):
    return sorted(os.path.basename(r.path) for r in results)


def test_read_meta_from_exif(tmp_path):
    p = make_exif_jpeg(
        tmp_path / "a.jpg",
        taken=datetime(2019, 7, 14, 10, 30, 5),
        make="NIKON CORPORATION",
        model="NIKON Z 6",
        lens="NIKKOR Z 24-70mm f/4 S",
        gps=(-33.8568, 151.2153),
    )
    m = read_meta(str(p), os.stat(p).st_mtime_ns)
    assert (m.taken_at, m.taken_source) == ("2019-07-14T10:30:05", "exif")
    assert (m.camera_make, m.camera_model, m.lens) == ("NIKON CORPORATION", "NIKON Z 6", "NIKKOR Z 24-70mm f/4 S")
    assert m.gps_lat == pytest.approx(-33.8568, abs=1e-4) and m.gps_lon == pytest.approx(151.2153, abs=1e-4)
    assert m.camera == "NIKON Z 6"


def test_read_meta_falls_back_to_mtime_and_survives_bad_files(tmp_path):
    p = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(p)
    m = read_meta(str(p), 1_500_000_000 * 10**9)
    assert m.taken_source == "mtime" and m.taken_at == datetime.fromtimestamp(1_500_000_000).isoformat()
    assert (m.camera_make, m.gps_lat) == (None, None)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00garbage")
    assert read_meta(str(junk), 0).taken_source == "mtime"
    assert read_meta(str(tmp_path / "gone.jpg"), 0).taken_source == "mtime"
    # a blank date the camera wrote is no date
    blank = make_exif_jpeg(tmp_path / "blank.jpg", make="Canon")
    exif = Image.open(blank).getexif()
    exif.get_ifd(0x8769)[0x9003] = "0000:00:00 00:00:00"
    draw_scene(1).save(blank, exif=exif)
    m = read_meta(str(blank), 0)
    assert m.taken_source == "mtime" and m.camera_make == "Canon"


def test_read_meta_from_heic(tmp_path):
    import pillow_heif

    pillow_heif.register_heif_opener()
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Apple", "iPhone 15 Pro"
    exif.get_ifd(0x8769)[0x9003] = "2023:10:01 17:45:00"
    p = tmp_path / "IMG_0001.HEIC"
    draw_scene(3).save(p, format="HEIF", exif=exif.tobytes())
    m = read_meta(str(p), 0)
    assert (m.taken_at, m.taken_source, m.camera_model) == ("2023-10-01T17:45:00", "exif", "iPhone 15 Pro")


def test_date_filters_are_inclusive_periods(library):
    with Searcher.open(library / "idx", device="cpu") as s:
        summer = s.search("a photo", k=50, after="2019-07", before="2019-08")
        assert names(summer) == ["r5_paris_2019_07.jpg", "r5_paris_2019_08.jpg"]  # 23:59 on Aug 31 is in
        assert names(s.search("a photo", k=50, after="2019-09-01")) == [
            "iphone_2020.jpg",
            "iphone_2021.jpg",
            "r5_rome_2019_09.jpg",
        ]
        assert names(s.search("a photo", k=50, before="2018")) == ["no_exif.png", "x100_2018.jpg"]  # mtime: 2017
        r = s.search("a photo", k=50, after="2019-07-14T10:30")
        assert "r5_paris_2019_07.jpg" in names(r)


def test_camera_and_place_filters_and_fields(library):
    with Searcher.open(library / "idx", device="cpu") as s:
        canon = s.search("a photo", k=50, camera="eos r5")
        assert names(canon) == ["r5_paris_2019_07.jpg", "r5_paris_2019_08.jpg", "r5_rome_2019_09.jpg"]
        assert names(s.search("a photo", k=50, camera="fujifilm")) == ["x100_2018.jpg"]
        paris = s.search("a photo", k=50, near=PARIS, km=5)
        assert names(paris) == ["r5_paris_2019_07.jpg", "r5_paris_2019_08.jpg"]
        assert names(s.search("a photo", k=50, near="41.89,12.49", km=1)) == ["iphone_2020.jpg", "r5_rome_2019_09.jpg"]
        both = s.search("a photo", k=50, camera="iphone", near=ROME, km=1)
        assert names(both) == ["iphone_2020.jpg"]
        r = both[0]
        assert (r.taken_at, r.taken_source, r.camera_make, r.camera_model, r.lens) == (
            "2020-03-01T08:00:00",
            "exif",
            "Apple",
            "iPhone 12",
            "iPhone 12 back camera",
        )
        assert r.gps_lat == pytest.approx(ROME[0], abs=1e-4)
        # k results when k match: 3 Canon photos, k=2 gives exactly 2 and they are the best-scoring Canon ones
        top = s.search("a photo", k=2, camera="canon")
        assert len(top) == 2 and [x.path for x in top] == [x.path for x in canon[:2]]
        # this index has no captions to search, filters or not
        with pytest.raises(EmptyIndexError):
            s.search("a photo", to="captions", camera="canon")


def test_bad_filter_values_are_one_line_errors():
    for kw in (
        {"after": "last summer"},
        {"before": "2019-13"},
        {"near": "48.8"},
        {"near": "95,0"},
        {"km": 3},
        {"near": "1,2", "km": -1},
        {"after": "2020", "before": "2019"},
    ):
        with pytest.raises(RetrievalError) as e:
            PhotoFilter.make(**kw)
        assert "\n" not in str(e.value)
    assert haversine_km(PARIS, ROME) == pytest.approx(1106, abs=5)


def test_old_index_is_migrated_on_the_next_run_without_re_encoding(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (name, taken, make, model, lens, gps) in enumerate(SHOTS[:3]):
        make_exif_jpeg(photos / name, seed=i, taken=taken, make=make, model=model, lens=lens, gps=gps)
    build_index(tmp_path / "idx", [photos])
    # make it an index from before the metadata columns
    db = sqlite3.connect(tmp_path / "idx" / "meta.sqlite")
    db.execute("DROP INDEX IF EXISTS idx_images_taken_at")
    for col in ("taken_at", "taken_source", "camera_make", "camera_model", "lens", "gps_lat", "gps_lon", "meta_hash"):
        db.execute(f"ALTER TABLE images DROP COLUMN {col}")
    db.execute("PRAGMA user_version = 0")  # as code from before numbered migrations left it
    db.commit()
    db.close()
    with Searcher.open(tmp_path / "idx", device="cpu") as s:
        assert s.search("a photo", k=5)[0].taken_at is None  # old index: searches work, no fields
        with pytest.raises(RetrievalError, match="run `retrieval index`"):
            s.search("a photo", k=5, camera="canon")
    r = build_index(tmp_path / "idx", [photos])
    assert (r.encoded, r.unchanged, r.metadata_read) == (0, 3, 3)
    with Searcher.open(tmp_path / "idx", device="cpu") as s:
        assert len(s.search("a photo", k=5, camera="canon", after="2019-08")) == 2
    assert build_index(tmp_path / "idx", [photos]).metadata_read == 0  # read once
    # a changed file is read again
    make_exif_jpeg(photos / SHOTS[0][0], seed=9, taken=datetime(2001, 1, 1), make="Sony", model="ILCE-7M3")
    r = build_index(tmp_path / "idx", [photos])
    assert r.metadata_read == 1
    with Searcher.open(tmp_path / "idx", device="cpu") as s:
        assert names(s.search("a photo", k=5, camera="ilce")) == [SHOTS[0][0]]


def test_cli_filters_and_json_fields(library):
    run = CliRunner().invoke
    r = run(
        main, ["search", "a photo", "--index", str(library / "idx"), "--camera", "iPhone", "--after", "2021", "--json"]
    )
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert len(rows) == 1 and rows[0]["camera_model"] == "iPhone 12" and rows[0]["taken_at"] == "2021-06-01T08:00:00"
    assert rows[0]["taken_source"] == "exif"
    r = run(
        main, ["search", "a photo", "--index", str(library / "idx"), "--near", "48.8584,2.2945", "--km", "2", "--paths"]
    )
    assert r.exit_code == 0 and len(r.output.splitlines()) == 2
    r = run(main, ["search", "a photo", "--index", str(library / "idx"), "--camera", "leica"])
    assert r.exit_code == 1  # no results
    r = run(main, ["search", "a photo", "--index", str(library / "idx"), "--before", "yesterday"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "ISO date" in r.output


def test_http_filters(library):
    from fastapi.testclient import TestClient

    from retrieval.server.app import create_app

    with TestClient(create_app(library / "idx", device="cpu", for_tests=True)) as c:
        resp = c.get("/api/search", params={"q": "a photo", "camera": "canon", "before": "2019-08", "k": 10})
        assert resp.status_code == 200, resp.text
        got = resp.json()["results"]
        assert sorted(Path(r["path"]).name for r in got) == ["r5_paris_2019_07.jpg", "r5_paris_2019_08.jpg"]
        assert got[0]["camera_make"] == "Canon" and got[0]["taken_at"].startswith("2019-")
        resp = c.get("/api/search", params={"q": "a photo", "near": "41.89,12.49", "km": 1})
        assert sorted(Path(r["path"]).name for r in resp.json()["results"]) == [
            "iphone_2020.jpg",
            "r5_rome_2019_09.jpg",
        ]
        # more like an indexed image, filtered
        first = got[0]["id"]
        resp = c.get("/api/search", params={"id": first, "camera": "apple"})
        assert {r["camera_make"] for r in resp.json()["results"]} == {"Apple"}
        resp = c.get("/api/search", params={"q": "x", "near": "north pole"})
        assert resp.status_code == 400 and "LAT,LON" in resp.json()["error"]


def test_filter_bounds_from_strings_and_python_dates():
    from datetime import date, timezone

    f = PhotoFilter.make(after="2019-12", before="2019-12")
    assert (f.after, f.before) == ("2019-12-01T00:00:00", "2020-01-01T00:00:00")  # all of December
    f = PhotoFilter.make(after=datetime(2019, 1, 1, 9, tzinfo=timezone.utc), before=date(2019, 2, 1))
    assert (f.after, f.before) == ("2019-01-01T09:00:00", "2019-02-02T00:00:00")
    f = PhotoFilter.make(near=(48.85, 2.29))
    assert f.km == 10.0 and f.active
    assert not PhotoFilter.make().active
