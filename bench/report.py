"""What the runner writes: the records (one schema for results.json and results.csv), the tables
(aligned text on the terminal, at most 120 columns; markdown with every column in summary.md),
PNG plots, and a progress bar.

A record is a flat dict with every key of RECORD_KEYS (None where it does not apply):

    kind         "run" (first record: device, versions, arguments, seconds per phase), "parity",
                 "host", "cpu-path" (bench/cpu_path.py, CPU only), "ceiling", "sweep", "target"
                 or "static" (bench/static.py, compile-only sm_90 analysis: pass = the static
                 Hopper gate, note = the rules broken, and one extra key "static" with the check's
                 whole record, left out of results.csv)
    op           "attention", "attention_causal", "attention_padding_mask", "attention_gqa",
                 "attention_window", "attention_softcap", "attention_alibi", "layer_norm",
                 "rms_norm", "add_layer_norm", "embedding", "gpt_embeddings",
                 "bert_embeddings", "decode", "decode_paged"; for ceilings "copy" / "matmul"; host records: the public
                 function ("scaled_dot_product_attention", "varlen_attention", ...); cpu-path
                 records: the sweep op's name
    family       "attention" | "norm" | "embedding" | "decode"
    mode         "fwd" | "bwd" | "fwd+bwd" (parity: "fwd" for out, "bwd" for gradients;
                 decode: "fwd" alone, one decoding step);
                 cpu-path also "first call" (import fastattn + the first forward, fresh process)
    impl         "fastattn" for ours; peers "torch flash", "torch efficient", "torch cudnn",
                 "torch math", "torch flex", "torch eager" (softcap: the eager composition),
                 "torch sdpa" (softcap: n/a, no SDPA call computes it; decode: SDPA's pick),
                 "torch", "torch compile", "fastattn prefill" (decode: fastattn's SDPA);
                 host records also "above-launcher" (fastattn with no-op launchers)
    shape, size  the shape as printed ("B8 H16 N2048 D128", "B1 H16 N32768 D128 W4096",
                 "M174762 N768", ...) and as a dict
    dtype        "bfloat16", "float16", "float32"
    device       the GPU's name, or "CPU, Triton interpreter" (those figures are not GPU figures);
                 host and cpu-path records on a CPU: "CPU"
    pass         parity: within the parity rule (fastattn.testing.parity); sweep: output agrees
                 with torch's own op at this size (None for torch's op itself); target: met (None
                 when not judged, on a CPU); host above-launcher: within its goal; cpu-path
                 fastattn: time and peak memory ratios within goal, first call within goal (s)
    ms, ms_lo, ms_hi   median time and its 20th / 80th percentiles (decode on CUDA: per step of a
                       CUDA graph over rotated inputs, measure.graph_time_ms)
    metric, unit       TFLOP/s (attention) or GB/s (memory-bound ops), by the formulas of cases.py;
                       ceilings: the measured rate; targets: the judged value (% or x); host:
                       µs per call (median); cpu-path: ms (first call: s)
    ceiling_pct  metric as % of this run's measured ceiling (matmul for attention, copy
                 otherwise, for decode a reference that may pass 100; none on a CPU)
    ratio        sweep and host: this impl's time / fastattn's (fastattn's speedup over it; 1.0
                 for fastattn); parity: err / bound (<= 1 passes); target: value / goal;
                 cpu-path fastattn records: fastattn's time / torch's (the other way round)
    vs_best, best_peer  fastattn records: the fastest peer and fastattn's speedup over it
    noisy        sweep, host and cpu-path: the ratio (vs_best for fastattn) compares two timings
                 whose p20-p80 ranges overlap, so it is within the noise (printed with a ~)
    peak_mib     peak memory the timed call allocates above its inputs (CUDA; cpu-path: CPU,
                 from torch.profiler's allocation events, measure.cpu_peak_mib)
    peak_ratio   cpu-path fastattn records: fastattn's peak_mib / torch's
    output, err, torch_err, bound, backend   parity: which output, max |error| of fastattn and of
                 torch against float64, the bound, and the fastattn path that ran; host: the
                 path fastattn took ("no-op launchers" for above-launcher)
    target, goal target records: the target's name and the value it asks for; host
                 above-launcher: the goal in µs; cpu-path: the ratio's (x) or the first call's (s)
    note         why a figure is missing ("n/a: ..."; "error: ..." is a fastattn failure); host
                 and cpu-path torch records: what torch's column times; cpu-path first call:
                 its import and call times; a timed decode record: "eager time: no CUDA
                 graph: ..." where its graph could not be captured
"""

