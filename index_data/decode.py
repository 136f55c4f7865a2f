"""Decode images for the write path: in worker processes, ahead of the encoder, in input order.

Workers do only PIL work (decode, resize, crop) and send back small uint8 arrays; the parent finishes with
numpy, so a forked worker never runs torch. A worker that dies or hangs costs one file, not the run. The design
and the measurements behind it: docs/decode.md. Imports only numpy and PIL (torch when a stream is made).
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import sys
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from index_data.decode_plan import apply_pil_steps, finish_array, make_plan
from retrieval.errors import ImageDecodeError
from retrieval.formats import ensure_plugins
from retrieval.images import load_image_with_size

# a decode that takes longer than this is treated like a crashed worker (a hostile file looping the decoder)
ITEM_TIMEOUT_S = 120.0
# this many files in a row killing their worker means something else is wrong (memory, limits): raise
MAX_CONSECUTIVE_CRASHES = 5


class DecodeWorkerError(RuntimeError):
    """The decode worker processes keep dying for reasons that are not one bad file."""


@dataclass
class DecodeResult:
    key: object  # whatever the caller passed with the path
    tensor: "object | None"  # torch.Tensor [3, H, W] from the encoder's preprocess, or None on error
    width: int | None  # original width as displayed (after EXIF rotation), before any resizing
    height: int | None
    error: str | None  # one line, no path, when the file could not be decoded

    @property
    def ok(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------------------------------------------
# A "plan" is what of the encoder's preprocess can run outside torch, found by recognising the usual
# torchvision pipeline (Resize(int) -> CenterCrop -> to RGB -> ToTensor -> Normalize) and then checked
# for bit-identical output on probe images. It has two parts:
#   pil:    (("resize", short_side, resample), ("crop", height, width), ...) run by the workers
#   finish: None, or (mean, std) with None for "no Normalize": the parent turns the uint8 HxWx3 array
#           into the CHW float tensor with numpy (no torch ops, which on a busy 2-core machine cost
#           10-70 ms per image with two OpenMP threads); None means "run preprocess itself".


# ---------------------------------------------------------------------------------------------------
# The worker side: plain functions, picklable by reference, PIL and numpy only.


def _one_line(msg: str, path) -> str:
    name = os.fsdecode(path)
    if msg.startswith(name + ": "):
        msg = msg[len(name) + 2 :]
    msg = " ".join(msg.split())
    # surrogate escapes from non-UTF-8 names must not reach SQLite or a terminal as-is
    return msg.encode("utf-8", "backslashreplace").decode("utf-8")


def decode_file(path, target_size: int | None, pil_steps: tuple = ()):
    """Decode one file exactly as the query path does, then run the plan's PIL steps.

    Returns (uint8 array [H, W, 3], width, height, None, complete) or (None, None, None, reason, False).
    Never raises for a bad file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's "Corrupt EXIF data" etc: one per file is noise
            img, (w, h) = load_image_with_size(path, target_size)
            complete = True
            if pil_steps:
                img, complete = apply_pil_steps(img, pil_steps)
            return np.asarray(img), w, h, None, complete
    except ImageDecodeError as e:
        return None, None, None, _one_line(str(e), path), False
    except MemoryError:
        return None, None, None, "out of memory while decoding", False
    except Exception as e:  # a decoder bug must cost one file, not the run
        return None, None, None, _one_line(f"decoder error: {type(e).__name__}: {e}", path), False


def _worker_init(expected_ppid: int | None = None) -> None:
    # Ctrl-C goes to the whole process group: let the parent handle it and stop us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(expected_ppid)


