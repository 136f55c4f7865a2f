"""Learned fusion: what turns raw encoder outputs into the vectors an index searches.

Three parts, all trained on an index's own image-caption pairs (see `train.py`, installed by
`install.py`) and all exactly the identity when untrained, so publishing an untrained fusion changes no search result:

1. **Residual adapters**, one per modality:  ``a(x) = normalise(x + U·act(D·x) + c)``.
   ``D`` (rank x dim) starts random (LoRA style), ``U`` (dim x rank) and ``c`` start at zero, so ``a(x) == x``
   bit for bit at init (an input that is already unit-norm is not renormalised). Image vectors go through the
   image adapter (`query_image`); captions and text queries through the text adapter (`caption_vectors`,
   `query_text`).
2. **Document fusion**: an indexed item with captions is stored as a blend of its adapted image vector and the
   normalised mean of its adapted caption vectors::

       g    = clip(gate_bias + w_agree·cos(img, cap_mean) + w_count/n_captions, 0, 1)
       doc  = normalise((1 - g)·img + g·cap_mean)

   All gate parameters start at 0, so ``g == 0`` and ``doc == img`` exactly; an item without captions always
   uses its image vector.
3. **Query fusion** for image+text queries: the user's weight ``w`` (image share, 0..1) is shifted on the logit
   scale by a learned offset ``b``: ``w_eff = sigmoid(logit(w) + b)``; ``q = normalise(w_eff·img + (1-w_eff)·txt)``.
   ``b = 0`` at init, which is exactly the unfused composite query; ``w = 0`` and ``w = 1`` stay pure text and
   pure image. At the default ``w = 0.5``, ``w_eff = sigmoid(b)`` is the learned default weight.

Inference here is pure numpy (no torch import), so loading an index with a fusion stays light. The torch twin
used for training lives in `train.py` and exports the same parameters. Saving and loading are separate
functions (`save_fusion`, `load_fusion`); the classes do no I/O. One file holds everything: the tensors in
safetensors, the config, encoder identity and format version as JSON in the safetensors metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.modelspec import ModelIdentity
from retrieval.store.atomic import fsync_dir as _fsync_dir
from retrieval.store.atomic import write_atomic as _write_atomic
from retrieval.vecmath import l2_normalize


def _unit(x):
    return l2_normalize(x, keep_unit=True)


FORMAT_NAME = "retrieval-fusion"
FORMAT_VERSION = 1
FILE_PREFIX = "fusion."
FILE_SUFFIX = ".safetensors"
# fusion.<hex>.safetensors. Deliberately not `*.g<N>.*`: Index._prune_generations deletes those.
FILE_RE = re.compile(r"^fusion\.([0-9a-f]{8,64})\.safetensors$")
CONFIG_RE = re.compile(r"^fusion\.([0-9a-f]{8,64})\.json$")
ACTIVATIONS = ("none", "gelu_tanh")


@dataclass(frozen=True)
class FusionConfig:
    dim: int
    rank: int = 64  # adapter bottleneck (capped at dim)
    activation: str = "none"  # "none": linear low-rank adapter; "gelu_tanh": small residual MLP

    def __post_init__(self):
        if self.dim < 1 or self.rank < 1:
            raise ValueError(f"bad fusion config: dim={self.dim} rank={self.rank}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")

    @property
    def r(self) -> int:
        return min(self.rank, self.dim)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FusionConfig":
        return cls(dim=int(d["dim"]), rank=int(d.get("rank", 64)), activation=str(d.get("activation", "none")))


def param_shapes(config: FusionConfig) -> dict[str, tuple[int, ...]]:
    d, r = config.dim, config.r
    return {
        "image.down": (r, d),
        "image.up": (d, r),
        "image.bias": (d,),
        "text.down": (r, d),
        "text.up": (d, r),
        "text.bias": (d,),
        "gate.bias": (1,),
        "gate.weight": (2,),
        "query.bias": (1,),
        "logit_scale": (1,),  # training temperature (log 1/T); kept for the record, unused at inference
    }


def init_params(config: FusionConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Identity parameters: random down-projections, everything that reaches the output at zero."""
    rng = np.random.default_rng(seed)
    d, r = config.dim, config.r
    out = {k: np.zeros(s, np.float32) for k, s in param_shapes(config).items()}
    for m in ("image", "text"):
        out[f"{m}.down"] = (rng.standard_normal((r, d)) / np.sqrt(d)).astype(np.float32)
    out["logit_scale"][:] = np.log(1 / 0.07)
    return out


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return (0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x**3)))).astype(
        np.float32
    )


def _as_2d(v: np.ndarray, dim: int, what: str) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[1] != dim:
        raise ValueError(f"{what}: expected [n, {dim}] vectors, got shape {v.shape}")
    return v


