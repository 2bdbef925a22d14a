"""flash-attn 2.8's Python interface on fastattn's kernels: code written for flash-attn runs by
changing `flash_attn` to `fastattn.flash_attn` in its imports.

    from fastattn.flash_attn import flash_attn_func, flash_attn_varlen_func
    from fastattn.flash_attn.bert_padding import pad_input, unpad_input

Same names, signatures, defaults, layouts and semantics as flash-attn 2.8's
flash_attn/flash_attn_interface.py: tensors are
(batch, seqlen, nheads, headdim), packed ones (total, nheads, headdim); causal masks and local
windows are aligned to the bottom-right corner of the score matrix (query i of L sees key j when
i + S - L - window_size[0] <= j <= i + S - L + window_size[1]); softcap > 0 caps the scaled scores
to softcap * tanh(s / softcap); ALiBi subtracts slope * |i + S - L - j|; dropout applies whenever
dropout_p > 0 (pass 0.0 in eval). Each function is a thin wrapper: the dense ones view their
tensors as (batch, nheads, seqlen, headdim) (a transpose, nothing copied) and call
fastattn.attention.scaled_dot_product_attention, the varlen ones call
fastattn.attention.varlen_attention. Differences from flash-attn are listed in README.md
("flash-attn interface").
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch import Tensor

from .. import attention, decode
from .._validate import check_same_device, check_same_dtype, check_tensor

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]

_DENSE = "(batch, seqlen, nheads, headdim)"
_PACKED = "(total, nheads, headdim)"

# ---- validation: what flash-attn's own checks refuse, named as flash-attn names it ----


def _check_layout(ndim: int, layout: str, **tensors) -> None:
    """Tensors of a kernel dtype, `ndim` dims each (`layout` says which), one device, one dtype."""
    for name, t in tensors.items():
        check_tensor(name, t)
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {list(t.shape)}")
    check_same_device(**tensors)
    check_same_dtype(**tensors)


def _check_stacked(name: str, t: Tensor, n: int, layout: str, q: Optional[Tensor] = None,
                   batch_dim: Optional[int] = None) -> None:
    """qkv / kv: `layout` names its dims, the stacking dim (the one before the heads) holding n
    tensors (3: q, k, v; 2: k, v); kv on q's device, in q's dtype, with q's batch size."""
    ndim = layout.count(",") + 1
    _check_layout(ndim, layout, **{name: t})
    if q is not None:
        check_same_device(q=q, **{name: t})
        check_same_dtype(q=q, **{name: t})
    if t.shape[-3] != n:
        raise ValueError(f"{name} must be {layout}, got shape {list(t.shape)}: dim {t.dim() - 3} "
                         f"stacks {t.shape[-3]} tensors, not {n}")
    if batch_dim is not None and t.shape[batch_dim] != q.shape[batch_dim]:
        raise ValueError(f"q and {name} must have the same batch size, got q {list(q.shape)} "
                         f"and {name} {list(t.shape)}")


def _check_dense(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q (B, L, H, D), k (B, S, Hk, D), v (B, S, Hk, Dv): one batch size, k and v alike."""
    _check_layout(4, _DENSE, q=q, k=k, v=v)
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must share (batch, seqlen, nheads), got k {list(k.shape)} and "
                         f"v {list(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got q {list(q.shape)} and "
                         f"k {list(k.shape)}")


def _check_scale(softmax_scale) -> None:
    if softmax_scale is not None and (not isinstance(softmax_scale, (int, float))
                                      or isinstance(softmax_scale, bool)
                                      or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None (1 / sqrt(headdim)), "
                         f"got {softmax_scale!r}")


def _check_window(window_size) -> tuple[int, int]:
    """window_size as (left, right) Python ints, each >= -1 (-1: unbounded on that side). Any pair
    of integers is accepted, a 2-element integer tensor too (as flash-attn's own tests pass)."""
    try:
        pair = tuple(window_size)
        sides = [operator.index(w) for w in pair if not isinstance(w, bool)]
    except TypeError:
        pair, sides = (), []
    if len(pair) != 2 or len(sides) != 2:
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = sides
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got ({left}, {right})")
    return left, right


def _check_softcap(softcap) -> float:
    if (not isinstance(softcap, (int, float)) or isinstance(softcap, bool)
            or not math.isfinite(softcap) or softcap < 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0: no capping), got {softcap!r}")
    return float(softcap)


def _check_alibi(alibi_slopes: Optional[Tensor], batch: Optional[int], nheads: int,
                 q: Tensor) -> None:
    """alibi_slopes: None, or fp32 (nheads,) or (batch, nheads) on q's device (batch None: the
    caller could not tell it; its own check of cu_seqlens follows)."""
    if alibi_slopes is None:
        return
    check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,))
    allowed = [(nheads,), (batch, nheads)]
    if tuple(alibi_slopes.shape) not in allowed and not (
            batch is None and alibi_slopes.dim() == 2 and alibi_slopes.shape[1] == nheads):
        raise ValueError(f"alibi_slopes must be (nheads,) = ({nheads},) or (batch, nheads) = "
                         f"({batch}, {nheads}), got shape {list(alibi_slopes.shape)}")
    check_same_device(q=q, alibi_slopes=alibi_slopes)


