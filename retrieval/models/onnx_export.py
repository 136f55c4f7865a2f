"""Export a loaded torch encoder's towers to ONNX, once per model per user (layout: retrieval/models/onnx_runtime.py).

torch's TorchScript-based exporter (`dynamo=False`) is used: it exports open_clip's towers and the
starter's parts as they are, in seconds, and the outputs match torch to ~1e-7. fp32, a dynamic batch and,
for text towers with a causal mask, a dynamic token length. Every export is checked on the CPU in fp32
against torch before it is published (TOLERANCE on the L2-normalised outputs, and the preprocessing and
tokens for equality), whatever device the index is built on. Exports are built in a temp directory beside
the final one and renamed into place whole; a killed export leaves only a `.<key>.*.tmp` directory that
the next export removes.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from retrieval.faults import checkpoint
from retrieval.models.onnx_runtime import (
    FORMAT,
    FORMAT_VERSION,
    META_NAME,
    ExportUnusable,
    ImageTransform,
    OnnxEncoder,
    cache_root,
    export_dir,
    export_key,
    open_export,
    read_meta,
    warn_once,
)
from retrieval.store.atomic import fsync_dir, write_atomic

TOLERANCE = 1e-5  # max abs difference of the normalised outputs, onnxruntime vs torch, both fp32 on the CPU
OPSET = 17
DYNAMO_OPSET = 18
STALE_TMP_S = 3600.0  # a temp export older than this belongs to a killed run
PROBE_TEXTS = (
    "a photo of a dog",
    "",
    "A Red Bicycle leaning on a WALL, at night!",
    "naïve café 東京 🐶 &amp; <b>x</b>",
    "it's 3.14 o'clock",
    "word " * 120,
)


class ExportFailed(Exception):
    """The model cannot be exported (or its export does not reproduce torch); the message says why."""


# --------------------------------------------------------------------------------------------------
# open_clip


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


# --------------------------------------------------------------------------------------------------
# The starter


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


# --------------------------------------------------------------------------------------------------
# Shared steps


def _cpu_fp32(module, device: str):
    """The module itself when it already runs fp32 on the CPU, else a CPU fp32 copy (export and check
    always run there, so an index built on CUDA gets the same export)."""
    import torch

    if str(device) == "cpu" and all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).float().cpu()


def _onnx_export(module, args, path: Path, inputs: list[str], dynamic: dict, max_length: int | None = None) -> None:
    """Image towers (dynamic batch) go through the TorchScript exporter; towers with a dynamic token length
    (max_length given) through torch.export (dynamo), as the TorchScript trace bakes the length into
    nn.MultiheadAttention's reshapes."""
    import contextlib
    import io

    import torch

    # with grad enabled: nn.MultiheadAttention's no-grad fast path (_native_multi_head_attention) has no ONNX op
    with (
        warnings.catch_warnings(),
        torch.inference_mode(False),
        torch.enable_grad(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        if max_length is None:
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=inputs,
                output_names=["output"],
                dynamic_axes={**dynamic, "output": {0: "n"}},
                opset_version=OPSET,
                dynamo=False,
            )
        else:
            n, length = torch.export.Dim("n", min=1), torch.export.Dim("length", min=1, max=int(max_length))
            shapes = tuple({0: n, 1: length} for _ in args)
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=inputs,
                output_names=["output"],
                dynamic_shapes=shapes,
                opset_version=DYNAMO_OPSET,
                dynamo=True,
                verbose=False,
                external_data=False,
            )
    _weights_beside(path)


