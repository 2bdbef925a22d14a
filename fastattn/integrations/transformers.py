"""Hugging Face transformers on fastattn, in one line.

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()                                   # idempotent
    model = AutoModel.from_config(cfg, attn_implementation="fastattn")
    # or, on an existing model: model.set_attn_implementation("fastattn")
    # or swap norms and embeddings too: fastattn.patch(model) ... fastattn.unpatch(model)

register() adds "fastattn" to transformers' AttentionInterface (the attention function) and to its
AttentionMaskInterface (the mask builder; without it transformers would pass attention_mask=None
and padding would be silently ignored). The masks are torch-SDPA style booleans (True = attend);
a padding-only bidirectional mask (BERT) is handed over as (B, 1, 1, S), the key-padding form on
which fastattn's kernel skips fully padded key blocks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import nn as fnn
from ..attention import scaled_dot_product_attention, varlen_attention

NAME = "fastattn"


# What transformers may hand the attention function besides q, k, v and the mask, and what
# fastattn does with each. Every other keyword with a value (not None / False) is refused.
#   applied:          dropout, scaling, is_causal, position_bias (added to the mask, as HF's SDPA
#                     path does), cu_seq_lens_q / _k + max_length_q / _k (packed sequences, run
#                     with varlen_attention as flash-attn's path does; batch 1)
#   in the mask:      sliding_window, position_ids (the mask builder registered with the attention
#                     function puts the window and packed-sequence boundaries into attention_mask)
#   no effect here:   _NO_EFFECT below (model-level flags that reach every layer's kwargs)
#   refused if set:   softcap, s_aux (attention sinks), output_attentions, seq_idx
_NO_EFFECT = frozenset({"use_cache", "output_router_logits", "output_hidden_states",
                        "num_items_in_batch", "cache_position", "past_key_values",
                        "past_key_value", "return_dict", "layer_idx"})
_REFUSED = {
    "softcap": "attention logit soft-capping (Gemma 2 / 3) is not fused in fastattn yet",
    "s_aux": "learnable attention sinks (GPT-OSS) are not fused in fastattn yet",
    "output_attentions": "fastattn never materialises the attention weights",
    "seq_idx": "per-token sequence indices are not read by fastattn; pass cu_seq_lens_q / _k",
}
_VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _has_value(value) -> bool:
    return value is not None and value is not False


def _check_keywords(module: nn.Module, kwargs: dict) -> None:
    """Refuse, naming it, every keyword that would change the result and that fastattn does not
    apply (see the table above)."""
    for key, value in kwargs.items():
        if key in _NO_EFFECT or key in _VARLEN or key in ("sliding_window", "position_ids"):
            continue
        if not _has_value(value):
            continue
        why = _REFUSED.get(key, "fastattn does not know this keyword, so it cannot honour it")
        raise ValueError(f"attn_implementation='fastattn' got {key}={_describe(value)} from "
                         f"{type(module).__name__}: {why}; use attn_implementation='eager' for "
                         "this model")


def _describe(value) -> str:
    return f"<tensor {list(value.shape)}>" if isinstance(value, Tensor) else repr(value)


def _with_position_bias(position_bias: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """An additive (B, H, L, S) score bias merged with the mask, as transformers' SDPA path does
    (a hidden pair gets the dtype's minimum); is_causal still applies on top in the kernel."""
    if attention_mask is None:
        return position_bias
    if attention_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attention_mask, torch.finfo(position_bias.dtype).min)
    return position_bias + attention_mask


