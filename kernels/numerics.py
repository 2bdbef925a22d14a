"""Numerics shared by the kernels.

`round_to(x, dtype)` casts fp32 values to the dtype of an output. On the GPU it is a plain `.to`
(round to nearest even). Triton's interpreter (3.9) truncates fp32 -> bf16 instead, which doubles
the rounding error of every bf16 output on CPU test machines; there the value is first rounded to
nearest even on its fp32 bits, so the truncation that follows is exact and CPU tests see the GPU's
rounding.

Dropout: `dropout_keep_tile(seed, q0, k0, ...)` draws the keep-mask of an attention score tile
with one Philox call per 2 x 2 scores (queries q, q + 8 by keys k, k + 8: the scores one thread
holds), `dropout_keep(seed, rows, cols, threshold)` that of a norm or embedding tile with one call
per 4 consecutive columns of a row; `dropout_args(p)` gives the integer
threshold they compare with and the scale of the kept values. The seed lives in device memory,
a (1,) int64 tensor the host drew there (fastattn._validate.dropout_seed) and passed as a pointer
(`seed_arg`), read in the kernel with `load_seed`: no host sync, so torch.compile keeps the draw in
its graph and a CUDA graph draws a new seed on every replay.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .configs import interpreting


class Constant(tl.constexpr):
    """A module-level constant the kernels read: a tl.constexpr whose `!=` with another Constant
    compares plain values. On every launch Triton checks, with `!=`, that each global constexpr a
    kernel and the functions it calls read still holds its value from compile time
    (JITFunction.run); tl.constexpr's own `!=` builds two constexpr objects, about 0.5 µs a
    comparison on the CI machine, so the attention forward's 18 globals cost it 9 µs a launch;
    this one 0.1 µs. Everything else is tl.constexpr's."""

    def __ne__(self, other):
        if type(other) is Constant:
            return self.value != other.value
        return super().__ne__(other)


# Decided when the kernels are defined, as Triton decides whether to interpret them.
INTERPRET = Constant(interpreting())


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x -> dtype, rounding to nearest even everywhere."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def seed_arg(seed: torch.Tensor | None, dropout_p: float,
             placeholder: torch.Tensor) -> torch.Tensor:
    """The SEED pointer argument of a kernel: the (1,) int64 seed tensor when dropout_p > 0, else
    `placeholder` (any tensor on the launch device; a kernel without dropout never reads it)."""
    if dropout_p == 0.0:
        return placeholder
    if (not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1
            or seed.device != placeholder.device):
        raise ValueError(f"dropout_p={dropout_p} needs seed: a (1,) int64 tensor on "
                         f"{placeholder.device}, got {seed!r}")
    return seed


@triton.jit
def load_seed(SEED, HAS_DROPOUT: tl.constexpr):
    """The dropout seed the host drew on the device (see seed_arg); 0 without dropout."""
    if HAS_DROPOUT:
        return tl.load(SEED)
    else:
        return 0



# tanh(x) = x * P(x^2) for |x| < _TANH_POLY_END (fp32's accurate path): a least-squares fit of
# tanh(x) / x on Chebyshev nodes of [0, 0.625], relative error 1.0e-7 in fp32 (Horner).
_TANH_POLY_END = Constant(0.625)
_TANH_C1 = Constant(-0.33333277702331543)
_TANH_C2 = Constant(0.13331417739391327)
_TANH_C3 = Constant(-0.05373980849981308)
_TANH_C4 = Constant(0.020642157644033432)
_TANH_C5 = Constant(-0.005709873978048563)
_TWO_LOG2E = Constant(2.8853900817779268)  # 2 * log2(e): exp(2x) = exp2(2x * log2(e))


