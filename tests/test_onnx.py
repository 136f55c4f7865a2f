"""ONNX Runtime as the CPU runtime (retrieval/models/onnx_export.py, onnx_runtime.py, runtime.py): exports match
torch, every query path runs without importing torch, CPU indexing runs on onnxruntime, damaged exports and
models that cannot be exported are reported in one line, and indexes of the older layout keep working."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, build_index, write_photos

from retrieval.models.onnx_runtime import (
    ENV_CACHE,
    META_NAME,
    cache_root,
    export_dir,
    export_key,
    open_export,
)

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}
    return env


def _py(code: str, *argv, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)],
        capture_output=True,
        text=True,
        env=_env(**env),
        cwd=ROOT,
        timeout=300,
    )


def _cli(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        cwd=ROOT,
        timeout=300,
    )


@pytest.fixture(scope="session")
def tiny_export(tiny_encoder):
    from retrieval.models.onnx_export import ensure_export

    return ensure_export(tiny_encoder)


@pytest.fixture(scope="module")
def onnx_index(tmp_path_factory, tiny_export):
    root = tmp_path_factory.mktemp("onnx")
    write_photos(root / "photos", 10)
    (root / "photos" / "img_0000.jpg.txt").write_text("a red circle\na blue square\n")
    build_index(root / "idx", [root / "photos"])
    return root


def test_export_matches_torch_with_dynamic_batch_and_length(tiny_encoder, tiny_export):
    import torch

    meta = json.loads((tiny_export / META_NAME).read_text())
    assert meta["key"] == export_key(tiny_encoder.identity) and tiny_export == export_dir(meta["key"])
    assert meta["text"]["dynamic_length"] and all(v <= meta["tolerance"] <= 1e-5 for v in meta["checks"].values())
    enc = open_export(tiny_export)
    texts = ["a dog", "an old photograph of a lighthouse at dusk, very long " * 3, "", "x y z"]
    ref = tiny_encoder.encode_texts(texts)
    np.testing.assert_allclose(enc.encode_texts(texts), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(enc.encode_texts(texts[1:2]), ref[1:2], atol=1e-5, rtol=0)
    pixels = np.random.default_rng(3).standard_normal((5, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(
        enc.encode_image_tensors(pixels), tiny_encoder.encode_image_tensors(torch.from_numpy(pixels)), atol=1e-5, rtol=0
    )


def _prepacked(session) -> bool:
    try:
        return session.get_session_options().get_session_config_entry("session.disable_prepacking") != "1"
    except RuntimeError:  # the entry is not set: onnxruntime's default, prepacking on
        return True


def test_query_sessions_open_unpacked_then_swap_to_prepacked_on_second_use(tiny_encoder, tiny_export):
    """A one-shot query skips weight prepacking (faster to open); a second use of a tower, as in serve, gets a
    prepacked session; indexing prepacks from the start. All give the same vectors as torch."""
    import torch

    texts = ["a dog on a beach", "x"]
    ref = tiny_encoder.encode_texts(texts)
    pixels = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ref_img = tiny_encoder.encode_image_tensors(torch.from_numpy(pixels))
    enc = open_export(tiny_export, purpose="query")
    enc.check()  # opening to check is not a use
    first = enc.encode_texts(texts)
    assert not _prepacked(enc._sessions["text"][0])
    second = enc.encode_texts(texts)
    assert _prepacked(enc._sessions["text"][0])
    img = enc.encode_image_tensors(pixels)
    assert not _prepacked(enc._sessions["image"][0])
    np.testing.assert_allclose(enc.encode_image_tensors(pixels), ref_img, atol=1e-5, rtol=0)
    assert _prepacked(enc._sessions["image"][0])
    for got in (first, second):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(img, ref_img, atol=1e-5, rtol=0)
    idx = open_export(tiny_export, purpose="index")
    idx.encode_texts(texts)
    assert _prepacked(idx._sessions["text"][0])


def test_preprocessing_equals_open_clips(tiny_encoder, tiny_export):
    from PIL import Image

    enc = open_export(tiny_export)
    rng = np.random.default_rng(0)
    worst = 0.0
    for w, h in ((97, 41), (32, 32), (33, 900), (640, 480), (31, 32)):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for img in (im, im.convert("L"), im.convert("RGBA")):
            worst = max(worst, float(np.abs(tiny_encoder.preprocess(img).numpy() - enc.preprocess(img)).max()))
    assert worst == 0.0  # the same PIL resize and crop, then the same float32 arithmetic


def test_starter_export_matches_torch(tmp_path):
    """The starter's EfficientNet + ConSE (numpy) and MiniLM through onnxruntime give the torch vectors."""
    import torch

    from retrieval.models.onnx_export import ensure_export
    from retrieval.models.registry import load_encoder

    starter = load_encoder("starter", device="cpu")
    enc = open_export(ensure_export(starter))
    texts = ["a cat on a sofa", "a red bicycle", "mountains " * 40]
    np.testing.assert_allclose(enc.encode_texts(texts), starter.encode_texts(texts), atol=1e-5, rtol=0)
    from benchmarks.samples import write_sample_photos

    photos = write_sample_photos(tmp_path / "p")[:3]
    np.testing.assert_allclose(enc.encode_images(photos), starter.encode_images(photos), atol=1e-5, rtol=0)
    assert torch  # imported here only to build the reference


