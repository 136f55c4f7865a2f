"""The write path: scan → plan → decode → encode → store → publish vectors.

Stages follow clip-retrieval's reader → mapper → writer split: `scan` and `decode` read, the encoder
maps, and each batch is written to SQLite in one transaction. FAISS files are derived from SQLite and
published as a new generation at checkpoints and at the end, so a SIGKILL at any point loses at most
the batch in flight and the next run resumes from what SQLite holds.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from index_data.captions import sync_captions as _sync_captions
from index_data.decode import DecodeWorkerError
from index_data.gpu_stream import choose_decode_stream
from index_data.model_setup import _prepare_model, _record_export, deferred_new_model
from index_data.options import IndexOptions, IndexReport
from index_data.photo_meta import fill_photo_meta
from index_data.scan import DEFAULT_EXCLUDES, ScannedFile, ScanProblem, scan
from index_data.workers import index_workers
from retrieval.datasets import read_caption_pairs
from retrieval.errors import RetrievalError
from retrieval.faults import checkpoint
from retrieval.hashing import hash_file
from retrieval.modelspec import DEFAULT_MODEL, parse_spec
from retrieval.store.index import Index
from retrieval.store.layout import PENDING_DIRTY_KEY as PENDING_KEY
from retrieval.store.layout import resolve_index

CHECKPOINT_SECONDS = 120.0  # publish vectors at least this often during long runs
# decoded photos (uint8) held while the model loads: 256 MiB is ~1,800 photos at 224 px
READ_AHEAD_BYTES = 256 << 20
STILL_SKIPPED = "unchanged since it failed; --retry-errors tries again"


@dataclass
class _Work:
    file: ScannedFile
    hash: str
    replace_id: int | None = None  # the row of the same path whose content changed


class _StopFlag:
    """First Ctrl-C: finish the current batch and stop cleanly. Second: stop now."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def run_index(index_dir: str | os.PathLike | None, opts: IndexOptions) -> IndexReport:
    if opts.rebuild:  # built aside and switched in at the end (index_data/rebuild.py)
        from index_data.rebuild import run_rebuild

        return run_rebuild(index_dir, opts, run_index)
    t0 = time.perf_counter()
    report = IndexReport()
    root = resolve_index(index_dir)
    # inputs first: a typo'd PATH, an unreadable caption file or a bad --model creates nothing (no
    # directory, lock or database that later commands would take for an unfinished index)
    corpus = _read_corpus(opts) if opts.captions_file else {}
    roots = list(opts.paths) + sorted(corpus)
    if not roots:
        raise RetrievalError("nothing to index: give one or more PATHs or --captions FILE")
    for p in opts.paths:
        if not os.path.lexists(p):
            raise RetrievalError(f"no such file or directory: {os.path.abspath(p)}")
    if opts.model:
        parse_spec(opts.model)
    preloaded = None
    if _needs_new_model(root):
        from retrieval.models.runtime import index_encoder

        spec = opts.model or DEFAULT_MODEL
        preloaded = deferred_new_model(opts, spec) or index_encoder(
            spec, opts.device, opts.runtime, precision=opts.precision
        )
    idx = Index.open_for_write(root)
    dirty: set[int] = set()
    try:
        # an image the caption file lists but that is not on disk is recorded, not fatal (a partial download)
        missing = [p for p in sorted(corpus) if not os.path.lexists(p)]
        listed = os.path.basename(opts.captions_file) if opts.captions_file else ""
        folders = [p for p in sorted(corpus) if p not in missing and os.path.isdir(p)]
        absent = set(missing) | set(folders)  # a caption names an image, never a folder to walk
        files, problems = scan(
            [r for r in roots if r not in absent],
            exclude=opts.exclude,
            include_hidden=opts.include_hidden,
            skip_dirs=[idx.local_dir],
            default_excludes=DEFAULT_EXCLUDES if opts.default_excludes else (),
        )
        problems += [ScanProblem(p, f"listed in {listed} but not found") for p in missing]
        problems += [ScanProblem(p, f"listed in {listed} but is a folder, not an image") for p in folders]
        encoder = _prepare_model(idx, opts, preloaded)
        _record_export(idx, encoder)
        for p in problems:
            report.errors.append((p.path, p.reason))
        with idx.store.transaction():
            for p in problems:
                idx.store.record_error(p.path, p.reason)
        report.scanned = len(files)
        work = _plan_and_apply_cheap_changes(idx, files, roots, report, opts.retry_errors)
        with _StopFlag() as stop:
            _encode(idx, encoder, work, opts, report, stop, dirty)
            report.interrupted = stop.set
        report.captions_added += _sync_captions(idx, encoder, files, corpus, dirty)
        report.metadata_read = fill_photo_meta(idx.store, progress=opts.progress)
        with idx.store.transaction():
            idx.store.drop_unreferenced_embeddings()
        _publish(idx, opts, dirty)
        report.generation = idx.generation
        report.images_total = idx.store.count("images")
    except (KeyboardInterrupt, DecodeWorkerError) as e:
        # Ctrl-C outside the encode loop (scan, captions, publishing), or decode workers that keep dying:
        # what SQLite already holds is published before stopping, so searches see it; a second Ctrl-C
        # skips this (the next run does it)
        if idx.identity is not None:
            try:
                _publish(idx, opts, dirty)
            except Exception:  # noqa: BLE001 - best effort; verify/the next run repair it
                pass
        if isinstance(e, DecodeWorkerError):
            raise RetrievalError(f"{e}; everything encoded so far is kept (try: --workers 0)") from None
        raise
    except Exception as e:  # a full or read-only disk is the user's to fix: one line, not a traceback
        err = idx.storage_error(e)
        if err is None:
            raise
        raise err from None
    finally:
        idx.close()
    report.seconds = time.perf_counter() - t0
    return report


