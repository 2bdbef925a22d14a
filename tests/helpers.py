"""Shared test helpers: the error rule of DESIGN.md and the check that a kernel (not the fallback) ran."""

from __future__ import annotations

import torch

import fastattn

# Per dtype: the atol of the rule, relative to the size of the reference values.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item() if ref.numel() else 0.0


def assert_within_torch_error(name: str, ours: torch.Tensor, theirs: torch.Tensor,
                              ref: torch.Tensor, dtype: torch.dtype) -> None:
    """ours and theirs (torch's own op, same inputs, same dtype) against ref (float64):
    error(ours) <= 2 * error(theirs) + atol."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != torch's {theirs.dtype}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err, torch_err = max_err(ours, ref), max_err(theirs, ref)
    bound = 2 * torch_err + ATOL[dtype] * scale
    assert err <= bound, f"{name}: error {err:.3e} > 2 x torch's {torch_err:.3e} + atol ({bound:.3e})"


def expected_backend(device: str) -> str:
    return "triton" if torch.device(device).type == "cuda" else "triton-interpreter"


def assert_kernels_ran(log: list[tuple[str, str]], ops: list[str], device: str) -> None:
    """Every op in `ops` ran on the Triton kernel (compiled or interpreted), never the fallback."""
    want = expected_backend(device)
    for op in ops:
        assert (op, want) in log, f"{op} did not run on {want}: {log}"
    assert all(path == want for _, path in log), f"a fallback ran: {log}"
