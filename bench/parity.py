"""Parity: every op, forward and backward, against the float64 oracle, with torch's own op in the
same dtype as the yardstick (the rule of fastattn.testing.parity):

    max|ours - ref64| <= 2 * max|torch - ref64| + atol[dtype] * max(1, max|ref64|)

for the output and every gradient, on odd sizes (cases.PARITY_SIZES) in fp32, fp16 and bf16.
"""

from __future__ import annotations

import torch

import fastattn
from fastattn.testing import parity

from . import DEVICE
from .cases import Case, Fn, Inputs
from .report import describe, record


def _out_and_grads(fn: Fn, inputs: Inputs) -> list[torch.Tensor]:
    out = fn(inputs.t)
    return [out, *torch.autograd.grad(out, inputs.leaves, inputs.dout)]


def check(case: Case, device_label: str) -> list[dict]:
    """A record per output (out, then d<input> for each differentiable input) of one case."""
    op, dtype = case.op, case.dtype
    inputs = op.make(case.size, dtype, DEVICE, 1)
    base = dict(kind="parity", op=op.name, family=op.family, impl="fastattn", shape=case.shape,
                dtype=str(dtype).removeprefix("torch."), device=device_label, size=case.size)
    try:
        with fastattn.record_backends() as ran:
            ours = _out_and_grads(op.ours, inputs)
        theirs = _out_and_grads(op.torch, inputs)
        ref = _out_and_grads(op.reference, inputs.to_float64())
    except NotImplementedError as exc:
        note = ("n/a: fastattn build without attn_mask" if "mask" in inputs.t
                else f"n/a: not implemented: {describe(exc)}")
        return [record(**base, mode="fwd", output="out", note=note)]
    except Exception as exc:  # noqa: BLE001  (a failure is a result: record it, check the rest)
        return [record(**base, mode="fwd", output="out", note=f"error: {type(exc).__name__}: "
                       f"{describe(exc)}", **{"pass": False})]
    backend = ",".join(sorted({path for _, path in ran}))
    rows = []
    for label, a, t, r in zip(["out", *(f"d{n}" for n in inputs.grads)], ours, theirs, ref):
        p = parity(a, t, r, dtype)
        rows.append(record(**base, mode="fwd" if label == "out" else "bwd", output=label,
                           err=p.err, torch_err=p.torch_err, bound=p.bound,
                           ratio=p.err / p.bound if p.bound else 0.0, backend=backend,
                           **{"pass": p.ok}))
    return rows
