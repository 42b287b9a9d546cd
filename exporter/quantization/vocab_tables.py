"""The token embedding stored once in quantized exports too (issue 14).

An fp32 export keeps each [vocab, d_model] table once, in embeddings.data, read by the encoder's and
the decoder's token Gather and by the LM head, a Gemm(x, table, transB=1) (exporter/shared_weights.py).
Here each format replaces those readers by nodes that read ONE version of the table in that format,
and the quantized export writes it once, into its own embeddings.data:

* int8: int8 rows with one symmetric scale per row ([vocab, d] as stored). A lookup is Gather, Cast,
  times the gathered rows' scales; the LM head is DynamicQuantizeLinear (activations quantized per
  call, as quantize_dynamic does) and com.microsoft QGemm(transB=1), which reads the table as stored.
  Chosen by measurement (benchmarks/probe_lm_head_speed.py, docs/quantization.md): QGemm is as fast as
  quantize_dynamic's MatMulInteger over a transposed copy (the LM head before), while MatMulNBits at 8
  bits, which GatherBlockQuantized could share too, took twice as long at 64 rows.
  The LM head reads the table in chunks of rows (LM_HEAD_CHUNK_BYTES each; one QGemm per chunk, the
  logits concatenated): onnxruntime prepacks a QGemm's B through a transposed scratch copy of it, and
  with one QGemm that copy was the whole table, the peak of loading (the mapped table, the scratch and
  the packed copy at once). The chunks are runs of the table's rows: the shared file stores them once.
* int4: MatMulNBits' block layout: GatherBlockQuantized (lookups) and MatMulNBits (LM head) read the
  same bytes, as [vocab, blocks · bytes per block] and [vocab, blocks, bytes per block]
  (benchmarks/probe_block_quantized_sharing.py).
* fp16: the converter's fp16 table, read by the Gathers and the Gemm(transB=1) LM head.

A reader the settings keep in float (`lm_head` / `embeddings` off) reads the float table, stored once too.
Only the token Gathers and the LM head are touched: nothing here depends on the attention's structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..progress import log
from ..shared_weights import SharedFile

MICROSOFT = "com.microsoft"


@dataclass(frozen=True)
class VocabReaders:
    """The nodes of one graph that read a [vocab, d_model] constant table."""

    gathers: list[onnx.NodeProto]  # Gather(table, ids), axis 0: token embeddings
    lm_heads: list[onnx.NodeProto]  # Gemm(x, table[, bias], transB=1): the LM head


def vocab_readers(model: onnx.ModelProto, vocab_size: int) -> VocabReaders:
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}

    def is_table(name: str) -> bool:
        return len(shapes.get(name, ())) == 2 and shapes[name][0] == vocab_size

    gathers = [node for node in model.graph.node if node.op_type == "Gather" and is_table(node.input[0])]
    gathers = [node for node in gathers if _attributes(node).get("axis", 0) == 0]
    lm_heads = [node for node in model.graph.node if is_lm_head_gemm(node) and is_table(node.input[1])]
    return VocabReaders(gathers, lm_heads)


def is_lm_head_gemm(node: onnx.NodeProto) -> bool:
    """Gemm(x, W, transB=1), maybe with a bias C (BERT's LM head) but no scaling: the LM head as fp32
    exports write it (exporter/shared_weights.py; torch.onnx's own Gemm for a 2-D linear with bias)."""
    if node.op_type != "Gemm":
        return False
    attributes = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0} | _attributes(node)
    return attributes == {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 1}


class TableFormat:
    """How one format stores a [vocab, d_model] fp32 table, and the nodes that read it."""

    def arrays(self, table: np.ndarray) -> dict[str, np.ndarray]:
        """role -> array: what the readers read (initializer names: the table's name + role). Two roles
        may hold the same bytes in different shapes: the shared file stores them once."""
        raise NotImplementedError

    def lookup(self, names: dict[str, str], ids: str, out: str, prefix: str) -> list[onnx.NodeProto]:
        raise NotImplementedError

    def lm_head(self, names: dict[str, str], x: str, out: str, prefix: str, shape: tuple) -> list[onnx.NodeProto]:
        raise NotImplementedError

    def serves_lookups(self, d_model: int) -> bool:
        """Whether the lookups can read this format's table (else they keep reading the float table)."""
        return True


# One QGemm per this many bytes of the int8 table: its transposed scratch while being prepacked. Mid-size
# Pegasus (96k x 512): 12 chunks; the peak at load 236 -> 192 MiB (benchmarks/compare_exports_memory.py,
# results/exports_memory_mid.json). The LM head alone, by
# benchmarks/probe_lm_head_speed.py (results/lm_head_chunks.json): as fast at 1 and 8 rows, ~2 ms slower
# at 64 (d 512: 12-13 -> 14-16 ms; d 1024 20-22 -> 20-22 ms).
LM_HEAD_CHUNK_BYTES = 4 << 20
INT8_ROLES = (".int8", ".scales", ".zero_points")


def row_chunks(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of about LM_HEAD_CHUNK_BYTES each, in order, covering all rows."""
    count = max(1, -(-rows * row_bytes // LM_HEAD_CHUNK_BYTES))
    bounds = [rows * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _chunk_role(role: str, start: int, end: int) -> str:
    return f"{role}/rows_{start}_{end}"


TABLE_INT8_RANGE = 63  # see Int8Rows


class Int8Rows(TableFormat):
    """int8 rows, one symmetric scale per row, in 7 bits (±TABLE_INT8_RANGE).

    Not the full ±127: the LM head's QGemm multiplies the table by uint8 activations, and on x86 CPUs
    without VNNI (AVX2) onnxruntime adds pairs of those products in int16, which saturates past 32767
    (255 x 127 x 2 = 64770; 255 x 63 x 2 = 32130 fits). Measured on the trained tiny Pegasus's quality
    report on an AVX2 CPU: the largest logit error 2.71 with ±127 rows, 1.40 with ±63 (mean 0.156, 0.137).
    """

    def arrays(self, table: np.ndarray) -> dict[str, np.ndarray]:
        largest = np.abs(table).max(axis=1)
        scales = np.where(largest > 0, largest / TABLE_INT8_RANGE, 1).astype(np.float32)
        rows = np.clip(np.rint(table / scales[:, None]), -TABLE_INT8_RANGE, TABLE_INT8_RANGE).astype(np.int8)
        whole = {".int8": rows, ".scales": scales, ".zero_points": np.zeros(len(table), dtype=np.int8)}
        # The LM head's, after the whole arrays and the longest first: the shared file keeps the whole table
        # and scales, and the longest chunk's zero points (the decoder's lookups read none), once; every
        # other chunk is a run of rows of one of those.
        longest_first = sorted(row_chunks(*rows.shape), key=lambda chunk: chunk[0] - chunk[1])
        chunks = {
            _chunk_role(role, start, end): whole[role][start:end] for start, end in longest_first for role in INT8_ROLES
        }
        return whole | chunks

    def lookup(self, names, ids, out, prefix):
        axes = f"{prefix}/last_axis"
        return [
            helper.make_node("Gather", [names[".int8"], ids], [f"{prefix}/rows"], name=f"{prefix}/rows"),
            helper.make_node("Gather", [names[".scales"], ids], [f"{prefix}/scales"], name=f"{prefix}/scales"),
            helper.make_node("Cast", [f"{prefix}/rows"], [f"{prefix}/float"], name=f"{prefix}/float", to=1),
            helper.make_node("Constant", [], [axes], name=axes, value=numpy_helper.from_array(np.array([-1]))),
            helper.make_node("Unsqueeze", [f"{prefix}/scales", axes], [f"{prefix}/column"], name=f"{prefix}/column"),
            helper.make_node("Mul", [f"{prefix}/float", f"{prefix}/column"], [out], name=prefix),
        ]

    def lm_head(self, names, x, out, prefix, shape):
        quantized = [f"{prefix}/x_int8", f"{prefix}/x_scale", f"{prefix}/x_zero_point"]
        nodes = [helper.make_node("DynamicQuantizeLinear", [x], quantized, name=f"{prefix}/quantize_x")]
        logits = []
        for start, end in row_chunks(*shape):
            chunk = [names[_chunk_role(role, start, end)] for role in INT8_ROLES]
            logits.append(f"{prefix}/logits_{start}_{end}")
            nodes.append(
                helper.make_node("QGemm", quantized + chunk, [logits[-1]], name=logits[-1], domain=MICROSOFT, transB=1)
            )
        if len(logits) == 1:  # a table under one chunk: its QGemm is the LM head
            nodes[-1].output[0], nodes[-1].name = out, prefix
            return nodes
        nodes.append(helper.make_node("Concat", logits, [out], name=prefix, axis=-1))
        return nodes


@dataclass(frozen=True)
class Blocks(TableFormat):
    """MatMulNBits' block quantization of the table's rows, read by GatherBlockQuantized too: MatMulNBits
    reads [vocab, blocks, bytes per block] and flat scales, GatherBlockQuantized the same bytes as
    [vocab, blocks · bytes per block] and [vocab, blocks]."""

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int

    def arrays(self, table: np.ndarray) -> dict[str, np.ndarray]:
        from onnxruntime.capi import _pybind_state

        vocab, d_model = table.shape
        blocks = -(-d_model // self.block_size)  # MatMulNBits pads the last block
        packed = np.zeros((vocab, blocks, self.block_size * self.bits // 8), dtype=np.uint8)
        scales = np.zeros((vocab, blocks), dtype=np.float32)
        zero_points = np.zeros((vocab, -(-blocks * self.bits // 8)), dtype=np.uint8)
        quantize = getattr(_pybind_state, f"quantize_matmul_{self.bits}bits")
        weight = np.ascontiguousarray(table.T)  # MatMulNBits' quantizer takes B as [K, N]
        quantize(packed, weight, scales, zero_points, self.block_size, vocab, d_model, self.symmetric)
        arrays = {".blocks": packed, ".scales": scales.reshape(-1)}
        arrays |= {} if self.symmetric else {".zero_points": zero_points.reshape(-1)}
        if self.serves_lookups(d_model):  # the same bytes in GatherBlockQuantized's shapes
            arrays |= {".rows": packed.reshape(vocab, -1), ".row_scales": scales}
            arrays |= {} if self.symmetric else {".row_zero_points": zero_points}
        return arrays

    def __str__(self) -> str:
        return f"{self.bits}-bit blocks of {self.block_size}"

    def serves_lookups(self, d_model: int) -> bool:
        # a padded last block would make GatherBlockQuantized's rows longer than d_model
        return d_model % self.block_size == 0

    def lookup(self, names, ids, out, prefix):
        zero_points = [] if self.symmetric else [names[".row_zero_points"]]
        inputs = [names[".rows"], ids, names[".row_scales"], *zero_points]
        attributes = dict(bits=self.bits, block_size=self.block_size, gather_axis=0, quantize_axis=1)
        return [helper.make_node("GatherBlockQuantized", inputs, [out], name=prefix, domain=MICROSOFT, **attributes)]

    def lm_head(self, names, x, out, prefix, shape):
        zero_points = [] if self.symmetric else [names[".zero_points"]]
        inputs = [x, names[".blocks"], names[".scales"], *zero_points]
        vocab, d_model = shape
        attributes = dict(bits=self.bits, block_size=self.block_size, accuracy_level=self.accuracy_level)
        node = helper.make_node(
            "MatMulNBits", inputs, [out], name=prefix, domain=MICROSOFT, K=d_model, N=vocab, **attributes
        )
        return [node]


def store_tables_once(
    model: onnx.ModelProto,
    vocab_size: int,
    shared: SharedFile,
    table_format: TableFormat | None = None,
    lookups: bool = False,
    lm_head: bool = False,
) -> onnx.ModelProto:
    """Replace the graph's token lookups (if `lookups`) and LM head (if `lm_head`) by `table_format`'s
    readers of one stored table, then point every table the readers read, and every other large table
    a Gather reads (positions), at the shared file.
    Without a format the readers keep the tables they read (fp16: the converter's fp16 tables)."""
    stored = _read_format(model, vocab_size, table_format, lookups, lm_head) if table_format else {}
    kept = vocab_readers(model, vocab_size)  # readers left reading a float table
    tables = {node.input[0] for node in kept.gathers} | {node.input[1] for node in kept.lm_heads}
    tables |= {name for names in stored.values() for name in names.values()} | _lookup_tables(model)
    for init in model.graph.initializer:
        if init.name in tables:
            shared.add(numpy_helper.to_array(init))
    shared.point_at_shared(model, tables)
    return model


def _read_format(model: onnx.ModelProto, vocab_size: int, table_format: TableFormat, lookups: bool, lm_head: bool):
    """Swap the chosen readers for the format's; returns float table name -> role -> stored array's name."""
    readers = vocab_readers(model, vocab_size)
    weights = {init.name: init for init in model.graph.initializer}
    d_models = {weights[node.input[0]].dims[1] for node in readers.gathers}
    if lookups and not all(table_format.serves_lookups(d_model) for d_model in d_models):
        log(f"the token lookups read the float table: d_model {sorted(d_models)} does not split into {table_format}")
        lookups = False
    chosen = [(node, False) for node in readers.gathers if lookups] + [(n, True) for n in readers.lm_heads if lm_head]
    stored: dict[str, dict[str, str]] = {}
    for node, is_head in chosen:
        table = weights[node.input[1] if is_head else node.input[0]]
        if table.name not in stored:
            stored[table.name] = _add_arrays(model, table_format, table)
        if is_head:
            replacement = _lm_head(table_format, stored[table.name], node, tuple(table.dims))
        else:
            replacement = table_format.lookup(stored[table.name], node.input[1], node.output[0], node.name)
        _replace(model, node, replacement)
    _add_opsets(model)
    # the float tables replaced, and the format's arrays no reader of this graph reads (an encoder's
    # lookups read no zero points)
    _drop_unread(model, set(stored) | {name for roles in stored.values() for name in roles.values()})
    return stored


LOOKUP_TABLE_BYTES = 4096  # a smaller table is not worth a page of its own in the shared file


def _lookup_tables(model: onnx.ModelProto) -> set[str]:
    """Every other table a Gather reads (Pegasus' sinusoidal positions: the same in both graphs)."""
    sizes = {init.name: len(init.raw_data) for init in model.graph.initializer}
    gathered = {node.input[0] for node in model.graph.node if node.op_type == "Gather"}
    return {name for name in gathered if sizes.get(name, 0) >= LOOKUP_TABLE_BYTES}


def _lm_head(table_format: TableFormat, names: dict[str, str], gemm: onnx.NodeProto, shape: tuple) -> list:
    """The format's LM head in place of gemm, its bias (if any) added after."""
    if len(gemm.input) < 3:
        return table_format.lm_head(names, gemm.input[0], gemm.output[0], gemm.name, shape)
    logits = f"{gemm.name}/without_bias"
    add = helper.make_node("Add", [logits, gemm.input[2]], [gemm.output[0]], name=f"{gemm.name}/bias")
    return [*table_format.lm_head(names, gemm.input[0], logits, gemm.name, shape), add]


def _add_arrays(model: onnx.ModelProto, table_format: TableFormat, table: onnx.TensorProto) -> dict[str, str]:
    """Add the format's arrays for `table` to the graph; returns role -> initializer name."""
    names = {}
    for role, array in table_format.arrays(numpy_helper.to_array(table).astype(np.float32)).items():
        names[role] = table.name + role
        model.graph.initializer.append(numpy_helper.from_array(array, names[role]))
    return names


def _replace(model: onnx.ModelProto, node: onnx.NodeProto, replacement: list[onnx.NodeProto]) -> None:
    index = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    for offset, new in enumerate(replacement):
        model.graph.node.insert(index + offset, new)


def _add_opsets(model: onnx.ModelProto) -> None:
    used = {node.domain for node in model.graph.node}
    imported = {opset.domain for opset in model.opset_import}
    if MICROSOFT in used and MICROSOFT not in imported:
        model.opset_import.append(helper.make_opsetid(MICROSOFT, 1))


def _drop_unread(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop the initializers of `names` that no node reads (any more)."""
    read = set()
    for graph in _graphs(model.graph):
        read.update(name for node in graph.node for name in node.input)
    for init in [init for init in model.graph.initializer if init.name in names - read]:
        model.graph.initializer.remove(init)


def _graphs(graph: onnx.GraphProto):
    """graph and its subgraphs (If/Loop bodies may read the outer graph's initializers)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in [attribute.g] * attribute.HasField("g") + list(attribute.graphs):
                yield from _graphs(subgraph)


def _attributes(node: onnx.NodeProto) -> dict:
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
