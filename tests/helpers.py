"""Shared test helpers: the error rule of DESIGN.md and the check that a kernel (not the fallback) ran."""

from __future__ import annotations

import torch

from fastattn.testing import parity


def assert_within_torch_error(name: str, ours: torch.Tensor, theirs: torch.Tensor,
                              ref: torch.Tensor, dtype: torch.dtype) -> None:
    """ours and theirs (torch's own op, same inputs, same dtype) against ref (float64):
    error(ours) <= 2 * error(theirs) + atol (fastattn.testing.parity)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != torch's {theirs.dtype}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    p = parity(ours, theirs, ref, dtype)
    assert p.ok, (f"{name}: error {p.err:.3e} > 2 x torch's {p.torch_err:.3e} + atol "
                  f"({p.bound:.3e})")


def expected_backend(device: str) -> str:
    return "triton" if torch.device(device).type == "cuda" else "triton-interpreter"


def assert_kernels_ran(log: list[tuple[str, str]], ops: list[str], device: str) -> None:
    """Every op in `ops` ran on the Triton kernel (compiled or interpreted), never the fallback."""
    want = expected_backend(device)
    for op in ops:
        assert (op, want) in log, f"{op} did not run on {want}: {log}"
    assert all(path == want for _, path in log), f"a fallback ran: {log}"
