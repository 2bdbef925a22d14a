"""What every benchmark shares: the device, the run's header (date, GPU, versions), timing, tables."""

from __future__ import annotations

import datetime
import os
import platform

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # the kernels run under Triton's interpreter: parity only, no timings
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if HAS_CUDA else "cpu"


def header() -> dict:
    import triton

    return {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if HAS_CUDA else f"CPU ({platform.machine()}), "
                                                                  "Triton interpreter",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }


def time_ms(fn) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) time of fn() in ms, by triton.testing.do_bench (warmup,
    L2 flushed before each rep)."""
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(out) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
    return str(v)
