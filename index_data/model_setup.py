"""The model a run encodes with: the index's own, checked against its identity, loaded only when needed;
its ONNX export recorded."""

from __future__ import annotations

from index_data.options import IndexOptions
from retrieval.errors import ModelMismatchError, ModelSpecError
from retrieval.modelspec import DEFAULT_MODEL, parse_spec
from retrieval.store.index import Index


class _LazyEncoder:
    """The index's model, loaded on first use: a run that finds nothing new to encode (the usual cron
    re-run over a photo folder) then never imports torch or reads the weights.

    With `export` (the model's cached ONNX export, for a run on torch on the CPU) the identity, export key and
    image preprocessing come from the export before the model loads, so the decode workers can start first and
    work while torch loads (pipeline._encode)."""

    def __init__(self, load, export=None):
        self._load = load
        self._encoder = None
        self.export_key = None
        if export is not None:
            self.identity, self.export_key = export.identity, export.key
            self.preprocess, self.image_size = export.preprocess, export.image_size  # checked equal at export
            self.device, self.runtime = "cpu", "torch"

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def load(self) -> None:
        if self._encoder is None:
            self._encoder, key = self._load()
            self.export_key = key or self.export_key

    def __getattr__(self, name):
        self.load()
        return getattr(self._encoder, name)


def _record_export(idx: Index, encoder) -> None:
    """The manifest names the ONNX export in the cache that the index's queries use; the per-index text
    export of older versions (text_encoder.*) is removed once that is recorded. A re-run with nothing new
    loads no model when the export is recorded and in the cache."""
    from retrieval.models.onnx_runtime import ExportUnusable, export_dir, export_key, read_meta, remake_due, warn_once

    ident = idx.identity
    key = export_key(ident) if ident is not None else None
    recorded = (idx.store.get_manifest("onnx_export") or {}).get("key")
    current = False
    if key is not None and recorded == key:
        try:  # files present at their recorded sizes; a query that cannot load one sets the export aside
            current = not remake_due(read_meta(export_dir(key)))  # an older version's export is made again
        except ExportUnusable as e:
            if "no ONNX export" not in str(e):
                warn_once(f"{e}; exporting it again")
    if not current:
        if getattr(encoder, "export_key", None) is None:
            _ = encoder.encode_texts  # loads a lazy encoder, which exports the model when it can
        key = getattr(encoder, "export_key", None)
        if key is None:
            return
        with idx.store.transaction():
            idx.store.set_manifest("onnx_export", {"key": key})
    for p in idx.local_dir.glob("text_encoder.*"):  # an older version's per-index export
        try:
            p.unlink()
        except OSError:
            pass


def _prepare_model(idx: Index, opts: IndexOptions, preloaded=None):
    from retrieval.models.runtime import index_encoder

    current = idx.identity
    # opts.rebuild is never set here: run_index hands --rebuild to index_data/rebuild.py, which builds aside
    if current is not None and opts.model:
        if str(parse_spec(opts.model)) != current.spec:
            raise ModelMismatchError(
                f"the index at {idx.root} uses {current.spec}; refusing to add vectors from {opts.model}. "
                f"Leave out --model to use the index's model, or pass --rebuild to re-encode everything with "
                f"the new one"
            )
    spec = opts.model or (current.spec if current else DEFAULT_MODEL)
    if current is not None:

        def load():
            encoder, key = index_encoder(spec, opts.device, opts.runtime, expected=current, precision=opts.precision)
            idx.check_identity(encoder.identity)  # e.g. the weights file changed since the index was built
            return encoder, key

        return _LazyEncoder(load, export_ahead(opts, spec, expected=current))
    if preloaded is not None:
        encoder, key = preloaded
        if isinstance(encoder, _LazyEncoder):
            idx.set_model(encoder.identity)
            return encoder
    else:
        encoder, key = index_encoder(spec, opts.device, opts.runtime, precision=opts.precision)
    encoder.export_key = key
    idx.set_model(encoder.identity)
    return encoder


def export_ahead(opts: IndexOptions, spec: str, expected=None):
    """The cached export that lets a local CPU torch run decode while torch loads (runtime.export_ahead_of_torch),
    or None."""
    torch_asked = opts.runtime == "torch" or opts.precision in ("bf16", "fp16")
    if not torch_asked or opts.executor == "ray" or opts.decode == "gpu":
        return None  # onnxruntime opens in well under a second; a GPU run decodes its own way
    from retrieval.models.runtime import export_ahead_of_torch

    try:
        return export_ahead_of_torch(spec, opts.device, opts.runtime, opts.precision, expected=expected)
    except ModelSpecError:  # e.g. --precision bf16 without torch: said when the model loads, if it must
        return None


def deferred_new_model(opts: IndexOptions, spec: str):
    """(encoder, key) for a new index whose model is loaded later, by _encode while the first photos decode; None
    when it must load now. The export was made from this spec's current files (find_by_spec checks their sha256),
    so a model that cannot load does not get this far; an index created before a later load error (out of
    memory) holds the model's identity and no photos, and the next run goes on from there."""
    from retrieval.models.runtime import index_encoder

    export = export_ahead(opts, spec)
    if export is None:
        return None

    def load():
        encoder, key = index_encoder(spec, opts.device, opts.runtime, precision=opts.precision)
        if not encoder.identity.matches(export.identity):
            raise ModelMismatchError(f"{spec} loaded as another model than its ONNX export {export.directory}")
        return encoder, key

    lazy = _LazyEncoder(load, export)
    return lazy, lazy.export_key
