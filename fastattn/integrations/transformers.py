"""Hugging Face transformers on fastattn, in one line.

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()                                   # idempotent
    model = AutoModel.from_config(cfg, attn_implementation="fastattn")
    # or, on an existing model: model.set_attn_implementation("fastattn")
    # or swap norms and embeddings too: fastattn.patch(model) ... fastattn.unpatch(model)

register() adds "fastattn" to transformers' AttentionInterface (the attention function) and to its
AttentionMaskInterface (the mask builder; without it transformers would pass attention_mask=None
and padding would be silently ignored). A causal or sliding-window causal mask (transformers' own
patterns, nothing or'ed / and'ed on) whose last query and last key are one position is handed over
as its (B, S) key-padding part, tagged with the window: the kernel applies the causal mask
(bottom-right aligned, so decoding steps with a KV cache too), the window and the key padding,
and no (B, 1, L, S) mask is built. Every other mask is a torch-SDPA style boolean (True =
attend); a padding-only bidirectional mask (BERT) is handed over as (B, 1, 1, S), the key-padding
form on which fastattn's kernel skips fully padded key blocks.

Decoding steps (generate()'s one new query per step, or up to 16 queries on a longer KV cache)
that need no gradient run on fastattn.kvcache_attention, the decode op (flash-decoding): HF's
cache already holds the step's keys, so the op reads it as it is ((B, Hkv, S, D) viewed as
(B, S, Hkv, D), no copy) with the key mask of the call as its key_padding_mask (left padding, a
static cache's unwritten tail). A call the op cannot honour exactly (dropout, position_bias, a
float mask or one that differs per query or head, a gradient) takes the prefill kernel's path.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor, nn

from .. import nn as fnn
from .._dispatch import needs_grad
from ..attention import scaled_dot_product_attention, varlen_attention
from ..decode import kvcache_attention

NAME = "fastattn"


# What transformers may hand the attention function besides q, k, v and the mask, and what
# fastattn does with each. Every other keyword with a value (not None / False) is refused.
#   applied:          dropout, scaling, is_causal, position_bias (added to the mask, as HF's SDPA
#                     path does), softcap (Gemma 2: the kernel caps the scaled scores to
#                     softcap * tanh(s / softcap) before the mask), s_aux (GPT-OSS's sinks, (Hq,):
#                     one more logit per head in each row's softmax, with no value; it gets its
#                     gradient), cu_seq_lens_q / _k + max_length_q / _k (packed sequences, run with
#                     varlen_attention as flash-attn's path does; batch 1)
#   in the kernel:    sliding_window, as a window: W keys, the query's own and the W - 1 before it
#                     (transformers' kv_idx > q_idx - W), with the causal mask and the key padding
#                     when the mask builder handed over a (B, S) key-padding mask (window from the
#                     mask pattern), from the keyword when no mask is given (flash-attn's reading:
#                     causal (W - 1, 0), bidirectional (W - 1, W - 1)), and for packed sequences
#   in the mask:      sliding_window, position_ids with any other mask (the dense mask the builder
#                     makes holds the window and the packed-sequence boundaries)
#   no effect here:   _NO_EFFECT below (model-level flags that reach every layer's kwargs)
#   refused if set:   output_attentions, seq_idx
_NO_EFFECT = frozenset({"use_cache", "output_router_logits", "output_hidden_states",
                        "num_items_in_batch", "cache_position", "past_key_values",
                        "past_key_value", "return_dict", "layer_idx"})
_APPLIED = frozenset({"softcap", "s_aux", "sliding_window", "position_ids"})
_REFUSED = {
    "output_attentions": "fastattn never materialises the attention weights",
    "seq_idx": "per-token sequence indices are not read by fastattn; pass cu_seq_lens_q / _k",
}
_VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# Attribute of the (B, S) key-padding masks attention_mask() makes for causal patterns: (window,
# padded), window None or W keys, padded False when no key is padding (the mask is all True).
_CAUSAL_SPEC = "_fastattn_causal"


def _has_value(value) -> bool:
    return value is not None and value is not False


def _check_keywords(module: nn.Module, kwargs: dict) -> None:
    """Refuse, naming it, every keyword that would change the result and that fastattn does not
    apply (see the table above)."""
    for key, value in kwargs.items():
        if key in _NO_EFFECT or key in _VARLEN or key in _APPLIED:
            continue
        if not _has_value(value):
            continue
        why = _REFUSED.get(key, "fastattn does not know this keyword, so it cannot honour it")
        raise ValueError(f"attn_implementation='fastattn' got {key}={_describe(value)} from "
                         f"{type(module).__name__}: {why}; use attn_implementation='eager' for "
                         "this model")


def _describe(value) -> str:
    return f"<tensor {list(value.shape)}>" if isinstance(value, Tensor) else repr(value)


def _score_modifiers(kwargs: dict) -> dict:
    """fastattn's softcap / sinks arguments from transformers' softcap / s_aux keywords."""
    softcap = kwargs.get("softcap")
    return {"softcap": 0.0 if softcap is None else float(softcap), "sinks": kwargs.get("s_aux")}


def _window_size(window, causal: bool) -> tuple[int, int]:
    """fastattn's (left, right) window for transformers' sliding_window of W keys: the query's own
    key and the W - 1 before it when causal, W - 1 either side (flash-attn's symmetric reading)
    when not; (-1, -1), unbounded, for None."""
    if window is None:
        return (-1, -1)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be a positive int (the keys a query sees), got "
                         f"{window!r}")
    return (window - 1, 0 if causal else window - 1)


def _causal_spec(module: nn.Module, mask: Tensor) -> tuple[Optional[int], bool]:
    """(window, padded) of a (B, S) key-padding mask made by attention_mask() below."""
    spec = getattr(mask, _CAUSAL_SPEC, None)
    if spec is None:
        raise ValueError(f"attn_implementation='fastattn' got a 2-D attention_mask "
                         f"{list(mask.shape)} from {type(module).__name__} that fastattn's mask "
                         "builder did not make, so what it hides besides padded keys is unknown; "
                         "pass a (B, 1, L, S) mask (or build the model with "
                         "attn_implementation='fastattn' after register())")
    return spec


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
    sequence attends to itself only, as flash-attn's path runs them (the causal mask and the
    window bottom-right aligned in each sequence). query (1, Hq, T, D) -> (1, T, Hq, Dv)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        raise ValueError("attn_implementation='fastattn' needs both cu_seq_lens_q and "
                         "cu_seq_lens_k for packed sequences, got only one")
    if query.shape[0] != 1:
        raise ValueError(f"cu_seq_lens_q / _k describe one packed row, but the batch has "
                         f"{query.shape[0]} rows")
    lengths = (cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1])
    max_q, max_k = (kwargs.get(name) for name in ("max_length_q", "max_length_k"))
    max_q, max_k = (int(m) if m is not None else int(n.max()) if n.numel() else 0
                    for m, n in zip((max_q, max_k), lengths))
    window = _window_size(kwargs.get("sliding_window"), is_causal)
    # (1, H, T, D) -> (T, H, D)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = varlen_attention(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
                           causal=is_causal, dropout_p=dropout, scale=scaling,
                           window_size=window, bottom_right=True, **_score_modifiers(kwargs))
    return out[None]  # (T, Hq, Dv) -> (1, T, Hq, Dv)


# Query lengths the decode op takes over (L < S, so a prefill never): generate()'s steps (1),
# speculative / chunked continuations up to this many.
_DECODE_MAX_QUERIES = 16
_DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _decode_attention(query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor],
                      is_causal: bool, window, scaling: Optional[float],
                      kwargs: dict) -> Optional[Tensor]:
    """A decoding step on the KV-cache decode op, or None when the call is not one it runs as
    given (see the module docstring; the caller then takes the prefill path). query (B, Hq, L, D),
    key / value (B, Hkv, S, D) with the step's keys in them already; mask None or bool (B, 1, 1, S)
    (any dim 1 broadcast): a key mask, the same for every query and head, with is_causal (and the
    window) bottom-right aligned on the S keys, as the prefill call would apply them. Returns
    (B, L, Hq, Dv)."""
    B, Hq, L, D = query.shape
    S = key.shape[2]
    if not 0 < L < S or L > _DECODE_MAX_QUERIES or query.dtype not in _DECODE_DTYPES:
        return None
    sinks = kwargs.get("s_aux")
    if needs_grad(query, key, value, sinks):
        return None
    keys = None
    if mask is not None:
        if (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1)
                or mask.shape[0] not in (1, B) or mask.shape[3] != S):
            return None
        keys = mask[:, 0, 0, :].expand(B, S)  # (B or 1, 1, 1, S) -> (B, S)
    # (B, H, S, D) -> (B, S, H, D): views of transformers' cache, no copy
    q, k_cache, v_cache = (t.transpose(1, 2) for t in (query, key, value))
    return kvcache_attention(q, k_cache, v_cache, scale=scaling, causal=is_causal,
                             window_size=_window_size(window, is_causal), key_padding_mask=keys,
                             **_score_modifiers(kwargs))


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      position_bias: Optional[Tensor] = None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature. query (B, Hq, L, D), key / value (B, Hkv, S, D)
    (GQA handled in the kernel, no repeat_kv copies); attention_mask: a (B, S) key-padding mask
    from attention_mask() below (causal, its window, bottom-right aligned: query i sees keys
    j <= i + S - L), bool or additive float broadcastable to (B, Hq, L, S) (the whole pattern), or
    None (is_causal, bottom-right aligned, and sliding_window). Returns (B, L, Hq, Dv) and no
    attention weights. Every keyword is applied or refused with a ValueError naming it (the table
    above). Decoding steps without dropout, position_bias or a gradient run on the decode op when
    the mask is a key mask (_decode_attention), the rest on scaled_dot_product_attention."""
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
    if attention_mask is not None and attention_mask.dim() == 2:
        window, padded = _causal_spec(module, attention_mask)
        is_causal = True
        # (B, S) -> (B, 1, 1, S), the key-padding form; None when no key is padding
        attention_mask = attention_mask[:, None, None, :] if padded else None
    elif attention_mask is not None:
        is_causal, window = False, None  # a dense mask holds the whole pattern
    is_causal = bool(is_causal)
    if position_bias is None and not dropout:
        out = _decode_attention(query, key, value, attention_mask, is_causal, window, scaling,
                                kwargs)
        if out is not None:
            return out, None
    if position_bias is not None:
        attention_mask = _with_position_bias(position_bias, attention_mask)
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                       dropout_p=dropout, is_causal=is_causal, scale=scaling,
                                       enable_gqa=query.shape[1] != key.shape[1],
                                       window_size=_window_size(window, is_causal),
                                       bottom_right=query.shape[2] != key.shape[2],
                                       **_score_modifiers(kwargs))
    return out.transpose(1, 2).contiguous(), None  # (B, Hq, L, Dv) -> (B, L, Hq, Dv)


