"""The tensor decode path (--decode gpu): same embeddings as the PIL path within tolerance, same fallbacks
and errors, bounded memory, same index. Runs on the CPU (decode_jpeg's CPU backend, the same code);
the one CUDA test runs only where CUDA is available."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from conftest import build_index
from corpus import (
    make_cmyk_jpeg,
    make_exif_rotated_jpeg,
    make_jpeg,
    make_malformed_corpus,
    make_png,
    make_truncated_jpeg,
    photo_array,
)
from PIL import Image, ImageOps

from index_data import gpu_stream
from index_data.decode import decode_stream
from index_data.gpu_decode import GpuDecodeConfig, apply_orientation, probe_and_read
from index_data.gpu_stream import choose_decode_stream, gpu_decode_stream, resolve_decode
from retrieval.store.index import Index

# Measured on the photo-like JPEGs below: the lowest per-image cosine between the two paths' embeddings
# was 0.9974 (starter, a 640x480 JPEG: PIL's draft decode at 1/2 scale vs full decode + 2x2 averaging),
# most are 0.9999+; tiny-clip's lowest was 0.99999. README "GPU indexing" states it.
MIN_COSINE = 0.995


@pytest.fixture(scope="module")
def starter_encoder():
    from retrieval.models.registry import load_encoder

    return load_encoder("starter", device="cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    paths = []
    sizes = [(341, 256), (1600, 1200), (800, 600), (200, 300), (64, 48), (1200, 1600), (500, 333)]
    for i, size in enumerate(sizes):
        paths.append(str(make_jpeg(d / f"p{i}.jpg", size, seed=i)))
    paths.append(str(make_jpeg(d / "progressive.jpg", (640, 480), seed=20, progressive=True)))
    Image.fromarray(photo_array(300, 200, 21)).convert("L").save(d / "grey.jpg", quality=90)
    paths.append(str(d / "grey.jpg"))
    for o in range(1, 9):
        paths.append(str(make_exif_rotated_jpeg(d / f"orient{o}.jpg", (120, 80), orientation=o)))
    return paths


def run(stream_fn, paths, enc, **kw):
    with stream_fn([(p, p) for p in paths], enc.preprocess, enc.image_size, **kw) as s:
        results = list(s)
    return results, getattr(s, "stats", None)


def cosines(enc, a, b) -> np.ndarray:
    ea = enc.encode_image_tensors(torch.stack([r.tensor for r in a]))
    eb = enc.encode_image_tensors(torch.stack([r.tensor for r in b]))
    return (ea * eb).sum(axis=1)


@pytest.mark.parametrize("which", ["tiny", "starter"])
def test_tensor_path_matches_pil_path_within_tolerance(which, photos, request):
    enc = request.getfixturevalue("tiny_encoder" if which == "tiny" else "starter_encoder")
    cpu, _ = run(decode_stream, photos, enc, workers=0)
    gpu, stats = run(gpu_decode_stream, photos, enc, workers=0)
    assert stats == {"tensor": len(photos)}  # every file here took the tensor path
    assert [r.key for r in gpu] == photos  # input order
    assert all(r.ok for r in cpu + gpu)
    assert [(r.width, r.height) for r in gpu] == [(r.width, r.height) for r in cpu]  # EXIF-rotated sizes too
    cos = cosines(enc, cpu, gpu)
    assert cos.min() >= MIN_COSINE, dict(zip(map(os.path.basename, photos), cos.round(5)))
    # the pixels themselves: the mean absolute difference of the normalised tensors stays small
    diff = max(float((a.tensor - b.tensor).abs().mean()) for a, b in zip(cpu, gpu))
    assert diff < 0.03  # about 2 levels of 255 after the CLIP std; a wrong resize or rotation gives 0.2+


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_equals_pil_exif_transpose(orientation, tmp_path):
    p = make_exif_rotated_jpeg(tmp_path / "o.jpg", (40, 24), orientation=orientation)
    arr = np.random.default_rng(orientation).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.info["exif"] = exif.tobytes()
    want = np.asarray(ImageOps.exif_transpose(im))
    got = apply_orientation(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == want.shape and np.array_equal(got, want)
    r = probe_and_read(p, pin=False)
    assert r.orientation == orientation and r.shown_size == Image.open(p).size[:: 1 if orientation < 5 else -1]


@pytest.mark.parametrize("workers", [0, 1])
def test_fallbacks_decode_or_record_the_same_errors(workers, tmp_path, tiny_encoder):
    expected = make_malformed_corpus(tmp_path)
    expected.pop("notes.txt")
    names = sorted(expected)
    paths = [os.path.join(tmp_path, n) for n in names]
    cpu, _ = run(decode_stream, paths, tiny_encoder, workers=0)
    gpu, stats = run(gpu_decode_stream, paths, tiny_encoder, workers=workers)
    assert [r.key for r in gpu] == paths
    assert [r.error for r in gpu] == [r.error for r in cpu]  # same files skipped, same one-line reasons
    assert {n for n, r in zip(names, gpu) if r.ok} == {n for n, k in expected.items() if k == "indexed"}
    assert stats["pil: mode CMYK"] == 1 and stats["pil: format PNG"] >= 4 and stats["pil: format WEBP"] == 1
    assert stats["pil: no EOI marker"] == 1  # the truncated JPEG
    # what the PIL path decoded is bit-identical to --decode cpu; the tensor path's files within tolerance
    for a, b, n in zip(cpu, gpu, names):
        if a.ok and (not n.endswith((".jpg", ".JPEG")) or n == "cmyk.jpg"):
            assert torch.equal(a.tensor, b.tensor), n
    ok = [i for i, r in enumerate(cpu) if r.ok]
    assert cosines(tiny_encoder, [cpu[i] for i in ok], [gpu[i] for i in ok]).min() >= MIN_COSINE


def test_decode_jpeg_refusal_falls_back(tmp_path, tiny_encoder):
    """A file whose header PIL accepts but whose data decode_jpeg refuses: only that file leaves the batch."""
    good = [str(make_jpeg(tmp_path / f"g{i}.jpg", (96, 64), seed=i)) for i in range(3)]
    data = bytearray((tmp_path / "g0.jpg").read_bytes())
    sos = data.index(b"\xff\xda")
    data[sos + 20 : len(data) - 2] = b"\xff\x00" * ((len(data) - 2 - sos - 20) // 2) + b"\x00" * (
        (len(data) - 2 - sos - 20) % 2
    )
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(bytes(data))
    paths = good[:2] + [str(bad)] + good[2:]
    cpu, _ = run(decode_stream, paths, tiny_encoder, workers=0)
    gpu, stats = run(gpu_decode_stream, paths, tiny_encoder, workers=0)
    assert [r.error for r in gpu] == [r.error for r in cpu]
    assert stats["tensor"] + sum(v for k, v in stats.items() if k.startswith("pil")) == 4
    assert stats["tensor"] >= 3  # the good files stayed on the tensor path


def test_huge_jpeg_takes_the_bounded_path(tmp_path, tiny_encoder):
    big = str(make_jpeg(tmp_path / "big.jpg", (2400, 1800), seed=5))
    small = str(make_jpeg(tmp_path / "small.jpg", (320, 240), seed=6))
    cfg = GpuDecodeConfig(max_pixels=2_000_000)
    assert probe_and_read(big, pin=False, config=cfg).reason == "size 2400x1800"
    cpu, _ = run(decode_stream, [big, small], tiny_encoder, workers=0)
    gpu, stats = run(gpu_decode_stream, [big, small], tiny_encoder, workers=0, config=cfg)
    assert stats == {"pil: size 2400x1800": 1, "tensor": 1}
    assert torch.equal(gpu[0].tensor, cpu[0].tensor)  # the PIL path's draft decode, as --decode cpu
    assert (gpu[0].width, gpu[0].height) == (2400, 1800)


def test_pixel_budgets_split_work_without_changing_results(photos, tiny_encoder):
    whole, _ = run(gpu_decode_stream, photos, tiny_encoder, workers=0)
    cfg = GpuDecodeConfig(batch_pixels=300_000, resize_pixels=100_000)  # many small decode and resize calls
    split, stats = run(gpu_decode_stream, photos, tiny_encoder, workers=0, config=cfg, batch_files=3)
    assert stats == {"tensor": len(photos)}
    for a, b in zip(whole, split):
        assert torch.equal(a.tensor, b.tensor)


def test_close_midway_stops_the_threads(tmp_path, tiny_encoder):
    paths = [str(make_jpeg(tmp_path / f"i{i}.jpg", (64, 48), seed=i)) for i in range(40)]
    s = gpu_decode_stream([(p, p) for p in paths], tiny_encoder.preprocess, tiny_encoder.image_size, batch_files=4)
    first = next(s)
    assert first.ok and first.key == paths[0]
    s.close()
    assert not s._thread.is_alive()
    assert list(s) == []


def test_choice_of_decode_path(caplog):
    assert resolve_decode("auto", "cuda") == "gpu" and resolve_decode("auto", "cuda:1") == "gpu"
    assert resolve_decode("auto", "cpu") == "cpu" and resolve_decode("auto", "mps") == "cpu"
    assert choose_decode_stream("cpu", "cuda") is decode_stream
    assert choose_decode_stream("auto", "cpu") is decode_stream
    with pytest.raises(ValueError):
        resolve_decode("nvjpeg", "cpu")
    gpu_stream._warned = False
    with caplog.at_level(logging.WARNING, logger="index_data.gpu_stream"):
        fn = choose_decode_stream("gpu", "cpu")
        choose_decode_stream("gpu", "cpu")
    assert fn.keywords["device"] == "cpu"
    assert sum("CUDA is not available" in r.getMessage() for r in caplog.records) == 1  # said once


def test_index_built_with_gpu_decode_equals_cpu_decode(tmp_path):
    folder = tmp_path / "photos"
    for i, size in enumerate([(320, 240), (640, 480), (200, 300), (96, 64), (1024, 768)]):
        make_jpeg(folder / f"a{i}.jpg", size, seed=30 + i)
    make_jpeg(folder / "dup.jpg", (320, 240), seed=30)  # same content as a0.jpg
    make_png(folder / "b.png", (120, 90), seed=40)
    make_cmyk_jpeg(folder / "cmyk.jpg")
    make_exif_rotated_jpeg(folder / "rot.jpg", (90, 60), orientation=6)
    make_truncated_jpeg(folder / "broken.jpg")
    reports, rows, vecs = [], [], []
    for mode in ("cpu", "gpu"):
        r = build_index(tmp_path / mode, [folder], decode=mode, batch_size=4)
        reports.append((r.encoded, r.reused, sorted((os.path.basename(p), e) for p, e in r.errors)))
        idx = Index.open(tmp_path / mode)
        try:
            rs = list(idx.store.iter_images())
            rows.append([(x.id, os.path.basename(x.path), x.hash, x.width, x.height) for x in rs])
            vecs.append(idx.store.get_embeddings("image", [x.hash for x in rs], idx.identity.dim))
        finally:
            idx.close()
    assert reports[0] == reports[1] and reports[0][:2] == (8, 1) and len(reports[0][2]) == 1
    assert rows[0] == rows[1]  # same ids, paths, content hashes and recorded sizes
    assert (vecs[0] * vecs[1]).sum(axis=1).min() >= MIN_COSINE


def test_cli_index_decode_gpu(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "p"
    make_jpeg(folder / "a.jpg", (120, 90), seed=1)
    make_png(folder / "b.png", (120, 90), seed=2)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        os.path.join(root, "cli.py"),
        "index",
        str(folder),
        "--index",
        str(tmp_path / "i"),
        "--model",
        "tiny-clip:none",
        "--device",
        "cpu",
        "--decode",
        "gpu",
        "--workers",
        "0",
        "-q",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "2 images indexed: 2 encoded" in p.stderr
    assert p.stderr.count("CUDA is not available") == 1
    bad = subprocess.run(cmd[:-5] + ["--decode", "fast"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG); the same code runs on the CPU above")
def test_cuda_nvjpeg_path_matches_pil_path(photos, tmp_path):
    from retrieval.models.registry import load_encoder

    enc = load_encoder("tiny-clip:none", device="cuda", precision="fp32")
    cpu, _ = run(decode_stream, photos, enc, workers=0)
    gpu, stats = run(gpu_decode_stream, photos, enc, workers=0, device="cuda")
    assert stats == {"tensor": len(photos)}
    assert all(r.tensor.is_cuda for r in gpu)
    assert [(r.width, r.height) for r in gpu] == [(r.width, r.height) for r in cpu]
    cos = cosines(enc, cpu, gpu)
    assert cos.min() >= MIN_COSINE, cos
    cmyk = str(make_cmyk_jpeg(tmp_path / "c.jpg"))
    truncated = str(make_truncated_jpeg(tmp_path / "t.jpg"))
    mixed, _ = run(gpu_decode_stream, [cmyk, truncated, photos[0]], enc, workers=1, device="cuda")
    want, _ = run(decode_stream, [cmyk, truncated, photos[0]], enc, workers=0)
    assert [r.error for r in mixed] == [r.error for r in want]
    assert mixed[0].tensor.is_cuda and torch.equal(mixed[0].tensor.cpu(), want[0].tensor)


def test_preprocess_without_a_tensor_plan_uses_the_pil_path_for_everything(tmp_path):
    """A preprocess the tensor path cannot reproduce (here: a fixed non-square resize) must not be guessed."""
    paths = [str(make_jpeg(tmp_path / f"j{i}.jpg", (160, 120), seed=i)) for i in range(3)]

    def preprocess(im):
        return torch.from_numpy(np.asarray(im.resize((12, 8)), dtype=np.float32)).permute(2, 0, 1).contiguous()

    jobs = [(p, p) for p in paths]
    with decode_stream(jobs, preprocess, 16, workers=0) as s:
        cpu = list(s)
    with gpu_decode_stream(jobs, preprocess, 16, workers=0) as s:
        gpu = list(s)
    assert s.stats == {"pil: preprocess": 3}
    assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(cpu, gpu))


def test_device_out_of_memory_sends_the_group_to_the_pil_path(tmp_path, tiny_encoder, monkeypatch):
    paths = [str(make_jpeg(tmp_path / f"m{i}.jpg", (200, 150), seed=i)) for i in range(6)]
    real, calls = gpu_stream.preprocess_batch, []

    def first_call_fails(*a, **kw):  # a device shared with another process running out mid-run
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*a, **kw)

    monkeypatch.setattr(gpu_stream, "preprocess_batch", first_call_fails)
    cpu, _ = run(decode_stream, paths, tiny_encoder, workers=0)
    gpu, stats = run(gpu_decode_stream, paths, tiny_encoder, workers=0, batch_files=3)
    assert stats == {"pil: device out of memory": 3, "tensor": 3}
    assert all(r.ok for r in gpu) and [r.key for r in gpu] == paths
    assert all(torch.equal(a.tensor, b.tensor) for a, b in zip(cpu[:3], gpu[:3]))  # the PIL path's own output


def test_pil_path_worker_crash_costs_only_that_file(tmp_path, tiny_encoder, monkeypatch):
    from index_data import decode as D

    real = D.load_image_with_size

    def crash_on_marker(path, *a, **kw):
        if "crash" in os.path.basename(os.fsdecode(path)):
            os._exit(3)  # what a segfaulting decoder looks like from outside
        return real(path, *a, **kw)

    monkeypatch.setattr(D, "load_image_with_size", crash_on_marker)  # inherited by forked workers
    paths = [
        str(make_png(tmp_path / "a.png", (60, 40), seed=1)),
        str(make_png(tmp_path / "crash.png", (60, 40))),
        str(make_jpeg(tmp_path / "b.jpg", (60, 40), seed=2)),
        str(make_png(tmp_path / "c.png", (60, 40), seed=3)),
    ]
    results, stats = run(gpu_decode_stream, paths, tiny_encoder, workers=1, start_method="fork")
    assert [r.ok for r in results] == [True, False, True, True]
    assert "crashed" in results[1].error
    assert stats["tensor"] == 1 and stats["pil: format PNG"] == 3
