"""Readers for image-caption corpora: CSV/TSV, JSONL, Karpathy JSON, COCO captions JSON (sidecars: sidecar.py).

Every reader returns a flat list of :class:`CaptionRecord` (one per caption, so an image with five captions
gives five records). Captions are stripped and empty ones dropped. Any malformed input raises
:class:`~retrieval.errors.DatasetFormatError` with a one-line message that names the file (and the line, where
the format has lines) -- never a raw ``KeyError``, ``JSONDecodeError`` or ``UnicodeDecodeError``. No torch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from pathlib import Path
from typing import Any, Iterable

from retrieval.caption_text import (
    _PEEK_BYTES,
    CAPTION_COLUMNS,
    FORMATS,
    IMAGE_COLUMNS,
    SPLIT_COLUMN,
    CaptionRecord,
    _clean,
    _fail,
    _parse_json,
    _pick,
    _read_bytes,
    _read_text,
)
from retrieval.errors import DatasetFormatError

__all__ = [
    "CaptionRecord",
    "FORMATS",
    "IMAGE_COLUMNS",
    "CAPTION_COLUMNS",
    "detect_format",
    "read_captions",
    "resolve_image_path",
    "group_by_image",
]


# --------------------------------------------------------------------------------------------------------------
# helpers


def _classify_json(path: str | os.PathLike[str], obj: Any) -> str:
    if isinstance(obj, list):
        return "jsonl"  # a JSON array of records is read like JSONL
    if isinstance(obj, dict):
        images = obj.get("images")
        if isinstance(images, list):
            if "annotations" in obj:
                return "coco"
            first = next((im for im in images if isinstance(im, dict)), None)
            if first is not None and ("sentences" in first or "sentids" in first):
                return "karpathy"
            if first is not None and "file_name" in first:
                return "coco"
            if first is None and "dataset" in obj:
                return "karpathy"
        if _pick(obj.keys(), IMAGE_COLUMNS) is not None:
            return "jsonl"  # a single record
    raise _fail(
        path,
        "unrecognised JSON structure: expected Karpathy ({'images': [{'filename', 'sentences'}]}), "
        "COCO captions ({'images', 'annotations'}) or records with image/caption keys",
    )


# --------------------------------------------------------------------------------------------------------------
# format detection


def detect_format(path: str | os.PathLike[str]) -> str:
    """Guess the corpus format from the extension and a peek at the content.

    ``.csv``/``.tsv`` -> ``"csv"``; ``.jsonl``/``.ndjson`` -> ``"jsonl"``; JSON content is told apart by its
    structure: ``{"images": [{"sentences": ...}]}`` is Karpathy, ``{"images", "annotations"}`` is COCO, one object
    per line (or a JSON array of records) is JSONL. Other text whose first line holds a comma or tab is CSV.
    The extensions ``.csv``/``.tsv``/``.jsonl``/``.ndjson`` are trusted without reading the file; otherwise
    DatasetFormatError is raised when the file is missing, empty or unrecognisable.
    """
    ext = Path(path).suffix.lower()
    if ext in (".csv", ".tsv"):
        return "csv"
    if ext in (".jsonl", ".ndjson"):
        return "jsonl"

    head_bytes = _read_bytes(path, _PEEK_BYTES)
    head = head_bytes.decode("utf-8", errors="replace").lstrip("\ufeff").lstrip()
    if not head:
        raise _fail(path, "file is empty")

    if head[0] == "[":
        return "jsonl"
    if head[0] == "{":
        first_line = head.split("\n", 1)[0].strip()
        try:
            first = json.loads(first_line)
        except (ValueError, RecursionError):
            first = None
        if isinstance(first, dict):
            if "images" not in first and _pick(first.keys(), IMAGE_COLUMNS) is not None:
                return "jsonl"
            return _classify_json(path, first)
        # Multi-line (pretty-printed) or very long single-line JSON: look for tell-tale keys.
        if '"sentences"' in head or '"sentids"' in head:
            return "karpathy"
        if '"annotations"' in head or '"file_name"' in head or '"image_id"' in head:
            return "coco"
        return _classify_json(path, _parse_json(path, _read_text(path)))

    if ext == ".json":
        raise _fail(path, "not JSON (expected '{' or '[' at the start)")
    first_line = head.split("\n", 1)[0]
    if "," in first_line or "\t" in first_line:
        return "csv"
    raise _fail(path, "cannot detect the caption format; name it explicitly (csv, jsonl, karpathy, coco)")


# --------------------------------------------------------------------------------------------------------------
# readers


def _read_csv(path: str | os.PathLike[str], text: str) -> list[CaptionRecord]:
    ext = Path(path).suffix.lower()
    if ext == ".tsv":
        delimiter = "\t"
    elif ext == ".csv":
        delimiter = ","
    else:
        delimiter = "\t" if "\t" in text.split("\n", 1)[0] else ","

    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records: list[CaptionRecord] = []
    header: list[str] | None = None
    image_i = caption_i = split_i = -1
    last_line = 0
    try:
        for row in reader:
            start = last_line + 1
            last_line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [c.strip() for c in row]
                image_col = _pick(header, IMAGE_COLUMNS)
                caption_col = _pick(header, CAPTION_COLUMNS)
                if image_col is None or caption_col is None:
                    missing = "an image column" if image_col is None else "a caption column"
                    wanted = IMAGE_COLUMNS if image_col is None else CAPTION_COLUMNS
                    raise _fail(
                        path,
                        f"header has no {missing} (found {', '.join(header)!s}; accepted: {', '.join(wanted)})",
                        start,
                    )
                image_i, caption_i = header.index(image_col), header.index(caption_col)
                split_col = _pick(header, (SPLIT_COLUMN,))
                split_i = header.index(split_col) if split_col is not None else -1
                continue
            if len(row) != len(header):
                raise _fail(
                    path,
                    f"{len(row)} fields but the header has {len(header)} (quote captions that contain "
                    f"{'tabs' if delimiter == chr(9) else 'commas'})",
                    start,
                )
            image = row[image_i].strip()
            if not image:
                raise _fail(path, "empty image path", start)
            caption = _clean(row[caption_i])
            if not caption:
                continue
            split = (row[split_i].strip() or None) if split_i >= 0 else None
            records.append(CaptionRecord(image=image, caption=caption, source="csv", split=split))
    except csv.Error as e:
        raise _fail(path, f"malformed CSV: {e}", last_line + 1) from None
    if header is None:
        raise _fail(path, "file is empty")
    return records


def _record_from_obj(path: str | os.PathLike[str], obj: Any, line: int | None, label: str) -> list[CaptionRecord]:
    where = line
    prefix = "" if line is not None else f"{label}: "
    if not isinstance(obj, dict):
        raise _fail(path, f"{prefix}expected a JSON object, got {type(obj).__name__}", where)
    image_key = _pick(obj.keys(), IMAGE_COLUMNS)
    if image_key is None:
        raise _fail(path, f"{prefix}no image key (accepted: {', '.join(IMAGE_COLUMNS)})", where)
    image = obj[image_key]
    if not isinstance(image, str) or not image.strip():
        raise _fail(path, f"{prefix}'{image_key}' must be a non-empty string", where)
    captions: list[str] = []
    caption_key = _pick(obj.keys(), CAPTION_COLUMNS)
    list_key = _pick(obj.keys(), ("captions",))
    if caption_key is None and list_key is None:
        raise _fail(path, f"{prefix}no caption key (accepted: {', '.join(CAPTION_COLUMNS)}, captions)", where)
    if caption_key is not None:
        value = obj[caption_key]
        if not isinstance(value, str):
            raise _fail(path, f"{prefix}'{caption_key}' must be a string", where)
        captions.append(value)
    if list_key is not None:
        value = obj[list_key]
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise _fail(path, f"{prefix}'{list_key}' must be a list of strings", where)
        captions.extend(value)
    split = obj.get(SPLIT_COLUMN)
    if split is not None and not isinstance(split, str):
        raise _fail(path, f"{prefix}'split' must be a string", where)
    out = []
    for c in captions:
        c = _clean(c)
        if c:
            out.append(CaptionRecord(image=image.strip(), caption=c, source="jsonl", split=split or None))
    return out


def _read_jsonl(path: str | os.PathLike[str], text: str) -> list[CaptionRecord]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of records
        objs = _parse_json(path, text)
        if not isinstance(objs, list):
            raise _fail(path, "expected a JSON array of records")
        records: list[CaptionRecord] = []
        for i, obj in enumerate(objs):
            records.extend(_record_from_obj(path, obj, None, f"record {i}"))
        return records

    records = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(path, f"invalid JSON: {e.msg} (column {e.colno})", lineno) from None
        except (ValueError, RecursionError) as e:
            raise _fail(path, f"invalid JSON: {e}", lineno) from None
        records.extend(_record_from_obj(path, obj, lineno, ""))
    return records


def _read_karpathy(
    path: str | os.PathLike[str], obj: Any, want: str | None, splits_seen: set[str]
) -> list[CaptionRecord]:
    """Karpathy records; images outside split ``want`` (if given) are skipped early, their splits recorded."""
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
        raise _fail(path, "not a Karpathy split file: expected {'images': [...]} at the top level")
    records: list[CaptionRecord] = []
    for i, im in enumerate(obj["images"]):
        if not isinstance(im, dict):
            raise _fail(path, f"images[{i}]: expected an object")
        filename = im.get("filename")
        if not isinstance(filename, str) or not filename.strip():
            raise _fail(path, f"images[{i}]: missing or non-string 'filename'")
        filepath = im.get("filepath")
        if filepath is not None and not isinstance(filepath, str):
            raise _fail(path, f"images[{i}]: 'filepath' must be a string")
        image = posixpath.join(filepath.strip(), filename.strip()) if filepath else filename.strip()
        split = im.get("split")
        if split is not None and not isinstance(split, str):
            raise _fail(path, f"images[{i}]: 'split' must be a string")
        split = split or None
        if split is not None:
            splits_seen.add(split)
        if want is not None and split != want:
            continue
        sentences = im.get("sentences")
        if not isinstance(sentences, list):
            raise _fail(path, f"images[{i}] ({filename}): missing or non-list 'sentences'")
        for j, sent in enumerate(sentences):
            if isinstance(sent, dict) and isinstance(sent.get("raw"), str):
                raw = sent["raw"]
            elif isinstance(sent, dict) and isinstance(sent.get("tokens"), list):
                raw = " ".join(str(t) for t in sent["tokens"])
            else:
                raise _fail(path, f"images[{i}].sentences[{j}]: expected an object with a 'raw' string")
            caption = _clean(raw)
            if caption:
                records.append(CaptionRecord(image=image, caption=caption, source="karpathy", split=split))
    return records


def _read_coco(path: str | os.PathLike[str], obj: Any) -> list[CaptionRecord]:
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
        raise _fail(path, "not a COCO captions file: expected {'images': [...], 'annotations': [...]}")
    annotations = obj.get("annotations")
    if not isinstance(annotations, list):
        raise _fail(path, "not a COCO captions file: missing or non-list 'annotations'")
    files: dict[Any, str] = {}
    for i, im in enumerate(obj["images"]):
        if not isinstance(im, dict):
            raise _fail(path, f"images[{i}]: expected an object")
        image_id, file_name = im.get("id"), im.get("file_name")
        if image_id is None or isinstance(image_id, (dict, list, float)):
            raise _fail(path, f"images[{i}]: missing or invalid 'id'")
        if not isinstance(file_name, str) or not file_name.strip():
            raise _fail(path, f"images[{i}]: missing or non-string 'file_name'")
        if image_id in files:
            raise _fail(path, f"images[{i}]: duplicate image id {image_id!r}")
        files[image_id] = file_name.strip()
    records: list[CaptionRecord] = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise _fail(path, f"annotations[{i}]: expected an object")
        image_id, caption = ann.get("image_id"), ann.get("caption")
        if isinstance(image_id, (dict, list)) or image_id not in files:
            raise _fail(path, f"annotations[{i}]: image_id {image_id!r} is not in 'images'")
        if not isinstance(caption, str):
            raise _fail(path, f"annotations[{i}]: missing or non-string 'caption'")
        caption = _clean(caption)
        if caption:
            records.append(CaptionRecord(image=files[image_id], caption=caption, source="coco", split=None))
    return records


def read_captions(path: str | os.PathLike[str], fmt: str = "auto", split: str | None = None) -> list[CaptionRecord]:
    """Read a caption corpus into one :class:`CaptionRecord` per (image, caption) pair, in file order.

    ``fmt`` is ``"auto"`` (see :func:`detect_format`) or one of ``csv`` (also TSV), ``jsonl`` (also a JSON array
    of records), ``karpathy``, ``coco``. ``split`` keeps only records of that split (exact match: Karpathy's
    ``"restval"`` is not folded into ``"train"``); ``None`` keeps all. Asking for a split of a file that carries
    no split information (COCO, or CSV/JSONL without a ``split`` column) is an error, as is a corpus that yields
    no captions at all. Every problem raises :class:`DatasetFormatError`.
    """
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise DatasetFormatError(f"unknown caption format {fmt!r}; expected one of: auto, {', '.join(FORMATS)}")

    text = _read_text(path)
    splits: set[str] = set()
    if fmt == "csv":
        records = _read_csv(path, text)
    elif fmt == "jsonl":
        records = _read_jsonl(path, text)
    else:
        obj = _parse_json(path, text)
        records = _read_karpathy(path, obj, split, splits) if fmt == "karpathy" else _read_coco(path, obj)

    if split is not None:
        splits.update(r.split for r in records if r.split is not None)
        if not splits:
            raise _fail(path, f"split {split!r} requested but the file has no split information")
        records = [r for r in records if r.split == split]
        if not records:
            raise _fail(path, f"no captions in split {split!r} (splits present: {', '.join(sorted(splits))})")
    if not records:
        raise _fail(path, f"no captions found (read as {fmt})")
    return records


# --------------------------------------------------------------------------------------------------------------
# paths, sidecars, grouping


def resolve_image_path(record_image: str, images_dir: str | None, corpus_file: str | os.PathLike[str]) -> str:
    """Turn a corpus image reference into an absolute, normalised path (symlinks are not resolved).

    An absolute path stays as it is (normalised). A relative one is joined to ``images_dir`` when given, else to
    the folder holding ``corpus_file``. URLs (``scheme://...``) are returned unchanged. Karpathy records already
    carry ``filepath/filename`` and COCO records ``file_name``, so both resolve under ``images_dir``.
    """
    if "://" in record_image:
        return record_image
    image = os.path.expanduser(record_image)
    if os.path.isabs(image):
        return os.path.normpath(image)
    if images_dir is not None:
        base = os.path.expanduser(os.fspath(images_dir))
    else:
        base = os.path.dirname(os.path.abspath(os.fspath(corpus_file)))
    return os.path.abspath(os.path.join(base, image))


def read_caption_pairs(
    captions_file: str | os.PathLike[str], fmt: str = "auto", split: str | None = None, images_dir: str | None = None
) -> list[tuple[str, str]]:
    """(absolute image path, caption) per record of a corpus, the image resolved as indexing stores it, so the
    paths match the index's."""
    return [
        (os.path.abspath(resolve_image_path(rec.image, images_dir, captions_file)), rec.caption)
        for rec in read_captions(captions_file, fmt, split)
    ]


def group_by_image(records: Iterable[CaptionRecord]) -> dict[str, list[str]]:
    """``{image: [caption, ...]}`` in first-seen order of images, captions in record order (duplicates kept)."""
    grouped: dict[str, list[str]] = {}
    for r in records:
        grouped.setdefault(r.image, []).append(r.caption)
    return grouped
