"""`benchmark recall`: recall through the engine equals recall computed directly from the stored embeddings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, build_index, write_photos

from retrieval.errors import RetrievalError
from retrieval.eval.benchmark import evaluate_index, load_pairs, parse_ks
from retrieval.eval.query_vectors import query_image_vectors, query_text_vectors
from retrieval.eval.recall import evaluate_embeddings
from retrieval.eval.run import run_recall_benchmark
from retrieval.query.searcher import Searcher
from retrieval.store.rows import text_hash

KEYS = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}


def _write_csv(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 photos named by FILE (with an exact duplicate file, a caption shared by two images, and a caption
    repeated for the same image), 10 extra photos FILE does not name, and a sidecar caption FILE does not give."""
    root = tmp_path_factory.mktemp("bench_recall")
    photos = write_photos(root / "photos", 24)
    shutil.copy(photos[0], root / "photos" / "dup_of_0.jpg")
    extra = write_photos(root / "photos" / "extra", 10, start=100)
    (root / "photos" / "img_0003.jpg.txt").write_text("a sidecar caption not in the corpus\n")
    rows = []
    for i, p in enumerate(photos):
        rows.append((f"photos/{p.name}", f"scene {i} with a few shapes"))
        if i % 2 == 0:
            rows.append((f"photos/{p.name}", f"picture number {i * 7} of the set"))
    rows.append(("photos/dup_of_0.jpg", "the same picture under another name"))
    rows.append((f"photos/{photos[5].name}", "a caption two images share"))
    rows.append((f"photos/{photos[6].name}", "a caption two images share"))
    rows.append((f"photos/{photos[7].name}", "scene 7 with a few shapes"))  # same image, same caption again
    caps = _write_csv(root / "caps.csv", rows)
    # index 1: exactly FILE; index 2: FILE plus extra photos and the sidecar; index 3: hnsw
    build_index(root / "idx_file", [], captions_file=str(caps))
    build_index(root / "idx_more", [root / "photos"], captions_file=str(caps))
    build_index(root / "idx_hnsw", [], captions_file=str(caps), index_type="hnsw")
    return root, caps, photos, extra


def direct_recall(index_dir, pairs, ks=(1, 5, 10)):
    """evaluate_embeddings on the raw embeddings stored in SQLite, clip_benchmark style (no engine involved)."""
    with Searcher.open(index_dir, device="cpu") as s:
        store = s.index.store
        hashes = [store.image_by_path(p).hash for p in pairs.images]
        img = store.get_embeddings("image", hashes, s.index.dim)
        txt = store.get_embeddings("text", [text_hash(t) for t in pairs.captions], s.index.dim)
    return evaluate_embeddings(img, txt, pairs.caption_image, ks)


def engine_recall(index_dir, pairs, ks=(1, 5, 10), exact=False):
    with Searcher.open(index_dir, device="cpu") as s:
        return evaluate_index(s, pairs, ks, exact=exact)


def test_pairs_resolve_like_the_pipeline(corpus):
    root, caps, photos, _ = corpus
    pairs = load_pairs(caps)
    assert pairs.n_images == 25 and pairs.n_captions == len(open(caps).read().splitlines()) - 1
    assert pairs.images[0] == str(photos[0]) and pairs.images[-1] == str(root / "photos" / "dup_of_0.jpg")
    assert pairs.captions.count("a caption two images share") == 2


def test_engine_equals_evaluate_embeddings(corpus):
    root, caps, _, _ = corpus
    pairs = load_pairs(caps)
    direct = direct_recall(root / "idx_file", pairs)
    r = engine_recall(root / "idx_file", pairs)
    assert set(r.metrics) == KEYS
    assert r.metrics == direct.metrics  # the same numbers, not approximately
    assert (r.n_images, r.n_captions) == (direct.n_images, direct.n_captions)
    assert r.missing_images == 0 and r.missing_captions == 0
    assert r.index_type == "flat" and r.model == TINY


