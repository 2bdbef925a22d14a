"""Fused scaled-dot-product attention (FlashAttention-2) as a differentiable op, with attention
masks, dropout, and packed variable-length batches.

Layers (see DESIGN.md): scaled_dot_product_attention (validate, flatten batch dims) -> _AttentionFn
(autograd) -> custom ops fastattn::attention_fwd / fastattn::attention_bwd (dispatch) ->
kernels/attention.py launchers; varlen_attention -> _VarlenAttentionFn ->
fastattn::varlen_attention_fwd / _bwd -> the same kernels. unpad / pad convert a padded batch to the
packed layout and back.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from ._validate import (check_dropout_p, check_same_device, check_same_dtype, check_tensor,
                        dropout_seed, read_device_values)

MAX_HEAD_DIM = 256

# ---- custom ops: one per launcher, with fake (meta) implementations ----
#
# The score modifiers travel as the last six arguments of every op, in this order (see
# kernels/attention.py attention_fwd): window_left, window_right, bottom_right, softcap, alibi,
# sinks. _NO_MODS is a call without any.
_NO_MODS = (-1, -1, False, 0.0, None, None)


@torch.library.custom_op("fastattn::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool,
                  attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                  seed: Optional[Tensor] = None, residual: bool = False, window_left: int = -1,
                  window_right: int = -1, bottom_right: bool = False, softcap: float = 0.0,
                  alibi: Optional[Tensor] = None,
                  sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), attn_mask broadcastable to
    (B, Hq, L, S) -> out (B, Hq, L, Ev), lse (B, Hq, L) fp32, out_lo: with residual (a backward
    follows) and fp16 / bf16 inputs out's rounding residual shaped as out, else empty. seed: the
    dropout seed, (1,) int64 on q's device (see _validate.dropout_seed), None when dropout_p == 0.
    alibi (B, Hq) fp32 slopes (stride 0 where broadcast), sinks (Hq,)."""
    return _dispatch.launcher("attention_fwd", "attention", q)(
        q, k, v, scale, is_causal, attn_mask, dropout_p, seed, residual, window_left, window_right,
        bottom_right, softcap, alibi, sinks)


def _residual_like(out: Tensor, residual: bool) -> Tensor:
    """Fake out_lo: shaped as out when the launcher stores one (the Triton launchers, for fp16 /
    bf16; see kernels/attention.py attention_fwd), else empty (fastattn.torch_path)."""
    keep = (residual and out.dtype != torch.float32 and out.numel() > 0
            and _dispatch.backend(out) != _dispatch.TORCH)
    return out.new_empty(out.shape if keep else (0,))


def _sinks_grad_like(q: Tensor, sinks: Optional[Tensor]) -> Tensor:
    """Fake dsinks: shaped as sinks, or empty."""
    return sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty((0,))


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, scale, is_causal, attn_mask=None, dropout_p=0.0, seed=None,
                        residual=False, *mods):
    B, Hq, L, _ = q.shape
    out = q.new_empty((B, Hq, L, v.shape[-1]))
    if k.shape[2] == 0:  # no keys: the launcher stores no residual
        residual = False
    return out, q.new_empty((B, Hq, L), dtype=torch.float32), _residual_like(out, residual)


@torch.library.custom_op("fastattn::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float, is_causal: bool, attn_mask: Optional[Tensor] = None,
                  dropout_p: float = 0.0, seed: Optional[Tensor] = None,
                  mask_grad: bool = False, out_lo: Optional[Tensor] = None,
                  window_left: int = -1, window_right: int = -1, bottom_right: bool = False,
                  softcap: float = 0.0, alibi: Optional[Tensor] = None,
                  sinks: Optional[Tensor] = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """do, out (B, Hq, L, Ev); lse (B, Hq, L); out_lo as attention_fwd returned it -> dq, dk, dv
    shaped as q, k, v, the gradient of the float attn_mask (shaped as it) when mask_grad, else an
    empty tensor, and that of sinks (shaped as them; empty without)."""
    return _dispatch.launcher("attention_bwd", "attention", q)(
        do, q, k, v, out, lse, scale, is_causal, attn_mask, dropout_p, seed, mask_grad, out_lo,
        window_left, window_right, bottom_right, softcap, alibi, sinks)


@attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, out, lse, scale, is_causal, attn_mask=None, dropout_p=0.0,
                        seed=None, mask_grad=False, out_lo=None, window_left=-1, window_right=-1,
                        bottom_right=False, softcap=0.0, alibi=None, sinks=None):
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad else q.new_empty((0,))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask,
            _sinks_grad_like(q, sinks))


