"""Embedding lookup and the fused GPT / BERT input embeddings as differentiable ops.

Layers (see DESIGN.md): public functions (validate, flatten indices) -> _EmbeddingFn (autograd) ->
custom ops fastattn::embedding_fwd / fastattn::embedding_bwd (and fastattn::norm_bwd for the BERT
LayerNorm) -> kernels/embedding.py launchers.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from ._validate import (check_same_device, check_same_dtype, check_tensor, dropout_seed,
                        read_device_values)
from .kernels.configs import EMBEDDING_MAX_NORM_DIM  # configs imports no Triton
from .layer_norm import norm_bwd  # noqa: F401  (registers fastattn::norm_bwd)

INDEX_DTYPES = (torch.int32, torch.int64)

# ---- custom ops: one per launcher, with fake (meta) implementations ----


@torch.library.custom_op("fastattn::embedding_fwd", mutates_args=())
def embedding_fwd(ids: Tensor, word: Tensor, pos_ids: Optional[Tensor], pos: Optional[Tensor],
                  type_ids: Optional[Tensor], type_: Optional[Tensor],
                  ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                  dropout_p: float,
                  seed: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ids, pos_ids, type_ids (T,); tables (rows, D); ln_* (D,) -> out (T, D), and with a norm
    h (T, D), mean (T,), rstd (T,) (empty otherwise)."""
    return _dispatch.launcher("embedding_fwd", "embedding", word)(ids, word, pos_ids, pos, type_ids, type_, ln_weight, ln_bias, eps,
                              dropout_p, seed)


@embedding_fwd.register_fake
def _embedding_fwd_fake(ids, word, pos_ids, pos, type_ids, type_, ln_weight, ln_bias, eps, dropout_p, seed):
    T, D = ids.shape[0], word.shape[1]
    norm = ln_weight is not None
    stat = word.new_empty((T,) if norm else (0,), dtype=torch.float32)
    return (word.new_empty((T, D)), word.new_empty((T, D) if norm else (0,)), stat,
            stat.new_empty(stat.shape))


@torch.library.custom_op("fastattn::embedding_bwd", mutates_args=())
def embedding_bwd(ids: Tensor, dout: Tensor, num_embeddings: int, dtype: torch.dtype,
                  padding_idx: int, scale_grad_by_freq: bool) -> Tensor:
    """ids (T,), dout (T, D) -> the (num_embeddings, D) table gradient in dtype; padding_idx -1:
    none."""
    return _dispatch.launcher("embedding_bwd", "embedding", dout)(ids, dout, num_embeddings, dtype, padding_idx, scale_grad_by_freq)


@embedding_bwd.register_fake
def _embedding_bwd_fake(ids, dout, num_embeddings, dtype, padding_idx, scale_grad_by_freq):
    return dout.new_empty((num_embeddings, dout.shape[1]), dtype=dtype)


# ---- autograd ----


def _embedding_fwd(ids, word, pos_ids, pos, type_ids, type_, ln_weight, ln_bias, eps, dropout_p,
                   seed):
    """fastattn::embedding_fwd (see _dispatch.run)."""
    return _dispatch.run("embedding_fwd", "embedding", word, ids, word, pos_ids, pos, type_ids,
                         type_, ln_weight, ln_bias, eps, dropout_p, seed)


def _embed(ids, word, pos_ids, pos, type_ids, type_, ln_weight, ln_bias, eps, dropout_p, seed,
           padding_idx, scale_grad_by_freq) -> Tensor:
    """ids, pos_ids, type_ids (*) (one shape, or None) -> out (*, D): _EmbeddingFn.apply on the
    flat indices, or the forward launcher alone when no gradient is needed (see
    _dispatch.needs_grad)."""
    shape = (*ids.shape, word.shape[1])
    ids, pos_ids, type_ids = (t if t is None or t.dim() == 1 else t.reshape(-1)  # (*) -> (T,)
                              for t in (ids, pos_ids, type_ids))
    if _dispatch.needs_grad(word, pos, type_, ln_weight, ln_bias):
        return _EmbeddingFn.apply(ids, word, pos_ids, pos, type_ids, type_, ln_weight, ln_bias,
                                  eps, dropout_p, seed, padding_idx, scale_grad_by_freq, shape)
    out = _embedding_fwd(ids, word, pos_ids, pos, type_ids, type_, ln_weight, ln_bias, eps,
                         dropout_p, seed)[0]
    return out.view(shape)