def _needs_new_model(root) -> bool:
    """True when `root` holds no finished index yet, so the model must load before anything is created."""
    from retrieval.errors import IndexNotFoundError

    try:
        Index.open(root).close()
        return False
    except IndexNotFoundError:
        return True
    except RetrievalError:  # unreadable: open_for_write says why
        return False


def _publish(idx: Index, opts: IndexOptions, dirty: set[int]) -> None:
    """Publish vectors, including rows re-encoded in place by an earlier run that was killed first."""
    dirty |= {int(i) for i in idx.store.get_manifest(PENDING_KEY, None) or []}
    idx.sync_vectors(requested_type=opts.index_type, dirty_images=dirty)
    if idx.store.get_manifest(PENDING_KEY, None):
        with idx.store.transaction():
            idx.store.set_manifest(PENDING_KEY, None)


def _read_corpus(opts: IndexOptions) -> dict[str, list[str]]:
    """Caption corpus grouped by resolved image path."""
    out: dict[str, list[str]] = {}
    for path, caption in read_caption_pairs(opts.captions_file, opts.fmt, opts.split, opts.images_dir):
        out.setdefault(path, []).append(caption)
    return out


def _under(path: str, roots: list[str]) -> bool:
    for r in roots:
        if path == r or path.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def _plan_and_apply_cheap_changes(
    idx: Index, files: list[ScannedFile], roots, report: IndexReport, retry_errors: bool = False
):
    """Decide what each file needs. Moves, touches, duplicates and deletions are applied here (no model
    needed); files whose content is new are returned for encoding. A file that failed to decode and has
    the same size and mtime as then is skipped again without reading it (unless retry_errors)."""
    store = idx.store
    existing = store.image_stats()
    remembered = store.remembered_failures()
    failures = {} if retry_errors else remembered
    abs_roots = [os.path.abspath(r) for r in roots]
    seen = {f.path for f in files}
    gone = {p: v for p, v in existing.items() if p not in seen and _under(p, abs_roots)}
    gone_by_hash: dict[str, list[str]] = {}
    for p, (_, _, _, h) in gone.items():
        gone_by_hash.setdefault(h, []).append(p)

    work: list[_Work] = []
    known_hashes = {h for (_, _, _, h) in existing.values()}
    with store.transaction():
        for f in files:
            old = existing.get(f.path)
            if old and old[1] == f.size and old[2] == f.mtime_ns:
                report.unchanged += 1
                continue
            failed = failures.get(f.path)
            if failed and failed[0] == f.size and failed[1] == f.mtime_ns:
                report.errors.append((f.path, f"{failed[2]} ({STILL_SKIPPED})"))
                report.still_skipped += 1
                continue
            try:
                h = hash_file(f.path)
            except OSError as e:
                reason = f"cannot read: {e.strerror or e}"
                store.record_error(f.path, reason)
                report.errors.append((f.path, reason))
                continue
            if old:
                if old[3] == h:
                    store.touch_image(old[0], f.size, f.mtime_ns)
                    report.unchanged += 1
                else:
                    work.append(_Work(f, h, replace_id=old[0]))
                continue
            if gone_by_hash.get(h):
                src = gone_by_hash[h].pop()
                row_id = gone.pop(src)[0]
                store.move_image(row_id, f.path, f.size, f.mtime_ns)
                store.clear_errors([f.path])
                report.moved += 1
                continue
            if h in known_hashes and store.has_embeddings("image", [h]):
                # exact duplicate of indexed content: reuse the stored embedding
                dims = _dims_for_hash(store, h)
                store.upsert_image(f.path, f.size, f.mtime_ns, h, *dims)
                store.clear_errors([f.path])
                report.reused += 1
                continue
            work.append(_Work(f, h))
        if gone:
            store.delete_images([v[0] for v in gone.values()])
            store.clear_errors(gone)
            report.removed += len(gone)
        # a bad file that was since deleted is no longer skipped: forget it
        store.clear_errors([p for p in remembered if p not in seen and _under(p, abs_roots) and not os.path.lexists(p)])
        checkpoint("plan")
    return work