from __future__ import annotations

import csv
import json
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TypeVar

CPU_LABEL = "CPU, Triton interpreter"  # the device of a run without a GPU: never GPU figures

RECORD_KEYS = ("kind", "op", "family", "mode", "impl", "shape", "dtype", "device", "pass", "ms",
               "ms_lo", "ms_hi", "metric", "unit", "ceiling_pct", "ratio", "vs_best", "best_peer",
               "noisy", "peak_mib", "peak_ratio", "output", "err", "torch_err", "bound", "backend",
               "target", "goal", "note", "size")


def record(**fields) -> dict:
    unknown = set(fields) - set(RECORD_KEYS)
    if unknown and fields.get("kind") != "run":
        raise KeyError(f"not record keys: {sorted(unknown)}")
    return {**dict.fromkeys(RECORD_KEYS), **fields}


def by_case(records: list[dict], kind: str) -> dict[tuple[str, str], dict[str, dict]]:
    """The records of a kind, grouped: (op, mode) -> impl -> record, in the records' order."""
    cases: dict[tuple[str, str], dict[str, dict]] = {}
    for r in records:
        if r["kind"] == kind:
            cases.setdefault((r["op"], r["mode"]), {})[r["impl"]] = r
    return cases


def describe(exc: BaseException) -> str:
    """An exception's first sentence, short enough for a note."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:100]


# ---- terminal tables (markdown) ----


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v == 0 or abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.3g}" if abs(v) >= 1e-2 else f"{v:.2e}"
    return str(v)


def _cells(rows: list[dict], cols: list[str]) -> list[list[str]]:
    return [cols] + [[fmt(r[c]) for c in cols] for r in rows]


def markdown_table(rows: list[dict]) -> str:
    """Every column, aligned (summary.md)."""
    if not rows:
        return "(no rows)\n"
    cells = _cells(rows, list(rows[0]))
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def text_table(rows: list[dict], cols: tuple[str, ...] | None = None, width: int = 120) -> str:
    """The columns `cols` (default all), aligned with two spaces between them and no more than
    `width` characters a line: the widest column's cells are cut (ending in ~) until it fits."""
    if not rows:
        return "(no rows)\n"
    cells = _cells(rows, list(cols or rows[0]))
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    while sum(widths) + 2 * (len(widths) - 1) > width and max(widths) > 8:
        widths[widths.index(max(widths))] -= 1
    def cut(c: str, w: int) -> str:
        return c if len(c) <= w else c[:w - 1] + "~"
    lines = ["  ".join(cut(c, w).ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


@dataclass
class Table:
    rows: list[dict]
    terminal: tuple[str, ...] | None = None  # the columns printed (None: all); summary.md: all


TERMINAL_WIDTH = 120


def render(parts: list, terminal: bool) -> str:
    """A section (strings and Tables) as text: for the terminal (the tables' terminal columns,
    prose wrapped, no line over TERMINAL_WIDTH) or for summary.md (markdown, every column)."""
    out = []
    for part in parts:
        if isinstance(part, Table):
            out.append(text_table(part.rows, part.terminal, TERMINAL_WIDTH) if terminal
                       else markdown_table(part.rows))
        elif terminal:
            out += [textwrap.fill(line, TERMINAL_WIDTH, subsequent_indent="  "
                                  if line.startswith("- ") else "", break_on_hyphens=False)
                    if line else "" for line in part.splitlines() or [""]]
        else:
            out.append(part)
    return "\n".join(out)


def header(info: dict, profile: str, argv: list[str], title: str = "fastattn bench",
           what: str = "sweep") -> list:
    """The run's title, device and versions, and `what` it runs (the sweep's profile)."""
    return [f"# {title}: {info['date']}, {info['device']}", "",
            f"- device: {info['detail']}",
            f"- fastattn {info['fastattn']} ({info['backend']} path), torch {info['torch']}, "
            f"triton {info['triton']}, CUDA {info['cuda']}, Python {info['python']}",
            f"- {what}: {profile}; arguments: {' '.join(argv) or '(none)'}", ""]


def failures(records: list[dict], kinds: tuple[str, ...] = ("parity", "sweep")) -> list[dict]:
    """fastattn's records of those kinds that fail: outside the rule, or an error."""
    return [r for r in records if r["impl"] == "fastattn" and r["kind"] in kinds
            and (r["pass"] is False or (r["note"] or "").startswith("error"))]


PARITY_RULE = ("pass: max|fastattn - ref64| <= 2 x max|torch - ref64| + atol[dtype] x "
               "max(1, |ref64|) (fastattn.testing.parity)")


def parity_section(records: list[dict]) -> list:
    rows = [r for r in records if r["kind"] == "parity"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["dtype"]), []).append(r)
    summary = []
    for (op, dtype), rs in groups.items():
        judged = [r for r in rs if r["pass"] is not None]
        worst = max((r for r in judged if r["ratio"] is not None), key=lambda r: r["ratio"],
                    default=None)
        summary.append({"op": op, "dtype": dtype, "shapes": len({r["shape"] for r in rs}),
                        "pass": f"{sum(r['pass'] for r in judged)}/{len(judged)}" if judged
                        else rs[0]["note"],
                        "worst err / bound": worst["ratio"] if worst else None,
                        "worst output": f"{worst['output']} {worst['shape']}" if worst else None,
                        "path": worst["backend"] if worst else None})
    failed = [r for r in rows if r["pass"] is False]
    parts = ["## Parity: fwd and bwd against float64", "", PARITY_RULE, "", Table(summary),
             _parity_count(rows) + (" (FAILURES below)" if failed else ""), ""]
    if failed:
        keys = ("op", "shape", "dtype", "output", "err", "torch_err", "bound", "note")
        parts.append(Table([{k: r[k] for k in keys} for r in failed]))
    return parts


def _parity_count(rows: list[dict]) -> str:
    n = sum(r["pass"] is not None for r in rows)
    return f"{n - sum(r['pass'] is False for r in rows)} of {n} outputs pass"


def parity_rows_section(records: list[dict]) -> list:
    """Every parity record as a row (fastattn-check): its output's error, torch's, the bound and
    pass / FAIL; n/a (with the reason in note) where fastattn does not run the case."""
    rows = [r for r in records if r["kind"] == "parity"]
    table = [{"op": r["op"], "shape": r["shape"], "dtype": SHORT_DTYPES.get(r["dtype"], r["dtype"]),
              "output": r["output"], "err": r["err"], "torch err": r["torch_err"],
              "bound": r["bound"], "err/bound": r["ratio"],
              "pass": {True: "pass", False: "FAIL", None: "n/a"}[r["pass"]],
              "path": r["backend"], "note": r["note"]} for r in rows]
    failed = sum(r["pass"] is False for r in rows)
    return ["## Parity: every output against float64", "", PARITY_RULE, "",
            Table(table, tuple(k for k in (table[0] if table else ())
                               if k != "note" or any(r["note"] for r in rows))),
            _parity_count(rows) + (f"; {failed} FAIL" if failed else ""), ""]


def ceiling_section(records: list[dict]) -> list:
    rows = [{"ceiling": r["op"], "rate": f"{fmt(r['metric'])} {r['unit']}", "shape": r["shape"],
             "ms": r["ms"], "how": r["note"]} for r in records if r["kind"] == "ceiling"]
    if not rows:
        return ["## Ceilings", "", "None on the CPU: nothing measured here bounds what torch's "
                "own CPU kernels reach, so no % of a ceiling is given.", ""]
    return ["## Ceilings measured in this run", "", Table(rows)]


def _peer_name(impl: str) -> str:
    return impl.removeprefix("torch ") if impl != "torch" else impl


SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
NOISE_NOTE = ("~: the two timings' p20-p80 ranges overlap: the ratio is within the noise of "
              "this run and says nothing either way.")


def speedup(r: dict, key: str = "ratio") -> str:
    """A ratio as printed: "1.5x", or "~1.5x" when it is within the noise (see NOISE_NOTE)."""
    return ("~" if r["noisy"] else "") + f"{fmt(r[key])}x"


def sweep_section(records: list[dict], family: str, device: str) -> list:
    """One row per (op, shape, dtype, mode): fastattn's figures and its speedup over each peer
    (decode: decode_section)."""
    rows = [r for r in records if r["kind"] == "sweep" and r["family"] == family]
    if not rows:
        return []
    if family == "decode":
        return decode_section(rows, device)
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        cases.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), []).append(r)
    unit = rows[0]["unit"]
    ceiling = "matmul" if family == "attention" else "copy"
    has_ceiling = any(r["ceiling_pct"] is not None for r in rows)
    has_peak = any(r["peak_mib"] is not None for r in rows)
    table, notes = [], {}
    for (op, shape, dtype, mode), rs in cases.items():
        ours = next(r for r in rs if r["impl"] == "fastattn")
        peers = []
        for p in rs:
            if p["impl"] == "fastattn":
                continue
            figure = (speedup(p) if p["ratio"] is not None
                      else "n/a" if p["ms"] is None else f"{fmt(p['ms'])}ms")
            peers.append(f"{_peer_name(p['impl'])} {figure}")
            if p["note"]:
                notes.setdefault((p["impl"], p["note"]), []).append(op)
        if ours["note"]:
            notes.setdefault(("fastattn", ours["note"]), []).append(op)
        row = {"op": op, "shape": shape, "dtype": SHORT_DTYPES.get(dtype, dtype), "mode": mode,
               "fastattn ms (p20-p80)":
                   f"{fmt(ours['ms'])} ({fmt(ours['ms_lo'])}-{fmt(ours['ms_hi'])})"
                   if ours["ms"] is not None else ours["note"],
               unit: ours["metric"]}
        if has_ceiling:
            row[f"% {ceiling}"] = ours["ceiling_pct"]
        if has_peak:
            row["peak MiB"] = ours["peak_mib"]
        row.update({"agrees": ours["pass"],
                    "vs best peer": (f"{speedup(ours, 'vs_best')} {_peer_name(ours['best_peer'])}"
                                     if ours["vs_best"] else None),
                    "fastattn speedup over each peer": ", ".join(peers)})
        table.append(row)
    title = {"attention": "Attention", "norm": "LayerNorm / RMSNorm", "embedding": "Embeddings"}
    parts = [f"## {title[family]}: {unit}"
             + (f", % of the measured {ceiling} ceiling" if has_ceiling else "")
             + ", speedup over peers"
             + (" (CPU, Triton interpreter: not GPU figures)" if device == CPU_LABEL else ""), "",
             Table(table, ("op", "shape", "dtype", "mode", "fastattn ms (p20-p80)", unit,
                           "agrees", "vs best peer")),
             (NOISE_NOTE + " " if any(r["noisy"] for r in rows) else "")
             + "Every peer's figure: summary.md.", ""]
    if notes:
        parts += ["Missing figures:", ""]
        parts += [f"- {impl}: {note} ({', '.join(sorted(set(ops)))})"
                  for (impl, note), ops in notes.items()]
        parts.append("")
    return parts


