"""flash-attn 2.8's flash_attn/bert_padding.py helpers on fastattn.unpad / fastattn.pad: a padded
(batch, seqlen, ...) batch to the packed (total, ...) layout of the varlen functions and back.

    q_unpad, indices, cu_seqlens, max_seqlen, used_seqlens = unpad_input(q, attention_mask)
    out = pad_input(flash_attn_varlen_func(q_unpad, ...), indices, batch, seqlen)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import attention
from .._validate import check_same_device

__all__ = ["index_first_axis", "index_put_first_axis", "pad_input", "unpad_input"]


def _check_mask(name: str, mask, hidden_states: Tensor) -> None:
    """A bool / integer (batch, seqlen) tensor on hidden_states' device, matching its first two
    dims (fastattn.unpad checks the same under its own argument names)."""
    kind = str(mask.dtype).removeprefix("torch.") if isinstance(mask, Tensor) else None
    if kind is None or mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or integer tensor (batch, seqlen), 1 = a token, "
                        f"got {kind or type(mask).__name__}")
    if hidden_states.dim() < 2 or mask.shape != hidden_states.shape[:2]:
        raise ValueError(f"{name} of shape {list(mask.shape)} must be hidden_states' first two "
                         f"dims (batch, seqlen) = {list(hidden_states.shape[:2])}")
    check_same_device(hidden_states=hidden_states, **{name: mask})


def _check_indices(indices, rows: Optional[int], what: str) -> None:
    """indices: a 1-D integer tensor (of rows < `rows` when rows is known: checked on the CPU,
    where it costs no device sync)."""
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be a 1-D int64 tensor, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D (total,), got shape {list(indices.shape)}")
    if rows is not None and indices.device.type == "cpu" and indices.numel() and (
            int(indices.min()) < 0 or int(indices.max()) >= rows):
        raise ValueError(f"indices must lie in [0, {rows}) ({what}), got "
                         f"[{int(indices.min())}, {int(indices.max())}]")


def unpad_input(hidden_states: Tensor, attention_mask: Tensor,
                unused_mask: Optional[Tensor] = None):
    """The tokens of a padded batch, packed (fastattn.unpad), as flash_attn.bert_padding.unpad_input.

    hidden_states (batch, seqlen, ...); attention_mask (batch, seqlen) bool / int, 1 = a real
    token; unused_mask: None or (batch, seqlen) bool / int, 1 = a slot allocated but unused (it is
    packed too, and counted in cu_seqlens, not in used_seqlens).

    Returns hidden_states (total, ...) the selected tokens in order (differentiable), indices
    (total,) int64 their positions in the flattened (batch * seqlen) batch, cu_seqlens (batch + 1,)
    int32, max_seqlen_in_batch (int) and used_seqlens_in_batch (batch,) int32, the tokens
    attention_mask selects per sequence.
    """
    if not isinstance(hidden_states, Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor (batch, seqlen, ...), got "
                        f"{type(hidden_states).__name__}")
    _check_mask("attention_mask", attention_mask, hidden_states)
    selected = attention_mask
    if unused_mask is not None:
        _check_mask("unused_mask", unused_mask, hidden_states)
        selected = attention_mask.bool() | unused_mask.bool()
    packed, indices, cu_seqlens, max_seqlen = attention.unpad(hidden_states, selected)
    used_seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)  # (batch,)
    return packed, indices, cu_seqlens, max_seqlen, used_seqlens


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Inverse of unpad_input (fastattn.pad), as flash_attn.bert_padding.pad_input:
    hidden_states (total, ...) and indices (total,) -> (batch, seqlen, ...), zeros at the
    positions indices does not name (differentiable in hidden_states)."""
    if not isinstance(hidden_states, Tensor) or hidden_states.dim() < 1:
        raise TypeError("hidden_states must be a torch.Tensor (total, ...)")
    for name, n in (("batch", batch), ("seqlen", seqlen)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    _check_indices(indices, batch * seqlen, "batch * seqlen")
    if indices.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"indices ({indices.shape[0]},) must name one position per row of "
                         f"hidden_states {list(hidden_states.shape)}")
    return attention.pad(hidden_states, indices, batch, seqlen)


def index_first_axis(input: Tensor, indices: Tensor) -> Tensor:
    """input (N, ...), indices (total,) -> input[indices] (total, ...), differentiable in input,
    as flash_attn.bert_padding.index_first_axis."""
    if not isinstance(input, Tensor) or input.dim() < 1:
        raise TypeError("input must be a torch.Tensor (N, ...)")
    _check_indices(indices, input.shape[0], "input's first dim")
    return input.index_select(0, indices)


def index_put_first_axis(values: Tensor, indices: Tensor, first_axis_dim: int) -> Tensor:
    """values (total, ...), indices (total,) -> (first_axis_dim, ...) zeros with row indices[i]
    set to values[i], differentiable in values, as flash_attn.bert_padding.index_put_first_axis
    (pad_input without the (batch, seqlen) view)."""
    if not isinstance(first_axis_dim, int) or isinstance(first_axis_dim, bool) or first_axis_dim < 0:
        raise ValueError(f"first_axis_dim must be a non-negative int, got {first_axis_dim!r}")
    # (first_axis_dim, 1, ...) -> (first_axis_dim, ...): a view
    return pad_input(values, indices, first_axis_dim, 1).flatten(0, 1)
