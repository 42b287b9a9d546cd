"""The tables an export stores once (graphs/contract.py's SHARED_WEIGHTS_FILE), loaded once: the token
embeddings of fp32 exports; in quantized ones the table in the format's own form (int8 rows and scales,
int4 blocks seen in two shapes, fp16) and the position tables (exporter/quantization/vocab_tables.py).

The file is mapped once, read-only, and every initializer the graphs keep there is handed to its
session as an OrtValue over those bytes (SessionOptions.add_initializer: on CPU onnxruntime uses the
caller's buffer, it does not copy). The mapping is shared through the page cache, so replicas of a
server process share it too.

Except the lookup tables (the manifest's lookup_tables: only token lookups read them, at the graph's
input_ids): on the CPU they live in an anonymous buffer that holds only the rows read so far, read from
the file before each run that looks them up (fill_rows). Through the mapping a few lookups made the whole
table resident: the kernel maps a large run of pages around each fault (measured: 64 random rows of the
mid-size int8 table, 49 MB, faulted 49 MB in), so real text's ids, spread over the vocabulary, held the
table in memory next to the LM head's packed copy of it. Rows once read stay: a long-running process
holds those its inputs used, at most the table.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..graphs.contract import SHARED_WEIGHTS_FILE
from ..graphs.external_data import external_initializers
from ..graphs.manifest import ManifestError

DONT_NEED = getattr(mmap, "MADV_DONTNEED", None)  # Linux and macOS; Windows has no madvise
NO_HUGE_PAGES = getattr(mmap, "MADV_NOHUGEPAGE", None)  # Linux: a row written must not fault in 2 MB
READS_ROWS = hasattr(os, "preadv")
# While a session is built, what prepacking reads in this long stays resident: ~12 MB at 0.5 ms here, 36 at 2 ms
RELEASE_INTERVAL_S = 0.0005

# onnx.TensorProto.DataType -> numpy dtype, for the types an export keeps in the shared file
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("u1"), 3: np.dtype("i1"), 10: np.dtype("<f2")}


class SharedWeights:
    """The shared file mapped once, and the OrtValues over it (they must outlive every session using them)."""

    def __init__(self, directory: Path, lookup_tables: Iterable[str] = ()):
        """lookup_tables: the manifest's, whose rows are read as lookups need them; none where the sessions
        copy their initializers (a GPU's: they need every row at once)."""
        path = Path(directory) / SHARED_WEIGHTS_FILE
        self._mapping = _map(path) if path.is_file() else None
        self._file = None if self._mapping is None else np.frombuffer(self._mapping, dtype=np.uint8)
        self._values: dict[tuple[int, tuple[int, ...], int, bool], ort.OrtValue] = {}
        self._lookup_tables = set(lookup_tables) if self._mapping is not None and READS_ROWS else set()
        self._rows = _RowsReadSoFar(path, len(self._file)) if self._lookup_tables else None

    def release_pages(self) -> None:
        """Drop this process's hold on the file's pages (they stay in the page cache).

        Building a session prepacks the LM head (fp32 Gemm, int8 QGemm, int4 MatMulNBits): onnxruntime
        reads the whole table once and keeps a packed copy of its own, which is what every step reads.
        The mapped pages read for that would stay in the resident set, a second copy of the table. The
        mapping is read-only and backed by the file, so nothing is lost: a page read again faults back
        in from the page cache. (Where lookups read the mapping, exports without lookup_tables, each
        faults a run of pages back in.)
        """
        if self._mapping is not None and DONT_NEED is not None:
            self._mapping.madvise(DONT_NEED)

    @contextmanager
    def pages_released_while(self, interval_s: float = RELEASE_INTERVAL_S):
        """Around building a session: release the file's pages every `interval_s` while it is built, and
        once more at the end.

        Released only at the end, every page the prepacking read was resident at once beside the packed
        copy it was making: the table twice at the peak of loading (mid-size fp32 export, d_model 512,
        96k vocabulary: 561 MiB during the decoder's build against 374 after it). Released as it goes,
        only what was read since the last release is. onnxruntime builds the session with the
        GIL released, so a thread can do this beside it.
        """
        if self._mapping is None or DONT_NEED is None:
            yield
            return
        built = threading.Event()

        def release_until_built():
            while not built.wait(interval_s):
                self.release_pages()

        releaser = threading.Thread(target=release_until_built, name="ortseq-release-pages", daemon=True)
        releaser.start()
        try:
            yield
        finally:
            built.set()
            releaser.join()
            self.release_pages()

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
        rows_on_demand = tensor.name in self._lookup_tables and len(tensor.dims) > 0 and tensor.dims[0] > 0
        key = (tensor.offset, tensor.dims, tensor.data_type, rows_on_demand)
        if key not in self._values:  # the same bytes named by both graphs become one value
            memory = self._rows.register(tensor.offset, tensor.length, tensor.dims[0]) if rows_on_demand else self._file
            array = memory[tensor.offset : tensor.offset + tensor.length].view(dtype).reshape(tensor.dims)
            self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
        return self._values[key]

    def fill_rows(self, ids: np.ndarray) -> None:
        """Before a run that looks up the token ids `ids`: read every lookup table's rows at them that are
        not read yet. Ids outside a table are left to onnxruntime's Gather to refuse."""
        if self._rows is not None:
            self._rows.fill(ids)


class _RowsReadSoFar:
    """An anonymous buffer laid out as the shared file (untouched pages cost nothing), holding the rows
    of the lookup tables read so far. Threads may fill at once: a row is marked read once written, and
    two threads writing one row write the same bytes."""

    def __init__(self, path: Path, size: int):
        self._buffer = mmap.mmap(-1, max(size, 1))
        if NO_HUGE_PAGES is not None:
            self._buffer.madvise(NO_HUGE_PAGES)
        self._memory = np.frombuffer(self._buffer, dtype=np.uint8)
        self._fd = os.open(path, os.O_RDONLY)
        self._tables: dict[tuple[int, int], np.ndarray] = {}  # (offset, row bytes) -> which rows are read

    def register(self, offset: int, length: int, rows: int) -> np.ndarray:
        """Register a table of `rows` rows at offset (while the sessions are built); returns the buffer
        (its bytes there fill as read)."""
        self._tables.setdefault((offset, length // rows), np.zeros(rows, dtype=bool))
        return self._memory

    def fill(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        for (offset, row_bytes), read in self._tables.items():
            inside = ids[(ids >= 0) & (ids < len(read))]
            missing = inside[~read[inside]]
            if not missing.size:  # most decoder steps: every row was read before
                continue
            missing = np.unique(missing)
            for first, last in _runs(missing):
                self._read(offset + first * row_bytes, (last + 1 - first) * row_bytes)
            read[missing] = True

    def _read(self, start: int, length: int) -> None:
        done = os.preadv(self._fd, [memoryview(self._buffer)[start : start + length]], start)
        if done != length:
            raise ManifestError(f"{SHARED_WEIGHTS_FILE} is shorter than its graphs say; export the model again")

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """Sorted distinct ids as (first, last) runs of consecutive ids: one read each."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1)
    firsts = np.concatenate([ids[:1], ids[breaks + 1]])
    lasts = np.concatenate([ids[breaks], ids[-1:]])
    return list(zip(firsts.tolist(), lasts.tolist()))


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as handle:  # the mapping keeps its own reference to the file
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
