"""The graph transforms, one function per format: an fp32 graph file in, a quantized graph file out.

* int8: onnxruntime's dynamic quantization, per-channel int8 weights, activations quantized per
  call. Only MatMuls whose weight is a constant are quantized ("MatMulConstBOnly"): the attention
  MatMuls (Q·Kᵀ and P·V, both operands activations) stay in float, unlike optimum's int8.
* int4: weight-only block quantization into com.microsoft MatMulNBits (CPU and CUDA kernels);
  activations stay float. Again only MatMuls with a constant weight exist to be quantized.
* fp16: see exporter/quantization/fp16.py (kept apart: it is about keeping fp32 where Pegasus overflows).

The LM head (the Gemm that produces the logits) and the token embedding (the Gather from the
[vocab, D] table) are choices: `lm_head` / `embeddings` in the settings. Either way the table is
stored once, in the export's shared file (vocab_tables.py).
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..conv_linear import convs_to_matmuls
from ..shared_weights import SharedFile
from . import vocab_tables

# Exports are written with IR 8 (graphs/contract.py); int4 tensors (opset 21, used by the quantizer for
# embeddings) need IR 10. onnx 1.23 would write IR 14, more than onnxruntime 1.31 accepts.
MAX_IR_VERSION = 10


@dataclass(frozen=True)
class Int8Settings:
    per_channel: bool = True
    weight_type: str = "QInt8"  # or "QUInt8"
    # the token-embedding table, read by the lookups and the LM head, is int8 rows with a scale per row
    # whatever per_channel and weight_type say (vocab_tables.Int8Rows); the position table stays float
    lm_head: bool = True  # the LM head reads the int8 table (else the float one)
    embeddings: bool = True  # the token lookups read the int8 table (else the float one)


@dataclass(frozen=True)
class Int4Settings:
    block_size: int = 32
    symmetric: bool = True
    # 4: MatMulNBits quantizes activations to int8 on CPU: pegasus-xsum-shaped greedy 9.3 s against 15.0 s
    # with 0 (float compute), same quality on the trained fixture (docs/quantization.md)
    accuracy_level: int = 4
    lm_head: bool = True
    embeddings: bool = True  # block-quantize the token embedding (com.microsoft GatherBlockQuantized, opset 21)


def quantize_int8(
    source: Path, target: Path, settings: Int8Settings, vocab_size: int, external_data: bool, shared: SharedFile
) -> None:
    """The MatMuls by quantize_dynamic; the token embedding and LM head read one int8 table in the shared file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = name_nodes(convs_to_matmuls(onnx.load(str(source))))  # linear layers exported as Convs: MatMuls again
    lm_heads = [node.name for node in vocab_tables.vocab_readers(model, vocab_size).lm_heads]
    # quantize_dynamic turns every Gemm into a MatMul over a transposed copy of its weight before anything
    # else (nodes_to_exclude does not stop that): the LM head Gemm goes in under another name
    _rename_op(model, lm_heads, "Gemm", HIDDEN_GEMM)
    with tempfile.TemporaryDirectory(prefix="ortseq-int8-") as scratch:
        named, quantized = Path(scratch) / source.name, Path(scratch) / ("int8-" + source.name)
        save_graph(model, named, external_data)  # quantize_dynamic reads a path: give it the one with node names
        del model
        with quiet_root_logger():
            quantize_dynamic(
                str(named),
                str(quantized),
                per_channel=settings.per_channel,
                weight_type=getattr(QuantType, settings.weight_type),
                op_types_to_quantize=["MatMul"],  # not the token Gathers: vocab_tables does those
                use_external_data_format=external_data,
                extra_options={"MatMulConstBOnly": True},
            )
        model = onnx.load(str(quantized))
    _rename_op(model, lm_heads, HIDDEN_GEMM, "Gemm")
    del model.graph.value_info[:]  # quantize_dynamic's shape inference: onnxruntime infers them itself
    model = vocab_tables.store_tables_once(
        model, vocab_size, shared, vocab_tables.Int8Rows(), settings.embeddings, settings.lm_head
    )
    save_graph(model, target, external_data)


HIDDEN_GEMM = "OrtseqHiddenGemm"  # an op type no quantizer knows


def _rename_op(model: onnx.ModelProto, names: list[str], old: str, new: str) -> None:
    for node in model.graph.node:
        if node.name in names and node.op_type == old:
            node.op_type = new


def quantize_int4(
    source: Path, target: Path, settings: Int4Settings, vocab_size: int, external_data: bool, shared: SharedFile
) -> None:
    """The MatMuls into MatMulNBits; the token embedding and LM head read one block-quantized table."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = name_nodes(convs_to_matmuls(onnx.load(str(source))))  # linear layers exported as Convs: MatMuls again
    readers = vocab_tables.vocab_readers(model, vocab_size)
    quantizer = MatMulNBitsQuantizer(
        model,
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        op_types_to_quantize=("MatMul",),  # not the Gathers; the LM head (a Gemm) is excluded by name
        nodes_to_exclude=[node.name for node in readers.gathers + readers.lm_heads],  # vocab_tables does those
    )
    with quiet_root_logger():
        quantizer.process()
    table_format = vocab_tables.Blocks(4, settings.block_size, settings.symmetric, settings.accuracy_level)
    model = vocab_tables.store_tables_once(
        functions_at_model_opset(quantizer.model.model),
        vocab_size,
        shared,
        table_format,
        settings.embeddings,
        settings.lm_head,
    )
    save_graph(model, target, external_data)


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
    """Tensors already in the shared file stay there; with external_data the others go to path + .data."""
    # quantize_dynamic may raise the IR version past what this onnxruntime accepts; cap it
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    if not external_data:
        onnx.save_model(model, str(path))
        return
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data"
    )
