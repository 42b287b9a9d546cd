"""Trace a torch module to one ONNX file (with its weights inline or in one external-data file)."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from ..graphs.contract import IR_VERSION

OPSET = 17
# Weights over this go to `<graph>.data` beside the graph. protobuf cannot hold a file over 2 GiB, and
# onnxruntime loads weights held inline through a parsed copy of the whole file: the mid-size fp32 export
# (d_model 512, 6+6 layers, 86 MiB a graph) peaked at 561 MiB while loading with them inline, 422 with
# them in .data files, the same as its steady state (benchmarks/results/sweep/).
EXTERNAL_DATA_THRESHOLD_BYTES = 16 << 20


def export_graph(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    external_data: bool | None = None,
    finalize: Callable[[onnx.ModelProto], None] | None = None,
) -> list[str]:
    """Export module(*args) to path; returns the names of the files written (graph, maybe data).

    external_data=None decides by size: weights over EXTERNAL_DATA_THRESHOLD_BYTES go to `<name>.data`.
    finalize, if given, edits the traced model before it is saved (e.g. adds a custom op's function).
    """
    model = trace_to_proto(module, args, input_names, output_names, dynamic_axes)
    if finalize is not None:
        finalize(model)
    return save_proto(model, Path(path), external_data)


def save_proto(model: onnx.ModelProto, path: Path, external_data: bool | None = None) -> list[str]:
    """Save model to path; returns the names of the files written (graph, maybe `<name>.data`)."""
    # tensors already stored outside (the shared embeddings, exporter/shared_weights.py) stay where they are
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    weight_bytes = sum(_tensor_bytes(t) for t in inline)
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_THRESHOLD_BYTES
    if not external_data:
        onnx.save_model(model, str(path))
        return [path.name]
    data_name = path.name + ".data"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    return [path.name, data_name]


def trace_to_proto(
    module: torch.nn.Module,
    args: tuple,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> onnx.ModelProto:
    """Trace module(*args) with the TorchScript exporter into an in-memory model (weights loaded)."""
    with tempfile.TemporaryDirectory(prefix="ortseq-trace-") as scratch:
        traced = Path(scratch) / "graph.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic: verify.py checks the result
            torch.onnx.export(
                module,
                args,
                str(traced),
                dynamo=False,
                opset_version=OPSET,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        model = onnx.load(str(traced))  # also pulls in per-tensor files the tracer writes for huge models
    model.ir_version = IR_VERSION
    return model


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
