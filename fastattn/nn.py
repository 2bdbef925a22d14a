"""nn.Module drop-ins. Each subclasses its torch counterpart, so constructors, defaults, parameter
names, state_dicts and isinstance checks are torch's own; only forward runs fastattn's kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from .layer_norm import layer_norm, rms_norm


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
    device=None, dtype=None), computed by fastattn.layer_norm."""

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True, device=None,
    dtype=None), computed by fastattn.rms_norm."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)
