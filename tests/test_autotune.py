"""The autotuning logic of kernels/autotune.py, on the CPU: a stand-in timer returns scripted times
and a stand-in launch records which configs ran, so no GPU and no real timing is involved.

`on_gpu` makes `_tunable` true for the CPU device, standing in for "a CUDA device, compiled
kernels"; without it the real predicate runs (CPU / interpreter: never tuned).
"""

from __future__ import annotations

import json
import random
import threading

import pytest
import torch

from fastattn.kernels import autotune

CPU = torch.device("cpu")
KEY = ("fwd", 9, 128, "bfloat16", "causal", 4096, 4096)
CANDIDATES = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
]


class Bench:
    """Stand-in GPU: `launch` records the index of the config it ran (and raises for the indices in
    `fail`); `time_ms` runs the function once and returns the scripted time of that config."""

    def __init__(self, candidates: list[dict], times: list[float]):
        self.candidates = candidates
        self.times = times
        self.fail: set[int] = set()
        self.launched: list[int] = []
        self.timed = 0

    def launch(self, cfg: dict) -> None:
        index = self.candidates.index(cfg)
        self.launched.append(index)
        if index in self.fail:
            raise RuntimeError(f"candidate {index} does not fit")

    def time_ms(self, fn) -> float:
        self.timed += 1
        fn()
        return self.times[self.launched[-1]]

    def reset(self) -> None:
        self.launched.clear()
        self.timed = 0

    def choose(self, key: tuple = KEY, device: torch.device = CPU) -> dict:
        return autotune.choose(key, self.candidates, self.launch, device)


