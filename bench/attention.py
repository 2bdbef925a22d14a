"""Fused attention: parity against float64 and timings against torch's SDPA backends.

TFLOP/s counts the matmul FLOPs of exact attention:
    forward:  4 * B * H * L * S * D     (q @ k^T and p @ v; halved when causal)
    backward: 2.5 x forward              (five matmuls instead of two)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from fastattn.testing import parity as parity_rule

# (B, Hq, Hkv, L, S, D)
PARITY_SHAPES = [(2, 3, 3, 17, 17, 64), (1, 2, 2, 100, 37, 40), (2, 4, 2, 33, 33, 64)]
PARITY_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, N, D) at a constant B * N = 16384 tokens
BENCH_SHAPES = [(16, 16, 1024, 64), (8, 16, 2048, 128), (4, 16, 4096, 128), (2, 16, 8192, 128),
                (4, 8, 4096, 256)]
BENCH_DTYPES = [torch.bfloat16, torch.float16]


def parity(device: str) -> list[dict]:
    rows = []
    for shape in PARITY_SHAPES:
        B, Hq, Hkv, L, S, D = shape
        gqa = Hq != Hkv
        for dtype in PARITY_DTYPES:
            for causal in (False, True):
                gen = torch.Generator().manual_seed(L * S)
                q, k, v, do = (torch.randn(*s, generator=gen).to(dtype).to(device)
                               for s in [(B, Hq, L, D), (B, Hkv, S, D), (B, Hkv, S, D),
                                         (B, Hq, L, D)])
                leaves = [t.requires_grad_() for t in (q, k, v)]
                out = fastattn.scaled_dot_product_attention(*leaves, is_causal=causal,
                                                            enable_gqa=gqa)
                ours = [out, *torch.autograd.grad(out, leaves, do)]
                t_out = F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=gqa)
                theirs = [t_out, *torch.autograd.grad(t_out, leaves, do)]
                l64 = [t.detach().double().requires_grad_() for t in leaves]
                r_out = reference.scaled_dot_product_attention(*l64, causal)[0]
                ref = [r_out, *torch.autograd.grad(r_out, l64, do.double())]
                for label, a, t, r in zip(["out", "dq", "dk", "dv"], ours, theirs, ref):
                    p = parity_rule(a, t, r, dtype)
                    rows.append({"op": "sdpa" + (" causal" if causal else ""), "output": label,
                                 "shape": "x".join(map(str, shape)),
                                 "dtype": str(dtype).removeprefix("torch."),
                                 "fastattn err": p.err, "torch err": p.torch_err,
                                 "bound": p.bound, "pass": "yes" if p.ok else "NO"})
    return rows


def _torch_backends():
    from torch.nn.attention import SDPBackend

    return {"torch flash": SDPBackend.FLASH_ATTENTION, "torch cudnn": SDPBackend.CUDNN_ATTENTION,
            "torch efficient": SDPBackend.EFFICIENT_ATTENTION}


def timings(device: str) -> list[dict]:
    """Forward and backward TFLOP/s of fastattn and of each torch SDPA backend (CUDA only)."""
    from torch.nn.attention import sdpa_kernel

    from common import time_ms

    rows = []
    for dtype in BENCH_DTYPES:
        for B, H, N, D in BENCH_SHAPES:
            for causal in (False, True):
                q, k, v, do = (torch.randn(B, H, N, D, device=device, dtype=dtype)
                               for _ in range(4))
                for t in (q, k, v):
                    t.requires_grad_()
                fwd_flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
                row = {"dtype": str(dtype).removeprefix("torch."), "B": B, "H": H, "N": N,
                       "D": D, "causal": causal}
                impls = {"fastattn": (lambda: fastattn.scaled_dot_product_attention(
                    q, k, v, is_causal=causal), None)}
                impls.update({name: (lambda: F.scaled_dot_product_attention(
                    q, k, v, is_causal=causal), backend)
                    for name, backend in _torch_backends().items()})
                for name, (fn, backend) in impls.items():
                    try:
                        ctx = sdpa_kernel(backend) if backend is not None else _null()
                        with ctx:
                            fwd = time_ms(fn)[0]
                            out = fn()
                            bwd = time_ms(lambda: torch.autograd.grad(out, [q, k, v], do,
                                                                      retain_graph=True))[0]
                        row[f"{name} fwd"] = fwd_flops / fwd / 1e9
                        row[f"{name} bwd"] = 2.5 * fwd_flops / bwd / 1e9
                    except RuntimeError:  # a backend that refuses this shape or dtype
                        row[f"{name} fwd"] = row[f"{name} bwd"] = "n/a"
                rows.append(row)
    return rows


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
