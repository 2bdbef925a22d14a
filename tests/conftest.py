"""Test setup: CUDA when present; otherwise Triton's interpreter runs the same kernels on the CPU.

TRITON_INTERPRET has to be set before Triton is imported, hence here, at the top.
"""

import os
import sys

import pytest
import torch

# The clone's root holds kernels/, installed as fastattn.kernels. On sys.path, where
# `python -m pytest` puts the working directory, it would be the top-level package `kernels` and
# hide Hugging Face's own `kernels`, which transformers >= 5.25 imports. The tests use the
# installed fastattn only.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Triton decides at import whether its own library functions (tl.sum's combine function, ...)
    # are interpreted: import it now, before any test flips TRITON_INTERPRET off for a while.
    import triton  # noqa: F401

DEVICE = "cuda" if HAS_CUDA else "cpu"

# On a GPU the tests run every pass's default launch setting, the one the static Hopper check
# gates, not whichever candidate timing favoured (kernels/autotune.py; its own tests turn it on).
os.environ.setdefault("FASTATTN_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled floating tensors, so an output element a kernel forgets to
    write shows up as NaN instead of a plausible leftover value."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
