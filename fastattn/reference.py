"""Readable eager PyTorch references: the correctness oracle of the tests, and the implementation
used for CPU tensors when Triton's interpreter is off.

The first functions state each op's math plainly, with torch autograd for the gradients; run them
on float64 inputs to get the oracle. The `*_fwd` / `*_bwd` functions below them have exactly the
signatures and outputs of the Triton launchers in fastattn.kernels, so that the custom ops can fall
back to them.
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


# ---- layer norm / rms norm: launcher-shaped fallbacks (see kernels/layer_norm.py) ----


def norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
             eps: float, is_rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.layer_norm.norm_fwd: x (M, N) -> y, h, mean, rstd."""
    h = x + residual if residual is not None else x
    hf = h.float()
    if is_rms:
        mean = hf.new_empty((0,))
        rstd = torch.rsqrt(hf.square().mean(dim=-1) + eps)
        y = hf * rstd[:, None]
    else:
        mean = hf.mean(dim=-1)
        rstd = torch.rsqrt((hf - mean[:, None]).square().mean(dim=-1) + eps)
        y = (hf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    h_out = h.clone() if residual is not None else x.new_empty((0,))
    return y.to(x.dtype), h_out, mean, rstd


def norm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
             rstd: Tensor, dh: Tensor | None, is_rms: bool, compute_dweight: bool,
             compute_dbias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as fastattn.kernels.layer_norm.norm_bwd, from the saved statistics:
    xhat = (x - mean) * rstd, g = weight * dy, dx = rstd * (g - xhat * mean(g * xhat) - mean(g))."""
    dyf, rstd = dy.float(), rstd[:, None]
    xhat = x.float() * rstd if is_rms else (x.float() - mean[:, None]) * rstd
    g = dyf * weight.float() if weight is not None else dyf
    dx = g - xhat * (g * xhat).mean(dim=-1, keepdim=True)
    if not is_rms:
        dx = dx - g.mean(dim=-1, keepdim=True)
    dx = dx * rstd
    if dh is not None:
        dx = dx + dh.float()
    dweight = (dyf * xhat).sum(dim=0).to(weight.dtype) if compute_dweight else x.new_empty((0,))
    dbias = dyf.sum(dim=0).to(bias.dtype) if compute_dbias else x.new_empty((0,))
    return dx.to(x.dtype), dweight, dbias
