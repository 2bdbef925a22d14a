"""The launchers' contract (fastattn.kernels' *_fwd / *_bwd functions) on torch's own ops, for
tensors Triton does not run on (CPU without TRITON_INTERPRET, meta, ...).

Each launcher runs torch's fused op where its semantics are fastattn's, and a short torch
composition where they are not:

    attention_fwd / _bwd     aten._scaled_dot_product_flash_attention_for_cpu (+ _backward); GQA
                             native; Ev != E by zero-padding the shorter head dim; bool masks as
                             additive 0 / -inf; rows that see no key fixed up to lse -inf.
                             Dropout, the float-mask gradient and the score modifiers (window,
                             bottom-right alignment, softcap, ALiBi, sinks): a fp32 composition
                             (_Composed).
    varlen_attention_*       the same, one call per packed sequence.
    kvcache_attention_fwd    reference.rotary / kvcache_append on the caches, then attention_fwd
                             on each sequence's cache rows.
    norm_fwd / norm_bwd      torch.native_layer_norm (+ native_layer_norm_backward),
                             torch._fused_rms_norm where present; the RMSNorm backward composed.
    embedding_fwd / _bwd     F.embedding, fp32 sums, the norm above; aten.embedding_dense_backward
                             accumulating in fp32.

Dropout masks come from reference.dropout_keep(seed, shape), so a backward redraws its forward's.
The attention forward never stores out's rounding residual here: out_lo is always empty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import _kept_scale, dropout_keep, kvcache_append, kvcache_keys, rotary

_NEG_INF = float("-inf")
_HALF = (torch.float16, torch.bfloat16)

# ---- attention ----

_FLASH_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _additive(attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """attn_mask as the fused op takes it: a float mask as is, a bool one (True = takes part) as
    0 / -inf in `dtype`, shaped as the mask."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype).masked_fill_(~attn_mask, _NEG_INF)


def _unseen_rows(attn_mask: Tensor, is_causal: bool, L: int) -> Tensor:
    """Bool (B, H', L'), broadcastable to lse (B, Hq, L): the query rows that see no key (S > 0).
    Without is_causal a row sees a key iff its mask row has a visible entry; with it, iff some
    key j <= i of its mask row is visible (read from a running count)."""
    visible = attn_mask if attn_mask.dtype == torch.bool else attn_mask != _NEG_INF
    if not is_causal:
        return ~visible.any(dim=-1)
    seen_by = visible.cumsum(dim=-1) > 0  # (B, H', L', S): some key j' <= j is visible
    # row i's last key, as a column of the mask (its only one where S' == 1)
    last = torch.arange(L, device=attn_mask.device).clamp_(max=attn_mask.shape[-1] - 1)
    rows = torch.arange(L, device=attn_mask.device) if attn_mask.shape[-2] == L else 0
    return ~seen_by[..., rows, last]


def _pad_head(t: Tensor, d: int) -> Tensor:
    """t (..., D) zero-padded to (..., d): the fused op wants one head dim for q, k and v; zero
    columns change neither the scores (q, k) nor the output's first columns (v)."""
    return t if t.shape[-1] == d else F.pad(t, (0, d - t.shape[-1]))


def _positive_scale(q: Tensor, scale: float) -> tuple[Tensor, float]:
    """(q, scale) with scale >= 0: q.k * s == (-q).k * (-s). torch's fused CPU op returns NaN for
    a negative scale with is_causal (torch 2.13); the gradient through -q is minus dq."""
    return (q.neg(), -scale) if scale < 0 else (q, scale)


