"""Fused scaled-dot-product attention: FlashAttention-2 forward and backward Triton kernels, with
attention masks, dropout, packed variable-length batches and flash-attn's score modifiers (local
windows, bottom-right causal, softcap, ALiBi, learnable sinks).

Shapes (GQA: each kv head serves GROUP = Hq // Hkv consecutive query heads, torch's enable_gqa rule
"query head h reads kv head h // GROUP"):

    padded:  q   (B, Hq,  L, D)      k (B, Hkv, S, D)      v (B, Hkv, S, Dv)
             out (B, Hq,  L, Dv)     lse (B, Hq, L) float32, natural-log logsumexp of the scores
    varlen:  q   (Tq, Hq, D)         k (Tk, Hkv, D)        v (Tk, Hkv, Dv)
             out (Tq, Hq, Dv)        lse (Hq, Tq) float32
             (the tokens of all sequences packed; sequence b is rows cu_seqlens[b] ..
             cu_seqlens[b + 1] - 1)

Inputs may have any strides (e.g. Hugging Face's (B, N, H, D).transpose(1, 2) views): every kernel
takes all four strides of every 4-D tensor, so nothing is copied. Head dims need not be powers of
two: tiles are padded to BLOCK_D = next_power_of_2(D) in registers and the loads are masked.

One kernel per pass; what a call needs is chosen by constexpr flags, so a call without a mask,
dropout or score modifier compiles to the plain kernel:
    WINDOW_RIGHT, WINDOW_LEFT  keys bounded on the right (causal, or a window's right side) / left
    SOFTCAP, HAS_ALIBI       the score modifiers softcap * tanh(s / softcap), -slope * |j - i - off|
                             (HAS_ALIBI: 1 as written, 2 the one-sided form of causal calls, below)
    HAS_SINKS                (forward, preprocess) a sink logit per head in the softmax
    HAS_MASK, MASK_IS_BOOL   an attn_mask, boolean (True = takes part) or additive float
    KEY_PADDING              the mask is a boolean per-batch key padding mask (B, 1, 1, S)
    TILE_LISTS               any other boolean mask, its blocks listed per program (forward, dQ:
                             key blocks per query block; dK/dV: query blocks per key block), whole
                             ones run unmasked, hidden ones never read (_visible_blocks)
    HAS_DROPOUT              dropout on the attention probabilities
    IS_VARLEN                packed sequences: program (.., .., b) works on sequence b
    MASK_GRAD                (dQ kernel) also write dS, the gradient of an additive mask

Forward (grid (cdiv(L, BLOCK_M), Hq, B): one program per block of BLOCK_M query rows of one head):
    For each key block, s = q @ k^T * scale (+ mask) is turned into probabilities with the online
    softmax: the running row max m and row sum l are updated, and the fp32 accumulator is rescaled
    by alpha = exp(m_old - m_new) before adding p @ v. At the end out = acc / l and lse = m + log(l).
    We work in base 2 throughout: scores are multiplied by scale * log2(e) so exp becomes exp2 (one
    hardware instruction), and the base-2 lse is converted to natural log only when stored
    (lse = lse2 * ln 2).

Which keys a query sees (WINDOW_RIGHT / WINDOW_LEFT, runtime window_left / window_right /
bottom_right, see _diagonals): key j of query i takes part iff i + off - left <= j <= i + off +
right, off = S - L when bottom-right aligned (flash-attn's; per sequence for varlen), else 0
(torch's top-left causal); causal is right = 0, and an unbounded side has no flag. The key loop of a
query block [m0, m0 + BLOCK_M) runs in up to three phases (_key_block_bounds): the blocks at the
window's left edge (masked), the blocks every row sees in full (no element mask, the fast path),
and the blocks at its right edge - the causal diagonal - and the ragged last block at S (masked).
Key blocks wholly outside every row's window are never visited; the dK/dV loop over query blocks
mirrors this (_query_block_bounds).

Scores (_scores, in flash-attn's order): qk * scale, capped to softcap * tanh(qk * scale / softcap)
(SOFTCAP; numerics.tanh), minus slope * |j - (i + off)| (HAS_ALIBI, from the (B, Hq) slopes,
never materialised; where no key right of the diagonal is seen, a window right side of 0 as with
is_causal, that is slope * (j - ref) - slope * (i + off - ref) for any ref, a key part and a row
part: HAS_ALIBI == 2 adds the key part inside the score's FFMA and moves the row part to the row
statistic - the backward's lse, the forward's row max after its loop - so that ALiBi costs one
instruction per score where |j - i - off| costs three), plus an attn_mask, read tile by tile
through its four strides (0 on broadcast dims, so a (L, S) or (B, 1, 1, S) mask is never
expanded): a bool mask hides the pairs
where it is False, a float mask is added, its -inf entries hiding their pairs. Hidden pairs score
-inf and the running row max starts at a finite value (_ROW_MAX_START), so their probabilities are
exactly 0, and a row that sees no key at all ends with l = 0: it gets out = 0 and lse = -inf, and
the backward (which reads such a row's lse as +inf, "P = 0") gives it zero gradients. Finite
float-mask values are clamped at -3e29 so that torch.finfo(dtype).min "masks" stay finite: a row
hidden only by them gets torch's uniform attention, not 0. Sinks (HAS_SINKS) join each row's
softmax normaliser once, after the key loop: l += exp(sink - m) (the lse includes the sink, a row
that sees no key gets out = 0); the backward's d(sink) = -sum_rows exp(sink - lse) * delta comes
from the preprocess kernel, in per-block parts summed by the launcher (deterministic).

Key-padding fast path: for a boolean (B, 1, 1, S) mask the launchers list, per batch, the key blocks
whose keys are all visible (whole), then those with some visible (partial), with running counts of
each per block; the forward and dQ loops (and the decode kernel's) walk the whole blocks of each
phase with no mask, then its partial ones with the mask, so fully padded key blocks are never
loaded and a padded batch's main loop is the plain one; the dK/dV program of a fully padded key
block skips its query loop (its dK, dV are 0).

Dropout: the probabilities that multiply V are kept with probability 1 - p and scaled by
1 / (1 - p) (the softmax normalisation l uses all of them, as torch's dropout(softmax(s)) @ v). The
keep-mask comes from Philox (numerics.dropout_keep_tile) keyed by (seed, b * Hq + h), the seed read
from a device tensor (so a CUDA graph replays with the seed drawn in that replay): one call gives
the 4 words of queries {q, q + 8} x keys {k, k + 8}, the scores one thread holds in the MMA layout
of either orientation, unique per (batch, head, query, key) for any length below 2^32 (per
sequence for varlen). The backward draws the same numbers for the same (query, key) pairs, whatever
its tiles (multiples of 16, as every attention tile is).

Variable length (IS_VARLEN): the batch grid axis runs over sequences; a program reads its sequence's
start and length from cu_seqlens and works on rows start .. start + length - 1 of the packed
tensors, exactly as a padded program works on its batch entry (the packed tensors are passed with
batch stride 0). Programs past the end of their sequence return at once.

Backward (FlashAttention-2): with P = softmax(s) recomputed from the saved lse and Z the dropout
keep-mask scaled by 1 / (1 - p) (1 without dropout),
    dV = (P * Z)^T @ dO,    dP = (dO @ V^T) * Z,    dS = P * (dP - delta),   delta = rowsum(dO * O),
    dQ = scale * dS' @ K,   dK = scale * dS'^T @ Q, d(additive mask) = dS,
with dS' = dS * (1 - tanh^2) under a softcap (dS otherwise). Three kernels: a preprocess computing
delta (and the base-2 lse the loops read, and the sinks' gradient); a dK/dV kernel that owns one
key block of one kv head and loops over the query blocks of all GROUP query heads that read it (so
the GQA reduction over heads happens in registers, no atomics); a dQ kernel that owns one query block and loops over key
blocks (and, for a float mask that needs a gradient, writes dS to a full (B, Hq, L, S) fp32 buffer
that the launcher sums over the mask's broadcast dims). Both recompute (P, dS) with the same
helper, the dK/dV kernel in transposed (key-major) orientation so that P^T and dS^T come out
directly as the left operands of its products. Both reuse the forward's loop phases. No float
atomics anywhere, so the backward is deterministic (bitwise reproducible run to run).

K and V in the forward (KV_TMA): on Hopper (configs.attention_descriptors) each program makes
two tensor descriptors over its (batch, kv head)'s keys, a varlen sequence's own rows, and the key
loop fetches each block with the TMA unit (rows past S and columns past D arrive as 0, as the
masked pointer loads give them: the two paths are bitwise equal). Taken when k and v allow it (unit
last stride, 16-byte aligned base and strides: contiguous tensors and Hugging Face's
(B, N, H, D).transpose(1, 2) views for head dims that are multiples of 8); pointer tiles otherwise.
The backward reads what its loops stream the same way: q and dO in the dK/dV kernel (QDO_TMA; with
SPLIT a second pair of descriptors over this program's part of their columns), K and V in the dQ
kernel (KV_TMA), each checked as the forward's K and V, from Triton 3.9 on (3.6's ptxas crashes on
the dK/dV kernel's: configs.BACKWARD_DESCRIPTORS_FROM; pointer tiles there). Besides the address
arithmetic this drops the proxy fence that every stage of cp.async copies needs before wgmma reads
them (the d64 dK/dV loop: four MEMBAR + FENCE groups of six instructions an iteration).
The forward writes out (and its rounding residual) the same way (O_TMA, Dv a multiple of 8): the
TMA unit clips the last block at L, and no address or mask of the output tile takes registers at
the end of the kernel (the d256 forward, whose accumulator holds 128 registers a thread, spilled
there).

Launch settings: configs.py lists the candidates of each pass (one under the interpreter and off
Hopper); on Hopper the launchers let kernels/autotune.py time them on the first call of each
problem key and launch the fastest (each kernel writes its outputs whole, so a timing launch may
repeat).

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

from . import autotune
from .configs import (ATTN_BWD_ROW_PAD, ATTN_TILE_LISTS_MIN_BLOCKS, COMPILE_OPTIONS,
                      arch_major, attention_bwd_candidates, attention_descriptors,
                      attention_fwd_candidates, cdiv, device_guard, interpreting, next_power_of_2)
from .numerics import (_TWO_LOG2E, Constant, dropout_args, dropout_keep_tile, load_seed, round_to,
                       seed_arg, tanh, tanh_complement)

__all__ = ["attention_fwd", "attention_bwd", "varlen_attention_fwd", "varlen_attention_bwd",
           "attention_probs", "varlen_attention_probs"]

_LOG2E = Constant(1.4426950408889634)  # log2(e): exp(x) = exp2(x * log2(e))
_LN2 = Constant(0.6931471805599453)  # ln(2): ln(x) = log2(x) * ln(2)
# Start of a row's running max, in log2 units: finite on purpose, so that a hidden pair (score -inf)
# gets exp2(-inf - m) = 0, never exp2(-inf - -inf) = NaN, even in a row with no visible key yet.
_ROW_MAX_START = Constant(-1.0e30)
# Floor of a finite additive mask value: times log2(e) still finite and above _ROW_MAX_START, so
# that pairs "masked" with torch.finfo(dtype).min take part as torch's softmax has them.
_MIN_BIAS = Constant(-3.0e29)
_ROW_PAD = Constant(ATTN_BWD_ROW_PAD)  # see _stat_rows


# --------------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, rows, cols, n_rows, n_cols, stride_row, stride_col):
    """Load the (len(rows), len(cols)) tile base[rows, cols]; out-of-range elements read as 0.
    n_cols None: the caller knows every column is in range, and the load takes no mask along
    them (the dQ loop's unmasked phase, whose key blocks, on the columns of K^T and V^T, are whole).

    Swapping (rows, n_rows, stride_row) with the column arguments loads the transposed tile.
    Offsets are int64 so that index * stride cannot overflow for long sequences.
    """
    offsets = rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
    if n_cols is None:
        mask = rows[:, None] < n_rows
    else:
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
def _store_rows(base, value, row0, rows, cols, n_rows, n_cols, stride_row, stride_col,
                TMA: tl.constexpr):
    """_store_tile of `value`, rows row0 + arange(len(rows)) (= rows) of an (n_rows, n_cols)
    matrix; with TMA through a tensor descriptor (stride_col 1, base and stride_row 16-byte
    aligned: the launcher checks): the TMA unit writes the tile from shared memory and clips it at
    n_rows and n_cols, with no per-element address or mask in registers."""
    if TMA:
        dst = tl.make_tensor_descriptor(base, shape=[n_rows, n_cols], strides=[stride_row, 1],
                                        block_shape=[value.shape[0], value.shape[1]])
        dst.store([row0, 0], round_to(value, base.dtype.element_ty))
    else:
        _store_tile(base, value, rows, cols, n_rows, n_cols, stride_row, stride_col)


@triton.jit
def _row_source(base, n_rows, n_cols, stride_row, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                TMA: tl.constexpr):
    """What the loops read an (n_rows, n_cols) matrix at `base` (row stride stride_row) through:
    with TMA a tensor descriptor of (BLOCK_R, BLOCK_C) blocks (unit column stride, base and
    stride_row 16-byte aligned: the launcher checks), whose loads the TMA unit makes with no
    per-element address arithmetic and which fill rows past n_rows and columns past n_cols with 0,
    as the masked pointer loads do; else `base` itself."""
    if TMA:
        return tl.make_tensor_descriptor(base, shape=[n_rows, n_cols], strides=[stride_row, 1],
                                         block_shape=[BLOCK_R, BLOCK_C])
    else:
        return base


@triton.jit
def _dot_operand(x, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    """Cast a tile to what tl.dot should consume: DTYPE (the input dtype, for the tensor cores) on
    the GPU, fp32 under the interpreter (where bf16 arithmetic is wrong)."""
    if DOT_FP32:
        return x.to(tl.float32)
    else:
        return x.to(DTYPE)


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """x (fp32) rounded to DTYPE (round to nearest even, as a store rounds) and back to fp32. bf16
    by bit arithmetic: the interpreter's bf16 conversions are not to be trusted."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _load_dot_operand(base, rows, cols, n_rows, n_cols, stride_row, stride_col, DOT_FP32: tl.constexpr):
    """_load_tile of a tile that only feeds tl.dot (q, k, v, dO): kept in its dtype on the GPU."""
    tile = _load_tile(base, rows, cols, n_rows, n_cols, stride_row, stride_col)
    return _dot_operand(tile, base.dtype.element_ty, DOT_FP32)


@triton.jit
def _sequence(CuSeqlens, off_b, n, IS_VARLEN: tl.constexpr):
    """(first row, length) of batch entry off_b: with IS_VARLEN its rows cu_seqlens[b] ..
    cu_seqlens[b + 1] - 1 of the packed tensor of n rows (first row as int64), clamped to rows
    0 .. n - 1 (on CUDA cu_seqlens is not read back on the host: a bad one must not reach outside
    the tensor); else (0, n)."""
    if IS_VARLEN:
        start = tl.minimum(tl.maximum(tl.load(CuSeqlens + off_b), 0), n)
        length = tl.minimum(tl.maximum(tl.load(CuSeqlens + off_b + 1), start), n) - start
        start = start.to(tl.int64)
    else:
        start = 0
        length = n
    return start, length


@triton.jit
def _head_rows(base, off_b, off_h, start, stride_b, stride_h, stride_row):
    """Pointer to row `start` (0, or a packed sequence's first row) of head off_h of batch entry
    off_b: base + b * stride_b + h * stride_h + start * stride_row, in int64."""
    return base + off_b.to(tl.int64) * stride_b + off_h.to(tl.int64) * stride_h + start * stride_row


@triton.jit
def _stat_rows(base, off_b, off_h, q_start, stride_b, stride_h, IS_VARLEN: tl.constexpr):
    """Pointer to the first row of (batch entry off_b, head off_h) in the backward's row statistics
    (Lse2, Delta: _bwd_row_stats), whose every sequence is followed by padding up to a multiple of
    ATTN_BWD_ROW_PAD rows, +inf and 0 there, so that the dK/dV loop reads a query block's lse2 and
    delta without a row mask. Packed (IS_VARLEN): sequence b starts at row q_start + b * PAD."""
    if IS_VARLEN:
        q_start += off_b.to(tl.int64) * _ROW_PAD
    return _head_rows(base, off_b, off_h, q_start, stride_b, stride_h, 1)


@triton.jit
def _load_lse2(lse2_ptrs, valid, HAS_ALIBI: tl.constexpr):
    """The backward's base-2 logsumexp of some query rows (Lse2, written by the preprocess kernel:
    +inf for a row that saw no key, so that its recomputed P = exp2(s - lse2) is exactly 0, not
    exp2(+inf)). Rows past the end read 0: with q = dO = delta = 0 there they add exactly 0 to
    every gradient, as P = exp2(bias) is finite; with ALiBi they read +inf (P = 0), as a negative
    slope's bias could overflow exp2. (A zero `other` is free: the load zeroes the register.)"""
    if HAS_ALIBI:
        return tl.load(lse2_ptrs, mask=valid, other=float("inf"))
    else:
        return tl.load(lse2_ptrs, mask=valid, other=0.0)


# The score-tile helpers below work in either orientation: the caller passes the dot operands and
# the query / key indices already broadcast to the tile's shape, e.g. q_idx = offs_m[:, None] and
# k_idx = offs_n[None, :] for a (BLOCK_M, BLOCK_N) tile of q @ k^T (forward, dQ), or
# q_idx = offs_m[None, :] and k_idx = offs_n[:, None] for a (BLOCK_N, BLOCK_M) tile of k @ q^T
# (dK/dV, which then gets P^T and dS^T directly as the left operands of its products).
#
# Which keys a query sees: key j of query i takes part iff i + diag_lo <= j <= i + diag_hi, the
# diagonals of _diagonals (WINDOW_RIGHT: causal, or a window's right side; WINDOW_LEFT: a window's
# left side; each side unbounded without its flag).


@triton.jit
def _diagonals(L, S, window_left, window_right, bottom_right):
    """(diag_lo, diag_hi, off) of a (batch entry's) L x S score matrix: off = S - L when the
    diagonal is bottom-right aligned (flash-attn's causal; the last query sees the last key), else
    0 (top-left, torch's); a window (left, right) around it, causal being right = 0."""
    off = bottom_right * (S - L)
    return off - window_left, off + window_right, off


@triton.jit
def _softcap_factors(scale, softcap, SOFTCAP: tl.constexpr):
    """(cap_in, cap_out) of _scores: a capped score in log2 units is
    tanh(qk * cap_in) * cap_out = softcap * tanh(qk * scale / softcap) * log2(e)."""
    if SOFTCAP:
        return scale / softcap, softcap * _LOG2E
    else:
        return 0.0, 0.0


@triton.jit
def _dqk_scale(scale, SOFTCAP: tl.constexpr, DTYPE: tl.constexpr):
    """The factor dQ and dK take once at the end (d(scores)/d(q @ k^T)): the softmax scale, times
    4 under an fp16 / bf16 softcap, whose dS_qk tiles hold a quarter of its derivative (_scores:
    a power of 2, so no rounding moves)."""
    if SOFTCAP and DTYPE != tl.float32:
        return scale * 4.0
    else:
        return scale


@triton.jit
def _alibi_slope2(Alibi, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI: tl.constexpr):
    """The ALiBi slope of (batch off_b, query head off_h) in log2 units (0.0 without ALiBi)."""
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b.to(tl.int64) * stride_ab + off_h.to(tl.int64) * stride_ah)
        return slope.to(tl.float32) * _LOG2E
    else:
        return 0.0


