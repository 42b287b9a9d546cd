"""BART, and the base of its relatives: an encoder-decoder of attention + feed-forward layers.

BartFamily holds what BART-like models share (loading, dims, special tokens, and the two export
modules built from the transformers model's own weights, graph I/O as graphs/contract.py says);
`Layout` holds where relatives differ inside the layers. BART itself: learned positions whose table
starts 2 rows in, `layernorm_embedding` after the embeddings, post-LayerNorm layers (LayerNorm after
each residual add), no final LayerNorm, embeddings scaled inside the embedding module when
`scale_embedding` is set, `final_logits_bias` added to the (tied or untied) LM head.
PegasusFamily(BartFamily) states Pegasus' differences (exporter/families/pegasus.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ...graphs.manifest import ModelDims, SpecialTokens
from ..attention import (
    DMMHA,
    StaticCacheDecoderStep,
    additive_mask,
    attend,
    encoder_self_attention,
    merge_heads,
    split_heads,
)
from ..checkpoint_check import CheckpointLayout
from ..shared_weights import lm_head_logits
from ..tiny.bart import build_tiny_bart
from ..tiny.trained import build_trained_tiny_bart
from .base import Family, from_pretrained


@dataclass(frozen=True)
class Layout:
    """Where BART's relatives differ inside the stacks."""

    sinusoidal_positions: bool  # the position tables are computed from the config, never taken from the files
    position_offset: int  # rows of the position table before position 0 (BART's learned table: 2)
    embedding_layer_norm: bool  # layernorm_embedding after token + position embeddings
    pre_layer_norm: bool  # LayerNorm before each sublayer (x + f(norm(x))) or after the add (norm(x + f(x)))
    final_layer_norm: bool  # encoder.layer_norm / decoder.layer_norm after the last layer
    scale_outside_embedding: bool  # token embeddings * side.embed_scale (else the embedding module scales)


BART_LAYOUT = Layout(
    sinusoidal_positions=False,
    position_offset=2,
    embedding_layer_norm=True,
    pre_layer_norm=False,
    final_layer_norm=False,
    scale_outside_embedding=False,
)


class BartFamily(Family):
    """BART (BartForConditionalGeneration): bart-large-cnn, distilbart, any local folder."""

    name: ClassVar[str] = "bart"
    aliases: ClassVar[dict[str, str]] = {
        "bart-large-cnn": "facebook/bart-large-cnn",
        "distilbart-cnn": "sshleifer/distilbart-cnn-12-6",
        "tiny-bart": "tiny:bart",
        "tiny-bart-trained": "tiny:bart-trained",  # trained on a synthetic task (exporter/tiny/trained.py)
    }
    model_type: ClassVar[str] = "bart"
    model_class: ClassVar[str] = "BartForConditionalGeneration"
    layout: ClassVar[Layout] = BART_LAYOUT
    trained_tiny_kinds: ClassVar[tuple[str, ...]] = ("bart-trained",)

    def handles(self, config: dict) -> bool:
        return config.get("model_type") == self.model_type

    def load_model(self, source_dir: str) -> nn.Module:
        import transformers

        model_class = getattr(transformers, self.model_class)
        # a tensor of another shape is refused by name afterwards (checkpoint_check), not by a torch traceback
        return from_pretrained(model_class, source_dir, attn_implementation="eager", ignore_mismatched_sizes=True)

    def checkpoint_layout(self, model: nn.Module) -> CheckpointLayout:
        """What the layout says of the files. transformers 4.x: the encoder and decoder embed with the one
        `model.shared` module, tied or not (so a checkpoint may store it once, as bart-large-cnn does); the
        LM head is that module too when tie_word_embeddings. Sinusoidal position tables are computed from
        the config (4.x and 5.x alike); final_logits_bias is a buffer of zeros where a checkpoint has none."""
        embeddings = {"model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}
        if model.config.tie_word_embeddings:
            embeddings.add("lm_head.weight")
        computed = {"final_logits_bias": "zeros unless stored (transformers' initial value; released checkpoints)"}
        if self.layout.sinusoidal_positions:
            sinusoidal = "sinusoidal table computed from the config (4.x and 5.x alike)"
            computed.update({f"model.{side}.embed_positions.weight": sinusoidal for side in ("encoder", "decoder")})
        return CheckpointLayout(tied=[frozenset(embeddings)], computed=computed)

    def model_attributes(self, model: nn.Module) -> tuple[str, ...]:
        """What EncoderExport and DecoderExport below read of transformers' model (ATTRIBUTES, by layout)."""
        return model_attributes(self.layout)

    def dims(self, model: nn.Module) -> ModelDims:
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

    def special_tokens(self, model: nn.Module) -> SpecialTokens:
        gen = model.generation_config
        return SpecialTokens(
            pad_token_id=gen.pad_token_id if gen.pad_token_id is not None else model.config.pad_token_id,
            eos_token_id=_first(gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id),
            decoder_start_token_id=gen.decoder_start_token_id
            if gen.decoder_start_token_id is not None
            else model.config.decoder_start_token_id,
        )

    def encoder_export(self, model: nn.Module, fused: bool = True) -> nn.Module:
        return EncoderExport(model, self.layout, fused)

    def decoder_export(self, model: nn.Module, body: str = DMMHA) -> nn.Module:
        return DecoderExport(model, self.layout, body)

    def concat_decoder_export(self, model: nn.Module) -> nn.Module:
        return ConcatDecoderExport(model, self.layout)

    def tiny_builders(self) -> dict[str, Callable[[Path], Path]]:
        return {"bart": build_tiny_bart, "bart-trained": build_trained_tiny_bart}


# The attributes of transformers' BART-like model the export modules read ("[]": every layer), by Layout:
#   model.shared, model.{encoder,decoder}.embed_tokens    token embeddings (one module in 4.x; may be tied)
#   model.{side}.embed_positions.weight                   position table, indexed at position + position_offset
#   model.{side}.embed_scale                              scale_outside_embedding: the embeddings' factor
#   model.{side}.layernorm_embedding                      embedding_layer_norm
#   model.{side}.layer_norm                               final_layer_norm
#   model.{side}.layers[].self_attn.{q,k,v,out}_proj, .num_heads, .scaling   self-attention
#   model.decoder.layers[].encoder_attn.{q,k,v,out}_proj, .num_heads, .scaling  cross-attention
#   model.{side}.layers[].{self_attn_layer_norm, final_layer_norm, fc1, fc2, activation_fn}
#   model.decoder.layers[].encoder_attn_layer_norm
#   lm_head.weight, final_logits_bias                     the LM head (tied or not) and its bias buffer
_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "scaling")
_LAYER = ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2", "activation_fn")