QUERY = """
import sys, json
from retrieval.query.searcher import Searcher
s = Searcher.open(sys.argv[1])
out = {
    "text": [r.id for r in s.search("a red circle", k=3)],
    "image": [r.id for r in s.search(image=sys.argv[2], k=3)],
    "composite": [r.id for r in s.search("a red circle", image=sys.argv[2], k=3)],
    "captions": [r.id for r in s.search("a blue square", to="captions", k=2)],
    "runtime": s.encoder.runtime,
}
from fastapi.testclient import TestClient
from retrieval.server.app import create_app
c = TestClient(create_app(sys.argv[1], for_tests=True))
out["serve"] = c.get("/api/search", params={"q": "a red circle", "k": 3}).status_code
with open(sys.argv[2], "rb") as f:
    out["serve_image"] = c.post("/api/search", files={"image": ("q.jpg", f, "image/jpeg")}, data={"k": "3"}).status_code
out["torch"] = [m for m in ("torch", "open_clip", "torchvision") if m in sys.modules]
print(json.dumps(out))
"""


def test_every_query_path_runs_without_torch(onnx_index, tiny_encoder):
    idx, photo = onnx_index / "idx", onnx_index / "photos" / "img_0003.jpg"
    p = _py(QUERY, idx, photo)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["torch"] == [] and out["runtime"] == "onnx", out
    assert out["serve"] == 200 and out["serve_image"] == 200, out
    assert out["image"][0] == 4 and len(out["captions"]) == 2  # the photo itself first (ids start at 1)
    for args in (
        ["a red circle"],
        ["--image", str(photo)],
        ["a red circle", "--image", str(photo)],
        ["a blue square", "--to", "captions"],
    ):
        r = _cli("search", *args, "--index", str(idx), "--json", "-k", "3", PYTHONPROFILEIMPORTTIME="1")
        assert r.returncode == 0, r.stderr[-2000:]
        heavy = [
            ln
            for ln in r.stderr.splitlines()
            if ln.startswith("import time:") and ln.split("|")[-1].strip().split(".")[0] in ("torch", "open_clip")
        ]
        assert heavy == [], heavy[:3]
    # the same top results as the torch encoder, scores within 1e-5
    from retrieval.query.searcher import Searcher

    with Searcher.open(idx) as s:
        got = s.search("a red circle", k=5)
        s.query_encoder.loaded = s.query_encoder.torch_encoder()
        ref = s.search("a red circle", k=5)
    assert [r.id for r in got] == [r.id for r in ref]
    assert max(abs(a.score - b.score) for a, b in zip(got, ref)) <= 1e-5


