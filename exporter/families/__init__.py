"""The model families ortseq exports, one module each; `family_for` picks one from a checkpoint's config.json.

The contract every family implements is exporter/families/base.py (`Family`: each hook, its default).
Adding a family: its module here (a `Family` subclass, or a subclass of its nearest relative), one
line in FAMILIES, its tiny builder under exporter/tiny/, its tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .bart import BartFamily
from .base import Family, UnsupportedModelError, most_specific
from .encoder_decoder import EncoderDecoderFamily
from .lsg_pegasus import LSGPegasusFamily
from .pegasus import PegasusFamily

__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "aliases", "family_for", "family_named", "tiny_builder"]

# Order does not matter: when several families handle a checkpoint, the most specific one (a
# subclass of the others) exports it.
FAMILIES: tuple[Family, ...] = (BartFamily(), PegasusFamily(), LSGPegasusFamily(), EncoderDecoderFamily())


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
