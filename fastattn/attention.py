"""Fused scaled-dot-product attention (FlashAttention-2) as a differentiable op.

Layers (see DESIGN.md): scaled_dot_product_attention (validate, flatten batch dims) -> _AttentionFn
(autograd) -> custom ops fastattn::attention_fwd / fastattn::attention_bwd (dispatch) ->
kernels/attention.py launchers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from ._validate import check_same_device, check_same_dtype, check_tensor

MAX_HEAD_DIM = 256

# ---- custom ops: one per launcher, with fake (meta) implementations ----


@torch.library.custom_op("fastattn::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float,
                  is_causal: bool) -> tuple[Tensor, Tensor]:
    """q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev) -> out (B, Hq, L, Ev), lse (B, Hq, L) fp32."""
    impl = _dispatch.implementation("attention_fwd", "attention", q)
    return impl.attention_fwd(q, k, v, scale, is_causal)


@attention_fwd.register_fake
def _(q, k, v, scale, is_causal):
    B, Hq, L, _ = q.shape
    return q.new_empty((B, Hq, L, v.shape[-1])), q.new_empty((B, Hq, L), dtype=torch.float32)


@torch.library.custom_op("fastattn::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float, is_causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """do, out (B, Hq, L, Ev); lse (B, Hq, L) -> dq, dk, dv shaped as q, k, v."""
    impl = _dispatch.implementation("attention_bwd", "attention", q)
    return impl.attention_bwd(do, q, k, v, out, lse, scale, is_causal)


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, scale, is_causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---- autograd ----


class _AttentionFn(torch.autograd.Function):
    """out, lse = attention(q, k, v) on (B, H, N, D) tensors. Saves q, k, v, out, lse.
    lse is returned for merging partial attentions; it carries no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, scale, is_causal):
        out, lse = torch.ops.fastattn.attention_fwd(q, k, v, scale, is_causal)
        ctx.mark_non_differentiable(lse)
        ctx.scale, ctx.is_causal = scale, is_causal
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastattn.attention_bwd(dout, q, k, v, out, lse, ctx.scale,
                                                      ctx.is_causal)
        return dq, dk, dv, None, None


# ---- public function ----


def _check_attention_inputs(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
        if t.dim() < 3:
            raise ValueError(f"{name} must have at least 3 dims (..., heads, seq, head_dim), "
                             f"got shape {list(t.shape)}")
    check_same_device(query=query, key=key, value=value)
    check_same_dtype(query=query, key=key, value=value)
    batch = query.shape[:-3]
    for name, t in (("key", key), ("value", value)):
        if t.shape[:-3] != batch:
            raise ValueError(f"{name} batch dims {list(t.shape[:-3])} must equal query's "
                             f"{list(batch)}")
    E, Ev = query.shape[-1], value.shape[-1]
    if key.shape[-1] != E:
        raise ValueError(f"key head dim {key.shape[-1]} must equal query head dim {E}")
    for name, d in (("query/key", E), ("value", Ev)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} head dim {d} is not supported: must be in 1..{MAX_HEAD_DIM}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same sequence length, got key "
                         f"{key.shape[-2]} and value {value.shape[-2]}")
    Hq, Hkv = query.shape[-3], key.shape[-3]
    if value.shape[-3] != Hkv:
        raise ValueError(f"key and value must have the same number of heads, got key {Hkv} and "
                         f"value {value.shape[-3]}")
    if Hq != Hkv and not enable_gqa:
        raise ValueError(f"query has {Hq} heads and key/value {Hkv}: different head counts need "
                         "enable_gqa=True")
    if Hq % Hkv != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of key/value heads {Hkv} (GQA)")


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, return_lse: bool = False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, FlashAttention-2 in Triton.

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev): the same leading batch
    dims, fp32 / fp16 / bf16, one dtype, any strides (Hugging Face's (B, N, H, D).transpose(1, 2)
    views are read in place). E, Ev <= 256. scale defaults to 1 / sqrt(E). is_causal: query i sees
    keys j <= i (the top-left tril of the L x S matrix, as torch). enable_gqa: Hq a multiple of
    Hkv, query head h reads kv head h // (Hq // Hkv).

    Returns out (..., Hq, L, Ev) in the input dtype; with return_lse=True, (out, lse) where lse
    (..., Hq, L) fp32 is the natural-log logsumexp of the scaled scores of each query row
    (-inf for a row that sees no key), without gradient.
    """
    _check_attention_inputs(query, key, value, enable_gqa)
    if attn_mask is not None:
        raise NotImplementedError("attn_mask is not supported yet (planned: issue 4)")
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p} is not supported yet (planned: issue 4); "
                                  "use dropout_p=0.0")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")

    batch = query.shape[:-3]
    # (..., H, N, D) -> (B, H, N, D): a view for 4-D inputs and for any collapsible batch dims.
    B = math.prod(batch)
    q, k, v = (t.reshape(B, *t.shape[-3:]) for t in (query, key, value))
    out, lse = _AttentionFn.apply(q, k, v, float(scale), bool(is_causal))
    out = out.view(*batch, *out.shape[1:])  # (B, Hq, L, Ev) -> (..., Hq, L, Ev)
    if return_lse:
        return out, lse.view(*batch, *lse.shape[1:])
    return out
