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
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from retrieval.errors import EmptyIndexError, ModelMismatchError, RetrievalError
from retrieval.eval.recall import recall_at_k
from retrieval.fusion.model import FORMAT_VERSION, Fusion, FusionConfig, init_params, prune_fusion_files, save_fusion
from retrieval.modelspec import ModelIdentity

MIN_PAIRS = 20
MIN_IMAGES = 10
KS = (1, 5, 10)
GAIN_EPS = 1e-9


# -- data ---------------------------------------------------------------------------------------


@dataclass
class PairData:
    """Images (distinct content) and their captions, as raw embeddings."""

    image_keys: list[str]  # image content hashes, one per row of image_vecs
    image_vecs: np.ndarray  # [N, d] raw image embeddings
    text_vecs: np.ndarray  # [T, d] raw caption embeddings
    cap_image: np.ndarray  # [T] row in image_vecs of each caption

    @property
    def n_images(self) -> int:
        return len(self.image_vecs)

    @property
    def n_captions(self) -> int:
        return len(self.text_vecs)

    @property
    def dim(self) -> int:
        return int(self.image_vecs.shape[1])

    def captions_of(self) -> list[np.ndarray]:
        order = np.argsort(self.cap_image, kind="stable")
        bounds = np.searchsorted(self.cap_image[order], np.arange(self.n_images + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(self.n_images)]

    def subset(self, image_rows) -> "PairData":
        image_rows = np.asarray(image_rows, dtype=np.int64)
        remap = np.full(self.n_images, -1, np.int64)
        remap[image_rows] = np.arange(len(image_rows))
        keep = remap[self.cap_image] >= 0
        return PairData(
            [self.image_keys[i] for i in image_rows],
            self.image_vecs[image_rows],
            self.text_vecs[keep],
            remap[self.cap_image[keep]],
        )


def pairs_from_rows(store, dim: int, rows) -> PairData:
    """PairData from caption_pairs()-style rows (caption id, image id, image hash, text hash)."""
    image_index: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    text_keys: list[str] = []
    cap_image: list[int] = []
    for _cid, _iid, ihash, thash in rows:
        if (ihash, thash) in seen:  # the same sentence on two copies of one file: one pair
            continue
        seen.add((ihash, thash))
        text_keys.append(thash)
        cap_image.append(image_index.setdefault(ihash, len(image_index)))
    image_keys = list(image_index)
    if not image_keys:
        return PairData([], np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32), np.zeros(0, np.int64))
    try:
        image_vecs = store.get_embeddings("image", image_keys, dim)
        text_vecs = store.get_embeddings("text", text_keys, dim)
    except KeyError:
        raise RetrievalError(
            "some captions or images have no stored embedding; run: retrieval verify --repair"
        ) from None
    return PairData(image_keys, image_vecs, text_vecs, np.asarray(cap_image, np.int64))


def index_pairs(store, dim: int, image_ids=None) -> PairData:
    """All (image, caption) pairs of an index; optionally only those of the given image ids."""
    rows = store.caption_pairs()
    if image_ids is not None:
        image_ids = set(int(i) for i in image_ids)
        rows = [r for r in rows if r[1] in image_ids]
    return pairs_from_rows(store, dim, rows)


def check_enough(data: PairData) -> None:
    if data.n_captions < MIN_PAIRS or data.n_images < MIN_IMAGES:
        raise RetrievalError(
            f"too few caption pairs to train a fusion: {data.n_captions} captions on {data.n_images} images; "
            f"need at least {MIN_PAIRS} captions on {MIN_IMAGES} images (add captions with sidecar .txt files "
            f"or index --captions FILE)"
        )


def split_by_image(data: PairData, val_fraction: float, seed: int) -> tuple[PairData, PairData]:
    """Seeded split of IMAGES (with all their captions) into train and validation."""
    if not 0.0 < val_fraction < 1.0:
        raise RetrievalError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    n = data.n_images
    n_val = min(max(2, int(round(val_fraction * n))), n - 2)
    if n_val < 2:
        check_enough(data)
    perm = np.random.default_rng(seed).permutation(n)
    return data.subset(np.sort(perm[n_val:])), data.subset(np.sort(perm[:n_val]))


# -- evaluation ---------------------------------------------------------------------------------


def _recall_dict(r: dict) -> dict[str, float]:
    return {f"R@{k}": round(float(v), 6) for k, v in r.items()}


