"""Which runtime encodes: onnxruntime on the CPU, torch on CUDA (bf16 autocast) and MPS.

`index_encoder` is what `retrieval index` uses; `query_encoder` what every query path uses (the index's
export in the cache, else torch with one line on stderr). Neither imports torch when the export is cached.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from retrieval.errors import ModelSpecError
from retrieval.models.onnx_runtime import (
    ExportUnusable,
    OnnxEncoder,
    cache_root,
    export_key,
    find_by_spec,
    load_for_identity,
    open_export,
    remake_due,
    warn_once,
)
from retrieval.modelspec import ModelIdentity, parse_spec

RUNTIMES = ("auto", "onnx", "torch")
# device nodes without which torch finds no GPU on Linux: NVIDIA (CUDA), AMD (ROCm), WSL's GPU
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def gpu_may_exist() -> bool:
    """False when torch can find no GPU here, judged without importing torch (~1.7 s): Linux with none of the
    device nodes CUDA, ROCm or WSL need. Elsewhere (macOS has MPS) True, and torch is asked."""
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in _GPU_NODES)


def resolve(runtime: str, device: str, precision: str = "auto") -> tuple[str, str]:
    """(runtime, device) to index with. auto: onnx on the CPU, torch on CUDA / MPS, and torch for
    --precision bf16 or fp16 (onnxruntime runs fp32). Probes for a GPU (importing torch) only when device is
    auto, torch is installed and a GPU may be there (gpu_may_exist)."""
    if runtime not in RUNTIMES:
        raise ModelSpecError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "onnx" and device not in ("auto", "cpu"):
        raise ModelSpecError(f"--runtime onnx runs on the CPU; use --device cpu (or auto), not {device}")
    if precision in ("bf16", "fp16"):
        if runtime == "onnx":
            raise ModelSpecError(f"--runtime onnx runs fp32; --precision {precision} runs on torch (--runtime torch)")
        if importlib.util.find_spec("torch") is None:
            raise ModelSpecError(f"--precision {precision} runs on torch: pip install 'retrieval-engine[torch]'")
        return "torch", device
    if runtime == "torch" or device not in ("auto", "cpu"):
        return "torch", device
    if device == "auto" and runtime == "auto" and importlib.util.find_spec("torch") is not None and gpu_may_exist():
        from retrieval.models.base import pick_device

        picked = pick_device("auto")
        if picked != "cpu":
            return "torch", picked
    if importlib.util.find_spec("onnxruntime") is None:
        if runtime == "onnx":
            raise ModelSpecError("--runtime onnx needs onnxruntime: pip install onnxruntime")
        return "torch", "cpu"
    return "onnx", "cpu"


def _export(torch_encoder):
    """The encoder's export directory, or None after one line on stderr (the model cannot be exported)."""
    from retrieval.models.onnx_export import ensure_export
    from retrieval.models.onnx_towers import ExportFailed

    try:
        return ensure_export(torch_encoder)
    except ExportFailed as e:
        warn_once(f"cannot export {torch_encoder.identity.spec} to ONNX ({e}); it runs on torch")
        return None


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16), from /proc/cpuinfo; None where
    that file does not say (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return None


def index_encoder(
    spec: str,
    device: str = "auto",
    runtime: str = "auto",
    expected: ModelIdentity | None = None,
    precision: str = "auto",
):
    """The encoder an index run uses, and the key of the export now in the cache (or None).

    onnx: the cached export when there is one (no torch import), else the torch model is loaded, exported
    and checked, and the export encodes. torch: the torch model at `precision` (auto: bf16 autocast on CUDA,
    else fp32); it is exported too (from a CPU fp32 copy), so that the index's queries run on onnxruntime."""
    rt, dev = resolve(runtime, device, precision)
    if precision not in ("auto", "fp32") and parse_spec(spec).is_starter:
        raise ModelSpecError(f"--precision {precision} applies to open_clip models; the starter model runs fp32")
    if rt == "onnx":
        enc = _cached_export(spec, expected)
        if enc is not None:
            try:
                enc.check()
                return enc, enc.key
            except Exception as e:  # noqa: BLE001 - ExportUnusable: re-export below
                warn_once(f"{e}; exporting it again")
    if importlib.util.find_spec("torch") is None:
        raise ModelSpecError(
            f"no ONNX export of {spec} in {cache_root()}, and making one needs torch: "
            f"pip install 'retrieval-engine[torch]'"
        )
    from retrieval.models.registry import load_encoder

    torch_enc = load_encoder(spec, device=dev, precision=precision)
    if getattr(torch_enc, "precision", "fp32") == "bf16" and torch_enc.device == "cpu" and cpu_has_bf16() is False:
        warn_once("this CPU has no bfloat16 instructions (AVX512-BF16, AMX): --precision bf16 runs slower than fp32")
    d = _export(torch_enc)
    if d is None:
        return torch_enc, None
    if rt == "onnx":
        enc = open_export(d, purpose="index")
        enc.fallback = lambda: torch_enc
        return enc, enc.key
    return torch_enc, export_key(torch_enc.identity)


def export_ahead_of_torch(
    spec: str,
    device: str = "auto",
    runtime: str = "auto",
    precision: str = "auto",
    expected: ModelIdentity | None = None,
) -> OnnxEncoder | None:
    """For an index run that will encode with torch on the CPU (--runtime torch, --precision bf16): the model's
    cached export (no session opened), whose identity, key and image preprocessing equal the torch model's, so
    the run can create its index and start decoding before torch has loaded (~5-7 s). None when the run is not
    torch on the CPU, or its export is not in the cache (the model then loads first, as it always did)."""
    rt, dev = resolve(runtime, device, precision)
    if rt != "torch" or not (dev == "cpu" or (dev == "auto" and not gpu_may_exist())):
        return None
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    return _cached_export(spec, expected)


def _cached_export(spec: str, expected: ModelIdentity | None) -> OnnxEncoder | None:
    """The cached export an index run can use, sessions not opened: the one of `expected` (an existing index's
    model), else the one made from spec's current files. None when there is none, it cannot be read, or an
    older version made it (the torch load exports it again)."""
    if expected is not None:
        enc = load_for_identity(expected, purpose="index", quiet=True)
    else:
        d = find_by_spec(str(parse_spec(spec)))
        try:
            enc = open_export(d, purpose="index") if d is not None else None
        except ExportUnusable:  # damaged since find_by_spec looked
            enc = None
    return None if enc is None or remake_due(enc.meta) else enc


def query_encoder(identity: ModelIdentity, device: str = "auto", recorded_key: str | None = None):
    """The encoder for queries on an index of identity: its ONNX export on the CPU when it is in the cache,
    else None (the caller loads torch; one line on stderr said why). device cuda / mps asks for torch."""
    if device not in ("auto", "cpu"):
        return None
    enc = load_for_identity(identity, purpose="query")
    if enc is not None and recorded_key and enc.key != recorded_key:
        warn_once(
            f"the index records ONNX export {recorded_key}, the cache holds {enc.key} for the same model; using it"
        )
    return enc
