"""Fast text queries (retrieval/fast_text.py, retrieval/clip_tokenizer.py): the torch-free text encoder
exported into an index gives open_clip's tokens and the torch encoder's vectors, the CLI uses it without
importing torch, and an export that does not belong to the index's model is never used."""

import html
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, build_index, write_photos
from retrieval import fast_text
from retrieval.clip_tokenizer import ClipTokenizer, _is_safe_ascii, read_merges
from retrieval.search import Searcher

ROOT = Path(__file__).resolve().parent.parent

STRINGS = [
    "", " ", "a dog", "A Dog Running On The BEACH!!!", "naïve café résumé", "Ünïcödé ñ 東京 タワー 한국어",
    "emoji 🐶🐱 👍🏽 family 👨‍👩‍👧 🏳️‍🌈", "&amp; &lt;b&gt; fish &amp;amp; chips &#39;x&#39;", "<b>bold</b> & <i>x</i>",
    "numbers 12345 3.14159 1,000,000 ½ ² ٣", "it's they're we've I'm you'll he'd 'S 'T", "don’t “curly” quotes — dash…",
    "tabs\tand\nnewlines\r\nand   spaces\u00a0nbsp", "\x1b[31mred\x1b[0m ctrl\x00\x07chars", "ﬁne ligature ｆｕｌｌｗｉｄｔｈ",
    "mojibake: cafÃ© rÃ©sumÃ©", "<start_of_text>hi<end_of_text> there", "word " * 100, "many words " * 150,
    "supercalifragilisticexpialidocious" * 5, "Ελληνικά, русский текст, عربى, हिन्दी", "zero\u200bwidth \u2028sep",
    "!!!???...,,,;;; C++ & C# / .NET e-mail: foo@bar.com http://x.y/z?a=1&b=2", "😀" * 90, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ǅ K ſ",
]


@pytest.fixture(scope="module")
def merges():
    return read_merges()


@pytest.mark.parametrize("arch", ["tiny-clip", "ViT-B-32"])
def test_tokenizer_matches_open_clip(arch, merges):
    import open_clip

    from retrieval.encoders import register_model_configs

    register_model_configs()
    ref = open_clip.get_tokenizer(arch)
    mine = ClipTokenizer(merges, ref.context_length)
    rng = random.Random(arch)
    alphabet = [chr(c) for c in range(128)] + list("éàüß€—“”’…©°漢字かなカナ한🙂🐍\u00a0\u200b\ufeff&;#")
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 50))) for _ in range(150)]
    texts = STRINGS + fuzz
    assert np.array_equal(ref(texts).numpy(), mine(texts))
    assert mine.vocab_size == len(ref.encoder) and mine.eot_token_id == ref.eot_token_id


def test_ascii_shortcut_is_what_ftfy_does():
    import ftfy

    rng = random.Random(0)
    chars = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n"]
    seen = 0
    for _ in range(3000):
        s = "".join(rng.choice(chars) for _ in range(rng.randrange(0, 40)))
        if _is_safe_ascii(s):
            seen += 1
            assert ftfy.fix_text(s) == s and html.unescape(html.unescape(s)) == s
    assert seen > 1000
    assert not _is_safe_ascii("fish &amp; chips") and not _is_safe_ascii("\x1b[0m") and not _is_safe_ascii("é")


@pytest.fixture(scope="module")
def starter_encoder():
    from retrieval.encoders import load_encoder

    try:
        return load_encoder("starter", device="cpu")
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the starter model must be installed for the test suite: {e}")


