"""Does learned fusion help? Held-out recall on a synthetic corpus, through the engine's real write path.

Steps:
1. Generate a synthetic corpus (`synth_corpus.py`: PIL scenes, 5 paraphrased captions per image, Karpathy
   splits train / val / test), unless it is already there.
2. Index ALL its images with `index_data.pipeline.run_index`. Train and val images get all their captions.
   Test images are split into two halves (seeded): half get their first `--doc-captions` captions attached in
   the index (the "document captions", e.g. alt text an item already has); the other half get none. The
   remaining captions of every test image are the held-out QUERIES: they are never stored in the index, never
   seen in training, and disjoint from any document's captions, so document fusion cannot leak the answer.
3. Train fusions on the stored raw embeddings of the TRAIN split (early stopping on the VAL split):
   (b) adapters only (document gate closed), (c) adapters + document fusion + query weight.
4. Publish each variant with the engine's own install path (`retrieval.fusion.install.install_fusion`, which rebuilds
   every FAISS vector atomically) and read the test images' vectors back from the published FAISS file:
   (a) no fusion, (a+) an untrained fixed 50/50 image/caption blend (to separate "using captions" from
   "learning"), (b), (c). Score the held-out queries against the test images only.
5. Report clip_benchmark-style text->image (image_retrieval_recall@K) and image->text
   (text_retrieval_recall@K) R@1/5/10, also split by test images with and without document captions, plus an
   end-to-end check that `Searcher.search` returns the same top-1 as the matrix computation.

Writes benchmarks/out/fusion_<model>.json and .md. Usage:

    python benchmarks/fusion_benchmark.py --model starter
    python benchmarks/fusion_benchmark.py --model tiny-clip:none
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault(
    "RETRIEVAL_MODEL_CONFIGS", str(ROOT / "tests" / "model_configs")
)  # the tests' tiny-clip architectures
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MACHINE = "2-core CPU machine (no GPU)"
KS = (1, 5, 10)


def slug(model: str) -> str:
    return model.split(":")[0].replace("/", "_")


def ensure_corpus(folder: Path, n: int, n_val: int, n_test: int, n_caps: int, seed: int) -> dict:
    from benchmarks.synth_corpus import generate

    stamp = folder / "corpus.json"
    want = {"images": n, "val": n_val, "test": n_test, "captions_per_image": n_caps, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (folder / "captions.json").is_file():
        return want
    generate(folder, n, n_val, n_test, n_caps, seed)
    stamp.write_text(json.dumps(want))
    return want


def plan_captions(corpus: Path, doc_caps: int, doc_fraction: float, seed: int):
    """Index caption file (train/val: all; test: doc captions for a seeded subset) and held-out queries."""
    data = json.loads((corpus / "captions.json").read_text())
    rng = np.random.default_rng(seed + 1)
    test = [im for im in data["images"] if im["split"] == "test"]
    with_docs = set(
        im["filename"] for im in rng.permutation(np.array(test, dtype=object))[: int(round(doc_fraction * len(test)))]
    )
    index_images, queries = [], []
    for im in data["images"]:
        sents = [s["raw"] for s in im["sentences"]]
        path = str((corpus / im["filepath"] / im["filename"]).resolve())
        if im["split"] != "test":
            index_images.append({**im, "sentences": [{"raw": s} for s in sents]})
            continue
        docs = sents[:doc_caps] if im["filename"] in with_docs else []
        if docs:
            index_images.append({**im, "sentences": [{"raw": s} for s in docs]})
        for s in sents[doc_caps:]:
            queries.append((path, s))
    index_file = corpus / f"index_captions.d{doc_caps}.f{doc_fraction}.s{seed}.json"
    index_file.write_text(json.dumps({"images": index_images}))
    return (
        index_file,
        queries,
        {str((corpus / im["filepath"] / im["filename"]).resolve()) for im in test if im["filename"] in with_docs},
    )


def faiss_vectors(idx, ids: np.ndarray) -> np.ndarray:
    """The vectors the published FAISS file holds for these image ids (flat or hnsw: stored exactly)."""
    vi = idx.vectors("images")
    slots = {int(i): s for s, i in enumerate(vi._slot_ids) if vi._live[s]}
    stored = np.array(vi._stored_vectors())
    return stored[[slots[int(i)] for i in ids]]


def recall_rows(D: np.ndarray, Q: np.ndarray, q_img: np.ndarray, A: np.ndarray, C: np.ndarray, masks: dict) -> dict:
    """t2i: queries Q against documents D; i2t: images A against the query captions C."""
    from retrieval.eval.recall import evaluate_embeddings, recall_at_k

    rep = evaluate_embeddings(D, Q, q_img, KS)
    i2t = evaluate_embeddings(A, C, q_img, KS).metrics
    out = {f"image_retrieval_recall@{k}": rep.metrics[f"image_retrieval_recall@{k}"] for k in KS}
    out.update({f"text_retrieval_recall@{k}": i2t[f"text_retrieval_recall@{k}"] for k in KS})
    scores = Q @ D.T
    pos = np.zeros(scores.shape, bool)
    pos[np.arange(len(Q)), q_img] = True
    for name, m in masks.items():
        if m.any():
            r = recall_at_k(scores[m], pos[m], KS)
            out.update({f"image_retrieval_recall@{k}/{name}": r[k] for k in KS})
    return out


def signal_diagnostics(train, q_raw: np.ndarray, q_img: np.ndarray, img_raw: np.ndarray) -> dict:
    """How much cross-modal signal the raw embeddings carry at all (explains a small gain):
    - paraphrase_t2t_r1: a held-out query's nearest other query (raw text space) is a caption of the same image;
    - linear_probe_t2i_r1: least-squares text->image map fitted on the train pairs, test t2i R@1 (raw images)."""
    S = q_raw @ q_raw.T
    np.fill_diagonal(S, -np.inf)
    para = float(np.mean(q_img[S.argmax(1)] == q_img))
    X = np.c_[train.text_vecs, np.ones(train.n_captions)]
    W, *_ = np.linalg.lstsq(X, train.image_vecs[train.cap_image], rcond=None)
    P = np.c_[q_raw, np.ones(len(q_raw))] @ W
    P /= np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)
    probe = float(np.mean((P @ img_raw.T).argmax(1) == q_img))
    return {
        "paraphrase_t2t_r1": round(para, 4),
        "linear_probe_t2i_r1": round(probe, 4),
        "chance_t2i_r1": round(1.0 / len(img_raw), 4),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="starter")
    ap.add_argument("--images", type=int, default=2400)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--captions", type=int, default=5)
    ap.add_argument(
        "--doc-captions", type=int, default=2, help="captions attached in the index to a test image with documents"
    )
    ap.add_argument("--doc-fraction", type=float, default=0.5, help="share of test images that have document captions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)

    from index_data.options import IndexOptions
    from index_data.pipeline import run_index
    from retrieval.fusion.install import install_fusion
    from retrieval.fusion.model import Fusion
    from retrieval.fusion.pairs import evaluate_fusion, index_pairs
    from retrieval.fusion.train import TrainConfig, train_fusion
    from retrieval.query.encoder import QueryEncoder
    from retrieval.query.searcher import Searcher
    from retrieval.store.index import Index

    t_start = time.perf_counter()
    corpus = a.data / f"synth_{a.images}_{a.seed}"
    spec = ensure_corpus(corpus, a.images, a.val, a.test, a.captions, a.seed)
    index_file, queries, docs_images = plan_captions(corpus, a.doc_captions, a.doc_fraction, a.seed)
    index_dir = a.data / f"fusion_idx_{slug(a.model)}_{a.images}_{a.seed}"

    # 1. index through the real pipeline (incremental: a re-run reuses what is there)
    t0 = time.perf_counter()
    idx0 = Index.open_for_write(index_dir)
    try:
        install_fusion(idx0, None) if idx0.store.get_manifest("fusion") else None  # start from (a)
    finally:
        idx0.close()
    rep = run_index(
        index_dir,
        IndexOptions(
            paths=[str(corpus / "images")],
            captions_file=str(index_file),
            fmt="karpathy",
            model=a.model,
            device="cpu",
            progress=not a.quiet,
        ),
    )
    index_seconds = time.perf_counter() - t0

    idx = Index.open_for_write(index_dir, create=False)
    try:
        store = idx.store
        split_of = {}
        for row in store.iter_images():
            split_of[row.id] = Path(row.path).parent.name
        ids = {
            s: np.array(sorted(i for i, sp in split_of.items() if sp == s), np.int64) for s in ("train", "val", "test")
        }
        train = index_pairs(store, idx.dim, ids["train"])
        val = index_pairs(store, idx.dim, ids["val"])

        # held-out queries, encoded with the index's own encoder
        path_to_id = {store.images_by_ids([i])[i].path: i for i in ids["test"]}
        test_ids = ids["test"]
        row_of = {int(i): r for r, i in enumerate(test_ids)}
        q_img = np.array([row_of[path_to_id[p]] for p, _ in queries], np.int64)
        enc = QueryEncoder(idx, "cpu").get()
        q_raw = enc.encode_texts([t for _, t in queries])
        img_hash = {i: store.images_by_ids([i])[i].hash for i in test_ids}
        img_raw = store.get_embeddings("image", [img_hash[int(i)] for i in test_ids], idx.dim)
        has_docs = np.array(
            [store.images_by_ids([int(test_ids[r])])[int(test_ids[r])].path in docs_images for r in q_img]
        )
        masks = {"with_doc_captions": has_docs, "without_captions": ~has_docs}

        # 2. train on the train split, early stopping on val
        cfg = TrainConfig(epochs=a.epochs, seed=a.seed)
        t0 = time.perf_counter()
        f_b, h_b = train_fusion(
            train, val, TrainConfig(**{**cfg.__dict__, "document_fusion": False}), idx.identity, progress=not a.quiet
        )
        f_c, h_c = train_fusion(train, val, cfg, idx.identity, progress=not a.quiet)
        train_seconds = time.perf_counter() - t0

        diagnostics = signal_diagnostics(train, q_raw, q_img, img_raw)

        blend = Fusion.untrained(idx.dim, idx.identity)
        blend.params["gate.bias"][:] = 0.5
        blend.info = {"fixed_blend": 0.5}
        variants = [
            ("a", "no fusion", None),
            ("a+", "untrained 50/50 image/caption blend", blend),
            ("b", "trained adapters", f_b),
            ("c", "adapters + document fusion", f_c),
        ]
        results = {}
        for key, label, fusion in variants:
            install_fusion(idx, fusion, {"benchmark_variant": key})
            D = faiss_vectors(idx, test_ids)  # what the engine actually serves
            f = fusion or Fusion.untrained(idx.dim)
            caps = store.captions_for_images([int(i) for i in test_ids])
            from retrieval.store.rows import text_hash

            expect = f.document_vectors(
                img_raw,
                [
                    store.get_embeddings("text", [text_hash(t) for _, t in caps[int(i)]], idx.dim)
                    if caps.get(int(i))
                    else None
                    for i in test_ids
                ],
            )
            max_diff = float(np.abs(D - expect).max())
            Q = f.query_text(q_raw)
            m = recall_rows(D, Q, q_img, f.query_image(img_raw), f.caption_vectors(q_raw), masks)
            # end-to-end: the Searcher (query encoding + fusion + FAISS + filters) agrees with the matrix
            with Searcher(Index.open(index_dir), device="cpu") as s:
                s.query_encoder.loaded = enc  # same model, already loaded
                agree, n_check = 0, min(40, len(queries))
                top_matrix = (Q[:n_check] @ D.T).argmax(1)
                for j in range(n_check):
                    res = s.search(queries[j][1], k=1, under=str(corpus / "images" / "test"), dedupe=False)
                    agree += int(res and res[0].id == int(test_ids[top_matrix[j]]))
            val_metrics = evaluate_fusion(fusion, val)
            results[key] = {
                "label": label,
                "metrics": {k: round(v, 4) for k, v in m.items()},
                "val_score": val_metrics["score"],
                "faiss_vs_fusion_max_abs_diff": max_diff,
                "searcher_top1_agreement": f"{agree}/{n_check}",
                "fusion": fusion.describe() if fusion is not None else None,
            }
            if not a.quiet:
                print(
                    f"({key}) {label}: t2i R@1 {m['image_retrieval_recall@1']:.3f}  i2t R@1 "
                    f"{m['text_retrieval_recall@1']:.3f}  [searcher agrees {agree}/{n_check}]",
                    file=sys.stderr,
                )
        install_fusion(idx, None)  # leave the benchmark index as built
    finally:
        idx.close()

    cmd = "python benchmarks/fusion_benchmark.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])
    )
    gain = results["c"]["metrics"]["image_retrieval_recall@1"] - results["a"]["metrics"]["image_retrieval_recall@1"]
    gain_b = results["b"]["metrics"]["image_retrieval_recall@1"] - results["a"]["metrics"]["image_retrieval_recall@1"]
    out = {
        "benchmark": "fusion",
        "model": a.model,
        "machine": MACHINE,
        "python": platform.python_version(),
        "corpus": {
            **spec,
            "doc_captions": a.doc_captions,
            "doc_fraction": a.doc_fraction,
            "test_images": int(len(test_ids)),
            "test_queries": len(queries),
            "test_images_with_doc_captions": len(docs_images),
            "train_pairs": train.n_captions,
            "train_images": train.n_images,
            "val_pairs": val.n_captions,
            "val_images": val.n_images,
        },
        "training": {
            "config": cfg.__dict__,
            "b": {"epochs_run": h_b.epochs_run, "best_epoch": h_b.best_epoch, "seconds": round(h_b.seconds, 1)},
            "c": {"epochs_run": h_c.epochs_run, "best_epoch": h_c.best_epoch, "seconds": round(h_c.seconds, 1)},
        },
        "index_seconds": round(index_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "images_encoded": rep.encoded,
        "results": results,
        "diagnostics": diagnostics,
        "t2i_r1_gain_points": {"b_vs_a": round(100 * gain_b, 1), "c_vs_a": round(100 * gain, 1)},
        "command": cmd,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    base = a.out / f"fusion_{slug(a.model)}"
    base.with_suffix(".json").write_text(json.dumps(out, indent=1))
    base.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))
    print(f"reproduce: {cmd}")
    return 0


def markdown(o: dict) -> str:
    c = o["corpus"]
    lines = [
        f"### Learned fusion, `{o['model']}` — held-out test split ({MACHINE})",
        "",
        f"Synthetic corpus: {c['images']} PIL scenes x {c['captions_per_image']} paraphrased captions (seed "
        f"{c['seed']}); "
        f"fusion trained on {c['train_pairs']} train pairs ({c['train_images']} images), early-stopped on "
        f"{c['val_images']} val images; scored on {c['test_queries']} held-out queries over {c['test_images']} "
        f"test images "
        f"({c['test_images_with_doc_captions']} of them indexed with {c['doc_captions']} document captions, "
        f"disjoint from the queries).",
        "",
        "| variant | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 with doc captions | "
        "t2i R@1 without |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in o["results"].items():
        m = r["metrics"]
        lines.append(
            f"| ({key}) {r['label']} | "
            + " | ".join(f"{100 * m[f'image_retrieval_recall@{k}']:.1f}" for k in KS)
            + " | "
            + " | ".join(f"{100 * m[f'text_retrieval_recall@{k}']:.1f}" for k in KS)
            + " | "
            + f"{100 * m.get('image_retrieval_recall@1/with_doc_captions', float('nan')):.1f} | "
            + f"{100 * m.get('image_retrieval_recall@1/without_captions', float('nan')):.1f} |"
        )
    g = o["t2i_r1_gain_points"]
    fc = o["results"]["c"]["fusion"] or {}
    lines += [
        "",
        f"Held-out text->image R@1 gain over (a): (b) {g['b_vs_a']:+.1f} points, (c) {g['c_vs_a']:+.1f} points. "
        f"Trained gate bias {fc.get('gate_bias')}, gate weights {fc.get('gate_weight')}, default composite "
        f"image weight "
        f"{fc.get('default_composite_image_weight')}, temperature {fc.get('temperature')}.",
        f"Signal in the raw embeddings: paraphrase text->text R@1 {100 * o['diagnostics']['paraphrase_t2t_r1']:.1f}%, "
        f"linear-probe text->image R@1 {100 * o['diagnostics']['linear_probe_t2i_r1']:.1f}% "
        f"(chance {100 * o['diagnostics']['chance_t2i_r1']:.1f}%).",
        f"Index build {o['index_seconds']} s ({o['images_encoded']} images encoded in this run), training "
        f"(b)+(c) {o['train_seconds']} s, total {o['total_seconds']} s. "
        f"Searcher top-1 agreement with the matrix scores: "
        + ", ".join(f"({k}) {r['searcher_top1_agreement']}" for k, r in o["results"].items())
        + ".",
        "",
        f"Reproduce: `{o['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
