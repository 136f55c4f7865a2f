"""open_clip's SimpleTokenizer (the CLIP BPE tokenizer), reproduced without torch or open_clip.

`open_clip.tokenizer` imports torch at module level, so the ONNX query path (retrieval/models/onnx_runtime.py)
cannot use it. This module gives the same token ids for every input: the same cleaning
(ftfy.fix_text, html.unescape twice, whitespace collapse, lowercase), the same pre-tokenizer regex
(through the `regex` package), the same byte-level BPE over the merges in open_clip's bundled
`bpe_simple_vocab_16e6.txt.gz`, `<start_of_text>` / `<end_of_text>`, and the same truncation (cut to
context_length, then the last token becomes `<end_of_text>`). tests/test_clip_tokenizer.py checks token
equality against `open_clip.get_tokenizer(arch)` on a varied set of strings.

Three load-time shortcuts, all exact:

* Plain printable ASCII without `&` (most queries) is left unchanged by ftfy.fix_text and by
  html.unescape, so for such text neither ftfy nor `regex` is imported (they cost ~0.1 s cold):
  for ASCII the pattern's \\p{L} / \\p{N} are [a-z] / [0-9], and the stdlib `re` does the split.
  Anything else goes through ftfy and `regex` exactly as open_clip does.
* Merge ranks are keyed by the merge line itself ("a b"), which saves splitting 49k lines at load, and as
  every merge of CLIP's vocabulary makes a distinct token, a merged token's id is 512 + its rank: no
  vocabulary dict is built. Only the 48,894 merges used are read (the file holds 262k lines).
* Beside an export's merges, `bpe_ranks.txt` holds the same merges sorted, each with its rank. A query
  looks ranks up in it by binary search (SortedRanks) instead of building a 49k-entry dict: ~4 ms to
  open instead of ~20 ms. It is written with the export, or by the first query of an export made
  before it existed.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re as _re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
MERGES_NAME = "bpe_merges.txt"  # an export's plain-text copy: a header line, then the merges in use
RANKS_NAME = "bpe_ranks.txt"  # the same merges sorted, "first second<TAB>rank" (SortedRanks)
_RANKS_HEADER = "#sorted merge ranks v1: "
DEFAULT_CONTEXT_LENGTH = 77
SOT, EOT = "<start_of_text>", "<end_of_text>"
_N_MERGES = 49152 - 256 - 2  # open_clip reads merges[1 : 49152-256-2+1]

_SPECIAL = f"{SOT}|{EOT}"
_PATTERN_UNICODE = _SPECIAL + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# The same pattern restricted to ASCII input (after cleaning, the only whitespace left is ' ').
_PATTERN_ASCII = _re.compile(_SPECIAL + r"""|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""", _re.IGNORECASE)
# '&' may start an HTML entity; control characters, ESC and \r are things ftfy rewrites.
_SAFE_ASCII = (frozenset(chr(c) for c in range(0x20, 0x7F)) | {"\t", "\n"}) - {"&"}


def open_clip_vocab_path() -> Path | None:
    """open_clip's bundled BPE vocabulary, located without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / VOCAB_NAME
        if p.is_file():
            return p
    return None


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_merges(path: str | os.PathLike | None = None) -> list[str]:
    """The merge lines SimpleTokenizer uses, from open_clip's gzipped vocabulary (default) or a plain-text
    copy of it (a header line, then merges). The ~213k unused lines after them are never split."""
    if path is None:
        path = open_clip_vocab_path()
        if path is None:
            raise FileNotFoundError(f"{VOCAB_NAME} not found (open_clip is not installed)")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    merges = raw.decode("utf-8").split("\n", _N_MERGES + 1)[1 : _N_MERGES + 1]
    if len(merges) != _N_MERGES:
        raise ValueError(f"{path}: expected {_N_MERGES} BPE merges, found {len(merges)}")
    return merges


