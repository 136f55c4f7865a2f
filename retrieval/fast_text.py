"""Torch-free text encoders for queries: the index's own text tower, exported at index time, run in numpy.

`import torch, open_clip` costs seconds, and a sentence query needs only the text tower. So when an index
is built, `export_text_encoder` writes the text tower's weights and a small config into the index
directory, and `Searcher.embed_text` runs them here with numpy alone:

    text_encoder.json          config, model identity, export id, file sizes (written last: the commit)
    text_encoder.safetensors   weights, float32, pre-transposed to [in, out] and column-blocked (below);
                               export id in its metadata
    text_encoder.bpe.txt       CLIP: the BPE merges open_clip uses (retrieval/clip_tokenizer.py)
    text_encoder.tokenizer.json  starter: the MiniLM WordPiece tokenizer, with its truncation settings

Supported: open_clip models whose text tower is the standard CLIP transformer (pre-LN blocks, GELU /
QuickGELU / tanh-GELU, causal or no mask, argmax / eos / first / last pooling, matrix or linear projection),
and the starter model's MiniLM (post-LN BERT, mean pooling, L2 normalisation). Anything else is not
exported and queries use the torch encoder, as before.

Exactness: the export is checked against the torch encoder when it is written (token ids on a set of probe
strings, and embeddings within EXPORT_TOLERANCE); if the check fails, nothing is exported. A reader uses an
export only if its identity equals the index manifest's model and its files carry the same export id, so a
stale or half-replaced export is ignored (the torch path answers), never used.

With the causal mask, the pooled end-of-text output depends only on the tokens up to it, so only those
L tokens are computed (not the padded context of 77), and the last layer computes only that one row.

Weight layout (format version 2). A query multiplies a few rows ([L, 512], L ~ 10) by each weight matrix,
and OpenBLAS's general sgemm spends that product copying ("packing") the whole matrix first: on the 2-core
sandbox the ViT-B-32 tower's products took 24 ms on one thread for 151 MB of weights. Stored as column
blocks [N / c, K, c] (c = BLOCK_COLUMNS for K), each block is a small contiguous product that OpenBLAS
computes without packing (its "direct" sgemm on AVX-512 machines, used while M * K * c < 2**20), and one
np.matmul call runs all blocks: 9.7 ms on one thread, 2.4x less. Where no such path exists, the blocks cost
what the whole product did (each one is a normal sgemm). Blocks split between threads without partial sums,
so a result does not depend on the thread count. Version 1 exports (plain [K, N]) are still read, and the
next `index` run rewrites them.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import write_atomic as _write_atomic

FORMAT = "retrieval-text-encoder"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: unblocked [K, N] weights
CONFIG_NAME = "text_encoder.json"
WEIGHTS_NAME = "text_encoder.safetensors"
BPE_NAME = "text_encoder.bpe.txt"
WORDPIECE_NAME = "text_encoder.tokenizer.json"
ENV_DISABLE = "RETRIEVAL_NO_FAST_TEXT"  # set to 1 to always use the torch text encoder
EXPORT_TOLERANCE = 1e-5  # max abs difference vs the torch encoder accepted at export time
PROBE_TEXTS = (
    "a photo of a dog", "", "A Red Bicycle leaning on a WALL, at night!", "naïve café 東京 🐶 &amp; <b>x</b>",
    "it's 3.14 o'clock", "word " * 120,
)
_IDENTITY_KEYS = ("arch", "pretrained", "weights_sha256", "dim")


class UnsupportedTextTower(Exception):
    """The model's text tower is not one this module can run; the torch encoder stays in charge."""


def disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------------------------------
# Weights file: safetensors format, read through one read-only mmap (pages load as they are touched)

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], mmap.mmap]:
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        (n,) = struct.unpack("<Q", mm[:8])
        if n > len(mm) - 8:
            raise ValueError("bad safetensors header length")
        header = json.loads(mm[8 : 8 + n])
        meta = header.pop("__metadata__", {}) or {}
        base = 8 + n
        out = {}
        for name, h in header.items():
            dtype = np.dtype(_ST_DTYPES[h["dtype"]])
            start, end = h["data_offsets"]
            count = int(np.prod(h["shape"], dtype=np.int64)) if h["shape"] else 1
            if end - start != count * dtype.itemsize or base + end > len(mm):
                raise ValueError(f"bad safetensors entry {name}")
            out[name] = np.frombuffer(mm, dtype=dtype, count=count, offset=base + start).reshape(h["shape"])
    except Exception:
        out = {}
        try:
            mm.close()
        except BufferError:
            pass
        raise
    return out, meta, mm


