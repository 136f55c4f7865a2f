"""Model specs and identities. Light module: no torch import, so `info` and friends stay fast."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from retrieval.errors import ModelSpecError

DEFAULT_MODEL = "ViT-B-32:laion2b_s34b_b79k"
STARTER = "starter"
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed `--model` value: `ARCH[:PRETRAINED]` or `starter`."""

    arch: str
    pretrained: str  # an open_clip tag, a local weights path, "none", or "" for starter

    @property
    def is_starter(self) -> bool:
        return self.arch == STARTER

    @property
    def is_random(self) -> bool:
        return self.pretrained == "none"

    @property
    def is_path(self) -> bool:
        p = self.pretrained
        return bool(p) and (os.sep in p or p.endswith(WEIGHT_SUFFIXES) or p.startswith("."))

    def __str__(self) -> str:
        return self.arch if self.is_starter else f"{self.arch}:{self.pretrained}"


def parse_spec(spec: str) -> ModelSpec:
    spec = (spec or "").strip()
    if not spec:
        raise ModelSpecError("empty model spec; use ARCH[:PRETRAINED], e.g. ViT-B-32:laion2b_s34b_b79k, or 'starter'")
    if spec == STARTER:
        return ModelSpec(STARTER, "")
    arch, sep, pretrained = spec.partition(":")
    if not arch:
        raise ModelSpecError(f"model spec {spec!r} has no architecture; use ARCH[:PRETRAINED]")
    if not sep:
        # open_clip's convention: an architecture alone has a single sensible default tag for ViT-B-32;
        # for others we ask the user to be explicit rather than guess.
        if arch == DEFAULT_MODEL.split(":")[0]:
            return ModelSpec(arch, DEFAULT_MODEL.split(":")[1])
        raise ModelSpecError(
            f"model spec {spec!r} names no weights; use {arch}:TAG (an open_clip pretrained tag), "
            f"{arch}:/path/to/weights, or {arch}:none for random init"
        )
    if pretrained.endswith(WEIGHT_SUFFIXES) or os.sep in pretrained:
        pretrained = str(Path(pretrained).expanduser().resolve())
    return ModelSpec(arch, pretrained)


@dataclass(frozen=True)
class ModelIdentity:
    """What an index stores about its encoder so that a mismatch is detectable."""

    spec: str
    arch: str
    pretrained: str
    weights_sha256: str | None
    dim: int

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelIdentity":
        return cls(**{k: d.get(k) for k in ("spec", "arch", "pretrained", "weights_sha256", "dim")})

    def matches(self, other: "ModelIdentity") -> bool:
        """Same architecture, same weights, same dimension. Paths may move; the hash decides."""
        if self.arch != other.arch or int(self.dim) != int(other.dim):
            return False
        if self.weights_sha256 or other.weights_sha256:
            return self.weights_sha256 == other.weights_sha256
        return self.pretrained == other.pretrained