def _packed_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      is_causal: bool, dropout: float, scaling: Optional[float],
                      kwargs: dict) -> Tensor:
    """Packed sequences (batch 1, cu_seq_lens_q / _k given) through varlen_attention: each
    sequence attends to itself only, as flash-attn's path runs them. query (1, Hq, T, D) ->
    (1, T, Hq, Dv)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        raise ValueError("attn_implementation='fastattn' needs both cu_seq_lens_q and "
                         "cu_seq_lens_k for packed sequences, got only one")
    if query.shape[0] != 1:
        raise ValueError(f"cu_seq_lens_q / _k describe one packed row, but the batch has "
                         f"{query.shape[0]} rows")
    window = kwargs.get("sliding_window")
    lengths = (cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1])
    max_q, max_k = (kwargs.get(name) for name in ("max_length_q", "max_length_k"))
    max_q, max_k = (int(m) if m is not None else int(n.max()) if n.numel() else 0
                    for m, n in zip((max_q, max_k), lengths))
    if window is not None and max_k > window:
        raise ValueError(f"attn_implementation='fastattn' cannot apply sliding_window={window} to "
                         f"packed sequences (cu_seq_lens_q / _k) of up to {max_k} keys yet; use "
                         "attn_implementation='eager' or pass a padded batch")
    # (1, H, T, D) -> (T, H, D)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = varlen_attention(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
                           causal=is_causal, dropout_p=dropout, scale=scaling)
    return out[None]  # (T, Hq, Dv) -> (1, T, Hq, Dv)


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      position_bias: Optional[Tensor] = None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature. query (B, Hq, L, D), key / value (B, Hkv, S, D)
    (GQA handled in the kernel, no repeat_kv copies); attention_mask bool or additive float,
    broadcastable to (B, Hq, L, S), or None. Returns (B, L, Hq, Dv) and no attention weights.
    Every keyword is applied or refused with a ValueError naming it (the table above)."""
    _check_keywords(module, kwargs)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if any(kwargs.get(name) is not None for name in _VARLEN[:2]):
        if position_bias is not None:
            raise ValueError("attn_implementation='fastattn' cannot apply position_bias to packed "
                             "sequences (cu_seq_lens_q / _k)")
        return _packed_attention(module, query, key, value, bool(is_causal), dropout, scaling,
                                 kwargs), None
    window = kwargs.get("sliding_window")
    if window is not None and attention_mask is None and key.shape[2] > window:
        raise ValueError(f"sliding_window={window} with {key.shape[2]} keys and no attention_mask: "
                         "fastattn applies the window through the mask, so build the model with "
                         "attn_implementation='fastattn' after fastattn.integrations.transformers."
                         "register() (it registers the mask builder too)")
    # A mask, when given, already holds the causal pattern; one query row (decoding) sees all keys.
    is_causal = bool(is_causal) and attention_mask is None and query.shape[2] > 1
    if position_bias is not None:
        attention_mask = _with_position_bias(position_bias, attention_mask)
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                       dropout_p=dropout, is_causal=is_causal, scale=scaling,
                                       enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None  # (B, Hq, L, Dv) -> (B, L, Hq, Dv)


def attention_mask(**kwargs) -> Optional[Tensor]:
    """transformers' mask-builder signature: the SDPA boolean mask, or None when the kernel needs
    none (plain causal, or no padding); padding-only bidirectional masks as (B, 1, 1, S)."""
    from transformers import masking_utils

    mask = masking_utils.sdpa_mask(**kwargs)
    bidirectional = kwargs.get("mask_function") is masking_utils.bidirectional_mask_function
    if mask is not None and bidirectional and kwargs.get("local_size") is None:
        # Every query row of a padding-only mask is the same key mask: keep one row.
        return mask[:, :, :1, :]  # (B, 1, L, S) -> (B, 1, 1, S)
    return mask


def register() -> None:
    """Make attn_implementation="fastattn" available to transformers models (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)


# ---- patch / unpatch: swap a model instance's modules, keep its parameters and state_dict ----

# Hugging Face RMSNorm classes computing weight * x / sqrt(mean(x^2) + variance_epsilon), which
# fastattn.nn.RMSNorm reproduces (not Gemma's (1 + weight) variant).
_HF_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "PhiRMSNorm",
                 "MixtralRMSNorm", "OlmoRMSNorm"}


def _fastattn_module(module: nn.Module) -> Optional[nn.Module]:
    """A fastattn module computing what `module` computes with the same Parameter objects, or
    None when there is none."""
    if type(module) is nn.LayerNorm:
        new = fnn.LayerNorm.__new__(fnn.LayerNorm)
    elif type(module) is nn.RMSNorm:
        new = fnn.RMSNorm.__new__(fnn.RMSNorm)
    elif type(module) is nn.Embedding:
        new = fnn.Embedding.__new__(fnn.Embedding)
    elif type(module).__name__ in _HF_RMS_NORMS:
        new = fnn.RMSNorm(module.weight.shape, eps=module.variance_epsilon, device="meta")
        new.weight = module.weight
        return new
    else:
        return None
    # The fastattn classes subclass torch's and add no state: share the whole module state.
    new.__dict__ = module.__dict__.copy()
    new.__dict__["_parameters"] = module._parameters  # the same Parameter objects (tied stay tied)
    return new


def patch(model: nn.Module) -> nn.Module:
    """Swap the LayerNorm / RMSNorm / Embedding modules of `model` (torch's, and Hugging Face's
    Llama-style RMSNorms) for fastattn's, sharing their parameters so every state_dict key and
    any weight tying stay; for a transformers model also set attn_implementation="fastattn".
    Nothing global is changed. Returns the model; unpatch(model) restores it."""
    if hasattr(model, "_fastattn_patch"):
        return model
    replaced = {}
    for name, module in list(model.named_modules()):
        new = _fastattn_module(module) if name else None
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        replaced[name] = module
    previous = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "set_attn_implementation"):
        register()
        previous = config._attn_implementation
        model.set_attn_implementation(NAME)
    model._fastattn_patch = (replaced, previous)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(model): the original modules and attention implementation come back."""
    replaced, previous = model.__dict__.pop("_fastattn_patch", ({}, None))
    for name, module in replaced.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    if previous is not None:
        model.set_attn_implementation(previous)
    return model
