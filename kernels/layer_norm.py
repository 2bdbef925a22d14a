"""LayerNorm and RMSNorm kernels, forward and backward, with an optional fused residual add.

All kernels see the input as a matrix of M rows of N elements (the caller flattens the leading dims
and the normalized dims) and normalize each row:

    h    = x + residual                                (add_layer_norm only; h is also an output)
    mean = sum(h) / N                                  (LayerNorm; RMSNorm has no mean)
    rstd = 1 / sqrt(sum((h - mean)^2) / N + eps)       (RMSNorm: 1 / sqrt(sum(h^2) / N + eps))
    y    = (h - mean) * rstd * weight + bias

Statistics are fp32 and saved for the backward, which with xhat = (h - mean) * rstd and
g = weight * dy computes

    dx = rstd * (g - xhat * sum(g * xhat) / N - sum(g) / N)    (RMSNorm drops the sum(g) term)
    dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy.

dweight and dbias are reduced deterministically: each backward program walks a fixed set of row
tiles and keeps one fp32 row of partial sums; a second kernel sums those rows in a fixed order.

Two tile shapes, picked by kernels.configs.norm_config:
- SINGLE_TILE: a row fits in BLOCK_N columns; BLOCK_M rows are loaded once and kept in registers.
- otherwise (wide rows): one row per program step, walked in chunks of BLOCK_N columns, re-read
  once per pass (forward: mean, variance, output; backward: the two row sums, then dx).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import (COMPILE_OPTIONS, cdiv, column_sum_config, device_guard,
                      next_power_of_2, norm_bwd_programs, norm_config)
from .numerics import dropout_args, dropout_keep, load_seed, round_to, seed_arg


@triton.jit
def _load_f32(PTR, rows, cols, stride_m, stride_n, mask):
    """Load a [rows x cols] tile at PTR[rows * stride_m + cols * stride_n] as fp32 (0 where masked)."""
    offs = rows[:, None] * stride_m + cols[None, :] * stride_n
    return tl.load(PTR + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_norm_input(X, RES, H, rows, cols, mask, N, stride_xm, stride_xn, stride_rm, stride_rn,
                     HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr):
    """The rows to normalize: x, or h = x + residual rounded to the input dtype (and stored to H
    when STORE_H). Later passes over the same rows read h back from H."""
    if HAS_RESIDUAL:
        if STORE_H:
            x = _load_f32(X, rows, cols, stride_xm, stride_xn, mask)
            r = _load_f32(RES, rows, cols, stride_rm, stride_rn, mask)
            h = round_to(x + r, H.dtype.element_ty)
            tl.store(H + rows[:, None] * N + cols[None, :], h, mask=mask)
            return h.to(tl.float32)
        else:
            return _load_f32(H, rows, cols, N, 1, mask)
    else:
        return _load_f32(X, rows, cols, stride_xm, stride_xn, mask)


@triton.jit
def _normalize_store(Y, W, B, x, mean, rstd, rows, cols, mask, N, dropout_threshold, dropout_scale,
                     seed,
                     IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr):
    """y = (x - mean) * rstd * w + b for one tile (then dropout: kept values scaled by 1 / (1 - p),
    the mask numerics.dropout_keep's at (row, col)), stored to Y (contiguous rows of N)."""
    if IS_RMS:
        y = x * rstd[:, None]
    else:
        y = (x - mean[:, None]) * rstd[:, None]
    col_mask = cols < N
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_DROPOUT:
        y = tl.where(dropout_keep(seed, rows, cols, dropout_threshold), y * dropout_scale, 0.0)
    tl.store(Y + rows[:, None] * N + cols[None, :], round_to(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_kernel(
    # pointers
    X,  # (M, N) input rows, any strides
    RES,  # (M, N) residual added to X first, any strides (HAS_RESIDUAL)
    W,  # (N,) weight (HAS_WEIGHT)
    B,  # (N,) bias (HAS_BIAS)
    Y,  # (M, N) output, contiguous
    H,  # (M, N) x + residual, contiguous (HAS_RESIDUAL)
    MEAN,  # (M,) fp32 row means (LayerNorm only)
    RSTD,  # (M,) fp32 row reciprocal standard deviations
    # sizes
    M, N,
    # strides
    stride_xm, stride_xn, stride_rm, stride_rn,
    # runtime scalars
    eps,
    # constexpr flags
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < M
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < N)[None, :]
        x = _load_norm_input(X, RES, H, rows, cols, mask, N, stride_xm, stride_xn, stride_rm,
                             stride_rn, HAS_RESIDUAL, True)
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            var = tl.sum(x * x, axis=1) / N
        else:
            mean = tl.sum(x, axis=1) / N
            diff = tl.where(mask, x - mean[:, None], 0.0)
            var = tl.sum(diff * diff, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        _normalize_store(Y, W, B, x, mean, rstd, rows, cols, mask, N, 0, 1.0, 0, IS_RMS,
                         HAS_WEIGHT, HAS_BIAS, False)
    else:
        # Pass 1: sum(h) for LayerNorm, sum(h^2) for RMSNorm (and h = x + residual stored).
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            x = _load_norm_input(X, RES, H, rows, cols, mask, N, stride_xm, stride_xn, stride_rm,
                                 stride_rn, HAS_RESIDUAL, True)
            if IS_RMS:
                acc += x * x
            else:
                acc += x
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            var = tl.sum(acc, axis=1) / N
        else:
            # Pass 2: variance around the mean (two passes: no cancellation of sum(h^2) - mean^2).
            mean = tl.sum(acc, axis=1) / N
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = row_mask[:, None] & (cols < N)[None, :]
                x = _load_norm_input(X, RES, H, rows, cols, mask, N, stride_xm, stride_xn,
                                     stride_rm, stride_rn, HAS_RESIDUAL, False)
                diff = tl.where(mask, x - mean[:, None], 0.0)
                acc += diff * diff
            var = tl.sum(acc, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        # Last pass: normalize and store.
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (cols < N)[None, :]
            x = _load_norm_input(X, RES, H, rows, cols, mask, N, stride_xm, stride_xn, stride_rm,
                                 stride_rn, HAS_RESIDUAL, False)
            _normalize_store(Y, W, B, x, mean, rstd, rows, cols, mask, N, 0, 1.0, 0, IS_RMS,
                             HAS_WEIGHT, HAS_BIAS, False)
    if not IS_RMS:
        tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _xhat_and_g(X, W, DY, rows, cols, mask, mean, rstd, stride_xm, stride_xn, stride_dym,
                stride_dyn, N, dropout_threshold, dropout_scale, seed, IS_RMS: tl.constexpr,
                HAS_WEIGHT: tl.constexpr,
                HAS_DROPOUT: tl.constexpr):
    """For one tile: dy (through the forward's dropout mask, if any), xhat = (x - mean) * rstd and
    g = weight * dy, all fp32, 0 where masked."""
    x = _load_f32(X, rows, cols, stride_xm, stride_xn, mask)
    dy = _load_f32(DY, rows, cols, stride_dym, stride_dyn, mask)
    if HAS_DROPOUT:
        dy = tl.where(dropout_keep(seed, rows, cols, dropout_threshold), dy * dropout_scale, 0.0)
    if IS_RMS:
        xhat = x * rstd[:, None]
    else:
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_WEIGHT:
        g = dy * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    else:
        g = dy
    return dy, xhat, g


@triton.jit
def _dx_store(DX, DH, dy, xhat, g, c1, c2, rstd, rows, cols, mask, N, stride_dhm, stride_dhn,
              IS_RMS: tl.constexpr, HAS_DH: tl.constexpr):
    """dx = rstd * (g - xhat * c1 - c2) (+ dh, the gradient reaching h directly), stored to DX."""
    if IS_RMS:
        dx = (g - xhat * c1[:, None]) * rstd[:, None]
    else:
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    if HAS_DH:
        dx += _load_f32(DH, rows, cols, stride_dhm, stride_dhn, mask)
    tl.store(DX + rows[:, None] * N + cols[None, :], round_to(dx, DX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["dropout_threshold"])  # one compile for every p
def _norm_bwd_kernel(
    # pointers
    X,  # (M, N) the normalized rows (h = x + residual for add_layer_norm), any strides
    W,  # (N,) weight (HAS_WEIGHT)
    MEAN,  # (M,) fp32 (LayerNorm only)
    RSTD,  # (M,) fp32
    DY,  # (M, N) gradient of the output, any strides
    DH,  # (M, N) gradient reaching h directly, any strides, added to DX (HAS_DH)
    DX,  # (M, N) gradient of the input, contiguous
    DW_PART,  # (G, N) fp32 partial dweight, one row per program (COMPUTE_DW)
    DB_PART,  # (G, N) fp32 partial dbias, one row per program (COMPUTE_DB)
    SEED,  # (1,) int64 seed of the forward's dropout (HAS_DROPOUT)
    # sizes
    M, N,
    # strides
    stride_xm, stride_xn, stride_dym, stride_dyn, stride_dhm, stride_dhn,
    # runtime scalars
    dropout_threshold, dropout_scale,  # numerics.dropout_args(p) of the forward's dropout
    # constexpr flags
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    # block sizes
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    # Program `pid` of G handles row tiles pid, pid + G, pid + 2G, ...: a fixed assignment, so the
    # partial sums (and the final dweight/dbias) are the same on every run.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_tiles = tl.cdiv(M, BLOCK_M)
    part_row = pid.to(tl.int64) * N
    seed = load_seed(SEED, HAS_DROPOUT)
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_N)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for tile in range(pid, n_tiles, n_programs):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_mask = rows < M
            mask = row_mask[:, None] & (cols < N)[None, :]
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            mean = rstd  # unused by RMSNorm
            if not IS_RMS:
                mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            dy, xhat, g = _xhat_and_g(X, W, DY, rows, cols, mask, mean, rstd, stride_xm,
                                      stride_xn, stride_dym, stride_dyn, N, dropout_threshold,
                                      dropout_scale, seed, IS_RMS, HAS_WEIGHT, HAS_DROPOUT)
            c1 = tl.sum(xhat * g, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
            _dx_store(DX, DH, dy, xhat, g, c1, c2, rstd, rows, cols, mask, N, stride_dhm,
                      stride_dhn, IS_RMS, HAS_DH)
            if COMPUTE_DW:
                dw_acc += tl.sum(dy * xhat, axis=0)
            if COMPUTE_DB:
                db_acc += tl.sum(dy, axis=0)
        if COMPUTE_DW:
            tl.store(DW_PART + part_row + cols, dw_acc, mask=cols < N)
        if COMPUTE_DB:
            tl.store(DB_PART + part_row + cols, db_acc, mask=cols < N)
    else:
        # Wide rows: the partial rows live in memory (zeroed by the launcher; each program owns
        # its row, so the read-add-write needs no atomics).
        for tile in range(pid, n_tiles, n_programs):
            rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_mask = rows < M
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            mean = rstd  # unused by RMSNorm
            if not IS_RMS:
                mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            # Pass 1: the row sums c1 = sum(g * xhat) / N and c2 = sum(g) / N.
            acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = row_mask[:, None] & (cols < N)[None, :]
                dy, xhat, g = _xhat_and_g(X, W, DY, rows, cols, mask, mean, rstd, stride_xm,
                                          stride_xn, stride_dym, stride_dyn, N, dropout_threshold,
                                          dropout_scale, seed, IS_RMS, HAS_WEIGHT, HAS_DROPOUT)
                acc1 += xhat * g
                acc2 += g
            c1 = tl.sum(acc1, axis=1) / N
            c2 = tl.sum(acc2, axis=1) / N
            # Pass 2: dx, and this tile's share of dweight / dbias.
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_mask = cols < N
                mask = row_mask[:, None] & col_mask[None, :]
                dy, xhat, g = _xhat_and_g(X, W, DY, rows, cols, mask, mean, rstd, stride_xm,
                                          stride_xn, stride_dym, stride_dyn, N, dropout_threshold,
                                          dropout_scale, seed, IS_RMS, HAS_WEIGHT, HAS_DROPOUT)
                _dx_store(DX, DH, dy, xhat, g, c1, c2, rstd, rows, cols, mask, N, stride_dhm,
                          stride_dhn, IS_RMS, HAS_DH)
                if COMPUTE_DW:
                    dw = tl.load(DW_PART + part_row + cols, mask=col_mask, other=0.0)
                    tl.store(DW_PART + part_row + cols, dw + tl.sum(dy * xhat, axis=0),
                             mask=col_mask)
                if COMPUTE_DB:
                    db = tl.load(DB_PART + part_row + cols, mask=col_mask, other=0.0)
                    tl.store(DB_PART + part_row + cols, db + tl.sum(dy, axis=0), mask=col_mask)


@triton.jit
def _column_sum_kernel(
    # pointers
    PART,  # (K, G, N) fp32 partial sums
    OUT,  # (K, N) fp32 column sums
    # sizes
    G, N,
    # block sizes
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """OUT[k, n] = sum over g of PART[k, g, n], always summed in the same order."""
    k = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for start in range(0, G, BLOCK_G):
        g = start + tl.arange(0, BLOCK_G)
        mask = (g < G)[:, None] & (cols < N)[None, :]
        acc += tl.load(PART + k * G * N + g[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + k * N + cols, tl.sum(acc, axis=0), mask=cols < N)


def unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """A 1-D tensor the kernels can index as t + i: itself when already so (no copy), else a
    contiguous copy (a sliced or expanded parameter, a few N elements)."""
    return t if t is None or t.stride(0) == 1 or t.numel() <= 1 else t.contiguous()


def norm_fwd(
    x: torch.Tensor,  # (M, N), any strides
    weight: torch.Tensor | None,  # (N,)
    bias: torch.Tensor | None,  # (N,)
    residual: torch.Tensor | None,  # (M, N), any strides
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize the rows of x (+ residual). Returns y (M, N) in x.dtype, h = x + residual (M, N)
    (empty without residual), mean (M,) fp32 (empty for RMSNorm) and rstd (M,) fp32."""
    M, N = x.shape
    weight, bias = unit_stride(weight), unit_stride(bias)  # the kernels read W + cols
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    h = torch.empty((M, N) if residual is not None else (0,), dtype=x.dtype, device=x.device)
    mean = torch.empty((0,) if is_rms else (M,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, h, mean, rstd
    cfg = norm_config(N, x.device)
    res = residual if residual is not None else x  # placeholders for absent inputs are never read
    with device_guard(x):
        _norm_fwd_kernel[(cdiv(M, cfg.BLOCK_M),)](
            x, res, weight if weight is not None else x, bias if bias is not None else x,
            y, h, mean, rstd,
            M, N,
            x.stride(0), x.stride(1), res.stride(0), res.stride(1),
            eps,
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, SINGLE_TILE=cfg.SINGLE_TILE,
            num_warps=cfg.num_warps, **COMPILE_OPTIONS,
        )
    return y, h, mean, rstd


def norm_bwd(
    dy: torch.Tensor,  # (M, N), any strides
    x: torch.Tensor,  # (M, N) the normalized rows (h for add_layer_norm), any strides
    weight: torch.Tensor | None,  # (N,)
    bias: torch.Tensor | None,  # (N,) only its dtype is used (for dbias)
    mean: torch.Tensor,  # (M,) fp32, empty for RMSNorm
    rstd: torch.Tensor,  # (M,) fp32
    dh: torch.Tensor | None,  # (M, N) gradient reaching h directly, any strides
    is_rms: bool,
    compute_dweight: bool,
    compute_dbias: bool,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,  # (1,) int64 on x's device when dropout_p > 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx (M, N) in x.dtype, dweight (N,) in weight's dtype and dbias (N,) in bias's dtype
    (each empty when not asked for). dropout_p > 0: the forward output went through dropout drawn
    with dropout_seed at (row, col) (numerics.dropout_keep, as the fused BERT embedding does); dy
    is masked and rescaled the same way first."""
    M, N = x.shape
    weight = unit_stride(weight)  # the kernels read W + cols
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    cfg = norm_config(N, x.device, backward=True)
    n_programs = norm_bwd_programs(cdiv(M, cfg.BLOCK_M), x.device)
    n_parts = int(compute_dweight) + int(compute_dbias)
    # Partial sums (dweight and/or dbias, programs, N); the wide-row path accumulates in place.
    part = (torch.empty if cfg.SINGLE_TILE else torch.zeros)(
        (n_parts, n_programs, N), dtype=torch.float32, device=x.device)
    sums = torch.zeros((n_parts, N), dtype=torch.float32, device=x.device)
    if M > 0:
        dh_ = dh if dh is not None else dy
        with device_guard(x):
            _norm_bwd_kernel[(n_programs,)](
                x, weight if weight is not None else x, mean if not is_rms else rstd, rstd,
                dy, dh_, dx,
                part[0] if compute_dweight else part, part[n_parts - 1] if compute_dbias else part,
                seed_arg(dropout_seed, dropout_p, x),
                M, N,
                x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dh_.stride(0), dh_.stride(1),
                *dropout_args(dropout_p),
                IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_DH=dh is not None,
                COMPUTE_DW=compute_dweight, COMPUTE_DB=compute_dbias,
                HAS_DROPOUT=dropout_p > 0.0,
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, SINGLE_TILE=cfg.SINGLE_TILE,
                num_warps=cfg.num_warps, **COMPILE_OPTIONS,
            )
            if n_parts > 0:
                block_n = column_sum_config(N, x.device)
                _column_sum_kernel[(cdiv(N, block_n), n_parts)](
                    part, sums, n_programs, N,
                    BLOCK_G=min(16, next_power_of_2(n_programs)), BLOCK_N=block_n,
                    **COMPILE_OPTIONS,
                )
    # Separate tensors (a custom op's outputs may not alias each other), in the parameters' dtypes.
    dweight = sums[0].to(weight.dtype, copy=True) if compute_dweight else x.new_empty((0,))
    dbias = sums[n_parts - 1].to(bias.dtype, copy=True) if compute_dbias else x.new_empty((0,))
    return dx, dweight, dbias
