"""Pegasus: BART with another layout (pre-LayerNorm, sinusoidal positions, scaled embeddings).

PegasusFamily states only what differs from BART (exporter/families/bart.py): sinusoidal positions
(a fixed table, no offset), no layernorm_embedding, pre-LayerNorm layers with a final LayerNorm
after each stack, embeddings scaled by sqrt(d_model) outside the embedding module; its decoder
starts with the pad token (its configs say so, and special_tokens reads them). It is also the one
family whose modules ORT's BeamSearch op is built over (exporter/beam_search_op.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from ..tiny.pegasus import build_tiny_pegasus
from ..tiny.trained import build_trained_tiny_pegasus
from .bart import BartFamily, Layout, cross_key_values

__all__ = ["PEGASUS_LAYOUT", "PegasusFamily", "cross_key_values"]

PEGASUS_LAYOUT = Layout(
    sinusoidal_positions=True,
    position_offset=0,
    embedding_layer_norm=False,
    pre_layer_norm=True,
    final_layer_norm=True,
    scale_outside_embedding=True,
)


class PegasusFamily(BartFamily):
    """Pegasus (PegasusForConditionalGeneration)."""

    name: ClassVar[str] = "pegasus"
    aliases: ClassVar[dict[str, str]] = {
        "pegasus-xsum": "google/pegasus-xsum",
        "pegasus-large": "google/pegasus-large",
        "tiny-pegasus": "tiny:pegasus",
        "tiny-pegasus-trained": "tiny:pegasus-trained",  # trained on a synthetic task (exporter/tiny/trained.py)
    }
    model_type: ClassVar[str] = "pegasus"
    model_class: ClassVar[str] = "PegasusForConditionalGeneration"
    layout: ClassVar[Layout] = PEGASUS_LAYOUT

    trained_tiny_kinds: ClassVar[tuple[str, ...]] = ("pegasus-trained",)

    def tiny_builders(self) -> dict[str, Callable[[Path], Path]]:
        return {"pegasus": build_tiny_pegasus, "pegasus-trained": build_trained_tiny_pegasus}
