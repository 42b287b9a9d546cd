"""fp16 for GPUs, with fp32 kept where Pegasus overflows.

fp16 tops out at 65504. Pegasus' residual stream (the running sum every sublayer adds to) grows
large in real checkpoints, so a naive conversion turns it into inf and then NaN after the next
LayerNorm. Here the residual stream stays fp32: every Add of two activations (the residual adds,
and the attention-mask add whose large negative mask values fp16 cannot hold either), every
LayerNormalization (reads the stream, reduces over it) and every Softmax run in fp32; the
MatMuls (the weights and nearly all the bytes and FLOPs) run in fp16, with Casts at the edges.
A single sublayer output over 65504 would still overflow (its MatMul runs in fp16): the overflow
test (tests/test_quantize.py) checks the realistic case, a stream that grows over many layers.

LSG-Pegasus' attention core (one ortseq::LSGAttention node, a model-local function) runs in fp32 too,
with casts around it: its Q/K/V projections and everything else are fp16. Converting its body to fp16
instead measured worse on tiny-lsg-pegasus with a continuous sparsity type (pooling): mean |logit error|
0.042 against 0.029, encoder output 0.0017 against 0.0014 (with "norm", a top-k selection flipped by
either rounding dominates both). fp32 also keeps the node's float32 contract (a fused kernel registered
for it still matches), the mask's finfo(float32).min (fp16 would clamp it to -65504) and the key norms
"norm" selects by.

Graph inputs and outputs keep float32 for logits and hidden states (the search reads float32);
the K/V tensors (past, present, cross) become float16 (half the bytes the decoder reads per step),
and the runtime builds its empty past in the dtype the decoder session declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from ...graphs import contract
from .. import unpadded_attention
from ..shared_weights import SharedFile
from . import vocab_tables

# The encoder's MultiHeadAttention: onnxruntime's CPU kernel is float32 only (and its mask value is
# float32's minimum), so it stays float32 even in the naive conversion.
FLOAT32_ONLY_OPS = ("MultiHeadAttention",)
FP32_OPS = ("LayerNormalization", "Softmax", *FLOAT32_ONLY_OPS)
FLOAT16 = onnx.TensorProto.FLOAT16


@dataclass(frozen=True)
class Fp16Settings:
    keep_residual_fp32: bool = True  # False: the naive conversion (every op in fp16 that has a CPU kernel), to compare


def constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers and everything computed from them alone (the tracer turns repeated weights into
    Identity nodes of one initializer, and small constants into Constant nodes)."""
    constants = {init.name for init in model.graph.initializer}
    for node in model.graph.node:  # graph order is topological
        if all(name in constants for name in node.input if name):
            constants.update(node.output)
    return constants


def residual_adds(model: onnx.ModelProto) -> list[str]:
    """Names of the Add nodes whose two inputs are both computed (not constants): the residual stream."""
    constants = constant_tensors(model)
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "Add" and not any(name in constants for name in node.input)
    ]


def function_calls(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that call a model-local function (LSG's ortseq::LSGAttention): they stay fp32,
    with casts around them. The converter does not convert function bodies, so a call fed fp16 would
    meet the body's fp32 constants and not load."""
    functions = {(function.domain, function.name) for function in model.functions}
    return [node.name for node in model.graph.node if (node.domain, node.op_type) in functions]


def float_outputs_kept(model: onnx.ModelProto) -> list[str]:
    """Graph inputs/outputs that stay float32: everything but the K/V tensors."""
    names = [value.name for value in [*model.graph.input, *model.graph.output]]
    return [name for name in names if not name.startswith(contract.KV_NAME_PREFIXES)]


def to_fp16(model: onnx.ModelProto, settings: Fp16Settings) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from .formats import name_nodes

    # the converter's casts and the clean-ups below read the graph's own nodes, not If branches
    branched = unpadded_attention.masked_nodes_back(model)
    model = name_nodes(model)
    if settings.keep_residual_fp32:
        op_block_list, node_block_list = list(FP32_OPS), residual_adds(model)
    else:
        op_block_list, node_block_list = list(FLOAT32_ONLY_OPS), []
    node_block_list += function_calls(model)
    converted = convert_float_to_float16(
        model,
        keep_io_types=float_outputs_kept(model),
        op_block_list=op_block_list,
        node_block_list=node_block_list,
        disable_shape_infer=True,
    )
    converted = name_nodes(_without_round_trip_casts(_without_duplicate_casts(converted)))
    if branched:
        unpadded_attention.skip_mask_when_unpadded(converted)
    return converted


def _without_duplicate_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """The converter inserts one identical Cast (same name, same output) per kept-fp32 reader of a
    tensor; keep the first, which precedes every reader in graph order."""
    defined: set[str] = set()
    kept = []
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in defined:
            continue
        defined.update(node.output)
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def convert_fp16(
    source: Path, target: Path, settings: Fp16Settings, vocab_size: int, external_data: bool, shared: SharedFile
) -> None:
    """The graph in fp16 (residual stream fp32); its fp16 token tables go to the shared file, once."""
    from onnx.external_data_helper import load_external_data_for_model

    from .formats import save_graph

    # The converter casts around a kept-fp32 node only where it knows the tensor types: infer them first,
    # on the graph without its weights (a model over 2 GB cannot be serialized for shape inference).
    model = onnx.shape_inference.infer_shapes(onnx.load(str(source), load_external_data=False))
    load_external_data_for_model(model, str(source.parent))
    model = vocab_tables.store_tables_once(to_fp16(model, settings), vocab_size, shared)
    save_graph(model, target, external_data)


def _without_round_trip_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """The converter gives every graph tensor fp16 and wraps kept-fp32 nodes in casts, so an fp32 node
    feeding another one goes fp32 -> fp16 -> fp32: the residual stream would still overflow between
    two residual Adds. Such a pair becomes one cast to fp32 of the original (an fp32 -> fp32 cast is a
    copy; the original need not be float: the converter also retargets Cast(int64 -> fp32) nodes, e.g.
    LSG's keep mask, to fp16); casts left unread go."""
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if _cast_to(node) == onnx.TensorProto.FLOAT and source is not None and _cast_to(source) == FLOAT16:
            node.input[0] = source.input[0]  # same output name: readers and graph outputs stay as they are
    read = {name for node in model.graph.node for name in node.input} | {out.name for out in model.graph.output}
    kept = [node for node in model.graph.node if node.op_type != "Cast" or node.output[0] in read]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    return next(attr.i for attr in node.attribute if attr.name == "to")