# --------------------------------------------------------------------------------------------------
# BLAS threads. One query's matmuls are small ([L, 512] x [512, 2048]); on the shared 2-core sandbox
# OpenBLAS's default 2 threads took a median of 56 ms for one such product under load vs 0.6 ms on one
# thread (spinning workers that wait for a core). So the encoder runs BLAS on BLAS_THREADS threads.

BLAS_THREADS: int | None = 1
_BLAS_FUNCS: tuple | None = None


def _openblas_funcs():
    """(get, set) for the OpenBLAS numpy uses, found in this process's mapped libraries; (None, None)
    elsewhere (other BLAS, other OS): then threads are left alone."""
    global _BLAS_FUNCS
    if _BLAS_FUNCS is None:
        _BLAS_FUNCS = (None, None)
        try:
            import ctypes

            with open("/proc/self/maps") as f:
                libs = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and "numpy" in ln.lower()})
            for path in libs:
                lib = ctypes.CDLL(path)
                for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("scipy_openblas", ""), ("openblas", "")):
                    get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                    set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                    if get is not None and set_ is not None:
                        get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                        _BLAS_FUNCS = (get, set_)
                        return _BLAS_FUNCS
        except (OSError, AttributeError, ValueError):
            pass
    return _BLAS_FUNCS


class _blas_threads:
    def __init__(self, n: int | None):
        self.n, self.before = n, None

    def __enter__(self):
        get, set_ = _openblas_funcs() if self.n else (None, None)
        if get is not None:
            self.before = get()
            if self.before != self.n:
                set_(self.n)
            else:
                self.before = None
        return self

    def __exit__(self, *exc):
        if self.before is not None:
            _openblas_funcs()[1](self.before)


# Query threads. A query's matmuls are memory-bound (a ViT-B-32 text tower streams 151 MB of weights per
# sentence), so a second core nearly halves them. Rather than BLAS threads (above), each weight matrix is
# split by input rows into QUERY_THREADS contiguous blocks: helper threads take blocks and the calling
# thread takes whatever no helper has started yet, so with no free core it costs about what one thread does.
# The partial products are added in block order whoever computed them, so results do not depend on timing.

def _query_threads() -> tuple[int, int]:
    """(threads for plain weights, threads for blocked weights): RETRIEVAL_QUERY_THREADS for both, else the
    CPU count up to 4 and 1. A value that is not a number is ignored.

    Blocked products are not split by default: on the 2-core sandbox the blocked ViT-B-32 tower took
    10.3 ms on one thread and 11.3 ms split in two. Each product is then ~0.2 ms, the hand-off costs
    about as much as it saves, and two cores streaming disjoint weights at once finish only ~1.4x sooner
    (7.0 vs 9.7 ms with no hand-off at all): the memory bus, not the core, is the limit."""
    value = os.environ.get("RETRIEVAL_QUERY_THREADS", "").strip()
    if value.isdigit():
        return max(1, int(value)), max(1, int(value))
    return min(4, os.cpu_count() or 1), 1


QUERY_THREADS, BLOCKED_THREADS = _query_threads()
SPLIT_MIN_ROWS = 256  # smaller matrices are not worth a hand-off
_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max(1, QUERY_THREADS - 1), thread_name_prefix="retrieval-query")
    return _POOL


def _matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ W for W stored [K, N] or column-blocked [N / c, K, c] (see the module docstring)."""
    if w.ndim == 3:
        return _matmul_blocked(x, w)
    n = QUERY_THREADS
    k = w.shape[0]
    if n < 2 or k < SPLIT_MIN_ROWS or x.ndim != 2:
        return x @ w
    bounds = [k * i // n for i in range(n + 1)]
    parts = _run_split(n, lambda i: x[:, bounds[i] : bounds[i + 1]] @ w[bounds[i] : bounds[i + 1]])
    out = parts[0]
    for r in parts[1:]:
        out += r  # in block order, whoever computed it
    return out


def _matmul_blocked(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    nb, k, c = w.shape
    vec = x.ndim == 1
    x2 = x[None, :] if vec else x
    out = np.empty((nb, x2.shape[0], c), dtype=np.float32)
    n = min(BLOCKED_THREADS, nb)
    if n < 2 or k * nb * c < SPLIT_MIN_ROWS * 512:
        np.matmul(x2, w, out=out)
    else:
        bounds = [nb * i // n for i in range(n + 1)]
        _run_split(n, lambda i: np.matmul(x2, w[bounds[i] : bounds[i + 1]], out=out[bounds[i] : bounds[i + 1]]))
    y = out.transpose(1, 0, 2).reshape(x2.shape[0], nb * c)
    return y[0] if vec else y


def _run_split(n: int, part) -> list:
    """[part(0), ..., part(n-1)]: helper threads take parts, and the calling thread takes any part no helper
    has started yet, so a machine with no free core costs about one thread's time, never a wait."""
    import threading

    claims = [threading.Lock() for _ in range(n)]

    def claimed(i):
        return part(i) if claims[i].acquire(blocking=False) else _NOT_MINE

    futures = [_pool().submit(claimed, i) for i in range(1, n)]
    results = [claimed(i) for i in range(n)]
    return [r if r is not _NOT_MINE else futures[i - 1].result() for i, r in enumerate(results)]


