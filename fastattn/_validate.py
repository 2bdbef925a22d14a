"""Checks at the public boundary: each raises TypeError / ValueError naming the argument, the value
and the rule, so bad input never reaches a kernel."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, value, *, dtypes=KERNEL_DTYPES) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(value.dtype).removeprefix('torch.')}; "
                        f"supported: {allowed}")


def check_same_device(**tensors) -> None:
    """All given (non-None) tensors on one device."""
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"expected all tensors on one device, got {where}")


def check_same_dtype(**tensors) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    if len({v.dtype for v in present.values()}) > 1:
        what = ", ".join(f"{k} {str(v.dtype).removeprefix('torch.')}" for k, v in present.items())
        raise TypeError(f"expected one dtype, got {what}")


_checking = [os.environ.get("FASTATTN_CHECKS", "0").lower() in ("1", "true", "on", "yes")]


@contextlib.contextmanager
def checking(enabled: bool = True) -> Iterator[None]:
    """Checking mode for CUDA tensors: inside the block (or for the whole process with the
    environment variable FASTATTN_CHECKS=1, read at import) the checks that read values back from
    the GPU run, at the cost of a host sync per call: embedding indices in range (IndexError) and
    varlen cu_seqlens well-formed (ValueError). By default they do not run on CUDA: a bad index
    gives a zero row and no gradient, a bad cu_seqlens is clamped to the packed rows, and nothing
    is read or written out of bounds. On the CPU the checks always run (no sync to save).

        >>> with fastattn.checking():
        ...     out = fastattn.embedding(ids, weight)  # IndexError for an out-of-range id
    """
    previous = _checking[0]
    _checking[0] = bool(enabled)
    try:
        yield
    finally:
        _checking[0] = previous


def read_device_values(t: torch.Tensor) -> bool:
    """Whether a check may read t's values back to the host: on the CPU always, on other devices
    (a host sync each) in checking mode only; never while torch.compile traces or a CUDA graph is
    being captured, where a sync is not allowed (each check's docstring says what an unchecked
    bad value then does)."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    return _checking[0] and not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_dropout_p(dropout_p) -> None:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p!r}")


def dropout_seed(dropout_p, device: torch.device) -> torch.Tensor | None:
    """Check 0 <= dropout_p <= 1 and draw the seed of an in-kernel dropout mask; None when there is
    no dropout. The seed is a (1,) int64 tensor drawn on `device` from torch's generator for it, and
    the kernels read it from memory: torch.manual_seed reproduces the mask, the host never reads
    the value (no sync), torch.compile traces the draw into its graph, and a captured CUDA graph
    draws a new seed, hence a new mask, on every replay."""
    check_dropout_p(dropout_p)
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
