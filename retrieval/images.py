"""Safe, fast image loading shared by indexing and querying, so both see the same pixels."""

from __future__ import annotations

import os

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from retrieval.errors import ImageDecodeError
from retrieval.formats import EXTRA_EXTENSIONS, MAX_PIXELS, check_decoder, ensure_plugins, is_raw_name, open_raw

# Refuse absurd dimensions before decoding. PIL's own guard (warn at MAX_IMAGE_PIXELS, raise at 2x)
# stays on; we set the limit explicitly so it cannot be lifted by another library by accident.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

MAX_ASPECT = 100

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff") + EXTRA_EXTENSIONS


def load_image(source, target_size: int | None = None) -> Image.Image:
    """Decode `source` (path, bytes file object, or PIL image) to an RGB image, EXIF-oriented.

    With `target_size`, large JPEGs decode in draft mode at the smallest scale that keeps the
    shorter side >= target_size, which is several times faster and loses nothing the model sees.
    Raises ImageDecodeError with a short reason for anything that is not a usable image.
    """
    return load_image_with_size(source, target_size)[0]


# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse)
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def load_image_with_size(source, target_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Like load_image, and also return the original (width, height) as displayed.

    The size is read from the header before draft mode shrinks the decode, and is swapped when the
    EXIF orientation rotates the image by 90 degrees, so it is what a viewer shows. The pixels are
    exactly those load_image returns.
    """
    if isinstance(source, Image.Image):
        oriented = _to_rgb(ImageOps.exif_transpose(source) or source)
        return oriented, oriented.size
    name = os.fsdecode(source) if isinstance(source, (str, bytes, os.PathLike)) else getattr(source, "name", "upload")
    try:
        if isinstance(source, (str, bytes, os.PathLike)) and os.path.getsize(source) == 0:
            raise ImageDecodeError(f"{name}: empty file (0 bytes)")
        if is_raw_name(name):
            return _load_raw(source, name, target_size)
        ensure_plugins()
        check_decoder(name)
        with Image.open(source) as im:
            w, h = im.size
            check_size(name, w, h)
            if getattr(im, "is_animated", False):
                im.seek(0)
            if target_size and im.format == "JPEG":
                im.draft("RGB", (target_size, target_size))
            im.load()
            try:
                oriented = ImageOps.exif_transpose(im)
                if oriented is not None and im.getexif().get(0x0112) in _SWAPPING_ORIENTATIONS:
                    w, h = h, w
            except Exception:  # garbage EXIF must not lose the image
                oriented = im
            return _to_rgb(oriented if oriented is not None else im), (w, h)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{name}: is a directory, not an image") from None
    except PermissionError:
        raise ImageDecodeError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{name}: decompression bomb refused ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({e})") from None


def _load_raw(source, name: str, target_size: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """A camera RAW file (retrieval.formats.open_raw), through the same aspect check as other images."""
    img, (w, h) = open_raw(source, name, min_side=target_size or 256, decode=load_image)
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageDecodeError(f"{name}: {w}x{h} has an extreme aspect ratio (over {MAX_ASPECT}:1)")
    return _to_rgb(img), (w, h)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.split()[-1])
        return bg
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clip
        import numpy as np

        a = np.asarray(im, dtype=np.float32)
        hi = float(a.max()) or 1.0
        return Image.fromarray(np.clip(a * (255.0 / max(hi, 255.0)), 0, 255).astype("uint8")).convert("RGB")
    return im.convert("RGB")


# Query uploads are decoded for one embedding only, so far fewer pixels are needed than for indexing.
UPLOAD_MAX_PIXELS = 32_000_000  # pixels actually decoded (after JPEG draft); keeps a request under ~300 MB
UPLOAD_SIDE = 512  # decoded images are reduced to about this shorter side (any model's input is smaller)


_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _reduce_in_strips(im: Image.Image, factor: int, rows: int = 64) -> Image.Image:
    """im.reduce(factor), a strip at a time: reduce() premultiplies RGBA/LA into a full-size copy first,
    which would double the memory of a large upload."""
    w, h = im.size
    out = Image.new(im.mode, (-(-w // factor), -(-h // factor)))
    step = rows * factor
    for y in range(0, h, step):
        out.paste(im.crop((0, y, w, min(h, y + step))).reduce(factor), (0, y // factor))
    return out


def check_size(name: str, w: int, h: int) -> None:
    """Refuse sizes no photo has: empty, decompression bombs, extreme aspect ratios (resizing the shorter side
    to the model's input would blow the longer one up to millions of pixels)."""
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"{name}: invalid dimensions {w}x{h}")
    if w * h > MAX_PIXELS:
        raise ImageDecodeError(f"{name}: {w}x{h} exceeds the {MAX_PIXELS} pixel limit (decompression bomb?)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageDecodeError(f"{name}: {w}x{h} has an extreme aspect ratio (over {MAX_ASPECT}:1)")


def load_upload(source, max_pixels: int = UPLOAD_MAX_PIXELS, side: int = UPLOAD_SIDE) -> Image.Image:
    """Decode an uploaded query image with bounded memory: JPEGs in draft mode (the decoder scales by up
    to 1/8), other formats refused when their full decode exceeds `max_pixels`, and every image reduced
    by an integer factor to about `side` pixels on its shorter side before any mode conversion, so the
    only full-size buffer is the decoder's own. Raises ImageDecodeError like load_image."""
    name = getattr(source, "name", "upload")
    try:
        with Image.open(source) as im:
            w, h = im.size
            check_size(name, w, h)
            if getattr(im, "is_animated", False):
                im.seek(0)
            if im.format == "JPEG":
                im.draft("RGB", (side, side))
            dw, dh = im.size  # the size the decoder will produce
            if dw * dh > max_pixels:
                raise ImageDecodeError(
                    f"{name}: {w}x{h} is too large for a query image (over {max_pixels} pixels "
                    f"to decode); send a smaller copy"
                )
            im.load()
            try:
                turn = _ORIENT.get(im.getexif().get(0x0112))
            except Exception:  # garbage EXIF must not lose the image
                turn = None
            if im.mode.startswith("I;16"):  # Image.reduce cannot average these: widen to 32-bit first
                full = im.convert("I")
            elif im.mode in ("P", "PA", "1"):  # palette indices must not be averaged: to colours first
                full = _to_rgb(im)
            else:
                full = im
            factor = max(1, min(full.size) // side)
            small = _to_rgb(_reduce_in_strips(full, factor) if factor > 1 else full)
            return small.transpose(turn) if turn is not None else small
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{name}: decompression bomb refused ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({e})") from None
