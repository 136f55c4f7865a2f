"""How a model's preprocess is split for decode workers: PIL resize and crop there, numpy finish in the
parent, checked once to give exactly the preprocess's output."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Plan:
    pil: tuple = ()
    finish: "tuple | None" = None


def _find_transforms(preprocess):
    """The torchvision Compose list behind preprocess: itself, or (for encoder.preprocess, a bound
    method) the encoder's _preprocess. Whatever is found is only trusted after make_plan's check."""
    owner = getattr(preprocess, "__self__", None)
    for obj in (preprocess, getattr(owner, "_preprocess", None), getattr(owner, "transform", None)):
        transforms = getattr(obj, "transforms", None)
        if isinstance(transforms, (list, tuple)):
            return transforms
    return None


def _recognise(preprocess) -> Plan:
    declared = getattr(preprocess, "decode_plan", None)  # an encoder may state its plan (the starter does)
    if declared:
        pil_steps, finish = declared() if callable(declared) else declared
        return Plan(tuple(pil_steps), finish)
    transforms = _find_transforms(preprocess)
    if not transforms:
        return Plan()
    pil: list = []
    stage = "pil"  # pil -> rgb -> tensor -> done
    finish = None
    for t in transforms:
        mod = getattr(t, "__module__", "") or ""
        name = getattr(t, "__name__", None) or type(t).__name__
        if stage == "pil" and mod.startswith("torchvision.") and name == "Resize":
            size = t.size[0] if isinstance(t.size, (list, tuple)) and len(t.size) == 1 else t.size
            if not isinstance(size, int) or getattr(t, "max_size", None) is not None:
                return Plan(tuple(pil))
            try:
                from torchvision.transforms.functional import pil_modes_mapping

                resample = int(pil_modes_mapping[t.interpolation])
            except Exception:
                return Plan(tuple(pil))
            pil.append(("resize", size, resample))
        elif stage == "pil" and mod.startswith("torchvision.") and name == "CenterCrop":
            size = (t.size, t.size) if isinstance(t.size, int) else tuple(t.size)
            if len(size) == 1:
                size = (size[0], size[0])
            if len(size) != 2:
                return Plan(tuple(pil))
            pil.append(("crop", int(size[0]), int(size[1])))
        elif stage in ("pil", "rgb") and (
            (name == "MaybeConvertMode" and getattr(t, "mode", None) == "RGB") or name == "_convert_to_rgb"
        ):
            stage = "rgb"  # our images are RGB already
        elif stage in ("pil", "rgb") and name in ("ToTensor", "MaybeToTensor"):
            stage, finish = "tensor", (None, None)
        elif stage == "tensor" and mod.startswith("torchvision.") and name == "Normalize":
            finish = (tuple(float(m) for m in t.mean), tuple(float(s) for s in t.std))
            stage = "done"
        else:
            return Plan(tuple(pil))
    return Plan(tuple(pil), finish if stage in ("tensor", "done") else None)


def apply_pil_steps(img: Image.Image, steps: tuple) -> tuple[Image.Image, bool]:
    """Run the PIL steps of a plan, as torchvision's Resize(int) and CenterCrop do on PIL images.
    Returns (image, complete); complete is False when a step was left to preprocess (a crop that
    would need padding)."""
    for step in steps:
        if step[0] == "resize":
            _, s, resample = step
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = s, int(s * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            if size != (w, h):
                img = img.resize(size, resample)
        elif step[0] == "crop":
            _, ch, cw = step
            w, h = img.size
            if cw > w or ch > h:
                return img, False  # torchvision would pad: leave that to preprocess
            top = int(round((h - ch) / 2.0))
            left = int(round((w - cw) / 2.0))
            img = img.crop((left, top, left + cw, top + ch))
    return img, True


def finish_array(arr: np.ndarray, finish: tuple) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW, as ToTensor then Normalize(mean, std) compute it (bit for bit)."""
    x = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
    x /= np.float32(255)
    mean, std = finish
    if mean is not None:
        x -= np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        x /= np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return x


_PLAN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def make_plan(preprocess, target_size: int | None = None) -> Plan:
    """What of `preprocess` can run outside it with bit-identical results (see Plan); checked on probe
    images, cached per encoder. Plan() for an unrecognised preprocess: everything then runs in it."""
    owner = getattr(preprocess, "__self__", None) or preprocess
    try:
        cached = _PLAN_CACHE.get(owner)
    except TypeError:
        cached = None
    if cached is not None:
        return cached
    plan = _validated(preprocess, _recognise(preprocess))
    try:
        _PLAN_CACHE[owner] = plan
    except TypeError:
        pass
    return plan


def _validated(preprocess, plan: Plan) -> Plan:
    if not plan.pil and plan.finish is None:
        return plan
    if getattr(preprocess, "returns_numpy", False):  # it runs exactly its declared plan (preprocess.ImageTransform)
        return plan
    try:
        import torch
    except ImportError:
        return Plan()
    sizes = [s for step in plan.pil for s in step[1:2]] or [64]
    s = max(8, min(max(sizes), 512))
    rng = np.random.default_rng(1234)
    probes = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in ((2 * s + 1, s + 3), (s // 2 + 1, s - 1), (s, s), (1, 1))
    ]
    try:
        refs = [preprocess(im) for im in probes]
    except Exception:
        return Plan()

    def same(pil: tuple, finish) -> bool:
        for im, ref in zip(probes, refs):
            out, complete = apply_pil_steps(im, pil)
            if finish is not None and complete:
                got = torch.from_numpy(finish_array(np.asarray(out), finish))
            else:
                got = preprocess(out)
            if not (isinstance(ref, torch.Tensor) and ref.dtype == got.dtype and torch.equal(ref, got)):
                return False
        return True

    try:
        if plan.finish is not None and same(plan.pil, plan.finish):
            return plan
        pil = plan.pil
        while pil:
            if same(pil, None):
                return Plan(pil)
            pil = pil[:-1]
    except Exception:
        pass
    return Plan()
