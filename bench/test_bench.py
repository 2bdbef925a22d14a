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
from fastattn import reference

from . import DEVICE, HAS_CUDA, cases, cpu_path, host, measure, parity, report
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


@pytest.mark.parametrize("case, impl, mode", [
    pytest.param(case, impl, mode,
                 id=f"{case.op.name}-{case.shape.replace(' ', '-')}-{impl}-{mode}")
    for case in CASES if case.skip is None for impl in ("fastattn", "torch")
    for mode in case.op.modes])  # the modes the op has (decode: fwd alone)
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


# ---- the attention score modifiers (sliding window, softcap, ALiBi) ----

MOD_OPS = cases.SCORE_MOD_OPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", MOD_OPS, ids=lambda op: op.name)
def test_score_mod_parity(op, dtype):
    """Each modifier op's quick parity case (what fastattn-check --quick runs) passes, every
    output and gradient, on this device's kernels (the interpreter on a CPU)."""
    case = cases.Case(op, cases.PARITY_SIZES[op.name][0], dtype)
    rows = parity.check(case, "test")
    assert [r["output"] for r in rows] == ["out", "dq", "dk", "dv"], rows[0]["note"]
    assert all(r["pass"] for r in rows), [(r["output"], r["err"], r["bound"]) for r in rows]
    assert {r["backend"] for r in rows} == {fastattn.backend(DEVICE)}


