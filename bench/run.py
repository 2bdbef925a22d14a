"""The main job: numerical parity against float64 and a benchmark table against torch's own ops,
on this machine's device. Writes bench/results/<date>_<device>.md and prints the same.

    python bench/run.py            # parity + timings (timings need a CUDA GPU)
    python bench/run.py --parity   # parity only

Without a GPU the kernels run under Triton's interpreter: parity is checked, nothing is timed
(interpreter timings say nothing about kernel speed).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from common import DEVICE, HAS_CUDA, header, markdown_table  # noqa: E402

import attention  # noqa: E402
import norm  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parity", action="store_true", help="parity only, no timings")
    args = parser.parse_args()

    head = header()
    lines = [f"# fastattn bench: {head['date']}, {head['device']}",
             "", "```", json.dumps(head, indent=1), "```", ""]
    failed = 0
    for name, module in (("norms", norm), ("attention", attention)):
        rows = module.parity(DEVICE)
        bad = sum(r["pass"] != "yes" for r in rows)
        failed += bad
        lines += [f"## Parity: max |error| against float64 ({name})", "",
                  "pass: error <= 2 x torch's error in the same dtype + atol (fastattn.testing)",
                  "", markdown_table(rows), f"{len(rows) - bad} of {len(rows)} outputs pass", ""]
    if HAS_CUDA and not args.parity:
        lines += ["## Norms: GB/s", "", "```", norm.__doc__.strip(), "```", "",
                  markdown_table(norm.timings(DEVICE)),
                  "## Attention: TFLOP/s", "", "```", attention.__doc__.strip(), "```", "",
                  markdown_table(attention.timings(DEVICE))]
    else:
        lines += ["(no timings: " + ("--parity" if args.parity else "no CUDA device") + ")", ""]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9]+", "-", head["device"]).strip("-")
    out = RESULTS / f"{head['date']}_{name}.md"
    out.write_text(text)
    print(f"written to {out}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
