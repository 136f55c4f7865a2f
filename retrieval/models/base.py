"""The encoder interface every model implements, and the torch device choice.

Every encoder returns L2-normalised float32 numpy arrays of shape [n, dim]. torch is imported inside functions,
so light commands never pay for it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from retrieval.errors import ModelSpecError
from retrieval.modelspec import ModelIdentity


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelSpecError(f"--device {device} requested but CUDA is not available")
        if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelSpecError("--device mps requested but Apple's MPS backend is not available on this machine")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class Encoder:
    """The shared interface. Subclasses implement preprocess, encode_image_tensors and encode_texts."""

    identity: ModelIdentity
    image_size: int  # shorter side the model looks at; decoders may draft-decode down to it
    device: str = "cpu"
    runtime: str = "torch"  # "onnx" for retrieval.models.onnx_runtime.OnnxEncoder

    @property
    def dim(self) -> int:
        return int(self.identity.dim)

    def preprocess(self, image):  # PIL.Image -> torch.Tensor [3, H, W]
        raise NotImplementedError

    def encode_image_tensors(self, batch) -> np.ndarray:  # torch.Tensor [n, 3, H, W]
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        raise NotImplementedError

    def encode_images(self, images: Iterable, batch_size: int = 64) -> np.ndarray:
        """Encode PIL images or paths. A path that is not an image raises ImageDecodeError."""
        import torch

        from retrieval.images import load_image  # PIL: not imported for a text query

        out, buf = [], []
        for item in images:
            buf.append(self.preprocess(load_image(item, self.image_size)))
            if len(buf) == batch_size:
                out.append(self.encode_image_tensors(torch.stack(buf)))
                buf = []
        if buf:
            out.append(self.encode_image_tensors(torch.stack(buf)))
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out, axis=0)
