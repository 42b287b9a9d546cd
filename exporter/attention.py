"""Attention building blocks shared by every family's export modules (plain torch ops only).

They are written for tracing: every shape comes from a tensor, so the exported graph stays
dynamic in batch, rows (batch * beams), source length and past length.
"""

from __future__ import annotations

import functools

import torch

from ..graphs import contract


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[n, t, D] -> [n, H, t, dh]"""
    n, t, d = x.shape
    return x.reshape(n, t, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[n, H, t, dh] -> [n, t, D]"""
    n, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(n, t, h * dh)


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0/1 mask [n, s] -> additive [n, 1, 1, s] (0 where visible, the dtype's minimum where masked)."""
    visible = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - visible) * torch.finfo(dtype).min


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float):
    """softmax(q k^T * scaling + mask) v over the last two axes."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


# The largest negative float32: the additive mask transformers builds (additive_mask), and the value
# onnxruntime's MultiHeadAttention adds where its key_padding_mask is 0.
MASKED = float(torch.finfo(torch.float32).min)


def _plain_encoder_attention(q, k, v, attention_mask, heads: int, scaling: float) -> torch.Tensor:
    mask = additive_mask(attention_mask, q.dtype)
    return merge_heads(attend(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), mask, scaling))


class _EncoderMultiHeadAttention(torch.autograd.Function):
    """onnxruntime's com.microsoft MultiHeadAttention over the padding mask: one node in the graph (whose
    scores never leave the kernel); traced in torch, the plain body's math (the same numbers)."""

    @staticmethod
    def forward(ctx, q, k, v, attention_mask, heads, scaling):
        return _plain_encoder_attention(q, k, v, attention_mask, heads, scaling)

    @staticmethod
    def symbolic(g, q, k, v, attention_mask, heads, scaling):
        absent = g.op("prim::Constant").setType(torch._C.NoneType.get())
        key_padding_mask = g.op("Cast", attention_mask, to_i=torch.onnx.TensorProtoDataType.INT32)
        context = g.op(
            "com.microsoft::MultiHeadAttention",
            *(q, k, v, absent, key_padding_mask),
            num_heads_i=heads,
            scale_f=scaling,
            mask_filter_value_f=MASKED,
        )
        context.setType(q.type())  # the exporter cannot infer a contrib op's type
        return context


def encoder_self_attention(q, k, v, attention_mask, heads: int, scaling: float, fused: bool) -> torch.Tensor:
    """Bidirectional self-attention of an encoder layer.

    q, k, v [n, s, D] (projected, heads not split); attention_mask [n, s] 0/1 -> context [n, s, D].
    fused: one MultiHeadAttention node (an onnxruntime contrib op), which exporter/unpadded_attention.py
    then lets skip its mask when no input is padded; else standard ONNX ops."""
    if not fused:
        return _plain_encoder_attention(q, k, v, attention_mask, heads, scaling)
    return _EncoderMultiHeadAttention.apply(q, k, v, attention_mask, heads, scaling)