def _no_keys(q: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """out 0, lse -inf: attention with L == 0 or S == 0 (the fused op refuses empty sizes)."""
    B, Hq, L, _ = q.shape
    lse = torch.full((B, Hq, L), _NEG_INF, dtype=torch.float32, device=q.device)
    return q.new_zeros((B, Hq, L, v.shape[-1])), lse, q.new_empty((0,))


def _has_mods(is_causal, window_left, window_right, bottom_right, softcap, alibi, sinks) -> bool:
    """Whether a call has score modifiers (which only _Composed applies; bottom_right changes
    is_causal, and the window and ALiBi, which are modifiers themselves)."""
    return (window_left >= 0 or window_right >= 0 or softcap > 0.0 or alibi is not None
            or sinks is not None or (bottom_right and is_causal))


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool,
                  attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                  seed: Tensor | None = None, residual: bool = False, window_left: int = -1,
                  window_right: int = -1, bottom_right: bool = False, softcap: float = 0.0,
                  alibi: Tensor | None = None, sinks: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.attention.attention_fwd: q (B, Hq, L, E), k, v
    (B, Hkv, S, E / Ev) -> out (B, Hq, L, Ev) in q's dtype (contiguous), lse (B, Hq, L) fp32,
    out_lo empty (this path keeps no rounding residual)."""
    mods = (window_left, window_right, bottom_right, softcap, alibi, sinks)
    L, S, Ev = q.shape[2], k.shape[2], v.shape[-1]
    if L == 0 or S == 0:
        out, lse, lo = _no_keys(q, v)
        return out, lse if sinks is None or L == 0 else lse.copy_(
            sinks.float()[None, :, None].expand(lse.shape)), lo
    if dropout_p > 0.0 or _has_mods(is_causal, *mods):
        out, lse = _Composed(q, k, v, scale, is_causal, attn_mask, dropout_p, seed,
                             mods).forward()
        return out, lse, q.new_empty((0,))
    d = max(q.shape[-1], Ev)
    q, scale = _positive_scale(q, scale)
    out, lse = _FLASH_FWD(_pad_head(q, d), _pad_head(k, d), _pad_head(v, d), 0.0, is_causal,
                          attn_mask=_additive(attn_mask, q.dtype), scale=scale)
    if attn_mask is not None:  # the fused op gives such rows out 0 but lse 0
        lse = lse.masked_fill(_unseen_rows(attn_mask, is_causal, L), _NEG_INF)
    return out[..., :Ev].contiguous(), lse.contiguous(), q.new_empty((0,))


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  scale: float, is_causal: bool, attn_mask: Tensor | None = None,
                  dropout_p: float = 0.0, seed: Tensor | None = None,
                  mask_grad: bool = False, out_lo: Tensor | None = None, window_left: int = -1,
                  window_right: int = -1, bottom_right: bool = False, softcap: float = 0.0,
                  alibi: Tensor | None = None, sinks: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.attention.attention_bwd: dq, dk, dv shaped as q, k, v
    (contiguous, dk and dv summed over the query heads of a kv head), with mask_grad the float
    mask's gradient dS summed to its shape (else empty), and the sinks' gradient (else empty).
    out_lo is ignored (always empty)."""
    mods = (window_left, window_right, bottom_right, softcap, alibi, sinks)
    L, S = q.shape[2], k.shape[2]
    if L == 0 or S == 0:
        dmask = attn_mask.new_zeros(attn_mask.shape) if mask_grad else q.new_empty((0,))
        dsinks = torch.zeros_like(sinks) if sinks is not None else q.new_empty((0,))
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dmask, dsinks
    if dropout_p > 0.0 or mask_grad or _has_mods(is_causal, *mods):
        return _Composed(q, k, v, scale, is_causal, attn_mask, dropout_p, seed, mods).backward(
            do, out, lse, mask_grad)
    E, Ev = q.shape[-1], v.shape[-1]
    d = max(E, Ev)
    if attn_mask is not None:  # rows that see no key: the fused op's own lse 0 (P = exp(-inf) = 0)
        lse = lse.masked_fill(lse == _NEG_INF, 0.0)
    mask = _additive(attn_mask, q.dtype)
    sign = -1.0 if scale < 0 else 1.0
    q, scale = _positive_scale(q, scale)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    G = q.shape[1] // k.shape[1]
    for b, h in _pieces(*k.shape[:2]):  # (batch, kv head) pieces: see _pieces
        qh = slice(h.start * G, h.stop * G)
        m = None if mask is None else mask[b if mask.shape[0] > 1 else slice(None),
                                           qh if mask.shape[1] > 1 else slice(None)]
        parts = _FLASH_BWD(*(_pad_head(t[b, qh], d) for t in (do, q)),
                           *(_pad_head(t[b, h], d) for t in (k, v)), _pad_head(out[b, qh], d),
                           lse[b, qh], 0.0, is_causal, attn_mask=m, scale=scale)
        for grad, part, rows in zip(grads, parts, (qh, h, h)):
            grad[b, rows] = part[..., :grad.shape[-1]]
    if sign < 0:  # the gradient of the flipped q (see _positive_scale)
        grads[0].neg_()
    return (*grads, q.new_empty((0,)), q.new_empty((0,)))


def _pieces(B: int, Hkv: int, n: int = 4) -> list[tuple[slice, slice]]:
    """About n (batch rows, kv heads) pieces of the attention backward: the fused op returns its
    gradients in a (B, L, H, D) layout, copied into the contiguous results piece by piece, so the
    copies cost 1 / n of the gradients' memory instead of all of it. Split the batch, or for one
    batch row the kv heads (with the query heads that read them)."""
    size, whole = (B, Hkv) if B > 1 else (Hkv, B)
    step = -(-size // min(size, n))
    pieces = [slice(i, min(i + step, size)) for i in range(0, size, step)]
    full = slice(0, whole)
    return [(p, full) for p in pieces] if B > 1 else [(full, p) for p in pieces]


class _Composed:
    """Attention as fp32 matrix products over the (B, Hq, L, S) scores: for dropout (the keep-mask
    from the seed, as reference.dropout_keep), the float-mask gradient and the score modifiers,
    which the fused op does not give. GQA without repeating k, v: q viewed (B, Hkv, G, L, E),
    query head h reads kv head h // G. mods: (window_left, window_right, bottom_right, softcap,
    alibi (B, Hq) or (Hq,), sinks (Hq,)), as the kernels take them."""

    def __init__(self, q, k, v, scale, is_causal, attn_mask, dropout_p, seed,
                 mods=(-1, -1, False, 0.0, None, None)):
        B, Hq, L, E = q.shape
        self.Hkv, S = k.shape[1], k.shape[2]
        self.G = Hq // self.Hkv
        self.q, self.k, self.v = self._grouped(q), k.float(), v.float()
        self.dtypes = (q.dtype, k.dtype, v.dtype)
        self.scale, self.is_causal, self.attn_mask = scale, is_causal, attn_mask
        left, right, self.bottom_right, self.softcap, alibi, sinks = mods
        self.window = (left, 0 if is_causal else right)
        self.alibi = None if alibi is None else self._grouped(alibi.expand(B, Hq)[..., None])
        self.sinks = sinks
        keep = dropout_keep(seed, (B, Hq, L, S), dropout_p, q.device) if dropout_p > 0 else None
        self.z = None if keep is None else self._grouped(keep * _kept_scale(dropout_p))

    def _grouped(self, t: Tensor) -> Tensor:
        """(B, Hq, L, X) -> (B, Hkv, G, L, X) fp32."""
        return t.float().unflatten(1, (self.Hkv, self.G))

    def _scores(self) -> tuple[Tensor, Tensor | None]:
        """The scores (B, Hkv, G, L, S) with every modifier and mask applied (hidden pairs -inf),
        and the softcap's tanh (for its derivative) or None."""
        s = torch.einsum("bhgle,bhse->bhgls", self.q, self.k).mul_(self.scale)
        t = None
        if self.softcap > 0:
            t = s.div_(self.softcap).tanh_()
            s = t * self.softcap
        L, S = s.shape[-2:]
        off = S - L if self.bottom_right else 0
        rel = (torch.arange(S, device=s.device)[None, :] - torch.arange(L, device=s.device)[:, None]
               - off)  # (L, S): key index minus aligned query index
        if self.alibi is not None:
            s = s.sub_(self.alibi[..., None] * rel.abs())
        mask = self.attn_mask
        if mask is not None:
            # (B, H', L', S') -> (B, Hkv, G, L', S') or (B, 1, 1, L', S')
            mask = mask.unflatten(1, (self.Hkv, self.G) if mask.shape[1] > 1 else (1, 1))
            s = s.masked_fill_(~mask, _NEG_INF) if mask.dtype == torch.bool else s.add_(mask)
        left, right = self.window
        if right >= 0:
            s = s.masked_fill_(rel > right, _NEG_INF)
        if left >= 0:
            s = s.masked_fill_(rel < -left, _NEG_INF)
        return s, t

    def _probs(self, lse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """P = exp(s - lse) (B, Hkv, G, L, S) with hidden pairs and rows that see no key 0, lse
        (B, Hq, L) (computed here when not given; with sinks it includes them), and the softcap's
        tanh or None."""
        s, t = self._scores()
        if lse is None:
            if self.sinks is not None:
                B, L = s.shape[0], s.shape[-2]
                sink = self._grouped(self.sinks[None, :, None, None].expand(B, -1, L, 1))
                lse = torch.logsumexp(torch.cat([s, sink], dim=-1), dim=-1).flatten(1, 2)
            else:
                lse = torch.logsumexp(s, dim=-1).flatten(1, 2)  # (B, Hq, L); -inf: unseen rows
        finite = lse.masked_fill(lse == _NEG_INF, 0.0).unflatten(1, (self.Hkv, self.G))
        return s.sub_(finite[..., None]).exp_(), lse, t

    def forward(self) -> tuple[Tensor, Tensor]:
        p, lse, _ = self._probs()
        if self.z is not None:
            p.mul_(self.z)
        out = torch.einsum("bhgls,bhsd->bhgld", p, self.v).flatten(1, 2)
        return out.to(self.dtypes[0]), lse.contiguous()

    def backward(self, do: Tensor, out: Tensor, lse: Tensor,
                 mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """FlashAttention-2's formulas with Z the kept-and-rescaled mask (1 without dropout):
        dV = (P Z)^T dO, dS = P (Z dO V^T - rowsum(dO O)), dQ = scale dS' K, dK = scale dS'^T Q
        with dS' = dS (1 - tanh^2) under a softcap; d(sink) = -sum_rows exp(sink - lse) delta."""
        p, _, t = self._probs(lse)
        do5 = self._grouped(do)
        delta = (do5 * self._grouped(out)).sum(dim=-1, keepdim=True)  # (B, Hkv, G, L, 1)
        dp = torch.einsum("bhgld,bhsd->bhgls", do5, self.v)
        pz = p if self.z is None else p * self.z
        if self.z is not None:
            dp.mul_(self.z)
        dv = torch.einsum("bhgls,bhgld->bhsd", pz, do5)
        ds = dp.sub_(delta).mul_(p)
        dmask = (ds.flatten(1, 2).sum_to_size(self.attn_mask.shape).to(self.attn_mask.dtype)
                 if mask_grad else do.new_empty((0,)))
        ds_qk = ds if t is None else ds * (1 - t * t)
        dq = torch.einsum("bhgls,bhse->bhgle", ds_qk, self.k).mul_(self.scale).flatten(1, 2)
        dk = torch.einsum("bhgls,bhgle->bhse", ds_qk, self.q).mul_(self.scale)
        dsinks = do.new_empty((0,))
        if self.sinks is not None:
            p_sink = (self.sinks.float()[None, :, None] - lse).exp()  # (B, Hq, L)
            dsinks = -(p_sink * delta.flatten(1, 2)[..., 0]).sum(dim=(0, 2)).to(self.sinks.dtype)
        return (*(g.to(dt) for g, dt in zip((dq, dk, dv), self.dtypes)), dmask, dsinks)


def attention_probs(q: Tensor, k: Tensor, scale: float, is_causal: bool,
                    attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                    seed: Tensor | None = None, window_left: int = -1, window_right: int = -1,
                    bottom_right: bool = False, softcap: float = 0.0,
                    alibi: Tensor | None = None) -> Tensor:
    """Same contract as fastattn.kernels.attention.attention_probs (this path's dropout mask)."""
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    if L == 0 or S == 0:
        return q.new_zeros((B, Hq, L, S))
    mods = (window_left, window_right, bottom_right, softcap, alibi, None)
    composed = _Composed(q, k, k[..., :1], scale, is_causal, attn_mask, 0.0, None, mods)
    s = composed._scores()[0].flatten(1, 2)  # (B, Hq, L, S)
    rowmax = s.amax(dim=-1, keepdim=True)
    p = (s - rowmax.masked_fill(rowmax == _NEG_INF, 0.0)).exp()
    if dropout_p > 0.0:
        p = torch.where(dropout_keep(seed, (B, Hq, L, S), dropout_p, q.device), p, -p)
    return p.to(q.dtype)


def varlen_attention_probs(q: Tensor, k: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, scale: float, is_causal: bool,
                           dropout_p: float = 0.0, seed: Tensor | None = None,
                           window_left: int = -1, window_right: int = -1,
                           bottom_right: bool = False, softcap: float = 0.0,
                           alibi: Tensor | None = None) -> Tensor:
    """Same contract as fastattn.kernels.attention.varlen_attention_probs."""
    B = cu_seqlens_q.numel() - 1
    probs = q.new_zeros((B, q.shape[1], max_seqlen_q, max_seqlen_k))
    for b, (rq, rk) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        p = attention_probs(_one_sequence(q, rq), _one_sequence(k, rk), scale, is_causal, None,
                            dropout_p, _sequence_seed(seed, b), window_left, window_right,
                            bottom_right, softcap, _sequence_slopes(alibi, b))
        probs[b, :, :p.shape[2], :p.shape[3]] = p[0]
    return probs


def _sequences(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor) -> list[tuple[slice, slice]]:
    """(query rows, key rows) of each packed sequence."""
    q, k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(slice(q[b], q[b + 1]), slice(k[b], k[b + 1])) for b in range(len(q) - 1)]


def _one_sequence(x: Tensor, rows: slice) -> Tensor:
    """Rows of one sequence of a packed (T, H, D) tensor as a (1, H, N, D) batch."""
    return x[rows].transpose(0, 1)[None]


def _sequence_seed(seed: Tensor | None, b: int) -> Tensor | None:
    """Dropout seed of sequence b in this path (each sequence draws its own keep-mask)."""
    return None if seed is None else seed * 1_000_003 + b


def _sequence_slopes(alibi: Tensor | None, b: int) -> Tensor | None:
    """The ALiBi slopes of sequence b: (1, Hq) of a (B, Hq) tensor, or the (Hq,) ones."""
    return alibi if alibi is None or alibi.dim() == 1 else alibi[b:b + 1]


def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                         cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                         is_causal: bool, dropout_p: float = 0.0,
                         seed: Tensor | None = None, residual: bool = False,
                         window_left: int = -1, window_right: int = -1,
                         bottom_right: bool = False, softcap: float = 0.0,
                         alibi: Tensor | None = None,
                         sinks: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.attention.varlen_attention_fwd: attention_fwd on each
    packed sequence. out (Tq, Hq, Ev), lse (Hq, Tq), out_lo empty."""
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    for b, (rq, rk) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        o, l, _ = attention_fwd(_one_sequence(q, rq), _one_sequence(k, rk), _one_sequence(v, rk),
                                scale, is_causal, None, dropout_p, _sequence_seed(seed, b), False,
                                window_left, window_right, bottom_right, softcap,
                                _sequence_slopes(alibi, b), sinks)
        out[rq], lse[:, rq] = o[0].transpose(0, 1), l[0]
    return out, lse, q.new_empty((0,))


def varlen_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                         max_seqlen_k: int, scale: float, is_causal: bool, dropout_p: float = 0.0,
                         seed: Tensor | None = None, out_lo: Tensor | None = None,
                         window_left: int = -1, window_right: int = -1,
                         bottom_right: bool = False, softcap: float = 0.0,
                         alibi: Tensor | None = None, sinks: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.attention.varlen_attention_bwd: attention_bwd on each
    packed sequence (keys of no sequence get zero gradients)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dsinks = torch.zeros_like(sinks) if sinks is not None else q.new_empty((0,))
    for b, (rq, rk) in enumerate(_sequences(cu_seqlens_q, cu_seqlens_k)):
        grads = attention_bwd(_one_sequence(do, rq), _one_sequence(q, rq), _one_sequence(k, rk),
                              _one_sequence(v, rk), _one_sequence(out, rq),
                              lse[None, :, rq].contiguous(), scale, is_causal, None, dropout_p,
                              _sequence_seed(seed, b), False, None, window_left, window_right,
                              bottom_right, softcap, _sequence_slopes(alibi, b), sinks)
        for grad, g, rows in zip((dq, dk, dv), grads, (rq, rk, rk)):
            grad[rows] = g[0].transpose(0, 1)
        if sinks is not None:
            dsinks += grads[4]
    return dq, dk, dv, dsinks


def kvcache_attention_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None,
                          v: Tensor | None, cache_seqlens: Tensor | None,
                          cache_batch_idx: Tensor | None, cache_leftpad: Tensor | None,
                          block_table: Tensor | None, rotary_cos: Tensor | None,
                          rotary_sin: Tensor | None, rotary_interleaved: bool,
                          key_padding_mask: Tensor | None, scale: float, causal: bool,
                          window_left: int, window_right: int, softcap: float,
                          alibi: Tensor | None, sinks: Tensor | None,
                          num_splits: int) -> tuple[Tensor, Tensor]:
    """Same contract as fastattn.kernels.decode.kvcache_attention_fwd (num_splits has no effect
    here): the caches updated in place, then attention_fwd per sequence. out (B, L, Hq, Dv),
    lse (B, Hq, L)."""
    B, L, Hq, _ = q.shape
    L_new = 0 if k is None else k.shape[1]
    capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    seqlens = ([capacity] * B if cache_seqlens is None else cache_seqlens.tolist())
    starts = [0] * B if cache_leftpad is None else cache_leftpad.tolist()
    if rotary_cos is not None:
        step = 1 if causal or window_left >= 0 or window_right >= 0 else 0
        base = torch.tensor(seqlens, device=q.device)[:, None]
        q = rotary(q, rotary_cos, rotary_sin, base + step * torch.arange(L, device=q.device),
                   rotary_interleaved)
        k = rotary(k, rotary_cos, rotary_sin, base + torch.arange(L_new, device=q.device),
                   rotary_interleaved)
    if k is not None:
        kvcache_append(k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table)
    out = q.new_empty((B, L, Hq, v_cache.shape[-1]))
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    for b in range(B):
        start, end = starts[b], seqlens[b] + L_new
        mask = (None if key_padding_mask is None
                else key_padding_mask[b, start:end][None, None, None])
        o, l, _ = attention_fwd(
            q[b:b + 1].transpose(1, 2),  # (1, L, Hq, D) -> (1, Hq, L, D)
            kvcache_keys(k_cache, b, start, end, cache_batch_idx, block_table),
            kvcache_keys(v_cache, b, start, end, cache_batch_idx, block_table),
            scale, causal, mask, 0.0, None, False, window_left, window_right, True, softcap,
            _sequence_slopes(alibi, b), sinks)
        out[b], lse[b] = o[0].transpose(0, 1), l[0]
    return out, lse


# ---- layer norm / rms norm ----

_FUSED_RMS_NORM = getattr(torch, "_fused_rms_norm", None)  # torch >= 2.8 (absent before)


def _dropped(t: Tensor, seed: Tensor, p: float) -> Tensor:
    """t through the dropout of this path: kept entries / (1 - p), from the (seed, shape) mask of
    reference.dropout_keep, computed in fp32 and returned in t's dtype."""
    keep = dropout_keep(seed, tuple(t.shape), p, t.device)
    return (t.float() * keep).mul_(_kept_scale(p)).to(t.dtype)


def _ln_params(x: Tensor, weight: Tensor | None,
               bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """weight and bias for native_layer_norm(_backward): for fp16 / bf16 x in fp32 (a weight of
    ones when there is none), which makes torch keep mean / rstd in fp32 and mix dtypes."""
    if x.dtype not in _HALF:
        return weight, bias
    w = (weight.float() if weight is not None
         else torch.ones(x.shape[1], dtype=torch.float32, device=x.device))
    return w, bias.float() if bias is not None else None


def _rms_norm(h: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """y (M, N) in h's dtype and rstd (M,) fp32."""
    if _FUSED_RMS_NORM is not None:
        y, rstd = _FUSED_RMS_NORM(h, [h.shape[1]], weight, eps)
        return y, rstd.view(-1).float()
    hf = h.float()
    rstd = torch.rsqrt(hf.square().mean(dim=-1).add_(eps))
    y = hf * rstd[:, None]
    return (y.mul_(weight) if weight is not None else y).to(h.dtype), rstd


def norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
             eps: float, is_rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.layer_norm.norm_fwd: x, residual (M, N) -> y (M, N),
    h = x + residual (or empty), mean (M,) fp32 (empty for RMSNorm), rstd (M,) fp32."""
    h = x + residual if residual is not None else x
    if is_rms:
        y, rstd = _rms_norm(h, weight, eps)
        mean = rstd.new_empty((0,))
    else:
        y, mean, rstd = torch.native_layer_norm(h, [h.shape[1]], *_ln_params(h, weight, bias), eps)
        mean, rstd = mean.view(-1), rstd.view(-1)
    return y, h if residual is not None else x.new_empty((0,)), mean, rstd


def _rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor,
                  compute_dweight: bool) -> tuple[Tensor, Tensor | None]:
    """xhat = x * rstd, g = weight * dy: dx = rstd * (g - xhat * mean(g * xhat)), dweight =
    sum over rows of dy * xhat; fp32."""
    dyf, r = dy.float(), rstd[:, None]
    xhat = x.float() * r
    g = dyf * weight.float() if weight is not None else dyf
    dx = (g - xhat * (g * xhat).mean(dim=-1, keepdim=True)).mul_(r)
    return dx.to(x.dtype), (dyf * xhat).sum(dim=0) if compute_dweight else None


def norm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
             rstd: Tensor, dh: Tensor | None, is_rms: bool, compute_dweight: bool,
             compute_dbias: bool, dropout_p: float = 0.0,
             dropout_seed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.layer_norm.norm_bwd: dy, x, dh (M, N), mean, rstd (M,)
    -> dx (M, N) (+ dh), dweight (N,) / dbias (N,) in the parameters' dtypes or empty. With
    dropout_p > 0, dy first goes back through the dropout the forward drew from dropout_seed."""
    if dropout_p > 0.0:
        dy = _dropped(dy, dropout_seed, dropout_p)
    dbias = None
    if is_rms:
        dx, dweight = _rms_norm_bwd(dy, x, weight, rstd, compute_dweight)
    else:
        dx, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
            dy, x, [x.shape[1]], mean, rstd, *_ln_params(x, weight, bias),
            [True, compute_dweight, compute_dbias])
    if dh is not None:
        dx = dx.add_(dh)
    empty = x.new_empty((0,))
    return (dx, dweight.to(weight.dtype) if compute_dweight else empty,
            dbias.to(bias.dtype) if compute_dbias else empty)


# ---- embeddings ----


def embedding_fwd(ids: Tensor, word: Tensor, pos_ids: Tensor | None, pos: Tensor | None,
                  type_ids: Tensor | None, type_: Tensor | None, ln_weight: Tensor | None,
                  ln_bias: Tensor | None, eps: float, dropout_p: float,
                  seed: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.embedding.embedding_fwd: h = word[ids] + pos[pos_ids]
    + type_[type_ids] (summed in fp32, rounded once), then with ln_weight
    out = dropout(layer_norm(h)) and h, mean, rstd kept; else out = h (and empties)."""
    h = F.embedding(ids, word)  # (T, D)
    if pos is not None or type_ is not None:
        h = h.float() if word.dtype in _HALF else h
        for table, index in ((pos, pos_ids), (type_, type_ids)):
            if table is not None:
                h += F.embedding(index, table)
        h = h.to(word.dtype)
    empty = h.new_empty((0,), dtype=torch.float32)
    if ln_weight is None:
        return h, word.new_empty((0,)), empty, empty.clone()
    y, _, mean, rstd = norm_fwd(h, ln_weight, ln_bias, None, eps, False)
    if dropout_p > 0.0:
        y = _dropped(y, seed, dropout_p)
    return y, h, mean, rstd


def embedding_bwd(ids: Tensor, dout: Tensor, num_embeddings: int, dtype: torch.dtype,
                  padding_idx: int, scale_grad_by_freq: bool) -> Tensor:
    """Same contract as fastattn.kernels.embedding.embedding_bwd: dW (num_embeddings, D) in
    dtype, dW[v] = sum of dout[t] over ids[t] == v (accumulated in fp32), / count with
    scale_grad_by_freq, row padding_idx zero (-1: none)."""
    dw = torch.ops.aten.embedding_dense_backward(dout.float(), ids, num_embeddings, padding_idx,
                                                 scale_grad_by_freq)
    return dw.to(dtype)