@torch.library.custom_op("fastattn::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                         cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                         is_causal: bool, dropout_p: float, seed: Optional[Tensor],
                         residual: bool = False, window_left: int = -1, window_right: int = -1,
                         bottom_right: bool = False, softcap: float = 0.0,
                         alibi: Optional[Tensor] = None,
                         sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """q (Tq, Hq, E), k (Tk, Hkv, E), v (Tk, Hkv, Ev), cu_seqlens (B + 1,) int32 ->
    out (Tq, Hq, Ev), lse (Hq, Tq) fp32, out_lo (as attention_fwd)."""
    return _dispatch.launcher("varlen_attention_fwd", "attention", q)(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal,
        dropout_p, seed, residual, window_left, window_right, bottom_right, softcap, alibi, sinks)


@varlen_attention_fwd.register_fake
def _varlen_attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               scale, is_causal, dropout_p, seed, residual=False, *mods):
    Tq, Hq, _ = q.shape
    out = q.new_empty((Tq, Hq, v.shape[-1]))
    return out, q.new_empty((Hq, Tq), dtype=torch.float32), _residual_like(out, residual)


@torch.library.custom_op("fastattn::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                         max_seqlen_k: int, scale: float, is_causal: bool, dropout_p: float,
                         seed: Optional[Tensor], out_lo: Optional[Tensor] = None,
                         window_left: int = -1, window_right: int = -1,
                         bottom_right: bool = False, softcap: float = 0.0,
                         alibi: Optional[Tensor] = None, sinks: Optional[Tensor] = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """do, out (Tq, Hq, Ev); lse (Hq, Tq); out_lo as the forward returned it -> dq, dk, dv shaped
    as q, k, v, and dsinks (as attention_bwd's)."""
    return _dispatch.launcher("varlen_attention_bwd", "attention", q)(
        do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
        is_causal, dropout_p, seed, out_lo, window_left, window_right, bottom_right, softcap,
        alibi, sinks)


@varlen_attention_bwd.register_fake
def _varlen_attention_bwd_fake(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, scale, is_causal, dropout_p, seed, out_lo=None,
                               window_left=-1, window_right=-1, bottom_right=False, softcap=0.0,
                               alibi=None, sinks=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            _sinks_grad_like(q, sinks))


@torch.library.custom_op("fastattn::attention_probs", mutates_args=())
def attention_probs(q: Tensor, k: Tensor, scale: float, is_causal: bool,
                    attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                    seed: Optional[Tensor] = None, window_left: int = -1, window_right: int = -1,
                    bottom_right: bool = False, softcap: float = 0.0,
                    alibi: Optional[Tensor] = None) -> Tensor:
    """q (B, Hq, L, E), k (B, Hkv, S, E) -> (B, Hq, L, S): flash-attn's S_dmask of the forward with
    these arguments (see kernels/attention.py attention_probs)."""
    return _dispatch.launcher("attention_probs", "attention", q)(
        q, k, scale, is_causal, attn_mask, dropout_p, seed, window_left, window_right,
        bottom_right, softcap, alibi)


@attention_probs.register_fake
def _attention_probs_fake(q, k, scale, is_causal, attn_mask=None, dropout_p=0.0, seed=None, *mods):
    return q.new_empty((*q.shape[:3], k.shape[2]))


@torch.library.custom_op("fastattn::varlen_attention_probs", mutates_args=())
def varlen_attention_probs(q: Tensor, k: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, scale: float, is_causal: bool,
                           dropout_p: float = 0.0, seed: Optional[Tensor] = None,
                           window_left: int = -1, window_right: int = -1,
                           bottom_right: bool = False, softcap: float = 0.0,
                           alibi: Optional[Tensor] = None) -> Tensor:
    """q (Tq, Hq, E), k (Tk, Hkv, E) -> (B, Hq, max_seqlen_q, max_seqlen_k) (see
    kernels/attention.py varlen_attention_probs)."""
    return _dispatch.launcher("varlen_attention_probs", "attention", q)(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal,
        dropout_p, seed, window_left, window_right, bottom_right, softcap, alibi)


@varlen_attention_probs.register_fake
def _varlen_attention_probs_fake(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 *rest):
    return q.new_empty((cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k))


# ---- autograd ----


def _attention_fwd(q, k, v, attn_mask, scale, is_causal, dropout_p, seed, residual, mods):
    """fastattn::attention_fwd (see _dispatch.run), argument order as _AttentionFn's; mods: the
    score modifiers in the ops' order (_NO_MODS)."""
    return _dispatch.run("attention_fwd", "attention", q, q, k, v, scale, is_causal, attn_mask,
                         dropout_p, seed, residual, *mods)


class _AttentionFn(torch.autograd.Function):
    """out, lse = attention(q, k, v, attn_mask, sinks) on (B, H, N, D) tensors. Saves q, k, v,
    out, lse, the mask, the ALiBi slopes, the sinks and (fp16 / bf16) out's rounding residual, from
    which the backward's delta is exact; the dropout mask is not saved but redrawn from the seed.
    lse is returned for merging partial attentions; it carries no gradient. A float attn_mask
    and sinks that require grad get one."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, sinks, scale, is_causal, dropout_p, seed, mods):
        needs_grad = any(ctx.needs_input_grad[:5])
        out, lse, out_lo = _attention_fwd(q, k, v, attn_mask, scale, is_causal, dropout_p, seed,
                                          needs_grad, (*mods, sinks))
        ctx.mark_non_differentiable(lse)
        ctx.scale, ctx.is_causal, ctx.dropout_p = scale, is_causal, dropout_p
        ctx.window_cap = mods[:4]  # window_left, window_right, bottom_right, softcap
        ctx.mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
        if needs_grad:
            ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed, out_lo, mods[4], sinks)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, attn_mask, seed, out_lo, alibi, sinks = ctx.saved_tensors
        dq, dk, dv, dmask, dsinks = _dispatch.run(
            "attention_bwd", "attention", q, dout, q, k, v, out, lse, ctx.scale, ctx.is_causal,
            attn_mask, ctx.dropout_p, seed, ctx.mask_grad, out_lo, *ctx.window_cap, alibi, sinks)
        return (dq, dk, dv, dmask if ctx.mask_grad else None,
                dsinks if sinks is not None else None, None, None, None, None, None)


class _VarlenAttentionFn(torch.autograd.Function):
    """out, lse = attention over packed sequences (T, H, D). Saves q, k, v, out, lse, the
    cu_seqlens, the slopes and sinks and out's rounding residual (as _AttentionFn); lse carries
    no gradient; sinks get one."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                is_causal, dropout_p, seed, mods):
        needs_grad = any(ctx.needs_input_grad[:4])
        out, lse, out_lo = _dispatch.run(
            "varlen_attention_fwd", "attention", q, q, k, v, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, scale, is_causal, dropout_p, seed, needs_grad, *mods,
            sinks)
        ctx.mark_non_differentiable(lse)
        ctx.args = (max_seqlen_q, max_seqlen_k, scale, is_causal, dropout_p)
        ctx.window_cap = mods[:4]
        if needs_grad:
            ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed, out_lo,
                                  mods[4], sinks)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed, out_lo, alibi, sinks = ctx.saved_tensors
        dq, dk, dv, dsinks = _dispatch.run(
            "varlen_attention_bwd", "attention", q, dout, q, k, v, out, lse, cu_seqlens_q,
            cu_seqlens_k, *ctx.args, seed, out_lo, *ctx.window_cap, alibi, sinks)
        return dq, dk, dv, dsinks if sinks is not None else None, *([None] * 9)


