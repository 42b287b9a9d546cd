"""Linear layers exported as 1x1 Convs over channels-first activations, and the way back to MatMuls.

Why: onnxruntime's CPU MatMul (MLAS SGEMM) ran the LSG encoder's linear shapes (4097 rows, 1024 <->
4096) at 85-120 GFLOP/s, torch's at 115-145. The same product as a 1x1 Conv over [n, D, t, 1] runs
in MLAS's NCHWc pointwise kernel, which onnxruntime picks at its default optimization level: one
pegasus-large-shaped LSG layer at 4096 tokens took 0.73x the time with one thread and 0.85x with two
(benchmarks/micro_lsg_layer.py, paired rounds); 0.89x at 2048 tokens, 0.94x at 1024. The gain
grows with the row count, which is why only LSG's long encoder uses it: at 512-1024 rows MLAS's
MatMul is as fast (the plain Pegasus encoder would gain 0-3%). The channels-first transposes around each Conv are
folded by onnxruntime into the NCHWc reorders it needs anyway, and fc1 -> ReLU -> fc2 stays in that
layout throughout. Outputs differ from the MatMul form by float rounding only (about 1e-6).

The quantizers (exporter/quantization/formats.py) quantize MatMuls: `convs_to_matmuls` turns these
Convs back into MatMuls first, and onnxruntime cancels the transposes that leaves.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """[n, t, D] -> [n, D, t, 1]"""
    return x.unsqueeze(2).permute(0, 3, 1, 2)


def channels_last(y: torch.Tensor) -> torch.Tensor:
    """[n, D, t, 1] -> [n, t, D]"""
    return y.permute(0, 2, 3, 1).squeeze(2)


def pointwise(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear over the channels of x [n, D, t, 1]."""
    return torch.nn.functional.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def conv_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) for x [n, t, D], exported as one 1x1 Conv."""
    return channels_last(pointwise(linear, channels_first(x)))


def conv_feed_forward(fc1: nn.Linear, activation, fc2: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """fc2(activation(fc1(x))) for x [n, t, D], channels-first from the first product to the last."""
    return channels_last(pointwise(fc2, activation(pointwise(fc1, channels_first(x)))))


def convs_to_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every 1x1 Conv with a constant weight [N, K, 1, 1] (as conv_linear exports) -> Transpose, MatMul, Add, Transpose."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = []
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight is None or not _is_pointwise(node, weight):
            nodes.append(node)
            continue
        matrix = numpy_helper.to_array(weight)[:, :, 0, 0].T  # [K, N]
        name = node.name or node.output[0]
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(matrix), f"{weight.name}_as_matmul"))
        rows, product = f"{name}_rows", f"{name}_product"
        nodes.append(helper.make_node("Transpose", [node.input[0]], [rows], f"{name}_to_rows", perm=[0, 2, 3, 1]))
        nodes.append(helper.make_node("MatMul", [rows, f"{weight.name}_as_matmul"], [product], f"{name}_matmul"))
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [f"{name}_biased"], f"{name}_bias"))
            product = f"{name}_biased"
        nodes.append(
            helper.make_node("Transpose", [product], [node.output[0]], f"{name}_to_channels", perm=[0, 3, 1, 2])
        )
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def _is_pointwise(node: onnx.NodeProto, weight: onnx.TensorProto) -> bool:
    plain = {"group": 1, "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "kernel_shape": [1, 1]}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if any(name not in plain or value != plain[name] for name, value in attrs.items()):
        return False
    return len(weight.dims) == 4 and list(weight.dims[2:]) == [1, 1]
