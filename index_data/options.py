"""What `retrieval index` is asked to do (IndexOptions) and what it did (IndexReport)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class IndexOptions:
    paths: Sequence[str] = ()
    captions_file: str | None = None
    fmt: str = "auto"
    split: str | None = None
    images_dir: str | None = None
    model: str | None = None
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    decode: str = "auto"  # auto | cpu | gpu: see index_data/gpu_stream.py
    runtime: str = "auto"  # auto | onnx | torch (retrieval/models/runtime.py)
    precision: str = "auto"  # auto | fp32 | bf16: bf16 encodes on torch (CUDA autocast, or bf16 weights on a CPU)
    index_type: str | None = None  # None keeps the index's setting (auto for a new index)
    exclude: Sequence[str] = ()
    include_hidden: bool = False
    default_excludes: bool = True  # skip @eaDir, node_modules, .git (index_data.scan.DEFAULT_EXCLUDES)
    rebuild: bool = False
    progress: bool = True
    retry_errors: bool = False  # also retry files whose decode failed before and that have not changed
    executor: str = "local"  # "ray": decode and encode on a Ray cluster (index_data/ray_executor.py)
    ray_actors: int | None = None  # None: from the cluster's resources
    ray_batch_size: int | None = None  # the encode batch on the cluster; None: from its resources
    ray_write: str = "driver"  # "direct": encode actors write raw embeddings to a PostgreSQL collection themselves


@dataclass
class IndexReport:
    scanned: int = 0
    unchanged: int = 0
    encoded: int = 0
    reused: int = 0  # new paths whose content was already embedded (duplicates, re-added files)
    moved: int = 0
    updated: int = 0  # same path, new content
    removed: int = 0
    captions_added: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    still_skipped: int = 0  # of `errors`: unchanged files that failed before, not decoded again
    interrupted: bool = False
    seconds: float = 0.0
    generation: int = 0
    images_total: int = 0
    metadata_read: int = 0  # images whose EXIF (date, camera, GPS) was read this run

    @property
    def changed(self) -> bool:
        return bool(self.encoded or self.reused or self.moved or self.updated or self.removed or self.captions_added)
