"""Hostile-user cases: damaged files, odd queries and names, edited and broken photos, odd folder layouts."""

from __future__ import annotations

import base64
import json
import os
import shutil

import pytest
from click.testing import CliRunner
from conftest import TINY, build_index, draw_scene, write_photos

from retrieval.cli import main
from retrieval.errors import RetrievalError
from retrieval.query.searcher import Searcher
from retrieval.store.index import Index
from retrieval.store.vector_file import _FOOTER


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, code=2):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    return r.output


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    write_photos(root / "photos", 6)
    write_photos(root / "photos" / "sub", 3, start=50)
    write_photos(root / "photosX", 2, start=80)  # shares the prefix "photos" but is not under it
    (root / "photos" / "sub" / "img_0050.jpg.txt").write_text("a sidecar caption\n")
    (root / "photosX" / "img_0080.jpg.txt").write_text("another sidecar caption\n")
    build_index(root / "idx", [root / "photos", root / "photosX"])
    return root


# -- 5: damaged vector file, dying decode workers -------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "append", "garble"])
def test_damaged_vector_file_names_verify_repair(tmp_path, damage):
    write_photos(tmp_path / "p", 3)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    (vec,) = (tmp_path / "idx").glob("images.g*.faiss")
    data = vec.read_bytes()
    at = len(data) - _FOOTER.size - 1  # the last byte the checksum covers
    vec.write_bytes(
        {
            "truncate": data[: len(data) // 2],
            "append": data + b"junk",
            "garble": data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :],
        }[damage]
    )
    out = one_line_error(run("search", "a photo", "--index", tmp_path / "idx"))
    assert "verify --repair" in out and vec.name in out
    from fastapi.testclient import TestClient

    from retrieval.server.app import create_app

    with TestClient(create_app(tmp_path / "idx", device="cpu", for_tests=True)) as c:
        res = c.get("/api/search", params={"q": "a photo"})
        assert res.status_code == 503 and "verify --repair" in res.json()["error"]
    r = run("verify", "--repair", "--index", tmp_path / "idx")
    assert r.exit_code == 0, r.output
    assert run("search", "a photo", "--index", tmp_path / "idx").exit_code == 0


def test_decode_workers_dying_is_one_line_and_keeps_the_index(tmp_path, monkeypatch):
    from index_data import decode as D

    write_photos(tmp_path / "p", 2)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    for i in range(6):
        shutil.copy(tmp_path / "p" / "img_0000.jpg", tmp_path / "p" / f"crash_{i}.jpg")
        draw_scene(300 + i).save(tmp_path / "p" / f"crash_{i}.jpg")
    real = D.load_image_with_size

    def load(path, target_size=None):
        if "crash" in os.path.basename(os.fsdecode(path)):
            os._exit(3)  # what a segfaulting decoder looks like from outside
        return real(path, target_size)

    monkeypatch.setattr(D, "load_image_with_size", load)  # inherited by forked workers
    r = run("index", tmp_path / "p", "--index", tmp_path / "idx", "--workers", "1", "-q", "--device", "cpu")
    out = one_line_error(r)
    assert "in a row" in out and "--workers 0" in out
    assert run("search", "a photo", "--index", tmp_path / "idx", "--paths").exit_code == 0


# -- 7, 8: empty query, non-finite --min-score ------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_query_text_is_a_user_error(indexed, text):
    out = one_line_error(run("search", text, "--index", indexed / "idx"))
    assert "empty" in out


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_min_score_is_a_user_error(indexed, value):
    out = one_line_error(run("search", "a photo", "--min-score", value, "--index", indexed / "idx"))
    assert "--min-score" in out
    with Searcher.open(indexed / "idx", device="cpu") as s:
        with pytest.raises(RetrievalError, match="finite"):
            s.search("a photo", min_score=float(value))
        with pytest.raises(RetrievalError, match="finite"):
            s.search_vector(s.embed_text("a photo"), min_score=float(value))


def test_http_rejects_empty_query_and_nan_min_score(indexed):
    from fastapi.testclient import TestClient

    from retrieval.server.app import create_app

    with TestClient(create_app(indexed / "idx", device="cpu", for_tests=True)) as c:
        for value in ("nan", "inf"):
            assert c.get("/api/search", params={"q": "a photo", "min_score": value}).status_code == 422
        assert c.get("/api/search", params={"q": "   "}).status_code == 400


# -- 16: --under ------------------------------------------------------------------------------------------------