def _closure_value(fn, like, name: str):
    """The value `fn` closes over as `name` when `fn` runs the code of the function `like`, else
    None."""
    code = getattr(fn, "__code__", None)
    if code is None or code is not like.__code__ or name not in code.co_freevars:
        return None
    return fn.__closure__[code.co_freevars.index(name)].cell_contents


def _causal_window(masking_utils, mask_function) -> Optional[int]:
    """0 for transformers' causal mask function, W for its sliding-window causal one
    (sliding_window_causal_mask_function(W): a query sees its own key and the W - 1 before it),
    None for any other (a pattern or'ed / and'ed on, packed sequences, chunks, ...)."""
    if mask_function is masking_utils.causal_mask_function:
        return 0
    parts = _closure_value(mask_function, masking_utils.sliding_window_causal_mask_function(1),
                           "mask_functions")
    if (not isinstance(parts, tuple) or len(parts) != 2
            or parts[1] is not masking_utils.causal_mask_function):
        return None
    window = _closure_value(parts[0], masking_utils.sliding_window_overlay(1), "sliding_window")
    return window if type(window) is int and window >= 1 else None


def _causal_key_mask(masking_utils, batch_size: int, q_length: int, kv_length: int,
                     q_offset=0, kv_offset=0, mask_function=None,
                     attention_mask: Optional[Tensor] = None, local_size=None, device="cpu",
                     **_) -> Optional[Tensor]:
    """For a causal or sliding-window causal pattern whose last query and last key are one
    position (q_offset + L == kv_offset + S: no cache, a dynamic or sliding-window cache; not a
    static cache's longer buffer), the (B, S) bool key-padding mask tagged with its window (the
    kernel applies the rest); else None. attention_mask: transformers' 2-D padding mask (B, >= S)
    over absolute key positions, or None."""
    window = _causal_window(masking_utils, mask_function)
    aligned = (type(q_offset) is int and type(kv_offset) is int
               and q_offset + q_length == kv_offset + kv_length)
    if window is None or not aligned or local_size not in (None, window or None):
        return None
    if attention_mask is None:
        keys = torch.ones((batch_size, kv_length), dtype=torch.bool, device=device)
    else:
        keys = attention_mask.to(device=device, dtype=torch.bool)
        if (missing := kv_offset + kv_length - keys.shape[-1]) > 0:  # padded as transformers does
            keys = nn.functional.pad(keys, (0, missing))
        keys = keys[:, kv_offset:kv_offset + kv_length]  # (B, >= S) -> (B, S)
    # Contiguous, so that the tag survives generate()'s .contiguous() of the masks it prepares for
    # compileable (static) caches: a copy would drop it.
    keys = keys.contiguous()
    setattr(keys, _CAUSAL_SPEC, (window or None, attention_mask is not None))
    return keys