@triton.jit
def tanh(x):
    """tanh of fp32 x (fp32 attention's softcap), without libdevice (which the interpreter lacks):
    1 - 2 / (exp(2x) + 1) with an IEEE division, exact at +-inf (exp2 -> inf or 0), and an odd
    polynomial for |x| < 0.625, where the formula cancels: relative error 1e-7 throughout."""
    t = 1.0 - tl.fdiv(2.0, tl.exp2(x * _TWO_LOG2E) + 1.0, ieee_rounding=True)
    x2 = x * x
    poly = _TANH_C5 * x2 + _TANH_C4
    poly = poly * x2 + _TANH_C3
    poly = poly * x2 + _TANH_C2
    poly = poly * x2 + _TANH_C1
    poly = x + x * (poly * x2)
    return tl.where(tl.abs(x) < _TANH_POLY_END, poly, t)


@triton.jit
def tanh_complement(y):
    """r = 1 / (2^y + 1) of fp32 y = 2 x log2(e), i.e. (1 - tanh x) / 2 (fp16 / bf16 attention's
    softcap: tanh x = 1 - 2r, 1 - tanh^2 x = 4 r (1 - r), without cancellation where tanh -> 1).
    The reciprocal of 2^y + 1 >= 1 is rsqrt squared: two instructions (rsqrt.approx, CUDA's 2-ulp
    rsqrtf, and a multiply), where a division takes five with its range fix-up; a relative error
    of a few fp32 ulp; r = 0 at y = +inf, 1 at -inf."""
    r = tl.math.rsqrt(tl.exp2(y) + 1.0)
    return r * r


# Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the
# generator of cuRAND's and torch's CUDA dropout, with its published constants.
_PHILOX_M0 = Constant(0xD2511F53)
_PHILOX_M1 = Constant(0xCD9E8D57)
_PHILOX_W0 = Constant(0x9E3779B9)
_PHILOX_W1 = Constant(0xBB67AE85)
_PHILOX_ROUNDS = Constant(10)


