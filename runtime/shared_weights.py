"""The tables an export stores once (graphs/contract.py's SHARED_WEIGHTS_FILE), loaded once: the token
embeddings of fp32 exports; in quantized ones the table in the format's own form (int8 rows and scales,
int4 blocks seen in two shapes, fp16) and the position tables (exporter/quantization/vocab_tables.py).

The file is mapped once, read-only, and every initializer the graphs keep there is handed to its
session as an OrtValue over those bytes (SessionOptions.add_initializer: on CPU onnxruntime uses the
caller's buffer, it does not copy). onnxruntime 1.32 would itself map a graph's external data, once
per session (two mappings of the same pages; measured: the same peak RSS on a 96k x 512 model), so
this mostly makes the sharing explicit rather than a property of onnxruntime's loader. The mapping
is shared through the page cache, so replicas of a server process share it too.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ortseq.graphs.contract import SHARED_WEIGHTS_FILE
from ortseq.graphs.external_data import external_initializers
from ortseq.graphs.manifest import ManifestError

DONT_NEED = getattr(mmap, "MADV_DONTNEED", None)  # Linux and macOS; Windows has no madvise

# onnx.TensorProto.DataType -> numpy dtype, for the types an export keeps in the shared file
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("u1"), 3: np.dtype("i1"), 10: np.dtype("<f2")}


class SharedWeights:
    """The shared file mapped once, and the OrtValues over it (they must outlive every session using them)."""

    def __init__(self, directory: Path):
        path = Path(directory) / SHARED_WEIGHTS_FILE
        self._mapping = _map(path) if path.is_file() else None
        self._file = None if self._mapping is None else np.frombuffer(self._mapping, dtype=np.uint8)
        self._values: dict[tuple[int, tuple[int, ...], int], ort.OrtValue] = {}

    def release_pages(self) -> None:
        """Call once the sessions are built: drop this process's hold on the file's pages.

        Building a session prepacks the LM head (fp32 Gemm, int8 QGemm, int4 MatMulNBits): onnxruntime
        reads the whole table once and keeps a packed copy of its own, which is what every step reads.
        The mapped pages read for that would stay in the resident set, a second copy of the table;
        dropped, they stay in the page cache, and a lookup faults back only the rows it reads (measured on
        the mid-size int8 export, d_model 512, 96k vocabulary: 47 MiB less resident after loading). The
        mapping is read-only and backed by the file, so nothing is lost.
        """
        if self._mapping is not None and DONT_NEED is not None:
            self._mapping.madvise(DONT_NEED)

    def initializers(self, graph: Path) -> list[tuple[str, ort.OrtValue]]:
        """(initializer name, value) for each initializer of graph kept in the shared file."""
        if self._file is None:  # exports made before the shared file keep every weight in their graphs
            return []
        return [
            (tensor.name, self._value(tensor))
            for tensor in external_initializers(graph)
            if tensor.location == SHARED_WEIGHTS_FILE
        ]

    def _value(self, tensor) -> ort.OrtValue:
        dtype = _DTYPES.get(tensor.data_type)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        if dtype is None or count * dtype.itemsize != tensor.length or tensor.offset + tensor.length > len(self._file):
            raise ManifestError(
                f"{SHARED_WEIGHTS_FILE}: tensor {tensor.name!r} does not fit the file as its graph describes it; "
                "export the model again"
            )
        key = (tensor.offset, tensor.dims, tensor.data_type)
        if key not in self._values:  # the same bytes named by both graphs become one value
            array = self._file[tensor.offset : tensor.offset + tensor.length].view(dtype).reshape(tensor.dims)
            self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
        return self._values[key]


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as handle:  # the mapping keeps its own reference to the file
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
