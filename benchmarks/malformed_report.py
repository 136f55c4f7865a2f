"""What the indexer does with malformed and odd files: one table, case -> outcome -> reason.

Writes a corpus with one file per awkward case (tests/corpus.py generators), indexes it with
`retrieval index` (the click command, in this process, tiny random-init model) and reads back, for
each case, whether the file was indexed (with its size and captions) or skipped, and the reason
recorded in the index's `errors` table and printed in the run's report. The unreadable file is made
unreadable for real: mode 000, and the run drops CAP_DAC_OVERRIDE so that even root gets EACCES.

Usage:
  python benchmarks/malformed_report.py --out benchmarks/out        # writes malformed_table.md/.json
  python benchmarks/malformed_report.py --tiny --out /tmp/x         # 1 MB sidecar instead of 5 MB (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault(
    "RETRIEVAL_MODEL_CONFIGS", str(ROOT / "tests" / "model_configs")
)  # the tests' tiny-clip architectures
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

MACHINE = "2-core CPU machine (no GPU)"
TINY_MODEL = "tiny-clip:none"


@dataclass
class Case:
    case: str  # what is odd about it
    name: str  # path relative to the corpus folder (os.fsdecode form)
    expected: str  # "indexed", "skipped", or "folder" (walked as a folder, not a file)
    outcome: str = ""
    reason: str = ""
    detail: str = ""
    in_report: bool = False  # the skipped path is listed in the CLI's end-of-run report

    @property
    def ok(self) -> bool:
        return self.outcome == self.expected and (self.expected != "skipped" or (bool(self.reason) and self.in_report))


def build_corpus(d: Path, sidecar_bytes: int) -> list[Case]:
    import corpus as c

    d.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(case, name, expected, fn, *args, **kw):
        fn(os.path.join(os.fsencode(d), name) if isinstance(name, bytes) else str(d / name), *args, **kw)
        cases.append(Case(case, os.fsdecode(name), expected))

    add("control: a normal JPEG", "ok_photo.jpg", "indexed", c.make_jpeg, (320, 240), seed=1)
    add("zero bytes", "zero_bytes.jpg", "skipped", c.make_zero_byte)
    add("truncated JPEG (40% of its bytes)", "truncated.jpg", "skipped", c.make_truncated_jpeg)
    add("truncated PNG (50% of its bytes)", "truncated.png", "skipped", c.make_truncated_png)
    add("random bytes named .jpg", "random_bytes.jpg", "skipped", c.make_random_bytes)
    add("random bytes named .webp", "random_bytes.webp", "skipped", c.make_random_bytes, seed=1)
    add("text file named .png", "text_pretending.png", "skipped", c.make_text_file)
    add("PNG header claiming 100000x100000", "bomb_100000x100000.png", "skipped", c.make_bomb_png)
    add("EXIF orientation = 12345 (garbage)", "exif_garbage_orientation.jpg", "indexed", c.make_garbage_exif_jpeg)
    add("EXIF block full of junk", "exif_corrupt_block.jpg", "indexed", c.make_corrupt_exif_jpeg)
    add("EXIF orientation 6 (rotated)", "exif_rotated6.jpg", "indexed", c.make_exif_rotated_jpeg)
    add("animated GIF (3 frames)", "animated.gif", "indexed", c.make_animated_gif)
    add("CMYK JPEG", "cmyk.jpg", "indexed", c.make_cmyk_jpeg)
    add("16-bit greyscale PNG", "grey16.png", "indexed", c.make_16bit_png)
    add("RGBA PNG (half transparent)", "rgba.png", "indexed", c.make_rgba_png)
    add("1x1 pixel PNG", "one_pixel.png", "indexed", c.make_1x1_png)
    mb = sidecar_bytes / 2**20
    add(f"{mb:g} MB text sidecar", "huge_sidecar.jpg", "indexed", c.make_jpeg, seed=2)
    c.make_huge_text(d / "huge_sidecar.jpg.txt", sidecar_bytes)
    add("Latin-1 (non-UTF-8) sidecar", "latin1_sidecar.jpg", "indexed", c.make_jpeg, seed=3)
    (d / "latin1_sidecar.jpg.txt").write_bytes(b"caf\xe9 au lait\n")
    add("non-UTF-8 file name", c.NON_UTF8_NAME, "indexed", c.make_jpeg, seed=4)
    add("250-byte file name", c.LONG_NAME, "indexed", c.make_jpeg, seed=5)
    deep = c.make_deep_path(d / "deep", 4200)
    cases.append(
        Case("path longer than PATH_MAX (4200 bytes)", os.fsdecode(deep[len(os.fsencode(d)) + 1 :]), "skipped")
    )
    add("mode 000 (unreadable, even for root)", "unreadable.jpg", "skipped", c.make_unreadable)
    add("FIFO named .jpg", "fifo.jpg", "skipped", c.make_fifo)
    add("directory symlink to its own parent", "loop", "skipped", c.make_symlink_loop)
    add("symlink to itself named .jpg", "self_loop.jpg", "skipped", c.make_self_symlink)
    add("dangling symlink named .jpg", "dangling.jpg", "skipped", c.make_broken_symlink)
    c.make_jpeg(d / "folder.jpg" / "inside.jpg", seed=6)
    cases.append(Case("directory named like an image (folder.jpg/)", "folder.jpg", "folder"))
    cases.append(Case("photo inside folder.jpg/", "folder.jpg/inside.jpg", "indexed"))
    c.make_jpeg(d / "locked_dir" / "inside.jpg", seed=7)
    os.chmod(d / "locked_dir", 0)
    cases.append(Case("directory with mode 000", "locked_dir", "skipped"))
    return cases


def run(workdir: Path, sidecar_bytes: int = 5 * 2**20, workers: int = 1) -> dict:
    """Build the corpus under `workdir`, index it, and fill in each case's outcome."""
    from click.testing import CliRunner
    from faultkit import no_dac_override

    import cli
    from retrieval.sidecar import SIDECAR_MAX_LINES
    from retrieval.store.index import Index

    folder, index_dir = workdir / "corpus", workdir / "index"
    cases = build_corpus(folder, sidecar_bytes)
    argv = [
        "index",
        str(folder),
        "--index",
        str(index_dir),
        "--model",
        TINY_MODEL,
        "--workers",
        str(workers),
        "--device",
        "cpu",
        "-q",
    ]
    try:
        with no_dac_override():  # so that mode 000 means unreadable for root too
            t0 = time.perf_counter()
            result = CliRunner().invoke(cli.main, argv)
            seconds = time.perf_counter() - t0
            rerun = CliRunner().invoke(cli.main, argv)  # changes nothing, records nothing twice
    finally:
        os.chmod(folder / "locked_dir", 0o755)
    report = result.stderr

    with Index.open(index_dir) as idx:
        db = idx.store.db
        images = {
            bytes(raw): (w, h, i) for raw, w, h, i in db.execute("SELECT path_raw, width, height, id FROM images")
        }
        errors = {bytes(raw): reason for raw, reason in db.execute("SELECT path_raw, reason FROM errors")}
        caps = idx.store.captions_for_images([v[2] for v in images.values()])
        problems = idx.verify()
        n_errors = idx.store.count("errors")
    base = os.fsencode(folder)
    for case in cases:
        raw = base + b"/" + os.fsencode(case.name)
        if raw in images:
            w, h, i = images[raw]
            texts = [t for _, t in caps.get(i, [])]
            case.outcome = "indexed"
            case.detail = f"{w}x{h}" + (f", {len(texts)} captions" if texts else "")
            if case.name == "huge_sidecar.jpg":
                case.detail += f" (sidecar cut at {SIDECAR_MAX_LINES} lines / 64 KB)"
            if case.name == "latin1_sidecar.jpg":
                case.detail += f": {texts[0]!r}"
        elif raw in errors or any(a in errors for a in _ancestors(raw, base)):
            # a file under a folder that cannot be listed is reported as that folder
            at = raw if raw in errors else next(a for a in _ancestors(raw, base) if a in errors)
            case.outcome, case.reason = "skipped", errors[at]
            if at != raw:
                case.detail = f"recorded for its folder, {len(at)} bytes long"
                raw = at
            case.in_report = raw.decode("utf-8", "replace") in report  # as the CLI prints paths
        elif os.path.isdir(os.fsdecode(raw)):
            case.outcome = "folder"
            case.detail = "walked like any folder; no error recorded for it"
        else:
            case.outcome = "not recorded"
    return {
        "machine": MACHINE,
        "exit_code": result.exit_code,
        "rerun_exit_code": rerun.exit_code,
        "rerun_report": rerun.stderr.strip().splitlines()[0] if rerun.stderr.strip() else "",
        "report_first_line": report.strip().splitlines()[0] if report.strip() else "",
        "seconds": round(seconds, 2),
        "errors_recorded": n_errors,
        "verify": problems,
        # names as text: a non-UTF-8 byte shows as \xe9
        "cases": [
            dict(asdict(c), name=os.fsencode(c.name).decode("utf-8", "backslashreplace"), ok=c.ok) for c in cases
        ],
    }