_NOT_MINE = object()


def block_columns(k: int) -> int:
    """Block width for a [k, N] weight: the widest of 64, 32, 16 that keeps a 12-token sentence's product
    under OpenBLAS's direct-sgemm size (M * K * c < 2**20); measured best on the 2-core sandbox."""
    for c in (64, 32):
        if 12 * k * c < (1 << 20):
            return c
    return 16


def to_blocked(w: np.ndarray) -> np.ndarray:
    """[K, N] -> contiguous [N / c, K, c]; unchanged when N is not a multiple of c."""
    k, n = w.shape
    c = block_columns(k)
    if n % c or n == c:
        return np.ascontiguousarray(w)
    return np.ascontiguousarray(w.reshape(k, n // c, c).transpose(1, 0, 2))


def from_blocked(w: np.ndarray) -> np.ndarray:
    """Inverse of to_blocked: [N / c, K, c] -> contiguous [K, N]; 2-D weights unchanged."""
    return np.ascontiguousarray(w.transpose(1, 0, 2).reshape(w.shape[1], -1)) if w.ndim == 3 else w


def logical_shape(w: np.ndarray) -> tuple[int, ...]:
    """The [K, N] shape a (possibly blocked) weight stands for."""
    return (w.shape[1], w.shape[0] * w.shape[2]) if w.ndim == 3 else tuple(w.shape)


# --------------------------------------------------------------------------------------------------
# numpy building blocks (float32, like the torch fp32 path)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdims=True)
    return xc / np.sqrt(var + np.float32(eps)) * w + b


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float32 by Abramowitz & Stegun 7.1.26 (|error| < 6e-7 after float32 rounding): numpy has no
    erf, scipy costs a heavy import, and GELU runs on every layer of a query, so few operations matter."""
    x = np.asarray(x, dtype=np.float32)
    z = np.abs(x)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * z)
    y = t * (np.float32(0.254829592) + t * (np.float32(-0.284496736) + t * (np.float32(1.421413741) + t * (
        np.float32(-1.453152027) + t * np.float32(1.061405429)))))
    return np.copysign(np.float32(1.0) - y * np.exp(-z * z), x)


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    return np.float32(0.5) * x * (np.float32(1.0) + _erf(x * np.float32(1.0 / math.sqrt(2.0))))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)))).astype(np.float32)


def _quick_gelu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(np.float32(-1.702) * x))


ACTIVATIONS = {"gelu": _gelu_erf, "gelu_tanh": _gelu_tanh, "quick_gelu": _quick_gelu}


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)
    return s


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, causal: bool, rows: slice | None = None) -> np.ndarray:
    """q [Lq, d] (already restricted to `rows` of the sequence), k/v [L, d] -> [Lq, d]."""
    Lq, d = q.shape
    L = k.shape[0]
    hd = d // heads
    qh = q.reshape(Lq, heads, hd).transpose(1, 0, 2)
    kh = k.reshape(L, heads, hd).transpose(1, 2, 0)
    vh = v.reshape(L, heads, hd).transpose(1, 0, 2)
    s = (qh @ kh) * np.float32(1.0 / math.sqrt(hd))  # [H, Lq, L]
    if causal:
        first = 0 if rows is None else rows.start
        pos_q = np.arange(first, first + Lq)[:, None]
        s = np.where(np.arange(L)[None, :] > pos_q, np.float32(-np.inf), s)
    a = _softmax(s) @ vh  # [H, Lq, hd]
    return a.transpose(1, 0, 2).reshape(Lq, d)


# --------------------------------------------------------------------------------------------------
# The two text towers


class ClipTextTower:
    """open_clip's text transformer (pre-LN residual blocks) in numpy."""

    def __init__(self, cfg: dict, w: dict[str, np.ndarray]):
        self.cfg = cfg
        self.w = w
        self.layers = int(cfg["layers"])
        self.heads = int(cfg["heads"])
        self.eps = float(cfg["eps"])
        self.causal = bool(cfg["causal"])
        self.pool = cfg["pool"]
        self.eos_id = cfg.get("eos_id")
        self.act = ACTIVATIONS[cfg["activation"]]
        self.context_length = int(cfg["context_length"])
        self.has_ls = bool(cfg.get("layer_scale"))
        self.proj = cfg["projection"]  # "matrix" | "linear" | "none"
        d = int(cfg["width"])
        need = {"token_embedding": (None, d), "positional_embedding": (self.context_length, d),
                "ln_final.weight": (d,), "ln_final.bias": (d,)}
        for i in range(self.layers):
            p = f"layers.{i}."
            need.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "attn.in_proj_weight": (d, 3 * d),
                         p + "attn.in_proj_bias": (3 * d,), p + "attn.out_proj.weight": (d, d), p + "attn.out_proj.bias": (d,),
                         p + "ln_2.weight": (d,), p + "ln_2.bias": (d,), p + "mlp.c_fc.weight": (d, None),
                         p + "mlp.c_fc.bias": (None,), p + "mlp.c_proj.weight": (None, d), p + "mlp.c_proj.bias": (d,)})
            if self.has_ls:
                need.update({p + "ls_1": (d,), p + "ls_2": (d,)})
        if self.proj == "matrix":
            need["text_projection"] = (d, None)
        elif self.proj == "linear":
            need.update({"text_projection.weight": (d, None), "text_projection.bias": (None,)})
        _check_shapes(w, need)

    def pool_index(self, tokens: Sequence[int]) -> int:
        n = self.context_length
        if self.pool == "first":
            return 0
        if self.pool == "last":
            return n - 1
        padded = list(tokens) + [0] * (n - len(tokens))
        if self.pool == "argmax":
            return int(np.argmax(padded))
        if self.pool == "eos":
            return padded.index(self.eos_id) if self.eos_id in padded else 0
        raise UnsupportedTextTower(f"pool type {self.pool}")

    def encode_tokens(self, tokens: Sequence[int], full_context: bool = False) -> np.ndarray:
        """Un-normalised text feature for one token sequence (SOT ... EOT, no padding).

        With the causal mask, rows up to the pooled one see only tokens up to it, so only those L rows are
        computed, and the last layer computes just the pooled row. full_context=True computes all
        context_length rows as torch does (a reference for tests)."""
        n = self.context_length
        idx = self.pool_index(tokens)
        L = idx + 1 if (self.causal and not full_context) else n
        ids = np.zeros(L, dtype=np.int64)
        m = min(L, len(tokens))
        ids[:m] = tokens[:m]
        w, eps = self.w, self.eps
        x = w["token_embedding"][ids] + w["positional_embedding"][:L]
        row = idx  # where the pooled row is in x
        for i in range(self.layers):
            p = f"layers.{i}."
            h = _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
            qkv = _matmul(h, w[p + "attn.in_proj_weight"]) + w[p + "attn.in_proj_bias"]
            d = x.shape[1]
            q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
            rows = None
            if i == self.layers - 1 and not full_context:  # the last layer: only the pooled row matters
                rows = slice(idx, idx + 1)
                q, x, row = q[rows], x[rows], 0
            a = _attention(q, k, v, self.heads, self.causal, rows)
            a = _matmul(a, w[p + "attn.out_proj.weight"]) + w[p + "attn.out_proj.bias"]
            x = x + (a * w[p + "ls_1"] if self.has_ls else a)
            h = _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
            h = self.act(_matmul(h, w[p + "mlp.c_fc.weight"]) + w[p + "mlp.c_fc.bias"])
            h = _matmul(h, w[p + "mlp.c_proj.weight"]) + w[p + "mlp.c_proj.bias"]
            x = x + (h * w[p + "ls_2"] if self.has_ls else h)
        pooled = _layer_norm(x[row : row + 1], w["ln_final.weight"], w["ln_final.bias"], eps)[0]
        if self.proj == "matrix":
            pooled = _matmul(pooled, w["text_projection"])
        elif self.proj == "linear":
            pooled = _matmul(pooled, w["text_projection.weight"]) + w["text_projection.bias"]
        return pooled