def _weights_beside(path: Path) -> None:
    """Move the weights into `<name>.data` beside the graph: onnxruntime then maps them from the file instead of
    copying them out of the protobuf, which makes opening a session ~4x cheaper (ViT-B-32 text tower: 0.12 s
    of CPU against 0.5 s; RESULTS_onnx.md), at the same speed per query."""
    import onnx

    model = onnx.load(str(path))
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def _probe_images(transform: ImageTransform) -> list:
    from PIL import Image

    rng = np.random.default_rng(1234)
    s = max(transform.crop)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in ((2 * s + 1, s + 3), (s // 2 + 1, s - 1), (s, s), (3 * s, 2 * s + 1))
    ]


def _verify(encoder, ref_model, onnx: OnnxEncoder) -> dict:
    """Max abs differences onnxruntime vs torch (CPU, fp32); ExportFailed beyond TOLERANCE."""
    import torch

    checks = {}
    ims = _probe_images(onnx.preprocess)
    pre = max(float(np.abs(np.asarray(encoder.preprocess(im)) - onnx.preprocess(im)).max()) for im in ims)
    checks["preprocess"] = pre
    if pre > TOLERANCE:
        raise ExportFailed(f"the torch-free preprocessing differs from torch's by {pre:.2g}")
    pixels = np.stack([onnx.preprocess(im) for im in ims])
    texts = list(PROBE_TEXTS)
    with torch.no_grad():
        if ref_model is not None:  # open_clip
            ref_img = ref_model.encode_image(torch.from_numpy(pixels)).numpy()
            tokens = encoder.tokenizer(texts)
            if not np.array_equal(onnx._tok()(texts), np.asarray(tokens)):
                raise ExportFailed("the torch-free tokenizer gives other tokens than open_clip's")
            ref_txt = ref_model.encode_text(torch.as_tensor(tokens)).numpy()
        else:  # the starter: its encoder is on the CPU in fp32 already, or a copy is made
            enc = encoder if encoder.device == "cpu" else None
            if enc is None:
                from retrieval.models.starter import load_starter

                enc = load_starter(device="cpu", config=encoder.config)
            ref_img = enc.encode_image_tensors(torch.from_numpy(pixels))
            ref_txt = enc.encode_texts(texts)
    from retrieval.vecmath import l2_normalize

    for name, ref, got in (
        ("image", ref_img, onnx.encode_image_tensors(pixels)),
        ("image_one", ref_img[:1], onnx.encode_image_tensors(pixels[:1])),
        ("text", ref_txt, onnx.encode_texts(texts)),
        ("text_one", ref_txt[:1], onnx.encode_texts(texts[:1])),
    ):
        diff = float(np.abs(l2_normalize(ref) - got).max())
        checks[name] = diff
        if not diff <= TOLERANCE:
            raise ExportFailed(
                f"the ONNX {name.split('_')[0]} tower differs from torch by {diff:.2g} (tolerance {TOLERANCE:g})"
            )
    return checks


def _remove_stale(root: Path) -> None:
    now = time.time()
    for p in root.glob(".*.tmp"):
        try:
            if now - p.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _fsync_tree(d: Path) -> None:
    for p in d.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(d)


def usable_export(identity) -> Path | None:
    """The cached export's directory when it is complete and its sessions open; else None (a damaged one
    is reported in one line)."""
    d = export_dir(export_key(identity))
    try:
        enc = open_export(d, purpose="index")
        enc.check()
        return d
    except ExportUnusable as e:
        if "no ONNX export" not in str(e):
            warn_once(f"{e}; exporting it again")
        return None


def ensure_export(encoder) -> Path:
    """The directory of the encoder's export in the cache, exporting and checking it first if it is not there
    (or is damaged). ExportFailed when the model cannot be exported; nothing is left behind then."""
    key = export_key(encoder.identity)
    found = usable_export(encoder.identity)
    if found is not None:
        return found
    from retrieval.models.openclip import OpenClipEncoder
    from retrieval.models.starter import StarterEncoder

    root = cache_root()
    final = export_dir(key)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
    except OSError as e:
        raise ExportFailed(f"cannot write to the cache {root}: {e.strerror or e}") from None
    try:
        if isinstance(encoder, OpenClipEncoder):
            meta, ref = _export_clip(encoder, tmp)
            weights = getattr(encoder, "weights_path", None)
            sources = {str(Path(weights).resolve()): None} if weights else {}
        elif isinstance(encoder, StarterEncoder):
            meta, ref = _export_starter(encoder, tmp)
            sources = meta.pop("_sources")
        else:
            raise ExportFailed(f"{type(encoder).__name__} has no ONNX exporter")
        from retrieval.hashing import sha256_file

        meta.update(
            format=FORMAT,
            version=FORMAT_VERSION,
            key=key,
            identity=encoder.identity.to_dict(),
            sources={p: sha256_file(p) for p in sources},
            tolerance=TOLERANCE,
            opset=OPSET,
            files={p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
        )
        meta["checks"] = _verify(encoder, ref, OnnxEncoder(tmp, meta))
        _fsync_tree(tmp)
        write_atomic(tmp / META_NAME, json.dumps(meta, indent=1, sort_keys=True).encode())  # the commit, last
        fsync_dir(tmp)
        checkpoint("onnx_export")
        if final.exists():  # damaged: move it aside in one rename, then delete
            old = root / f".{key}.old.{os.getpid()}.tmp"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process published the same export first
            read_meta(final)
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(root)
        return final
    except ExportFailed:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportFailed(f"cannot write the export to {root}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - the exporter's many failure types on an unusual architecture
        shutil.rmtree(tmp, ignore_errors=True)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ExportFailed(f"torch.onnx.export failed ({type(e).__name__}: {first})") from None
