"""Fused scaled-dot-product attention (FlashAttention-2) as a differentiable op, with attention
masks, dropout, and packed variable-length batches.

Layers (see DESIGN.md): scaled_dot_product_attention (validate, flatten batch dims) -> _AttentionFn
(autograd) -> custom ops fastattn::attention_fwd / fastattn::attention_bwd (dispatch) ->
kernels/attention.py launchers; varlen_attention -> _VarlenAttentionFn ->
fastattn::varlen_attention_fwd / _bwd -> the same kernels. unpad / pad convert a padded batch to the
packed layout and back.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from ._validate import (check_dropout_p, check_same_device, check_same_dtype, check_tensor,
                        dropout_seed, read_device_values)

MAX_HEAD_DIM = 256

# ---- custom ops: one per launcher, with fake (meta) implementations ----


@torch.library.custom_op("fastattn::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool,
                  attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                  seed: Optional[Tensor] = None,
                  residual: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), attn_mask broadcastable to
    (B, Hq, L, S) -> out (B, Hq, L, Ev), lse (B, Hq, L) fp32, out_lo: with residual (a backward
    follows) and fp16 / bf16 inputs out's rounding residual shaped as out, else empty. seed: the
    dropout seed, (1,) int64 on q's device (see _validate.dropout_seed), None when dropout_p == 0."""
    return _dispatch.launcher("attention_fwd", "attention", q)(q, k, v, scale, is_causal, attn_mask, dropout_p, seed, residual)


def _residual_like(out: Tensor, residual: bool) -> Tensor:
    """Fake out_lo: shaped as out when the launcher stores one (the Triton launchers, for fp16 /
    bf16; see kernels/attention.py attention_fwd), else empty (fastattn.torch_path)."""
    keep = (residual and out.dtype != torch.float32 and out.numel() > 0
            and _dispatch.backend(out) != _dispatch.TORCH)
    return out.new_empty(out.shape if keep else (0,))


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, scale, is_causal, attn_mask=None, dropout_p=0.0, seed=None, residual=False):
    B, Hq, L, _ = q.shape
    out = q.new_empty((B, Hq, L, v.shape[-1]))
    if k.shape[2] == 0:  # no keys: the launcher stores no residual
        residual = False
    return out, q.new_empty((B, Hq, L), dtype=torch.float32), _residual_like(out, residual)


@torch.library.custom_op("fastattn::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float, is_causal: bool, attn_mask: Optional[Tensor] = None,
                  dropout_p: float = 0.0, seed: Optional[Tensor] = None,
                  mask_grad: bool = False, out_lo: Optional[Tensor] = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """do, out (B, Hq, L, Ev); lse (B, Hq, L); out_lo as attention_fwd returned it -> dq, dk, dv
    shaped as q, k, v, and the gradient of the float attn_mask (shaped as it) when mask_grad,
    else an empty tensor."""
    return _dispatch.launcher("attention_bwd", "attention", q)(do, q, k, v, out, lse, scale, is_causal, attn_mask, dropout_p, seed,
                              mask_grad, out_lo)


@attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, out, lse, scale, is_causal, attn_mask=None, dropout_p=0.0, seed=None,
      mask_grad=False, out_lo=None):
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


@torch.library.custom_op("fastattn::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                         cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                         is_causal: bool, dropout_p: float, seed: Optional[Tensor],
                         residual: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """q (Tq, Hq, E), k (Tk, Hkv, E), v (Tk, Hkv, Ev), cu_seqlens (B + 1,) int32 ->
    out (Tq, Hq, Ev), lse (Hq, Tq) fp32, out_lo (as attention_fwd)."""
    return _dispatch.launcher("varlen_attention_fwd", "attention", q)(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, scale, is_causal, dropout_p, seed, residual)


@varlen_attention_fwd.register_fake
def _varlen_attention_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal,
      dropout_p, seed, residual=False):
    Tq, Hq, _ = q.shape
    out = q.new_empty((Tq, Hq, v.shape[-1]))
    return out, q.new_empty((Hq, Tq), dtype=torch.float32), _residual_like(out, residual)


