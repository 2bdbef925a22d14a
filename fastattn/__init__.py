"""fastattn: hand-written Triton kernels for attention, LayerNorm / RMSNorm and embeddings, as
drop-ins for torch's own functions. See README.md for what is supported."""

from . import nn
from ._dispatch import backend, record_backends
from ._validate import checking
from .attention import pad, scaled_dot_product_attention, unpad, varlen_attention
from .decode import kvcache_attention
from .embedding import bert_embeddings, embedding, gpt_embeddings
from .layer_norm import add_layer_norm, layer_norm, rms_norm

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("flash_attn", "integrations", "models")  # loaded on first attribute access


def __getattr__(name):
    """fastattn.models, fastattn.integrations and fastattn.flash_attn, imported on first use (so
    `import fastattn` imports neither Triton nor transformers)."""
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def patch(model):
    """Swap a model's LayerNorm / RMSNorm / Embedding modules for fastattn's and, for a Hugging
    Face model, use fastattn attention (see fastattn.integrations.transformers.patch)."""
    from .integrations.transformers import patch as _patch

    return _patch(model)


def unpatch(model):
    """Undo fastattn.patch(model)."""
    from .integrations.transformers import unpatch as _unpatch

    return _unpatch(model)


__all__ = ["add_layer_norm", "backend", "bert_embeddings", "checking", "embedding", "flash_attn",
           "gpt_embeddings", "integrations", "kvcache_attention", "layer_norm", "models", "nn",
           "pad", "patch", "record_backends", "rms_norm", "scaled_dot_product_attention", "unpad",
           "unpatch", "varlen_attention"]
