"""Write path: folders and corpora into SQLite + FAISS, incremental, with bad input recorded."""

import os
import shutil

import pytest
from conftest import TINY, build_index, draw_scene, write_photos
from PIL import Image

from retrieval.errors import ModelMismatchError, RetrievalError
from retrieval.query.searcher import Searcher
from retrieval.store.index import Index


def _state(index_dir):
    with Index.open(index_dir) as idx:
        rows = {r.path: r for r in idx.store.iter_images()}
        assert idx.verify() == []
        return rows, idx.info()


def test_index_folder_and_self_search(tmp_path):
    photos = write_photos(tmp_path / "photos", 12)
    r = build_index(tmp_path / "idx", [tmp_path / "photos"])
    assert r.encoded == 12 and r.errors == [] and r.images_total == 12
    rows, info = _state(tmp_path / "idx")
    assert info.images == 12 and info.model == TINY and info.dim == 64 and info.index_type == "flat"
    assert all(row.width == 96 and row.height == 72 for row in rows.values())
    with Searcher.open(tmp_path / "idx", device="cpu") as s:
        for p in photos[:4]:
            res = s.search(image=str(p), k=3)
            assert res[0].path == str(p) and res[0].score == pytest.approx(1.0, abs=1e-4)


def test_rerun_is_incremental(tmp_path):
    folder = tmp_path / "photos"
    photos = write_photos(folder, 10)
    build_index(tmp_path / "idx", [folder])
    again = build_index(tmp_path / "idx", [folder])
    assert (again.encoded, again.unchanged, again.removed) == (0, 10, 0)
    gen = _state(tmp_path / "idx")[1].generation

    # new, changed, deleted, moved, duplicated, touched-but-same
    write_photos(folder, 2, start=100)
    draw_scene(999).save(photos[0], quality=95)
    os.remove(photos[1])
    os.makedirs(folder / "sub")
    shutil.move(photos[2], folder / "sub" / "renamed.jpg")
    shutil.copy(photos[3], folder / "copy_of_3.jpg")
    os.utime(photos[4], ns=(1, 1))
    r = build_index(tmp_path / "idx", [folder])
    assert r.encoded == 3  # 2 new + 1 changed
    assert r.updated == 1 and r.removed == 1 and r.moved == 1 and r.reused == 1
    rows, info = _state(tmp_path / "idx")
    assert info.images == 12 and info.generation == gen + 1
    assert str(photos[1]) not in rows and str(folder / "sub" / "renamed.jpg") in rows
    assert rows[str(folder / "copy_of_3.jpg")].hash == rows[str(photos[3])].hash


def test_unchanged_rerun_writes_no_generation(tmp_path):
    write_photos(tmp_path / "p", 5)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    g = _state(tmp_path / "idx")[1].generation
    build_index(tmp_path / "idx", [tmp_path / "p"])
    assert _state(tmp_path / "idx")[1].generation == g


def test_model_is_loaded_only_when_something_needs_encoding(tmp_path, monkeypatch):
    """A re-run that finds nothing new (moves and deletions included) never loads the model; a new photo or
    a new caption does, and the index's model identity is still checked then."""
    from retrieval.models import runtime

    folder = tmp_path / "p"
    photos = write_photos(folder, 4)
    build_index(tmp_path / "idx", [folder])
    real = runtime.index_encoder
    loads = []
    monkeypatch.setattr(runtime, "index_encoder", lambda *a, **k: loads.append(a) or real(*a, **k))
    build_index(tmp_path / "idx", [folder], model=None)
    os.rename(photos[0], folder / "renamed.jpg")
    os.remove(photos[1])
    r = build_index(tmp_path / "idx", [folder], model=None)
    assert loads == [] and r.moved == 1 and r.removed == 1
    (folder / "img_0002.jpg.txt").write_text("a caption added later\n")
    r = build_index(tmp_path / "idx", [folder], model=None)
    assert len(loads) == 1 and r.captions_added == 1
    write_photos(folder, 1, start=50)
    r = build_index(tmp_path / "idx", [folder], model=None)
    assert len(loads) == 2 and r.encoded == 1
    _state(tmp_path / "idx")


