"""The model families ortseq exports, one module each; `family_for` picks one from a checkpoint's config.json.

The contract every family implements is exporter/families/base.py (`Family`: each hook, its default).
Which families exist is graphs/families.py's registry: the family registered as NAME is the `Family`
subclass called NAME in the module NAME here (docs/adding-a-family.md walks through adding one).
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path

from ...graphs.families import REGISTRY, RegisteredFamily
from .base import Family, UnsupportedModelError, most_specific

__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "aliases", "family_for", "family_named", "tiny_builder"]


def exporter_family(entry: RegisteredFamily) -> Family:
    """The Family of a registry entry: the subclass whose `name` is entry.name in its exporter module."""
    module = importlib.import_module(f".{entry.exporter_module}", __name__)
    classes = [
        value
        for value in vars(module).values()
        if inspect.isclass(value) and issubclass(value, Family) and value.name == entry.name
    ]
    if len(classes) != 1:
        raise ImportError(
            f"family {entry.name!r} is registered (graphs/families.py) but {module.__name__} defines "
            f"{len(classes)} Family subclasses named {entry.name!r}, not one"
        )
    return classes[0]()


# Order does not matter: when several families handle a checkpoint, the most specific one (a
# subclass of the others) exports it.
FAMILIES: tuple[Family, ...] = tuple(exporter_family(entry) for entry in REGISTRY)


def family_for(checkpoint: Path) -> Family:
    """The family that exports the checkpoint folder, from its config.json."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    matching = [family for family in FAMILIES if family.handles(config)]
    if not matching:
        raise UnsupportedModelError(
            f"{checkpoint}: model_type {config.get('model_type', '?')!r} is not supported; supported families: "
            f"{sorted(family.name for family in FAMILIES)}"
        )
    return most_specific(matching)


def family_named(name: str) -> Family:
    """The family whose manifest string is name."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnsupportedModelError(f"no family called {name!r}; known: {sorted(family.name for family in FAMILIES)}")


def aliases() -> dict[str, str]:
    """Every family's short names -> hub id or "tiny:KIND"."""
    table: dict[str, str] = {}
    for family in FAMILIES:
        clashes = table.keys() & family.aliases.keys()
        if clashes:
            raise ValueError(f"aliases {sorted(clashes)} are declared by two families")
        table.update(family.aliases)
    return table


def tiny_builder(kind: str) -> Callable[[Path], Path]:
    """builder(out_dir) -> checkpoint folder of the tiny model "tiny:KIND"."""
    builders = {name: build for family in FAMILIES for name, build in family.tiny_builders().items()}
    if kind not in builders:
        raise ValueError(f"no tiny model called {kind!r}; known: {sorted(builders)}")
    return builders[kind]