# ---- validation ----


def _check_qkv(query: Tensor, key: Tensor, value: Tensor, packed: bool) -> None:
    """Tensors of a kernel dtype, one device, one dtype; 3-D if packed, else at least 2-D."""
    layout = ("3 dims (tokens, heads, head_dim)" if packed
              else "at least 2 dims (..., seq, head_dim)")
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
        if t.dim() != 3 if packed else t.dim() < 2:
            raise ValueError(f"{name} must have {layout}, got shape {list(t.shape)}")
    if not query.device == key.device == value.device:
        check_same_device(query=query, key=key, value=value)
    if not query.dtype == key.dtype == value.dtype:
        check_same_dtype(query=query, key=key, value=value)


def _check_heads(E: int, Ek: int, Ev: int, Hq: int, Hk: int, Hv: int, enable_gqa: bool) -> None:
    """Head dims (query E, key Ek, value Ev) and head counts (Hq, Hk, Hv) the kernels support."""
    if Ek != E:
        raise ValueError(f"key head dim {Ek} must equal query head dim {E}")
    for name, d in (("query/key", E), ("value", Ev)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} head dim {d} is not supported: must be in 1..{MAX_HEAD_DIM}")
    if Hv != Hk:
        raise ValueError(f"key and value must have the same number of heads, got key {Hk} and "
                         f"value {Hv}")
    if Hq != Hk and not enable_gqa:
        raise ValueError(f"query has {Hq} heads and key/value {Hk}: different head counts need "
                         "enable_gqa=True")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of key/value heads {Hk} (GQA)")


