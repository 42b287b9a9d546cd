"""EncoderDecoderModel of BERT-like stacks: bert2bert, roberta2roberta, BertGeneration (bert_for_seq_generation).

All three are post-LayerNorm BERT layers (attention -> dense -> LayerNorm(x + .), the decoder with a
cross-attention block of the same form, then the feed-forward block); they differ only in
  * the embeddings: BERT adds token type 0 and positions 0..n-1; RoBERTa adds token type 0 and
    positions computed from the ids (pad tokens get the padding index, the others count up from
    padding_idx + 1, in the decoder too: a generated pad token gets the padding position);
    BertGeneration has no token types;
  * the LM head: BERT's and RoBERTa's transform (dense, activation, LayerNorm) before the output
    projection, BertGeneration's plain projection.
That knowledge sits in `STACKS` below; the export modules are shared. Graph I/O: graphs/contract.py.
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
from ..tiny.encoder_decoder import KINDS, build_tiny_encoder_decoder
from .base import Family, UnsupportedModelError, from_pretrained


@dataclass(frozen=True)
class Stack:
    """What differs between the BERT-like architectures, for one side (encoder or decoder)."""

    position_ids: Callable[[nn.Module, torch.Tensor, int], torch.Tensor]  # (embeddings, ids, past) -> ids
    position_offset: Callable[[nn.Module], int]  # positions lost before the first token (RoBERTa: padding_idx + 1)
    lm_head: str  # attribute of the *ForCausalLM model holding the whole head (transform + projection)


def _counting_positions(embeddings: nn.Module, input_ids: torch.Tensor, past: int) -> torch.Tensor:
    """BERT, BertGeneration: past, past + 1, ... for every row."""
    return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] + past


def _roberta_positions(embeddings: nn.Module, input_ids: torch.Tensor, past: int) -> torch.Tensor:
    """RoBERTa: (cumulative count of non-pad tokens + past) for real tokens, padding_idx for pad tokens.

    transformers computes this from the ids it is given, so with a cache every new token gets
    past + 1 + padding_idx, or padding_idx if it is the pad id (create_position_ids_from_input_ids).
    """
    not_pad = input_ids.ne(embeddings.padding_idx).long()
    return (torch.cumsum(not_pad, dim=1) + past) * not_pad + embeddings.padding_idx


STACKS: dict[str, Stack] = {
    "bert": Stack(_counting_positions, lambda embeddings: 0, lm_head="cls"),
    "roberta": Stack(_roberta_positions, lambda embeddings: embeddings.padding_idx + 1, lm_head="lm_head"),
    "bert-generation": Stack(_counting_positions, lambda embeddings: 0, lm_head="lm_head"),
}


def _stack(config) -> Stack:
    if config.model_type not in STACKS:
        raise UnsupportedModelError(
            f"EncoderDecoderModel with a {config.model_type!r} encoder or decoder is not supported; "
            f"supported: {sorted(STACKS)}"
        )
    return STACKS[config.model_type]


def embed(embeddings: nn.Module, stack: Stack, input_ids: torch.Tensor, past: int) -> torch.Tensor:
    """Word + token type 0 (where the architecture has them) + position embeddings, then LayerNorm."""
    x = embeddings.word_embeddings(input_ids)
    if hasattr(embeddings, "token_type_embeddings"):
        x = x + embeddings.token_type_embeddings.weight[0]
    x = x + embeddings.position_embeddings(stack.position_ids(embeddings, input_ids, past))
    return embeddings.LayerNorm(x)


def usable_positions(side: nn.Module) -> int:
    """Longest sequence the position table allows (RoBERTa loses padding_idx + 1 entries)."""
    embeddings = side.base_model.embeddings
    return embeddings.position_embeddings.num_embeddings - _stack(side.config).position_offset(embeddings)


def _first_set(*values):
    """The first value that is set (a list of ids counts as its first)."""
    for value in values:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return value
    return None


# Model cards that tokenize the input with add_special_tokens=False: Rothe et al.'s google/*
# checkpoints (bert2bert_L-24_*, roberta2roberta_L-24_*, bert_for_seq_generation_L-24_*), and the
# tiny models that imitate them. Others (e.g. patrickvonplaten/bert2bert_cnn_daily_mail) use the default.
_SOURCES_WITHOUT_SPECIAL_TOKENS = (
    "google/bert2bert_L-24_",
    "google/roberta2roberta_L-24_",
    "google/bert_for_seq_generation_L-24_",
    "tiny:roberta2roberta",
    "tiny:bertgeneration",
)


class EncoderDecoderFamily(Family):
    """transformers' EncoderDecoderModel of BERT-like stacks (see STACKS)."""

    name: ClassVar[str] = "encoder-decoder"
    aliases: ClassVar[dict[str, str]] = {
        "roberta2roberta-discofuse": "google/roberta2roberta_L-24_discofuse",
        "bert2bert-cnn": "patrickvonplaten/bert2bert_cnn_daily_mail",
        "tiny-bert2bert": "tiny:bert2bert",
        "tiny-roberta2roberta": "tiny:roberta2roberta",
        "tiny-bertgeneration": "tiny:bertgeneration",
    }

    def handles(self, config: dict) -> bool:
        return config.get("model_type") == "encoder-decoder"

    def load_model(self, source_dir: str) -> nn.Module:
        from transformers import EncoderDecoderModel

        model = from_pretrained(EncoderDecoderModel, source_dir, ignore_mismatched_sizes=True)  # refused by name later
        _stack(model.config.encoder), _stack(model.config.decoder)  # fail early, with the supported list
        return model

    def checkpoint_layout(self, model: nn.Module) -> CheckpointLayout:
        """transformers 4.x's tie_encoder_decoder made every decoder weight with an encoder counterpart of
        the same name the encoder's own (one tensor, stored once); 5.x ignores the flag."""
        if not getattr(model.config, "tie_encoder_decoder", False):
            return CheckpointLayout()
        prefix = f"decoder.{model.decoder.base_model_prefix}."
        encoder = {name for name, _ in model.encoder.named_parameters()}
        decoder = [name for name, _ in model.decoder.base_model.named_parameters() if name in encoder]
        return CheckpointLayout(tied=[frozenset({prefix + name, f"encoder.{name}"}) for name in decoder])

    def model_attributes(self, model: nn.Module) -> tuple[str, ...]:
        """What EncoderExport and DecoderExport below read of transformers' EncoderDecoderModel."""
        attention = ("query", "key", "value", "num_attention_heads", "scaling")
        paths = [f"decoder.{_stack(model.config.decoder).lm_head}"]
        for side in ("encoder", "decoder"):
            embeddings, layers = f"{side}.base_model.embeddings", f"{side}.base_model.encoder.layer[]"
            paths += [f"{embeddings}.{name}" for name in ("word_embeddings", "position_embeddings", "LayerNorm")]
            paths += [f"{layers}.attention.self.{name}" for name in attention]
            paths += [f"{layers}.{name}" for name in ("attention.output.dense", "attention.output.LayerNorm")]
            paths += [f"{layers}.{name}" for name in ("intermediate", "output.dense", "output.LayerNorm")]
        paths += [f"decoder.base_model.encoder.layer[].crossattention.self.{name}" for name in attention]
        paths += [f"decoder.base_model.encoder.layer[].crossattention.output.{name}" for name in ("dense", "LayerNorm")]
        return tuple(paths)

    def dims(self, model: nn.Module) -> ModelDims:
        decoder = model.config.decoder
        encoder_vocab = model.encoder.get_input_embeddings().num_embeddings
        vocab = model.decoder.get_output_embeddings().out_features
        if encoder_vocab != vocab:
            raise UnsupportedModelError(f"encoder vocabulary ({encoder_vocab}) differs from the decoder's ({vocab})")
        return ModelDims(
            d_model=decoder.hidden_size,
            encoder_layers=model.config.encoder.num_hidden_layers,
            decoder_layers=decoder.num_hidden_layers,
            decoder_heads=decoder.num_attention_heads,
            head_dim=decoder.hidden_size // decoder.num_attention_heads,
            vocab_size=vocab,
            max_position_embeddings=min(usable_positions(model.encoder), usable_positions(model.decoder)),
        )

    def special_tokens(self, model: nn.Module) -> SpecialTokens:
        """The ids generate() uses, by its rules: all from the generation config (which transformers fills
        from config.json and the decoder's config); no decoder start -> BOS; no pad -> EOS."""
        gen = model.generation_config
        if isinstance(gen.eos_token_id, (list, tuple)) and len(set(gen.eos_token_id)) > 1:
            raise UnsupportedModelError(
                f"generation stops on several EOS ids {gen.eos_token_id}; ortseq's search knows one"
            )
        eos = _first_set(gen.eos_token_id)
        start = _first_set(gen.decoder_start_token_id, gen.bos_token_id)
        if eos is None or start is None:
            raise UnsupportedModelError(
                "the checkpoint does not say its EOS or decoder start token: set eos_token_id and "
                "decoder_start_token_id in its config.json (bert2bert: [SEP], [CLS]; roberta2roberta: </s>, <s>)"
            )
        return SpecialTokens(
            pad_token_id=_first_set(gen.pad_token_id, eos), eos_token_id=eos, decoder_start_token_id=start
        )

    def add_special_tokens(self, source: str) -> bool:
        """Whether inputs are tokenized with the tokenizer's special tokens, as the source's model card does."""
        return not source.startswith(_SOURCES_WITHOUT_SPECIAL_TOKENS)

    def encoder_export(self, model: nn.Module, fused: bool = True) -> nn.Module:
        return EncoderExport(model, fused)

    def decoder_export(self, model: nn.Module, body: str = DMMHA) -> nn.Module:
        return DecoderExport(model, body)

    def concat_decoder_export(self, model: nn.Module) -> nn.Module:
        return ConcatDecoderExport(model)

    def tiny_builders(self) -> dict[str, Callable[[Path], Path]]:
        return {kind: functools.partial(build_tiny_encoder_decoder, kind) for kind in KINDS}

    def tokenizer_converters(self) -> dict[str, type]:
        """BertGenerationTokenizer is still sentencepiece-backed in transformers 5.x, and transformers
        has a converter for it that it does not register."""
        from transformers.convert_slow_tokenizer import BertGenerationConverter

        return {"BertGenerationTokenizer": BertGenerationConverter}