def _die_with_parent(expected_ppid: int | None = None) -> None:
    """Linux: SIGKILL this worker when the indexer dies (a SIGKILLed or OOM-killed parent would otherwise
    leave it blocked on the task queue forever).

    expected_ppid is the pid that forked us (fork, spawn). Under forkserver our OS parent is the server,
    not multiprocessing.parent_process(), so no race check is possible there (the server exits with
    the indexer). PDEATHSIG fires when the *thread* that created the worker exits: make streams from a
    thread that outlives them (the main thread, as the pipeline does)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # PR_SET_PDEATHSIG
            if expected_ppid is not None and os.getppid() != expected_ppid:
                os._exit(1)  # the parent died before prctl took effect
    except Exception:
        pass


def _default_start_method() -> str:
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods:
        return "fork"  # workers run no torch, so fork is safe; it starts a worker in ~ms
    return "forkserver" if "forkserver" in methods else "spawn"


# ---------------------------------------------------------------------------------------------------


class DecodeStream(Iterator[DecodeResult]):
    """Iterator of DecodeResult in input order; also a context manager (close() stops the workers).

    Use it as `with decode_stream(...) as results: for r in results: ...` so that an exception or
    Ctrl-C in the caller's loop terminates the worker processes at once.
    """

    def __init__(
        self,
        jobs,
        preprocess: Callable,
        target_size: int,
        workers: int = 0,
        prefetch: int = 256,
        start_method: str | None = None,
    ):
        self._jobs = iter(jobs)
        self._preprocess = preprocess
        self._target = target_size
        self._plan = make_plan(preprocess)
        ensure_plugins()  # HEIF opener registered before forking: workers inherit it instead of each importing it
        self._workers = max(0, int(workers))
        self._prefetch = max(1, int(prefetch))
        self._start_method = start_method or _default_start_method()
        self._pending: collections.deque = collections.deque()  # [key, path, future]
        self._pool: ProcessPoolExecutor | None = None
        self._jobs_done = False
        self._closed = False
        self._crashes_in_a_row = 0

    # -- iterator protocol --
    def __iter__(self):
        return self

    def __next__(self) -> DecodeResult:
        if self._closed:
            raise StopIteration
        try:
            if self._workers == 0:
                key, path = next(self._jobs)  # StopIteration ends the stream
                return self._finish(key, decode_file(path, self._target, self._plan.pil))
            self._fill()
            if not self._pending:
                raise StopIteration
            raw = self._head_result()
            key = self._pending.popleft()[0]
            self._fill()  # keep the workers busy while the caller encodes
            return self._finish(key, raw)
        except BaseException:  # StopIteration, KeyboardInterrupt, a failing jobs iterator, ...
            self.close()
            raise

    def read_ahead(self, n: int) -> None:
        """Hand the workers up to n files now, more than `prefetch`, while the caller is busy elsewhere (loading
        the model); the stream then goes on `prefetch` ahead. No effect without workers."""
        if self._workers == 0 or self._closed:
            return
        kept, self._prefetch = self._prefetch, max(self._prefetch, int(n))
        try:
            self._fill()
        finally:
            self._prefetch = kept

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
        """Stop decoding: cancel what is queued and terminate the workers (no zombies left)."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._kill_pool()

    # -- internals --
    def _finish(self, key, raw) -> DecodeResult:
        arr, w, h, err, complete = raw
        if err is not None:
            return DecodeResult(key, None, None, None, err)
        try:
            if complete and self._plan.finish is not None:
                tensor = finish_array(arr, self._plan.finish)
                if not getattr(self._preprocess, "returns_numpy", False):
                    import torch

                    tensor = torch.from_numpy(tensor)
            else:
                tensor = self._preprocess(Image.fromarray(arr))
        except Exception as e:
            return DecodeResult(key, None, None, None, f"preprocess failed: {type(e).__name__}: {e}")
        return DecodeResult(key, tensor, w, h, None)

    def _new_pool(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context(self._start_method)
        ppid = os.getpid() if self._start_method in ("fork", "spawn") else None
        self._pool = ProcessPoolExecutor(
            max_workers=self._workers, mp_context=ctx, initializer=_worker_init, initargs=(ppid,)
        )
        return self._pool

    def _submit(self, path):
        pool = self._pool or self._new_pool()
        try:
            return pool.submit(decode_file, path, self._target, self._plan.pil)
        except BrokenProcessPool as e:
            # a worker died since the last result: this job fails like the others in flight, and
            # _head_result's recovery resubmits it to a fresh pool when it reaches the head
            failed: Future = Future()
            failed.set_exception(e)
            return failed

    def _fill(self) -> None:
        while not self._jobs_done and len(self._pending) < self._prefetch:
            try:
                key, path = next(self._jobs)
            except StopIteration:
                self._jobs_done = True
                return
            self._pending.append([key, path, self._submit(path)])

    def _head_result(self):
        head = self._pending[0]
        try:
            raw = head[2].result(timeout=ITEM_TIMEOUT_S)
            self._crashes_in_a_row = 0
            return raw
        except BrokenProcessPool:
            return self._recover(head, "decoder crashed (worker process died)")
        except FutureTimeout:
            return self._recover(head, f"decoding took longer than {ITEM_TIMEOUT_S:g} s", timed_out=True)
        except Exception as e:  # e.g. a path that cannot be pickled: that job fails, the pool is fine
            return None, None, None, _one_line(f"decoder error: {type(e).__name__}: {e}", head[1]), False

    def _recover(self, head, reason: str, timed_out: bool = False):
        """The pool died (or hung) with `head` unfinished. Find whether head itself is to blame by running
        it alone in a fresh pool, then resubmit everything behind it."""
        self._kill_pool()
        crashed = True
        if timed_out:
            raw = (None, None, None, reason, False)
        else:
            try:
                raw = self._submit(head[1]).result(timeout=ITEM_TIMEOUT_S)
                crashed = False  # an innocent bystander: another file killed the pool
            except (BrokenProcessPool, FutureTimeout):
                self._kill_pool()
                raw = (None, None, None, reason, False)
        self._crashes_in_a_row = self._crashes_in_a_row + 1 if crashed else 0
        if self._crashes_in_a_row >= MAX_CONSECUTIVE_CRASHES:
            name = os.fsdecode(head[1]).encode("utf-8", "backslashreplace").decode("utf-8")
            raise DecodeWorkerError(
                f"decode workers died on {self._crashes_in_a_row} files in a row (last: {name}); "
                "out of memory? Decoding in-process (workers=0) would show the real error"
            )
        for item in list(self._pending)[1:]:
            fut = item[2]
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                continue  # finished before the crash: keep its result
            item[2] = self._submit(item[1])
        return raw

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()


def decode_stream(
    jobs: Iterable[tuple[object, str]],
    preprocess,
    target_size: int,
    workers: int = 0,
    prefetch: int = 256,
    start_method: str | None = None,
) -> DecodeStream:
    """Decode `(key, path)` jobs into DecodeResults, in input order, `prefetch` files ahead of the caller.

    `preprocess` is the encoder's (PIL image -> tensor) and `target_size` must be `encoder.image_size`,
    so the tensors equal what `encoder.encode_images([path])` sees. workers=0 decodes in the calling
    process when next() is called; workers>0 decodes in that many processes while the caller encodes.
    A file that cannot be decoded gives a result with `error` set; a worker that dies takes only the
    file it was decoding with it. start_method: "fork" (default on Linux), "forkserver" or "spawn".
    """
    return DecodeStream(jobs, preprocess, target_size, workers=workers, prefetch=prefetch, start_method=start_method)