class _EmbeddingFn(torch.autograd.Function):
    """out = [dropout(layer_norm(]word[ids] + pos[pos_ids] + type[type_ids][))] on flat indices (T,),
    returned as `shape` (*, D) (viewed here, outside autograd's graph: a view node there costs as
    much as this op's backward on small inputs).

    Saves the indices, and with a norm h, the norm parameters, mean and rstd."""

    @staticmethod
    def forward(ctx, ids, word, pos_ids, pos, type_ids, type_, ln_weight, ln_bias, eps,
                dropout_p, seed, padding_idx, scale_grad_by_freq, shape):
        out, h, mean, rstd = _embedding_fwd(ids, word, pos_ids, pos, type_ids, type_, ln_weight,
                                            ln_bias, eps, dropout_p, seed)
        ctx.tables = [(t.shape[0], t.dtype) if t is not None else None for t in (word, pos, type_)]
        ctx.dropout_p = dropout_p
        ctx.padding_idx, ctx.scale_grad_by_freq = padding_idx, scale_grad_by_freq
        ctx.save_for_backward(ids, pos_ids, type_ids, h, ln_weight, ln_bias, mean, rstd, seed)
        return out.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        ids, pos_ids, type_ids, h, ln_weight, ln_bias, mean, rstd, seed = ctx.saved_tensors
        dout = dout if dout.dim() == 2 else dout.reshape(-1, dout.shape[-1])  # (*, D) -> (T, D)
        need = ctx.needs_input_grad
        dln_weight = dln_bias = None
        if ln_weight is not None:  # through dropout and the LayerNorm to the summed embedding h
            dh, dln_weight, dln_bias = _dispatch.run(
                "norm_bwd", "layer_norm", h, dout, h, ln_weight, ln_bias, mean, rstd, None, False,
                need[6], need[7] and ln_bias is not None, ctx.dropout_p, seed)
        else:
            dh = dout
        grads = []
        for index, table, padding, needed in (
                (ids, ctx.tables[0], ctx.padding_idx, need[1]),
                (pos_ids, ctx.tables[1], -1, need[3]),
                (type_ids, ctx.tables[2], -1, need[5])):
            grads.append(_dispatch.run(
                "embedding_bwd", "embedding", dh, index, dh, table[0], table[1], padding,
                ctx.scale_grad_by_freq)
                if needed else None)
        return (None, grads[0], None, grads[1], None, grads[2],
                dln_weight if need[6] else None, dln_bias if need[7] else None,
                None, None, None, None, None, None)


# ---- public functions ----