class BertTextTower:
    """The starter's MiniLM (BERT, post-LN) with mean pooling, as retrieval/starter.py runs it in torch."""

    def __init__(self, cfg: dict, w: dict[str, np.ndarray]):
        self.cfg = cfg
        self.w = w
        self.layers = int(cfg["layers"])
        self.heads = int(cfg["heads"])
        self.eps = float(cfg["eps"])
        d = int(cfg["width"])
        need = {"word.weight": (None, d), "pos.weight": (None, d), "tok_type.weight": (None, d), "ln.weight": (d,), "ln.bias": (d,)}
        for i in range(self.layers):
            p = f"layers.{i}."
            for name in ("q", "k", "v", "o"):
                need.update({p + name + ".weight": (d, d), p + name + ".bias": (d,)})
            for name in ("ln1", "ln2"):
                need.update({p + name + ".weight": (d,), p + name + ".bias": (d,)})
            need.update({p + "ff1.weight": (d, None), p + "ff1.bias": (None,), p + "ff2.weight": (None, d), p + "ff2.bias": (d,)})
        _check_shapes(w, need)

    def encode_ids(self, ids: Sequence[int]) -> np.ndarray:
        w, eps = self.w, self.eps
        ids = np.asarray(ids, dtype=np.int64)
        L = len(ids)
        x = w["word.weight"][ids] + w["pos.weight"][:L] + w["tok_type.weight"][0]
        x = _layer_norm(x, w["ln.weight"], w["ln.bias"], eps)
        for i in range(self.layers):
            p = f"layers.{i}."
            q = _matmul(x, w[p + "q.weight"]) + w[p + "q.bias"]
            k = _matmul(x, w[p + "k.weight"]) + w[p + "k.bias"]
            v = _matmul(x, w[p + "v.weight"]) + w[p + "v.bias"]
            a = _matmul(_attention(q, k, v, self.heads, causal=False), w[p + "o.weight"]) + w[p + "o.bias"]
            x = _layer_norm(x + a, w[p + "ln1.weight"], w[p + "ln1.bias"], eps)
            h = _gelu_erf(_matmul(x, w[p + "ff1.weight"]) + w[p + "ff1.bias"])
            x = _layer_norm(x + _matmul(h, w[p + "ff2.weight"]) + w[p + "ff2.bias"], w[p + "ln2.weight"], w[p + "ln2.bias"], eps)
        return x.mean(0)


