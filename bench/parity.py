"""Parity: every op, forward and backward, against the float64 oracle, with torch's own op in the
same dtype as the yardstick (the rule of fastattn.testing.parity):

    max|ours - ref64| <= 2 * max|torch - ref64| + atol[dtype] * max(1, max|ref64|)

for the output and every gradient, on odd sizes (cases.PARITY_SIZES) in fp32, fp16 and bf16 (those
of them the device supports: device_dtypes). The decode ops (inference only) have the output
alone: fastattn.kvcache_attention on ragged caches, contiguous and paged, against
fastattn.reference.kvcache_attention in float64, torch's error that of SDPA on the same rows
(the rows past each sequence's cache_seqlens masked). `python -m bench` runs it first; `fastattn-check`
(bench/check.py) runs it alone.
"""

from __future__ import annotations

import re

import torch

import fastattn
from fastattn.testing import parity

from . import DEVICE, HAS_CUDA
from .cases import PARITY_DTYPES, Case, Fn, Inputs, parity_cases
from .report import describe, progress, record


def device_dtypes() -> tuple[torch.dtype, ...]:
    """The parity dtypes this device runs: all three on the CPU (the interpreter) and on a GPU with
    native bf16 (sm_80 on); fp32 and fp16 on an older GPU, whose bf16 Triton does not compile."""
    if not HAS_CUDA:
        return PARITY_DTYPES
    try:
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument: native bf16 is sm_80 on
        bf16 = torch.cuda.get_device_capability()[0] >= 8
    return tuple(d for d in PARITY_DTYPES if d is not torch.bfloat16 or bf16)


def run(quick: bool, pattern: str, device_label: str) -> list[dict]:
    """The records of every parity case (quick: one size per op) of the ops whose name matches
    the regex, in every dtype of device_dtypes, with a progress bar on stderr."""
    todo = [c for c in parity_cases(quick, device_dtypes()) if re.search(pattern, c.op.name)]
    return [r for case in progress(todo, "parity", lambda c: c.title)
            for r in check(case, device_label)]


def _out_and_grads(fn: Fn, inputs: Inputs) -> list[torch.Tensor]:
    """[out, the gradient of each differentiable input]; [out] for an op with none (decode)."""
    if not inputs.grads:
        with torch.no_grad():
            return [fn(inputs.t)]
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