# ---------------------------------------------------------------- export modules


def _post_ln_attention(block: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """BertSelfOutput: LayerNorm(x + dense(context)), context [n, t, D]."""
    return block.output.LayerNorm(block.output.dense(context) + x)


def _self_attention(block: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor, fused: bool) -> torch.Tensor:
    attn = block.self
    q, k, v = (proj(x) for proj in (attn.query, attn.key, attn.value))
    heads = attn.num_attention_heads
    return _post_ln_attention(block, x, encoder_self_attention(q, k, v, attention_mask, heads, attn.scaling, fused))


def _feed_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)


class EncoderExport(nn.Module):
    """input_ids, attention_mask -> last_hidden_state, cross-attention mask, cross K/V of every decoder layer."""

    def __init__(self, model: nn.Module, fused: bool = True):
        super().__init__()
        self.fused = fused
        self.stack = _stack(model.config.encoder)
        self.embeddings = model.encoder.base_model.embeddings
        self.layers = model.encoder.base_model.encoder.layer
        # EncoderDecoderModel projects the memory when the two hidden sizes differ
        self.to_decoder = getattr(model, "enc_to_dec_proj", None) or nn.Identity()
        self.cross_attentions = nn.ModuleList(layer.crossattention.self for layer in _decoder_layers(model))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        x = embed(self.embeddings, self.stack, input_ids, 0)
        for layer in self.layers:
            x = _feed_forward(layer, _self_attention(layer.attention, x, attention_mask, self.fused))
        memory = self.to_decoder(x)
        cross = []
        for attn in self.cross_attentions:
            heads = attn.num_attention_heads
            cross += [split_heads(attn.key(memory), heads), split_heads(attn.value(memory), heads)]
        return (x, attention_mask.clone(), *cross)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.decoder.base_model.encoder.layer


