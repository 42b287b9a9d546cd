"""ortseq::LSGAttention in plain torch ops, vectorised and written for tracing (graphs/lsg.py has the spec).

`LSGAttentionCore` is the op's body: the exporter traces it on its own into the ONNX function.
`lsg_attention` is what the encoder calls: in eager mode it runs the core; while exporting it
becomes a single `ortseq::LSGAttention` node (via `_LSGAttentionNode.symbolic`).

Memory and time are linear in the length: query block i sees G global keys, 2S sparse keys and
its 3B local keys, never the whole sequence (only the G global rows attend to everything).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ortseq.graphs import lsg
from ortseq.graphs.lsg import LSGSettings

MIN = torch.finfo(torch.float32).min


class LSGAttentionCore(nn.Module):
    """(query, key, value [n, H, G+T, dh], keep [n, T], lsh_planes [P]) -> context [n, H, G+T, dh]."""

    def __init__(self, settings: LSGSettings):
        super().__init__()
        self.s = settings

    def forward(self, query, key, value, keep, lsh_planes):
        g = self.s.num_global_tokens
        lsh_planes = self.s.split_lsh_planes(lsh_planes, query.shape[1], query.shape[-1])
        scale = math.sqrt(query.shape[-1])
        additive = (1.0 - keep) * MIN  # [n, T]
        q_local, k_local, v_local = query[:, :, g:], key[:, :, g:], value[:, :, g:]

        # Global rows attend to every token.
        full_mask = torch.cat([additive[:, :g] * 0.0, additive], dim=1)[:, None, None, :]
        global_rows = _attend(query[:, :, :g] @ key.transpose(-1, -2) / scale + full_mask, value)

        # Every other row attends, per block of B queries, to: globals, 2S sparse tokens, 3B local tokens.
        n, heads, t, dh = q_local.shape
        blocks = q_local.reshape(n, heads, -1, self.s.block_size, dh)  # [n, H, nb, B, dh]
        sparse = sparse_tokens(self.s, q_local, k_local, v_local, keep, additive, lsh_planes)
        k_blocks, v_blocks, m_blocks = block_keys(self.s, key, value, additive, sparse, blocks.shape[2])
        block_rows = _attend(blocks @ k_blocks.transpose(-1, -2) / scale + m_blocks.unsqueeze(-2), v_blocks)
        return torch.cat([global_rows, block_rows.reshape(n, heads, t, dh)], dim=2)


def _attend(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores, dim=-1) @ values


def block_keys(s: LSGSettings, key, value, additive, sparse, num_blocks):
    """Every query block's keys and values [n, H, nb, K, dh] and additive mask [n, H|1, nb, K], K = G + 2S + 3B.

    In key order: the G globals, the S sparse tokens left and the S right of the block's window, and
    the previous, own and next block. One Gather per tensor reads them from [zero, globals, sparse
    tokens, tokens] (positions outside the sequence read the zero row, masked with MIN, as the
    reference's zero padding is): no per-group score tensors to concatenate and split again.
    """
    g, b = s.num_global_tokens, s.block_size
    n, heads, _, dh = key.shape
    zero = key[:, :, :1] * 0.0
    keys, values = [zero, key], [zero, value]  # key/value hold the globals, then the T tokens
    masks = [additive[:, None, :1] * 0.0 + MIN, additive[:, None, :g] * 0.0]
    length = additive.shape[1]
    block_starts = torch.arange(num_blocks)[:, None]  # [nb, 1]
    groups = [(torch.arange(g) + 1).expand(num_blocks, g)]  # positions in the concatenation
    sparse_from = 1 + g + length
    if sparse is not None:
        k_sparse, v_sparse, m_sparse = sparse
        keys.append(k_sparse)
        values.append(v_sparse)
        step = s.block_size // s.sparsity_factor
        for offset in s.sparse_window_offsets():
            groups.append(_inside_or_zero(block_starts * step + offset + torch.arange(s.sparse_block_size),
                                          k_sparse.shape[2], sparse_from))  # fmt: skip
    groups.append(_inside_or_zero((block_starts - 1) * b + torch.arange(3 * b), length, 1 + g))
    masks.append(additive[:, None, :])
    if sparse is not None:
        masks.append(sparse[2])
    mask_heads = max(m.shape[1] for m in masks)
    mask = torch.cat([m.expand(-1, mask_heads, -1) for m in masks], dim=2)
    index = torch.cat(groups, dim=1)  # [nb, K]
    keys_per_block = index.shape[1]
    index = index.reshape(-1)

    def gather(x):
        return x.index_select(2, index).reshape(x.shape[0], x.shape[1], num_blocks, keys_per_block, -1)

    return (gather(torch.cat(keys, dim=2)), gather(torch.cat(values, dim=2)),
            gather(mask.unsqueeze(-1)).squeeze(-1))  # fmt: skip


def _inside_or_zero(positions, length: int, first: int):
    """positions in a sequence of `length` tokens -> their index in the concatenation (from `first`), or 0."""
    inside = (positions >= 0) & (positions < length)
    return torch.where(inside, positions + first, torch.zeros_like(positions))


def sparse_tokens(s: LSGSettings, q, k, v, keep, additive, lsh_planes):
    """(k, v, additive mask [n, H|1, T/f]) of the compressed sequence (graphs/lsg.py), or None."""
    if not s.has_sparse_tokens:
        return None
    if s.sparsity_factor == 1:
        return k, v, additive[:, None, :]
    kind = s.effective_type
    if kind in ("norm", "stride", "block_stride"):
        idx = _selected_tokens(s, kind, k, keep)
        heads, dh = k.shape[1], k.shape[-1]
        gather_rows = idx.unsqueeze(-1).expand(-1, -1, -1, dh)
        mask = additive[:, None, :].expand(-1, heads, -1).gather(2, idx)
        return k.gather(2, gather_rows), v.gather(2, gather_rows), mask
    if kind == "pooling":
        return _pooled_tokens(s.sparsity_factor, k, v, keep)
    if kind == "bos_pooling":
        return _bos_pooled_tokens(s.sparsity_factor, q, k, v, additive)
    if kind == "lsh":
        return _lsh_tokens(s, k, v, keep, lsh_planes)
    raise AssertionError(kind)


def _selected_tokens(s: LSGSettings, kind, k, keep):
    """Indices [n, H, T/f] of the tokens each head keeps."""
    n, heads, _, _ = k.shape
    f, b = s.sparsity_factor, s.block_size
    if kind == "norm":  # the B/f... largest-norm keys of every group of min(B, S); masked keys have norm 0
        group = min(b, s.sparse_block_size)
        norms = k.norm(dim=-1) * keep[:, None, :]
        norms = norms.reshape(n, heads, -1, group)
        largest = torch.topk(norms, group // f, dim=-1).indices
        offsets = (torch.arange(norms.shape[2]) * group)[None, None, :, None]
        return (largest + offsets).reshape(n, heads, -1)
    sparse_len = torch.arange(k.shape[2] // f)
    if kind == "stride":  # head h takes tokens j*f + (h mod f)
        idx = sparse_len[None, :] * f + (torch.arange(heads) % f)[:, None]
    else:  # block_stride: head h takes B/f contiguous tokens of every block, at offset h*B/f mod B
        width = b // f
        within = (torch.arange(width)[None, :] + torch.arange(heads)[:, None] * width) % b
        block_starts = torch.arange(k.shape[2] // b) * b
        idx = (block_starts[None, :, None] + within[:, None, :]).reshape(heads, -1)
    return idx.unsqueeze(0).expand(n, -1, -1)


def _pooled_tokens(f, k, v, keep):
    n, heads, _, dh = k.shape
    w = keep.reshape(n, 1, -1, f, 1)
    count = w.sum(dim=3)  # [n, 1, T/f, 1]
    pooled = [(x.reshape(n, heads, -1, f, dh) * w).sum(dim=3) / (count + 1e-6) for x in (k, v)]
    mask = (count.squeeze(-1) <= 0).to(k.dtype) * MIN
    return pooled[0], pooled[1], mask


def _bos_pooled_tokens(f, q, k, v, additive):
    """Groups of f tokens pooled with the attention weights of the first real token's query."""
    n, heads, _, dh = k.shape
    groups = [x.reshape(n, heads, -1, f, dh) for x in (k, v)]
    first_query = q[:, :, :1, :].unsqueeze(2)  # [n, H, 1, 1, dh]
    scores = first_query @ groups[0].transpose(-1, -2) / math.sqrt(dh)  # [n, H, T/f, 1, f]
    weights = torch.softmax(scores + additive.reshape(n, 1, -1, 1, f), dim=-1)
    pooled = [(weights @ x).squeeze(-2) for x in groups]
    # The reference's mask overflows (mean of MINs = -inf != MIN) and ends up all zeros: never masked.
    mask = additive.reshape(n, 1, -1, f)[..., 0] * 0.0
    return pooled[0], pooled[1], mask


def _lsh_tokens(s: LSGSettings, k, v, keep, lsh_planes):
    """Bucket every group's keys by random hyperplanes, round after round; the buckets' centroids remain."""
    n, heads, _, dh = k.shape
    group = min(s.block_size, s.sparse_block_size)
    w = keep.reshape(n, 1, -1, group, 1).expand(-1, heads, -1, -1, -1)
    k = k.reshape(n, heads, -1, group, dh) * w
    v = v.reshape(n, heads, -1, group, dh) * w
    for out, planes in zip(s.lsh_rounds(), lsh_planes):
        unit = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize
        proj = (unit * w.clamp(0, 1)) @ planes
        bucket = torch.cat([proj, -proj], dim=-1).argmax(dim=-1)  # [n, H, groups, tokens]
        # A one-hot product instead of scatter_add: same sums, and every execution provider has MatMul.
        onehot = (bucket.unsqueeze(-1) == torch.arange(out)).to(k.dtype).transpose(-1, -2)
        k, v, w = onehot @ k, onehot @ v, onehot @ w
    k, v = k / (w + 1e-8), v / (w + 1e-8)
    mask = (w.squeeze(-1) <= 0).to(k.dtype) * MIN
    return k.reshape(n, heads, -1, dh), v.reshape(n, heads, -1, dh), mask.reshape(n, heads, -1)


class _LSGAttentionNode(torch.autograd.Function):
    """Runs the core in eager mode; exports as one ortseq::LSGAttention node with the settings as attributes.

    (The TorchScript exporter accepts only tensors and plain scalars as arguments here.)
    """

    @staticmethod
    def forward(ctx, query, key, value, keep, lsh_planes, *settings):
        # Only ever called while exporting, where symbolic() replaces it: the tracer needs an output of
        # the right shape, not the values (the finished graph is verified against the eager module).
        # Running the core here would make the tracer record its ops too, which it fails on for lsh.
        return torch.zeros_like(query)

    @staticmethod
    def symbolic(g, query, key, value, keep, lsh_planes, *settings):
        attrs = {}
        for (name, _), value_ in zip(LSGSettings.__dataclass_fields__.items(), settings):
            attrs[f"{name}_{'s' if isinstance(value_, str) else 'i'}"] = value_
        out = g.op(f"{lsg.DOMAIN}::{lsg.OP_TYPE}", query, key, value, keep, lsh_planes, **attrs)
        out.setType(query.type())
        return out


def lsg_attention(core: LSGAttentionCore, query, key, value, keep, lsh_planes):
    if torch.onnx.is_in_onnx_export():
        return _LSGAttentionNode.apply(query, key, value, keep, lsh_planes, *core.s.attributes().values())
    return core(query, key, value, keep, lsh_planes)
