"""Each weight stored once: the token embeddings live in one file (contract.SHARED_WEIGHTS_FILE).

The encoder's token Gather, the decoder's token Gather and the LM head all read a [vocab, d_model]
table, the same one when the model ties them (Pegasus, BART). Traced as they come, each graph holds
its own copy, and the LM head a third, transposed one (torch.onnx folds `linear(x, W)` into a MatMul
against a constant Wᵀ). Here the LM head is exported as Gemm(x, W, transB=1), which reads the table
in its stored layout, and every initializer holding one of the model's embedding tables is pointed
at that table's bytes in the shared file, written once.

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

from ortseq.graphs.contract import SHARED_WEIGHTS_FILE

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
    [vocab, blocks, bytes] by MatMulNBits and as [vocab, bytes] by GatherBlockQuantized)."""

    def __init__(self, directory: Path, arrays: Iterable[np.ndarray] = ()):
        self.path = Path(directory) / SHARED_WEIGHTS_FILE
        self._arrays: list[np.ndarray] = []
        self._offsets: dict[int, int] = {}  # index in _arrays -> offset in the file, once written
        for array in arrays:
            self.add(array)

    def add(self, array: np.ndarray) -> None:
        """Keep array for the file, unless equal bytes are already kept (untied tables may hold equal
        values: a checkpoint saved them once)."""
        if self._index_of(array) is None:
            self._arrays.append(np.ascontiguousarray(array))

    def point_at_shared(self, model: onnx.ModelProto, names: Iterable[str] | None = None) -> int:
        """Move every initializer (of `names`, if given) equal to a kept array into the shared file;
        returns how many moved."""
        wanted = None if names is None else set(names)
        moved = 0
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL or (wanted is not None and tensor.name not in wanted):
                continue
            index = self._index_of_tensor(tensor)
            if index is None:
                continue
            offset, length = self._offset_of(index), self._arrays[index].nbytes
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                tensor.ClearField(field)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", SHARED_WEIGHTS_FILE), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            moved += 1
        return moved

    def written(self) -> bool:
        return bool(self._offsets)

    def _index_of_tensor(self, tensor: onnx.TensorProto) -> int | None:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        nbytes = int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
        if not any(kept.dtype == dtype and kept.nbytes == nbytes for kept in self._arrays):
            return None  # not converted: most initializers of a graph are not tables
        return self._index_of(numpy_helper.to_array(tensor))

    def _index_of(self, array: np.ndarray) -> int | None:
        for index, kept in enumerate(self._arrays):
            if (
                kept.dtype == array.dtype
                and kept.nbytes == array.nbytes
                and np.array_equal(_bytes(kept), _bytes(array))
            ):
                return index
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


def _bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


class SharedWeights(SharedFile):
    """The shared file of an fp32 export: the model's embedding tables (torch tensors)."""

    def __init__(self, directory: Path, tables: list[torch.Tensor]):
        super().__init__(directory, (table.detach().cpu().contiguous().numpy() for table in tables))