def _options(softmax_scale, window_size, softcap, alibi_slopes, batch, q):
    """The checked score options: (window, softcap) as Python values."""
    _check_scale(softmax_scale)
    window = _check_window(window_size)
    softcap = _check_softcap(softcap)
    _check_alibi(alibi_slopes, batch, q.shape[-2], q)
    return window, softcap


# ---- the calls into fastattn ----


def _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
           return_attn_probs):
    """q (B, L, H, D), k, v (B, S, Hk, D / Dv), checked -> flash-attn's return value."""
    window, softcap = _options(softmax_scale, window_size, softcap, alibi_slopes,
                               q.shape[0], q)
    # (B, L, H, D) -> (B, H, L, D): views
    out, *stats = attention.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, dropout_p, bool(causal),
        softmax_scale, True, return_lse=True, window_size=window, bottom_right=True,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=None,
        return_probs=bool(return_attn_probs))
    # (B, H, L, Dv) -> (B, L, H, Dv), contiguous as flash-attn's (callers .view() it)
    out = out.transpose(1, 2).contiguous()
    return (out, *stats) if return_attn_probs else out


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs):
    """q (Tq, H, D), k, v (Tk, Hk, D / Dv), checked -> flash-attn's return value."""
    batch = cu_seqlens_q.numel() - 1 if isinstance(cu_seqlens_q, Tensor) else None
    window, softcap = _options(softmax_scale, window_size, softcap, alibi_slopes,
                               batch, q)
    out, *stats = attention.varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=bool(causal),
        dropout_p=dropout_p, scale=softmax_scale, return_lse=True, window_size=window,
        bottom_right=True, softcap=softcap, alibi_slopes=alibi_slopes, sinks=None,
        return_probs=bool(return_attn_probs))
    return (out, *stats) if return_attn_probs else out


