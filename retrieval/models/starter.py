"""The offline starter model (`--model starter`): real text<->image semantics with no download.

EfficientNet-Lite0 (ImageNet classes) and all-MiniLM-L6-v2 (sentences), both from PyPI wheels, meet by ConSE:
an image's vector is the probability-weighted mix of its top classes' text embeddings, so text queries and
images share MiniLM's space. How it works and how its settings were chosen: docs/starter.md.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.errors import ModelSpecError
from retrieval.hashing import sha256_file
from retrieval.models.base import Encoder, pick_device
from retrieval.models.minilm import TextTower
from retrieval.models.preprocess import resize_crop_normalize
from retrieval.models.starter_files import DIM, IMAGE_SIZE, INSTALL_HINT, StarterFiles, locate_files
from retrieval.modelspec import ModelIdentity
from retrieval.vecmath import l2_normalize

VERSION = "effnet-lite0+minilm-l6-v2/conse-v1"
CLASS_EMB_FORMAT = "classemb-v1"  # bump when the way class embeddings are computed changes

# Input normalisation, in 0..1 pixel units.
NORMALIZATIONS = {
    "tf": ((127.0 / 255,) * 3, (128.0 / 255,) * 3),  # what TF EfficientNet-Lite was trained with
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # the torchvision convention
}

# Extra template sets beside open_clip's "simple" (7) and "openai" (80) ImageNet templates.
OWN_TEMPLATES = {
    "name": ("{c}",),
    "photo": ("a photo of a {c}.",),
}
TEMPLATE_SETS = ("name", "photo", "simple", "openai")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConseConfig:
    """ConSE hyperparameters. The defaults are the measured choice (see the module docstring)."""

    top_t: int = 20  # how many top classes an image vector mixes
    temperature: float = 2.0  # softmax(logits / temperature) before taking the top T
    templates: str = "simple"  # one of TEMPLATE_SETS
    normalization: str = "tf"  # one of NORMALIZATIONS
    resize: int = 224  # shorter side before the 224 centre crop (224: whole shorter side; 256: crop 87.5%)

    def validate(self) -> "ConseConfig":
        if self.top_t < 1 or self.top_t > 1000:
            raise ModelSpecError(f"starter: top_t must be in 1..1000, not {self.top_t}")
        if not self.temperature > 0:
            raise ModelSpecError(f"starter: temperature must be > 0, not {self.temperature}")
        if self.templates not in TEMPLATE_SETS:
            raise ModelSpecError(f"starter: templates must be one of {TEMPLATE_SETS}, not {self.templates!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ModelSpecError(f"starter: normalization must be one of {tuple(NORMALIZATIONS)}")
        if self.resize < IMAGE_SIZE:
            raise ModelSpecError(f"starter: resize must be >= {IMAGE_SIZE}")
        return self


DEFAULT_CONFIG = ConseConfig()


# --------------------------------------------------------------------------------------------------
# Locating the offline parts


# --------------------------------------------------------------------------------------------------
# Class names and templates (from open_clip, read without importing open_clip itself: that costs ~3 s)

_METADATA = None


def _zero_shot_metadata():
    global _METADATA
    if _METADATA is None:
        mod = None
        try:
            spec = importlib.util.find_spec("open_clip")
            loc = list(spec.submodule_search_locations or []) if spec else []
            path = Path(loc[0]) / "zero_shot_metadata.py" if loc else None
            if path and path.is_file():
                s = importlib.util.spec_from_file_location("_retrieval_open_clip_zero_shot_metadata", path)
                mod = importlib.util.module_from_spec(s)
                s.loader.exec_module(mod)
                mod.IMAGENET_CLASSNAMES, mod.SIMPLE_IMAGENET_TEMPLATES, mod.OPENAI_IMAGENET_TEMPLATES  # noqa: B018
        except Exception:  # layout changed: fall back to the ordinary import
            mod = None
        if mod is None:
            from open_clip import zero_shot_metadata as mod
        _METADATA = mod
    return _METADATA


def imagenet_classnames() -> list[str]:
    return list(_zero_shot_metadata().IMAGENET_CLASSNAMES)


def template_strings(name: str) -> list[str]:
    """The templates of a set as format strings with `{c}` for the class name."""
    if name in OWN_TEMPLATES:
        return list(OWN_TEMPLATES[name])
    md = _zero_shot_metadata()
    fns = {"simple": md.SIMPLE_IMAGENET_TEMPLATES, "openai": md.OPENAI_IMAGENET_TEMPLATES}.get(name)
    if fns is None:
        raise ModelSpecError(f"starter: unknown template set {name!r}; choose from {TEMPLATE_SETS}")
    return [f("{c}") for f in fns]


def _sha256_text(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Image preprocessing: a plain picklable class, so worker processes can run it (and no torchvision import)


class StarterTransform:
    """PIL image -> float tensor [3, 224, 224]: resize shorter side, centre crop, scale, normalise.

    Written to equal torchvision's Resize(int, BICUBIC) + CenterCrop + ToTensor + Normalize bit for bit,
    without importing torchvision (~1.6 s). `decode_plan` describes the same steps in the form
    index_data.decode's plans use, so decode workers can run the PIL part and the parent the numpy part.
    """

    RESAMPLE = 3  # PIL.Image.Resampling.BICUBIC

    def __init__(self, resize: int = DEFAULT_CONFIG.resize, size: int = IMAGE_SIZE, normalization: str = "tf"):
        mean, std = NORMALIZATIONS[normalization]
        self.resize, self.size = int(resize), int(size)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)

    @property
    def decode_plan(self) -> tuple:
        """((("resize", shorter_side, resample), ("crop", h, w)), (mean, std))."""
        return (
            (("resize", self.resize, self.RESAMPLE), ("crop", self.size, self.size)),
            (tuple(float(m) for m in self.mean.ravel()), tuple(float(s) for s in self.std.ravel())),
        )

    def __call__(self, image) -> torch.Tensor:
        x = resize_crop_normalize(image, self.resize, (self.size, self.size), self.RESAMPLE, self.mean, self.std)
        return torch.from_numpy(x)

    def __repr__(self) -> str:
        return (
            f"StarterTransform(resize={self.resize}, size={self.size}, mean={self.mean.ravel().tolist()}, "
            f"std={self.std.ravel().tolist()})"
        )


# --------------------------------------------------------------------------------------------------
# MiniLM (BERT, 6 layers, 384 wide) in plain torch, loaded from the wheel's safetensors


# --------------------------------------------------------------------------------------------------
# ConSE


def conse_embed(logits: torch.Tensor, class_emb: torch.Tensor, top_t: int, temperature: float) -> torch.Tensor:
    """Normalised convex combination of the top-T class embeddings, weighted by softmax(logits / T)."""
    probs = torch.softmax(logits.float() / float(temperature), dim=-1)
    w, idx = probs.topk(min(int(top_t), probs.shape[-1]), dim=-1)
    w = w / w.sum(-1, keepdim=True)
    v = torch.einsum("nt,ntd->nd", w, class_emb[idx])
    return F.normalize(v, dim=-1)


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "retrieval"


def class_embedding_key(files: StarterFiles, templates: str) -> str:
    return _sha256_text(
        {
            "format": CLASS_EMB_FORMAT,
            "minilm": sha256_file(files.minilm_weights),
            "tokenizer": sha256_file(files.tokenizer),
            "classes": imagenet_classnames(),
            "templates": template_strings(templates),
        }
    )


def compute_class_embeddings(text: TextTower, templates: str) -> np.ndarray:
    """[1000, 384]: each class name in every template, embedded, averaged, renormalised (as CLIP does)."""
    classes, temps = imagenet_classnames(), template_strings(templates)
    prompts = [t.replace("{c}", c) for c in classes for t in temps]
    emb = text.encode(prompts, batch_size=512).reshape(len(classes), len(temps), DIM).mean(axis=1)
    return l2_normalize(emb)


def class_embeddings(
    files: StarterFiles, text: TextTower, templates: str, use_cache: bool = True
) -> tuple[np.ndarray, bool]:
    """The class-embedding matrix and whether it came from the cache. Cache failures only cost time."""
    key = class_embedding_key(files, templates)
    path = _cache_dir() / f"starter-{templates}-{key[:24]}.npy"
    if use_cache:
        try:
            emb = np.load(path, allow_pickle=False)
            if emb.shape == (len(imagenet_classnames()), DIM) and emb.dtype == np.float32 and np.isfinite(emb).all():
                return emb, True
        except (OSError, ValueError):
            pass
    n = len(imagenet_classnames()) * len(template_strings(templates))
    log.warning(
        "starter model: computing %d class-name embeddings once (one-off; can take a minute on a small CPU); "
        "cached in %s afterwards",
        n,
        path.parent if use_cache else "memory only",
    )
    emb = compute_class_embeddings(text, templates)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, emb, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            pass
    return emb, False


# --------------------------------------------------------------------------------------------------
# The encoder


class StarterEncoder(Encoder):
    """EfficientNet-Lite0 + ConSE for images, MiniLM for texts; both L2-normalised float32 [n, 384]."""

    image_size = IMAGE_SIZE

    def __init__(
        self,
        cnn: nn.Module,
        text: TextTower,
        class_emb: np.ndarray,
        config: ConseConfig,
        identity: ModelIdentity,
        device: str,
        class_emb_cached: bool = False,
    ):
        self.cnn = cnn
        self.text = text
        self.config = config
        self.identity = identity
        self.device = device
        self.class_emb = torch.from_numpy(np.ascontiguousarray(class_emb)).to(device)
        self.class_emb_cached = class_emb_cached
        # An instance attribute, not a method: `encoder.preprocess` is then the small picklable transform
        # itself, so the indexing pipeline can ship it to worker processes without pickling the models.
        self.preprocess = StarterTransform(config.resize, IMAGE_SIZE, config.normalization)

    def image_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [n, 1000] for a preprocessed batch [n, 3, 224, 224]."""
        with torch.inference_mode():
            x = batch.to(self.device, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
            return self.cnn(x)

    def encode_image_tensors(self, batch) -> np.ndarray:
        with torch.inference_mode():
            v = conse_embed(self.image_logits(batch), self.class_emb, self.config.top_t, self.config.temperature)
        return np.ascontiguousarray(v.float().cpu().numpy(), dtype=np.float32)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        return self.text.encode(texts, batch_size=batch_size)


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the convolution before it (exact up to float rounding)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight = nn.Parameter((conv.weight * scale[:, None, None, None]).detach())
    conv.bias = nn.Parameter(bias.detach())


def _symmetric_padding(conv: nn.Module) -> None:
    """TF 'SAME' padding that happens to be symmetric becomes the conv's own padding (no padded copy)."""
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        if left == right and top == bottom:
            conv.padding = (top, left)
            conv.static_padding = nn.Identity()


@torch.no_grad()
def optimize_cnn_for_inference(cnn: nn.Module) -> nn.Module:
    """BatchNorm folded into convs, symmetric padding moved into the conv, in-place ReLU6, channels-last.

    2 to 4 times the CPU throughput of the plain EfficientNet-Lite0 (docs/starter.md);
    logits match the plain model to ~1e-5.
    """
    pairs = [(cnn, "_conv_stem", "_bn0"), (cnn, "_conv_head", "_bn1")]
    for b in cnn._blocks:
        if hasattr(b, "_expand_conv"):
            pairs.append((b, "_expand_conv", "_bn0"))
        pairs += [(b, "_depthwise_conv", "_bn1"), (b, "_project_conv", "_bn2")]
    for mod, conv_name, bn_name in pairs:
        conv = getattr(mod, conv_name)
        _fold_bn(conv, getattr(mod, bn_name))
        setattr(mod, bn_name, nn.Identity())
        _symmetric_padding(conv)
    for m in [cnn, *cnn._blocks]:
        if isinstance(getattr(m, "_swish", None), nn.ReLU6):
            m._swish = nn.ReLU6(inplace=True)  # always applied to a fresh conv output
    return cnn.to(memory_format=torch.channels_last)


def _load_cnn(files: StarterFiles, device: str, optimize: bool = True) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    cnn = EfficientNet.from_name("efficientnet-lite0")
    try:
        sd = torch.load(str(files.effnet_weights), map_location="cpu", weights_only=True)
        cnn.load_state_dict(sd, strict=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise ModelSpecError(
            f"the starter's EfficientNet-Lite0 weights do not load ({str(e).splitlines()[0]}); "
            f"reinstall them: {INSTALL_HINT}"
        ) from None
    cnn.eval()
    if optimize:
        optimize_cnn_for_inference(cnn)
    return cnn.to(device)


def starter_identity(files: StarterFiles, config: ConseConfig) -> ModelIdentity:
    combined = _sha256_text(
        {
            "version": VERSION,
            "effnet": sha256_file(files.effnet_weights),
            "minilm": sha256_file(files.minilm_weights),
            "tokenizer": sha256_file(files.tokenizer),
            "classes_templates": _sha256_text([imagenet_classnames(), template_strings(config.templates)]),
            "conse": asdict(config),
        }
    )
    return ModelIdentity(spec="starter", arch="starter", pretrained=VERSION, weights_sha256=combined, dim=DIM)


class _LazyTextTower:
    """A TextTower built on first use (its load is ~20% of the starter's; image queries do not need it)."""

    def __init__(self, files: StarterFiles, device: str):
        self._args = (files, device)
        self._tower: TextTower | None = None

    def __getattr__(self, name):  # only called for attributes this proxy lacks
        if name.startswith("_"):
            raise AttributeError(name)
        if self._tower is None:
            self._tower = TextTower(*self._args)
        return getattr(self._tower, name)


def load_starter(device: str = "auto", config: ConseConfig | None = None, use_cache: bool = True) -> StarterEncoder:
    """Build the starter encoder from the offline wheels. Raises ModelSpecError if they are missing."""
    config = (config or DEFAULT_CONFIG).validate()
    files = locate_files()
    device = pick_device(device)
    cnn = _load_cnn(files, device)
    text = _LazyTextTower(files, device)  # an image query with cached class embeddings never loads MiniLM
    emb, cached = class_embeddings(files, text, config.templates, use_cache=use_cache)
    return StarterEncoder(cnn, text, emb, config, starter_identity(files, config), device, class_emb_cached=cached)
