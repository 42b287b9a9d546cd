"""Can one block-quantized table serve both the token Gather and the LM head? (issue 14, int4 / int8)

    python benchmarks/probe_block_quantized_sharing.py

Quantizes a random [vocab, d_model] table once with onnxruntime's own MatMulNBits packing, then runs
one graph where com.microsoft MatMulNBits (the LM head, B = [vocab, blocks, blob]) and
com.microsoft GatherBlockQuantized (the embedding, data = the same bytes seen as [vocab, d_model·bits/8])
read those bytes, at 4 and 8 bits. If the two ops dequantize alike, the gathered rows times x equal
MatMulNBits' output up to float rounding, and a quantized export can keep the table once.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi import _pybind_state

VOCAB, D_MODEL, BLOCK, ROWS = 64, 128, 32, 3


def probe(bits: int) -> tuple[float, float]:
    """(max |dequantized row - float row|, max |MatMulNBits(x) - x @ gathered rowsᵀ|)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, D_MODEL)).astype(np.float32)
    blocks, blob = D_MODEL // BLOCK, BLOCK * bits // 8
    packed = np.zeros((VOCAB, blocks, blob), dtype=np.uint8)
    scales = np.zeros(VOCAB * blocks, dtype=np.float32)
    zero_points = np.zeros(VOCAB * blocks, dtype=np.uint8)  # unused: symmetric
    quantize = getattr(_pybind_state, f"quantize_matmul_{bits}bits")
    quantize(packed, np.ascontiguousarray(table.T), scales, zero_points, BLOCK, VOCAB, D_MODEL, True)
    x = rng.standard_normal((ROWS, D_MODEL)).astype(np.float32)
    attrs = dict(bits=bits, block_size=BLOCK)
    nodes = [
        helper.make_node(
            "MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=D_MODEL, N=VOCAB, **attrs
        ),
        helper.make_node(
            "GatherBlockQuantized",
            ["D", "ids", "S"],
            ["rows"],
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            **attrs,
        ),
    ]
    weights = [
        numpy_helper.from_array(packed, "B"),
        numpy_helper.from_array(scales, "scales"),
        numpy_helper.from_array(packed.reshape(VOCAB, blocks * blob), "D"),
        numpy_helper.from_array(scales.reshape(VOCAB, blocks), "S"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, D_MODEL]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, [VOCAB]),
    ]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "rows")]
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(helper.make_graph(nodes, "probe", inputs, outputs, weights), opset_imports=opsets)
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, rows = session.run(None, {"x": x, "ids": np.arange(VOCAB)})
    return float(np.abs(rows - table).max()), float(np.abs(y - x @ rows.T).max())


if __name__ == "__main__":
    for bits in (4, 8):
        quantization_error, disagreement = probe(bits)
        print(
            f"{bits} bits: quantization error {quantization_error:.3g}, MatMulNBits vs gathered rows {disagreement:.3g}"
        )
