"""Attention against a KV cache, for decoding (flash-attn's flash_attn_with_kvcache): the new keys
and values appended to the cache in place (rotary embeddings applied on the way), then the queries
attend to each sequence's cache, split over the keys (flash-decoding) when one pass would leave the
GPU idle. Inference only: there is no backward.

Layers (see DESIGN.md): kvcache_attention (validate) -> custom op fastattn::kvcache_attention_fwd
(dispatch; mutates the caches) -> kernels/decode.py's launcher (the append, split-K attention and
merge kernels), or fastattn.torch_path's. fastattn.flash_attn.flash_attn_with_kvcache is this
function under flash-attn's name and argument order.
"""

from __future__ import annotations

import operator
from typing import Optional, Union

import torch
from torch import Tensor

from . import _dispatch
from ._validate import check_same_device, check_tensor, read_device_values
from .attention import MAX_HEAD_DIM, _check_scale, _score_mods

__all__ = ["kvcache_attention"]


@torch.library.custom_op("fastattn::kvcache_attention_fwd", mutates_args=("k_cache", "v_cache"))
def kvcache_attention_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor],
                          v: Optional[Tensor], cache_seqlens: Optional[Tensor],
                          cache_batch_idx: Optional[Tensor], cache_leftpad: Optional[Tensor],
                          block_table: Optional[Tensor], rotary_cos: Optional[Tensor],
                          rotary_sin: Optional[Tensor], rotary_interleaved: bool,
                          key_padding_mask: Optional[Tensor], scale: float, causal: bool,
                          window_left: int, window_right: int, softcap: float,
                          alibi: Optional[Tensor], sinks: Optional[Tensor],
                          num_splits: int) -> tuple[Tensor, Tensor]:
    """q (B, L, Hq, D), caches (B_cache, S_cache, Hkv, D / Dv) or paged (pages, page, Hkv, D / Dv)
    -> out (B, L, Hq, Dv) in q's dtype, lse (B, Hq, L) fp32; k, v (B, L_new, Hkv, D / Dv) are
    written into the caches (see kernels/decode.py kvcache_attention_fwd)."""
    return _dispatch.launcher("kvcache_attention_fwd", "decode", q)(
        q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
        rotary_cos, rotary_sin, rotary_interleaved, key_padding_mask, scale, causal, window_left,
        window_right, softcap, alibi, sinks, num_splits)


@kvcache_attention_fwd.register_fake
def _kvcache_attention_fwd_fake(q, k_cache, v_cache, *args):
    B, L, Hq, _ = q.shape
    return (q.new_empty((B, L, Hq, v_cache.shape[-1])),
            q.new_empty((B, Hq, L), dtype=torch.float32))


# ---- validation ----

_LAYOUT = "(batch, seqlen, nheads, headdim)"


