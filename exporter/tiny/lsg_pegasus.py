"""tiny-lsg-pegasus: a small random LSG-Pegasus checkpoint, built locally and offline.

It is tiny-pegasus (exporter/tiny/pegasus.py: same sentencepiece tokenizer trained on the spot) with a
1024-token position table, the LSG config keys and the two tensors an LSG checkpoint adds, laid
out as lsg-converter saves them: ``model.encoder.global_embeddings.weight`` (512 rows) and the
encoder's ``model.encoder.embed_positions.weight``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ...graphs.lsg import GLOBALS_KEY, POSITIONS_KEY
from ..progress import log
from .pegasus import TinyPegasusShape, build_tiny_pegasus

TINY_LSG_SHAPE = replace(TinyPegasusShape(), max_position_embeddings=1024)
# ccdv/lsg-pegasus-large-4096's LSG keys, with blocks small enough for a tiny model.
TINY_LSG_KEYS = dict(
    block_size=32, sparse_block_size=32, sparsity_factor=2, sparsity_type="norm", num_global_tokens=1,
    pass_global_tokens_to_decoder=True, pool_with_global=True, mask_first_token=False, adaptive=True,
    lsh_num_pre_rounds=1,
)  # fmt: skip


def build_tiny_lsg_pegasus(out_dir: Path, seed: int = 0, **lsg_keys) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    build_tiny_pegasus(out_dir, TINY_LSG_SHAPE, seed=seed)
    log(f"turning {out_dir} into tiny-lsg-pegasus")
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.update(TINY_LSG_KEYS, **lsg_keys)
    config_path.write_text(json.dumps(config, indent=2))

    weights_path = out_dir / "model.safetensors"
    weights = load_file(weights_path)
    from transformers import PegasusForConditionalGeneration

    model = PegasusForConditionalGeneration.from_pretrained(str(out_dir))
    generator = torch.Generator().manual_seed(seed + 1)
    d_model = config["d_model"]
    # Globals get no sqrt(d_model) scaling in the reference, so draw them at the scale of scaled embeddings.
    scale = TINY_LSG_SHAPE.init_std * d_model**0.5
    weights[GLOBALS_KEY] = torch.randn(512, d_model, generator=generator) * scale
    weights[POSITIONS_KEY] = model.model.encoder.embed_positions.weight.detach().clone()
    save_file(weights, weights_path, metadata={"format": "pt"})
    return out_dir
