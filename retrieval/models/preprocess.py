"""CLIP-style image preprocessing in numpy: shorter side to `resize`, centre crop, scale, normalise.

Shared by the ONNX Runtime encoders and the starter model, so both feed their towers the same pixels."""

from __future__ import annotations

import numpy as np


def resize_crop_normalize(
    image, resize: int, crop: tuple[int, int], resample, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """[3, crop_h, crop_w] float32 of a PIL image (converted to RGB when it is not)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new = (new_short, new_long) if w <= h else (new_long, new_short)
    if new != (w, h):
        image = image.resize(new, resample)
    w, h = image.size
    ch, cw = crop
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    image = image.crop((left, top, left + cw, top + ch))
    x = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32)
    x /= np.float32(255)
    x -= mean
    x /= std
    return x