DECODE_FORMULA = (
    "GB/s = (2·B·S·Hkv·D·e + 2·B·Hq·D·e) / time: the K and V caches read once, q read and out "
    "written, e bytes per element; the caches are full (cache_seqlens = S). % copy: that rate "
    "over this run's measured copy bandwidth (dst.copy_(src), bytes read + written; none on a "
    "CPU): a reference, not a bound (a read-only stream may pass it). Paged rows: pages of "
    "`page` rows, each sequence's pages a random permutation of the cache's. Peers read the same "
    "rows as (B, Hkv, S, D), a view of the contiguous cache or a gathered copy of the paged one: "
    "torch sdpa (F.scaled_dot_product_attention on q (B, Hq, 1, D), enable_gqa where Hq > Hkv, "
    "the backend it picks), fastattn prefill (fastattn.scaled_dot_product_attention on the same "
    "step), torch flex (FlexAttention compiled, its decoding kernel) where timed. On CUDA each "
    "time is a CUDA graph replaying the step over rotated copies of the inputs (>= 256 MiB, so "
    "L2 holds none of them), per step.")


def _decode_order(r: dict) -> tuple:
    """Reading order of the decode table: op, GQA before MHA, batch, cache length."""
    s = r["size"]
    return (r["op"], -s["H"] // s["Hkv"], s["B"], s["S"])


def _us(ms) -> float | None:
    return None if ms is None else 1e3 * ms


def decode_section(rows: list[dict], device: str) -> list:
    """The decode sweep: a row per case, µs per step (median, p20-p80), GB/s of KV read, % of the
    measured copy bandwidth, whether fastattn agrees with torch, its speedup over each peer (with
    the peer's µs). Cases skipped (over the memory budget) keep a row with the reason."""
    cases: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=_decode_order):
        cases.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), []).append(r)
    table, notes = [], {}
    for (op, shape, dtype, _), rs in cases.items():
        ours = next(r for r in rs if r["impl"] == "fastattn")
        peers = []
        for p in rs:
            if p["impl"] == "fastattn":
                continue
            figure = ("n/a" if p["ms"] is None else f"{fmt(_us(p['ms']))} µs" if p["ratio"] is None
                      else f"{speedup(p)} ({fmt(_us(p['ms']))} µs)")
            peers.append(f"{_peer_name(p['impl'])} {figure}")
            if p["note"]:
                notes.setdefault((p["impl"], p["note"]), []).append(shape)
        if ours["note"] and ours["ms"] is not None:
            notes.setdefault(("fastattn", ours["note"]), []).append(shape)
        table.append({
            "op": op, "shape": shape, "dtype": SHORT_DTYPES.get(dtype, dtype),
            "µs per step (p20-p80)":
                f"{fmt(_us(ours['ms']))} ({fmt(_us(ours['ms_lo']))}-{fmt(_us(ours['ms_hi']))})"
                if ours["ms"] is not None else ours["note"],
            "GB/s": ours["metric"], "% copy": ours["ceiling_pct"], "peak MiB": ours["peak_mib"],
            "agrees": ours["pass"],
            "vs best peer": (f"{speedup(ours, 'vs_best')} {_peer_name(ours['best_peer'])}"
                             if ours["vs_best"] else None),
            "fastattn speedup over each peer (peer µs)": ", ".join(peers)})
    parts = ["## Decode, one step (q length 1) against a KV cache: µs per step, GB/s of KV read, "
             "% of the measured copy bandwidth, speedup over peers"
             + (" (CPU, Triton interpreter: not GPU figures)" if device == CPU_LABEL else ""), "",
             DECODE_FORMULA, "",
             Table(table, ("op", "shape", "dtype", "µs per step (p20-p80)", "GB/s", "% copy",
                           "agrees", "vs best peer")),
             (NOISE_NOTE + " " if any(r["noisy"] for r in rows) else "")
             + "Every peer's figure: summary.md.", ""]
    if notes:
        parts += ["Notes:", ""]
        parts += [f"- {impl}: {note} ({len(set(where))} case(s): {', '.join(sorted(set(where))[:3])}"
                  + (", ..." if len(set(where)) > 3 else "") + ")"
                  for (impl, note), where in notes.items()]
        parts.append("")
    return parts


