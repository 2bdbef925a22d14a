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


def env_value(name: str) -> str | bytes | None:
    """Environment variable `name`'s raw value, None when unset: a lookup in the dict of encoded
    variables CPython's os.environ keeps (_data, os.py), which skips os.environ.get's encode and
    decode (about a µs; launches read TRITON_INTERPRET and FASTATTN_AUTOTUNE on every call);
    os.environ.get where there is no such dict. Parse it with a cached function of the raw value."""
    environ = getattr(os.environ, "_data", None)
    return os.environ.get(name) if environ is None else environ.get(_encoded(name))


@functools.cache
def _encoded(name: str):
    return os.environ.encodekey(name)


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1), read at call time."""
    return interpret_value(env_value("TRITON_INTERPRET"))


@functools.lru_cache(maxsize=16)
def interpret_value(raw: str | bytes | None) -> bool:
    """Whether a raw TRITON_INTERPRET value (str or os.environ's bytes) turns the interpreter on."""
    text = raw.decode() if isinstance(raw, bytes) else (raw or "0")
    return text.lower() in ("1", "true", "on", "yes")


# Compiler options every fastattn launch passes, beside its num_warps / num_stages. FMA contraction
# stays on: the kernels fold scales into single FFMAs (the score scale into exp2's argument, the
# norm's (x - mean) * rstd * w + b) and the static Hopper check counts them so. Triton 3.9 warns
# that its default turns off in 3.10; pinned here, no launch depends on that default.
COMPILE_OPTIONS = dict(enable_fp_fusion=True)


# Host-side integer helpers for launch settings and grids. Triton's own (triton.cdiv,
# triton.next_power_of_2) are ConstexprFunction objects in Triton 3.6 and 3.9: about 5 µs per call
# from Python, where these take 0.03, and a backward launch computed five grids with them.
def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


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


# Widest row kept whole in registers (the backward holds more per element: dweight and dbias
# partial sums beside x and dy); wider rows are walked in chunks. Chosen by compiling for sm_90
# and reading ptxas' spill counts (none at these sizes), not by timing.
_NORM_MAX_TILE_CUDA = {"forward": 16384, "backward": 4096}
_NORM_CHUNK_CUDA = 4096
# Under the interpreter, a smaller limit so that the tests exercise the chunked path at modest sizes.
_NORM_MAX_TILE_INTERPRET = 4096


def _norm_warps(block_elems: int) -> int:
    # Warps grow with the tile: 4 up to 2048 elements, 8 up to 8192, 16 beyond.
    return 4 if block_elems <= 2048 else 8 if block_elems <= 8192 else 16


def norm_config(n_cols: int, device: torch.device, backward: bool = False) -> NormConfig:
    """Tile for the norm forward (or backward) kernel on rows of `n_cols` elements."""
    if interpreting():
        max_tile = chunk = _NORM_MAX_TILE_INTERPRET
    else:
        max_tile = _NORM_MAX_TILE_CUDA["backward" if backward else "forward"]
        chunk = _NORM_CHUNK_CUDA
    single = next_power_of_2(n_cols) <= max_tile
    # At least 4 columns: dropout draws the words of 4 columns at once (numerics.dropout_keep).
    block_n = max(4, next_power_of_2(n_cols)) if single else chunk
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
    return min(next_power_of_2(n_cols), 4096 if interpreting() else 256)


def device_guard(tensor: torch.Tensor):
    """Context that makes `tensor`'s GPU the current one while launching (multi-GPU safe)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# ---- attention ----
#
# Settings are picked by the padded head dim BLOCK_D = next_power_of_2(max(D, Dv)) (what fills
# registers and shared memory), per architecture for fp16/bf16, and from one table for fp32, whose
# dots run as exact fp32 FMAs (input_precision="ieee", no tensor cores) on every GPU. Table rows read
# (largest BLOCK_D, BLOCK_M, BLOCK_N, num_warps, num_stages). They start from the Triton tutorial and
# FlashAttention tiles and were checked by compiling for sm_90 / sm_80 without a GPU: bf16, strides
# specialised as a launch on contiguous tensors specialises them, with Triton 3.6 (the version of
# the project's GPU image) and 3.9, reading ptxas's spills (`python tests/sm90_compile.py 90
# --all-rows`, and 80). The Hopper rows are held to the static Hopper gate (wgmma only, none
# serialised, no MMA duplicated across warps, no spills, the forward's K / V by TMA, main-loop
# issue:TC <= 0.6 for the d128 forward and <= 1.0 elsewhere; tests/test_hopper_static.py, every CI run,
# compiled through Triton's launch binder as a real launch on 16-divisible lengths specialises
# them): see its expected-failure table for the rows that do not pass yet. Compiled for ragged
# lengths (`--all-rows`: lengths and strides not known 16-divisible) rows can spill more; it was
# last read before K / V went through descriptors. Shared memory stays within 227 KB on Hopper
# and ~99 KB on Ampere/Ada. They are not yet timed on a GPU. The widest row also serves head dims
# past the table.

# Forward: BLOCK_M query rows per program, BLOCK_N keys per loop step.
# Hopper rows give every warpgroup (4 warps) its own 64 rows of the MMA tiles, so no wgmma work is
# done twice (a 64-row tile over 8 warps was, and an n8 wgmma with it): d256 64 x 64 on 4 warps
# (issue:TC 0.72 -> 0.43 against 64 x 32, Triton 3.9); d128 on 128-wide key blocks (issue:TC of its
# main loop 0.80 -> 0.64, sm_90 compile, Triton 3.6; 0.49 with K / V by TMA); d64 128 x 128 on 8
# warps, 3 stages, not 128 x 64 on 4: each thread rescales half as many accumulator elements per
# score and its row reductions cover twice the keys (issue:TC 0.99 -> 0.88 plain, key padding 1.05
# -> 0.93, ALiBi 1.14 -> 1.04, a bool mask 1.59 -> 1.49; 3.6: 0.98 -> 0.87), one CTA per SM (the
# 128 x 64 tiles, 2 CTAs per SM, are no alternate: with key padding they miss the gate, 1.05).
_ATTN_FWD_HOPPER = ((64, 128, 128, 8, 3), (128, 128, 128, 8, 2), (256, 64, 64, 4, 2))
_ATTN_FWD_AMPERE = ((64, 64, 64, 8, 2), (128, 64, 64, 4, 2), (256, 32, 32, 4, 1))
_ATTN_FWD_FP32 = ((64, 64, 32, 8, 2), (128, 32, 16, 8, 1), (256, 32, 16, 8, 1))

# Backward dK/dV: a fixed block of BLOCK_N keys keeps k, v and the fp32 dk, dv accumulators in
# registers while BLOCK_M query rows stream past; from d64 on that needs 8 warps (4 spill), and the
# streamed block shrinks as the head dim grows. A 6th entry is SPLIT (default 1): the Hopper d256
# row runs two programs per 128 keys, each accumulating half of the columns of dK and dV (their
# fp32 accumulators do not fit whole with a 128-key block, and wgmma needs 64 keys per warpgroup:
# 16 x 32 on 8 warps was mma.sync, computed 4 times over). Each recomputes S and dP, 1.5x the
# MMA work of one program, all of it wgmma (issue:TC 0.95, was 0.99 on mma.sync). With q and dO
# read through tensor descriptors (TMA: no address registers, no proxy fence per stage) the d64
# row takes 64 queries a step, its S^T and dP^T products n64 wide (32 x 128 on 3 stages spilled no
# more, but ALiBi's issue:TC stayed at 1.02; 64 x 128: 0.75, and a mask 1.46 -> 1.09).
_ATTN_BWD_DKDV_HOPPER = ((64, 64, 128, 8, 2), (128, 32, 128, 8, 2), (256, 16, 128, 8, 2, 2))
_ATTN_BWD_DKDV_AMPERE = ((64, 32, 32, 8, 2), (128, 16, 64, 8, 2), (256, 16, 32, 8, 1))
_ATTN_BWD_DKDV_FP32 = ((64, 32, 32, 4, 1), (128, 16, 32, 4, 1), (256, 16, 16, 4, 1))
# The backward's row statistics (lse2, delta) pad every sequence to a multiple of this many rows
# (kernels/attention.py _stat_rows), so that the dK/dV loop reads a query block's without a row
# mask: a mask along a length not known to be 16-divisible, as a packed sequence's, cost a
# predicate per element (varlen d64 dK/dV issue:TC 1.10 -> 0.92, Triton 3.6). Every dK/dV BLOCK_M
# of these tables, of their dropout twins and of the autotuning alternates divides it
# (tests/test_attention_kernels.py).
ATTN_BWD_ROW_PAD = 64

# A bool mask (other than a key-padding one) has its key blocks listed per query block for the
# forward and dQ kernels, and its query blocks per key block for the dK/dV kernel
# (kernels/attention.py _visible_blocks: hidden blocks skipped, whole ones unmasked), when the
# listed positions (keys; dK/dV's queries) span at least this many blocks of the launch: below,
# there is little to skip, and the lists' dozen small torch ops (about 120 µs of host time on the
# 2-core CPU) would cost more than they save.
ATTN_TILE_LISTS_MIN_BLOCKS = 4

# Backward dQ: a fixed block of BLOCK_M query rows (q, dO and the fp32 dq accumulator) while BLOCK_N
# keys stream past. Hopper d256: 128 rows on 8 warps, wgmma (32 rows on 8 warps fell back to
# mma.sync); the Hopper dK/dV d128 row keeps 128 keys on 8 warps (16 x 64 computed S and dP twice).
_ATTN_BWD_DQ_HOPPER = ((64, 128, 32, 4, 3), (128, 128, 32, 8, 2), (256, 128, 32, 8, 2))
_ATTN_BWD_DQ_AMPERE = ((64, 64, 32, 4, 2), (128, 64, 32, 8, 2), (256, 32, 32, 8, 1))
_ATTN_BWD_DQ_FP32 = ((64, 64, 32, 8, 2), (128, 32, 16, 8, 1), (256, 16, 16, 8, 1))

# With dropout (Philox counters and random words live beside every score tile) the rows above spill
# registers; such calls use these tables instead (more warps, or a narrower block). Calls with an
# attn_mask (a mask tile) take the rows above: with K / V by TMA they fit (sm_90 compile, no
# spills; their bigger tiles cut the mask's share of the loop's instructions: d128 dK/dV issue:TC
# 1.25 -> 0.96, dQ 1.32 -> 0.94, forward 1.55 -> 1.07). The fp32 tables serve them unchanged.
# Hopper rows re-read with one Philox call per 4 scores (numerics.dropout_keep_tile), Triton 3.9: the
# widest tiles that do not spill (d128 forward 128 x 32 -> 128 x 64, issue:TC 2.03 -> 1.61; d64
# forward 128 x 32 -> 128 x 128, 3.63 -> 2.55). With the 2 x 2 scores of a Philox call drawn in
# the MMA's accumulator layout (no conversion through shared memory) the d128 forward needs 176
# registers, not 207 (issue:TC 1.52), the d256 forward's 64 x 64 stopped spilling (12 bytes before),
# the d64 forward takes 64 x 128 on 4 warps, 2 stages (2 CTAs per SM; issue:TC 2.55, no spill:
# its 128 x 128 spilled 24 bytes, and is at 2.83 without spilling), and the d128 dQ 128 x 64
# (1.14 -> 0.91; 0.99 on 3.6, 254 registers, no spill). The d128 dK/dV's 32 x 128 still spills
# (16-20 bytes on 1 or 2 stages; 1.32 with SPLIT 2): it keeps 16 x 128.
_ATTN_FWD_HOPPER_DROPOUT = ((64, 64, 128, 4, 2), (128, 128, 64, 8, 3), (256, 64, 64, 4, 2))
_ATTN_FWD_AMPERE_DROPOUT = ((64, 64, 64, 8, 2), (128, 64, 32, 8, 2), (256, 32, 32, 8, 1))
_ATTN_BWD_DKDV_HOPPER_DROPOUT = ((64, 32, 128, 8, 3), (128, 16, 128, 8, 2),
                                 (256, 16, 128, 8, 1, 2))
_ATTN_BWD_DKDV_AMPERE_DROPOUT = ((64, 32, 32, 8, 2), (128, 32, 32, 8, 2), (256, 16, 32, 8, 1))
_ATTN_BWD_DQ_HOPPER_DROPOUT = ((64, 128, 64, 8, 3), (128, 128, 64, 8, 2), (256, 128, 16, 8, 2))
_ATTN_BWD_DQ_AMPERE_DROPOUT = ((64, 64, 32, 8, 2), (128, 64, 32, 8, 2), (256, 32, 32, 8, 1))

# Under the interpreter: one fixed setting per pass (warps and stages are ignored there). The tiles
# are as lopsided as the GPU's (the fixed block twice the streamed one), so CPU tests exercise the
# loop bounds with BLOCK_M != BLOCK_N; 64/32 also keeps the number of Python-level programs low.
_ATTN_INTERPRET_FWD = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
_ATTN_INTERPRET_BWD = dict(
    preprocess=dict(BLOCK_M=64, num_warps=4),
    dkdv=dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=1, SPLIT=1),
    dq=dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
)


# Autotuning on Hopper (kernels/autotune.py): besides each fp16 / bf16 Hopper row above (always the
# first candidate, and the one taken with FASTATTN_AUTOTUNE=0), these settings are timed on the
# first call of each problem key, the fastest kept. Keyed by (pass, dropout, largest BLOCK_D); rows
# read (BLOCK_M, BLOCK_N, num_warps, num_stages). Every one passes the static Hopper gate with every
# feature its row serves (tests/test_hopper_static.py compiles them all: sm90_compile.py --static
# --candidates). Not yet timed on a GPU: which wins is the tuner's to find out.
# Where the default passes the gate, so does each alternate; where the default is an expected
# failure (tests/test_hopper_static.py: a d64 mask's issue:TC, say) an alternate breaks no further
# rule. Alternates that did not hold with every feature their row serves were dropped (the d128
# forward's 128 x 64 tiles: issue:TC 0.68 > 0.6; the d64 forward's 128 x 128 on 4 warps: spills
# with a mask; the d256 forward's 64 x 64 on 1 stage: 12 bytes with a mask on 3.6). The d256
# forward's had all spilled with varlen until the forward wrote out through a tensor descriptor.
# The d64 dK/dV's 64 x 128, once dropped for 4 bytes spilled causal, is the default now: clean
# with q and dO by TMA (3.9), and with pointer tiles on 3.6 (3.9's pointer tiles spill 4 bytes
# with a window, a path no Hopper launch with 3.9 takes); its 3-stage twin spills 12 bytes with a
# bool mask's tile lists (3.9).
# Warp specialisation (tl.range(..., warp_specialize=True) over the unmasked key loop, as Triton's
# tutorial does on Blackwell) is no candidate: compiled for sm_90 it gives the d128 forward the very
# same SASS (registers, loop, issue:TC), and the d64 forward crashes the compiler
# (NVGPUWarpSpecialization), Triton 3.6 and 3.9.
_ATTN_HOPPER_ALTERNATES: dict[tuple[str, bool, int], tuple[tuple[int, ...], ...]] = {
    ("fwd", False, 64): ((128, 128, 8, 2),),
    ("fwd", False, 256): ((128, 64, 8, 2), (64, 32, 4, 2)),
    ("dkdv", False, 64): ((32, 128, 8, 2),),
    ("dq", False, 64): ((128, 64, 8, 3),),
    ("dq", False, 128): ((128, 64, 8, 2), (128, 32, 8, 3)),
}


def _attention_pick(name: str, tables: tuple, head_dim: int, dtype: torch.dtype,
                    device: torch.device, dropout: bool) -> list[dict]:
    """The candidates for pass `name` from its (hopper, ampere, fp32) `tables` for this head dim,
    dtype and GPU: the table row, then on Hopper its autotuning alternates."""
    hopper, ampere, fp32 = tables
    on_hopper = dtype != torch.float32 and arch_major(device) in (9, 10)
    # Hopper (9) and datacenter Blackwell (10) have ~228 KB of shared memory per SM.
    table = fp32 if dtype == torch.float32 else hopper if on_hopper else ampere
    block_d = next_power_of_2(head_dim)
    row_d, *first = next((row for row in table if block_d <= row[0]), table[-1])
    rows = [first, *(_ATTN_HOPPER_ALTERNATES.get((name, dropout, row_d), ()) if on_hopper else ())]
    return [_launch_setting(name, *row) for row in rows]


def _launch_setting(name: str, block_m: int, block_n: int, warps: int, stages: int,
                    split: int = 1) -> dict:
    """A table row as launch keyword arguments; the dK/dV kernel also takes SPLIT (programs per
    key block, each owning 1 / SPLIT of the columns of dK and dV)."""
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    if name == "dkdv":
        cfg["SPLIT"] = split
    return cfg


def attention_fwd_candidates(head_dim: int, dtype: torch.dtype, device: torch.device,
                             dropout: bool = False) -> list[dict]:
    """Launch settings (BLOCK_M, BLOCK_N, num_warps, num_stages) the attention forward kernel may
    take, the default first: one under the interpreter and off Hopper, up to six on Hopper (the
    autotuner picks; kernels/autotune.py).

    head_dim: max(D, Dv), the wider of the query/key and value head dims. dropout: the call has
    dropout (its own tiles).
    """
    if interpreting() or device.type != "cuda":
        return [dict(_ATTN_INTERPRET_FWD)]
    tables = ((_ATTN_FWD_HOPPER_DROPOUT, _ATTN_FWD_AMPERE_DROPOUT, _ATTN_FWD_FP32) if dropout
              else (_ATTN_FWD_HOPPER, _ATTN_FWD_AMPERE, _ATTN_FWD_FP32))
    return _attention_pick("fwd", tables, head_dim, dtype, device, dropout)


# Triton 3.6's ptxas (the GPU image's) crashes (SIGSEGV) compiling the dK/dV kernel that reads q
# and dO through tensor descriptors (its non-causal variants, at every head dim; sm_90 compile of
# the static check), and with descriptors its d256 causal dQ spills 56 bytes; Triton 3.9 compiles
# every variant clean. The backward takes descriptors from this version on, pointer tiles before.
BACKWARD_DESCRIPTORS_FROM = (3, 9)


def attention_descriptors(dtype: torch.dtype, device: torch.device,
                          backward: bool = False) -> bool:
    """Whether the attention forward reads K and V and writes out through tensor descriptors (the
    TMA unit on Hopper and Blackwell: no per-element address arithmetic in the key loop or the
    output's store) rather than pointer tiles, when their strides allow it (the launcher checks);
    with `backward`, whether the backward reads q and dO (dK/dV kernel), K and V (dQ kernel) so,
    which on a GPU also takes a Triton from BACKWARD_DESCRIPTORS_FROM on (the interpreter runs no
    ptxas). fp16 / bf16 only: the fp32 kernels do not use the tensor cores, and their small tiles
    gain nothing from it."""
    if dtype == torch.float32:
        return False
    if interpreting() or device.type != "cuda":
        return True  # as on Hopper (tests run the pointer path too, on the same inputs)
    return arch_major(device) in (9, 10) and (
        not backward or _triton_version() >= BACKWARD_DESCRIPTORS_FROM)


@functools.cache
def _triton_version() -> tuple[int, int]:
    """(major, minor) of the Triton that compiles the kernels."""
    import triton  # here: the other settings are read without importing Triton
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


def attention_bwd_candidates(head_dim: int, dtype: torch.dtype, device: torch.device,
                             dropout: bool = False) -> dict:
    """Launch settings of the three attention backward kernels, as {"preprocess": {BLOCK_M,
    num_warps}, "dkdv": [candidates], "dq": [candidates]}, each candidate with BLOCK_M, BLOCK_N,
    num_warps, num_stages, the default first (as attention_fwd_candidates). head_dim: max(D, Dv);
    dropout: the call has dropout."""
    if interpreting() or device.type != "cuda":
        bwd = _ATTN_INTERPRET_BWD
        return dict(preprocess=dict(bwd["preprocess"]), dkdv=[dict(bwd["dkdv"])],
                    dq=[dict(bwd["dq"])])
    # delta = rowsum(dO * O) is memory bound: about 8K elements of each per program.
    block_m = max(16, min(128, 8192 // next_power_of_2(head_dim)))
    if dropout:
        dkdv = (_ATTN_BWD_DKDV_HOPPER_DROPOUT, _ATTN_BWD_DKDV_AMPERE_DROPOUT, _ATTN_BWD_DKDV_FP32)
        dq = (_ATTN_BWD_DQ_HOPPER_DROPOUT, _ATTN_BWD_DQ_AMPERE_DROPOUT, _ATTN_BWD_DQ_FP32)
    else:
        dkdv = (_ATTN_BWD_DKDV_HOPPER, _ATTN_BWD_DKDV_AMPERE, _ATTN_BWD_DKDV_FP32)
        dq = (_ATTN_BWD_DQ_HOPPER, _ATTN_BWD_DQ_AMPERE, _ATTN_BWD_DQ_FP32)
    return dict(
        preprocess=dict(BLOCK_M=block_m, num_warps=4),
        dkdv=_attention_pick("dkdv", dkdv, head_dim, dtype, device, dropout),
        dq=_attention_pick("dq", dq, head_dim, dtype, device, dropout),
    )


# ---- decoding (attention against a KV cache) ----

_DECODE_MAX_SPLITS = 128


def decode_config(head_dim: int, rows: int, device: torch.device) -> dict:
    """Launch setting of the decode kernel: BLOCK_M packed (query, head) rows of one kv head
    (GQA packing: GROUP * L rows; at least 16, tl.dot's minimum, at most 64), BLOCK_N keys per
    step, warps and stages. head_dim: max(D, Dv); rows: GROUP * L."""
    block_m = min(64, max(16, next_power_of_2(rows)))
    if interpreting() or device.type != "cuda":
        return dict(BLOCK_M=block_m, BLOCK_N=32, num_warps=4, num_stages=1)
    if head_dim <= 128:
        return dict(BLOCK_M=block_m, BLOCK_N=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=2)


def decode_split_count(programs: int, key_blocks: int, sms: int) -> int:
    """How many parts to split each sequence's keys into (flash-decoding), when `programs`
    (batch x kv heads x row blocks) programs without a split would run on `sms` multiprocessors
    and each sequence has `key_blocks` key blocks: 1 when the programs fill the GPU already
    (>= 80% of the SMs), else the smallest split count whose last wave is at least 85% as full
    as the best count's, among counts that change the blocks per split (as flash-attn chooses)."""
    if programs <= 0 or key_blocks <= 1 or programs >= 0.8 * sms:
        return 1
    best, fills = 0.0, {}
    for n in range(1, min(_DECODE_MAX_SPLITS, sms, key_blocks) + 1):
        if n > 1 and -(-key_blocks // n) == -(-key_blocks // (n - 1)):
            continue  # the same blocks per split as n - 1 splits: not a different schedule
        waves = programs * n / sms
        fills[n] = waves / -(-waves // 1)
        best = max(best, fills[n])
    return min(n for n, fill in fills.items() if fill >= 0.85 * best)


def decode_num_splits(num_splits: int, programs: int, key_blocks: int,
                      device: torch.device) -> int:
    """The split count of a decode launch: num_splits (the caller's, 0 = choose) capped at the
    key blocks and _DECODE_MAX_SPLITS, or decode_split_count for the device (sm_count)."""
    if num_splits == 0:
        num_splits = decode_split_count(programs, key_blocks, sm_count(device))
    return max(1, min(num_splits, key_blocks, _DECODE_MAX_SPLITS))


# ---- embedding ----


@dataclass(frozen=True)
class EmbeddingConfig:
    """Tile of the embedding kernels: BLOCK_T tokens x BLOCK_D columns."""

    BLOCK_T: int
    BLOCK_D: int
    num_warps: int


# Widest row the fused (normalizing) embedding keeps whole in registers.
EMBEDDING_MAX_NORM_DIM = 16384


def embedding_config(dim: int, device: torch.device, *, whole_row: bool = False) -> EmbeddingConfig:
    """Gather tile for rows of `dim` columns; whole_row: one column block spans the row (needed
    when the kernel normalizes the row)."""
    cap = EMBEDDING_MAX_NORM_DIM if whole_row else (4096 if interpreting() else 1024)
    block_d = min(max(4, next_power_of_2(dim)), cap)  # >= 4 columns, as norm_config's
    if interpreting():
        return EmbeddingConfig(max(1, min(256, 8192 // block_d)), block_d, 4)
    block_t = max(1, min(16, 4096 // block_d))
    return EmbeddingConfig(block_t, block_d, _norm_warps(block_t * block_d))


def embedding_bwd_config(dim: int, device: torch.device) -> EmbeddingConfig:
    """Segment reduction tile: BLOCK_T tokens of one run of equal indices per step."""
    block_d = min(next_power_of_2(dim), 4096 if interpreting() else 512)
    return EmbeddingConfig(64 if interpreting() else 16, block_d, 4)
