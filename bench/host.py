"""Host overhead: µs per call of every public op at tiny shapes, where a call's time is Python,
autograd and dispatch, not the kernel.

For each op, forward without and with gradients and forward+backward, these timings in the same
rounds:

    fastattn        the public call on this device's path ("triton" on CUDA; on the CPU the
                    "torch" path, fastattn.torch_path)
    torch           torch's own op, or torch's composition where it has no single op
    above-launcher  the same fastattn call with every launcher replaced by the op's fake
                    implementation (correctly shaped, uninitialised outputs, made on the first
                    call and returned again: a no-op launcher, allocating nothing), so only the
                    layers above the launchers are timed: the cost a GPU pays on top of its
                    kernel launches, measurable on any machine
    autograd floor  a bare torch.autograd.Function on the same leaves (forward: one empty output;
                    backward: ready gradients): what any op written in Python above autograd
                    pays here, and torch's own ops pay about as much; fwd and fwd+bwd only

Targets: above-launcher <= 25 µs per forward and <= 60 µs per forward+backward (on a CPU where the
autograd floor of fwd+bwd is above 60 µs, that target cannot be met by any autograd op; the table
shows the floor next to it).

Timing: torch.utils.benchmark.Timer (one thread; CUDA synchronised at the ends of each block),
warmed up, then ROUNDS rounds in which each of the three runs one block of calls in turn, so a
load spike from another process hits all three alike; median and p20-p80 over the rounds.

On the CPU with Triton's interpreter on (`python -m bench` turns it on for parity), the fastattn
column would time the interpreter, and Triton's mode is fixed once imported: the table is then
measured in a child process (`python -m bench.host OUT.json`) with TRITON_INTERPRET=0.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fastattn
from fastattn import _dispatch

from . import DEVICE, HAS_CUDA
from .cases import (ADD_LAYER_NORM, ATTENTION, BERT_EMBEDDINGS, EMBEDDING, GPT_EMBEDDINGS,
                    LAYER_NORM, RMS_NORM, Inputs, Op, step)
from .measure import overlaps, quantiles
from .report import Table, by_case, fmt, progress, record

NO_GRAD = "fwd, no grad"
MODES = (NO_GRAD, "fwd", "fwd+bwd")
GOAL_US = {NO_GRAD: 25.0, "fwd": 25.0, "fwd+bwd": 60.0}  # above-launcher targets
IMPLS = ("fastattn", "torch", "above-launcher", "autograd floor")
ROUNDS = 9
BLOCK_S = 0.02  # seconds per block of calls
DTYPE = torch.float32
# Where `python -m <this package>` imports it from: the repository for bench, site-packages (or
# wherever fastattn is installed) for fastattn.bench.
ROOT = Path(__file__).resolve().parents[len(__package__.split("."))]

# The launchers of every op (the custom ops' names) and the module holding their fakes.
LAUNCHERS = {"fastattn.attention": ("attention_fwd", "attention_bwd", "varlen_attention_fwd",
                                    "varlen_attention_bwd"),
             "fastattn.layer_norm": ("norm_fwd", "norm_bwd"),
             "fastattn.embedding": ("embedding_fwd", "embedding_bwd")}


def no_op_launchers() -> types.SimpleNamespace:
    """A namespace for _dispatch.replaced_launchers: each launcher's fake implementation, run
    once per argument shapes; later calls with those shapes return the same outputs (a launcher
    allocates its outputs, so allocating them is no cost of the layers above; the lookup, about
    a µs, is counted)."""
    def once(fake: Callable) -> Callable:
        made: dict[tuple, object] = {}

        def launcher(*args):
            key = tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args)
            if key not in made:
                made[key] = fake(*args)
            return made[key]
        return launcher
    return types.SimpleNamespace(**{
        op: once(getattr(importlib.import_module(module), f"_{op}_fake"))
        for module, ops in LAUNCHERS.items() for op in ops})


class _Floor(torch.autograd.Function):
    """The autograd floor: forward makes one empty output, backward hands back ready gradients."""

    @staticmethod
    def forward(ctx, like, grads, *leaves):
        ctx.grads = grads
        return torch.empty_like(like)

    @staticmethod
    def backward(ctx, dout):
        return None, None, *ctx.grads


def _floor_step(inputs: Inputs, mode: str) -> Callable[[], object]:
    """_Floor on the case's leaves, timed as step() times an op (output shaped as dout)."""
    leaves, dout = inputs.leaves, inputs.dout
    grads = tuple(torch.zeros_like(t) for t in leaves)

    def call(t):
        return _Floor.apply(dout, grads, *leaves)
    return step(call, inputs, mode)


