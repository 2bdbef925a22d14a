"""Numerics shared by the kernels.

`round_to(x, dtype)` casts fp32 values to the dtype of an output. On the GPU it is a plain `.to`
(round to nearest even). Triton's interpreter (3.9) truncates fp32 -> bf16 instead, which doubles
the rounding error of every bf16 output on CPU test machines; there the value is first rounded to
nearest even on its fp32 bits, so the truncation that follows is exact and CPU tests see the GPU's
rounding.
"""

import triton
import triton.language as tl

from .configs import interpreting

# Decided when the kernels are defined, as Triton decides whether to interpret them.
INTERPRET: tl.constexpr = tl.constexpr(interpreting())


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x -> dtype, rounding to nearest even everywhere."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dropout_keep(seed, offsets, p):
    """Keep-mask of dropout with probability p at element `offsets` (int64; the low 32 bits feed
    Philox): the same (seed, offsets) give the same mask in the forward and the backward."""
    return tl.rand(seed, offsets) >= p
