"""One ONNX graph holding ONNX Runtime's `com.microsoft.BeamSearch` op over our Pegasus modules.

The op runs the whole search in C++ (no Python per step). For encoder-decoders (model_type=1, the
"T5" layout of onnxruntime.transformers' convert_generation) it takes two subgraphs, whose I/O
names and int32 dtypes the op checks:

encoder subgraph (the encoder plus the first decoder step):
    encoder_input_ids, encoder_attention_mask [batch, src] int32, decoder_input_ids [batch, 1] int32
    -> logits [batch, 1, vocab], encoder_hidden_states [batch, src, D],
       present_key_self_{l}, present_value_self_{l} [batch, H, 1, dh],
       present_key_cross_{l}, present_value_cross_{l} [batch, H, src, dh]
decoder subgraph (one step with past):
    input_ids [B, 1] int32, encoder_attention_mask [B, src] int32,
    past_key_self_{l}, past_value_self_{l}, past_key_cross_{l}, past_value_cross_{l}
    -> logits [B, 1, vocab], present_key_self_{l}, present_value_self_{l}
with B = batch * beams: the op copies the cross K/V and the mask for every beam (its design) and
reorders the past itself, so our decoder's beam_idx is the identity here.

transformers' forced EOS (the last token is EOS) is not a feature of the op; the decoder subgraph
applies it itself, reading the op's `max_length` input from the outer graph. Weights used by both
subgraphs are stored once, in the outer graph.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from ..graphs.manifest import ModelDims
from . import onnx_export
from .families import Family, UnsupportedModelError, family_for
from .progress import log

# The op's inputs, in its positional order (unused optional ones are empty names).
OP_INPUTS = ("input_ids", "max_length", "min_length", "num_beams", "num_return_sequences", "length_penalty")
OP_ATTENTION_MASK_POSITION = 9  # after repetition_penalty, vocab_mask, prefix_vocab_mask


def _names(prefix: str, kind: str, layers: int) -> list[str]:
    return [name for i in range(layers) for name in (f"{prefix}_key_{kind}_{i}", f"{prefix}_value_{kind}_{i}")]


def _forced_eos(logits: torch.Tensor, cur_len: torch.Tensor, max_length: torch.Tensor, eos: int) -> torch.Tensor:
    """transformers' ForcedEOSTokenLogitsProcessor: at length max_length - 1 only EOS may follow."""
    eos_only = torch.full_like(logits, float("-inf"))
    eos_only[..., eos] = 0.0
    force = (cur_len == max_length.reshape(()).long() - 1).to(logits.dtype)
    return torch.where(force > 0, eos_only, logits)


class EncoderInitExport(nn.Module):
    """The op's encoder subgraph: our encoder, then our decoder's first step on an empty past."""

    def __init__(self, family: Family, model: nn.Module, dims: ModelDims):
        super().__init__()
        self.encoder = family.encoder_export(model)
        self.decoder = family.concat_decoder_export(model)
        self.dims = dims

    def forward(self, encoder_input_ids, encoder_attention_mask, decoder_input_ids):
        dims = self.dims
        hidden, cross_mask, *cross = self.encoder(encoder_input_ids.long(), encoder_attention_mask.long())
        batch = encoder_input_ids.shape[0]
        empty = torch.zeros(batch, dims.decoder_heads, 0, dims.head_dim, dtype=hidden.dtype)
        rows = torch.arange(batch, device=hidden.device)
        past = [empty] * (2 * dims.decoder_layers)
        logits, *presents = self.decoder(decoder_input_ids.long(), cross_mask, rows, *past, *cross)
        return (logits[:, None, :], hidden, *presents, *cross)


class DecoderStepExport(nn.Module):
    """The op's decoder subgraph: one step of our decoder, plus forced EOS when the model has one."""

    def __init__(self, family: Family, model: nn.Module, dims: ModelDims, forced_eos_token_id: int | None):
        super().__init__()
        self.decoder = family.concat_decoder_export(model)
        self.layers = dims.decoder_layers
        self.forced_eos_token_id = forced_eos_token_id

    def forward(self, input_ids, encoder_attention_mask, *past_and_cross_and_max_length):
        *past_and_cross, max_length = past_and_cross_and_max_length
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # the op reorders the past itself
        logits, *presents = self.decoder(input_ids.long(), encoder_attention_mask.long(), rows, *past_and_cross)
        if self.forced_eos_token_id is not None:
            cur_len = torch.tensor(past_and_cross[0].shape[2]) + 1  # tokens so far, the start token included
            logits = _forced_eos(logits, cur_len, max_length, self.forced_eos_token_id)
        return (logits[:, None, :], *presents)