def _check_scale(scale, head_dim: int) -> float:
    """The softmax scale: 1 / sqrt(head_dim) for None, else a finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _score_mods(query: Tensor, Hq: int, batch: tuple[int, ...], window_size, bottom_right,
                softcap, alibi_slopes, sinks) -> tuple[tuple, Optional[Tensor]]:
    """The score modifiers checked: ((window_left, window_right, bottom_right, softcap, alibi),
    sinks) with alibi a (*batch, Hq) view of alibi_slopes ((Hq,) or (*batch, Hq), or None) and
    sinks (Hq,) or None."""
    if (window_size == (-1, -1) and bottom_right is False and softcap == 0.0
            and alibi_slopes is None and sinks is None):
        return _NO_MODS[:5], None  # the plain call, without the checks below (host cost)
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1
                       for w in window_size)):
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1 = "
                         f"unbounded), got {window_size!r}")
    if not isinstance(bottom_right, bool):
        raise TypeError(f"bottom_right must be a bool, got {bottom_right!r}")
    if (not isinstance(softcap, (int, float)) or isinstance(softcap, bool)
            or not math.isfinite(softcap) or softcap < 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0 = no cap), got {softcap!r}")
    alibi = None
    if alibi_slopes is not None:
        _check_head_param("alibi_slopes", alibi_slopes, query)
        if alibi_slopes.requires_grad and torch.is_grad_enabled():
            raise ValueError("alibi_slopes requires grad, but fastattn computes no gradient for "
                             "ALiBi slopes (flash-attn neither): pass alibi_slopes.detach()")
        shape = tuple(alibi_slopes.shape)
        if (alibi_slopes.dim() > len(batch) + 1 or shape[-1:] != (Hq,) or any(
                n not in (1, b) for n, b in zip(reversed(shape[:-1]), reversed(batch)))):
            raise ValueError(f"alibi_slopes must have shape (Hq,) = ({Hq},) or (*batch, Hq) = "
                             f"{[*batch, Hq]} (broadcastable), got {list(shape)}")
        alibi = alibi_slopes[(None,) * (len(batch) + 1 - alibi_slopes.dim())].expand(*batch, Hq)
    if sinks is not None:
        _check_head_param("sinks", sinks, query)
        if tuple(sinks.shape) != (Hq,):
            raise ValueError(f"sinks must have shape (Hq,) = ({Hq},), one logit per query head, "
                             f"got {list(sinks.shape)}")
    return (window_size[0], window_size[1], bottom_right, float(softcap), alibi), sinks


def _check_head_param(name: str, t, query: Tensor) -> None:
    """A per-head float tensor on query's device (ALiBi slopes, sinks)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype "
                        f"{str(t.dtype).removeprefix('torch.')}")
    check_same_device(query=query, **{name: t})


def _broadcast(what: str, shapes: dict[str, tuple[int, ...]], hint: str = "") -> tuple[int, ...]:
    """torch's broadcast of the given dims (in plain Python: torch.broadcast_shapes costs tens of
    µs), or a ValueError naming every tensor's dims."""
    first, *rest = shapes.values()
    if all(s == first for s in rest):
        return tuple(first)
    out = [1] * max(len(s) for s in shapes.values())
    for s in shapes.values():
        for i, n in enumerate(s, len(out) - len(s)):
            if n != out[i] and n != 1 and out[i] != 1:
                given = ", ".join(f"{name} {list(s)}" for name, s in shapes.items())
                raise ValueError(f"the {what} of query, key and value must broadcast together, "
                                 f"got {given}{hint}")
            out[i] = n if out[i] == 1 else out[i]
    return tuple(out)


