"""fastattn's performance targets (set for an H200), judged on the fastattn sweep records of the
same run (so each is a ratio against this device's own measured ceiling or peer), and how far each
falls short. The host-overhead targets are judged in bench/host.py."""

from __future__ import annotations

from dataclasses import dataclass

from .cases import SDPA_BACKENDS
from .report import Table, fmt, record

SDPA = tuple(f"torch {name}" for name in SDPA_BACKENDS)  # the peers that are SDPA's backends
EMBEDDINGS = ("embedding", "gpt_embeddings", "bert_embeddings")


@dataclass(frozen=True)
class Target:
    name: str
    ops: tuple[str, ...]
    modes: tuple[str, ...]
    against: str  # "ceiling": % of the measured ceiling; "sdpa": x SDPA's best backend;
    #               "torch": x torch's own op (eager)
    goal: float
    dtype: str | None = None
    head_dim: int | None = None
    where: tuple[tuple[str, int], ...] = ()  # (size key, value) pairs a case must have
    group: int | None = None  # cases whose query heads are `group` x their kv heads (H / Hkv)


TARGETS = (
    Target("attention fwd bf16 d128 >= 75% of the measured matmul rate",
           ("attention", "attention_causal"), ("fwd",), "ceiling", 75, "bfloat16", 128),
    Target("attention fwd bf16 d128 >= 1.0x SDPA's best backend",
           ("attention", "attention_causal"), ("fwd",), "sdpa", 1.0, "bfloat16", 128),
    Target("attention fwd, BERT padding mask >= 2x SDPA, same mask",
           ("attention_padding_mask",), ("fwd",), "sdpa", 2.0),
    Target("layer_norm fwd, bwd >= 90% of the measured copy bandwidth",
           ("layer_norm",), ("fwd", "bwd"), "ceiling", 90),
    Target("layer_norm fwd, bwd >= 1.5x torch", ("layer_norm",), ("fwd", "bwd"), "torch", 1.5),
    Target("embeddings fwd, bwd >= 90% of the measured copy bandwidth",
           EMBEDDINGS, ("fwd", "bwd"), "ceiling", 90),
    Target("embeddings fwd, bwd >= 1.5x torch", EMBEDDINGS, ("fwd", "bwd"), "torch", 1.5),
    # Issue 16: a decode step at batch 1, cache 32k, d128, GQA 8:1 (contiguous and paged) reads
    # its KV cache at >= 80% of the measured copy bandwidth.
    Target("decode B1 cache 32k d128 GQA 8:1: KV read >= 80% of the measured copy bandwidth",
           ("decode", "decode_paged"), ("fwd",), "ceiling", 80, "bfloat16", 128,
           where=(("B", 1), ("S", 32768)), group=8),
)


def _matches(target: Target, ours: dict) -> bool:
    """Whether a fastattn sweep record is one of the target's cases."""
    size = ours["size"] or {}
    return (ours["impl"] == "fastattn" and ours["op"] in target.ops
            and ours["mode"] in target.modes and target.dtype in (None, ours["dtype"])
            and target.head_dim in (None, size.get("D"))
            and all(size.get(k) == v for k, v in target.where)
            and (target.group is None
                 or size.get("H") == target.group * size.get("Hkv", -1)))


def _value(target: Target, ours: dict, peers: list[dict]) -> float | None:
    if ours["ms"] is None:
        return None
    if target.against == "ceiling":
        return ours["ceiling_pct"]
    names = SDPA if target.against == "sdpa" else ("torch",)
    timed = [p["ms"] for p in peers if p["impl"] in names and p["ms"] is not None]
    return min(timed) / ours["ms"] if timed else None


def evaluate(records: list[dict], judged: bool) -> list[dict]:
    """A target record per (target, matching fastattn sweep case). judged=False (a CPU run): the
    values are computed, pass is left None."""
    sweep = [r for r in records if r["kind"] == "sweep"]
    out = []
    for target in TARGETS:
        for ours in sweep:
            if not _matches(target, ours):
                continue
            peers = [p for p in sweep if p["impl"] != "fastattn" and all(
                p[k] == ours[k] for k in ("op", "shape", "dtype", "mode"))]
            value = _value(target, ours, peers)
            ok = None if value is None or not judged else value >= target.goal
            missing = ours["note"] or ("n/a: no ceiling (none on the CPU)"
                                       if target.against == "ceiling" else "n/a: no peer timed")
            note = missing if value is None else (
                f"short by {(target.goal - value) / target.goal:.0%} "
                f"(needs {fmt(target.goal / value)}x)" if value < target.goal else None)
            out.append(record(kind="target", target=target.name, impl="fastattn",
                              **{k: ours[k] for k in ("op", "family", "mode", "shape", "dtype",
                                                      "device", "size")},
                              metric=value, unit="%" if target.against == "ceiling" else "x",
                              goal=target.goal, ratio=value / target.goal if value else None,
                              note=note, **{"pass": ok}))
    return out


def _case(r: dict, unit: str) -> str:
    return f"{fmt(r['metric'])}{unit}: {r['op']} {r['shape']} {r['mode']}"


def section(target_records: list[dict], judged: bool) -> list:
    """One line per target: in how many cases it is met, the worst case with its shortfall, and
    the best case."""
    rows = []
    for target in TARGETS:
        measured = [r for r in target_records
                    if r["target"] == target.name and r["metric"] is not None]
        unit = "%" if target.against == "ceiling" else "x"
        goal = f"{fmt(float(target.goal))}{unit}"
        if not measured:
            notes = {r["note"] for r in target_records if r["target"] == target.name and r["note"]}
            rows.append({"target": target.name, "met": "no case measured", "worst": None,
                         "short by": "; ".join(sorted(notes)) or None, "best": None,
                         "goal": goal})
            continue
        worst = min(measured, key=lambda r: r["metric"])
        best = max(measured, key=lambda r: r["metric"])
        met = sum(r["metric"] >= target.goal for r in measured)
        rows.append({
            "target": target.name,
            "met": f"{met}/{len(measured)}",  # not judged (a CPU run): the title says so
            "worst": _case(worst, unit), "short by": worst["note"] or "meets it",
            "best": _case(best, unit),
            "goal": goal})
    title = "## Targets (set for an H200), as ratios from this run"
    if not judged:
        title += ": CPU / interpreter figures, not judged"
    return [title, "", Table(rows, ("target", "goal", "met", "short by")), ""]
