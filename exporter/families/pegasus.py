"""Pegasus: pre-LayerNorm encoder-decoder with sinusoidal positions and scaled embeddings.

Everything ortseq knows about the Pegasus architecture lives here: how to load it, its dims and
special tokens, and the two export modules (encoder + cross K/V, one decoder step) built from the
transformers model's own weights. The graphs' I/O follows graphs/contract.py.
"""

from __future__ import annotations

import torch
from torch import nn

from ortseq.exporter.attention import additive_mask, attend, cross_attend_shared, merge_heads, split_heads
from ortseq.exporter.checkpoint_check import CheckpointLayout
from ortseq.graphs.manifest import ModelDims, SpecialTokens


def handles(config: dict) -> bool:
    return config.get("model_type") == "pegasus"


def load_model(source_dir: str) -> nn.Module:
    from transformers import PegasusForConditionalGeneration

    # a tensor of another shape is refused by name afterwards (checkpoint_check), not by a torch traceback
    return PegasusForConditionalGeneration.from_pretrained(
        source_dir, attn_implementation="eager", ignore_mismatched_sizes=True
    ).eval()


def checkpoint_layout(model: nn.Module) -> CheckpointLayout:
    """transformers 4.x: the encoder and decoder embed with the one `model.shared` module, tied or not
    (so an untied checkpoint stores it once); the LM head is that module too when tie_word_embeddings."""
    embeddings = {"model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}
    if model.config.tie_word_embeddings:
        embeddings.add("lm_head.weight")
    sinusoidal = "sinusoidal table computed from the config (4.x and 5.x alike)"
    return CheckpointLayout(
        tied=[frozenset(embeddings)],
        computed={f"model.{side}.embed_positions.weight": sinusoidal for side in ("encoder", "decoder")},
    )


def dims(model: nn.Module) -> ModelDims:
    config = model.config
    return ModelDims(
        d_model=config.d_model,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        decoder_heads=config.decoder_attention_heads,
        head_dim=config.d_model // config.decoder_attention_heads,
        vocab_size=model.lm_head.out_features,
        max_position_embeddings=config.max_position_embeddings,
    )


def special_tokens(model: nn.Module) -> SpecialTokens:
    gen = model.generation_config
    return SpecialTokens(
        pad_token_id=gen.pad_token_id if gen.pad_token_id is not None else model.config.pad_token_id,
        eos_token_id=_first(gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id),
        decoder_start_token_id=gen.decoder_start_token_id
        if gen.decoder_start_token_id is not None
        else model.config.decoder_start_token_id,
    )


def _first(token_id):
    return token_id[0] if isinstance(token_id, (list, tuple)) else token_id


def _self_attention(attn: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    q, k, v = (split_heads(proj(x), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    return attn.out_proj(merge_heads(attend(q, k, v, mask, attn.scaling)))


class EncoderExport(nn.Module):
    """input_ids, attention_mask -> last_hidden_state, cross-attention mask, cross K/V of every decoder layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.model.encoder
        self.cross_attentions = nn.ModuleList(layer.encoder_attn for layer in model.model.decoder.layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        enc = self.encoder
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = enc.embed_tokens(input_ids) * enc.embed_scale + enc.embed_positions.weight[positions]
        mask = additive_mask(attention_mask, x.dtype)
        for layer in enc.layers:
            x = x + _self_attention(layer.self_attn, layer.self_attn_layer_norm(x), mask)
            h = layer.final_layer_norm(x)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
        x = enc.layer_norm(x)
        return (x, attention_mask.clone(), *cross_key_values(self.cross_attentions, x))


def cross_key_values(cross_attentions: nn.ModuleList, memory: torch.Tensor) -> list[torch.Tensor]:
    """[k_0, v_0, k_1, v_1, ...]: every decoder layer's cross-attention K/V of the encoder output."""
    cross = []
    for attn in cross_attentions:
        cross += [split_heads(attn.k_proj(memory), attn.num_heads), split_heads(attn.v_proj(memory), attn.num_heads)]
    return cross


class DecoderExport(nn.Module):
    """One decoder step for every row; reorders the past by beam_idx itself (see graphs/contract.py)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.decoder = model.model.decoder
        self.lm_head = model.lm_head
        self.register_buffer("final_logits_bias", model.final_logits_bias.detach().clone(), persistent=False)
        self.num_layers = len(self.decoder.layers)

    def forward(self, input_ids, encoder_attention_mask, beam_idx, *past_and_cross):
        dec = self.decoder
        n = self.num_layers
        past, cross = past_and_cross[: 2 * n], past_and_cross[2 * n :]
        past_len = past[0].shape[2]
        positions = torch.arange(past_len, past_len + 1, device=input_ids.device)
        x = dec.embed_tokens(input_ids) * dec.embed_scale + dec.embed_positions.weight[positions]  # [rows, 1, D]
        cross_mask = additive_mask(encoder_attention_mask, x.dtype)
        presents = []
        for i, layer in enumerate(dec.layers):
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            q, k, v = (split_heads(proj(h), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            k = torch.cat([past[2 * i].index_select(0, beam_idx), k], dim=2)
            v = torch.cat([past[2 * i + 1].index_select(0, beam_idx), v], dim=2)
            presents += [k, v]
            x = x + attn.out_proj(merge_heads(attend(q, k, v, None, attn.scaling)))

            cross_attn = layer.encoder_attn
            h = layer.encoder_attn_layer_norm(x)
            q = split_heads(cross_attn.q_proj(h), cross_attn.num_heads)
            ctx = cross_attend_shared(q, cross[2 * i], cross[2 * i + 1], cross_mask, cross_attn.scaling)
            x = x + cross_attn.out_proj(merge_heads(ctx))

            h = layer.final_layer_norm(x)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
        x = dec.layer_norm(x)[:, 0, :]  # [rows, D]
        logits = nn.functional.linear(x, self.lm_head.weight) + self.final_logits_bias
        return (logits, *presents)
