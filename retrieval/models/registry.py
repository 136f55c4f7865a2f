"""`load_encoder`: the torch encoder a model spec names, open_clip or the offline starter model."""

from __future__ import annotations

from retrieval.models.base import Encoder
from retrieval.modelspec import ModelSpec, parse_spec


def load_encoder(
    spec: str | ModelSpec, device: str = "auto", precision: str = "auto", cache_dir: str | None = None
) -> Encoder:
    """Build the encoder a spec names: `ARCH:TAG`, `ARCH:/path/to/weights`, `ARCH:none`, or `starter`."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.is_starter:
        from retrieval.models.starter import load_starter

        return load_starter(device=device)
    from retrieval.models.openclip import load_open_clip

    return load_open_clip(spec, device, precision, cache_dir)
