"""CLIP-style image preprocessing in numpy: shorter side to `resize`, centre crop, scale, normalise.

Shared by the ONNX Runtime encoders and the starter model, so both feed their towers the same pixels; and the
starter's ConSE step in numpy (its image vectors from its classifier's logits)."""

from __future__ import annotations

import numpy as np

from retrieval.vecmath import l2_normalize


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


class ImageTransform:
    """PIL image -> float32 [3, h, w]: resize the shorter side (PIL resampling), centre crop, /255, normalise.

    Equal to torchvision's Resize(int) + CenterCrop + ToTensor + Normalize on PIL images (checked when an
    export is made). `decode_plan` states the same steps for index_data.decode's workers; `returns_numpy`
    tells it the result is a numpy array, not a torch tensor."""

    returns_numpy = True

    def __init__(self, resize: int, crop: tuple[int, int], resample: int, mean, std):
        self.resize, self.crop, self.resample = int(resize), (int(crop[0]), int(crop[1])), int(resample)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)

    @classmethod
    def from_meta(cls, p: dict) -> ImageTransform:
        return cls(p["resize"], tuple(p["crop"]), p["resample"], p["mean"], p["std"])

    def to_meta(self) -> dict:
        return {
            "resize": self.resize,
            "crop": list(self.crop),
            "resample": self.resample,
            "mean": [float(m) for m in self.mean.ravel()],
            "std": [float(s) for s in self.std.ravel()],
        }

    @property
    def decode_plan(self) -> tuple:
        return (
            (("resize", self.resize, self.resample), ("crop", self.crop[0], self.crop[1])),
            (tuple(float(m) for m in self.mean.ravel()), tuple(float(s) for s in self.std.ravel())),
        )

    def __call__(self, image) -> np.ndarray:
        return resize_crop_normalize(image, self.resize, self.crop, self.resample, self.mean, self.std)

    def __repr__(self) -> str:
        return f"ImageTransform({self.to_meta()})"


def conse_numpy(logits: np.ndarray, class_emb: np.ndarray, top_t: int, temperature: float) -> np.ndarray:
    """Normalised convex combination of the top-T class embeddings, weighted by softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    p = z / z.sum(axis=-1, keepdims=True)
    t = min(int(top_t), p.shape[-1])
    idx = np.argpartition(-p, t - 1, axis=-1)[:, :t]
    w = np.take_along_axis(p, idx, axis=-1)
    w = w / w.sum(axis=-1, keepdims=True)
    return l2_normalize(np.einsum("nt,ntd->nd", w, class_emb[idx]))