@contextlib.contextmanager
def _within(*factories: Callable):
    """Every context of the factories, entered in order."""
    with contextlib.ExitStack() as stack:
        for factory in factories:
            stack.enter_context(factory())
        yield


@dataclass
class HostCase:
    op: str  # the public function's name
    shape: str
    build: Callable[[str], tuple[Inputs, Callable, Callable, str]]
    # device -> inputs, the fastattn call, the torch call, what the torch call is


def _from_op(name: str, op: Op, size: dict, shape: str, peer: str) -> HostCase:
    """A case from a sweep op (cases.py) at a tiny size."""
    def build(device):
        return op.make(size, DTYPE, device, 0), op.ours, op.torch, peer
    return HostCase(name, shape, build)


VARLEN_LENGTHS = (3, 5)


def _varlen(device: str) -> tuple[Inputs, Callable, Callable, str]:
    """Two sequences of 3 and 5 tokens, one head of 16: q, k, v (8, 1, 16)."""
    gen = torch.Generator(device=device).manual_seed(0)
    total, longest = sum(VARLEN_LENGTHS), max(VARLEN_LENGTHS)
    bounds = [0]
    for n in VARLEN_LENGTHS:
        bounds.append(bounds[-1] + n)
    t = {n: torch.randn(total, 1, 16, generator=gen, device=device, dtype=DTYPE,
                        requires_grad=True) for n in ("q", "k", "v")}  # (T, H, D)
    t["cu"] = torch.tensor(bounds, dtype=torch.int32, device=device)  # (B + 1,)

    def ours(t):
        return fastattn.varlen_attention(t["q"], t["k"], t["v"], t["cu"], t["cu"], longest,
                                         longest)

    def per_sequence(t):  # (T, H, D) slices -> (H, n, D) -> SDPA -> back, concatenated
        outs = [F.scaled_dot_product_attention(*(t[n][a:b].transpose(0, 1) for n in "qkv"))
                for a, b in zip(bounds, bounds[1:])]
        return torch.cat([o.transpose(0, 1) for o in outs])

    theirs, peer = per_sequence, "F.sdpa per sequence + cat"
    if HAS_CUDA:  # torch's own varlen op where this torch has one that runs here
        try:
            from torch.nn.attention.varlen import varlen_attn

            def theirs(t):
                return varlen_attn(t["q"], t["k"], t["v"], t["cu"], t["cu"], longest, longest)
            theirs(t)
            peer = "torch.nn.attention.varlen.varlen_attn"
        except Exception:  # noqa: BLE001  (no such op, or not for this GPU / dtype)
            theirs = per_sequence
    dout = torch.randn(total, 1, 16, generator=gen, device=device, dtype=DTYPE)
    return Inputs(t, ("q", "k", "v"), dout), ours, theirs, peer


