"""JPEG decoding as tensors on the encoder's device: nvJPEG batches on CUDA, libjpeg-turbo on the CPU.

The pieces the GPU decode stream (index_data/gpu_stream.py) is made of, each testable on a CPU:
- `probe_and_read`: PIL reads the header only (format, colour mode, size, EXIF orientation) and the file's
  bytes go into (pinned, on CUDA) host memory. Anything the tensor path should not take gets reason != None
  and goes to the PIL path (index_data/decode.py), which decodes it or records the same error it always does.
- `decode_batch`: one `torchvision.io.decode_jpeg(list, device=...)` call; a batch that fails is retried
  file by file, so one bad file sends only itself to the PIL path.
- `preprocess_batch`: EXIF orientation, then the model's own preprocess on tensors: resize of the shorter
  side (same interpolation, antialiased, rounded back to uint8 like PIL), centre crop, /255, mean/std.
  The parameters come from index_data.decode.make_plan, which reads and checks them from the encoder's
  preprocess, so no encoder needs to expose anything new.

Memory is bounded whatever the files hold: files over `max_pixels` take the PIL path (its JPEG draft mode
decodes them at 1/2..1/8 scale; nvJPEG has no reduced-size decode), decode calls are cut at `batch_pixels`
and resize calls at `resize_pixels` (float32 working copies), so a batch of 48 MP photos cannot exhaust
GPU memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image

from retrieval.images import MAX_ASPECT, MAX_PIXELS

_SWAPPING = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class GpuDecodeConfig:
    max_pixels: int = 48_000_000  # larger JPEGs take the PIL path (draft decoding); 8000x6000
    max_file_bytes: int = 64 * 1024 * 1024  # larger files take the PIL path (bounds host memory per file)
    batch_pixels: int = 128_000_000  # per decode_jpeg call: 384 MB of uint8 RGB on the device
    resize_pixels: int = 48_000_000  # per resize call: the float32 working copy is 576 MB at most


@dataclass(frozen=True)
class TensorPlan:
    """The encoder's preprocess as tensor steps: resize shorter side -> centre crop -> /255 -> normalise."""

    resize: int
    interpolation: str  # "bicubic", "bilinear", ...: torchvision InterpolationMode names
    crop: tuple[int, int]  # (height, width)
    mean: "tuple | None"
    std: "tuple | None"


_PIL_TO_MODE = {3: "bicubic", 2: "bilinear"}  # PIL resample ids torchvision resizes tensors with


def tensor_plan(plan) -> "TensorPlan | None":
    """The TensorPlan for an index_data.decode.Plan, or None when its preprocess is not the usual
    resize + crop + normalise (the stream then decodes everything on the PIL path)."""
    steps = tuple(plan.pil)
    if plan.finish is None or len(steps) != 2 or steps[0][0] != "resize" or steps[1][0] != "crop":
        return None
    _, size, resample = steps[0]
    mode = _PIL_TO_MODE.get(int(resample))
    if mode is None or steps[1][1] > size or steps[1][2] > size:
        return None  # a crop larger than the resize would pad: leave it to preprocess
    mean, std = plan.finish
    return TensorPlan(int(size), mode, (int(steps[1][1]), int(steps[1][2])), mean, std)


@dataclass
class ReadResult:
    data: "object | None"  # uint8 tensor of the file's bytes, None when the PIL path takes the file
    width: int = 0  # as stored in the file
    height: int = 0
    orientation: int = 1
    reason: "str | None" = None  # why the PIL path takes it (diagnostics and tests)

    @property
    def shown_size(self) -> tuple[int, int]:
        """(width, height) as displayed, i.e. after EXIF rotation (what the PIL path records)."""
        if self.orientation in _SWAPPING:
            return self.height, self.width
        return self.width, self.height


