"""Each weight stored once: the token embeddings live in one file (contract.SHARED_WEIGHTS_FILE).

The encoder's token Gather, the decoder's token Gather and the LM head all read a [vocab, d_model]
table, the same one when the model ties them (Pegasus, BART). Traced as they come, each graph holds
its own copy, and the LM head a third, transposed one (torch.onnx folds `linear(x, W)` into a MatMul
against a constant Wᵀ). Here the LM head is exported as Gemm(x, W, transB=1), which reads the table
in its stored layout, and every initializer holding one of the model's embedding tables is pointed
at that table's bytes in the shared file, written once.

Where a table is read both by token lookups and by the LM head, the LM head reads it under a second
name over the same bytes (read_whole_apart), so that the tables only lookups read can be listed in the
manifest (`lookup_tables`): the runtime holds just the rows a call looks up of those
(runtime/shared_weights.py).

Quantized exports (exporter/quantization/vocab_tables.py) store their quantized tables the same way
(SharedFile: any dtype, and one run of bytes may back initializers of different shapes). Only
lm_head_logits needs torch, imported when called: `ortseq quantize` runs without torch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from ..graphs import contract
from ..graphs.contract import SHARED_WEIGHTS_FILE

if TYPE_CHECKING:
    import torch

ALIGNMENT = 4096  # each table starts on a page: the runtime maps them straight from the file


@functools.cache
def _linear_no_bias():
    import torch

    class LinearNoBias(torch.autograd.Function):
        """x @ weightᵀ, exported as Gemm(transB=1) so that the graph reads `weight` as stored."""

        @staticmethod
        def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, weight)

        @staticmethod
        def symbolic(g, x, weight):
            return g.op("Gemm", x, weight, transB_i=1)

    return LinearNoBias


def lm_head_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[rows, d_model] x [vocab, d_model] -> [rows, vocab] logits, the weight read in place (no transposed copy)."""
    return _linear_no_bias().apply(x, weight)


def embedding_tables(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's distinct token-embedding tables: encoder and decoder inputs, the LM head's weight."""
    candidates = [
        model.get_encoder().get_input_embeddings(),
        model.get_decoder().get_input_embeddings(),
        model.get_output_embeddings(),
    ]
    tables: list[torch.Tensor] = []
    for module in candidates:
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dim() == 2 and not any(weight is table for table in tables):
            tables.append(weight)
    return tables


class SharedFile:
    """The shared file being written for one export: arrays are appended once (equal bytes: once), and
    initializers holding those bytes are pointed at them, whatever their shape (an int4 table is read as
    [vocab, blocks, bytes] by MatMulNBits and as [vocab, bytes] by GatherBlockQuantized), and so are
    initializers holding a run of a kept array's rows (the int8 LM head reads the table in row chunks)."""

    def __init__(self, directory: Path, arrays: Iterable[np.ndarray] = ()):
        self.path = Path(directory) / SHARED_WEIGHTS_FILE
        self._arrays: list[np.ndarray] = []
        self._offsets: dict[int, int] = {}  # index in _arrays -> offset in the file, once written
        self._looked_up: set[str] = set()  # shared initializers some token lookup reads
        self._read_otherwise: set[str] = set()  # ... and those some other node reads
        for array in arrays:
            self.add(array)

    def add(self, array: np.ndarray) -> None:
        """Keep array for the file, unless its bytes are already kept: equal (untied tables may hold equal
        values: a checkpoint saved them once), or rows of a kept array."""
        if self._place_of(array) is None:
            self._arrays.append(np.ascontiguousarray(array))

    def point_at_shared(self, model: onnx.ModelProto, names: Iterable[str] | None = None) -> int:
        """Move every initializer (of `names`, if given) equal to a kept array into the shared file;
        returns how many moved. Where a table moved is read by token lookups and by other nodes (the LM
        head), the others read it under a name of their own (read_whole_apart): the manifest's
        lookup_tables (lookup_tables()) then name what only lookups read."""
        wanted = None if names is None else set(names)
        indices = {}  # initializer name -> (index of the kept array holding its bytes, where in it)
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or (wanted is not None and tensor.name not in wanted):
                continue
            place = self._place_of_tensor(tensor)
            if place is not None:
                indices[tensor.name] = place
        for alias, original in read_whole_apart(model, set(indices)).items():
            indices[alias] = indices[original]
        looked_up, read_otherwise = readers_of(model, set(indices))
        self._looked_up |= looked_up
        self._read_otherwise |= read_otherwise
        for tensor in model.graph.initializer:
            if tensor.name in indices:
                self._point(tensor, indices[tensor.name])
        return sum(tensor.name in indices for tensor in model.graph.initializer)

    def lookup_tables(self) -> list[str]:
        """The initializers in the shared file that, in every graph pointed at it, only token lookups read."""
        return sorted(self._looked_up - self._read_otherwise)

    def _point(self, tensor: onnx.TensorProto, place: tuple[int, int]) -> None:
        index, start = place
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        offset, length = self._offset_of(index) + start, int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", SHARED_WEIGHTS_FILE), ("offset", offset), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)

    def written(self) -> bool:
        return bool(self._offsets)

    def _place_of_tensor(self, tensor: onnx.TensorProto) -> tuple[int, int] | None:
        dtype, dims = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type), tuple(tensor.dims)
        nbytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
        if not any(
            kept.dtype == dtype and (kept.nbytes == nbytes or _may_hold_rows(kept, dims)) for kept in self._arrays
        ):
            return None  # not converted: most initializers of a graph are not tables
        return self._place_of(numpy_helper.to_array(tensor))

    def _place_of(self, array: np.ndarray) -> tuple[int, int] | None:
        """(index of the kept array holding array's bytes, byte offset in it), or None."""
        for index, kept in enumerate(self._arrays):
            if kept.dtype != array.dtype:
                continue
            if kept.nbytes == array.nbytes and np.array_equal(_bytes(kept), _bytes(array)):
                return index, 0
            if _may_hold_rows(kept, array.shape):
                first = _first_row_of(kept, array)
                if first is not None:
                    return index, first * (kept.nbytes // len(kept))
        return None

    def _offset_of(self, index: int) -> int:
        if index not in self._offsets:
            with open(self.path, "ab") as handle:
                start = -(-handle.tell() // ALIGNMENT) * ALIGNMENT
                handle.write(b"\0" * (start - handle.tell()))
                handle.write(
                    self._arrays[index].astype(self._arrays[index].dtype.newbyteorder("<"), copy=False).tobytes()
                )
            self._offsets[index] = start
        return self._offsets[index]


# The nodes that read rows of a table at the graph's token ids and nothing else of it: op type -> its
# axis attribute (must be 0) and the inputs it reads rows of (GatherBlockQuantized: data, scales, zero points)
ROW_LOOKUPS = {"Gather": ("axis", (0,)), "GatherBlockQuantized": ("gather_axis", (0, 2, 3))}


def _row_inputs(node: onnx.NodeProto) -> tuple[int, ...]:
    """The inputs node reads only the rows of, at the ids of input_ids (graphs/contract.py); () if none."""
    if node.op_type not in ROW_LOOKUPS or len(node.input) < 2 or node.input[1] != contract.LOOKUP_IDS:
        return ()
    axis_name, inputs = ROW_LOOKUPS[node.op_type]
    axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == axis_name), 0)
    return inputs if axis == 0 else ()