def _check_shapes(w: dict[str, np.ndarray], need: dict[str, tuple]) -> None:
    """Every tensor the forward uses is there with the shape the config implies (None: any size)."""
    for name, shape in need.items():
        t = w.get(name)
        have = None if t is None else logical_shape(t)
        if have is None or len(have) != len(shape) or any(s is not None and s != n for s, n in zip(shape, have)):
            raise UnsupportedTextTower(f"exported weights lack {name} {shape}")


def _normalize(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-12)


class FastTextEncoder:
    """encode_texts(texts) -> L2-normalised float32 [n, dim], with no torch import."""

    def __init__(self, root: Path, cfg: dict, weights: dict[str, np.ndarray], mm: mmap.mmap):
        self.root = root
        self.config = cfg
        self._mm = mm  # keeps the weight views valid
        from .modelspec import ModelIdentity

        self.identity = ModelIdentity.from_dict(cfg["identity"])
        self.dim = int(cfg["identity"]["dim"])
        self.kind = cfg["kind"]
        if self.kind == "clip":
            from .clip_tokenizer import ClipTokenizer

            t = cfg["tokenizer"]
            self.tokenizer = ClipTokenizer.from_file(root / BPE_NAME, int(t["context_length"]), unique_merges=t.get("unique_merges"))
            self.tower = ClipTextTower(cfg["tower"], weights)
        elif self.kind == "bert":
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(root / WORDPIECE_NAME))
            self.tokenizer.no_padding()
            self.tower = BertTextTower(cfg["tower"], weights)
        else:
            raise UnsupportedTextTower(f"unknown export kind {self.kind!r}")

    def token_ids(self, text: str) -> list[int]:
        if self.kind == "clip":
            return self.tokenizer.tokens(text)
        return list(self.tokenizer.encode(str(text)).ids)

    def encode_one(self, text: str) -> np.ndarray:
        ids = self.token_ids(text)
        feat = self.tower.encode_tokens(ids) if self.kind == "clip" else self.tower.encode_ids(ids)
        return _normalize(feat)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 0) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with _blas_threads(BLAS_THREADS):
            for i, t in enumerate(texts):
                out[i] = self.encode_one(t)
        return out

    def close(self) -> None:
        """Drop the weights; the mapping closes once no array view of it is left."""
        self.tower = None
        self._mm = None


