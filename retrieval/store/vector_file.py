"""The on-disk format of one vector index file, written atomically.

One file, so faiss data and our metadata can never come from two different states:
``[faiss index bytes, as faiss.write_index writes them][meta JSON][slot ids int64][live bits]`` and a fixed
footer. ``faiss.read_index`` ignores the trailing bytes, and because the faiss part starts at offset 0,
``read_vector_file(mmap=True)`` can hand the path to faiss with IO_FLAG_MMAP_IFC.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import faiss
import numpy as np

from retrieval.faults import checkpoint
from retrieval.store.atomic import fsync_dir, replacing

_MAGIC = b"RVECIDX1"
_FOOTER = struct.Struct("<8sQQQQI")  # magic, faiss_len, meta_len, ids_len, live_len, crc32(trailer)
_FORMAT_VERSION = 1


def write_vector_file(path, index, meta: dict, slot_ids: np.ndarray, live: np.ndarray) -> None:
    """Temp file in the same directory, fsync, os.replace, fsync the directory."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    meta_b = json.dumps({"format": _FORMAT_VERSION, **meta}, sort_keys=True).encode()
    ids_bytes = slot_ids.astype("<i8").tobytes()
    live_bytes = np.packbits(live, bitorder="little").tobytes()
    crc = zlib.crc32(live_bytes, zlib.crc32(ids_bytes, zlib.crc32(meta_b)))
    with replacing(path) as tmp:
        faiss.write_index(index, tmp)
        checkpoint("faiss_write")
        faiss_len = os.path.getsize(tmp)
        with open(tmp, "ab") as f:
            f.write(meta_b)
            f.write(ids_bytes)
            f.write(live_bytes)
            f.write(_FOOTER.pack(_MAGIC, faiss_len, len(meta_b), len(ids_bytes), len(live_bytes), crc))
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(directory)


def read_vector_file(path, mmap: bool = False):
    """(meta, faiss index, slot ids, live bits) of a file, checked against each other."""
    path = Path(path)
    for _attempt in range(5):
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            meta, slot_ids, live = _read_trailer(f, st.st_size, path)
            flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
            index = faiss.read_index(str(path), flags)
            # The file we read the trailer from was open the whole time, so its inode could not be
            # reused: if the path still names it, faiss read the same file (no concurrent replace).
            if os.stat(path).st_ino == st.st_ino:
                break
    else:
        raise RuntimeError(f"{path} kept changing while being loaded")
    if index.d != meta["dim"] or len(slot_ids) != meta["n_slots"]:
        raise ValueError(f"{path}: index file is inconsistent")
    expected = meta["n_slots"]
    if index.ntotal != expected:
        raise ValueError(f"{path}: faiss holds {index.ntotal} vectors, metadata says {expected}")
    return meta, index, slot_ids, live


def _read_trailer(f, size: int, path: Path):
    if size < _FOOTER.size:
        raise ValueError(f"{path}: not a vector index file (too short)")
    f.seek(size - _FOOTER.size)
    magic, faiss_len, meta_len, ids_len, live_len, crc = _FOOTER.unpack(f.read(_FOOTER.size))
    if magic != _MAGIC or faiss_len + meta_len + ids_len + live_len + _FOOTER.size != size:
        raise ValueError(f"{path}: not a vector index file (bad footer)")
    f.seek(faiss_len)
    meta_b = f.read(meta_len)
    ids_b = f.read(ids_len)
    live_b = f.read(live_len)
    if zlib.crc32(live_b, zlib.crc32(ids_b, zlib.crc32(meta_b))) != crc:
        raise ValueError(f"{path}: index metadata is corrupt (checksum)")
    meta = json.loads(meta_b)
    if meta.get("format") != _FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported vector index format {meta.get('format')}")
    slot_ids = np.frombuffer(ids_b, dtype="<i8").astype(np.int64)
    live = np.unpackbits(np.frombuffer(live_b, dtype=np.uint8), bitorder="little")[: len(slot_ids)].astype(bool)
    return meta, slot_ids, live