def readers_of(model: onnx.ModelProto, names: set[str]) -> tuple[set[str], set[str]]:
    """(those of names some token lookup reads, those some other node or a graph output reads); a name
    read inside a subgraph counts as read otherwise."""
    looked_up, otherwise = set(), {output.name for output in model.graph.output} & names
    for node in model.graph.node:
        rows = _row_inputs(node)
        for position, name in enumerate(node.input):
            (looked_up if position in rows else otherwise).add(name)
        otherwise |= _subgraph_reads(node)
    return looked_up & names, otherwise & names


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    reads = set()
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            for inner in graph.node:
                reads |= set(inner.input) | _subgraph_reads(inner)
    return reads


def read_whole_apart(model: onnx.ModelProto, names: set[str]) -> dict[str, str]:
    """Where a table of names is read by token lookups and by other nodes of the graph (the LM head), the
    others read a second initializer over the same bytes, named table + WHOLE_TABLE_SUFFIX (stored once:
    equal bytes are). Returns alias -> table."""
    looked_up, _ = readers_of(model, names)
    tables = {tensor.name: tensor for tensor in model.graph.initializer}
    aliases: dict[str, str] = {}
    for node in model.graph.node:
        rows = _row_inputs(node)
        for position, name in enumerate(node.input):
            if name in looked_up and position not in rows:
                alias = name + contract.WHOLE_TABLE_SUFFIX
                if alias not in aliases:
                    copy = model.graph.initializer.add()
                    copy.CopyFrom(tables[name])
                    copy.name = alias
                    aliases[alias] = name
                node.input[position] = alias
    return aliases


def _may_hold_rows(kept: np.ndarray, dims: tuple) -> bool:
    """Whether an array of dims could be a run of kept's rows (fewer rows, the same row shape)."""
    return kept.ndim > 0 and len(dims) == kept.ndim and 0 < dims[0] < len(kept) and tuple(dims[1:]) == kept.shape[1:]


def _first_row_of(kept: np.ndarray, rows: np.ndarray) -> int | None:
    """The first i with kept[i : i + len(rows)] equal to rows, byte for byte; None if there is none."""
    flat_kept, flat_rows = kept.reshape(len(kept), -1).view(np.uint8), _bytes(rows).reshape(len(rows), -1)
    head = min(8, flat_rows.shape[1])  # rows starting like rows[0] first: no row-sized temporary per kept row
    starts = flat_kept[: len(kept) - len(rows) + 1, :head]
    candidates = np.flatnonzero((starts == flat_rows[0, :head]).all(axis=1))
    for start in candidates:
        if np.array_equal(flat_kept[start : start + len(rows)], flat_rows):
            return int(start)
    return None


def _bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


class SharedWeights(SharedFile):
    """The shared file of an fp32 export: the model's embedding tables (torch tensors)."""

    def __init__(self, directory: Path, tables: list[torch.Tensor]):
        super().__init__(directory, (table.detach().cpu().contiguous().numpy() for table in tables))