def test_other_ks(corpus):
    root, caps, _, _ = corpus
    pairs = load_pairs(caps)
    r = engine_recall(root / "idx_file", pairs, ks=(2, 3, 50))
    assert r.metrics == direct_recall(root / "idx_file", pairs, ks=(2, 3, 50)).metrics
    assert r.metrics["image_retrieval_recall@50"] == 1.0 and r.metrics["text_retrieval_recall@50"] == 1.0


def test_candidates_restricted_to_file_images(corpus):
    """Extra images and a sidecar caption in the index change nothing: FILE's images and captions are the only
    candidates."""
    root, caps, _, _ = corpus
    pairs = load_pairs(caps)
    with Searcher.open(root / "idx_more", device="cpu") as s:
        assert s.index.info().images == 25 + 10
    r = engine_recall(root / "idx_more", pairs)
    assert r.metrics == direct_recall(root / "idx_more", pairs).metrics
    assert r.metrics == engine_recall(root / "idx_file", pairs).metrics
    assert r.missing_images == 0 and r.missing_captions == 0


def test_missing_images_count_as_misses(corpus):
    """FILE naming an image the index lacks: its captions miss, it misses as a query, denominators keep it."""
    root, caps, photos, _ = corpus
    text = open(caps).read() + f"{root}/photos/not_indexed.jpg,a photo nobody indexed\n"
    caps2 = root / "caps_missing.csv"  # next to caps.csv: its relative paths resolve the same way
    caps2.write_text(text)
    pairs2 = load_pairs(caps2)
    r = engine_recall(root / "idx_file", pairs2)
    assert r.missing_images == 1 and r.missing_captions == 1
    present = direct_recall(root / "idx_file", load_pairs(caps))
    for key, value in present.metrics.items():
        scale = (
            (present.n_captions / pairs2.n_captions)
            if key.startswith("image_")
            else (present.n_images / pairs2.n_images)
        )
        assert r.metrics[key] == pytest.approx(value * scale, abs=1e-12)


def test_query_vectors_follow_the_searcher(corpus):
    """The batched query recipe gives the vectors Searcher.embed_text / embed_image give."""
    root, caps, photos, _ = corpus
    with Searcher.open(root / "idx_file", device="cpu") as s:
        texts = ["scene 3 with a few shapes", "a caption two images share"]
        batched = query_text_vectors(s, texts)
        for t, v in zip(texts, batched):
            np.testing.assert_allclose(v, s.embed_text(t), atol=1e-5)
        row = s.index.store.image_by_path(str(photos[4]))
        np.testing.assert_allclose(query_image_vectors(s, [row.hash])[0], s.embed_image(str(photos[4])), atol=1e-4)


def test_exact_on_flat_and_hnsw(corpus):
    root, caps, _, _ = corpus
    pairs = load_pairs(caps)
    flat = engine_recall(root / "idx_file", pairs, exact=True)
    assert flat.exact == flat.metrics
    hnsw = engine_recall(root / "idx_hnsw", pairs, exact=True)
    assert hnsw.index_type == "hnsw"
    assert set(hnsw.exact) == KEYS and hnsw.exact == flat.metrics
    assert all(0.0 <= v <= 1.0 for v in hnsw.metrics.values())
    d = hnsw.to_dict()
    assert set(d["exact"]) == KEYS and KEYS <= set(d)