# --------------------------------------------------------------------------------------------------
# Loading an export


def read_export_config(root: str | os.PathLike) -> dict | None:
    try:
        cfg = json.loads((Path(root) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or cfg.get("version") not in READ_VERSIONS:
        return None
    return cfg


def identity_matches(export_identity: dict | None, identity) -> bool:
    """The export came from exactly the index's model (spec strings may differ when weights moved)."""
    if not export_identity or identity is None:
        return False
    mine = identity.to_dict() if hasattr(identity, "to_dict") else dict(identity)
    return all(export_identity.get(k) == mine.get(k) for k in _IDENTITY_KEYS)


def load_fast_text_encoder(root: str | os.PathLike, identity) -> FastTextEncoder | None:
    """The exported encoder of the index at root if it is valid for `identity` (the manifest's model), else
    None: no export, another model's export, files from two different exports, or damaged files."""
    if disabled():
        return None
    root = Path(root)
    cfg = read_export_config(root)
    if cfg is None or not identity_matches(cfg.get("identity"), identity):
        return None
    try:
        wpath = root / WEIGHTS_NAME
        files = cfg["files"]
        for name, size in files.items():
            if (root / name).stat().st_size != int(size):
                return None
        weights, meta, mm = _read_safetensors(wpath)
        if meta.get("export_id") != cfg["export_id"]:
            return None  # weights from another export than this config (replaced mid-way)
        return FastTextEncoder(root, cfg, weights, mm)
    except (OSError, ValueError, KeyError, TypeError, UnsupportedTextTower):
        return None


# --------------------------------------------------------------------------------------------------
# Export (index time; torch is loaded then anyway)


def _np(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy(), dtype=np.float32)


def _clip_parts(model):
    """The text tower pieces of an open_clip CLIP / CustomTextCLIP model, or UnsupportedTextTower."""
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "transformer") and hasattr(text, "token_embedding"):
        if getattr(text, "cls_emb", None) is not None:
            raise UnsupportedTextTower("text tower with a CLS embedding")
        return text, getattr(text, "pool_type", "argmax"), getattr(text, "eos_id", None), text.attn_mask
    if all(hasattr(model, a) for a in ("transformer", "token_embedding", "positional_embedding", "ln_final")):
        return model, getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None), getattr(model, "attn_mask", None)
    raise UnsupportedTextTower(f"{type(model).__name__} has no standard CLIP text transformer")


def _activation_name(act) -> str:
    import torch.nn as nn

    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    raise UnsupportedTextTower(f"activation {name}")


