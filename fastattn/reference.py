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


def dropout_keep(seed: Tensor, shape: tuple[int, ...], p: float, device) -> Tensor:
    """The reference path's dropout keep-mask: a function of (seed, shape), so the backward redraws
    the forward's mask. seed: the (1,) int64 tensor the kernels read; this eager path reads it on
    the host. (The Triton kernels draw theirs with Philox; the two paths differ.)"""
    gen = torch.Generator().manual_seed(int(seed.item()))
    return (torch.rand(shape, generator=gen) >= p).to(device)


def norm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
             rstd: Tensor, dh: Tensor | None, is_rms: bool, compute_dweight: bool,
             compute_dbias: bool, dropout_p: float = 0.0,
             dropout_seed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
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


def _visible_pairs(L: int, S: int, is_causal: bool, attn_mask: Tensor | None, device) -> Tensor:
    """Boolean, broadcastable to the (..., L, S) scores: the (query, key) pairs that take part."""
    visible = torch.ones(L, S, dtype=torch.bool, device=device)
    if is_causal:
        visible = visible.tril()
    if attn_mask is not None:
        visible = visible & (attn_mask if attn_mask.dtype == torch.bool
                             else attn_mask > float("-inf"))
    return visible


def _scores(q: Tensor, k: Tensor, scale: float, attn_mask: Tensor | None) -> Tensor:
    """q @ k^T * scale, plus attn_mask when it is an additive (float) one."""
    s = q @ k.transpose(-2, -1) * scale
    return s + attn_mask if attn_mask is not None and attn_mask.dtype != torch.bool else s


def _kept_scale(dropout_p: float) -> float:
    """Factor of the probabilities dropout keeps: 1 / (1 - p), and 0 when p == 1 (none kept)."""
    return 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                                 scale: float | None = None, attn_mask: Tensor | None = None,
                                 dropout_mask: Tensor | None = None,
                                 dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """dropout(softmax(q @ k^T * scale + mask)) @ v and the row logsumexp of the masked scores.

    q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev); query head h reads kv head
    h // (Hq // Hkv). is_causal: query i sees keys j <= i (top-left aligned). attn_mask, applied
    together with is_causal, broadcastable to (B, Hq, L, S): bool (True = takes part) or float
    (added to the scores; -inf hides a pair). A row that sees no key gives out 0, lse -inf and zero
    gradients. dropout_mask: None or a bool keep-mask broadcastable to (B, Hq, L, S); kept
    probabilities are scaled by 1 / (1 - dropout_p). Returns out (B, Hq, L, Ev) and lse (B, Hq, L).
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, Hkv, S, E) -> (B, Hq, S, E)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = _scores(q, k, scale, attn_mask)  # (B, Hq, L, S)
    visible = _visible_pairs(*s.shape[-2:], is_causal, attn_mask, q.device).expand(s.shape)
    s = s.masked_fill(~visible, float("-inf"))
    seen = visible.any(dim=-1, keepdim=True)  # (B, Hq, L, 1): rows that see some key
    s = s.masked_fill(~seen, 0.0)  # finite stand-ins: the softmax and its gradient stay finite
    lse = torch.logsumexp(s, dim=-1).masked_fill(~seen[..., 0], float("-inf"))  # (B, Hq, L)
    p = torch.softmax(s, dim=-1).masked_fill(~seen, 0.0)
    if dropout_mask is not None:
        p = p * dropout_mask * _kept_scale(dropout_p)
    return p @ v, lse


# ---- attention: launcher-shaped fallbacks (see kernels/attention.py) ----


def _float_mask(attn_mask: Tensor | None) -> Tensor | None:
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return attn_mask
    return attn_mask.float()


def _attention_dropout(seed: Tensor | None, q: Tensor, k: Tensor,
                       dropout_p: float) -> Tensor | None:
    """The (B, Hq, L, S) keep-mask of this path (see dropout_keep), None without dropout."""
    if dropout_p == 0.0:
        return None
    return dropout_keep(seed, (*q.shape[:3], k.shape[2]), dropout_p, q.device)


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool,
                  attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                  seed: Tensor | None = None, residual: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.attention.attention_fwd: out (B, Hq, L, Ev) in q's dtype
    (contiguous), lse (B, Hq, L) fp32, computed in fp32, and out_lo (out32 - out, for fp16 / bf16
    with residual=True; else empty)."""
    out32, lse = scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal, scale,
                                              _float_mask(attn_mask),
                                              _attention_dropout(seed, q, k, dropout_p), dropout_p)
    out = out32.to(q.dtype).contiguous()
    keep_lo = residual and q.dtype != torch.float32 and out.numel() > 0
    out_lo = (out32 - out.float()).to(q.dtype) if keep_lo else q.new_empty((0,))
    return out, lse.contiguous(), out_lo


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float, is_causal: bool, attn_mask: Tensor | None = None,
                  dropout_p: float = 0.0, seed: Tensor | None = None,
                  mask_grad: bool = False,
                  out_lo: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.attention.attention_bwd, FlashAttention-2's formulas with
    Z = dropout keep-mask / (1 - p) (1 without dropout): P = exp(s - lse), dV = (P Z)^T dO,
    dS = P * (dO V^T Z - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q, d(mask) = dS; dK, dV
    summed over the query heads that share a kv head, d(mask) over the mask's broadcast dims."""
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qf, kf, vf, dof, mask = q.float(), k.float(), v.float(), do.float(), _float_mask(attn_mask)
    kr, vr = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    s = _scores(qf, kr, scale, mask)  # (B, Hq, L, S)
    hidden = ~_visible_pairs(L, S, is_causal, mask, q.device) | (lse == float("-inf"))[..., None]
    p = torch.exp(s - lse[..., None]).masked_fill(hidden, 0.0)  # rows that see no key: P = 0
    keep = _attention_dropout(seed, q, k, dropout_p)
    z = keep * _kept_scale(dropout_p) if keep is not None else 1.0
    out32 = out.float() + out_lo.float() if out_lo is not None and out_lo.numel() else out.float()
    delta = (dof * out32).sum(dim=-1, keepdim=True)  # (B, Hq, L, 1)
    ds = p * (dof @ vr.transpose(-2, -1) * z - delta)
    dq = ds @ kr * scale
    dk = (ds.transpose(-2, -1) @ qf * scale).view(B, Hkv, group, S, -1).sum(dim=2)
    dv = ((p * z).transpose(-2, -1) @ dof).view(B, Hkv, group, S, -1).sum(dim=2)
    dmask = (ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if mask_grad
             else q.new_empty((0,)))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask


def _sequences(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor) -> list[tuple[slice, slice]]:
    """(query rows, key rows) of each packed sequence."""
    q, k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(slice(q[b], q[b + 1]), slice(k[b], k[b + 1])) for b in range(len(q) - 1)]