def test_cli_json_keys_and_exact(corpus):
    root, caps, _, _ = corpus
    from retrieval.cli import main

    res = CliRunner().invoke(
        main, ["benchmark", "recall", "--captions", str(caps), "--index", str(root / "idx_file"), "--json", "--exact"]
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    assert KEYS <= set(d)
    for key in ("n_images", "n_captions", "missing_images", "missing_captions", "index_type", "model", "exact"):
        assert key in d
    assert set(d["exact"]) == KEYS and d["n_images"] == 25 and d["built"] is False
    assert (
        d["image_retrieval_recall@1"]
        == direct_recall(root / "idx_file", load_pairs(caps)).metrics["image_retrieval_recall@1"]
    )

    res = CliRunner().invoke(
        main, ["benchmark", "recall", "--captions", str(caps), "--index", str(root / "idx_file"), "--k", "1,3"]
    )
    assert res.exit_code == 0, res.output
    assert "text→image" in res.stdout and "image→text" in res.stdout


def test_cli_builds_when_no_index(corpus, tmp_path):
    root, caps, _, _ = corpus
    from retrieval.cli import main

    # --index naming nothing yet: built there and kept
    res = CliRunner().invoke(
        main,
        [
            "benchmark",
            "recall",
            "--captions",
            str(caps),
            "--index",
            str(tmp_path / "new"),
            "--model",
            TINY,
            "--workers",
            "0",
            "-q",
            "--json",
            "--k",
            "1,5",
        ],
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout.strip().splitlines()[-1])
    assert d["built"] is True and d["index_seconds"] > 0 and (tmp_path / "new" / "meta.sqlite").is_file()
    assert set(k for k in d if "_recall@" in k) == {
        f"{x}_retrieval_recall@{k}" for x in ("image", "text") for k in (1, 5)
    }
    # no --index: a temporary index, gone afterwards (through the API, with a build callable)
    seen = []

    def build(path, options):
        from index_data.options import IndexOptions
        from index_data.pipeline import run_index

        seen.append(path)
        run_index(path, IndexOptions(workers=0, progress=False, **options))

    r = run_recall_benchmark(caps, model=TINY, device="cpu", build=build)
    assert r.built and r.index is None and not seen[0].exists()
    assert set(r.metrics) == KEYS


def test_cli_errors(corpus, tmp_path):
    root, caps, _, _ = corpus
    from retrieval.cli import main

    runner = CliRunner()
    res = runner.invoke(
        main, ["benchmark", "recall", "--captions", str(caps), "--index", str(root / "idx_file"), "--k", "0,5"]
    )
    assert res.exit_code == 2 and "--k" in res.output
    res = runner.invoke(
        main,
        ["benchmark", "recall", "--captions", str(caps), "--index", str(root / "idx_file"), "--model", "ViT-B-32:none"],
    )
    assert res.exit_code == 2 and "tiny-clip:none" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("nothing,here\n1,2\n")
    res = runner.invoke(main, ["benchmark", "recall", "--captions", str(bad), "--index", str(root / "idx_file")])
    assert res.exit_code == 2 and "bad.csv" in res.output
    with pytest.raises(RetrievalError):
        parse_ks("a,b")


def test_recall_applies_the_index_fusion(corpus, tmp_path):
    """With a fusion installed, recall is computed on fused vectors: documents (image blended with its captions)
    for text->image, adapted image queries against adapted captions for image->text."""
    from retrieval.fusion import install as fusion_install
    from retrieval.fusion import model as fusion_mod

    root, caps, _, _ = corpus
    idx_dir = tmp_path / "fused"
    shutil.copytree(root / "idx_file", idx_dir)
    from retrieval.store.index import Index

    with Index.open_for_write(idx_dir, create=False) as idx:
        f = fusion_mod.Fusion.untrained(idx.dim, idx.identity, seed=3)
        rng = np.random.default_rng(0)
        for m in ("image", "text"):  # a visible, non-identity adapter and an open document gate
            f.params[f"{m}.up"][:] = rng.standard_normal(f.params[f"{m}.up"].shape).astype(np.float32) * 0.5
        f.params["gate.bias"][:] = 0.4
        fusion_install.install_fusion(idx, f)
    pairs = load_pairs(caps)
    r = engine_recall(idx_dir, pairs, exact=True)
    assert r.fusion
    with Searcher.open(idx_dir, device="cpu") as s:
        store, fusion = s.index.store, s.index.fusion()
        rows = [store.image_by_path(p) for p in pairs.images]
        docs = s.index.image_vectors_for([(x.id, x.hash) for x in rows])
        raw_txt = store.get_embeddings("text", [text_hash(t) for t in pairs.captions], s.index.dim)
        raw_img = store.get_embeddings("image", [x.hash for x in rows], s.index.dim)
    t2i = evaluate_embeddings(docs, fusion.query_text(raw_txt), pairs.caption_image).metrics
    i2t = evaluate_embeddings(fusion.query_image(raw_img), fusion.caption_vectors(raw_txt), pairs.caption_image).metrics
    for key in KEYS:
        want = t2i[key] if key.startswith("image_") else i2t[key]
        assert r.metrics[key] == pytest.approx(want, abs=1e-12), key
        assert r.exact[key] == pytest.approx(want, abs=1e-12), key
    assert r.metrics != engine_recall(root / "idx_file", pairs).metrics  # the fusion did change the vectors


def _clip_benchmark_recall(scores, positive_pairs, k):
    """clip_benchmark.metrics.zeroshot_retrieval.recall_at_k, verbatim in torch."""
    import torch

    nb_texts, nb_images = scores.shape
    topk_indices = torch.topk(scores, k, dim=1)[1]
    nb_positive = positive_pairs.sum(dim=1)
    topk_indices_onehot = torch.nn.functional.one_hot(topk_indices, num_classes=nb_images)
    positive_pairs_reshaped = positive_pairs.view(nb_texts, 1, nb_images)
    nb_true_positive = (topk_indices_onehot * positive_pairs_reshaped).sum(dim=(1, 2))
    return nb_true_positive / nb_positive


def test_self_built_index_equals_clip_benchmark_recall_at_k(tmp_path):
    """All six figures of a benchmark that builds its own index equal clip_benchmark's formula on the same
    embeddings (distinct photos and captions, so top-k has no ties to break differently)."""
    import torch

    photos = write_photos(tmp_path / "photos", 14)
    caps = _write_csv(
        tmp_path / "caps.csv",
        [(f"photos/{p.name}", f"{w} number {i}") for i, p in enumerate(photos) for w in ("scene", "drawing")],
    )

    def build(path, options):
        from index_data.options import IndexOptions
        from index_data.pipeline import run_index

        run_index(path, IndexOptions(workers=0, progress=False, **options))

    r = run_recall_benchmark(caps, index_dir=tmp_path / "idx", model=TINY, device="cpu", build=build)
    assert r.built and r.missing_images == 0 and r.missing_captions == 0
    pairs = load_pairs(caps)
    with Searcher.open(tmp_path / "idx", device="cpu") as s:
        store = s.index.store
        img = torch.from_numpy(
            store.get_embeddings("image", [store.image_by_path(p).hash for p in pairs.images], s.index.dim)
        )
        txt = torch.from_numpy(store.get_embeddings("text", [text_hash(t) for t in pairs.captions], s.index.dim))
    scores = txt @ img.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(pairs.captions)), torch.from_numpy(pairs.caption_image)] = True
    for k in (1, 5, 10):
        t2i = (_clip_benchmark_recall(scores, positive, k) > 0).float().mean().item()
        i2t = (_clip_benchmark_recall(scores.T, positive.T, k) > 0).float().mean().item()
        assert r.metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i, abs=1e-6)
        assert r.metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t, abs=1e-6)
    assert 0 < r.metrics["text_retrieval_recall@10"]