def _export_clip(encoder) -> tuple[dict, dict[str, np.ndarray], dict]:
    import torch
    import torch.nn as nn

    model = encoder.model
    tok = encoder.tokenizer
    if type(tok).__name__ != "SimpleTokenizer" or getattr(tok, "reduction_fn", None) is not None:
        raise UnsupportedTextTower(f"tokenizer {type(tok).__name__}")
    if getattr(tok.clean_fn, "__name__", "") != "_clean_lower" or len(tok.encoder) != 49408:
        raise UnsupportedTextTower("tokenizer with non-default cleaning or vocabulary")
    parts, pool, eos_id, attn_mask = _clip_parts(model)
    blocks = list(parts.transformer.resblocks)
    if pool not in ("argmax", "eos", "first", "last"):
        raise UnsupportedTextTower(f"pool type {pool}")
    ctx = int(parts.positional_embedding.shape[0])
    if attn_mask is None:
        causal = False
    else:
        expect = torch.full((ctx, ctx), float("-inf")).triu_(1)
        if tuple(attn_mask.shape) != (ctx, ctx) or not torch.equal(attn_mask.float().cpu(), expect):
            raise UnsupportedTextTower("attention mask is neither causal nor absent")
        causal = True
    w: dict[str, np.ndarray] = {
        "token_embedding": _np(parts.token_embedding.weight),
        "positional_embedding": _np(parts.positional_embedding),
        "ln_final.weight": _np(parts.ln_final.weight),
        "ln_final.bias": _np(parts.ln_final.bias),
    }
    eps = float(parts.ln_final.eps)
    acts, has_ls = set(), False
    for i, b in enumerate(blocks):
        if type(b).__name__ != "ResidualAttentionBlock" or hasattr(b, "ln_1_kv"):
            raise UnsupportedTextTower(f"block type {type(b).__name__}")
        a = b.attn
        if not isinstance(a, nn.MultiheadAttention) or not a._qkv_same_embed_dim or a.bias_k is not None or a.add_zero_attn:
            raise UnsupportedTextTower("non-standard attention")
        if a.in_proj_bias is None or a.out_proj.bias is None:
            raise UnsupportedTextTower("attention without biases")
        for ln in (b.ln_1, b.ln_2):
            if not isinstance(ln, nn.LayerNorm) or ln.weight is None or float(ln.eps) != eps:
                raise UnsupportedTextTower("non-standard layer norm")
        acts.add(_activation_name(b.mlp.gelu))
        p = f"layers.{i}."
        w[p + "ln_1.weight"], w[p + "ln_1.bias"] = _np(b.ln_1.weight), _np(b.ln_1.bias)
        w[p + "attn.in_proj_weight"] = _np(a.in_proj_weight.T)
        w[p + "attn.in_proj_bias"] = _np(a.in_proj_bias)
        w[p + "attn.out_proj.weight"] = _np(a.out_proj.weight.T)
        w[p + "attn.out_proj.bias"] = _np(a.out_proj.bias)
        w[p + "ln_2.weight"], w[p + "ln_2.bias"] = _np(b.ln_2.weight), _np(b.ln_2.bias)
        w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"] = _np(b.mlp.c_fc.weight.T), _np(b.mlp.c_fc.bias)
        w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"] = _np(b.mlp.c_proj.weight.T), _np(b.mlp.c_proj.bias)
        for name in ("ls_1", "ls_2"):
            ls = getattr(b, name)
            if isinstance(ls, nn.Identity):
                w[p + name] = np.ones(a.embed_dim, np.float32)
            elif hasattr(ls, "gamma"):
                w[p + name], has_ls = _np(ls.gamma), True
            else:
                raise UnsupportedTextTower(f"{name} {type(ls).__name__}")
    if len(acts) > 1:
        raise UnsupportedTextTower("mixed activations")
    if not has_ls:
        for k in [k for k in w if k.endswith(("ls_1", "ls_2"))]:
            del w[k]
    proj = parts.text_projection
    if proj is None:
        projection = "none"
    elif isinstance(proj, nn.Linear):
        projection = "linear"
        w["text_projection.weight"] = _np(proj.weight.T)
        w["text_projection.bias"] = _np(proj.bias) if proj.bias is not None else np.zeros(proj.out_features, np.float32)
    else:
        projection = "matrix"
        w["text_projection"] = _np(proj)
    tower = {
        "layers": len(blocks), "width": int(parts.token_embedding.weight.shape[1]), "heads": int(blocks[0].attn.num_heads) if blocks else 1,
        "context_length": ctx, "eps": eps, "causal": causal, "pool": pool, "eos_id": None if eos_id is None else int(eos_id),
        "activation": acts.pop() if acts else "gelu", "layer_scale": has_ls, "projection": projection,
    }
    tokenizer = {"kind": "clip-bpe", "context_length": int(tok.context_length)}
    return tower, w, tokenizer


def _export_bert(encoder) -> tuple[dict, dict[str, np.ndarray], dict]:
    text = encoder.text
    m = text.model
    sd = {k: v for k, v in m.state_dict().items()}
    w: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        # nn.Linear weights are [out, in]: store [in, out] so the forward is x @ W
        is_linear = k.endswith(".weight") and v.ndim == 2 and k.startswith("layers.")
        w[k] = _np(v.T if is_linear else v)
    layer0 = m.layers[0]
    tower = {
        "layers": len(m.layers), "width": int(m.word.weight.shape[1]), "heads": int(layer0.heads),
        "eps": float(m.ln.eps), "pooling": "mean", "normalize": True,
    }
    return tower, w, {"kind": "wordpiece"}


_EMBEDDINGS = ("token_embedding", "positional_embedding", "word.weight", "pos.weight", "tok_type.weight")


