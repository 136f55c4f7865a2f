"""The Ray executor: decode and encode the files a run must embed on a Ray cluster, with Ray Data.

The driver (index_data/pipeline.py) still scans, plans and writes. Ray Data decodes in CPU tasks (the same
decode_file as local workers, so a bad file gets the same reason) and encodes in a fixed pool of actors that
each load the index's model once (torch on a GPU node, onnxruntime on a CPU node); rows stream back and the
driver commits them in its own batches. Identical contents are encoded once. Ray is the [distributed] extra.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from index_data.decode_plan import make_plan
from index_data.ray_worker import EncodeActor, decode_rows
from retrieval.errors import RetrievalError

CPU_THREADS_PER_ACTOR = 4  # torch threads of one CPU actor; more actors beat more threads per model
GPU_BATCH = 256
CPU_BATCH = 32
DECODE_BATCH = 16  # files per decode task: small enough to stream, large enough to amortise a task
# declared per decode task: Ray then packs them by memory too, and (their remote arguments differing from the
# actors') Ray Data does not fuse decoding into the actors, which would serialise decode and encode there
DECODE_MEMORY = 256 * 2**20
RAY_MISSING = "--executor ray needs Ray: pip install 'retrieval-engine[distributed]' (ray[data])"


@dataclass(frozen=True)
class RaySettings:
    """How the encode stage uses the cluster; derived from ray.cluster_resources(), overridable."""

    actors: int
    batch_size: int
    device: str  # "cuda" or "cpu"
    num_gpus: float  # per actor
    num_cpus: float  # per actor
    decode_cpus: float  # per decode task


def plan_resources(
    resources: dict, actors: int | None = None, batch_size: int | None = None, device: str = "auto"
) -> RaySettings:
    """One GPU actor per GPU when the cluster has GPUs (unless --device cpu); otherwise CPU actors of
    CPU_THREADS_PER_ACTOR threads, leaving about a quarter of the CPUs to the decode tasks."""
    cpus = float(resources.get("CPU", 1.0))
    gpus = int(resources.get("GPU", 0))
    if gpus > 0 and device in ("auto", "cuda"):
        n = actors or gpus
        return RaySettings(n, batch_size or GPU_BATCH, "cuda", min(1.0, gpus / n), 1.0, 1.0)
    if device == "cuda":
        raise RetrievalError("--device cuda requested but the Ray cluster has no GPUs")
    decode = max(1.0, cpus // 4) if cpus >= 2 else cpus / 2
    spare = max(cpus - decode, 0.5)
    n = actors or max(1, int(spare // CPU_THREADS_PER_ACTOR))
    per_actor = max(0.1, min(float(CPU_THREADS_PER_ACTOR), spare / n))
    return RaySettings(n, batch_size or CPU_BATCH, "cpu", 0.0, per_actor, min(1.0, decode))


def require_ray():
    """Ray, or the one-line error for a missing extra (checked before any work is done)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RetrievalError(RAY_MISSING) from None
    return ray