class SortedRanks:
    """Merge ranks ("first second" -> rank) found by binary search over sorted "key<TAB>rank" lines held as
    one string: only the pairs a query meets are ever parsed. Behaves as the dict it replaces (get, len)."""

    def __init__(self, lines: str, n: int):
        self._text = lines  # every line ends with "\n", keys in code-point order
        self._n = n

    def __len__(self) -> int:
        return self._n

    def get(self, key: str, default=None):
        text = self._text
        lo, hi = 0, len(text)  # both at line starts: the key, if present, starts a line in [lo, hi)
        while lo < hi:
            mid = (lo + hi) // 2
            start = text.rfind("\n", lo, mid) + 1 or lo
            tab = text.find("\t", start)
            end = text.find("\n", tab)
            k = text[start:tab]
            if k < key:
                lo = end + 1
            elif k > key:
                hi = start
            else:
                return int(text[tab + 1 : end])
        return default

    @staticmethod
    def format(merges: Sequence[str]) -> str:
        """The file's text for merges in rank order."""
        body = sorted(zip(merges, range(len(merges))))
        return _RANKS_HEADER + f"{len(body)}\n" + "".join(f"{m}\t{r}\n" for m, r in body)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "SortedRanks | None":
        """The ranks in path, or None when the file is missing or not whole (its line count is in its header)."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            return None
        head, _, body = text.partition("\n")
        if not head.startswith(_RANKS_HEADER) or not body.endswith("\n"):
            return None
        try:
            n = int(head[len(_RANKS_HEADER) :])
        except ValueError:
            return None
        if body.count("\n") != n or body.count("\t") != n:
            return None
        return cls(body, n)


def write_ranks(path: str | os.PathLike, merges: Sequence[str]) -> bool:
    """Write the sorted ranks file atomically; False when it cannot be written (a read-only cache)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(SortedRanks.format(merges), "utf-8")
        os.replace(tmp, path)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def _is_safe_ascii(text: str) -> bool:
    """True when ftfy.fix_text and html.unescape provably leave text unchanged (see module doc)."""
    return text.isascii() and _SAFE_ASCII.issuperset(text)


def clean_lower(text: str) -> str:
    """open_clip's default 'lower' clean: whitespace_clean(basic_clean(text)).lower()."""
    if not _is_safe_ascii(text):
        import html

        import ftfy

        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    return " ".join(text.strip().split()).strip().lower()


