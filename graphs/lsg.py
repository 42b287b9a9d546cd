"""The LSG attention op (``ortseq::LSGAttention``): its settings, its ONNX function, and a numpy reference.

LSG-Pegasus replaces the encoder's self-attention with Local + Sparse + Global attention
(shared/LSG.md describes the reference code). In an ortseq encoder graph each layer's attention
core is ONE node of our own domain::

    ortseq::LSGAttention(query, key, value, keep, lsh_planes) -> context

    query, key, value  [n, H, G + T, dh]  the G global tokens first, then T = a multiple of
                       block_size, at least 2 * block_size (the encoder pads the sequence to it)
    keep               [n, T] float 0/1   which of the T tokens are real (globals are always seen)
    lsh_planes         [P] float: lsh's random hyperplanes, every round's [1, H, 1, dh, out // 2]
                       tensor flattened and concatenated in round order (lsh_num_pre_rounds rounds
                       with out = min(B, S), then one with out = min(B, S) / f); empty (P = 0)
                       for the other sparsity types
    context            [n, H, G + T, dh]

with attributes block_size, sparse_block_size, sparsity_factor, sparsity_type (string),
num_global_tokens, lsh_num_pre_rounds. The node is defined by an ONNX *function* in the model
whose body uses only standard ops, so any runtime and execution provider runs it; a fused kernel
can later replace the body without changing the graph. The exporter generates the body for the
node's attribute values (one function per model: every layer shares the settings).

`lsg_attention_reference` below is a plain numpy, block-by-block statement of the same op: the
executable specification the traced implementation (exporter/lsg_attention.py) is tested against.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

DOMAIN = "ortseq"
OP_TYPE = "LSGAttention"
OPSET_VERSION = 1
OP_INPUTS = ("query", "key", "value", "keep", "lsh_planes")
OP_OUTPUTS = ("context",)

# The two tensors an LSG-Pegasus checkpoint holds beyond Pegasus' (as lsg-converter saves them): the
# learned global tokens, and the encoder's position table (read from the file: see exporter/families/lsg_pegasus.py).
GLOBALS_KEY = "model.encoder.global_embeddings.weight"
POSITIONS_KEY = "model.encoder.embed_positions.weight"

SPARSITY_TYPES = ("none", "norm", "pooling", "lsh", "stride", "block_stride", "bos_pooling")
MIN = float(np.finfo(np.float32).min)  # the reference masks with this finite value, not -inf


class LSGConfigError(ValueError):
    """LSG settings the reference itself rejects or cannot run."""


@dataclass(frozen=True)
class LSGSettings:
    block_size: int
    sparse_block_size: int
    sparsity_factor: int
    sparsity_type: str
    num_global_tokens: int
    lsh_num_pre_rounds: int

    @classmethod
    def from_config(cls, config: dict) -> LSGSettings:
        """Read an LSG config.json the way LSGPegasusConfig does (same defaults, same clamping)."""
        sparsity_type = config.get("sparsity_type", "norm") or "none"
        if sparsity_type not in SPARSITY_TYPES:
            warnings.warn(f"sparsity_type {sparsity_type!r} is unknown; the reference falls back to none", stacklevel=2)
            sparsity_type = "none"
        settings = cls(
            block_size=int(config.get("block_size", 128)),
            sparse_block_size=int(config.get("sparse_block_size", 128) or 0),
            sparsity_factor=int(config.get("sparsity_factor", 2)),
            sparsity_type=sparsity_type,
            num_global_tokens=min(max(int(config.get("num_global_tokens", 1)), 1), 512),
            lsh_num_pre_rounds=int(config.get("lsh_num_pre_rounds", 1)),
        )
        settings.check()
        return settings

    def check(self) -> None:
        b, f = self.block_size, self.sparsity_factor
        if b < 1:
            raise LSGConfigError(f"block_size must be positive, got {b}")
        if self.has_sparse_tokens:
            if b % f:
                raise LSGConfigError(f"sparsity_factor {f} must divide block_size {b}")
            step = b // f
            if step % 2 and step != 1:
                # The reference's sparse windows are broken for this case (it builds nb - 1 windows).
                raise LSGConfigError(f"block_size / sparsity_factor = {step} is odd: the reference cannot run it")

    @property
    def has_sparse_tokens(self) -> bool:
        return bool(self.sparse_block_size) and self.sparsity_factor > 0 and self.sparsity_type != "none"

    @property
    def effective_type(self) -> str:
        """lsh with sparsity_factor == sparse_block_size is bos_pooling in the reference."""
        if self.sparsity_type == "lsh" and self.sparsity_factor == self.sparse_block_size:
            return "bos_pooling"
        return self.sparsity_type

    def padded_length(self, length: int) -> int:
        """T for `length` real tokens: a multiple of block_size, at least two blocks.

        The reference pads to a multiple of block_size only above 2 blocks and runs full attention
        at or below; with at most 2 blocks every key is in every local window and every sparse
        window falls outside the sequence, so LSG over 2 (padded) blocks is that same full attention.
        """
        b = self.block_size
        return max(2 * b, -(-length // b) * b)

    def lsh_rounds(self) -> list[int]:
        """Bucket count of each LSH round, in draw order (empty unless lsh is in effect)."""
        if self.effective_type != "lsh" or self.sparsity_factor == 1 or not self.has_sparse_tokens:
            return []
        group = min(self.block_size, self.sparse_block_size)
        return [group] * self.lsh_num_pre_rounds + [group // self.sparsity_factor]

    def lsh_plane_shapes(self, heads: int, head_dim: int) -> list[tuple[int, ...]]:
        return [(1, heads, 1, head_dim, out // 2) for out in self.lsh_rounds()]

    def split_lsh_planes(self, flat, heads: int, head_dim: int) -> list:
        """The op's flat lsh_planes input -> one [1, H, 1, dh, out // 2] array per round (numpy or torch)."""
        planes, start = [], 0
        for shape in self.lsh_plane_shapes(heads, head_dim):
            size = math.prod(shape)
            planes.append(flat[start : start + size].reshape(shape))
            start += size
        if start != flat.shape[0]:
            raise ValueError(f"lsh_planes has {flat.shape[0]} values, the settings need {start}")
        return planes

    def attributes(self) -> dict:
        return asdict(self)

    def sparse_window_offsets(self) -> tuple[int, int]:
        """(left, right): sparse index of the first token of query block i's two sparse windows,
        minus i * (block_size / sparsity_factor). Copied from the reference's pad + unfold + slice."""
        b, s, f = self.block_size, self.sparse_block_size, self.sparsity_factor
        step = b // f
        odd = step % 2
        size = 6 * s
        pad = (size - step) // 2 + odd
        u = (size - 3 * b // f) // 2 + odd
        return u - s - pad, size - (u + odd) - pad


# ---------------------------------------------------------------------------------------------
# numpy reference, one query block at a time


def lsg_attention_reference(q, k, v, keep, lsh_planes, settings: LSGSettings) -> np.ndarray:
    """The op's output for one call, computed the slow, obvious way (float64 inside)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    g, b = settings.num_global_tokens, settings.block_size
    n, heads, total, dh = q.shape
    lsh_planes = settings.split_lsh_planes(np.asarray(lsh_planes, dtype=np.float64), heads, dh)
    t = total - g
    if t % b or t < 2 * b:
        raise ValueError(f"T = {t} must be a multiple of block_size {b} and at least 2 blocks")
    additive = np.where(np.asarray(keep) > 0, 0.0, MIN)  # [n, T]
    out = np.zeros_like(q)
    full_mask = np.concatenate([np.zeros((n, g)), additive], axis=1)
    for i in range(n):
        for h in range(heads):
            out[i, h, :g] = _softmax_attend(q[i, h, :g], k[i, h], v[i, h], full_mask[i])
    sparse = _sparse_tokens(q[:, :, g:], k[:, :, g:], v[:, :, g:], additive, settings, lsh_planes)
    left_offset, right_offset = settings.sparse_window_offsets()
    step = b // settings.sparsity_factor if settings.has_sparse_tokens else 0
    for i in range(n):
        for h in range(heads):
            for block in range(t // b):
                keys, values, mask = [k[i, h, :g]], [v[i, h, :g]], [np.zeros(g)]
                if sparse is not None:
                    for offset in (left_offset, right_offset):
                        idx = block * step + offset + np.arange(settings.sparse_block_size)
                        _take(sparse, i, h, idx, keys, values, mask)
                idx = np.arange((block - 1) * b, (block + 2) * b)
                _take((k[:, :, g:], v[:, :, g:], additive[:, None, :]), i, h, idx, keys, values, mask)
                rows = slice(g + block * b, g + (block + 1) * b)
                out[i, h, rows] = _softmax_attend(
                    q[i, h, rows], np.concatenate(keys), np.concatenate(values), np.concatenate(mask)
                )
    return out.astype(np.float32)


def _softmax_attend(q, k, v, mask):
    scores = q @ k.T / math.sqrt(q.shape[-1]) + mask
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (scores / scores.sum(axis=-1, keepdims=True)) @ v


def _take(tokens, i, h, idx, keys, values, mask):
    """Append tokens[idx] of row i, head h; positions outside the sequence are zeros with mask MIN."""
    k, v, m = tokens
    inside = (idx >= 0) & (idx < k.shape[2])
    safe = np.where(inside, idx, 0)
    keys.append(np.where(inside[:, None], k[i, h, safe], 0.0))
    values.append(np.where(inside[:, None], v[i, h, safe], 0.0))
    mask.append(np.where(inside, m[i, min(h, m.shape[1] - 1), safe], MIN))


def _sparse_tokens(q, k, v, additive, s: LSGSettings, lsh_planes):
    """(keys, values, additive mask [n, H or 1, T/f]) of the sparse sequence, or None."""
    if not s.has_sparse_tokens:
        return None
    f = s.sparsity_factor
    n, heads, t, dh = k.shape
    keep = (additive == 0).astype(np.float64)
    if f == 1:
        return k, v, additive[:, None, :]
    kind = s.effective_type
    if kind in ("norm", "stride", "block_stride"):
        idx = _selected_tokens(kind, k, keep, s)  # [n, H, T/f]
        pick = np.take_along_axis
        return (
            pick(k, idx[..., None], axis=2),
            pick(v, idx[..., None], axis=2),
            pick(np.broadcast_to(additive[:, None, :], (n, heads, t)), idx, axis=2),
        )
    if kind == "pooling":
        w = keep.reshape(n, 1, t // f, f, 1)
        count = w.sum(axis=3)  # [n, 1, T/f, 1]
        pooled = [(x.reshape(n, heads, t // f, f, dh) * w).sum(axis=3) / (count + 1e-6) for x in (k, v)]
        return pooled[0], pooled[1], np.where(count[..., 0] > 0, 0.0, MIN)
    if kind == "bos_pooling":
        groups = [x.reshape(n, heads, t // f, f, dh) for x in (k, v)]
        scores = np.einsum("nhd,nhgfd->nhgf", q[:, :, 0], groups[0]) / math.sqrt(dh)
        scores = scores + additive.reshape(n, 1, t // f, f)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        pooled = [np.einsum("nhgf,nhgfd->nhgd", weights, x) for x in groups]
        # The reference's mask is the mean of f MIN values, which overflows to -inf != MIN, so it
        # zeroes every entry: the sparse tokens are never masked.
        return pooled[0], pooled[1], np.zeros((n, 1, t // f))
    if kind == "lsh":
        return _lsh_tokens(k, v, keep, s, lsh_planes)
    raise AssertionError(kind)


def _selected_tokens(kind, k, keep, s: LSGSettings):
    n, heads, t, _ = k.shape
    f, b = s.sparsity_factor, s.block_size
    if kind == "norm":
        group = min(b, s.sparse_block_size)
        norms = np.linalg.norm(k, axis=-1) * keep[:, None, :]
        norms = norms.reshape(n, heads, t // group, group)
        largest = np.argsort(norms, axis=-1, kind="stable")[..., group - group // f :]
        return (largest + (np.arange(t // group) * group)[:, None]).reshape(n, heads, -1)
    if kind == "stride":
        idx = np.arange(t // f)[None, :] * f + (np.arange(heads) % f)[:, None]
    else:  # block_stride: head h takes B/f contiguous tokens of every block, at offset h*B/f mod B
        width = b // f
        within = (np.arange(width)[None, :] + np.arange(heads)[:, None] * width) % b
        idx = (np.arange(t // b)[None, :, None] * b + within[:, None, :]).reshape(heads, -1)
    return np.broadcast_to(idx, (n, heads, idx.shape[-1]))


def _lsh_tokens(k, v, keep, s: LSGSettings, lsh_planes):
    n, heads, t, dh = k.shape
    group = min(s.block_size, s.sparse_block_size)
    w = np.broadcast_to(keep.reshape(n, 1, t // group, group, 1), (n, heads, t // group, group, 1))
    k = k.reshape(n, heads, t // group, group, dh) * w
    v = v.reshape(n, heads, t // group, group, dh) * w
    for out, planes in zip(s.lsh_rounds(), lsh_planes):
        unit = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-12)
        proj = (unit * np.clip(w, 0, 1)) @ planes
        bucket = np.concatenate([proj, -proj], axis=-1).argmax(axis=-1)  # [n, H, groups, tokens]
        onehot = (bucket[..., None] == np.arange(out)).astype(np.float64)
        k, v, w = (np.swapaxes(onehot, -1, -2) @ x for x in (k, v, w))
    k, v = k / (w + 1e-8), v / (w + 1e-8)
    mask = np.where(w[..., 0] > 0, 0.0, MIN).reshape(n, heads, -1)
    return k.reshape(n, heads, -1, dh), v.reshape(n, heads, -1, dh), mask


# ---------------------------------------------------------------------------------------------
# the ONNX function


def function_proto(body, settings: LSGSettings, opset: int):
    """Turn a traced graph of the op's body into the model-local function ``ortseq::LSGAttention``.

    `body` is an onnx.GraphProto computing the op from inputs/outputs named OP_INPUTS/OP_OUTPUTS
    (the tracer drops inputs a body does not read, e.g. lsh_planes; the function still declares
    them); its initializers become Constant nodes (functions hold no initializers).
    """
    from onnx import helper

    constants = [helper.make_node("Constant", [], [init.name], value=init) for init in body.initializer]
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=list(OP_INPUTS),
        outputs=list(OP_OUTPUTS),
        nodes=[*constants, *body.node],
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(settings.attributes()),
    )
