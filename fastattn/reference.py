"""Readable eager PyTorch references: the correctness oracle of the tests (run on float64 inputs).

Each function states an op's math plainly, with torch autograd for the gradients. dropout_keep is
the torch path's dropout keep-mask (fastattn.torch_path), which the tests replay.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ---- layer norm / rms norm: the math ----


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim of x (..., N); weight, bias (N,)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).square().mean(dim=-1, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dim of x (..., N); weight (N,)."""
    y = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


# ---- dropout ----


def dropout_keep(seed: Tensor, shape: tuple[int, ...], p: float, device) -> Tensor:
    """The torch path's dropout keep-mask: a function of (seed, shape), so the backward redraws
    the forward's mask. seed: the (1,) int64 tensor the kernels read; that path reads it on
    the host. (The Triton kernels draw theirs with Philox; the two paths differ.)"""
    gen = torch.Generator().manual_seed(int(seed.item()))
    return (torch.rand(shape, generator=gen) >= p).to(device)


# ---- attention: the math ----


def _visible_pairs(L: int, S: int, is_causal: bool, attn_mask: Tensor | None, device,
                   window: tuple[int, int] = (-1, -1), bottom_right: bool = False) -> Tensor:
    """Boolean, broadcastable to the (..., L, S) scores: the (query, key) pairs that take part.
    Query i sees key j when i + off - left <= j <= i + off + right (off = S - L bottom-right
    aligned, else 0; a window side of -1 is unbounded; causal is right = 0)."""
    left, right = window
    right = 0 if is_causal else right
    rel = _relative_positions(L, S, bottom_right, device)  # j - (i + off)
    visible = torch.ones(L, S, dtype=torch.bool, device=device)
    if right >= 0:
        visible = visible & (rel <= right)
    if left >= 0:
        visible = visible & (rel >= -left)
    if attn_mask is not None:
        visible = visible & (attn_mask if attn_mask.dtype == torch.bool
                             else attn_mask > float("-inf"))
    return visible


def _relative_positions(L: int, S: int, bottom_right: bool, device) -> Tensor:
    """(L, S) int64: key index minus aligned query index, j - (i + off), off = S - L bottom-right
    aligned (the last query sees the last key), else 0 (top-left, torch's causal)."""
    off = S - L if bottom_right else 0
    return (torch.arange(S, device=device)[None, :]
            - torch.arange(L, device=device)[:, None] - off)


def _scores(q: Tensor, k: Tensor, scale: float, attn_mask: Tensor | None, softcap: float = 0.0,
            alibi: Tensor | None = None, bottom_right: bool = False) -> Tensor:
    """q @ k^T * scale, capped to softcap * tanh(s / softcap) (softcap > 0), minus the ALiBi bias
    slope * |j - (i + off)| (alibi: slopes broadcastable to (B, H)), plus attn_mask when it is an
    additive (float) one: the order flash-attn applies them in."""
    s = q @ k.transpose(-2, -1) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        rel = _relative_positions(*s.shape[-2:], bottom_right, q.device).abs().to(s.dtype)
        s = s - alibi.to(s.dtype).expand(s.shape[:-2])[..., None, None] * rel
    return s + attn_mask if attn_mask is not None and attn_mask.dtype != torch.bool else s


