"""pytest-benchmark tests of the sweep's cases at small sizes: fastattn and torch's own op, every
mode. Not part of the test suite (`pytest tests`); run them on their own:

    pytest bench/ --benchmark-autosave          # save this commit's timings under .benchmarks/
    pytest bench/ --benchmark-compare           # and compare with the last saved run

On a GPU the cases are the --quick sweep's and each timed call ends with torch.cuda.synchronize(),
so the timer sees the kernels finish, not just their launch. On the CPU they are the CPU sweep's
smallest case of each op under Triton's interpreter, two rounds each (interpreter figures, not GPU
figures). The runner's own tests (its outputs, the host table, the timing method) follow; they
assert what is written, never how fast anything is.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import fastattn

from . import DEVICE, HAS_CUDA, cpu_path, host, measure, report
from .__main__ import main
from .cases import MODES, sweep_cases, step



def _first_per_op(cases):
    first = {}
    for case in cases:
        first.setdefault(case.op.name, case)
    return list(first.values())


# GPU: the quick sweep; CPU: each op's smallest CPU case (the CPU sweep has three sizes per op)
CASES = sweep_cases("quick") if HAS_CUDA else _first_per_op(sweep_cases("cpu"))
WIDTH = report.TERMINAL_WIDTH


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


def test_runner_writes_its_outputs(tmp_path, capsys):
    """`python -m bench` end to end on one op: exit 0, every file, the documented records, and
    a terminal output of at most 120 columns."""
    assert main(["--quick", "--filter", "^layer_norm$", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert max(len(line) for line in printed.splitlines()) <= WIDTH
    records = json.loads((tmp_path / "results.json").read_text())
    kinds = {"run", "parity", "host", "sweep", "target"} | ({"ceiling"} if HAS_CUDA
                                                           else {"cpu-path"})
    assert {r["kind"] for r in records} == kinds
    for key in ("op", "impl", "shape", "dtype", "pass", "ms", "metric", "ratio", "noisy"):
        assert all(key in r for r in records), key
    ours = [r for r in records if r["kind"] == "sweep" and r["impl"] == "fastattn"]
    assert {r["mode"] for r in ours} == set(MODES)
    assert all(r["pass"] and r["ms"] > 0 and r["metric"] > 0 and r["ratio"] == 1.0 for r in ours)
    assert all(r["ms_lo"] <= r["ms"] <= r["ms_hi"] for r in records if r["ms"] is not None)
    assert all(r["op"] == "layer_norm" for r in records
               if r["kind"] in ("parity", "sweep", "host", "cpu-path"))
    if not HAS_CUDA:  # no ceiling on the CPU, so no % of one
        assert all(r["ceiling_pct"] is None for r in records)
    assert len({r["size"]["N"] for r in ours}) >= 3  # several points per plotted series
    assert (tmp_path / "results.csv").read_text().startswith("kind,op,")
    summary = (tmp_path / "summary.md").read_text()
    assert "## Parity" in summary and "## Host overhead" in summary
    assert ("## CPU path" in summary) != HAS_CUDA
    assert "fastattn speedup over each peer" in summary  # the wide column: summary.md only
    assert "fastattn speedup over each peer" not in printed
    pytest.importorskip("matplotlib")
    assert (tmp_path / "norm.png").stat().st_size > 0


PUBLIC_OPS = {"scaled_dot_product_attention", "varlen_attention", "layer_norm", "rms_norm",
              "add_layer_norm", "embedding", "gpt_embeddings", "bert_embeddings"}


def test_public_ops_are_these():
    """The host table covers fastattn's public ops: a new one must be added to bench/host.py."""
    op_modules = set(host.LAUNCHERS)  # the modules whose functions launch kernels
    public = {name for name in fastattn.__all__
              if getattr(getattr(fastattn, name), "__module__", None) in op_modules}
    assert public - {"pad", "unpad"} == PUBLIC_OPS  # pad / unpad: indexing helpers, no kernel
    assert {case.op for case in host.CASES} == PUBLIC_OPS


def test_host_table_with_no_op_launchers():
    """Every public op, fwd and fwd+bwd, timed in this process with no-op launchers and torch:
    finite positive figures with a spread, judged against the goals, in a table that fits the
    terminal. (The fastattn column needs the torch path: left out under the interpreter.)"""
    interpreting = fastattn.backend(DEVICE) == "triton-interpreter"
    rows = host.measure(full_call=not interpreting, rounds=3, block_s=0.002)
    timed = [r for r in rows if r["metric"] is not None]
    assert {(r["op"], r["mode"]) for r in timed if r["impl"] == "above-launcher"} == {
        (op, mode) for op in PUBLIC_OPS for mode in host.MODES}
    assert {r["impl"] for r in timed} >= {"above-launcher", "torch"}
    for r in timed:
        assert math.isfinite(r["metric"]) and r["metric"] > 0, r
        assert r["ms_lo"] <= r["ms"] <= r["ms_hi"], r
    for r in timed:
        if r["impl"] == "above-launcher":
            assert r["goal"] == host.GOAL_US[r["mode"]] and r["pass"] == (r["metric"] <= r["goal"])
    text = report.render(host.section(rows), terminal=True)
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert all(op in text for op in PUBLIC_OPS)


