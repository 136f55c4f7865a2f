"""index_data.decode: order, odd and malformed files, worker failures, and the same pixels as queries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent import futures

import corpus
import numpy as np
import pytest
import torch
from corpus import (
    LONG_NAME,
    NON_UTF8_NAME,
    make_1x1_png,
    make_16bit_png,
    make_animated_gif,
    make_bomb_png,
    make_cmyk_jpeg,
    make_corrupt_exif_jpeg,
    make_exif_rotated_jpeg,
    make_garbage_exif_jpeg,
    make_jpeg,
    make_malformed_corpus,
    make_rgba_png,
)

from index_data import decode as D
from index_data.decode import DecodeResult, decode_file, decode_stream
from index_data.decode_plan import Plan, make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def malformed(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("malformed"))
    expected = make_malformed_corpus(d)
    expected.pop("notes.txt")  # the scan never hands a .txt to the decoder
    return d, expected


def jobs_for(d, names):
    return [(n, os.path.join(d, n)) for n in names]


def decode_all(jobs, enc, workers, **kw) -> list[DecodeResult]:
    with decode_stream(jobs, enc.preprocess, enc.image_size, workers=workers, **kw) as s:
        return list(s)


def raw(path, target=None):
    """The oriented RGB pixels and size a worker produces, without the model's resize."""
    arr, w, h, err, _ = decode_file(path, target)
    assert err is None, err
    return arr, (w, h)


@pytest.mark.parametrize("workers", [0, 2])
def test_malformed_corpus_order_and_outcomes(malformed, tiny_encoder, workers):
    d, expected = malformed
    names = sorted(expected)
    results = decode_all(jobs_for(d, names), tiny_encoder, workers, prefetch=8)
    assert [r.key for r in results] == names  # input order, with errors in place
    for r in results:
        assert ("indexed" if r.ok else "skipped") == expected[r.key], (r.key, r.error)
        if r.ok:
            assert r.tensor.shape == (3, 32, 32) and r.tensor.dtype == torch.float32
            assert r.width > 0 and r.height > 0
        else:
            assert r.tensor is None and r.width is None
            assert "\n" not in r.error and d not in r.error  # one line, the reason only
            r.error.encode("utf-8")  # storable as text


def test_specific_error_reasons(malformed, tiny_encoder):
    d, _ = malformed
    by = {
        r.key: r.error
        for r in decode_all(
            jobs_for(d, ["zero_bytes.jpg", "truncated.jpg", "random_bytes.jpg", "bomb_100000x100000.png"]),
            tiny_encoder,
            0,
        )
    }
    assert "empty" in by["zero_bytes.jpg"]
    assert "truncated" in by["truncated.jpg"]
    assert "not an image" in by["random_bytes.jpg"]
    assert "bomb" in by["bomb_100000x100000.png"]


def test_bomb_refused_before_decoding(tmp_path):
    p = make_bomb_png(str(tmp_path / "bomb.png"))
    assert os.path.getsize(p) < 200
    _, _, _, err, _ = decode_file(p, 224)
    assert err and "bomb" in err and "10000000000 pixels" in err  # refused from the header, never decoded


def test_odd_but_valid_images(tmp_path):
    gif = make_animated_gif(str(tmp_path / "anim.gif"))
    arr, size = raw(gif)
    assert size == (32, 32) and (arr.reshape(-1, 3) == (255, 0, 0)).all()  # the first frame, red

    arr, size = raw(make_cmyk_jpeg(str(tmp_path / "cmyk.jpg"), (48, 32)))
    assert arr.shape == (32, 48, 3) and size == (48, 32)

    arr, _ = raw(make_16bit_png(str(tmp_path / "g16.png"), (48, 32)))
    row = arr[0, :, 0].astype(int)
    assert arr.dtype == np.uint8 and row[0] < 5 and row[-1] > 250 and (np.diff(row) >= 0).all()

    arr, _ = raw(make_rgba_png(str(tmp_path / "rgba.png"), (48, 32)))
    assert tuple(arr[5, 5]) == (255, 0, 0) and tuple(arr[5, 40]) == (255, 255, 255)  # transparent -> white

    arr, size = raw(make_1x1_png(str(tmp_path / "one.png"), (10, 200, 30)))
    assert size == (1, 1) and tuple(arr[0, 0]) == (10, 200, 30)


