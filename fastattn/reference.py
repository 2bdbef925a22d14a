"""Readable eager PyTorch references: the correctness oracle of the tests (run on float64 inputs).

Each function states an op's math plainly, with torch autograd for the gradients. dropout_keep is
the torch path's dropout keep-mask (fastattn.torch_path), which the tests replay.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ---- layer norm / rms norm: the math ----


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim of x (..., N); weight, bias (N,)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).square().mean(dim=-1, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dim of x (..., N); weight (N,)."""
    y = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


# ---- dropout ----


def dropout_keep(seed: Tensor, shape: tuple[int, ...], p: float, device) -> Tensor:
    """The torch path's dropout keep-mask: a function of (seed, shape), so the backward redraws
    the forward's mask. seed: the (1,) int64 tensor the kernels read; that path reads it on
    the host. (The Triton kernels draw theirs with Philox; the two paths differ.)"""
    gen = torch.Generator().manual_seed(int(seed.item()))
    return (torch.rand(shape, generator=gen) >= p).to(device)


# ---- attention: the math ----


def _visible_pairs(L: int, S: int, is_causal: bool, attn_mask: Tensor | None, device,
                   window: tuple[int, int] = (-1, -1), bottom_right: bool = False) -> Tensor:
    """Boolean, broadcastable to the (..., L, S) scores: the (query, key) pairs that take part.
    Query i sees key j when i + off - left <= j <= i + off + right (off = S - L bottom-right
    aligned, else 0; a window side of -1 is unbounded; causal is right = 0)."""
    left, right = window
    right = 0 if is_causal else right
    rel = _relative_positions(L, S, bottom_right, device)  # j - (i + off)
    visible = torch.ones(L, S, dtype=torch.bool, device=device)
    if right >= 0:
        visible = visible & (rel <= right)
    if left >= 0:
        visible = visible & (rel >= -left)
    if attn_mask is not None:
        visible = visible & (attn_mask if attn_mask.dtype == torch.bool
                             else attn_mask > float("-inf"))
    return visible


def _relative_positions(L: int, S: int, bottom_right: bool, device) -> Tensor:
    """(L, S) int64: key index minus aligned query index, j - (i + off), off = S - L bottom-right
    aligned (the last query sees the last key), else 0 (top-left, torch's causal)."""
    off = S - L if bottom_right else 0
    return (torch.arange(S, device=device)[None, :]
            - torch.arange(L, device=device)[:, None] - off)


def _scores(q: Tensor, k: Tensor, scale: float, attn_mask: Tensor | None, softcap: float = 0.0,
            alibi: Tensor | None = None, bottom_right: bool = False) -> Tensor:
    """q @ k^T * scale, capped to softcap * tanh(s / softcap) (softcap > 0), minus the ALiBi bias
    slope * |j - (i + off)| (alibi: slopes broadcastable to (B, H)), plus attn_mask when it is an
    additive (float) one: the order flash-attn applies them in."""
    s = q @ k.transpose(-2, -1) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        rel = _relative_positions(*s.shape[-2:], bottom_right, q.device).abs().to(s.dtype)
        s = s - alibi.to(s.dtype).expand(s.shape[:-2])[..., None, None] * rel
    return s + attn_mask if attn_mask is not None and attn_mask.dtype != torch.bool else s


def _kept_scale(dropout_p: float) -> float:
    """Factor of the probabilities dropout keeps: 1 / (1 - p), and 0 when p == 1 (none kept)."""
    return 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                                 scale: float | None = None, attn_mask: Tensor | None = None,
                                 dropout_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, *, window: tuple[int, int] = (-1, -1),
                                 bottom_right: bool = False, softcap: float = 0.0,
                                 alibi: Tensor | None = None,
                                 sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """dropout(softmax(q @ k^T * scale + mask)) @ v and the row logsumexp of the masked scores.

    q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev); query head h reads kv head
    h // (Hq // Hkv). is_causal: query i sees keys j <= i (top-left aligned; bottom_right:
    j <= i + S - L). attn_mask, applied together with is_causal, broadcastable to (B, Hq, L, S):
    bool (True = takes part) or float (added to the scores; -inf hides a pair). A row that sees
    no key gives out 0, lse -inf and zero gradients. dropout_mask: None or a bool keep-mask
    broadcastable to (B, Hq, L, S); kept probabilities are scaled by 1 / (1 - dropout_p).

    Score modifiers (flash-attn's): window (left, right), -1 unbounded, aligned as the causal
    mask; softcap > 0 caps the scaled scores to softcap * tanh(s / softcap); alibi (Hq,) or
    (B, Hq) slopes subtract slope * |j - (i + off)|; sinks (Hq,): one more logit per head in
    each row's softmax, with no value (the lse includes it; a row that sees no key gives out 0
    and lse = the sink). Returns out (B, Hq, L, Ev) and lse (B, Hq, L).
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, Hkv, S, E) -> (B, Hq, S, E)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = _scores(q, k, scale, attn_mask, softcap, alibi, bottom_right)  # (B, Hq, L, S)
    visible = _visible_pairs(*s.shape[-2:], is_causal, attn_mask, q.device, window,
                             bottom_right).expand(s.shape)
    s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # one more column per row: the head's sink logit, with no value
        sink = sinks.to(s.dtype)[:, None, None].expand(*s.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat([s, sink], dim=-1), dim=-1)  # (B, Hq, L)
        p = torch.exp(s - lse[..., None])
    else:
        seen = visible.any(dim=-1, keepdim=True)  # (B, Hq, L, 1): rows that see some key
        s = s.masked_fill(~seen, 0.0)  # finite stand-ins: the softmax and its gradient stay finite
        lse = torch.logsumexp(s, dim=-1).masked_fill(~seen[..., 0], float("-inf"))  # (B, Hq, L)
        p = torch.softmax(s, dim=-1).masked_fill(~seen, 0.0)
    if dropout_mask is not None:
        p = p * dropout_mask * _kept_scale(dropout_p)
    return p @ v, lse
