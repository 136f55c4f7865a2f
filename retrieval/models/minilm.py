"""The starter's text tower: all-MiniLM-L6-v2 as a small pure-torch BERT with the tokenizers library."""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.models.starter_files import DIM, StarterFiles

MAX_TEXT_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2


SMALL_TEXT_BATCH = 8  # up to this many texts (a query) run on one CPU thread; see _one_cpu_thread


class _BertLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.ln2 = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, L, d = x.shape

        def split(t):
            return t.view(n, L, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=mask)
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(n, L, d)))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


class MiniLM(nn.Module):
    """BertModel's encoder + mean pooling + L2 normalisation, as sentence-transformers runs it."""

    def __init__(self, cfg: dict):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.word = nn.Embedding(cfg["vocab_size"], d)
        self.pos = nn.Embedding(cfg["max_position_embeddings"], d)
        self.tok_type = nn.Embedding(cfg["type_vocab_size"], d)
        self.ln = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(
            _BertLayer(d, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
            for _ in range(cfg["num_hidden_layers"])
        )

    @staticmethod
    def convert_state_dict(sd: dict) -> dict:
        out = {}
        names = {
            "word_embeddings": "word",
            "position_embeddings": "pos",
            "token_type_embeddings": "tok_type",
            "LayerNorm": "ln",
        }
        sub = {
            "attention.self.query": "q",
            "attention.self.key": "k",
            "attention.self.value": "v",
            "attention.output.dense": "o",
            "attention.output.LayerNorm": "ln1",
            "intermediate.dense": "ff1",
            "output.dense": "ff2",
            "output.LayerNorm": "ln2",
        }
        for k, v in sd.items():
            k = k.removeprefix("bert.")
            if k.startswith("embeddings."):
                part, _, rest = k.removeprefix("embeddings.").partition(".")
                if part in names:
                    out[f"{names[part]}.{rest}"] = v
            elif k.startswith("encoder.layer."):
                i, _, rest = k.removeprefix("encoder.layer.").partition(".")
                mod, _, param = rest.rpartition(".")
                if mod in sub:
                    out[f"layers.{i}.{sub[mod]}.{param}"] = v
        return out  # pooler and position_ids are unused

    def forward(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.ln(self.word(ids) + self.pos(pos)[None] + self.tok_type.weight[0])
        mask = attn[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, mask)
        m = attn.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


_threads_lock = threading.Lock()


_threads_users = 0


_threads_saved = 0


@contextlib.contextmanager
def _one_cpu_thread(active: bool):
    """Run a tiny CPU workload on one intra-op thread, restoring the setting afterwards.

    A single query is ~20 small ops; with two OpenMP threads on a busy machine every op waits for the
    other thread to be scheduled (measured under load: 280 ms median vs 20 ms, docs/starter.md).
    Reference-counted, so overlapping callers in several threads restore the original value exactly once.
    """
    global _threads_users, _threads_saved
    if not active:
        yield
        return
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)


class TextTower:
    """Tokenizer + MiniLM: texts -> L2-normalised float32 [n, 384]."""

    def __init__(self, files: StarterFiles, device: str):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        cfg = json.loads((files.minilm_dir / "config.json").read_text())
        self.model = MiniLM(cfg)
        self.model.load_state_dict(MiniLM.convert_state_dict(load_file(str(files.minilm_weights))), strict=True)
        self.model.eval().to(device)
        self.device = device
        tok = Tokenizer.from_file(str(files.tokenizer))
        tok.enable_truncation(max_length=MAX_TEXT_TOKENS)
        tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
        self.tokenizer = tok

    def encode(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        # Batch texts of similar length together (less padding), then restore the order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), DIM), dtype=np.float32)
        with _one_cpu_thread(self.device == "cpu" and len(texts) <= SMALL_TEXT_BATCH):
            for s in range(0, len(texts), batch_size):
                idx = order[s : s + batch_size]
                enc = self.tokenizer.encode_batch([texts[i] for i in idx])
                ids = torch.tensor([e.ids for e in enc], dtype=torch.long, device=self.device)
                attn = torch.tensor([e.attention_mask for e in enc], dtype=torch.long, device=self.device)
                with torch.inference_mode():
                    out[idx] = self.model(ids, attn).float().cpu().numpy()
        return out
