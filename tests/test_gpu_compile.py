"""Every kernel variant compiles for Hopper (sm_90) even on a machine without a GPU: Triton's front
end plus the ptxas that ships with Triton (tests/sm90_compile.py, in a subprocess where the kernels
are not interpreted). Catches GPU-only compile errors the interpreter hides."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("sm90_compile.py")


def test_every_kernel_variant_compiles_for_sm90():
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton build ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "90"], capture_output=True, text=True,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) >= 29, run.stdout  # 13 norm / embedding + 16 attention variants
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} [{r['variant']}]: {r['error']}" for r in failed)