def test_bad_files_are_recorded_and_nothing_is_lost(tmp_path):
    folder = tmp_path / "p"
    write_photos(folder, 4)
    build_index(tmp_path / "idx", [folder])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "random.png").write_bytes(os.urandom(2000))
    good = folder / "img_0000.jpg"
    (folder / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    (folder / "dir.jpg").mkdir()
    Image.new("RGB", (5000, 10)).save(folder / "sliver.png")
    r = build_index(tmp_path / "idx", [folder])
    reasons = dict(r.errors)
    assert set(map(os.path.basename, reasons)) >= {"empty.jpg", "random.png", "truncated.jpg", "sliver.png"}
    assert "empty" in reasons[str(folder / "empty.jpg")]
    assert "aspect ratio" in reasons[str(folder / "sliver.png")]
    rows, info = _state(tmp_path / "idx")
    assert info.images == 4 and info.errors >= 3
    # fixing a file clears its error on the next run
    draw_scene(7).save(folder / "empty.jpg")
    build_index(tmp_path / "idx", [folder])
    with Index.open(tmp_path / "idx") as idx:
        assert str(folder / "empty.jpg") not in dict(idx.store.errors())


def test_model_is_recorded_and_mismatch_refused(tmp_path):
    write_photos(tmp_path / "p", 3)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    write_photos(tmp_path / "p", 1, start=50)
    r = build_index(tmp_path / "idx", [tmp_path / "p"], model=None)  # manifest's model is used
    assert r.encoded == 1
    with pytest.raises(ModelMismatchError, match="--rebuild"):
        build_index(tmp_path / "idx", [tmp_path / "p"], model="ViT-B-32:none")
    assert _state(tmp_path / "idx")[1].images == 4


def test_rebuild_with_other_model(tmp_path, monkeypatch):

    write_photos(tmp_path / "p", 3)
    build_index(tmp_path / "idx", [tmp_path / "p"])
    # a second tiny architecture with a different width stands in for "another model"
    r = build_index(tmp_path / "idx", [tmp_path / "p"], model="tiny-clip-b:none", rebuild=True)
    assert r.encoded == 3
    info = _state(tmp_path / "idx")[1]
    assert info.model == "tiny-clip-b:none" and info.dim == 32


def test_caption_corpus_and_sidecars(tmp_path):
    folder = tmp_path / "p"
    write_photos(folder, 3)
    (folder / "img_0000.jpg.txt").write_text("a sidecar caption\nanother line\n")
    corpus = tmp_path / "caps.csv"
    corpus.write_text(
        'image,caption\np/img_0001.jpg,"red, with ""quotes"""\np/img_0001.jpg,second caption\np/img_0002.jpg,third\n'
    )
    build_index(tmp_path / "idx", [folder], captions_file=str(corpus))
    with Index.open(tmp_path / "idx") as idx:
        rows = {r.path: r.id for r in idx.store.iter_images()}
        caps = idx.store.captions_for_images(list(rows.values()))
        texts = {os.path.basename(p): sorted(t for _, t in caps.get(i, [])) for p, i in rows.items()}
        assert texts["img_0000.jpg"] == ["a sidecar caption", "another line"]
        assert texts["img_0001.jpg"] == ['red, with "quotes"', "second caption"]
        assert idx.info().caption_vectors == 5
        assert idx.verify() == []
    # re-running adds nothing twice
    r = build_index(tmp_path / "idx", [folder], captions_file=str(corpus))
    assert r.captions_added == 0


def test_crash_while_encoding_captions_leaves_no_caption_without_vector(tmp_path, monkeypatch):
    """Captions and their text vectors commit together: a run that dies while encoding the texts leaves
    the index as it was (verify clean), and the next run attaches them."""
    from retrieval.models import onnx_runtime

    folder = tmp_path / "p"
    write_photos(folder, 3)
    build_index(tmp_path / "idx", [folder])
    (folder / "img_0001.jpg.txt").write_text("late caption one\nlate caption two\n")

    def boom(self, texts, batch_size=256):
        raise KeyboardInterrupt  # what a SIGINT in the middle of text encoding looks like

    real = onnx_runtime.OnnxEncoder.encode_texts  # CPU indexing runs the model's ONNX export
    monkeypatch.setattr(onnx_runtime.OnnxEncoder, "encode_texts", boom)
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path / "idx", [folder])
    with Index.open(tmp_path / "idx") as idx:
        assert idx.store.count("captions") == 0
        assert idx.verify() == []
    monkeypatch.setattr(onnx_runtime.OnnxEncoder, "encode_texts", real)
    r = build_index(tmp_path / "idx", [folder])
    assert r.captions_added == 2
    with Index.open(tmp_path / "idx") as idx:
        assert idx.info().caption_vectors == 2 and idx.verify() == []