def _attention_shapes(query: Tensor, key: Tensor, value: Tensor,
                      enable_gqa: bool) -> tuple[tuple[int, ...], int, int]:
    """Check q (..., Hq, L, E), k (..., Hkv, S, E), v (..., Hkv, S, Ev) as torch does and return
    (batch, Hq, Hkv): the broadcast batch dims and the head counts. A 2-D tensor (N, D) has one
    head. Without enable_gqa every dim before the last two broadcasts (heads too, Hq == Hkv after
    it); with it the heads are dim -3 (Hq a multiple of Hkv) and the dims before them broadcast."""
    _check_qkv(query, key, value, packed=False)
    qs, ks, vs = query.shape, key.shape, value.shape
    if ks[-2] != vs[-2]:
        raise ValueError(f"key and value must have the same sequence length, got key "
                         f"{ks[-2]} and value {vs[-2]}")
    # (N, D) -> (1, N, D): one head
    shapes = {"query": qs[:-2] or (1,), "key": ks[:-2] or (1,), "value": vs[:-2] or (1,)}
    if enable_gqa:
        batch = _broadcast("batch dims (before the heads)", {n: s[:-1] for n, s in shapes.items()})
        Hq, Hk, Hv = (s[-1] for s in shapes.values())
    else:
        lead = _broadcast("batch and head dims", shapes,
                          " (query heads a multiple of key/value heads need enable_gqa=True)")
        batch, Hq = lead[:-1], lead[-1]
        Hk = Hv = Hq
    _check_heads(qs[-1], ks[-1], vs[-1], Hq, Hk, Hv, True)
    return batch, Hq, Hk


def _attention_mask(attn_mask: Optional[Tensor], query: Tensor,
                    full: tuple[int, ...]) -> Optional[Tensor]:
    """attn_mask checked against the full score shape (*batch, Hq, L, S) and returned as a view
    (*batch, H', L', S') (H', L', S' its own sizes, 1 or full; stride 0 on broadcast batch dims):
    nothing is copied. Differentiable: autograd sums its gradient back over the broadcast."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, query.dtype):
        got, want = (str(d).removeprefix("torch.") for d in (attn_mask.dtype, query.dtype))
        raise TypeError(f"attn_mask has dtype {got}; it must be bool (True = takes part) or, as "
                        f"an additive mask, the query's dtype {want}")
    check_same_device(query=query, attn_mask=attn_mask)
    if attn_mask.dim() > len(full) or any(
            m not in (1, f) for m, f in zip(reversed(attn_mask.shape), reversed(full))):
        raise ValueError(f"attn_mask of shape {list(attn_mask.shape)} does not broadcast to "
                         f"(..., Hq, L, S) = {list(full)}")
    mask = attn_mask[(None,) * (len(full) - attn_mask.dim())]  # one dim per dim of `full`
    return _expand(mask, (*full[:-3], *mask.shape[-3:]))


def _expand(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """t.expand(shape), or t itself when it has that shape already (an expand costs µs)."""
    return t if t.shape == shape else t.expand(shape)


def _merge_batch(t: Tensor, n_batch: int) -> Optional[Tensor]:
    """t (*batch, H, N, D) as a (B, H, N, D) view, B = prod(batch), or None where the batch dims'
    strides do not merge into one (e.g. one broadcast, stride 0, and one not)."""
    batch = t.shape[:n_batch]
    dims = [(n, s) for n, s in zip(batch, t.stride()[:n_batch]) if n != 1]
    if any(outer != inner * n for (_, outer), (n, inner) in zip(dims, dims[1:])):
        return None
    return t.reshape(math.prod(batch), *t.shape[n_batch:])  # a view: the strides merge


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], n_batch: int,
               scale: float, is_causal: bool, dropout_p: float, mods: tuple,
               sinks: Optional[Tensor], return_probs: bool = False
               ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Attention on q (*batch, Hq, L, E), k, v (*batch, Hkv, S, E / Ev), mask (*batch, H', L', S')
    or None, all with the same n_batch batch dims (views: stride 0 where broadcast), mods
    (window_left, window_right, bottom_right, softcap, alibi (*batch, Hq) or None), sinks (Hq,)
    or None -> out (*batch, Hq, L, Ev), lse (*batch, Hq, L), and with return_probs flash-attn's
    S_dmask of the very call (*batch, Hq, L, S) (else None). One launch over the merged batch
    when the batch dims' strides merge for every tensor; else one call per index of the first
    batch dim."""
    batch = q.shape[:n_batch]
    alibi = mods[4]
    if n_batch == 1:  # already (B, H, N, D)
        merged = [q, k, v, mask, alibi]
    else:
        merged = [_merge_batch(t, n_batch) if t is not None else None
                  for t in (q, k, v, mask, alibi)]
    if all(m is not None for m, t in zip(merged, (q, k, v, mask, alibi)) if t is not None):
        seed = dropout_seed(dropout_p, q.device) if dropout_p else None
        mods = (*mods[:4], merged[4]) if n_batch != 1 else mods
        if _dispatch.needs_grad(*merged[:4], sinks):
            out, lse = _AttentionFn.apply(*merged[:4], sinks, scale, is_causal, dropout_p, seed,
                                          mods)
        else:
            out, lse, _ = _attention_fwd(*merged[:4], scale, is_causal, dropout_p, seed, False,
                                         (*mods, sinks))
        probs = None
        if return_probs:  # the same seed: the dropout mask of this very call
            probs = _dispatch.run("attention_probs", "attention", q, *merged[:2], scale,
                                  is_causal, merged[3], dropout_p, seed, *mods)
        if n_batch == 1:
            return out, lse, probs
        # (B, Hq, L, Ev) -> (*batch, Hq, L, Ev)
        return (out.view(*batch, *out.shape[1:]), lse.view(*batch, *lse.shape[1:]),
                None if probs is None else probs.view(*batch, *probs.shape[1:]))
    parts = [_attention(q[i], k[i], v[i], None if mask is None else mask[i], n_batch - 1, scale,
                        is_causal, dropout_p,
                        (*mods[:4], None if alibi is None else alibi[i]), sinks, return_probs)
             for i in range(batch[0])]
    return (torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]),
            torch.stack([p[2] for p in parts]) if return_probs else None)


