"""Query arithmetic: add and subtract weighted text and image queries, as rclip writes them.

    search "a beach" --add "2:sunset" --subtract "people" --subtract "0.5:./crowded.jpg"

A term is `[W:]Q`. W is an optional weight (a number, default 1; `2:cat`, `0.5:./img.jpg`). Q is an image when it
is the path of an existing file (only where paths are allowed: the CLI and the Python API, never HTTP), an
indexed image when written `id:N` (HTTP and Python), else text. The query vector is the normalised sum of the
base query (TEXT, --image, or their --weight composite, with weight 1) and each term's vector times its weight,
negated for subtractions.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from retrieval.errors import RetrievalError

_WEIGHT = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*:(.*)$", re.S)
_ID = re.compile(r"^id:(\d{1,18})$")


@dataclass(frozen=True)
class QueryTerm:
    """One added (weight > 0) or subtracted (weight < 0) part of a query: exactly one of text, image, image_id."""

    weight: float
    text: str | None = None
    image: object = None  # a path or a PIL image
    image_id: int | None = None

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "image_id" if self.image_id is not None else "image"


def parse_term(value, sign: float = 1.0, allow_paths: bool = True, allow_ids: bool = True) -> QueryTerm:
    """A QueryTerm from `[W:]Q` text, a PIL image, a (weight, Q) pair, or a QueryTerm (its weight times sign)."""
    if isinstance(value, QueryTerm):
        return QueryTerm(value.weight * sign, value.text, value.image, value.image_id)
    weight = 1.0
    if isinstance(value, tuple) and len(value) == 2:
        weight, value = _weight(value[0], value), value[1]
    if not isinstance(value, (str, os.PathLike)):
        if hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image
            return QueryTerm(weight * sign, image=value)
        raise RetrievalError(f"a query term is text, an image path or an image, not {type(value).__name__}")
    text = os.fspath(value)
    m = _WEIGHT.match(text)
    if m:
        weight, text = weight * _weight(m.group(1), value), m.group(2)
    text = text.strip()
    if not text:
        raise RetrievalError(f"empty query term {value!r}: write [WEIGHT:]TEXT or [WEIGHT:]IMAGE_PATH")
    if allow_ids and (mid := _ID.match(text)):
        return QueryTerm(weight * sign, image_id=int(mid.group(1)))
    if allow_paths and os.path.isfile(os.path.expanduser(text)):
        return QueryTerm(weight * sign, image=os.path.expanduser(text))
    return QueryTerm(weight * sign, text=text)


def parse_terms(add=(), subtract=(), allow_paths: bool = True, allow_ids: bool = True) -> list[QueryTerm]:
    add = [add] if isinstance(add, (str, os.PathLike, QueryTerm)) else list(add or ())
    subtract = [subtract] if isinstance(subtract, (str, os.PathLike, QueryTerm)) else list(subtract or ())
    return [parse_term(v, 1.0, allow_paths, allow_ids) for v in add] + [
        parse_term(v, -1.0, allow_paths, allow_ids) for v in subtract
    ]


def weighted_sum(parts) -> np.ndarray:
    """Normalised sum of weight * vector over (weight, vector) pairs."""
    parts = [(float(w), np.asarray(v, dtype=np.float32)) for w, v in parts if w != 0]
    if not parts:
        raise RetrievalError("every query term has weight 0: nothing to search for")
    q = np.sum([w * v for w, v in parts], axis=0)
    norm = float(np.linalg.norm(q))
    if not norm > 1e-6:
        raise RetrievalError("the query terms cancel out (their weighted sum is zero)")
    return (q / norm).astype(np.float32)


def _weight(raw, whole) -> float:
    try:
        w = float(raw)
    except (TypeError, ValueError):
        raise RetrievalError(f"bad weight in query term {whole!r}: write [WEIGHT:]QUERY, e.g. 2:cat") from None
    if not math.isfinite(w):
        raise RetrievalError(f"bad weight in query term {whole!r}: it must be a finite number")
    return w
