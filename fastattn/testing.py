"""The numerical rule fastattn holds every op to, as a public API for your own tests.

An output (or a gradient) passes when its error against a float64 reference is at most twice the
error of torch's own op run in the same dtype on the same inputs, plus a small atol relative to the
output's size:

    max|ours - ref64| <= 2 * max|torch - ref64| + ATOL[dtype] * max(1, max|ref64|)

torch's own error is the yardstick: a bf16 or fp16 result is as close to the exact answer as its
dtype lets torch get, and no closer, so a fixed tolerance would be too tight for bf16 or too loose
for fp32. The atol covers outputs where torch happens to be exact (ATOL: fp32 1e-5, fp16 1e-3,
bf16 8e-3). fastattn's tests, `python -m bench` and `fastattn-check` all use this module.

    ATOL                                  dtype -> the atol above
    parity(ours, theirs, ref, dtype)      -> Parity(err, torch_err, bound); .ok is the verdict
    assert_parity(ours, theirs, ref)      raises AssertionError naming the output, both errors and
                                          the bound (for pytest; also checks shape, dtype and
                                          that ours is finite)

In your own test, with fastattn in a model of yours or on its own:

    import torch, torch.nn.functional as F, fastattn
    from fastattn.testing import assert_parity

    q, k, v = (torch.randn(2, 8, 100, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))       # (B, H, N, D)
    ours = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    assert_parity(ours, theirs, ref, name="out")
    dout = torch.randn_like(ours)
    for name, a, t, r in zip(("dq", "dk", "dv"),
                             torch.autograd.grad(ours, (q, k, v), dout),
                             torch.autograd.grad(theirs, (q, k, v), dout),
                             torch.autograd.grad(ref, (q64, k64, v64), dout.double())):
        assert_parity(a, t, r, name=name)

The reference is the same computation on float64 copies of the inputs (torch's own op in float64,
or fastattn.reference), on any device: it is moved to ours' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclass
class Parity:
    """One comparison's numbers (floats, on the host)."""

    err: float  # max |ours - ref|
    torch_err: float  # max |torch - ref|
    bound: float  # 2 * torch_err + ATOL[dtype] * max(1, max |ref|)

    @property
    def ok(self) -> bool:
        """err <= bound: ours is within the rule (False when err is NaN)."""
        return self.err <= self.bound


def parity(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor,
           dtype: torch.dtype) -> Parity:
    """Compare ours and theirs (torch's own op, same inputs and dtype) with ref (float64).

    ours, theirs: the outputs (any shape, any float dtype) of fastattn's op and torch's on the same
    inputs; ref: the float64 reference, of the same shape (values are compared elementwise, with
    torch's broadcasting; assert_parity checks the shapes); dtype: the inputs' dtype, which picks
    the atol (float32, float16 or bfloat16). An empty ref passes with every number 0."""
    if dtype not in ATOL:
        raise ValueError(f"dtype {dtype} has no atol: the rule is defined for "
                         f"{', '.join(str(d) for d in ATOL)}")
    ref = ref.to(ours.device)
    if ref.numel() == 0:
        return Parity(0.0, 0.0, 0.0)
    scale = max(1.0, ref.abs().max().item())
    err = (ours.double() - ref).abs().max().item()
    torch_err = (theirs.to(ours.device).double() - ref).abs().max().item()
    return Parity(err, torch_err, 2 * torch_err + ATOL[dtype] * scale)


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor,
                  dtype: torch.dtype | None = None, name: str = "output") -> Parity:
    """Assert that ours is within the rule (see parity) and return its numbers.

    ours, theirs: fastattn's and torch's output on the same inputs, same shape and dtype; ref:
    the float64 reference of that shape; dtype: the inputs' dtype (default ours'); name: what the
    message calls the output ("out", "dq", ...). Raises AssertionError when the shapes or dtypes
    differ, ours is not finite, or its error is over the bound."""
    # raise, not assert: the check must hold under python -O too
    if ours.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}")
    if ours.dtype != theirs.dtype:
        raise AssertionError(f"{name}: dtype {ours.dtype} != torch's {theirs.dtype}")
    if not torch.isfinite(ours).all():
        raise AssertionError(f"{name}: non-finite values")
    p = parity(ours, theirs, ref, ours.dtype if dtype is None else dtype)
    if not p.ok:
        raise AssertionError(f"{name}: error {p.err:.3e} > 2 x torch's {p.torch_err:.3e} + atol "
                             f"({p.bound:.3e})")
    return p
