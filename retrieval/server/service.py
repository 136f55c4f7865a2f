"""What the web app serves, behind its routes: indexed rows, checked files, thumbnails, searches, duplicates."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Optional

from retrieval.errors import (
    EmptyIndexError,
    ImageDecodeError,
    RetrievalError,
)
from retrieval.server.served_files import CheckedFile, FileChanged, open_indexed

log = logging.getLogger("retrieval.server")


THUMB_SIZE = 256


UPLOAD_DECODES = 2  # query uploads decoded at the same time; more wait (each may take up to ~150 MB)


_ID = re.compile(r"[0-9]{1,18}")


_HEX = re.compile(r"[0-9a-f]{16,128}")


class NotFound(RetrievalError):
    """An id that is not in the index, or whose file has gone."""


class TooLarge(RetrievalError):
    """An upload over the size limit."""


def handle_database_errors(app, service, status_for, unexpected) -> None:
    """On a collection (Searcher.open imported psycopg), a lost or unreachable database answers with its one
    line (503) instead of a 500 and a traceback; the next request reconnects (PgDb.reopen)."""
    import sys

    if "psycopg" not in sys.modules:
        return
    from retrieval.server.guard import _error

    async def database_error(request, exc):
        known = service.searcher.index.storage_error(exc)
        if known is None:  # an error in our SQL: a bug, answered as one
            return await unexpected(request, exc)
        log.warning("%s: %s", request.url.path, known)
        return _error(status_for(known), str(known))

    app.add_exception_handler(sys.modules["psycopg"].Error, database_error)


class _Service:
    """The Searcher plus the lock that serialises every use of it, and the thumbnail cache."""

    def __init__(self, index_dir, device: str, thumbs_dir, thumb_size: int):
        from retrieval.query.searcher import Searcher

        self.searcher = Searcher.open(index_dir, device=device)
        self.root = self.searcher.index.root
        self.lock = threading.RLock()
        self.thumb_size = thumb_size
        self.temp_thumbs: Path | None = None  # our own fallback cache, removed when the server stops
        local = self.searcher.index.local_dir  # the index directory, or this machine's cache of a collection
        self.thumbs = self._thumb_dir(Path(thumbs_dir) if thumbs_dir else local / "thumbs")
        self.decodes = threading.BoundedSemaphore(UPLOAD_DECODES)
        self.closed = False
        self.warmed = threading.Event()
        threading.Thread(target=self._warm, name="warm-vectors", daemon=True).start()

    def _warm(self) -> None:
        """The vector files into memory, beside the first requests (under the lock, so never during close)."""
        try:
            with self.lock:
                if not self.closed:
                    self.searcher.warm()
        except Exception as e:  # noqa: BLE001 - a damaged file is reported by the first search that opens it
            log.warning("could not pre-load the vector files: %s", (str(e).splitlines() or [type(e).__name__])[0])
        finally:
            self.warmed.set()

    def _thumb_dir(self, want: Path) -> Path:
        try:
            want.mkdir(parents=True, exist_ok=True)
            if os.access(want, os.W_OK):
                return want
        except OSError:
            pass
        self.temp_thumbs = Path(tempfile.mkdtemp(prefix="retrieval-thumbs-"))
        log.warning(
            "thumbnail cache %s is not writable; using %s (removed when the server stops)", want, self.temp_thumbs
        )
        return self.temp_thumbs

    def remove_temp_thumbs(self) -> None:
        if self.temp_thumbs is not None:
            import shutil

            shutil.rmtree(self.temp_thumbs, ignore_errors=True)
            self.temp_thumbs = None

    def close(self):
        self.remove_temp_thumbs()
        with self.lock:
            self.closed = True
            self.searcher.close()

    # -- lookups --------------------------------------------------------------------------------

    def image_row(self, image_id: str):
        if not _ID.fullmatch(image_id or ""):
            shown = image_id if len(image_id or "") <= 40 else image_id[:40] + "…"
            raise NotFound(f"no image with id {shown!r} in the index")
        with self.lock:
            row = self.searcher.index.store.images_by_ids([int(image_id)]).get(int(image_id))
        if row is None:
            raise NotFound(f"no image with id {image_id} in the index")
        return row

    def checked_file(self, row) -> CheckedFile:
        """The image's file, open and checked to be the one indexed (retrieval/server/served_files.py)."""
        try:
            return open_indexed(row.path, row.size, row.mtime_ns, row.hash, self.searcher.index.local_dir)
        except FileChanged as e:
            raise NotFound(f"the file of image {row.id} {e}") from None

    def thumb_path(self, row) -> Path:
        key = row.hash if _HEX.fullmatch(row.hash or "") else f"id{int(row.id)}"
        return self.thumbs / key[:2] / f"{key}-{self.thumb_size}.jpg"

    def thumbnail(self, row) -> tuple[Path, bool]:
        """(cached JPEG path, cache hit). Made on demand from the checked file (the cache is keyed by the
        content hash, which the check confirms), so a swapped file never gets or keeps a thumbnail."""
        checked = self.checked_file(row)
        try:
            dest = self.thumb_path(row)
            if dest.is_file():
                return dest, True
            from PIL import Image

            from retrieval.images import load_image

            with checked.reader() as f:
                im = load_image(f, target_size=self.thumb_size)
        except ImageDecodeError as e:
            raise NotFound(f"cannot make a thumbnail of image {row.id}: {e}") from None
        finally:
            checked.close()
        w, h = im.size
        s = self.thumb_size
        # shorter side s (fills a square grid cell), longer side at most 2s (panoramas), never upscaled
        scale = min(s / min(w, h), 2 * s / max(w, h), 1.0)
        if scale < 1.0:
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".thumb-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                im.save(f, "JPEG", quality=85, optimize=True)
            os.replace(tmp, dest)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return dest, False

    # -- queries --------------------------------------------------------------------------------

    def stored_query(self, row, text: Optional[str], weight: float):
        """Query vector for an indexed image (its stored raw embedding), optionally combined with text."""
        from retrieval.images import load_image

        s = self.searcher
        idx = s.index
        try:
            img = idx.store.get_embeddings("image", [row.hash], idx.dim)[0]
        except KeyError:  # embedding gone (inconsistent index): encode the file instead
            checked = self.checked_file(row)
            try:
                with checked.reader() as f:
                    image = load_image(f)
            finally:
                checked.close()
            return s.embed_query(text, image, weight)
        if text is None:
            fusion = idx.fusion()
            return img if fusion is None else fusion.query_image(img[None])[0]
        if not 0.0 <= weight <= 1.0:
            raise RetrievalError(f"weight must be between 0 and 1, got {weight}")
        return s.combine(img, s._text_vector(text), weight)

    def _require_vectors(self, to: str) -> None:
        vectors = self.searcher.index.vectors(to, mmap=True)
        if vectors is None or vectors.ntotal == 0:
            raise EmptyIndexError(f"the index at {self.root} has no {to} to search")

    def search(
        self,
        *,
        text=None,
        image=None,
        image_id=None,
        image_hash=None,
        weight=0.5,
        to="images",
        k=10,
        min_score=None,
        under=None,
        glob=None,
        exclude_self=False,
        probes=None,
        photo=None,
        terms=(),
    ):
        with self.lock, self.searcher.index.pinned():
            s = self.searcher
            if image_id is not None:
                row = self.image_row(str(image_id))
                self._require_vectors(to)
                qvec = self.stored_query(row, text, weight)
                exclude = row.hash if exclude_self else None
            elif exclude_self and image_hash:
                self._require_vectors(to)
                qvec = s.embed_query(text, image, weight)
                exclude = image_hash
            else:
                return s.search(
                    text,
                    image,
                    weight=weight,
                    to=to,
                    k=k,
                    min_score=min_score,
                    under=under,
                    glob=glob,
                    probes=probes,
                    photo=photo,
                    add=list(terms),
                )
            if terms:
                qvec = s.apply_terms(qvec, terms)
            return s.search_vector(
                qvec,
                to=to,
                k=k,
                min_score=min_score,
                under=under,
                glob=glob,
                exclude_hash=exclude,
                probes=probes,
                photo=photo,
            )

    def info(self) -> dict:
        with self.lock:
            return self.searcher.index.info().to_dict()

    def duplicates(self, threshold: float):
        """Near-duplicate groups (retrieval/query/duplicates.py), cached until the index changes."""
        from retrieval.query.duplicates import find_duplicates

        with self.lock:
            idx = self.searcher.index
            state = idx.store.db.execute(
                "SELECT COUNT(*), MAX(id), TOTAL(mtime_ns), TOTAL(LENGTH(path_raw)), TOTAL(width * height) FROM images"
            ).fetchone()
            key = (idx.generation, tuple(state), threshold)  # moves and edits change it too
            cached = getattr(self, "_dup_cache", None)
            if cached is None or cached[0] != key:
                self._dup_cache = (key, find_duplicates(idx, threshold=threshold))
            return self._dup_cache[1]