CASES = (
    _from_op("scaled_dot_product_attention", ATTENTION,
             dict(B=1, H=1, Hkv=1, L=16, S=16, D=16), "(1,1,16,16)", "F.sdpa"),
    HostCase("varlen_attention", "2 seqs 3+5, H1 D16", _varlen),
    _from_op("layer_norm", LAYER_NORM, dict(M=1, N=8), "(1,8)", "F.layer_norm"),
    _from_op("rms_norm", RMS_NORM, dict(M=1, N=8), "(1,8)", "F.rms_norm"),
    _from_op("add_layer_norm", ADD_LAYER_NORM, dict(M=1, N=8), "(1,8)", "add + F.layer_norm"),
    _from_op("embedding", EMBEDDING, dict(B=1, N=4, V=64, D=8), "4 ids, V64 D8",
             "F.embedding"),
    _from_op("gpt_embeddings", GPT_EMBEDDINGS, dict(B=1, N=4, V=64, D=8), "4 ids, V64 D8",
             "2 F.embedding + add"),
    _from_op("bert_embeddings", BERT_EMBEDDINGS, dict(B=1, N=4, V=64, D=8), "4 ids, V64 D8",
             "3 F.embedding + adds + F.layer_norm"),
)


def time_interleaved_us(fns: dict[str, tuple[Callable, Callable]], rounds: int = ROUNDS,
                        block_s: float = BLOCK_S) -> dict[str, tuple[float, float, float]]:
    """fns: name -> (fn, context factory it runs in). Each is warmed up and its block size found
    by blocked_autorange; then `rounds` rounds time one block of each in turn. name -> (median,
    p20, p80) µs per call over the rounds."""
    from torch.utils.benchmark import Timer

    timers, numbers = {}, {}
    for name, (fn, context) in fns.items():
        timers[name] = Timer("fn()", globals={"fn": fn})
        with context():
            per_call = timers[name].blocked_autorange(min_run_time=block_s).median
        numbers[name] = max(1, round(block_s / per_call))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (_, context) in fns.items():
            with context():
                samples[name].append(timers[name].timeit(numbers[name]).median * 1e6)
    return {name: quantiles(s) for name, s in samples.items()}


def measure(pattern: str = "", full_call: bool = True, rounds: int = ROUNDS,
            block_s: float = BLOCK_S) -> list[dict]:
    """Host records (kind "host") for the cases whose op matches the regex pattern, in this
    process. full_call=False leaves the fastattn column out (on the CPU with the interpreter on,
    it would time the interpreter)."""
    device = torch.cuda.get_device_name() if HAS_CUDA else "CPU"
    path = fastattn.backend(DEVICE)
    records = []
    todo = [c for c in CASES if re.search(pattern, c.op)]
    for case in progress(todo, "host overhead", lambda c: c.op):
        inputs, ours, theirs, peer = case.build(DEVICE)
        base = dict(kind="host", op=case.op, shape=case.shape, dtype="float32", device=device,
                    unit="µs")
        for mode in MODES:
            timed = "fwd" if mode == NO_GRAD else mode
            grad = torch.no_grad if mode == NO_GRAD else contextlib.nullcontext
            fakes = no_op_launchers()  # outputs made for this case and mode
            fns = {"fastattn": (step(ours, inputs, timed), grad),
                   "torch": (step(theirs, inputs, timed), grad),
                   "above-launcher": (step(ours, inputs, timed), lambda fakes=fakes: _within(
                       grad, lambda: _dispatch.replaced_launchers(fakes))),
                   "autograd floor": (_floor_step(inputs, timed), contextlib.nullcontext)}
            if not full_call:
                del fns["fastattn"]
            if mode == NO_GRAD:
                del fns["autograd floor"]
            times = time_interleaved_us(fns, rounds, block_s)
            for impl in IMPLS:
                if impl not in times:
                    records.append(record(**base, mode=mode, impl=impl,
                                          note="n/a: not measured in this process"))
                    continue
                us, lo, hi = times[impl]
                extra = {}
                if impl == "above-launcher":
                    extra = dict(goal=GOAL_US[mode], backend="no-op launchers",
                                 **{"pass": us <= GOAL_US[mode]})
                elif impl == "fastattn":
                    extra = dict(backend=path)
                elif impl == "torch":
                    extra = dict(note=peer)
                else:
                    extra = dict(note="bare torch.autograd.Function")
                records.append(record(**base, mode=mode, impl=impl, metric=us, ms=us / 1e3,
                                      ms_lo=lo / 1e3, ms_hi=hi / 1e3, **extra))
            rows = {r["impl"]: r for r in records[-len(IMPLS):]}
            if "fastattn" in times:
                for r in rows.values():
                    if r["ms"] is not None:
                        r["ratio"] = r["ms"] / rows["fastattn"]["ms"]
                rows["torch"]["noisy"] = overlaps(rows["torch"], rows["fastattn"])
    return records


