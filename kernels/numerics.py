"""Numerics shared by the kernels.

`round_to(x, dtype)` casts fp32 values to the dtype of an output. On the GPU it is a plain `.to`
(round to nearest even). Triton's interpreter (3.9) truncates fp32 -> bf16 instead, which doubles
the rounding error of every bf16 output on CPU test machines; there the value is first rounded to
nearest even on its fp32 bits, so the truncation that follows is exact and CPU tests see the GPU's
rounding.

Dropout: `dropout_keep(seed, offsets, p)` draws the keep-mask with Philox. The seed lives in device
memory, a (1,) int64 tensor the host drew there (fastattn._validate.dropout_seed) and passed as a
pointer (`seed_arg`), read in the kernel with `load_seed`: no host sync, so torch.compile keeps the
draw in its graph and a CUDA graph draws a new seed on every replay.
"""

from __future__ import annotations

import torch
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


@triton.jit
def dropout_keep(seed, offsets, p):
    """Keep-mask of dropout with probability p at element `offsets` (int64; the low 32 bits feed
    Philox): the same (seed, offsets) give the same mask in the forward and the backward."""
    return tl.rand(seed, offsets) >= p