@pytest.mark.parametrize("op", MOD_OPS, ids=lambda op: op.name)
def test_score_mod_parity_sizes_feel_the_modifier(op):
    """At the quick parity size (fastattn-check --quick's) the modifier changes the float64
    answer by far more than the bf16 parity bound: a kernel that ignored it would fail the
    check. (The softcap's second size has Gemma 2's cap of 50, which unit-variance scores do not
    reach.)"""
    inputs = op.make(cases.PARITY_SIZES[op.name][0], torch.float64, "cpu", 1)
    modded = op.reference(inputs.t)
    plain = reference.scaled_dot_product_attention(*(inputs.t[n] for n in "qkv"), True)[0]
    assert (modded - plain).abs().max() > 0.1


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("op", MOD_OPS, ids=lambda op: op.name)
def test_score_mod_peers_compute_the_case(op):
    """The peers compute what fastattn does: torch's op (SDPA with the dense mask, or the eager
    softcap), every SDPA backend that runs here and FlexAttention with flex_mods' mask_mod /
    score_mod (uncompiled, inputs without grad: its CPU path has no backward) agree with the
    float64 oracle in fp32."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    size = cases.PARITY_SIZES[op.name][1]
    inputs = op.make(size, torch.float32, DEVICE, 0)
    ref = op.reference(inputs.to_float64().t)
    t = {n: x.detach() for n, x in inputs.t.items()}
    case = cases.Case(op, size, torch.float32)
    peers = op.peers(case, t, DEVICE, None)
    ran = {"torch": op.torch(t)}
    for impl, fn in peers.items():
        if isinstance(fn, str):
            continue
        try:
            ran[impl] = fn(t)
        except RuntimeError as exc:  # a backend that does not run on this device
            assert "No viable backend" in str(exc) or "No available kernel" in str(exc), exc
    score_mod, mask_mod = cases.flex_mods(t, causal=True)
    block_mask = create_block_mask(mask_mod, None, None, size["L"], size["S"], device=DEVICE)
    ran["flex"] = flex_attention(t["q"], t["k"], t["v"], score_mod=score_mod,
                                 block_mask=block_mask)
    assert len(ran) >= 3, list(ran)  # torch's op, a peer and FlexAttention at the least
    for impl, out in ran.items():
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0, msg=impl)


def test_score_mod_peers_are_named():
    """softcap, which no SDPA call computes, has the eager composition and an n/a for SDPA; the
    window and ALiBi cases have SDPA's backends (with the dense mask); FlexAttention only where
    the case asks for it; the eager and math peers skipped above MATH_MAX_SCORES."""
    note = "n/a: compiled peers not run here"
    small = dict(B=1, H=2, Hkv=2, L=16, S=16, D=16)
    big = cases._attention_size(32768, 128, W=4096)
    for op, size in [(cases.ATTENTION_SOFTCAP, dict(small, softcap=50.0)),
                     (cases.ATTENTION_WINDOW, dict(small, W=4)), (cases.ATTENTION_ALIBI, small)]:
        t = op.make(size, torch.float32, "cpu", 0).t
        peers = op.peers(cases.Case(op, size, torch.float32, flex=True), t, "cpu", note)
        if op is cases.ATTENTION_SOFTCAP:
            assert set(peers) == {"torch sdpa", "torch eager", "torch flex"}
            assert peers["torch sdpa"].startswith("n/a") and callable(peers["torch eager"])
        else:
            assert set(peers) == {f"torch {n}" for n in cases.SDPA_BACKENDS} | {"torch flex"}
        assert peers["torch flex"] == note
    huge = cases.ATTENTION_SOFTCAP.peers(
        cases.Case(cases.ATTENTION_SOFTCAP, dict(big, softcap=50.0), torch.bfloat16), {}, "cpu",
        None)
    assert huge["torch eager"].startswith("n/a: skipped above 2^30 scores")
    assert "torch flex" not in huge


@pytest.mark.parametrize("L, S, W", [(100, 100, 24), (45, 77, 7), (77, 45, 7), (30, 30, 64),
                                     (1, 9, 1)])
def test_window_work_counts_the_visible_pairs(L, S, W):
    """The window case's work is 4·B·H·D·P with P the pairs its dense mask lets through (every
    implementation is charged that, whatever it computes); the causal cases count L·S/2."""
    size = dict(B=2, H=3, Hkv=3, L=L, S=S, D=8, W=W)
    pairs = int(cases.ATTENTION_WINDOW.make(size, torch.float32, "cpu", 0).t["dense"].sum())
    assert cases.visible_pairs(L, S, W - 1) == pairs
    fwd, bwd = cases.ATTENTION_WINDOW.work(size, torch.bfloat16)
    assert fwd == 4 * 2 * 3 * 8 * pairs and bwd == 2.5 * fwd
    for op in (cases.ATTENTION_SOFTCAP, cases.ATTENTION_ALIBI):
        assert op.work(size, torch.bfloat16)[0] == 4 * 2 * 3 * 8 * L * S / 2


def test_window_sweep_row_is_the_issues():
    """The full GPU sweep has the 4096-of-32k window row against FlexAttention, with the work of
    N·W - W(W - 1)/2 pairs per head; softcap (50) and ALiBi rows against FlexAttention too."""
    full = cases.sweep_cases("full")
    window = [c for c in full if c.op is cases.ATTENTION_WINDOW and c.size["L"] == 32768]
    assert len(window) == 1 and window[0].flex
    assert window[0].size == dict(B=1, H=16, Hkv=16, L=32768, S=32768, D=128, W=4096)
    n, w = 32768, 4096
    assert cases.ATTENTION_WINDOW.work(window[0].size, torch.bfloat16)[0] == \
        4 * 16 * 128 * (n * w - w * (w - 1) // 2)
    flexed = {c.op.name for c in full if c.flex}
    assert {op.name for op in MOD_OPS} <= flexed
    assert all(c.size["softcap"] == 50.0 for c in full if c.op is cases.ATTENTION_SOFTCAP)


def test_alibi_dense_mask_is_the_bias():
    """The ALiBi case's dense mask (the SDPA peers' attn_mask) is -slope·|j - i| below the
    diagonal and -inf above, with slopes 2^(-8(h+1)/H)."""
    size = dict(B=1, H=4, Hkv=4, L=5, S=7, D=8)
    t = cases.ATTENTION_ALIBI.make(size, torch.float32, "cpu", 0).t
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / 4) for h in range(4)])
    torch.testing.assert_close(t["slopes"], slopes)
    i, j = torch.arange(5)[:, None], torch.arange(7)[None, :]
    want = (-slopes[:, None, None] * (j - i).abs()).masked_fill(j > i, float("-inf"))
    torch.testing.assert_close(t["dense"], want[None])


# ---- decode: one step against a KV cache (contiguous and paged) ----

DECODE_OPS = cases.DECODE_OPS
DECODE_COLUMNS = ("µs per step (p20-p80)", "GB/s", "% copy", "agrees", "vs best peer")


def test_decode_rows_run_and_report():
    """The decode rows of the CPU sweep build and run here (the kernel under the interpreter):
    fastattn and its peers (torch's SDPA, fastattn's prefill kernel) timed, fastattn agreeing with
    torch, GB/s by the stated formula; the table has the metric columns, states the formula and
    fits the terminal; a case over the memory budget keeps a row with the reason."""
    todo = [c for c in sweep_cases("cpu") if c.op.family == "decode"][::3]  # the smallest of each
    assert [c.op.name for c in todo] == ["decode", "decode_paged"]
    note = "n/a: compiled peers not run on the CPU"
    records = []
    for case in todo:
        with fastattn.record_backends() as ran:
            records += measure.measure_case(cases.Case(case.op, case.size, case.dtype, flex=True),
                                            {}, report.CPU_LABEL, note)
        assert ("kvcache_attention_fwd", fastattn.backend(DEVICE)) in ran
    for case in todo:
        rows = {r["impl"]: r for r in records if r["op"] == case.op.name}
        assert set(rows) == {"fastattn", "torch sdpa", "fastattn prefill", "torch flex"}
        assert {r["mode"] for r in records} == {"fwd"}
        ours = rows["fastattn"]
        assert ours["pass"] and ours["ms"] > 0 and ours["ratio"] == 1.0, ours
        assert ours["metric"] == pytest.approx(case.op.work(case.size, case.dtype)[0]
                                               / ours["ms"] / 1e6)
        for impl in ("torch sdpa", "fastattn prefill"):
            assert rows[impl]["ms"] > 0 and rows[impl]["ratio"] > 0, rows[impl]
        assert rows["fastattn prefill"]["pass"], rows["fastattn prefill"]
        assert rows["torch flex"]["note"] == note
    big = cases._decode_case(cases.DECODE, 64, 131072, (32, 32))
    records += measure.measure_case(big, {}, report.CPU_LABEL, note)  # allocates nothing
    assert big.skip.startswith("n/a: K + V caches 128 GiB > the 16 GiB budget")
    parts = report.sweep_section(records, "decode", report.CPU_LABEL)
    table = next(p for p in parts if isinstance(p, report.Table))
    assert all(col in table.terminal for col in DECODE_COLUMNS)
    assert all(col in row for row in table.rows for col in DECODE_COLUMNS)
    assert any(row["µs per step (p20-p80)"] == big.skip for row in table.rows)
    text = report.render(parts, terminal=True)
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert "2·B·S·Hkv·D·e + 2·B·Hq·D·e" in text and "not GPU figures" in text


def test_decode_work_is_the_kv_read():
    """bytes = 2·B·S·Hkv·D·e (K and V) + 2·B·Hq·D·e (q and out), the same for both layouts."""
    size = dict(B=3, H=32, Hkv=4, S=32768, D=128)
    for op in DECODE_OPS:
        fwd, bwd = op.work(dict(size, page=256), torch.bfloat16)
        assert fwd == 2 * 3 * 32768 * 4 * 128 * 2 + 2 * 3 * 32 * 128 * 2 and bwd == 0
        assert op.modes == ("fwd",) and op.cuda_graph


@pytest.mark.parametrize("op", DECODE_OPS, ids=lambda op: op.name)
def test_decode_inputs_are_one_cache(op):
    """The peers' (B, Hkv, S, D) rows are the cache's rows (a view of the contiguous cache; for
    the paged one, gathered through a block table that is a permutation of every page, not the
    identity); ragged caches mask exactly the rows past cache_seqlens."""
    size = dict(B=3, H=4, Hkv=2, S=40, D=8, ragged=True,
                **({"page": 16} if op is cases.DECODE_PAGED else {}))
    t = op.make(size, torch.float32, "cpu", 0).t
    lens = t["cache_seqlens"]
    assert lens.dtype == torch.int32 and lens[0] == 40 and (lens >= 20).all()
    assert torch.equal(t["mask"][:, 0, 0], torch.arange(40) < lens[:, None].long())
    for b in range(3):
        rows = reference.kvcache_keys(t["k_cache"], b, 0, 40, None, t.get("block_table"))
        assert torch.equal(rows[0], t["k"][b])
    if op is cases.DECODE_PAGED:
        table = t["block_table"]
        assert table.dtype == torch.int32 and table.shape == (3, 3)
        assert sorted(table.flatten().tolist()) == list(range(9))
        assert table.flatten().tolist() != list(range(9))
    else:
        assert t["k"].data_ptr() == t["k_cache"].data_ptr()  # a view: no copy to time against


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("op", DECODE_OPS, ids=lambda op: op.name)
def test_decode_peers_compute_the_step(op):
    """Every peer (torch's SDPA, fastattn's prefill kernel, FlexAttention uncompiled on the same
    rows) and fastattn agree with the float64 reference in fp32, on a full cache as the sweep
    times them, with GQA."""
    from torch.nn.attention.flex_attention import flex_attention

    size = dict(B=2, H=6, Hkv=2, S=45, D=16, **({"page": 8} if op is cases.DECODE_PAGED else {}))
    inputs = op.make(size, torch.float32, DEVICE, 0)
    t = inputs.t
    ref = op.reference(inputs.to_float64().t)
    peers = op.peers(cases.Case(op, size, torch.float32, flex=True), t, DEVICE, "n/a: not here")
    ran = {"fastattn": op.ours(t), "torch": op.torch(t),
           **{impl: fn(t) for impl, fn in peers.items() if callable(fn)},
           "flex": flex_attention(t["q"].transpose(1, 2), t["k"], t["v"],
                                  enable_gqa=True).transpose(1, 2)}
    assert set(ran) == {"fastattn", "torch", "torch sdpa", "fastattn prefill", "flex"}
    for impl, out in ran.items():
        assert out.shape == (2, 1, 6, 16), impl
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0, msg=impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", DECODE_OPS, ids=lambda op: op.name)
def test_decode_parity(op, dtype):
    """The decode ops' quick parity case (fastattn-check --quick's) passes on this device's kernel
    (the interpreter on a CPU): out alone (no backward), within 2x torch's error + atol."""
    rows = parity.check(cases.Case(op, cases.PARITY_SIZES[op.name][0], dtype), "test")
    assert [r["output"] for r in rows] == ["out"] and rows[0]["pass"], rows[0]
    assert rows[0]["err"] > 0 and rows[0]["torch_err"] > 0  # both measured, not a copy
    assert rows[0]["backend"] == fastattn.backend(DEVICE)