def attention_mask(**kwargs) -> Optional[Tensor]:
    """transformers' mask-builder signature: a tagged (B, S) key-padding mask for causal and
    sliding-window causal patterns (see _causal_key_mask); else the SDPA boolean mask, always built
    for causal patterns (attention_forward reads None as a causal mask bottom-right aligned, which
    a static cache's prefill is not), None for a bidirectional one without padding, and a
    padding-only bidirectional mask as (B, 1, 1, S)."""
    from transformers import masking_utils

    keys = _causal_key_mask(masking_utils, **kwargs)
    if keys is not None:
        return keys
    mask = masking_utils.sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})
    bidirectional = kwargs.get("mask_function") is masking_utils.bidirectional_mask_function
    if mask is not None and bidirectional and kwargs.get("local_size") is None:
        # Every query row of a padding-only mask is the same key mask: keep one row.
        return mask[:, :, :1, :]  # (B, 1, L, S) -> (B, 1, 1, S)
    return mask


def _check_kernels_not_hidden() -> None:
    """Refuse, naming the cause, when fastattn's source folder kernels/ (installed as
    fastattn.kernels) is on sys.path as the top-level package `kernels`, as a clone's root is when
    it is the working directory: it hides Hugging Face's `kernels` package, which
    transformers >= 5.25 imports, and transformers would fail with an ImportError inside it."""
    import importlib.metadata
    import importlib.util

    top = importlib.util.find_spec("kernels")
    ours = importlib.util.find_spec("fastattn.kernels")
    if top is None or ours is None or top.origin != ours.origin:
        return
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # no Hugging Face `kernels` installed: nothing is hidden
    folder = os.path.dirname(ours.origin)
    raise ImportError(
        f"transformers cannot import Hugging Face's `kernels` package: sys.path holds a fastattn "
        f"clone's root, whose folder {folder} (installed as fastattn.kernels) then hides it as "
        f"the top-level `kernels`. Run from another directory, or with python -P.")


def register() -> None:
    """Make attn_implementation="fastattn" available to transformers models (idempotent)."""
    _check_kernels_not_hidden()
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
