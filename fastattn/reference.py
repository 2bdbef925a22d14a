"""Readable eager PyTorch references: the correctness oracle of the tests, and the implementation
used for CPU tensors when Triton's interpreter is off.

The first functions state each op's math plainly, with torch autograd for the gradients; run them
on float64 inputs to get the oracle. The `*_fwd` / `*_bwd` functions below them have exactly the
signatures and outputs of the Triton launchers in fastattn.kernels, so that the custom ops can fall
back to them.
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


# ---- layer norm / rms norm: launcher-shaped fallbacks (see kernels/layer_norm.py) ----


def norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
             eps: float, is_rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.layer_norm.norm_fwd: x (M, N) -> y, h, mean, rstd."""
    h = x + residual if residual is not None else x
    hf = h.float()
    if is_rms:
        mean = hf.new_empty((0,))
        rstd = torch.rsqrt(hf.square().mean(dim=-1) + eps)
        y = hf * rstd[:, None]
    else:
        mean = hf.mean(dim=-1)
        rstd = torch.rsqrt((hf - mean[:, None]).square().mean(dim=-1) + eps)
        y = (hf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    h_out = h.clone() if residual is not None else x.new_empty((0,))
    return y.to(x.dtype), h_out, mean, rstd


def dropout_keep(seed: int, shape: tuple[int, ...], p: float, device) -> Tensor:
    """The reference path's dropout keep-mask: a function of (seed, shape), so the backward redraws
    the forward's mask. (The Triton kernels draw theirs with Philox; the two paths differ.)"""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) >= p).to(device)


def norm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
             rstd: Tensor, dh: Tensor | None, is_rms: bool, compute_dweight: bool,
             compute_dbias: bool, dropout_p: float = 0.0,
             dropout_seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.layer_norm.norm_bwd, from the saved statistics:
    xhat = (x - mean) * rstd, g = weight * dy, dx = rstd * (g - xhat * mean(g * xhat) - mean(g))."""
    dyf, rstd = dy.float(), rstd[:, None]
    if dropout_p > 0.0:
        keep = dropout_keep(dropout_seed, tuple(dy.shape), dropout_p, dy.device)
        dyf = torch.where(keep, dyf / max(1 - dropout_p, 1e-30), 0.0)
    xhat = x.float() * rstd if is_rms else (x.float() - mean[:, None]) * rstd
    g = dyf * weight.float() if weight is not None else dyf
    dx = g - xhat * (g * xhat).mean(dim=-1, keepdim=True)
    if not is_rms:
        dx = dx - g.mean(dim=-1, keepdim=True)
    dx = dx * rstd
    if dh is not None:
        dx = dx + dh.float()
    dweight = (dyf * xhat).sum(dim=0).to(weight.dtype) if compute_dweight else x.new_empty((0,))
    dbias = dyf.sum(dim=0).to(bias.dtype) if compute_dbias else x.new_empty((0,))
    return dx.to(x.dtype), dweight, dbias


# ---- attention: the math ----


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                                 scale: float | None = None) -> tuple[Tensor, Tensor]:
    """softmax(q @ k^T * scale) @ v and the row logsumexp of the scaled scores.

    q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev); query head h reads kv head
    h // (Hq // Hkv). is_causal: query i sees keys j <= i (top-left aligned). A row that sees no
    key gives out 0 and lse -inf. Returns out (B, Hq, L, Ev) and lse (B, Hq, L).
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, Hkv, S, E) -> (B, Hq, S, E)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale  # (B, Hq, L, S)
    if is_causal:
        L, S = s.shape[-2:]
        visible = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hq, L)
    # exp(s - lse) is softmax(s); rows with lse = -inf (nothing visible) get p = 0, not NaN.
    p = torch.exp(s - lse[..., None].masked_fill(lse[..., None] == float("-inf"), 0.0))
    return p @ v, lse


# ---- attention: launcher-shaped fallbacks (see kernels/attention.py) ----


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float,
                  is_causal: bool) -> tuple[Tensor, Tensor]:
    """Same contract as fastattn.kernels.attention.attention_fwd: out (B, Hq, L, Ev) in q's dtype
    (contiguous) and lse (B, Hq, L) fp32, computed in fp32."""
    out, lse = scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal, scale)
    return out.to(q.dtype).contiguous(), lse.contiguous()


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float, is_causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.attention.attention_bwd, FlashAttention-2's formulas:
    P = exp(s - lse), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K,
    dK = scale dS^T Q; dK, dV summed over the query heads that share a kv head."""
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    kr, vr = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    s = qf @ kr.transpose(-2, -1) * scale  # (B, Hq, L, S)
    p = torch.exp(s - lse[..., None])
    if is_causal:
        p = p.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), 0.0)
    p = p.masked_fill(lse[..., None] == float("-inf"), 0.0)  # rows that see no key
    delta = (dof * out.float()).sum(dim=-1, keepdim=True)  # (B, Hq, L, 1)
    ds = p * (dof @ vr.transpose(-2, -1) - delta)
    dq = ds @ kr * scale
    dk = (ds.transpose(-2, -1) @ qf * scale).view(B, Hkv, group, S, -1).sum(dim=2)
    dv = (p.transpose(-2, -1) @ dof).view(B, Hkv, group, S, -1).sum(dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---- embeddings: launcher-shaped fallbacks (see kernels/embedding.py) ----
# (The math is torch's own: F.embedding, and sums of it; the tests use those in float64.)


def embedding_fwd(ids: Tensor, word: Tensor, pos_ids: Tensor | None, pos: Tensor | None,
                  type_ids: Tensor | None, type_: Tensor | None, ln_weight: Tensor | None,
                  ln_bias: Tensor | None, eps: float, dropout_p: float,
                  seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.embedding.embedding_fwd."""
    h = word[ids].float()
    if pos is not None:
        h = h + pos[pos_ids].float()
    if type_ is not None:
        h = h + type_[type_ids].float()
    empty = h.new_empty((0,))
    if ln_weight is None:
        return h.to(word.dtype), word.new_empty((0,)), empty, empty.clone()
    h = h.to(word.dtype)
    y, _, mean, rstd = norm_fwd(h, ln_weight, ln_bias, None, eps, False)
    if dropout_p > 0.0:
        keep = dropout_keep(seed, tuple(y.shape), dropout_p, y.device)
        y = torch.where(keep, y.float() / max(1 - dropout_p, 1e-30), 0.0).to(y.dtype)
    return y, h, mean, rstd


def embedding_bwd(ids: Tensor, dout: Tensor, num_embeddings: int, dtype: torch.dtype,
                  padding_idx: int, scale_grad_by_freq: bool) -> Tensor:
    """Same contract as fastattn.kernels.embedding.embedding_bwd: dW[v] = sum of dout[t] over
    ids[t] == v, in fp32."""
    ids = ids.long()
    dw = torch.zeros((num_embeddings, dout.shape[1]), dtype=torch.float32, device=dout.device)
    dw.index_add_(0, ids, dout.float())
    if scale_grad_by_freq:
        counts = torch.bincount(ids, minlength=num_embeddings).clamp(min=1)
        dw = dw / counts[:, None]
    if padding_idx >= 0:
        dw[padding_idx] = 0
    return dw.to(dtype)
