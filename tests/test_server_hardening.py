"""The server against a hostile filesystem and hostile requests: indexed files swapped after indexing,
HEAD requests, the page's headers by either URL, no CDN-loaded /docs, the TestClient host only for tests,
the temporary thumbnail cache removed at shutdown, and query uploads decoded with bounded memory."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import build_index, write_photos
from corpus import make_bomb_png
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.errors import ImageDecodeError
from retrieval.images import load_upload
from retrieval.server.app import create_app
from retrieval.server.served_files import FileChanged, open_indexed

CHANGED = "changed since it was indexed; run index"


@pytest.fixture()
def served(tmp_path):
    photos = write_photos(tmp_path / "p", 4)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    app = create_app(tmp_path / "idx", device="cpu", for_tests=True)
    with TestClient(app) as c:
        rows = {r.path: r.id for r in app.state.service.searcher.index.store.iter_images()}
        yield c, photos, rows, tmp_path


def _swap(path: Path, make) -> None:
    """Replace the file at `path` the way an attacker with write access to the photo folder would."""
    tmp = path.with_name(path.name + ".swap")
    make(tmp)
    os.replace(tmp, path)


def _assert_changed(c, i):
    for kind in ("file", "thumb"):
        r = c.get(f"/{kind}/{i}")
        assert r.status_code == 404 and CHANGED in r.json()["error"], (kind, r.status_code, r.content[:80])


def test_swapped_files_are_not_served(served):
    c, photos, rows, tmp = served
    secret = tmp / "secret.txt"
    secret.write_text("root:x:0:0:the secret\n")
    ids = [rows[str(p)] for p in photos]
    for i in ids:  # every file is served, and its thumbnail cached, while it is the indexed one
        assert c.get(f"/file/{i}").status_code == 200 and c.get(f"/thumb/{i}").status_code == 200
    _swap(photos[0], lambda t: os.symlink(secret, t))  # a symlink to a secret
    _swap(photos[1], lambda t: shutil.copy(secret, t))  # a text file
    _swap(photos[2], lambda t: shutil.copy(tmp / "idx" / "meta.sqlite", t))  # the index's own database
    _swap(photos[3], lambda t: os.symlink(tmp / "idx" / "meta.sqlite", t))  # a link into the index
    for i in ids:
        _assert_changed(c, i)
        assert b"root:" not in c.get(f"/file/{i}").content


def test_same_size_and_mtime_but_other_bytes_is_refused_and_a_touch_is_not(served):
    c, photos, rows, _ = served
    p = photos[0]
    i = rows[str(p)]
    good = c.get(f"/file/{i}").content
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same bytes: still the indexed file
    r = c.get(f"/file/{i}")
    assert r.status_code == 200 and r.content == good
    import hashlib

    assert r.headers["etag"] == f'"{hashlib.sha256(good).hexdigest()[:32]}"' and r.headers["last-modified"]
    st = p.stat()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))  # other bytes, same size; the mtime differs, so the hash decides
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _assert_changed(c, i)


def test_a_row_pointing_inside_the_index_directory_is_refused(served):
    c, photos, rows, tmp = served
    p = photos[1]
    inside = tmp / "idx" / "copy.jpg"
    shutil.copy2(p, inside)  # same bytes, size and mtime as the row: only its place gives it away
    db = c.app.state.service.searcher.index.store.db
    from retrieval.store.index import Index

    with Index.open_for_write(tmp / "idx") as w, w.store.transaction():
        w.store.db.execute(
            "UPDATE images SET path = ?, path_raw = ?, mtime_ns = ? WHERE id = ?",
            [str(inside), os.fsencode(str(inside)), inside.stat().st_mtime_ns, rows[str(p)]],
        )
    assert db is not None
    _assert_changed(c, rows[str(p)])


def test_a_fifo_does_not_hang_and_is_refused(served):
    c, photos, rows, _ = served
    _swap(photos[2], os.mkfifo)
    _assert_changed(c, rows[str(photos[2])])


def test_the_checked_descriptor_is_what_is_read(tmp_path):
    p = tmp_path / "a.jpg"
    p.write_bytes(b"first content")
    st = p.stat()
    import hashlib

    h = hashlib.sha256(b"first content").hexdigest()
    checked = open_indexed(str(p), st.st_size, st.st_mtime_ns, h, tmp_path / "idx")
    _swap(p, lambda t: Path(t).write_bytes(b"swapped after the check"))
    assert b"".join(checked.chunks()) == b"first content"
    with pytest.raises(FileChanged, match="changed since"):
        open_indexed(str(p), st.st_size, st.st_mtime_ns, h, tmp_path / "idx")


# -- HTTP --------------------------------------------------------------------------------------------


def test_head_answers_like_get_without_a_body(served):
    c, photos, rows, _ = served
    i = rows[str(photos[0])]
    for url in (
        "/",
        "/static/index.html",
        "/api/info",
        f"/api/search?id={i}&k=2",
        f"/file/{i}",
        f"/thumb/{i}",
        "/static/app.js",
    ):
        g, h = c.get(url), c.head(url)
        assert g.status_code == 200 and h.status_code == 200, (url, h.status_code)
        assert h.content == b"" and h.headers["content-type"] == g.headers["content-type"], url
        assert h.headers.get("content-length") == g.headers.get("content-length"), url
    assert c.head("/file/999999").status_code == 404


def test_page_by_file_name_has_the_same_security_headers(served):
    c = served[0]
    a, b = c.get("/"), c.get("/static/index.html")
    for key in ("content-security-policy", "x-content-type-options"):
        assert b.headers[key] == a.headers[key]


def test_no_cdn_loaded_docs(served):
    c = served[0]
    assert c.get("/docs").status_code == 404 and c.get("/redoc").status_code == 404
    assert c.get("/openapi.json").status_code == 200


def test_testserver_host_only_for_tests(tmp_path):
    write_photos(tmp_path / "p", 1)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    with TestClient(create_app(tmp_path / "idx", device="cpu")) as c:  # as `serve` creates it
        assert c.get("/api/info").status_code == 400  # TestClient sends Host: testserver
        assert c.get("/api/info", headers={"host": "localhost:8000"}).status_code == 200


def test_fallback_thumbnail_dir_is_removed_at_shutdown(tmp_path):
    write_photos(tmp_path / "p", 1)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    (tmp_path / "a_file").write_text("x")
    app = create_app(tmp_path / "idx", device="cpu", thumbs_dir=tmp_path / "a_file" / "thumbs", for_tests=True)
    fallback = app.state.service.thumbs
    assert fallback.is_dir() and not fallback.is_relative_to(tmp_path)
    with TestClient(app) as c:
        assert c.get("/thumb/1").status_code == 200
        assert any(fallback.rglob("*.jpg"))
    assert not fallback.exists()


# -- uploads -----------------------------------------------------------------------------------------


def _encoded(fmt: str, size) -> io.BytesIO:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, fmt)
    buf.seek(0)
    buf.name = f"q.{fmt.lower()}"
    return buf


def test_uploads_are_decoded_reduced():
    im = load_upload(_encoded("PNG", (2400, 1800)))
    assert im.mode == "RGB" and 512 <= min(im.size) < 1024 and im.size[0] / im.size[1] == pytest.approx(4 / 3, rel=0.01)
    im = load_upload(_encoded("JPEG", (2400, 1800)))
    assert 512 <= min(im.size) < 1024


def test_upload_pixel_cap_counts_what_is_decoded():
    # a JPEG decodes at up to 1/8 scale (draft), so its full size may exceed the cap; a PNG cannot
    assert load_upload(_encoded("JPEG", (2400, 1800)), max_pixels=2_000_000).size[0] >= 512
    with pytest.raises(ImageDecodeError, match="too large for a query image"):
        load_upload(_encoded("PNG", (2400, 1800)), max_pixels=2_000_000)


def test_huge_png_upload_is_refused_before_decoding(served, tmp_path):
    c = served[0]
    bomb = make_bomb_png(tmp_path / "huge.png", 13000, 13000)  # under PIL's limit, 169 MP
    r = c.post("/api/search", files={"image": ("huge.png", Path(bomb).read_bytes(), "image/png")})
    assert r.status_code == 400 and "too large for a query image" in r.json()["error"]


def test_serve_removes_its_temporary_thumbnail_dir_on_ctrl_c(tmp_path):
    """The real `retrieval serve`: with <index>/thumbs unusable (a file is in the way) thumbnails go to a
    temporary folder, which is gone once Ctrl-C has stopped the server."""
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    write_photos(tmp_path / "p", 1)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    (tmp_path / "idx" / "thumbs").write_text("in the way")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(root / "cli.py"),
            "serve",
            "--index",
            str(tmp_path / "idx"),
            "--port",
            "0",
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = None
        for line in proc.stderr:
            m = re.search(r"at (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "the server did not start"
        with urllib.request.urlopen(url + "thumb/1", timeout=30) as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"
        made = list((tmp_path / "tmp").glob("retrieval-thumbs-*"))
        assert len(made) == 1 and any(made[0].rglob("*.jpg"))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert list((tmp_path / "tmp").glob("retrieval-thumbs-*")) == []


@pytest.mark.parametrize("mode", ["P", "PA", "I;16", "LA", "CMYK", "1"])
def test_uploads_of_every_mode_are_reduced_to_rgb(mode):
    if mode in ("P", "PA"):
        im = Image.new("RGB", (1800, 1200), (220, 20, 20)).convert("P", dither=Image.Dither.NONE)
        if mode == "PA":
            im = im.convert("PA")
    elif mode == "I;16":
        im = Image.new("I;16", (1800, 1200), 40000)
    else:
        im = Image.new(mode, (1800, 1200), {"LA": (200, 255), "CMYK": (0, 200, 200, 0), "1": 1}[mode])
    buf = io.BytesIO()
    im.save(buf, "JPEG" if mode == "CMYK" else ("TIFF" if mode in ("1", "PA") else "PNG"))
    buf.seek(0)
    out = load_upload(buf)
    assert out.mode == "RGB" and 512 <= min(out.size) < 1024, (mode, out.mode, out.size)
    if mode in ("P", "PA"):
        assert out.getpixel((10, 10)) == im.convert("RGB").getpixel((10, 10))  # a colour, not an averaged index


@pytest.mark.parametrize("mode,factor", [("RGBA", 3), ("RGB", 4), ("LA", 7), ("I", 2)])
def test_reducing_in_strips_equals_one_reduce(mode, factor):
    import numpy as np

    from retrieval.images import _reduce_in_strips

    rng = np.random.default_rng(factor)
    bands = {"RGBA": 4, "RGB": 3, "LA": 2, "I": 1}[mode]
    if mode == "I":
        im = Image.fromarray(rng.integers(0, 60000, (1001, 777), dtype=np.int32), "I")
    elif mode == "LA":
        im = Image.fromarray(rng.integers(0, 256, (1001, 777, 4), dtype=np.uint8), "RGBA").convert("LA")
    else:
        im = Image.fromarray(rng.integers(0, 256, (1001, 777, bands), dtype=np.uint8), mode)
    a, b = im.reduce(factor), _reduce_in_strips(im, factor)
    assert a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()