def test_exif_orientation(tmp_path, tiny_encoder):
    p = make_exif_rotated_jpeg(str(tmp_path / "rot6.jpg"), (64, 32), orientation=6)
    arr, size = raw(p)
    assert size == (32, 64) and arr.shape == (64, 32, 3)  # width and height swapped
    top, bottom = arr[:28].reshape(-1, 3).mean(0), arr[36:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red on top, blue below
    (r,) = decode_all([("k", p)], tiny_encoder, 0)
    assert (r.width, r.height) == (32, 64)

    # a large rotated JPEG: size comes from the header, not the draft-decoded pixels
    big = make_jpeg(str(tmp_path / "big6.jpg"), (1600, 1200), exif=corpus._exif_with_orientation(6))
    (r,) = decode_all([("k", big)], tiny_encoder, 0)
    assert (r.width, r.height) == (1200, 1600)

    for maker in (make_garbage_exif_jpeg, make_corrupt_exif_jpeg):
        arr, size = raw(maker(str(tmp_path / f"{maker.__name__}.jpg"), (64, 48)))
        assert size == (64, 48) and arr.shape == (48, 64, 3)  # still decodes, unrotated


def test_non_utf8_and_long_names_decode(tmp_path, tiny_encoder):
    bpath = os.path.join(os.fsencode(str(tmp_path)), NON_UTF8_NAME)
    make_jpeg(bpath, (40, 30))
    spath = os.fsdecode(bpath)
    lpath = make_jpeg(str(tmp_path / LONG_NAME), (40, 30))
    results = decode_all([(1, spath), (2, lpath), (3, spath + ".missing")], tiny_encoder, 2)
    assert [r.ok for r in results] == [True, True, False]
    assert (results[0].width, results[0].height) == (40, 30)
    results[2].error.encode("utf-8")  # the surrogate in the name does not leak into the reason


def test_same_embedding_as_query_path(malformed, tmp_path, tiny_encoder):
    d, expected = malformed
    paths = [os.path.join(d, n) for n, e in sorted(expected.items()) if e == "indexed"]
    paths += [
        make_jpeg(str(tmp_path / "photo.jpg"), (1600, 1200), seed=5),  # draft-mode decode
        make_exif_rotated_jpeg(str(tmp_path / "r.jpg"), (300, 200)),
    ]
    for workers in (0, 2):
        results = decode_all([(p, p) for p in paths], tiny_encoder, workers)
        assert all(r.ok for r in results)
        pipeline = tiny_encoder.encode_image_tensors(torch.stack([r.tensor for r in results]))
        query = tiny_encoder.encode_images(paths)
        assert np.abs(pipeline - query).max() < 1e-5


def test_same_tensors_as_query_path_224(tmp_path):
    """ViT-B-32's 224-pixel transform (built without loading the model): draft decode to 400x300,
    resize + crop in the worker, numpy normalise in the parent must give bit-identical tensors."""
    import open_clip

    from retrieval.images import load_image

    preprocess = open_clip.image_transform(224, is_train=False)
    assert make_plan(preprocess).finish is not None  # the fast path is the one being checked
    paths = [
        make_jpeg(str(tmp_path / "a.jpg"), (1600, 1200), seed=1),
        make_jpeg(str(tmp_path / "b.jpg"), (1200, 1601), seed=2),
        make_exif_rotated_jpeg(str(tmp_path / "c.jpg"), (500, 260)),
        make_rgba_png(str(tmp_path / "d.png"), (100, 300)),
        make_1x1_png(str(tmp_path / "e.png")),
    ]
    for workers in (0, 1):
        with decode_stream([(p, p) for p in paths], preprocess, 224, workers=workers) as s:
            for r in s:
                assert torch.equal(r.tensor, preprocess(load_image(r.key, 224))), r.key


def test_any_preprocess_works(tmp_path):
    """A preprocess that is not a torchvision Compose runs whole in the parent."""
    p = make_jpeg(str(tmp_path / "a.jpg"), (50, 40))

    def preprocess(im):
        return torch.from_numpy(np.array(im.resize((8, 8)))).permute(2, 0, 1)

    assert make_plan(preprocess) == Plan()
    for workers in (0, 1):
        with decode_stream([("a", p)], preprocess, 8, workers=workers) as s:
            (r,) = list(s)
        assert r.ok and r.tensor.shape == (3, 8, 8) and (r.width, r.height) == (50, 40)


def test_prefetch_bounds_read_ahead(tmp_path, tiny_encoder):
    p = make_jpeg(str(tmp_path / "a.jpg"), (40, 30))
    pulled = []

    def jobs():
        for i in range(50):
            pulled.append(i)
            yield i, p

    with decode_stream(jobs(), tiny_encoder.preprocess, 32, workers=2, prefetch=5) as s:
        next(s)
        assert len(pulled) <= 6
        assert [r.key for r in s] == list(range(1, 50))


def test_read_ahead_decodes_past_prefetch_before_the_caller_asks(tmp_path, tiny_encoder):
    """read_ahead(n): n files go to the workers at once and are decoded while the caller does something else
    (the pipeline loads torch); then the stream keeps `prefetch` ahead, in order, with the same results."""
    paths = [make_jpeg(str(tmp_path / f"{i}.jpg"), (40 + i, 30)) for i in range(12)]
    jobs = [(i, p) for i, p in enumerate(paths)]
    with decode_stream(iter(jobs), tiny_encoder.preprocess, 32, workers=1, prefetch=2) as s:
        s.read_ahead(10)
        assert len(s._pending) == 10
        futures.wait([item[2] for item in s._pending], timeout=60)
        assert all(item[2].done() for item in s._pending)  # decoded with no next() called
        ahead = list(s)
    plain = decode_all(jobs, tiny_encoder, workers=0)
    assert [r.key for r in ahead] == list(range(12))
    for a, b in zip(ahead, plain):
        assert a.error is None and (a.width, a.height) == (b.width, b.height)
        assert torch.equal(a.tensor, b.tensor)
    with decode_stream(iter(jobs), tiny_encoder.preprocess, 32, workers=0) as s:
        s.read_ahead(10)  # without workers there is nobody to decode ahead: nothing happens
        assert [r.key for r in s] == list(range(12))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _worker_pids(stream) -> list[int]:
    return [p.pid for p in stream._pool._processes.values()]


def test_close_midway_leaves_no_processes(tmp_path, tiny_encoder):
    p = make_jpeg(str(tmp_path / "a.jpg"), (200, 150))
    s = decode_stream([(i, p) for i in range(200)], tiny_encoder.preprocess, 32, workers=2)
    next(s)
    pids = _worker_pids(s)
    assert len(pids) == 2
    s.close()
    assert not any(_alive(pid) for pid in pids)
    assert list(s) == []


def test_keyboard_interrupt_in_jobs_stops_workers(tmp_path, tiny_encoder):
    p = make_jpeg(str(tmp_path / "a.jpg"), (40, 30))
    seen = {}

    def jobs():
        for i in range(20):
            yield i, p
        seen["pids"] = _worker_pids(s)
        raise KeyboardInterrupt

    s = decode_stream(jobs(), tiny_encoder.preprocess, 32, workers=2, prefetch=100)
    with pytest.raises(KeyboardInterrupt):
        list(s)
    assert not any(_alive(pid) for pid in seen["pids"])


def _crash_on(marker):
    real = D.load_image_with_size

    def load(path, target_size=None):
        if marker in os.path.basename(os.fsdecode(path)):
            os._exit(3)  # what a segfaulting decoder looks like from outside
        return real(path, target_size)

    return load


def test_worker_crash_costs_only_that_file(tmp_path, tiny_encoder, monkeypatch):
    good = make_jpeg(str(tmp_path / "good.jpg"), (40, 30))
    bad = make_jpeg(str(tmp_path / "crash.jpg"), (40, 30))
    monkeypatch.setattr(D, "load_image_with_size", _crash_on("crash"))  # inherited by forked workers
    jobs = [(i, bad if i in (3, 11) else good) for i in range(16)]
    results = decode_all(jobs, tiny_encoder, 2)
    assert [r.key for r in results] == list(range(16))
    assert [i for i, r in enumerate(results) if not r.ok] == [3, 11]
    assert "crashed" in results[3].error


def test_workers_dying_on_everything_raise_clearly(tmp_path, tiny_encoder, monkeypatch):
    bad = make_jpeg(str(tmp_path / "crash.jpg"), (40, 30))
    monkeypatch.setattr(D, "load_image_with_size", _crash_on("crash"))
    with pytest.raises(D.DecodeWorkerError, match="in a row"):
        decode_all([(i, bad) for i in range(10)], tiny_encoder, 1)


def test_killed_worker_is_recovered(tmp_path, tiny_encoder):
    p = make_jpeg(str(tmp_path / "a.jpg"), (400, 300))
    with decode_stream([(i, p) for i in range(60)], tiny_encoder.preprocess, 32, workers=2, prefetch=30) as s:
        first = next(s)
        os.kill(_worker_pids(s)[0], signal.SIGKILL)
        rest = list(s)
    assert [r.key for r in [first] + rest] == list(range(60))
    assert sum(not r.ok for r in rest) <= 1  # at most the file it was decoding, reported, not a hang


def test_hanging_decode_times_out(tmp_path, tiny_encoder, monkeypatch):
    good = make_jpeg(str(tmp_path / "good.jpg"), (40, 30))
    hang = make_jpeg(str(tmp_path / "hang.jpg"), (40, 30))
    real = D.load_image_with_size

    def load(path, target_size=None):
        if "hang" in os.path.basename(path):
            time.sleep(60)
        return real(path, target_size)

    monkeypatch.setattr(D, "load_image_with_size", load)
    monkeypatch.setattr(D, "ITEM_TIMEOUT_S", 0.5)
    results = decode_all([(0, good), (1, hang), (2, good)], tiny_encoder, 1)
    assert [r.ok for r in results] == [True, False, True], [r.error for r in results]
    assert "longer than" in results[1].error


def test_ctrl_c_in_a_real_process_exits_cleanly(tmp_path):
    """SIGINT while the caller is busy between next() calls: prompt exit, no worker left behind."""
    p = make_jpeg(str(tmp_path / "a.jpg"), (200, 150))
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from index_data.decode import decode_stream
        jobs = [(i, {p!r}) for i in range(100000)]
        with decode_stream(jobs, np.asarray, 32, workers=2, prefetch=64) as s:
            for i, r in enumerate(s):
                if i == 0:
                    print(*[q.pid for q in s._pool._processes.values()], flush=True)
                time.sleep(0.01)  # "encoding"
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 2
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_other_start_methods(tmp_path, method):
    """Non-fork platforms (macOS, Windows) use these; the worker must start and decode there too."""
    p = make_jpeg(str(tmp_path / "a.jpg"), (50, 40))
    with decode_stream([(i, p) for i in range(3)], np.asarray, 32, workers=1, start_method=method) as s:
        results = list(s)
    assert [r.key for r in results] == [0, 1, 2] and all(r.ok for r in results)
    assert (results[0].width, results[0].height) == (50, 40)


def test_submitting_to_a_pool_whose_worker_died_is_recovered(tmp_path, tiny_encoder):
    """A worker killed between two results: the next submit meets a broken pool; the stream recovers."""
    p = make_jpeg(str(tmp_path / "a.jpg"), (64, 48))
    with decode_stream([(i, p) for i in range(12)], tiny_encoder.preprocess, 32, workers=1, prefetch=2) as s:
        first = next(s)
        os.kill(_worker_pids(s)[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not getattr(s._pool, "_broken", False) and time.monotonic() < deadline:
            time.sleep(0.02)
        rest = list(s)
    assert [r.key for r in [first] + rest] == list(range(12))
    assert sum(not r.ok for r in rest) <= 2
