"""Reading caption files safely: size limits, encodings, one-line errors, cleaned captions, column aliases."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable

from retrieval.errors import DatasetFormatError

FORMATS = ("csv", "jsonl", "karpathy", "coco")


# Column / key aliases, in priority order (first one present wins). Matched case-insensitively.
# Follows clip-retrieval / webdataset / open_clip CsvDataset conventions.
IMAGE_COLUMNS = ("image", "filepath", "file_name", "filename", "path", "image_path", "img", "file", "url")


CAPTION_COLUMNS = ("caption", "text", "title", "txt", "sentence")


SPLIT_COLUMN = "split"


_PEEK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class CaptionRecord:
    """One caption of one image, as written in the corpus file."""

    image: str  # image path as written in the corpus (relative or absolute); Karpathy: "filepath/filename"
    caption: str
    source: str  # "csv", "jsonl", "karpathy", "coco" or "sidecar"
    split: str | None = None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _fail(path: str | os.PathLike[str], what: str, line: int | None = None) -> DatasetFormatError:
    where = f"{os.fspath(path)}: line {line}" if line is not None else os.fspath(path)
    return DatasetFormatError(f"{where}: {_one_line(what)}")


def _read_bytes(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    try:
        if not os.path.isfile(path):
            if os.path.exists(path):
                raise _fail(path, "not a regular file")
            raise _fail(path, "no such file")
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None


def _decode(path: str | os.PathLike[str], data: bytes) -> str:
    """Strict UTF-8 (BOM tolerated). Raises DatasetFormatError on bad bytes or an empty file."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise _fail(
            path, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); save the file as UTF-8", line
        ) from None
    if not text.strip():
        raise _fail(path, "file is empty")
    return text


def _read_text(path: str | os.PathLike[str]) -> str:
    return _decode(path, _read_bytes(path))


def _pick(keys: Iterable[str], aliases: tuple[str, ...]) -> str | None:
    """The actual key (original spelling) matching the highest-priority alias, case-insensitively."""
    lowered: dict[str, str] = {}
    for k in keys:
        lowered.setdefault(k.strip().lower(), k)
    for alias in aliases:
        if alias in lowered:
            return lowered[alias]
    return None


def _clean(caption: str) -> str:
    caption = caption.strip()
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (JSON "\ud800" escapes): make the text encodable
        caption = caption.encode("utf-8", errors="replace").decode("utf-8")
    return caption


def _parse_json(path: str | os.PathLike[str], text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(path, f"invalid JSON: {e.msg} (column {e.colno})", e.lineno) from None
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"invalid JSON: {e}") from None