def model_attributes(layout: Layout) -> tuple[str, ...]:
    """The table above as dotted paths, for a model of this layout."""
    paths = ["model.shared", "lm_head.weight", "final_logits_bias"]
    for side in ("encoder", "decoder"):
        stack = f"model.{side}"
        paths += [f"{stack}.embed_tokens", f"{stack}.embed_positions.weight"]
        paths += [f"{stack}.embed_scale"] if layout.scale_outside_embedding else []
        paths += [f"{stack}.layernorm_embedding"] if layout.embedding_layer_norm else []
        paths += [f"{stack}.layer_norm"] if layout.final_layer_norm else []
        paths += [f"{stack}.layers[].self_attn.{name}" for name in _ATTENTION]
        paths += [f"{stack}.layers[].{name}" for name in _LAYER]
    paths += [f"model.decoder.layers[].encoder_attn.{name}" for name in _ATTENTION]
    paths += ["model.decoder.layers[].encoder_attn_layer_norm"]
    return tuple(paths)


def _first(token_id):
    return token_id[0] if isinstance(token_id, (list, tuple)) else token_id


def embed(side: nn.Module, layout: Layout, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token + position embeddings of one stack (encoder or decoder), as its layout combines them."""
    x = side.embed_tokens(input_ids)
    if layout.scale_outside_embedding:
        x = x * side.embed_scale
    x = x + side.embed_positions.weight[positions + layout.position_offset]
    return side.layernorm_embedding(x) if layout.embedding_layer_norm else x


def residual(layout: Layout, norm: nn.Module, x: torch.Tensor, sublayer: Callable) -> torch.Tensor:
    """One residual block: pre-LN x + f(norm(x)), or post-LN norm(x + f(x))."""
    if layout.pre_layer_norm:
        return x + sublayer(norm(x))
    return norm(x + sublayer(x))


def _self_attention(attn: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor, fused: bool) -> torch.Tensor:
    q, k, v = (proj(x) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    return attn.out_proj(encoder_self_attention(q, k, v, attention_mask, attn.num_heads, attn.scaling, fused))


def _feed_forward(layer: nn.Module) -> Callable:
    return lambda h: layer.fc2(layer.activation_fn(layer.fc1(h)))


def cross_key_values(
    cross_attentions: nn.ModuleList, memory: torch.Tensor, linear: Callable = nn.Linear.__call__
) -> list[torch.Tensor]:
    """[k_0, v_0, k_1, v_1, ...]: every decoder layer's cross-attention K/V of the encoder output.

    linear(projection, x) applies a projection (LSG passes exporter/conv_linear.py's form)."""
    cross = []
    for attn in cross_attentions:
        cross += [split_heads(linear(proj, memory), attn.num_heads) for proj in (attn.k_proj, attn.v_proj)]
    return cross


class EncoderExport(nn.Module):
    """input_ids, attention_mask -> last_hidden_state, cross-attention mask, cross K/V of every decoder layer."""

    def __init__(self, model: nn.Module, layout: Layout, fused: bool = True):
        super().__init__()
        self.encoder = model.model.encoder
        self.cross_attentions = nn.ModuleList(layer.encoder_attn for layer in model.model.decoder.layers)
        self.layout, self.fused = layout, fused

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        enc, layout = self.encoder, self.layout
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = embed(enc, layout, input_ids, positions)
        for layer in enc.layers:
            attention = functools.partial(
                _self_attention, layer.self_attn, attention_mask=attention_mask, fused=self.fused
            )
            x = residual(layout, layer.self_attn_layer_norm, x, attention)
            x = residual(layout, layer.final_layer_norm, x, _feed_forward(layer))
        if layout.final_layer_norm:
            x = enc.layer_norm(x)
        return (x, attention_mask.clone(), *cross_key_values(self.cross_attentions, x))


class DecoderExport(StaticCacheDecoderStep):
    """One decoder step for every row, decoder contract 0.3 (graphs/contract.py): self-attention K/V in
    the static cache, written in place at past_sequence_length and read through the cache indirection;
    the self-attention is `body` (exporter/attention.py: DMMHA or plain ONNX)."""

    def __init__(self, model: nn.Module, layout: Layout, body: str = DMMHA):
        super().__init__()
        self.decoder = model.model.decoder
        self.lm_head = model.lm_head
        # the model's own tensor (not a copy), so that checkpoint_check counts it as read by the graph
        self.register_buffer("final_logits_bias", model.final_logits_bias.detach(), persistent=False)
        self.num_layers = len(self.decoder.layers)
        self.layout = layout
        self.body = body

    @staticmethod
    def project(attn: nn.Module, h: torch.Tensor):
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), attn.num_heads, attn.scaling

    @staticmethod
    def finish(attn: nn.Module, context: torch.Tensor) -> torch.Tensor:
        return attn.out_proj(context)

    def step(self, input_ids, positions, encoder_attention_mask, cross, self_attention: Callable) -> torch.Tensor:
        """The logits of one step; self_attention(layer index, attention module, h) -> its output [rows, 1, D]."""
        dec, layout = self.decoder, self.layout
        x = embed(dec, layout, input_ids, positions)  # [rows, 1, D]
        cross_mask = additive_mask(encoder_attention_mask, x.dtype)
        for i, layer in enumerate(dec.layers):

            def cross_attention(h, attn=layer.encoder_attn, i=i):
                q = split_heads(attn.q_proj(h), attn.num_heads)
                return attn.out_proj(
                    merge_heads(self.cross_attend(q, cross[2 * i], cross[2 * i + 1], cross_mask, attn.scaling))
                )

            x = residual(layout, layer.self_attn_layer_norm, x, functools.partial(self_attention, i, layer.self_attn))
            x = residual(layout, layer.encoder_attn_layer_norm, x, cross_attention)
            x = residual(layout, layer.final_layer_norm, x, _feed_forward(layer))
        if layout.final_layer_norm:
            x = dec.layer_norm(x)
        logits = lm_head_logits(x[:, 0, :], self.lm_head.weight)
        # Released checkpoints keep final_logits_bias at zero, and adding zeros changes no logit (at most
        # the sign of a zero): not traced, it keeps a vocabulary of float32 (384 KB) out of the graph.
        return logits + self.final_logits_bias if self.final_logits_bias.any() else logits


class ConcatDecoderExport(DecoderExport):
    """One decoder step of the concat contract (ortseq 0.2's decoder.onnx, and what ORT's BeamSearch op
    needs): the past is reordered by beam_idx and concatenated with the new K/V (graphs/contract.py)."""

    def forward(self, input_ids, encoder_attention_mask, beam_idx, *past_and_cross):
        n = self.num_layers
        past, cross = past_and_cross[: 2 * n], past_and_cross[2 * n :]
        past_len = past[0].shape[2]
        positions = torch.arange(past_len, past_len + 1, device=input_ids.device)
        presents = []

        def self_attention(i: int, attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
            q, k, v = (split_heads(proj(h), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            k = torch.cat([past[2 * i].index_select(0, beam_idx), k], dim=2)
            v = torch.cat([past[2 * i + 1].index_select(0, beam_idx), v], dim=2)
            presents.extend([k, v])
            return attn.out_proj(merge_heads(attend(q, k, v, None, attn.scaling)))

        logits = self.step(input_ids, positions, encoder_attention_mask, cross, self_attention)
        return (logits, *presents)