@torch.library.custom_op("fastattn::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                         max_seqlen_k: int, scale: float, is_causal: bool, dropout_p: float,
                         seed: Optional[Tensor], out_lo: Optional[Tensor] = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """do, out (Tq, Hq, Ev); lse (Hq, Tq); out_lo as the forward returned it -> dq, dk, dv shaped
    as q, k, v."""
    return _dispatch.launcher("varlen_attention_bwd", "attention", q)(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, scale, is_causal, dropout_p, seed,
                                     out_lo)


@varlen_attention_bwd.register_fake
def _varlen_attention_bwd_fake(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      is_causal, dropout_p, seed, out_lo=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---- autograd ----


def _attention_fwd(q, k, v, attn_mask, scale, is_causal, dropout_p, seed, residual):
    """fastattn::attention_fwd (see _dispatch.run), argument order as _AttentionFn's."""
    return _dispatch.run("attention_fwd", "attention", q, q, k, v, scale, is_causal, attn_mask,
                         dropout_p, seed, residual)


class _AttentionFn(torch.autograd.Function):
    """out, lse = attention(q, k, v, attn_mask) on (B, H, N, D) tensors. Saves q, k, v, out, lse,
    the mask and (fp16 / bf16) out's rounding residual, from which the backward's delta is exact;
    the dropout mask is not saved but redrawn from the seed. lse is returned for merging partial
    attentions; it carries no gradient. A float attn_mask that requires grad gets one."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, scale, is_causal, dropout_p, seed):
        needs_grad = any(ctx.needs_input_grad[:4])
        out, lse, out_lo = _attention_fwd(q, k, v, attn_mask, scale, is_causal, dropout_p, seed,
                                          needs_grad)
        ctx.mark_non_differentiable(lse)
        ctx.scale, ctx.is_causal, ctx.dropout_p = scale, is_causal, dropout_p
        ctx.mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
        if needs_grad:
            ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed, out_lo)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, attn_mask, seed, out_lo = ctx.saved_tensors
        dq, dk, dv, dmask = _dispatch.run(
            "attention_bwd", "attention", q, dout, q, k, v, out, lse, ctx.scale, ctx.is_causal, attn_mask, ctx.dropout_p, seed,
            ctx.mask_grad, out_lo)
        return dq, dk, dv, dmask if ctx.mask_grad else None, None, None, None, None


class _VarlenAttentionFn(torch.autograd.Function):
    """out, lse = attention over packed sequences (T, H, D). Saves q, k, v, out, lse, the
    cu_seqlens and out's rounding residual (as _AttentionFn); lse carries no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                is_causal, dropout_p, seed):
        needs_grad = any(ctx.needs_input_grad[:3])
        out, lse, out_lo = _dispatch.run(
            "varlen_attention_fwd", "attention", q, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal,
            dropout_p, seed, needs_grad)
        ctx.mark_non_differentiable(lse)
        ctx.args = (max_seqlen_q, max_seqlen_k, scale, is_causal, dropout_p)
        if needs_grad:
            ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed, out_lo)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed, out_lo = ctx.saved_tensors
        dq, dk, dv = _dispatch.run(
            "varlen_attention_bwd", "attention", q, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args, seed, out_lo)
        return dq, dk, dv, *([None] * 8)


# ---- validation ----


def _check_qkv(query: Tensor, key: Tensor, value: Tensor, packed: bool) -> None:
    """Tensors of a kernel dtype, one device, one dtype; 3-D if packed, else at least 2-D."""
    layout = ("3 dims (tokens, heads, head_dim)" if packed
              else "at least 2 dims (..., seq, head_dim)")
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
        if t.dim() != 3 if packed else t.dim() < 2:
            raise ValueError(f"{name} must have {layout}, got shape {list(t.shape)}")
    if not query.device == key.device == value.device:
        check_same_device(query=query, key=key, value=value)
    if not query.dtype == key.dtype == value.dtype:
        check_same_dtype(query=query, key=key, value=value)


def _check_heads(E: int, Ek: int, Ev: int, Hq: int, Hk: int, Hv: int, enable_gqa: bool) -> None:
    """Head dims (query E, key Ek, value Ev) and head counts (Hq, Hk, Hv) the kernels support."""
    if Ek != E:
        raise ValueError(f"key head dim {Ek} must equal query head dim {E}")
    for name, d in (("query/key", E), ("value", Ev)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} head dim {d} is not supported: must be in 1..{MAX_HEAD_DIM}")
    if Hv != Hk:
        raise ValueError(f"key and value must have the same number of heads, got key {Hk} and "
                         f"value {Hv}")
    if Hq != Hk and not enable_gqa:
        raise ValueError(f"query has {Hq} heads and key/value {Hk}: different head counts need "
                         "enable_gqa=True")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of key/value heads {Hk} (GQA)")


def _check_scale(scale, head_dim: int) -> float:
    """The softmax scale: 1 / sqrt(head_dim) for None, else a finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _broadcast(what: str, shapes: dict[str, tuple[int, ...]], hint: str = "") -> tuple[int, ...]:
    """torch's broadcast of the given dims (in plain Python: torch.broadcast_shapes costs tens of
    µs), or a ValueError naming every tensor's dims."""
    first, *rest = shapes.values()
    if all(s == first for s in rest):
        return tuple(first)
    out = [1] * max(len(s) for s in shapes.values())
    for s in shapes.values():
        for i, n in enumerate(s, len(out) - len(s)):
            if n != out[i] and n != 1 and out[i] != 1:
                given = ", ".join(f"{name} {list(s)}" for name, s in shapes.items())
                raise ValueError(f"the {what} of query, key and value must broadcast together, "
                                 f"got {given}{hint}")
            out[i] = n if out[i] == 1 else out[i]
    return tuple(out)


