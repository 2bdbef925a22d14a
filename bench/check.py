"""fastattn-check: does every fastattn op match float64 on this machine's device?

    fastattn-check                 # every op, forward and every gradient, at its odd parity sizes
    fastattn-check --quick         # one size per op (seconds on a GPU; ~20 s on a 2-core CPU)
    fastattn-check --filter norm   # only the ops whose name matches the regex
    fastattn-check --json FILE     # also write the records (the schema of bench/report.py)

(in a clone: `python -m bench.check`). Every op of `python -m bench`'s parity step (cases.OPS: the
seven attention variants, among them the sliding window, softcap and ALiBi score modifiers; the
three norms; the three embeddings; decoding against a KV cache, contiguous and paged, with ragged
cache_seqlens: its output alone, inference has no backward), in every dtype this device runs
(fp32, fp16, and bf16 where the GPU has it; all three on a CPU, under Triton's interpreter), each
output and each gradient held to the rule of fastattn.testing.parity:

    max|fastattn - ref64| <= 2 * max|torch - ref64| + atol[dtype] * max(1, max|ref64|)

A row per output: its error, torch's, the bound, pass / FAIL and the path that ran. Exit status 1
when an output fails or an op errs (or no op matches --filter), 2 when the kernels cannot run here
(on a CPU without numpy, which Triton's interpreter needs), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import cannot_run_kernels, measure, parity, report
from .__main__ import prog


def _prog() -> str:
    return prog("fastattn-check", f"{__package__}.check")


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=_prog(),
                                description=__doc__.splitlines()[0],
                                epilog="exit status 1 when any output fails or an op errs, 2 "
                                       "when the kernels cannot run here")
    p.add_argument("--quick", action="store_true",
                   help="one odd size per op instead of every parity size")
    p.add_argument("--filter", default="", metavar="REGEX", help="only ops whose name matches")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the records to FILE")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    why_not = cannot_run_kernels()
    if why_not:
        print(f"{_prog()}: {why_not}", file=sys.stderr)
        return 2
    info = measure.device_info()
    dtypes = ", ".join(str(d).removeprefix("torch.") for d in parity.device_dtypes())
    print(report.render(report.header(info, f"{'quick' if args.quick else 'every size'}; "
                                      f"{dtypes}", argv, "fastattn-check", "parity"),
                        terminal=True), flush=True)
    started = time.monotonic()
    records = parity.run(args.quick, args.filter, info["device"])
    print(report.render(report.parity_rows_section(records), terminal=True))
    failed = report.failures(records, ("parity",))
    print(f"{len(failed)} failure(s) in {time.monotonic() - started:.0f} s"
          + ("" if records else f": no op matches {args.filter!r}"))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 1 if failed or not records else 0


if __name__ == "__main__":
    sys.exit(main())
