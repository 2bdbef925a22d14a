"""Integrations with other libraries (each imports its library lazily; `import fastattn` imports none).

    fastattn.integrations.transformers      Hugging Face transformers: attn_implementation="fastattn"
"""

_LAZY_SUBMODULES = ("transformers",)  # loaded on first attribute access


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
