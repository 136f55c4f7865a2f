"""train-fusion for an index: train on its pairs, keep the fusion only if it beats the one in force, install
it, report."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

from retrieval.errors import EmptyIndexError, ModelMismatchError, RetrievalError
from retrieval.fusion.model import FORMAT_VERSION, Fusion, prune_fusion_files, save_fusion
from retrieval.fusion.pairs import GAIN_EPS, check_enough, evaluate_fusion, index_pairs, split_by_image
from retrieval.fusion.train import TrainConfig, train_fusion


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
        _prune(idx, keep={prev.get("file")} - {None})
        return None
    ident = idx.identity
    if fusion.dim != idx.dim:
        raise ModelMismatchError(f"the fusion is for {fusion.dim}-d vectors but the index holds {idx.dim}-d vectors")
    if ident is not None and fusion.identity is not None and not ident.matches(fusion.identity):
        raise ModelMismatchError(f"the fusion was trained for {fusion.identity.spec}, not {ident.spec}")
    path = save_fusion(fusion, idx.fusion_dir)
    meta = {"file": path.name, "version": path.name.split(".")[1], "format": FORMAT_VERSION, **(extra_meta or {})}
    try:
        idx.sync_vectors(fusion_meta=meta)
    except BaseException:
        switched = (idx.store.get_manifest("fusion") or {}).get("file") == path.name
        if not switched and path.name != prev.get("file"):
            path.unlink(missing_ok=True)
        raise
    _prune(idx, keep={path.name, prev.get("file")} - {None})
    return meta


def _prune(idx, keep: set[str]) -> None:
    """Fusion files older than the previous one go: on disk, and in a store that keeps them itself."""
    prune_fusion_files(idx.fusion_dir, keep=keep)
    if hasattr(idx, "prune_fusion_files"):
        idx.prune_fusion_files(keep)


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
