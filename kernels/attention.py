"""Fused scaled-dot-product attention: FlashAttention-2 forward and backward Triton kernels.

Shapes (GQA: each kv head serves GROUP = Hq // Hkv consecutive query heads, torch's enable_gqa rule
"query head h reads kv head h // GROUP"):

    q   (B, Hq,  L, D)      k (B, Hkv, S, D)      v (B, Hkv, S, Dv)
    out (B, Hq,  L, Dv)     lse (B, Hq, L) float32, natural-log logsumexp of the scaled scores

Inputs may have any strides (e.g. Hugging Face's (B, N, H, D).transpose(1, 2) views): every kernel
takes all four strides of every 4-D tensor, so nothing is copied. Head dims need not be powers of
two: tiles are padded to BLOCK_D = next_power_of_2(D) in registers and the loads are masked.

Forward (grid (cdiv(L, BLOCK_M), Hq, B): one program per block of BLOCK_M query rows of one head):
    For each key block, s = q @ k^T * scale is turned into probabilities with the online softmax:
    the running row max m and row sum l are updated, and the fp32 accumulator is rescaled by
    alpha = exp(m_old - m_new) before adding p @ v. At the end out = acc / l and lse = m + log(l).
    We work in base 2 throughout: scores are multiplied by scale * log2(e) so exp becomes exp2 (one
    hardware instruction), and the base-2 lse is converted to natural log only when stored
    (lse = lse2 * ln 2).

Causal masking (torch's top-left alignment, also when L != S): query i sees keys j <= i. The key loop
of a query block [m0, m0 + BLOCK_M) is split in two phases: key blocks that every row sees in full
(no element mask, the fast path), then the diagonal block(s) and the ragged last block at S, where a
per-element mask is applied. Key blocks entirely above the diagonal are never visited. Masked scores
are set to a large negative *finite* value (no inf - inf = NaN), and their probabilities are forced to
exactly 0, so a row that sees no key at all ends with l = 0: it gets out = 0 and lse = -inf.

Backward (FlashAttention-2): with P = softmax(s) recomputed from the saved lse,
    dV = P^T @ dO,    dP = dO @ V^T,    dS = P * (dP - delta),   delta = rowsum(dO * O),
    dQ = scale * dS @ K,    dK = scale * dS^T @ Q.
Three kernels: a preprocess computing delta; a dK/dV kernel that owns one key block of one kv head
and loops over the query blocks of all GROUP query heads that read it (so the GQA reduction over
heads happens in registers, no atomics); a dQ kernel that owns one query block and loops over key
blocks. Both recompute (P, dS) with the same helper, the dK/dV kernel in transposed (key-major)
orientation so that P^T and dS^T come out directly as the left operands of its products. Both
reuse the forward's causal loop split. No float atomics anywhere, so the backward is deterministic
(bitwise reproducible run to run).

Numerics: statistics, accumulators and softmax are fp32. On the GPU the tl.dot operands stay in the
input dtype (fp16/bf16 tensor cores) and P, dS are rounded to it before their products; fp32 inputs
use input_precision="ieee" (exact fp32 FMAs, as accurate as torch's fp32 attention, not tensor-core
tf32). Under TRITON_INTERPRET=1 (CPU) every dot operand is cast to fp32 instead (DOT_FP32, set by the
launchers), because the interpreter computes bfloat16 arithmetic on raw bits (and truncates
fp32 -> bf16); the interpreter thus keeps P and dS in fp32, slightly more accurate than the GPU.
Outputs are stored with numerics.round_to, which rounds to nearest even on both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import (attention_bwd_config, attention_fwd_config, device_guard, interpreting,
                      next_power_of_2)
from .numerics import round_to

__all__ = ["attention_fwd", "attention_bwd"]

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * log2(e))
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * ln(2)
# Score of a masked (query, key) pair, in log2 units: finite on purpose (-inf - -inf would be NaN).
_MASKED_SCORE = tl.constexpr(-1.0e30)


# --------------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, rows, cols, n_rows, n_cols, stride_row, stride_col):
    """Load the (len(rows), len(cols)) tile base[rows, cols]; out-of-range elements read as 0.

    Swapping (rows, n_rows, stride_row) with the column arguments loads the transposed tile.
    Offsets are int64 so that index * stride cannot overflow for long sequences.
    """
    offsets = rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + offsets, mask=mask, other=0.0)


@triton.jit
def _store_tile(base, value, rows, cols, n_rows, n_cols, stride_row, stride_col):
    """Store `value` (fp32) into base[rows, cols], rounded to nearest in base's dtype, skipping
    out-of-range elements."""
    offsets = rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(base + offsets, round_to(value, base.dtype.element_ty), mask=mask)


@triton.jit
def _dot_operand(x, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    """Cast a tile to what tl.dot should consume: DTYPE (the input dtype, for the tensor cores) on
    the GPU, fp32 under the interpreter (where bf16 arithmetic is wrong)."""
    if DOT_FP32:
        return x.to(tl.float32)
    else:
        return x.to(DTYPE)


@triton.jit
def _load_dot_operand(base, rows, cols, n_rows, n_cols, stride_row, stride_col, DOT_FP32: tl.constexpr):
    """_load_tile of a tile that only feeds tl.dot (q, k, v, dO): kept in its dtype on the GPU."""
    tile = _load_tile(base, rows, cols, n_rows, n_cols, stride_row, stride_col)
    return _dot_operand(tile, base.dtype.element_ty, DOT_FP32)


# The score-tile helpers below work in either orientation: the caller passes the dot operands and
# the query / key indices already broadcast to the tile's shape, e.g. q_idx = offs_m[:, None] and
# k_idx = offs_n[None, :] for a (BLOCK_M, BLOCK_N) tile of q @ k^T (forward, dQ), or
# q_idx = offs_m[None, :] and k_idx = offs_n[:, None] for a (BLOCK_N, BLOCK_M) tile of k @ q^T
# (dK/dV, which then gets P^T and dS^T directly as the left operands of its products).


@triton.jit
def _visible(q_idx, k_idx, S, IS_CAUSAL: tl.constexpr):
    """Mask of the (query, key) pairs that take part: key in range, and key <= query if causal."""
    visible = k_idx < S
    if IS_CAUSAL:
        visible = visible & (q_idx >= k_idx)
    return visible


@triton.jit
def _scores(a, b, q_idx, k_idx, S, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """a @ b * scale * log2(e), the fp32 score tile in log2 units (a @ b is q @ k^T or k @ q^T);
    masked pairs get _MASKED_SCORE when MASKED (only diagonal / ragged blocks pay for the mask)."""
    s = tl.dot(a, b, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(_visible(q_idx, k_idx, S, IS_CAUSAL), s, _MASKED_SCORE)
    return s


@triton.jit
def _key_block_bounds(m0, S, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range a query block [m0, m0 + BLOCK_M) visits, as (n_full, n_end):
    key blocks starting in [0, n_full) need no element mask, those in [n_full, n_end) do.

    A key block [n, n + BLOCK_N) needs no mask when it lies inside [0, S) and, if causal, every row of
    the query block sees all of it: n + BLOCK_N - 1 <= m0. Causal rows see no key beyond
    m0 + BLOCK_M - 1, so blocks above the diagonal are never visited.
    """
    if IS_CAUSAL:
        n_end = tl.minimum(S, m0 + BLOCK_M)
        n_full = (tl.minimum(S, m0 + 1) // BLOCK_N) * BLOCK_N
    else:
        n_end = S
        n_full = (S // BLOCK_N) * BLOCK_N
    return n_full, n_end


@triton.jit
def _query_block_bounds(n0, L, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query range that sees key block [n0, n0 + BLOCK_N), as (m_start, m_full): query blocks starting
    in [m_start, m_full) need the causal mask, those in [m_full, L) do not.

    Causal: rows i < n0 see none of the block (skipped); a query block [m, m + BLOCK_M) sees all of
    it when m >= n0 + BLOCK_N - 1. Query rows past L and key rows past S need no mask here: rows past
    L load q = dO = 0 (so contribute exactly 0 to dK, dV), and key rows past S are never stored.
    """
    if IS_CAUSAL:
        m_start = (n0 // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    else:
        m_start = 0
        m_full = 0
    return m_start, tl.minimum(m_full, L)


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i,  # running state: (BLOCK_M, BLOCK_DV) fp32, (BLOCK_M,) fp32, (BLOCK_M,) fp32
    q,  # (BLOCK_M, BLOCK_D) dot operand
    k_base, v_base,  # K, V of this (batch, kv head)
    offs_m, n_lo, n_hi, S, D, Dv,
    stride_ks, stride_kd, stride_vs, stride_vd,
    qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Online-softmax accumulation over the key blocks starting in [n_lo, n_hi)."""
    DTYPE = k_base.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _load_dot_operand(k_base, offs_d, offs_n, D, S, stride_kd, stride_ks, DOT_FP32)
        v = _load_dot_operand(v_base, offs_n, offs_dv, S, Dv, stride_vs, stride_vd, DOT_FP32)
        s = _scores(q, kT, offs_m[:, None], offs_n[None, :], S, qk_scale,
                    MASKED, IS_CAUSAL, DOT_PRECISION)  # (BLOCK_M, BLOCK_N)

        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        if MASKED:
            # A row with no visible key so far has m_new = _MASKED_SCORE and would get p = 1 on its
            # masked entries: force them to 0 so such a row keeps l = 0.
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], S, IS_CAUSAL), p, 0.0)
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old row max
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = tl.dot(_dot_operand(p, DTYPE, DOT_FP32), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    # pointers
    Q,  # (B, Hq, L, D)
    K,  # (B, Hkv, S, D)
    V,  # (B, Hkv, S, Dv)
    Out,  # (B, Hq, L, Dv)
    Lse,  # (B, Hq, L) float32, contiguous
    # sizes
    Hq, L, S, D, Dv,
    GROUP,  # Hq // Hkv
    # strides
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    # runtime scalars
    scale,  # softmax scale applied to q @ k^T
    # constexpr flags
    IS_CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,  # cast dot operands to fp32 (interpreter only)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, else "tf32" (no effect on fp16/bf16)
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (query block, query head, batch): out and lse of BLOCK_M query rows."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    if IS_CAUSAL:
        # Later query blocks see more keys: launch the heaviest blocks first.
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_hkv = off_h // GROUP

    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    lse_base = Lse + (off_b * Hq + off_h).to(tl.int64) * L

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qk_scale = scale * _LOG2E  # exp(scale * x) == exp2(qk_scale * x)

    q = _load_dot_operand(q_base, offs_m, offs_d, L, D, stride_ql, stride_qd, DOT_FP32)
    m_i = tl.full([BLOCK_M], _MASKED_SCORE, dtype=tl.float32)  # running row max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)  # running sum of exp2(s - m_i) @ v

    n_full, n_end = _key_block_bounds(m0, S, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, offs_m, 0, n_full, S, D, Dv,
        stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
        False, IS_CAUSAL, DOT_FP32, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, offs_m, n_full, n_end, S, D, Dv,
        stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
        True, IS_CAUSAL, DOT_FP32, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
    )

    # Rows that saw no key (l = 0) get out = 0 and lse = -inf instead of 0/0.
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    _store_tile(o_base, out, offs_m, offs_dv, L, Dv, stride_ol, stride_od)
    tl.store(lse_base + offs_m, lse, mask=offs_m < L)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    # pointers
    Out,  # (B, Hq, L, Dv)
    dO,  # (B, Hq, L, Dv)
    Delta,  # (B, Hq, L) float32, contiguous
    # sizes
    Hq, L, Dv,
    # strides
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta = rowsum(dO * O) = rowsum(P * dP), the softmax-backward correction term."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    do_base = dO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    o = _load_tile(o_base, offs_m, offs_dv, L, Dv, stride_ol, stride_od).to(tl.float32)
    do = _load_tile(do_base, offs_m, offs_dv, L, Dv, stride_dol, stride_dod).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + (off_b * Hq + off_h).to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _attn_bwd_tile(
    a_s, b_s,  # s = a_s @ b_s: q @ k^T, or k @ q^T for the transposed tile
    a_dp, b_dp,  # dP = a_dp @ b_dp: dO @ V^T, or V @ dO^T
    lse2, delta,  # fp32 per query row, broadcast like q_idx: base-2 logsumexp and rowsum(dO * O)
    q_idx, k_idx, S, qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Recompute the probabilities P and the score gradient dS of one tile (or of its transpose).

    P = exp2(s - lse2) is the forward's softmax (s in log2 units, so no max/sum pass is needed);
    masked pairs have s = _MASKED_SCORE and hence P = 0 (lse2 is finite: every row sees a key).
    dS = P * (dP - delta) with dP = dO @ V^T is the gradient w.r.t. the *unscaled* scores up to the
    factor `scale`, which the callers apply once to their accumulators.
    """
    s = _scores(a_s, b_s, q_idx, k_idx, S, qk_scale, MASKED, IS_CAUSAL, DOT_PRECISION)
    p = tl.exp2(s - lse2)
    dp = tl.dot(a_dp, b_dp, input_precision=DOT_PRECISION)
    ds = p * (dp - delta)
    return p, ds


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv,  # accumulators: (BLOCK_N, BLOCK_D), (BLOCK_N, BLOCK_DV) fp32
    k, v,  # dot operands of this program's key block
    q_base, do_base, lse_base, delta_base,  # Q, dO, Lse, Delta of one (batch, query head)
    offs_n, m_lo, m_hi, L, S, D, Dv,
    stride_ql, stride_qd, stride_dol, stride_dod,
    qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dV += P^T @ dO and dK += dS^T @ Q over the query blocks starting in [m_lo, m_hi).

    The tiles are computed transposed, (BLOCK_N, BLOCK_M): sT = k @ q^T, so that P^T and dS^T are
    produced directly in the layout of the left operand of the two products.
    """
    DTYPE = q_base.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qT = _load_dot_operand(q_base, offs_d, offs_m, D, L, stride_qd, stride_ql, DOT_FP32)
        do = _load_dot_operand(do_base, offs_m, offs_dv, L, Dv, stride_dol, stride_dod, DOT_FP32)
        # Rows past L read lse = delta = 0; with q = dO = 0 they then add exactly 0 below.
        lse2 = tl.load(lse_base + offs_m, mask=offs_m < L, other=0.0) * _LOG2E
        delta = tl.load(delta_base + offs_m, mask=offs_m < L, other=0.0)
        pT, dsT = _attn_bwd_tile(k, qT, v, tl.trans(do), lse2[None, :], delta[None, :],
                                 offs_m[None, :], offs_n[:, None], S, qk_scale,
                                 MASKED, IS_CAUSAL, DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dv += tl.dot(_dot_operand(pT, DTYPE, DOT_FP32), do, input_precision=DOT_PRECISION)
        dk += tl.dot(_dot_operand(dsT, DTYPE, DOT_FP32), tl.trans(qT), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    # pointers
    Q,  # (B, Hq, L, D)
    K,  # (B, Hkv, S, D)
    V,  # (B, Hkv, S, Dv)
    dO,  # (B, Hq, L, Dv)
    Lse,  # (B, Hq, L) float32, contiguous, natural log
    Delta,  # (B, Hq, L) float32, contiguous
    dK,  # (B, Hkv, S, D)
    dV,  # (B, Hkv, S, Dv)
    # sizes
    Hq, L, S, D, Dv,
    GROUP,  # Hq // Hkv
    # strides
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    # runtime scalars
    scale,
    # constexpr flags
    IS_CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (key block, kv head, batch): dK and dV of BLOCK_N keys, summed over every
    query block of all GROUP query heads that read this kv head."""
    pid_n = tl.program_id(0)
    off_hkv = tl.program_id(1)
    off_b = tl.program_id(2)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qk_scale = scale * _LOG2E

    k_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    k = _load_dot_operand(k_base, offs_n, offs_d, S, D, stride_ks, stride_kd, DOT_FP32)
    v = _load_dot_operand(v_base, offs_n, offs_dv, S, Dv, stride_vs, stride_vd, DOT_FP32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    m_start, m_full = _query_block_bounds(n0, L, IS_CAUSAL, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        off_h = off_hkv * GROUP + g  # query heads off_hkv * GROUP ... + GROUP - 1 read this kv head
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        do_base = dO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        row_base = (off_b * Hq + off_h).to(tl.int64) * L
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base,
            offs_n, m_start, m_full, L, S, D, Dv,
            stride_ql, stride_qd, stride_dol, stride_dod, qk_scale,
            True, IS_CAUSAL, DOT_FP32, DOT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_DV,
        )
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base,
            offs_n, m_full, L, L, S, D, Dv,
            stride_ql, stride_qd, stride_dol, stride_dod, qk_scale,
            False, IS_CAUSAL, DOT_FP32, DOT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_DV,
        )

    dk *= scale  # d(scores)/dK carries the softmax scale once
    dk_base = dK + off_b.to(tl.int64) * stride_dkb + off_hkv.to(tl.int64) * stride_dkh
    dv_base = dV + off_b.to(tl.int64) * stride_dvb + off_hkv.to(tl.int64) * stride_dvh
    _store_tile(dk_base, dk, offs_n, offs_d, S, D, stride_dks, stride_dkd)
    _store_tile(dv_base, dv, offs_n, offs_dv, S, Dv, stride_dvs, stride_dvd)


@triton.jit
def _attn_bwd_dq_inner(
    dq,  # accumulator: (BLOCK_M, BLOCK_D) fp32
    q, do, lse2, delta,  # this program's query block: dot operands and (BLOCK_M,) fp32 row statistics
    k_base, v_base,  # K, V of this (batch, kv head)
    offs_m, n_lo, n_hi, S, D, Dv,
    stride_ks, stride_kd, stride_vs, stride_vd,
    qk_scale,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ += dS @ K over the key blocks starting in [n_lo, n_hi)."""
    DTYPE = k_base.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _load_dot_operand(k_base, offs_d, offs_n, D, S, stride_kd, stride_ks, DOT_FP32)
        vT = _load_dot_operand(v_base, offs_dv, offs_n, Dv, S, stride_vd, stride_vs, DOT_FP32)
        p, ds = _attn_bwd_tile(q, kT, do, vT, lse2[:, None], delta[:, None],
                               offs_m[:, None], offs_n[None, :], S, qk_scale,
                               MASKED, IS_CAUSAL, DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        dq += tl.dot(_dot_operand(ds, DTYPE, DOT_FP32), tl.trans(kT), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    # pointers
    Q,  # (B, Hq, L, D)
    K,  # (B, Hkv, S, D)
    V,  # (B, Hkv, S, Dv)
    dO,  # (B, Hq, L, Dv)
    Lse,  # (B, Hq, L) float32, contiguous, natural log
    Delta,  # (B, Hq, L) float32, contiguous
    dQ,  # (B, Hq, L, D)
    # sizes
    Hq, L, S, D, Dv,
    GROUP,  # Hq // Hkv
    # strides
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    # runtime scalars
    scale,
    # constexpr flags
    IS_CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (query block, query head, batch): dQ of BLOCK_M query rows."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # heaviest query blocks first, as in the forward
    off_hkv = off_h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qk_scale = scale * _LOG2E

    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    do_base = dO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    row_base = (off_b * Hq + off_h).to(tl.int64) * L

    q = _load_dot_operand(q_base, offs_m, offs_d, L, D, stride_ql, stride_qd, DOT_FP32)
    do = _load_dot_operand(do_base, offs_m, offs_dv, L, Dv, stride_dol, stride_dod, DOT_FP32)
    lse2 = tl.load(Lse + row_base + offs_m, mask=offs_m < L, other=0.0) * _LOG2E
    delta = tl.load(Delta + row_base + offs_m, mask=offs_m < L, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full, n_end = _key_block_bounds(m0, S, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, offs_m, 0, n_full, S, D, Dv,
        stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
        False, IS_CAUSAL, DOT_FP32, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, offs_m, n_full, n_end, S, D, Dv,
        stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
        True, IS_CAUSAL, DOT_FP32, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
    )

    dq *= scale
    dq_base = dQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
    _store_tile(dq_base, dq, offs_m, offs_d, L, D, stride_dql, stride_dqd)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _dot_flags(dtype: torch.dtype) -> dict:
    # fp32 inputs promise fp32 accuracy: "ieee" keeps tl.dot from rounding operands to tf32.
    return dict(DOT_FP32=interpreting(), DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _block_dims(D: int, Dv: int) -> dict:
    # tl.dot needs every dimension >= 16; non-powers of two are padded in registers and masked.
    return dict(BLOCK_D=max(16, next_power_of_2(D)), BLOCK_DV=max(16, next_power_of_2(Dv)))


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward.

    q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv): same dtype (fp32/fp16/bf16) and device, any
    strides, Hq % Hkv == 0, D and Dv <= 256. Causal masking is top-left aligned (query i sees keys
    j <= i). Returns out (B, Hq, L, Dv) contiguous in q.dtype and lse (B, Hq, L) float32, the
    natural-log logsumexp of scale * q @ k^T per row (-inf for a row that sees no key, whose out is 0).
    """
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Dv = v.shape[3]
    out = torch.empty((B, Hq, L, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if lse.numel() == 0:  # L == 0 (or B * Hq == 0): nothing to compute
        return out, lse
    if S == 0:  # no keys: softmax over an empty set
        return out.zero_(), lse.fill_(float("-inf"))

    cfg = attention_fwd_config(max(D, Dv), q.dtype, q.device)
    grid = (triton.cdiv(L, cfg["BLOCK_M"]), Hq, B)
    with device_guard(q):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse,
            Hq, L, S, D, Dv, Hq // Hkv,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            scale,
            IS_CAUSAL=is_causal, **_dot_flags(q.dtype), **_block_dims(D, Dv), **cfg,
        )
    return out, lse


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, scale: float, is_causal: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention backward (FlashAttention-2, deterministic: no atomics).

    do (B, Hq, L, Dv) any strides; q, k, v, scale, is_causal as given to attention_fwd; out, lse as
    it returned them. Returns dq (B, Hq, L, D), dk (B, Hkv, S, D), dv (B, Hkv, S, Dv), contiguous,
    in q.dtype.
    """
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Dv = v.shape[3]
    dq = torch.empty((B, Hq, L, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, S, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, Hkv, S, Dv), dtype=q.dtype, device=q.device)
    if L == 0 or S == 0 or B * Hq == 0:  # nothing attends: every gradient is 0 (or empty)
        return dq.zero_(), dk.zero_(), dv.zero_()

    lse = lse.contiguous()  # our own (B, Hq, L) float32 output: a no-op in practice
    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    cfg = attention_bwd_config(max(D, Dv), q.dtype, q.device)
    flags = dict(IS_CAUSAL=is_causal, **_dot_flags(q.dtype), **_block_dims(D, Dv))
    qkv_strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    sizes = (Hq, L, S, D, Dv, Hq // Hkv)

    with device_guard(q):
        pre = cfg["preprocess"]
        _attn_bwd_preprocess_kernel[(triton.cdiv(L, pre["BLOCK_M"]), Hq, B)](
            out, do, delta,
            Hq, L, Dv,
            *out.stride(), *do.stride(),
            BLOCK_DV=_block_dims(D, Dv)["BLOCK_DV"], **pre,
        )
        dkdv = cfg["dkdv"]
        _attn_bwd_dkdv_kernel[(triton.cdiv(S, dkdv["BLOCK_N"]), Hkv, B)](
            q, k, v, do, lse, delta, dk, dv,
            *sizes,
            *qkv_strides, *dk.stride(), *dv.stride(),
            scale,
            **flags, **dkdv,
        )
        dq_cfg = cfg["dq"]
        _attn_bwd_dq_kernel[(triton.cdiv(L, dq_cfg["BLOCK_M"]), Hq, B)](
            q, k, v, do, lse, delta, dq,
            *sizes,
            *qkv_strides, *dq.stride(),
            scale,
            **flags, **dq_cfg,
        )
    return dq, dk, dv
