"""Photo formats: HEIC, AVIF, JPEG 2000, PNM and camera RAW (DNG) decode, are scanned and indexed; bad files of
these kinds are recorded skips; a RAW next to a JPEG of the same stem is left out."""

from __future__ import annotations

import os

import pytest
from conftest import build_index
from photo_files import make_dng, make_heic, make_pillow
from PIL import Image

from index_data.scan import scan
from retrieval.errors import ImageDecodeError
from retrieval.images import load_image_with_size


@pytest.mark.parametrize("ext", ["heic", "avif", "jp2", "ppm", "pgm"])
def test_new_formats_decode_with_their_size(tmp_path, ext):
    p = tmp_path / f"photo.{ext}"
    make_heic(p, size=(96, 72)) if ext == "heic" else make_pillow(p, size=(96, 72))
    img, size = load_image_with_size(p)
    assert img.mode == "RGB" and img.size == (96, 72) and size == (96, 72)
    # the decoded pixels are the scene, not a blank: compare with the source drawing (lossy codecs differ a bit)
    from conftest import draw_scene

    src = draw_scene(0, (96, 72)).convert("L" if ext == "pgm" else "RGB").convert("RGB")
    diff = sum(abs(a - b) for a, b in zip(img.resize((8, 6)).tobytes(), src.resize((8, 6)).tobytes())) / (8 * 6 * 3)
    assert diff < 40, diff


def test_dng_uses_the_embedded_preview_when_big_enough(tmp_path):
    red = Image.new("RGB", (96, 72), (255, 0, 0))
    p = make_dng(tmp_path / "IMG_0001.dng", size=(64, 48), preview=red)
    img, size = load_image_with_size(p, target_size=32)
    assert size == (64, 48)  # the sensor's size, not the preview's
    assert img.size == (96, 72) and img.getpixel((10, 10)) == (255, 0, 0)


def test_dng_without_a_usable_preview_is_demosaiced_at_half_size(tmp_path):
    bare = make_dng(tmp_path / "bare.dng", size=(64, 48))
    img, size = load_image_with_size(bare, target_size=32)
    assert size == (64, 48) and img.size == (32, 24) and img.getpixel((10, 10)) != (255, 0, 0)
    # a preview smaller than the model's input is not used either
    tiny = make_dng(tmp_path / "tiny.dng", size=(64, 48), preview=Image.new("RGB", (16, 12), (255, 0, 0)))
    img, _ = load_image_with_size(tiny, target_size=32)
    assert img.size == (32, 24) and img.getpixel((10, 10)) != (255, 0, 0)


@pytest.mark.parametrize("name", ["broken.heic", "broken.avif", "broken.jp2", "broken.cr2", "broken.dng", "broken.nef"])
def test_corrupt_files_of_the_new_kinds_raise_one_line(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(ImageDecodeError) as e:
        load_image_with_size(p)
    assert "\n" not in str(e.value) and name in str(e.value)


def test_truncated_heic_and_dng_raise_one_line(tmp_path):
    for p in (make_heic(tmp_path / "t.heic"), make_dng(tmp_path / "t.dng")):
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 3])
        with pytest.raises(ImageDecodeError):
            load_image_with_size(p)


def test_raw_next_to_a_jpeg_of_the_same_stem_is_left_out(tmp_path):
    d = tmp_path / "card"
    d.mkdir()
    make_dng(d / "IMG_0001.DNG")
    Image.new("RGB", (32, 24)).save(d / "IMG_0001.JPG")
    make_dng(d / "IMG_0002.dng")  # RAW only: indexed
    make_dng(d / "IMG_0003.dng")
    make_heic(d / "IMG_0003.HEIC")  # RAW + HEIF: the HEIF is kept
    (d / "other").mkdir()
    make_dng(d / "other" / "IMG_0001.dng")  # same stem, other folder: indexed
    files, problems = scan([d])
    assert problems == []
    assert sorted(os.path.relpath(f.path, d) for f in files) == [
        "IMG_0001.JPG",
        "IMG_0002.dng",
        "IMG_0003.HEIC",
        "other/IMG_0001.dng",
    ]


def test_index_holds_every_format_and_records_bad_ones(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    make_heic(d / "iphone.heic", seed=1)
    make_pillow(d / "web.avif", seed=2)
    make_pillow(d / "scan.jp2", seed=3)
    make_pillow(d / "old.ppm", seed=4)
    make_dng(d / "camera.dng", preview=Image.new("RGB", (96, 72), (0, 0, 255)))
    (d / "bad.heic").write_bytes(b"not a heic")
    (d / "broken.cr3").write_bytes(b"not a raw")
    r = build_index(tmp_path / "idx", [d])
    assert r.encoded == 5 and r.images_total == 5
    reasons = {os.path.basename(p): why for p, why in r.errors}
    assert set(reasons) == {"bad.heic", "broken.cr3"}
    assert "RAW" in reasons["broken.cr3"] and "\n" not in reasons["bad.heic"]
    from retrieval.store.index import Index

    with Index.open(tmp_path / "idx") as idx:
        dims = {os.path.basename(r.path): (r.width, r.height) for r in idx.store.iter_images()}
    assert dims["camera.dng"] == (64, 48) and dims["iphone.heic"] == (96, 72)
