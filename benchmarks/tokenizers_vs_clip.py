"""The query tokenizer: the `tokenizers` library against retrieval/models/tokenizer.py (pure Python), both set
up to reproduce open_clip's CLIP tokenizer.

* Exactness: token ids of tests/test_clip_tokenizer.py's strings plus `--fuzz` random strings, each compared
  with `open_clip.get_tokenizer("ViT-B-32")`. The `tokenizers` pipeline is a BPE model over open_clip's own
  vocabulary and merges (end-of-word suffix `</w>`), open_clip's pre-tokenizer pattern as a Split, then
  byte-level mapping. It has no ftfy, so open_clip's cleaning (ftfy.fix_text, html.unescape twice, whitespace,
  lower case) runs in Python first, as retrieval/models/tokenizer.py's clean_lower does.
* Cold cost: a new process that imports the tokenizer, loads it from its file and tokenizes one query, timed
  inside the process (import, load, first encode; numpy, which a query has loaded already, is imported
  first), `--runs` times, the two interleaved.

    python benchmarks/tokenizers_vs_clip.py                 # writes benchmarks/out/tokenizers_vs_clip.{json,md}
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUERY = "a dog running on the beach at sunset"
SOT, EOT = 49406, 49407

CHILD = {
    "tokenizers": (
        "import time, sys\n"
        "import numpy  # a query has it loaded already\n"
        "t0 = time.perf_counter()\n"
        "from tokenizers import Tokenizer\n"
        "from retrieval.models.tokenizer import clean_lower\n"
        "t1 = time.perf_counter()\n"
        "tok = Tokenizer.from_file(sys.argv[1])\n"
        "t2 = time.perf_counter()\n"
        "ids = tok.encode(clean_lower(sys.argv[3]), add_special_tokens=False).ids\n"
        "t3 = time.perf_counter()\n"
        "print(t1 - t0, t2 - t1, t3 - t2, ids)\n"
    ),
    "pure-python": (
        "import time, sys\n"
        "import numpy  # a query has it loaded already\n"
        "t0 = time.perf_counter()\n"
        "from retrieval.models.tokenizer import ClipTokenizer\n"
        "t1 = time.perf_counter()\n"
        "tok = ClipTokenizer.from_file(sys.argv[2], unique_merges=True)\n"
        "t2 = time.perf_counter()\n"
        "ids = tok.encode(sys.argv[3])\n"
        "t3 = time.perf_counter()\n"
        "print(t1 - t0, t2 - t1, t3 - t2, ids)\n"
    ),
}


def build_tokenizers_file(path: Path) -> None:
    """open_clip's CLIP tokenizer as a `tokenizers` JSON file (cleaning excluded: done in Python)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from retrieval.models.tokenizer import _PATTERN_UNICODE, bytes_to_unicode, read_merges

    merges = read_merges()
    base = list(bytes_to_unicode().values())
    vocab_list = base + [v + "</w>" for v in base] + [m.replace(" ", "", 1) for m in merges]
    vocab_list += ["<start_of_text>", "<end_of_text>"]
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(vocab_list)},
        merges=[tuple(m.split(" ")) for m in merges],
        end_of_word_suffix="</w>",
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PATTERN_UNICODE), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.add_special_tokens(["<start_of_text>", "<end_of_text>"])
    tok.save(str(path))


def exactness(tok_file: Path, n_fuzz: int) -> dict:
    import open_clip
    from tokenizers import Tokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from test_clip_tokenizer import STRINGS

    from retrieval.models.tokenizer import ClipTokenizer, clean_lower, read_merges

    ref = open_clip.get_tokenizer("ViT-B-32")
    hf = Tokenizer.from_file(str(tok_file))
    mine = ClipTokenizer(read_merges(), ref.context_length)
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)] + list("éàüß€—“”’…©°漢字かなカナ한🙂🐍\u00a0\u200b\ufeff&;#")
    texts = STRINGS + ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 50))) for _ in range(n_fuzz)]
    bad = {"tokenizers": 0, "pure-python": 0}
    for t in texts:
        want = [int(x) for x in ref([t])[0].tolist()]
        ids = [SOT, *hf.encode(clean_lower(t), add_special_tokens=False).ids, EOT]
        if len(ids) > ref.context_length:  # open_clip's truncation: cut, then the last token becomes EOT
            ids = ids[: ref.context_length]
            ids[-1] = EOT
        got = ids + [0] * (ref.context_length - len(ids))
        bad["tokenizers"] += got != want
        bad["pure-python"] += [int(x) for x in mine([t])[0]] != want
    return {"strings": len(texts), "mismatches": bad}


def cold(tok_file: Path, merges_file: Path, runs: int) -> dict:
    times = {k: {"import": [], "load": [], "encode": []} for k in CHILD}
    ids = {}
    for _ in range(runs):
        for name, code in CHILD.items():
            p = subprocess.run(
                [sys.executable, "-c", code, str(tok_file), str(merges_file), QUERY],
                capture_output=True,
                text=True,
                cwd=str(ROOT),
                check=True,
            )
            a, b, c, rest = p.stdout.split(" ", 3)
            for key, v in zip(("import", "load", "encode"), (a, b, c)):
                times[name][key].append(float(v) * 1e3)
            ids[name] = rest.strip()
    return {
        "same_ids": len(set(ids.values())) == 1,
        "median_ms": {n: {k: round(statistics.median(v), 2) for k, v in t.items()} for n, t in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--fuzz", type=int, default=400)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--name", default="tokenizers_vs_clip")
    a = ap.parse_args()
    from retrieval.models.tokenizer import MERGES_NAME, read_merges, write_ranks

    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / "tokenizer.json"
        build_tokenizers_file(tok_file)
        merges_file = Path(tmp) / MERGES_NAME  # what an export holds: the merges in use, and their sorted ranks
        merges = read_merges()
        merges_file.write_text("\n".join(["#version: open_clip merges in use", *merges]) + "\n", "utf-8")
        write_ranks(merges_file.with_name("bpe_ranks.txt"), merges)
        res = {
            "exactness": exactness(tok_file, a.fuzz),
            "cold": cold(tok_file, merges_file, a.runs),
            "file_bytes": {"tokenizers": tok_file.stat().st_size, "pure-python": merges_file.stat().st_size},
        }
    import tokenizers

    res["tokenizers_version"] = tokenizers.__version__
    cmd = f"python benchmarks/tokenizers_vs_clip.py --runs {a.runs} --fuzz {a.fuzz}"
    res["command"] = cmd
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    m = res["cold"]["median_ms"]
    lines = [
        "# Query tokenizer: `tokenizers` vs the pure-Python CLIP tokenizer",
        "",
        f"`{cmd}` (tokenizers {tokenizers.__version__})",
        "",
        f"Exactness against open_clip on {res['exactness']['strings']} strings: mismatches "
        f"{res['exactness']['mismatches']}. Same ids for the query in both: {res['cold']['same_ids']}.",
        "",
        "| tokenizer | import ms | load ms | first encode ms | total ms |",
        "|---|---|---|---|---|",
    ]
    for n, t in m.items():
        lines.append(f"| {n} | {t['import']} | {t['load']} | {t['encode']} | {round(sum(t.values()), 2)} |")
    (out / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"reproduce: {cmd}")


if __name__ == "__main__":
    main()
