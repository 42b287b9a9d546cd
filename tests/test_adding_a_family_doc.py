"""docs/adding-a-family.md's hook table is the contract exporter/families/base.py has: every hook of
`Family` documented, none that it lacks, and the required ones (no default) marked required."""

from __future__ import annotations

import inspect
import re

from helpers import ROOT

from ortseq.exporter.families.base import Family

DOC = ROOT / "docs" / "adding-a-family.md"


def documented_hooks() -> dict[str, bool]:
    """Hook name -> marked required, from the table rows of the doc."""
    rows = re.findall(r"^\| `(\w+)` \| (yes|no) \|", DOC.read_text(), flags=re.MULTILINE)
    assert len(rows) == len({name for name, _ in rows}), "a hook is documented twice"
    return {name: required == "yes" for name, required in rows}


def family_hooks() -> dict[str, bool]:
    """Hook name -> required, from Family itself: its public methods (required: those that raise
    NotImplementedError) and class attributes (required: an empty default). Properties are the registry's
    facts (graphs/families.py), not hooks."""
    hooks = {}
    for name, value in vars(Family).items():
        if name.startswith("_") or isinstance(value, property):
            continue
        if inspect.isfunction(value):
            hooks[name] = "raise NotImplementedError" in inspect.getsource(value)
        else:
            hooks[name] = value == ""
    return hooks


def test_the_doc_table_lists_every_hook_of_the_family_contract_and_marks_the_required_ones():
    documented, actual = documented_hooks(), family_hooks()
    assert sorted(documented) == sorted(actual), "documented but not in base.py, or in base.py but not documented"
    wrongly_marked = sorted(name for name in actual if documented[name] != actual[name])
    assert not wrongly_marked, f"required marks that differ from base.py: {wrongly_marked}"
    assert {name for name, required in actual.items() if required} >= {"name", "concat_decoder_export"}