# ---- public functions ----


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, return_lse: bool = False,
                                 window_size: tuple[int, int] = (-1, -1),
                                 bottom_right: bool = False, softcap: float = 0.0,
                                 alibi_slopes: Optional[Tensor] = None,
                                 sinks: Optional[Tensor] = None, return_probs: bool = False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, FlashAttention-2 in Triton.

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev), at least 2-D, fp32 /
    fp16 / bf16, one dtype, any strides (Hugging Face's (B, N, H, D).transpose(1, 2) views are read
    in place). The leading dims broadcast together as in torch (q (H, L, E) with k, v
    (B, H, S, E), q (B, 1, L, E) with k, v (B, H, S, E), ...): read through stride-0 views, never
    copied; gradients are summed over the broadcast dims. E, Ev <= 256. scale defaults to
    1 / sqrt(E). is_causal: query i sees keys j <= i (the top-left tril of the L x S matrix, as
    torch). enable_gqa: dim -3 holds the heads, Hq a multiple of Hkv, query head h reads kv head
    h // (Hq // Hkv) (the dims before the heads broadcast).

    attn_mask: broadcastable to (..., Hq, L, S) as torch allows ((L, S), (B, 1, 1, S),
    (B, 1, L, S), (1, Hq, L, S), (B, Hq, L, S), ...); bool (True = takes part) or the query's
    floating dtype (added to the scores; -inf hides a pair). It is read tile by tile through its
    strides, never expanded or copied, and applies together with is_causal. A boolean key padding
    mask (B, 1, 1, S) skips fully padded key blocks. A query row that sees no key gets output 0
    and zero gradients (never NaN), as torch's own function; finite "masking" values such as
    torch.finfo(dtype).min are ordinary biases (such a row gets uniform attention, as in torch).
    A float mask that requires grad gets its gradient (dS, summed over its broadcast dims; this
    costs a (B, Hq, L, S) fp32 buffer during the backward).

    dropout_p: in [0, 1]; dropout on the attention probabilities inside the kernel (kept values
    scaled by 1 / (1 - dropout_p)), whenever dropout_p > 0, as torch's function (pass 0.0 in eval).
    The mask is drawn in the kernel from a seed drawn on the inputs' device with torch's generator,
    so torch.manual_seed reproduces it, torch.compile keeps it in its graph and a captured CUDA
    graph draws a new mask on every replay; the backward redraws the same mask. (Not the same
    random numbers as torch's dropout.) Each (batch, head, query, key) gets its own random number
    while L * S <= 2^32.

    Score modifiers, keyword-only (flash-attn's, applied in the kernel; all off by default, so
    the call is torch's): window_size (left, right), -1 = unbounded: query i sees keys
    i + off - left ... i + off + right only, key blocks wholly outside never read (is_causal is
    right = 0); bottom_right: is_causal, the window and ALiBi aligned to the bottom-right corner,
    off = S - L (flash-attn's causal: the last query sees the last key), else off = 0 (torch's
    top-left); softcap > 0: the scaled scores become softcap * tanh(score / softcap) before
    attn_mask is added (Gemma 2); alibi_slopes (Hq,) or (..., Hq) float: the score of (i, j)
    gets -slope * |j - (i + off)|, never materialised (no gradient: pass a tensor that does not
    require grad); sinks (Hq,) float: a learnable logit per head that joins each row's softmax
    with no value (GPT-OSS, StreamingLLM; the lse includes it, a row that sees no key gets 0), with
    its gradient.

    Returns out (..., Hq, L, Ev) in the input dtype, its leading dims the broadcast ones (as torch:
    (L, Ev) for 2-D inputs); with return_lse=True, (out, lse) where lse (..., Hq, L) fp32 is the
    natural-log logsumexp of the (masked) scaled scores of each query row (-inf for a row that
    sees no key), without gradient. return_probs=True (a debugging aid, flash-attn's
    return_attn_probs) appends probs (..., Hq, L, S) in the input dtype, without gradient:
    exp(score - rowmax) of the scores as the kernel saw them (scaled, capped, biased, masked;
    hidden pairs 0), with the sign bit set where this call's dropout dropped the pair.
    """
    batch, Hq, Hkv = _attention_shapes(query, key, value, enable_gqa)
    scale = _check_scale(scale, query.shape[-1])
    L, S = query.shape[-2], key.shape[-2]
    mask = _attention_mask(attn_mask, query, (*batch, Hq, L, S))
    check_dropout_p(dropout_p)  # the seed is drawn per launch
    mods, sinks = _score_mods(query, Hq, batch, window_size, bottom_right, softcap, alibi_slopes,
                              sinks)
    # (..., N, D) -> (*batch, H, N, D): stride-0 views on the broadcast dims
    q = _expand(query, (*batch, Hq, L, query.shape[-1]))
    k = _expand(key, (*batch, Hkv, S, key.shape[-1]))
    v = _expand(value, (*batch, Hkv, S, value.shape[-1]))
    out, lse, probs = _attention(q, k, v, mask, len(batch), scale, bool(is_causal),
                                 float(dropout_p), mods, sinks, bool(return_probs))
    if max(query.dim(), key.dim(), value.dim()) == 2:  # (1, L, Ev) -> (L, Ev), as torch
        out, lse, probs = out[0], lse[0], None if probs is None else probs[0]
    if return_probs:
        return (out, lse, probs) if return_lse else (out, probs)
    return (out, lse) if return_lse else out


# ---- variable-length (packed) batches ----


def _check_cu_seqlens(name: str, cu_seqlens, total: int, max_name: str, max_seqlen,
                      query: Tensor) -> None:
    """cu_seqlens: int32 (B + 1,) on query's device, from 0, non-decreasing, ending at `total`;
    max_seqlen an int >= its longest sequence. Reading cu_seqlens costs a host sync on the GPU: there
    it runs in checking mode only (fastattn.checking; see _validate.read_device_values), and the
    caller vouches for cu_seqlens, as with flash-attn's varlen functions. Unchecked, the kernels
    clamp each sequence to the packed rows (nothing is read or written out of bounds; a wrong
    cu_seqlens gives wrong rows, and rows past max_seqlen are not computed)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must hold int32 offsets, got dtype "
                        f"{str(cu_seqlens.dtype).removeprefix('torch.')}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError(f"{name} must be 1-D (batch + 1,), got shape {list(cu_seqlens.shape)}")
    check_same_device(query=query, **{name: cu_seqlens})
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise ValueError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if not read_device_values(cu_seqlens):
        return
    offsets = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at the number of packed tokens {total}, got "
                         f"{offsets[-1]}")
    if max(lengths, default=0) > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is shorter than the longest sequence in {name} "
                         f"({max(lengths)})")


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     dropout_p: float = 0.0, scale: Optional[float] = None,
                     return_lse: bool = False, window_size: tuple[int, int] = (-1, -1),
                     bottom_right: bool = False, softcap: float = 0.0,
                     alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
                     return_probs: bool = False):
    """Attention over a packed batch of variable-length sequences (FlashAttention's varlen API).

    q (Tq, Hq, E), k (Tk, Hkv, E), v (Tk, Hkv, Ev): the tokens of all sequences one after another,
    fp32 / fp16 / bf16, one dtype, any strides, E, Ev <= 256, Hq a multiple of Hkv (GQA: query
    head h reads kv head h // (Hq // Hkv)). cu_seqlens_q / cu_seqlens_k (B + 1,) int32: cumulative
    lengths, 0 = cu[0] <= cu[1] <= ... <= cu[B] = Tq / Tk; sequence b is q[cu_q[b]:cu_q[b + 1]]
    attending to k, v[cu_k[b]:cu_k[b + 1]] only. max_seqlen_q / _k: ints at least the longest
    sequence (they size the launch grid). causal: query i of a sequence sees its keys j <= i
    (top-left aligned, as is_causal). dropout_p, scale: as in scaled_dot_product_attention. A query
    with no key (an empty key sequence) gets output 0. window_size, bottom_right, softcap,
    alibi_slopes ((Hq,) or (B, Hq): a row per sequence), sinks: as in
    scaled_dot_product_attention, aligned per sequence. return_probs: as there, probs
    (B, Hq, max_seqlen_q, max_seqlen_k) with sequence b's (Lb, Sb) in the top-left corner.

    Returns out (Tq, Hq, Ev) in the input dtype; with return_lse=True, (out, lse) with lse
    (Hq, Tq) fp32, without gradient. Use unpad / pad to run a padded (B, N, ...) batch this way.
    """
    _check_qkv(q, k, v, packed=True)
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"key and value must hold the same number of tokens, got key "
                         f"{k.shape[0]} and value {v.shape[0]}")
    _check_heads(q.shape[2], k.shape[2], v.shape[2], q.shape[1], k.shape[1], v.shape[1], True)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q, q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k, q)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"sequences, got {cu_seqlens_q.numel() - 1} and "
                         f"{cu_seqlens_k.numel() - 1}")
    scale = _check_scale(scale, q.shape[-1])
    mods, sinks = _score_mods(q, q.shape[1], (cu_seqlens_q.numel() - 1,), window_size,
                              bottom_right, softcap, alibi_slopes, sinks)
    seed = dropout_seed(dropout_p, q.device)
    q, k, v, cu_seqlens_q, cu_seqlens_k = _distinct(q, k, v, cu_seqlens_q, cu_seqlens_k)
    out, lse = _VarlenAttentionFn.apply(q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, scale, bool(causal), float(dropout_p), seed,
                                        mods)
    if return_probs:  # the forward's seed: the dropout mask of this very call
        probs = _dispatch.run("varlen_attention_probs", "attention", q, q, k, cu_seqlens_q,
                              cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal),
                              float(dropout_p), seed, *mods)
        return (out, lse, probs) if return_lse else (out, probs)
    return (out, lse) if return_lse else out


