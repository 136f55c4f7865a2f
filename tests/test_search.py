"""Query layer: every query kind, filters that still return k, de-duplication, errors."""

import os
import shutil

import numpy as np
import pytest
from conftest import build_index, write_photos
from PIL import Image

from retrieval.errors import EmptyIndexError, ImageDecodeError, IndexNotFoundError, RetrievalError
from retrieval.query.searcher import CaptionResult, ImageResult, Searcher


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    a = write_photos(root / "photos" / "a", 20)
    b = write_photos(root / "photos" / "b", 20, start=20, ext="png")
    shutil.copy(a[0], root / "photos" / "b" / "dup_of_a0.jpg")
    caps = root / "caps.jsonl"
    import json

    with open(caps, "w") as f:
        for i, p in enumerate(a[:10]):
            f.write(json.dumps({"image": str(p), "caption": f"scene number {i} with shapes"}) + "\n")
    build_index(root / "idx", [root / "photos"], captions_file=str(caps))
    s = Searcher.open(root / "idx", device="cpu")
    yield root, a, b, s
    s.close()


def _sorted_desc(results):
    scores = [r.score for r in results]
    return scores == sorted(scores, reverse=True)


def test_text_to_image_returns_k_ordered(corpus):
    _, _, _, s = corpus
    res = s.search("a red circle", k=7)
    assert len(res) == 7 and all(isinstance(r, ImageResult) for r in res)
    assert _sorted_desc(res) and [r.rank for r in res] == list(range(1, 8))


def test_image_to_image_self_is_rank_one(corpus):
    _, a, b, s = corpus
    for p in (a[3], b[5]):
        res = s.search(image=str(p), k=5)
        assert res[0].path == str(p) and res[0].score == pytest.approx(1.0, abs=1e-4)
    pil = Image.open(b[5]).convert("RGB")
    assert s.search(image=pil, k=1)[0].path == str(b[5])


def test_exclude_self_and_duplicates(corpus):
    root, a, _, s = corpus
    res = s.search(image=str(a[0]), k=5, exclude_self=True)
    assert all(r.hash != res[0].hash or r.path != str(a[0]) for r in res)
    assert str(a[0]) not in [r.path for r in res]
    assert str(root / "photos" / "b" / "dup_of_a0.jpg") not in [r.path for r in res]
    # identical content appears once by default, twice without de-duplication
    dedup = s.search(image=str(a[0]), k=5)
    assert len({r.hash for r in dedup}) == len(dedup)
    both = s.search(image=str(a[0]), k=5, dedupe=False)
    assert {r.path for r in both[:2]} == {str(a[0]), str(root / "photos" / "b" / "dup_of_a0.jpg")}


def test_image_to_text_and_text_to_text(corpus):
    _, a, _, s = corpus
    res = s.search(image=str(a[2]), to="captions", k=3)
    assert all(isinstance(r, CaptionResult) for r in res) and len(res) == 3
    # any model: the order is the brute-force order of caption·image scores
    enc = s.encoder
    qi = enc.encode_images([str(a[2])])[0]
    texts = [f"scene number {i} with shapes" for i in range(10)]
    brute = sorted(zip(enc.encode_texts(texts) @ qi, texts), reverse=True)[:3]
    assert [r.caption for r in res] == [t for _, t in brute]
    np.testing.assert_allclose([r.score for r in res], [sc for sc, _ in brute], atol=1e-4)
    assert all(r.path and os.path.exists(r.path) for r in res)
    tt = s.search("scene number 4 with shapes", to="captions", k=10)
    assert len(tt) == 10 and _sorted_desc(tt)
    assert tt[0].caption == "scene number 4 with shapes" and tt[0].score == pytest.approx(1.0, abs=1e-4)


def test_composite_query_follows_weights(corpus):
    _, a, _, s = corpus
    img_only = s.search("a blue square", image=str(a[1]), weight=1.0, k=3)
    assert img_only[0].path == str(a[1]) and img_only[0].score == pytest.approx(1.0, abs=1e-4)
    text_only = s.search("a blue square", image=str(a[1]), weight=0.0, k=5)
    plain_text = s.search("a blue square", k=5)
    assert [r.path for r in text_only] == [r.path for r in plain_text]
    enc = s.encoder
    q = s.embed_query("a blue square", str(a[1]), 0.3)
    manual = 0.3 * enc.encode_images([str(a[1])])[0] + 0.7 * enc.encode_texts(["a blue square"])[0]
    np.testing.assert_allclose(q, manual / np.linalg.norm(manual), atol=1e-5)


def test_filters_still_return_k(corpus):
    root, a, b, s = corpus
    under_b = s.search("anything", k=10, under=str(root / "photos" / "b"))
    assert len(under_b) == 10 and all(r.path.startswith(str(root / "photos" / "b")) for r in under_b)
    pngs = s.search("anything", k=15, glob="*.png")
    assert len(pngs) == 15 and all(r.path.endswith(".png") for r in pngs)
    few = s.search("anything", k=10, glob="img_0003.*")
    assert [os.path.basename(r.path) for r in few] == ["img_0003.jpg"]
    assert s.search("anything", k=5, glob="*.nothing") == []
    caps = s.search("scene", to="captions", k=4, under=str(root / "photos" / "a"))
    assert len(caps) == 4


def test_min_score_cuts(corpus):
    _, a, _, s = corpus
    res = s.search(image=str(a[0]), k=10, min_score=0.9999)
    assert len(res) >= 1 and all(r.score >= 0.9999 for r in res)


def test_errors(corpus, tmp_path):
    _, _, _, s = corpus
    with pytest.raises(IndexNotFoundError):
        Searcher.open(tmp_path / "missing")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError, match="not an image"):
        s.search(image=str(bad))
    with pytest.raises(ImageDecodeError, match="no such file"):
        s.search(image=str(tmp_path / "nope.jpg"))
    with pytest.raises(RetrievalError):
        s.search()
    with pytest.raises(RetrievalError, match="weight"):
        s.search("x", image=str(corpus[1][0]), weight=2.0)


def test_empty_index_error(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"")
    build_index(tmp_path / "idx", [folder])
    with Searcher.open(tmp_path / "idx", device="cpu") as s:
        with pytest.raises(EmptyIndexError):
            s.search("hello")
