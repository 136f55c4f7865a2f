"""The towers each kind of model exports: open_clip's image and text towers, the starter's CNN and MiniLM."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from retrieval.models.onnx_runtime import (
    ImageTransform,
)
from retrieval.models.onnx_write import _cpu_fp32, _onnx_export


class ExportFailed(Exception):
    """The model cannot be exported (or its export does not reproduce torch); the message says why."""


def _clip_preprocess(preprocess) -> ImageTransform:
    """The ImageTransform equal to open_clip's torchvision Compose, or ExportFailed."""
    steps = getattr(preprocess, "transforms", None)
    if not isinstance(steps, (list, tuple)):
        raise ExportFailed(f"preprocess {type(preprocess).__name__} is not a torchvision Compose")
    resize = crop = norm = None
    for t in steps:
        name = type(t).__name__
        if name == "Resize" and resize is None:
            size = t.size[0] if isinstance(t.size, (list, tuple)) and len(t.size) == 1 else t.size
            if not isinstance(size, int) or getattr(t, "max_size", None) is not None:
                raise ExportFailed(f"preprocess resize to {t.size} is not a shorter-side resize")
            from torchvision.transforms.functional import pil_modes_mapping

            resize = (size, int(pil_modes_mapping[t.interpolation]))
        elif name == "CenterCrop" and crop is None:
            crop = (t.size, t.size) if isinstance(t.size, int) else tuple(t.size)
            crop = (crop[0], crop[0]) if len(crop) == 1 else crop
        elif name in ("MaybeConvertMode", "_convert_to_rgb", "ToTensor", "MaybeToTensor"):
            continue
        elif name == "Normalize" and norm is None:
            norm = (tuple(float(m) for m in t.mean), tuple(float(s) for s in t.std))
        else:
            raise ExportFailed(f"preprocess step {name} has no torch-free equivalent here")
    if resize is None or crop is None or norm is None or crop[0] > resize[0] or crop[1] > resize[0]:
        raise ExportFailed("preprocess is not resize + centre crop + normalise")
    return ImageTransform(resize[0], crop, resize[1], norm[0], norm[1])


def _text_parts(model):
    """(tower, pool type, eos id, causal) for open_clip's built-in CLIP text transformer, else None."""
    import torch

    if not all(hasattr(model, a) for a in ("transformer", "token_embedding", "positional_embedding", "ln_final")):
        return None
    mask = getattr(model, "attn_mask", None)
    ctx = int(model.positional_embedding.shape[0])
    if mask is None:
        return None
    expect = torch.full((ctx, ctx), float("-inf")).triu_(1)
    if tuple(mask.shape) != (ctx, ctx) or not torch.equal(mask.float().cpu(), expect):
        return None
    return model, getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None), True


def _clip_text_module(model):
    """(module tokens -> features, dynamic_length). The built-in causal tower is run on the first L tokens
    only (L = the longest text's length); anything else runs open_clip's encode_text on the full context."""
    import torch
    from torch import nn

    parts = _text_parts(model)
    if parts is None:

        class Full(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, tokens):
                return self.m.encode_text(tokens)

        return Full(model), False
    from open_clip.transformer import text_global_pool

    m, pool, eos_id, _ = parts

    class Causal(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, tokens):
            n = tokens.shape[1]
            x = self.m.token_embedding(tokens) + self.m.positional_embedding[:n]
            x = self.m.transformer(x, attn_mask=self.m.attn_mask[:n, :n])
            x = self.m.ln_final(x)
            x = text_global_pool(x, tokens, pool, eos_token_id=eos_id)
            p = self.m.text_projection
            if p is not None:
                x = p(x) if isinstance(p, nn.Linear) else x @ p
            return x

    del torch
    return Causal(m), True


