"""The short names (aliases) the families declare, read without importing the families.

Each family declares its aliases in its own module (`aliases` of its class, exporter/families/); those
modules import torch, which takes seconds. `ortseq export --help` lists the aliases and a mistyped alias is
refused (`did you mean ...?`) before torch is imported, from the same declarations, read here as source
text. tests/test_cli.py checks that this reading equals `families.aliases()`.
"""

from __future__ import annotations

import ast
import difflib
import functools
import os
from pathlib import Path

from .errors import SourceError

FAMILIES_DIR = Path(__file__).resolve().parent / "families"


@functools.cache
def declared_aliases() -> dict[str, str]:
    """alias -> hub id or "tiny:KIND", from every family class's `aliases = {...}` (a literal dict)."""
    table: dict[str, str] = {}
    for module in sorted(FAMILIES_DIR.glob("*.py")):
        for node in ast.parse(module.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                table.update(_aliases_of(node))
    return table


def _aliases_of(family_class: ast.ClassDef) -> dict[str, str]:
    for statement in family_class.body:
        if isinstance(statement, ast.AnnAssign) and getattr(statement.target, "id", None) == "aliases":
            return ast.literal_eval(statement.value)
    return {}


def check_source_name(source: str) -> None:
    """Refuse a name that is neither an alias nor an existing path but close to an alias: a typo, not a hub id."""
    if source in declared_aliases() or Path(os.path.expanduser(source)).exists():
        return
    check_not_a_typo(source)


def check_not_a_typo(name: str) -> None:
    """A name close to an alias is a typo, not a hub id: say so before minutes of hub time-outs."""
    close = difflib.get_close_matches(name, declared_aliases(), n=1, cutoff=0.8)
    if "/" not in name and close:
        listed = ", ".join(sorted(declared_aliases()))
        raise SourceError(f"{name!r} is not an alias: did you mean {close[0]!r}? (aliases: {listed})")
