"""LSG-Pegasus: Pegasus whose encoder self-attention is Local + Sparse + Global (shared/LSG.md).

Loads LSG checkpoints (config with the LSG keys and an ``auto_map`` to remote code) WITHOUT
trust_remote_code: the weights are Pegasus' plus ``model.encoder.global_embeddings.weight``, so
transformers' own PegasusForConditionalGeneration holds everything but the globals, which we
read from the checkpoint files ourselves, with the encoder's position table (the reference
re-randomises that table when it builds a model, so only the checkpoint's copy is right).

The decoder is plain Pegasus (pegasus.DecoderExport). The encoder export differs in four ways,
each copied from the reference: learned global tokens are prepended (no position, no scaling);
the sequence is padded to a multiple of block_size (at least two blocks, see LSGSettings.
padded_length); each layer's attention is one ortseq::LSGAttention node; and the output is
trimmed, keeping or folding the globals, with the cross-attention mask to match. (Its linear
layers are also exported as 1x1 Convs, for speed alone: exporter/conv_linear.py.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ...graphs import lsg
from ...graphs.lsg import GLOBALS_KEY, POSITIONS_KEY, LSGSettings
from ..attention import merge_heads, split_heads
from ..checkpoint_check import CheckpointLayout, read_checkpoint_tensors
from ..conv_linear import conv_feed_forward, conv_linear
from ..lsg_attention import LSGAttentionCore, lsg_attention
from ..tiny.lsg_pegasus import build_tiny_lsg_pegasus
from .base import from_pretrained
from .pegasus import PegasusFamily, cross_key_values

# The reference draws new LSH hyperplanes on every call; an export freezes one draw, from this seed.
LSH_SEED = 0


class LSGPegasusFamily(PegasusFamily):
    """Pegasus with another encoder: everything but the encoder export is Pegasus'."""

    name: ClassVar[str] = "lsg_pegasus"
    aliases: ClassVar[dict[str, str]] = {
        "lsg-pegasus-large-4096": "ccdv/lsg-pegasus-large-4096",
        "tiny-lsg-pegasus": "tiny:lsg-pegasus",
    }
    # transformers has no LSG encoder: the export's encoder output is given to transformers' Pegasus decoder;
    # the encoder rests on graphs/lsg.py and the reference code's goldens
    reference_encoder: ClassVar[bool] = False
    trained_tiny_kinds: ClassVar[tuple[str, ...]] = ()  # none trained with an LSG encoder

    def handles(self, config: dict) -> bool:
        return config.get("model_type") == "pegasus" and "sparsity_type" in config

    def load_model(self, source_dir: str) -> nn.Module:
        """transformers' Pegasus with the LSG parts attached as `model.lsg_config` / `model.lsg_weights`."""
        from transformers import PegasusConfig, PegasusForConditionalGeneration
        from transformers.utils import logging as hf_logging

        config_dict = json.loads((Path(source_dir) / "config.json").read_text())
        config = PegasusConfig.from_pretrained(source_dir)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # it would report the global embeddings as unexpected: we read them below
        try:
            model = from_pretrained(
                PegasusForConditionalGeneration,
                source_dir,
                config=config,
                attn_implementation="eager",
                ignore_mismatched_sizes=True,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        model.lsg_config = LSGEncoderConfig.from_config(config_dict)
        model.lsg_weights = read_checkpoint_tensors(Path(source_dir), [GLOBALS_KEY, POSITIONS_KEY])
        return model.eval()

    def checkpoint_layout(self, model: nn.Module) -> CheckpointLayout:
        """Pegasus' layout, but the encoder's position table must come from the checkpoint (see above)."""
        layout = super().checkpoint_layout(model)
        return replace(layout, computed={name: why for name, why in layout.computed.items() if name != POSITIONS_KEY})

    def model_attributes(self, model: nn.Module) -> tuple[str, ...]:
        """Pegasus' (its decoder is Pegasus'), and what the LSG encoder below reads besides."""
        lsg_parts = ("lsg_config", "lsg_weights", "model.encoder.layers[].self_attn.head_dim")
        return (*super().model_attributes(model), *lsg_parts)

    def encoder_export(self, model: nn.Module, fused: bool = True) -> nn.Module:
        return EncoderExport(model)  # its attention is one ortseq::LSGAttention node either way

    def reference_model(self, source_dir: str) -> nn.Module:
        """transformers' own Pegasus loaded from the LSG checkpoint: its decoder and LM head are the reference.

        Eager attention, as the reference code runs its decoder (transformers 4.x's PegasusDecoder, eager
        only): where the decoder may see no source position at all (mask_first_token zeroes the first
        column of the caller's mask in place, and without the globals passed to the decoder a one-token
        source is then all masked), eager attends uniformly over the masked positions, as the export does;
        transformers 5's default sdpa path computes something else there."""
        from transformers import PegasusForConditionalGeneration
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the global embeddings are unexpected to it, and unused here
        try:
            return from_pretrained(PegasusForConditionalGeneration, source_dir, attn_implementation="eager")
        finally:
            hf_logging.set_verbosity(verbosity)

    def tiny_builders(self) -> dict[str, Callable[[Path], Path]]:
        return {"lsg-pegasus": build_tiny_lsg_pegasus}

    def encoder_trace_length(self, model) -> int:
        """Trace the LSG path proper (over 2 blocks, not a multiple of the block size)."""
        return 3 * model.lsg_config.attention.block_size + 5

    def encoder_verify_lengths(self, model) -> list[int]:
        b = model.lsg_config.attention.block_size
        return [2 * b, 2 * b + 1, 4 * b, 6 * b - 3]

    def finalize_encoder_graph(self, encoder: nn.Module, graph) -> None:
        finalize_encoder_graph(encoder, graph)


@dataclass
class LSGEncoderConfig:
    """The encoder-wrapper keys of an LSG config (the attention's own are in LSGSettings)."""

    attention: LSGSettings
    pass_global_tokens_to_decoder: bool
    pool_with_global: bool
    mask_first_token: bool

    @classmethod
    def from_config(cls, config: dict) -> LSGEncoderConfig:
        mask_first_token = bool(config.get("mask_first_token", False))
        return cls(
            attention=LSGSettings.from_config(config),
            pass_global_tokens_to_decoder=bool(config.get("pass_global_tokens_to_decoder", True)),
            # the reference forces pool_with_global on when mask_first_token is set
            pool_with_global=bool(config.get("pool_with_global", True)) or mask_first_token,
            mask_first_token=mask_first_token,
        )


def draw_lsh_planes(settings: LSGSettings, layers: int, heads: int, head_dim: int) -> list[torch.Tensor]:
    """Every layer's hyperplanes, flat as the op takes them, drawn like the reference (randn per round)."""
    generator = torch.Generator().manual_seed(LSH_SEED)
    shapes = settings.lsh_plane_shapes(heads, head_dim)
    return [
        torch.cat([torch.randn(shape, generator=generator).reshape(-1) for shape in shapes] + [torch.zeros(0)])
        for _ in range(layers)
    ]


def lsh_planes_name(layer: int) -> str:
    """Initializer name of a layer's frozen LSH planes in encoder.onnx (tests swap them by name)."""
    return f"lsh_planes_layer{layer}"


class EncoderExport(nn.Module):
    """input_ids, attention_mask -> memory [n, G+t or t, D], its cross-attention mask, cross K/V."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = model.model.encoder
        self.cross_attentions = nn.ModuleList(layer.encoder_attn for layer in model.model.decoder.layers)
        self.config = model.lsg_config
        settings = self.config.attention
        self.core = LSGAttentionCore(settings)
        self.pad_token_id = model.config.pad_token_id
        weights = model.lsg_weights
        self.register_buffer("global_embeddings", weights[GLOBALS_KEY][: settings.num_global_tokens].clone())
        self.register_buffer("positions", weights[POSITIONS_KEY].clone())
        attn = self.encoder.layers[0].self_attn
        for layer, planes in enumerate(
            draw_lsh_planes(settings, len(self.encoder.layers), attn.num_heads, attn.head_dim)
        ):
            self.register_buffer(lsh_planes_name(layer), planes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        if self.config.mask_first_token:  # the reference zeroes column 0 of the caller's mask, decoder's too
            attention_mask = torch.cat([attention_mask[:, :1] * 0, attention_mask[:, 1:]], dim=1)
        ids, keep, positions = self._padded(input_ids, attention_mask)
        enc = self.encoder
        x = enc.embed_tokens(ids) * enc.embed_scale + self.positions.index_select(0, positions)
        globals_ = self.global_embeddings.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        x = torch.cat([globals_, x], dim=1)
        for i, layer in enumerate(enc.layers):
            planes = getattr(self, lsh_planes_name(i))
            x = x + self._self_attention(layer.self_attn, layer.self_attn_layer_norm(x), keep, planes)
            h = layer.final_layer_norm(x)
            x = x + conv_feed_forward(layer.fc1, layer.activation_fn, layer.fc2, h)
        memory, memory_mask = self._trimmed(enc.layer_norm(x), attention_mask)
        return (memory, memory_mask, *cross_key_values(self.cross_attentions, memory, conv_linear))

    def _padded(self, input_ids, attention_mask):
        """ids, keep [n, T] and positions [T] after right-padding to T = LSGSettings.padded_length(t)."""
        b = self.config.attention.block_size
        length = torch._shape_as_tensor(input_ids)[1]  # a tensor, so the traced graph stays dynamic
        padded_length = torch.clamp((length + b - 1) // b * b, min=2 * b)
        positions = torch.arange(padded_length)
        room = input_ids[:, :1].expand(-1, 2 * b) * 0  # more than any padding needs
        ids = torch.cat([input_ids, room + self.pad_token_id], dim=1).index_select(1, positions)
        keep = torch.cat([attention_mask, room], dim=1).index_select(1, positions)
        return ids, keep.to(self.positions.dtype), positions

    def _self_attention(self, attn, x, keep, planes):
        # the linear layers as 1x1 Convs: faster on onnxruntime's CPU (exporter/conv_linear.py)
        q, k, v = (
            split_heads(conv_linear(proj, x), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        return conv_linear(attn.out_proj, merge_heads(lsg_attention(self.core, q, k, v, keep, planes)))

    def _trimmed(self, x, attention_mask):
        """Drop the padding; keep the globals in front, or fold global 0 into token 0 (pool_with_global)."""
        g = self.config.attention.num_global_tokens
        tokens = torch.arange(torch._shape_as_tensor(attention_mask)[1]) + g
        if self.config.pass_global_tokens_to_decoder:
            rows = torch.cat([torch.arange(g), tokens])
            ones = attention_mask[:, :1].expand(-1, g) * 0 + 1
            return x.index_select(1, rows), torch.cat([ones, attention_mask], dim=1)
        if self.config.pool_with_global:
            tokens = torch.where(tokens == g, torch.zeros_like(tokens), tokens)
        return x.index_select(1, tokens), attention_mask.clone()


def finalize_encoder_graph(module: EncoderExport, graph_model) -> None:
    """Add the ortseq::LSGAttention function to the traced encoder and name the LSH planes."""
    import onnx

    from ..onnx_export import OPSET, trace_to_proto

    settings = module.config.attention
    heads, head_dim = module.encoder.layers[0].self_attn.num_heads, module.encoder.layers[0].self_attn.head_dim
    body = trace_to_proto(module.core, _core_trace_args(settings, heads, head_dim), *_core_io())
    graph_model.functions.append(lsg.function_proto(body.graph, settings, OPSET))
    graph_model.opset_import.append(onnx.helper.make_opsetid(lsg.DOMAIN, lsg.OPSET_VERSION))
    lsg_nodes = [node for node in graph_model.graph.node if node.op_type == lsg.OP_TYPE]
    renames = {node.input[4]: lsh_planes_name(layer) for layer, node in enumerate(lsg_nodes)}
    for init in graph_model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in graph_model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]


def _core_io():
    axes = {name: {0: "batch", 2: "length"} for name in ("query", "key", "value", "context")}
    axes["keep"] = {0: "batch", 1: "tokens"}
    return list(lsg.OP_INPUTS), list(lsg.OP_OUTPUTS), axes


def _core_trace_args(settings: LSGSettings, heads: int, head_dim: int):
    g, t = settings.num_global_tokens, 3 * settings.block_size
    q, k, v = (torch.randn(2, heads, g + t, head_dim) for _ in range(3))
    keep = torch.ones(2, t)
    keep[1, -5:] = 0
    return (q, k, v, keep, draw_lsh_planes(settings, 1, heads, head_dim)[0])
