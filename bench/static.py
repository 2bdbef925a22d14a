"""The static Hopper report (`python -m bench --static`; no GPU needed): every attention kernel the
launchers run on sm_90, compiled and read without running (tests/sm90_compile.py --static, the
check tests/test_hopper_static.py asserts), one row per kernel.

Columns: the tile (BLOCK_M x BLOCK_N), warps / stages, registers per thread, spill bytes (ptxas),
shared memory, CTAs per SM (the least of what registers, shared memory and warps allow), the MMA
kind and the main loop's MMA shapes and counts per iteration (wgmma shapes m64 k16, as n...), its
global loads (TMA, cp.async or LDG), its wgmma waits (WARPGROUP.DEPBAR) per iteration, and

    instr/score = main-loop SASS instructions x warps / (BLOCK_M x BLOCK_N)
    issue:TC    = (main-loop SASS instructions x warps / 4 schedulers)
                  / (the loop's MMA FMAs / 2048 dense bf16 FMA per clock per SM)

(the main loop: the leanest loop with MMAs, the unmasked one where a kernel splits its loop; above
1 the instruction stream, not the tensor cores, sets the pace: a static estimate, not a timing),
and the gate: the rules it breaks (every MMA a wgmma, no wgmma serialised by ptxas, no MMA work
duplicated across warps, no spills).

Records: kind "static", impl "fastattn", pass = the gate, note = the rules broken, and "static":
the check's whole record for the kernel (every loop, every dot's layout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from . import report

SCRIPT = Path(__file__).resolve().parent.parent / "tests" / "sm90_compile.py"
# Short names of the gate's rules (its messages start with them), for the terminal.
RULES = {"mma.sync": "hmma", "serialised wgmma": "serial", "duplicated MMA": "dup",
         "spills": "spill", "does not fit": "fit", "no TMA": "noTMA", "issue:TC": "TC",
         "compile error": "error", "no ptxas report": "nolog", "narrow loads": "narrow"}
LOADS = {"TMA": "TMA", "cp.async": "cp", "LDG": "LDG"}


def records(arch: int = 90, jobs: int | None = None) -> list[dict]:
    """Run the check in a child process (kernels compiled, not interpreted) and return its records
    as report records."""
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), str(arch), "--static", "--jobs", str(jobs)],
                         capture_output=True, text=True, env=env, check=False)
    if run.returncode:
        raise RuntimeError(f"the static check failed: {run.stderr.strip()[-500:]}")
    out = []
    for line in run.stdout.splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        out.append({**report.record(
            kind="static", op="attention", family="attention", impl="fastattn",
            mode="fwd" if r["kernel"] in ("fwd", "decode", "merge", "append") else "bwd",
            dtype="bfloat16",
            shape=f"d{r['head_dim']} {r['feature']} {r['kernel']}",
            device=f"sm_{arch} static (Triton {r['triton']}; compiled, not run)",
            size={"D": r["head_dim"], "feature": r["feature"]}, **{"pass": r["ok"]},
            note="; ".join(r["gate"]) or None), "static": r})
    return out


def _mma(r: dict, short: bool) -> str:
    """The main loop's MMAs per iteration: "64x64x16×8 ..." (short: wgmma as n64×8, m64 k16
    implied; mma.sync as hmma 16816×48)."""
    shapes = ((r.get("main_loop") or {}).get("mma_shapes") or {}).items()
    if not short:
        return " ".join(f"{s}×{n}" for s, n in shapes) or "-"
    return " ".join(f"n{s.split('x')[1]}×{n}" if "x" in s else f"hmma {s}×{n}"
                    for s, n in shapes) or "-"


def _edge_issue_tc(r: dict) -> float | None:
    """The highest issue:TC of the kernel's loops with MMAs: where a kernel splits its key loop,
    what its masked blocks run (the causal diagonal, a window's edges, a bool mask's partial
    blocks: an unstructured mask runs that loop throughout)."""
    tcs = [lp["issue_tc"] for lp in r.get("loops", []) if lp.get("issue_tc") is not None]
    return max(tcs, default=None)


def _row(rec: dict) -> dict:
    r, loop = rec["static"], rec["static"].get("main_loop") or {}
    kernel = {"preprocess": "prep"}.get(r["kernel"], r["kernel"])
    if r.get("error"):
        return {"kernel": kernel, "D": r["head_dim"], "feature": r["feature"], "gate": "error",
                "failing rules": r["error"]}
    rules = sorted({RULES.get(g.split(":")[0], g.split(":")[0]) for g in r["gate"]})
    by, loads = r["ctas_by"], loop.get("loads", {})
    return {
        "kernel": kernel, "D": r["head_dim"], "feature": r["feature"], "#": r.get("candidate", 0),
        "tile": r["tile"],
        "w/s": f"{r['warps']}/{r['stages']}", "regs": r["regs"],
        "spill": f"{r['spill_store']}/{r['spill_load']}" if r["spill_store"] or r["spill_load"]
        else "0",
        "smemK": round(r["smem"] / 1024, 1), "CTAs": r["ctas_per_sm"],
        "MMA/iter": _mma(r, short=True),
        "load": " ".join(f"{LOADS.get(k, k)}×{n}" for k, n in loads.items()) or "-",
        "wait": loop.get("depbar"), "i/sc": loop.get("instr_per_score"),
        "issue:TC": loop.get("issue_tc"), "edge": _edge_issue_tc(r),
        "gate": ",".join(rules) or "ok",
        "MMA kind": r["mma_kind"], "MMA shapes per iteration": _mma(r, short=False),
        "CTAs by regs/smem/warps": f"{by['regs']}/{by['smem']}/{by['warps']}",
        "loop insns": loop.get("insns"), "MUFU.EX2": loop.get("ex2"),
        "failing rules": "; ".join(r["gate"]) or "-",
    }


TERMINAL = ("kernel", "D", "feature", "#", "tile", "w/s", "regs", "spill", "smemK", "CTAs", "MMA/iter",
            "load", "wait", "i/sc", "issue:TC", "edge", "gate")


def section(records_: list[dict]) -> list:
    """The static table (section parts for report.render)."""
    rows = [r for r in records_ if r["kind"] == "static"]
    if not rows:
        return []
    table = [_row(r) for r in rows]
    failed = [r for r in rows if not r["pass"]]
    counts: dict[str, int] = {}
    for r in failed:
        for g in r["static"]["gate"]:
            name = g.split(":")[0]
            counts[name] = counts.get(name, 0) + 1
    return [
        f"## Static Hopper check: {rows[0]['device']}", "",
        "Every attention kernel a forward + backward launches, and a decode step's (append, "
        "decode, merge: batch 1, 32 query heads on 4 kv heads, a 32k cache), bf16, compiled for "
        "sm_90 as a launch on contiguous tensors specialises it (tests/sm90_compile.py "
        "--static). i/sc "
        "(instructions per score) = main-loop SASS instructions x warps / (BLOCK_M x BLOCK_N); "
        "issue:TC = (main-loop "
        "instructions x warps / 4) / (its MMA FMAs / 2048 per clock): above 1 the instruction "
        "stream, not the tensor cores, sets the pace (static estimate); edge: the highest issue:TC "
        "of the kernel's loops, what its masked blocks run (the causal diagonal, a window's "
        "edges, a bool mask's partial blocks: all of an unstructured mask's). wait: WARPGROUP.DEPBAR "
        "per main-loop iteration. MMA/iter: the main loop's MMAs, wgmma as n<N>×<count> (m64 "
        "k16), mma.sync as hmma. load: its global loads (TMA, cp = cp.async, LDG). spill: bytes "
        "stored/loaded. CTAs: per SM. gate: ok, or the rules broken (hmma: an mma.sync; serial: "
        "a wgmma ptxas serialises; dup: MMA work duplicated across warps; spill; noTMA: the "
        "forward's K / V not loaded by TMA; fit: no room for one CTA per SM; TC: issue:TC above "
        "0.6 for the d128 forward, 1.0 "
        "otherwise; the memory-bound decode kernels (16-row tiles, mma.sync) are held to no "
        "spills and K / V loaded by TMA or 16-byte vectors, narrow otherwise). #: the autotuning candidate (0: the default, what runs untuned; 1, 2, ...: "
        "the alternates configs.py lists for the tuner).", "",
        report.Table(table, TERMINAL),
        f"{len(rows) - len(failed)} of {len(rows)} kernels pass the static Hopper gate "
        f"({sum(r['static'].get('candidate', 0) == 0 and r['pass'] for r in rows)} of "
        f"{sum(r['static'].get('candidate', 0) == 0 for r in rows)} defaults); failing: "
        + (", ".join(f"{name} {n}" for name, n in counts.items()) or "none")
        + " (summary.md: the rules broken, with their numbers).", ""]
