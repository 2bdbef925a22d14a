"""Embedding kernels: the gather forward (one table, or the GPT / BERT sums of several, optionally
normalized and dropped out) and the deterministic segment-reduction backward.

Forward, for T tokens (the flattened index tensor) and rows of D columns:

    h[t]   = word[ids[t]] (+ pos[pos_ids[t]]) (+ type[type_ids[t]])
    out[t] = h[t]                                   (embedding, GPT)
    out[t] = dropout(layer_norm(h[t]))              (BERT; h, mean and rstd kept for the backward)

Backward of one table W (V, D) given the output gradient rows dout (T, D): dW[v] = sum of dout[t]
over the tokens with ids[t] == v. Deterministic, without atomics: the launcher sorts the indices
once (stable), so each index owns a run of consecutive sorted positions; the program at the first
position of a run sums that run in fp32, in order, and writes the row. Runs are walked BLOCK_T
tokens at a time, so a hot index (every token equal) costs one program T / BLOCK_T steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import (COMPILE_OPTIONS, cdiv, device_guard, embedding_bwd_config,
                      embedding_config)
from .layer_norm import _normalize_store, unit_stride
# dropout_keep: Triton's interpreter resolves the globals of the imported _normalize_store here.
from .numerics import dropout_args, dropout_keep, load_seed, round_to, seed_arg  # noqa: F401


@triton.jit
def _gather_add(acc, TABLE, IDS, tokens, cols, mask, n_rows, stride_v, stride_d):
    """acc + TABLE[IDS[tokens], cols] in fp32 (row offsets in int64). An index outside
    [0, n_rows) reads nothing (the public functions refuse such indices before launching; this
    keeps the kernel inside the table when that check is skipped, e.g. under torch.compile)."""
    rows = tl.load(IDS + tokens, mask=tokens >= 0, other=0).to(tl.int64)  # tokens are masked below
    valid = (rows >= 0) & (rows < n_rows)
    offs = rows[:, None] * stride_v + cols[None, :] * stride_d
    return acc + tl.load(TABLE + offs, mask=mask & valid[:, None], other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["dropout_threshold"])  # one compile for every p
def _embedding_fwd_kernel(
    # pointers
    IDS,  # (T,) int32 / int64 word indices, validated in range
    POS_IDS,  # (T,) position indices (HAS_POS)
    TYPE_IDS,  # (T,) token type indices (HAS_TYPE)
    WORD,  # (V, D) word table, any strides
    POS,  # (P, D) position table (HAS_POS)
    TYPE,  # (Y, D) token type table (HAS_TYPE)
    LN_W,  # (D,) LayerNorm weight (HAS_NORM)
    LN_B,  # (D,) LayerNorm bias (HAS_NORM)
    OUT,  # (T, D) output, contiguous
    H,  # (T, D) the summed embedding before the norm, contiguous (HAS_NORM)
    MEAN,  # (T,) fp32 (HAS_NORM)
    RSTD,  # (T,) fp32 (HAS_NORM)
    SEED,  # (1,) int64 dropout seed on the device (HAS_DROPOUT)
    # sizes
    T, D, V, P, Y,
    # strides
    stride_wv, stride_wd, stride_pv, stride_pd, stride_yv, stride_yd,
    # runtime scalars
    eps, dropout_threshold, dropout_scale,  # numerics.dropout_args(p)
    # constexpr flags
    HAS_POS: tl.constexpr, HAS_TYPE: tl.constexpr, HAS_NORM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    # block sizes
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_mask = tokens < T
    mask = token_mask[:, None] & (cols < D)[None, :]
    safe = tl.where(token_mask, tokens, -1)  # -1: not a token, reads index 0
    h = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    h = _gather_add(h, WORD, IDS, safe, cols, mask, V, stride_wv, stride_wd)
    if HAS_POS:
        h = _gather_add(h, POS, POS_IDS, safe, cols, mask, P, stride_pv, stride_pd)
    if HAS_TYPE:
        h = _gather_add(h, TYPE, TYPE_IDS, safe, cols, mask, Y, stride_yv, stride_yd)
    if HAS_NORM:
        # The whole row is in this tile (BLOCK_D >= D): LayerNorm as kernels/layer_norm.py does,
        # on h rounded to the table dtype (what an unfused sum of embeddings would hold).
        h = round_to(h, H.dtype.element_ty).to(tl.float32)
        tl.store(H + tokens[:, None] * D + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
        mean = tl.sum(h, axis=1) / D
        diff = tl.where(mask, h - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / D + eps)
        tl.store(MEAN + tokens, mean, mask=token_mask)
        tl.store(RSTD + tokens, rstd, mask=token_mask)
        seed = load_seed(SEED, HAS_DROPOUT)
        _normalize_store(OUT, LN_W, LN_B, h, mean, rstd, tokens, cols, mask, D, dropout_threshold,
                         dropout_scale, seed, False, True, True, HAS_DROPOUT)
    else:
        tl.store(OUT + tokens[:, None] * D + cols[None, :], round_to(h, OUT.dtype.element_ty),
                 mask=mask)


@triton.jit
def _embedding_bwd_kernel(
    # pointers
    SORTED,  # (T,) int64 indices, sorted ascending (stable)
    PERM,  # (T,) int64 token of each sorted position: SORTED[i] == ids[PERM[i]]
    DOUT,  # (T, D) gradient of the output rows, any strides
    DW,  # (V, D) gradient of the table, contiguous, zero-initialised
    # sizes
    T, D, V,
    # strides
    stride_dt, stride_dd,
    # runtime scalars
    padding_idx,
    # constexpr flags
    HAS_PADDING: tl.constexpr, SCALE_BY_FREQ: tl.constexpr,
    # block sizes
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    idx = tl.load(SORTED + i)
    prev = tl.load(SORTED + i - 1, mask=i > 0, other=-1)
    owns_run = (idx != prev) & (idx >= 0) & (idx < V)  # the first position of a run writes
    if HAS_PADDING:
        owns_run = owns_run & (idx != padding_idx)  # the padding row gets no gradient
    if owns_run:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        count = tl.zeros([1], dtype=tl.int32).sum()  # int32 scalar tensor (loop-carried)
        start = i
        more = i < T
        while more:
            offs = start + tl.arange(0, BLOCK_T)
            same = tl.load(SORTED + offs, mask=offs < T, other=-1) == idx  # a prefix (sorted)
            tokens = tl.load(PERM + offs, mask=same, other=0)
            rows = tl.load(DOUT + tokens[:, None] * stride_dt + cols[None, :] * stride_dd,
                           mask=same[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(rows, axis=0)
            n_same = tl.sum(same.to(tl.int32))
            count += n_same
            more = n_same == BLOCK_T
            start += BLOCK_T
        if SCALE_BY_FREQ:
            acc = acc / count.to(tl.float32)
        tl.store(DW + idx * D + cols, round_to(acc, DW.dtype.element_ty), mask=col_mask)


def embedding_fwd(
    ids: torch.Tensor,  # (T,) int32 / int64
    word: torch.Tensor,  # (V, D)
    pos_ids: torch.Tensor | None,  # (T,)
    pos: torch.Tensor | None,  # (P, D)
    type_ids: torch.Tensor | None,  # (T,)
    type_: torch.Tensor | None,  # (Y, D)
    ln_weight: torch.Tensor | None,  # (D,): given -> the rows are layer-normalized
    ln_bias: torch.Tensor | None,  # (D,)
    eps: float,
    dropout_p: float,
    seed: torch.Tensor | None,  # (1,) int64 on the tables' device when dropout_p > 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns out (T, D) in the table dtype; with a norm also h (T, D), mean (T,) and rstd (T,)
    fp32 (empty otherwise)."""
    # the kernel reads IDS + t, LN_W + d, ...: unit strides (a no-op for contiguous tensors; a
    # (B, 1) batch's default positions arange(1).expand(B, 1) flatten to a stride-0 view)
    ids, pos_ids, type_ids, ln_weight, ln_bias = map(
        unit_stride, (ids, pos_ids, type_ids, ln_weight, ln_bias))
    T, D = ids.shape[0], word.shape[1]
    has_norm = ln_weight is not None
    dev = word.device
    out = torch.empty((T, D), dtype=word.dtype, device=dev)
    h = torch.empty((T, D) if has_norm else (0,), dtype=word.dtype, device=dev)
    mean = torch.empty((T,) if has_norm else (0,), dtype=torch.float32, device=dev)
    rstd = torch.empty_like(mean)
    if T == 0:
        return out, h, mean, rstd
    cfg = embedding_config(D, dev, whole_row=has_norm)
    pos_, type_t = (pos if pos is not None else word), (type_ if type_ is not None else word)
    grid = (cdiv(T, cfg.BLOCK_T), cdiv(D, cfg.BLOCK_D))
    with device_guard(word):
        _embedding_fwd_kernel[grid](
            ids, pos_ids if pos_ids is not None else ids, type_ids if type_ids is not None else ids,
            word, pos_, type_t,
            ln_weight if has_norm else word, ln_bias if has_norm else word,
            out, h, mean, rstd, seed_arg(seed, dropout_p, out),
            T, D, word.shape[0], pos_.shape[0], type_t.shape[0],
            word.stride(0), word.stride(1), pos_.stride(0), pos_.stride(1),
            type_t.stride(0), type_t.stride(1),
            eps, *dropout_args(dropout_p),
            HAS_POS=pos is not None, HAS_TYPE=type_ is not None, HAS_NORM=has_norm,
            HAS_DROPOUT=dropout_p > 0.0,
            BLOCK_T=cfg.BLOCK_T, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps, **COMPILE_OPTIONS,
        )
    return out, h, mean, rstd


