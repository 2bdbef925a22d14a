"""Launch settings for every fastattn kernel: the one place that picks block sizes and warps.

Each op asks one function here for its settings, given the problem size and the device. Choices are
made per architecture (Hopper, Ampere and older) on CUDA, and one small, fixed set when Triton's
interpreter runs the kernels on the CPU (the interpreter times nothing and ignores warps and stages;
there, bigger tiles simply mean fewer Python-level program launches).

Nothing here queries a device at import time: device facts are read on first use and cached.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1), read at call time."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _cuda_facts(index: int) -> tuple[int, int]:
    """(compute capability major, streaming multiprocessor count) of CUDA device `index`."""
    props = torch.cuda.get_device_properties(index)
    return props.major, props.multi_processor_count


def arch_major(device: torch.device) -> int:
    """Compute capability major of `device` (9 = Hopper, 8 = Ampere/Ada); 0 for CPU."""
    if device.type != "cuda":
        return 0
    return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())[0]


def sm_count(device: torch.device) -> int:
    """Number of programs that run at once, roughly: the SM count on CUDA, a small number on CPU."""
    if device.type != "cuda":
        return 4
    return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())[1]


# ---- layer norm / rms norm ----


@dataclass(frozen=True)
class NormConfig:
    """Tile of a norm kernel: BLOCK_M rows x BLOCK_N columns per step, in one program."""

    BLOCK_M: int
    BLOCK_N: int
    SINGLE_TILE: bool  # True: a whole row fits in BLOCK_N, loaded once; False: loop over column chunks
    num_warps: int


# Widest row kept whole in registers; wider rows are processed in chunks of this many columns.
_NORM_MAX_TILE_CUDA = 16384
# Under the interpreter, a smaller limit so that the tests exercise the chunked path at modest sizes.
_NORM_MAX_TILE_INTERPRET = 4096


def _norm_warps(block_elems: int) -> int:
    # Warps grow with the tile: 4 up to 2048 elements, 8 up to 8192, 16 beyond.
    return 4 if block_elems <= 2048 else 8 if block_elems <= 8192 else 16


def norm_config(n_cols: int, device: torch.device) -> NormConfig:
    """Tile for the norm forward and backward kernels on rows of `n_cols` elements."""
    max_tile = _NORM_MAX_TILE_INTERPRET if interpreting() else _NORM_MAX_TILE_CUDA
    block_n = min(next_power_of_2(n_cols), max_tile)
    single = next_power_of_2(n_cols) <= max_tile
    if interpreting():
        # Few, large programs: the interpreter pays per program and per op, not per element.
        block_m = max(1, min(1024, 8192 // block_n)) if single else 1
        return NormConfig(block_m, block_n, single, 4)
    # On the GPU pack rows until a tile holds ~2048 elements (hidden <= 1024 gets several rows per
    # program) so that each program moves enough bytes; one row per program for wide rows.
    block_m = max(1, min(16, 2048 // block_n)) if single else 1
    return NormConfig(block_m, block_n, single, _norm_warps(block_m * block_n))


def norm_bwd_programs(n_row_tiles: int, device: torch.device) -> int:
    """Number of programs of the norm backward: each strides over row tiles and keeps one fp32 row
    of dweight/dbias partial sums; about two per SM on the GPU so all SMs stay busy."""
    target = 2 * sm_count(device) if device.type == "cuda" else 4
    return max(1, min(n_row_tiles, target))


def column_sum_config(n_cols: int, device: torch.device) -> int:
    """BLOCK_N of the kernel that sums the (programs, N) partials column by column."""
    return min(next_power_of_2(n_cols), 4096 if interpreting() else 1024)


def device_guard(tensor: torch.Tensor):
    """Context that makes `tensor`'s GPU the current one while launching (multi-GPU safe)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# ---- attention ----
#
# Tiles are chosen by the bytes of one padded head row, next_power_of_2(head_dim) * itemsize, which is
# what fills registers and shared memory: fp16/bf16 d64 = 128 B, d128 = 256 B, d256 = 512 B; fp32
# lands one bucket higher than the same head dim in 16 bits. Each table row reads
# (largest row bytes, BLOCK_M, BLOCK_N, num_warps, num_stages). These are starting points from the
# Triton tutorial / FlashAttention tiles, not yet autotuned on a GPU.

