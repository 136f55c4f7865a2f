"""Generators of image files, good and bad, for tests and benchmarks.

Every `make_*` function writes one file at `path` (str, bytes or PathLike; bytes paths allow
non-UTF-8 names), creates missing parent folders, and returns the path it was given. Only PIL,
numpy and the standard library are used, so importing this module is cheap.

`make_malformed_corpus(dir)` writes one file of each kind and says which ones an indexer must
index and which it must skip (and record as an error), for fault and pipeline tests.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

__all__ = [
    "photo_array",
    "make_jpeg",
    "make_png",
    "make_image",
    "make_zero_byte",
    "make_random_bytes",
    "make_truncated_jpeg",
    "make_bomb_png",
    "make_animated_gif",
    "make_cmyk_jpeg",
    "make_16bit_png",
    "make_rgba_png",
    "make_1x1_png",
    "make_exif_rotated_jpeg",
    "make_garbage_exif_jpeg",
    "make_corrupt_exif_jpeg",
    "make_text_file",
    "NON_UTF8_NAME",
    "LONG_NAME",
    "make_malformed_corpus",
    "make_photo_folder",
    "make_truncated_png",
    "make_huge_text",
    "make_fifo",
    "make_symlink_loop",
    "make_self_symlink",
    "make_broken_symlink",
    "make_unreadable",
    "make_deep_path",
]

# A file name that is not valid UTF-8 (Latin-1 "é" byte), as bytes: join with os.fsencode(dir).
NON_UTF8_NAME = b"caf\xe9-latin1.jpg"
# A 250-byte file name (the ext4 limit is 255 bytes).
LONG_NAME = "l" * 246 + ".jpg"


def _prepare(path) -> str | bytes:
    p = os.fspath(path)
    parent = os.path.dirname(p)
    if parent:
        os.makedirs(parent, exist_ok=True)
    return p


def photo_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB array (smooth colour waves plus sensor noise); compresses like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    f = 1.0 + (seed % 17)
    chans = [
        128 + 90 * np.sin(x / (23.0 + 3 * f + 11 * c) + c + seed) * np.cos(y / (31.0 + 5 * c + f)) for c in range(3)
    ]
    a = np.stack(chans, axis=-1)
    a += rng.normal(0.0, 10.0, size=(height, width, 3)).astype(np.float32)
    return np.clip(a, 0, 255).astype(np.uint8)


def make_jpeg(
    path,
    size: tuple[int, int] = (64, 48),
    quality: int = 90,
    seed: int = 0,
    progressive: bool = False,
    exif: bytes | None = None,
):
    """A valid baseline (or progressive) RGB JPEG of size (width, height) with photo-like content."""
    p = _prepare(path)
    kw = {"quality": quality, "progressive": progressive}
    if exif is not None:
        kw["exif"] = exif
    Image.fromarray(photo_array(size[0], size[1], seed)).save(p, format="JPEG", **kw)
    return path


def make_png(path, size: tuple[int, int] = (64, 48), seed: int = 0):
    """A valid 8-bit RGB PNG."""
    p = _prepare(path)
    Image.fromarray(photo_array(size[0], size[1], seed)).save(p, format="PNG")
    return path


def make_image(path, fmt: str, size: tuple[int, int] = (64, 48), seed: int = 0):
    """A valid RGB image in any PIL format: "JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"."""
    p = _prepare(path)
    im = Image.fromarray(photo_array(size[0], size[1], seed))
    if fmt.upper() == "GIF":
        im = im.convert("P")
    im.save(p, format=fmt.upper())
    return path


def make_zero_byte(path):
    """An empty file (0 bytes). Must be skipped."""
    p = _prepare(path)
    open(p, "wb").close()
    return path


def make_random_bytes(path, n: int = 4096, seed: int = 0):
    """Random bytes (typically named .jpg): not an image in any format. Must be skipped."""
    p = _prepare(path)
    with open(p, "wb") as f:
        f.write(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def make_truncated_jpeg(path, size: tuple[int, int] = (256, 192), keep: float = 0.4, seed: int = 0):
    """A JPEG cut off after `keep` of its bytes (a half-copied photo). Must be skipped."""
    buf = io.BytesIO()
    Image.fromarray(photo_array(size[0], size[1], seed)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    p = _prepare(path)
    with open(p, "wb") as f:
        f.write(data[: max(16, int(len(data) * keep))])
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def make_bomb_png(path, width: int = 100_000, height: int = 100_000):
    """A tiny PNG whose IHDR (with a correct CRC) claims width x height pixels, a decompression bomb.

    The default 10^10 pixels is far past PIL's limit, so it must be refused before any decoding.
    """
    p = _prepare(path)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    idat = zlib.compress(b"\x00" * 64)
    with open(p, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return path


# colours of the frames make_animated_gif writes; the first one is what an indexer must see
GIF_FRAME_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))


def make_animated_gif(path, size: tuple[int, int] = (32, 32), colours=GIF_FRAME_COLOURS):
    """An animated GIF with one solid colour per frame (default red, green, blue). Index the first frame."""
    p = _prepare(path)
    frames = [Image.new("RGB", size, c).convert("P") for c in colours]
    frames[0].save(p, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def make_cmyk_jpeg(path, size: tuple[int, int] = (48, 32), seed: int = 0):
    """A CMYK JPEG (as Photoshop print workflows write). Must decode to RGB."""
    p = _prepare(path)
    Image.fromarray(photo_array(size[0], size[1], seed)).convert("CMYK").save(p, format="JPEG", quality=90)
    return path


def make_16bit_png(path, size: tuple[int, int] = (48, 32)):
    """A 16-bit greyscale PNG (mode I;16) with a full-range horizontal ramp. Must decode to RGB."""
    p = _prepare(path)
    w, h = size
    ramp = np.tile(np.linspace(0, 65535, w, dtype=np.float64), (h, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(p, format="PNG")
    return path


def make_rgba_png(path, size: tuple[int, int] = (48, 32)):
    """An RGBA PNG, left half opaque red, right half fully transparent. Transparency becomes white."""
    p = _prepare(path)
    w, h = size
    a = np.zeros((h, w, 4), np.uint8)
    a[:, : w // 2] = (255, 0, 0, 255)
    a[:, w // 2 :] = (0, 0, 255, 0)
    Image.fromarray(a, "RGBA").save(p, format="PNG")
    return path


def make_1x1_png(path, colour=(10, 200, 30)):
    """A 1x1 pixel PNG. Must index (the model's resize stretches it)."""
    p = _prepare(path)
    Image.new("RGB", (1, 1), colour).save(p, format="PNG")
    return path


def _exif_with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def make_exif_rotated_jpeg(path, size: tuple[int, int] = (64, 32), orientation: int = 6):
    """A JPEG stored sideways with an EXIF orientation tag (6 = rotate 90 degrees clockwise to view).

    Stored pixels: left half red, right half blue, size (width, height). After EXIF orientation 6
    the displayed image is (height, width) with red on top and blue at the bottom.
    """
    p = _prepare(path)
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    Image.fromarray(a).save(p, format="JPEG", quality=95, exif=_exif_with_orientation(orientation))
    return path


def make_garbage_exif_jpeg(path, size: tuple[int, int] = (64, 48), orientation: int = 12345):
    """A valid JPEG whose EXIF orientation holds a meaningless value. Must decode, unrotated."""
    return make_jpeg(path, size=size, exif=_exif_with_orientation(orientation))


def make_corrupt_exif_jpeg(path, size: tuple[int, int] = (64, 48)):
    """A valid JPEG with an APP1 "Exif" segment full of junk (bad TIFF header and offsets). Must decode."""
    buf = io.BytesIO()
    Image.fromarray(photo_array(size[0], size[1], 3)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    junk = b"Exif\x00\x00" + b"MM\x00\x2a\xff\xff\xff\xf0" + bytes(range(256)) * 2
    app1 = b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk
    p = _prepare(path)
    with open(p, "wb") as f:
        f.write(data[:2] + app1 + data[2:])  # right after SOI
    return path


def make_text_file(path, text: str = "not an image\n"):
    """A plain text file (e.g. notes.txt, or a .jpg that is really text)."""
    p = _prepare(path)
    with open(p, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def make_malformed_corpus(directory, include_odd_names: bool = True) -> dict[str, str]:
    """Write one file of every awkward kind into `directory` and return {name: expected}.

    `expected` is "indexed" (the file must end up in the index, exactly once) or "skipped" (it must
    not; a decode failure is recorded as an error, a non-image extension is ignored by the scan).
    Names are relative to `directory`, as str (os.fsdecode, so a non-UTF-8 name carries surrogate
    escapes; os.fsencode gives back its bytes). With include_odd_names the corpus also holds a
    non-UTF-8 name and a 250-byte name, both valid JPEGs that must be indexed.
    """
    d = os.fspath(directory)
    if isinstance(d, bytes):
        d = os.fsdecode(d)
    os.makedirs(d, exist_ok=True)
    j = lambda name: os.path.join(d, name)  # noqa: E731
    expected: dict[str, str] = {}

    def add(name: str, kind: str, fn, *args, **kw):
        fn(j(name), *args, **kw)
        expected[name] = kind

    add("ok_photo.jpg", "indexed", make_jpeg, (320, 240), seed=1)
    add("ok_progressive.jpg", "indexed", make_jpeg, (320, 240), seed=2, progressive=True)
    add("ok_upper.JPEG", "indexed", make_jpeg, (96, 64), seed=3)
    add("ok_image.png", "indexed", make_png, (96, 64), seed=4)
    add("ok_image.webp", "indexed", make_image, "WEBP", (96, 64), seed=5)
    add("ok_image.bmp", "indexed", make_image, "BMP", (96, 64), seed=6)
    add("ok_image.tiff", "indexed", make_image, "TIFF", (96, 64), seed=7)
    add("ok_image.tif", "indexed", make_image, "TIFF", (64, 96), seed=8)
    add("animated.gif", "indexed", make_animated_gif)
    add("cmyk.jpg", "indexed", make_cmyk_jpeg)
    add("grey16.png", "indexed", make_16bit_png)
    add("rgba.png", "indexed", make_rgba_png)
    add("one_pixel.png", "indexed", make_1x1_png)
    add("exif_rotated6.jpg", "indexed", make_exif_rotated_jpeg)
    add("exif_garbage_orientation.jpg", "indexed", make_garbage_exif_jpeg)
    add("exif_corrupt_block.jpg", "indexed", make_corrupt_exif_jpeg)
    add("zero_bytes.jpg", "skipped", make_zero_byte)
    add("truncated.jpg", "skipped", make_truncated_jpeg)
    add("random_bytes.jpg", "skipped", make_random_bytes)
    add("text_pretending.png", "skipped", make_text_file)
    add("bomb_100000x100000.png", "skipped", make_bomb_png)
    add("notes.txt", "skipped", make_text_file)  # not an image extension: the scan ignores it
    if include_odd_names:
        bname = os.path.join(os.fsencode(d), NON_UTF8_NAME)
        make_jpeg(bname, (80, 60), seed=9)
        expected[os.fsdecode(NON_UTF8_NAME)] = "indexed"
        add(LONG_NAME, "indexed", make_jpeg, (80, 60), seed=10)
    return expected


def make_photo_folder(
    directory, n: int, size: tuple[int, int] = (1600, 1200), quality: int = 90, distinct: int = 16
) -> list[str]:
    """n valid JPEGs named img_00000.jpg... (for speed tests). Only `distinct` different pictures are
    encoded; the rest are byte copies with a varied trailing comment, so generating is fast."""
    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    blobs = []
    for s in range(min(n, distinct)):
        buf = io.BytesIO()
        Image.fromarray(photo_array(size[0], size[1], s)).save(buf, format="JPEG", quality=quality)
        blobs.append(buf.getvalue())
    paths = []
    for i in range(n):
        p = os.path.join(d, f"img_{i:05d}.jpg")
        with open(p, "wb") as f:
            f.write(blobs[i % len(blobs)])
            f.write(b"copy %d" % i)  # after EOI: ignored by decoders, makes content hashes distinct
        paths.append(p)
    return paths


# --- added for the fault suite (tests/test_malformed.py, benchmarks/malformed_report.py) ---------------


def make_truncated_png(path, size: tuple[int, int] = (256, 192), keep: float = 0.5, seed: int = 0):
    """A PNG cut off after `keep` of its bytes (IDAT incomplete, no IEND). Must be skipped."""
    buf = io.BytesIO()
    Image.fromarray(photo_array(size[0], size[1], seed)).save(buf, format="PNG")
    data = buf.getvalue()
    p = _prepare(path)
    with open(p, "wb") as f:
        f.write(data[: max(64, int(len(data) * keep))])
    return path


def make_huge_text(path, n_bytes: int = 5 * 1024 * 1024, line: str = "a caption line that repeats"):
    """A text file of about n_bytes (a runaway sidecar): many numbered lines, the last one unterminated."""
    p = _prepare(path)
    with open(p, "w", encoding="utf-8") as f:
        written, i = 0, 0
        while written < n_bytes:
            s = f"{line} {i}\n"
            f.write(s)
            written += len(s)
            i += 1
        f.write("an unterminated last line")
    return path


def make_fifo(path):
    """A named pipe (e.g. called x.jpg): opening it for reading would block forever. Must be skipped."""
    p = _prepare(path)
    os.mkfifo(p)
    return path


def make_symlink_loop(path):
    """A directory symlink pointing at its own parent folder (walking it never ends). Reported once."""
    p = _prepare(path)
    os.symlink(".", p)
    return path


def make_self_symlink(path):
    """A symlink to itself (e.g. loop.jpg -> loop.jpg): stat fails with ELOOP."""
    p = _prepare(path)
    os.symlink(os.path.basename(os.fsdecode(p)), p)
    return path


def make_broken_symlink(path, target: str = "does-not-exist.jpg"):
    """A dangling symlink."""
    p = _prepare(path)
    os.symlink(target, p)
    return path


def make_unreadable(path, size: tuple[int, int] = (64, 48), seed: int = 0):
    """A valid JPEG with mode 000. Note: root (CAP_DAC_OVERRIDE) still reads it; a test must drop that
    capability (tests/faultkit.py: no_dac_override) for the denial to be real."""
    make_jpeg(path, size, seed=seed)
    os.chmod(_prepare(path), 0)
    return path


def make_deep_path(directory, total_len: int = 4200, name: str = "deep.jpg") -> bytes:
    """A valid JPEG whose absolute path is longer than PATH_MAX (4096 on Linux), made through relative
    mkdirs. Returns the full path as bytes (it cannot be opened by name; scandir still lists it)."""
    base = os.fsencode(os.path.abspath(os.fspath(directory)))
    os.makedirs(base, exist_ok=True)
    seg = b"d" * 200
    fd = os.open(base, os.O_RDONLY)
    parts = []
    try:
        while len(base) + sum(len(x) + 1 for x in parts) + len(name) + 1 < total_len:
            os.mkdir(seg, dir_fd=fd)
            nfd = os.open(seg, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            parts.append(seg)
        buf = io.BytesIO()
        Image.fromarray(photo_array(40, 30, 1)).save(buf, format="JPEG")
        out = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, buf.getvalue())
        os.close(out)
    finally:
        os.close(fd)
    return b"/".join([base, *parts, os.fsencode(name)])
