"""pytest-benchmark tests of the sweep's cases at small sizes: fastattn and torch's own op, every
mode. Not part of the test suite (`pytest tests`); run them on their own:

    pytest bench/ --benchmark-autosave          # save this commit's timings under .benchmarks/
    pytest bench/ --benchmark-compare           # and compare with the last saved run

On a GPU the cases are the --quick sweep's and each timed call ends with torch.cuda.synchronize(),
so the timer sees the kernels finish, not just their launch. On the CPU they are the CPU sweep's
tiny cases under Triton's interpreter, two rounds each (interpreter figures, not GPU figures).
"""

from __future__ import annotations

import json

import pytest
import torch

from . import DEVICE, HAS_CUDA
from .__main__ import main
from .cases import MODES, sweep_cases, step

CASES = sweep_cases("quick" if HAS_CUDA else "cpu")


def _synchronized(fn):
    def run():
        fn()
        if HAS_CUDA:
            torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["fastattn", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op.name}-{c.shape.replace(' ', '-')}")
def test_case(benchmark, case, impl, mode):
    op = case.op
    inputs = op.make(case.size, case.dtype, DEVICE, 0)
    fn = op.ours if impl == "fastattn" else op.torch
    try:
        fn(inputs.t)
    except NotImplementedError as exc:
        pytest.skip(f"this fastattn build cannot run {op.name}: {exc}")
    benchmark.group = f"{op.name} {case.shape} {str(case.dtype)[6:]} {mode}"
    device = torch.cuda.get_device_name() if HAS_CUDA else "CPU, Triton interpreter"
    benchmark.extra_info.update(op=op.name, shape=case.shape, mode=mode, impl=impl, device=device)
    run = _synchronized(step(fn, inputs, mode))
    if HAS_CUDA:
        benchmark(run)
    else:
        benchmark.pedantic(run, rounds=2, iterations=1)


def test_runner_writes_its_outputs(tmp_path):
    """`python -m bench` end to end on one op: exit 0, every file, the documented records."""
    assert main(["--quick", "--filter", "^layer_norm$", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert {r["kind"] for r in records} == {"run", "parity", "ceiling", "sweep", "target"}
    for key in ("op", "impl", "shape", "dtype", "pass", "ms", "metric", "ratio"):
        assert all(key in r for r in records), key
    ours = [r for r in records if r["kind"] == "sweep" and r["impl"] == "fastattn"]
    assert {r["mode"] for r in ours} == set(MODES)
    assert all(r["pass"] and r["ms"] > 0 and r["metric"] > 0 and r["ratio"] == 1.0 for r in ours)
    assert all(r["op"] == "layer_norm" for r in records if r["kind"] in ("parity", "sweep"))
    assert (tmp_path / "results.csv").read_text().startswith("kind,op,")
    assert "## Parity" in (tmp_path / "summary.md").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "norm.png").stat().st_size > 0
