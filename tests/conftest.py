"""Test configuration: never touch the network; register the tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# ONNX exports go to a cache shared by this test session (and its subprocesses), never the user's own
if "RETRIEVAL_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["RETRIEVAL_CACHE_DIR"] = tempfile.mkdtemp(prefix="retrieval-test-cache-")

# The tiny test architectures (tiny-clip, tiny-clip-b), for this process and every CLI subprocess it spawns
os.environ["RETRIEVAL_MODEL_CONFIGS"] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")

import sys  # noqa: E402

# benchmarks/ (demo samples, benchmark scripts) is imported as a namespace package from the repository root
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402
from pg_support import pg_server, pg_url  # noqa: E402, F401 -- PostgreSQL fixtures

TINY = "tiny-clip:none"


def machine() -> str:
    """This machine in words, for the figures the fault suites write (FAULTS_OUT)."""
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


@pytest.fixture(scope="session")
def tiny_encoder():
    from retrieval.models.registry import load_encoder

    return load_encoder(TINY, device="cpu")


def draw_scene(seed: int, size=(96, 72)):
    """A distinct synthetic photo per seed: background colour plus a few shapes."""
    import random

    from PIL import Image, ImageDraw

    rnd = random.Random(seed)
    im = Image.new("RGB", size, tuple(rnd.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(3):
        x0, y0 = rnd.randrange(size[0] - 20), rnd.randrange(size[1] - 20)
        box = [x0, y0, x0 + rnd.randrange(10, 40), y0 + rnd.randrange(10, 40)]
        colour = tuple(rnd.randrange(256) for _ in range(3))
        (d.ellipse if rnd.random() < 0.5 else d.rectangle)(box, fill=colour)
    return im


def write_photos(folder, n: int, start: int = 0, ext: str = "jpg"):
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"img_{i:04d}.{ext}"
        draw_scene(i).save(p, quality=95) if ext == "jpg" else draw_scene(i).save(p)
        paths.append(p)
    return paths


def build_index(index_dir, paths, **kw):
    from index_data.options import IndexOptions
    from index_data.pipeline import run_index

    kw.setdefault("model", TINY)
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return run_index(index_dir, IndexOptions(paths=[str(p) for p in paths], **kw))


def run_python(code: str, timeout: float = 120):
    """code in a fresh interpreter from the repository root (what a new `retrieval` process imports); the
    CompletedProcess, its output as text."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=timeout)