def test_numpy_encoder_matches_torch_tiny_and_starter(tmp_path, tiny_encoder, starter_encoder):
    for name, enc in (("tiny", tiny_encoder), ("starter", starter_encoder)):
        root = tmp_path / name
        root.mkdir()
        fast_text.export_text_encoder(enc, root)
        fast = fast_text.load_fast_text_encoder(root, enc.identity)
        assert fast is not None
        ref = enc.encode_texts(STRINGS)
        got = fast.encode_texts(STRINGS)
        assert got.dtype == np.float32 and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_numpy_clip_tower_matches_torch_vit_b32(merges):
    """ViT-B-32's text tower (random init: its real shapes, GELU, 12 layers), built alone (no image tower to
    initialise) and compared in memory (no 250 MB file)."""
    from types import SimpleNamespace

    import open_clip
    import torch
    from open_clip.model import _build_text_tower

    cfg = open_clip.get_model_config("ViT-B-32")
    torch.manual_seed(0)
    text = _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False)).eval()
    enc = SimpleNamespace(model=SimpleNamespace(text=text), tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    tower_cfg, weights, tok_cfg = fast_text._export_clip(enc)
    assert tower_cfg["activation"] == "gelu" and tower_cfg["causal"] and tower_cfg["pool"] == "argmax"
    assert tower_cfg["layers"] == 12 and tower_cfg["width"] == 512 and tok_cfg["context_length"] == 77
    blocked = fast_text.blocked_weights(weights)  # the layout an export writes
    assert blocked["layers.0.mlp.c_proj.weight"].shape == (16, 2048, 32)
    assert blocked["layers.0.attn.in_proj_weight"].shape == (24, 512, 64)
    assert blocked["token_embedding"].shape == weights["token_embedding"].shape
    tower = fast_text.ClipTextTower(tower_cfg, blocked)
    tok = ClipTokenizer(merges, tok_cfg["context_length"])
    texts = ["a photo of a cat", "hello <end_of_text> world", "Ünïcödé ñ 東京 🐶 &amp;", "word " * 100]  # ~23 GFLOP in torch
    got = np.stack([fast_text._normalize(tower.encode_tokens(tok.tokens(t))) for t in texts])
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(text(enc.tokenizer(texts)), dim=-1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # computing only the tokens up to end-of-text (and one row in the last layer) is exact: the full
    # padded context of 77 positions, as torch computes it, gives the same vector
    for t in ("a photo of a cat",):
        ids = tok.tokens(t)
        short, full = (fast_text._normalize(tower.encode_tokens(ids, full_context=f)) for f in (False, True))
        np.testing.assert_allclose(short, full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["rows", "blocked"])
def test_split_matmul_is_exact_and_never_waits_for_a_busy_helper(monkeypatch, layout):
    """Weight products are split across QUERY_THREADS threads (by input rows for a plain [K, N] weight, by
    column blocks for an export's blocked one). The result must not depend on how many threads there are
    or on who computed which block, and a helper pool that is busy elsewhere must not stall a query: the
    calling thread then takes every block itself."""
    import threading

    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 2048), dtype=np.float32)
    w = rng.standard_normal((2048, 512), dtype=np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    if layout == "blocked":
        plain, w = w, fast_text.to_blocked(w)
        assert w.shape == (16, 2048, 32) and fast_text.logical_shape(w) == (2048, 512)
        assert np.array_equal(fast_text.from_blocked(w), plain)
    knob = "BLOCKED_THREADS" if layout == "blocked" else "QUERY_THREADS"
    monkeypatch.setattr(fast_text, knob, 1)
    one = fast_text._matmul(x, w)
    monkeypatch.setattr(fast_text, knob, 2)
    runs = [fast_text._matmul(x, w) for _ in range(20)]
    np.testing.assert_allclose(one, ref, rtol=0, atol=1e-3)
    np.testing.assert_allclose(runs[0], one, rtol=0, atol=1e-3)
    assert all(np.array_equal(r, runs[0]) for r in runs)  # bit-identical whoever took each block

    release = threading.Event()
    pool = fast_text._pool()
    busy = [pool.submit(release.wait, 30) for _ in range(pool._max_workers)]  # every helper is occupied
    try:
        done = threading.Event()
        result = {}
        t = threading.Thread(target=lambda: (result.setdefault("v", fast_text._matmul(x, w)), done.set()))
        t.start()
        assert done.wait(10), "a query waited for a busy helper instead of doing the work itself"
        assert np.array_equal(result["v"], runs[0])
    finally:
        release.set()
        for b in busy:
            b.result()
    np.testing.assert_allclose(fast_text._matmul(x[0], w), ref[0], rtol=0, atol=1e-3)  # a single row


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast")
    photos = write_photos(root / "photos", 12)
    (root / "photos" / "img_0000.jpg.txt").write_text("a red circle\na blue square\n")
    build_index(root / "idx", [root / "photos"])
    return root / "idx"


def _torch_results(index, text, to="images"):
    os.environ[fast_text.ENV_DISABLE] = "1"
    try:
        with Searcher.open(index, device="cpu") as s:
            res = s.search(text, k=10, to=to)
            assert s._fast_text[1] is None
    finally:
        os.environ.pop(fast_text.ENV_DISABLE, None)
    return [(r.id, r.score) for r in res]


_DRIVER = """
import json, sys
sys.argv = ["retrieval", "search", *json.loads(sys.argv[1])]
import cli
try:
    cli.main()
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip", "torchvision", "transformers"))
print("HEAVY=" + json.dumps(heavy), file=sys.stderr)
sys.exit(code)
"""


def _cli_fast(index, args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(fast_text.ENV_DISABLE, None)
    p = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps([*args, "--index", str(index), "--json", "-k", "10"])],
                       capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120)
    assert p.returncode == 0, p.stderr
    heavy = json.loads(p.stderr.strip().splitlines()[-1].removeprefix("HEAVY="))
    return [json.loads(line) for line in p.stdout.splitlines()], heavy