def records(pattern: str = "") -> list[dict]:
    """Host records measured where the fastattn column means what it says: in this process, or,
    on the CPU with the interpreter on, in a child process on fastattn's torch path."""
    if HAS_CUDA or fastattn.backend(DEVICE) != _dispatch.INTERPRETER:
        return measure(pattern)
    return on_torch_path(f"{__package__}.host", pattern)


def on_torch_path(module: str, *args: str) -> list[dict]:
    """The records `python -m MODULE OUT.json *ARGS` writes into OUT.json, run in a child process
    with TRITON_INTERPRET=0: fastattn's torch path, whatever Triton's mode in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        subprocess.run([sys.executable, "-m", module, str(out), *args], cwd=ROOT, check=True,
                       env={**os.environ, "TRITON_INTERPRET": "0"})
        return json.loads(out.read_text())


def _spread(r: dict) -> str:
    if r["metric"] is None:
        return r["note"] or "-"
    return f"{fmt(r['metric'])} ({fmt(r['ms_lo'] * 1e3)}-{fmt(r['ms_hi'] * 1e3)})"


def section(records_: list[dict]) -> list:
    """The host table (section parts for report.render)."""
    rows = [r for r in records_ if r["kind"] == "host"]
    if not rows:
        return []
    table, misses = [], 0
    for (op, mode), rs in by_case(rows, "host").items():
        ours, theirs, above = rs["fastattn"], rs["torch"], rs["above-launcher"]
        floor = rs.get("autograd floor")
        extra = None
        if ours["metric"] is not None:
            extra = ("~" if theirs["noisy"] else "") + fmt(ours["metric"] - theirs["metric"])
        misses += above["pass"] is False
        row = {"op": op, "mode": mode, "shape": theirs["shape"]}
        for name, r in (("fastattn", ours), ("torch", theirs), ("above-launcher", above),
                        ("autograd floor", floor)):
            row[f"{name} µs"] = fmt(r["metric"]) if r and r["metric"] is not None else "-"
            row[f"{name} p20-p80"] = _spread(r) if r else "-"
        row["extra µs"] = extra
        row["target"] = f"<={fmt(above['goal'])} " + ("ok" if above["pass"] else "MISS")
        table.append(row)
    device, path = rows[0]["device"], rows[0]["backend"] or "-"
    peers = "; ".join(dict.fromkeys(f"{r['op']}: {r['note']}" for r in rows
                                    if r["impl"] == "torch"))
    return [
        f"## Host overhead: µs per call at tiny shapes, fp32, {device}", "",
        f"median over {ROUNDS} interleaved rounds (p20-p80 in summary.md); fastattn: the full "
        f"call on the {path} path; extra = fastattn - torch; above-launcher: fastattn with no-op "
        "launchers (the layers above the kernels); autograd floor: "
        "a bare torch.autograd.Function on the same leaves, which any autograd op pays. Targets: "
        f"above-launcher <= 25 µs fwd, <= 60 µs fwd+bwd: {misses} of {len(table)} rows MISS.", "",
        Table(table, ("op", "mode", "fastattn µs", "torch µs", "extra µs", "above-launcher µs",
                      "autograd floor µs", "target")),
        *(["~: the p20-p80 ranges of fastattn and torch overlap: the difference is within the "
           "noise."] if any(r["noisy"] for r in rows) else []),
        f"torch column: {peers}.", ""]


def main(argv: list[str]) -> int:
    """`python -m bench.host OUT.json [REGEX]`: the host records, as JSON, into OUT.json."""
    out, pattern = Path(argv[0]), argv[1] if len(argv) > 1 else ""
    out.write_text(json.dumps(measure(pattern), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
