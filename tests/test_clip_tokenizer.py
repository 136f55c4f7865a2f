"""The torch-free CLIP tokenizer (retrieval/models/tokenizer.py) that ONNX text queries use: a differential
fuzz test against open_clip's own tokenizer."""

import html
import random

import numpy as np
import pytest

from retrieval.models.tokenizer import RANKS_NAME, ClipTokenizer, SortedRanks, _is_safe_ascii, read_merges

STRINGS = [
    "",
    " ",
    "a dog",
    "A Dog Running On The BEACH!!!",
    "naïve café résumé",
    "Ünïcödé ñ 東京 タワー 한국어",
    "emoji 🐶🐱 👍🏽 family 👨‍👩‍👧 🏳️‍🌈",
    "&amp; &lt;b&gt; fish &amp;amp; chips &#39;x&#39;",
    "<b>bold</b> & <i>x</i>",
    "numbers 12345 3.14159 1,000,000 ½ ² ٣",
    "it's they're we've I'm you'll he'd 'S 'T",
    "don’t “curly” quotes — dash…",
    "tabs\tand\nnewlines\r\nand   spaces\u00a0nbsp",
    "\x1b[31mred\x1b[0m ctrl\x00\x07chars",
    "ﬁne ligature ｆｕｌｌｗｉｄｔｈ",
    "mojibake: cafÃ© rÃ©sumÃ©",
    "<start_of_text>hi<end_of_text> there",
    "word " * 100,
    "many words " * 150,
    "supercalifragilisticexpialidocious" * 5,
    "Ελληνικά, русский текст, عربى, हिन्दी",
    "zero\u200bwidth \u2028sep",
    "!!!???...,,,;;; C++ & C# / .NET e-mail: foo@bar.com http://x.y/z?a=1&b=2",
    "😀" * 90,
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ǅ K ſ",
]


@pytest.fixture(scope="module")
def merges():
    return read_merges()


@pytest.mark.parametrize("arch", ["tiny-clip", "ViT-B-32"])
def test_tokenizer_matches_open_clip(arch, merges):
    import open_clip

    from retrieval.models.openclip import register_model_configs

    register_model_configs()
    ref = open_clip.get_tokenizer(arch)
    mine = ClipTokenizer(merges, ref.context_length)
    rng = random.Random(arch)
    alphabet = [chr(c) for c in range(128)] + list("éàüß€—“”’…©°漢字かなカナ한🙂🐍\u00a0\u200b\ufeff&;#")
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 50))) for _ in range(150)]
    texts = STRINGS + fuzz
    assert np.array_equal(ref(texts).numpy(), mine(texts))
    assert mine.vocab_size == len(ref.encoder) and mine.eot_token_id == ref.eot_token_id
    # the same through the sorted ranks file a query reads
    text = SortedRanks.format(merges)
    searched = ClipTokenizer(None, ref.context_length, True, ranks=SortedRanks(text.partition("\n")[2], len(merges)))
    assert np.array_equal(ref(texts).numpy(), searched(texts))
    assert searched.vocab_size == mine.vocab_size and searched.eot_token_id == mine.eot_token_id


def test_sorted_ranks_answer_as_the_dict_does(merges):
    ranks = dict(zip(merges, range(len(merges))))
    text = SortedRanks.format(merges)
    sr = SortedRanks(text.partition("\n")[2], len(merges))
    assert len(sr) == len(ranks)
    rng = random.Random(1)
    probes = rng.sample(merges, 3000) + [merges[0], merges[-1], min(merges), max(merges)]
    for m in probes:
        assert sr.get(m) == ranks[m]
    absent = ["", " ", "\x00", "zzzz zzzz", "a", min(merges)[:-1], max(merges) + "x"]
    absent += [a + b for a, b in zip(rng.sample(merges, 500), rng.sample(merges, 500))]
    for k in absent:
        assert sr.get(k, -1) == ranks.get(k, -1)


def test_the_ranks_file_is_written_once_and_a_damaged_one_is_remade(merges, tmp_path):
    plain = tmp_path / "bpe_merges.txt"
    plain.write_text("\n".join(["#version: merges", *merges]) + "\n", "utf-8")
    first = ClipTokenizer.from_file(plain, unique_merges=True)
    assert isinstance(first.bpe_ranks, dict)  # built from the merges, and the ranks file written beside them
    ranks_file = tmp_path / RANKS_NAME
    assert ranks_file.is_file()
    second = ClipTokenizer.from_file(plain, unique_merges=True)
    assert isinstance(second.bpe_ranks, SortedRanks)
    texts = STRINGS[:12]
    assert np.array_equal(first(texts), second(texts))
    ranks_file.write_bytes(ranks_file.read_bytes()[:-5000])  # cut short: not used, written again
    third = ClipTokenizer.from_file(plain, unique_merges=True)
    assert isinstance(third.bpe_ranks, dict) and np.array_equal(first(texts), third(texts))
    assert isinstance(ClipTokenizer.from_file(plain, unique_merges=True).bpe_ranks, SortedRanks)


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
