"""Measuring: the device and its versions, timing (CUDA-synchronised), peak memory, this device's
ceilings (copy bandwidth, bf16 matmul rate), and one sweep case against its peers.

On the GPU times come from triton.testing.do_bench (CUDA events, L2 flushed before each rep); on
the CPU from torch.utils.benchmark, warmed up, fastattn and every peer alike (see time_ms); median
with the 20th and 80th percentiles. Ops of a few µs (decode, Op.cuda_graph) are timed on the GPU
as a CUDA graph replaying the call over rotated copies of the inputs (graph_time_ms), so neither
the host's launch overhead nor an L2 that holds the inputs from the last call shows in the time. On the CPU the kernels run under Triton's interpreter: those
times are wall-clock Python figures that say nothing about a GPU, and every record says so. No
ceiling is given on the CPU (none measured there bounds torch's own CPU kernels).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import sys
import time
from dataclasses import dataclass

import torch

import fastattn
from fastattn.testing import ATOL

from . import DEVICE, HAS_CUDA
from .cases import CEILINGS, UNITS, Case, Fn, Inputs, step
from .report import CPU_LABEL, describe, record


def device_info() -> dict:
    """What this run measures on: the device and every version that matters."""
    import triton

    info = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), fastattn=fastattn.__version__,
                backend=fastattn.backend(DEVICE))
    if HAS_CUDA:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, detail=f"{p.name}, sm_{p.major}{p.minor}, "
                    f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
    else:
        info.update(device=CPU_LABEL,
                    detail=f"CPU ({platform.machine()}), Triton interpreter: timings are CPU / "
                           "interpreter figures, not GPU figures")
    info["slug"] = info["date"] + "_" + re.sub(r"[^A-Za-z0-9]+", "-", info["device"]).strip("-")
    return info


@dataclass
class Timing:
    ms: float  # median
    lo: float  # 20th percentile
    hi: float  # 80th percentile


MIN_SAMPLES = 5  # CPU: timed blocks at the least, however slow one call is


def time_ms(fn, warmup_ms: int = 10, rep_ms: int = 50) -> Timing:
    """Time fn(), warmed up, median and p20-p80: on CUDA by do_bench (events around each call, so
    the GPU work is waited for); on the CPU by torch.utils.benchmark (one thread): fn called
    until warmup_ms have passed (once at the least), then Timer.adaptive_autorange, blocks of
    calls until they add up to rep_ms and MIN_SAMPLES calls (an interpreted kernel takes longer
    than rep_ms a call) and their spread is under 10% of the median, or a time limit passes."""
    if HAS_CUDA:
        import triton.testing

        return Timing(*triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                               quantiles=[0.5, 0.2, 0.8]))
    from torch.utils.benchmark import Timer

    calls, start = 0, time.perf_counter()
    while not calls or time.perf_counter() - start < warmup_ms / 1e3:
        fn()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    least = max(rep_ms / 1e3, (MIN_SAMPLES - 0.5) * per_call)
    m = Timer("fn()", globals={"fn": fn}).adaptive_autorange(
        threshold=0.1, min_run_time=least, max_run_time=max(10 * rep_ms / 1e3, 1.3 * least))
    return Timing(*quantiles([t * 1e3 for t in m.times]))


# The inputs a graph replay cycles through: 512 MiB, ~10x an H200's 50 MB L2; at most MAX_COPIES
# copies (the smallest decode case, 2 MiB of caches, cycles through 256 MiB).
ROTATE_BYTES = 512 * 2**20
MAX_COPIES = 128


def rotated_copies(input_bytes: int) -> int:
    """How many copies of inputs of input_bytes the graph replay cycles through: enough to add up
    to ROTATE_BYTES (so no call finds its inputs in L2), at most MAX_COPIES, at least 1."""
    return max(1, min(MAX_COPIES, -(-ROTATE_BYTES // max(1, input_bytes))))


def tensor_bytes(t: dict) -> int:
    """The bytes of the tensors in t, each storage counted once (views share theirs)."""
    storages = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()
                for x in t.values() if isinstance(x, torch.Tensor)}
    return sum(storages.values())


def graph_time_ms(fn: Fn, sets: list[dict]) -> Timing:
    """Time per call of fn on CUDA: fn(t) for each t of sets (rotated copies of the inputs)
    captured in one CUDA graph, its replay timed by time_ms (do_bench), divided by len(sets).
    Warmed up on a side stream first, as torch.cuda.graphs asks."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for t in sets:
            fn(t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for t in sets:
            fn(t)
    try:
        replay = time_ms(graph.replay)
    finally:
        torch.cuda.synchronize()
        del graph
    n = len(sets)
    return Timing(replay.ms / n, replay.lo / n, replay.hi / n)


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of the samples."""
    q = torch.tensor(samples, dtype=torch.float64).quantile(
        torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


def overlaps(a: dict, b: dict) -> bool:
    """Whether two timed records' p20-p80 ranges overlap: their ratio is within the noise."""
    return max(a["ms_lo"], b["ms_lo"]) < min(a["ms_hi"], b["ms_hi"])


def peak_mib(fn) -> float | None:
    """Peak memory fn() allocates above what was allocated before it (CUDA only), MiB."""
    if not HAS_CUDA:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 sent to /dev/null (the profiler's C++ side logs its start and stop
    there, whatever KINETO_LOG_LEVEL says)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def cpu_peak_mib(fn) -> float:
    """Peak memory one fn() call allocates on the CPU, MiB: the highest running sum of the bytes
    allocated (+) and freed (-) in torch.profiler's allocation events of that call, in the order
    they happened. What was allocated before the call is not counted; its frees may be (they
    only lower the running sum)."""
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                     profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # stable: ties keep the record order
        running += e.nbytes()
        peak = max(peak, running)
    return peak / 2**20


def ceilings(device_label: str) -> tuple[dict[str, float], list[dict]]:
    """This GPU's copy bandwidth (GB/s, bytes read + written) and bf16 matmul rate (TFLOP/s),
    measured now: {"copy": ..., "matmul": ...} and their records. None on the CPU ({}, []): a
    CPU copy or matmul rate measured here is no bound on what torch's CPU kernels reach."""
    if not HAS_CUDA:
        return {}, []
    n_bytes, m = 2**30, 8192
    src = torch.ones(n_bytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    copy = time_ms(lambda: dst.copy_(src), 25, 100)
    a, b = (torch.randn(m, m, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    matmul = time_ms(lambda: a @ b, 25, 100)
    values = {"copy": 2 * n_bytes / copy.ms / 1e6, "matmul": 2 * m**3 / matmul.ms / 1e9}
    records = [
        record(kind="ceiling", op="copy", impl="torch", shape=f"{n_bytes // 2**20} MiB",
               dtype="uint8", ms=copy.ms, ms_lo=copy.lo, ms_hi=copy.hi, metric=values["copy"],
               unit="GB/s", device=device_label, note="dst.copy_(src), 2 x bytes / time"),
        record(kind="ceiling", op="matmul", impl="torch", shape=f"{m}x{m}x{m}",
               dtype="bfloat16", ms=matmul.ms, ms_lo=matmul.lo, ms_hi=matmul.hi,
               metric=values["matmul"], unit="TFLOP/s", device=device_label,
               note="a @ b, 2·m·n·k / time"),
    ]
    return values, records


def beaten_ceilings(records: list[dict], ceilings: dict[str, float]) -> list[str]:
    """A ceiling must bound every implementation: drop (from `ceilings`, and every sweep record's
    % of it) each one that a sweep record of this run exceeds, and say which beat it."""
    lines = []
    for family, name in CEILINGS.items():
        if family == "decode":  # its % of copy is a reference: a read-only stream may pass a
            continue            # copy's read + write rate; so not held to it as a bound
        rows = [r for r in records if r["kind"] == "sweep" and r["family"] == family
                and r["metric"] is not None]
        best = max(rows, key=lambda r: r["metric"], default=None)
        if name not in ceilings or best is None or best["metric"] <= ceilings[name]:
            continue
        lines.append(f"The measured {name} ceiling ({ceilings.pop(name):.3g} {best['unit']}) is no "
                     f"upper bound: {best['impl']} reached {best['metric']:.3g} on {best['op']} "
                     f"{best['shape']} {best['mode']}; no % of it is given for {family}.")
        for r in rows:
            r["ceiling_pct"] = None
    return lines


def agrees(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    """The sweep's sanity check at benchmark size: finite, and within 4 x the dtype's parity atol
    (relative to the output's size) of torch's own op on the same inputs."""
    scale = max(1.0, ref.abs().max().item())
    err = (out.float() - ref.float()).abs().max().item()
    return bool(torch.isfinite(out).all()) and err <= 4 * ATOL[dtype] * scale


def _failure(impl: str, exc: BaseException, inputs: Inputs) -> str:
    """The note a failed call leaves: "n/a: ..." where the implementation cannot run this case,
    "error: ..." where fastattn failed (a bug)."""
    text = describe(exc)
    if "out of memory" in text.lower():
        return "n/a: out of memory"
    if impl != "fastattn":
        return f"n/a: {text}"
    if isinstance(exc, NotImplementedError):
        return ("n/a: fastattn build without attn_mask" if "mask" in inputs.t
                else f"n/a: not implemented: {text}")
    return f"error: {type(exc).__name__}: {text}"


def _free() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _measure_impl(case: Case, impl: str, fn: Fn | str, inputs: Inputs, ref: torch.Tensor,
                  base: dict, sets: list[dict] | None = None) -> list[dict]:
    """One implementation in every mode of the op: a record per mode. sets: the rotated inputs
    of a CUDA-graph timing (fwd), or None."""
    modes = case.op.modes
    if isinstance(fn, str):  # a peer that does not run here: the note says why
        return [record(**base, mode=mode, impl=impl, note=fn) for mode in modes]
    try:
        out = fn(inputs.t)  # the first call compiles; its output is checked and reused by bwd
        ok = None if fn is case.op.torch else agrees(out.detach(), ref, case.dtype)
    except Exception as exc:  # noqa: BLE001  (any failure of one implementation is a note)
        _free()
        return [record(**base, mode=mode, impl=impl, note=_failure(impl, exc, inputs))
                for mode in modes]
    rows = []
    for mode in modes:
        try:
            run = step(fn, inputs, mode, out if mode == "bwd" else None)
            peak = peak_mib(run)
            note = None
            if sets and mode == "fwd":
                try:
                    t = graph_time_ms(fn, sets)
                except Exception as exc:  # noqa: BLE001  (time it eagerly, and say so)
                    _free()
                    t, note = time_ms(run), f"eager time: no CUDA graph: {describe(exc)}"
            else:
                t = time_ms(run)
            rows.append(record(**base, mode=mode, impl=impl, ms=t.ms, ms_lo=t.lo, ms_hi=t.hi,
                               peak_mib=peak, note=note, **{"pass": ok}))
        except Exception as exc:  # noqa: BLE001
            rows.append(record(**base, mode=mode, impl=impl, note=_failure(impl, exc, inputs)))
        run = None
        _free()
    return rows


def measure_case(case: Case, ceiling: dict[str, float], device_label: str,
                 heavy_note: str | None) -> list[dict]:
    """fastattn and each peer on one case, every mode: time (median and spread), metric, % of
    the ceiling (where there is one), fastattn's speedup over each (flagged noisy where the two
    timings' spreads overlap), peak memory, and whether its output agrees with
    torch's. heavy_note: None to run compiled peers (torch.compile, FlexAttention), else why not."""
    op = case.op
    if case.skip:
        return case_note(case, device_label, case.skip)
    inputs = op.make(case.size, case.dtype, DEVICE, 0)
    with torch.no_grad():
        ref = op.torch(inputs.t)
    sets = None
    if HAS_CUDA and op.cuda_graph:  # the inputs and rotated copies (seeds 1, 2, ...)
        copies = rotated_copies(tensor_bytes(inputs.t))
        sets = [inputs.t] + [op.make(case.size, case.dtype, DEVICE, seed).t
                             for seed in range(1, copies)]
    base = dict(kind="sweep", op=op.name, family=op.family, shape=case.shape,
                dtype=str(case.dtype).removeprefix("torch."), unit=UNITS[op.family],
                device=device_label, size=case.size)
    impls = {"fastattn": op.ours, **op.peers(case, inputs.t, DEVICE, heavy_note)}
    rows = []
    for impl, fn in impls.items():
        rows += _measure_impl(case, impl, fn, inputs, ref, base, sets)
    fwd, bwd = op.work(case.size, case.dtype)
    work = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}
    scale = 1e9 if op.family == "attention" else 1e6  # per ms -> TFLOP/s or GB/s
    ours = {r["mode"]: r for r in rows if r["impl"] == "fastattn"}
    for r in rows:
        if r["ms"] is None:
            continue
        r["metric"] = work[r["mode"]] / r["ms"] / scale
        if CEILINGS[op.family] in ceiling:
            r["ceiling_pct"] = 100 * r["metric"] / ceiling[CEILINGS[op.family]]
        if ours[r["mode"]]["ms"] is not None:
            r["ratio"] = r["ms"] / ours[r["mode"]]["ms"]
            r["noisy"] = r["impl"] != "fastattn" and overlaps(r, ours[r["mode"]])
    for mode, r in ours.items():
        peers = [p for p in rows if p["mode"] == mode and p["impl"] != "fastattn" and p["ms"]]
        if r["ms"] is not None and peers:
            best = min(peers, key=lambda p: p["ms"])
            r["best_peer"], r["vs_best"], r["noisy"] = (best["impl"], best["ms"] / r["ms"],
                                                        best["noisy"])
    return rows


def case_note(case: Case, device_label: str, note: str) -> list[dict]:
    """Records for a case the sweep did not measure: over its time budget, or it crashed."""
    return [record(kind="sweep", op=case.op.name, family=case.op.family, mode=mode,
                   impl="fastattn", shape=case.shape, dtype=str(case.dtype).removeprefix("torch."),
                   unit=UNITS[case.op.family], device=device_label, size=case.size, note=note)
            for mode in case.op.modes]


class Budget:
    """The sweep's time limit, shared among the op families: a family gets its share of the time
    left when it starts (what one leaves passes on); its cases past that are skipped. So a slow
    family cannot starve the others, and a 15-minute GPU lease is never overrun."""

    def __init__(self, seconds: float | None, shares: dict[str, float]):
        self.end = None if not seconds else time.monotonic() + seconds
        self.shares = dict(shares)
        self.deadline = None

    def start(self, family: str) -> None:
        if self.end is None:
            return
        weight = self.shares.pop(family, 0.0)
        rest = sum(self.shares.values())
        now = time.monotonic()
        self.deadline = now + (self.end - now) * (weight / (weight + rest) if weight + rest else 1)

    def over(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline
