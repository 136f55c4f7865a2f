"""Memory a query upload costs the server: peak and retained RSS per request, one and two at once.

Each case runs in a fresh child process that opens the web app over a tiny index (tiny-clip model, loaded
by a warm-up query first, so it is not counted), then POSTs the upload to /api/search through Starlette's
TestClient (the app's real request path: multipart parsing, decoding, encoding) and reads the process's
VmRSS before, VmHWM (the peak, reset through /proc/self/clear_refs just before the request) and VmRSS
after. "extra" = peak - before; "retained" = after - before. Linux only.

Usage:
  python benchmarks/upload_memory.py --out benchmarks/out         # writes upload_memory.json/.md
  PYTHONPATH=/path/to/older/checkout python benchmarks/upload_memory.py --out /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault(
    "RETRIEVAL_MODEL_CONFIGS", str(ROOT / "tests" / "model_configs")
)  # the tests' tiny-clip architectures
MACHINE = "2-core AMD EPYC CPU machine (no GPU), 24 GB RAM"


def flat_png(path: Path, width: int, height: int, alpha: bool = False) -> None:
    """A valid 8-bit RGB PNG of width x height (a gradient per row, so it compresses to a few hundred KB)
    written row by row: making it needs no full-size buffer."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(6)
    with open(path, "wb") as f:
        colour_type = 6 if alpha else 2  # RGBA or RGB, 8 bits per channel
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)))
        parts = []
        for y in range(height):
            row = b"\x00" + bytes((y * 255 // max(1, height - 1), 90, 160, 200)[: 4 if alpha else 3]) * width
            parts.append(comp.compress(row))
            if sum(map(len, parts)) > 1 << 20:
                f.write(chunk(b"IDAT", b"".join(parts)))
                parts = []
        parts.append(comp.flush())
        f.write(chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def big_jpeg(path: Path, width: int, height: int) -> None:
    from PIL import Image

    Image.linear_gradient("L").resize((width, height)).convert("RGB").save(path, "JPEG", quality=85)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _child(index_dir: str, upload: str, concurrent: int) -> None:
    """Runs in the child: prints one JSON line."""
    import gc
    import threading

    from fastapi.testclient import TestClient

    from retrieval.server.app import create_app

    try:
        app = create_app(index_dir, device="cpu", for_tests=True)
    except TypeError:  # an older server without the parameter accepted the TestClient's host anyway
        app = create_app(index_dir, device="cpu")
    data = Path(upload).read_bytes()
    name = os.path.basename(upload)
    with TestClient(app) as c:
        warm = Path(index_dir).parent / "warm.jpg"
        assert c.post("/api/search", files={"image": ("w.jpg", warm.read_bytes())}).status_code == 200
        gc.collect()
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        codes = []

        def one():
            codes.append(c.post("/api/search", files={"image": (name, data)}, data={"k": "3"}).status_code)

        threads = [threading.Thread(target=one) for _ in range(concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = _status("VmHWM")
        gc.collect()
        after = _status("VmRSS")
    import retrieval

    print(
        json.dumps(
            {
                "code": str(Path(retrieval.__file__).resolve().parent.parent),
                "status": codes,
                "before_mb": before / 2**20,
                "extra_mb": (peak - before) / 2**20,
                "retained_mb": (after - before) / 2**20,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--only", default=None, help="only the uploads whose label contains this text")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from conftest import build_index, draw_scene, write_photos

    work = Path(tempfile.mkdtemp(prefix="upload-mem-"))
    write_photos(work / "p", 4)
    build_index(work / "idx", [work / "p"])
    draw_scene(7).save(work / "warm.jpg")
    uploads = {
        "PNG 13000x13000 (169 MP)": (work / "png13k.png", lambda p: flat_png(p, 13000, 13000)),
        "PNG 6500x4900 (32 MP)": (work / "png32m.png", lambda p: flat_png(p, 6500, 4900)),
        "PNG RGBA 6500x4900 (32 MP)": (work / "png32m_rgba.png", lambda p: flat_png(p, 6500, 4900, alpha=True)),
        "JPEG 8000x6000 (48 MP)": (work / "jpg48m.jpg", lambda p: big_jpeg(p, 8000, 6000)),
    }
    rows = []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    for label, (path, make) in uploads.items():
        if args.only and args.only not in label:
            continue
        make(path)
        for concurrent in (1, 2):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(work / "idx"), str(path), str(concurrent)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "upload": label,
                    "file_kb": round(path.stat().st_size / 1024),
                    "at_once": concurrent,
                    **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()},
                }
            )
            print({k: v for k, v in rows[-1].items() if k != "code"}, flush=True)
    result = {
        "machine": MACHINE,
        "server_code": sorted({r.pop("code") for r in rows}),
        "command": "python benchmarks/upload_memory.py --out " + args.out,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "upload_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["| upload | file | at once | HTTP status | extra peak RSS | retained after |", "|---|---|---|---|---|---|"]
    md += [
        f"| {r['upload']} | {r['file_kb']} KB | {r['at_once']} | {', '.join(map(str, r['status']))} | "
        f"{r['extra_mb']:.0f} MB | {r['retained_mb']:.0f} MB |"
        for r in rows
    ]
    (out / "upload_memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nreproduce: {result['command']}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(*sys.argv[2:4], int(sys.argv[4]))
    else:
        main()
