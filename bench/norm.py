"""LayerNorm / RMSNorm / add_layer_norm: parity against float64 and timings against torch's own ops.

GB/s counts each tensor read or written once (statistics and parameters are small and left out):
    forward:  2 * M * N * e   (read x, write y); add_layer_norm: 4 * M * N * e (x, residual, y, h)
    backward: 3 * M * N * e   (read x and dy, write dx); add_layer_norm: 4 * M * N * e (+ dh read)
with M rows, hidden size N and e bytes per element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from fastattn.testing import parity as parity_rule

PARITY_SIZES = [(37, 97), (19, 768), (5, 4099)]
PARITY_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BENCH_ROWS = 4096 * 4
BENCH_HIDDEN = [512, 768, 1024, 2048, 4096, 8192, 16384, 65536]
BENCH_DTYPES = [torch.bfloat16, torch.float16]


def _grads(out, inputs, dy):
    return [out, *torch.autograd.grad(out, inputs, dy)]


def parity(device: str) -> list[dict]:
    """Max error against float64 of fastattn and of torch (same dtype, same inputs), every output."""
    rows = []
    for name, ours_fn, torch_fn, ref_fn in [
        ("layer_norm",
         lambda x, w, b: fastattn.layer_norm(x, x.shape[-1:], w, b),
         lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b),
         lambda x, w, b: reference.layer_norm(x, w, b, 1e-5)),
        ("rms_norm",
         lambda x, w, b: fastattn.rms_norm(x, x.shape[-1:], w, eps=1e-6) + b,
         lambda x, w, b: F.rms_norm(x, x.shape[-1:], w, eps=1e-6) + b,
         lambda x, w, b: reference.rms_norm(x, w, 1e-6) + b),
    ]:
        for m, n in PARITY_SIZES:
            for dtype in PARITY_DTYPES:
                gen = torch.Generator().manual_seed(m * n)
                x, w, b, dy = (torch.randn(*s, generator=gen).to(dtype).to(device)
                               for s in [(m, n), (n,), (n,), (m, n)])
                leaves = [t.requires_grad_() for t in (x, w, b)]
                ours = _grads(ours_fn(*leaves), leaves, dy)
                theirs = _grads(torch_fn(*leaves), leaves, dy)
                l64 = [t.detach().double().requires_grad_() for t in leaves]
                ref = _grads(ref_fn(*l64), l64, dy.double())
                for label, a, t, r in zip(["out", "dx", "dweight", "dbias"], ours, theirs, ref):
                    p = parity_rule(a, t, r, dtype)
                    rows.append({"op": name, "output": label, "shape": f"{m}x{n}",
                                 "dtype": str(dtype).removeprefix("torch."),
                                 "fastattn err": p.err, "torch err": p.torch_err,
                                 "bound": p.bound, "pass": "yes" if p.ok else "NO"})
    return rows


def timings(device: str) -> list[dict]:
    """Forward and backward GB/s of fastattn and torch for each hidden size (CUDA only)."""
    from common import time_ms

    rows = []
    for dtype in BENCH_DTYPES:
        e = torch.finfo(dtype).bits // 8
        for n in BENCH_HIDDEN:
            m = BENCH_ROWS if n <= 16384 else BENCH_ROWS // 4
            x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
            r = torch.randn(m, n, device=device, dtype=dtype)
            w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(m, n, device=device, dtype=dtype)
            cases = {
                "layer_norm": (lambda: fastattn.layer_norm(x, (n,), w, b),
                               lambda: F.layer_norm(x, (n,), w, b), 2, 3),
                "rms_norm": (lambda: fastattn.rms_norm(x, (n,), w),
                             lambda: F.rms_norm(x, (n,), w), 2, 3),
                "add_layer_norm": (lambda: fastattn.add_layer_norm(x, r, (n,), w, b)[0],
                                   lambda: F.layer_norm(x + r, (n,), w, b), 4, 4),
            }
            for op, (ours, theirs, fwd_tensors, bwd_tensors) in cases.items():
                row = {"op": op, "dtype": str(dtype).removeprefix("torch."), "M": m, "N": n}
                for label, fn in (("fastattn", ours), ("torch", theirs)):
                    fwd = time_ms(fn)[0]
                    y = fn()
                    bwd = time_ms(lambda: torch.autograd.grad(y, [x, w, b], dy, retain_graph=True))[0]
                    row[f"{label} fwd GB/s"] = fwd_tensors * m * n * e / fwd / 1e6
                    row[f"{label} bwd GB/s"] = bwd_tensors * m * n * e / bwd / 1e6
                rows.append(row)
    return rows