def test_under_is_a_folder_prefix_not_a_string_prefix(indexed):
    r = run("search", "a photo", "--index", indexed / "idx", "--under", indexed / "photos", "-k", "50", "--paths")
    paths = r.output.splitlines()
    assert len(paths) == 9 and all(p.startswith(str(indexed / "photos") + "/") for p in paths)
    r = run(
        "search", "a photo", "--index", indexed / "idx", "--under", str(indexed / "photos") + "/", "-k", "50", "--paths"
    )
    assert len(r.output.splitlines()) == 9
    r = run(
        "search",
        "a photo",
        "--index",
        indexed / "idx",
        "--under",
        indexed / "photos" / "sub",
        "-k",
        "50",
        "--paths",
        "--glob",
        "*_0051.jpg",
    )
    assert r.output.splitlines() == [str(indexed / "photos" / "sub" / "img_0051.jpg")]
    r = run(
        "search",
        "a photo",
        "--index",
        indexed / "idx",
        "--under",
        indexed / "photos" / "sub" / "img_0050.jpg",
        "--paths",
    )
    assert r.output.splitlines() == [str(indexed / "photos" / "sub" / "img_0050.jpg")]


def test_under_reads_only_the_rows_under_the_folder(indexed):
    """The --under filter is an indexed range on the raw path, not a scan of the whole images table."""
    with Searcher.open(indexed / "idx", device="cpu") as s:
        conn = s.index.store.db.conn
        seen = []
        conn.set_trace_callback(seen.append)
        assert len(s.search("a photo", under=str(indexed / "photos" / "sub"), k=50)) == 3
        assert len(s.search("a photo", under=str(indexed / "photos" / "sub"), to="captions", k=50)) == 1
        conn.set_trace_callback(None)
        filters = [
            q for q in seen if "path_raw" in q and q.lstrip().upper().startswith("SELECT") and "WHERE id IN" not in q
        ]
        assert len(filters) == 2, seen
        for q in filters:
            plan = [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + q)]
            assert not any(p.startswith("SCAN i") or p == "SCAN images" for p in plan), (q, plan)
            assert any("path_raw" in p for p in plan), (q, plan)


# -- 9: a photo edited in place -------------------------------------------------------------------------------


def test_edited_photo_keeps_its_id_and_corpus_captions(tmp_path):
    photos = write_photos(tmp_path / "p", 3)
    caps = tmp_path / "caps.csv"
    caps.write_text("image,caption\n" + "".join(f"{p},caption of {p.name}\n" for p in photos))
    build_index(tmp_path / "idx", [tmp_path / "p"], captions_file=str(caps))
    with Index.open(tmp_path / "idx") as idx:
        before = idx.store.image_by_path(str(photos[1]))
    draw_scene(777).save(photos[1], quality=95)
    r = build_index(tmp_path / "idx", [tmp_path / "p"])  # a plain re-run: no --captions this time
    assert r.updated == 1 and r.encoded == 1
    with Searcher.open(tmp_path / "idx", device="cpu") as s:
        after = s.index.store.image_by_path(str(photos[1]))
        assert after.id == before.id and after.hash != before.hash
        assert [t for _, t in s.index.store.captions_for_images([after.id])[after.id]] == ["caption of img_0001.jpg"]
        top = s.search(image=str(photos[1]), k=1)[0]
        assert top.id == before.id and top.score == pytest.approx(1.0, abs=1e-4)  # the new content is searchable
    assert not Index.open(tmp_path / "idx").verify()


@pytest.mark.parametrize("repair", [False, True])
def test_edited_photo_vector_is_republished_after_a_kill(tmp_path, monkeypatch, repair):
    """SQLite took the new content but the run died before publishing: the next run still refreshes it."""
    from index_data import pipeline

    photos = write_photos(tmp_path / "p", 3)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    draw_scene(778).save(photos[0], quality=95)
    real = pipeline._publish
    monkeypatch.setattr(pipeline, "_publish", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path / "idx", [tmp_path / "p"])
    monkeypatch.setattr(pipeline, "_publish", real)
    with Index.open(tmp_path / "idx") as idx:
        problems = idx.verify()
    assert len(problems) == 1 and "changed in place have no new vector yet" in problems[0], problems
    if repair:
        with Index.open_for_write(tmp_path / "idx", create=False) as idx:
            idx.repair()
            assert idx.verify() == []
    r = build_index(tmp_path / "idx", [tmp_path / "p"])
    assert r.unchanged == 3
    with Searcher.open(tmp_path / "idx", device="cpu") as s:
        top = s.search(image=str(photos[0]), k=1)[0]
        assert top.path == str(photos[0]) and top.score == pytest.approx(1.0, abs=1e-4)
        assert s.index.verify() == [] and s.index.store.get_manifest("pending_dirty_images") is None


