"""CPU path: on a CPU without Triton's interpreter fastattn runs torch's own fused CPU ops behind
its API (fastattn.torch_path), and must cost what those ops cost. fp32, at model sizes:

    attention               B4 H12 N512 D64, plain / is_causal=True / a bool key-padding mask
                            (B, 1, 1, S) with each sequence's last keys padded; against
                            F.scaled_dot_product_attention with the same arguments
    layer_norm              (8192, 768) with weight and bias; against F.layer_norm
    embedding               ids (8, 512) into a 50257 x 768 table; against F.embedding

each forward and forward+backward (inputs requiring grad, backward with a fixed dout through
torch.autograd.grad: cases.step):

    time           host.time_interleaved_us (torch.utils.benchmark, one thread, warmed up,
                   fastattn and torch in turn each round); median and p20-p80 over the rounds
    peak memory    measure.cpu_peak_mib of one call: the most it holds allocated above its inputs
    first call     in a fresh process with the inputs already loaded: `import fastattn` and the
                   op's first forward call, wall clock

Targets, per row: time fastattn / torch <= 1.2, peak memory fastattn / torch <= 1.2; import +
first call <= 0.3 s. Only on the CPU (on CUDA nothing is measured and nothing printed). With
Triton's interpreter on in this process (`python -m bench`), everything is measured in a child
process with TRITON_INTERPRET=0 (`python -m bench.cpu_path OUT.json [OPTIONS_JSON]`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import fastattn
from fastattn import _dispatch

from . import HAS_CUDA
from .cases import ATTENTION, ATTENTION_CAUSAL, ATTENTION_MASK, EMBEDDING, LAYER_NORM, Op, step
from .host import ROOT, on_torch_path, time_interleaved_us
from .measure import cpu_peak_mib, overlaps
from .report import Table, by_case, fmt, progress, record, speedup

MODES = ("fwd", "fwd+bwd")
ROUNDS = 5
BLOCK_S = 0.05  # seconds per block of calls (a slower call is one block)
GOAL_RATIO = 1.2  # fastattn / torch, time and peak memory
GOAL_FIRST_S = 0.3  # import fastattn + the first call
DTYPE = torch.float32
SIZES = {"attention": dict(B=4, H=12, Hkv=12, L=512, S=512, D=64),
         "norm": dict(M=8192, N=768),
         "embedding": dict(B=8, N=512, V=50257, D=768)}


@dataclass(frozen=True)
class CpuCase:
    op: Op  # the sweep op: inputs, fastattn's call and torch's
    call: str  # op.ours as Python source on the inputs `t`, for the first-call process (which
    #            must not import bench before that call: it would import part of fastattn first)
    peer: str  # what torch's call is


_SDPA = "fastattn.scaled_dot_product_attention(t['q'], t['k'], t['v']"
CASES = (
    CpuCase(ATTENTION, _SDPA + ")", "F.sdpa"),
    CpuCase(ATTENTION_CAUSAL, _SDPA + ", is_causal=True)", "F.sdpa(is_causal=True)"),
    CpuCase(ATTENTION_MASK, _SDPA + ", attn_mask=t['mask'])",
            "F.sdpa(attn_mask=bool (B, 1, 1, S))"),
    CpuCase(LAYER_NORM, "fastattn.layer_norm(t['x'], t['x'].shape[-1:], t['w'], t['b'], 1e-5)",
            "F.layer_norm"),
    CpuCase(EMBEDDING, "fastattn.embedding(t['ids'], t['word'])", "F.embedding"),
)

# Run as `python -c FIRST_CALL INPUTS.pt CALL` with TRITON_INTERPRET=0: prints [import s, call s].
FIRST_CALL = """\
import json, sys, time
import torch
t = torch.load(sys.argv[1])
start = time.perf_counter()
import fastattn
imported = time.perf_counter()
eval(sys.argv[2], {"fastattn": fastattn, "t": t})
print(json.dumps([imported - start, time.perf_counter() - imported]))
"""


def first_call_s(case: CpuCase, t: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(import fastattn, its first call) in seconds, in a fresh process given the inputs t."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inputs.pt"
        torch.save(t, path)  # leaves: loaded as they are, requiring grad or not
        done = subprocess.run([sys.executable, "-c", FIRST_CALL, str(path), case.call], cwd=ROOT,
                              env={**os.environ, "TRITON_INTERPRET": "0"}, check=True,
                              capture_output=True, text=True)
    imported, called = json.loads(done.stdout.splitlines()[-1])
    return imported, called


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else 1.0 if ours == theirs else float("inf")


def measure(pattern: str = "", sizes: dict | None = None, rounds: int = ROUNDS,
            block_s: float = BLOCK_S) -> list[dict]:
    """The cpu-path records of the cases whose op matches the regex, in this process (on its
    fastattn path). sizes: per op family, a size replacing SIZES' (the tests' small shapes)."""
    sizes = {**SIZES, **(sizes or {})}
    path = fastattn.backend("cpu")
    records = []
    todo = [c for c in CASES if re.search(pattern, c.op.name)]
    for case in progress(todo, "cpu path", lambda c: c.op.name):
        op, size = case.op, sizes[case.op.family]
        inputs = op.make(size, DTYPE, "cpu", 0)
        base = dict(kind="cpu-path", op=op.name, family=op.family, shape=op.label(size),
                    dtype="float32", device="CPU", unit="ms", size=size)
        for mode in MODES:
            fns = {"fastattn": step(op.ours, inputs, mode), "torch": step(op.torch, inputs, mode)}
            times = time_interleaved_us({impl: (fn, contextlib.nullcontext)
                                         for impl, fn in fns.items()}, rounds, block_s)
            ours, theirs = (record(**base, mode=mode, impl=impl, ms=us / 1e3, ms_lo=lo / 1e3,
                                   ms_hi=hi / 1e3, metric=us / 1e3,
                                   peak_mib=cpu_peak_mib(fns[impl]))
                            for impl, (us, lo, hi) in times.items())
            ours.update(backend=path, ratio=ours["ms"] / theirs["ms"], goal=GOAL_RATIO,
                        noisy=overlaps(ours, theirs))
            ours["peak_ratio"] = _ratio(ours["peak_mib"], theirs["peak_mib"])
            ours["pass"] = max(ours["ratio"], ours["peak_ratio"]) <= GOAL_RATIO
            theirs["note"] = case.peer
            records += [ours, theirs]
        imported, called = first_call_s(case, inputs.t)
        records.append(record(**{**base, "unit": "s"}, mode="first call", impl="fastattn",
                              backend=path, metric=imported + called, goal=GOAL_FIRST_S,
                              note=f"import {fmt(imported)} s + first call {fmt(called)} s",
                              **{"pass": imported + called <= GOAL_FIRST_S}))
    return records


def records(pattern: str = "", **options) -> list[dict]:
    """The cpu-path records ([] on CUDA), measured where fastattn takes its torch path: in this
    process, or, with Triton's interpreter on, in a child process. options: measure's."""
    if HAS_CUDA:
        return []
    if fastattn.backend("cpu") != _dispatch.INTERPRETER:
        return measure(pattern, **options)
    return on_torch_path(f"{__package__}.cpu_path", json.dumps(dict(pattern=pattern, **options)))


def _verdict(value: float, goal: float, text: str) -> str:
    return f"{text} {'ok' if value <= goal else 'MISS'}"


def section(records_: list[dict]) -> list:
    """The CPU-path tables (section parts for report.render): time and memory, first calls."""
    rows = [r for r in records_ if r["kind"] == "cpu-path"]
    if not rows:
        return []
    table, first = [], []
    for (op, mode), rs in by_case(rows, "cpu-path").items():
        ours = rs["fastattn"]
        if mode == "first call":
            first.append({"op": op, "shape": ours["shape"],
                          "import + first call s": ours["metric"],
                          "target": _verdict(ours["metric"], ours["goal"],
                                             f"<={fmt(ours['goal'])}"),
                          "of which": ours["note"]})
            continue
        theirs = rs["torch"]
        table.append({
            "op": op, "shape": ours["shape"], "mode": mode,
            **{f"{name} ms": r["ms"] for name, r in (("fastattn", ours), ("torch", theirs))},
            **{f"{name} p20-p80": f"{fmt(r['ms_lo'])}-{fmt(r['ms_hi'])}"
               for name, r in (("fastattn", ours), ("torch", theirs))},
            "time ratio": _verdict(ours["ratio"], ours["goal"], speedup(ours)),
            "fastattn MiB": ours["peak_mib"], "torch MiB": theirs["peak_mib"],
            "memory ratio": _verdict(ours["peak_ratio"], ours["goal"],
                                     f"{fmt(ours['peak_ratio'])}x")})
    verdicts = [t["time ratio"] for t in table] + [t["memory ratio"] for t in table] + [
        f["target"] for f in first]
    misses = sum(v.endswith("MISS") for v in verdicts)
    peers = "; ".join(dict.fromkeys(f"{r['op']}: {r['note']}" for r in rows
                                    if r["impl"] == "torch"))
    shapes = "; ".join(dict.fromkeys(f"{t['op']} {t['shape']}" for t in table))
    path = next(r["backend"] for r in rows if r["impl"] == "fastattn")
    return [
        "## CPU path: fastattn without the interpreter vs torch's own ops, fp32, CPU", "",
        f"fastattn on its {path} path (TRITON_INTERPRET=0); ms: median over {ROUNDS} interleaved "
        "rounds, one thread (p20-p80 in summary.md); ratio = fastattn / torch (~: the p20-p80 "
        "ranges overlap, within the noise); MiB: the peak one call allocates above its inputs "
        f"(torch.profiler allocation events). Targets: time and memory ratio <= {fmt(GOAL_RATIO)}, "
        f"import fastattn + first call <= {fmt(GOAL_FIRST_S)} s in a fresh process: {misses} of "
        f"{len(verdicts)} MISS.", "",
        Table(table, ("op", "mode", "fastattn ms", "torch ms", "time ratio", "fastattn MiB",
                      "torch MiB", "memory ratio")),
        f"Shapes: {shapes}. torch column: {peers}.", "",
        Table(first, ("op", "import + first call s", "target", "of which")), ""]


def main(argv: list[str]) -> int:
    """`python -m bench.cpu_path OUT.json [OPTIONS_JSON]`: the cpu-path records, as JSON, into
    OUT.json; OPTIONS_JSON: measure's keyword arguments."""
    out, options = Path(argv[0]), json.loads(argv[1]) if len(argv) > 1 else {}
    out.write_text(json.dumps(measure(**options), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