class ClipTokenizer:
    """Drop-in for open_clip's SimpleTokenizer with clean='lower' (the default of every CLIP model)."""

    def __init__(
        self,
        merges: Sequence[str] | None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        unique_merges: bool | None = None,
        ranks: SortedRanks | None = None,
    ):
        """merges: the BPE merge lines ("first second") in rank order, as open_clip uses them.

        unique_merges: every merge makes a distinct token (true of CLIP's vocabulary; checked when
        None). Then a merged token's id is 512 + its merge rank and no vocabulary dict is built.

        ranks: the same merges as a SortedRanks, in place of merges (only with unique_merges=True).
        """
        self.byte_encoder = bytes_to_unicode()
        base = list(self.byte_encoder.values())
        self._base_ids = dict(zip(base + [v + "</w>" for v in base], range(2 * len(base))))
        if ranks is not None:
            if unique_merges is not True:
                raise ValueError("sorted ranks need unique_merges=True")
            merges = ()
            self.bpe_ranks = ranks
        else:
            merges = list(merges)
            self.bpe_ranks = dict(zip(merges, range(len(merges))))  # "first second" -> rank
        if unique_merges is None:
            joined = {m.replace(" ", "", 1) for m in merges}
            unique_merges = len(joined) == len(merges) and not (joined & self._base_ids.keys())
        self.unique_merges = bool(unique_merges)
        n_base = len(self._base_ids)
        self._vocab = None
        if not self.unique_merges:  # open_clip's dict(zip(vocab, ids)): a later duplicate wins
            vocab = list(self._base_ids) + [m.replace(" ", "", 1) for m in merges]
            self._vocab = dict(zip(vocab, range(len(vocab))))
        self.sot_token_id = n_base + len(self.bpe_ranks)
        self.eot_token_id = self.sot_token_id + 1
        self.vocab_size = self.eot_token_id + 1
        self.cache: dict[str, list[int]] = {SOT: [self.sot_token_id], EOT: [self.eot_token_id]}
        self.context_length = int(context_length)
        self._n_base = n_base
        self._byte_table = [self.byte_encoder[b] for b in range(256)]
        self._unicode_pat = None

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        unique_merges: bool | None = None,
    ) -> "ClipTokenizer":
        """Read a merges file: open_clip's gzipped vocabulary (default) or a plain-text copy of it
        (header line, then merges). Only the merges open_clip uses are parsed.

        For an export's plain-text copy (MERGES_NAME) with unique merges, the sorted ranks file beside it
        (RANKS_NAME) is used instead, and written there (best effort) when it is missing or not whole."""
        if path is not None and unique_merges is True and Path(path).name == MERGES_NAME:
            ranks_path = Path(path).with_name(RANKS_NAME)
            ranks = SortedRanks.read(ranks_path)
            if ranks is not None and len(ranks) == _N_MERGES:
                return cls(None, context_length, True, ranks=ranks)
            merges = read_merges(path)
            write_ranks(ranks_path, merges)
            return cls(merges, context_length, unique_merges)
        merges = read_merges(path)
        return cls(merges, context_length, unique_merges)

    # -- BPE ------------------------------------------------------------------------------------

    def bpe_ids(self, token: str) -> list[int]:
        """Token ids of one pre-tokenized, byte-encoded piece (open_clip's bpe() + encoder lookup)."""
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word = list(token[:-1]) + [token[-1] + "</w>"]
        ids = [self._base_ids[c] for c in word]
        ranks = self.bpe_ranks
        inf = len(ranks) + 1
        while len(word) > 1:
            best, best_rank = None, inf
            for a, b in zip(word, word[1:]):
                r = ranks.get(f"{a} {b}", inf)
                if r < best_rank:
                    best, best_rank = (a, b), r
            if best is None:
                break
            first, second = best
            merged = first + second
            merged_id = self._n_base + best_rank if self._vocab is None else self._vocab[merged]
            new_word: list[str] = []
            new_ids: list[int] = []
            i, n = 0, len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    new_word.append(merged)
                    new_ids.append(merged_id)
                    i += 2
                else:
                    new_word.append(word[i])
                    new_ids.append(ids[i])
                    i += 1
            word, ids = new_word, new_ids
        if len(token) > 1:  # open_clip caches every piece but single characters
            self.cache[token] = ids
        return ids

    def _pieces(self, text: str) -> list[str]:
        if text.isascii():
            return _PATTERN_ASCII.findall(text)
        if self._unicode_pat is None:
            import regex

            self._unicode_pat = regex.compile(_PATTERN_UNICODE, regex.IGNORECASE)
        return self._unicode_pat.findall(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without <start_of_text> / <end_of_text>."""
        ids: list[int] = []
        table = self._byte_table
        for piece in self._pieces(clean_lower(text)):
            ids.extend(self.bpe_ids("".join(table[b] for b in piece.encode("utf-8"))))
        return ids

    def tokens(self, text: str, context_length: int | None = None) -> list[int]:
        """[SOT] + encode(text) + [EOT], truncated as open_clip does (the last kept token becomes EOT)."""
        n = int(context_length or self.context_length)
        toks = [self.sot_token_id, *self.encode(text), self.eot_token_id]
        if len(toks) > n:
            toks = toks[:n]
            toks[-1] = self.eot_token_id
        return toks

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """[n, context_length] int64, zero padded: what open_clip's tokenizer returns, as numpy."""
        if isinstance(texts, str):
            texts = [texts]
        n = int(context_length or self.context_length)
        out = np.zeros((len(texts), n), dtype=np.int64)
        for i, t in enumerate(texts):
            toks = self.tokens(t, n)
            out[i, : len(toks)] = toks
        return out
