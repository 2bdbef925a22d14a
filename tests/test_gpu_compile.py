"""Every kernel variant compiles for Hopper (sm_90) even on a machine without a GPU: Triton's front
end plus the ptxas that ships with Triton (tests/sm90_compile.py, in a subprocess where the kernels
are not interpreted). Catches GPU-only compile errors the interpreter hides. Also: every launch in
kernels/ passes configs.COMPILE_OPTIONS (read from the source: the interpreter ignores them)."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("sm90_compile.py")
KERNELS = pathlib.Path(__file__).parents[1] / "kernels"


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


def _launches(tree: ast.AST):
    """The kernel launches `kernel[grid](...)` of a module's syntax tree."""
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
            and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel")]


@pytest.mark.parametrize("module", sorted(p.name for p in KERNELS.glob("*.py")))
def test_every_launch_passes_the_compile_options(module):
    """Every `kernel[grid](...)` in kernels/ passes **COMPILE_OPTIONS (FMA contraction on), so no
    compiled kernel depends on Triton's default, which Triton 3.10 turns off."""
    tree = ast.parse((KERNELS / module).read_text())
    missing = [f"{module}:{call.lineno}" for call in _launches(tree)
               if not any(kw.arg is None and isinstance(kw.value, ast.Name)
                          and kw.value.id == "COMPILE_OPTIONS" for kw in call.keywords)]
    assert not missing, f"launches without **COMPILE_OPTIONS: {missing}"


def test_the_launch_scan_finds_every_kernel():
    """The scan above sees a launch of every `*_kernel` jit function kernels/ defines (a scan that
    found none would pass vacuously)."""
    trees = [ast.parse(p.read_text()) for p in KERNELS.glob("*.py")]
    defined = {node.name for tree in trees for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel")
               and any("jit" in ast.unparse(d) for d in node.decorator_list)}
    launched = {call.func.value.id for tree in trees for call in _launches(tree)}
    assert len(defined) >= 13 and launched == defined, (sorted(defined), sorted(launched))
