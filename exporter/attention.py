"""Attention building blocks shared by every family's export modules (plain torch ops only).

They are written for tracing: every shape comes from a tensor, so the exported graph stays
dynamic in batch, rows (batch * beams), source length and past length.
"""

from __future__ import annotations

import torch


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
