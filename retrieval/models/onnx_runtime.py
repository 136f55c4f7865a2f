"""Run a model's ONNX export with onnxruntime: queries and CPU indexing without importing torch.

An export (written by retrieval/models/onnx_export.py) lives once per user and model in the cache,

    $RETRIEVAL_CACHE_DIR/onnx/<key>/      (default: $XDG_CACHE_HOME/retrieval/onnx, ~/.cache/retrieval/onnx)
        meta.json        format, model identity, file sizes, preprocessing, tokenizer, checks (written last)
        image.onnx       pixels [n, 3, H, W] float32 -> features [n, d] (starter: ImageNet logits [n, 1000]);
                         its weights in image.onnx.data (mapped by onnxruntime, not copied)
        text.onnx        tokens [n, L] int64 (starter: + attention mask) -> features [n, d]; + text.onnx.data
        bpe_merges.txt / tokenizer.json   the tokenizer's files (open_clip: the BPE merges in use, plain text)
        class_emb.npy    starter: the ConSE class-embedding matrix

keyed by `export_key(identity)`: the weights' sha256 (for random-init `ARCH:none` models, the identity
modelspec.py records), so every index of one model shares one export. The export directory is renamed
into place whole, so a killed export never leaves a directory that is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from retrieval.hashing import sha256_file
from retrieval.models.base import Encoder
from retrieval.models.preprocess import ImageTransform, conse_numpy
from retrieval.modelspec import ModelIdentity
from retrieval.vecmath import l2_normalize

FORMAT = "retrieval-onnx"
FORMAT_VERSION = 2  # 2: weights in <tower>.onnx.data beside each graph
# What made an export of this format. An older revision still answers queries; `retrieval index` re-makes it
# where torch is installed. 2: open_clip text towers with plain attention (onnx_towers._plain_attention), every
# graph pre-optimised by onnxruntime (onnx_write.preoptimise).
REVISION = 2
META_NAME = "meta.json"
ENV_CACHE = "RETRIEVAL_CACHE_DIR"
QUERY_TEXT_THREADS = 2  # a cold query's first text session: 21 ms against 33 on one thread (RESULTS_onnx.md)


class ExportUnusable(Exception):
    """The export in the cache is missing, damaged or of another format; the message says which."""


def cache_root() -> Path:
    env = os.environ.get(ENV_CACHE)
    base = (
        Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "retrieval"
    )
    return base / "onnx"


def export_key(identity: ModelIdentity) -> str:
    """One key per model: the weights decide (a path may move), else the random-init identity."""
    ident = {
        "arch": identity.arch,
        "dim": int(identity.dim),
        "weights_sha256": identity.weights_sha256,
        "pretrained": None if identity.weights_sha256 else identity.pretrained,
    }
    blob = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "identity": ident}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def export_dir(key: str) -> Path:
    return cache_root() / key


_warned: set[str] = set()
_warn_lock = threading.Lock()


def warn_once(message: str) -> None:
    """One line on stderr, once per process and message."""
    with _warn_lock:
        if message in _warned:
            return
        _warned.add(message)
    print(f"retrieval: {message}", file=sys.stderr, flush=True)


def set_aside(directory: Path) -> None:
    """Move an unusable export out of the way in one rename (readers that have it open keep their copy), so
    that the next `index` run, which only checks that an export is there, makes it again. The stale
    temp-directory sweep of retrieval/models/onnx_export.py deletes it later. Best effort: the cache may be
    read-only for this process."""
    try:
        os.rename(directory, directory.parent / f".{directory.name}.damaged.{os.getpid()}.{time.time_ns()}.tmp")
    except OSError:
        pass


def read_meta(directory: Path) -> dict:
    """The export's meta.json after checking that every file it names is there at its recorded size."""
    try:
        meta = json.loads((directory / META_NAME).read_text())
    except FileNotFoundError:
        raise ExportUnusable(f"no ONNX export at {directory}") from None
    except (OSError, ValueError) as e:
        raise ExportUnusable(f"the ONNX export at {directory} is damaged ({META_NAME}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ExportUnusable(f"the ONNX export at {directory} has another format")
    for name, size in (meta.get("files") or {}).items():
        p = directory / name
        try:
            actual = p.stat().st_size
        except OSError:
            raise ExportUnusable(f"the ONNX export at {directory} is damaged ({name} is missing)") from None
        if actual != size:
            raise ExportUnusable(f"the ONNX export at {directory} is damaged ({name} is {actual} bytes, not {size})")
    return meta


def remake_due(meta: dict) -> bool:
    """True when the export predates REVISION (for its kind) and torch is here to make it again."""
    import importlib.util

    old = meta.get("kind") == "clip" and int(meta.get("revision", 1)) < REVISION
    return old and importlib.util.find_spec("torch") is not None


def find_by_spec(spec: str) -> Path | None:
    """The cached export of a model named by spec, found without torch: its meta names the spec, and every
    source file (weights, tokenizer) it was made from still has the recorded sha256."""
    root = cache_root()
    try:
        candidates = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return None
    for d in candidates:
        try:
            meta = read_meta(d)
        except ExportUnusable:
            continue
        if meta.get("identity", {}).get("spec") != spec:
            continue
        try:
            if all(sha256_file(p) == h for p, h in (meta.get("sources") or {}).items()):
                return d
        except OSError:
            continue
    return None


# --------------------------------------------------------------------------------------------------
# The encoder


def _session(path: Path, threads: int | None, prepack: bool = True, optimised: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if optimised:  # onnx_write.preoptimise did the graph's optimisation when the export was made
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not prepack:
        # a cold query runs each tower once: prepacking the weights costs more than it saves (RESULTS_onnx.md)
        so.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # idle workers sleep instead of spinning: a spinning thread takes a core from the decode worker and the
    # other processes (docs/fast-queries.md)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable or truncated models
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportUnusable(f"the ONNX export file {path} is damaged ({first})") from None


class OnnxEncoder(Encoder):
    """A model's towers on onnxruntime's CPU provider. Same interface and outputs as the torch encoders."""

    runtime = "onnx"

    def __init__(
        self,
        directory: Path,
        meta: dict,
        *,
        image_threads: int | None = None,
        text_threads: int | None = None,
        prepack: bool = True,
    ):
        self.directory = Path(directory)
        self.meta = meta
        self.key = meta["key"]
        self.identity = ModelIdentity.from_dict(meta["identity"])
        self.kind = meta["kind"]
        self.preprocess = ImageTransform.from_meta(meta["preprocess"])
        self.image_size = int(meta["image_size"])
        self._threads = {"image": image_threads, "text": text_threads}
        self._prepack = bool(prepack)
        self._sessions: dict = {}
        self._used: set[str] = set()  # towers that have run once
        self._lock = threading.Lock()
        self._tokenizer = None
        self._class_emb = None
        self.fallback = None  # () -> torch Encoder, used (with one line on stderr) if a session cannot open

    def _torch_instead(self, e: Exception):
        if self.fallback is None:
            raise e
        warn_once(f"{e}; running on torch (the next `retrieval index` run re-makes the export)")
        set_aside(self.directory)
        return self.fallback()

    def _get(self, tower: str, use: bool = True, pack: bool | None = None):
        """The tower's session. A query's encoder first opens it unprepacked (fast to open); a second use (serve,
        the Python API) swaps in a prepacked one, whose forward passes are about twice as fast. pack=False opens
        it unprepacked whatever the encoder's purpose (a check that need not pay for prepacking)."""
        with self._lock:
            s, was_packed = self._sessions.get(tower, (None, False))
            packed = (self._prepack or tower in self._used) if pack is None else pack
            if s is None or (packed and not was_packed):
                # a query encoder's second use is a long-lived process (serve, the Python API): there the
                # default thread count (the cores) streams the weights faster than one (RESULTS_onnx.md)
                threads = None if packed and not self._prepack else self._threads[tower]
                optimised = bool(self.meta[tower].get("optimised"))
                s = _session(self.directory / self.meta[tower]["file"], threads, packed, optimised)
                self._sessions[tower] = (s, packed)
            if use:
                self._used.add(tower)
            return s

    def check(self) -> None:
        """Open both sessions now (a damaged file raises ExportUnusable here, not in the middle of a run). The
        text tower is opened without prepacking: an index run without captions never uses it, and a prepacked
        session costs ~0.5 s and its own copy of the weights; a first use re-opens it prepacked."""
        self._get("image", use=False)
        self._get("text", use=False, pack=False)

    # -- images --
    def encode_image_tensors(self, batch) -> np.ndarray:
        x = batch.numpy() if hasattr(batch, "numpy") and not isinstance(batch, np.ndarray) else batch
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            session = self._get("image")
        except ExportUnusable as e:
            import torch

            return self._torch_instead(e).encode_image_tensors(torch.from_numpy(x))
        out = session.run(None, {"pixels": x})[0]
        if self.kind == "starter":
            if self._class_emb is None:
                self._class_emb = np.load(self.directory / self.meta["starter"]["class_emb"], allow_pickle=False)
            cfg = self.meta["starter"]
            return conse_numpy(out, self._class_emb, cfg["top_t"], cfg["temperature"])
        return l2_normalize(out)

    def encode_images(self, images: Iterable, batch_size: int = 64) -> np.ndarray:
        from retrieval.images import load_image  # PIL: not imported for a text query

        out, buf = [], []
        for item in images:
            buf.append(self.preprocess(load_image(item, self.image_size)))
            if len(buf) == batch_size:
                out.append(self.encode_image_tensors(np.stack(buf)))
                buf = []
        if buf:
            out.append(self.encode_image_tensors(np.stack(buf)))
        return np.concatenate(out, axis=0) if out else np.zeros((0, self.dim), dtype=np.float32)

    # -- texts --
    def _tok(self):
        if self._tokenizer is None:
            t = self.meta["tokenizer"]
            if t["kind"] == "clip-bpe":
                from retrieval.models.tokenizer import ClipTokenizer

                self._tokenizer = ClipTokenizer.from_file(
                    self.directory / t["file"], context_length=t["context_length"], unique_merges=t.get("unique_merges")
                )
            else:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(self.directory / t["file"]))
                tok.enable_truncation(max_length=int(t["max_length"]))
                tok.enable_padding(pad_id=0, pad_token="[PAD]")
                self._tokenizer = tok
        return self._tokenizer

    def _text_batch(self, texts: list[str]) -> dict:
        tok = self._tok()
        if self.kind == "starter":
            enc = tok.encode_batch(texts)
            return {
                "ids": np.array([e.ids for e in enc], dtype=np.int64),
                "mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            }
        ids = tok(texts)
        if self.meta["text"].get("dynamic_length"):
            # causal mask: the pooled end-of-text row sees only the tokens before it, so the padding after the
            # longest text's end is never looked at and need not be computed
            last = int(np.max(np.count_nonzero(ids, axis=1)))
            ids = ids[:, : max(1, last)]
        return {"tokens": np.ascontiguousarray(ids)}

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        try:
            session = self._get("text")
        except ExportUnusable as e:
            return self._torch_instead(e).encode_texts(texts, batch_size)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(texts), batch_size):
            idx = order[s : s + batch_size]
            out[idx] = l2_normalize(session.run(None, self._text_batch([texts[i] for i in idx]))[0])
        return out


def open_export(directory: Path, *, purpose: str = "query") -> OnnxEncoder:
    """An OnnxEncoder over the export in directory. purpose "query": text on QUERY_TEXT_THREADS threads, no
    weight prepacking until a tower's second use; "index": onnxruntime's default threads, prepacked."""
    meta = read_meta(Path(directory))
    query = purpose == "query"
    threads = {"image_threads": None, "text_threads": QUERY_TEXT_THREADS if query else None}
    return OnnxEncoder(Path(directory), meta, **threads, prepack=not query)


def load_for_identity(identity: ModelIdentity, *, purpose: str = "query", quiet: bool = False) -> OnnxEncoder | None:
    """The cached export for identity, or None (and, unless quiet, one line on stderr) when it is absent or
    unusable."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        warn_once("onnxruntime is not installed; running on torch (pip install onnxruntime)")
        return None
    key = export_key(identity)
    d = export_dir(key)
    try:
        enc = open_export(d, purpose=purpose)
        if not enc.identity.matches(identity):
            raise ExportUnusable(f"the ONNX export at {d} belongs to another model")
        return enc
    except ExportUnusable as e:
        if quiet:
            return None
        if "no ONNX export" in str(e):
            warn_once(
                f"no ONNX export of {identity.spec} in {cache_root()}; running on torch "
                f"(the next `retrieval index` run makes it)"
            )
        else:
            warn_once(f"{e}; running on torch (the next `retrieval index` run re-makes it)")
            set_aside(d)
        return None