def _attention_shapes(query: Tensor, key: Tensor, value: Tensor,
                      enable_gqa: bool) -> tuple[tuple[int, ...], int, int]:
    """Check q (..., Hq, L, E), k (..., Hkv, S, E), v (..., Hkv, S, Ev) as torch does and return
    (batch, Hq, Hkv): the broadcast batch dims and the head counts. A 2-D tensor (N, D) has one
    head. Without enable_gqa every dim before the last two broadcasts (heads too, Hq == Hkv after
    it); with it the heads are dim -3 (Hq a multiple of Hkv) and the dims before them broadcast."""
    _check_qkv(query, key, value, packed=False)
    qs, ks, vs = query.shape, key.shape, value.shape
    if ks[-2] != vs[-2]:
        raise ValueError(f"key and value must have the same sequence length, got key "
                         f"{ks[-2]} and value {vs[-2]}")
    # (N, D) -> (1, N, D): one head
    shapes = {"query": qs[:-2] or (1,), "key": ks[:-2] or (1,), "value": vs[:-2] or (1,)}
    if enable_gqa:
        batch = _broadcast("batch dims (before the heads)", {n: s[:-1] for n, s in shapes.items()})
        Hq, Hk, Hv = (s[-1] for s in shapes.values())
    else:
        lead = _broadcast("batch and head dims", shapes,
                          " (query heads a multiple of key/value heads need enable_gqa=True)")
        batch, Hq = lead[:-1], lead[-1]
        Hk = Hv = Hq
    _check_heads(qs[-1], ks[-1], vs[-1], Hq, Hk, Hv, True)
    return batch, Hq, Hk