def _orientation(im: Image.Image) -> int:
    # the same lookup ImageOps.exif_transpose does (EXIF tag, else XMP); garbage means "leave as is",
    # as retrieval.images does
    try:
        value = im.getexif().get(0x0112)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def probe_and_read(path, pin: bool, config: GpuDecodeConfig = GpuDecodeConfig()) -> ReadResult:
    """Header check, then the whole file into a uint8 tensor. Never raises: problems become reasons."""
    import torch

    try:
        with Image.open(path) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            orientation = _orientation(im) if fmt == "JPEG" else 1
    except Exception as e:  # unreadable, not an image, ...: the PIL path words the error
        return ReadResult(None, reason=f"header: {type(e).__name__}")
    if fmt != "JPEG":
        return ReadResult(None, reason=f"format {fmt}")
    if mode not in ("RGB", "L"):
        return ReadResult(None, reason=f"mode {mode}")  # CMYK / YCCK: nvJPEG's colour handling differs
    if w <= 0 or h <= 0 or w * h > min(config.max_pixels, MAX_PIXELS) or max(w, h) > MAX_ASPECT * min(w, h):
        return ReadResult(None, reason=f"size {w}x{h}")
    try:
        with open(path, "rb") as f:
            n = os.fstat(f.fileno()).st_size
            if n > config.max_file_bytes:
                return ReadResult(None, reason=f"{n} bytes")
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
            got = f.readinto(memoryview(buf.numpy()))
    except Exception as e:
        return ReadResult(None, reason=f"read: {type(e).__name__}")
    buf = buf[:got]
    tail = bytes(buf[-2:].tolist()) if got >= 2 else b""
    if tail != b"\xff\xd9":
        # no end-of-image marker: truncated (or trailing data). libjpeg would fill the rest with grey,
        # nvJPEG may not notice at all; the PIL path decides, as it always has
        return ReadResult(None, reason="no EOI marker")
    return ReadResult(buf, w, h, orientation)


def decode_batch(datas: list, device) -> list:
    """Decoded uint8 [3, H, W] tensors on `device` (None where decoding failed), in order."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    if torch.device(device).type == "cuda":
        # torchvision's CUDA decoder allocates its outputs on the current stream but writes them from a
        # private one without waiting (pytorch/vision#9606): let queued work on freed blocks finish first
        torch.cuda.current_stream(device).synchronize()
    try:
        out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        if len(out) == len(datas):
            return list(out)
    except Exception:
        pass  # one bad file fails a whole batched call: find it
    result = []
    for d in datas:
        try:
            result.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except Exception:
            result.append(None)
    return result


def apply_orientation(img, orientation: int):
    """[C, H, W] tensor as PIL's ImageOps.exif_transpose turns the image for this EXIF orientation."""
    import torch

    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))  # 90 degrees clockwise
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img


def resized_size(h: int, w: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the shorter side at short_side, as torchvision's Resize(int) and decode.apply_pil_steps."""
    if w <= h:
        return int(short_side * h / w), short_side
    return short_side, int(short_side * w / h)


def draft_factor(h: int, w: int, target: int | None) -> int:
    """The scale PIL's JPEG draft mode picks for target x target (the PIL path decodes at 1/factor)."""
    if not target:
        return 1
    scale = min(w // target, h // target)
    return next((a for a in (8, 4, 2, 1) if scale >= a), 1)


def preprocess_batch(
    images: list,
    orientations: list,
    plan: TensorPlan,
    device,
    draft_target: int | None = None,
    config: GpuDecodeConfig = GpuDecodeConfig(),
):
    """float32 [n, 3, crop_h, crop_w] on `device` from decoded uint8 [3, H, W] tensors (as stored).

    Like the PIL path, which decodes JPEGs in draft mode at 1/2, 1/4 or 1/8 scale when the image stays
    at least `draft_target` on each side: the full decode is first averaged over factor x factor blocks
    (what libjpeg's scaled IDCT approximates), then oriented, resized and cropped. Images of the same
    size and orientation are processed together (a folder of camera photos is a handful of sizes), in
    groups of at most `resize_pixels` input pixels."""
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    ch, cw = plan.crop
    out = torch.empty((len(images), 3, ch, cw), dtype=torch.float32, device=device)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, (im, o) in enumerate(zip(images, orientations)):
        groups.setdefault((int(im.shape[-2]), int(im.shape[-1]), int(o)), []).append(i)
    mode = InterpolationMode(plan.interpolation)
    for (h, w, o), idx in groups.items():
        a = draft_factor(h, w, draft_target)
        step = max(1, config.resize_pixels // max(1, h * w))
        for s in range(0, len(idx), step):
            part = idx[s : s + step]
            x = torch.stack([images[i] for i in part])
            if a > 1:
                x = torch.nn.functional.avg_pool2d(x.float(), a, ceil_mode=True, count_include_pad=False)
                x = x.round_().to(torch.uint8)
            x = apply_orientation(x, o)
            nh, nw = resized_size(int(x.shape[-2]), int(x.shape[-1]), plan.resize)
            if (nh, nw) != tuple(x.shape[-2:]):
                # uint8 in and out: torchvision rounds and clamps back to uint8 as PIL's resize does
                x = F.resize(x, [nh, nw], interpolation=mode, antialias=True)
            top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
            out[part] = x[:, :, top : top + ch, left : left + cw].to(torch.float32)
            del x
    out /= 255.0
    if plan.mean is not None:
        out -= torch.tensor(plan.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        out /= torch.tensor(plan.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return out
