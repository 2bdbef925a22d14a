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

from torch import Tensor, nn

from .. import nn as fnn
from ..attention import scaled_dot_product_attention

NAME = "fastattn"


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature. query (B, Hq, L, D), key / value (B, Hkv, S, D)
    (GQA handled in the kernel, no repeat_kv copies); attention_mask bool or additive float,
    broadcastable to (B, Hq, L, S), or None. Returns (B, L, Hq, Dv) and no attention weights."""
    if kwargs.get("output_attentions", False):
        raise ValueError("attn_implementation='fastattn' does not return attention weights; use "
                         "'eager' for output_attentions=True")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # A mask, when given, already holds the causal pattern; one query row (decoding) sees all keys.
    is_causal = bool(is_causal) and attention_mask is None and query.shape[2] > 1
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
