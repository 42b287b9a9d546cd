"""The graph transforms, one function per format: an fp32 graph file in, a quantized graph file out.

* int8: onnxruntime's dynamic quantization, per-channel int8 weights, activations quantized per
  call. Only MatMuls whose weight is a constant are quantized ("MatMulConstBOnly"): the attention
  MatMuls (Q·Kᵀ and P·V, both operands activations) stay in float, unlike optimum's int8.
* int4: weight-only block quantization into com.microsoft MatMulNBits (CPU and CUDA kernels);
  activations stay float. Again only MatMuls with a constant weight exist to be quantized.
* fp16: see exporter/quantization/fp16.py (kept apart: it is about keeping fp32 where Pegasus overflows).

The LM head (the MatMul that produces the logits) and the token embedding (the Gather from the
[vocab, D] table) are choices: `lm_head` / `embeddings` in the settings.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx

# Exports are written with IR 8 (graphs/contract.py); int4 tensors (opset 21, used by the quantizer for
# embeddings) need IR 10. onnx 1.23 would write IR 14, more than onnxruntime 1.31 accepts.
MAX_IR_VERSION = 10


@dataclass(frozen=True)
class Int8Settings:
    per_channel: bool = True
    weight_type: str = "QInt8"  # or "QUInt8"
    lm_head: bool = True  # quantize the LM head MatMul
    embeddings: bool = True  # quantize the token-embedding Gather (int8 rows; the position table stays float)


@dataclass(frozen=True)
class Int4Settings:
    block_size: int = 32
    symmetric: bool = True
    # 4: MatMulNBits quantizes activations to int8 on CPU: pegasus-xsum-shaped greedy 9.3 s against 15.0 s
    # with 0 (float compute), same quality on the trained fixture (README "Quantization")
    accuracy_level: int = 4
    lm_head: bool = True
    embeddings: bool = True  # block-quantize the token embedding (com.microsoft GatherBlockQuantized, opset 21)


def excluded_nodes(model: onnx.ModelProto, vocab_size: int, lm_head: bool, embeddings: bool) -> list[str]:
    """Nodes the quantizer must leave alone: the LM head and token embedding unless asked for, and
    every other Gather (position table, beam reordering of the past)."""
    lm_heads, token_embeddings = vocab_weights(model, vocab_size)
    other_gathers = [node.name for node in model.graph.node if node.op_type == "Gather"]
    other_gathers = [name for name in other_gathers if name not in token_embeddings]
    return other_gathers + ([] if lm_head else lm_heads) + ([] if embeddings else token_embeddings)


def vocab_weights(model: onnx.ModelProto, vocab_size: int) -> tuple[list[str], list[str]]:
    """(LM-head node names, token-embedding Gather node names): the nodes whose constant weight has the
    vocabulary as one of its axes. The LM head is a MatMul over [d_model, vocab], or in fp32 exports a
    Gemm(transB=1) over the [vocab, d_model] table itself (exporter/shared_weights.py)."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    lm_heads, embeddings = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and shapes.get(node.input[1], ())[-1:] == (vocab_size,):
            lm_heads.append(node.name)
        if _is_lm_head_gemm(node) and shapes.get(node.input[1], ())[:1] == (vocab_size,):
            lm_heads.append(node.name)
        if node.op_type == "Gather" and shapes.get(node.input[0], ())[:1] == (vocab_size,):
            embeddings.append(node.name)
    return lm_heads, embeddings