@pytest.mark.parametrize("op", DECODE_OPS, ids=lambda op: op.name)
def test_decode_parity_sizes_feel_the_lengths(op):
    """At the quick parity size the ragged cache_seqlens change the float64 answer by far more
    than the bf16 bound: a kernel reading every cache row would fail."""
    inputs = op.make(cases.PARITY_SIZES[op.name][0], torch.float64, "cpu", 1)
    t = dict(inputs.t)
    ragged = op.reference(t)
    t["cache_seqlens"] = torch.full_like(t["cache_seqlens"], t["k"].shape[2])
    assert (ragged - op.reference(t)).abs().max() > 0.1


def test_decode_sweep_is_the_issues():
    """The GPU sweep: batch 1, 4, 16, 64 x cache 1k .. 128k, MHA (32/32) and GQA 8:1 (32/4), d128
    bf16, contiguous at every length and paged (page 256) at 4k, 32k, 128k; the cases over 16 GiB
    of caches kept with the reason; the target point first, FlexAttention timed there; the quick
    and CPU profiles have smaller decode sweeps."""
    full = [c for c in sweep_cases("full") if c.op.family == "decode"]
    assert full[0].op is cases.DECODE and full[0].size == cases.DECODE_TARGET and full[0].flex
    points = {(c.op.name, c.size["B"], c.size["S"], c.size["H"], c.size["Hkv"]) for c in full}
    want = {("decode", B, S, 32, h) for B in (1, 4, 16, 64)
            for S in (1024, 4096, 16384, 32768, 131072) for h in (4, 32)}
    want |= {("decode_paged", B, S, 32, h) for B in (1, 4, 16, 64) for S in (4096, 32768, 131072)
             for h in (4, 32)}
    assert points == want and len(full) == len(want)
    assert all(c.size["D"] == 128 and c.dtype == torch.bfloat16 for c in full)
    assert all(c.size["page"] == 256 for c in full if c.op is cases.DECODE_PAGED)
    for c in full:
        over = cases.decode_cache_bytes(c.size, c.dtype) > 16 * 2**30
        assert (c.skip is not None) == over and not (over and c.flex), c.title
    assert sum(c.skip is not None for c in full) == 6
    measured = [c.size["S"] for c in full[1:] if c.skip is None]
    assert measured == sorted(measured, reverse=True)  # a time budget cuts the short caches
    quick = [c for c in sweep_cases("quick") if c.op.family == "decode"]
    assert quick[0].size == cases.DECODE_TARGET and not any(c.flex for c in quick)
    assert {c.op.name for c in quick} == {"decode", "decode_paged"}
    for profile in ("cpu", "cpu-quick"):
        assert len({c.size["S"] for c in sweep_cases(profile) if c.op is cases.DECODE}) == 3