def _check_indices(name: str, ids: Tensor, num_rows: int, table: str) -> None:
    """Integer indices in [0, num_rows). Reading min and max costs a host sync on the GPU: there
    it runs in checking mode only (fastattn.checking; see _validate.read_device_values). Unchecked,
    an index out of range gives a zero row and no gradient (the kernels read and write nothing
    outside the table)."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must hold int32 or int64 indices, got dtype "
                        f"{str(ids.dtype).removeprefix('torch.')}")
    if ids.numel() == 0 or not read_device_values(ids):
        return
    lo, hi = torch.aminmax(ids)
    # one read of both on a GPU (one sync); on the CPU two .item() calls are cheaper
    lo, hi = (lo.item(), hi.item()) if ids.is_cpu else torch.stack([lo, hi]).tolist()
    if lo < 0 or hi >= num_rows:
        raise IndexError(f"{name} holds index {lo if lo < 0 else hi}, out of range for {table} "
                         f"with {num_rows} rows (valid: 0 .. {num_rows - 1})")


def _check_table(name: str, t: Tensor) -> None:
    check_tensor(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_embeddings, embedding_dim), got shape "
                         f"{list(t.shape)}")


def _padding_index(padding_idx: Optional[int], num_rows: int) -> int:
    """padding_idx normalized to 0 .. num_rows - 1 (negative counts from the end); -1 for none."""
    if padding_idx is None:
        return -1
    if not isinstance(padding_idx, int) or not -num_rows <= padding_idx < num_rows:
        raise ValueError(f"padding_idx {padding_idx!r} must be within num_embeddings {num_rows} "
                         f"(-{num_rows} .. {num_rows - 1})")
    return padding_idx % num_rows


def embedding(input: Tensor, weight: Tensor, padding_idx: Optional[int] = None,
              max_norm: Optional[float] = None, norm_type: float = 2.0,
              scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """Drop-in for torch.nn.functional.embedding.

    input: int32 / int64 indices of any shape (*); weight (V, D) fp32 / fp16 / bf16. Returns
    (*, D) in weight's dtype. padding_idx (negative counts from the end) gets no gradient;
    max_norm renormalizes the looked-up rows of weight in place first, as torch does;
    scale_grad_by_freq divides each row's gradient by its index's count in input. The backward
    is a deterministic sort + segment reduction in fp32. sparse=True is refused.
    """
    _check_table("weight", weight)
    V = weight.shape[0]
    check_same_device(input=input, weight=weight)
    _check_indices("input", input, V, "weight")
    if sparse:
        raise ValueError("sparse=True is not supported: fastattn computes dense gradients")
    padding_idx = _padding_index(padding_idx, V)
    if max_norm is not None:  # torch's in-place renorm of the rows input touches, as F.embedding
        with torch.no_grad():
            torch.embedding_renorm_(weight, input.contiguous(), max_norm, norm_type)
    return _embed(input, weight, None, None, None, None, None, None, 0.0, 0.0, None, padding_idx,
                  bool(scale_grad_by_freq))


def _indices_like(name: str, ids: Optional[Tensor], input_ids: Tensor, num_rows: int,
                  table: str, default: str) -> Tensor:
    """ids broadcast to input_ids' shape and checked as _check_indices does; None gives the
    default, "positions" (0 .. N-1 along the last dim) or "zeros", checked from its size alone
    (no device read)."""
    if ids is None:
        n = 1 if default == "zeros" else input_ids.shape[-1] if input_ids.dim() else 1
        if input_ids.numel() and n > num_rows:
            raise IndexError(f"{name} holds index {n - 1} (the default), out of range for {table} "
                             f"with {num_rows} rows (valid: 0 .. {num_rows - 1})")
        if default == "zeros":
            return torch.zeros_like(input_ids)
        return torch.arange(n, device=input_ids.device).expand(input_ids.shape)
    _check_indices(name, ids, num_rows, table)  # before the broadcast: the same values
    try:
        return ids.expand(input_ids.shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {list(ids.shape)} does not broadcast to "
                         f"input_ids' shape {list(input_ids.shape)}") from None


def gpt_embeddings(input_ids: Tensor, wte: Tensor, wpe: Tensor,
                   position_ids: Optional[Tensor] = None) -> Tensor:
    """GPT-2 input embeddings in one kernel: wte[input_ids] + wpe[position_ids].

    input_ids (*, N) int; wte (V, D), wpe (P, D) one dtype; position_ids broadcastable to
    input_ids (default 0 .. N-1). Returns (*, N, D); gradients for both tables.
    """
    _check_table("wte", wte)
    _check_table("wpe", wpe)
    check_same_dtype(wte=wte, wpe=wpe)
    if wpe.shape[1] != wte.shape[1]:
        raise ValueError(f"wpe embedding dim {wpe.shape[1]} must equal wte's {wte.shape[1]}")
    _check_indices("input_ids", input_ids, wte.shape[0], "wte")
    pos = _indices_like("position_ids", position_ids, input_ids, wpe.shape[0], "wpe", "positions")
    check_same_device(input_ids=input_ids, position_ids=pos, wte=wte, wpe=wpe)
    return _embed(input_ids, wte, pos, wpe, None, None, None, None, 0.0, 0.0, None, -1, False)


def bert_embeddings(input_ids: Tensor, word_weight: Tensor, position_weight: Tensor,
                    token_type_weight: Tensor, ln_weight: Tensor, ln_bias: Tensor, *,
                    token_type_ids: Optional[Tensor] = None,
                    position_ids: Optional[Tensor] = None, eps: float = 1e-12,
                    dropout_p: float = 0.0, padding_idx: Optional[int] = None) -> Tensor:
    """BERT input embeddings, forward in one kernel:
    dropout(LayerNorm(word[input_ids] + position[position_ids] + token_type[token_type_ids])).

    input_ids (*, N) int; word (V, D), position (P, D), token_type (Y, D) tables and ln_weight,
    ln_bias (D,), one dtype; D <= 16384. Defaults as Hugging Face's BertEmbeddings: positions
    0 .. N-1, token types 0, eps 1e-12. dropout_p: drawn in the kernel from a seed drawn on the
    tables' device with torch's generator (torch.manual_seed reproduces it; no host sync, so
    torch.compile and CUDA graphs draw a new mask per call or replay). padding_idx: a word row that
    gets no gradient (HF's pad_token_id). Returns (*, N, D); gradients for all five parameters
    (the backward reuses the summed embedding saved by the forward).
    """
    tables = {"word_weight": word_weight, "position_weight": position_weight,
              "token_type_weight": token_type_weight}
    for name, t in tables.items():
        _check_table(name, t)
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        check_tensor(name, t)
    check_same_dtype(**tables, ln_weight=ln_weight, ln_bias=ln_bias)
    D = word_weight.shape[1]
    for name, t in list(tables.items())[1:]:
        if t.shape[1] != D:
            raise ValueError(f"{name} embedding dim {t.shape[1]} must equal word_weight's {D}")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if tuple(t.shape) != (D,):
            raise ValueError(f"{name} must have shape [{D}], got {list(t.shape)}")
    if D > EMBEDDING_MAX_NORM_DIM:
        raise ValueError(f"embedding dim {D} > {EMBEDDING_MAX_NORM_DIM} is not supported by the "
                         "fused BERT embedding")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):  # any float, as F.layer_norm
        raise TypeError(f"eps must be a float, got {type(eps).__name__} {eps!r}")
    seed = dropout_seed(dropout_p, word_weight.device)
    padding_idx = _padding_index(padding_idx, word_weight.shape[0])
    _check_indices("input_ids", input_ids, word_weight.shape[0], "word_weight")
    pos = _indices_like("position_ids", position_ids, input_ids, position_weight.shape[0],
                        "position_weight", "positions")
    types = _indices_like("token_type_ids", token_type_ids, input_ids, token_type_weight.shape[0],
                          "token_type_weight", "zeros")
    check_same_device(input_ids=input_ids, token_type_ids=types, position_ids=pos,
                      word_weight=word_weight, ln_weight=ln_weight)
    return _embed(input_ids, word_weight, pos, position_weight, types, token_type_weight,
                  ln_weight, ln_bias, float(eps), float(dropout_p), seed, padding_idx, False)
