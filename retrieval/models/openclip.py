"""open_clip encoders: architecture configs, weights, and the torch model behind one Encoder.

Every encoder returns L2-normalised float32 numpy arrays of shape [n, dim]. Heavy imports (torch,
open_clip) happen inside functions so that light commands never pay for them.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from retrieval.errors import OFFLINE_HELP, ModelSpecError, OfflineWeightsError
from retrieval.hashing import sha256_file
from retrieval.models.base import Encoder, pick_device
from retrieval.modelspec import ModelIdentity, ModelSpec
from retrieval.vecmath import l2_normalize

# Extra open_clip architecture configs (a folder of ARCH.json files, several joined by os.pathsep): the test
# suite's tiny models live under tests/model_configs and are never registered for users.
CONFIG_DIRS_ENV = "RETRIEVAL_MODEL_CONFIGS"
RANDOM_INIT_SEED = 0
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # fp16: CUDA autocast only


class OpenClipEncoder(Encoder):
    """An open_clip model in eval mode. Holds no I/O beyond what load_encoder passed in."""

    def __init__(self, model, preprocess, tokenizer, identity: ModelIdentity, device: str, precision: str):
        self.model = model
        self.preprocess = preprocess  # an attribute, not a method: decode workers pickle it without the model
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device
        self.precision = precision
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._bf16_model = None

    def _autocast(self):
        import torch

        if self.device.startswith("cuda") and self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def _runner(self):
        """(model, input dtype) that encodes. bf16 on the CPU is a bfloat16 copy of the weights, made once:
        autocast would cast them on every batch (slower than fp32 there), and self.model stays fp32 for the
        ONNX export."""
        import torch

        if self.precision != "bf16" or self.device != "cpu":
            return self.model, None
        if self._bf16_model is None:
            self._bf16_model = copy.deepcopy(self.model).to(torch.bfloat16).eval()
        return self._bf16_model, torch.bfloat16

    def encode_image_tensors(self, batch) -> np.ndarray:
        import torch

        model, dtype = self._runner()
        with torch.inference_mode(), self._autocast():
            feats = model.encode_image(batch.to(self.device, dtype=dtype, non_blocking=True))
        return l2_normalize(feats.float().cpu().numpy())

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        import torch

        texts = list(texts)
        model, _ = self._runner()
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
            with torch.inference_mode(), self._autocast():
                feats = model.encode_text(tokens)
            out.append(l2_normalize(feats.float().cpu().numpy()))
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out, axis=0)


_REGISTERED = False


def register_model_configs() -> None:
    """Make the architectures in $RETRIEVAL_MODEL_CONFIGS (e.g. the tests' tiny-clip) known to open_clip."""
    global _REGISTERED
    if _REGISTERED:
        return
    import open_clip

    for folder in filter(None, os.environ.get(CONFIG_DIRS_ENV, "").split(os.pathsep)):
        if Path(folder).is_dir():
            open_clip.add_model_config(Path(folder))
    _REGISTERED = True


def _resolve_weights(spec: ModelSpec, cache_dir: str | None) -> str | None:
    """Path of the weights file for spec, downloading into open_clip's cache when a network exists."""
    import open_clip

    if spec.is_random:
        return None
    if spec.is_path:
        p = Path(spec.pretrained)
        if not p.is_file():
            raise ModelSpecError(f"weights file not found: {p}")
        return str(p)
    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        hint = f" Known tags for {spec.arch}: {', '.join(tags)}." if tags else ""
        raise ModelSpecError(f"unknown pretrained tag {spec.pretrained!r} for {spec.arch}.{hint}")
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as e:  # hub/urllib raise many types; all mean "weights not available here"
        raise OfflineWeightsError(
            f"The weights for {spec} are not in the local cache and could not be downloaded "
            f"({type(e).__name__}). {OFFLINE_HELP}"
        ) from None
    if not path or not Path(path).is_file():
        raise OfflineWeightsError(f"The weights for {spec} could not be found or downloaded. {OFFLINE_HELP}")
    return path


_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _skip_param_init():
    """Make torch.nn.init's in-place initialisers no-ops while a model is built only to receive a checkpoint.

    open_clip builds the model (random init of every parameter) and then loads the weights with
    strict=True, so every parameter is overwritten and the init is wasted (most of a cold model load,
    docs/fast-queries.md), paid by every cold image query and every `index` run.
    The same trick as transformers' no_init_weights. The patch is process-wide, so loads are
    serialised by a lock (two overlapping patches could otherwise restore the no-ops for good).
    RETRIEVAL_INIT_BEFORE_LOAD=1 turns it off (a diagnostic, and the "before" of benchmarks/cold_query.py)."""
    import torch.nn.init as init

    if os.environ.get("RETRIEVAL_INIT_BEFORE_LOAD", "").strip() not in ("", "0"):
        yield
        return
    with _INIT_LOCK:
        names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
        saved = {n: getattr(init, n) for n in names}
        try:
            for n in names:
                setattr(init, n, lambda tensor, *args, **kwargs: tensor)
            yield
        finally:
            for n, f in saved.items():
                setattr(init, n, f)


def resolve_precision(precision: str, device: str) -> str:
    """auto: bf16 autocast on CUDA, fp32 elsewhere. bf16 on the CPU casts the weights (pays off on CPUs with
    bfloat16 instructions: AVX512-BF16, AMX); MPS runs fp32 only."""
    if precision not in PRECISIONS:
        raise ModelSpecError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if precision == "bf16" and device.startswith("mps"):
        raise ModelSpecError("--precision bf16 runs on CUDA or on the CPU, not on MPS")
    if precision == "fp16" and not device.startswith("cuda"):
        raise ModelSpecError(f"--precision fp16 runs on CUDA only, not on {device}")
    return precision


def load_open_clip(spec: ModelSpec, device: str = "auto", precision: str = "auto", cache_dir: str | None = None):
    """The open_clip encoder of `ARCH:TAG`, `ARCH:/path/to/weights` or `ARCH:none`."""
    import open_clip
    import torch

    register_model_configs()
    if spec.arch not in open_clip.list_models():
        raise ModelSpecError(f"unknown open_clip architecture {spec.arch!r} (see open_clip.list_models())")
    device = pick_device(device)
    precision = resolve_precision(precision, device)
    weights = _resolve_weights(spec, cache_dir)
    if weights is None:
        torch.manual_seed(RANDOM_INIT_SEED)  # random init is deterministic, so an index can be reopened
    try:
        with _skip_param_init() if weights else contextlib.nullcontext():
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.arch,
                pretrained=weights,
                device=device,
                precision="fp32",
                pretrained_text=False,
                pretrained_image=False,
            )
    except Exception as e:  # a truncated or foreign file raises SafetensorError, UnpicklingError, ...
        if not weights:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "Weights only load failed" in first:  # torch's advice there (weights_only=False) is not for users
            first = "not a readable PyTorch checkpoint"
        misfit = ("size mismatch", "state_dict", "Missing key", "Unexpected key", "changed")
        if isinstance(e, (RuntimeError, AssertionError, KeyError)) and any(m in str(e) for m in misfit):
            raise ModelSpecError(f"weights {weights} do not fit architecture {spec.arch}: {first}") from None
        raise ModelSpecError(
            f"cannot load weights {weights} ({type(e).__name__}: {first}); is it a complete .safetensors, .pt or .bin "
            f"file for {spec.arch}?"
        ) from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec.arch)
    dim = (
        int(model.text_projection.shape[1])
        if getattr(model, "text_projection", None) is not None and hasattr(model.text_projection, "shape")
        else None
    )
    if dim is None:
        dim = int(open_clip.get_model_config(spec.arch)["embed_dim"])
    identity = ModelIdentity(
        spec=str(spec),
        arch=spec.arch,
        pretrained=Path(spec.pretrained).name if spec.is_path else spec.pretrained,
        weights_sha256=sha256_file(weights) if weights else None,
        dim=dim,
    )
    enc = OpenClipEncoder(model, preprocess, tokenizer, identity, device, precision)
    enc.weights_path = weights  # the ONNX export records it, to find the export again without torch
    return enc