def test_index_without_the_files_captions_encodes_them(corpus, tmp_path):
    """An index built from the photos alone: image->text ranks FILE's captions, encoded for the evaluation
    (not 0%), equal to recall on the same embeddings; the index gains no caption."""
    root, caps, _, _ = corpus
    build_index(tmp_path / "photos_only", [root / "photos"])
    pairs = load_pairs(caps)
    with Searcher.open(tmp_path / "photos_only", device="cpu") as s:
        before = s.index.store.count("captions")
        r = evaluate_index(s, pairs)
        store = s.index.store
        img = store.get_embeddings("image", [store.image_by_path(p).hash for p in pairs.images], s.index.dim)
        txt = s.encoder.encode_texts(pairs.captions)
        assert store.count("captions") == before
    direct = evaluate_embeddings(img, txt, pairs.caption_image, (1, 5, 10))
    assert r.missing_captions == 0 and r.extra["captions_encoded"] == pairs.n_captions
    assert r.metrics == pytest.approx(direct.metrics, abs=1e-12)
    assert r.metrics["text_retrieval_recall@10"] > 0
    res = CliRunner().invoke(
        __import__("retrieval.cli", fromlist=["main"]).main,
        [
            "benchmark",
            "recall",
            "--captions",
            str(caps),
            "--index",
            str(tmp_path / "photos_only"),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["captions_encoded"] == pairs.n_captions
    assert "encoded for this evaluation" in res.stderr