def cross_attend_shared(
    q_rows: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor, mask: torch.Tensor, scaling: float
):
    """Cross-attention for one new token per row, with K/V shared by all beams of an input.

    q_rows [rows, H, 1, dh] with rows = batch * beams; cross_k/v [batch, H, src, dh];
    mask [batch, 1, 1, src]. The beams of an input become its query axis, so K/V are never
    copied per beam. Returns [rows, H, 1, dh].
    """
    rows, h, _, dh = q_rows.shape
    batch = cross_k.shape[0]
    q = q_rows.reshape(batch, rows // batch, h, dh).transpose(1, 2)  # [batch, H, beams, dh]
    out = attend(q, cross_k, cross_v, mask, scaling)
    return out.transpose(1, 2).reshape(rows, h, 1, dh)


# ---------------------------------------------------------------- decoder contract 0.3: the static cache
#
# Self-attention K/V live in buffers [rows, H, max_len, dh] the runtime allocates once per generate()
# call and binds as both input and output of the step (graphs/contract.py): the new K/V is written at
# slot past_sequence_length of the row's own buffer, and a row reads its past through the cache
# indirection (which beam of its input holds slot t), so the beam reorder moves no K/V at all.

# Head sizes onnxruntime's DecoderMaskedMultiHeadAttention kernels take (CPU and CUDA).
DMMHA_HEAD_SIZES = (32, 64, 128)
DMMHA, PLAIN = contract.DMMHA_BODY, contract.PLAIN_BODY


def self_attention_body(head_dim: int, plain: bool = False) -> str:
    """The body a static-cache decoder is exported with: DMMHA where its kernels take the head size."""
    return DMMHA if head_dim in DMMHA_HEAD_SIZES and not plain else PLAIN


class CacheStep:
    """What every layer's static-cache self-attention needs about this step, computed once per step from
    the step's *present* indirection [rows, max_len] int32 (which beam of its input holds each slot of a
    row, this step's slot included) and past_sequence_length [1] int32."""

    def __init__(self, indirection: torch.Tensor, past_sequence_length: torch.Tensor, beams):
        rows = indirection.shape[0]
        self.rows, self.beams, self.indirection = rows, beams, indirection
        self.past_length = past_sequence_length
        self.slot = past_sequence_length.long()
        self.live_slots = torch.arange(self.slot[0] + 1)  # 0 .. past_sequence_length
        # flat index of (slot t, source row) in the live cache laid out [t, rows]: slot-major
        first_row = torch.arange(rows) - torch.arange(rows) % beams  # the row of beam 0 of r's input
        sources = first_row[:, None] + indirection.index_select(1, self.live_slots).long()  # [rows, t]
        self.flat_sources = (sources + self.live_slots[None, :] * rows).transpose(0, 1).reshape(-1)

    @classmethod
    def of_step(cls, beam_idx, past_sequence_length, cache_indirection, batch) -> CacheStep:
        """From the step's inputs: the input indirection's rows gathered by beam_idx, then slot
        past_sequence_length pointing at each row's own beam (graphs/contract.py)."""
        rows, max_len = cache_indirection.shape
        beams = rows // batch
        own_beam = (torch.arange(rows) % beams).to(torch.int32)
        is_new_slot = torch.arange(max_len)[None, :] == past_sequence_length.long()  # [1, max_len]
        present = torch.where(is_new_slot, own_beam[:, None], cache_indirection.index_select(0, beam_idx))
        return cls(present, past_sequence_length, beams)

    def write_indices(self, heads: int) -> torch.Tensor:
        """ScatterND indices [rows, H, 3] of slot past_sequence_length in every row and head."""
        rows = self.rows
        row = torch.arange(rows)[:, None].expand(rows, heads)
        head = torch.arange(heads)[None, :].expand(rows, heads)
        return torch.stack([row, head, self.slot.expand(rows, heads)], dim=-1)


class _WriteSlot(torch.autograd.Function):
    """cache with updates written at indices: one ScatterND, which onnxruntime runs in place when its
    output is bound to its input's buffer (it copies the input only when the two differ)."""

    @staticmethod
    def forward(ctx, cache, indices, updates):
        out = cache.clone()
        out[indices[..., 0], indices[..., 1], indices[..., 2]] = updates
        return out

    @staticmethod
    def symbolic(g, cache, indices, updates):
        return g.op("ScatterND", cache, indices, updates)


def write_slot(cache: torch.Tensor, new: torch.Tensor, step: CacheStep) -> torch.Tensor:
    """cache [rows, H, max_len, dh] with new [rows, H, 1, dh] at slot past_sequence_length."""
    return _WriteSlot.apply(cache, step.write_indices(cache.shape[1]), new[:, :, 0, :])


def read_live(cache: torch.Tensor, step: CacheStep) -> torch.Tensor:
    """Each row's K or V at slots 0 .. past_sequence_length, through the indirection: [rows, H, t, dh].
    Transient copies (the live slots, slot-major, then the rows they come from) that DMMHA avoids."""
    rows, heads, _, dh = cache.shape
    live = cache.index_select(2, step.live_slots).permute(2, 0, 1, 3).reshape(-1, heads, dh)  # [t * rows, H, dh]
    return live.index_select(0, step.flat_sources).reshape(-1, rows, heads, dh).permute(1, 2, 0, 3)


def _plain_static_attention(q, k, v, cache_k, cache_v, step: CacheStep, heads: int, scaling: float):
    """q, k, v [rows, 1, D] -> (context [rows, 1, D], present K, present V)."""
    present_k = write_slot(cache_k, split_heads(k, heads), step)
    present_v = write_slot(cache_v, split_heads(v, heads), step)
    context = attend(split_heads(q, heads), read_live(present_k, step), read_live(present_v, step), None, scaling)
    return merge_heads(context), present_k, present_v


class _DecoderMaskedAttention(torch.autograd.Function):
    """onnxruntime's com.microsoft DecoderMaskedMultiHeadAttention with past_present_share_buffer: in the
    graph, one node; traced in torch, the plain body's math (the same numbers)."""

    @staticmethod
    def forward(ctx, q, k, v, cache_k, cache_v, past_length, beam_width, indirection, heads, scaling):
        batch, beams, max_len = indirection.shape
        step = CacheStep(indirection.reshape(batch * beams, max_len), past_length, beams)
        return _plain_static_attention(q, k, v, cache_k, cache_v, step, heads, scaling)

    @staticmethod
    def symbolic(g, q, k, v, cache_k, cache_v, past_length, beam_width, indirection, heads, scaling):
        absent = g.op("prim::Constant").setType(torch._C.NoneType.get())
        outputs = g.op(
            "com.microsoft::DecoderMaskedMultiHeadAttention",
            *(q, k, v, absent, absent, cache_k, cache_v, past_length, beam_width, indirection),
            num_heads_i=heads,
            past_present_share_buffer_i=1,
            scale_f=scaling,
            outputs=3,
        )
        for output, like in zip(outputs, (q, cache_k, cache_v)):  # the exporter cannot infer a contrib op's types
            output.setType(like.type())
        return outputs


def static_self_attention(q, k, v, cache_k, cache_v, step: CacheStep, heads: int, scaling: float, body: str):
    """Self-attention of one new token per row over the static cache.

    q, k, v [rows, 1, D]; cache_k/v [rows, H, max_len, dh] -> (context [rows, 1, D], present K, present V),
    the presents being the caches with this step's K/V at slot past_sequence_length."""
    if body == PLAIN:
        return _plain_static_attention(q, k, v, cache_k, cache_v, step, heads, scaling)
    beam_width = (torch.zeros(1, dtype=torch.int32) + step.beams).to(torch.int32)
    indirection = step.indirection.reshape(-1, step.beams, step.indirection.shape[1])  # [batch, beams, max_len]
    return _DecoderMaskedAttention.apply(
        q, k, v, cache_k, cache_v, step.past_length, beam_width, indirection, heads, scaling
    )


class StaticCacheDecoderStep(torch.nn.Module):
    """The graph I/O of a static-cache decoder step (graphs/contract.py, contract 0.3), for every family.

    forward splits the inputs, runs the family's `step` with a self-attention that reads and writes the
    cache (static_self_attention, `body`), and returns the logits, the new indirection and the caches.
    A family's subclass sets num_layers and body, and gives:
      step(input_ids, positions [rows, 1], encoder_attention_mask, cross, self_attention) -> logits, calling
          self_attention(layer index, attention module, h [rows, 1, D]) for each layer, and
          self.cross_attend(q [rows, H, 1, dh], cross K, cross V, additive mask, scaling) for its cross-attention;
      project(attention module, h) -> (q, k, v [rows, 1, D], heads, scaling);
      finish(attention module, context [rows, 1, D]) -> the sublayer's output (e.g. its out projection).
    """

    num_layers: int
    body: str
    cross_attend = staticmethod(cross_attend_shared)  # the in-flight step swaps in its own (InflightDecoderStep)

    def forward(
        self,
        input_ids,
        encoder_attention_mask,
        beam_idx,
        position_ids,
        past_sequence_length,
        cache_indirection,
        *tensors,
    ):
        n = self.num_layers
        cache, cross = tensors[: 2 * n], tensors[2 * n :]
        step = CacheStep.of_step(beam_idx, past_sequence_length, cache_indirection, encoder_attention_mask.shape[0])
        presents = []

        def self_attention(i: int, attn: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
            q, k, v, heads, scaling = self.project(attn, h)
            context, *present = static_self_attention(
                q, k, v, cache[2 * i], cache[2 * i + 1], step, heads, scaling, self.body
            )
            presents.extend(present)
            return self.finish(attn, context)

        logits = self.step(input_ids, position_ids[:, None], encoder_attention_mask, cross, self_attention)
        return (logits, step.indirection, *presents)


# ---------------------------------------------------------------- the in-flight decoder step
#
# Rows of different requests and ages share one run (graphs/contract.py, decoder_inflight.onnx): each
# row writes its K/V at its own position and reads slots 0 .. its position through the indirection,
# relative to its request's first row; slots past a row's position belong to nobody it knows and are
# masked. The self-attention is the plain body (DMMHA has one past length for all rows).


class InflightCacheStep:
    """What every layer's in-flight self-attention needs about this step, from the step's inputs."""

    def __init__(self, beam_idx, position_ids, row_base, cache_indirection):
        rows, max_len = cache_indirection.shape
        self.rows = rows
        self.slot = position_ids  # [rows]: the slot each row writes
        own_beam = (torch.arange(rows) - row_base).to(torch.int32)
        is_new_slot = torch.arange(max_len)[None, :] == position_ids[:, None]  # [rows, max_len]
        self.indirection = torch.where(is_new_slot, own_beam[:, None], cache_indirection.index_select(0, beam_idx))
        self.live_slots = torch.arange(position_ids.max() + 1)  # 0 .. the oldest row's position
        visible = self.live_slots[None, :] <= position_ids[:, None]  # [rows, t]
        # slots past a row's position hold another row's stale beam index: read the row's own instead
        sources = row_base[:, None] + self.indirection.index_select(1, self.live_slots).long()
        sources = torch.where(visible, sources, torch.arange(rows)[:, None])
        self.flat_sources = (sources + self.live_slots[None, :] * rows).transpose(0, 1).reshape(-1)
        self.mask = additive_mask(visible.to(torch.int64), torch.float32)  # [rows, 1, 1, t]

    def write_indices(self, heads: int) -> torch.Tensor:
        """ScatterND indices [rows, H, 3] of each row's own slot in every head."""
        rows = self.rows
        row = torch.arange(rows)[:, None].expand(rows, heads)
        head = torch.arange(heads)[None, :].expand(rows, heads)
        return torch.stack([row, head, self.slot[:, None].expand(rows, heads)], dim=-1)


def inflight_self_attention(q, k, v, cache_k, cache_v, step: InflightCacheStep, heads: int, scaling: float):
    """q, k, v [rows, 1, D] -> (context [rows, 1, D], present K, present V), each row at its own slot."""
    present_k = write_slot(cache_k, split_heads(k, heads), step)
    present_v = write_slot(cache_v, split_heads(v, heads), step)
    keys, values = read_live(present_k, step), read_live(present_v, step)
    context = attend(split_heads(q, heads), keys, values, step.mask.to(q.dtype), scaling)
    return merge_heads(context), present_k, present_v


def cross_attend_folded(cross_grid, cross_slot, q_rows, cross_k, cross_v, mask, scaling: float):
    """Cross-attention of rows from requests of any beam count, each request's K/V read once for all its
    beams: the rows' queries are laid out on a grid [requests, width] (cross_grid: the row in each cell,
    a request's beams first, its spare cells repeating a row), attended as one query axis per request,
    and each row takes its own cell back (cross_slot: request * width + beam).

    q_rows [rows, H, 1, dh]; cross_k/v [requests, H, mem, dh]; mask [requests, 1, 1, mem] -> [rows, H, 1, dh]."""
    rows, heads, _, dh = q_rows.shape
    requests, width = cross_grid.shape
    q = q_rows[:, :, 0, :].index_select(0, cross_grid.reshape(-1)).reshape(requests, width, heads, dh)
    out = attend(q.transpose(1, 2), cross_k, cross_v, mask, scaling)  # [requests, H, width, dh]
    return out.transpose(1, 2).reshape(requests * width, heads, dh).index_select(0, cross_slot)[:, :, None, :]


class InflightDecoderStep(torch.nn.Module):
    """decoder_inflight.onnx's I/O (graphs/contract.py) around a family's StaticCacheDecoderStep: its
    step, project and finish, with every row its own cache slot and position, and each request's cross
    K/V read once for all its beams (cross_attend_folded)."""

    def __init__(self, decoder: StaticCacheDecoderStep):
        super().__init__()
        self.decoder = decoder

    def forward(
        self,
        input_ids,
        encoder_attention_mask,
        beam_idx,
        position_ids,
        row_base,
        cache_indirection,
        cross_grid,
        cross_slot,
        *tensors,
    ):
        decoder = self.decoder
        n = decoder.num_layers
        cache, cross = tensors[: 2 * n], tensors[2 * n :]
        step = InflightCacheStep(beam_idx, position_ids, row_base, cache_indirection)
        decoder.cross_attend = functools.partial(cross_attend_folded, cross_grid, cross_slot)
        presents = []

        def self_attention(i: int, attn: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
            q, k, v, heads, scaling = decoder.project(attn, h)
            context, *present = inflight_self_attention(q, k, v, cache[2 * i], cache[2 * i + 1], step, heads, scaling)
            presents.extend(present)
            return decoder.finish(attn, context)

        logits = decoder.step(input_ids, position_ids[:, None], encoder_attention_mask, cross, self_attention)
        return (logits, step.indirection, *presents)
