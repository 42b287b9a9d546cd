"""Encoder attention that skips its mask when no input is padded.

onnxruntime's CPU MultiHeadAttention runs its flash-attention kernel (MlasFlashAttention: scores in
blocks that fit the L2 cache, never a [heads, s, s] tensor) only when it is given no mask; given one, it
holds every head's scores and its mask widened to [s, s]. A batch without padding (every input at batch
1) needs no mask: each traced MultiHeadAttention that reads the padding mask becomes an If on "every mask
value is 1", computed once from the graph input, whose branches are the node without its mask and the
node as traced. Both give transformers' numbers (exporter/verify.py checks padded and unpadded inputs).

Measured on six layers of 8 x 64 heads, 2 threads (`python benchmarks/probe_encoder_attention.py`):
docs/architecture.md, *The encoder's attention*.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..graphs import contract

MICROSOFT = "com.microsoft"
KEY_PADDING_MASK = 4  # MultiHeadAttention's input index
NO_PADDING = "attention_mask_has_no_padding"
IF_SUFFIX = "/if_unpadded"


def skip_mask_when_unpadded(model: onnx.ModelProto) -> int:
    """Rewrite model's masked MultiHeadAttention nodes in place; returns how many."""
    graph = model.graph
    masked = [node for node in graph.node if _reads_padding_mask(node)]
    if not masked:
        return 0
    nodes = [*_no_padding_condition(), *(_branch_on_padding(node) if node in masked else node for node in graph.node)]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(masked)


def masked_nodes_back(model: onnx.ModelProto) -> bool:
    """The inverse of skip_mask_when_unpadded, for rewrites that do not look inside subgraphs (the fp16
    conversion): each If back to its masked node, the condition gone. Returns whether there were any."""
    graph = model.graph
    branched = [node for node in graph.node if node.op_type == "If" and node.input[0] == NO_PADDING]
    if not branched:
        return False
    condition = {node.name for node in _no_padding_condition()}
    nodes = [_masked_node_of(node) if node in branched else node for node in graph.node if node.name not in condition]
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def _masked_node_of(branch: onnx.NodeProto) -> onnx.NodeProto:
    masked = next(attribute.g for attribute in branch.attribute if attribute.name == "else_branch")
    node = onnx.NodeProto()
    node.CopyFrom(masked.node[0])
    node.name = branch.name.removesuffix(IF_SUFFIX)
    del node.output[:]
    node.output.extend(branch.output)
    return node


def _reads_padding_mask(node: onnx.NodeProto) -> bool:
    return (
        node.domain == MICROSOFT
        and node.op_type == "MultiHeadAttention"
        and len(node.input) > KEY_PADDING_MASK
        and bool(node.input[KEY_PADDING_MASK])
    )


def _no_padding_condition() -> list[onnx.NodeProto]:
    """NO_PADDING = (min(attention_mask) == 1), a bool scalar (the graph input is int64 0/1)."""
    lowest, one = NO_PADDING + "/min", NO_PADDING + "/one"
    return [
        helper.make_node("ReduceMin", [contract.ENCODER_INPUTS[1]], [lowest], name=lowest, keepdims=0),
        helper.make_node("Constant", [], [one], name=one, value=helper.make_tensor(one, TensorProto.INT64, [], [1])),
        helper.make_node("Equal", [lowest, one], [NO_PADDING], name=NO_PADDING),
    ]


def _branch_on_padding(node: onnx.NodeProto) -> onnx.NodeProto:
    without_mask = list(node.input[:KEY_PADDING_MASK])
    while not without_mask[-1]:  # no empty names after the last input
        without_mask.pop()
    unmasked = _alone_in_a_graph(node, without_mask, "unmasked")
    masked = _alone_in_a_graph(node, node.input, "masked")
    return helper.make_node(
        "If", [NO_PADDING], list(node.output), name=node.name + IF_SUFFIX, then_branch=unmasked, else_branch=masked
    )


def _alone_in_a_graph(node: onnx.NodeProto, inputs, branch: str) -> onnx.GraphProto:
    """A graph of one copy of node reading `inputs` from the enclosing graph."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = f"{node.name}/{branch}"
    del copy.input[:]
    copy.input.extend(inputs)
    outputs = [f"{name}/{branch}" for name in node.output]
    del copy.output[:]
    copy.output.extend(outputs)
    # float32: fp16 exports keep attention in float32 (exporter/quantization/fp16.py)
    typed = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
    return helper.make_graph([copy], copy.name, [], typed)