def embedding_bwd(
    ids: torch.Tensor,  # (T,) int32 / int64
    dout: torch.Tensor,  # (T, D), any strides
    num_embeddings: int,
    dtype: torch.dtype,
    padding_idx: int,  # -1: none
    scale_grad_by_freq: bool,
) -> torch.Tensor:
    """Gradient of a (num_embeddings, D) table in `dtype`, reduced in fp32, bitwise reproducible."""
    T, D = dout.shape
    dw = torch.zeros((num_embeddings, D), dtype=dtype, device=dout.device)
    if T == 0:
        return dw
    # Sort once; equal indices form runs (a stable sort keeps each run in token order).
    sorted_ids, perm = torch.sort(ids.to(torch.int64), stable=True)
    cfg = embedding_bwd_config(D, dout.device)
    with device_guard(dout):
        _embedding_bwd_kernel[(T, cdiv(D, cfg.BLOCK_D))](
            sorted_ids, perm, dout, dw,
            T, D, num_embeddings,
            dout.stride(0), dout.stride(1),
            padding_idx,
            HAS_PADDING=padding_idx >= 0, SCALE_BY_FREQ=scale_grad_by_freq,
            BLOCK_T=cfg.BLOCK_T, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps, **COMPILE_OPTIONS,
        )
    return dw