def _encoder_subgraph(family: Family, model, dims: ModelDims) -> onnx.GraphProto:
    layers = dims.decoder_layers
    ids = torch.randint(3, dims.vocab_size, (2, 9), dtype=torch.int32)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    start = torch.zeros(2, 1, dtype=torch.int32)
    outputs = [
        "logits",
        "encoder_hidden_states",
        *_names("present", "self", layers),
        *_names("present", "cross", layers),
    ]
    axes = {"encoder_input_ids": {0: "batch", 1: "src"}, "encoder_attention_mask": {0: "batch", 1: "src"}}
    axes |= {"decoder_input_ids": {0: "batch"}, "logits": {0: "batch"}, "encoder_hidden_states": {0: "batch", 1: "src"}}
    axes |= {name: {0: "batch"} for name in _names("present", "self", layers)}
    axes |= {name: {0: "batch", 2: "src"} for name in _names("present", "cross", layers)}
    module = EncoderInitExport(family, model, dims).eval()
    inputs = ["encoder_input_ids", "encoder_attention_mask", "decoder_input_ids"]
    return onnx_export.trace_to_proto(module, (ids, mask, start), inputs, outputs, axes).graph


def _decoder_subgraph(family: Family, model, dims: ModelDims, forced_eos_token_id: int | None) -> onnx.GraphProto:
    layers, rows, src, past = dims.decoder_layers, 4, 9, 3
    kv = (dims.decoder_heads, dims.head_dim)
    self_kv = [torch.randn(rows, kv[0], past, kv[1]) for _ in range(2 * layers)]
    cross_kv = [torch.randn(rows, kv[0], src, kv[1]) for _ in range(2 * layers)]
    ids = torch.randint(3, dims.vocab_size, (rows, 1), dtype=torch.int32)
    mask = torch.ones(rows, src, dtype=torch.int32)
    max_length = torch.tensor([past + 2], dtype=torch.int32)  # traced on the forced step: both branches stay
    inputs = ["input_ids", "encoder_attention_mask", *_names("past", "self", layers), *_names("past", "cross", layers)]
    outputs = ["logits", *_names("present", "self", layers)]
    axes = {"input_ids": {0: "rows"}, "encoder_attention_mask": {0: "rows", 1: "src"}, "logits": {0: "rows"}}
    axes |= {name: {0: "rows", 2: "past"} for name in _names("past", "self", layers)}
    axes |= {name: {0: "rows", 2: "src"} for name in _names("past", "cross", layers)}
    axes |= {name: {0: "rows", 2: "past_plus_1"} for name in _names("present", "self", layers)}
    module = DecoderStepExport(family, model, dims, forced_eos_token_id).eval()
    args = (ids, mask, *self_kv, *cross_kv, max_length)
    graph = onnx_export.trace_to_proto(module, args, [*inputs, "max_length"], outputs, axes).graph
    # max_length becomes an outer-scope reference to the BeamSearch node's own max_length input
    kept = [value for value in graph.input if value.name != "max_length"]
    del graph.input[:]
    graph.input.extend(kept)
    return graph


def _share_initializers(subgraphs: list[onnx.GraphProto], outer: list[TensorProto]) -> None:
    """Move every subgraph initializer into the outer graph's list, one copy per distinct tensor
    (before the subgraphs become node attributes: protobuf cannot hold a >2 GB attribute)."""
    by_content: dict[tuple, str] = {}
    for index, graph in enumerate(subgraphs):
        renamed: dict[str, str] = {}
        for tensor in graph.initializer:
            content = hashlib.sha256(onnx.numpy_helper.to_array(tensor).tobytes()).digest()
            key = (tensor.data_type, tuple(tensor.dims), content)
            if key not in by_content:
                by_content[key] = f"shared_{len(by_content)}"
                shared = TensorProto()
                shared.CopyFrom(tensor)
                shared.name = by_content[key]
                outer.append(shared)
            renamed[tensor.name] = by_content[key]
        del graph.initializer[:]
        _rename_inputs(graph, renamed)
        log(f"beam-search graph: subgraph {index} shares {len(renamed)} weights")