def _kept_scale(dropout_p: float) -> float:
    """Factor of the probabilities dropout keeps: 1 / (1 - p), and 0 when p == 1 (none kept)."""
    return 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                                 scale: float | None = None, attn_mask: Tensor | None = None,
                                 dropout_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, *, window: tuple[int, int] = (-1, -1),
                                 bottom_right: bool = False, softcap: float = 0.0,
                                 alibi: Tensor | None = None,
                                 sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """dropout(softmax(q @ k^T * scale + mask)) @ v and the row logsumexp of the masked scores.

    q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev); query head h reads kv head
    h // (Hq // Hkv). is_causal: query i sees keys j <= i (top-left aligned; bottom_right:
    j <= i + S - L). attn_mask, applied together with is_causal, broadcastable to (B, Hq, L, S):
    bool (True = takes part) or float (added to the scores; -inf hides a pair). A row that sees
    no key gives out 0, lse -inf and zero gradients. dropout_mask: None or a bool keep-mask
    broadcastable to (B, Hq, L, S); kept probabilities are scaled by 1 / (1 - dropout_p).

    Score modifiers (flash-attn's): window (left, right), -1 unbounded, aligned as the causal
    mask; softcap > 0 caps the scaled scores to softcap * tanh(s / softcap); alibi (Hq,) or
    (B, Hq) slopes subtract slope * |j - (i + off)|; sinks (Hq,): one more logit per head in
    each row's softmax, with no value (the lse includes it; a row that sees no key gives out 0
    and lse = the sink). Returns out (B, Hq, L, Ev) and lse (B, Hq, L).
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, Hkv, S, E) -> (B, Hq, S, E)
    v = v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = _scores(q, k, scale, attn_mask, softcap, alibi, bottom_right)  # (B, Hq, L, S)
    visible = _visible_pairs(*s.shape[-2:], is_causal, attn_mask, q.device, window,
                             bottom_right).expand(s.shape)
    s = s.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # one more column per row: the head's sink logit, with no value
        sink = sinks.to(s.dtype)[:, None, None].expand(*s.shape[:-1], 1)
        lse = torch.logsumexp(torch.cat([s, sink], dim=-1), dim=-1)  # (B, Hq, L)
        p = torch.exp(s - lse[..., None])
    else:
        seen = visible.any(dim=-1, keepdim=True)  # (B, Hq, L, 1): rows that see some key
        s = s.masked_fill(~seen, 0.0)  # finite stand-ins: the softmax and its gradient stay finite
        lse = torch.logsumexp(s, dim=-1).masked_fill(~seen[..., 0], float("-inf"))  # (B, Hq, L)
        p = torch.softmax(s, dim=-1).masked_fill(~seen, 0.0)
    if dropout_mask is not None:
        p = p * dropout_mask * _kept_scale(dropout_p)
    return p @ v, lse


# ---- KV-cache decoding: rotary embeddings, the cache update and the keys a step reads ----


def rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """Rotary embedding of x (B, L, H, D) at positions (B, L) (int, rows of cos / sin), computed in
    x's dtype's fp32 (or float64) math and returned in x's dtype, as flash-attn's apply_rotary.

    cos, sin (seqlen_ro, R / 2): the first R dims of each head rotate, in pairs (2i, 2i + 1) when
    interleaved (GPT-J), else (i, i + R / 2) (GPT-NeoX); dims R .. D - 1 pass through.
    """
    R = 2 * cos.shape[-1]
    if R == 0:
        return x
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = cos[positions].to(work)[:, :, None, :]  # (B, L, 1, R / 2)
    s = sin[positions].to(work)[:, :, None, :]
    head = x[..., :R].to(work)
    if interleaved:
        even, odd = head[..., 0::2], head[..., 1::2]
        rotated = torch.stack([even * c - odd * s, odd * c + even * s], dim=-1).flatten(-2)
    else:
        first, second = head.chunk(2, dim=-1)
        rotated = torch.cat([first * c - second * s, second * c + first * s], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., R:]], dim=-1)


def kvcache_rows(k_cache: Tensor, b: int, rows: Tensor, cache_batch_idx: Tensor | None,
                 block_table: Tensor | None) -> tuple[Tensor, Tensor]:
    """Where row r (a position) of sequence b lives in a KV cache: (cache index, row index) into
    k_cache's first two dims, for the cache (B_cache, S_cache, Hkv, D) read at batch entry
    cache_batch_idx[b] (b without it), or the paged cache (pages, page_size, Hkv, D) through
    block_table[b] (page r // page_size, row r % page_size). rows: (n,) int64."""
    if block_table is not None:
        page = k_cache.shape[1]
        return block_table[b].long()[rows // page], rows % page
    entry = b if cache_batch_idx is None else int(cache_batch_idx[b])
    return torch.full_like(rows, entry), rows


def kvcache_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                   cache_batch_idx: Tensor | None, block_table: Tensor | None) -> None:
    """Write the new keys / values k (B, L_new, Hkv, D), v (B, L_new, Hkv, Dv) into the caches in
    place, sequence b's at positions cache_seqlens[b] .. cache_seqlens[b] + L_new - 1."""
    for b in range(k.shape[0]):
        rows = int(cache_seqlens[b]) + torch.arange(k.shape[1], device=k.device)
        where = kvcache_rows(k_cache, b, rows, cache_batch_idx, block_table)
        k_cache[where] = k[b].to(k_cache.dtype)
        v_cache[where] = v[b].to(v_cache.dtype)


def kvcache_keys(cache: Tensor, b: int, start: int, end: int, cache_batch_idx: Tensor | None,
                 block_table: Tensor | None) -> Tensor:
    """The rows start .. end - 1 of sequence b in a (possibly paged) cache, as (1, Hkv, n, D)."""
    rows = torch.arange(start, end, device=cache.device)
    return cache[kvcache_rows(cache, b, rows, cache_batch_idx, block_table)].transpose(0, 1)[None]


def kvcache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None = None,
                      v: Tensor | None = None, *, cache_seqlens: Tensor | int | None = None,
                      cache_batch_idx: Tensor | None = None, cache_leftpad: Tensor | None = None,
                      block_table: Tensor | None = None, rotary_cos: Tensor | None = None,
                      rotary_sin: Tensor | None = None, rotary_interleaved: bool = True,
                      key_padding_mask: Tensor | None = None, scale: float | None = None,
                      causal: bool = False, window: tuple[int, int] = (-1, -1),
                      softcap: float = 0.0, alibi: Tensor | None = None,
                      sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """flash_attn_with_kvcache's math (fastattn.decode.kvcache_attention has the arguments): the
    caches are updated in place with k, v (rotated), then each sequence's q (B, L, Hq, D)
    (rotated at cache_seqlens[b] + i when causal or windowed, else all at cache_seqlens[b])
    attends to its cache rows cache_leftpad[b] .. cache_seqlens[b] + L_new - 1, the causal mask,
    window and ALiBi bottom-right aligned on them. Returns out (B, L, Hq, Dv), lse (B, Hq, L)."""
    B, L = q.shape[:2]
    L_new = 0 if k is None else k.shape[1]
    capacity = (k_cache.shape[1] * block_table.shape[1] if block_table is not None
                else k_cache.shape[1])
    seqlens = (torch.full((B,), capacity - L_new, dtype=torch.int64) if cache_seqlens is None
               else torch.as_tensor(cache_seqlens).long().cpu().expand(B))
    if rotary_cos is not None:
        step = 1 if causal or window != (-1, -1) else 0
        q_pos = seqlens[:, None] + step * torch.arange(L)[None, :]
        q = rotary(q, rotary_cos, rotary_sin, q_pos.to(q.device), rotary_interleaved)
        k_pos = seqlens[:, None] + torch.arange(L_new)[None, :]
        k = rotary(k, rotary_cos, rotary_sin, k_pos.to(q.device), rotary_interleaved)
    if k is not None:
        kvcache_append(k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table)
    outs, lses = [], []
    for b in range(B):
        start = 0 if cache_leftpad is None else int(cache_leftpad[b])
        end = int(seqlens[b]) + L_new
        kb = kvcache_keys(k_cache, b, start, end, cache_batch_idx, block_table).to(q.dtype)
        vb = kvcache_keys(v_cache, b, start, end, cache_batch_idx, block_table).to(q.dtype)
        mask = None if key_padding_mask is None else key_padding_mask[b, start:end]
        out, lse = scaled_dot_product_attention(
            q[b:b + 1].transpose(1, 2), kb, vb, causal, scale, mask, window=window,
            bottom_right=True, softcap=softcap,
            alibi=None if alibi is None else alibi[b] if alibi.dim() == 2 else alibi,
            sinks=sinks)
        outs.append(out.transpose(1, 2))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)
