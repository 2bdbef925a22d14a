"""The main job: does fastattn match torch, and is it faster, on this device?

    python -m bench                      # parity, host overhead, CPU path, ceilings, the sweep
    python -m bench --quick              # fewer parity shapes and a smaller sweep
    python -m bench --host               # the host-overhead table only (quick)
    python -m bench --cpu-path           # the CPU-path table only (CPU; under a minute)
    python -m bench --static             # the static Hopper table only (no GPU needed; minutes)
    python -m bench --parity-only        # parity only
    python -m bench --filter 'norm'      # only the ops whose name matches the regex
    python -m bench --out DIR            # the output folder (bench/results/<date>_<device>)

Installed from a wheel it is `fastattn-bench` (every option the same; default output folder
./fastattn-bench/<date>_<device>), and `fastattn-check` runs the parity part alone (check.py).

1. Says what the device is (GPU, torch, triton, CUDA; or CPU with Triton's interpreter).
2. Parity: every op forward and backward on odd shapes, fp32 / fp16 / bf16, against float64, by the
   rule of fastattn.testing.parity: pass / fail with the error and the bound.
3. Host overhead: µs per call of every public op at tiny shapes, fastattn against torch, and the
   layers above the launchers alone (bench/host.py), against their targets.
4. CPU path (no GPU): fastattn without the interpreter (its torch path) against torch's own ops at
   model sizes, fp32, fwd and fwd+bwd: time and peak-memory ratios, and import + first call in a
   fresh process, against their targets (bench/cpu_path.py).
5. Ceilings (GPU): this device's copy bandwidth and bf16 matmul rate, measured in the same run.
6. Sweep: each case against its peers (torch SDPA's backends, with the equivalent dense mask for
   the window and ALiBi score modifiers, the eager composition for softcap, and FlexAttention with
   the same mask_mod / score_mod; F.layer_norm / F.rms_norm and their torch.compile'd versions;
   F.embedding and the eager compositions; for a decode step against a KV cache, contiguous and
   paged, SDPA, fastattn's prefill kernel and FlexAttention's decoding kernel): ms (median,
   p20-p80; decode: µs per step from a CUDA graph), TFLOP/s or GB/s, % of the ceiling, speedup
   over each peer (~ where the two timings' spreads overlap), peak memory.
7. Targets: fastattn's performance targets as ratios from this run, and how far each falls short.
8. Writes DIR/summary.md (what is printed, with every column of the tables), results.json and
   results.csv (the records; schema in bench/report.py) and DIR/<family>.png plots.

The terminal gets tables of at most 120 columns; summary.md has them whole. Without a GPU the
kernels run under Triton's interpreter: parity is checked as on a GPU, and a sweep of
interpreter-sized shapes runs whose figures are labelled CPU / interpreter figures everywhere they
appear; the host and CPU-path tables are measured on fastattn's torch path in a child process.
Exit status 1 when a parity check fails, or fastattn errs or disagrees with torch in the sweep; 2
when what was asked cannot run here (--static outside a clone; parity or the sweep on a CPU without
numpy, which Triton's interpreter needs).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from . import (HAS_CUDA, cannot_run_kernels, cases, cpu_path, host, measure, parity, report, static,
               targets)

# Seconds the sweep may take (0: no limit), and how they are shared among the families.
DEFAULT_BUDGET_S = {"full": 240, "quick": 90, "cpu": 0, "cpu-quick": 0}
# decode runs last: besides its share it gets what the others leave (its cases go target first,
# then the longest caches first, so a cut drops the short caches).
SHARES = {"attention": 0.45, "norm": 0.25, "embedding": 0.1, "decode": 0.2}


def prog(script: str, module: str) -> str:
    """The command as the user typed it: `python -m MODULE` (bench / fastattn.bench, or a module
    of theirs), else the console script's name."""
    if os.path.basename(sys.argv[0]) in ("__main__.py", f"{module.rpartition('.')[2]}.py"):
        return f"python -m {module}"
    return script


def default_out(slug: str) -> Path:
    """bench/results/<slug> in a clone; ./fastattn-bench/<slug> for an installed package (its
    own folder is site-packages)."""
    here = Path(__file__).resolve().parent
    if (here.parent / "pyproject.toml").is_file():
        return here / "results" / slug
    return Path.cwd() / "fastattn-bench" / slug


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog("fastattn-bench", __package__),
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer parity shapes, a smaller sweep")
    p.add_argument("--host", action="store_true", help="the host-overhead table only")
    p.add_argument("--cpu-path", action="store_true",
                   help="the CPU-path table only (fastattn's torch path vs torch; nothing on CUDA)")
    p.add_argument("--static", action="store_true",
                   help="the static Hopper table only: every attention kernel compiled for sm_90 "
                        "and read from its SASS (bench/static.py; no GPU needed)")
    p.add_argument("--out", type=Path, help="output folder (default bench/results/<date>_<device> "
                   "in a clone, ./fastattn-bench/<date>_<device> when installed)")
    p.add_argument("--parity-only", action="store_true",
                   help="parity only: no host or CPU-path table, no ceilings, no sweep")
    p.add_argument("--filter", default="", metavar="REGEX", help="only ops whose name matches")
    p.add_argument("--budget-s", type=float, metavar="S",
                   help="time limit of the sweep in seconds, 0 for none (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_BUDGET_S.items()) + ")")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    return p.parse_args(argv)


