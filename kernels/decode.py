"""Attention against a KV cache (decoding): flash-attn's flash_attn_with_kvcache as three Triton
kernels, an append, a split-K attention pass and a merge (flash-decoding).

Shapes (GQA: query head h reads kv head h // GROUP, GROUP = Hq // Hkv):

    q         (B, L, Hq, D)            the step's queries (L = 1 for a plain decode step)
    k_cache   (B_cache, S_cache, Hkv, D), v_cache (.., Dv); or paged: (n_pages, PAGE, Hkv, D / Dv)
              with block_table (B, max_pages) int32 (row r of sequence b: page
              block_table[b, r // PAGE], row r % PAGE)
    k, v      (B, L_new, Hkv, D / Dv)  new keys / values, appended at cache_seqlens[b]
    out       (B, L, Hq, Dv) in q's dtype; lse (B, Hq, L) fp32 (natural log)

1. _kv_append_kernel (grid (cdiv(L_new, BLOCK_N), Hkv, B), only with k, v) writes the new keys,
   rotated (rotary_cos / rotary_sin, _rotary_tile), and values into the caches at rows
   cache_seqlens[b] + j, through cache_batch_idx or the block table. Rows past the cache's end
   are not written.
2. _decode_fwd_kernel (grid (n_splits, cdiv(GROUP * L, BLOCK_M) * Hkv, B)): a program owns the
   GROUP * L (query, head) pairs of one kv head, packed as the rows of one tile (row r: query
   r // GROUP, head kv_head * GROUP + r % GROUP), so each K/V tile is read once per kv head, not
   once per query head, and a decode step (L = 1) still fills tl.dot's 16 rows when GROUP >= 16.
   Its keys are the sequence's cache rows cache_leftpad[b] .. cache_seqlens[b] + L_new - 1, the
   causal mask, window and ALiBi bottom-right aligned on them; split s of n takes key blocks
   [s * per_split, (s + 1) * per_split) of them and runs the prefill kernel's online-softmax loop
   (kernels/attention.py _attn_fwd_inner, with its three masked / full / masked phases) on that
   range. q is rotated as it is loaded (at cache_seqlens[b] + i when causal or windowed, else at
   cache_seqlens[b], flash-attn's rule). With one split the program writes out and lse; with more
   it writes its normalised partial output (fp32) and partial lse.
3. _decode_merge_kernel (grid (L, Hq, B), only with n_splits > 1) combines the splits of each row in
   fp32, in split order (deterministic): lse = log(sum_s exp(lse_s)) (+ the sink's exp with
   sinks), out = sum_s exp(lse_s - lse) * out_s.

Out-of-range cache_seqlens, cache_leftpad, cache_batch_idx and block-table entries are clamped in
the kernels to the cache (never a read or write outside it); fastattn.decode raises on them where it
can read them (the CPU, checking mode).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import (_LN2, _LOG2E, _ROW_MAX_START, _attn_fwd_inner, _block_dims,
                        _descriptor_flag, _diagonals, _dot_flags, _dot_operand, _key_block_bounds,
                        _list_part, _page_rows, _phase_range, _rounded,
                        _softcap_factors, _softmax_finish, _visible_blocks)
from .configs import (COMPILE_OPTIONS, cdiv, decode_config, decode_num_splits, device_guard,
                      next_power_of_2)
from .numerics import round_to

__all__ = ["kvcache_attention_fwd"]


@triton.jit
def _rotary_tile(base, row_offs, valid, pos, Cos, Sin, stride_cs, D, stride_d,
                 ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (len(row_offs), BLOCK_D) fp32 tile of rows base + row_offs (int64 offsets; columns
    past D and rows where not `valid` read 0), its first ROTARY_DIM columns rotated at positions
    pos (per row) by Cos / Sin (seqlen_ro, ROTARY_DIM / 2), in fp32: column c pairs with
    c ^ 1 (INTERLEAVED, GPT-J) or c +- ROTARY_DIM / 2 (GPT-NeoX); its first member becomes
    x * cos - partner * sin, the second x * cos + partner * sin."""
    cols = tl.arange(0, BLOCK_D)
    col_offs = cols.to(tl.int64) * stride_d
    x = tl.load(base + row_offs[:, None] + col_offs[None, :],
                mask=valid[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
    if ROTARY_DIM > 0:
        HALF: tl.constexpr = ROTARY_DIM // 2
        if INTERLEAVED:
            first = cols % 2 == 0
            partner = cols ^ 1
            freq = cols // 2
        else:
            first = cols < HALF
            partner = tl.where(first, cols + HALF, cols - HALF)
            freq = tl.where(first, cols, cols - HALF)
        rotates = valid[:, None] & (cols < ROTARY_DIM)[None, :]
        xp = tl.load(base + row_offs[:, None] + (partner.to(tl.int64) * stride_d)[None, :],
                     mask=rotates, other=0.0).to(tl.float32)
        cs = pos.to(tl.int64)[:, None] * stride_cs + freq[None, :]
        cos = tl.load(Cos + cs, mask=rotates, other=1.0).to(tl.float32)
        sin = tl.load(Sin + cs, mask=rotates, other=0.0).to(tl.float32)
        sign = tl.where(first, -1.0, 1.0)
        x = tl.where(rotates, x * cos + sign[None, :] * xp * sin, x)
    return x


@triton.jit
def _cache_entry(CacheBatchIdx, off_b, n_cache, HAS_BATCH_IDX: tl.constexpr):
    """The cache batch entry of sequence off_b (cache_batch_idx[b], clamped into the cache)."""
    if HAS_BATCH_IDX:
        entry = tl.load(CacheBatchIdx + off_b)
        return tl.minimum(tl.maximum(entry, 0), n_cache - 1).to(tl.int64)
    else:
        return off_b.to(tl.int64)


@triton.jit
def _kv_append_kernel(
    # pointers
    KNew,  # (B, L_new, Hkv, D)
    VNew,  # (B, L_new, Hkv, Dv)
    KCache,  # (B_cache, S_cache, Hkv, D), or paged (n_pages, PAGE_SIZE, Hkv, D)
    VCache,  # (B_cache, S_cache, Hkv, Dv), or paged (n_pages, PAGE_SIZE, Hkv, Dv)
    CacheSeqlens,  # (B,) int32: where sequence b's new rows start
    CacheBatchIdx,  # (B,) int32 cache entry per sequence (HAS_BATCH_IDX)
    BlockTable,  # (B, max_pages) int32 (PAGE_SIZE > 0)
    Cos, Sin,  # (seqlen_ro, ROTARY_DIM / 2), unit last stride (ROTARY_DIM > 0)
    # sizes
    L_new, D, Dv,
    capacity,  # rows a sequence's cache holds: S_cache, or max_pages * PAGE_SIZE
    n_cache,  # B_cache, or n_pages
    # strides
    stride_knb, stride_knl, stride_knh, stride_knd,
    stride_vnb, stride_vnl, stride_vnh, stride_vnd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_btb, stride_cs,
    # constexpr flags
    HAS_BATCH_IDX: tl.constexpr, PAGE_SIZE: tl.constexpr,  # 0: not paged
    ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
    # block sizes
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (block of BLOCK_N new rows, kv head, sequence): k rotated, v copied."""
    pid_n = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pos = tl.load(CacheSeqlens + off_b) + offs_j  # (BLOCK_N,) cache rows
    valid = (offs_j < L_new) & (pos >= 0) & (pos < capacity)
    offs_dv = tl.arange(0, BLOCK_DV)

    k_rows = (off_b.to(tl.int64) * stride_knb + offs_j.to(tl.int64) * stride_knl
              + off_h.to(tl.int64) * stride_knh)
    k = _rotary_tile(KNew, k_rows, valid, pos, Cos, Sin, stride_cs, D, stride_knd, ROTARY_DIM,
                     INTERLEAVED, BLOCK_D)
    v_rows = (off_b.to(tl.int64) * stride_vnb + offs_j.to(tl.int64) * stride_vnl
              + off_h.to(tl.int64) * stride_vnh)
    v_mask = valid[:, None] & (offs_dv < Dv)[None, :]
    v = tl.load(VNew + v_rows[:, None] + offs_dv.to(tl.int64)[None, :] * stride_vnd, mask=v_mask)

    if PAGE_SIZE > 0:
        table = BlockTable + off_b.to(tl.int64) * stride_btb
        k_dst = _page_rows(table, n_cache, pos, valid, stride_kcb, stride_kcs, PAGE_SIZE)
        v_dst = _page_rows(table, n_cache, pos, valid, stride_vcb, stride_vcs, PAGE_SIZE)
    else:
        entry = _cache_entry(CacheBatchIdx, off_b, n_cache, HAS_BATCH_IDX)
        k_dst = entry * stride_kcb + pos.to(tl.int64) * stride_kcs
        v_dst = entry * stride_vcb + pos.to(tl.int64) * stride_vcs
    cols = tl.arange(0, BLOCK_D)
    tl.store(KCache + off_h * stride_kch + k_dst[:, None] + cols.to(tl.int64)[None, :] * stride_kcd,
             round_to(k, KCache.dtype.element_ty), mask=valid[:, None] & (cols < D)[None, :])
    tl.store(VCache + off_h * stride_vch + v_dst[:, None]
             + offs_dv.to(tl.int64)[None, :] * stride_vcd, v, mask=v_mask)


@triton.jit(do_not_specialize=["window_left", "window_right", "softcap", "split_keys",
                               "rotary_q_step"])
def _decode_fwd_kernel(
    # pointers
    Q,  # (B, L, Hq, D)
    KCache,  # (B_cache, S_cache, Hkv, D), or paged (n_pages, PAGE_SIZE, Hkv, D)
    VCache,  # (B_cache, S_cache, Hkv, Dv), or paged (n_pages, PAGE_SIZE, Hkv, Dv)
    Out,  # (n_splits, B, L, Hq, Dv) through strides: out (split stride 0), or fp32 partials
    Lse,  # (n_splits, B, Hq, L) through strides, unit stride along L: fp32 lse (natural log)
    CacheSeqlens,  # (B,) int32 rows already cached (HAS_SEQLENS; else capacity - L_new)
    CacheBatchIdx,  # (B,) int32 (HAS_BATCH_IDX)
    CacheLeftpad,  # (B,) int32 first cache row that is a key (HAS_LEFTPAD)
    BlockTable,  # (B, max_pages) int32 (PAGE_SIZE > 0)
    Cos, Sin,  # (seqlen_ro, ROTARY_DIM / 2), unit last stride (ROTARY_DIM > 0)
    Alibi,  # (B, Hq) float32 slopes through strides (HAS_ALIBI)
    Sinks,  # (Hq,) sink logits (HAS_SINKS)
    Mask,  # (B, capacity) uint8 key padding mask, 1 = takes part (KEY_PADDING)
    KeyBlocks, KeyBlockCounts,  # the mask's visible key blocks (see attention._visible_blocks)
    # sizes
    L, D, Dv, GROUP, L_new,
    capacity,  # rows a sequence's cache holds: S_cache, or max_pages * PAGE_SIZE
    n_cache,  # B_cache, or n_pages
    N_KEY_BLOCKS,  # cdiv(capacity, BLOCK_N) (KEY_PADDING)
    # strides
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_os, stride_ob, stride_ol, stride_oh, stride_od,
    stride_lses, stride_lseb, stride_lseh,
    stride_btb, stride_cs, stride_ab, stride_ah, stride_mb, stride_ms,
    # runtime scalars
    scale,  # softmax scale (>= 0: the launcher negates q for a negative one)
    window_left, window_right,  # window sides (WINDOW_LEFT / WINDOW_RIGHT; causal: right = 0)
    softcap,  # > 0: scores capped to softcap * tanh(score / softcap) (SOFTCAP)
    split_keys,  # keys per split, a multiple of BLOCK_N
    rotary_q_step,  # 1: query i rotated at cache_seqlens + i; 0: all at cache_seqlens
    # constexpr flags
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, KEY_PADDING: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,  # 0: not paged
    ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
    SPLIT: tl.constexpr,  # write partials (no sink) for _decode_merge_kernel
    KV_TMA: tl.constexpr,  # K, V through tensor descriptors (not paged; the launcher checks)
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (split, block of packed (query, head) rows of one kv head, sequence)."""
    split = tl.program_id(0)
    n_row_blocks = tl.cdiv(GROUP * L, BLOCK_M)
    off_hkv = tl.program_id(1) // n_row_blocks
    r0 = (tl.program_id(1) % n_row_blocks) * BLOCK_M
    off_b = tl.program_id(2)
    DTYPE: tl.constexpr = Q.dtype.element_ty

    # This sequence's keys: cache rows start .. seqlen - 1, clamped into the cache.
    if HAS_SEQLENS:
        cached = tl.load(CacheSeqlens + off_b)
    else:
        cached = capacity - L_new
    seqlen = tl.minimum(tl.maximum(cached + L_new, 0), capacity)
    if HAS_LEFTPAD:
        start = tl.minimum(tl.maximum(tl.load(CacheLeftpad + off_b), 0), seqlen)
    else:
        start = 0
    S = seqlen - start
    # [split_lo, split_hi): block-aligned (the loop bounds below must start on a block for the
    # key-padding lists: an empty range at a ragged S would read the last block again)
    split_lo = split * split_keys
    split_hi = tl.maximum(tl.minimum(tl.cdiv(S, BLOCK_N) * BLOCK_N, split_lo + split_keys),
                          split_lo)

    # The rows: query i = r // GROUP of head off_hkv * GROUP + r % GROUP.
    offs_r = r0 + tl.arange(0, BLOCK_M)
    row_ok = offs_r < GROUP * L
    offs_i = offs_r // GROUP
    offs_h = off_hkv * GROUP + offs_r % GROUP
    q_rows = (off_b.to(tl.int64) * stride_qb + offs_i.to(tl.int64) * stride_ql
              + offs_h.to(tl.int64) * stride_qh)
    q = _rotary_tile(Q, q_rows, row_ok, cached + offs_i * rotary_q_step, Cos, Sin, stride_cs, D,
                     stride_qd, ROTARY_DIM, INTERLEAVED, BLOCK_D)
    if ROTARY_DIM > 0:
        q = _rounded(q, DTYPE)  # the rotated q in q's dtype, as the tensor cores read it
    q = _dot_operand(q, DTYPE, DOT_FP32)

    if PAGE_SIZE > 0:
        k_base = KCache + off_hkv.to(tl.int64) * stride_kh
        v_base = VCache + off_hkv.to(tl.int64) * stride_vh
        page_table = BlockTable + off_b.to(tl.int64) * stride_btb
    else:
        entry = _cache_entry(CacheBatchIdx, off_b, n_cache, HAS_BATCH_IDX)
        k_base = KCache + entry * stride_kb + off_hkv.to(tl.int64) * stride_kh + start * stride_ks
        v_base = VCache + entry * stride_vb + off_hkv.to(tl.int64) * stride_vh + start * stride_vs
        page_table = BlockTable
    if KV_TMA:
        # (at least one row: a sequence without keys reads none, but its descriptor is valid)
        k_src = tl.make_tensor_descriptor(k_base, shape=[tl.maximum(S, 1), D],
                                          strides=[stride_ks, 1], block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, shape=[tl.maximum(S, 1), Dv],
                                          strides=[stride_vs, 1], block_shape=[BLOCK_N, BLOCK_DV])
    else:
        k_src = k_base
        v_src = v_base
    mask_base = Mask + off_b.to(tl.int64) * stride_mb
    block_ids = KeyBlocks + off_b * N_KEY_BLOCKS
    block_counts = KeyBlockCounts + off_b * (2 * (N_KEY_BLOCKS + 1))

    qk_scale = scale * _LOG2E
    cap_in, cap_out = _softcap_factors(scale, softcap, SOFTCAP)
    slope2 = 0.0
    if HAS_ALIBI:  # per row: the rows are different heads
        slope2 = tl.load(Alibi + off_b.to(tl.int64) * stride_ab + offs_h * stride_ah)
        slope2 = (slope2.to(tl.float32) * _LOG2E)[:, None]
    diag_lo, diag_hi, off = _diagonals(L, S, window_left, window_right, 1)
    row_last = tl.minimum(r0 + BLOCK_M, GROUP * L) - 1
    n_lo, n_full_lo, n_full_hi, n_hi = _key_block_bounds(r0 // GROUP, row_last // GROUP, S,
                                                         diag_lo, diag_hi, WINDOW_LEFT,
                                                         WINDOW_RIGHT, BLOCK_N)
    # ... within this split's keys [split_lo, split_hi) (the clamp keeps the phases in order)
    n_lo = tl.minimum(tl.maximum(n_lo, split_lo), split_hi)
    n_full_lo = tl.minimum(tl.maximum(n_full_lo, split_lo), split_hi)
    n_full_hi = tl.minimum(tl.maximum(n_full_hi, split_lo), split_hi)
    n_hi = tl.minimum(tl.maximum(n_hi, split_lo), split_hi)

    m_i = tl.full([BLOCK_M], _ROW_MAX_START, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for phase in tl.static_range(0 if WINDOW_LEFT else 1, 3):  # as in the prefill forward
        lo, hi = _phase_range(phase, n_lo, n_full_lo, n_full_hi, n_hi)
        for part in tl.static_range(2 if KEY_PADDING else 1):  # whole key blocks, then partial
            counts = _list_part(block_counts, part, N_KEY_BLOCKS, KEY_PADDING)
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, k_src, v_src, mask_base, block_ids, counts, page_table,
                n_cache, offs_i, lo, hi, L, S, D, Dv, diag_lo, diag_hi, off,
                stride_ks, stride_kd, stride_vs, stride_vd, stride_kb, stride_vb, 0, stride_ms,
                qk_scale, cap_in, cap_out, slope2, 0, 0,
                phase != 1, WINDOW_LEFT, WINDOW_RIGHT, KEY_PADDING and part == 1, True, KEY_PADDING,
                KEY_PADDING, SOFTCAP, HAS_ALIBI, False, PAGE_SIZE,
                KV_TMA, DTYPE, DOT_FP32, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
            )

    # The sink joins the softmax once: in the merge when the keys are split.
    out, lse = _softmax_finish(acc, l_i, m_i, Sinks + offs_h, HAS_SINKS and not SPLIT)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_rows = (split.to(tl.int64) * stride_os + off_b.to(tl.int64) * stride_ob
              + offs_i.to(tl.int64) * stride_ol + offs_h.to(tl.int64) * stride_oh)
    tl.store(Out + o_rows[:, None] + offs_dv.to(tl.int64)[None, :] * stride_od,
             round_to(out, Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < Dv)[None, :])
    lse_rows = (split.to(tl.int64) * stride_lses + off_b.to(tl.int64) * stride_lseb
                + offs_h.to(tl.int64) * stride_lseh + offs_i)
    tl.store(Lse + lse_rows, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    # pointers
    OutPart,  # (n_splits, B, L, Hq, Dv) fp32, contiguous
    LsePart,  # (n_splits, B, Hq, L) fp32, contiguous
    Out,  # (B, L, Hq, Dv)
    Lse,  # (B, Hq, L) fp32, contiguous
    Sinks,  # (Hq,) (HAS_SINKS)
    # sizes
    n_splits, L, Hq, Dv,
    # strides
    stride_ps, stride_pls,  # split strides of OutPart, LsePart
    stride_ob, stride_ol, stride_oh, stride_od,
    # constexpr flags, block sizes
    HAS_SINKS: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (query, head, sequence): the fp32 merge of its splits, in split order."""
    off_i = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    offs_dv = tl.arange(0, BLOCK_DV)
    row = (off_b.to(tl.int64) * Hq + off_h) * L + off_i  # in (B, Hq, L)
    o_part = OutPart + ((off_b.to(tl.int64) * L + off_i) * Hq + off_h) * Dv + offs_dv

    # The largest lse, in natural-log units; from a finite start, so that splits without keys
    # (lse -inf) weigh exp(-inf) = 0 even when no split has any.
    m = tl.zeros([], dtype=tl.float32) + _ROW_MAX_START
    for s in range(n_splits):
        m = tl.maximum(m, tl.load(LsePart + s * stride_pls + row))
    if HAS_SINKS:
        sink = tl.load(Sinks + off_h).to(tl.float32)
        m = tl.maximum(m, sink)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    total = tl.zeros([], dtype=tl.float32)
    for s in range(n_splits):
        weight = tl.exp2((tl.load(LsePart + s * stride_pls + row) - m) * _LOG2E)
        acc += weight * tl.load(o_part + s * stride_ps, mask=offs_dv < Dv, other=0.0)
        total += weight
    if HAS_SINKS:
        total += tl.exp2((sink - m) * _LOG2E)
    has_keys = total > 0.0
    total_safe = tl.where(has_keys, total, 1.0)
    out = acc / total_safe
    lse = tl.where(has_keys, m + tl.log2(total_safe) * _LN2, float("-inf"))
    o_base = (Out + off_b.to(tl.int64) * stride_ob + off_i.to(tl.int64) * stride_ol
              + off_h.to(tl.int64) * stride_oh)
    tl.store(o_base + offs_dv * stride_od, round_to(out, Out.dtype.element_ty), mask=offs_dv < Dv)
    tl.store(Lse + row, lse)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _append_block(L_new: int) -> int:
    return min(64, max(16, next_power_of_2(L_new)))


def kvcache_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          k: torch.Tensor | None, v: torch.Tensor | None,
                          cache_seqlens: torch.Tensor | None,
                          cache_batch_idx: torch.Tensor | None,
                          cache_leftpad: torch.Tensor | None, block_table: torch.Tensor | None,
                          rotary_cos: torch.Tensor | None, rotary_sin: torch.Tensor | None,
                          rotary_interleaved: bool, key_padding_mask: torch.Tensor | None,
                          scale: float, causal: bool, window_left: int, window_right: int,
                          softcap: float, alibi: torch.Tensor | None, sinks: torch.Tensor | None,
                          num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against the KV cache after appending k, v (in place).

    q (B, L, Hq, D); k_cache, v_cache (B_cache, S_cache, Hkv, D / Dv), or paged
    (n_pages, page_size, Hkv, D / Dv) with block_table (B, max_pages) int32; k, v
    (B, L_new, Hkv, D / Dv) or None; cache_seqlens (B,) int32 rows already cached (None: the
    whole cache); cache_batch_idx, cache_leftpad (B,) int32 or None; rotary_cos / rotary_sin
    (seqlen_ro, R / 2) or None; key_padding_mask (B, capacity) bool or None (not with
    cache_leftpad); causal, window_left / window_right (-1 unbounded), softcap, alibi (B, Hq)
    fp32 (stride 0 where broadcast) and sinks (Hq,): bottom-right aligned, as
    fastattn.decode.kvcache_attention documents; num_splits: 0 (chosen) or a split count. All
    tensors on one device, values already checked (or clamped by the kernels). Returns out
    (B, L, Hq, Dv) in q's dtype, contiguous, and lse (B, Hq, L) fp32.
    """
    B, L, Hq, D = q.shape
    Hkv, Dv = k_cache.shape[2], v_cache.shape[3]
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 0
    capacity = page_size * block_table.shape[1] if paged else k_cache.shape[1]
    L_new = 0 if k is None else k.shape[1]
    out = torch.empty((B, L, Hq, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    none = lse  # the pointer argument of a tensor a launch does not read
    if rotary_cos is not None:
        rotary_cos, rotary_sin = rotary_cos.contiguous(), rotary_sin.contiguous()
    cos, sin = (none, none) if rotary_cos is None else (rotary_cos, rotary_sin)
    rotary = dict(ROTARY_DIM=0 if rotary_cos is None else 2 * rotary_cos.shape[1],
                  INTERLEAVED=bool(rotary_interleaved))
    table = block_table if paged else none
    table_stride = block_table.stride(0) if paged else 0
    dims = _block_dims(D, Dv)

    with device_guard(q):
        if L_new > 0 and B > 0:
            block = _append_block(L_new)
            _kv_append_kernel[(cdiv(L_new, block), Hkv, B)](
                k, v, k_cache, v_cache, cache_seqlens,
                none if cache_batch_idx is None else cache_batch_idx, table, cos, sin,
                L_new, D, Dv, capacity, k_cache.shape[0],
                *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
                table_stride, cos.stride(0),
                HAS_BATCH_IDX=cache_batch_idx is not None, PAGE_SIZE=page_size, **rotary,
                BLOCK_N=block, **dims, **COMPILE_OPTIONS,
            )
        if lse.numel() == 0:
            return out, lse
        if scale < 0:  # the kernel takes scale >= 0 (see _attn_fwd_inner): q.k * s == (-q).k * (-s)
            q, scale = q.neg(), -scale
        group = Hq // Hkv
        cfg = decode_config(max(D, Dv), group * L, q.device)
        key_blocks = cdiv(capacity, cfg["BLOCK_N"])
        row_blocks = cdiv(group * L, cfg["BLOCK_M"])
        splits = decode_num_splits(num_splits, B * Hkv * row_blocks, key_blocks, q.device)
        per_split = cdiv(key_blocks, splits)
        splits = cdiv(key_blocks, per_split)  # no split left without keys
        if splits > 1:
            out_k = torch.empty((splits, B, L, Hq, Dv), dtype=torch.float32, device=q.device)
            lse_k = torch.empty((splits, B, Hq, L), dtype=torch.float32, device=q.device)
            out_strides, lse_strides = out_k.stride(), lse_k.stride()[:3]
        else:
            out_k, lse_k = out, lse
            out_strides, lse_strides = (0, *out.stride()), (0, *lse.stride()[:2])

        if key_padding_mask is not None:
            mask = key_padding_mask.view(torch.uint8)
            flags = dict(KEY_PADDING=True)
            blocks, counts, n_blocks, _ = _visible_blocks(
                mask[:, None, None, :], flags, 1, capacity, 1, cfg["BLOCK_N"], False, none)
            mask_strides = mask.stride()
        else:
            mask, blocks, counts, n_blocks, mask_strides = none, none, none, 0, (0, 0)
        if alibi is not None:
            alibi_strides = (0, alibi.stride(0)) if alibi.dim() == 1 else alibi.stride()
        else:
            alibi_strides = (0, 0)
        kv_tma = not paged and _descriptor_flag(q, k_cache, v_cache)
        _decode_fwd_kernel[(splits, row_blocks * Hkv, B)](
            q, k_cache, v_cache, out_k, lse_k,
            none if cache_seqlens is None else cache_seqlens,
            none if cache_batch_idx is None else cache_batch_idx,
            none if cache_leftpad is None else cache_leftpad, table, cos, sin,
            none if alibi is None else alibi, none if sinks is None else sinks,
            mask, blocks, counts,
            L, D, Dv, group, L_new, capacity, k_cache.shape[0], n_blocks,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out_strides, *lse_strides,
            table_stride, cos.stride(0), *alibi_strides, *mask_strides,
            scale, max(window_left, 0), 0 if causal else max(window_right, 0), float(softcap),
            per_split * cfg["BLOCK_N"],
            1 if causal or window_left >= 0 or window_right >= 0 else 0,
            WINDOW_LEFT=window_left >= 0, WINDOW_RIGHT=causal or window_right >= 0,
            SOFTCAP=softcap > 0.0, HAS_ALIBI=alibi is not None, HAS_SINKS=sinks is not None,
            KEY_PADDING=key_padding_mask is not None, HAS_SEQLENS=cache_seqlens is not None,
            HAS_BATCH_IDX=cache_batch_idx is not None, HAS_LEFTPAD=cache_leftpad is not None,
            PAGE_SIZE=page_size, **rotary, SPLIT=splits > 1, KV_TMA=kv_tma,
            **_dot_flags(q.dtype), **dims, **cfg, **COMPILE_OPTIONS,
        )
        if splits > 1:
            _decode_merge_kernel[(L, Hq, B)](
                out_k, lse_k, out, lse, none if sinks is None else sinks,
                splits, L, Hq, Dv, out_k.stride(0), lse_k.stride(0), *out.stride(),
                HAS_SINKS=sinks is not None, BLOCK_DV=dims["BLOCK_DV"], **COMPILE_OPTIONS,
            )
    return out, lse