class Fusion:
    """A trained (or identity) fusion. Pure numpy; no I/O."""

    def __init__(
        self,
        config: FusionConfig,
        params: dict[str, np.ndarray] | None = None,
        identity: ModelIdentity | None = None,
        info: dict | None = None,
    ):
        self.config = config
        shapes = param_shapes(config)
        params = init_params(config) if params is None else params
        missing = set(shapes) - set(params)
        if missing:
            raise ValueError(f"fusion parameters missing: {sorted(missing)}")
        self.params: dict[str, np.ndarray] = {}
        for k, shape in shapes.items():
            a = np.ascontiguousarray(params[k], dtype=np.float32)
            if a.shape != shape:
                raise ValueError(f"fusion parameter {k}: shape {a.shape}, expected {shape}")
            self.params[k] = a
        self.identity = identity
        self.info = dict(info or {})

    @classmethod
    def untrained(cls, dim: int, identity: ModelIdentity | None = None, seed: int = 0, **config) -> "Fusion":
        cfg = FusionConfig(dim=dim, **config)
        return cls(cfg, init_params(cfg, seed), identity)

    @property
    def dim(self) -> int:
        return self.config.dim

    # -- adapters -------------------------------------------------------------------------------

    def _adapt(self, x: np.ndarray, which: str) -> np.ndarray:
        x = _as_2d(x, self.dim, which)
        p = self.params
        if len(x) == 0:
            return np.zeros((0, self.dim), np.float32)
        h = x @ p[f"{which}.down"].T
        if self.config.activation == "gelu_tanh":
            h = _gelu_tanh(h)
        y = x + h @ p[f"{which}.up"].T + p[f"{which}.bias"]
        return _unit(y)

    def image_vectors(self, raw: np.ndarray) -> np.ndarray:
        return self._adapt(raw, "image")

    def caption_vectors(self, raw: np.ndarray) -> np.ndarray:
        return self._adapt(raw, "text")

    def query_text(self, v: np.ndarray) -> np.ndarray:
        return self._adapt(v, "text")

    def query_image(self, v: np.ndarray) -> np.ndarray:
        return self._adapt(v, "image")

    # -- query fusion ---------------------------------------------------------------------------

    def composite_weight(self, weight: float) -> float:
        """The image share actually used for a user weight (0..1)."""
        w = float(weight)
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {w}")
        b = float(self.params["query.bias"][0])
        if w in (0.0, 1.0) or b == 0.0:
            return w
        z = np.log(w) - np.log1p(-w) + b
        return float(1.0 / (1.0 + np.exp(-z)))

    def query_composite(self, img: np.ndarray, txt: np.ndarray, weight: float) -> np.ndarray:
        w = np.float32(self.composite_weight(weight))
        a, t = self.query_image(img), self.query_text(txt)
        if a.shape != t.shape:
            raise ValueError(f"composite query: image {a.shape} and text {t.shape} differ")
        return _unit(w * a + (np.float32(1.0) - w) * t)

    # -- document fusion ------------------------------------------------------------------------

    def gates(self, img: np.ndarray, cap_mean: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Blend weight per item from adapted image, normalised adapted caption mean and caption count."""
        p = self.params
        agree = np.einsum("ij,ij->i", img, cap_mean)
        inv = 1.0 / np.maximum(np.asarray(counts, np.float32), 1.0)
        g = p["gate.bias"][0] + p["gate.weight"][0] * agree + p["gate.weight"][1] * inv
        return np.clip(g, 0.0, 1.0).astype(np.float32)

    @property
    def fuses_documents(self) -> bool:
        p = self.params
        return bool(p["gate.bias"][0] > 0 or np.any(p["gate.weight"] != 0))

    def document_vectors(self, img_raw: np.ndarray, cap_vecs: list) -> np.ndarray:
        """Index vectors for items: image i blended with its captions cap_vecs[i] ([m, d] raw, or None)."""
        a = self.image_vectors(img_raw)
        if len(cap_vecs) != len(a):
            raise ValueError(f"{len(a)} images but {len(cap_vecs)} caption lists")
        if not self.fuses_documents:
            return a
        rows = [i for i, c in enumerate(cap_vecs) if c is not None and len(c)]
        if not rows:
            return a
        counts = np.array([len(cap_vecs[i]) for i in rows], dtype=np.int64)
        caps = self.caption_vectors(np.concatenate([_as_2d(cap_vecs[i], self.dim, "captions") for i in rows]))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        cap_mean = _unit(np.add.reduceat(caps, starts, axis=0) / counts[:, None].astype(np.float32))
        img = a[rows]
        g = self.gates(img, cap_mean, counts)
        out = a.copy()
        on = g > 0
        if on.any():
            gg = g[on, None]
            out[np.asarray(rows)[on]] = _unit((1.0 - gg) * img[on] + gg * cap_mean[on])
        return out

    # -- variants and description ---------------------------------------------------------------

    def describe(self) -> dict:
        p = self.params
        return {
            "rank": self.config.r,
            "activation": self.config.activation,
            "gate_bias": round(float(p["gate.bias"][0]), 4),
            "gate_weight": [round(float(x), 4) for x in p["gate.weight"]],
            "default_composite_image_weight": round(self.composite_weight(0.5), 4),
            "temperature": round(float(np.exp(-p["logit_scale"][0])), 4),
            "adapter_norms": {m: round(float(np.linalg.norm(p[f"{m}.up"])), 4) for m in ("image", "text")},
        }


# -- files --------------------------------------------------------------------------------------


def _metadata(fusion: Fusion) -> dict[str, str]:
    return {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(fusion.config.to_dict(), sort_keys=True),
        "identity": json.dumps(fusion.identity.to_dict() if fusion.identity else None, sort_keys=True),
        "info": json.dumps(fusion.info, sort_keys=True, default=str),
    }


def fusion_bytes(fusion: Fusion) -> bytes:
    from safetensors.numpy import save

    return save({k: v for k, v in sorted(fusion.params.items())}, metadata=_metadata(fusion))


def fusion_file_name(fusion: Fusion) -> str:
    """Content-addressed file name: the same fusion always gets the same name. (Hashed over a canonical
    form, not the file bytes: safetensors does not promise a stable header order.)"""
    h = hashlib.sha256(json.dumps(_metadata(fusion), sort_keys=True).encode())
    for k, v in sorted(fusion.params.items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v, dtype="<f4").tobytes())
    return f"{FILE_PREFIX}{h.hexdigest()[:16]}{FILE_SUFFIX}"


def config_path(weights_path: str | os.PathLike) -> Path:
    """The JSON config that accompanies a fusion's weights: fusion.<hex>.safetensors -> fusion.<hex>.json."""
    return Path(weights_path).with_suffix(".json")


def config_json(fusion: Fusion, weights_name: str) -> str:
    """The readable half of a saved fusion: format version, config, encoder identity and training info.
    The same fields are also in the safetensors header, so neither file can be read against the wrong one."""
    return (
        json.dumps(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "weights": weights_name,
                "config": fusion.config.to_dict(),
                "identity": fusion.identity.to_dict() if fusion.identity else None,
                "info": fusion.info,
            },
            indent=1,
            sort_keys=True,
            default=str,
        )
        + "\n"
    )