def _check_4d(name: str, t, q: Tensor) -> None:
    """t: a 4-D tensor in q's dtype on q's device (direct comparisons: this runs per call)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype is not q.dtype:
        raise TypeError(f"expected one dtype, got q {str(q.dtype).removeprefix('torch.')}, "
                        f"{name} {str(t.dtype).removeprefix('torch.')}")
    if t.device != q.device:
        raise ValueError(f"expected all tensors on one device, got q on {q.device}, {name} on "
                         f"{t.device}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D {_LAYOUT}, got shape {list(t.shape)}")


def _check_index_tensor(name: str, t, shape: tuple[int, ...], q: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got "
                        f"{str(t.dtype).removeprefix('torch.')}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    check_same_device(q=q, **{name: t})


def _check_range(name: str, t: Optional[Tensor], lo: int, hi, rule: str) -> None:
    """lo <= t[i] <= hi (an int, or a list of one bound per element) for every element of t,
    where t's values may be read (read_device_values: the CPU always, CUDA in checking mode;
    unchecked, the kernels clamp). Small tensors are checked in Python (one copy to the host),
    large ones (a block table) by their min and max."""
    if t is None or t.numel() == 0 or not read_device_values(t):
        return
    if t.numel() > 4096 and not isinstance(hi, list):
        low, high = (int(x) for x in torch.aminmax(t))
        if lo <= low and high <= hi:
            return
    values = t.flatten().tolist()
    his = hi if isinstance(hi, list) else [hi] * len(values)
    for i, (x, h) in enumerate(zip(values, his)):
        if not lo <= x <= h:
            raise ValueError(f"{name}[{i}] = {x} is out of range: {rule}")


def _cache_seqlens(cache_seqlens, B: int, q: Tensor) -> Optional[Tensor]:
    """cache_seqlens as a (B,) int32 tensor (an int is broadcast), or None."""
    if cache_seqlens is None or isinstance(cache_seqlens, Tensor):
        if cache_seqlens is not None:
            _check_index_tensor("cache_seqlens", cache_seqlens, (B,), q)
        return cache_seqlens
    try:
        n = operator.index(cache_seqlens)
    except TypeError:
        n = None
    if n is None or isinstance(cache_seqlens, bool):
        raise TypeError(f"cache_seqlens must be an int, a (batch,) int32 tensor or None, got "
                        f"{cache_seqlens!r}")
    return torch.full((B,), n, dtype=torch.int32, device=q.device)


def _check_rotary(rotary_cos, rotary_sin, k, D: int, capacity: int, q: Tensor) -> None:
    if rotary_cos is None and rotary_sin is None:
        return
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if k is None:
        raise ValueError("rotary_cos / rotary_sin need the new keys k, v (the rotary embedding "
                         "is applied to q and to the keys appended to the cache)")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        check_tensor(name, t)
        check_same_device(q=q, **{name: t})
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (seqlen_ro, rotary_dim / 2), got shape "
                             f"{list(t.shape)}")
    if rotary_cos.shape != rotary_sin.shape:
        raise ValueError(f"rotary_cos and rotary_sin must have one shape, got "
                         f"{list(rotary_cos.shape)} and {list(rotary_sin.shape)}")
    seqlen_ro, half = rotary_cos.shape
    if 2 * half > D:
        raise ValueError(f"rotary_dim {2 * half} (2 * rotary_cos.shape[1]) must be <= headdim {D}")
    if seqlen_ro < capacity:
        raise ValueError(f"rotary_cos / rotary_sin must cover every cache position: seqlen_ro "
                         f"{seqlen_ro} < the cache's seqlen {capacity}")


def kvcache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                      v: Optional[Tensor] = None, *,
                      cache_seqlens: Optional[Union[int, Tensor]] = None,
                      cache_batch_idx: Optional[Tensor] = None,
                      cache_leftpad: Optional[Tensor] = None,
                      block_table: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                      rotary_sin: Optional[Tensor] = None, rotary_interleaved: bool = True,
                      scale: Optional[float] = None, causal: bool = False,
                      window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                      alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
                      key_padding_mask: Optional[Tensor] = None, num_splits: int = 0,
                      return_lse: bool = False):
    """Attention of new queries against a KV cache, updating the cache (flash_attn_with_kvcache).

    q (B, L, Hq, D): the queries of this step, fp16 / bf16 / fp32, any strides.
    k_cache, v_cache (B_cache, S_cache, Hkv, D / Dv), or with block_table a paged cache
        (num_pages, page_size, Hkv, D / Dv), any page_size >= 1; q's dtype and device; Hq a
        multiple of Hkv (GQA: query head h reads kv head h // (Hq // Hkv)); D, Dv <= 256.
    k, v (B, L_new, Hkv, D / Dv), optional: new keys / values, written into the caches in place at
        positions cache_seqlens[b] .. cache_seqlens[b] + L_new - 1 (then attended to).
    cache_seqlens: int or (B,) int32, the tokens already in each sequence's cache (None: the whole
        cache, S_cache or max_pages * page_size rows; not allowed with k).
    cache_batch_idx (B,) int32: sequence b uses cache entry cache_batch_idx[b] (default b; not
        with block_table). cache_leftpad (B,) int32: sequence b's cache starts at that row (the
        rows before it are not keys; not with block_table).
    block_table (B, max_pages) int32: sequence b's row r lives in page block_table[b, r // page]
        at row r % page.
    rotary_cos, rotary_sin (seqlen_ro >= the cache's seqlen, R / 2): rotate the first R dims of
        the new keys at their positions and of q at positions cache_seqlens[b] + i (causal or
        windowed) or cache_seqlens[b] (neither); rotary_interleaved: pairs (2i, 2i + 1), else
        (i, i + R / 2). Needs k, v.
    scale: default 1 / sqrt(D). causal, window_size (left, right), softcap, alibi_slopes ((Hq,) or
        (B, Hq) fp32), sinks (Hq,): as fastattn.scaled_dot_product_attention's, bottom-right
        aligned on each sequence's keys cache_leftpad[b] .. cache_seqlens[b] + L_new - 1.
    key_padding_mask (B, S) bool over those keys (True = takes part), S the cache's seqlen: for
        caches with holes (Hugging Face's padded batches).
    num_splits: 0 picks the split of the keys from the GPU's size (1 on the CPU), 1 does not
        split, n > 1 splits the keys of each sequence into up to n parts merged in fp32 (the same
        result as 1 within rounding, the same bits run to run).

    Returns out (B, L, Hq, Dv) in q's dtype, contiguous; with return_lse=True (out, lse) with lse
    (B, Hq, L) fp32, the natural-log logsumexp of each row's scores (-inf where a row sees no key).
    Bad cache_seqlens / cache_leftpad / cache_batch_idx / block_table values raise ValueError on
    the CPU and in checking mode (fastattn.checking); unchecked on CUDA the kernels clamp them
    into the caches, never reading or writing out of bounds.
    """
    check_tensor("q", q)
    _check_4d("q", q, q)
    _check_4d("k_cache", k_cache, q)
    _check_4d("v_cache", v_cache, q)
    B, L, Hq, D = q.shape
    n_cache, S_cache, Hkv, Dk = k_cache.shape
    Dv = v_cache.shape[-1]
    if tuple(v_cache.shape[:3]) != (n_cache, S_cache, Hkv):
        raise ValueError(f"k_cache and v_cache must share their first three dims, got k_cache "
                         f"{list(k_cache.shape)} and v_cache {list(v_cache.shape)}")
    if Dk != D:
        raise ValueError(f"k_cache's headdim {Dk} must equal q's {D}")
    if max(D, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"head dim {max(D, Dv)} > {MAX_HEAD_DIM} is not supported")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q's nheads {Hq} must be a multiple of the cache's nheads_k {Hkv}")
    if block_table is not None:
        if not isinstance(block_table, Tensor) or block_table.dim() != 2:
            raise ValueError(f"block_table must be a 2-D (batch, max_pages) int32 tensor, got "
                             f"{getattr(block_table, 'shape', block_table)!r}")
        _check_index_tensor("block_table", block_table, (B, block_table.shape[1]), q)
        if cache_batch_idx is not None or cache_leftpad is not None:
            raise ValueError("cache_batch_idx and cache_leftpad are not supported with a paged "
                             "cache (block_table): address the pages through block_table")
        if S_cache == 0:
            raise ValueError("a paged cache needs page_size >= 1, got k_cache.shape[1] = 0")
        capacity = S_cache * block_table.shape[1]
    else:
        capacity = S_cache
        if cache_batch_idx is None and n_cache != B:
            raise ValueError(f"k_cache must hold batch {B} entries (or pass cache_batch_idx), "
                             f"got {n_cache}")
    if cache_batch_idx is not None:
        _check_index_tensor("cache_batch_idx", cache_batch_idx, (B,), q)
    if cache_leftpad is not None:
        _check_index_tensor("cache_leftpad", cache_leftpad, (B,), q)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    L_new = 0
    if k is not None:
        _check_4d("k", k, q)
        _check_4d("v", v, q)
        L_new = k.shape[1]
        if tuple(k.shape) != (B, L_new, Hkv, D) or tuple(v.shape) != (B, L_new, Hkv, Dv):
            raise ValueError(f"k, v must be (batch, seqlen_new, nheads_k, headdim) = "
                             f"{[B, L_new, Hkv, D]} / {[B, L_new, Hkv, Dv]}, got k "
                             f"{list(k.shape)} and v {list(v.shape)}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is needed with k, v: it says where they are written")
        if L_new > capacity:
            raise ValueError(f"k has {L_new} new tokens, more than the cache holds ({capacity})")
    seqlens = _cache_seqlens(cache_seqlens, B, q)
    rows = (f"the {capacity} rows block_table holds ({block_table.shape[1]} pages of "
            f"{S_cache})" if block_table is not None else f"the cache's {capacity} rows")
    _check_range("cache_seqlens", seqlens, 0, capacity - L_new,
                 f"0 <= cache_seqlens <= {rows} - {L_new} new tokens")
    if cache_leftpad is not None and read_device_values(cache_leftpad):
        end = ([n + L_new for n in seqlens.tolist()] if seqlens is not None else capacity)
        _check_range("cache_leftpad", cache_leftpad, 0, end,
                     "0 <= cache_leftpad <= cache_seqlens + seqlen_new")
    _check_range("cache_batch_idx", cache_batch_idx, 0, n_cache - 1,
                 f"0 <= cache_batch_idx < k_cache.shape[0] = {n_cache}")
    if block_table is not None:
        _check_range("block_table", block_table.flatten(), 0, n_cache - 1,
                     f"0 <= block_table < num_pages = {n_cache}")
    _check_rotary(rotary_cos, rotary_sin, k, D, capacity, q)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor")
        if tuple(key_padding_mask.shape) != (B, capacity):
            raise ValueError(f"key_padding_mask must be (batch, cache seqlen) = "
                             f"{[B, capacity]}, got {list(key_padding_mask.shape)}")
        check_same_device(q=q, key_padding_mask=key_padding_mask)
        if cache_leftpad is not None:
            raise ValueError("key_padding_mask and cache_leftpad cannot be combined: mark the "
                             "left padding in key_padding_mask")
    if (not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0):
        raise ValueError(f"num_splits must be an int >= 0 (0: chosen, 1: no split), got "
                         f"{num_splits!r}")
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {rotary_interleaved!r}")
    if _dispatch.needs_grad(q, k_cache, v_cache, k, v, sinks):
        raise ValueError("kvcache_attention has no backward (inference only): call it under "
                         "torch.no_grad() or torch.inference_mode(), or detach its inputs")
    scale = _check_scale(scale, D)
    (left, right, _, softcap, alibi), sinks = _score_mods(q, Hq, (B,), window_size, True,
                                                           softcap, alibi_slopes, sinks)
    out, lse = _dispatch.run(
        "kvcache_attention_fwd", "decode", q, q, k_cache, v_cache, k, v, seqlens,
        cache_batch_idx, cache_leftpad, block_table, rotary_cos, rotary_sin, rotary_interleaved,
        key_padding_mask, scale, bool(causal), left, right, softcap, alibi, sinks, num_splits)
    return (out, lse) if return_lse else out