# Forward: BLOCK_M query rows per program, BLOCK_N keys per loop step.
_ATTN_FWD_HOPPER = (
    (128, 128, 64, 4, 3),  # d64
    (256, 128, 64, 4, 3),  # d128
    (512, 64, 64, 4, 2),  # d256
    (1024, 32, 32, 4, 2),  # d256 fp32
)
# Ampere/Ada and older: about 100 KB of shared memory per block on consumer parts, so smaller tiles and
# fewer stages (K and V tiles take 2 * BLOCK_N * row bytes per stage).
_ATTN_FWD_AMPERE = (
    (128, 64, 64, 4, 2),
    (256, 64, 64, 4, 2),
    (512, 32, 32, 4, 1),
    (1024, 32, 32, 4, 1),
)

# Backward dK/dV pass: a fixed block of BLOCK_N keys holds k, v and the fp32 dk, dv accumulators
# (2 * BLOCK_N * head_dim * 4 bytes) in registers while BLOCK_M query rows stream past; from d128 on
# that spills with 4 warps, hence 8 warps and 64- or 32-wide key blocks.
_ATTN_BWD_DKDV_HOPPER = (
    (128, 32, 128, 4, 3),
    (256, 32, 64, 8, 2),
    (512, 32, 32, 8, 2),
    (1024, 16, 32, 8, 1),
)
_ATTN_BWD_DKDV_AMPERE = (
    (128, 32, 64, 4, 2),
    (256, 32, 64, 8, 2),
    (512, 32, 32, 8, 1),
    (1024, 16, 32, 8, 1),
)
# Backward dQ pass: a fixed block of BLOCK_M query rows (q, dO and the fp32 dq accumulator) while
# BLOCK_N keys stream past.
_ATTN_BWD_DQ_HOPPER = (
    (128, 128, 32, 4, 3),
    (256, 128, 32, 8, 2),
    (512, 64, 32, 8, 2),
    (1024, 32, 16, 8, 1),
)
_ATTN_BWD_DQ_AMPERE = (
    (128, 64, 32, 4, 2),
    (256, 64, 32, 4, 2),
    (512, 32, 32, 8, 1),
    (1024, 32, 16, 8, 1),
)

# Under the interpreter: one fixed setting per pass (warps and stages are ignored there). The tiles
# are as lopsided as the GPU's (the fixed block twice the streamed one), so CPU tests exercise the
# loop bounds with BLOCK_M != BLOCK_N; 64/32 also keeps the number of Python-level programs low.
_ATTN_INTERPRET_FWD = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
_ATTN_INTERPRET_BWD = dict(
    preprocess=dict(BLOCK_M=64, num_warps=4),
    dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1),
    dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
)


def _attention_row_bytes(head_dim: int, dtype: torch.dtype) -> int:
    return next_power_of_2(max(head_dim, 16)) * dtype.itemsize


def _attention_pick(table, head_dim: int, dtype: torch.dtype) -> dict:
    row_bytes = _attention_row_bytes(head_dim, dtype)
    # The first row wide enough; rows wider than the table (head dims > 256) get its last, smallest tiles.
    row = next((r for r in table if row_bytes <= r[0]), table[-1])
    _, block_m, block_n, warps, stages = row
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def _attention_is_hopper_class(device: torch.device) -> bool:
    # Hopper (9) and datacenter Blackwell (10) have ~228 KB of shared memory per SM.
    return arch_major(device) in (9, 10)


def attention_fwd_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of the attention forward kernel.

    head_dim: max(D, Dv), the wider of the query/key and value head dims.
    """
    if interpreting() or device.type != "cuda":
        return dict(_ATTN_INTERPRET_FWD)
    table = _ATTN_FWD_HOPPER if _attention_is_hopper_class(device) else _ATTN_FWD_AMPERE
    return _attention_pick(table, head_dim, dtype)


def attention_bwd_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Launch settings of the three attention backward kernels, as
    {"preprocess": {BLOCK_M, num_warps}, "dkdv": {...}, "dq": {...}}, the last two with
    BLOCK_M, BLOCK_N, num_warps, num_stages. head_dim: max(D, Dv)."""
    if interpreting() or device.type != "cuda":
        return {name: dict(cfg) for name, cfg in _ATTN_INTERPRET_BWD.items()}
    hopper = _attention_is_hopper_class(device)
    return dict(
        # delta = rowsum(dO * O) is memory bound: big row blocks, 4 warps.
        preprocess=dict(BLOCK_M=128 if _attention_row_bytes(head_dim, dtype) <= 256 else 64, num_warps=4),
        dkdv=_attention_pick(_ATTN_BWD_DKDV_HOPPER if hopper else _ATTN_BWD_DKDV_AMPERE, head_dim, dtype),
        dq=_attention_pick(_ATTN_BWD_DQ_HOPPER if hopper else _ATTN_BWD_DQ_AMPERE, head_dim, dtype),
    )