def _ancestors(raw: bytes, base: bytes):
    while True:
        raw = os.path.dirname(raw)
        if len(raw) <= len(base):
            return
        yield raw


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown(doc: dict) -> str:
    lines = [
        "# Malformed and odd files: what the indexer does",
        "",
        f"Machine: {doc['machine']}. One `retrieval index` run (tiny model, 1 decode worker) over one file per case; "
        f"exit code {doc['exit_code']}, {doc['errors_recorded']} reasons recorded in the `errors` table, "
        f"`verify`: {'clean' if not doc['verify'] else doc['verify']}. The same command again: exit code "
        f'{doc["rerun_exit_code"]}, "{doc["rerun_report"]}". '
        f"Reproduce: `python benchmarks/malformed_report.py --out benchmarks/out`.",
        "",
        "| case | file | outcome | reason recorded / detail | as expected |",
        "|---|---|---|---|---|",
    ]
    for c in doc["cases"]:
        name = c["name"] if len(c["name"]) <= 48 else c["name"][:20] + "…" + c["name"][-20:]
        what = "; ".join(filter(None, [c["reason"], c["detail"]]))
        if c["outcome"] == "skipped" and c["in_report"]:
            what += " (also in the run report)"
        lines.append(
            f"| {_md_escape(c['case'])} | `{_md_escape(name)}` | {c['outcome']} | {_md_escape(what)} | "
            f"{'yes' if c['ok'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--tiny", action="store_true", help="1 MB sidecar instead of 5 MB")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="malformed-"))
    try:
        doc = run(work, sidecar_bytes=(1 if args.tiny else 5) * 2**20, workers=args.workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "malformed_table.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    (out / "malformed_table.md").write_text(markdown(doc))
    bad = [c["case"] for c in doc["cases"] if not c["ok"]]
    print(markdown(doc))
    print(f"{len(doc['cases']) - len(bad)} of {len(doc['cases'])} cases as expected" + (f"; not: {bad}" if bad else ""))
    return 0 if not bad and doc["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