def test_host_fakes_replace_every_launcher():
    """Under the no-op launchers no kernel runs: nothing is recorded on a real path."""
    fakes = host.no_op_launchers()
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    with fastattn.record_backends() as ran, fastattn._dispatch.replaced_launchers(fakes):
        y = fastattn.layer_norm(x, (8,))
        y.sum().backward()
    assert [op for op, _ in ran] == ["norm_fwd", "norm_bwd"]
    assert x.grad is not None and x.grad.shape == x.shape


CPU_PATH_SIZES = {"attention": dict(B=2, H=3, Hkv=3, L=17, S=29, D=8), "norm": dict(M=5, N=24),
                  "embedding": dict(B=2, N=7, V=50, D=16)}


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path section runs without a GPU only")
def test_cpu_path_section():
    """At small shapes, through the child process on the torch path: fastattn and torch timed in
    every case and mode with finite times and peak memory, a first-call row per case, each row
    judged against its goal, in tables that fit the terminal."""
    rows = cpu_path.records(sizes=CPU_PATH_SIZES, rounds=2, block_s=0.001)
    ops = {case.op.name for case in cpu_path.CASES}
    timed = [r for r in rows if r["mode"] in cpu_path.MODES]
    assert {(r["op"], r["mode"], r["impl"]) for r in timed} == {
        (op, mode, impl) for op in ops for mode in cpu_path.MODES for impl in ("fastattn", "torch")}
    assert len(timed) == 2 * len(ops) * len(cpu_path.MODES)
    for r in timed:
        assert r["kind"] == "cpu-path" and r["dtype"] == "float32", r
        assert math.isfinite(r["ms"]) and 0 < r["ms_lo"] <= r["ms"] <= r["ms_hi"], r
        assert math.isfinite(r["peak_mib"]) and r["peak_mib"] > 0, r
    for r in timed:
        if r["impl"] == "fastattn":
            assert r["backend"] == "torch" and r["goal"] == cpu_path.GOAL_RATIO, r
            assert r["pass"] == (max(r["ratio"], r["peak_ratio"]) <= r["goal"]), r
    first = [r for r in rows if r["mode"] == "first call"]
    assert sorted(r["op"] for r in first) == sorted(ops)
    for r in first:
        assert 0 < r["metric"] < 60 and r["pass"] == (r["metric"] <= cpu_path.GOAL_FIRST_S), r
    assert {r["shape"] for r in rows if r["op"] == "layer_norm"} == {"M5 N24"}
    text = report.render(cpu_path.section(rows), terminal=True)
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert all(op in text for op in ops) and text.count("first call") >= len(ops)


@pytest.mark.parametrize("case", cpu_path.CASES, ids=lambda c: c.op.name)
def test_cpu_path_first_call_source_is_the_op(case, monkeypatch):
    """The first-call process runs each case's call as source: it is the sweep op's own call
    (compared on the torch path, whatever Triton's mode in this process)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = case.op.make(CPU_PATH_SIZES[case.op.family], torch.float32, "cpu", 0)
    ours = eval(case.call, {"fastattn": fastattn, "t": inputs.t})
    torch.testing.assert_close(ours, case.op.ours(inputs.t), rtol=0, atol=0)


def test_cpu_peak_memory_reads_known_allocations():
    """One 4 MiB allocation reads 4 MiB; 4 MiB and 2 MiB held, the 4 freed, 4 more: 6 MiB at the
    peak; a tensor allocated before the call is not counted."""
    held_before = torch.ones(1 << 22)

    def two_at_a_time():
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 19)  # 2 MiB
        del a
        c = torch.empty(1 << 20)
        return b, c, held_before

    assert measure.cpu_peak_mib(lambda: torch.empty(1 << 20)) == 4.0
    assert measure.cpu_peak_mib(two_at_a_time) == 6.0


@pytest.mark.skipif(HAS_CUDA, reason="the CPU timing method (the GPU's is do_bench)")
def test_cpu_timing_warms_up_and_takes_several_samples():
    """A call slower than the repetition time is still timed MIN_SAMPLES times after a warm-up,
    and the spread brackets the median."""
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.02)

    t = measure.time_ms(slow, warmup_ms=1, rep_ms=5)
    assert len(calls) >= 1 + measure.MIN_SAMPLES
    assert t.lo <= t.ms <= t.hi and t.ms >= 20


def test_noisy_ratios_are_marked():
    """A ratio between timings whose p20-p80 ranges overlap is printed with a ~."""
    a, b = dict(ms_lo=1.0, ms_hi=2.0), dict(ms_lo=1.5, ms_hi=3.0)
    assert measure.overlaps(a, b) and not measure.overlaps(a, dict(ms_lo=2.5, ms_hi=3.0))
    assert report.speedup(dict(ratio=1.5, noisy=True)) == "~1.5x"
    assert report.speedup(dict(ratio=1.5, noisy=False)) == "1.5x"


def test_text_table_fits_the_width():
    rows = [{"a": "x" * 100, "b": "y" * 80, "c": 1.0}]
    lines = report.text_table(rows, width=WIDTH).splitlines()
    assert max(len(line) for line in lines) <= WIDTH and lines[2].endswith("1")