# -- 10: remembered failures ------------------------------------------------------------------------------------


def test_unchanged_bad_file_is_not_decoded_again_and_the_model_not_loaded(tmp_path, monkeypatch):
    from index_data import decode as D
    from retrieval.models import runtime

    write_photos(tmp_path / "p", 2)
    (tmp_path / "p" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = build_index(tmp_path / "idx", [tmp_path / "p"])
    assert [os.path.basename(p) for p, _ in r.errors] == ["broken.jpg"]
    loads, decodes = [], []
    real_load, real_decode = runtime.index_encoder, D.load_image_with_size
    monkeypatch.setattr(runtime, "index_encoder", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(D, "load_image_with_size", lambda p, *a: decodes.append(p) or real_decode(p, *a))
    r = build_index(tmp_path / "idx", [tmp_path / "p"], model=None)
    assert loads == [] and decodes == [] and r.still_skipped == 1
    assert "retry-errors" in r.errors[0][1]
    r = build_index(tmp_path / "idx", [tmp_path / "p"], model=None, retry_errors=True)
    assert len(loads) == 1 and len(decodes) == 1 and r.still_skipped == 0 and len(r.errors) == 1
    # a changed file is tried again; a fixed one is indexed and its error cleared
    draw_scene(5).save(tmp_path / "p" / "broken.jpg")
    r = build_index(tmp_path / "idx", [tmp_path / "p"], model=None)
    assert r.errors == [] and r.encoded == 1
    with Index.open(tmp_path / "idx") as idx:
        assert idx.store.errors() == []
    # a bad file that is deleted is forgotten
    (tmp_path / "p" / "also_broken.jpg").write_bytes(b"\xff\xd8 nope")
    assert len(build_index(tmp_path / "idx", [tmp_path / "p"], model=None).errors) == 1
    os.remove(tmp_path / "p" / "also_broken.jpg")
    assert build_index(tmp_path / "idx", [tmp_path / "p"], model=None).errors == []
    with Index.open(tmp_path / "idx") as idx:
        assert idx.store.errors() == []


def test_cli_retry_errors_and_still_skipped_report(tmp_path):
    write_photos(tmp_path / "p", 1)
    (tmp_path / "p" / "broken.png").write_bytes(b"garbage")
    args = ["index", tmp_path / "p", "--index", tmp_path / "idx", "--workers", "0", "-q", "--device", "cpu"]
    assert run(*args, "--model", TINY).exit_code == 0
    r = run(*args)
    assert r.exit_code == 0 and "broken.png" in r.stderr and "--retry-errors" in r.stderr
    r = run(*args, "--retry-errors")
    assert r.exit_code == 0 and "broken.png" in r.stderr and "--retry-errors" not in r.stderr


def test_errors_table_of_an_older_index_is_migrated(tmp_path):
    import sqlite3

    write_photos(tmp_path / "p", 1)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    db = sqlite3.connect(tmp_path / "idx" / "meta.sqlite")
    db.executescript(
        "DROP TABLE errors; CREATE TABLE errors (id INTEGER PRIMARY KEY, path TEXT, path_raw BLOB, "
        "reason TEXT, at FLOAT); CREATE UNIQUE INDEX idx_errors_path_raw ON errors (path_raw);"
        "PRAGMA user_version = 0;"  # as code from before numbered migrations left it
    )
    db.close()
    (tmp_path / "p" / "broken.png").write_bytes(b"garbage")
    r = build_index(tmp_path / "idx", [tmp_path / "p"], model=None)
    assert len(r.errors) == 1
    r = build_index(tmp_path / "idx", [tmp_path / "p"], model=None)
    assert r.still_skipped == 1


# -- 11, 12, 13: caption rows naming folders, index inside the photos, failed runs ----------------------------


def test_caption_row_naming_a_folder_is_an_error_not_a_walk(tmp_path):
    photos = write_photos(tmp_path / "p", 2)
    write_photos(tmp_path / "p" / "album", 3, start=10)
    caps = tmp_path / "caps.csv"
    caps.write_text(f"image,caption\n{photos[0]},a real photo\n{tmp_path / 'p' / 'album'},a whole folder\n")
    r = build_index(tmp_path / "idx", [], captions_file=str(caps))
    assert r.images_total == 1
    assert dict(r.errors)[str(tmp_path / "p" / "album")].endswith("is a folder, not an image")
    with Index.open(tmp_path / "idx") as idx:
        assert str(tmp_path / "p" / "album") in dict(idx.store.errors())


def test_index_directory_inside_the_photo_folder_is_never_scanned(tmp_path):
    write_photos(tmp_path / "p", 3)
    idx = tmp_path / "p" / "index"
    build_index(idx, [tmp_path / "p"])
    write_photos(idx / "thumbs", 2, start=40)  # what a server's thumbnail cache looks like
    r = build_index(idx, [tmp_path / "p"])
    assert r.images_total == 3 and r.scanned == 3
    r = build_index(idx, [tmp_path / "p"], include_hidden=True)
    assert r.images_total == 3


@pytest.mark.parametrize("case", ["no-path", "missing-path", "bad-model", "unknown-model"])
def test_failed_index_creates_nothing(tmp_path, case):
    write_photos(tmp_path / "p", 1)
    idx = tmp_path / "new" / "idx"
    args = {
        "no-path": [],
        "missing-path": [tmp_path / "nope"],
        "bad-model": [tmp_path / "p", "--model", "::"],
        "unknown-model": [tmp_path / "p", "--model", "no-such-arch:none"],
    }[case]
    r = run("index", *args, "--index", idx, "--workers", "0", "-q", "--device", "cpu")
    one_line_error(r)
    assert not (tmp_path / "new").exists()
    # the next, correct command works as if nothing had happened
    r = run("index", tmp_path / "p", "--index", idx, "--model", TINY, "--workers", "0", "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output


# -- 14: odd names in --paths, --null, --json and human output -------------------------------------------------


@pytest.fixture(scope="module")
def odd_names(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    folder = root / "p"
    folder.mkdir()
    names = [b"new\nline.jpg", b"latin1-\xe9t\xe9.jpg", b"esc-\x1b[31mred\x1b[0m.jpg", b"plain.jpg"]
    for i, n in enumerate(names):
        draw_scene(200 + i).save(os.path.join(os.fsencode(str(folder)), n), "JPEG")
    build_index(root / "idx", [folder])
    return root, [os.path.join(os.fsencode(str(folder)), n) for n in names]


def _search_out(root, *fmt):
    r = CliRunner().invoke(main, ["search", "a photo", "--index", str(root / "idx"), "-k", "10", *fmt])
    assert r.exit_code == 0, r.output
    return r


def test_null_output_is_exact_bytes(odd_names):
    root, names = odd_names
    out = _search_out(root, "--null").stdout_bytes
    assert out.endswith(b"\0") and sorted(out[:-1].split(b"\0")) == sorted(names)
    r = _search_out(root, "-0")
    assert sorted(r.stdout_bytes[:-1].split(b"\0")) == sorted(names)


def test_paths_output_names_files_that_exist(odd_names):
    root, names = odd_names
    r = _search_out(root, "--paths")
    lines = r.stdout_bytes.splitlines()
    assert len(lines) == 4
    newline = next(n for n in names if b"\n" in n)
    for line in lines:
        if line.startswith(b"$'"):
            assert line == b"$'" + newline.replace(b"\n", b"\\n") + b"'"
        else:
            assert line in names and os.path.exists(line)  # escape sequences and non-UTF-8 bytes kept
    assert "--null" in r.stderr


def test_json_has_a_lossless_field_for_non_utf8_names(odd_names):
    root, names = odd_names
    rows = [json.loads(line) for line in _search_out(root, "--json").stdout_bytes.splitlines()]
    assert len(rows) == 4
    got = set()
    for d in rows:
        if d["path_b64"] is None:
            got.add(d["path"].encode("utf-8"))
        else:
            assert "\ufffd" in d["path"]
            got.add(base64.b64decode(d["path_b64"]))
    assert got == set(names)


def test_human_output_escapes_control_characters(odd_names):
    root, _ = odd_names
    out = _search_out(root).stdout_bytes
    assert b"\x1b" not in out and b"esc-\\e[31mred\\e[0m.jpg" in out
    assert b"new\\nline.jpg" in out and b"latin1-\\xe9t\\xe9.jpg" in out
    assert len(out.splitlines()) == 5  # header and one line per result
