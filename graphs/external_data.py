"""Which files an ONNX graph's tensors keep their data in (external data `location` entries).

onnxruntime opens those files relative to the graph when it creates a session, so they must be checked
before: only files listed (and hashed) in manifest.json may be named. The runtime has no `onnx` package,
so this reads the protobuf wire format itself, visiting only the messages that can hold tensors and
skipping everything else (raw weights included) by length: a 2 GB graph is not read into memory.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

from .manifest import Manifest, ManifestError

# message -> {field number: message type it holds}, from onnx.proto; only paths that can reach a TensorProto
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _FUNCTION, _ENTRY = range(8)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _FUNCTION: {7: _NODE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {13: _ENTRY},
}
_MAX_DEPTH = 64  # nested subgraphs; deeper is a corrupted (or hostile) file


class GraphFormatError(ValueError):
    """The file is not a readable ONNX protobuf."""


def external_data_files(path: Path) -> set[str]:
    """The `location` of every tensor stored outside the graph file at path."""
    with open(path, "rb") as handle:
        if Path(path).stat().st_size == 0:
            raise GraphFormatError(f"{path} is empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            locations: set[str] = set()
            _visit(data, 0, len(data), _MODEL, locations, 0)
            return locations


def _visit(data, start: int, end: int, kind: int, locations: set[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise GraphFormatError("subgraphs nested too deeply")
    children = _CHILDREN.get(kind, {})
    for field, wire, value_start, value_end in _fields(data, start, end):
        if kind == _TENSOR and field == 13:
            key, value = _entry(data, value_start, value_end)
            if key == "location":
                locations.add(value)
        elif wire == 2 and field in children:
            _visit(data, value_start, value_end, children[field], locations, depth + 1)


def _entry(data, start: int, end: int) -> tuple[str, str]:
    """A StringStringEntryProto: key (1), value (2)."""
    entry = {field: bytes(data[a:b]).decode("utf-8", "replace") for field, wire, a, b in _fields(data, start, end)}
    return entry.get(1, ""), entry.get(2, "")


def _fields(data, position: int, end: int):
    """(field number, wire type, value start, value end) of each field of the message in data[position:end]."""
    while position < end:
        key, position = _varint(data, position, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(data, position, end)
        elif wire == 1:
            after = position + 8
        elif wire == 2:
            length, position = _varint(data, position, end)
            after = position + length
        elif wire == 5:
            after = position + 4
        else:
            raise GraphFormatError(f"unsupported protobuf wire type {wire}")
        if after > end or field == 0:
            raise GraphFormatError("truncated or corrupted protobuf")
        yield field, wire, position, after
        position = after


def _varint(data, position: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= end or shift > 63:
            raise GraphFormatError("truncated or corrupted protobuf")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def check_graph_data(directory: Path, manifest: Manifest) -> None:
    """ManifestError unless every graph the runtime opens keeps its tensors in files manifest.json lists."""
    for name in manifest.runtime_files():
        if not name.endswith(".onnx"):
            continue
        path = Path(directory) / name
        try:
            locations = external_data_files(path)
        except (GraphFormatError, OSError) as exc:
            raise ManifestError(f"{path} is not a readable ONNX graph ({exc}); export the model again") from exc
        unlisted = sorted(location for location in locations if location not in manifest.files)
        if unlisted:
            raise ManifestError(
                f"{path} keeps tensor data in {unlisted}, which manifest.json does not list; export the model again"
            )


@dataclass(frozen=True)
class ExternalTensor:
    """An initializer whose bytes are in another file: where, and what they hold."""

    name: str
    location: str
    offset: int
    length: int
    dims: tuple[int, ...]
    data_type: int  # onnx.TensorProto.DataType


def external_initializers(path: Path) -> list[ExternalTensor]:
    """The graph's initializers (top-level graph only) that keep their data in another file."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        found = []
        for field, wire, start, end in _fields(data, 0, len(data)):
            if field != 7 or wire != 2:  # ModelProto.graph
                continue
            for graph_field, graph_wire, a, b in _fields(data, start, end):
                if graph_field == 5 and graph_wire == 2:  # GraphProto.initializer
                    tensor = _external_tensor(data, a, b)
                    if tensor is not None:
                        found.append(tensor)
        return found


def _external_tensor(data, start: int, end: int) -> ExternalTensor | None:
    """A TensorProto: dims (1), data_type (2), name (8), external_data (13), data_location (14, 1 = external)."""
    dims: list[int] = []
    scalars: dict[int, int] = {}
    name, entries = "", {}
    for field, wire, a, b in _fields(data, start, end):
        if field == 1 and wire == 2:  # packed dims
            position = a
            while position < b:
                value, position = _varint(data, position, b)
                dims.append(value)
        elif field in (1, 2, 14) and wire == 0:
            value, _ = _varint(data, a, b)
            if field == 1:
                dims.append(value)
            else:
                scalars[field] = value
        elif field == 8 and wire == 2:
            name = bytes(data[a:b]).decode("utf-8", "replace")
        elif field == 13 and wire == 2:
            key, value = _entry(data, a, b)
            entries[key] = value
    if scalars.get(14) != 1 or "location" not in entries:
        return None
    try:
        return ExternalTensor(
            name, entries["location"], int(entries.get("offset", 0)), int(entries["length"]), tuple(dims), scalars[2]
        )
    except (KeyError, ValueError) as exc:
        raise GraphFormatError(f"tensor {name!r} has incomplete external data ({exc})") from exc