def blocked_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The export's layout: every weight the forward multiplies by (x @ W) column-blocked; embedding tables,
    which it indexes, stay as they are."""
    return {k: to_blocked(v) if v.ndim == 2 and k not in _EMBEDDINGS else v for k, v in weights.items()}


def export_text_encoder(encoder, root: str | os.PathLike) -> Path:
    """Write the encoder's text tower into the index directory root (see the module docstring).

    Raises UnsupportedTextTower when the model cannot be run here or the exported copy does not reproduce
    the torch encoder (checked on PROBE_TEXTS); nothing valid is left behind then.
    """
    from safetensors.numpy import save

    root = Path(root)
    ident = encoder.identity
    if getattr(encoder, "model", None) is not None and getattr(encoder, "tokenizer", None) is not None:
        kind = "clip"
        tower, weights, tokenizer = _export_clip(encoder)
    elif getattr(ident, "arch", None) == "starter" and hasattr(encoder, "text"):
        kind = "bert"
        tower, weights, tokenizer = _export_bert(encoder)
    else:
        raise UnsupportedTextTower(f"no numpy text tower for {ident.spec}")
    weights = blocked_weights(weights)
    export_id = uuid.uuid4().hex
    remove_export(root)  # the old config goes first: a crash from here on leaves no valid export
    blob = save(weights, metadata={"export_id": export_id, "format": FORMAT})
    _write_atomic(root / WEIGHTS_NAME, blob)
    files = {WEIGHTS_NAME: len(blob)}
    if kind == "clip":
        from .clip_tokenizer import ClipTokenizer, open_clip_vocab_path, read_merges

        lines = read_merges(open_clip_vocab_path())
        tokenizer["unique_merges"] = ClipTokenizer(lines).unique_merges  # checked once here, trusted at query time
        data = ("#version: 0.2 (open_clip bpe_simple_vocab_16e6, merges used by SimpleTokenizer)\n" + "\n".join(lines)).encode("utf-8")
        _write_atomic(root / BPE_NAME, data)
        files[BPE_NAME] = len(data)
    else:
        data = encoder.text.tokenizer.to_str().encode("utf-8")
        _write_atomic(root / WORDPIECE_NAME, data)
        files[WORDPIECE_NAME] = len(data)
    cfg = {
        "format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "export_id": export_id,
        "identity": ident.to_dict(), "tower": tower, "tokenizer": tokenizer, "files": files,
    }
    _verify_export(encoder, root, cfg)
    _write_atomic(root / CONFIG_NAME, json.dumps(cfg, indent=1, sort_keys=True).encode())
    from .atomic import fsync_dir as _fsync_dir

    _fsync_dir(root)
    return root / CONFIG_NAME


def _verify_export(encoder, root: Path, cfg: dict) -> None:
    """The exported copy must give the torch encoder's token ids and vectors on PROBE_TEXTS."""
    weights, meta, mm = _read_safetensors(root / WEIGHTS_NAME)
    try:
        fast = FastTextEncoder(root, cfg, weights, mm)
        if cfg["kind"] == "clip":
            want = encoder.tokenizer(list(PROBE_TEXTS)).numpy()
            got = fast.tokenizer(list(PROBE_TEXTS))
            if not np.array_equal(want, got):
                raise UnsupportedTextTower("exported tokenizer disagrees with open_clip's")
        ref = encoder.encode_texts(list(PROBE_TEXTS))
        out = fast.encode_texts(list(PROBE_TEXTS))
        err = float(np.abs(ref - out).max())
        if not err <= EXPORT_TOLERANCE:
            raise UnsupportedTextTower(f"exported text tower differs from torch by {err:.2e}")
    except Exception:
        remove_export(root)
        raise
    fast.close()


def remove_export(root: str | os.PathLike) -> None:
    for name in (CONFIG_NAME, WEIGHTS_NAME, BPE_NAME, WORDPIECE_NAME):
        try:
            (Path(root) / name).unlink()
        except FileNotFoundError:
            pass


def export_is_current(root: str | os.PathLike, identity) -> bool:
    """A complete export for this model identity is in place (checked without loading any model)."""
    root = Path(root)
    cfg = read_export_config(root)
    if cfg is None or cfg.get("version") != FORMAT_VERSION or not identity_matches(cfg.get("identity"), identity):
        return False
    try:
        return all((root / n).is_file() and (root / n).stat().st_size == int(s) for n, s in cfg.get("files", {}).items())
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def ensure_text_export(encoder, root: str | os.PathLike) -> bool:
    """Index-time hook: export the encoder's text tower unless a valid export for it already exists.
    Never raises for an unsupported model or an I/O problem (queries then use torch); returns whether a
    valid export is in place."""
    root = Path(root)
    if export_is_current(root, encoder.identity):
        return True
    try:
        export_text_encoder(encoder, root)
        return True
    except Exception as e:  # noqa: BLE001 - an optimisation: indexing goes on, queries use torch
        import logging

        level = logging.INFO if isinstance(e, UnsupportedTextTower) else logging.WARNING
        logging.getLogger(__name__).log(level, "text encoder not exported for fast queries: %s", e)
        try:
            remove_export(root)
        except OSError:
            pass
        return False
