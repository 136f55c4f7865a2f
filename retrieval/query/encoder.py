"""The encoder that turns queries into vectors, for one index: owned by the query layer, never by the store.

The model always comes from the index's manifest, and its identity must still match. On the CPU it is the
model's ONNX export (retrieval/models/onnx_runtime.py, no torch import), else the torch model."""

from __future__ import annotations

from retrieval.errors import EmptyIndexError, RetrievalError
from retrieval.store.index import Index


class QueryEncoder:
    def __init__(self, index: Index, device: str = "auto"):
        self.index = index
        self.device = device
        self.loaded = None  # the encoder in use, None until a query needs one
        self._torch = None

    def get(self):
        ident = self.index.identity
        # a rebuild with another model may have switched in since the encoder was loaded: load the new one
        if self.loaded is None or ident is None or not self.loaded.identity.matches(ident):
            from retrieval.models.runtime import query_encoder

            if ident is None:
                raise EmptyIndexError(f"the index at {self.index.root} has no model recorded")
            key = (self.index.store.get_manifest("onnx_export") or {}).get("key")
            enc = query_encoder(ident, self.device, key)
            if enc is None:
                enc = self.torch_encoder()
            else:
                enc.fallback = self.torch_encoder
            self.loaded = enc
        return self.loaded

    def torch_encoder(self):
        ident = self.index.identity
        if self._torch is None or not self._torch.identity.matches(ident):
            import importlib.util

            if importlib.util.find_spec("torch") is None:
                raise RetrievalError(
                    f"the model {ident.spec} has no usable ONNX export in this user's cache, and "
                    f"torch is not installed: run `retrieval index` with torch installed once "
                    f"(pip install 'retrieval-engine[torch]') to make it"
                )
            from retrieval.models.registry import load_encoder

            enc = load_encoder(ident.spec, device=self.device)
            self.index.check_identity(enc.identity)
            self._torch = enc
        return self._torch
