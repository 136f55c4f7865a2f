"""Photo formats beyond Pillow's built-ins: HEIC/HEIF (pillow-heif), camera RAW (rawpy), and the lists of
extensions the scanner takes.

AVIF, JPEG 2000 and PNM are decoded by Pillow itself (Pillow >= 11.2 reads AVIF). pillow-heif and rawpy are
optional (the `formats` extra); without them such files are recorded skips that say what to install.
"""

from __future__ import annotations

import io
import os

from retrieval.errors import ImageDecodeError

HEIF_EXTENSIONS = (".heic", ".heif", ".hif")
RAW_EXTENSIONS = (".arw", ".cr2", ".cr3", ".nef", ".dng", ".orf", ".rw2", ".raf")
PILLOW_EXTRA_EXTENSIONS = (".avif", ".jp2", ".j2k", ".jpf", ".jpx", ".pnm", ".ppm", ".pgm", ".pbm")
EXTRA_EXTENSIONS = HEIF_EXTENSIONS + PILLOW_EXTRA_EXTENSIONS + RAW_EXTENSIONS
# a RAW whose folder holds one of these with the same stem is the same photo: the scanner skips the RAW
RAW_COMPANION_EXTENSIONS = (".jpg", ".jpeg", ".heic", ".heif", ".hif")

MAX_PIXELS = 178_956_970  # PIL's default; retrieval.images sets it as Pillow's limit
INSTALL_HINT = "pip install 'retrieval-engine[formats]'"

_heif_state: bool | None = None  # None: not tried yet; True: registered; False: pillow-heif missing


def ensure_plugins() -> bool:
    """Register pillow-heif's HEIF opener with Pillow, once (lazily: it costs ~25 ms to import, which text
    queries never need). Returns whether HEIF files can be opened."""
    global _heif_state
    if _heif_state is None:
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _heif_state = True
        except ImportError:
            _heif_state = False
    return _heif_state


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def is_raw_name(name: str) -> bool:
    return _ext(name) in RAW_EXTENSIONS


def check_decoder(name: str) -> None:
    """Raise ImageDecodeError naming the missing package when `name` needs one that is not installed."""
    if _ext(name) in HEIF_EXTENSIONS and not ensure_plugins():
        raise ImageDecodeError(f"{name}: HEIC/HEIF needs pillow-heif ({INSTALL_HINT})")


# LibRaw's flip code -> PIL transpose; 5 and 6 turn the picture a quarter (width and height swap)
_FLIPS = {3: "ROTATE_180", 5: "ROTATE_90", 6: "ROTATE_270"}


def open_raw(source, name: str, min_side: int, decode):
    """Decode a camera RAW file to (PIL RGB image, (width, height) of the full photo as displayed).

    The camera's embedded preview is used when there is one at least `min_side` pixels on its shorter side
    (a full-size JPEG in most cameras: fast, and with the camera's own colours); else the sensor data is
    demosaiced at half size, `decode` (retrieval.images.load_image) reads a JPEG preview with the usual size
    and bomb guards. Any LibRaw failure is an ImageDecodeError.
    """
    try:
        import rawpy
    except ImportError:
        raise ImageDecodeError(f"{name}: RAW files need rawpy ({INSTALL_HINT})") from None
    from PIL import Image

    try:
        src = os.fsdecode(source) if isinstance(source, (str, bytes, os.PathLike)) else source
        with rawpy.imread(src) as raw:
            sizes = raw.sizes
            flip = _FLIPS.get(sizes.flip)
            w, h = int(sizes.width), int(sizes.height)
            if sizes.flip in (5, 6):
                w, h = h, w
            if w * h > MAX_PIXELS:
                raise ImageDecodeError(f"{name}: {w}x{h} exceeds the {MAX_PIXELS} pixel limit")
            img, oriented = _preview(raw, rawpy, min_side, decode)
            if oriented:
                flip = None
            if img is None:
                rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
                img = Image.fromarray(rgb)
                if flip:  # postprocess already applied LibRaw's flip
                    flip = None
        if flip:
            img = img.transpose(getattr(Image.Transpose, flip))
        if w <= 0 or h <= 0:
            w, h = img.size
        return img, (w, h)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # LibRawError and its kinds, OSError: one line, a recorded skip
        detail = str(e).strip("b'\"") or type(e).__name__
        raise ImageDecodeError(f"{name}: corrupt or unsupported RAW file ({detail})") from None


def _preview(raw, rawpy, min_side: int, decode):
    """(embedded preview as an RGB PIL image, whether it is already oriented), or (None, False) when there is
    none or it is too small. A JPEG preview with its own EXIF orientation is turned by that, not by LibRaw's."""
    from PIL import Image

    try:
        thumb = raw.extract_thumb()
    except Exception:  # LibRawNoThumbnailError, LibRawUnsupportedThumbnailError, a damaged preview
        return None, False
    oriented = False
    try:
        if thumb.format == rawpy.ThumbFormat.JPEG:
            data = io.BytesIO(thumb.data)
            with Image.open(data) as probe:
                oriented = probe.getexif().get(0x0112, 1) != 1
            data.seek(0)
            img = decode(data)  # the usual size and bomb guards
        elif thumb.format == rawpy.ThumbFormat.BITMAP:
            img = Image.fromarray(thumb.data).convert("RGB")
        else:
            return None, False
    except Exception:
        return None, False
    return (img, oriented) if min(img.size) >= min_side else (None, False)
