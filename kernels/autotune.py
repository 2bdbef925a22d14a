"""Autotuning of launch settings on a real GPU: pick the fastest of a few candidate configs per key.

Design
------
`kernels/configs.py` owns the candidate lists (each row: at most about six configs that all pass
the static checks, the hand-picked one first). A launcher asks `choose(key, candidates, launch,
device)` which config to launch. The key names everything the best config may depend on:
(pass, architecture, head dim, dtype, features, sequence-length bucket), e.g.
("fwd", 9, 128, "bfloat16", "causal", 4096, 4096); `seq_bucket` maps lengths onto buckets so that
nearby lengths share one tuned config. `choose` adds the GPU's name (`device_key`) to the key, so
one cache file can serve several GPU models.

The first call of a key on CUDA times `launch(cfg)` for every candidate (`_time_ms`: Triton's
`do_bench`, median) and keeps the fastest (ties: the earliest). The winner is cached for the
process and on disk, in one JSON file (`cache_path()`: `$FASTATTN_CACHE_DIR`, else
`~/.cache/fastattn`, named after Triton's version, since a new compiler can move the optimum).
A stored winner is used only while it is still one of the candidates: a changed table retunes.
A candidate whose launch raises (Triton's OutOfResources, say) is skipped.

`launch(cfg)` is run many times while timing, so it must be safe to repeat: it writes the
outputs and accumulates into nothing. The caller launches the returned config itself.

No timing happens when
  * there is one candidate, the device is not CUDA, or Triton's interpreter runs (it times
    nothing; there the first candidate, the one config configs.py hands it, is used);
  * `FASTATTN_AUTOTUNE=0` (also "false", "off", "no"; read at every call): every row's first
    candidate is used, cached winners too are ignored;
  * a CUDA graph is being captured on the current stream, or torch.compile is tracing: timing would
    record the benchmark loop into the graph, or sync the device mid-capture. A cached winner is
    still used; with nothing cached the first candidate is launched, untuned.

Warm-up rule: before capturing a CUDA graph or compiling, run one eager call of each shape family
(each pass, head dim, dtype, feature set and sequence-length bucket you will capture), so that the
captured launches find their tuned configs in the cache. Or set `FASTATTN_AUTOTUNE=0`.

Nothing here queries a device or reads a file at import time. Tests replace `_time_ms` with a
stand-in timer and `_tunable` with a predicate that is true on the CPU, to exercise the tuning
path without a GPU.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import triton

from .configs import env_value, interpreting, next_power_of_2

AUTOTUNE_ENV = "FASTATTN_AUTOTUNE"  # "0" / "false" / "off" / "no": no tuning, first candidates
CACHE_DIR_ENV = "FASTATTN_CACHE_DIR"  # folder of the on-disk cache; default ~/.cache/fastattn

# do_bench's budget per candidate, in ms of GPU time: warm-up, then timed repetitions (their
# median is kept). Small, since a fresh process tunes every key it meets; at most ~6 candidates.
_WARMUP_MS = 10
_REP_MS = 50

# Shortest sequence-length bucket: below it the launch overhead, not the tile, decides the time.
_MIN_BUCKET = 64

_log = logging.getLogger(__name__)

# Winners of this process, by (device_key, *key) tuple: a dict lookup per launch, no JSON (the
# disk file's keys are those tuples as JSON strings). The lock guards it and the read-merge-write
# of the disk file: autograd runs backward launches on another thread than the forward's.
_cache: dict[tuple, dict] = {}
_lock = threading.Lock()


def seq_bucket(n: int) -> int:
    """Sequence-length bucket of length `n`: the next power of two, at least 64; 0 for 0 (an empty
    launch times nothing useful and must not decide a real bucket). Lengths in the same bucket share
    one tuned config: 1000 and 1024 -> 1024, 1025 -> 2048, 1..64 -> 64."""
    if n < 0:
        raise ValueError(f"sequence length {n} < 0 has no bucket")
    return 0 if n == 0 else max(_MIN_BUCKET, next_power_of_2(n))


def autotune_enabled() -> bool:
    """False when FASTATTN_AUTOTUNE is "0", "false", "off" or "no" (read at call time)."""
    raw = env_value(AUTOTUNE_ENV)
    return raw is None or _enabled(raw)


@functools.lru_cache(maxsize=16)
def _enabled(raw: str | bytes) -> bool:
    # The parsed value, kept per raw (encoded) string.
    text = raw.decode() if isinstance(raw, bytes) else raw
    return text.strip().lower() not in ("0", "false", "off", "no")


def _tunable(device: torch.device) -> bool:
    """Whether launches on `device` can be timed at all: a CUDA device, compiled kernels (the
    interpreter has no driver to time with). Tests replace this to tune on the CPU."""
    return device.type == "cuda" and not interpreting()


def _may_time_now(device: torch.device) -> bool:
    """False while torch.compile traces or a CUDA graph is captured on the current stream: a
    benchmark loop would be recorded into the graph (and do_bench syncs the device)."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _time_ms(fn: Callable[[], None]) -> float:
    """Median time of `fn()` in ms on the current CUDA device. Tests replace this with a stand-in.
    do_bench(fn, warmup, rep, grad_to_none, quantiles, return_mode) in Triton 3.6 and 3.9 alike."""
    from triton.testing import do_bench  # only when timing: keeps the import of this module light

    return float(do_bench(fn, warmup=_WARMUP_MS, rep=_REP_MS, return_mode="median"))


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_key(device: torch.device) -> str:
    """The part of a cache key that names the hardware: the GPU's name on CUDA (e.g. "NVIDIA H200"),
    else the device type ("cpu"), so that unit tests on the CPU query no GPU."""
    if device.type != "cuda":
        return device.type
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


