"""Real sample photos that ship inside scikit-image, with hand-written captions.

Demo data, not part of the library: used by `make demo`, the tests and the benchmarks as a small
real-semantics check set.
Nothing is committed as an image: `write_sample_photos` writes JPEGs at run time from `skimage.data`
(the files live inside the scikit-image wheel, so no download happens). scikit-image is in the `test`
and `demo` extras.

The captions are plain descriptions a person might type when looking for the photo; they were written
from looking at the pictures, not from the starter model's ImageNet class names.
"""

from __future__ import annotations

from pathlib import Path

from retrieval.errors import RetrievalError

# file name -> (skimage.data loader name, captions)
_SAMPLES: dict[str, tuple[str, list[str]]] = {
    "astronaut_portrait.jpg": (
        "astronaut",
        [
            "an astronaut in an orange spacesuit",
            "a smiling woman astronaut posing in front of an American flag",
            "portrait of an astronaut with a model space shuttle",
        ],
    ),
    "brick_wall.jpg": (
        "brick",
        [
            "a brick wall",
            "rows of grey bricks",
            "close-up of a brick paving texture",
        ],
    ),
    "cameraman.jpg": (
        "camera",
        [
            "a man looking through a camera on a tripod",
            "black and white photo of a photographer in a park",
        ],
    ),
    "cat_chelsea.jpg": (
        "chelsea",
        [
            "a close-up of a cat's face",
            "a tabby cat with green eyes",
            "a ginger cat staring at the camera",
        ],
    ),
    "wall_clock_blurred.jpg": (
        "clock",
        [
            "a blurry clock on a wall",
            "a motion-blurred photo of a wall clock",
        ],
    ),
    "coffee_cup.jpg": (
        "coffee",
        [
            "a cup of coffee on a saucer",
            "an espresso in a red cup on a wooden table",
            "coffee with a spoon",
        ],
    ),
    "coins.jpg": (
        "coins",
        [
            "old coins on a dark background",
            "a collection of ancient coins",
            "rows of silver coins",
        ],
    ),
    "grass.jpg": (
        "grass",
        [
            "a patch of grass",
            "close-up of blades of grass in black and white",
        ],
    ),
    "gravel.jpg": (
        "gravel",
        [
            "gravel stones",
            "small pebbles seen from above",
        ],
    ),
    "horse_silhouette.jpg": (
        "horse",
        [
            "a black silhouette of a horse",
            "the outline of a standing horse on white",
        ],
    ),
    "hubble_deep_field.jpg": (
        "hubble_deep_field",
        [
            "galaxies in deep space",
            "a night sky full of stars and galaxies",
            "a Hubble telescope image of distant galaxies",
        ],
    ),
    "tissue_microscopy.jpg": (
        "immunohistochemistry",
        [
            "a stained tissue sample under a microscope",
            "a microscope slide of human tissue with brown stain",
        ],
    ),
    "moon_surface.jpg": (
        "moon",
        [
            "the surface of the moon",
            "lunar craters in black and white",
        ],
    ),
    "printed_page.jpg": (
        "page",
        [
            "a scanned page of printed text",
            "a document page about image segmentation",
        ],
    ),
    "retina_fundus.jpg": (
        "retina",
        [
            "a photo of the retina of an eye",
            "an eye fundus image showing blood vessels",
        ],
    ),
    "rocket_launch_pad.jpg": (
        "rocket",
        [
            "a rocket on the launch pad at dusk",
            "a space launch site with towers and lights",
        ],
    ),
    "handwriting.jpg": (
        "text",
        [
            "handwritten numbers on paper",
            "handwritten maths on a sheet of paper",
        ],
    ),
    "red_motorcycle.jpg": (
        "stereo_motorcycle",
        [
            "a red motorcycle parked in a garage",
            "a motorbike in a workshop",
            "a red motorbike indoors next to shelves",
        ],
    ),
}

SAMPLE_CAPTIONS: dict[str, list[str]] = {name: list(caps) for name, (_, caps) in _SAMPLES.items()}
SAMPLE_SOURCES: dict[str, str] = {name: src for name, (src, _) in _SAMPLES.items()}


def _load_array(source: str):
    import numpy as np

    try:
        import skimage.data as data
    except ImportError:
        raise RetrievalError("the sample photos need scikit-image: pip install 'retrieval-engine[demo]'") from None
    a = getattr(data, source)()
    if source == "stereo_motorcycle":
        a = a[0]  # (left, right, disparity): the left view
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    return a


def write_sample_photos(dest_dir, quality: int = 95) -> list[Path]:
    """Write the sample photos into dest_dir as JPEGs (created if needed); return their paths in order.

    Existing files of the same name are overwritten. Output is deterministic for a given scikit-image
    and Pillow version.
    """
    from PIL import Image

    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (source, _) in _SAMPLES.items():
        im = Image.fromarray(_load_array(source))
        p = dest / name
        im.save(p, format="JPEG", quality=quality)
        paths.append(p)
    return paths


def write_sample_captions(csv_path, photos_dir) -> Path:
    """The hand-written captions as a standard `image,caption` CSV (image paths relative to the CSV)."""
    import csv
    import os

    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for name, caps in SAMPLE_CAPTIONS.items():
            rel = os.path.relpath(Path(photos_dir) / name, csv_path.parent)
            for c in caps:
                w.writerow([rel, c])
    return csv_path


if __name__ == "__main__":  # python benchmarks/samples.py DEST_DIR [CAPTIONS_CSV]
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python benchmarks/samples.py DEST_DIR [CAPTIONS_CSV]")
    written = write_sample_photos(sys.argv[1])
    print(f"wrote {len(written)} sample photos to {sys.argv[1]}")
    if len(sys.argv) == 3:
        print(f"wrote captions to {write_sample_captions(sys.argv[2], sys.argv[1])}")
