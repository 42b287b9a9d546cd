"""Every tensor the exporter traces comes from the checkpoint's own files.

transformers 5.x does not always read checkpoints written by 4.x the way 4.x wrote them: an untied
Pegasus stores its token embedding once (`model.shared.weight`, the one module 4.x's encoder and
decoder shared), and 5.x leaves both `embed_tokens` randomly initialised; a `tie_encoder_decoder`
checkpoint stores the shared weights once and 5.x leaves the decoder's random. The loaded model
cannot tell, so this check reads the checkpoint FILES (safetensors, sharded or not, or
pytorch_model.bin) and, for every tensor of the model's state_dict:

  * takes the checkpoint's tensor of the same name, or of a name the writing version held as the
    same tensor (a family's `checkpoint_layout`: its ties, plus the model's own shared parameters);
  * copies it into the model where the loaded value differs (the mapping the writing version meant),
    then checks that every tensor equals its source (tied names with different stored values fail);
  * accepts an absent tensor when the layout says it is computed from the config, or when no exported
    graph reads it (one info line names it: an encoder's pooler, which generation never runs);
  * refuses anything else by name: a tensor a graph reads that is not in the checkpoint, or a tensor
    stored with another shape.

"Read by a graph" is derived from what is traced: the tensors the export modules hold (their parameters
and buffers, matched to the model's by storage, so a tied name counts), `tensors_held_by`.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import SourceError
from .progress import log


class CheckpointMismatchError(SourceError):
    """A tensor of the model is not in the checkpoint (nor explained), or is stored with another shape."""


@dataclass(frozen=True)
class CheckpointLayout:
    """What the transformers version that wrote a checkpoint meant by its tensor names.

    tied: groups of names that version held as ONE tensor; any member stored in the file gives them all.
    computed: names that may be absent because both versions compute them from the config -> why.
    """

    tied: list[frozenset[str]] = field(default_factory=list)
    computed: dict[str, str] = field(default_factory=dict)


class CheckpointFiles:
    """The tensors of a checkpoint folder by name, read lazily from its files."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}  # before _index(), which reads a .bin
        self._file_of = self._index()

    def _index(self) -> dict[str, Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.folder / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                return {name: self.folder / file for name, file in weight_map.items()}
        for file_name in ("model.safetensors", "pytorch_model.bin"):
            path = self.folder / file_name
            if path.is_file():
                return dict.fromkeys(self._names_in(path), path)
        raise CheckpointMismatchError(
            f"{self.folder}: no weights (model.safetensors, its sharded index, or pytorch_model.bin)"
        )

    def _names_in(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        return list(self._bin(path))

    def _bin(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bin_cache:
            # torch's legacy (pre-zip) serialization cannot be memory-mapped: read whole, as transformers does
            mmap = zipfile.is_zipfile(path)
            self._bin_cache[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        return self._bin_cache[path]

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names(self) -> list[str]:
        return list(self._file_of)

    def tensor(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        return self._bin(path)[name]


def read_checkpoint_tensors(folder: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Tensors by name from model.safetensors (sharded or not) or pytorch_model.bin; floating-point ones
    upcast to float32, as the model computes (families/base.py from_pretrained)."""
    files = CheckpointFiles(folder)
    missing = [name for name in names if name not in files]
    if missing:
        raise CheckpointMismatchError(f"{folder}: the checkpoint lacks {', '.join(missing)}")
    tensors = {name: files.tensor(name) for name in names}
    return {name: t.float() if t.is_floating_point() else t for name, t in tensors.items()}


def tensors_held_by(modules: Iterable[nn.Module], model: nn.Module) -> set[str]:
    """Names of model's state_dict tensors that the modules hold as parameters or buffers (the same
    storage, under any name): what graphs traced from those modules can read."""
    held = {(t.data_ptr(), tuple(t.shape)) for module in modules for t in (*module.parameters(), *module.buffers())}
    return {name for name, t in model.state_dict(keep_vars=True).items() if (t.data_ptr(), tuple(t.shape)) in held}


def load_checkpoint_tensors(
    model: nn.Module, folder: Path, layout: CheckpointLayout, read: Collection[str] | None = None
) -> None:
    """Make every state_dict tensor of model the checkpoint's own (see the module docstring).

    read: the names the exported graphs read (tensors_held_by); an absent tensor outside it is left as
    the loader made it, named in one info line. None: every tensor is read."""
    files = CheckpointFiles(folder)
    state = model.state_dict(keep_vars=True)
    sources = _sources(state, files, _tie_groups(model, layout))
    absent = [name for name in state if name not in sources and name not in layout.computed]
    unread = [name for name in absent if read is not None and name not in read]
    unexplained = [name for name in absent if name not in unread]
    wrong_shape = [
        f"{name} {tuple(files.tensor(source).shape)} (model {tuple(state[name].shape)})"
        for name, source in sources.items()
        if files.tensor(source).shape != state[name].shape
    ]
    if unexplained or wrong_shape:
        raise CheckpointMismatchError(_refusal(folder, unexplained, wrong_shape))
    taken = _copy_differing(state, sources, files)
    conflicting = [name for name, source in sources.items() if not _equal(state[name], files.tensor(source))]
    if conflicting:
        raise CheckpointMismatchError(
            f"{folder}: tensors the checkpoint's transformers version held as one are stored with different "
            f"values: {', '.join(conflicting)}"
        )
    if taken:
        log(f"{len(taken)} tensors the loader left different from the checkpoint taken from it: {', '.join(taken)}")
    if unread:
        log(f"not in the checkpoint and read by no exported graph (left as loaded): {', '.join(unread)}")


def _tie_groups(model: nn.Module, layout: CheckpointLayout) -> dict[str, set[str]]:
    """name -> every name held as the same tensor (the layout's ties and the model's shared parameters)."""
    groups: dict[str, set[str]] = {}
    shared: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), set()).add(name)
    for group in [*layout.tied, *shared.values()]:
        merged = set(group).union(*(groups.get(name, set()) for name in group))
        for name in merged:
            groups[name] = merged
    return groups


def _sources(state: dict, files: CheckpointFiles, groups: dict[str, set[str]]) -> dict[str, str]:
    """model name -> the checkpoint name its values come from: its own, else a tied name (sorted, so
    the choice is the same on every run)."""
    sources = {}
    for name in state:
        candidates = [name, *sorted(groups.get(name, set()) - {name})]
        source = next((candidate for candidate in candidates if candidate in files), None)
        if source is not None:
            sources[name] = source
    return sources


def _copy_differing(state: dict, sources: dict[str, str], files: CheckpointFiles) -> list[str]:
    taken = []
    with torch.no_grad():
        for name, source in sources.items():
            value = files.tensor(source)
            if not _equal(state[name], value):
                state[name].copy_(value.to(state[name].dtype))
                taken.append(name if name == source else f"{name} (from {source})")
    return taken


def _equal(tensor: torch.Tensor, stored: torch.Tensor) -> bool:
    return torch.equal(tensor.detach(), stored.to(tensor.dtype))


def _refusal(folder: Path, unexplained: list[str], wrong_shape: list[str]) -> str:
    parts = []
    if unexplained:
        parts.append(f"not in the checkpoint: {', '.join(unexplained)}")
    if wrong_shape:
        parts.append(f"stored with another shape: {', '.join(wrong_shape)}")
    return f"{folder}: the model's tensors must all come from the checkpoint; {'; '.join(parts)}"