def test_a_cli_text_query_does_not_import_pil(onnx_index):
    """A text query has no image to decode: PIL (~30 ms of a cold query) stays unimported; nor, on a directory
    index, does the PostgreSQL URL parser."""
    r = _cli(
        "search", "a red circle", "--index", str(onnx_index / "idx"), "--json", "-k", "3", PYTHONPROFILEIMPORTTIME="1"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    mods = [ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")]
    assert "onnxruntime" in mods and "PIL" not in mods, [m for m in mods if m.startswith("PIL")][:3]
    assert not [m for m in mods if m.startswith("retrieval.store.pg")], [m for m in mods if ".pg" in m]


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_indexing_with_a_cached_export_runs_without_torch(tmp_path, tiny_export, device):
    """--device auto asks torch for a GPU only where one may be (gpu_may_exist: a GPU device node on Linux);
    on a machine without one, a default index run never imports torch."""
    from retrieval.models.runtime import gpu_may_exist

    if device == "auto" and gpu_may_exist():  # a GPU machine: auto must ask torch, and may pick the GPU
        return
    write_photos(tmp_path / "photos", 5)
    code = (
        "import sys\n"
        "from index_data.pipeline import IndexOptions, run_index\n"
        f"r = run_index(sys.argv[1], IndexOptions(paths=[sys.argv[2]], model='{TINY}', workers=1, "
        f"progress=False, device='{device}'))\n"
        "print(r.encoded, [m for m in ('torch', 'open_clip') if m in sys.modules])\n"
    )
    p = _py(code, tmp_path / "idx", tmp_path / "photos")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[0] == "5" and p.stdout.strip().endswith("[]"), p.stdout
    db = sqlite3.connect(tmp_path / "idx" / "meta.sqlite")
    (value,) = db.execute("SELECT value FROM manifest WHERE key = 'onnx_export'").fetchone()
    assert json.loads(value)["key"] == tiny_export.name


def test_a_cpu_torch_run_starts_decoding_before_torch_loads(tmp_path, tiny_export):
    """--runtime torch / --precision bf16 on the CPU with the model's export cached: the index is created from the
    export's identity and the decode workers start (fork) before torch is imported; the model loads while they
    decode, and the run stores what the onnxruntime run stores. Without the export, the model loads first."""
    from index_data.model_setup import deferred_new_model
    from index_data.options import IndexOptions

    lazy, key = deferred_new_model(IndexOptions(runtime="torch", device="cpu"), TINY)
    assert not lazy.loaded and key == tiny_export.name and lazy.identity.spec == TINY
    assert type(lazy.preprocess).__name__ == "ImageTransform" and lazy.runtime == "torch"
    assert deferred_new_model(IndexOptions(runtime="onnx", device="cpu"), TINY) is None  # onnx opens at once
    assert deferred_new_model(IndexOptions(runtime="torch", device="cpu", executor="ray"), TINY) is None

    write_photos(tmp_path / "photos", 6)
    code = (
        "import sys\n"
        "events = []\n"
        "def hook(event, args):\n"
        "    if event == 'os.fork' and 'fork' not in events: events.append('fork')\n"
        "    if event == 'import' and args[0] == 'torch' and 'torch' not in events: events.append('torch')\n"
        "sys.addaudithook(hook)\n"
        "from index_data.pipeline import IndexOptions, run_index\n"
        f"r = run_index(sys.argv[1], IndexOptions(paths=[sys.argv[2]], model='{TINY}', workers=1, "
        f"progress=False, device='cpu', runtime='torch', batch_size=4))\n"
        "print(r.encoded, ' '.join(events))\n"
    )
    runs = {}
    for name, cache in (("cached", None), ("empty", tmp_path / "empty-cache")):
        env = {ENV_CACHE: str(cache)} if cache else {}
        p = _py(code, tmp_path / name, tmp_path / "photos", **env)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = p.stdout.split()
    assert runs["cached"] == ["6", "fork", "torch"]  # workers first, then torch
    assert runs["empty"] == ["6", "torch", "fork"]  # nothing to read the preprocessing from: torch first
    # an existing index that gets new photos: the same order, from the export recorded for its identity
    write_photos(tmp_path / "photos", 2, start=6)
    p = _py(code, tmp_path / "cached", tmp_path / "photos")
    assert p.returncode == 0 and p.stdout.split() == ["2", "fork", "torch"], p.stdout + p.stderr[-3000:]
    build_index(tmp_path / "empty", [tmp_path / "photos"], runtime="torch")  # all three indexes: the same 8 photos
    build_index(tmp_path / "onnx", [tmp_path / "photos"], runtime="onnx")
    vecs = {}
    for name in ("cached", "empty", "onnx"):
        db = sqlite3.connect(tmp_path / name / "meta.sqlite")
        rows = db.execute("SELECT key, vector FROM embeddings WHERE kind = 'image' ORDER BY key").fetchall()
        vecs[name] = np.stack([np.frombuffer(v, dtype=np.float32) for _, v in rows])
        (value,) = db.execute("SELECT value FROM manifest WHERE key = 'onnx_export'").fetchone()
        assert json.loads(value)["key"] == tiny_export.name
    np.testing.assert_array_equal(vecs["cached"], vecs["empty"])  # the same pixels reach the same torch model
    np.testing.assert_allclose(vecs["cached"], vecs["onnx"], atol=1e-5, rtol=0)


def _stored_vectors(tmp_path, option: str, values) -> dict:
    """Six photos (one with a caption) indexed once per value of an IndexOptions field: {value: image
    vectors, value + "-text": caption vectors}."""
    from retrieval.store.index import Index

    write_photos(tmp_path / "photos", 6)
    (tmp_path / "photos" / "img_0001.jpg.txt").write_text("a caption\n")
    vecs = {}
    for v in values:
        build_index(tmp_path / v, [tmp_path / "photos"], **{option: v})
        with Index.open(tmp_path / v) as idx:
            rows = idx.store.image_ids_with_hash()
            vecs[v] = idx.store.get_embeddings("image", [h for _, h in rows], idx.dim)
            caps = idx.store.caption_ids_with_hash()
            vecs[v + "-text"] = idx.store.get_embeddings("text", [h for _, h in caps], idx.dim)
    return vecs


def test_onnx_and_torch_runtimes_store_the_same_vectors(tmp_path, tiny_export):
    vecs = _stored_vectors(tmp_path, "runtime", ("onnx", "torch"))
    np.testing.assert_allclose(vecs["onnx"], vecs["torch"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(vecs["onnx-text"], vecs["torch-text"], atol=1e-5, rtol=0)
    r = _cli(
        "index",
        str(tmp_path / "photos"),
        "--index",
        str(tmp_path / "x"),
        "--model",
        TINY,
        "--runtime",
        "onnx",
        "--device",
        "cuda",
    )
    assert r.returncode == 2 and "--runtime onnx runs on the CPU" in r.stderr


def test_bf16_on_the_cpu_indexes_on_torch_close_to_fp32_and_queries_stay_on_onnx(tmp_path, tiny_export):
    """--precision bf16 on the CPU: torch over a bfloat16 copy of the weights; the vectors are those of fp32 to
    bf16's precision, the export (made from the fp32 model) is the same one, and queries run on onnxruntime."""
    from retrieval.models.runtime import index_encoder
    from retrieval.query.searcher import Searcher

    vecs = _stored_vectors(tmp_path, "precision", ("auto", "bf16"))
    for kind in ("", "-text"):
        a, b = vecs["auto" + kind], vecs["bf16" + kind]
        cos = (a * b).sum(axis=1)
        assert cos.min() > 0.99, cos  # bf16 keeps ~3 significant digits
        assert np.abs(a - b).max() > 1e-6  # and it did run in bf16, not fp32
    enc, key = index_encoder(TINY, "cpu", "auto", precision="bf16")
    assert enc.runtime == "torch" and enc.precision == "bf16" and key == tiny_export.name
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in enc.model.parameters())  # fp32 kept
    with Searcher.open(tmp_path / "bf16") as s:
        assert s.encoder.runtime == "onnx" and len(s.search("a photo", k=3)) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runtime", "onnx", "--precision", "bf16"], "--runtime onnx runs fp32"),
        (["--model", "starter", "--precision", "bf16"], "applies to open_clip models"),
        (["--precision", "bf16", "--executor", "ray"], "--precision applies to the local executor"),
        (["--precision", "half"], "Invalid value for '--precision'"),
    ],
)
def test_precision_errors_are_one_line(tmp_path, args, message):
    write_photos(tmp_path / "photos", 2)
    model = [] if "--model" in args else ["--model", TINY]
    r = _cli("index", str(tmp_path / "photos"), "--index", str(tmp_path / "x"), *model, *args, "-q")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 4  # click: usage, hint, error


def _private_cache(tmp_path, tiny_export) -> Path:
    """A copy of the session's cache, so that damaging it does not touch the other tests' export."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_export, cache / "onnx" / tiny_export.name)
    return cache


def _search(index, monkeypatch, cache, **query):
    from retrieval.models import onnx_runtime
    from retrieval.query.searcher import Searcher

    monkeypatch.setenv(ENV_CACHE, str(cache))
    onnx_runtime._warned.clear()
    with Searcher.open(index) as s:
        return [r.id for r in s.search(k=2, **query)], s.query_encoder.loaded


def test_damaged_export_is_reported_once_and_queries_still_answer(
    onnx_index, tmp_path, tiny_export, monkeypatch, capsys
):
    cache = _private_cache(tmp_path, tiny_export)
    mine = cache / "onnx" / tiny_export.name
    image = mine / "image.onnx"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    idx, photo = onnx_index / "idx", onnx_index / "photos" / "img_0003.jpg"
    ids, enc = _search(idx, monkeypatch, cache, image=photo)
    assert ids[0] == 4 and enc.runtime == "torch"  # answered by torch
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "damaged" in ln]
    assert len(lines) == 1 and "image.onnx" in lines[0] and "running on torch" in lines[0], lines
    assert not mine.exists()  # set aside, so that the next index run makes it again
    build_index(idx, [onnx_index / "photos"])
    assert (mine / META_NAME).is_file()
    # the same size but garbage: onnxruntime cannot load it; reported once, and both queries still answer
    text = mine / "text.onnx"
    text.write_bytes(b"\0" * text.stat().st_size)
    ids, enc = _search(idx, monkeypatch, cache, text="a red circle")
    assert len(ids) == 2 and enc.runtime == "onnx"  # the export's image tower is fine; its text tower fell back
    err = [ln for ln in capsys.readouterr().err.splitlines() if "damaged" in ln]
    assert len(err) == 1 and "text.onnx" in err[0] and "running on torch" in err[0], err
    assert not mine.exists()


def test_killed_export_leaves_nothing_that_is_used(tmp_path, onnx_index):
    from retrieval.models.onnx_runtime import load_for_identity
    from retrieval.store.index import Index

    cache = tmp_path / "cache"
    r = _cli(
        "index",
        str(onnx_index / "photos"),
        "--index",
        str(tmp_path / "idx"),
        "--model",
        TINY,
        "-q",
        **{ENV_CACHE: str(cache), "RETRIEVAL_FAULT": "onnx_export:1"},
    )
    assert r.returncode == -9
    left = [p.name for p in (cache / "onnx").iterdir()]
    assert len(left) == 1 and left[0].startswith(".") and left[0].endswith(".tmp")  # only the temp directory
    with Index.open(onnx_index / "idx") as idx:
        ident = idx.identity
    os.environ[ENV_CACHE], old = str(cache), os.environ[ENV_CACHE]
    try:
        assert load_for_identity(ident, quiet=True) is None  # the temp directory is never read
    finally:
        os.environ[ENV_CACHE] = old


def test_unexportable_model_says_so_once_and_runs_on_torch(tmp_path, capsys):
    from retrieval.models import onnx_runtime, runtime
    from retrieval.models.registry import load_encoder

    enc = load_encoder("tiny-clip-b:none", device="cpu")
    enc.preprocess = lambda im: None  # a model whose preprocessing is no torchvision pipeline
    os.environ[ENV_CACHE], old = str(tmp_path / "cache"), os.environ[ENV_CACHE]
    try:
        onnx_runtime._warned.clear()
        assert runtime._export(enc) is None and runtime._export(enc) is None
    finally:
        os.environ[ENV_CACHE] = old
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot export tiny-clip-b:none to ONNX" in err[0] and "runs on torch" in err[0]
    assert not (tmp_path / "cache" / "onnx").exists() or not any((tmp_path / "cache" / "onnx").iterdir())


def test_index_of_the_older_layout_answers_and_is_migrated(tmp_path, tiny_export, monkeypatch):
    """An index written before exports moved to the cache: per-index text_encoder.* files (formats 1 and 2), no
    export recorded. Queries answer; the next index run records the export and removes those files."""
    write_photos(tmp_path / "photos", 4)
    idx = tmp_path / "idx"
    build_index(idx, [tmp_path / "photos"])
    db = sqlite3.connect(idx / "meta.sqlite")
    with db:
        db.execute("DELETE FROM manifest WHERE key = 'onnx_export'")
    db.close()
    for name, blob in (
        ("text_encoder.json", b'{"format": "retrieval-text-encoder", "version": 2}'),
        ("text_encoder.safetensors", b"\0" * 64),
        ("text_encoder.bpe.txt", b"a b\n"),
    ):
        (idx / name).write_bytes(blob)
    for cache, runtime in ((cache_root().parent, "onnx"), (tmp_path / "empty", "torch")):  # export in the cache, or not
        ids, enc = _search(idx, monkeypatch, cache, text="a photo")
        assert len(ids) == 2 and enc.runtime == runtime
    monkeypatch.setenv(ENV_CACHE, str(cache_root().parent))
    build_index(idx, [tmp_path / "photos"])
    assert not list(idx.glob("text_encoder.*"))
    db = sqlite3.connect(idx / "meta.sqlite")
    (value,) = db.execute("SELECT value FROM manifest WHERE key = 'onnx_export'").fetchone()
    assert json.loads(value)["key"] == tiny_export.name


def test_open_clip_text_tower_is_exported_with_plain_attention(tiny_encoder, tiny_export):
    """nn.MultiheadAttention is swapped for plain tensor operations over the same weights before the text tower
    is exported (on a copy: the model itself keeps its layers), so the graph has a few reshapes per layer instead
    of ~11; the tokenizer's merges are stored uncompressed. Outputs still match torch at every length."""
    import onnx
    import torch
    from torch import nn

    from retrieval.models.onnx_towers import _clip_text_module

    model = tiny_encoder.model
    module, dynamic = _clip_text_module(model)
    assert dynamic
    assert all(type(b.attn) is not nn.MultiheadAttention for b in module.transformer.resblocks)
    assert all(type(b.attn) is nn.MultiheadAttention for b in model.transformer.resblocks)
    tokens = torch.as_tensor(tiny_encoder.tokenizer(["a dog on a beach at night", "x"]))
    for n in (2, 5, 9):
        with torch.no_grad():
            ref = model.encode_text(torch.nn.functional.pad(tokens[:, :n], (0, tokens.shape[1] - n)))
            np.testing.assert_allclose(module(tokens[:, :n]).numpy(), ref.numpy(), atol=1e-5, rtol=0)
    meta = json.loads((tiny_export / META_NAME).read_text())
    graph = onnx.load(str(tiny_export / meta["text"]["file"]), load_external_data=False).graph
    layers = len(model.transformer.resblocks)
    reshapes = sum(n.op_type == "Reshape" for n in graph.node)
    assert reshapes <= 3 * layers + 4, reshapes
    assert meta["revision"] == 2
    assert meta["tokenizer"]["file"] == "bpe_merges.txt" and meta["tokenizer"]["unique_merges"] is True
    # the sorted ranks a query searches are part of the export, and the query tokenizer uses them
    from retrieval.models.tokenizer import RANKS_NAME, SortedRanks

    assert meta["files"][RANKS_NAME] == (tiny_export / RANKS_NAME).stat().st_size
    assert isinstance(open_export(tiny_export)._tok().bpe_ranks, SortedRanks)


def test_exports_are_preoptimised_and_open_with_optimisations_off(tiny_encoder, tiny_export):
    """onnxruntime's graph optimisation runs once, when the export is made (fused nodes in the saved graph); a
    session then opens with it off, and answers as torch does."""
    import onnx
    import onnxruntime as ort

    meta = json.loads((tiny_export / META_NAME).read_text())
    assert not list(tiny_export.glob(".*"))  # the staging folders are gone
    for tower in ("image", "text"):
        assert meta[tower]["optimised"] == {"level": "extended", "onnxruntime": ort.__version__}
        graph = onnx.load(str(tiny_export / meta[tower]["file"]), load_external_data=False).graph
        ops = {n.op_type for n in graph.node}
        assert ops & {"SkipLayerNormalization", "BiasGelu", "FusedMatMul", "Gelu", "FastGelu"}, (tower, ops)
    enc = open_export(tiny_export)
    texts = ["a dog on a beach", "x"]
    np.testing.assert_allclose(enc.encode_texts(texts), tiny_encoder.encode_texts(texts), atol=1e-5, rtol=0)
    level = enc._sessions["text"][0].get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_an_export_of_an_older_revision_answers_and_is_made_again_by_index(
    onnx_index, tmp_path, tiny_export, monkeypatch
):
    """An export made by an older version (no revision in its meta, the gzipped vocabulary) keeps answering
    queries on onnxruntime; the next `index` run, torch being installed, exports the model again in its place."""
    cache = _private_cache(tmp_path, tiny_export)
    mine = cache / "onnx" / tiny_export.name
    meta = json.loads((mine / META_NAME).read_text())
    del meta["revision"]
    (mine / META_NAME).write_text(json.dumps(meta))
    idx = tmp_path / "idx"
    shutil.copytree(onnx_index / "idx", idx)
    ids, enc = _search(idx, monkeypatch, cache, text="a red circle")
    assert len(ids) == 2 and enc.runtime == "onnx"
    build_index(idx, [onnx_index / "photos"])  # nothing new to encode: only the export is made again
    again = json.loads((mine / META_NAME).read_text())
    assert again["revision"] == 2 and again["key"] == tiny_export.name
    ids2, enc2 = _search(idx, monkeypatch, cache, text="a red circle")
    assert ids2 == ids and enc2.runtime == "onnx" and enc2.meta["revision"] == 2


def test_a_graph_onnxruntime_cannot_optimise_is_left_as_it_was(tmp_path):
    from retrieval.models.onnx_write import preoptimise

    graph = tmp_path / "text.onnx"
    graph.write_bytes(b"not a graph")
    assert preoptimise(graph) is False
    assert graph.read_bytes() == b"not a graph" and sorted(p.name for p in tmp_path.iterdir()) == ["text.onnx"]