def cache_path() -> Path:
    """The on-disk cache file: autotune-triton<version>.json in $FASTATTN_CACHE_DIR, else in
    ~/.cache/fastattn (read at call time)."""
    folder = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "fastattn")
    return Path(folder) / f"autotune-triton{triton.__version__}.json"


def clear_cache() -> None:
    """Forget this process's winners (the disk file stays): for tests."""
    with _lock:
        _cache.clear()


def _key_string(full_key: tuple) -> str:
    """The disk file's key for (device_key, *key): JSON of the list, unambiguous ("a|b" vs
    ("a", "b")) and usable as a JSON object key."""
    for part in full_key[1:]:
        if not isinstance(part, (str, int)):  # bool is an int
            raise TypeError(f"autotune key part {part!r} of {full_key[1:]!r} is a "
                            f"{type(part).__name__}; keys hold only str, int and bool")
    return json.dumps(list(full_key))


def _read_disk(path: Path) -> dict:
    """The disk cache's entries; {} when the file is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: broken JSON or bytes that are not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def _write_disk(path: Path, entry_key: str, cfg: dict) -> None:
    """Add one entry to the disk cache, atomically (a temp file in the same folder, then
    os.replace), so a reader never sees half a file. Fails silently: a read-only home must not
    break a launch, and the process cache still holds the winner. Call with _lock held."""
    data = _read_disk(path)  # merge: other processes may have added keys since we last looked
    data[entry_key] = cfg
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        _log.warning("fastattn autotune: cannot write %s (%s); winners stay in memory", path, err)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _cached(full_key: tuple, candidates: Sequence[dict]) -> dict | None:
    """The cached winner for `full_key` (process cache, then disk), as the equal element of
    `candidates`; None when nothing is cached or the stored config is no longer a candidate."""
    stored = _cache.get(full_key)  # the hot path: a launch whose key was tuned before
    if stored is not None:
        for cfg in candidates:
            if cfg == stored:
                return cfg
    with _lock:  # not in this process (or no longer a candidate): the disk file
        stored = _read_disk(cache_path()).get(_key_string(full_key))
        if stored not in candidates:
            return None
        _cache[full_key] = dict(stored)
    return next(cfg for cfg in candidates if cfg == stored)


def _tune(full_key: tuple, candidates: Sequence[dict], launch: Callable[[dict], None]) -> dict:
    """Time every candidate, keep the fastest (ties: the earliest), cache it; skip candidates whose
    launch raises, and re-raise the first error when all do."""
    best, best_ms, first_error = None, float("inf"), None
    for cfg in candidates:
        try:
            ms = _time_ms(functools.partial(launch, cfg))
        except Exception as err:  # e.g. OutOfResources: this tile does not fit, try the next
            _log.debug("fastattn autotune %s: %s failed: %s", full_key, cfg, err)
            if first_error is None:
                first_error = err
            continue
        if best is None or ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise first_error
    _log.info("fastattn autotune %s: %s (%.4f ms) of %d candidates", full_key, best, best_ms,
              len(candidates))
    with _lock:
        _cache[full_key] = dict(best)
        _write_disk(cache_path(), _key_string(full_key), dict(best))
    return best


def choose(key: tuple, candidates: Sequence[dict], launch: Callable[[dict], None],
           device: torch.device) -> dict:
    """The config of `candidates` to launch for `key`, one of the `candidates` objects.

    key: a tuple of str/int/bool naming the problem, e.g. ("fwd", 9, 128, "bfloat16", "causal",
    4096, 4096) (pass, arch, head dim, dtype, features, seq_bucket of the query and key lengths);
    the GPU's name is added here. candidates: launch-setting dicts with JSON-scalar values
    ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}), the default first.
    launch: runs the kernel once with a config; repeated while timing, so it must be repeatable.

    Returns candidates[0] untimed with one candidate, off CUDA, under the interpreter, with
    FASTATTN_AUTOTUNE=0, or during CUDA-graph capture / torch.compile tracing when nothing is
    cached (a cached winner is used then). Otherwise the cached winner, or the fastest candidate
    after timing each once (then cached in the process and on disk).
    """
    if not candidates:
        raise ValueError(f"autotune key {key!r}: candidates is empty, need at least one config")
    if len(candidates) == 1 or not _tunable(device) or not autotune_enabled():
        return candidates[0]
    full_key = (device_key(device), *key)
    cached = _cached(full_key, candidates)
    if cached is not None:
        return cached
    if not _may_time_now(device):
        return candidates[0]
    return _tune(full_key, candidates, launch)
