"""Query arithmetic: [W:]Q terms added to and subtracted from a query, as the normalised weighted sum, in the
Python API, the CLI and the HTTP API; the --weight composite is unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_index, write_photos

from retrieval.cli import main
from retrieval.errors import RetrievalError
from retrieval.query.arithmetic import QueryTerm, parse_term, weighted_sum
from retrieval.query.searcher import Searcher


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("qmath")
    photos = write_photos(root / "photos", 10)
    build_index(root / "idx", [root / "photos"])
    return root, photos


def test_parse_terms(tmp_path):
    img = tmp_path / "img.jpg"
    img.write_bytes(b"x")
    assert parse_term("2:cat") == QueryTerm(2.0, text="cat")
    assert parse_term(f"0.5:{img}") == QueryTerm(0.5, image=str(img))
    assert parse_term(str(img), sign=-1) == QueryTerm(-1.0, image=str(img))
    assert parse_term("0.5:./no/such.jpg") == QueryTerm(0.5, text="./no/such.jpg")
    assert parse_term("note: a cat") == QueryTerm(1.0, text="note: a cat")  # no number: all text
    assert parse_term("-1.5e0:dog") == QueryTerm(-1.5, text="dog")
    assert parse_term("3:id:42") == QueryTerm(3.0, image_id=42)
    assert parse_term(f"{img}", allow_paths=False) == QueryTerm(1.0, text=str(img))  # HTTP: never a server path
    assert parse_term((2, "cat"), sign=-1) == QueryTerm(-2.0, text="cat")
    for bad in ("2:", "  ", ("x", "cat")):
        with pytest.raises(RetrievalError):
            parse_term(bad)
    with pytest.raises(RetrievalError, match="cancel"):
        weighted_sum([(1.0, np.ones(4)), (-1.0, np.ones(4))])


def test_sum_is_the_normalised_weighted_sum(lib):
    root, photos = lib
    with Searcher.open(root / "idx", device="cpu") as s:
        got = s.search("red shapes", add=[f"2:{photos[3]}"], subtract=["0.5:blue sky"], k=10)
        q = s.embed_text("red shapes") + 2 * s.embed_image(str(photos[3])) - 0.5 * s.embed_text("blue sky")
        want = s.search_vector(q / np.linalg.norm(q), k=10)
        assert [r.id for r in got] == [r.id for r in want]
        assert [r.score for r in got] == pytest.approx([r.score for r in want], abs=1e-5)
        # an image term alone finds that image first
        top = s.search(add=[str(photos[6])], k=3)
        assert top[0].path == str(photos[6]) and top[0].score == pytest.approx(1.0, abs=1e-4)
        # an indexed image by id: its stored vector
        by_id = s.search(add=[f"id:{top[0].id}"], k=3)
        assert [r.id for r in by_id] == [r.id for r in top]
        with pytest.raises(RetrievalError, match="cancel"):
            s.search(image=str(photos[1]), subtract=[str(photos[1])])


def test_weight_composite_unchanged_and_combines_with_terms(lib):
    root, photos = lib
    with Searcher.open(root / "idx", device="cpu") as s:
        img, txt = s.encoder.encode_images([str(photos[2])])[0], s._text_vector("a photo")
        base = s.combine(img, txt, 0.3)
        plain = s.search("a photo", image=str(photos[2]), weight=0.3, k=10)
        assert [r.id for r in plain] == [r.id for r in s.search_vector(base, k=10)]
        got = s.search("a photo", image=str(photos[2]), weight=0.3, subtract=["a photo"], k=10)
        q = base - s.embed_text("a photo")
        assert [r.id for r in got] == [r.id for r in s.search_vector(q / np.linalg.norm(q), k=10)]


def test_cli_add_subtract(lib):
    root, photos = lib
    r = CliRunner().invoke(
        main,
        [
            "search",
            "--add",
            f"1:{photos[4]}",
            "--add",
            "0.1:circles",
            "--subtract",
            "0.1:squares",
            "--index",
            str(root / "idx"),
            "--json",
            "-k",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.splitlines()[0])["path"] == str(photos[4])
    r = CliRunner().invoke(main, ["search", "cat", "--add", "2:", "--index", str(root / "idx")])
    assert r.exit_code == 2 and "empty query term" in r.output


def test_http_add_subtract(lib):
    from fastapi.testclient import TestClient

    from retrieval.server.app import create_app

    root, photos = lib
    with TestClient(create_app(root / "idx", device="cpu", for_tests=True)) as c:
        first = c.get("/api/search", params={"add": str(photos[5])}).json()["results"]
        # over HTTP a path is text, never a file read on the server
        assert first[0]["path"] != str(photos[5]) or first[0]["score"] < 0.999
        some_id = first[0]["id"]
        resp = c.get("/api/search", params=[("add", f"id:{some_id}"), ("subtract", "0.2:stripes")])
        assert resp.status_code == 200, resp.text
        assert resp.json()["results"][0]["id"] == some_id
        resp = c.get("/api/search", params=[("q", "shapes"), ("add", "2:id:999999")])
        assert resp.status_code == 400 and "no image with id 999999" in resp.json()["error"]
        with Searcher.open(root / "idx", device="cpu") as s:
            want = s.search("shapes", add=["0.5:circles"], subtract=["dots"], k=5)
        resp = c.get("/api/search", params=[("q", "shapes"), ("add", "0.5:circles"), ("subtract", "dots"), ("k", 5)])
        assert [r["id"] for r in resp.json()["results"]] == [r.id for r in want]
