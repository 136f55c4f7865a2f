"""`serve`: the HTTP API and page, with FastAPI's TestClient on a small tiny-model index.

Covers every endpoint, the error mapping (JSON bodies, status codes), upload limits, the thumbnail cache, and
that files are only ever served by id for items in the index (path traversal and unknown ids are 404s).
"""

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import fastapi  # noqa: E402,F401 - part of the [test] extra: missing, this module fails rather than skips
import pytest
from click.testing import CliRunner
from conftest import TINY, build_index, draw_scene, write_photos  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image

from retrieval.cli import main  # noqa: E402
from retrieval.errors import EmptyIndexError, IndexNotFoundError, RetrievalError  # noqa: E402
from retrieval.server.app import create_app, status_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
N = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    photos = write_photos(root / "photos", N)
    for i, p in enumerate(photos[:6]):  # sidecar captions for half of them
        Path(f"{p}.txt").write_text(f"scene {i} with coloured shapes\na synthetic picture number {i}\n")
    build_index(root / "idx", [root / "photos"])
    return root, photos


@pytest.fixture(scope="module")
def client(corpus):
    root, _ = corpus
    app = create_app(root / "idx", device="cpu", max_upload_bytes=200_000, for_tests=True)
    with TestClient(app) as c:
        yield c


