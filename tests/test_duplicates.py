"""Near-duplicates: range search grouping on vectors (exact and IVF), leader groups that do not chain, and the
`duplicates` command, Python function and HTTP endpoint on real photos (the sample photos, resized, edited and
copied, indexed with the starter model)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_index
from PIL import Image, ImageEnhance

from retrieval.cli import main
from retrieval.query.duplicates import find_duplicates, leader_groups, neighbours
from retrieval.store.index import Index

THRESHOLD = 0.98  # the starter model puts two different space photos at 0.96


def _clustered(n_clusters=300, per=3, singles=2000, dim=64, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters + singles, dim)).astype(np.float32)
    vecs = [
        centres[:n_clusters].repeat(per, 0) + noise * rng.standard_normal((n_clusters * per, dim)),
        centres[n_clusters:],
    ]
    v = np.concatenate(vecs).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _pairs(lims, ids):
    return {(i, int(j)) for i in range(len(lims) - 1) for j in ids[lims[i] : lims[i + 1]]}


def test_ivf_range_search_finds_the_exact_pairs():
    v = _clustered()
    exact = neighbours(v, 0.95, exact_max=len(v))
    ivf = neighbours(v, 0.95, exact_max=100)  # forces the IVF path
    assert _pairs(*exact[:2]) == _pairs(*ivf[:2])
    assert len(_pairs(*exact[:2])) == 300 * 3 * 2  # every cluster member finds its two siblings, nothing else
    assert np.all(exact[2] >= 0.95) and np.allclose(sorted(exact[2]), sorted(ivf[2]), atol=1e-6)


def test_leader_groups_do_not_chain():
    # a ~ b and b ~ c at 0.96, but a and c only 0.90: c is not a's duplicate
    a = np.array([1.0, 0.0])
    t = np.arccos(0.96)
    b = np.array([np.cos(t), np.sin(t)])
    c = np.array([np.cos(2 * t), np.sin(2 * t)])
    v = np.stack([a, b, c]).astype(np.float32)
    lims, ids, scores = neighbours(v, 0.95)
    assert leader_groups(np.array([0, 1, 2]), lims, ids, scores) == [[(0, 1.0), (1, pytest.approx(0.96, abs=1e-5))]]
    # led by b (the best quality), all three are within 0.95 of it
    groups = leader_groups(np.array([1, 0, 2]), lims, ids, scores)
    assert [sorted(n for n, _ in g) for g in groups] == [[0, 1, 2]]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    from benchmarks.samples import write_sample_photos

    root = tmp_path_factory.mktemp("dups")
    photos = root / "photos"
    write_sample_photos(photos)
    cat = Image.open(photos / "cat_chelsea.jpg")
    cat.resize((cat.width // 2, cat.height // 2)).save(photos / "cat_small.jpg", quality=85)
    ImageEnhance.Brightness(cat).enhance(1.08).save(photos / "cat_edit.jpg", quality=90)
    shutil.copy(photos / "coffee_cup.jpg", photos / "coffee_copy.jpg")
    # the original cat is the newest of the two full-size cats: it leads its group
    for i, name in enumerate(["cat_edit.jpg", "cat_small.jpg", "cat_chelsea.jpg", "coffee_cup.jpg", "coffee_copy.jpg"]):
        os.utime(photos / name, (1_600_000_000 + i, 1_600_000_000 + i))
    build_index(root / "idx", [photos], model="starter")
    return root


def _names(group):
    return [os.path.basename(m.path) for m in group.members]


def test_groups_on_real_photos(library):
    with Index.open(library / "idx") as idx:
        groups = find_duplicates(idx, threshold=THRESHOLD)
    assert [_names(g) for g in groups] == [
        ["cat_chelsea.jpg", "cat_edit.jpg", "cat_small.jpg"],
        ["coffee_copy.jpg", "coffee_cup.jpg"],
    ]
    cat = groups[0].members
    assert cat[0].score == 1.0 and all(THRESHOLD <= m.score < 1.0 for m in cat[1:])
    assert (cat[0].width, cat[-1].width) == (451, 225)  # largest first, the half-size copy last
    assert [m.score for m in groups[1].members] == [1.0, 1.0]  # byte-identical copies


def test_cli_duplicates_json(library):
    r = CliRunner().invoke(
        main, ["duplicates", "--index", str(library / "idx"), "--threshold", str(THRESHOLD), "--json"]
    )
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.splitlines()]
    assert len(lines) == 2 and set(lines[0]["members"][0]) >= {"path", "id", "score"}
    assert os.path.basename(lines[0]["members"][0]["path"]) == "cat_chelsea.jpg"
    r = CliRunner().invoke(main, ["duplicates", "--index", str(library / "idx"), "--threshold", str(THRESHOLD)])
    assert r.exit_code == 0 and "group 1: 3 photos" in r.output
    r = CliRunner().invoke(main, ["duplicates", "--index", str(library / "idx"), "--threshold", "0.2"])
    assert r.exit_code == 2


def test_no_duplicates_exit_1(tmp_path):
    from conftest import write_photos

    build_index(tmp_path / "idx", write_photos(tmp_path / "p", 2))
    r = CliRunner().invoke(main, ["duplicates", "--index", str(tmp_path / "idx"), "--threshold", "1.0", "--json"])
    assert r.exit_code == 1 and r.output == ""


def test_http_duplicates(library):
    from fastapi.testclient import TestClient

    from retrieval.server.app import create_app

    with TestClient(create_app(library / "idx", device="cpu", for_tests=True)) as c:
        body = c.get("/api/duplicates", params={"threshold": THRESHOLD}).json()
        assert body["total"] == 2 and len(body["groups"][0]["members"]) == 3
        first = body["groups"][0]["members"][0]
        assert c.get(first["thumb"]).headers["content-type"] == "image/jpeg"
        assert (
            len(c.get("/api/duplicates", params={"threshold": THRESHOLD, "limit": 1, "offset": 1}).json()["groups"])
            == 1
        )
        assert c.get("/api/duplicates", params={"threshold": 0.1}).status_code == 422
        assert "duplicates.js" in c.get("/duplicates").text
