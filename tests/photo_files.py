"""Real photo files of the formats photo libraries hold, written by the tests: HEIC (pillow-heif), AVIF,
JPEG 2000 and PNM (Pillow), DNG (tifffile: a CFA sensor image LibRaw demosaics, optionally with an RGB
preview in IFD0), and JPEGs with EXIF (Pillow)."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import numpy as np
from conftest import draw_scene
from PIL import Image


def make_heic(path, seed: int = 0, size=(96, 72)) -> Path:
    import pillow_heif

    pillow_heif.register_heif_opener()
    draw_scene(seed, size).save(path, format="HEIF", quality=90)
    return Path(path)


def make_pillow(path, seed: int = 0, size=(96, 72)) -> Path:
    """AVIF, JPEG 2000 or PNM, by the extension (.pgm greyscale)."""
    im = draw_scene(seed, size)
    (im.convert("L") if str(path).endswith(".pgm") else im).save(path)
    return Path(path)


_DNG_TAGS = [
    (50706, "B", 4, (1, 4, 0, 0), False),  # DNGVersion
    (50707, "B", 4, (1, 1, 0, 0), False),  # DNGBackwardVersion
    (50708, "s", 0, "Test Camera", False),  # UniqueCameraModel
    (
        50721,
        "2i",
        9,
        (10000, 10000, 0, 10000, 0, 10000, 0, 10000, 10000, 10000, 0, 10000, 0, 10000, 0, 10000, 10000, 10000),
        False,
    ),  # ColorMatrix1: identity
    (50778, "H", 1, 21, False),  # CalibrationIlluminant1: D65
]
_CFA_TAGS = [
    (33421, "H", 2, (2, 2), False),  # CFARepeatPatternDim
    (33422, "B", 4, (0, 1, 1, 2), False),  # CFAPattern: RGGB
    (50714, "H", 1, 0, False),  # BlackLevel
    (50717, "H", 1, 4095, False),  # WhiteLevel
]


def make_dng(path, size=(64, 48), preview: Image.Image | None = None, seed: int = 0) -> Path:
    """A minimal DNG: 12-bit RGGB sensor data; with `preview`, an RGB preview in IFD0 and the sensor data
    in a SubIFD (the layout cameras and Adobe's converter write)."""
    import tifffile

    w, h = size
    cfa = np.random.default_rng(seed).integers(200, 3800, (h, w)).astype(np.uint16)
    with tifffile.TiffWriter(os.fspath(path)) as t:
        if preview is None:
            t.write(cfa, photometric=32803, subfiletype=0, extratags=_DNG_TAGS + _CFA_TAGS, metadata=None)
        else:
            t.write(
                np.asarray(preview.convert("RGB")),
                photometric="rgb",
                subfiletype=1,
                subifds=1,
                extratags=_DNG_TAGS,
                metadata=None,
            )
            t.write(cfa, photometric=32803, subfiletype=0, extratags=_CFA_TAGS, metadata=None)
    return Path(path)


def make_exif_jpeg(
    path,
    seed: int = 0,
    taken: datetime | None = None,
    make: str | None = None,
    model: str | None = None,
    lens: str | None = None,
    gps: tuple[float, float] | None = None,
    size=(96, 72),
) -> Path:
    """A JPEG with the EXIF a camera writes: DateTimeOriginal, Make, Model, LensModel, GPS."""
    im = draw_scene(seed, size)
    exif = Image.Exif()
    if make:
        exif[0x010F] = make
    if model:
        exif[0x0110] = model
    sub = exif.get_ifd(0x8769)
    if taken:
        sub[0x9003] = taken.strftime("%Y:%m:%d %H:%M:%S")  # DateTimeOriginal
    if lens:
        sub[0xA434] = lens  # LensModel
    if gps:
        lat, lon = gps
        g = exif.get_ifd(0x8825)

        def dms(v):
            v = abs(v)
            d = int(v)
            m = int((v - d) * 60)
            s = (v - d - m / 60) * 3600
            return (float(d), float(m), round(s, 4))

        g[1] = "N" if lat >= 0 else "S"
        g[2] = dms(lat)
        g[3] = "E" if lon >= 0 else "W"
        g[4] = dms(lon)
    im.save(path, "JPEG", quality=92, exif=exif)
    return Path(path)
