"""fastattn.nn modules: torch's constructors, defaults, parameter names and state_dicts; fastattn's
kernels in forward."""

from __future__ import annotations

import pytest
import torch

import fastattn
from helpers import assert_kernels_ran


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"elementwise_affine": False},
                                    {"eps": 1e-6}])
def test_layer_norm_module_matches_torch(kwargs, device):
    torch.manual_seed(0)
    ours = fastattn.nn.LayerNorm((3, 32), **kwargs, device=device)
    theirs = torch.nn.LayerNorm((3, 32), **kwargs, device=device)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert (ours.eps, ours.normalized_shape) == (theirs.eps, theirs.normalized_shape)
    with torch.no_grad():  # non-default parameters, so that loading them matters
        for p in theirs.parameters():
            p.uniform_(-2, 2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 3, 32, device=device)
    with fastattn.record_backends() as ran:
        y = ours(x)
    assert_kernels_ran(ran, ["norm_fwd"], device)
    torch.testing.assert_close(y, theirs(x), atol=1e-5, rtol=1e-5)
    theirs.load_state_dict(ours.state_dict())  # and back


def test_layer_norm_module_without_bias_has_no_bias():
    m = fastattn.nn.LayerNorm(8, bias=False)
    assert m.bias is None and [n for n, _ in m.named_parameters()] == ["weight"]
    assert isinstance(m, torch.nn.LayerNorm)


@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-6}, {"elementwise_affine": False}])
def test_rms_norm_module_matches_torch(kwargs, device):
    torch.manual_seed(0)
    ours = fastattn.nn.RMSNorm(64, **kwargs, device=device)
    theirs = torch.nn.RMSNorm(64, **kwargs, device=device)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.eps == theirs.eps
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(-2, 2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 64, device=device)
    with fastattn.record_backends() as ran:
        y = ours(x)
    assert_kernels_ran(ran, ["norm_fwd"], device)
    torch.testing.assert_close(y, theirs(x), atol=1e-5, rtol=1e-5)


def test_module_gradients_match_torch(device):
    ours = fastattn.nn.LayerNorm(48, device=device)
    theirs = torch.nn.LayerNorm(48, device=device)
    x = torch.randn(4, 48, device=device)
    dy = torch.randn(4, 48, device=device)
    for m in (ours, theirs):
        m(x.requires_grad_()).backward(dy)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(theirs, name).grad,
                                   atol=1e-5, rtol=1e-5)
