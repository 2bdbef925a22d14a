"""The kernels' dropout generator (kernels/numerics.py), checked bit for bit: our Philox-4x32-10
against Random123's published known-answer vectors, and the keep-mask of an attention score tile,
in both orientations the passes use, and that of a norm / embedding tile, against the same
generator written in plain Python. (The
rate, the reproducibility and the backward's redraw of the forward's mask are checked through the
public op in tests/test_attention.py.)"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE
from fastattn.kernels import numerics

# Random123's kat_vectors for philox4x32 with 10 rounds: (counter c0..c3, key k0 k1) -> 4 words.
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
_M32 = 0xFFFFFFFF


def philox_python(counter, key, rounds=10):
    """Philox-4x32 in plain Python integers (Salmon et al., SC 2011)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & _M32, (p0 >> 32) ^ c3 ^ k1, p0 & _M32)
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


@triton.jit
def _philox_kernel(Counters, Keys, Words):
    """Row i: Counters[i, 0:4], Keys[i, 0:2] (int64 holding uint32) -> Words[i, 0:4]."""
    i = tl.program_id(0)
    # one load per word: compiled Triton takes no list comprehension (the interpreter does)
    c0 = tl.load(Counters + 4 * i).to(tl.uint32)
    c1 = tl.load(Counters + 4 * i + 1).to(tl.uint32)
    c2 = tl.load(Counters + 4 * i + 2).to(tl.uint32)
    c3 = tl.load(Counters + 4 * i + 3).to(tl.uint32)
    k0 = tl.load(Keys + 2 * i).to(tl.uint32)
    k1 = tl.load(Keys + 2 * i + 1).to(tl.uint32)
    w0, w1, w2, w3 = numerics._philox4x32(c0, c1, c2, c3, k0, k1)
    tl.store(Words + 4 * i, w0.to(tl.int64))
    tl.store(Words + 4 * i + 1, w1.to(tl.int64))
    tl.store(Words + 4 * i + 2, w2.to(tl.int64))
    tl.store(Words + 4 * i + 3, w3.to(tl.int64))


def test_philox_matches_random123_known_answers():
    counters = torch.tensor([c for c, _, _ in PHILOX_KAT], dtype=torch.int64, device=DEVICE)
    keys = torch.tensor([k for _, k, _ in PHILOX_KAT], dtype=torch.int64, device=DEVICE)
    words = torch.zeros(len(PHILOX_KAT), 4, dtype=torch.int64, device=DEVICE)
    _philox_kernel[(len(PHILOX_KAT),)](counters, keys, words)
    expected = [list(w) for _, _, w in PHILOX_KAT]
    assert words.tolist() == expected
    assert [list(philox_python(c, k)) for c, k, _ in PHILOX_KAT] == expected


