"""The Ray executor's worker side (index_data/ray_executor.py is the driver's): the decode task and the encode
actor that Ray Data runs on the cluster's nodes, and, with --ray-write direct, the actor's own writes of raw
embeddings to a PostgreSQL collection."""

from __future__ import annotations

import os
import socket

import numpy as np

from index_data.decode import decode_file


def decode_rows(batch: dict, target_size: int, pil_steps: tuple) -> dict:
    """Ray Data CPU task: decode each path exactly as the local decode workers do. The pixels travel
    as raw uint8 bytes with their shape (Arrow has no ragged uint8 images); errors as one line."""
    n = len(batch["i"])
    pixels, shapes, ws, hs, errors, complete = [], [], [], [], [], []
    hashes = batch["hash"] if "hash" in batch else np.array([""] * n, dtype=object)
    host = socket.gethostname()
    for raw in batch["path"]:
        path = os.fsdecode(bytes(raw))
        if not os.access(path, os.R_OK):
            # the driver hashed this file, so the worker node does not see what the driver sees
            reason = os.strerror(2 if not os.path.lexists(path) else 13)
            arr, w, h, err, full = None, None, None, f"cannot read on Ray node {host}: {reason}", False
        else:
            arr, w, h, err, full = decode_file(path, target_size, pil_steps)
        ok = err is None
        pixels.append(np.ascontiguousarray(arr).tobytes() if ok else b"")
        shapes.append(arr.shape if ok else (0, 0, 0))
        ws.append(w if ok else -1)
        hs.append(h if ok else -1)
        errors.append("" if ok else err)
        complete.append(bool(full))
    return {
        "i": np.asarray(batch["i"], dtype=np.int64),
        "pixels": np.array(pixels, dtype=object),
        "shape": np.asarray(shapes, dtype=np.int32).reshape(n, 3),
        "w": np.asarray(ws, dtype=np.int64),
        "h": np.asarray(hs, dtype=np.int64),
        "error": np.array(errors, dtype=object),
        "complete": np.asarray(complete, dtype=bool),
        "hash": np.asarray(hashes, dtype=object),
    }


class EncodeActor:
    """Ray Data actor: one model per actor process, loaded once, checked against the index's model."""

    def __init__(self, spec: str, device: str, identity, finish, threads: float, store_url: str | None = None):
        from retrieval.models.runtime import index_encoder

        self.store = _open_store(store_url) if store_url else None

        if device == "cpu":
            from threadpoolctl import threadpool_limits

            threadpool_limits(max(1, round(threads)))
        # the index run's runtime choice: onnxruntime on a CPU node (the model's export, made on first use),
        # torch with bf16 on a GPU node
        self.encoder, _ = index_encoder(spec, device, "auto", expected=identity)
        self.numpy = getattr(self.encoder, "runtime", "torch") == "onnx"
        if not self.numpy and device == "cpu":
            import torch

            torch.set_num_threads(max(1, round(threads)))
        if not self.encoder.identity.matches(identity):
            raise RuntimeError(
                f"this node's {spec} is not the index's model (weights sha256 "
                f"{self.encoder.identity.weights_sha256} vs {identity.weights_sha256}); same weights on every node?"
            )
        self.finish = finish

    def _tensor(self, arr: np.ndarray, complete: bool):
        from PIL import Image

        from index_data.decode_plan import finish_array

        if complete and self.finish is not None:
            x = finish_array(arr, self.finish)
            if self.numpy:
                return x
            import torch

            return torch.from_numpy(x)
        return self.encoder.preprocess(Image.fromarray(arr))

    def __call__(self, batch: dict) -> dict:
        from retrieval.faults import checkpoint

        n = len(batch["i"])
        errors = [str(e) for e in batch["error"]]
        tensors, rows = [], []
        for j in range(n):
            if errors[j]:
                continue
            try:
                shape = tuple(int(s) for s in batch["shape"][j])
                arr = np.frombuffer(batch["pixels"][j], dtype=np.uint8).reshape(shape)
                tensors.append(self._tensor(arr, bool(batch["complete"][j])))
                rows.append(j)
            except Exception as e:  # as the local path: the file is skipped with the reason
                errors[j] = f"preprocess failed: {type(e).__name__}: {e}"
        vecs = np.zeros((n, self.encoder.dim), dtype=np.float32)
        if tensors:
            if self.numpy:
                stacked = np.stack([np.asarray(t) for t in tensors])
            else:
                import torch

                stacked = torch.stack(tensors)
            vecs[rows] = self.encoder.encode_image_tensors(stacked)
        checkpoint("ray_encode")  # a test can kill this process here, mid-batch (retrieval/faults.py)
        out = {"i": batch["i"], "w": batch["w"], "h": batch["h"], "error": np.array(errors, dtype=object)}
        if self.store is None:
            return {**out, "vec": vecs, "stored": np.zeros(n, dtype=bool)}
        # --ray-write direct: the embeddings go to the collection from here, committed before the driver writes
        # the rows that name them; only the rows' metadata travels back
        if rows:
            hashes = [str(batch["hash"][j]) for j in rows]
            with self.store.transaction():
                self.store.put_embeddings("image", hashes, vecs[rows])
        stored = np.zeros(n, dtype=bool)
        stored[rows] = True
        return {**out, "vec": np.zeros((n, 0), dtype=np.float32), "stored": stored}


def _open_store(url: str):
    """The collection's store for an encode actor's direct writes (no migrations: the driver made it)."""
    from retrieval.store.pg.db import PgStore
    from retrieval.store.pg.index import open_connection
    from retrieval.store.pg.location import parse_location

    loc = parse_location(url)
    return PgStore(loc, open_connection(loc, write=False), readonly=True)