def _sweep(sweep: list[cases.Case], ceilings: dict[str, float], device: str, profile: str,
           budget_s: float, say, save) -> list[dict]:
    """Every case, family by family within the time budget; each family's table printed (say) and
    the records so far saved (save) as soon as it is done."""
    heavy_note = ("n/a: compiled peers not run on the CPU" if profile.startswith("cpu")
                  else "n/a: compiled peers skipped by --quick" if profile == "quick" else None)
    budget = measure.Budget(budget_s, {c.op.family: SHARES[c.op.family] for c in sweep})
    records: list[dict] = []
    for family in cases.FAMILIES:
        todo = [c for c in sweep if c.op.family == family]
        if not todo:
            continue
        budget.start(family)
        for case in report.progress(todo, f"sweep {family}", lambda c: c.title):
            if budget.over():
                note = f"n/a: over the {budget_s:.0f} s sweep budget"
                records += measure.case_note(case, device, note)
                continue
            try:
                records += measure.measure_case(case, ceilings, device, heavy_note)
            except Exception as exc:  # noqa: BLE001  (note it, and keep what the others give)
                note = f"error: case failed: {type(exc).__name__}: {report.describe(exc)}"
                records += measure.case_note(case, device, note)
        say(report.sweep_section(records, family, device))
        save(records)
    return records


NO_MATPLOTLIB = ("(no plots: matplotlib is not installed; pip install 'fastattn[bench]', or "
                 "pip install -e '.[bench]' in a clone)")


def plots(records: list[dict], ceilings: dict[str, float], out: Path,
          device: str) -> tuple[list[Path], str | None]:
    """The PNG plots written (report.plot), and why there are none when they fail: matplotlib
    missing (the bench extra) or any other error, which never costs the run its other files."""
    try:
        return report.plot(records, ceilings, out, device), None
    except ImportError:
        return [], NO_MATPLOTLIB
    except Exception as exc:  # noqa: BLE001  (plots are the last thing: keep the rest)
        return [], f"(no plots: {type(exc).__name__}: {report.describe(exc)})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    info = measure.device_info()
    profile = (("quick" if args.quick else "full") if HAS_CUDA
               else "cpu-quick" if args.quick else "cpu")
    only = [flag for flag, on in (("--host", args.host), ("--cpu-path", args.cpu_path),
                                  ("--static", args.static)) if on]
    if args.static and not static.SCRIPT.is_file():
        why_not = f"--static needs a clone of fastattn: {static.SCRIPT} is not installed"
    else:  # parity and the sweep run the kernels; --host, --cpu-path and --static do not
        why_not = None if only else cannot_run_kernels()
    if why_not:
        print(f"{prog('fastattn-bench', __package__)}: {why_not}", file=sys.stderr)
        return 2
    out = args.out or default_out(info["slug"])
    out.mkdir(parents=True, exist_ok=True)
    device = info["device"]
    text: list[str] = []

    def say(parts: list) -> None:  # print (at most 120 columns), and keep whole for summary.md
        print(report.render(parts, terminal=True), flush=True)
        text.append(report.render(parts, terminal=False))

    def wanted(case: cases.Case) -> bool:
        return re.search(args.filter, case.op.name) is not None

    say(report.header(info, f"none ({', '.join(only)})" if only else profile, argv))
    run = report.record(kind="run", device=device, note=info["detail"], args=argv,
                        profile=profile, seconds={},
                        **{k: info[k] for k in ("date", "torch", "triton", "cuda", "python",
                                                "fastattn", "backend")})
    records = [run]
    started = time.monotonic()

    if not only:
        records += parity.run(args.quick, args.filter, device)
        run["seconds"]["parity"] = round(time.monotonic() - started, 1)
        say(report.parity_section(records))

    if not args.parity_only and (args.host or not only):
        t0 = time.monotonic()
        records += host.records(args.filter)
        run["seconds"]["host"] = round(time.monotonic() - t0, 1)
        say(host.section(records))

    if not args.parity_only and not HAS_CUDA and (args.cpu_path or not only):
        t0 = time.monotonic()
        records += cpu_path.records(args.filter)
        run["seconds"]["cpu-path"] = round(time.monotonic() - t0, 1)
        say(cpu_path.section(records))

    if args.static:
        t0 = time.monotonic()
        records += static.records()
        run["seconds"]["static"] = round(time.monotonic() - t0, 1)
        say(static.section(records))

    ceilings: dict[str, float] = {}
    if not args.parity_only and not only:
        t0 = time.monotonic()
        ceilings, ceiling_records = measure.ceilings(device)
        records += ceiling_records
        say(report.ceiling_section(records))
        sweep = [c for c in cases.sweep_cases(profile) if wanted(c)]
        budget_s = DEFAULT_BUDGET_S[profile] if args.budget_s is None else args.budget_s
        records += _sweep(sweep, ceilings, device, profile, budget_s, say,
                          lambda done: report.write_json(records + done, out))
        beaten = measure.beaten_ceilings(records, ceilings)
        if beaten:
            say(beaten + [""])
        run["seconds"]["sweep"] = round(time.monotonic() - t0, 1)
        target_records = targets.evaluate(records, judged=HAS_CUDA)
        records += target_records
        say(targets.section(target_records, judged=HAS_CUDA))

    files = [report.write_json(records, out), report.write_csv(records, out)]
    if not args.no_plots and not args.parity_only and not only:
        pngs, why_not = plots(records, ceilings, out, device)
        files += pngs
        if why_not:
            say([why_not, ""])
    run["seconds"]["total"] = round(time.monotonic() - started, 1)
    failed = report.failures(records)
    say([f"{len(failed)} fastattn failure(s); {run['seconds']} s; wrote "
         + ", ".join(str(f) for f in [*files, out / "summary.md"]), ""])
    report.write_json(records, out)  # again, with the total time
    (out / "summary.md").write_text("\n".join(text))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
