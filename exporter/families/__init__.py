"""One small module per model family; `family_for` picks it from the checkpoint's config.json.

A family module provides: load_model(dir), dims(model), special_tokens(model), and the export
modules EncoderExport(model) / DecoderExport(model) following graphs/contract.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from exporter.families import encoder_decoder, pegasus

# config.json "model_type" -> family module
_BY_MODEL_TYPE: dict[str, ModuleType] = {"pegasus": pegasus, "encoder-decoder": encoder_decoder}


class UnsupportedModelError(ValueError):
    """The checkpoint is of an architecture ortseq cannot export (yet)."""


def family_for(checkpoint: Path) -> tuple[str, ModuleType]:
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    model_type = config.get("model_type", "?")
    if model_type not in _BY_MODEL_TYPE:
        raise UnsupportedModelError(
            f"{checkpoint}: model_type {model_type!r} is not supported; supported: {sorted(_BY_MODEL_TYPE)}"
        )
    return model_type, _BY_MODEL_TYPE[model_type]
