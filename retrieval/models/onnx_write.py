"""Writing one torch module as ONNX: the exporter call, fp32 on the CPU, weights in a file beside the graph."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

OPSET = 17


DYNAMO_OPSET = 18


def _cpu_fp32(module, device: str):
    """The module itself when it already runs fp32 on the CPU, else a CPU fp32 copy (export and check
    always run there, so an index built on CUDA gets the same export)."""
    import torch

    if str(device) == "cpu" and all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).float().cpu()


def _onnx_export(module, args, path: Path, inputs: list[str], dynamic: dict, max_length: int | None = None) -> None:
    """Image towers (dynamic batch) go through the TorchScript exporter; towers with a dynamic token length
    (max_length given) through torch.export (dynamo), as the TorchScript trace bakes the length into
    nn.MultiheadAttention's reshapes."""
    import contextlib
    import io

    import torch

    # with grad enabled: nn.MultiheadAttention's no-grad fast path (_native_multi_head_attention) has no ONNX op
    with (
        warnings.catch_warnings(),
        torch.inference_mode(False),
        torch.enable_grad(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        if max_length is None:
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=inputs,
                output_names=["output"],
                dynamic_axes={**dynamic, "output": {0: "n"}},
                opset_version=OPSET,
                dynamo=False,
            )
        else:
            n, length = torch.export.Dim("n", min=1), torch.export.Dim("length", min=1, max=int(max_length))
            shapes = tuple({0: n, 1: length} for _ in args)
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=inputs,
                output_names=["output"],
                dynamic_shapes=shapes,
                opset_version=DYNAMO_OPSET,
                dynamo=True,
                verbose=False,
                external_data=False,
            )
    _weights_beside(path)


def _weights_beside(path: Path) -> None:
    """Move the weights into `<name>.data` beside the graph: onnxruntime then maps them from the file instead of
    copying them out of the protobuf, which makes opening a session ~4x cheaper (ViT-B-32 text tower: 0.12 s
    of CPU against 0.5 s; RESULTS_onnx.md), at the same speed per query."""
    import onnx

    model = onnx.load(str(path))
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def preoptimise(path: Path) -> bool:
    """Replace the graph and its weights file by onnxruntime's hardware-independent optimisation of them (level
    EXTENDED: constant folding, layer-norm, GELU and bias fusions), so that a session skips that work when it
    opens (onnx_runtime._session opens such a tower with optimisations off). The result is checked against
    torch like any export. False, with the graph left as it was, when onnxruntime cannot optimise it."""
    import shutil

    import onnxruntime as ort

    staged = path.parent / f".{path.name}.opt"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(staged / path.name)  # the graph names its data file: same names
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", path.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - onnxruntime's own error types; the plain graph still runs
            return False
        for name in (path.name + ".data", path.name):
            os.replace(staged / name, path.parent / name)
        return True
    finally:
        shutil.rmtree(staged, ignore_errors=True)
