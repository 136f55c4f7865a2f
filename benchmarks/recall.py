"""Recall@K through the engine (`retrieval benchmark recall`), written to benchmarks/out/recall_<name>.json.

    python benchmarks/recall.py                                   # scikit-image sample photos, starter model
    python benchmarks/recall.py --captions dataset_flickr30k.json --split test --images flickr30k-images \
        --models ViT-B-32:laion2b_s34b_b79k --name flickr30k_test --exact
    python benchmarks/recall.py --synthetic 40 --models tiny-clip:none --out /tmp/x   # mechanics only (smoke test)

A thin wrapper: the logic is retrieval/eval/benchmark.py (see its docstring for exactly what is measured); indexing is
the real pipeline (index_data.pipeline.run_index). Without --index each model gets a fresh temporary index.
Metric keys follow clip_benchmark: image_retrieval_recall@K (text->image), text_retrieval_recall@K (image->text).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault(
    "RETRIEVAL_MODEL_CONFIGS", str(ROOT / "tests" / "model_configs")
)  # the tests' tiny-clip architectures
for p in (str(ROOT), str(ROOT / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_samples(folder: Path) -> tuple[Path, str]:
    """The scikit-image photos of benchmarks/samples.py and their hand-written captions as a CSV corpus."""
    from benchmarks.samples import SAMPLE_CAPTIONS, write_sample_photos

    paths = write_sample_photos(folder / "photos")
    caps = folder / "captions.csv"
    with open(caps, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for p in paths:
            for c in SAMPLE_CAPTIONS[p.name]:
                w.writerow([f"photos/{p.name}", c])
    n_caps = sum(len(SAMPLE_CAPTIONS[p.name]) for p in paths)
    return (
        caps,
        f"scikit-image sample photos (benchmarks/samples.py): {len(paths)} photos, {n_caps} hand-written captions",
    )


def write_synthetic(folder: Path, n: int) -> tuple[Path, str]:
    """n small drawn images with two made-up captions each: exercises the mechanics, measures nothing real."""
    import numpy as np
    from PIL import Image, ImageDraw

    (folder / "photos").mkdir(parents=True, exist_ok=True)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    rows = []
    for i in range(n):
        rng = np.random.default_rng(i)
        c = int(rng.integers(len(colours)))
        im = Image.new("RGB", (96, 72), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(im)
        x, y = int(rng.integers(0, 60)), int(rng.integers(0, 40))
        d.ellipse([x, y, x + 30, y + 30], fill=colours[c])
        name = f"syn_{i:05d}.jpg"
        im.save(folder / "photos" / name, quality=90)
        rows += [
            (f"photos/{name}", f"a {colours[c]} circle, picture {i}"),
            (f"photos/{name}", f"synthetic scene number {i}"),
        ]
    caps = folder / "captions.csv"
    with open(caps, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return caps, f"synthetic drawn images: {n} images, {2 * n} captions (mechanics only; no semantics)"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", default=None, help="caption corpus (default: the scikit-image samples)")
    ap.add_argument("--images", default=None, help="folder the corpus image paths are relative to")
    ap.add_argument("--format", dest="fmt", default="auto", choices=["auto", "csv", "jsonl", "karpathy", "coco"])
    ap.add_argument("--split", default=None)
    ap.add_argument("--models", default="starter", help="comma-separated model specs, one index each")
    ap.add_argument("--index", default=None, help="evaluate (or build and keep) this index; one model only")
    ap.add_argument("--k", default="1,5,10")
    ap.add_argument("--exact", action="store_true", help="also over exact (flat) search")
    ap.add_argument("--synthetic", type=int, default=0, help="use N generated images instead of a corpus")
    ap.add_argument("--name", default=None, help="output name: recall_<name>.json (default from the dataset)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = ap.parse_args(argv)

    from report import machine_info

    from index_data.options import IndexOptions
    from index_data.pipeline import run_index
    from retrieval.eval.run import run_recall_benchmark

    cmd = "python benchmarks/recall.py" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))
    print(f"reproduce: {cmd}", flush=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.index and len(models) > 1:
        ap.error("--index takes one model")

    def build(path, options):
        run_index(path, IndexOptions(workers=args.workers, progress=False, **options))

    with tempfile.TemporaryDirectory(prefix="recall_bench_") as td:
        if args.captions:
            caps, dataset = Path(args.captions), f"{args.captions}" + (f" (split {args.split})" if args.split else "")
            name = args.name or Path(args.captions).stem + (f"_{args.split}" if args.split else "")
        elif args.synthetic:
            caps, dataset = write_synthetic(Path(td) / "data", args.synthetic)
            name = args.name or f"synthetic{args.synthetic}"
        else:
            caps, dataset = write_samples(Path(td) / "data")
            name = args.name or "samples"
        runs = []
        for spec in models:
            r = run_recall_benchmark(
                caps,
                index_dir=args.index,
                images_dir=args.images,
                fmt=args.fmt,
                split=args.split,
                model=spec,
                ks=args.k,
                exact=args.exact,
                device=args.device,
                build=build,
            )
            d = r.to_dict()
            runs.append(d)
            keys = [k for k in d if "_recall@" in k]
            print(f"{spec}: " + ", ".join(f"{k} {100 * d[k]:.1f}%" for k in keys), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "title": f"Recall: {name}",
        "command": cmd,
        "dataset": dataset,
        "machine": machine_info(),
        "runs": runs,
        "note": "Random-init models (ARCH:none) measure chance level, not a real model."
        if any(m.endswith(":none") for m in models)
        else None,
    }
    path = out / f"recall_{name}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
    print(f"reproduce: {cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
