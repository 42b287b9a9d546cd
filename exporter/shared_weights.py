"""Each weight stored once: the token embeddings live in one file (contract.SHARED_WEIGHTS_FILE).

The encoder's token Gather, the decoder's token Gather and the LM head all read a [vocab, d_model]
table, the same one when the model ties them (Pegasus, BART). Traced as they come, each graph holds
its own copy, and the LM head a third, transposed one (torch.onnx folds `linear(x, W)` into a MatMul
against a constant Wᵀ). Here the LM head is exported as Gemm(x, W, transB=1), which reads the table
in its stored layout, and every initializer holding one of the model's embedding tables is pointed
at that table's bytes in the shared file, written once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ortseq.graphs.contract import SHARED_WEIGHTS_FILE

ALIGNMENT = 4096  # each table starts on a page: the runtime maps them straight from the file


class _LinearNoBias(torch.autograd.Function):
    """x @ weightᵀ, exported as Gemm(transB=1) so that the graph reads `weight` as stored."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def symbolic(g, x, weight):
        return g.op("Gemm", x, weight, transB_i=1)


def lm_head_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[rows, d_model] x [vocab, d_model] -> [rows, vocab] logits, the weight read in place (no transposed copy)."""
    return _LinearNoBias.apply(x, weight)


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


class SharedWeights:
    """The shared file being written for one export: tables are appended once, graphs point at them."""

    def __init__(self, directory: Path, tables: list[torch.Tensor]):
        self.path = Path(directory) / SHARED_WEIGHTS_FILE
        self._tables: list[np.ndarray] = []
        for table in tables:  # untied tables may still hold equal values (a checkpoint saved them once)
            array = table.detach().cpu().contiguous().numpy()
            if not any(array.shape == kept.shape and np.array_equal(array, kept) for kept in self._tables):
                self._tables.append(array)
        self._offsets: dict[int, int] = {}  # index in _tables -> offset in the file, once written

    def point_at_shared(self, model: onnx.ModelProto) -> int:
        """Move every initializer equal to one of the tables into the shared file; returns how many moved."""
        moved = 0
        for tensor in model.graph.initializer:
            index = self._table_index(tensor)
            if index is None:
                continue
            offset = self._offset_of(index)
            table = self._tables[index]
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", SHARED_WEIGHTS_FILE), ("offset", offset), ("length", table.nbytes)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            moved += 1
        return moved

    def written(self) -> bool:
        return bool(self._offsets)

    def _table_index(self, tensor: onnx.TensorProto) -> int | None:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        for index, table in enumerate(self._tables):
            if tuple(tensor.dims) != table.shape or tensor.data_type != onnx.TensorProto.FLOAT:
                continue
            if np.array_equal(numpy_helper.to_array(tensor), table):
                return index
        return None

    def _offset_of(self, index: int) -> int:
        if index not in self._offsets:
            with open(self.path, "ab") as handle:
                start = -(-handle.tell() // ALIGNMENT) * ALIGNMENT
                handle.write(b"\0" * (start - handle.tell()))
                handle.write(self._tables[index].astype("<f4", copy=False).tobytes())
            self._offsets[index] = start
        return self._offsets[index]