def test_index_exports_and_cli_search_skips_torch(tiny_index):
    cfg = json.loads((tiny_index / fast_text.CONFIG_NAME).read_text())
    assert cfg["identity"]["spec"] == TINY and cfg["kind"] == "clip"
    for to, text in (("images", "a red circle on a blue background"), ("captions", "a blue square")):
        rows, heavy = _cli_fast(tiny_index, [text, "--to", to])
        assert heavy == []  # no torch, open_clip, torchvision or transformers in the process
        ref = _torch_results(tiny_index, text, to=to)
        assert [r["id"] for r in rows] == [i for i, _ in ref] and len(ref) > 0
        np.testing.assert_allclose([r["score"] for r in rows], [s for _, s in ref], atol=1e-4, rtol=0)


def _copy_index(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("lock"))
    return dst


def test_stale_or_mismatched_export_is_ignored(tiny_index, tmp_path):
    ref = _torch_results(tiny_index, "a green triangle")
    from retrieval.index import Index

    ident = Index.open(tiny_index).identity
    assert fast_text.load_fast_text_encoder(tiny_index, ident) is not None

    def check(idx_dir):
        with Searcher.open(idx_dir, device="cpu") as s:
            res = s.search("a green triangle", k=10)
            assert s._fast_text[1] is None  # fell back to torch
        assert [(r.id, pytest.approx(r.score, abs=1e-4)) for r in res] == ref

    # 1. the export claims another model
    bad = _copy_index(tiny_index, tmp_path / "other_model")
    cfg = json.loads((bad / fast_text.CONFIG_NAME).read_text())
    cfg["identity"]["arch"] = "tiny-clip-b"
    (bad / fast_text.CONFIG_NAME).write_text(json.dumps(cfg))
    check(bad)
    # 2. weights from another export (a replacement that stopped half-way)
    bad = _copy_index(tiny_index, tmp_path / "other_export")
    cfg = json.loads((bad / fast_text.CONFIG_NAME).read_text())
    cfg["export_id"] = "0" * 32
    (bad / fast_text.CONFIG_NAME).write_text(json.dumps(cfg))
    check(bad)
    # 3. truncated weights
    bad = _copy_index(tiny_index, tmp_path / "truncated")
    w = bad / fast_text.WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    check(bad)
    # 4. disabled by the environment
    os.environ[fast_text.ENV_DISABLE] = "1"
    try:
        check(tiny_index)
    finally:
        os.environ.pop(fast_text.ENV_DISABLE)


