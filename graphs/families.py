"""The model families ortseq exports and runs: the one registry the exporter and the runtime both read.

An entry is a family's manifest name (the `family` string of manifest.json: once exports exist it never
changes) and what the runtime must know about that family's exports. The exporter's side of a family
lives in exporter/families/NAME.py (dashes in NAME as underscores): the `Family` subclass whose `name`
is NAME (exporter/families/__init__.py finds it there). Registering a family is its entry here; every
list of families elsewhere (the exporter's, the manifest check, the test suites) is read from REGISTRY.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegisteredFamily:
    name: str  # the manifest's `family` string
    description: str  # the architectures it covers, for people reading a manifest or an error
    # whether its exports may carry ORT's BeamSearch-op graph (exporter/beam_search_op.py)
    beam_search_op: bool = False

    @property
    def exporter_module(self) -> str:
        """The module under exporter/families/ that exports this family."""
        return self.name.replace("-", "_")


REGISTRY: tuple[RegisteredFamily, ...] = (
    RegisteredFamily("bart", "BART (BartForConditionalGeneration)"),
    RegisteredFamily("pegasus", "Pegasus (PegasusForConditionalGeneration)", beam_search_op=True),
    # lsg_pegasus and encoder-decoder: their encoders' I/O differ from the op's subgraph (not done)
    RegisteredFamily("lsg_pegasus", "LSG-Pegasus (Pegasus with a Local + Sparse + Global encoder)"),
    RegisteredFamily("encoder-decoder", "EncoderDecoderModel of BERT, RoBERTa or BertGeneration stacks"),
    RegisteredFamily("marian", "MarianMT (MarianMTModel), one vocabulary for both sides"),
)
NAMES: tuple[str, ...] = tuple(family.name for family in REGISTRY)


class UnknownFamilyError(ValueError):
    """A family name this ortseq does not know."""


def registered(name: str) -> RegisteredFamily:
    """The registry entry called name."""
    for family in REGISTRY:
        if family.name == name:
            return family
    raise UnknownFamilyError(f"no family called {name!r}; known: {sorted(NAMES)}")
