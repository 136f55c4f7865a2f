"""Learned fusion: identity at init, training gains, files, installation atomicity, the train-fusion command.

Semantics come from synthetic embeddings with a learnable distortion (text = R·image + noise, R a rotation of a
subspace), written into the embeddings table of a tiny-model index, so the random tiny model is only used for
the mechanics (indexing, FAISS, search)."""

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import build_index, write_photos

from retrieval.cli import main
from retrieval.errors import ModelMismatchError, RetrievalError
from retrieval.fusion.install import install_fusion, train_fusion_for_index
from retrieval.fusion.model import FILE_RE, Fusion, fusion_files, load_fusion, save_fusion
from retrieval.fusion.pairs import PairData, evaluate_fusion, split_by_image
from retrieval.fusion.train import TrainConfig, _torch_net, train_fusion
from retrieval.modelspec import ModelIdentity
from retrieval.query.searcher import Searcher
from retrieval.store.index import Index

N_IMAGES = 72
CAPS = 3
EPOCHS = "12"


def _nz(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def distorted(n_img, caps, d, seed=0, k=48, noise=0.8):
    """Image i: z_i + noise; its captions: R(z_i + noise) with R rotating the first k dimensions."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_img, d))
    img = z + noise * rng.standard_normal((n_img, d))
    rk, _ = np.linalg.qr(rng.standard_normal((k, k)))
    r = np.eye(d)
    r[:k, :k] = rk
    cap_image = np.repeat(np.arange(n_img), caps)
    txt = (z[cap_image] + noise * rng.standard_normal((len(cap_image), d))) @ r.T
    return _nz(img), _nz(txt), cap_image


def perturbed(fusion: Fusion, seed=1, scale=0.3, gate=0.3) -> Fusion:
    """A non-identity fusion without training: random adapters, an open gate, a query offset."""
    rng = np.random.default_rng(seed)
    p = {k: v.copy() for k, v in fusion.params.items()}
    for m in ("image", "text"):
        p[f"{m}.up"] = (scale * rng.standard_normal(p[f"{m}.up"].shape) / np.sqrt(p[f"{m}.up"].shape[1])).astype(
            np.float32
        )
        p[f"{m}.bias"] = (0.05 * rng.standard_normal(p[f"{m}.bias"].shape)).astype(np.float32)
    p["gate.bias"][:] = gate
    p["gate.weight"][:] = [0.2, -0.1]
    p["query.bias"][:] = 0.7
    return Fusion(fusion.config, p, fusion.identity)


# -- the module alone ---------------------------------------------------------------------------


def test_untrained_fusion_is_exactly_identity():
    rng = np.random.default_rng(0)
    x = _nz(rng.standard_normal((20, 48)))
    t = _nz(rng.standard_normal((20, 48)))
    f = Fusion.untrained(48)
    assert np.array_equal(f.query_image(x), x) and np.array_equal(f.query_text(t), t)
    assert np.array_equal(f.caption_vectors(t), t)
    caps = [t[i : i + 3] if i % 2 else None for i in range(20)]
    assert np.array_equal(f.document_vectors(x, caps), x)
    for w in (0.0, 0.3, 0.5, 1.0):
        q = w * x + (1 - w) * t
        expect = q / np.linalg.norm(q, axis=1, keepdims=True)
        assert np.allclose(f.query_composite(x, t, w), expect, atol=1e-6)
    assert f.composite_weight(0.3) == 0.3


def test_numpy_inference_matches_the_torch_twin():
    import torch

    rng = np.random.default_rng(0)
    f = perturbed(Fusion.untrained(32, rank=8))
    net = _torch_net(f)
    x = _nz(rng.standard_normal((6, 32)))
    caps = _nz(rng.standard_normal((6, 3, 32)))
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]], np.float32)
    with torch.no_grad():
        a = net.adapt(torch.from_numpy(x), "image")
        c = net.adapt(torch.from_numpy(caps.reshape(-1, 32)), "text").reshape(6, 3, 32)
        d = net.docs(a, c, torch.from_numpy(mask)).numpy()
        comp = net.composite(a, net.adapt(torch.from_numpy(x[::-1].copy()), "text"), 0.5).numpy()
    assert np.allclose(a.numpy(), f.query_image(x), atol=1e-5)
    expect = f.document_vectors(x, [caps[i][mask[i] > 0] if mask[i].any() else None for i in range(6)])
    assert np.allclose(d, expect, atol=1e-5)
    assert np.allclose(comp, f.query_composite(x, x[::-1], 0.5), atol=1e-5)


def test_save_load_round_trip(tmp_path):
    ident = ModelIdentity("tiny-clip:none", "tiny-clip", "none", None, 32)
    f = perturbed(Fusion.untrained(32, ident, rank=8))
    f.info = {"seed": 3}
    path = save_fusion(f, tmp_path)
    assert FILE_RE.match(path.name) and ".g" not in path.name
    # the weights and their JSON config, no temp file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.with_suffix(".json").name, path.name]
    cfg = json.loads(path.with_suffix(".json").read_text())
    assert cfg["format_version"] == 1 and cfg["weights"] == path.name and cfg["config"] == f.config.to_dict()
    assert cfg["identity"]["spec"] == "tiny-clip:none" and cfg["info"] == {"seed": 3}
    g = load_fusion(path)
    assert g.identity == ident and g.config == f.config and g.info == {"seed": 3}
    for k in f.params:
        assert np.array_equal(f.params[k], g.params[k])
    x = _nz(np.random.default_rng(1).standard_normal((5, 32)))
    assert np.array_equal(f.document_vectors(x, [x[:2]] * 5), g.document_vectors(x, [x[:2]] * 5))
    assert save_fusion(f, tmp_path) == path  # content-addressed: same fusion, same name
    (tmp_path / "fusion.deadbeef00.safetensors").write_bytes(b"not a fusion")
    with pytest.raises(RetrievalError):
        load_fusion(tmp_path / "fusion.deadbeef00.safetensors")
    with pytest.raises(RetrievalError, match="missing"):
        load_fusion(tmp_path / "fusion.0123456789.safetensors")
    # a config that does not describe these weights is refused
    cfg["config"]["rank"] = 4
    path.with_suffix(".json").write_text(json.dumps(cfg))
    with pytest.raises(RetrievalError, match="does not describe"):
        load_fusion(path)


def test_training_improves_heldout_recall_and_is_deterministic():
    img, txt, ci = distorted(90, CAPS, 64)
    data = PairData([str(i) for i in range(90)], img, txt, ci)
    train, val = split_by_image(data, 0.3, seed=0)
    assert not set(train.image_keys) & set(val.image_keys)  # split by image
    before = evaluate_fusion(None, val)
    cfg = TrainConfig(epochs=12, seed=0)
    f, hist = train_fusion(train, val, cfg, progress=False)
    after = evaluate_fusion(f, val)
    # adapters alone (image-only documents) and the served mixed index both gain clearly
    assert after["t2i_image"]["R@1"] >= before["t2i_image"]["R@1"] + 0.15, (before, after)
    assert after["score"] >= before["score"] + 0.25, (before, after)
    assert after["i2t"]["R@1"] > before["i2t"]["R@1"]
    f2, _ = train_fusion(train, val, TrainConfig(epochs=3, seed=0), progress=False)
    f3, _ = train_fusion(train, val, TrainConfig(epochs=3, seed=0), progress=False)
    assert all(np.array_equal(f2.params[k], f3.params[k]) for k in f2.params)


# -- inside an index ----------------------------------------------------------------------------


def distorted_index(index, root) -> None:
    """Index root/photos (N_IMAGES photos, written once) with CAPS captions each into `index` (a directory or
    a PostgreSQL URL), then replace its stored raw embeddings by the distorted synthetic ones and rebuild the
    vectors from them."""
    photos = sorted((root / "photos").glob("*.jpg")) or write_photos(root / "photos", N_IMAGES)
    caps = root / "caps.jsonl"
    with open(caps, "w") as fh:
        for i, p in enumerate(photos):
            for j in range(CAPS):
                fh.write(json.dumps({"image": str(p), "caption": f"picture {i} caption {j}"}) + "\n")
    build_index(index, [root / "photos"], captions_file=str(caps))
    with Index.open_for_write(index, create=False) as idx:
        img, txt, ci = distorted(N_IMAGES, CAPS, idx.dim)
        rows = idx.store.image_ids_with_hash()
        path_of = idx.store.images_by_ids([i for i, _ in rows])
        order = {str(p): n for n, p in enumerate(photos)}
        caps_of = idx.store.captions_for_images([i for i, _ in rows])
        from retrieval.store.rows import text_hash

        with idx.store.transaction():
            for image_id, h in rows:
                n = order[path_of[image_id].path]
                idx.store.put_embeddings("image", [h], img[n : n + 1])
                for _cid, text in caps_of[image_id]:
                    j = int(text.rsplit(" ", 1)[1])
                    idx.store.put_embeddings("text", [text_hash(text)], txt[n * CAPS + j : n * CAPS + j + 1])
        idx.sync_vectors(force_rebuild=True)
        assert idx.verify() == []


@pytest.fixture(scope="module")
def base_index(tmp_path_factory):
    """A tiny-model index of N_IMAGES photos with CAPS captions each, on distorted synthetic embeddings."""
    root = tmp_path_factory.mktemp("fusion")
    distorted_index(root / "idx", root)
    return root


@pytest.fixture
def index_dir(base_index, tmp_path):
    dst = tmp_path / "idx"
    shutil.copytree(base_index / "idx", dst)
    return dst


def _searches(d):
    """Text->image, text->captions, image->image and composite results: (id, score) lists."""
    with Searcher.open(d, device="cpu") as s:
        first = next(iter(s.index.store.iter_images())).path
        out = [
            [(r.id, r.score) for r in s.search(k=10, dedupe=False, **q)]
            for q in (
                {"text": "picture 3"},
                {"text": "a red circle", "to": "captions"},
                {"image": first},
                {"text": "sunset", "image": first, "weight": 0.4},
            )
        ]
    return out


def _assert_same(a, b, tol=1e-5):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert [i for i, _ in ra] == [i for i, _ in rb]
        assert np.allclose([s for _, s in ra], [s for _, s in rb], atol=tol)


def test_untrained_fusion_changes_no_search_result(index_dir):
    before = _searches(index_dir)
    with Index.open_for_write(index_dir, create=False) as idx:
        gen = idx.generation
        meta = install_fusion(idx, Fusion.untrained(idx.dim, idx.identity))
        assert idx.generation == gen + 1 and idx.store.get_manifest("fusion")["file"] == meta["file"]
    with Index.open(index_dir) as idx:
        assert idx.fusion() is not None and idx.info().fusion == meta["version"]
    _assert_same(before, _searches(index_dir))


def test_a_query_racing_a_fusion_install_sees_one_generation(index_dir):
    """A fusion installed while a query is between reading the vectors and embedding the query must not
    mix the two: that query is answered wholly by the old generation (old vectors, old query fusion), the
    next one wholly by the new."""
    with Index.open_for_write(index_dir, create=False) as idx:
        install_fusion(idx, perturbed(Fusion.untrained(idx.dim, idx.identity), seed=1))
    with Searcher.open(index_dir, device="cpu") as s:
        old = [(r.id, r.score) for r in s.search("picture 3", k=8, dedupe=False)]
        real = s._text_vector
        calls = []

        def install_then_encode(text):
            if not calls:
                with Index.open_for_write(index_dir, create=False) as w:
                    install_fusion(w, perturbed(Fusion.untrained(w.dim, w.identity), seed=7, scale=0.8, gate=0.8))
            calls.append(text)
            return real(text)

        s._text_vector = install_then_encode
        raced = [(r.id, r.score) for r in s.search("picture 3", k=8, dedupe=False)]
        after = [(r.id, r.score) for r in s.search("picture 3", k=8, dedupe=False)]
    with Searcher.open(index_dir, device="cpu") as fresh:
        new = [(r.id, r.score) for r in fresh.search("picture 3", k=8, dedupe=False)]
    _assert_same([raced], [old])
    _assert_same([after], [new])
    assert [sc for _, sc in old] != pytest.approx([sc for _, sc in new], abs=1e-4)  # the fusions do differ


def test_mismatched_fusion_is_refused(index_dir):
    other = ModelIdentity("ViT-B-32:none", "ViT-B-32", "none", None, 64)
    with Index.open_for_write(index_dir, create=False) as idx:
        foreign = Fusion.untrained(idx.dim, other)
        with pytest.raises(ModelMismatchError):
            install_fusion(idx, foreign)
        assert fusion_files(index_dir) == []
        # a foreign file named in the manifest (copied in by hand, say) is refused when the index loads it
        path = save_fusion(foreign, index_dir)
        with idx.store.transaction():
            idx.store.set_manifest("fusion", {"file": path.name, "version": "x"})
    with Index.open(index_dir) as idx:
        with pytest.raises(ModelMismatchError):
            idx.fusion()
    with Searcher.open(index_dir, device="cpu") as s, pytest.raises(ModelMismatchError):
        s.search("picture 1")


@pytest.mark.parametrize("fail", ["vector_save", "os_replace"])
def test_interrupted_rebuild_keeps_old_vectors_and_fusion(index_dir, monkeypatch, fail):
    from retrieval.store import vectors

    with Index.open_for_write(index_dir, create=False) as idx:
        old_meta = install_fusion(idx, perturbed(Fusion.untrained(idx.dim, idx.identity)))
        gen = idx.generation
    before = _searches(index_dir)
    files_before = sorted(p.name for p in index_dir.iterdir())

    calls = {"n": 0}
    if fail == "vector_save":  # images.g<N+1> written, then the captions file fails
        real = vectors.VectorIndex.save

        def save(self, path):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full (simulated)")
            return real(self, path)

        monkeypatch.setattr(vectors.VectorIndex, "save", save)
    else:  # 1st replace: the fusion file; 2nd: images.g<N+1>; the 3rd (captions) fails
        real_replace = os.replace

        def replace(a, b):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError("simulated crash in rename")
            return real_replace(a, b)

        monkeypatch.setattr(os, "replace", replace)

    with Index.open_for_write(index_dir, create=False) as idx:
        new = perturbed(Fusion.untrained(idx.dim, idx.identity), seed=7, gate=0.6)
        with pytest.raises(OSError, match="simulated"):
            install_fusion(idx, new)
    monkeypatch.undo()

    with Index.open_for_write(index_dir, create=False) as idx:
        assert idx.generation == gen
        assert idx.store.get_manifest("fusion") == old_meta
        assert idx.verify() == []
        assert [p.name for p in fusion_files(index_dir)] == [old_meta["file"]]
    _assert_same(before, _searches(index_dir), tol=0)
    leftover = set(p.name for p in index_dir.iterdir()) - set(files_before)
    assert not any(FILE_RE.match(n) for n in leftover)


def _snapshot(d):
    with Index.open(d) as idx:
        manifest = idx.store.manifest()
    files = {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir() if not p.name.startswith("meta.sqlite")
    }
    return manifest, files


def test_cli_dry_run_writes_nothing(index_dir):
    before = _snapshot(index_dir)
    r = CliRunner().invoke(main, ["train-fusion", "--index", str(index_dir), "--dry-run", "--epochs", EPOCHS, "-q"])
    assert r.exit_code == 0, r.output
    assert "dry run" in r.output and "nothing written" in r.output
    assert "gain +" in r.output  # the distortion is learnable: the dry run reports a real gain
    assert _snapshot(index_dir) == before


def test_cli_installs_and_later_images_get_the_fusion(index_dir, tmp_path):
    r = CliRunner().invoke(main, ["train-fusion", "--index", str(index_dir), "--epochs", EPOCHS, "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["installed"] and rep["gain"] > 0.1 and rep["after"]["score"] > rep["before"]["score"]
    with Index.open_for_write(index_dir, create=False) as idx:
        meta = idx.store.get_manifest("fusion")
        assert meta["file"] == rep["fusion"]["file"] and idx.verify() == []
        fusion = idx.fusion()
        assert fusion.fuses_documents  # the gate learned to open
        known = {i for i, _ in idx.store.image_ids_with_hash()}

    # photos indexed later (some with sidecar captions) are stored under the fusion in force
    new = write_photos(tmp_path / "later", 6, start=500)
    for p in new[:3]:
        (p.parent / (p.name + ".txt")).write_text(f"late photo {p.stem}\nanother line for {p.stem}\n")
    build_index(index_dir, [tmp_path / "later"])
    with Index.open(index_dir) as idx:
        rows = [(i, h) for i, h in idx.store.image_ids_with_hash() if i not in known]
        assert len(rows) == 6
        raw = idx.store.get_embeddings("image", [h for _, h in rows], idx.dim)
        caps = idx.store.captions_for_images([i for i, _ in rows])
        from retrieval.store.rows import text_hash

        cap_vecs = [
            idx.store.get_embeddings("text", [text_hash(t) for _, t in caps[i]], idx.dim) if i in caps else None
            for i, _ in rows
        ]
        assert sum(c is not None for c in cap_vecs) == 3
        expect = idx.fusion().document_vectors(raw, cap_vecs)
        vi = idx.vectors("images")
        slot = {int(i): s for s, i in enumerate(vi._slot_ids)}
        stored = np.array(vi._stored_vectors())[[slot[i] for i, _ in rows]]
        assert np.allclose(stored, expect, atol=1e-5)
        assert not np.allclose(stored, raw, atol=1e-3)  # the fusion really changed them


def test_worse_fusion_is_not_installed(index_dir, monkeypatch):
    from retrieval.fusion import install as fusion_install
    from retrieval.fusion import train as fusion_train

    # the current fusion: trained, so it is good on validation
    r = CliRunner().invoke(main, ["train-fusion", "--index", str(index_dir), "--epochs", EPOCHS, "-q"])
    assert r.exit_code == 0 and "installed" in r.output, r.output
    before = _snapshot(index_dir)

    def bad_training(train, val, cfg=None, identity=None, progress=True, init=None):
        f = perturbed(Fusion.untrained(train.dim, identity), seed=5, scale=3.0, gate=0.0)
        return f, fusion_train.TrainHistory(epochs_run=1, best_epoch=1)

    monkeypatch.setattr(fusion_install, "train_fusion", bad_training)
    rep = train_fusion_for_index(index_dir, epochs=1, progress=False)
    assert not rep.installed and rep.gain < 0 and rep.decision.startswith("kept the current fusion")
    assert _snapshot(index_dir) == before


def test_too_few_pairs_is_one_line_error(index_dir):
    with Index.open_for_write(index_dir, create=False) as idx, idx.store.transaction():
        idx.store.db.execute("DELETE FROM captions WHERE id > 6")
    r = CliRunner().invoke(main, ["train-fusion", "--index", str(index_dir), "-q"])
    assert r.exit_code == 2
    assert r.output.startswith("error: too few caption pairs") and r.output.count("\n") == 1


def test_train_fusion_on_a_postgresql_collection(base_index, pg_url, tmp_path, monkeypatch):
    """train-fusion on a collection trains on its rows, stores the weights in the database, and serves the same
    fused results as the embedded index trained the same way; a machine with an empty cache fetches them."""
    monkeypatch.setenv("RETRIEVAL_CACHE_DIR", str(tmp_path / "cache"))
    distorted_index(pg_url, base_index)
    local = tmp_path / "idx"
    shutil.copytree(base_index / "idx", local)
    reports = []
    for index in (str(local), pg_url):
        r = CliRunner().invoke(main, ["train-fusion", "--index", index, "--epochs", EPOCHS, "--json"])
        assert r.exit_code == 0, r.output
        reports.append(json.loads(r.output))
    assert reports[1]["installed"] and reports[1]["gain"] > 0.1
    assert reports[1]["fusion"]["file"] == reports[0]["fusion"]["file"]  # the same training, the same weights
    with Index.open(pg_url) as idx:
        assert idx.verify() == [] and idx.store.get_file(reports[1]["fusion"]["file"]) is not None
    shutil.rmtree(tmp_path / "cache")  # another machine: nothing cached
    _assert_same(_searches(local), _searches(pg_url))
    assert (tmp_path / "cache").is_dir()  # the weights came from the database
