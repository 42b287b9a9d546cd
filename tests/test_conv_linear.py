"""Linear layers exported as 1x1 Convs (exporter/conv_linear.py) compute the linear layers, and
turned back into MatMuls for the quantizers they still do."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from ortseq.exporter.conv_linear import conv_feed_forward, conv_linear, convs_to_matmuls
from ortseq.exporter.onnx_export import trace_to_proto


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return conv_feed_forward(self.fc1, torch.relu, self.fc2, conv_linear(self.proj, x))

    def reference(self, x):
        return self.fc2(torch.relu(self.fc1(self.proj(x))))


def _run(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_linear_layers_exported_as_convs_compute_the_linear_layers_and_turn_back_into_matmuls():
    torch.manual_seed(0)
    block = _Block().eval()
    x = torch.randn(2, 7, 8)
    model = trace_to_proto(block, (x,), ["x"], ["y"], {"x": {0: "batch", 1: "length"}})
    assert sorted(node.op_type for node in model.graph.node if node.op_type in ("Conv", "MatMul")) == ["Conv"] * 3
    x = torch.randn(3, 5, 8)  # another batch and length than traced
    with torch.no_grad():
        want = block.reference(x).numpy()
    np.testing.assert_allclose(_run(model, x.numpy()), want, rtol=0, atol=1e-5)

    back = convs_to_matmuls(model)
    assert sorted(node.op_type for node in back.graph.node if node.op_type in ("Conv", "MatMul")) == ["MatMul"] * 3
    np.testing.assert_allclose(_run(back, x.numpy()), want, rtol=0, atol=1e-5)