def _dims_for_hash(store, h: str):
    row = store.db.execute("SELECT width, height FROM images WHERE hash = ? LIMIT 1", [h]).fetchone()
    return (row[0], row[1]) if row else (None, None)


def _encode(
    idx: Index, encoder, work: list[_Work], opts: IndexOptions, report: IndexReport, stop: _StopFlag, dirty: set[int]
) -> None:
    if not work:
        return
    from tqdm import tqdm

    store = idx.store
    workers = index_workers() if opts.workers is None else opts.workers
    jobs = [(w, w.file.path) for w in work]
    bar = tqdm(total=len(work), unit="img", disable=not opts.progress, desc="indexing", smoothing=0.1)
    batch: list = []
    last_checkpoint = time.monotonic()
    seen_hashes: dict[str, int] = {}

    def flush():
        nonlocal batch
        if not batch:
            return
        fresh, hashes = [], set()  # one encode per new content, also for copies within the batch
        for r in batch:
            if r.key.hash not in seen_hashes and r.key.hash not in hashes:
                hashes.add(r.key.hash)
                fresh.append(r)
        # with --ray-write direct the encode actors have committed these embeddings already
        stored = [r for r in fresh if getattr(r, "stored", False)]
        unstored = [r for r in fresh if not getattr(r, "stored", False)]
        vecs = _vectors(encoder, unstored) if unstored else None
        checkpoint("encode")
        with store.transaction():
            if unstored:
                store.put_embeddings("image", [r.key.hash for r in unstored], vecs)
            reused = [r for r in batch if r.key.hash not in hashes]
            batch = _restore_pruned(store, encoder, batch, reused + stored)
            for r in batch:
                w: _Work = r.key
                if w.replace_id is not None:  # edited in place: same row (id, captions), new content
                    dirty.add(w.replace_id)
                    report.updated += 1
                store.upsert_image(w.file.path, w.file.size, w.file.mtime_ns, w.hash, r.width, r.height)
                seen_hashes[w.hash] = 1
            store.clear_errors([r.key.file.path for r in batch])
            if any(r.key.replace_id is not None for r in batch):
                store.set_manifest(PENDING_KEY, sorted(dirty | set(store.get_manifest(PENDING_KEY, None) or [])))
        kept = {id(r) for r in batch}  # less any file left for the next run (_restore_pruned)
        encoded = sum(id(r) in kept for r in fresh)
        report.encoded += encoded
        report.reused += len(batch) - encoded
        bar.update(len(batch))
        batch = []

    stream = _result_stream(jobs, encoder, opts, workers, idx)
    try:
        if not getattr(encoder, "loaded", True):
            # torch on the CPU takes ~5-7 s to load: the workers decode the first photos meanwhile
            read_ahead = getattr(stream, "read_ahead", None)
            if read_ahead is not None:
                read_ahead(max(1, READ_AHEAD_BYTES // (3 * encoder.image_size**2)))
            encoder.load()
        for res in stream:
            checkpoint("decode")
            if res.error:
                with store.transaction():
                    f = res.key.file
                    store.record_error(f.path, res.error, f.size, f.mtime_ns)
                report.errors.append((res.key.file.path, res.error))
                bar.update(1)
            else:
                batch.append(res)
            if len(batch) >= opts.batch_size:
                flush()
                if stop.set:
                    break
                if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                    idx.sync_vectors(requested_type=opts.index_type, dirty_images=dirty)
                    last_checkpoint = time.monotonic()
        flush()
    finally:
        close = getattr(stream, "close", None)
        if close:
            close()
        bar.close()


def _restore_pruned(store, encoder, batch: list, stored_before: list) -> list:
    """Inside a batch's transaction: encode again the contents whose raw embedding was stored before this
    transaction (by this run, or by a Ray actor with --ray-write direct) and is gone since (another writer deleted
    every row of that content and pruned it), so no row is left without one. Returns the batch to write: a file
    whose embedding is gone and cannot be made here (the pixels stayed on the cluster) is left for the next run."""
    if not stored_before:
        return batch
    firsts = {r.key.hash: r for r in stored_before}
    have = store.has_embeddings("image", list(firsts))
    gone = [h for h in firsts if h not in have]
    remake = [
        h
        for h in gone
        if getattr(firsts[h], "vector", None) is not None or getattr(firsts[h], "tensor", None) is not None
    ]
    if remake:
        store.put_embeddings("image", remake, _vectors(encoder, [firsts[h] for h in remake]))
    lost = set(gone) - set(remake)
    return [r for r in batch if r.key.hash not in lost] if lost else batch


def _result_stream(jobs, encoder, opts: IndexOptions, workers: int, idx=None):
    """The executor seam: (work, path) jobs in, one result per file out, each with a decoded `tensor` for
    the encoder here (local) or a `vector` already made on a cluster (ray; or already `stored` in the
    collection by the cluster, with --ray-write direct), or an `error`."""
    if opts.executor == "ray":
        from index_data.ray_executor import ray_stream

        return ray_stream(jobs, encoder, opts, idx)
    decode = choose_decode_stream(opts.decode, encoder.device)  # decode_stream, or the GPU path (same interface)
    return decode(jobs, encoder.preprocess, encoder.image_size, workers=workers)


def _vectors(encoder, results):
    """The batch's vectors: made on the cluster already (ray), or encoded here from the decoded inputs (numpy
    arrays for the ONNX runtime, torch tensors for torch)."""
    import numpy as np

    if getattr(results[0], "vector", None) is not None:
        return np.stack([r.vector for r in results])
    tensors = [r.tensor for r in results]
    if encoder.runtime == "onnx":
        return encoder.encode_image_tensors(np.stack(tensors))
    import torch

    if isinstance(tensors[0], np.ndarray):  # decoded with the export's preprocessing while torch loaded
        return encoder.encode_image_tensors(torch.from_numpy(np.stack(tensors)))
    return encoder.encode_image_tensors(torch.stack(tensors))
