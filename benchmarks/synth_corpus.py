"""Synthetic image-caption corpus: scenes drawn with PIL, several paraphrased captions per image.

Each scene has a background colour and one to three groups of objects; a group is 1-3 copies of one shape in
one colour and size, placed in one region of a 3x3 grid (top left ... bottom right). Each image gets
`--captions` different paraphrases: synonyms for colours, shapes, sizes, counts and places, several sentence
templates, and some captions that leave out details (size, place or background), as people do.

Output (a standard format, so the engine reads it with `--format karpathy --split NAME`):

    OUT/images/{train,val,test}/img_000123.jpg
    OUT/captions.json     Karpathy split file: {"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]}
    OUT/captions.csv      the same pairs as CSV (image,caption,split), if --csv

Deterministic for a given --seed. Usage:

    python benchmarks/synth_corpus.py --out benchmarks/data/synth --images 2000 --val 200 --test 400
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {  # name: (rgb, synonyms)
    "red": ((220, 30, 30), ["red", "crimson", "scarlet"]),
    "green": ((30, 170, 50), ["green", "emerald"]),
    "blue": ((35, 70, 220), ["blue", "cobalt"]),
    "yellow": ((245, 215, 30), ["yellow", "golden"]),
    "orange": ((250, 140, 20), ["orange", "tangerine"]),
    "purple": ((130, 40, 170), ["purple", "violet"]),
    "pink": ((250, 130, 190), ["pink", "rose"]),
    "brown": ((120, 70, 30), ["brown", "chocolate"]),
    "white": ((245, 245, 245), ["white", "snow white"]),
    "black": ((15, 15, 15), ["black", "jet black"]),
    "gray": ((128, 128, 128), ["gray", "grey"]),
    "cyan": ((40, 210, 220), ["cyan", "turquoise"]),
}
BACKGROUNDS = ["white", "black", "gray", "blue", "green", "yellow", "pink", "brown"]
SHAPES = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "three-sided shape"],
    "star": ["star", "five-pointed star"],
    "diamond": ["diamond", "rhombus"],
    "cross": ["cross", "plus sign"],
    "ring": ["ring", "hoop", "donut"],
    "hexagon": ["hexagon", "six-sided shape"],
}
PLURAL = {
    "box": "boxes",
    "cross": "crosses",
    "plus sign": "plus signs",
    "round dot": "round dots",
    "three-sided shape": "three-sided shapes",
    "six-sided shape": "six-sided shapes",
    "five-pointed star": "five-pointed stars",
    "rhombus": "rhombuses",
}
SIZES = {"small": (0.10, ["small", "little", "tiny"]), "large": (0.24, ["large", "big", "huge"])}
REGIONS = {  # name: (cx, cy) in 0..1, phrases
    "top left": ((0.2, 0.2), ["in the top left corner", "at the upper left", "top left"]),
    "top": ((0.5, 0.2), ["at the top", "near the top edge", "up top"]),
    "top right": ((0.8, 0.2), ["in the top right corner", "at the upper right", "top right"]),
    "left": ((0.2, 0.5), ["on the left", "at the left side", "to the left"]),
    "center": ((0.5, 0.5), ["in the center", "in the middle", "at the centre"]),
    "right": ((0.8, 0.5), ["on the right", "at the right side", "to the right"]),
    "bottom left": ((0.2, 0.8), ["in the bottom left corner", "at the lower left", "bottom left"]),
    "bottom": ((0.5, 0.8), ["at the bottom", "near the bottom edge", "down below"]),
    "bottom right": ((0.8, 0.8), ["in the bottom right corner", "at the lower right", "bottom right"]),
}
COUNTS = {1: ["a", "one", "a single"], 2: ["two", "a pair of", "2"], 3: ["three", "a trio of", "3"]}


@dataclass(frozen=True)
class Group:
    count: int
    shape: str
    colour: str
    size: str
    region: str


@dataclass(frozen=True)
class Scene:
    background: str
    groups: tuple[Group, ...]


def random_scene(rnd: random.Random) -> Scene:
    bg = rnd.choice(BACKGROUNDS)
    n_groups = rnd.choices([1, 2, 3], weights=[0.35, 0.45, 0.2])[0]
    regions = rnd.sample(list(REGIONS), n_groups)
    groups = []
    for region in regions:
        colour = rnd.choice([c for c in COLOURS if c != bg])
        groups.append(
            Group(
                rnd.choices([1, 2, 3], weights=[0.5, 0.3, 0.2])[0],
                rnd.choice(list(SHAPES)),
                colour,
                rnd.choice(list(SIZES)),
                region,
            )
        )
    return Scene(bg, tuple(groups))


# -- drawing ------------------------------------------------------------------------------------


def _jitter(rgb, rnd, amount=18):
    return tuple(max(0, min(255, c + rnd.randint(-amount, amount))) for c in rgb)


def _polygon(cx, cy, r, n, rot):
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)
    ]


def _draw_shape(d: ImageDraw.ImageDraw, shape, cx, cy, r, fill, bg, rnd):
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, math.pi / 4 + rnd.uniform(-0.15, 0.15)), fill=fill)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.15, 3, -math.pi / 2 + rnd.uniform(-0.2, 0.2)), fill=fill)
    elif shape == "diamond":
        pts = [(cx, cy - r * 1.2), (cx + r * 0.75, cy), (cx, cy + r * 1.2), (cx - r * 0.75, cy)]
        d.polygon(pts, fill=fill)
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, r * 1.1, 6, rnd.uniform(0, 0.5)), fill=fill)
    elif shape == "star":
        rot = -math.pi / 2 + rnd.uniform(-0.2, 0.2)
        pts = []
        for k in range(10):
            rr = r * 1.25 if k % 2 == 0 else r * 0.5
            a = rot + math.pi * k / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.38
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        d.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=bg)
    else:
        raise ValueError(shape)


def draw(scene: Scene, rnd: random.Random, size: int = 128) -> Image.Image:
    bg = _jitter(COLOURS[scene.background][0], rnd, 12)
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    for g in scene.groups:
        (cx, cy), _ = REGIONS[g.region]
        base_r = SIZES[g.size][0] * size * rnd.uniform(0.85, 1.15)
        r = base_r if g.count == 1 else base_r * (0.8 if g.size == "small" else 0.55)
        fill = _jitter(COLOURS[g.colour][0], rnd)
        spread = max(size * 0.12, r * 1.15)
        offsets = (
            [(0, 0)]
            if g.count == 1
            else [
                (spread * math.cos(a), spread * math.sin(a))
                for a in [rnd.uniform(0, 2 * math.pi) + 2 * math.pi * k / g.count for k in range(g.count)]
            ]
        )
        for ox, oy in offsets:
            x = min(max(cx * size + ox + rnd.uniform(-4, 4), r), size - r)
            y = min(max(cy * size + oy + rnd.uniform(-4, 4), r), size - r)
            _draw_shape(d, g.shape, x, y, r, fill, bg, rnd)
    return im


# -- captions -----------------------------------------------------------------------------------


def _noun(shape_word: str, count: int) -> str:
    if count == 1:
        return shape_word
    return PLURAL.get(shape_word, shape_word + "s")


def _group_phrase(g: Group, rnd: random.Random, with_size: bool, with_place: bool) -> str:
    count = rnd.choice(COUNTS[g.count])
    colour = rnd.choice(COLOURS[g.colour][1])
    shape = _noun(rnd.choice(SHAPES[g.shape]), g.count)
    size = rnd.choice(SIZES[g.size][1]) + " " if with_size else ""
    if count == "a" and (size or colour)[0] in "aeiou":
        count = "an"
    phrase = f"{count} {size}{colour} {shape}"
    if with_place:
        phrase += " " + rnd.choice(REGIONS[g.region][1])
    return phrase


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions_for(scene: Scene, rnd: random.Random, n: int) -> list[str]:
    out: list[str] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        detail = rnd.random()
        with_size, with_place, with_bg = detail > 0.2, detail > 0.35 or len(scene.groups) == 1, rnd.random() > 0.25
        groups = list(scene.groups)
        rnd.shuffle(groups)
        things = _join([_group_phrase(g, rnd, with_size, with_place) for g in groups])
        bgw = rnd.choice(COLOURS[scene.background][1])
        t = rnd.randrange(6)
        if t == 0:
            s = f"{things}" + (f" on a {bgw} background" if with_bg else "")
        elif t == 1:
            s = f"a {bgw} picture with {things}" if with_bg else f"a picture with {things}"
        elif t == 2:
            s = f"there is {things}" + (f" against a {bgw} backdrop" if with_bg else "")
        elif t == 3:
            s = f"{bgw} background showing {things}" if with_bg else f"an image showing {things}"
        elif t == 4:
            s = f"drawing of {things}" + (f" over {bgw}" if with_bg else "")
        else:
            s = f"on a plain {bgw} canvas: {things}" if with_bg else f"simple shapes: {things}"
        s = s[0].upper() + s[1:] + "."
        if s not in out:
            out.append(s)
    return out


# -- corpus -------------------------------------------------------------------------------------


def generate(
    out: Path,
    n_images: int,
    n_val: int,
    n_test: int,
    n_captions: int = 5,
    seed: int = 0,
    size: int = 128,
    write_csv: bool = False,
    quality: int = 90,
) -> dict:
    """Write the corpus; returns a summary. Scenes are distinct (same description never drawn twice)."""
    if n_val + n_test >= n_images:
        raise SystemExit("--val + --test must be smaller than --images")
    rnd = random.Random(seed)
    out = Path(out)
    seen: set[Scene] = set()
    records = []
    splits = ["test"] * n_test + ["val"] * n_val + ["train"] * (n_images - n_val - n_test)
    for i, split in enumerate(splits):
        scene = random_scene(rnd)
        while scene in seen:
            scene = random_scene(rnd)
        seen.add(scene)
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        name = f"img_{i:06d}.jpg"
        draw(scene, rnd, size).save(folder / name, quality=quality)
        caps = captions_for(scene, rnd, n_captions)
        records.append(
            {
                "filepath": f"images/{split}",
                "filename": name,
                "split": split,
                "imgid": i,
                "sentences": [{"raw": c, "tokens": c.lower().rstrip(".").split()} for c in caps],
            }
        )
    (out / "captions.json").write_text(json.dumps({"dataset": "synthetic-shapes", "images": records}, indent=1))
    if write_csv:
        with open(out / "captions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption", "split"])
            for r in records:
                for s in r["sentences"]:
                    w.writerow([f"{r['filepath']}/{r['filename']}", s["raw"], r["split"]])
    return {
        "images": n_images,
        "train": splits.count("train"),
        "val": n_val,
        "test": n_test,
        "captions_per_image": n_captions,
        "seed": seed,
        "out": str(out),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--captions", type=int, default=5, help="captions per image")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", action="store_true", help="also write captions.csv (image,caption,split)")
    a = ap.parse_args(argv)
    print(json.dumps(generate(a.out, a.images, a.val, a.test, a.captions, a.seed, a.size, a.csv)))


if __name__ == "__main__":
    main()