def test_decode_target_is_the_issues():
    """The decode target judges the B1 32k d128 GQA 8:1 cases alone (contiguous and paged): >= 80%
    of the measured copy bandwidth."""
    from . import targets

    target = next(t for t in targets.TARGETS if "decode" in t.ops)
    base = dict(kind="sweep", impl="fastattn", mode="fwd", dtype="bfloat16", family="decode",
                ms=1.0, note=None)
    rows = [report.record(**base, op=op, shape=str(size), size=size, ceiling_pct=pct)
            for op, size, pct in [
                ("decode", dict(B=1, H=32, Hkv=4, S=32768, D=128), 85.0),
                ("decode_paged", dict(B=1, H=32, Hkv=4, S=32768, D=128, page=256), 70.0),
                ("decode", dict(B=1, H=32, Hkv=32, S=32768, D=128), 10.0),
                ("decode", dict(B=4, H=32, Hkv=4, S=32768, D=128), 10.0),
                ("decode", dict(B=1, H=32, Hkv=4, S=4096, D=128), 10.0)]]
    judged = [r for r in targets.evaluate(rows, judged=True) if r["target"] == target.name]
    assert [(r["op"], r["metric"], r["pass"]) for r in judged] == [
        ("decode", 85.0, True), ("decode_paged", 70.0, False)]
    assert target.goal == 80 and target.against == "ceiling"