def lm_head_as_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn the LM head Gemm(x, W, transB=1) back into MatMul(x, Wᵀ), Wᵀ a copy of its own.

    The LM head is the one bias-less Gemm with transB=1 and a constant weight that exports hold; the
    MatMul keeps its node name (the quantizers select and exclude nodes by name).
    fp32 exports read the [vocab, d_model] embedding table in place (exporter/shared_weights.py); the
    quantizers know the LM head only as a MatMul with a constant weight, so the quantized formats get
    the layout they had before, with a transposed copy (sharing the table there is still to be done).
    """
    from onnx import helper, numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    for index, node in enumerate(list(model.graph.node)):  # a copy: nodes are replaced in place
        weight = weights.get(node.input[1]) if _is_lm_head_gemm(node) else None
        if weight is None:
            continue
        transposed = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), f"{weight.name}.transposed")
        model.graph.initializer.append(transposed)
        matmul = helper.make_node("MatMul", [node.input[0], transposed.name], list(node.output), name=node.name)
        model.graph.node.remove(node)
        model.graph.node.insert(index, matmul)
    return model


def _is_lm_head_gemm(node: onnx.NodeProto) -> bool:
    """Gemm(x, W, transB=1) without bias, alpha or beta: the LM head as fp32 exports write it."""
    attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
    return node.op_type == "Gemm" and len(node.input) == 2 and attributes == {"transB": 1}


def quantize_int8(source: Path, target: Path, settings: Int8Settings, vocab_size: int, external_data: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = lm_head_as_matmul(name_nodes(onnx.load(str(source))))
    excluded = excluded_nodes(model, vocab_size, settings.lm_head, settings.embeddings)
    with tempfile.TemporaryDirectory(prefix="ortseq-int8-") as scratch:
        named = Path(scratch) / source.name
        save_graph(model, named, external_data)  # quantize_dynamic reads a path: give it the one with node names
        with quiet_root_logger():
            quantize_dynamic(
                str(named),
                str(target),
                per_channel=settings.per_channel,
                weight_type=getattr(QuantType, settings.weight_type),
                op_types_to_quantize=["MatMul", "Gather"],
                nodes_to_exclude=excluded,
                use_external_data_format=external_data,
                extra_options={"MatMulConstBOnly": True},
            )
    _restore_ir_version(target)


def quantize_int4(source: Path, target: Path, settings: Int4Settings, vocab_size: int, external_data: bool) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = lm_head_as_matmul(name_nodes(onnx.load(str(source))))
    excluded = excluded_nodes(model, vocab_size, settings.lm_head, settings.embeddings)
    op_types = ("MatMul", "Gather") if settings.embeddings else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(
        model,
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        nodes_to_exclude=excluded,
        op_types_to_quantize=op_types,
    )
    with quiet_root_logger():
        quantizer.process()
    save_graph(functions_at_model_opset(quantizer.model.model), target, external_data)


def functions_at_model_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert every model-local function body (LSG's ortseq::LSGAttention) to the model's default opset.

    The int4 quantizer raises the model's opset to 21 (its int4 tensors need it) but not the opset of
    the functions, and onnxruntime inlines a function body under the model's opset: ReduceL2's `axes`,
    an attribute at opset 17, is an input from 18, so the body would no longer load.
    """
    from onnx import helper, version_converter

    target = _default_opset(model.opset_import)
    for function in model.functions:
        if _default_opset(function.opset_import) in (None, target):
            continue
        untyped = [helper.make_value_info(name, onnx.TypeProto()) for name in (*function.input, *function.output)]
        body = helper.make_graph(
            list(function.node), function.name, untyped[: len(function.input)], untyped[len(function.input) :]
        )
        wrapper = helper.make_model(body, opset_imports=list(function.opset_import), ir_version=model.ir_version)
        converted = version_converter.convert_version(wrapper, target)
        del function.node[:]
        function.node.extend(converted.graph.node)
        for opset in function.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = target
    return model


def _default_opset(opset_imports) -> int | None:
    return next((opset.version for opset in opset_imports if opset.domain in ("", "ai.onnx")), None)


@contextmanager
def quiet_root_logger():
    """onnxruntime's quantizers log every skipped tensor at INFO on the root logger: keep warnings only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name: the quantizers select and exclude nodes by name."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)
    return model


def save_graph(model: onnx.ModelProto, path: Path, external_data: bool) -> None:
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    if not external_data:
        onnx.save_model(model, str(path))
        return
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data"
    )


def _restore_ir_version(path: Path) -> None:
    """quantize_dynamic may raise the IR version past what this onnxruntime accepts; cap it."""
    model = onnx.load(str(path), load_external_data=False)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        onnx.save_model(model, str(path))  # external tensors keep pointing at the same .data file