def _attention_mask(attn_mask: Optional[Tensor], query: Tensor,
                    full: tuple[int, ...]) -> Optional[Tensor]:
    """attn_mask checked against the full score shape (*batch, Hq, L, S) and returned as a view
    (*batch, H', L', S') (H', L', S' its own sizes, 1 or full; stride 0 on broadcast batch dims):
    nothing is copied. Differentiable: autograd sums its gradient back over the broadcast."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, query.dtype):
        got, want = (str(d).removeprefix("torch.") for d in (attn_mask.dtype, query.dtype))
        raise TypeError(f"attn_mask has dtype {got}; it must be bool (True = takes part) or, as "
                        f"an additive mask, the query's dtype {want}")
    check_same_device(query=query, attn_mask=attn_mask)
    if attn_mask.dim() > len(full) or any(
            m not in (1, f) for m, f in zip(reversed(attn_mask.shape), reversed(full))):
        raise ValueError(f"attn_mask of shape {list(attn_mask.shape)} does not broadcast to "
                         f"(..., Hq, L, S) = {list(full)}")
    mask = attn_mask[(None,) * (len(full) - attn_mask.dim())]  # one dim per dim of `full`
    return _expand(mask, (*full[:-3], *mask.shape[-3:]))


def _expand(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """t.expand(shape), or t itself when it has that shape already (an expand costs µs)."""
    return t if t.shape == shape else t.expand(shape)


def _merge_batch(t: Tensor, n_batch: int) -> Optional[Tensor]:
    """t (*batch, H, N, D) as a (B, H, N, D) view, B = prod(batch), or None where the batch dims'
    strides do not merge into one (e.g. one broadcast, stride 0, and one not)."""
    batch = t.shape[:n_batch]
    dims = [(n, s) for n, s in zip(batch, t.stride()[:n_batch]) if n != 1]
    if any(outer != inner * n for (_, outer), (n, inner) in zip(dims, dims[1:])):
        return None
    return t.reshape(math.prod(batch), *t.shape[n_batch:])  # a view: the strides merge


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], n_batch: int,
               scale: float, is_causal: bool, dropout_p: float) -> tuple[Tensor, Tensor]:
    """Attention on q (*batch, Hq, L, E), k, v (*batch, Hkv, S, E / Ev), mask (*batch, H', L', S')
    or None, all with the same n_batch batch dims (views: stride 0 where broadcast) -> out
    (*batch, Hq, L, Ev), lse (*batch, Hq, L). One launch over the merged batch when the batch
    dims' strides merge for every tensor; else one call per index of the first batch dim."""
    batch = q.shape[:n_batch]
    if n_batch == 1:  # already (B, H, N, D)
        merged = [q, k, v, mask]
    else:
        merged = [_merge_batch(t, n_batch) if t is not None else None for t in (q, k, v, mask)]
    if all(m is not None for m, t in zip(merged, (q, k, v, mask)) if t is not None):
        seed = dropout_seed(dropout_p, q.device) if dropout_p else None
        if _dispatch.needs_grad(*merged):
            out, lse = _AttentionFn.apply(*merged, scale, is_causal, dropout_p, seed)
        else:
            out, lse, _ = _attention_fwd(*merged, scale, is_causal, dropout_p, seed, False)
        if n_batch == 1:
            return out, lse
        # (B, Hq, L, Ev) -> (*batch, Hq, L, Ev)
        return out.view(*batch, *out.shape[1:]), lse.view(*batch, *lse.shape[1:])
    parts = [_attention(q[i], k[i], v[i], None if mask is None else mask[i], n_batch - 1, scale,
                        is_causal, dropout_p) for i in range(batch[0])]
    return torch.stack([o for o, _ in parts]), torch.stack([l for _, l in parts])


# ---- public functions ----


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, return_lse: bool = False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, FlashAttention-2 in Triton.

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev), at least 2-D, fp32 /
    fp16 / bf16, one dtype, any strides (Hugging Face's (B, N, H, D).transpose(1, 2) views are read
    in place). The leading dims broadcast together as in torch (q (H, L, E) with k, v
    (B, H, S, E), q (B, 1, L, E) with k, v (B, H, S, E), ...): read through stride-0 views, never
    copied; gradients are summed over the broadcast dims. E, Ev <= 256. scale defaults to
    1 / sqrt(E). is_causal: query i sees keys j <= i (the top-left tril of the L x S matrix, as
    torch). enable_gqa: dim -3 holds the heads, Hq a multiple of Hkv, query head h reads kv head
    h // (Hq // Hkv) (the dims before the heads broadcast).

    attn_mask: broadcastable to (..., Hq, L, S) as torch allows ((L, S), (B, 1, 1, S),
    (B, 1, L, S), (1, Hq, L, S), (B, Hq, L, S), ...); bool (True = takes part) or the query's
    floating dtype (added to the scores; -inf hides a pair). It is read tile by tile through its
    strides, never expanded or copied, and applies together with is_causal. A boolean key padding
    mask (B, 1, 1, S) skips fully padded key blocks. A query row that sees no key gets output 0
    and zero gradients (never NaN), as torch's own function; finite "masking" values such as
    torch.finfo(dtype).min are ordinary biases (such a row gets uniform attention, as in torch).
    A float mask that requires grad gets its gradient (dS, summed over its broadcast dims; this
    costs a (B, Hq, L, S) fp32 buffer during the backward).

    dropout_p: in [0, 1]; dropout on the attention probabilities inside the kernel (kept values
    scaled by 1 / (1 - dropout_p)), whenever dropout_p > 0, as torch's function (pass 0.0 in eval).
    The mask is drawn in the kernel from a seed drawn on the inputs' device with torch's generator,
    so torch.manual_seed reproduces it, torch.compile keeps it in its graph and a captured CUDA
    graph draws a new mask on every replay; the backward redraws the same mask. (Not the same
    random numbers as torch's dropout.) Each (batch, head, query, key) gets its own random number
    while L * S <= 2^32.

    Returns out (..., Hq, L, Ev) in the input dtype, its leading dims the broadcast ones (as torch:
    (L, Ev) for 2-D inputs); with return_lse=True, (out, lse) where lse (..., Hq, L) fp32 is the
    natural-log logsumexp of the (masked) scaled scores of each query row (-inf for a row that
    sees no key), without gradient.
    """
    batch, Hq, Hkv = _attention_shapes(query, key, value, enable_gqa)
    scale = _check_scale(scale, query.shape[-1])
    L, S = query.shape[-2], key.shape[-2]
    mask = _attention_mask(attn_mask, query, (*batch, Hq, L, S))
    check_dropout_p(dropout_p)  # the seed is drawn per launch
    # (..., N, D) -> (*batch, H, N, D): stride-0 views on the broadcast dims
    q = _expand(query, (*batch, Hq, L, query.shape[-1]))
    k = _expand(key, (*batch, Hkv, S, key.shape[-1]))
    v = _expand(value, (*batch, Hkv, S, value.shape[-1]))
    out, lse = _attention(q, k, v, mask, len(batch), scale, bool(is_causal), float(dropout_p))
    if max(query.dim(), key.dim(), value.dim()) == 2:  # (1, L, Ev) -> (L, Ev), as torch
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


# ---- variable-length (packed) batches ----


def _check_cu_seqlens(name: str, cu_seqlens, total: int, max_name: str, max_seqlen,
                      query: Tensor) -> None:
    """cu_seqlens: int32 (B + 1,) on query's device, from 0, non-decreasing, ending at `total`;
    max_seqlen an int >= its longest sequence. Reading cu_seqlens costs a host sync on the GPU: there
    it runs in checking mode only (fastattn.checking; see _validate.read_device_values), and the
    caller vouches for cu_seqlens, as with flash-attn's varlen functions. Unchecked, the kernels
    clamp each sequence to the packed rows (nothing is read or written out of bounds; a wrong
    cu_seqlens gives wrong rows, and rows past max_seqlen are not computed)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must hold int32 offsets, got dtype "
                        f"{str(cu_seqlens.dtype).removeprefix('torch.')}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError(f"{name} must be 1-D (batch + 1,), got shape {list(cu_seqlens.shape)}")
    check_same_device(query=query, **{name: cu_seqlens})
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise ValueError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if not read_device_values(cu_seqlens):
        return
    offsets = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at the number of packed tokens {total}, got "
                         f"{offsets[-1]}")
    if max(lengths, default=0) > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is shorter than the longest sequence in {name} "
                         f"({max(lengths)})")


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     dropout_p: float = 0.0, scale: Optional[float] = None,
                     return_lse: bool = False):
    """Attention over a packed batch of variable-length sequences (FlashAttention's varlen API).

    q (Tq, Hq, E), k (Tk, Hkv, E), v (Tk, Hkv, Ev): the tokens of all sequences one after another,
    fp32 / fp16 / bf16, one dtype, any strides, E, Ev <= 256, Hq a multiple of Hkv (GQA: query
    head h reads kv head h // (Hq // Hkv)). cu_seqlens_q / cu_seqlens_k (B + 1,) int32: cumulative
    lengths, 0 = cu[0] <= cu[1] <= ... <= cu[B] = Tq / Tk; sequence b is q[cu_q[b]:cu_q[b + 1]]
    attending to k, v[cu_k[b]:cu_k[b + 1]] only. max_seqlen_q / _k: ints at least the longest
    sequence (they size the launch grid). causal: query i of a sequence sees its keys j <= i
    (top-left aligned, as is_causal). dropout_p, scale: as in scaled_dot_product_attention. A query
    with no key (an empty key sequence) gets output 0.

    Returns out (Tq, Hq, Ev) in the input dtype; with return_lse=True, (out, lse) with lse
    (Hq, Tq) fp32, without gradient. Use unpad / pad to run a padded (B, N, ...) batch this way.
    """
    _check_qkv(q, k, v, packed=True)
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"key and value must hold the same number of tokens, got key "
                         f"{k.shape[0]} and value {v.shape[0]}")
    _check_heads(q.shape[2], k.shape[2], v.shape[2], q.shape[1], k.shape[1], v.shape[1], True)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q, q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k, q)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"sequences, got {cu_seqlens_q.numel() - 1} and "
                         f"{cu_seqlens_k.numel() - 1}")
    scale = _check_scale(scale, q.shape[-1])
    seed = dropout_seed(dropout_p, q.device)
    q, k, v, cu_seqlens_q, cu_seqlens_k = _distinct(q, k, v, cu_seqlens_q, cu_seqlens_k)
    out, lse = _VarlenAttentionFn.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, scale, bool(causal), float(dropout_p), seed)
    return (out, lse) if return_lse else out