def _one_sequence(x: Tensor, rows: slice) -> Tensor:
    """Rows of one sequence of a packed (T, H, D) tensor as a (1, H, N, D) batch."""
    return x[rows].transpose(0, 1)[None]


def _sequence_seed(seed: Tensor | None, b: int) -> Tensor | None:
    """Dropout seed of sequence b in this path (each sequence draws its own keep-mask)."""
    return None if seed is None else seed * 1_000_003 + b


def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                         cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                         is_causal: bool, dropout_p: float = 0.0,
                         seed: Tensor | None = None,
                         residual: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.attention.varlen_attention_fwd: attention_fwd on each
    sequence. out (Tq, Hq, Ev), lse (Hq, Tq), out_lo (as out, or empty)."""
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    keep_lo = residual and q.dtype != torch.float32 and out.numel() > 0
    out_lo = torch.zeros_like(out) if keep_lo else q.new_empty((0,))
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    for b, (rq, rk) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        o, l, lo = attention_fwd(_one_sequence(q, rq), _one_sequence(k, rk), _one_sequence(v, rk),
                                 scale, is_causal, None, dropout_p, _sequence_seed(seed, b),
                                 keep_lo)
        out[rq], lse[:, rq] = o[0].transpose(0, 1), l[0]
        if lo.numel():
            out_lo[rq] = lo[0].transpose(0, 1)
    return out, lse, out_lo


def varlen_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                         max_seqlen_k: int, scale: float, is_causal: bool, dropout_p: float = 0.0,
                         seed: Tensor | None = None,
                         out_lo: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.attention.varlen_attention_bwd: attention_bwd on each
    sequence."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    has_lo = out_lo is not None and out_lo.numel() > 0
    for b, (rq, rk) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        grads = attention_bwd(_one_sequence(do, rq), _one_sequence(q, rq), _one_sequence(k, rk),
                              _one_sequence(v, rk), _one_sequence(out, rq), lse[None, :, rq],
                              scale, is_causal, None, dropout_p, _sequence_seed(seed, b), False,
                              _one_sequence(out_lo, rq) if has_lo else None)
        for grad, g, rows in zip((dq, dk, dv), grads, (rq, rk, rk)):
            grad[rows] = g[0].transpose(0, 1)
    return dq, dk, dv


# ---- embeddings: launcher-shaped fallbacks (see kernels/embedding.py) ----
# (The math is torch's own: F.embedding, and sums of it; the tests use those in float64.)


def embedding_fwd(ids: Tensor, word: Tensor, pos_ids: Tensor | None, pos: Tensor | None,
                  type_ids: Tensor | None, type_: Tensor | None, ln_weight: Tensor | None,
                  ln_bias: Tensor | None, eps: float, dropout_p: float,
                  seed: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