# ---- files ----


def write_json(records: list[dict], out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(records, indent=1, default=str) + "\n")
    return path


def write_csv(records: list[dict], out: Path) -> Path:
    path = out / "results.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RECORD_KEYS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({**r, "size": json.dumps(r["size"]) if r["size"] else None})
    return path


# Per family: the size key on the x axis, and the size keys that split the cases into series.
PLOT_AXES = {"attention": ("L", ("D",)), "norm": ("N", ()), "embedding": ("D", ()),
             "decode": ("S", ("B", "Hkv"))}
# One colour per implementation in every panel; fastattn black and thick.
PLOT_COLORS = {"fastattn": "black", "torch": "C0", "torch flash": "C0", "torch compile": "C1",
               "torch efficient": "C1", "torch cudnn": "C2", "torch math": "C3", "torch flex": "C4",
               "torch eager": "C5", "torch sdpa": "C0", "fastattn prefill": "C6"}


def plot(records: list[dict], ceilings: dict[str, float], out: Path, device: str) -> list[Path]:
    """One PNG per op family: metric against size, a line per implementation, a panel per (op,
    dtype, series) and mode, the measured ceiling dashed where there is one (a GPU's, unless the
    run beat it); a log y axis where the values span more than 10x. Needs matplotlib (the "bench"
    extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .cases import CEILINGS, MODES

    paths = []
    for family, (x_key, series_keys) in PLOT_AXES.items():
        rows = [r for r in records if r["kind"] == "sweep" and r["family"] == family
                and r["metric"] is not None]
        if not rows:
            continue
        modes = [m for m in MODES if any(r["mode"] == m for r in rows)]  # decode: fwd alone
        panels: dict[tuple, list[dict]] = {}
        for r in rows:
            key = (r["op"], r["dtype"], *(f"{k}{r['size'][k]}" for k in series_keys))
            panels.setdefault(key, []).append(r)
        fig, axes = plt.subplots(len(panels), len(modes), squeeze=False,
                                 figsize=(max(5 * len(modes), 8), 3.4 * len(panels)))
        for row, (key, rs) in enumerate(panels.items()):
            for col, mode in enumerate(modes):
                ax = axes[row][col]
                impls = list(dict.fromkeys(r["impl"] for r in rs))
                for impl in impls:
                    pts = sorted((r["size"][x_key], r["metric"]) for r in rs
                                 if r["impl"] == impl and r["mode"] == mode)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=impl, color=PLOT_COLORS.get(impl),
                                linewidth=2.5 if impl == "fastattn" else 1.2)
                ceiling = ceilings.get(CEILINGS[family])
                if ceiling:
                    ax.axhline(ceiling, linestyle="--", color="grey", label="measured ceiling")
                if len({r["size"][x_key] for r in rs}) > 1:
                    ax.set_xscale("log", base=2)
                values = [r["metric"] for r in rs if r["mode"] == mode]
                if values and max(values) > 10 * min(values):  # spans decades
                    ax.set_yscale("log")
                ax.set_title(f"{' '.join(key)} {mode}", fontsize=9)
                ax.set_xlabel(x_key)
                ax.set_ylabel(rs[0]["unit"])
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"fastattn vs torch, {family}: {device}"
                     + (" (not GPU figures)" if device == CPU_LABEL else ""), fontsize=11)
        fig.tight_layout()
        path = out / f"{family}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        paths.append(path)
    return paths


# ---- progress ----

T = TypeVar("T")


def progress(items: list[T], title: str, label=str) -> Iterator[T]:
    """Yield the items, drawing a progress bar on stderr: redrawn in place on a terminal; in a
    log, a line at least every 15 s. label(item) names the item being worked on."""
    tty = sys.stderr.isatty()
    start = last = time.monotonic()
    total = len(items)

    def draw(done: int, what: str, final: bool = False) -> None:
        nonlocal last
        now = time.monotonic()
        elapsed = now - start
        eta = f" eta {elapsed / done * (total - done):.0f}s" if done and not final else ""
        line = f"{title} [{'#' * (20 * done // max(total, 1)):<20}] {done}/{total} " \
               f"{elapsed:.0f}s{eta} {what}"
        if tty:
            sys.stderr.write("\r\033[K" + line[:150] + ("\n" if final else ""))
        elif final or done == 0 or now - last >= 15:
            sys.stderr.write(line + "\n")
            last = now
        sys.stderr.flush()

    for i, item in enumerate(items):
        draw(i, label(item))
        yield item
    draw(total, "done", final=True)