def test_rebuild_with_another_model_reexports(tmp_path):
    photos = write_photos(tmp_path / "p", 3)
    build_index(tmp_path / "idx", photos)
    first = json.loads((tmp_path / "idx" / fast_text.CONFIG_NAME).read_text())
    build_index(tmp_path / "idx", photos)  # unchanged model: the export is kept as is
    assert json.loads((tmp_path / "idx" / fast_text.CONFIG_NAME).read_text())["export_id"] == first["export_id"]
    build_index(tmp_path / "idx", photos, model="tiny-clip-b:none", rebuild=True)
    second = json.loads((tmp_path / "idx" / fast_text.CONFIG_NAME).read_text())
    assert second["identity"]["arch"] == "tiny-clip-b" and second["export_id"] != first["export_id"]
    with Searcher.open(tmp_path / "idx", device="cpu") as s:
        s.search("anything", k=2)
        assert s._fast_text[1] is not None and s._fast_text[1].identity.arch == "tiny-clip-b"


def test_fast_path_applies_the_index_fusion(tiny_index, monkeypatch):
    class Shift:
        def query_text(self, v):
            out = v.copy()
            out[:, 0] += 1.0
            return out / np.linalg.norm(out, axis=1, keepdims=True)

    with Searcher.open(tiny_index, device="cpu") as s:
        plain = s.embed_text("a red circle")
        assert s._fast_text[1] is not None
        monkeypatch.setattr(s.index, "fusion", lambda: Shift())
        np.testing.assert_allclose(s.embed_text("a red circle"), Shift().query_text(plain[None])[0], atol=1e-6)


def test_format_1_export_is_read_and_the_next_index_run_rewrites_it(tmp_path):
    """Exports written before column-blocked weights (format 1: plain [K, N] weights) still answer queries,
    with the same vectors, until the next `index` run replaces them with the current format."""
    from safetensors.numpy import save

    photos = write_photos(tmp_path / "p", 3)
    build_index(tmp_path / "idx", photos)
    root = tmp_path / "idx"
    cfg = json.loads((root / fast_text.CONFIG_NAME).read_text())
    assert cfg["version"] == fast_text.FORMAT_VERSION == 2
    weights, _meta, mm = fast_text._read_safetensors(root / fast_text.WEIGHTS_NAME)
    assert any(v.ndim == 3 for v in weights.values())
    plain = {k: np.array(fast_text.from_blocked(v)) for k, v in weights.items()}
    del weights, _meta
    mm.close()
    with Searcher.open(root, device="cpu") as s:
        want = s.embed_text("a red circle")
    blob = save(plain, metadata={"export_id": cfg["export_id"], "format": fast_text.FORMAT})
    (root / fast_text.WEIGHTS_NAME).write_bytes(blob)
    cfg.update(version=1, files={**cfg["files"], fast_text.WEIGHTS_NAME: len(blob)})
    (root / fast_text.CONFIG_NAME).write_text(json.dumps(cfg))

    with Searcher.open(root, device="cpu") as s:
        got = s.embed_text("a red circle")
        assert s._fast_text[1] is not None  # the old export is used, not torch
        assert all(v.ndim <= 2 for v in s._fast_text[1].tower.w.values())
        ident = s.index.identity
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert not fast_text.export_is_current(root, ident)
    build_index(root, photos)  # nothing new to index; the export is brought up to date
    assert json.loads((root / fast_text.CONFIG_NAME).read_text())["version"] == 2
    assert fast_text.export_is_current(root, ident)