def evaluate_fusion(fusion: Fusion | None, data: PairData, ks=KS, block: int = 4096) -> dict:
    """Recall on `data` under a fusion (None: no fusion). Returns ``{"t2i_mixed", "t2i_docs", "t2i_image",
    "i2t": {"R@k": ...}, "score": t2i_mixed R@1}``; see the module docstring for the protocol."""
    if fusion is None:
        fusion = Fusion.untrained(data.dim)
    img, txt, cap_image = data.image_vecs, data.text_vecs, data.cap_image
    A = fusion.query_image(img)
    Q = fusion.query_text(txt)
    n_img = len(A)

    def t2i(D: np.ndarray, D_pos: np.ndarray | None) -> dict:
        """Queries Q against candidates D; D_pos[j], if given, replaces query j's own positive."""
        hits = {k: 0.0 for k in ks}
        for s in range(0, len(Q), block):
            q = Q[s : s + block]
            scores = q @ D.T
            ci = cap_image[s : s + block]
            rows = np.arange(len(q))
            if D_pos is not None:
                scores[rows, ci] = np.einsum("ij,ij->i", q, D_pos[s : s + block])
            pos = np.zeros(scores.shape, bool)
            pos[rows, ci] = True
            for k, v in recall_at_k(scores, pos, ks).items():
                hits[k] += v * len(q)
        return {k: hits[k] / len(Q) for k in ks}

    t2i_image = t2i(A, None)
    i2t_hits = {k: 0.0 for k in ks}
    C = fusion.caption_vectors(txt)
    for s in range(0, n_img, block):
        scores = A[s : s + block] @ C.T
        pos = cap_image[None, :] == np.arange(s, s + len(scores))[:, None]
        for k, v in recall_at_k(scores, pos, ks).items():
            i2t_hits[k] += v * len(scores)
    i2t = {k: i2t_hits[k] / n_img for k in ks}

    if fusion.fuses_documents:
        caps_of = data.captions_of()
        D = fusion.document_vectors(img, [txt[c] for c in caps_of])
        loo = [txt[caps_of[cap_image[j]][caps_of[cap_image[j]] != j]] for j in range(len(txt))]
        D_loo = fusion.document_vectors(img[cap_image], [c if len(c) else None for c in loo])
        t2i_docs = t2i(D, D_loo)
        fused = np.zeros(n_img, bool)  # a fixed half of the images are documents with captions
        fused[np.random.default_rng(12345).permutation(n_img)[: (n_img + 1) // 2]] = True
        D_mixed = np.where(fused[:, None], D, A)
        D_mixed_pos = np.where(fused[cap_image][:, None], D_loo, A[cap_image])
        t2i_mixed = t2i(D_mixed, D_mixed_pos)
    else:
        t2i_docs = t2i_mixed = t2i_image
    return {
        "t2i_mixed": _recall_dict(t2i_mixed),
        "t2i_docs": _recall_dict(t2i_docs),
        "t2i_image": _recall_dict(t2i_image),
        "i2t": _recall_dict(i2t),
        "score": round(float(t2i_mixed[ks[0]]), 6),
    }


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


def install_fusion(idx, fusion: Fusion | None, extra_meta: dict | None = None) -> dict | None:
    """Publish `fusion` for index `idx` (opened for writing): write its file, rebuild every vector from the
    stored raw embeddings under it, and switch the manifest's generation and fusion in one transaction.
    A failure before that switch leaves the old vectors and the old fusion in force (and the new file
    removed). `fusion=None` removes the fusion. Fusion files older than the previous one are deleted."""
    if not idx.writable:
        raise RetrievalError("installing a fusion needs the index opened for writing")
    prev = idx.store.get_manifest("fusion") or {}
    if fusion is None:
        idx.sync_vectors(fusion_meta=None)
        prune_fusion_files(idx.root, keep={prev.get("file")} - {None})
        return None
    ident = idx.identity
    if fusion.dim != idx.dim:
        raise ModelMismatchError(f"the fusion is for {fusion.dim}-d vectors but the index holds {idx.dim}-d vectors")
    if ident is not None and fusion.identity is not None and not ident.matches(fusion.identity):
        raise ModelMismatchError(f"the fusion was trained for {fusion.identity.spec}, not {ident.spec}")
    path = save_fusion(fusion, idx.root)
    meta = {"file": path.name, "version": path.name.split(".")[1], "format": FORMAT_VERSION, **(extra_meta or {})}
    try:
        idx.sync_vectors(fusion_meta=meta)
    except BaseException:
        switched = (idx.store.get_manifest("fusion") or {}).get("file") == path.name
        if not switched and path.name != prev.get("file"):
            path.unlink(missing_ok=True)
        raise
    prune_fusion_files(idx.root, keep={path.name, prev.get("file")} - {None})
    return meta


@dataclass
class FusionTrainReport:
    index: str
    pairs: int
    images: int
    train_images: int
    val_images: int
    val_captions: int
    seed: int
    val_fraction: float
    current: str | None  # version of the fusion in force before, or None
    before: dict  # validation metrics under the current fusion (or none)
    after: dict  # validation metrics under the trained fusion
    gain: float  # after.score - before.score (fraction, not points)
    epochs_run: int
    best_epoch: int
    seconds: float
    dry_run: bool
    installed: bool
    decision: str  # one sentence for people
    fusion: dict | None = None  # manifest entry of the installed fusion
    parameters: dict | None = None  # Fusion.describe() of the trained fusion
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def train_fusion_for_index(
    index_dir,
    *,
    epochs: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    dry_run: bool = False,
    progress: bool = True,
    config: TrainConfig | None = None,
) -> FusionTrainReport:
    """What `retrieval train-fusion` does: train on the index's pairs, compare with the fusion in force on the
    validation images, install only a strictly better one (unless dry_run), rebuilding vectors atomically."""
    from retrieval.store.index import Index

    cfg = replace(config or TrainConfig(), seed=seed)
    if epochs is not None:
        if epochs < 0:
            raise RetrievalError("--epochs must be 0 or more")
        cfg = replace(cfg, epochs=epochs)
    t0 = time.perf_counter()
    with Index.open_for_write(index_dir, create=False) as idx:
        ident = idx.identity
        if ident is None or idx.dim == 0:
            raise EmptyIndexError(f"the index at {idx.root} has no model recorded; index something first")
        data = index_pairs(idx.store, idx.dim)
        check_enough(data)
        train, val = split_by_image(data, val_fraction, seed)
        notes = []
        current_meta = idx.store.get_manifest("fusion") or None
        try:
            current = idx.fusion()
        except RetrievalError as e:  # a broken or foreign fusion: compare against none, and replace it
            notes.append(f"the current fusion cannot be used ({e}); comparing against no fusion")
            current = None
        before = evaluate_fusion(current, val)
        fusion, hist = train_fusion(train, val, cfg, ident, progress=progress)
        after = evaluate_fusion(fusion, val)
        gain = after["score"] - before["score"]
        current_name = (current_meta or {}).get("version") if current is not None else None
        installed = False
        meta = None
        if gain <= GAIN_EPS:
            what = f"the current fusion ({current_name})" if current_name else "no fusion"
            decision = (
                f"kept {what}: the trained fusion does not beat it on the validation images "
                f"({after['score']:.1%} vs {before['score']:.1%})"
            )
        elif dry_run:
            decision = f"dry run: the trained fusion would gain {gain * 100:+.1f} points; nothing written"
        else:
            meta = install_fusion(
                idx,
                fusion,
                {
                    "seed": seed,
                    "val_fraction": val_fraction,
                    "val_score": after["score"],
                    "val_score_before": before["score"],
                    "pairs": data.n_captions,
                    "images": data.n_images,
                    "epochs": hist.epochs_run,
                    "best_epoch": hist.best_epoch,
                    "trained_at": time.time(),
                },
            )
            installed = True
            decision = (
                f"installed {meta['file']} ({gain * 100:+.1f} points); vectors rebuilt as generation {idx.generation}"
            )
        if dry_run and not installed and gain <= GAIN_EPS:
            decision = "dry run: " + decision + "; nothing written"
        return FusionTrainReport(
            index=str(idx.root),
            pairs=data.n_captions,
            images=data.n_images,
            train_images=train.n_images,
            val_images=val.n_images,
            val_captions=val.n_captions,
            seed=seed,
            val_fraction=val_fraction,
            current=current_name,
            before=before,
            after=after,
            gain=round(gain, 6),
            epochs_run=hist.epochs_run,
            best_epoch=hist.best_epoch,
            seconds=round(time.perf_counter() - t0, 2),
            dry_run=dry_run,
            installed=installed,
            decision=decision,
            fusion=meta,
            parameters=fusion.describe(),
            notes=notes,
        )


def format_report(r: FusionTrainReport) -> list[str]:
    """Lines for people (the CLI prints them)."""

    def row(name, m):
        return (
            f"  {name:<22} {m['score']:6.1%}   (R@5 {m['t2i_mixed']['R@5']:.1%}; all fused {m['t2i_docs']['R@1']:.1%}, "
            f"image-only {m['t2i_image']['R@1']:.1%}; image->text R@1 {m['i2t']['R@1']:.1%})"
        )

    lines = [
        f"fusion training: {r.pairs} captions on {r.images} images -> {r.train_images} train / {r.val_images} "
        f"validation images (seed {r.seed}), {r.epochs_run} epochs (best {r.best_epoch}) in {r.seconds:.1f}s",
        "validation text->image R@1 (mixed index: half the items fused with their captions, leave-one-out):",
        row(f"current ({r.current or 'none'})", r.before),
        row("trained", r.after),
        f"  gain {r.gain * 100:+.1f} points",
    ]
    lines += [f"note: {n}" for n in r.notes]
    lines.append(r.decision)
    return lines