def test_ctrl_c_after_encoding_still_publishes_what_was_committed(tmp_path, monkeypatch):
    """Ctrl-C while captions are being encoded: the photos this run already committed are published to
    FAISS before the run stops, so they are searchable and verify is clean."""
    from retrieval.models import onnx_runtime

    folder = tmp_path / "p"
    write_photos(folder, 5)
    (folder / "img_0002.jpg.txt").write_text("a caption\n")

    real = onnx_runtime.OnnxEncoder.encode_texts  # CPU indexing runs the model's ONNX export

    def interrupted(self, texts, batch_size=256):
        if "a caption" in list(texts):  # the caption phase (not the export check)
            raise KeyboardInterrupt
        return real(self, texts, batch_size)

    monkeypatch.setattr(onnx_runtime.OnnxEncoder, "encode_texts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path / "idx", [folder])
    with Index.open(tmp_path / "idx") as idx:
        assert idx.info().vectors == 5 and idx.store.count("captions") == 0
        assert idx.verify() == []


def test_images_missing_from_a_caption_file_are_recorded_not_fatal(tmp_path):
    folder = tmp_path / "p"
    write_photos(folder, 2)
    corpus = tmp_path / "caps.csv"
    corpus.write_text("image,caption\np/img_0000.jpg,first\np/not_downloaded.jpg,gone\np/img_0001.jpg,second\n")
    r = build_index(tmp_path / "idx", [], captions_file=str(corpus))
    assert r.images_total == 2 and r.captions_added == 2
    assert [(os.path.basename(p), why) for p, why in r.errors] == [
        ("not_downloaded.jpg", "listed in caps.csv but not found")
    ]
    with Index.open(tmp_path / "idx") as idx:
        assert [os.path.basename(p) for p, _ in idx.store.errors()] == ["not_downloaded.jpg"]


def test_a_typo_in_path_leaves_a_new_index_free_to_choose_its_model(tmp_path):
    with pytest.raises(RetrievalError, match="no such file"):
        build_index(tmp_path / "idx", [tmp_path / "no_such_folder"])
    write_photos(tmp_path / "p", 2)
    r = build_index(tmp_path / "idx", [tmp_path / "p"], model="tiny-clip-b:none")
    assert r.images_total == 2
    with Index.open(tmp_path / "idx") as idx:
        assert idx.identity.arch == "tiny-clip-b"


def test_identical_new_files_in_one_batch_are_encoded_once(tmp_path):
    folder = tmp_path / "p"
    (src,) = write_photos(folder, 1)
    for i in range(3):
        shutil.copy(src, folder / f"copy_{i}.jpg")
    r = build_index(tmp_path / "idx", [folder])
    assert (r.encoded, r.reused, r.images_total) == (1, 3, 4)
    _state(tmp_path / "idx")


def test_missing_path_is_a_user_error(tmp_path):
    from retrieval.errors import RetrievalError

    with pytest.raises(RetrievalError, match="no such file"):
        build_index(tmp_path / "idx", [tmp_path / "nope"])


@pytest.mark.parametrize("kind", ["flat", "ivfflat", "ivfsq", "hnsw", "ivfpq"])
def test_index_type_override_recorded(tmp_path, kind):
    write_photos(tmp_path / "p", 6)
    build_index(tmp_path / "idx", [tmp_path / "p"], index_type=kind)
    with Index.open(tmp_path / "idx") as idx:
        cfg = idx.store.get_manifest("index_type")
        assert idx.store.get_manifest("index_type_requested") == kind
        assert cfg["kind"] in (kind, "flat")  # ivfpq on 6 vectors cannot train; the fallback is recorded
        assert "params" in cfg
