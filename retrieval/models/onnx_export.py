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

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from retrieval.faults import checkpoint
from retrieval.models.onnx_runtime import (
    FORMAT,
    FORMAT_VERSION,
    META_NAME,
    REVISION,
    ExportUnusable,
    OnnxEncoder,
    cache_root,
    export_dir,
    export_key,
    open_export,
    read_meta,
    remake_due,
    warn_once,
)
from retrieval.models.onnx_towers import ExportFailed, _export_clip, _export_starter
from retrieval.models.onnx_write import OPSET, preoptimise
from retrieval.models.preprocess import ImageTransform
from retrieval.store.atomic import fsync_dir, write_atomic

TOLERANCE = 1e-5  # max abs difference of the normalised outputs, onnxruntime vs torch, both fp32 on the CPU
STALE_TMP_S = 3600.0  # a temp export older than this belongs to a killed run
PROBE_TEXTS = (
    "a photo of a dog",
    "",
    "A Red Bicycle leaning on a WALL, at night!",
    "naïve café 東京 🐶 &amp; <b>x</b>",
    "it's 3.14 o'clock",
    "word " * 120,
)


# --------------------------------------------------------------------------------------------------
# open_clip


# --------------------------------------------------------------------------------------------------
# The starter


# --------------------------------------------------------------------------------------------------
# Shared steps


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
        if remake_due(enc.meta):  # made by an older version: no need to open its sessions
            return None
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
        import onnxruntime

        for tower in ("image", "text"):
            if preoptimise(tmp / meta[tower]["file"]):
                meta[tower]["optimised"] = {"level": "extended", "onnxruntime": onnxruntime.__version__}
        from retrieval.hashing import sha256_file

        meta.update(
            format=FORMAT,
            version=FORMAT_VERSION,
            revision=REVISION,
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
        if final.exists():  # damaged or of an older revision: move it aside in one rename, then delete
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
