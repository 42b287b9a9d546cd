"""What every tiny random model needs so that a parity test can fail: outputs that depend on the input.

Random init makes a decoder repeat one token (its largest-norm embedding) whatever the input, and end
every hypothesis at the same step. Equal-norm embedding rows and sharper cross-attention make the
tokens depend on the input, so that a wrong mask, position or cache entry changes the output; stronger
decoder positions keep a step from repeating the last one; an EOS logit bias makes hypotheses end at
varied lengths. A family's tiny module names its model's pieces (`bart_lineage_parts` for BART's
relatives) and calls `make_outputs_input_dependent` once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch


@dataclass
class TinyModelParts:
    """The tensors of a random model that make_outputs_input_dependent sharpens."""

    embeddings: list[torch.Tensor]  # token embedding tables: rows rescaled to the mean norm
    cross_attention: list[tuple[torch.Tensor, torch.Tensor]]  # each decoder layer's cross query/key weights
    eos_logit_bias: torch.Tensor  # the LM head's bias (any shape ending in the vocabulary)
    eos_token_id: int
    positions: list[torch.Tensor] = field(default_factory=list)  # position tables to scale by position_gain


def bart_lineage_parts(model) -> TinyModelParts:
    """The parts of a BART-like transformers model (BART, Pegasus, Marian: exporter/families/bart.py)."""
    decoder_layers = model.model.decoder.layers
    return TinyModelParts(
        embeddings=[model.model.shared.weight],
        cross_attention=[
            (layer.encoder_attn.q_proj.weight, layer.encoder_attn.k_proj.weight) for layer in decoder_layers
        ],
        eos_logit_bias=model.final_logits_bias,
        eos_token_id=model.config.eos_token_id,
    )


def make_outputs_input_dependent(
    parts: TinyModelParts, eos_logit_bias: float, cross_attention_gain: float = 3.0, position_gain: float = 1.0
) -> None:
    """Sharpen parts in place (see the module docstring)."""
    with torch.no_grad():
        for table in _unique(parts.embeddings):
            norms = table.norm(dim=1, keepdim=True)
            table.mul_(norms.mean() / norms.clamp_min(1e-6))  # the pad row stays zero
        for query, key in parts.cross_attention:
            query.mul_(cross_attention_gain)
            key.mul_(cross_attention_gain)
        for table in parts.positions:
            table.mul_(position_gain)
        parts.eos_logit_bias[..., parts.eos_token_id] += eos_logit_bias


# A likelier end token: twice the model's EOS bias, within these bounds: 6 is the least Pegasus' parity
# models discriminate with; at 18 BART's tied cnn layout (9 on its own) ends every row at the first
# step, at 11 its rows end at varied steps
PEAKED_EOS_LOGIT_BIAS_RANGE = (6.0, 11.0)


def peaked(shape):
    """The same tiny model (any family's shape with an `eos_logit_bias`) with a likelier end token.

    Some searches need hypotheses that end well before the maximum to decide anything: a length
    penalty of 2, or early_stopping="never", favour running to the maximum so strongly that on the
    plain tiny models every hypothesis does, with or without the setting. Twice the EOS bias (within
    PEAKED_EOS_LOGIT_BIAS_RANGE) ends some of them early, and a shape's `min_length` (a
    generation config's, which forbids the end token until then) is dropped: steps that must not end
    cost as much whatever the length, so a length penalty of 2 would still favour the maximum. The
    weights are those of `shape` built with the same seed."""
    low, high = PEAKED_EOS_LOGIT_BIAS_RANGE
    changes = {"eos_logit_bias": min(max(2 * shape.eos_logit_bias, low), high)}
    if hasattr(shape, "min_length"):
        changes["min_length"] = 0
    return replace(shape, **changes)


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor once (tied tables are one tensor: rescaling it twice is the same, but say so)."""
    seen, unique = set(), []
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique.append(tensor)
    return unique
