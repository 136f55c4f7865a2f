"""Training, evaluating and installing a learned fusion (see `fusion.py` for what the fusion is).

Everything works on the raw embeddings the index already stores: no image or caption is re-encoded, so a run
over 30k pairs takes seconds to a few minutes on a CPU.

Data. The pairs are `Store.caption_pairs()`, grouped by image *content* (file hash), so duplicate files are one
training image and never each other's negatives. Images (never single captions) are split into train and
validation with a seeded RNG, so no validation image has a caption in training.

Objective, per step over a batch of B distinct images, each with one of its captions drawn as the query
(one epoch visits every caption about once):

* adapters: symmetric InfoNCE between adapted images and adapted query captions, with a learnable
  temperature (CLIP's logit scale, capped at 100);
* document fusion: the same loss between the query captions and the fused documents, where each image's
  document is built from the image and its OTHER captions (leave-one-out: the query caption is never inside
  its own target), so the gate learns how much a caption mean helps a new sentence find its item;
* query fusion: a composite query made of the nearest other training image (by raw image vector) and the
  target's caption must find the target's document; only the learned weight offset gets this gradient.

Caption dropout: for a random half of the batch the documents get no captions at all (they are their image
vector), because a real index mixes items with and without captions in ONE ranking: a fusion that makes
captioned items score higher for every sentence (text is closer to text than to images) would bury the
uncaptioned ones, and only a mixed batch lets the loss see that failure.

Validation score (used for early stopping and for the install decision): text->image recall@1 on the
validation images in a MIXED index: a fixed (seeded) half of the validation images are indexed as documents
with their captions, the rest by their image vector alone, all in one ranking. A query caption's own image,
when it is a document, is fused from its OTHER captions only (leave-one-out); other documents keep all their
captions. So the score is what a new sentence meets in an index where half the items have captions. Recall
against all-fused and all-image-only indexes and image->text recall are reported beside it.

Determinism: seeded split, seeded init, seeded batches and caption dropout, torch.manual_seed, and a single
torch thread (CPU matmul, cross-entropy and AdamW are then bit-reproducible).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.fusion.model import Fusion, FusionConfig, init_params
from retrieval.fusion.pairs import GAIN_EPS, PairData, evaluate_fusion
from retrieval.modelspec import ModelIdentity

# -- data ---------------------------------------------------------------------------------------


# -- evaluation ---------------------------------------------------------------------------------


# -- the torch twin of Fusion -------------------------------------------------------------------


def _torch_net(fusion: Fusion):
    import torch
    import torch.nn.functional as F
    from torch import nn

    def _clip01(x):
        """clip to [0, 1] with gradient 1 on the closed interval: torch.clamp passes none AT a bound, and
        an untrained gate sits exactly at 0."""
        return torch.where((x >= 0) & (x <= 1), x, x.clamp(0.0, 1.0).detach())

    class FusionNet(nn.Module):
        """Same parameters and forward as `Fusion`, differentiable. Parameter names: '.' -> '__'."""

        def __init__(self, fusion: Fusion):
            super().__init__()
            self.config = fusion.config
            self.p = nn.ParameterDict(
                {k.replace(".", "__"): nn.Parameter(torch.from_numpy(v.copy())) for k, v in fusion.params.items()}
            )

        def __getitem__(self, name: str):
            return self.p[name.replace(".", "__")]

        def adapt(self, x, which: str):
            h = x @ self[f"{which}.down"].T
            if self.config.activation == "gelu_tanh":
                h = F.gelu(h, approximate="tanh")
            return F.normalize(x + h @ self[f"{which}.up"].T + self[f"{which}.bias"], dim=-1)

        def docs(self, a, caps, mask):
            """a [B,d] adapted images; caps [B,M,d] adapted captions; mask [B,M] 1 where a caption exists."""
            cnt = mask.sum(1)
            mean = (caps * mask[..., None]).sum(1) / cnt.clamp(min=1)[:, None]
            cbar = F.normalize(mean, dim=-1)
            agree = (a * cbar).sum(-1)
            w = self["gate.weight"]
            g = _clip01(self["gate.bias"] + w[0] * agree + w[1] / cnt.clamp(min=1))
            g = (g * (cnt > 0)).unsqueeze(1)
            return F.normalize((1 - g) * a + g * cbar, dim=-1)

        def composite(self, a, t, weight: float = 0.5):
            z = math.log(weight) - math.log1p(-weight) + self["query.bias"]
            w = torch.sigmoid(z)
            return F.normalize(w * a + (1 - w) * t, dim=-1)

        def export(self) -> dict[str, np.ndarray]:
            return {k.replace("__", "."): v.detach().cpu().numpy().astype(np.float32).copy() for k, v in self.p.items()}

    return FusionNet(fusion)


# -- training -----------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    epochs: int = 40
    patience: int = 8  # stop after this many epochs without a better validation score
    batch_size: int = 512
    lr: float = 2e-3  # adapters
    scalar_lr: float = 2e-2  # gate, query weight offset, temperature
    weight_decay: float = 1e-4
    rank: int = 64
    activation: str = "none"
    document_fusion: bool = True  # train the document gate (False: adapters only, gate stays closed)
    doc_loss: float = 1.0
    composite_loss: float = 0.5
    max_doc_captions: int = 16
    doc_dropout: float = 0.5  # share of batch documents given no captions (see module docstring)
    seed: int = 0
    threads: int = 1  # single-threaded: deterministic, and kind to shared machines


@dataclass
class TrainHistory:
    epochs_run: int = 0
    best_epoch: int = 0
    best_score: float = 0.0
    scores: list = field(default_factory=list)  # validation score after each epoch (index 0: before training)
    seconds: float = 0.0


@contextlib.contextmanager
def _deterministic(threads: int):
    import torch

    # Every op used here (matmul, normalise, cross-entropy, AdamW) is deterministic on the CPU for a fixed
    # thread count; torch.use_deterministic_algorithms is not needed for them and costs ~5 s of imports.
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)


def _nearest_other(vecs: np.ndarray, block: int = 2048) -> np.ndarray:
    """For each row, the most similar OTHER row (by dot product)."""
    n = len(vecs)
    out = np.zeros(n, np.int64)
    for s in range(0, n, block):
        sims = vecs[s : s + block] @ vecs.T
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf
        out[s : s + block] = sims.argmax(1)
    return out


def _epoch_plan(caps_of: list[np.ndarray], rng: np.random.Generator, batch: int, max_doc: int):
    """Batches for one epoch: (image rows, query caption row, doc caption rows [B, M] padded with -1)."""
    n = len(caps_of)
    counts = np.array([len(c) for c in caps_of])
    rounds = max(1, int(math.ceil(counts.mean())))
    perms = [rng.permutation(c) for c in caps_of]
    m = max(1, min(max_doc, int(counts.max()) - 1))
    plan = []
    for r in range(rounds):
        order = rng.permutation(n)
        for s in range(0, n, batch):
            rows = order[s : s + batch]
            if len(rows) < 2:
                continue
            q = np.empty(len(rows), np.int64)
            docs = np.full((len(rows), m), -1, np.int64)
            for b, i in enumerate(rows):
                p = perms[i]
                j = r % len(p)
                q[b] = p[j]
                rest = np.concatenate([p[:j], p[j + 1 :]])[:m]
                docs[b, : len(rest)] = rest
            plan.append((rows, q, docs))
    return plan


def train_fusion(
    train: PairData,
    val: PairData,
    cfg: TrainConfig | None = None,
    identity: ModelIdentity | None = None,
    progress: bool = True,
    init: Fusion | None = None,
) -> tuple[Fusion, TrainHistory]:
    """Train a fusion on `train`, early-stopping on `val`. Returns the best fusion seen (possibly the
    untrained identity, if no epoch beat it) and the history. Deterministic for a given cfg.seed."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    cfg = cfg or TrainConfig()
    if train.n_images < 2 or val.n_images < 1:
        raise RetrievalError("too few images to train a fusion")
    t0 = time.perf_counter()
    dim = train.dim
    fconf = FusionConfig(dim=dim, rank=cfg.rank, activation=cfg.activation)
    start = init if init is not None else Fusion(fconf, init_params(fconf, cfg.seed), identity)
    info = {
        "trained": True,
        "seed": cfg.seed,
        "train_images": train.n_images,
        "train_captions": train.n_captions,
        "document_fusion": cfg.document_fusion,
    }
    hist = TrainHistory()
    best = Fusion(start.config, start.params, identity, {**info, "epoch": 0})
    best_score = evaluate_fusion(best, val)["score"]
    hist.scores.append(best_score)
    hist.best_score = best_score
    if cfg.epochs <= 0:
        hist.seconds = time.perf_counter() - t0
        return best, hist

    with _deterministic(cfg.threads):
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        net = _torch_net(start)
        scalars = {"gate.bias", "gate.weight", "query.bias", "logit_scale"}
        adapter_params = [net[k] for k in ("image.down", "image.up", "image.bias", "text.down", "text.up", "text.bias")]
        scalar_params = [net["logit_scale"], net["query.bias"]]
        if cfg.document_fusion:
            scalar_params += [net["gate.bias"], net["gate.weight"]]
        else:
            net["gate.bias"].requires_grad_(False)
            net["gate.weight"].requires_grad_(False)
        assert len(adapter_params) + len(scalars) == len(net.p)
        opt = torch.optim.AdamW(
            [
                {"params": adapter_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                {"params": scalar_params, "lr": cfg.scalar_lr, "weight_decay": 0.0},
            ]
        )
        img = torch.from_numpy(np.ascontiguousarray(train.image_vecs, np.float32))
        txt = torch.from_numpy(np.ascontiguousarray(train.text_vecs, np.float32))
        caps_of = train.captions_of()
        nn_row = torch.from_numpy(_nearest_other(train.image_vecs)) if cfg.composite_loss > 0 else None
        max_scale = math.log(100.0)
        stale = 0
        bar = tqdm(range(1, cfg.epochs + 1), desc="train-fusion", unit="epoch", disable=not progress, leave=False)
        for epoch in bar:
            net.train()
            for rows, q_rows, doc_rows in _epoch_plan(caps_of, rng, cfg.batch_size, cfg.max_doc_captions):
                rows_t = torch.from_numpy(rows)
                a = net.adapt(img[rows_t], "image")
                q = net.adapt(txt[torch.from_numpy(q_rows)], "text")
                scale = net["logit_scale"].clamp(max=max_scale).exp()
                labels = torch.arange(len(rows))
                logits = scale * q @ a.T
                loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
                targets = a
                if cfg.document_fusion and cfg.doc_loss > 0:
                    mask_np = doc_rows >= 0
                    if cfg.doc_dropout > 0:
                        mask_np = mask_np & (rng.random(len(rows)) >= cfg.doc_dropout)[:, None]
                    caps = net.adapt(txt[torch.from_numpy(np.where(mask_np, doc_rows, 0))], "text")
                    docs = net.docs(a, caps, torch.from_numpy(mask_np.astype(np.float32)))
                    dl = scale * q @ docs.T
                    loss = loss + cfg.doc_loss * (F.cross_entropy(dl, labels) + F.cross_entropy(dl.T, labels)) / 2
                    targets = docs
                if nn_row is not None:
                    with torch.no_grad():
                        ref = net.adapt(img[nn_row[rows_t]], "image")
                    comp = net.composite(ref, q.detach())
                    cl = scale.detach() * comp @ targets.detach().T
                    loss = loss + cfg.composite_loss * F.cross_entropy(cl, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():  # projected gradient: the gate bias lives in [0, 1]
                    net["gate.bias"].clamp_(0.0, 1.0)
            net.eval()
            cand = Fusion(start.config, net.export(), identity, {**info, "epoch": epoch})
            score = evaluate_fusion(cand, val)["score"]
            hist.scores.append(score)
            hist.epochs_run = epoch
            if score > hist.best_score + GAIN_EPS:
                best, hist.best_score, hist.best_epoch, stale = cand, score, epoch, 0
            else:
                stale += 1
            bar.set_postfix(val_r1=f"{score:.3f}", best=f"{hist.best_score:.3f}")
            if stale >= cfg.patience:
                break
        bar.close()
    hist.seconds = time.perf_counter() - t0
    return best, hist


# -- installing into an index -------------------------------------------------------------------