@triton.jit
def _keep_tile_kernel(Seed, Keep, KeepT, m0, n0, threshold,
                      BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep-mask of queries m0 + arange(BLOCK_Q) x keys n0 + arange(BLOCK_K), drawn as the
    forward and dQ do, (BLOCK_Q, BLOCK_K) into Keep, and as dK/dV does, (BLOCK_K, BLOCK_Q) into
    KeepT."""
    seed = tl.load(Seed)
    rows_q = tl.arange(0, BLOCK_Q)
    rows_k = tl.arange(0, BLOCK_K)
    keep = numerics.dropout_keep_tile(seed, m0, n0, BLOCK_Q, BLOCK_K, False, threshold)
    tl.store(Keep + rows_q[:, None] * BLOCK_K + rows_k[None, :], keep.to(tl.int8))
    keep_t = numerics.dropout_keep_tile(seed, m0, n0, BLOCK_Q, BLOCK_K, True, threshold)
    tl.store(KeepT + rows_k[:, None] * BLOCK_Q + rows_q[None, :], keep_t.to(tl.int8))


def _signed(word):
    return word - (1 << 32) if word >= 1 << 31 else word


def _half(x):
    """x without its bit 3: the counter of the pair {x, x + 8} (x with bit 3 clear)."""
    return (x >> 4) * 8 + (x & 7)


def expected_keep(seed, rows, cols, threshold):
    """The attention keep-mask the generator defines for rows x cols (queries x keys), in plain
    Python: word 2 * (q >> 3 & 1) + (k >> 3 & 1) of Philox((half(k), half(q), 0, 0), seed)."""
    keep = torch.zeros(len(rows), len(cols), dtype=torch.int8)
    for i, q in enumerate(rows):
        for j, k in enumerate(cols):
            words = philox_python((_half(k), _half(q), 0, 0), (seed & _M32, seed >> 32))
            keep[i, j] = int(_signed(words[2 * (q >> 3 & 1) + (k >> 3 & 1)]) >= threshold)
    return keep


def expected_norm_keep(seed, rows, cols, threshold):
    """The norm / embedding keep-mask in plain Python: word col % 4 of
    Philox((col // 4, row, 0, 0), seed)."""
    keep = torch.zeros(len(rows), len(cols), dtype=torch.int8)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            word = philox_python((c // 4, r, 0, 0), (seed & _M32, seed >> 32))[c % 4]
            keep[i, j] = int(_signed(word) >= threshold)
    return keep


@pytest.mark.parametrize("p", [0.1, 0.5, 0.93])
def test_keep_tile_is_the_generator_in_both_orientations(p):
    """Score (q, k) is kept iff word 2 * (q >> 3 & 1) + (k >> 3 & 1) of
    Philox((half(k), half(q), 0, 0), seed), read as a signed int32, is >= dropout_threshold(p);
    the transposed tile of dK/dV is the same mask; seeds with their high word set (the
    per-(batch, head) part) key the generator."""
    seed = (37 << 32) + 0x1234ABCD  # (b * Hq + h) << 32 plus the drawn seed, as the kernels form it
    m0, n0, block_q, block_k = 48, 96, 16, 32
    threshold = numerics.dropout_threshold(p)
    keep = torch.zeros(block_q, block_k, dtype=torch.int8, device=DEVICE)
    keep_t = torch.zeros(block_k, block_q, dtype=torch.int8, device=DEVICE)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    _keep_tile_kernel[(1,)](seed_t, keep, keep_t, m0, n0, threshold, BLOCK_Q=block_q,
                            BLOCK_K=block_k)
    expected = expected_keep(seed, range(m0, m0 + block_q), range(n0, n0 + block_k), threshold)
    assert torch.equal(keep.cpu(), expected)
    assert torch.equal(keep_t.cpu(), expected.T)
    assert 0 < expected.sum() < expected.numel()  # a real mask at these p, not all kept or dropped


def test_keep_tile_draws_each_score_from_its_own_word():
    """Over a 64 x 64 tile every (query, key) reads a distinct (counter, word) pair: the mapping
    is one to one, so no two scores share a random number."""
    pairs = {((_half(k), _half(q)), 2 * (q >> 3 & 1) + (k >> 3 & 1))
             for q in range(64) for k in range(64)}
    assert len(pairs) == 64 * 64


@triton.jit
def _keep_rows_kernel(Seed, Keep, threshold, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The norm / embedding keep-mask of rows x N columns, drawn BLOCK_M x BLOCK_N per program
    (grid: row tiles, column tiles), into Keep (rows, N)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = numerics.dropout_keep(tl.load(Seed), rows, cols, threshold)
    tl.store(Keep + rows[:, None] * N + cols[None, :], keep.to(tl.int8))


@pytest.mark.parametrize("block_m, block_n", [(4, 4), (2, 16), (8, 32)])
def test_norm_keep_mask_is_the_generator_whatever_the_tiles(block_m, block_n):
    """The norms' and embeddings' mask at (row, col) is the generator's at (query, key) =
    (row, col), so the forward (whole rows) and the backward (column chunks) draw the same one."""
    seed, rows, cols = 0x5EED, 8, 32
    threshold = numerics.dropout_threshold(0.3)
    keep = torch.zeros(rows, cols, dtype=torch.int8, device=DEVICE)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    _keep_rows_kernel[(rows // block_m, cols // block_n)](seed_t, keep, threshold, cols,
                                                          BLOCK_M=block_m, BLOCK_N=block_n)
    assert torch.equal(keep.cpu(), expected_norm_keep(seed, range(rows), range(cols), threshold))


def test_dropout_threshold():
    """The signed-int32 threshold: P(int32 word >= t) = (2**31 - t) / 2**32 is 1 - p rounded down
    to a multiple of 2**-32; p == 1 keeps at most 1 word in 2**32 (its scale 0 zeroes it)."""
    assert numerics.dropout_threshold(0.5) == 0
    assert numerics.dropout_threshold(0.25) == -(2**30)
    assert numerics.dropout_threshold(2.0**-40) == -(2**31) + 1
    assert numerics.dropout_threshold(1.0) == 2**31 - 1
    for p in (1e-6, 0.1, 0.3, 0.7, 0.999):
        t = numerics.dropout_threshold(p)
        assert -(2**31) <= t < 2**31
        assert 0 <= (t + 2**31) / 2**32 - p < 2**-32
