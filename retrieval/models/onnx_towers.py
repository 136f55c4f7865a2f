"""The towers each kind of model exports: open_clip's image and text towers, the starter's CNN and MiniLM."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from retrieval.models.onnx_write import _cpu_fp32, _onnx_export
from retrieval.models.preprocess import ImageTransform


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
        # the text tower's parts, its transformer replaced by the plain-attention copy
        def __init__(self, m):
            super().__init__()
            self.token_embedding, self.ln_final = m.token_embedding, m.ln_final
            self.positional_embedding, self.text_projection = m.positional_embedding, m.text_projection
            self.register_buffer("attn_mask", m.attn_mask, persistent=False)
            self.transformer = _plain_attention(m.transformer)

        def forward(self, tokens):
            n = tokens.shape[1]
            x = self.token_embedding(tokens) + self.positional_embedding[:n]
            x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
            x = self.ln_final(x)
            x = text_global_pool(x, tokens, pool, eos_token_id=eos_id)
            p = self.text_projection
            if p is not None:
                x = p(x) if isinstance(p, nn.Linear) else x @ p
            return x

    del torch
    return Causal(m), True


def _plain_attention(transformer):
    """A copy of open_clip's text transformer whose nn.MultiheadAttention layers are PlainSelfAttention (same
    weights), or the transformer itself when a layer is of another kind. Exported through torch.export,
    nn.MultiheadAttention becomes ~40 reshape/transpose/slice nodes per layer; onnxruntime runs each as a
    kernel, which made a 9-token ViT-B-32 query ~1.3x slower (RESULTS_onnx.md)."""
    import copy

    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not all(_plain_ok(getattr(b, "attn", None)) for b in blocks):
        return transformer
    plain = _plain_attention_class()  # defined here: this module is imported without torch
    shadow = copy.deepcopy(transformer)
    for b in shadow.resblocks:
        b.attn = plain(b.attn)
    return shadow


def _plain_ok(mha) -> bool:
    from torch import nn

    return (
        type(mha) is nn.MultiheadAttention
        and mha.batch_first
        and mha._qkv_same_embed_dim
        and mha.in_proj_bias is not None
        and mha.bias_k is None
        and not mha.add_zero_attn
    )


def _plain_attention_class():
    import torch
    from torch import nn

    class PlainSelfAttention(nn.Module):
        """nn.MultiheadAttention's self-attention (batch first, packed q/k/v projection, additive mask) as plain
        tensor operations over the same parameters; checked against torch like every export."""

        def __init__(self, mha):
            super().__init__()
            self.heads = int(mha.num_heads)
            self.in_proj_weight, self.in_proj_bias, self.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj

        def forward(self, q, k=None, v=None, need_weights=False, attn_mask=None, **_):
            b, n, width = q.shape
            hd = width // self.heads
            qkv = nn.functional.linear(q, self.in_proj_weight, self.in_proj_bias)
            qkv = qkv.reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
            scores = (qkv[0] * hd**-0.5) @ qkv[1].transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            out = (torch.softmax(scores, dim=-1) @ qkv[2]).transpose(1, 2).reshape(b, n, width)
            return self.out_proj(out), None

    return PlainSelfAttention


def _check_clip_tokenizer(tok) -> None:
    if type(tok).__name__ != "SimpleTokenizer" or getattr(tok, "reduction_fn", None) is not None:
        raise ExportFailed(f"tokenizer {type(tok).__name__} has no torch-free equivalent here")
    if getattr(tok.clean_fn, "__name__", "") != "_clean_lower" or len(tok.encoder) != 49408:
        raise ExportFailed("tokenizer with non-default cleaning or vocabulary")


def _export_clip(encoder, tmp: Path) -> tuple[dict, object]:
    import torch

    from retrieval.models.tokenizer import (
        MERGES_NAME,
        RANKS_NAME,
        ClipTokenizer,
        open_clip_vocab_path,
        read_merges,
        write_ranks,
    )

    _check_clip_tokenizer(encoder.tokenizer)
    vocab = open_clip_vocab_path()
    if vocab is None:
        raise ExportFailed("open_clip's BPE vocabulary file was not found")
    # only the merges open_clip uses, uncompressed: a cold query reads them in a tenth of the time
    merges = read_merges(vocab)
    (tmp / MERGES_NAME).write_text("\n".join(["#version: open_clip merges in use", *merges]) + "\n", "utf-8")
    unique = ClipTokenizer(merges).unique_merges
    if unique and not write_ranks(tmp / RANKS_NAME, merges):
        raise OSError(f"cannot write {tmp / RANKS_NAME}")
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
        "tokenizer": {"kind": "clip-bpe", "file": MERGES_NAME, "context_length": ctx, "unique_merges": unique},
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