def _timer_must_not_run(fn) -> float:
    raise AssertionError("autotune timed a launch where it must not")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private cache folder, tuning on, an empty process cache, and a timer that fails the test
    if called (the `bench` fixture replaces it)."""
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(autotune.AUTOTUNE_ENV, raising=False)
    monkeypatch.setattr(autotune, "_time_ms", _timer_must_not_run)
    autotune.clear_cache()
    yield tmp_path
    autotune.clear_cache()


@pytest.fixture
def on_gpu(monkeypatch):
    monkeypatch.setattr(autotune, "_tunable", lambda device: True)


@pytest.fixture
def bench(monkeypatch):
    b = Bench(list(CANDIDATES), [3.0, 1.0, 2.0, 4.0])
    monkeypatch.setattr(autotune, "_time_ms", b.time_ms)
    return b


def _disk_entries() -> dict:
    return json.loads(autotune.cache_path().read_text(encoding="utf-8"))


# ---- choosing ----


def test_picks_fastest_timing_each_candidate_once(on_gpu, bench):
    chosen = bench.choose()
    assert chosen is bench.candidates[1]
    assert sorted(bench.launched) == [0, 1, 2, 3]
    assert bench.timed == 4


@pytest.mark.parametrize("times, winner", [([2.0, 1.0, 1.0, 1.0], 1), ([1.0, 1.0, 1.0, 1.0], 0),
                                           ([5.0, 4.0, 3.0, 3.0], 2)])
def test_ties_pick_the_earliest(on_gpu, bench, times, winner):
    bench.times = times
    assert bench.choose() is bench.candidates[winner]


def test_seeded_random_times_pick_first_minimum(on_gpu, bench):
    rng = random.Random(0)
    for trial in range(30):
        bench.times = [float(rng.randint(1, 3)) for _ in bench.candidates]  # ties are common
        expected = min(range(len(bench.times)), key=bench.times.__getitem__)  # first minimum
        assert bench.choose(("fwd", trial)) is bench.candidates[expected], bench.times


def test_second_call_times_nothing(on_gpu, bench):
    first = bench.choose()
    autotune.cache_path().unlink()  # the process cache alone must answer
    bench.reset()
    assert bench.choose() is first
    assert bench.timed == 0 and bench.launched == []


def test_different_keys_tune_separately(on_gpu, bench):
    bench.times = [1.0, 2.0, 3.0, 4.0]
    assert bench.choose(("fwd", 64)) is bench.candidates[0]
    bench.times = [4.0, 3.0, 2.0, 1.0]
    bench.reset()
    assert bench.choose(("fwd", 128)) is bench.candidates[3]
    assert bench.timed == 4
    bench.reset()
    assert bench.choose(("fwd", 64)) is bench.candidates[0]  # still its own winner, untimed
    assert bench.timed == 0


@pytest.mark.parametrize("n, bucket", [(0, 0), (1, 64), (63, 64), (64, 64), (65, 128), (1000, 1024),
                                       (1024, 1024), (1025, 2048), (4097, 8192)])
def test_seq_bucket(n, bucket):
    assert autotune.seq_bucket(n) == bucket


def test_seq_bucket_rejects_negative_length():
    with pytest.raises(ValueError, match="-1"):
        autotune.seq_bucket(-1)


def test_lengths_in_one_bucket_share_a_config(on_gpu, bench):
    bench.choose(("fwd", autotune.seq_bucket(1000)))
    bench.reset()
    bench.choose(("fwd", autotune.seq_bucket(1024)))
    assert bench.timed == 0
    bench.choose(("fwd", autotune.seq_bucket(1025)))
    assert bench.timed == 4


# ---- disk cache ----


def test_cache_file_lives_in_cache_dir(on_gpu, bench, isolated):
    assert autotune.cache_path().parent == isolated
    assert autotune.cache_path().name.startswith("autotune-triton")
    bench.choose()
    assert list(_disk_entries().values()) == [bench.candidates[1]]


def test_fresh_process_uses_the_stored_winner(on_gpu, bench):
    winner = bench.choose()
    autotune.clear_cache()  # a new process: only the file remembers
    bench.times = [0.5, 9.0, 9.0, 9.0]  # would now pick candidate 0 if it retuned
    bench.reset()
    assert bench.choose() is winner
    assert bench.timed == 0


def test_stored_winner_no_longer_a_candidate_is_retuned(on_gpu, bench):
    bench.choose()  # stores candidate 1
    autotune.clear_cache()
    bench.candidates = [c for i, c in enumerate(CANDIDATES) if i != 1]  # the table changed
    bench.times = [3.0, 2.0, 1.0]
    bench.reset()
    assert bench.choose() is bench.candidates[2]
    assert bench.timed == 3
    assert list(_disk_entries().values()) == [bench.candidates[2]]


def test_process_cached_winner_no_longer_a_candidate_is_retuned(on_gpu, bench):
    bench.choose()
    bench.candidates = CANDIDATES[2:]
    bench.times = [2.0, 1.0]
    bench.reset()
    assert bench.choose() is bench.candidates[1]
    assert bench.timed == 2


@pytest.mark.parametrize("content", [b"\xff\xfe{ not json", b"[1, 2, 3]", b"", b'{"x": '])
def test_corrupt_cache_file_is_ignored(on_gpu, bench, content):
    path = autotune.cache_path()
    path.write_bytes(content)
    assert bench.choose() is bench.candidates[1]
    assert list(_disk_entries().values()) == [bench.candidates[1]]  # rewritten as valid JSON


def test_entries_of_other_keys_survive_a_write(on_gpu, bench):
    path = autotune.cache_path()
    path.write_text(json.dumps({"other process's key": {"BLOCK_M": 16}}), encoding="utf-8")
    bench.choose()
    assert _disk_entries()["other process's key"] == {"BLOCK_M": 16}
    assert len(_disk_entries()) == 2


def test_unwritable_cache_dir_does_not_raise(on_gpu, bench, isolated, monkeypatch):
    blocker = isolated / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(blocker / "cache"))  # mkdir fails, even as root
    assert bench.choose() is bench.candidates[1]
    bench.reset()
    assert bench.choose() is bench.candidates[1]  # the process cache carries on
    assert bench.timed == 0
    assert not (blocker.parent / "cache").exists()


def test_concurrent_threads_lose_no_disk_entry(on_gpu, bench):
    keys = [("dq", i) for i in range(8)]
    threads = [threading.Thread(target=bench.choose, args=(key,)) for key in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(_disk_entries()) == len(keys)


# ---- no timing ----


@pytest.mark.parametrize("value", ["0", "false", "off", "no", "OFF"])
def test_autotune_off_takes_the_first_candidate(on_gpu, bench, monkeypatch, value):
    bench.choose()  # candidate 1 is now cached, and must be ignored
    bench.reset()
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, value)
    assert bench.choose() is bench.candidates[0]
    assert bench.choose(("never", "seen")) is bench.candidates[0]
    assert bench.timed == 0 and bench.launched == []


def test_autotune_on_value_tunes(on_gpu, bench, monkeypatch):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    assert bench.choose() is bench.candidates[1]


def test_cpu_device_is_never_tuned(bench):
    assert bench.choose(device=CPU) is bench.candidates[0]
    assert bench.timed == 0 and bench.launched == []


def test_interpreter_is_never_tuned(bench, monkeypatch):
    cuda = torch.device("cuda", 0)  # only a name: nothing here touches a GPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench.choose(device=cuda) is bench.candidates[0]
    assert bench.timed == 0
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert autotune._tunable(cuda)


def test_one_candidate_is_not_timed(on_gpu, bench):
    bench.candidates = CANDIDATES[2:3]
    assert bench.choose() is bench.candidates[0]
    assert bench.timed == 0


def test_no_timing_during_capture_without_a_cached_winner(on_gpu, bench, monkeypatch):
    monkeypatch.setattr(autotune, "_may_time_now", lambda device: False)
    assert bench.choose() is bench.candidates[0]
    assert bench.timed == 0 and bench.launched == []
    assert not autotune.cache_path().exists()  # the untuned pick is not stored as a winner


@pytest.mark.parametrize("fresh_process", [False, True])
def test_capture_uses_the_cached_winner(on_gpu, bench, monkeypatch, fresh_process):
    winner = bench.choose()  # the documented warm-up: one eager call
    if fresh_process:
        autotune.clear_cache()
    monkeypatch.setattr(autotune, "_may_time_now", lambda device: False)
    bench.reset()
    assert bench.choose() is winner
    assert bench.timed == 0


def test_compile_tracing_is_detected():
    def probe(x):
        return x + (1 if autotune._may_time_now(x.device) else 2)

    x = torch.zeros(3)
    assert torch.equal(probe(x), x + 1)  # eager: timing allowed
    compiled = torch.compile(probe, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), x + 2)  # while tracing: not allowed


def test_cuda_graph_capture_is_detected(monkeypatch):
    cuda = torch.device("cuda", 0)  # only a name: the capture query is stubbed
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not autotune._may_time_now(cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert autotune._may_time_now(cuda)


# ---- failures and input checks ----


def test_failing_candidate_is_skipped(on_gpu, bench):
    bench.fail = {1}  # the fastest does not fit
    assert bench.choose() is bench.candidates[2]
    assert list(_disk_entries().values()) == [bench.candidates[2]]


def test_all_candidates_failing_reraises_the_first_error(on_gpu, bench):
    bench.fail = {0, 1, 2, 3}
    with pytest.raises(RuntimeError, match="candidate 0 does not fit"):
        bench.choose()
    assert sorted(bench.launched) == [0, 1, 2, 3]
    assert not autotune.cache_path().exists()


def test_empty_candidates_are_rejected(on_gpu, bench):
    bench.candidates = []
    with pytest.raises(ValueError, match="candidates is empty"):
        bench.choose()


def test_key_parts_must_be_json_scalars(on_gpu, bench):
    with pytest.raises(TypeError, match="torch.bfloat16"):
        bench.choose(("fwd", torch.bfloat16))