def _rename_inputs(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        for attribute in node.attribute:  # nested subgraphs (If, Loop) see the same outer names
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attribute.g, renamed)


def check_supported(family: Family) -> None:
    """Refuse families the graph is not built for (before any export work): Family.supports_beam_search_op."""
    if not family.supports_beam_search_op:
        raise UnsupportedModelError(
            f"the BeamSearch-op graph is not built for the {family.name!r} family; export without --beam-search-op"
        )


def build_beam_search_model(checkpoint: str | Path, early_stopping: bool = True) -> onnx.ModelProto:
    family = family_for(Path(checkpoint))
    return beam_search_model_for(family, family.load_model(str(checkpoint)), early_stopping=early_stopping)


def beam_search_model_for(
    family: Family, model: nn.Module, no_repeat_ngram_size: int = 0, early_stopping: bool = True
) -> onnx.ModelProto:
    """The single-graph model: inputs input_ids, max_length, min_length, num_beams,
    num_return_sequences, length_penalty, attention_mask -> sequences [batch, returned, length] int32.

    no_repeat_ngram_size and early_stopping are node attributes: fixed here, recorded in the graph's
    metadata so that the runtime can refuse calls asking for other values. early_stopping is on by
    default: the op's stopping rule without it is transformers 4.x's heuristic (best of all
    candidates, finished ones included), which picked other beams than 5.x's in our comparisons.
    """
    check_supported(family)
    dims = family.dims(model)
    tokens = family.special_tokens(model)
    forced_eos = model.generation_config.forced_eos_token_id
    log(f"beam-search graph: tracing the {family.name} encoder subgraph")
    encoder = _encoder_subgraph(family, model, dims)
    log("beam-search graph: tracing the decoder subgraph")
    decoder = _decoder_subgraph(family, model, dims, forced_eos)
    weights: list[TensorProto] = []
    _share_initializers([encoder, decoder], weights)

    scalar_int = [1]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "src"]),
        helper.make_tensor_value_info("max_length", TensorProto.INT32, scalar_int),
        helper.make_tensor_value_info("min_length", TensorProto.INT32, scalar_int),
        helper.make_tensor_value_info("num_beams", TensorProto.INT32, scalar_int),
        helper.make_tensor_value_info("num_return_sequences", TensorProto.INT32, scalar_int),
        helper.make_tensor_value_info("length_penalty", TensorProto.FLOAT, scalar_int),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "src"]),
    ]
    op_inputs = [*OP_INPUTS, "", "", ""]  # repetition_penalty, vocab_mask, prefix_vocab_mask
    op_inputs.insert(OP_ATTENTION_MASK_POSITION, "attention_mask")
    node = helper.make_node(
        "BeamSearch",
        op_inputs[: OP_ATTENTION_MASK_POSITION + 1],
        ["sequences"],
        domain="com.microsoft",
        name="beam_search",
        eos_token_id=tokens.eos_token_id,
        pad_token_id=tokens.pad_token_id,
        decoder_start_token_id=tokens.decoder_start_token_id,
        no_repeat_ngram_size=no_repeat_ngram_size,
        early_stopping=int(early_stopping),
        model_type=1,
        encoder=encoder,
        decoder=decoder,
    )
    output = helper.make_tensor_value_info("sequences", TensorProto.INT32, ["batch", "returned", "length"])
    graph = helper.make_graph([node], "ortseq_beam_search", inputs, [output], initializer=weights)
    opsets = [helper.make_opsetid("", onnx_export.OPSET), helper.make_opsetid("com.microsoft", 1)]
    model_proto = helper.make_model(graph, opset_imports=opsets, producer_name="ortseq")
    model_proto.ir_version = onnx_export.IR_VERSION
    # what the runner needs: the layout of finished rows, and the settings fixed in the graph
    metadata = {
        "eos_token_id": tokens.eos_token_id,
        "pad_token_id": tokens.pad_token_id,
        "forced_eos_token_id": "" if forced_eos is None else forced_eos,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "early_stopping": int(early_stopping),
    }
    onnx.helper.set_model_props(model_proto, {key: str(value) for key, value in metadata.items()})
    return model_proto


def export_beam_search_graph(checkpoint: str | Path, path: Path, early_stopping: bool = True) -> list[str]:
    """Write the single-graph BeamSearch model to path (weights over 16 MiB in `<name>.data`)."""
    proto = build_beam_search_model(checkpoint, early_stopping)
    return onnx_export.save_proto(proto, Path(path))