@triton.jit
def _alibi_keys(slope2, keys, KEYS_ON_ROWS: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """One-sided ALiBi's key part (see _scores) of the keys n0 + `keys` of a block, relative to
    its first key n0: slope2 * keys as a (1, BLOCK) row (keys on the tile's columns) or a (BLOCK, 1)
    column (KEYS_ON_ROWS). Made once per program, outside the key loops: what a block adds to it,
    slope2 * (n0 - ref), is one number per block, and the callers move it to the row side. Without
    HAS_ALIBI == 2: slope2 itself."""
    if HAS_ALIBI == 2:
        part = slope2 * keys.to(tl.float32)
        return part[:, None] if KEYS_ON_ROWS else part[None, :]
    else:
        return slope2


@triton.jit
def _visible(q_idx, k_idx, S, diag_lo, diag_hi,
             WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Mask of the (query, key) pairs that take part: key in range, and inside the window."""
    visible = k_idx < S
    if WINDOW_RIGHT:
        visible = visible & (k_idx <= q_idx + diag_hi)
    if WINDOW_LEFT:
        visible = visible & (k_idx >= q_idx + diag_lo)
    return visible


@triton.jit
def _scores(a, b, q_idx, k_idx, shift, L, S, diag_lo, diag_hi, off,
            qk_scale, cap_in, cap_out, alibi,
            mask_base, stride_ml, stride_ms,  # attn_mask of this (batch, query head)
            MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
            HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, KEY_PADDING: tl.constexpr,
            SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, ACCURATE: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """(s, dcap): s the tile's scores in log2 units minus `shift` (a row statistic broadcast like
    q_idx, or 0.0), hidden pairs -inf; dcap the softcap's derivative for the backward (SOFTCAP,
    else 0.0): 1 - tanh^2 of the capped score with ACCURATE (fp32 inputs: numerics.tanh), else a
    quarter of it (see _dqk_scale). With qk = a @ b (q @ k^T, or k @ q^T) in fp32, the score of a
    pair is, in flash-attn's order,
        qk * scale, or softcap * tanh(qk * scale / softcap)   (SOFTCAP: cap_in = scale / softcap,
                                                               cap_out = softcap * log2(e))
        - slope * |j - (i + off)|                             (HAS_ALIBI 1: alibi = slope * log2(e))
        + attn_mask                                           (HAS_MASK: a bool one hides pairs)
    and with MASKED the pairs outside the window or past S are hidden (only the blocks at the
    window's edges and the last block pay for it). Hidden pairs get -inf, never a select after
    the exp2: the callers' row max starts finite (_ROW_MAX_START).

    With HAS_ALIBI == 2 (one-sided: only pairs with j <= i + off are visible) `alibi` is instead
    the key part of the ALiBi bias, slope * log2(e) * (j - ref) for a reference key ref of the
    caller's choosing, broadcast like k_idx (_alibi_keys), and `shift` (or the forward's row max)
    carries the rest, slope * log2(e) * (i + off - ref); `off` is then unused."""
    qk = tl.dot(a, b, input_precision=DOT_PRECISION)
    dcap = 0.0
    if SOFTCAP and not ACCURATE:
        # cap_out * tanh - shift = (cap_out - shift) - 2 cap_out r, one FFMA from r, the shift per
        # row (numerics.tanh_complement); dcap = r (1 - r), one FFMA: a quarter of 1 - tanh^2,
        # the 4 rides on the backward's final scale (_dqk_scale)
        r = tanh_complement(qk * (cap_in * _TWO_LOG2E))
        s = (cap_out - shift) - (2.0 * cap_out) * r
        dcap = r - r * r
        if HAS_ALIBI == 2:
            s += alibi
    else:
        if SOFTCAP:  # fp32
            t = tanh(qk * cap_in)
            s = t * cap_out
            dcap = 1.0 - t * t
        else:
            s = qk * qk_scale
        if HAS_ALIBI == 2:  # a vector of keys, added in the FFMA above: no instruction of its own
            s += alibi
        s -= shift  # without ALiBi one FFMA with the scale
    if HAS_ALIBI == 1:  # |j - i - off| in fp32 from the index vectors: a FADD and a FFMA per score
        s -= alibi * tl.abs(k_idx.to(tl.float32) - (q_idx + off).to(tl.float32))
    if HAS_MASK:
        if KEY_PADDING:  # one row of keys for every query: load a vector, broadcast below
            offsets = k_idx.to(tl.int64) * stride_ms
            in_range = k_idx < S
        else:
            offsets = q_idx.to(tl.int64) * stride_ml + k_idx.to(tl.int64) * stride_ms
            in_range = (q_idx < L) & (k_idx < S)
        if MASK_IS_BOOL:
            # From the byte m (0 or 1) with one integer multiply-add and no predicate per score:
            # (m - 1) * 2**23 is 0, or 0xFF800000, the bits of -inf.
            keep = tl.load(mask_base + offsets, mask=in_range, other=0).to(tl.int32)
            s += ((keep - 1) * 0x800000).to(tl.float32, bitcast=True)
        else:
            mask = tl.load(mask_base + offsets, mask=in_range, other=float("-inf")).to(tl.float32)
            s += tl.where(mask == float("-inf"), float("-inf"), tl.maximum(mask, _MIN_BIAS) * _LOG2E)
    if MASKED:
        s = tl.where(_visible(q_idx, k_idx, S, diag_lo, diag_hi, WINDOW_LEFT, WINDOW_RIGHT),
                     s, float("-inf"))
    return s, dcap


@triton.jit
def _dropout_keep(seed_bh, q_idx, k_idx, m0, n0, dropout_threshold):
    """Dropout keep-mask of a tile whose queries q_idx are m0 + arange(BLOCK_M) and keys k_idx
    n0 + arange(BLOCK_N) (m0, n0 multiples of 16), in the orientation of q_idx / k_idx: Philox
    keyed by seed_bh (seed + (b * Hq + h) << 32), see numerics.dropout_keep_tile."""
    return dropout_keep_tile(seed_bh, m0, n0, q_idx.numel, k_idx.numel, q_idx.shape[0] == 1,
                             dropout_threshold)


@triton.jit
def _block_phases(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    """The key (or query) ranges of _key_block_bounds / _query_block_bounds made consecutive and
    block-aligned: [lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, hi) masked, each
    possibly empty; lo, full_lo and full_hi (unless it is hi) multiples of BLOCK, so that each
    block is in one phase."""
    end = tl.cdiv(hi, BLOCK) * BLOCK
    lo = tl.minimum(lo, end)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), end)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), end)
    return lo, full_lo, full_hi, hi


@triton.jit
def _phase_range(phase: tl.constexpr, b0, b1, b2, b3):
    """The range of loop phase `phase` (a static_range index: 0, 1 or 2) over the consecutive
    ranges of _block_phases: [b0, b1) masked, [b1, b2) unmasked, [b2, b3) masked."""
    if phase == 0:
        return b0, b1
    elif phase == 1:
        return b1, b2
    else:
        return b2, b3


@triton.jit
def _key_block_bounds(m0, m_last, S, diag_lo, diag_hi, WINDOW_LEFT: tl.constexpr,
                      WINDOW_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range a block of queries at positions m0 .. m_last visits (a query block
    [m0, m0 + BLOCK_M): m_last = m0 + BLOCK_M - 1), as (n_lo, n_full_lo, n_full_hi, n_hi): key
    blocks starting in [n_full_lo, n_full_hi) need no element mask, those in [n_lo, n_full_lo)
    (the window's left edge) and [n_full_hi, n_hi) (its right edge, the diagonal, and the ragged
    block at S) do. Blocks wholly outside the window are never visited.

    A key block [n, n + BLOCK_N) needs no mask when it lies inside [0, S) and every query of the
    block sees all of it: n + BLOCK_N - 1 <= m0 + diag_hi (the first query) and
    n >= m_last + diag_lo (the last one). (Offsets clamped at 0 before dividing.)
    """
    if WINDOW_RIGHT:
        n_hi = tl.minimum(tl.maximum(m_last + 1 + diag_hi, 0), S)
        n_full_hi = (tl.maximum(tl.minimum(S, m0 + 1 + diag_hi), 0) // BLOCK_N) * BLOCK_N
    else:
        n_hi = S
        n_full_hi = (S // BLOCK_N) * BLOCK_N
    if WINDOW_LEFT:
        n_lo = (tl.maximum(m0 + diag_lo, 0) // BLOCK_N) * BLOCK_N
        n_full_lo = tl.cdiv(tl.maximum(m_last + diag_lo, 0), BLOCK_N) * BLOCK_N
        return _block_phases(n_lo, n_full_lo, n_full_hi, n_hi, BLOCK_N)
    else:  # [0, n_full_hi) and [n_full_hi, n_hi), in order already (n_full_hi <= n_hi)
        return 0, 0, n_full_hi, n_hi


@triton.jit
def _block_range(block_counts, lo, hi, LISTS: tl.constexpr, BLOCK: tl.constexpr):
    """Loop bounds over the blocks (of BLOCK keys, or with the dK/dV kernel's lists BLOCK queries)
    starting in [lo, hi) (lo a multiple of BLOCK, or hi itself: an empty range): the positions
    themselves (step BLOCK), or with LISTS positions in the program's list of visible blocks
    (step 1; block_counts: one part's row of _visible_blocks' counts, see _list_part)."""
    if LISTS:
        i_lo = tl.load(block_counts + tl.cdiv(lo, BLOCK))
        i_hi = tl.load(block_counts + tl.cdiv(hi, BLOCK))
    else:
        i_lo = lo
        i_hi = hi
    return i_lo, i_hi


@triton.jit
def _list_part(block_counts, part: tl.constexpr, N_BLOCKS, LISTS: tl.constexpr):
    """block_counts of loop part `part` (a static_range index). With LISTS each phase's loop runs
    twice: part 0 over the program's whole blocks, with no mask (every pair visible), part 1
    over its partial ones, with the mask (see _visible_blocks); otherwise once (part 0), with
    block_counts as given."""
    if LISTS:
        return block_counts + part * (N_BLOCKS + 1)
    else:
        return block_counts


@triton.jit
def _block_lists(Blocks, BlockCounts, off_b, off_h, pid, list_sb, list_sh, list_sp, N_BLOCKS):
    """(block_ids, block_counts): the lists of _visible_blocks of program block pid (a query
    block, or the dK/dV kernel's key block) of (batch off_b, head off_h), list number
    off_b * list_sb + off_h * list_sh + pid * list_sp (strides 0 on the dims a list serves whole:
    a key-padding mask has one list per batch entry)."""
    idx = off_b.to(tl.int64) * list_sb + off_h.to(tl.int64) * list_sh + pid.to(tl.int64) * list_sp
    return Blocks + idx * N_BLOCKS, BlockCounts + idx * (2 * (N_BLOCKS + 1))


@triton.jit
def _block_start(block_ids, i, LISTS: tl.constexpr, BLOCK: tl.constexpr):
    """First position (key, or query) of the block at loop index i of _block_range (block_ids:
    the program's list of visible blocks)."""
    if LISTS:
        return tl.load(block_ids + i) * BLOCK
    else:
        return i


@triton.jit
def _query_block_bounds(n0, L, m_hi, diag_lo, diag_hi, WINDOW_LEFT: tl.constexpr,
                        WINDOW_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query range that sees key block [n0, n0 + BLOCK_N), as _key_block_bounds' mirror
    (m_lo, m_full_lo, m_full_hi, m_hi): query blocks starting in [m_full_lo, m_full_hi) see all of
    it, those in [m_lo, m_full_lo) (the diagonal) and [m_full_hi, m_hi) (the window's left edge)
    need the element mask. m_hi: L, or 0 for a key block that no query sees (key padding).

    Query i sees key j iff j - diag_hi <= i <= j - diag_lo; a query block [m, m + BLOCK_M) sees all
    of the key block when m >= n0 + BLOCK_N - 1 - diag_hi and m + BLOCK_M - 1 <= n0 - diag_lo.
    Query rows past L and key rows past S need no mask in the unmasked phase: rows past L load
    q = dO = delta = 0 (so contribute exactly 0 to dK, dV; see _load_lse2), and keys past S are
    never stored.
    """
    if WINDOW_RIGHT:
        m_lo = (tl.maximum(n0 - diag_hi, 0) // BLOCK_M) * BLOCK_M
        m_full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag_hi, 0), BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        m_full_lo = 0
    if WINDOW_LEFT:
        m_hi = tl.minimum(tl.maximum(n0 + BLOCK_N - diag_lo, 0), m_hi)
        m_full_hi = (tl.maximum(n0 - diag_lo + 1, 0) // BLOCK_M) * BLOCK_M
        return _block_phases(m_lo, m_full_lo, m_full_hi, m_hi, BLOCK_M)
    else:  # two phases, [m_lo, m_full_lo) and [m_full_lo, m_hi): fewer values live in the loop
        m_full_lo = tl.minimum(m_full_lo, m_hi)
        return m_lo, m_full_lo, m_hi, m_hi


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _page_rows(page_table, n_pages, keys, valid, stride_page, stride_row, PAGE_SIZE: tl.constexpr):
    """Offsets (int64) of the cache rows of keys (positions) in a paged cache: key n is row
    n % PAGE_SIZE of page page_table[n // PAGE_SIZE], pages clamped to [0, n_pages) so that a bad
    block table never reads outside the cache. Scalar keys give a scalar offset."""
    page = tl.load(page_table + keys // PAGE_SIZE, mask=valid, other=0)
    page = tl.minimum(tl.maximum(page, 0), n_pages - 1).to(tl.int64)
    return page * stride_page + (keys % PAGE_SIZE).to(tl.int64) * stride_row


@triton.jit
def _load_kv_block(k_src, v_src, n0, S, D, Dv, stride_ks, stride_kd, stride_vs, stride_vd,
                   page_table, n_pages, stride_kp, stride_vp,
                   PAGE_SIZE: tl.constexpr, KV_TMA: tl.constexpr, DTYPE: tl.constexpr,
                   DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
    """The dot operands K^T (BLOCK_D, BLOCK_N) and V (BLOCK_N, BLOCK_DV) of keys n0 .. n0 +
    BLOCK_N - 1; keys past S and columns past D / Dv read as 0. K and V come by tensor descriptor
    (KV_TMA), through a paged cache's block table (PAGE_SIZE > 0: one page per block when
    PAGE_SIZE is a multiple of BLOCK_N, else a page per key), or as pointer tiles."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if KV_TMA:  # rows past S and columns past D arrive as 0, as the masked loads give them
        kT = _dot_operand(tl.trans(k_src.load([n0, 0])), DTYPE, DOT_FP32)
        v = _dot_operand(v_src.load([n0, 0]), DTYPE, DOT_FP32)
    elif PAGE_SIZE > 0 and PAGE_SIZE % BLOCK_N == 0:  # the block lies in one page
        k_blk = k_src + _page_rows(page_table, n_pages, n0, True, stride_kp, stride_ks, PAGE_SIZE)
        v_blk = v_src + _page_rows(page_table, n_pages, n0, True, stride_vp, stride_vs, PAGE_SIZE)
        rows = tl.arange(0, BLOCK_N)
        kT = _load_dot_operand(k_blk, offs_d, rows, D, S - n0, stride_kd, stride_ks, DOT_FP32)
        v = _load_dot_operand(v_blk, rows, offs_dv, S - n0, Dv, stride_vs, stride_vd, DOT_FP32)
    elif PAGE_SIZE > 0:  # small pages: each key's row through the table
        valid = offs_n < S
        k_rows = _page_rows(page_table, n_pages, offs_n, valid, stride_kp, stride_ks, PAGE_SIZE)
        v_rows = _page_rows(page_table, n_pages, offs_n, valid, stride_vp, stride_vs, PAGE_SIZE)
        kT = tl.load(k_src + k_rows[None, :] + offs_d.to(tl.int64)[:, None] * stride_kd,
                     mask=valid[None, :] & (offs_d < D)[:, None], other=0.0)
        v = tl.load(v_src + v_rows[:, None] + offs_dv.to(tl.int64)[None, :] * stride_vd,
                    mask=valid[:, None] & (offs_dv < Dv)[None, :], other=0.0)
        kT = _dot_operand(kT, DTYPE, DOT_FP32)
        v = _dot_operand(v, DTYPE, DOT_FP32)
    else:
        kT = _load_dot_operand(k_src, offs_d, offs_n, D, S, stride_kd, stride_ks, DOT_FP32)
        v = _load_dot_operand(v_src, offs_n, offs_dv, S, Dv, stride_vs, stride_vd, DOT_FP32)
    return kT, v


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i,  # running state: (BLOCK_M, BLOCK_DV) fp32, (BLOCK_M,) fp32, (BLOCK_M,) fp32
    q,  # (BLOCK_M, BLOCK_D) dot operand
    k_src, v_src,  # K, V of this (batch, kv head): row pointers, or descriptors with KV_TMA
    mask_base,  # attn_mask of this (batch, query head)
    block_ids, block_counts,  # this program's visible key blocks (LISTS)
    page_table, n_pages,  # this sequence's row of a paged cache's block table (PAGE_SIZE > 0)
    offs_m, n_lo, n_hi, L, S, D, Dv, diag_lo, diag_hi, alibi_ref,
    stride_ks, stride_kd, stride_vs, stride_vd, stride_kp, stride_vp, stride_ml, stride_ms,
    qk_scale, cap_in, cap_out, slope2, dropout_threshold, seed_bh,
    MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, KEY_PADDING: tl.constexpr,
    LISTS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PAGE_SIZE: tl.constexpr, KV_TMA: tl.constexpr, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Online-softmax accumulation over the key blocks starting in [n_lo, n_hi). offs_m: the
    query positions of the tile's rows (the rows themselves, or for the decode kernel's packed
    (query, head) rows their queries); slope2 a scalar or per-row (BLOCK_M, 1) ALiBi slopes.
    HAS_ALIBI == 1: alibi_ref is the diagonal's offset off; HAS_ALIBI == 2 (one-sided, scalar
    slope2): the rows' running max m is that of the scores plus slope2 * (i + off - alibi_ref),
    the scores carrying slope2 * (j - alibi_ref) (see _scores; the caller takes it off m)."""
    # One-sided ALiBi's key part: in the unmasked phase one vector for every block (plus a number
    # per block, see below); in the masked phases, where more values are live, made per block
    keys = _alibi_keys(slope2, tl.arange(0, BLOCK_N), False, HAS_ALIBI)
    m0 = tl.min(offs_m, 0) if HAS_DROPOUT else 0  # the tile's first query (dropout's counters)
    i_lo, i_hi = _block_range(block_counts, n_lo, n_hi, LISTS, BLOCK_N)
    STEP: tl.constexpr = 1 if LISTS else BLOCK_N
    for i in range(i_lo, i_hi, STEP):
        n0 = _block_start(block_ids, i, LISTS, BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        alibi = keys
        block = 0.0
        if HAS_ALIBI == 2:
            if MASKED:
                alibi = _alibi_keys(slope2, offs_n - alibi_ref, False, HAS_ALIBI)
            else:
                block = slope2 * (n0 - alibi_ref).to(tl.float32)
        kT, v = _load_kv_block(k_src, v_src, n0, S, D, Dv, stride_ks, stride_kd, stride_vs,
                               stride_vd, page_table, n_pages, stride_kp, stride_vp, PAGE_SIZE,
                               KV_TMA, DTYPE, DOT_FP32, BLOCK_N, BLOCK_D, BLOCK_DV)
        if MASKED or HAS_MASK or SOFTCAP or HAS_ALIBI:
            s, _ = _scores(q, kT, offs_m[:, None], offs_n[None, :], 0.0, L, S, diag_lo, diag_hi,
                           alibi_ref, qk_scale, cap_in, cap_out, alibi, mask_base, stride_ml,
                           stride_ms, MASKED, WINDOW_LEFT, WINDOW_RIGHT, HAS_MASK, MASK_IS_BOOL,
                           KEY_PADDING, SOFTCAP, HAS_ALIBI, DTYPE == tl.float32,
                           DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            # m_i starts at the finite _ROW_MAX_START, so m_new is finite and hidden pairs get
            # p = exp2(-inf) = 0, also in a row with no visible key so far (which keeps l = 0).
            if HAS_ALIBI == 2:  # the block's slope2 * (n0 - ref), per row, not per score
                m_new = tl.maximum(m_i, tl.max(s, 1) + block)
                p = tl.exp2(s - (m_new - block)[:, None])
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.exp2(s - m_new[:, None])
        else:
            # Raw scores: qk_scale >= 0 (the launcher makes it so), so the row max of the scaled
            # scores is the scaled row max, and the scale folds into exp2's argument: one FFMA
            # per score instead of a multiply and a subtract.
            qk = tl.dot(q, kT, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old row max
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:  # l keeps every probability; only those that multiply V are dropped
            keep = _dropout_keep(seed_bh, offs_m[:, None], offs_n[None, :], m0, n0,
                                 dropout_threshold)
            p = tl.where(keep, p, 0.0)
        pv = tl.dot(_dot_operand(p, DTYPE, DOT_FP32), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _softmax_finish(acc, l_i, m_i, sink_ptrs, HAS_SINKS: tl.constexpr):
    """(out, lse) of rows from the online softmax's state (acc, l, m in log2 units): out = acc / l,
    lse = (m + log2 l) * ln 2. With HAS_SINKS each row's sink (loaded from sink_ptrs: a pointer, or
    a pointer per row) is one more logit of its softmax, with no value: rescaled to the larger of
    the row max and the sink, its term joins the normaliser. Rows that saw no key (l = 0) get
    out = 0 and lse = -inf instead of 0/0 (with a sink: out = 0 and lse = the sink)."""
    if HAS_SINKS:
        sink2 = tl.load(sink_ptrs).to(tl.float32) * _LOG2E
        m_sink = tl.maximum(m_i, sink2)
        alpha = tl.exp2(m_i - m_sink)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.exp2(sink2 - m_sink)
        m_i = m_sink
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    return out, lse


# Runtime scalars that vary per call without changing the code: not specialised (a window of 1,
# or 16, would otherwise compile a kernel of its own).
_UNSPECIALISED = ["dropout_threshold", "window_left", "window_right", "bottom_right"]


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _attn_fwd_kernel(
    # pointers
    Q,  # (B, Hq, L, D), or (Tq, Hq, D) when IS_VARLEN
    K,  # (B, Hkv, S, D), or (Tk, Hkv, D)
    V,  # (B, Hkv, S, Dv), or (Tk, Hkv, Dv)
    Out,  # (B, Hq, L, Dv), or (Tq, Hq, Dv)
    OutLo,  # as Out (its strides): the fp32 output's rounding residual out32 - out (STORE_LO)
    Lse,  # (B, Hq, L), or (Hq, Tq): float32, unit stride along the query rows
    Mask,  # (B, Hq, L, S) through strides (0 on broadcast dims): bool as uint8, or float (HAS_MASK)
    KeyBlocks,  # (G, cdiv(S, BLOCK_N)) int32: per list, key blocks with a visible key first (LISTS)
    KeyBlockCounts,  # (G, 2, cdiv(S, BLOCK_N) + 1) int32: list positions (LISTS)
    CuSeqlensQ, CuSeqlensK,  # (B + 1,) int32 cumulative sequence lengths (IS_VARLEN)
    Alibi,  # (B, Hq) float32 ALiBi slopes through strides (0 on a broadcast batch) (HAS_ALIBI)
    Sinks,  # (Hq,) sink logits, any float dtype (HAS_SINKS)
    # sizes
    Hq, L, S, D, Dv,  # L, S: the sequence lengths (varlen: the packed row counts)
    GROUP,  # Hq // Hkv
    N_KEY_BLOCKS,  # cdiv(S, BLOCK_N) (LISTS)
    list_sb, list_sh, list_sm,  # the list of (batch, head, query block): _block_lists (LISTS)
    # strides (batch strides 0 when IS_VARLEN)
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_lseb, stride_lseh,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_ab, stride_ah,
    # runtime scalars
    scale,  # softmax scale applied to q @ k^T
    window_left, window_right,  # window sides (WINDOW_LEFT / WINDOW_RIGHT; causal: right = 0)
    bottom_right,  # 1: the diagonal is bottom-right aligned (see _diagonals), 0: top-left
    softcap,  # > 0: scores capped to softcap * tanh(score / softcap) (SOFTCAP)
    dropout_threshold, dropout_scale,  # numerics.dropout_threshold(p); 1 / (1 - p) (0 if p == 1)
    Seed,  # (1,) int64 dropout seed on the device (read when HAS_DROPOUT)
    # constexpr flags
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, KEY_PADDING: tl.constexpr,
    TILE_LISTS: tl.constexpr,  # a bool (B, Hq, L, S) mask's key blocks listed per query block
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    STORE_LO: tl.constexpr,  # also write OutLo (half-precision inputs whose backward follows)
    KV_TMA: tl.constexpr,  # read K, V through tensor descriptors (TMA on Hopper): unit last
    #                        strides, 16-byte aligned base and other strides (the launcher checks)
    O_TMA: tl.constexpr,  # write Out (and OutLo) through tensor descriptors (as KV_TMA)
    DOT_FP32: tl.constexpr,  # cast dot operands to fp32 (interpreter only)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, else "tf32" (no effect on fp16/bf16)
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (query block, query head, batch): out and lse of BLOCK_M query rows."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    if WINDOW_RIGHT:
        # Later query blocks see more keys (causal): launch the heaviest blocks first.
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_hkv = off_h // GROUP
    q_start, L = _sequence(CuSeqlensQ, off_b, L, IS_VARLEN)
    k_start, S = _sequence(CuSeqlensK, off_b, S, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if IS_VARLEN:
        if m0 >= L:  # past the end of this (shorter) sequence
            return

    q_base = _head_rows(Q, off_b, off_h, q_start, stride_qb, stride_qh, stride_ql)
    k_base = _head_rows(K, off_b, off_hkv, k_start, stride_kb, stride_kh, stride_ks)
    v_base = _head_rows(V, off_b, off_hkv, k_start, stride_vb, stride_vh, stride_vs)
    o_base = _head_rows(Out, off_b, off_h, q_start, stride_ob, stride_oh, stride_ol)
    lse_base = _head_rows(Lse, off_b, off_h, q_start, stride_lseb, stride_lseh, 1)
    mask_base = _head_rows(Mask, off_b, off_h, 0, stride_mb, stride_mh, 0)
    # Listed key blocks (a bool mask): whole ones run with no mask, those hiding nothing visible
    # are never read
    LISTS: tl.constexpr = KEY_PADDING or TILE_LISTS
    block_ids, block_counts = _block_lists(KeyBlocks, KeyBlockCounts, off_b, off_h, pid_m, list_sb,
                                           list_sh, list_sm, N_KEY_BLOCKS)
    seed_bh = ((off_b * Hq + off_h).to(tl.int64) << 32) + load_seed(Seed, HAS_DROPOUT)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qk_scale = scale * _LOG2E  # exp(scale * x) == exp2(qk_scale * x)
    cap_in, cap_out = _softcap_factors(scale, softcap, SOFTCAP)
    slope2 = _alibi_slope2(Alibi, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)
    diag_lo, diag_hi, off = _diagonals(L, S, window_left, window_right, bottom_right)
    # One-sided ALiBi (see _scores): the scores carry slope * (j - (m0 + off)), each row's own
    # slope * (i - m0) (at most BLOCK_M slopes: no large number beside the scores) comes off m after
    # the loop
    alibi_ref = m0 + off if HAS_ALIBI == 2 else off

    q = _load_dot_operand(q_base, offs_m, offs_d, L, D, stride_ql, stride_qd, DOT_FP32)
    # This (batch, kv head)'s S keys (a varlen sequence's own rows)
    k_src = _row_source(k_base, S, D, stride_ks, BLOCK_N, BLOCK_D, KV_TMA)
    v_src = _row_source(v_base, S, Dv, stride_vs, BLOCK_N, BLOCK_DV, KV_TMA)
    m_i = tl.full([BLOCK_M], _ROW_MAX_START, dtype=tl.float32)  # running row max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)  # running sum of exp2(s - m_i) @ v

    n_lo, n_full_lo, n_full_hi, n_hi = _key_block_bounds(m0, m0 + BLOCK_M - 1, S, diag_lo,
                                                         diag_hi, WINDOW_LEFT, WINDOW_RIGHT,
                                                         BLOCK_N)
    for phase in tl.static_range(0 if WINDOW_LEFT else 1, 3):
        # 0: the window's left edge, masked; 1: the key blocks every row sees whole, no element
        # mask; 2: the right edge (the causal diagonal) and the ragged block at S, masked
        lo, hi = _phase_range(phase, n_lo, n_full_lo, n_full_hi, n_hi)
        for part in tl.static_range(2 if LISTS else 1):
            counts = _list_part(block_counts, part, N_KEY_BLOCKS, LISTS)
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, k_src, v_src, mask_base, block_ids, counts, Lse, 1,
                offs_m, lo, hi, L, S, D, Dv, diag_lo, diag_hi, alibi_ref,
                stride_ks, stride_kd, stride_vs, stride_vd, 0, 0, stride_ml, stride_ms,
                qk_scale, cap_in, cap_out, slope2, dropout_threshold, seed_bh,
                phase != 1, WINDOW_LEFT, WINDOW_RIGHT, HAS_MASK and (part == 1 or not LISTS),
                MASK_IS_BOOL, KEY_PADDING, LISTS, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, 0,
                KV_TMA, Q.dtype.element_ty, DOT_FP32, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
            )
    if HAS_ALIBI == 2:
        m_i -= slope2 * tl.arange(0, BLOCK_M).to(tl.float32)

    out, lse = _softmax_finish(acc, l_i, m_i, Sinks + off_h, HAS_SINKS)
    if HAS_DROPOUT:
        out = out * dropout_scale  # kept probabilities count 1 / (1 - p) times
    _store_rows(o_base, out, m0, offs_m, offs_dv, L, Dv, stride_ol, stride_od, O_TMA)
    if STORE_LO:  # what rounding out to its dtype lost, for the backward's delta = rowsum(dO * O)
        lo = out - _rounded(out, Out.dtype.element_ty)
        lo_base = _head_rows(OutLo, off_b, off_h, q_start, stride_ob, stride_oh, stride_ol)
        _store_rows(lo_base, lo, m0, offs_m, offs_dv, L, Dv, stride_ol, stride_od, O_TMA)
    tl.store(lse_base + offs_m, lse, mask=offs_m < L)


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _attn_probs_kernel(
    # pointers
    Q, K,  # as the forward's
    Probs,  # (B, Hq, L_max, S_max), zero-initialised: exp(s - rowmax), negative where dropped
    Mask, CuSeqlensQ, CuSeqlensK, Alibi,  # as the forward's
    # sizes
    Hq, L, S, D, GROUP,
    # strides
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_pb, stride_ph, stride_pl, stride_ps,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_ab, stride_ah,
    # runtime scalars (as the forward's)
    scale, window_left, window_right, bottom_right, softcap, dropout_threshold, Seed,
    # constexpr flags
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """flash-attn's S_dmask (return_attn_probs; a debugging aid that materialises the L x S matrix):
    one program per (query block, query head, batch) writes exp(s - rowmax) of its rows, s the
    scores as the forward sees them (the same _scores, every modifier and mask; hidden pairs 0),
    rowmax their row max, with the sign bit set where this call's dropout dropped the pair (the
    forward's mask: the same seed and generator)."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hkv = off_h // GROUP
    q_start, L = _sequence(CuSeqlensQ, off_b, L, IS_VARLEN)
    k_start, S = _sequence(CuSeqlensK, off_b, S, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    q_base = _head_rows(Q, off_b, off_h, q_start, stride_qb, stride_qh, stride_ql)
    k_base = _head_rows(K, off_b, off_hkv, k_start, stride_kb, stride_kh, stride_ks)
    p_base = _head_rows(Probs, off_b, off_h, 0, stride_pb, stride_ph, 0)
    mask_base = _head_rows(Mask, off_b, off_h, 0, stride_mb, stride_mh, 0)
    seed_bh = ((off_b * Hq + off_h).to(tl.int64) << 32) + load_seed(Seed, HAS_DROPOUT)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cap_in, cap_out = _softcap_factors(scale, softcap, SOFTCAP)
    slope2 = _alibi_slope2(Alibi, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)
    diag_lo, diag_hi, off = _diagonals(L, S, window_left, window_right, bottom_right)
    q = _load_dot_operand(q_base, offs_m, offs_d, L, D, stride_ql, stride_qd, DOT_FP32)
    m_i = tl.full([BLOCK_M], _ROW_MAX_START, dtype=tl.float32)
    for sweep in tl.static_range(2):  # the row max, then the probabilities
        for n0 in range(0, S, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kT = _load_dot_operand(k_base, offs_d, offs_n, D, S, stride_kd, stride_ks, DOT_FP32)
            s, _ = _scores(q, kT, offs_m[:, None], offs_n[None, :], 0.0, L, S, diag_lo, diag_hi,
                           off, scale * _LOG2E, cap_in, cap_out, slope2, mask_base, stride_ml,
                           stride_ms, True, WINDOW_LEFT, WINDOW_RIGHT, HAS_MASK, MASK_IS_BOOL,
                           False, SOFTCAP, HAS_ALIBI, Q.dtype.element_ty == tl.float32,
                           DOT_PRECISION)
            if sweep == 0:
                m_i = tl.maximum(m_i, tl.max(s, 1))
            else:
                p = tl.exp2(s - m_i[:, None])
                if HAS_DROPOUT:
                    keep = _dropout_keep(seed_bh, offs_m[:, None], offs_n[None, :], m0, n0,
                                         dropout_threshold)
                    p = tl.where(keep, p, -p)
                _store_tile(p_base, p, offs_m, offs_n, L, S, stride_pl, stride_ps)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    # pointers
    Out,  # (B, Hq, L, Dv), or (Tq, Hq, Dv) when IS_VARLEN
    OutLo,  # as Out (its strides): the forward's rounding residual of Out (HAS_LO)
    dO,  # same shape as Out
    Delta,  # (B, Hq, Lp), or (Hq, Tq + B * PAD): float32, padded rows (_stat_rows)
    Lse,  # (B, Hq, L), or (Hq, Tq): float32, natural log (the forward's)
    Lse2,  # laid out as Delta: the backward's lse, base 2, +inf where lse = -inf
    Sinks,  # (Hq,) sink logits (HAS_SINKS)
    dSinksPart,  # (Hq, B, cdiv(L, BLOCK_M)) float32: each program's part of d(sinks) (HAS_SINKS)
    CuSeqlensQ,  # (B + 1,) int32 (IS_VARLEN)
    # sizes
    L, Dv,
    # strides
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_lseb, stride_lseh,
    stride_deltab, stride_deltah,  # of Delta and Lse2
    # constexpr flags
    IS_VARLEN: tl.constexpr, HAS_LO: tl.constexpr, HAS_SINKS: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta = rowsum(dO * O) = rowsum(P * dP), the softmax-backward correction term. O is the
    fp32 output, Out + OutLo, when the forward stored its residual: delta from a rounded fp16 /
    bf16 Out errs by rowsum(dO * rounding error), and every dQ / dK entry inherits that.

    Also lse2 = lse * log2(e), the form the dK/dV and dQ loops read, with a row that saw no key
    (lse = -inf) at +inf, so that their P = exp2(s - lse2) is exactly 0 there (one conversion per
    row here, instead of one per row and query block in the dK/dV loop).

    Both are written on the rows of the padding too (_stat_rows: lse2 = +inf and delta = 0 past L,
    as o = dO = 0 there).

    With sinks, also this block's part of d(sink) = -sum over rows of P(sink) * delta, where
    P(sink) = exp(sink - lse) (the sink's dS: its dP is 0, it has no value), summed by the launcher
    in a fixed order (deterministic)."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, L = _sequence(CuSeqlensQ, off_b, L, IS_VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    o_base = _head_rows(Out, off_b, off_h, q_start, stride_ob, stride_oh, stride_ol)
    do_base = _head_rows(dO, off_b, off_h, q_start, stride_dob, stride_doh, stride_dol)
    o = _load_tile(o_base, offs_m, offs_dv, L, Dv, stride_ol, stride_od).to(tl.float32)
    if HAS_LO:
        lo_base = _head_rows(OutLo, off_b, off_h, q_start, stride_ob, stride_oh, stride_ol)
        o += _load_tile(lo_base, offs_m, offs_dv, L, Dv, stride_ol, stride_od).to(tl.float32)
    do = _load_tile(do_base, offs_m, offs_dv, L, Dv, stride_dol, stride_dod).to(tl.float32)
    delta = tl.sum(o * do, 1)
    padded = offs_m < tl.cdiv(L, _ROW_PAD) * _ROW_PAD  # the sequence's rows and its padding
    delta_base = _stat_rows(Delta, off_b, off_h, q_start, stride_deltab, stride_deltah, IS_VARLEN)
    tl.store(delta_base + offs_m, delta, mask=padded)
    lse_base = _head_rows(Lse, off_b, off_h, q_start, stride_lseb, stride_lseh, 1)
    lse2 = tl.load(lse_base + offs_m, mask=offs_m < L, other=float("inf")) * _LOG2E
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # +inf past L too: P = 0
    lse2_base = _stat_rows(Lse2, off_b, off_h, q_start, stride_deltab, stride_deltah, IS_VARLEN)
    tl.store(lse2_base + offs_m, lse2, mask=padded)
    if HAS_SINKS:
        sink2 = tl.load(Sinks + off_h).to(tl.float32) * _LOG2E
        part = -tl.sum(tl.exp2(sink2 - lse2) * delta, 0)
        program = (off_h * tl.num_programs(2) + off_b) * tl.num_programs(0) + pid_m
        tl.store(dSinksPart + program, part)


@triton.jit
def _attn_bwd_tile(
    a_s, b_s,  # s = a_s @ b_s: q @ k^T, or k @ q^T for the transposed tile
    a_dp, b_dp,  # dP = a_dp @ b_dp: dO @ V^T, or V @ dO^T
    lse2, delta,  # fp32 per query row, broadcast like q_idx: base-2 logsumexp and rowsum(dO * O)
    q_idx, k_idx, m0, n0, L, S, diag_lo, diag_hi, off,  # the tile's first query and key
    qk_scale, cap_in, cap_out, alibi,  # alibi: the slope, or the key part (_scores)
    mask_base, stride_ml, stride_ms,
    dropout_threshold, dropout_scale, seed_bh,
    MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, KEY_PADDING: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACCURATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Recompute the probabilities of one tile (or of its transpose) and the score gradients, as
    (P * Z, dS, dS_qk): the probabilities that multiplied V (Z = dropout keep-mask / (1 - p), 1
    without dropout), the gradient dS w.r.t. the final scores (that of an additive mask), and
    dS_qk, w.r.t. the scaled q @ k^T (dS times the softcap's derivative 1 - tanh^2, a quarter of
    it for fp16 / bf16; dS itself without a cap); the callers apply the factor
    _dqk_scale (the scale, with that 4) once to their accumulators.

    P = exp2(s - lse2) is the forward's softmax (_scores, with s - lse2 one FFMA without
    modifiers; no max/sum pass is needed); hidden pairs (s = -inf) get P = 0, and so has every pair
    of a row that saw no key (lse2 = +inf, see _load_lse2). dS = P * (dP * Z - delta) with
    dP = dO @ V^T.
    """
    if MASKED or HAS_MASK or SOFTCAP or HAS_ALIBI:
        x, dcap = _scores(a_s, b_s, q_idx, k_idx, lse2, L, S, diag_lo, diag_hi, off,
                       qk_scale, cap_in, cap_out, alibi, mask_base, stride_ml, stride_ms,
                       MASKED, WINDOW_LEFT, WINDOW_RIGHT, HAS_MASK, MASK_IS_BOOL, KEY_PADDING,
                       SOFTCAP, HAS_ALIBI, ACCURATE, DOT_PRECISION)
    else:
        x = tl.dot(a_s, b_s, input_precision=DOT_PRECISION) * qk_scale - lse2  # one FFMA
    p = tl.exp2(x)  # 0 where hidden
    dp = tl.dot(a_dp, b_dp, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed_bh, q_idx, k_idx, m0, n0, dropout_threshold)
        z = tl.where(keep, dropout_scale, 0.0)
        dp = dp * z
        pz = p * z
    else:
        pz = p
    ds = p * (dp - delta)
    if SOFTCAP:
        return pz, ds, ds * dcap
    else:
        return pz, ds, ds


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv,  # accumulators: (BLOCK_N, BLOCK_D // SPLIT), (BLOCK_N, BLOCK_DV // SPLIT) fp32
    k, v,  # dot operands of this program's key block, whole rows
    q_src, do_src, q_part, do_part,  # q and dO of one (batch, query head): _row_source's, whole
    #                                  rows and (SPLIT > 1) this part's columns
    lse_base, delta_base, mask_base,  # of the same (batch, query head)
    block_ids, block_counts,  # this key block's visible query blocks of that head (LISTS)
    offs_n, n0, part, m_lo, m_hi, m_lo2, m_hi2, L, S, D, Dv, diag_lo, diag_hi, off,
    stride_ql, stride_qd, stride_dol, stride_dod, stride_ml, stride_ms,
    qk_scale, cap_in, cap_out, slope2, dropout_threshold, dropout_scale, seed_bh,
    MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, KEY_PADDING: tl.constexpr,
    LISTS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    QDO_TMA: tl.constexpr, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, SPLIT: tl.constexpr,
):
    """dV += (P * Z)^T @ dO and dK += dS_qk^T @ Q over the query blocks starting in [m_lo, m_hi)
    and, with WINDOW_LEFT, [m_lo2, m_hi2) (m_lo, m_lo2 multiples of BLOCK_M), for column part
    `part` of SPLIT of dK and dV (the scores still take whole rows of q and dO); with LISTS only
    the listed ones among them (_block_range).

    The tiles are computed transposed, (BLOCK_N, BLOCK_M): sT = k @ q^T, so that P^T and dS^T are
    produced directly in the layout of the left operand of the two products.
    """
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_dk_part = part * (BLOCK_D // SPLIT) + tl.arange(0, BLOCK_D // SPLIT)
    offs_dv_part = part * (BLOCK_DV // SPLIT) + tl.arange(0, BLOCK_DV // SPLIT)
    alibi = _alibi_keys(slope2, offs_n - n0, True, HAS_ALIBI)  # one-sided: keys j - n0
    # The queries' part, slope2 * (i + off - n0), from a vector made once here and the block's
    # first row: one FADD per row instead of two integer adds and a conversion (exact in fp32:
    # integers below 2^24)
    rows = (tl.arange(0, BLOCK_M) + (off - n0)).to(tl.float32)
    # With a window the loop runs over [m_lo, m_hi) and then [m_lo2, m_hi2) (both edges of the
    # window in one masked loop: a third loop's registers spilled), counting blocks (with LISTS
    # list positions); without one over [m_lo, m_hi) alone, the second range empty.
    i_lo, i_hi = _block_range(block_counts, m_lo, m_hi, LISTS, BLOCK_M)
    if WINDOW_LEFT:
        i_lo2, i_hi2 = _block_range(block_counts, m_lo2, m_hi2, LISTS, BLOCK_M)
        if LISTS:
            n_first = i_hi - i_lo
            it_lo, it_hi = 0, n_first + i_hi2 - i_lo2
        else:
            n_first = tl.cdiv(m_hi - m_lo, BLOCK_M)
            it_lo, it_hi = 0, n_first + tl.cdiv(m_hi2 - m_lo2, BLOCK_M)
    else:
        it_lo, it_hi = i_lo, i_hi
    IT_STEP: tl.constexpr = 1 if WINDOW_LEFT or LISTS else BLOCK_M
    for it in range(it_lo, it_hi, IT_STEP):
        if WINDOW_LEFT and LISTS:
            start_m = _block_start(block_ids, tl.where(it < n_first, i_lo + it,
                                                       i_lo2 + (it - n_first)), True, BLOCK_M)
        elif WINDOW_LEFT:
            start_m = tl.where(it < n_first, m_lo + it * BLOCK_M, m_lo2 + (it - n_first) * BLOCK_M)
        else:
            start_m = _block_start(block_ids, it, LISTS, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if QDO_TMA:
            qT = _dot_operand(tl.trans(q_src.load([start_m, 0])), DTYPE, DOT_FP32)
            do = _dot_operand(do_src.load([start_m, 0]), DTYPE, DOT_FP32)
        else:
            qT = _load_dot_operand(q_src, offs_d, offs_m, D, L, stride_qd, stride_ql, DOT_FP32)
            do = _load_dot_operand(do_src, offs_m, offs_dv, L, Dv, stride_dol, stride_dod,
                                   DOT_FP32)
        # Rows past L read q = dO = 0, and from the statistics' padding (_stat_rows) lse2 = +inf
        # and delta = 0: P = 0 there, and they add exactly 0 below. No row mask: block rows lie
        # within the padding.
        lse2 = tl.load(lse_base + offs_m)
        if HAS_ALIBI == 2:  # one-sided (see _scores): the queries' part joins their lse
            lse2 += slope2 * (rows + start_m.to(tl.float32))
        delta = tl.load(delta_base + offs_m)
        pT, _, dsT = _attn_bwd_tile(k, qT, v, tl.trans(do), lse2[None, :], delta[None, :],
                                    offs_m[None, :], offs_n[:, None], start_m, n0, L, S,
                                    diag_lo, diag_hi, off, qk_scale, cap_in, cap_out, alibi,
                                    mask_base, stride_ml, stride_ms, dropout_threshold,
                                    dropout_scale, seed_bh,
                                    MASKED, WINDOW_LEFT, WINDOW_RIGHT, HAS_MASK, MASK_IS_BOOL,
                                    KEY_PADDING, SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                                    DTYPE == tl.float32, DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if SPLIT == 1:
            q = tl.trans(qT)
        elif QDO_TMA:  # this part's columns of q and dO, read again (from L2: the whole rows
            #             just were)
            q = _dot_operand(q_part.load([start_m, part * (BLOCK_D // SPLIT)]), DTYPE, DOT_FP32)
            do = _dot_operand(do_part.load([start_m, part * (BLOCK_DV // SPLIT)]), DTYPE,
                              DOT_FP32)
        else:
            q = _load_dot_operand(q_src, offs_m, offs_dk_part, L, D, stride_ql, stride_qd,
                                  DOT_FP32)
            do = _load_dot_operand(do_src, offs_m, offs_dv_part, L, Dv, stride_dol, stride_dod,
                                   DOT_FP32)
        dv += tl.dot(_dot_operand(pT, DTYPE, DOT_FP32), do, input_precision=DOT_PRECISION)
        dk += tl.dot(_dot_operand(dsT, DTYPE, DOT_FP32), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _attn_bwd_dkdv_kernel(
    # pointers
    Q,  # (B, Hq, L, D), or (Tq, Hq, D) when IS_VARLEN
    K,  # (B, Hkv, S, D), or (Tk, Hkv, D)
    V,  # (B, Hkv, S, Dv), or (Tk, Hkv, Dv)
    dO,  # shaped as Out
    Lse2,  # (B, Hq, Lp), or (Hq, Tq + B * PAD): float32, the preprocess kernel's base-2 lse, padded
    Delta,  # laid out as Lse2 (_stat_rows)
    dK,  # shaped as K
    dV,  # shaped as V
    Mask,  # (B, Hq, L, S) through strides (0 on broadcast dims): bool as uint8, or float (HAS_MASK)
    QueryBlocks, QueryBlockCounts,  # a bool mask's visible query blocks per key block (TILE_LISTS)
    CuSeqlensQ, CuSeqlensK,  # (B + 1,) int32 cumulative sequence lengths (IS_VARLEN)
    Alibi,  # (B, Hq) float32 ALiBi slopes through strides (HAS_ALIBI)
    # sizes
    Hq, L, S, D, Dv,
    GROUP,  # Hq // Hkv
    N_QUERY_BLOCKS,  # cdiv(L, BLOCK_M) (TILE_LISTS)
    list_sb, list_sh, list_sn,  # the list of (batch, query head, key block): _block_lists
    # strides (batch strides 0 when IS_VARLEN)
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_lseb, stride_lseh,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_ab, stride_ah,
    # runtime scalars (as the forward's)
    scale, window_left, window_right, bottom_right, softcap,
    dropout_threshold, dropout_scale, Seed,  # Seed: (1,) int64 on the device (HAS_DROPOUT)
    # constexpr flags
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, KEY_PADDING: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    TILE_LISTS: tl.constexpr,  # a bool (B, Hq, L, S) mask's query blocks listed per key block
    QDO_TMA: tl.constexpr,  # read q and dO through tensor descriptors (as the forward's KV_TMA)
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPLIT: tl.constexpr,  # programs per key block, each owning BLOCK_D // SPLIT columns of dK, dV
):
    """One program per (key block and column part, kv head, batch): dK and dV of BLOCK_N keys
    (SPLIT > 1: of one part of their columns, so that the fp32 accumulators fit in registers at
    head dim 256), summed over every query block of all GROUP query heads that read this kv
    head."""
    pid_n = tl.program_id(0) // SPLIT
    part = tl.program_id(0) % SPLIT
    off_hkv = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, L = _sequence(CuSeqlensQ, off_b, L, IS_VARLEN)
    k_start, S = _sequence(CuSeqlensK, off_b, S, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if IS_VARLEN:
        if n0 >= S:  # past the end of this (shorter) sequence
            return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qk_scale = scale * _LOG2E
    cap_in, cap_out = _softcap_factors(scale, softcap, SOFTCAP)
    diag_lo, diag_hi, off = _diagonals(L, S, window_left, window_right, bottom_right)

    k_base = _head_rows(K, off_b, off_hkv, k_start, stride_kb, stride_kh, stride_ks)
    v_base = _head_rows(V, off_b, off_hkv, k_start, stride_vb, stride_vh, stride_vs)
    k = _load_dot_operand(k_base, offs_n, offs_d, S, D, stride_ks, stride_kd, DOT_FP32)
    v = _load_dot_operand(v_base, offs_n, offs_dv, S, Dv, stride_vs, stride_vd, DOT_FP32)
    dk = tl.zeros([BLOCK_N, BLOCK_D // SPLIT], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV // SPLIT], dtype=tl.float32)

    seed = load_seed(Seed, HAS_DROPOUT)
    m_hi = L
    if KEY_PADDING:
        # A key block whose keys are all padding is seen by no query: skip its loops (dK = dV = 0).
        key_row = Mask + off_b.to(tl.int64) * stride_mb  # the batch's one row of keys
        keys = tl.load(key_row + offs_n.to(tl.int64) * stride_ms, mask=offs_n < S, other=0)
        m_hi = tl.where(tl.max(keys.to(tl.int32), 0) > 0, L, 0)
    # The causal diagonal (masked), the query blocks that see the key block whole, the window's
    # left edge (masked).
    m_lo, m_full_lo, m_full_hi, m_hi = _query_block_bounds(n0, L, m_hi, diag_lo, diag_hi,
                                                           WINDOW_LEFT, WINDOW_RIGHT,
                                                           BLOCK_M, BLOCK_N)
    # Phase 0, masked: the diagonal and (WINDOW_LEFT) the window's left edge, in one loop (a loop
    # of their own spilled registers); phase 1: the query blocks that see the key block whole. The
    # query heads that share this kv head run inside each phase (outside, they spilled with GQA).
    # With TILE_LISTS each head's loops run in two parts, as the forward's: the query blocks the
    # mask shows whole (no mask), then the partial ones (those hiding every pair never read).
    for phase in tl.static_range(2):
        if phase == 0:
            lo, hi, lo2, hi2 = m_lo, m_full_lo, m_full_hi, m_hi
        else:
            lo, hi, lo2, hi2 = m_full_lo, m_full_hi, m_full_hi, m_full_hi
        for g in range(GROUP):
            off_h = off_hkv * GROUP + g  # query heads off_hkv * GROUP ... read this kv head
            q_base = _head_rows(Q, off_b, off_h, q_start, stride_qb, stride_qh, stride_ql)
            do_base = _head_rows(dO, off_b, off_h, q_start, stride_dob, stride_doh, stride_dol)
            q_src = _row_source(q_base, L, D, stride_ql, BLOCK_M, BLOCK_D, QDO_TMA)
            do_src = _row_source(do_base, L, Dv, stride_dol, BLOCK_M, BLOCK_DV, QDO_TMA)
            q_part = q_src
            do_part = do_src
            if SPLIT > 1:
                q_part = _row_source(q_base, L, D, stride_ql, BLOCK_M, BLOCK_D // SPLIT, QDO_TMA)
                do_part = _row_source(do_base, L, Dv, stride_dol, BLOCK_M, BLOCK_DV // SPLIT,
                                      QDO_TMA)
            lse_base = _stat_rows(Lse2, off_b, off_h, q_start, stride_lseb, stride_lseh, IS_VARLEN)
            delta_base = _stat_rows(Delta, off_b, off_h, q_start, stride_lseb, stride_lseh,
                                    IS_VARLEN)
            mask_base = _head_rows(Mask, off_b, off_h, 0, stride_mb, stride_mh, 0)
            seed_bh = ((off_b * Hq + off_h).to(tl.int64) << 32) + seed
            slope2 = _alibi_slope2(Alibi, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)
            block_ids, block_counts = _block_lists(QueryBlocks, QueryBlockCounts, off_b, off_h,
                                                   pid_n, list_sb, list_sh, list_sn,
                                                   N_QUERY_BLOCKS)
            for list_part in tl.static_range(2 if TILE_LISTS else 1):
                counts = _list_part(block_counts, list_part, N_QUERY_BLOCKS, TILE_LISTS)
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, q_src, do_src, q_part, do_part, lse_base, delta_base,
                    mask_base, block_ids, counts,
                    offs_n, n0, part, lo, hi, lo2, hi2, L, S, D, Dv, diag_lo, diag_hi, off,
                    stride_ql, stride_qd, stride_dol, stride_dod, stride_ml, stride_ms,
                    qk_scale, cap_in, cap_out, slope2, dropout_threshold, dropout_scale, seed_bh,
                    phase == 0, WINDOW_LEFT, WINDOW_RIGHT,
                    HAS_MASK and (list_part == 1 or not TILE_LISTS), MASK_IS_BOOL, KEY_PADDING,
                    TILE_LISTS, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, QDO_TMA, Q.dtype.element_ty,
                    DOT_FP32, DOT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_DV, SPLIT,
                )

    dk *= _dqk_scale(scale, SOFTCAP, Q.dtype.element_ty)  # d(scores)/dK: the scale, once
    dk_base = _head_rows(dK, off_b, off_hkv, k_start, stride_dkb, stride_dkh, stride_dks)
    dv_base = _head_rows(dV, off_b, off_hkv, k_start, stride_dvb, stride_dvh, stride_dvs)
    offs_dk_part = part * (BLOCK_D // SPLIT) + tl.arange(0, BLOCK_D // SPLIT)
    offs_dv_part = part * (BLOCK_DV // SPLIT) + tl.arange(0, BLOCK_DV // SPLIT)
    _store_tile(dk_base, dk, offs_n, offs_dk_part, S, D, stride_dks, stride_dkd)
    _store_tile(dv_base, dv, offs_n, offs_dv_part, S, Dv, stride_dvs, stride_dvd)


@triton.jit
def _attn_bwd_dq_inner(
    dq,  # accumulator: (BLOCK_M, BLOCK_D) fp32
    q, do, lse2, delta,  # this program's query block: dot operands and (BLOCK_M,) fp32 row statistics
    k_src, v_src, mask_base,  # K, V of this (batch, kv head) (_row_source's); attn_mask of this
    #                            (batch, head)
    block_ids, block_counts,  # this program's visible key blocks (LISTS)
    dmask_base,  # dMask of this (batch, head) (MASK_GRAD)
    offs_m, n_lo, n_hi, L, S, D, Dv, diag_lo, diag_hi, alibi_ref,
    stride_ks, stride_kd, stride_vs, stride_vd, stride_ml, stride_ms, stride_dml, stride_dms,
    qk_scale, cap_in, cap_out, slope2, dropout_threshold, dropout_scale, seed_bh,
    MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, KEY_PADDING: tl.constexpr,
    LISTS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MASK_GRAD: tl.constexpr, KV_TMA: tl.constexpr, DTYPE: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dQ += dS_qk @ K over the key blocks starting in [n_lo, n_hi); with MASK_GRAD also store
    dS. alibi_ref as in _attn_fwd_inner (HAS_ALIBI == 2: lse2 carries the rows' part)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    alibi = _alibi_keys(slope2, tl.arange(0, BLOCK_N), False, HAS_ALIBI)
    m0 = tl.min(offs_m, 0) if HAS_DROPOUT else 0  # the tile's first query (dropout's counters)
    i_lo, i_hi = _block_range(block_counts, n_lo, n_hi, LISTS, BLOCK_N)
    STEP: tl.constexpr = 1 if LISTS else BLOCK_N
    # Unmasked, every key block is whole (keys < S: _key_block_bounds): no row mask
    n_keys = S if MASKED else None
    for i in range(i_lo, i_hi, STEP):
        n0 = _block_start(block_ids, i, LISTS, BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if KV_TMA:
            kT = _dot_operand(tl.trans(k_src.load([n0, 0])), DTYPE, DOT_FP32)
            vT = _dot_operand(tl.trans(v_src.load([n0, 0])), DTYPE, DOT_FP32)
        else:
            kT = _load_dot_operand(k_src, offs_d, offs_n, D, n_keys, stride_kd, stride_ks,
                                   DOT_FP32)
            vT = _load_dot_operand(v_src, offs_dv, offs_n, Dv, n_keys, stride_vd, stride_vs,
                                   DOT_FP32)
        shift = lse2
        if HAS_ALIBI == 2:  # the block's slope2 * (n0 - ref), per row, not per score
            shift = lse2 - slope2 * (n0 - alibi_ref).to(tl.float32)
        _, ds, ds_qk = _attn_bwd_tile(q, kT, do, vT, shift[:, None], delta[:, None],
                                      offs_m[:, None], offs_n[None, :], m0, n0, L, S,
                                      diag_lo, diag_hi, alibi_ref, qk_scale, cap_in, cap_out,
                                      alibi,
                                      mask_base, stride_ml, stride_ms, dropout_threshold,
                                      dropout_scale, seed_bh,
                                      MASKED, WINDOW_LEFT, WINDOW_RIGHT, HAS_MASK, MASK_IS_BOOL,
                                      KEY_PADDING, SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                                      DTYPE == tl.float32, DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if MASK_GRAD:
            _store_tile(dmask_base, ds, offs_m, offs_n, L, S, stride_dml, stride_dms)
        dq += tl.dot(_dot_operand(ds_qk, DTYPE, DOT_FP32), tl.trans(kT),
                     input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _attn_bwd_dq_kernel(
    # pointers
    Q,  # (B, Hq, L, D), or (Tq, Hq, D) when IS_VARLEN
    K,  # (B, Hkv, S, D), or (Tk, Hkv, D)
    V,  # (B, Hkv, S, Dv), or (Tk, Hkv, Dv)
    dO,  # shaped as Out
    Lse2,  # (B, Hq, Lp), or (Hq, Tq + B * PAD): float32, the preprocess kernel's base-2 lse, padded
    Delta,  # laid out as Lse2 (_stat_rows)
    dQ,  # shaped as Q
    Mask,  # (B, Hq, L, S) through strides (0 on broadcast dims): bool as uint8, or float (HAS_MASK)
    dMask,  # (B, Hq, L, S) float32, zero-initialised: dS (MASK_GRAD)
    KeyBlocks, KeyBlockCounts,  # visible key blocks, as in the forward (LISTS)
    CuSeqlensQ, CuSeqlensK,  # (B + 1,) int32 cumulative sequence lengths (IS_VARLEN)
    Alibi,  # (B, Hq) float32 ALiBi slopes through strides (HAS_ALIBI)
    # sizes
    Hq, L, S, D, Dv,
    GROUP,  # Hq // Hkv
    N_KEY_BLOCKS,  # cdiv(S, BLOCK_N) (LISTS)
    list_sb, list_sh, list_sm,  # as the forward's (LISTS)
    # strides (batch strides 0 when IS_VARLEN)
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    stride_lseb, stride_lseh,
    stride_mb, stride_mh, stride_ml, stride_ms,
    stride_ab, stride_ah,
    stride_dmb, stride_dmh, stride_dml, stride_dms,
    # runtime scalars (as the forward's)
    scale, window_left, window_right, bottom_right, softcap,
    dropout_threshold, dropout_scale, Seed,  # Seed: (1,) int64 on the device (HAS_DROPOUT)
    # constexpr flags
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, KEY_PADDING: tl.constexpr,
    TILE_LISTS: tl.constexpr,  # as the forward's
    SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, MASK_GRAD: tl.constexpr,
    KV_TMA: tl.constexpr,  # read K and V through tensor descriptors (as the forward)
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (query block, query head, batch): dQ of BLOCK_M query rows."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    if WINDOW_RIGHT:
        pid_m = tl.num_programs(0) - 1 - pid_m  # heaviest query blocks first, as in the forward
    off_hkv = off_h // GROUP
    q_start, L = _sequence(CuSeqlensQ, off_b, L, IS_VARLEN)
    k_start, S = _sequence(CuSeqlensK, off_b, S, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if IS_VARLEN:
        if m0 >= L:  # past the end of this (shorter) sequence
            return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qk_scale = scale * _LOG2E
    cap_in, cap_out = _softcap_factors(scale, softcap, SOFTCAP)
    slope2 = _alibi_slope2(Alibi, off_b, off_h, stride_ab, stride_ah, HAS_ALIBI)
    diag_lo, diag_hi, off = _diagonals(L, S, window_left, window_right, bottom_right)

    q_base = _head_rows(Q, off_b, off_h, q_start, stride_qb, stride_qh, stride_ql)
    do_base = _head_rows(dO, off_b, off_h, q_start, stride_dob, stride_doh, stride_dol)
    k_base = _head_rows(K, off_b, off_hkv, k_start, stride_kb, stride_kh, stride_ks)
    v_base = _head_rows(V, off_b, off_hkv, k_start, stride_vb, stride_vh, stride_vs)
    k_src = _row_source(k_base, S, D, stride_ks, BLOCK_N, BLOCK_D, KV_TMA)
    v_src = _row_source(v_base, S, Dv, stride_vs, BLOCK_N, BLOCK_DV, KV_TMA)
    lse_base = _stat_rows(Lse2, off_b, off_h, q_start, stride_lseb, stride_lseh, IS_VARLEN)
    delta_base = _stat_rows(Delta, off_b, off_h, q_start, stride_lseb, stride_lseh, IS_VARLEN)
    mask_base = _head_rows(Mask, off_b, off_h, 0, stride_mb, stride_mh, 0)
    dmask_base = _head_rows(dMask, off_b, off_h, 0, stride_dmb, stride_dmh, 0)
    LISTS: tl.constexpr = KEY_PADDING or TILE_LISTS
    block_ids, block_counts = _block_lists(KeyBlocks, KeyBlockCounts, off_b, off_h, pid_m, list_sb,
                                           list_sh, list_sm, N_KEY_BLOCKS)
    seed_bh = ((off_b * Hq + off_h).to(tl.int64) << 32) + load_seed(Seed, HAS_DROPOUT)

    q = _load_dot_operand(q_base, offs_m, offs_d, L, D, stride_ql, stride_qd, DOT_FP32)
    do = _load_dot_operand(do_base, offs_m, offs_dv, L, Dv, stride_dol, stride_dod, DOT_FP32)
    lse2 = _load_lse2(lse_base + offs_m, offs_m < L, HAS_ALIBI)
    alibi_ref = off
    if HAS_ALIBI == 2:  # one-sided (see _scores): keys j - (m0 + off), rows' i - m0 join the lse
        alibi_ref = m0 + off
        lse2 += slope2 * tl.arange(0, BLOCK_M).to(tl.float32)
    delta = tl.load(delta_base + offs_m, mask=offs_m < L, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_lo, n_full_lo, n_full_hi, n_hi = _key_block_bounds(m0, m0 + BLOCK_M - 1, S, diag_lo,
                                                         diag_hi, WINDOW_LEFT, WINDOW_RIGHT,
                                                         BLOCK_N)
    for phase in tl.static_range(0 if WINDOW_LEFT else 1, 3):  # as in the forward
        lo, hi = _phase_range(phase, n_lo, n_full_lo, n_full_hi, n_hi)
        for part in tl.static_range(2 if LISTS else 1):  # as in the forward
            counts = _list_part(block_counts, part, N_KEY_BLOCKS, LISTS)
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, k_src, v_src, mask_base, block_ids, counts,
                dmask_base, offs_m, lo, hi, L, S, D, Dv, diag_lo, diag_hi, alibi_ref,
                stride_ks, stride_kd, stride_vs, stride_vd, stride_ml, stride_ms, stride_dml,
                stride_dms, qk_scale, cap_in, cap_out, slope2, dropout_threshold, dropout_scale,
                seed_bh,
                phase != 1, WINDOW_LEFT, WINDOW_RIGHT, HAS_MASK and (part == 1 or not LISTS),
                MASK_IS_BOOL, KEY_PADDING, LISTS, SOFTCAP, HAS_ALIBI, HAS_DROPOUT, MASK_GRAD,
                KV_TMA, Q.dtype.element_ty, DOT_FP32, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV,
            )

    dq *= _dqk_scale(scale, SOFTCAP, Q.dtype.element_ty)
    dq_base = _head_rows(dQ, off_b, off_h, q_start, stride_dqb, stride_dqh, stride_dql)
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


def _strides4(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, row, col) strides of a (B, H, N, D) tensor, or of a packed (T, H, D) one read
    as one long sequence per batch entry (batch stride 0; the kernels add the sequence's start)."""
    return (0, t.stride(1), t.stride(0), t.stride(2)) if varlen else t.stride()


def _row_stat_strides(stat: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of lse / delta: (B, Hq, L), or (Hq, Tq) when varlen."""
    return (0, stat.stride(0)) if varlen else (stat.stride(0), stat.stride(1))


def _bwd_row_stats(lse: torch.Tensor, B: int, L: int, varlen: bool) -> tuple[torch.Tensor, ...]:
    """(lse2, delta), the backward's row statistics, empty: laid out as lse ((B, Hq, L), or
    (Hq, Tq)), with every sequence padded to a multiple of ATTN_BWD_ROW_PAD rows (_stat_rows):
    (B, Hq, Lp), or (Hq, Tq + B * ATTN_BWD_ROW_PAD)."""
    if varlen:
        shape = (lse.shape[0], lse.shape[1] + B * ATTN_BWD_ROW_PAD)
    else:
        shape = (*lse.shape[:2], cdiv(L, ATTN_BWD_ROW_PAD) * ATTN_BWD_ROW_PAD)
    return tuple(torch.empty(shape, dtype=torch.float32, device=lse.device) for _ in range(2))


def _mask_args(attn_mask: torch.Tensor | None, placeholder: torch.Tensor, B: int, Hq: int, L: int,
               S: int) -> tuple[torch.Tensor, tuple, dict]:
    """attn_mask (at most 4-D, broadcastable to (B, Hq, L, S)) as the kernels read it: (tensor, its
    (B, Hq, L, S) strides, constexpr flags).

    The mask is expanded to (B, Hq, L, S) as a view (stride 0 on its broadcast dims: nothing is
    copied), booleans reinterpreted as uint8. A boolean mask with one row of keys per batch entry
    ((B, 1, 1, S) or (1, 1, 1, S)) takes the key-padding fast path.
    """
    if attn_mask is None:
        flags = dict(HAS_MASK=False, MASK_IS_BOOL=False, KEY_PADDING=False)
        return placeholder, (0, 0, 0, 0), flags
    attn_mask = attn_mask[(None,) * (4 - attn_mask.dim())]  # (L, S) -> (1, 1, L, S), ...
    is_bool = attn_mask.dtype == torch.bool
    view = attn_mask.expand(B, Hq, L, S)
    if is_bool:
        view = view.view(torch.uint8)
    key_padding = is_bool and attn_mask.shape[1] == 1 and attn_mask.shape[2] == 1
    return view, view.stride(), dict(HAS_MASK=True, MASK_IS_BOOL=is_bool, KEY_PADDING=key_padding)


def _tile_lists(flags: dict, varlen: bool, n: int, block: int) -> bool:
    """Whether a kernel lists the blocks of a bool mask per program (TILE_LISTS): any bool mask but
    a key-padding one (which has its own lists), padded calls, the listed positions (the forward's
    and dQ's n = S keys, dK/dV's n = L queries) over at least configs.ATTN_TILE_LISTS_MIN_BLOCKS
    blocks of `block`."""
    return (flags["MASK_IS_BOOL"] and not flags["KEY_PADDING"] and not varlen
            and cdiv(n, block) >= ATTN_TILE_LISTS_MIN_BLOCKS)


def _block_reduce(x: torch.Tensor, dim: int, block: int, op) -> torch.Tensor:
    """op (torch.amax or torch.amin) over each run of `block` elements of x along `dim`, the last
    run ragged (only its real elements count: no padding); views of x, no copy of it."""
    n = x.shape[dim]
    if block == 1:
        return x
    full = n // block * block
    parts = []
    if full:
        parts.append(op(x.narrow(dim, 0, full).unflatten(dim, (full // block, block)), dim + 1))
    if full < n:
        parts.append(op(x.narrow(dim, full, n - full), dim, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _visible_blocks(mask: torch.Tensor, flags: dict, L: int, S: int, block_m: int, block_n: int,
                    tile_lists: bool, placeholder: torch.Tensor, by_keys: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, int, int]]:
    """The blocks each program visits, listed, for a bool mask (the uint8 (B, Hq, L, S) view of
    _mask_args): (Blocks, BlockCounts, N_BLOCKS, list strides). The forward and dQ programs own a
    query block (block_m rows) and list key blocks (block_n keys); with `by_keys` the dK/dV
    programs own a key block and list query blocks.

    One list per batch entry with KEY_PADDING (a (B, 1, 1, S) mask, key blocks), or with
    `tile_lists` one per program block of each (batch entry, head) the mask has (its broadcast
    dims but the batch's, stride 0 in the view, share a list; so do all query blocks where its
    rows are broadcast, when they own the list). The list strides (batch, head, program block)
    number them (_block_lists).
    Blocks (G, nb) int32 lists first the whole blocks (every pair of the program's and the
    block's positions below L and S visible: the kernels apply no mask there), in order, then the
    partial ones (some pair visible), in order; the blocks with no visible pair follow, never
    visited. The mask is read once (block maxima and minima over keys, then over query rows), not
    copied. BlockCounts (G, 2, nb + 1) int32 holds positions in that list: [g, 0, j] the whole
    blocks before block j, [g, 1, j] all the whole blocks plus the partial ones before block j,
    so that the whole blocks among blocks [j0, j1) are Blocks[g, c[0, j0]:c[0, j1]] and the
    partial ones Blocks[g, c[1, j0]:c[1, j1]]. Built with a few torch ops on the device (no host
    sync). Placeholders without lists.
    """
    if not (flags["KEY_PADDING"] or tile_lists):
        return placeholder, placeholder, 0, (0, 0, 0)
    sb, sh, sl, _ = mask.stride()
    Bm = 1 if sb == 0 and not flags["KEY_PADDING"] else mask.shape[0]
    Hm = 1 if sh == 0 or flags["KEY_PADDING"] else mask.shape[1]
    Lm = 1 if sl == 0 or flags["KEY_PADDING"] else L
    rows = block_m if Lm > 1 else 1  # the rows of one query block's reduction
    n_row_blocks = cdiv(Lm, rows)
    pairs = mask[:Bm, :Hm, :Lm, :]  # a view: the mask is read, never copied
    # Over the keys of each key block, then over the rows of each query block: (Bm, Hm, nrb, nkb)
    visible = _block_reduce(_block_reduce(pairs, 3, block_n, torch.amax), 2, rows, torch.amax)
    whole = _block_reduce(_block_reduce(pairs, 3, block_n, torch.amin), 2, rows, torch.amin)
    if by_keys:  # per key block, the query blocks: rows broadcast give each query block the same
        n_blocks = cdiv(L, block_m)
        visible, whole = (x.expand(Bm, Hm, n_blocks, -1).transpose(2, 3) for x in (visible, whole))
        strides = (int(Bm > 1) * Hm * visible.shape[2], int(Hm > 1) * visible.shape[2], 1)
    else:
        n_blocks = cdiv(S, block_n)
        strides = (int(Bm > 1) * Hm * n_row_blocks, int(Hm > 1) * n_row_blocks,
                   int(n_row_blocks > 1))
    visible, whole = visible.reshape(-1, n_blocks), whole.reshape(-1, n_blocks)  # (G, nb)
    G = whole.shape[0]
    # One running count over [0, whole..., 0, partial...]: row 1 goes on from row 0's total
    parts = torch.zeros((G, 2, n_blocks + 1), dtype=torch.int32, device=mask.device)
    parts[:, 0, 1:] = whole
    parts[:, 1, 1:] = visible ^ whole
    counts = parts.view(G, -1).cumsum(dim=1, dtype=torch.int32).view(G, 2, n_blocks + 1)
    ids = torch.argsort(visible + whole, dim=1, descending=True, stable=True)
    # Row-major, as the kernels read it (argsort keeps its input's layout: by_keys' transposed view)
    return ids.to(torch.int32).contiguous(), counts, n_blocks, strides


def _descriptor_ready(t: torch.Tensor) -> bool:
    """Whether a tensor descriptor can read every (batch, head) slice of q/k/v-shaped `t` (padded
    or packed): unit last stride, and the base and every other stride 16-byte aligned (TMA's
    rules), as for contiguous tensors and Hugging Face's (B, N, H, D).transpose(1, 2) views when
    the head dim is a multiple of 8 (fp16 / bf16)."""
    *strides, last = t.stride()
    if last != 1 or t.data_ptr() % 16:
        return False
    others = 0
    for stride in strides:  # all multiples of 16 / element size iff their OR is (powers of 2)
        others |= stride
    return others * t.element_size() % 16 == 0


def _descriptor_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory for the tensor descriptors the kernels make (128 bytes per descriptor per
    program), asked for by Triton at launch on the current device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _descriptor_flag(q: torch.Tensor, *tensors: torch.Tensor, backward: bool = False) -> bool:
    """KV_TMA (tensors k, v) or O_TMA (out and out_lo) of a launch, or with `backward` the
    backward's QDO_TMA (q, dO) and KV_TMA: descriptors where configs.py wants them and every one
    of `tensors` allows them. On CUDA this also installs the allocator their scratch memory comes
    from (a ContextVar: set per launch, as autograd's backward runs on another thread)."""
    use = (attention_descriptors(q.dtype, q.device, backward)
           and all(map(_descriptor_ready, tensors)))
    if use and q.is_cuda:
        triton.set_allocator(_descriptor_scratch)
    return use


def _kernel_lengths(q, k, L, S, varlen: bool) -> tuple[int, int]:
    """The kernels' L, S arguments: the sequence lengths, or with varlen the packed row counts
    Tq, Tk, to which each sequence is clamped (_sequence). L, S themselves (max_seqlen_q / _k with
    varlen) size the grid."""
    return (q.shape[0], k.shape[0]) if varlen else (L, S)


def _tuning_key(name: str, q: torch.Tensor, D: int, Dv: int, L: int, S: int, flags: dict) -> tuple:
    """What the best launch setting of pass `name` may depend on (kernels/autotune.py): the
    architecture, head dims, dtype, the constexpr flags (features; `flags` is built in one fixed
    order per pass, so its values alone name them) and the sequence-length buckets."""
    return (name, arch_major(q.device), D, Dv, str(q.dtype), *flags.values(),
            autotune.seq_bucket(L), autotune.seq_bucket(S))


def _mod_args(is_causal: bool, mods: dict, placeholder: torch.Tensor
              ) -> tuple[torch.Tensor, tuple[int, int], tuple, dict]:
    """The score modifiers of `mods` (window, bottom_right, softcap, alibi: see attention_fwd) as
    the kernels take them: (Alibi pointer, its (batch, head) strides, the runtime scalars
    (window_left, window_right, bottom_right, softcap), constexpr flags). is_causal is a window
    right side of 0, as flash-attn has it."""
    left, right = mods.get("window", (-1, -1))
    if is_causal:
        right = 0
    softcap, alibi = mods.get("softcap", 0.0), mods.get("alibi")
    # ALiBi one-sided (HAS_ALIBI 2, see _scores) where no key right of the diagonal is seen
    flags = dict(WINDOW_LEFT=left >= 0, WINDOW_RIGHT=right >= 0, SOFTCAP=softcap > 0.0,
                 HAS_ALIBI=0 if alibi is None else 2 if right == 0 else 1)
    scalars = (max(left, 0), max(right, 0), int(bool(mods.get("bottom_right", False))),
               float(softcap))
    if alibi is None:
        return placeholder, (0, 0), scalars, flags
    return alibi, (0, alibi.stride(0)) if alibi.dim() == 1 else alibi.stride(), scalars, flags


def _launch_fwd(q, k, v, out, out_lo, lse, B, L, S, scale, is_causal, attn_mask, dropout_p, seed,
                cu_seqlens, mods) -> None:
    """Launch the forward kernel, padded (cu_seqlens None) or varlen (cu_seqlens (cu_q, cu_k));
    out_lo: a tensor shaped and strided as out that receives the output's rounding residual, or
    None; mods: the score modifiers (attention_fwd's keywords). The launch setting: configs.py's
    candidates, tuned on Hopper (kernels/autotune.py)."""
    varlen = cu_seqlens is not None
    if scale < 0:  # the kernel takes scale >= 0 (see _attn_fwd_inner): q.k * s == (-q).k * (-s)
        q, scale = q.neg(), -scale
    Hq, Hkv, D, Dv = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    candidates = attention_fwd_candidates(max(D, Dv), q.dtype, q.device, dropout_p > 0.0)
    mask, mask_strides, mask_flags = _mask_args(attn_mask, lse, B, Hq, L, S)
    alibi, alibi_strides, mod_scalars, mod_flags = _mod_args(is_causal, mods, lse)
    sinks = mods.get("sinks")
    cu_q, cu_k = cu_seqlens if varlen else (lse, lse)
    flags = dict(**mod_flags, HAS_SINKS=sinks is not None, HAS_DROPOUT=dropout_p > 0.0,
                 IS_VARLEN=varlen, STORE_LO=out_lo is not None,
                 KV_TMA=_descriptor_flag(q, k, v),
                 O_TMA=_descriptor_flag(q, out, *([] if out_lo is None else [out_lo])),
                 **mask_flags, **_dot_flags(q.dtype),
                 **_block_dims(D, Dv))

    def launch(cfg: dict) -> None:
        tile_lists = _tile_lists(mask_flags, varlen, S, cfg["BLOCK_N"])
        blocks, counts, n_blocks, list_strides = _visible_blocks(
            mask, mask_flags, L, S, cfg["BLOCK_M"], cfg["BLOCK_N"], tile_lists, lse)
        _attn_fwd_kernel[(cdiv(L, cfg["BLOCK_M"]), Hq, B)](
            q, k, v, out, out if out_lo is None else out_lo, lse, mask, blocks, counts, cu_q, cu_k,
            alibi, lse if sinks is None else sinks,
            Hq, *_kernel_lengths(q, k, L, S, varlen), D, Dv, Hq // Hkv, n_blocks, *list_strides,
            *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen),
            *_strides4(out, varlen), *_row_stat_strides(lse, varlen), *mask_strides,
            *alibi_strides,
            scale, *mod_scalars, *dropout_args(dropout_p), seed_arg(seed, dropout_p, lse),
            TILE_LISTS=tile_lists, **flags, **cfg, **COMPILE_OPTIONS,
        )

    with device_guard(q):
        launch(_tuned("fwd", candidates, launch, q, D, Dv, L, S, flags))


def _tuned(name: str, candidates: list[dict], launch, q: torch.Tensor, D: int, Dv: int, L: int,
           S: int, flags: dict) -> dict:
    """The setting to launch pass `name` with: the only candidate, or the autotuner's choice."""
    if len(candidates) == 1:  # the interpreter, the CPU, non-Hopper GPUs: nothing to tune
        return candidates[0]
    return autotune.choose(_tuning_key(name, q, D, Dv, L, S, flags), candidates, launch, q.device)


def _launch_bwd(do, q, k, v, out, out_lo, lse, dq, dk, dv, dmask, B, L, S, scale, is_causal,
                attn_mask, dropout_p, seed, cu_seqlens, mods) -> torch.Tensor | None:
    """Launch the three backward kernels, padded or varlen as _launch_fwd; out_lo: the forward's
    residual of out, or None; dmask: a zeroed (B, Hq, L, S) fp32 buffer that receives dS, or
    None. The dK/dV and dQ settings are tuned apart (each kernel writes its outputs whole, so a
    timing launch may repeat). Returns d(sinks) (Hq,) fp32 with mods["sinks"], else None."""
    varlen = cu_seqlens is not None
    Hq, Hkv, D, Dv = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    lse2, delta = _bwd_row_stats(lse, B, L, varlen)
    cfg = attention_bwd_candidates(max(D, Dv), q.dtype, q.device, dropout_p > 0.0)
    mask, mask_strides, mask_flags = _mask_args(attn_mask, lse, B, Hq, L, S)
    alibi, alibi_strides, mod_scalars, mod_flags = _mod_args(is_causal, mods, lse)
    cu_q, cu_k = cu_seqlens if varlen else (lse, lse)
    flags = dict(**mod_flags, HAS_DROPOUT=dropout_p > 0.0, IS_VARLEN=varlen, **mask_flags,
                 **_dot_flags(q.dtype), **_block_dims(D, Dv))
    qkv_strides = (*_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen),
                   *_strides4(do, varlen))
    sizes = (Hq, *_kernel_lengths(q, k, L, S, varlen), D, Dv, Hq // Hkv)
    scalars = (scale, *mod_scalars, *dropout_args(dropout_p), seed_arg(seed, dropout_p, lse))
    stat_strides = _row_stat_strides(lse2, varlen)
    mask_grad = dmask is not None
    qdo_tma = _descriptor_flag(q, q, do, backward=True)
    kv_tma = _descriptor_flag(q, k, v, backward=True)

    def launch_dkdv(dkdv: dict) -> None:
        tile_lists = _tile_lists(mask_flags, varlen, L, dkdv["BLOCK_M"])
        blocks, counts, n_blocks, list_strides = _visible_blocks(
            mask, mask_flags, L, S, dkdv["BLOCK_M"], dkdv["BLOCK_N"], tile_lists, lse,
            by_keys=True)
        _attn_bwd_dkdv_kernel[(cdiv(S, dkdv["BLOCK_N"]) * dkdv["SPLIT"], Hkv, B)](
            q, k, v, do, lse2, delta, dk, dv, mask, blocks, counts, cu_q, cu_k, alibi,
            *sizes, n_blocks, *list_strides,
            *qkv_strides, *_strides4(dk, varlen), *_strides4(dv, varlen), *stat_strides,
            *mask_strides, *alibi_strides,
            *scalars,
            QDO_TMA=qdo_tma, TILE_LISTS=tile_lists, **flags, **dkdv, **COMPILE_OPTIONS,
        )

    def launch_dq(dq_cfg: dict) -> None:
        tile_lists = _tile_lists(mask_flags, varlen, S, dq_cfg["BLOCK_N"])
        blocks, counts, n_blocks, list_strides = _visible_blocks(
            mask, mask_flags, L, S, dq_cfg["BLOCK_M"], dq_cfg["BLOCK_N"], tile_lists, lse)
        _attn_bwd_dq_kernel[(cdiv(L, dq_cfg["BLOCK_M"]), Hq, B)](
            q, k, v, do, lse2, delta, dq, mask, dmask if mask_grad else lse, blocks, counts,
            cu_q, cu_k, alibi,
            *sizes, n_blocks, *list_strides,
            *qkv_strides, *_strides4(dq, varlen), *stat_strides, *mask_strides, *alibi_strides,
            *(dmask.stride() if mask_grad else (0, 0, 0, 0)),
            *scalars,
            MASK_GRAD=mask_grad, KV_TMA=kv_tma, TILE_LISTS=tile_lists, **flags, **dq_cfg,
            **COMPILE_OPTIONS,
        )

    with device_guard(q):
        pre = cfg["preprocess"]
        padded_rows = cdiv(L, ATTN_BWD_ROW_PAD) * ATTN_BWD_ROW_PAD  # of the longest
        pre_grid = (cdiv(padded_rows, pre["BLOCK_M"]), Hq, B)
        sinks = mods.get("sinks")
        dsinks_part = (torch.empty((Hq, B * pre_grid[0]), dtype=torch.float32, device=q.device)
                       if sinks is not None else None)
        _attn_bwd_preprocess_kernel[pre_grid](
            out, out if out_lo is None else out_lo, do, delta, lse, lse2,
            lse if sinks is None else sinks, lse if sinks is None else dsinks_part, cu_q,
            sizes[1], Dv,
            *_strides4(out, varlen), *_strides4(do, varlen), *_row_stat_strides(lse, varlen),
            *stat_strides,
            IS_VARLEN=varlen, HAS_LO=out_lo is not None, HAS_SINKS=sinks is not None,
            BLOCK_DV=_block_dims(D, Dv)["BLOCK_DV"], **pre, **COMPILE_OPTIONS,
        )
        if S > 0:  # the tuning keys name the descriptor choice, as the forward's do
            launch_dkdv(_tuned("dkdv", cfg["dkdv"], launch_dkdv, q, D, Dv, L, S,
                               dict(flags, QDO_TMA=qdo_tma)))
        launch_dq(_tuned("dq", cfg["dq"], launch_dq, q, D, Dv, L, S,
                         dict(flags, MASK_GRAD=mask_grad, KV_TMA=kv_tma)))
    return None if sinks is None else dsinks_part.sum(dim=1)


def _launch_probs(q, k, probs, B, L, S, scale, is_causal, attn_mask, dropout_p, seed, cu_seqlens,
                  mods) -> None:
    """Launch _attn_probs_kernel into probs (B, Hq, L, S) (varlen: L, S the longest sequences),
    zero-initialised, with the forward's first launch setting (a debugging path: not tuned)."""
    varlen = cu_seqlens is not None
    if scale < 0:  # as the forward: scale >= 0
        q, scale = q.neg(), -scale
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    cfg = attention_fwd_candidates(D, q.dtype, q.device, dropout_p > 0.0)[0]
    mask, mask_strides, mask_flags = _mask_args(attn_mask, probs, B, Hq, L, S)
    mask_flags.pop("KEY_PADDING")  # the general path reads every block
    alibi, alibi_strides, mod_scalars, mod_flags = _mod_args(is_causal, mods, probs)
    mod_flags["HAS_ALIBI"] = min(mod_flags["HAS_ALIBI"], 1)  # |j - i - off| as written: no row max
    cu_q, cu_k = cu_seqlens if varlen else (probs, probs)
    with device_guard(q):
        _attn_probs_kernel[(cdiv(L, cfg["BLOCK_M"]), Hq, B)](
            q, k, probs, mask, cu_q, cu_k, alibi,
            Hq, *_kernel_lengths(q, k, L, S, varlen), D, Hq // Hkv,
            *_strides4(q, varlen), *_strides4(k, varlen), *probs.stride(), *mask_strides,
            *alibi_strides,
            scale, *mod_scalars, dropout_args(dropout_p)[0], seed_arg(seed, dropout_p, probs),
            **mod_flags, HAS_DROPOUT=dropout_p > 0.0, IS_VARLEN=varlen, **mask_flags,
            **_dot_flags(q.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            BLOCK_D=_block_dims(D, D)["BLOCK_D"], num_warps=cfg.get("num_warps", 4),
            **COMPILE_OPTIONS,
        )


def _residual(out: torch.Tensor, residual: bool) -> torch.Tensor | None:
    """The buffer for out's rounding residual (shaped and strided as out), or None: asked for by
    a forward whose backward follows, and needed for fp16 / bf16 outputs only."""
    return torch.empty_like(out) if residual and out.dtype != torch.float32 else None


def _residual_arg(out_lo: torch.Tensor | None) -> torch.Tensor | None:
    """The backward's view of the forward's third output: None when it is empty (none stored)."""
    return out_lo if out_lo is not None and out_lo.numel() > 0 else None


def _mods(window_left: int, window_right: int, bottom_right: bool, softcap: float,
          alibi: torch.Tensor | None, sinks: torch.Tensor | None) -> dict:
    """The score modifiers as _launch_fwd / _launch_bwd take them."""
    return dict(window=(window_left, window_right), bottom_right=bottom_right, softcap=softcap,
                alibi=alibi, sinks=sinks)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool,
                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                  seed: torch.Tensor | None = None, residual: bool = False,
                  window_left: int = -1, window_right: int = -1, bottom_right: bool = False,
                  softcap: float = 0.0, alibi: torch.Tensor | None = None,
                  sinks: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention forward.

    q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv): same dtype (fp32/fp16/bf16) and device,
    any strides, Hq % Hkv == 0, D and Dv <= 256. Causal masking is top-left aligned (query i sees
    keys j <= i) unless bottom_right. attn_mask: None, or at most 4-D and broadcastable to
    (B, Hq, L, S); bool (True = takes part) or float (added to the scores; -inf hides a pair);
    applied together with is_causal. dropout_p in [0, 1]: dropout on the probabilities, drawn
    from `seed`, a (1,) int64 tensor on q's device that the kernels read (None when
    dropout_p == 0). Returns out (B, Hq, L, Dv) contiguous in q.dtype, lse (B, Hq, L) float32, the
    natural-log logsumexp of the (masked) scores per row (-inf for a row that sees no key, whose
    out is 0), and out_lo: with residual=True (a backward follows) and an fp16 / bf16 q, out's
    rounding residual (out32 - out, shaped as out, for an accurate delta in attention_bwd), else
    an empty tensor.

    Score modifiers (flash-attn's; each off by default, and a call without them runs the plain
    kernel): window_left, window_right, -1 = unbounded: query i sees keys
    i + off - left ... i + off + right (is_causal is right = 0); bottom_right: the diagonal of
    is_causal, the window and ALiBi is bottom-right aligned, off = S - L (flash-attn's; varlen: per
    sequence), else top-left, off = 0 (torch's); softcap > 0: the scaled scores become
    softcap * tanh(score / softcap), before the mask is added; alibi: (Hq,) or (B, Hq) float32
    slopes, the score of (i, j) gets -slope * |j - (i + off)|, never materialised (no gradient);
    sinks: (Hq,) float, one more logit per head in each row's softmax with no value (lse includes
    it; a row that sees no key gets out 0 and lse = the sink), with a gradient.
    """
    B, Hq, L, D = q.shape
    S, Dv = k.shape[2], v.shape[3]
    out = torch.empty((B, Hq, L, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    none = q.new_empty((0,))
    if lse.numel() == 0:  # L == 0 (or B * Hq == 0): nothing to compute
        return out, lse, none
    if S == 0:  # no keys: softmax over an empty set (and the sink, if any)
        lse = lse.fill_(float("-inf")) if sinks is None else lse.copy_(
            sinks.float()[None, :, None].expand(B, Hq, L))
        return out.zero_(), lse, none
    out_lo = _residual(out, residual)
    _launch_fwd(q, k, v, out, out_lo, lse, B, L, S, scale, is_causal, attn_mask, dropout_p, seed,
                None, _mods(window_left, window_right, bottom_right, softcap, alibi, sinks))
    return out, lse, none if out_lo is None else out_lo


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, scale: float, is_causal: bool,
                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                  seed: torch.Tensor | None = None, mask_grad: bool = False,
                  out_lo: torch.Tensor | None = None, window_left: int = -1,
                  window_right: int = -1, bottom_right: bool = False, softcap: float = 0.0,
                  alibi: torch.Tensor | None = None, sinks: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention backward (FlashAttention-2, deterministic: no atomics).

    do (B, Hq, L, Dv) any strides; q, k, v, scale, is_causal, attn_mask, dropout_p, seed and the
    score modifiers as given to attention_fwd; out, lse, out_lo as it returned them (out_lo None or
    empty: delta from out). Returns dq (B, Hq, L, D), dk (B, Hkv, S, D), dv (B, Hkv, S, Dv),
    contiguous, in q.dtype; dmask: with mask_grad (a float attn_mask) the gradient of the additive
    mask, shaped and typed as attn_mask (dS summed over its broadcast dims; this needs a
    (B, Hq, L, S) fp32 buffer), else an empty tensor; dsinks: with sinks their gradient, shaped
    and typed as sinks, else an empty tensor.
    """
    B, Hq, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty((B, Hq, L, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, S, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, Hkv, S, Dv), dtype=q.dtype, device=q.device)
    dmask = torch.zeros((B, Hq, L, S), dtype=torch.float32, device=q.device) if mask_grad else None
    dsinks = None
    if L > 0 and S > 0 and B * Hq > 0:
        dsinks = _launch_bwd(do, q, k, v, out, _residual_arg(out_lo), lse.contiguous(), dq, dk, dv,
                             dmask, B, L, S, scale, is_causal, attn_mask, dropout_p, seed, None,
                             _mods(window_left, window_right, bottom_right, softcap, alibi, sinks))
    else:  # nothing attends: every gradient is 0 (or empty)
        for grad in (dq, dk, dv):
            grad.zero_()
    dsinks = _sinks_grad(dsinks, sinks, q)
    if not mask_grad:
        return dq, dk, dv, q.new_empty((0,)), dsinks
    # dS of the full (B, Hq, L, S) problem, summed over the dims the mask broadcasts along.
    return dq, dk, dv, dmask.sum_to_size(attn_mask.shape).to(attn_mask.dtype), dsinks


def _sinks_grad(dsinks: torch.Tensor | None, sinks: torch.Tensor | None,
                q: torch.Tensor) -> torch.Tensor:
    """The gradient of sinks in their dtype (0 where nothing attended), or an empty tensor."""
    if sinks is None:
        return q.new_empty((0,))
    return (dsinks if dsinks is not None else torch.zeros_like(sinks, dtype=torch.float32)
            ).to(sinks.dtype)


def varlen_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                         max_seqlen_k: int, scale: float, is_causal: bool, dropout_p: float = 0.0,
                         seed: torch.Tensor | None = None, residual: bool = False,
                         window_left: int = -1, window_right: int = -1,
                         bottom_right: bool = False, softcap: float = 0.0,
                         alibi: torch.Tensor | None = None, sinks: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention forward on packed variable-length sequences.

    q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv) any strides; cu_seqlens_q / _k (B + 1,) int32,
    starting at 0, non-decreasing, ending at Tq / Tk: sequence b is rows cu[b] .. cu[b + 1] - 1;
    max_seqlen_*: at least the longest sequence. Each sequence attends to its own keys only, as
    attention_fwd would on it alone (causal and the score modifiers aligned per sequence; alibi
    (B, Hq) has a row per sequence). Returns out (Tq, Hq, Dv) contiguous in q.dtype, lse
    (Hq, Tq) float32 and out_lo as attention_fwd.
    """
    Tq, Hq, _ = q.shape
    out = torch.empty((Tq, Hq, v.shape[2]), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, Tq), dtype=torch.float32, device=q.device)
    out_lo = _residual(out, residual) if lse.numel() > 0 else None
    if lse.numel() > 0:  # then B >= 1 and max_seqlen_q >= 1
        _launch_fwd(q, k, v, out, out_lo, lse, cu_seqlens_q.numel() - 1, max_seqlen_q,
                    max_seqlen_k, scale, is_causal, None, dropout_p, seed,
                    (cu_seqlens_q, cu_seqlens_k),
                    _mods(window_left, window_right, bottom_right, softcap, alibi, sinks))
    return out, lse, q.new_empty((0,)) if out_lo is None else out_lo


def varlen_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                         scale: float, is_causal: bool, dropout_p: float = 0.0,
                         seed: torch.Tensor | None = None, out_lo: torch.Tensor | None = None,
                         window_left: int = -1, window_right: int = -1,
                         bottom_right: bool = False, softcap: float = 0.0,
                         alibi: torch.Tensor | None = None, sinks: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of varlen_attention_fwd (same arguments; do (Tq, Hq, Dv) any strides; out_lo as
    it returned). Returns dq (Tq, Hq, D), dk (Tk, Hkv, D), dv (Tk, Hkv, Dv), contiguous, in
    q.dtype, and dsinks as attention_bwd."""
    dq, dk, dv = (torch.empty(t.shape, dtype=q.dtype, device=q.device) for t in (q, k, v))
    dsinks = None
    if lse.numel() > 0:
        dsinks = _launch_bwd(do, q, k, v, out, _residual_arg(out_lo), lse.contiguous(), dq, dk, dv,
                             None, cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k, scale,
                             is_causal, None, dropout_p, seed, (cu_seqlens_q, cu_seqlens_k),
                             _mods(window_left, window_right, bottom_right, softcap, alibi, sinks))
    else:  # no queries: no key gets a gradient
        dk.zero_()
        dv.zero_()
    return dq, dk, dv, _sinks_grad(dsinks, sinks, q)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, is_causal: bool,
                    attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                    seed: torch.Tensor | None = None, window_left: int = -1,
                    window_right: int = -1, bottom_right: bool = False, softcap: float = 0.0,
                    alibi: torch.Tensor | None = None) -> torch.Tensor:
    """flash-attn's S_dmask of attention_fwd with the same arguments (and seed): (B, Hq, L, S) in
    q.dtype, exp(score - rowmax) of each row's scores as the forward sees them (hidden pairs 0),
    negative where that forward's dropout dropped the pair. Materialises the L x S matrix."""
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    probs = torch.zeros((B, Hq, L, S), dtype=q.dtype, device=q.device)
    if probs.numel() > 0:
        _launch_probs(q, k, probs, B, L, S, scale, is_causal, attn_mask, dropout_p, seed, None,
                      _mods(window_left, window_right, bottom_right, softcap, alibi, None))
    return probs


def varlen_attention_probs(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           scale: float, is_causal: bool, dropout_p: float = 0.0,
                           seed: torch.Tensor | None = None, window_left: int = -1,
                           window_right: int = -1, bottom_right: bool = False,
                           softcap: float = 0.0, alibi: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """attention_probs of varlen_attention_fwd: (B, Hq, max_seqlen_q, max_seqlen_k), sequence b's
    probabilities in the top-left corner of probs[b] (zeros elsewhere)."""
    B = cu_seqlens_q.numel() - 1
    probs = torch.zeros((B, q.shape[1], max_seqlen_q, max_seqlen_k), dtype=q.dtype,
                        device=q.device)
    if probs.numel() > 0:
        _launch_probs(q, k, probs, B, max_seqlen_q, max_seqlen_k, scale, is_causal, None,
                      dropout_p, seed, (cu_seqlens_q, cu_seqlens_k),
                      _mods(window_left, window_right, bottom_right, softcap, alibi, None))
    return probs
