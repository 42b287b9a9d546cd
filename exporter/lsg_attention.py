"""ortseq::LSGAttention in plain torch ops, vectorised and written for tracing (graphs/lsg.py has the spec).

`LSGAttentionCore` is the op's body: the exporter traces it on its own into the ONNX function.
`lsg_attention` is what the encoder calls: in eager mode it runs the core; while exporting it
becomes a single `ortseq::LSGAttention` node (via `_LSGAttentionNode.symbolic`).

Memory and time are linear in the length: query block i sees G global keys, 2S sparse keys and
its 3B local keys, never the whole sequence (only the G global rows attend to everything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..graphs import lsg
from ..graphs.lsg import LSGSettings

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
        n, heads, _, dh = query.shape

        # Global rows attend to every token. (K Qᵀ, transposed back: the small operand is the transposed one.)
        full_mask = torch.cat([additive[:, :g] * 0.0, additive], dim=1)[:, None, None, :]
        scores = (key @ query[:, :, :g].transpose(-1, -2)).transpose(-1, -2) / scale
        global_rows = _attend(scores + full_mask, value)

        # Every other row attends, per block of B queries, to: globals, 2S sparse tokens, 3B local tokens.
        blocks = query[:, :, g:].reshape(n, heads, -1, self.s.block_size, dh)  # [n, H, nb, B, dh]
        sparse = sparse_tokens(self.s, query, key, value, keep, additive, lsh_planes)
        k_blocks, v_blocks, m_blocks = block_keys(self.s, key, value, additive, sparse, blocks.shape[2])
        block_rows = _attend(blocks @ k_blocks.transpose(-1, -2) / scale + m_blocks.unsqueeze(-2), v_blocks)
        return torch.cat([global_rows, block_rows.reshape(n, heads, -1, dh)], dim=2)


def _attend(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores, dim=-1) @ values


def block_keys(s: LSGSettings, key, value, additive, sparse, num_blocks):
    """Every query block's keys and values [n, H, nb, K, dh] and additive mask [n, H, nb, K], K = G + 2S + 3B.

    In key order: the G globals, the S sparse tokens left and the S right of the block's window, and
    the previous, own and next block, read by ONE Gather per tensor from the op's own key and value
    (and the computed sparse tokens, for the types that compute them). Slots outside the sequence
    read global 0 with mask MIN: exp(MIN - max) is 0 as for the reference's zero padding, so they add
    exactly nothing.
    """
    g, b = s.num_global_tokens, s.block_size
    n, heads, _, dh = key.shape
    length = additive.shape[1]
    starts = torch.arange(num_blocks)[:, None]  # [nb, 1]
    k_source, v_source = key, value  # [n, H, L, dh]: the globals, the T tokens, then any computed sparse tokens
    m_source = torch.cat([additive[:, :g] * 0.0, additive], dim=1)[:, None, :].expand(-1, heads, -1)  # [n, H, L]
    globals_ = torch.arange(g).expand(num_blocks, g)
    local = (starts - 1) * b + torch.arange(3 * b)
    groups = [(globals_, globals_ >= 0), (g + local, (local >= 0) & (local < length))]
    if sparse is not None:
        windows = torch.cat([starts * (b // s.sparsity_factor) + offset + torch.arange(s.sparse_block_size)
                             for offset in s.sparse_window_offsets()], dim=1)  # fmt: skip
        inside = (windows >= 0) & (windows < sparse.length)
        windows = torch.where(inside, windows, torch.zeros_like(windows))
        if sparse.selected is not None:  # picked tokens: per head, positions in the T tokens
            positions = g + sparse.selected.index_select(2, windows.reshape(-1)).reshape(
                -1, heads, num_blocks, windows.shape[1]
            )
        else:  # computed tokens: appended to the sources
            k_source, v_source = torch.cat([key, sparse.key], dim=2), torch.cat([value, sparse.value], dim=2)
            m_source = torch.cat([m_source, sparse.mask.expand(-1, heads, -1)], dim=2)
            positions = g + length + windows
        groups.insert(1, (positions, inside))
    positions = torch.cat([p.expand(n, heads, num_blocks, p.shape[-1]) for p, _ in groups], dim=3)  # [n, H, nb, K]
    inside = torch.cat([i for _, i in groups], dim=1)  # [nb, K]
    positions = torch.where(inside, positions, torch.zeros_like(positions))
    mask = torch.where(inside, m_source.gather(2, positions.reshape(n, heads, -1)).reshape(positions.shape), MIN)
    rows = (torch.arange(n * heads).reshape(n, heads, 1, 1) * k_source.shape[2] + positions).reshape(-1)

    def gather(source):
        return source.reshape(-1, dh).index_select(0, rows).reshape(n, heads, num_blocks, -1, dh)

    return gather(k_source), gather(v_source), mask


@dataclass
class SparseTokens:
    """The compressed sequence of `length` = T/f tokens: picked from the T tokens (`selected` positions
    [n|1, H, T/f]) or computed (`key`, `value` [n, H, T/f, dh] and additive `mask` [n, H|1, T/f])."""

    length: int
    selected: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def sparse_tokens(s: LSGSettings, query, key, value, keep, additive, lsh_planes) -> SparseTokens | None:
    """The compressed sequence (graphs/lsg.py) for query, key, value [n, H, G+T, dh], or None."""
    if not s.has_sparse_tokens:
        return None
    g, f = s.num_global_tokens, s.sparsity_factor
    length = keep.shape[1] // f
    if f == 1:
        return SparseTokens(length, selected=torch.arange(keep.shape[1]).expand(1, key.shape[1], -1))
    kind = s.effective_type
    if kind in ("norm", "stride", "block_stride"):
        return SparseTokens(length, selected=_selected_tokens(s, kind, key, keep))
    q, k, v = query[:, :, g:], key[:, :, g:], value[:, :, g:]
    if kind == "pooling":
        computed = _pooled_tokens(f, k, v, keep)
    elif kind == "bos_pooling":
        computed = _bos_pooled_tokens(f, q, k, v, additive)
    elif kind == "lsh":
        computed = _lsh_tokens(s, k, v, keep, lsh_planes)
    else:
        raise AssertionError(kind)
    return SparseTokens(length, key=computed[0], value=computed[1], mask=computed[2])


def _selected_tokens(s: LSGSettings, kind, key, keep):
    """Positions [n|1, H, T/f] (in the T tokens) of the tokens each head keeps."""
    n, heads, _, _ = key.shape
    f, b, t = s.sparsity_factor, s.block_size, keep.shape[1]
    if kind == "norm":  # the B/f... largest-norm keys of every group of min(B, S); masked keys have norm 0
        group = min(b, s.sparse_block_size)
        norms = key.norm(dim=-1)[:, :, s.num_global_tokens :] * keep[:, None, :]
        norms = norms.reshape(n, heads, -1, group)
        largest = torch.topk(norms, group // f, dim=-1).indices
        offsets = (torch.arange(norms.shape[2]) * group)[None, None, :, None]
        return (largest + offsets).reshape(n, heads, -1)
    sparse_len = torch.arange(t // f)
    if kind == "stride":  # head h takes tokens j*f + (h mod f)
        idx = sparse_len[None, :] * f + (torch.arange(heads) % f)[:, None]
    else:  # block_stride: head h takes B/f contiguous tokens of every block, at offset h*B/f mod B
        width = b // f
        within = (torch.arange(width)[None, :] + torch.arange(heads)[:, None] * width) % b
        block_starts = torch.arange(t // b) * b
        idx = (block_starts[None, :, None] + within[:, None, :]).reshape(heads, -1)
    return idx.unsqueeze(0)


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