# ---- public functions (flash-attn 2.8's signatures) ----


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """Attention over (batch, seqlen, nheads, headdim) tensors, as flash_attn.flash_attn_func.

    q (B, L, H, D), k (B, S, Hk, D), v (B, S, Hk, Dv): fp16 / bf16 (fp32 too), one dtype, any
    strides (read in place); H a multiple of Hk (MQA / GQA: query head h reads kv head
    h // (H // Hk)); D, Dv <= 256.
    dropout_p: float in [0, 1], applied whenever > 0 (pass 0.0 in eval). softmax_scale: float,
        default 1 / sqrt(D). causal: bool, the mask aligned to the bottom-right corner (with
        L > S the first L - S queries see no key and get output 0).
    window_size: (left, right) ints >= -1, -1 unbounded: query i sees the keys
        [i + S - L - left, i + S - L + right] (right is 0 with causal).
    softcap: float >= 0; > 0 caps the scaled scores to softcap * tanh(score / softcap).
    alibi_slopes: None or fp32 (H,) / (B, H): -slope * |i + S - L - j| is added to the score of
        query i and key j.
    deterministic: accepted; fastattn's backward is always deterministic (no atomics).
    return_attn_probs: also return softmax_lse and S_dmask (for tests).

    Returns out (B, L, H, Dv), contiguous, in the input dtype; with return_attn_probs=True
    (out, softmax_lse, S_dmask): softmax_lse (B, H, L) fp32, the natural-log logsumexp of each
    row of the (capped, biased, masked) scaled scores (-inf for a row that sees no key); S_dmask
    (B, H, L, S), exp(score - row max) with the sign bit set where dropout dropped the pair.
    """
    _check_dense(q, k, v)
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """flash_attn_func with k and v stacked, as flash_attn.flash_attn_kvpacked_func.

    q (B, L, H, D), kv (B, S, 2, Hk, D): kv[:, :, 0] is k, kv[:, :, 1] is v (read in place), H a
    multiple of Hk. The other arguments and the return value (out (B, L, H, D), softmax_lse
    (B, H, L), S_dmask (B, H, L, S)) as flash_attn_func.
    """
    _check_layout(4, _DENSE, q=q)
    _check_stacked("kv", kv, 2, "(batch, seqlen, 2, nheads_k, headdim)", q, batch_dim=0)
    k, v = kv.unbind(2)  # (B, S, 2, Hk, D) -> 2 x (B, S, Hk, D): views
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """flash_attn_func with q, k and v stacked, as flash_attn.flash_attn_qkvpacked_func.

    qkv (B, L, 3, H, D): q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2] (read in place); its
    gradient is (B, L, 3, H, D). The other arguments and the return value (out (B, L, H, D),
    softmax_lse (B, H, L), S_dmask (B, H, L, L)) as flash_attn_func.
    """
    _check_stacked("qkv", qkv, 3, "(batch, seqlen, 3, nheads, headdim)")
    q, k, v = qkv.unbind(2)  # (B, L, 3, H, D) -> 3 x (B, L, H, D): views
    return _dense(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """Attention over a packed batch of variable-length sequences, as
    flash_attn.flash_attn_varlen_func.

    q (total_q, H, D), k (total_k, Hk, D), v (total_k, Hk, Dv): the sequences' tokens one after
    another, dtypes and heads as in flash_attn_func. cu_seqlens_q / cu_seqlens_k (B + 1,) int32
    cumulative lengths: sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] attending to
    k, v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]. max_seqlen_q / max_seqlen_k: ints at least the
    longest sequence. Causal masks, windows and ALiBi are aligned per sequence (L, S its own
    lengths); alibi_slopes (H,) or (B, H). block_table (a paged KV cache) is refused with a
    ValueError unless None. The other arguments as flash_attn_func.

    Returns out (total_q, H, Dv); with return_attn_probs=True (out, softmax_lse, S_dmask) with
    softmax_lse (H, total_q) fp32 and S_dmask (B, H, max_seqlen_q, max_seqlen_k).
    """
    if block_table is not None:
        raise ValueError("block_table (a paged KV cache) is not supported: pass block_table=None "
                         "and k, v packed as (total_k, nheads_k, headdim)")
    _check_layout(3, _PACKED, q=q, k=k, v=v)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                                    causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False):
    """flash_attn_varlen_func with k and v stacked, as
    flash_attn.flash_attn_varlen_kvpacked_func.

    q (total_q, H, D), kv (total_k, 2, Hk, D). The other arguments and the return value as
    flash_attn_varlen_func.
    """
    _check_layout(3, _PACKED, q=q)
    _check_stacked("kv", kv, 2, "(total_k, 2, nheads_k, headdim)", q)
    k, v = kv.unbind(1)  # (Tk, 2, Hk, D) -> 2 x (Tk, Hk, D): views
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0,
                                     softmax_scale=None, causal=False, window_size=(-1, -1),
                                     softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn_varlen_func with q, k and v stacked (self-attention, one cu_seqlens), as
    flash_attn.flash_attn_varlen_qkvpacked_func.

    qkv (total, 3, H, D); cu_seqlens (B + 1,) int32; max_seqlen int. The other arguments and the
    return value (out (total, H, D), softmax_lse (H, total), S_dmask
    (B, H, max_seqlen, max_seqlen)) as flash_attn_varlen_func.
    """
    _check_stacked("qkv", qkv, 3, "(total, 3, nheads, headdim)")
    q, k, v = qkv.unbind(1)  # (T, 3, H, D) -> 3 x (T, H, D): views
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False, *,
                            sinks=None):
    """Decoding attention against a KV cache, updated in place, as
    flash_attn.flash_attn_with_kvcache (inference only).

    q (B, L, H, D); k_cache, v_cache (B_cache, S_cache, Hk, D / Dv), or with block_table paged
    (num_blocks, page_block_size, Hk, D / Dv) (any page_block_size >= 1, not only multiples of
    256); k, v (B, L_new, Hk, D / Dv) optional new tokens, written into the cache at
    cache_seqlens[b] .. cache_seqlens[b] + L_new - 1 (rotated by rotary_cos / rotary_sin
    (seqlen_ro, R / 2), as q is: at cache_seqlens[b] + i when causal or local, else at
    cache_seqlens[b]); cache_seqlens int or (B,) int32; cache_batch_idx, cache_leftpad (B,) int32;
    block_table (B, max_blocks) int32. causal and window_size are aligned to the bottom-right
    corner of each sequence's (L, cache_seqlens[b] + L_new - cache_leftpad[b]) scores; softcap,
    alibi_slopes ((H,) or (B, H) fp32) as flash_attn_func; num_splits 0 (chosen), 1 (no split),
    n (split the keys n ways, merged in fp32). sinks (H,): an extension (keyword only), one more
    logit per head in each row's softmax. See fastattn.decode.kvcache_attention.

    Returns out (B, L, H, Dv); with return_softmax_lse=True (out, softmax_lse) with softmax_lse
    (B, H, L) fp32.
    """
    _check_layout(4, _DENSE, q=q)
    window, softcap = _options(softmax_scale, window_size, softcap, alibi_slopes, q.shape[0], q)
    return decode.kvcache_attention(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, block_table=block_table, rotary_cos=rotary_cos,
        rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved, scale=softmax_scale,
        causal=causal, window_size=window, softcap=softcap,
        alibi_slopes=alibi_slopes, sinks=sinks, num_splits=num_splits,
        return_lse=bool(return_softmax_lse))
