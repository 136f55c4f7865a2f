"""`index --decode gpu`: JPEGs decoded in batches on the encoder's device, everything else by the PIL path.

A three-stage pipeline, so that reading, decoding and encoding overlap:
  reader threads   header probe + whole file into pinned host memory (index_data.gpu_decode.probe_and_read)
  producer thread  batches of files -> decode_jpeg on the device -> orientation, resize, crop, normalise,
                   on its own CUDA stream, synchronised before a batch is handed over
  caller           pulls DecodeResults in input order and encodes (the pipeline's loop, unchanged)
Files the tensor path does not take (PNG, WebP, HEIC, CMYK, truncated, too large, or refused by
decode_jpeg) go to the PIL path's own decode function in worker processes, so they decode, or record
the error, exactly as with --decode cpu. `choose_decode_stream` gives the function the pipeline calls;
it has decode_stream's interface.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import multiprocessing
import os
import queue
import threading
import time
import warnings
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator

from PIL import Image

from index_data.decode import ITEM_TIMEOUT_S, DecodeResult, _worker_init, decode_file, decode_stream
from index_data.decode_plan import finish_array, make_plan
from index_data.gpu_decode import GpuDecodeConfig, decode_batch, preprocess_batch, probe_and_read, tensor_plan

log = logging.getLogger(__name__)
DECODE_CHOICES = ("auto", "cpu", "gpu")
_END = object()
_warned = False


def resolve_decode(choice: str, device: str) -> str:
    """'cpu' or 'gpu' for an --decode choice: auto means gpu when the encoder runs on CUDA."""
    if choice not in DECODE_CHOICES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_CHOICES)}, not {choice!r}")
    if choice == "auto":
        return "gpu" if str(device).startswith("cuda") else "cpu"
    return choice


def choose_decode_stream(choice: str, device: str):
    """The decode function for --decode `choice` with an encoder on `device`, with decode_stream's
    interface. gpu without CUDA runs the same tensor code with decode_jpeg on the CPU (said once)."""
    global _warned
    if resolve_decode(choice, device) == "cpu":
        return decode_stream
    on_cuda = str(device).startswith("cuda")
    if not on_cuda and not _warned:
        _warned = True
        log.warning(
            "--decode gpu: CUDA is not available, so JPEGs are decoded as tensors on the CPU "
            "(the same code; --decode cpu is faster there)"
        )
    return functools.partial(gpu_decode_stream, device=device if on_cuda else "cpu")


class _PilPath:
    """index_data.decode's decode_file for the files the tensor path leaves: in worker processes (a file
    that kills or hangs its worker costs that file), or in the producer thread with workers=0."""

    def __init__(self, workers: int, target_size: int, steps: tuple, start_method: str):
        self._workers, self._target, self._steps = workers, target_size, steps
        self._start_method = start_method
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.RLock()  # submit kills a broken pool while holding it

    def submit(self, path):
        if self._workers == 0:
            fut: Future = Future()
            fut.set_result(decode_file(path, self._target, self._steps))
            return None, fut
        with self._lock:
            for _ in range(2):
                pool = self._pool or self._new_pool()
                try:
                    return pool, pool.submit(decode_file, path, self._target, self._steps)
                except (BrokenProcessPool, RuntimeError):
                    self._kill(pool)
        return None, _failed("decoder crashed (worker process died)")

    def result(self, path, handle):
        pool, fut = handle
        try:
            return fut.result(timeout=ITEM_TIMEOUT_S)
        except FutureTimeout:
            self._kill(pool)
            return None, None, None, f"decoding took longer than {ITEM_TIMEOUT_S:g} s", False
        except (BrokenProcessPool, CancelledError):
            pass  # this file or another one killed the pool: this file alone in a fresh one decides
        self._kill(pool)
        pool, fut = self.submit(path)
        try:
            return fut.result(timeout=ITEM_TIMEOUT_S)
        except (BrokenProcessPool, CancelledError, FutureTimeout):
            self._kill(pool)
            return None, None, None, "decoder crashed (worker process died)", False

    def _new_pool(self) -> ProcessPoolExecutor:
        # not fork: reader and producer threads are running, and a forked child could inherit a held lock
        ctx = multiprocessing.get_context(self._start_method)
        self._pool = ProcessPoolExecutor(self._workers, mp_context=ctx, initializer=_worker_init, initargs=(None,))
        return self._pool

    def _kill(self, pool) -> None:
        if pool is None:
            return
        with self._lock:
            if self._pool is pool:
                self._pool = None
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=2)

    def close(self) -> None:
        self._kill(self._pool)


def _failed(reason: str) -> Future:
    fut: Future = Future()
    fut.set_result((None, None, None, reason, False))
    return fut


class GpuDecodeStream(Iterator[DecodeResult]):
    """Like decode.DecodeStream: DecodeResults in input order, a context manager whose close() stops the
    threads and worker processes. Tensors are on `device` (views of per-batch tensors)."""

    def __init__(
        self,
        jobs,
        preprocess,
        target_size: int,
        workers: int = 0,
        prefetch: int = 256,
        device: str = "cpu",
        batch_files: int | None = None,
        readers: int | None = None,
        config: GpuDecodeConfig | None = None,
        start_method: str | None = None,
    ):
        import torch

        # PIL's "Corrupt EXIF data" etc. from the header probes, one per odd file, as the PIL path's workers
        # silence them (catch_warnings is not thread-safe, so a filter for PIL's modules instead)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        self._jobs = iter(jobs)
        self._preprocess = preprocess
        self._plan = make_plan(preprocess)
        self._tplan = tensor_plan(self._plan)
        self._target = target_size
        self._device = torch.device(device)
        self._cuda = self._device.type == "cuda"
        self._config = config or GpuDecodeConfig()
        self._batch = max(1, int(batch_files or (128 if self._cuda else 32)))
        self._window = max(self._batch * 2, int(prefetch))
        self._readers = max(1, int(readers or min(16, os.cpu_count() or 2)))
        self._pil = _PilPath(max(0, int(workers)), target_size, self._plan.pil, start_method or "forkserver")
        self._out: queue.Queue = queue.Queue(maxsize=2)
        self._ready: collections.deque = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats = collections.Counter()  # files per route ("tensor", "pil: <reason>"), for tests and benchmarks

    # -- iterator protocol --
    def __iter__(self):
        return self

    def __next__(self) -> DecodeResult:
        if self._closed:
            raise StopIteration
        try:
            if self._thread is None:
                self._thread = threading.Thread(target=self._produce, name="gpu-decode", daemon=True)
                self._thread.start()
            while not self._ready:
                item = self._out.get()
                if item is _END:
                    raise StopIteration
                if isinstance(item, BaseException):
                    raise item
                entries, tensors = item
                if self._cuda:
                    import torch

                    for t in tensors:  # made on the producer's stream, used on the caller's
                        t.record_stream(torch.cuda.current_stream(self._device))
                self._ready.extend(entries)
            entry = self._ready.popleft()
            if isinstance(entry, DecodeResult):
                return entry
            key, path, handle = entry
            return self._finish(key, self._pil.result(path, handle))
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        deadline = time.monotonic() + 30  # a producer stuck in one decode is a daemon thread: leave it
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._out.get(timeout=0.05)  # unblock a producer waiting to hand over a batch
            except queue.Empty:
                pass
        self._ready.clear()
        self._pil.close()

    # -- the producer thread --
    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        import torch

        stream = torch.cuda.Stream(self._device) if self._cuda else None
        pending: collections.deque = collections.deque()
        done = False
        pool = ThreadPoolExecutor(self._readers, thread_name_prefix="gpu-read")
        try:
            while not self._stop.is_set():
                while not done and len(pending) < self._window:
                    try:
                        key, path = next(self._jobs)
                    except StopIteration:
                        done = True
                        break
                    if self._tplan is None:  # a preprocess the tensor path cannot reproduce: all PIL
                        pending.append((key, path, None))
                    else:
                        pending.append((key, path, pool.submit(probe_and_read, path, self._cuda, self._config)))
                if not pending:
                    self._put(_END)
                    return
                chunk = [pending.popleft() for _ in range(min(self._batch, len(pending)))]
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    item = self._decode_chunk(chunk)
                if stream is not None:
                    stream.synchronize()
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the caller, which raises it
            if isinstance(e, StopIteration):  # must not look like the end of the stream to the caller
                e = RuntimeError(f"decode failed: StopIteration {e}")
            self._put(e)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _decode_chunk(self, chunk: list):
        import torch

        entries: list = [None] * len(chunk)
        reads = []
        for i, (key, path, fut) in enumerate(chunk):
            r = fut.result() if fut is not None else None
            if r is not None and r.data is not None:
                reads.append((i, r))
            else:
                self.stats["pil: " + (r.reason if r is not None else "preprocess")] += 1
                entries[i] = (key, path, self._pil.submit(path))  # starts now, in parallel with the batch
        tensors = []
        for group in self._by_pixels(reads):
            try:
                decoded = decode_batch([r.data for _, r in group], self._device)
                good, imgs = [], []
                for (i, r), img in zip(group, decoded):
                    if img is not None and tuple(img.shape) == (3, r.height, r.width):
                        good.append((i, r))
                        imgs.append(img)
                    else:
                        self.stats["pil: decode_jpeg refused"] += 1
                        entries[i] = (chunk[i][0], chunk[i][1], self._pil.submit(chunk[i][1]))
                if not good:
                    continue
                batch = preprocess_batch(
                    imgs, [r.orientation for _, r in good], self._tplan, self._device, self._target, self._config
                )
                del imgs, decoded
            except torch.OutOfMemoryError:
                # the device is shared (another process, the model's own batch): this group takes the PIL path
                decoded = imgs = None  # noqa: F841 - drops the batch before the PIL fallback
                if self._cuda:
                    torch.cuda.empty_cache()
                for i, _ in group:
                    if not isinstance(entries[i], tuple):
                        self.stats["pil: device out of memory"] += 1
                        entries[i] = (chunk[i][0], chunk[i][1], self._pil.submit(chunk[i][1]))
                continue
            tensors.append(batch)
            for j, (i, r) in enumerate(good):
                w, h = r.shown_size
                entries[i] = DecodeResult(chunk[i][0], batch[j], w, h, None)
            self.stats["tensor"] += len(good)
        return entries, tensors

    def _by_pixels(self, reads: list):
        group, pixels = [], 0
        for item in reads:
            px = item[1].width * item[1].height
            if group and pixels + px > self._config.batch_pixels:
                yield group
                group, pixels = [], 0
            group.append(item)
            pixels += px
        if group:
            yield group

    # -- the caller's side --
    def _finish(self, key, raw) -> DecodeResult:
        """A PIL-path result as decode.DecodeStream finishes it, moved to the device."""
        arr, w, h, err, complete = raw
        if err is not None:
            return DecodeResult(key, None, None, None, err)
        try:
            if complete and self._plan.finish is not None:
                import torch

                tensor = torch.from_numpy(finish_array(arr, self._plan.finish))
            else:
                tensor = self._preprocess(Image.fromarray(arr))
            tensor = tensor.to(self._device)
        except Exception as e:
            return DecodeResult(key, None, None, None, f"preprocess failed: {type(e).__name__}: {e}")
        return DecodeResult(key, tensor, w, h, None)


def gpu_decode_stream(
    jobs: Iterable[tuple[object, str]],
    preprocess,
    target_size: int,
    workers: int = 0,
    prefetch: int = 256,
    device: str = "cpu",
    **kw,
) -> GpuDecodeStream:
    """decode_stream's interface and results, with JPEGs decoded as tensors on `device` (see the module)."""
    return GpuDecodeStream(jobs, preprocess, target_size, workers=workers, prefetch=prefetch, device=device, **kw)