def _distinct(*tensors: Tensor) -> list[Tensor]:
    """The tensors, a repeated one replaced by a view of it: torch.compile cannot trace an
    autograd.Function given one tensor as two inputs (self-attention's q = k = v, or one cu_seqlens
    for queries and keys); a view is another tensor, and gradients through it reach the original."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        out.append(t.view_as(t) if id(t) in seen else t)
        seen.add(id(t))
    return out


def unpad(x: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Pack the real tokens of a padded batch, for varlen_attention.

    x (B, N, ...); padding_mask (B, N) bool or integer, True / nonzero = a real token (Hugging
    Face's attention_mask). Returns packed (T, ...) the real tokens in order (differentiable in x),
    indices (T,) int64 their positions in the flattened (B * N) batch, cu_seqlens (B + 1,) int32 and
    max_seqlen (int; reading it is one device sync).
    """
    if not isinstance(x, Tensor) or not isinstance(padding_mask, Tensor):
        raise TypeError("unpad expects tensors x (B, N, ...) and padding_mask (B, N)")
    if padding_mask.dtype.is_floating_point or padding_mask.dtype.is_complex:
        raise TypeError(f"padding_mask must be bool or integer, got dtype "
                        f"{str(padding_mask.dtype).removeprefix('torch.')}")
    if x.dim() < 2 or padding_mask.shape != x.shape[:2]:
        raise ValueError(f"padding_mask of shape {list(padding_mask.shape)} must be x's first two "
                         f"dims (B, N) = {list(x.shape[:2])}")
    check_same_device(x=x, padding_mask=padding_mask)
    real = padding_mask.bool()  # (B, N)
    seqlens = real.sum(dim=1, dtype=torch.int32)  # (B,)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    indices = real.flatten().nonzero().flatten()  # (T,)
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    return x.flatten(0, 1)[indices], indices, cu_seqlens, max_seqlen


def pad(packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Inverse of unpad: packed (T, ...) and indices (T,) -> (batch, seqlen, ...) with zeros at the
    padding positions (differentiable in packed)."""
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    return out.index_copy(0, indices, packed).view(batch, seqlen, *packed.shape[1:])
