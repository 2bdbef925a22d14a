"""Shared test helpers: the error rule (fastattn.testing) and the check that a kernel (not the
fallback) ran."""

from __future__ import annotations

import torch

from fastattn.testing import assert_parity


def assert_within_torch_error(name: str, ours: torch.Tensor, theirs: torch.Tensor,
                              ref: torch.Tensor, dtype: torch.dtype) -> None:
    """ours and theirs (torch's own op, same inputs, same dtype) against ref (float64):
    error(ours) <= 2 * error(theirs) + atol (fastattn.testing.assert_parity)."""
    assert_parity(ours, theirs, ref, dtype, name=name)


def expected_backend(device: str) -> str:
    return "triton" if torch.device(device).type == "cuda" else "triton-interpreter"


def assert_kernels_ran(log: list[tuple[str, str]], ops: list[str], device: str) -> None:
    """Every op in `ops` ran on the Triton kernel (compiled or interpreted), never the fallback."""
    want = expected_backend(device)
    for op in ops:
        assert (op, want) in log, f"{op} did not run on {want}: {log}"
    assert all(path == want for _, path in log), f"a fallback ran: {log}"