def _distinct(*tensors: Tensor) -> list[Tensor]:
    """The tensors, a repeated one replaced by a view of it: torch.compile cannot trace an
    autograd.Function given one tensor as two inputs (self-attention's q = k = v, or one cu_seqlens
    for queries and keys); a view is another tensor, and gradients through it reach the original."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        out.append(t.view_as(t) if id(t) in seen else t)
        seen.add(id(t))
    return out


def unpad(x: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Pack the real tokens of a padded batch, for varlen_attention.

    x (B, N, ...); padding_mask (B, N) bool or integer, True / nonzero = a real token (Hugging
    Face's attention_mask). Returns packed (T, ...) the real tokens in order (differentiable in x),
    indices (T,) int64 their positions in the flattened (B * N) batch, cu_seqlens (B + 1,) int32 and
    max_seqlen (int; reading it is one device sync).
    """
    if not isinstance(x, Tensor) or not isinstance(padding_mask, Tensor):
        raise TypeError("unpad expects tensors x (B, N, ...) and padding_mask (B, N)")
    if padding_mask.dtype.is_floating_point or padding_mask.dtype.is_complex:
        raise TypeError(f"padding_mask must be bool or integer, got dtype "
                        f"{str(padding_mask.dtype).removeprefix('torch.')}")
    if x.dim() < 2 or padding_mask.shape != x.shape[:2]:
        raise ValueError(f"padding_mask of shape {list(padding_mask.shape)} must be x's first two "
                         f"dims (B, N) = {list(x.shape[:2])}")
    check_same_device(x=x, padding_mask=padding_mask)
    real = padding_mask.bool()  # (B, N)
    seqlens = real.sum(dim=1, dtype=torch.int32)  # (B,)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    indices = real.flatten().nonzero().flatten()  # (T,)
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    return x.flatten(0, 1)[indices], indices, cu_seqlens, max_seqlen


def pad(packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Inverse of unpad: packed (T, ...) and indices (T,) -> (batch, seqlen, ...) with zeros at the
    padding positions (differentiable in packed)."""
    out = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    return out.index_copy(0, indices, packed).view(batch, seqlen, *packed.shape[1:])