def _jpeg(seed: int = 999, size=(96, 72)) -> bytes:
    buf = io.BytesIO()
    draw_scene(seed, size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _ids(resp):
    assert resp.status_code == 200, resp.text
    return [r["id"] for r in resp.json()["results"]]


# -- info, page, schema --------------------------------------------------------------------------------


def test_info_has_the_cli_keys(client, corpus):
    r = client.get("/api/info")
    assert r.status_code == 200
    d = r.json()
    for key in ("images", "captions", "errors", "model", "dim", "index_type"):
        assert key in d
    assert d["images"] == N and d["captions"] == 12 and d["model"] == TINY and d["errors"] == 0


def test_page_and_static_assets(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="q"' in r.text and 'type="file"' in r.text and 'id="weight"' in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "/api/search" in js.text
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/../server.py").status_code == 404


def test_openapi_schema(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert {"get", "post"} <= set(paths["/api/search"]) and "get" in paths["/api/info"]
    assert "/thumb/{image_id}" in paths and "/file/{image_id}" in paths


def test_model_is_not_loaded_at_start(corpus):
    app = create_app(corpus[0] / "idx", device="cpu", for_tests=True)
    svc = app.state.service
    assert svc.searcher.query_encoder.loaded is None
    with TestClient(app) as c:
        assert c.get("/api/info").status_code == 200
        assert c.get("/thumb/1").status_code == 200
        assert c.get("/api/search", params={"id": 1, "k": 2}).status_code == 200  # stored vector: no model
        assert svc.searcher.query_encoder.loaded is None  # nothing so far needed the model
        r = c.post("/api/search", files={"image": ("q.jpg", _jpeg())}, data={"k": "1"})
        assert r.status_code == 200 and svc.searcher.query_encoder.loaded is not None


def test_the_vector_files_are_brought_into_memory_at_start(corpus):
    app = create_app(corpus[0] / "idx", device="cpu", for_tests=True)
    svc = app.state.service
    assert svc.warmed.wait(60)  # started by the service itself, beside the first requests
    assert svc.searcher.index._vectors  # the vector files were opened (and read) without any request
    with TestClient(app) as c:
        assert c.get("/api/search", params={"id": 1, "k": 2}).status_code == 200
    svc.close()
    assert svc.closed


# -- search ---------------------------------------------------------------------------------------


def test_text_search_returns_k_with_urls(client):
    r = client.get("/api/search", params={"q": "a red circle", "k": 5})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 5 and [x["rank"] for x in res] == [1, 2, 3, 4, 5]
    scores = [x["score"] for x in res]
    assert scores == sorted(scores, reverse=True)
    for x in res:
        assert x["kind"] == "image" and x["path"].endswith(".jpg")
        assert x["thumb"].split("?")[0] == f"/thumb/{x['id']}" and x["file"] == f"/file/{x['id']}"
        assert {"rank", "score", "id", "path", "hash", "width", "height", "captions"} <= set(x)
    probed = client.get("/api/search", params={"q": "a red circle", "k": 5, "probes": 32})
    assert probed.status_code == 200 and [x["id"] for x in probed.json()["results"]] == [x["id"] for x in res]
    assert client.get("/api/search", params={"q": "a red circle", "probes": 0}).status_code == 422
    t = client.get(res[0]["thumb"])
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    f = client.get(res[0]["file"])
    assert f.status_code == 200 and f.content == Path(res[0]["path"]).read_bytes()


def test_filters(client, corpus):
    _, photos = corpus
    r = client.get("/api/search", params={"q": "shapes", "k": 3, "glob": "img_000[0-2].jpg"})
    assert sorted(x["path"] for x in r.json()["results"]) == sorted(str(p) for p in photos[:3])
    r = client.get("/api/search", params={"q": "shapes", "k": 50, "min_score": 0.9999})
    assert r.status_code == 200 and all(x["score"] >= 0.9999 for x in r.json()["results"])
    r = client.get("/api/search", params={"q": "shapes", "under": "/nonexistent/folder"})
    assert r.status_code == 200 and r.json()["results"] == []


def test_upload_self_image_is_rank_one(client, corpus):
    _, photos = corpus
    p = photos[4]
    r = client.post("/api/search", files={"image": (p.name, p.read_bytes(), "image/jpeg")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 3 and res[0]["path"] == str(p) and res[0]["score"] == pytest.approx(1.0, abs=1e-4)
    r = client.post(
        "/api/search", files={"image": (p.name, p.read_bytes(), "image/jpeg")}, data={"k": "3", "exclude_self": "true"}
    )
    assert str(p) not in [x["path"] for x in r.json()["results"]]


def test_composite_query_weights(client, corpus):
    _, photos = corpus
    img = photos[7].read_bytes()
    text_only = _ids(client.get("/api/search", params={"q": "a blue square", "k": N}))
    image_only = _ids(client.post("/api/search", files={"image": ("q.jpg", img)}, data={"k": str(N)}))

    def composite(w):
        return _ids(
            client.post(
                "/api/search",
                files={"image": ("q.jpg", img)},
                data={"q": "a blue square", "weight": str(w), "k": str(N)},
            )
        )

    assert composite(1.0) == image_only
    assert composite(0.0) == text_only
    assert len(composite(0.5)) == N
    r = client.post("/api/search", files={"image": ("q.jpg", img)}, data={"q": "x", "weight": "1.5"})
    assert r.status_code == 422 and "weight" in r.json()["error"]


def test_captions(client, corpus):
    _, photos = corpus
    r = client.post(
        "/api/search", files={"image": ("q.jpg", photos[2].read_bytes())}, data={"to": "captions", "k": "4"}
    )
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 4
    for x in res:
        assert x["kind"] == "caption" and x["caption"] and x["image_id"] is not None
        assert x["thumb"].split("?")[0] == f"/thumb/{x['image_id']}" and x["file"] == f"/file/{x['image_id']}"
    r = client.get("/api/search", params={"q": "scene 3 with coloured shapes", "to": "captions", "k": 1})
    assert r.json()["results"][0]["caption"] == "scene 3 with coloured shapes"
    assert client.get("/api/search", params={"q": "x", "to": "nope"}).status_code == 422


def test_more_like_this(client, corpus):
    _, photos = corpus
    first = client.get("/api/search", params={"q": "anything", "k": N}).json()["results"]
    target = next(x for x in first if x["path"] == str(photos[5]))
    res = client.get("/api/search", params={"id": target["id"], "k": 4}).json()["results"]
    assert res[0]["id"] == target["id"] and res[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # the stored vector finds what uploading the file finds (indexing decodes JPEGs in draft mode, so scores
    # differ in the last digits and near-ties of the random tiny model may swap)
    upload = _ids(client.post("/api/search", files={"image": ("q.jpg", photos[5].read_bytes())}, data={"k": "4"}))
    assert upload[0] == target["id"]
    excl = _ids(client.get("/api/search", params={"id": target["id"], "k": 4, "exclude_self": "true"}))
    assert target["id"] not in excl and len(excl) == 4
    both = client.get("/api/search", params={"id": target["id"], "q": "red", "weight": 0.3, "k": 3})
    assert both.status_code == 200 and len(both.json()["results"]) == 3
    caps = client.get("/api/search", params={"id": target["id"], "to": "captions", "k": 2})
    assert caps.status_code == 200 and caps.json()["results"][0]["kind"] == "caption"


# -- errors ---------------------------------------------------------------------------------------


def test_query_errors_are_json(client):
    r = client.get("/api/search")
    assert r.status_code == 400 and "give a query" in r.json()["error"]
    r = client.get("/api/search", params={"q": "x", "k": 0})
    assert r.status_code == 422 and r.json()["error"].startswith("k:")
    r = client.get("/api/search", params={"id": 987654})
    assert r.status_code == 404 and "987654" in r.json()["error"]
    r = client.get("/api/search", params={"id": "abc"})
    assert r.status_code == 422 and "error" in r.json()
    r = client.get("/no/such/route")
    assert r.status_code == 404 and "error" in r.json()


def test_upload_not_an_image_is_400(client):
    r = client.post("/api/search", files={"image": ("notes.jpg", b"this is not an image at all", "image/jpeg")})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json" and "not an image" in r.json()["error"]
    r = client.post("/api/search", files={"image": ("empty.png", b"", "image/png")})
    assert r.status_code == 400 and "empty" in r.json()["error"]
    truncated = _jpeg()[:300]
    r = client.post("/api/search", files={"image": ("t.jpg", truncated, "image/jpeg")})
    assert r.status_code == 400 and "error" in r.json()
    r = client.post("/api/search", data={"q": "no file"})
    assert r.status_code == 422 and "image" in r.json()["error"]


def test_upload_too_big_is_413(client):
    limit = 200_000  # the fixture's max_upload_bytes
    big = os.urandom(limit + 1000)  # within the multipart slack: refused by the handler
    r = client.post("/api/search", files={"image": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    huge = os.urandom(limit * 3)  # over the body cap: refused on Content-Length, before reading
    r = client.post("/api/search", files={"image": ("huge.jpg", huge, "image/jpeg")})
    assert r.status_code == 413 and "limit" in r.json()["error"]

    boundary = "xyzBOUNDARYxyz"

    def chunked():  # no Content-Length: the stream is cut off once it passes the cap
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="c.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        for _ in range(30):
            yield b"\xff" * 20_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post(
        "/api/search", content=chunked(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no index at"):
        create_app(tmp_path / "nothing")
    r = CliRunner().invoke(main, ["serve", "--index", str(tmp_path / "nothing"), "--port", "0"])
    assert r.exit_code == 2 and "no index at" in r.output and "Traceback" not in r.output


def test_error_status_mapping():
    assert status_for(IndexNotFoundError("x")) == 404
    assert status_for(EmptyIndexError("x")) == 409
    assert status_for(RetrievalError("x")) == 400


def test_unexpected_errors_are_500_json(corpus, monkeypatch):
    app = create_app(corpus[0] / "idx", device="cpu", for_tests=True)

    def boom(*a, **k):
        raise ValueError("kaboom")

    monkeypatch.setattr(app.state.service, "search", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/api/search", params={"q": "x"})
    assert r.status_code == 500 and r.json() == {"error": "internal error: ValueError"}


def test_empty_index_is_409(corpus, monkeypatch):
    app = create_app(corpus[0] / "idx", device="cpu", for_tests=True)
    monkeypatch.setattr(app.state.service.searcher.index, "vectors", lambda *a, **k: None)
    with TestClient(app) as c:
        r = c.get("/api/search", params={"q": "x"})
        assert r.status_code == 409 and "no images" in r.json()["error"]
        r = c.get("/api/search", params={"id": 1})
        assert r.status_code == 409


# -- files and thumbnails ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/file/../../etc/passwd",
        "/thumb/../../../etc/passwd",
        "/file/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/thumb/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/file/..%2f..%2fmeta.sqlite",
        "/thumb/%2Fetc%2Fpasswd",
        "/file/%00",
        "/file/1%2f..%2f..%2fetc%2fpasswd",
        "/file/-1",
        "/file/0",
        "/file/999999",
        "/thumb/999999",
        "/file/1.0",
        "/thumb/1e3",
        "/file/" + "9" * 40,
        "/file/%EF%BC%91",  # fullwidth digit one
        "/static/../../../etc/passwd",
        "/static/%2e%2e/server.py",
    ],
)
def test_files_only_by_id_path_traversal_is_404(client, url):
    r = client.get(url)
    assert r.status_code == 404, (url, r.status_code, r.text[:200])
    assert "error" in r.json()
    assert b"root:" not in r.content and b"SQLite" not in r.content


def test_file_gone_from_disk_is_404(tmp_path):
    photos = write_photos(tmp_path / "p", 2)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    app = create_app(tmp_path / "idx", device="cpu", for_tests=True)
    with TestClient(app) as c:
        ids = _ids(c.get("/api/search", params={"id": 1, "k": 2}))
        photos[0].unlink()
        photos[1].unlink()
        for i in ids:
            assert c.get(f"/file/{i}").status_code == 404
            r = c.get(f"/thumb/{i}")
            assert r.status_code == 404 and "no longer on disk" in r.json()["error"]


def test_thumbnails_cached_on_disk(client, corpus):
    root, photos = corpus
    res = client.get("/api/search", params={"q": "x", "k": N}).json()["results"]
    x = next(r for r in res if r["path"] == str(photos[9]))
    cache = client.app.state.service.thumb_path(client.app.state.service.image_row(str(x["id"])))
    assert not cache.exists()
    r1 = client.get(x["thumb"])
    assert r1.status_code == 200 and r1.headers["x-thumb-cache"] == "miss"
    assert cache.is_file() and cache.is_relative_to(root / "idx" / "thumbs")
    im = Image.open(io.BytesIO(r1.content))
    assert im.format == "JPEG" and max(im.size) <= 512 and im.size[0] / im.size[1] == pytest.approx(96 / 72, rel=0.05)
    mtime = cache.stat().st_mtime_ns
    r2 = client.get(f"/thumb/{x['id']}")
    assert r2.status_code == 200 and r2.headers["x-thumb-cache"] == "hit" and r2.content == r1.content
    assert cache.stat().st_mtime_ns == mtime


def test_host_header_guard(client):
    assert client.get("/api/info", headers={"host": "evil.example:8000"}).status_code == 400
    for ok in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get("/api/info", headers={"host": ok}).status_code == 200, ok


def test_concurrent_requests(client, corpus):
    _, photos = corpus
    want = _ids(client.get("/api/search", params={"q": "a green triangle", "k": 5}))
    out, errors = [], []

    def worker(i):
        try:
            if i % 3 == 0:
                out.append(_ids(client.get("/api/search", params={"q": "a green triangle", "k": 5})))
            elif i % 3 == 1:
                assert client.get(f"/thumb/{want[i % 5]}").status_code == 200
            else:
                assert client.get("/api/info").status_code == 200
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and out and all(o == want for o in out)


# -- the real server ----------------------------------------------------------------------------------


def test_cli_serve_subprocess_starts_without_model(corpus):
    root, _ = corpus
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "serve", "--index", str(root / "idx"), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        line = p.stderr.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert m, line
        info = urllib.request.urlopen(m.group(1) + "api/info", timeout=10).read()
        started = time.monotonic() - t0
        assert b'"images":12' in info
        assert started < 15, started
        page = urllib.request.urlopen(m.group(1), timeout=10).read()
        assert b"<title>retrieval</title>" in page
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            p.kill()
    assert p.returncode == 0


# -- fuzzing from the OpenAPI schema ------------------------------------------------------------------

FUZZED = [
    ("/api/info", "GET"),
    ("/api/search", "GET"),
    ("/api/search", "POST"),
    ("/thumb/{image_id}", "GET"),
    ("/file/{image_id}", "GET"),
    ("/api/duplicates", "GET"),
]


@pytest.mark.parametrize("path,method", FUZZED)
def test_fuzz_from_openapi_schema_never_5xx(client, path, method):
    """schemathesis generates requests from /openapi.json (valid ones and near misses): never a 5xx, and every
    error is a JSON {"error": ...}. Bounded: 10 + 10 examples per operation, derandomised."""
    import schemathesis  # the [test] extra
    from hypothesis import HealthCheck, given, settings

    operation = schemathesis.openapi.from_asgi("/openapi.json", client.app)[path][method]

    strategy = operation.as_strategy(schemathesis.GenerationMode.POSITIVE) | operation.as_strategy(
        schemathesis.GenerationMode.NEGATIVE
    )

    @given(case=strategy)
    @settings(
        max_examples=20,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def check(case):
        response = case.call()
        assert response.status_code < 500, (case.path, case.query, response.status_code, response.text[:300])
        if response.status_code >= 400:
            assert "error" in response.json(), response.text[:300]

    check()
