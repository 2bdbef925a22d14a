"""The numerical parity rule every fastattn op is held to (DESIGN.md), shared by tests and bench.

An output passes when its error against a float64 reference is at most twice the error of torch's
own op run in the same dtype on the same inputs, plus a small atol relative to the output's size:

    max|ours - ref64| <= 2 * max|torch - ref64| + ATOL[dtype] * max(1, max|ref64|)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclass
class Parity:
    err: float  # max |ours - ref|
    torch_err: float  # max |torch - ref|
    bound: float  # 2 * torch_err + atol

    @property
    def ok(self) -> bool:
        return self.err <= self.bound


def parity(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor,
           dtype: torch.dtype) -> Parity:
    """Compare ours and theirs (torch's own op, same inputs and dtype) with ref (float64)."""
    ref = ref.to(ours.device)
    if ref.numel() == 0:
        return Parity(0.0, 0.0, 0.0)
    scale = max(1.0, ref.abs().max().item())
    err = (ours.double() - ref).abs().max().item()
    torch_err = (theirs.to(ours.device).double() - ref).abs().max().item()
    return Parity(err, torch_err, 2 * torch_err + ATOL[dtype] * scale)