def save_fusion(fusion: Fusion, path: str | os.PathLike) -> Path:
    """Write the weights (safetensors) and their JSON config, each atomically (temp file, fsync, os.replace),
    then fsync the directory. The index manifest names the weights file only after both are in place.

    `path` may be a file path, or an existing directory, in which case the content-addressed name
    (`fusion.<hex>.safetensors`, config `fusion.<hex>.json`) is used. Returns the weights path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / fusion_file_name(fusion)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(config_path(path), config_json(fusion, path.name).encode())
    _write_atomic(path, fusion_bytes(fusion))
    _fsync_dir(path.parent)
    return path


def load_fusion(path: str | os.PathLike) -> Fusion:
    """Read a fusion file. A missing, unreadable or foreign file raises RetrievalError with a hint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"fusion file {path} is missing; run: retrieval train-fusion --index {path.parent}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            params = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise RetrievalError(f"cannot read fusion file {path}: {e}") from None
    if meta.get("format") != FORMAT_NAME:
        raise RetrievalError(f"{path} is not a fusion file (format {meta.get('format')!r})")
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise RetrievalError(
            f"{path}: fusion format version {meta.get('format_version')} is not supported "
            f"(this program reads version {FORMAT_VERSION}); retrain with: retrieval train-fusion"
        )
    try:
        config = FusionConfig.from_dict(json.loads(meta["config"]))
        ident = json.loads(meta.get("identity", "null"))
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise RetrievalError(f"{path}: invalid fusion file: {e}") from None
    cpath = config_path(path)
    if cpath.is_file():  # absent only for fusions saved before the JSON config existed
        try:
            side = json.loads(cpath.read_text())
        except (OSError, ValueError) as e:
            raise RetrievalError(f"cannot read fusion config {cpath}: {e}") from None
        if (
            side.get("format_version") != FORMAT_VERSION
            or side.get("config") != config.to_dict()
            or side.get("identity") != ident
        ):
            raise RetrievalError(f"{cpath.name} does not describe {path.name}; retrain with: retrieval train-fusion")
    return Fusion(config, params, ModelIdentity.from_dict(ident) if ident else None, info)


def fusion_files(root: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(root).iterdir() if FILE_RE.match(p.name))


def prune_fusion_files(root: str | os.PathLike, keep: set[str]) -> list[str]:
    """Delete fusion files (and stale temp files) not named in `keep`; returns what was removed."""
    removed = []
    for p in Path(root).iterdir():
        stale_tmp = p.name.startswith(f".{FILE_PREFIX}") and p.name.endswith(".tmp")
        stale_cfg = CONFIG_RE.match(p.name) and p.with_suffix(FILE_SUFFIX).name not in keep
        if (FILE_RE.match(p.name) and p.name not in keep) or stale_tmp or stale_cfg:
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:
                pass
    return removed