def test_decode_graph_timing_rotates_enough_inputs():
    """A graph replay cycles through >= ROTATE_BYTES of inputs (up to MAX_COPIES copies), so no
    decode step is timed with its cache in L2; large inputs are not copied."""
    assert measure.rotated_copies(2 * 2**20) == measure.MAX_COPIES
    assert measure.rotated_copies(16 * 2**20) * 16 * 2**20 >= measure.ROTATE_BYTES
    assert measure.rotated_copies(2**30) == 1
    t = cases.DECODE.make(dict(B=1, H=2, Hkv=1, S=64, D=8), torch.float32, "cpu", 0).t
    assert measure.tensor_bytes(t) == 4 * (64 * 8 * 2 + 2 * 8) + 4  # k, v views not counted


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_decode_graph_timing_on_cuda():
    """On a GPU the decode step is timed in a CUDA graph (no "eager time" note) for fastattn and
    SDPA, at a size whose inputs are copied several times."""
    case = cases._decode_case(cases.DECODE, 1, 4096, (32, 4))
    rows = measure.measure_case(case, {}, "test", "n/a: not here")
    for impl in ("fastattn", "torch sdpa"):
        r = next(r for r in rows if r["impl"] == impl)
        assert r["ms"] > 0 and r["note"] is None, r