@triton.jit
def _philox4x32(c0, c1, c2, c3, k0, k1):
    """The four 32-bit words Philox-4x32-10 gives counter (c0, c1, c2, c3) under key (k0, k1)
    (uint32; counters broadcast against each other). Each round's two products are 32 x 32 -> 64
    bit multiplies (one IMAD.WIDE each for both halves)."""
    for _ in tl.static_range(_PHILOX_ROUNDS):
        p0 = c0.to(tl.uint64) * _PHILOX_M0
        p1 = c2.to(tl.uint64) * _PHILOX_M1
        c0, c1, c2, c3 = ((p1 >> 32).to(tl.uint32) ^ c1 ^ k0, p1.to(tl.uint32),
                          (p0 >> 32).to(tl.uint32) ^ c3 ^ k1, p0.to(tl.uint32))
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def dropout_keep_tile(seed, q0, k0, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                      KEYS_ON_ROWS: tl.constexpr, threshold):
    """Dropout keep-mask of the score tile of queries q0 + arange(BLOCK_Q) x keys k0 +
    arange(BLOCK_K) of one (batch, head), (BLOCK_Q, BLOCK_K), or with KEYS_ON_ROWS its transpose
    (BLOCK_K, BLOCK_Q); q0, k0, BLOCK_Q and BLOCK_K multiples of 16. Philox-4x32-10 keyed by the
    int64 `seed`.

    One Philox call per pair of queries {q, q + 8} and pair of keys {k, k + 8} (q, k with bit 3
    clear), counter (half(k), half(q), 0, 0) with half(x) = (x >> 4) * 8 + (x & 7) (x without its
    bit 3): its word 2 * (q >> 3 & 1) + (k >> 3 & 1) decides (q, k), kept iff the word, read as a
    signed int32 (uniform on [-2**31, 2**31)), is >= threshold (= ceil(p * 2**32) - 2**31: the
    drop rate is p to within 2**-32). A mask depends only on (seed, query, key), so every pass and
    every tile shape draws the same one, for a quarter of the Philox work of one call per score.
    The four scores of a call sit in one thread in the accumulator layout of the MMAs (wgmma and
    mma.sync give a thread rows r and r + 8, and columns c and c + 8), in either orientation: the
    mask is drawn where the scores are, with no layout conversion through shared memory.
    """
    tl.static_assert(BLOCK_Q % 16 == 0 and BLOCK_K % 16 == 0, "dropout tiles: multiples of 16")
    key0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    key1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros((1, 1), dtype=tl.uint32)
    qh = (q0 // 2 + tl.arange(0, BLOCK_Q // 2)).to(tl.uint32)  # half(q) of the q with bit 3 clear
    kh = (k0 // 2 + tl.arange(0, BLOCK_K // 2)).to(tl.uint32)
    if KEYS_ON_ROWS:
        r0, r1, r2, r3 = _philox4x32(kh[:, None], qh[None, :], zero, zero, key0, key1)
    else:
        r0, r1, r2, r3 = _philox4x32(kh[None, :], qh[:, None], zero, zero, key0, key1)
    # [.., kb, qb]: word 2 qb + kb, qb / kb the bit 3 of the query / key
    words = tl.join(tl.join(r0, r1), tl.join(r2, r3))
    # key 16 u + 8 kb + v, query 16 i + 8 qb + j
    if KEYS_ON_ROWS:  # [u, v, i, j, kb, qb] -> [u, kb, v, i, qb, j]
        words = tl.reshape(words, (BLOCK_K // 16, 8, BLOCK_Q // 16, 8, 2, 2))
        words = tl.reshape(tl.permute(words, 0, 4, 1, 2, 5, 3), (BLOCK_K, BLOCK_Q))
    else:  # [i, j, u, v, kb, qb] -> [i, qb, j, u, kb, v]
        words = tl.reshape(words, (BLOCK_Q // 16, 8, BLOCK_K // 16, 8, 2, 2))
        words = tl.reshape(tl.permute(words, 0, 5, 1, 2, 4, 3), (BLOCK_Q, BLOCK_K))
    return words.to(tl.int32, bitcast=True) >= threshold


@triton.jit
def dropout_keep(seed, rows, cols, threshold):
    """The keep-mask of the (len(rows), len(cols)) tile of a row-major tensor (the norms' and
    embeddings' dropout), Philox-4x32-10 keyed by the int64 `seed`: one call per row and 4
    consecutive columns, counter (col // 4, row, 0, 0), its word col % 4 deciding (row, col) as in
    dropout_keep_tile. cols = c0 + arange(BLOCK), c0 a multiple of 4 and BLOCK >= 4 (configs.py
    keeps the norm and embedding blocks so), so a mask depends only on (seed, row, col), whatever
    the tiles of the pass that draws it."""
    c4 = tl.min(tl.reshape(cols, (cols.numel // 4, 4)), 1) // 4  # the groups of 4 columns
    key0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    key1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros((1, 1), dtype=tl.uint32)
    r0, r1, r2, r3 = _philox4x32(c4[None, :].to(tl.uint32), rows[:, None].to(tl.uint32), zero,
                                 zero, key0, key1)
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # column 4 c4 + word
    return words.to(tl.int32, bitcast=True) >= threshold


def dropout_threshold(p: float) -> int:
    """dropout_keep_tile's form of the drop probability p in (0, 1], an int32: a score is dropped
    when a uniform 32-bit word, read as a signed int32, falls below ceil(p * 2**32) - 2**31 (capped
    at 2**31 - 1: p == 1 keeps 1 score in 2**32, which its scale 0 zeroes)."""
    return min(math.ceil(p * 2.0**32) - 2**31, 2**31 - 1)


def dropout_args(p: float) -> tuple[int, float]:
    """The kernels' dropout scalars for drop probability p: (dropout_threshold(p), 1 / (1 - p));
    (0, 1.0) without dropout, and the scale 0 when p == 1 (nothing kept). Kernels declare the
    threshold do_not_specialize, so every p runs one compiled kernel."""
    if p == 0.0:
        return 0, 1.0
    return dropout_threshold(p), 1.0 / (1.0 - p) if p < 1.0 else 0.0