class DecoderExport(StaticCacheDecoderStep):
    """One decoder step for every row, decoder contract 0.3 (graphs/contract.py): self-attention K/V in
    the static cache, written in place at past_sequence_length and read through the cache indirection;
    the self-attention is `body` (exporter/attention.py: DMMHA or plain ONNX)."""

    def __init__(self, model: nn.Module, body: str = DMMHA):
        super().__init__()
        self.stack = _stack(model.config.decoder)
        self.embeddings = model.decoder.base_model.embeddings
        self.layers = _decoder_layers(model)
        self.lm_head = getattr(model.decoder, self.stack.lm_head)  # transform (if any) + projection + bias
        self.num_layers = len(self.layers)
        self.body = body

    @staticmethod
    def project(attn: nn.Module, x: torch.Tensor):
        return attn.query(x), attn.key(x), attn.value(x), attn.num_attention_heads, attn.scaling

    @staticmethod
    def finish(attn: nn.Module, context: torch.Tensor) -> torch.Tensor:
        return context  # BERT's output projection comes after, in the layer's output block (step)

    def step(self, input_ids, past, encoder_attention_mask, cross, self_attention: Callable) -> torch.Tensor:
        """The logits of one step; past: the position of the new token (int or [rows, 1]);
        self_attention(layer index, attention module, x) -> its context [rows, 1, D] (heads merged)."""
        x = embed(self.embeddings, self.stack, input_ids, past)  # [rows, 1, D]
        cross_mask = additive_mask(encoder_attention_mask, x.dtype)
        for i, layer in enumerate(self.layers):
            block = layer.attention
            x = block.output.LayerNorm(block.output.dense(self_attention(i, block.self, x)) + x)
            cross_attn = layer.crossattention.self
            q = split_heads(cross_attn.query(x), cross_attn.num_attention_heads)
            context = self.cross_attend(q, cross[2 * i], cross[2 * i + 1], cross_mask, cross_attn.scaling)
            x = _feed_forward(layer, _post_ln_attention(layer.crossattention, x, merge_heads(context)))
        return self.lm_head(x[:, 0, :])  # [rows, vocab]


class ConcatDecoderExport(DecoderExport):
    """One decoder step of the concat contract (ortseq 0.2's decoder.onnx): the past is reordered by
    beam_idx and concatenated with the new K/V (graphs/contract.py)."""

    def forward(self, input_ids, encoder_attention_mask, beam_idx, *past_and_cross):
        n = len(self.layers)
        past, cross = past_and_cross[: 2 * n], past_and_cross[2 * n :]
        presents = []

        def self_attention(i: int, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
            heads = attn.num_attention_heads
            q, k, v = (split_heads(proj(x), heads) for proj in (attn.query, attn.key, attn.value))
            k = torch.cat([past[2 * i].index_select(0, beam_idx), k], dim=2)
            v = torch.cat([past[2 * i + 1].index_select(0, beam_idx), v], dim=2)
            presents.extend([k, v])
            return merge_heads(attend(q, k, v, None, attn.scaling))

        logits = self.step(input_ids, past[0].shape[2], encoder_attention_mask, cross, self_attention)
        return (logits, *presents)