def connect() -> bool:
    """Join the cluster in RAY_ADDRESS, or start a local instance. True when this call started Ray
    (the caller then shuts it down); a Ray already initialised in this process is used as it is."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            configure_logging=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray instance"
        raise RetrievalError(f"cannot start or reach {where}: {_first_line(e)}") from None
    return True


def _first_line(e: BaseException, last: bool = False) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if last:  # a remote error: its own message is the last line of the worker's traceback, before Ray's notes
        cause = [i for i, ln in enumerate(lines) if ln.startswith("The above exception was the direct cause")]
        if cause and cause[0] > 0:
            lines = lines[: cause[0]]
    return (lines[-1 if last else 0] if lines else type(e).__name__)[:300]


# ----------------------------------------------------------------------------------------- driver side


@dataclass
class EncodedResult:
    """One work item's outcome; the local path's DecodeResult shape, with the vector already made."""

    key: object
    tensor: None
    width: int | None
    height: int | None
    error: str | None
    vector: np.ndarray | None
    stored: bool = False  # the raw embedding is in the collection already (--ray-write direct)

    @property
    def ok(self) -> bool:
        return self.error is None


class RayStream(Iterator[EncodedResult]):
    """Per-file results streamed from the cluster, in arrival order. close() stops the dataset (and its
    actors) and shuts down a Ray instance this stream started."""

    def __init__(
        self,
        jobs: Iterable[tuple[object, str]],
        encoder,
        settings: RaySettings | None = None,
        actors: int | None = None,
        batch_size: int | None = None,
        device: str = "auto",
        store_url: str | None = None,
    ):
        self._owned = False
        self._store_url = store_url
        self._closed = False
        self._iter = None
        self._pending: collections.deque[EncodedResult] = collections.deque()
        ray = require_ray()
        self._ray = ray
        # one shipment per distinct content: copies within the run share the result
        self._groups: list[list] = []
        self._paths: list[bytes] = []
        self._hashes: list[str] = []
        first: dict = {}
        for key, path in jobs:
            h = getattr(key, "hash", None)
            if h is not None and h in first:
                self._groups[first[h]].append(key)
                continue
            if h is not None:
                first[h] = len(self._groups)
            self._groups.append([key])
            self._paths.append(os.fsencode(path))
            self._hashes.append(h or "")
        if store_url and not all(self._hashes):  # direct writes are keyed by content hash
            self._store_url = None
        self._done = np.zeros(len(self._groups), dtype=bool)
        self._owned = connect()
        try:
            self.settings = settings or plan_resources(ray.cluster_resources(), actors, batch_size, device)
            if not self._owned:
                check_paths_visible([os.fsdecode(p) for p in self._paths[:: max(1, len(self._paths) // 8)][:8]])
            self._iter = iter(self._build(encoder))
        except BaseException:
            self.close()
            raise

    def _build(self, encoder):
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the indexer's own bar shows images/s and ETA
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # start-up notices, not problems
        plan = make_plan(encoder.preprocess)
        s = self.settings
        n = len(self._paths)
        ds = ray.data.from_items(
            [{"i": i, "path": p, "hash": h} for i, (p, h) in enumerate(zip(self._paths, self._hashes))],
            override_num_blocks=max(1, min(n, -(-n // DECODE_BATCH))),
        )
        ds = ds.map_batches(
            decode_rows,
            batch_size=DECODE_BATCH,
            batch_format="numpy",
            num_cpus=s.decode_cpus,
            memory=DECODE_MEMORY,
            fn_kwargs={"target_size": encoder.image_size, "pil_steps": plan.pil},
        )
        fault = {k: v for k, v in os.environ.items() if k == "RETRIEVAL_FAULT"}
        ds = ds.map_batches(
            EncodeActor,
            batch_size=s.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=s.actors),
            num_cpus=s.num_cpus,
            num_gpus=s.num_gpus or None,
            fn_constructor_kwargs={
                "spec": encoder.identity.spec,
                "device": s.device,
                "identity": encoder.identity,
                "finish": plan.finish,
                "threads": s.num_cpus,
                "store_url": self._store_url,
            },
            # a killed actor process is restarted and its batch re-run: Ray Data gives pool actors
            # max_restarts=-1 and max_task_retries=-1 by default (and decode tasks max_retries=-1)
            runtime_env={"env_vars": fault} if fault else None,
        )
        return ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)

    def __iter__(self):
        return self

    def __next__(self) -> EncodedResult:
        while not self._pending:
            if self._closed or self._iter is None:
                raise StopIteration
            try:
                batch = next(self._iter)
            except StopIteration:
                self.close()
                raise
            except self._ray.exceptions.RayError as e:
                self.close()
                # a remote error's text is its traceback; the exception's own message is its last line
                raise RetrievalError(f"the Ray executor failed: {_first_line(e, last=True)}") from None
            self._take(batch)
        return self._pending.popleft()

    def _take(self, batch: dict) -> None:
        for j, i in enumerate(batch["i"]):
            i = int(i)
            if self._done[i]:  # a retried batch whose first result already arrived
                continue
            self._done[i] = True
            err = str(batch["error"][j]) or None
            w, h = (None, None) if err else (int(batch["w"][j]), int(batch["h"][j]))
            stored = bool(batch["stored"][j]) and not err
            vec = None if err or stored else np.asarray(batch["vec"][j], dtype=np.float32)
            for key in self._groups[i]:
                self._pending.append(EncodedResult(key, None, w, h, err, vec, stored))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the dataset's tasks and actors; shut down Ray if this stream started it."""
        if self._closed:
            return
        self._closed = True
        it, self._iter = self._iter, None
        self._pending.clear()
        try:
            if it is not None and hasattr(it, "close"):
                it.close()
        finally:
            if self._owned:
                self._ray.shutdown()


def check_paths_visible(sample: list[str]) -> None:
    """Warn (one line) when a node of the cluster cannot read paths the driver sees: they are meant to be
    on a shared mount at the same path everywhere. Files such a node gets are recorded as skipped."""
    if not sample:
        return
    ray = require_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def unreadable(paths):
        return socket.gethostname(), sum(not os.access(p, os.R_OK) for p in paths)

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = [
        unreadable.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(sample)
        for n in nodes
    ]
    try:
        answers = ray.get(refs, timeout=120)
    except ray.exceptions.GetTimeoutError:  # a saturated node: the per-file check still applies
        return
    for host, bad in answers:
        if bad:
            print(
                f"warning: Ray node {host} cannot read {bad} of {len(sample)} sampled paths; files it is given "
                "will be skipped (are the photos on a shared mount, at the same path on every node?)",
                file=sys.stderr,
            )


def ray_stream(jobs, encoder, opts, idx=None) -> RayStream:
    """The pipeline's entry point: IndexOptions decide actors, batch size and device; with --ray-write direct
    the encode actors write the raw embeddings to the index's PostgreSQL collection themselves."""
    loc = getattr(idx, "loc", None)
    if getattr(opts, "ray_write", "driver") == "direct" and loc is None:
        raise RetrievalError("--ray-write direct needs a PostgreSQL index (--index postgresql://…)")
    store_url = loc.url if loc is not None and opts.ray_write == "direct" else None
    return RayStream(
        jobs,
        encoder,
        actors=getattr(opts, "ray_actors", None),
        batch_size=getattr(opts, "ray_batch_size", None),
        device=getattr(opts, "device", "auto"),
        store_url=store_url,
    )
