"""One small module per model family; `family_for` picks it from the checkpoint's config.json.

A family module provides: handles(config dict) -> bool, load_model(dir), dims(model),
special_tokens(model), and the export modules EncoderExport(model) / DecoderExport(model)
following graphs/contract.py. Optional hooks (exporter/pipeline.py uses them when present):
encoder_trace_length(model), encoder_verify_lengths(model) (extra source lengths to check), and
finalize_encoder_graph(encoder_module, onnx_model) (e.g. to add a custom op's ONNX function).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from ortseq.exporter.families import encoder_decoder, lsg_pegasus, pegasus

# The first family whose handles(config) is true exports the checkpoint: specific before generic.
FAMILIES: dict[str, ModuleType] = {"lsg_pegasus": lsg_pegasus, "pegasus": pegasus, "encoder-decoder": encoder_decoder}


class UnsupportedModelError(ValueError):
    """The checkpoint is of an architecture ortseq cannot export (yet)."""


def family_for(checkpoint: Path) -> tuple[str, ModuleType]:
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    for name, family in FAMILIES.items():
        if family.handles(config):
            return name, family
    raise UnsupportedModelError(
        f"{checkpoint}: model_type {config.get('model_type', '?')!r} is not supported; supported families: "
        f"{sorted(FAMILIES)}"
    )