def _check_clip_tokenizer(tok) -> None:
    if type(tok).__name__ != "SimpleTokenizer" or getattr(tok, "reduction_fn", None) is not None:
        raise ExportFailed(f"tokenizer {type(tok).__name__} has no torch-free equivalent here")
    if getattr(tok.clean_fn, "__name__", "") != "_clean_lower" or len(tok.encoder) != 49408:
        raise ExportFailed("tokenizer with non-default cleaning or vocabulary")


def _export_clip(encoder, tmp: Path) -> tuple[dict, object]:
    import torch

    from retrieval.models.tokenizer import VOCAB_NAME, open_clip_vocab_path

    _check_clip_tokenizer(encoder.tokenizer)
    vocab = open_clip_vocab_path()
    if vocab is None:
        raise ExportFailed("open_clip's BPE vocabulary file was not found")
    shutil.copyfile(vocab, tmp / VOCAB_NAME)
    transform = _clip_preprocess(encoder.preprocess)
    model = _cpu_fp32(encoder.model, encoder.device)
    s = encoder.image_size
    _onnx_export(
        model.visual,
        (torch.zeros(2, 3, transform.crop[0], transform.crop[1]),),
        tmp / "image.onnx",
        ["pixels"],
        {"pixels": {0: "n"}},
    )
    text, dynamic = _clip_text_module(model)
    ctx = int(encoder.tokenizer.context_length)
    probe = torch.as_tensor(encoder.tokenizer(["a photo", "two words here"]))
    if dynamic:
        _onnx_export(text, (probe[:, :8],), tmp / "text.onnx", ["tokens"], {}, max_length=ctx)
    else:
        _onnx_export(text, (probe,), tmp / "text.onnx", ["tokens"], {"tokens": {0: "n"}})
    return {
        "kind": "clip",
        "image_size": s,
        "preprocess": transform.to_meta(),
        "image": {"file": "image.onnx"},
        "text": {"file": "text.onnx", "dynamic_length": dynamic},
        "tokenizer": {"kind": "clip-bpe", "file": VOCAB_NAME, "context_length": ctx},
    }, model


def _export_starter(encoder, tmp: Path) -> tuple[dict, None]:
    import torch

    from retrieval.models import starter as S
    from retrieval.models.minilm import MAX_TEXT_TOKENS

    files = S.locate_files()
    shutil.copyfile(files.tokenizer, tmp / "tokenizer.json")
    np.save(tmp / "class_emb.npy", np.ascontiguousarray(encoder.class_emb.float().cpu().numpy()), allow_pickle=False)
    cnn = _cpu_fp32(encoder.cnn, encoder.device)
    _onnx_export(
        cnn, (torch.zeros(2, 3, S.IMAGE_SIZE, S.IMAGE_SIZE),), tmp / "image.onnx", ["pixels"], {"pixels": {0: "n"}}
    )
    minilm = _cpu_fp32(encoder.text.model, encoder.device)
    ids = torch.ones(2, 7, dtype=torch.long)
    _onnx_export(
        minilm, (ids, torch.ones_like(ids)), tmp / "text.onnx", ["ids", "mask"], {}, max_length=MAX_TEXT_TOKENS
    )
    t = encoder.preprocess
    transform = ImageTransform(t.resize, (t.size, t.size), t.RESAMPLE, t.mean.ravel(), t.std.ravel())
    sources = {str(p): None for p in (files.effnet_weights, files.minilm_weights, files.tokenizer)}
    return {
        "kind": "starter",
        "image_size": S.IMAGE_SIZE,
        "preprocess": transform.to_meta(),
        "image": {"file": "image.onnx"},
        "text": {"file": "text.onnx", "dynamic_length": True},
        "tokenizer": {"kind": "wordpiece", "file": "tokenizer.json", "max_length": MAX_TEXT_TOKENS},
        "starter": {
            "class_emb": "class_emb.npy",
            "top_t": int(encoder.config.top_t),
            "temperature": float(encoder.config.temperature),
        },
        "_sources": sources,
    }, None
