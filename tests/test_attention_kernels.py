"""Kernel-level tests of kernels/attention.py: the launchers attention_fwd / attention_bwd called
directly, for what the public-API tests in test_attention.py cannot see: strided inputs computed
bitwise like contiguous ones, fp16 scores far beyond exp's range, the GPU tables' tile shapes (also
those for calls with a mask or dropout), the key-padding fast path never reading padded key blocks,
and empty problems that must launch nothing. Same pass rule (fastattn.testing); lse within a small
absolute bound.
"""

from __future__ import annotations

import json
import math
import random
from itertools import accumulate

import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE
from fastattn import reference
from fastattn.kernels import attention, configs
from fastattn.kernels.attention import _key_block_bounds, _query_block_bounds
from helpers import assert_within_torch_error
from test_attention import torch_sdpa

LSE_ATOL = 1e-4  # absolute, relative to max(1, max|lse|)


def leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def make_inputs(B, Hq, Hkv, L, S, D, Dv, dtype, strided=False, magnitude=1.0):
    """q (B, Hq, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv), do (B, Hq, L, Dv) in `dtype`. With
    strided=True they are (B, N, H, D).transpose(1, 2) views, the layout Hugging Face models pass."""

    def rand(b, h, n, d):
        if strided:
            return (torch.randn(b, n, h, d, device=DEVICE) * magnitude).to(dtype).transpose(1, 2)
        return (torch.randn(b, h, n, d, device=DEVICE) * magnitude).to(dtype)

    return rand(B, Hq, L, D), rand(B, Hkv, S, D), rand(B, Hkv, S, Dv), rand(B, Hq, L, Dv)


def check_against_reference(B, Hq, Hkv, L, S, D, Dv, is_causal, dtype, strided=False, magnitude=1.0,
                            scale=None, attn_mask=None):
    """Run forward and backward launchers and apply the pass rule to out, lse, dq, dk, dv (and
    the gradient of a float attn_mask). Returns the kernels' outputs (out, lse, dq, dk, dv)."""
    q, k, v, do = make_inputs(B, Hq, Hkv, L, S, D, Dv, dtype, strided, magnitude)
    scale = D**-0.5 if scale is None else scale
    mask_grad = attn_mask is not None and attn_mask.is_floating_point()

    out, lse, _ = attention.attention_fwd(q, k, v, scale, is_causal, attn_mask)
    dq, dk, dv, dmask, _ = attention.attention_bwd(do, q, k, v, out, lse, scale, is_causal, attn_mask,
                                                mask_grad=mask_grad)
    assert dmask.numel() == (attn_mask.numel() if mask_grad else 0)

    def mask_leaf(dt):
        return attn_mask.detach().to(dt).requires_grad_() if mask_grad else attn_mask

    q64, k64, v64 = leaves(q, k, v, dtype=torch.float64)
    m64 = mask_leaf(torch.float64)
    ref_out, ref_lse = reference.scaled_dot_product_attention(q64, k64, v64, is_causal, scale, m64)
    ref_out.backward(do.double())

    ql, kl, vl = leaves(q, k, v)
    ml = mask_leaf(dtype)
    torch_out = torch_sdpa(ql, kl, vl, ml, is_causal, Hq != Hkv, scale=scale)
    torch_out.backward(do)

    assert out.is_contiguous() and dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, L)
    lse_err = (lse.double() - ref_lse).abs().max().item() if lse.numel() else 0.0
    assert lse_err <= LSE_ATOL * max(1.0, ref_lse.abs().max().item()), f"lse: error {lse_err:.3e}"
    assert_within_torch_error("out", out, torch_out, ref_out, dtype)
    assert_within_torch_error("dq", dq, ql.grad, q64.grad, dtype)
    assert_within_torch_error("dk", dk, kl.grad, k64.grad, dtype)
    assert_within_torch_error("dv", dv, vl.grad, v64.grad, dtype)
    if mask_grad:
        assert_within_torch_error("dmask", dmask, ml.grad, m64.grad, dtype)
    return out, lse, dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_strided_inputs(is_causal):
    """(B, N, H, D).transpose(1, 2) inputs: right, and bitwise equal to the same values made contiguous
    (the kernels read through the strides, they compute nothing differently)."""
    B, Hq, Hkv, L, S, D, Dv = 2, 4, 2, 33, 47, 40, 24
    torch.manual_seed(4)
    got = check_against_reference(B, Hq, Hkv, L, S, D, Dv, is_causal, torch.float16, strided=True)

    torch.manual_seed(4)  # the same values again, now copied to contiguous tensors
    strided = make_inputs(B, Hq, Hkv, L, S, D, Dv, torch.float16, strided=True)
    assert not any(t.is_contiguous() for t in strided)
    q, k, v, do = (t.contiguous() for t in strided)
    out, lse, _ = attention.attention_fwd(q, k, v, D**-0.5, is_causal)
    want = (out, lse, *attention.attention_bwd(do, q, k, v, out, lse, D**-0.5, is_causal)[:3])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), f"{name} differs between strided and contiguous inputs"


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_large_scores_fp16(is_causal):
    """Scores of several hundred: exp would overflow fp16 many times over without the running max."""
    torch.manual_seed(5)
    check_against_reference(1, 2, 2, 65, 47, 64, 64, is_causal, torch.float16, magnitude=3.0, scale=1.0)


# (arch major, head dim, dtype): every row of the GPU tables in kernels/configs.py (fp32 has one
# table for all architectures).
GPU_TABLE_ROWS = [(arch, d, torch.float16) for arch in (9, 8) for d in (64, 128, 256)]
GPU_TABLE_ROWS += [(9, d, torch.float32) for d in (64, 128, 256)]


def gpu_candidates(arch_major, head_dim, dtype, dropout):
    """The launch candidates configs.py lists on a GPU of compute capability arch_major.x (for
    calls with dropout if `dropout`): (forward list, backward dict of lists)."""
    with pytest.MonkeyPatch.context() as m:  # ask configs.py what it would pick on that GPU
        m.setattr(configs, "interpreting", lambda: False)
        m.setattr(configs, "arch_major", lambda device: arch_major)
        gpu = torch.device("cuda")
        return (configs.attention_fwd_candidates(head_dim, dtype, gpu, dropout),
                configs.attention_bwd_candidates(head_dim, dtype, gpu, dropout))


def use_gpu_tiles(arch_major, head_dim, dtype, dropout, monkeypatch, candidate=0):
    """Make the launchers use candidate number `candidate` (0: the default; past a list's end, its
    last) of the tiles configs.py lists on a GPU of compute capability arch_major.x (for calls
    with dropout if `dropout`); skip on a smaller real GPU."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < arch_major:
        pytest.skip(f"tiles for compute capability {arch_major}.x need more shared memory than "
                    "this GPU has")
    fwd, bwd = gpu_candidates(arch_major, head_dim, dtype, dropout)

    def pick(cands):
        return [cands[min(candidate, len(cands) - 1)]]
    monkeypatch.setattr(attention, "attention_fwd_candidates", lambda *args: pick(fwd))
    monkeypatch.setattr(attention, "attention_bwd_candidates", lambda *args: dict(
        preprocess=bwd["preprocess"], dkdv=pick(bwd["dkdv"]), dq=pick(bwd["dq"])))


@pytest.mark.parametrize("arch_major,head_dim,dtype", GPU_TABLE_ROWS,
                         ids=lambda x: {9: "hopper", 8: "ampere"}.get(x, str(x)).replace("torch.", ""))
def test_gpu_tile_shapes(arch_major, head_dim, dtype, monkeypatch):
    """The block sizes the GPU tables pick (e.g. forward 128 x 64, dK/dV 32 x 128) give right results
    too, with and without a mask: the interpreter's own tiles are only one such choice. Warps and
    stages do not matter here."""
    use_gpu_tiles(arch_major, head_dim, dtype, False, monkeypatch)
    torch.manual_seed(7)
    # Sizes no multiple of any tile, above the largest (128), L > S so some causal rows see every key.
    check_against_reference(1, 2, 1, 150, 133, head_dim, head_dim, True, dtype)
    # Calls with an attn_mask take the same tiles (dropout has its own): a float mask, its gradient.
    mask = torch.randn(1, 1, 150, 133, device=DEVICE).to(dtype)
    check_against_reference(1, 2, 1, 150, 133, head_dim, head_dim, False, dtype, attn_mask=mask)


def test_row_statistics_padding_covers_every_dkdv_block():
    """Every dK/dV query block (BLOCK_M) of every table, alternate and the interpreter's divides
    ATTN_BWD_ROW_PAD: the rows a block reads past L lie in the padding of the row statistics."""
    rows = [row[1] for name, table in vars(configs).items() if name.startswith("_ATTN_BWD_DKDV_")
            for row in table]
    rows += [alt[0] for (name, _, _), alts in configs._ATTN_HOPPER_ALTERNATES.items()
             if name == "dkdv" for alt in alts]
    rows.append(configs._ATTN_INTERPRET_BWD["dkdv"]["BLOCK_M"])
    assert len(rows) >= 10
    assert all(configs.ATTN_BWD_ROW_PAD % block_m == 0 for block_m in rows), rows


# GPU table rows where calls with dropout take other tiles (configs.py's *_DROPOUT tables).
GPU_DROPOUT_ROWS = [(9, 64), (9, 128), (8, 128)]


@pytest.mark.parametrize("arch_major,head_dim", GPU_DROPOUT_ROWS,
                         ids=lambda x: {9: "hopper", 8: "ampere"}.get(x, str(x)))
def test_gpu_tile_shapes_with_mask_and_dropout(arch_major, head_dim, monkeypatch):
    """The tiles the GPU tables pick for calls with a mask or dropout: a float (B, 1, L, S) mask
    with its gradient, with is_causal, is right; and the dropout mask, drawn per (query, key) pair,
    does not depend on the tiles (same out and gradients as with the interpreter's tiles)."""
    torch.manual_seed(8)
    B, H, L, S = 1, 1, 130, 133
    hidden = torch.rand(B, 1, L, S, device=DEVICE) < 0.2
    hidden[..., 0] = False  # every causal row sees key 0
    mask = torch.randn(B, 1, L, S, device=DEVICE).masked_fill(hidden, float("-inf")).half()
    q, k, v, do = make_inputs(B, H, H, L, S, head_dim, head_dim, torch.float16)

    seed = torch.tensor([1234], device=DEVICE)

    def dropout_run():
        out, lse, _ = attention.attention_fwd(q, k, v, 0.1, True, mask, 0.3, seed)
        grads = attention.attention_bwd(do, q, k, v, out, lse, 0.1, True, mask, 0.3, seed)
        return (out, *grads[:3])

    default_tiles = dropout_run()
    use_gpu_tiles(arch_major, head_dim, torch.float16, True, monkeypatch)
    for name, a, b in zip(("out", "dq", "dk", "dv"), dropout_run(), default_tiles):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2,
                                   msg=f"dropout {name} depends on the tiles")
    check_against_reference(B, H, H, L, S, head_dim, head_dim, True, torch.float16, attn_mask=mask)


def test_key_padding_skips_padded_key_blocks():
    """With a boolean (B, 1, 1, S) key padding mask, key blocks that hold only padding are never
    read: their K and V are NaN here, and reading them would turn out or a gradient into NaN
    (0 * NaN). Padding runs are aligned to 128 keys, the widest key block of any table. The same
    mask spelled (B, 1, L, S) has the forward's lists per query block (the same blocks skipped,
    the same order: the same bits), and as a float mask (0 / -inf) every block is read: NaN."""
    B, H, L, S, D = 2, 2, 40, 384, 32
    torch.manual_seed(9)
    keys = torch.arange(S, device=DEVICE)
    key_mask = torch.stack([keys < 100,  # batch 0: keys 0..99, then padding
                            ((keys >= 128) & (keys < 256) & (torch.rand(S, device=DEVICE) < 0.5))
                            | ((keys >= 300) & (keys < 310))])  # batch 1: padding first
    key_mask = key_mask[:, None, None, :]  # (B, 1, 1, S)
    whole_blocks = torch.stack([keys >= 128, keys < 128])[:, None, :, None]  # (B, 1, S, 1)
    q, k, v, do = make_inputs(B, H, H, L, S, D, D, torch.float16)
    k_nan, v_nan = (t.masked_fill(whole_blocks, float("nan")) for t in (k, v))

    out, lse, _ = attention.attention_fwd(q, k_nan, v_nan, D**-0.5, False, key_mask)
    dq, dk, dv, _, _ = attention.attention_bwd(do, q, k_nan, v_nan, out, lse, D**-0.5, False, key_mask)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not t.isnan().any(), f"{name}: a fully padded key block was read"
    assert not dk[whole_blocks.expand_as(dk)].any() and not dv[whole_blocks.expand_as(dv)].any()

    want, _, _ = attention.attention_fwd(q, k, v, D**-0.5, False, key_mask)  # finite padding values
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    general_mask = key_mask.expand(B, 1, L, S)
    general, _, _ = attention.attention_fwd(q, k_nan, v_nan, D**-0.5, False, general_mask)
    torch.testing.assert_close(general, want, atol=0, rtol=0)
    float_mask = torch.zeros(general_mask.shape, device=DEVICE).masked_fill(~general_mask,
                                                                              float("-inf"))
    unlisted, _, _ = attention.attention_fwd(q, k_nan, v_nan, D**-0.5, False, float_mask)
    assert unlisted.isnan().any(), "a float mask's path should have read the NaN blocks"


def _lists_brute_force(mask, L, S, block_m, block_n):
    """Per (batch, head, query block) of a (B, H, L, S) bool mask: (whole, partial, rest) key
    block numbers, each in order, as _visible_blocks lists them."""
    B, H = mask.shape[:2]
    nb = -(-S // block_n)
    lists = {}
    for b, h, i in ((b, h, i) for b in range(B) for h in range(H) for i in range(-(-L // block_m))):
        rows = mask[b, h, i * block_m:(i + 1) * block_m]
        tiles = [rows[:, j * block_n:(j + 1) * block_n] for j in range(nb)]
        lists[b, h, i] = ([j for j in range(nb) if tiles[j].all()],
                          [j for j in range(nb) if tiles[j].any() and not tiles[j].all()],
                          [j for j in range(nb) if not tiles[j].any()])
    return lists


def test_tile_lists_of_a_bool_mask_match_brute_force():
    """_visible_blocks with tile lists (a bool (B, Hq, L, S) mask as the kernels take it) against
    brute force on random masks: every (batch, head, query block) of the forward and dQ finds, at
    the list number its strides give, its whole key blocks (every pair below L and S visible) in
    order, then the partial ones, then those with nothing visible, with counts as the key-padding
    lists have them; every (batch, head, key block) of dK/dV (by_keys) its query blocks alike. Broadcast dims (size 1, expanded: stride 0) share a list; ragged
    L and S, blocks of structure (a static cache's unused tail, a causal staircase) and noise."""
    rng = random.Random(11)
    for case in range(40):
        B, H = rng.randint(1, 3), rng.randint(1, 3)
        L, S = rng.choice([1, 3, 16, 97, 130]), rng.choice([1, 3, 16, 97, 200])
        block_m, block_n = rng.choice([16, 32, 64]), rng.choice([16, 32, 64])
        shape = (rng.choice([1, B]), rng.choice([1, H]), rng.choice([1, L]), S)
        pattern = rng.choice(["noise", "tail", "staircase", "all", "none"])
        if pattern == "noise":
            small = torch.rand(shape) > rng.choice([0.02, 0.5, 0.98])
        elif pattern == "tail":  # a static cache: the keys past each sequence's length hidden
            lengths = torch.randint(0, S + 1, shape[:2] + (1, 1))
            small = (torch.arange(S) < lengths).expand(shape)
        elif pattern == "staircase":
            small = (torch.arange(S)[None, :] <= torch.arange(shape[2])[:, None] * 2).expand(shape)
        else:
            small = torch.full(shape, pattern == "all")
        view = small.expand(B, H, L, S).view(torch.uint8)
        flags = dict(MASK_IS_BOOL=True, KEY_PADDING=False)
        full = small.expand(B, H, L, S)
        # The forward's and dQ's lists (key blocks per query block), then dK/dV's (query blocks
        # per key block: the brute force on the transposed mask)
        for by_keys, pairs, n, n_lists, block in (
                (False, full, L, shape[2], block_m), (True, full.transpose(2, 3), S, S, block_n)):
            ids, counts, nb, (sb, sh, sp) = attention._visible_blocks(
                view, flags, L, S, block_m, block_n, True, None, by_keys=by_keys)
            other = block_m + block_n - block  # the listed blocks' size
            assert nb == -(-pairs.shape[3] // other) and ids.dtype == counts.dtype == torch.int32
            assert ids.is_contiguous() and counts.is_contiguous(), "the kernels read them row-major"
            assert ids.shape[0] <= shape[0] * shape[1] * -(-n_lists // block), "broadcasts share"
            for (b, h, i), (whole, partial, rest) in _lists_brute_force(
                    pairs, n, pairs.shape[3], block, other).items():
                g = b * sb + h * sh + i * sp
                assert ids[g].tolist() == whole + partial + rest, (case, by_keys, b, h, i)
                for j in range(nb + 1):
                    assert counts[g, 0, j] == sum(1 for x in whole if x < j), (case, by_keys, j)
                    assert counts[g, 1, j] == len(whole) + sum(1 for x in partial if x < j), (
                        case, by_keys, j)


@pytest.mark.parametrize("causal", [False, True])
def test_bool_mask_skips_hidden_blocks(causal):
    """A bool (B, Hq, L, S) mask with structure, as a static cache's (each (batch, head) sees a
    prefix of the keys, its tail hidden) or a document mask's, here with a run of queries that
    see no key: the forward and dQ kernels never read a key block that hides every pair of a
    query block (K and V NaN there: reading one would turn out or dQ into NaN, 0 * NaN), the dK/dV
    kernel never reads a query block that hides every pair of its key block (dO NaN on the rows
    that see nothing, and K, V on the hidden keys: dK or dV would turn NaN), and they match the
    float64 reference within torch's own error (the rows that see nothing: out = 0, dQ = 0, no
    part in dK, dV; the reference leaves them out). Blocks hidden are aligned to 128 keys and
    queries, the widest of any table; L spans ATTN_TILE_LISTS_MIN_BLOCKS of dK/dV's."""
    B, H, L, S, D = 2, 2, 256, 384, 32
    blind = slice(128, 256)  # queries that see no key
    torch.manual_seed(12)
    keys = torch.arange(S, device=DEVICE)
    lengths = torch.tensor([[128, 256], [384, 128]], device=DEVICE)  # (B, H): visible prefixes
    mask = (keys < lengths[:, :, None, None]) & (torch.rand(B, H, L, S, device=DEVICE) < 0.9)
    mask[..., 0] = True  # every row but the blind ones sees a key (torch gives such a row NaN)
    mask[:, :, blind] = False
    hidden = keys >= lengths[:, :, None]  # (B, H, S)
    q, k, v, do = make_inputs(B, H, H, L, S, D, D, torch.float16)
    k_nan, v_nan = (t.masked_fill(hidden[..., None], float("nan")) for t in (k, v))
    do_nan = do.clone()
    do_nan[:, :, blind] = float("nan")
    out, lse, _ = attention.attention_fwd(q, k_nan, v_nan, D**-0.5, causal, mask)
    assert not out.isnan().any(), "the forward read a hidden key block"
    dq, dk, dv, _, _ = attention.attention_bwd(do_nan, q, k_nan, v_nan, out, lse, D**-0.5, causal,
                                               mask)
    assert not dq.isnan().any(), "the dQ kernel read a hidden key block"
    assert not (dk.isnan().any() or dv.isnan().any()), "the dK/dV kernel read a hidden block"
    assert out[:, :, blind].eq(0).all() and dq[:, :, blind].eq(0).all()
    seen = slice(0, blind.start)
    ref = _sdpa_grads(q[:, :, seen], k, v, do[:, :, seen], mask[:, :, seen], causal, D**-0.5,
                      torch.float64)
    torch_ref = _sdpa_grads(q[:, :, seen], k, v, do[:, :, seen], mask[:, :, seen], causal,
                            D**-0.5, torch.float16)
    ours = (out[:, :, seen], dq[:, :, seen], dk, dv)
    for name, got, want, torch_got in zip(("out", "dq", "dk", "dv"), ours, ref, torch_ref):
        assert_within_torch_error(name, got, torch_got, want, torch.float16)


def _sdpa_grads(q, k, v, do, mask, causal, scale, dtype):
    """(out, dq, dk, dv) of torch's own op in `dtype` (float64: the reference) on the same
    inputs."""
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    out = torch_sdpa(q, k, v, mask, causal, False, scale=scale)
    return (out, *torch.autograd.grad(out, (q, k, v), do.to(dtype)))


def test_key_padding_block_lists_split_whole_and_partial_blocks():
    """_visible_blocks against brute force on random (B, 1, 1, S) masks, ragged S among them:
    per batch, the whole key blocks (every key below S visible; the kernels apply no mask there)
    in order, then the partial ones in order, then the padding-only ones, and counts giving, for
    any block range [j0, j1), the list positions of its whole blocks (row 0) and of its partial
    ones (row 1)."""
    rng = random.Random(5)
    for case in range(40):
        B, S, block_n = rng.randint(1, 3), rng.choice([1, 3, 16, 97, 128, 300]), rng.choice([16, 64])
        p = rng.choice([0.0, 0.05, 0.5, 1.0])
        runs = torch.rand(B, 1, 1, S) > p  # scattered padding
        if rng.random() < 0.5:  # or BERT's: a run of real tokens, then padding
            lengths = torch.randint(0, S + 1, (B,))
            runs = (torch.arange(S) < lengths[:, None])[:, None, None, :]
        ids, counts, nb, strides = attention._visible_blocks(
            runs.view(torch.uint8), {"KEY_PADDING": True}, 1, S, 1, block_n, False, None)
        assert strides == (int(B > 1), 0, 0)  # one list per batch entry
        assert nb == -(-S // block_n) and ids.dtype == counts.dtype == torch.int32
        for b in range(B):
            keys = runs[b, 0, 0].tolist()
            blocks = [keys[j * block_n:(j + 1) * block_n] for j in range(nb)]
            whole = [j for j in range(nb) if all(blocks[j])]
            partial = [j for j in range(nb) if any(blocks[j]) and not all(blocks[j])]
            rest = [j for j in range(nb) if not any(blocks[j])]
            assert ids[b].tolist() == whole + partial + rest, (case, b)
            for j in range(nb + 1):
                assert counts[b, 0, j] == sum(1 for i in whole if i < j), (case, b, j)
                assert counts[b, 1, j] == len(whole) + sum(1 for i in partial if i < j), (case, b, j)


# --------------------------------------------------------------------------------------------------
# Loop phases: which blocks take the element mask, and what loads without a row mask
# --------------------------------------------------------------------------------------------------


@triton.jit
def _phase_bounds_kernel(Out, n0, L, m_hi, m0, m_last, S, diag_lo, diag_hi,
                         WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    q0, q1, q2, q3 = _query_block_bounds(n0, L, m_hi, diag_lo, diag_hi, WINDOW_LEFT, WINDOW_RIGHT,
                                         BLOCK_M, BLOCK_N)
    k0, k1, k2, k3 = _key_block_bounds(m0, m_last, S, diag_lo, diag_hi, WINDOW_LEFT, WINDOW_RIGHT,
                                       BLOCK_N)
    tl.store(Out + 0, q0)
    tl.store(Out + 1, q1)
    tl.store(Out + 2, q2)
    tl.store(Out + 3, q3)
    tl.store(Out + 4, k0)
    tl.store(Out + 5, k1)
    tl.store(Out + 6, k2)
    tl.store(Out + 7, k3)


def _check_phases(bounds, block, blocks, needed, unmasked_ok, counted, what):
    """bounds (lo, full_lo, full_hi, hi) of the loops over `blocks` (block starts): [lo, full_lo)
    masked, [full_lo, full_hi) unmasked, [full_hi, hi) masked, each stepping by `block` from its
    start (an empty or inverted range visits nothing). No block is visited twice, every needed
    block once, and the unmasked phase only visits blocks for which unmasked_ok holds. counted:
    the dK/dV loop counts the blocks of both masked ranges (with a window), so neither count may
    be negative."""
    lo, full_lo, full_hi, hi = bounds
    phases = ((lo, full_lo, "masked"), (full_lo, full_hi, "unmasked"), (full_hi, hi, "masked"))
    assert all(a % block == 0 for a, b, _ in phases if a < b), f"{what}: unaligned {bounds}"
    if counted:
        assert lo <= full_lo and full_hi < hi + block, f"{what}: negative counts {bounds}"
    for b in blocks:
        visits = [kind for a, end, kind in phases if a <= b < end]
        assert len(visits) <= 1, f"{what}: block {b} visited twice {bounds}"
        if needed(b):
            assert visits, f"{what}: block {b} skipped {bounds}"
        if visits == ["unmasked"]:
            assert unmasked_ok(b), f"{what}: block {b} in the unmasked phase {bounds}"


def test_loop_phase_bounds():
    """_query_block_bounds (dK/dV) and _key_block_bounds (forward, dQ) on random problems against
    brute force (causal, windows, bottom-right, key padding's empty query range): every block with
    a visible pair is visited, and in the unmasked phase every pair is visible. There the dQ loop
    loads its key blocks without a row mask: they lie whole inside [0, S); the dK/dV loop reads its
    query blocks' row statistics without one: they lie inside the rows padded to a multiple of
    ATTN_BWD_ROW_PAD."""
    rng = random.Random(11)
    out = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    for case in range(160):
        block_m, block_n = rng.choice([16, 32, 64]), rng.choice([16, 32, 64, 128])
        L, S = rng.randint(1, 300), rng.randint(1, 300)
        window_left, window_right = rng.choice([False, True]), rng.choice([False, True])
        off = rng.choice([0, S - L])  # top-left or bottom-right diagonal
        diag_lo, diag_hi = off - rng.randint(0, 120), off + rng.choice([0, rng.randint(0, 120)])
        m_hi = rng.choice([L, L, 0])  # 0: a key block that only padding queries would see
        n0 = rng.randrange(0, S, block_n)
        m0 = rng.randrange(0, L, block_m)
        m_last = min(m0 + block_m, L) - 1
        _phase_bounds_kernel[(1,)](out, n0, L, m_hi, m0, m_last, S, diag_lo, diag_hi,
                                   window_left, window_right, block_m, block_n)
        got = out.tolist()

        def sees(i, j):
            return (not window_right or j <= i + diag_hi) and (not window_left or j >= i + diag_lo)

        what = f"case {case}: L={L} S={S} n0={n0} m0={m0} diag=({diag_lo}, {diag_hi}) " \
               f"window=({window_left}, {window_right}) blocks {block_m}x{block_n}"
        keys = range(n0, min(n0 + block_n, S))
        padded = configs.cdiv(L, configs.ATTN_BWD_ROW_PAD) * configs.ATTN_BWD_ROW_PAD
        _check_phases(got[:4], block_m, range(0, m_hi, block_m),
                      lambda m: any(sees(i, j) for i in range(m, min(m + block_m, L)) for j in keys),
                      lambda m: m + block_m <= padded and all(
                          sees(i, j) for i in range(m, min(m + block_m, L)) for j in keys),
                      window_left, "query blocks, " + what)
        queries = range(m0, m_last + 1)
        _check_phases(got[4:], block_n, range(0, S, block_n),
                      lambda n: any(sees(i, j) for i in queries for j in range(n, min(n + block_n, S))),
                      lambda n: n + block_n <= S and all(sees(i, j) for i in queries
                                                         for j in range(n, n + block_n)),
                      False, "key blocks, " + what)


@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_row_statistics_layout(varlen, monkeypatch, poisoned_empty):
    """The backward's row statistics as the preprocess kernel leaves them: each sequence's lse2
    (lse * log2 e) and delta rows where _stat_rows puts them (packed: sequence b at row
    cu_seqlens[b] + b * PAD), then +inf and 0 up to a multiple of ATTN_BWD_ROW_PAD rows, where the
    dK/dV loop reads them without a row mask; no sequence's padding lands on another's rows (on a
    GPU, writes that overlapped would race)."""
    pad = configs.ATTN_BWD_ROW_PAD
    made = []
    real = attention._bwd_row_stats
    monkeypatch.setattr(attention, "_bwd_row_stats", lambda *args: made.append(real(*args))
                        or made[-1])
    torch.manual_seed(13)
    lengths, H, D = [45, 64, 1, 70], 2, 32
    if varlen:
        cu = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=DEVICE)
        q, k, v, do = (torch.randn(sum(lengths), H, D, device=DEVICE) for _ in range(4))
        args = (cu, cu, max(lengths), max(lengths), D**-0.5, True)
        out, lse, _ = attention.varlen_attention_fwd(q, k, v, *args)
        attention.varlen_attention_bwd(do, q, k, v, out, lse, *args)
        rows = [(int(cu[b]) + b * pad, n, lse[:, cu[b]:cu[b + 1]],
                 (do[cu[b]:cu[b + 1]] * out[cu[b]:cu[b + 1]]).sum(-1).T)
                for b, n in enumerate(lengths)]
    else:
        L = lengths[0]
        q, k, v, do = (torch.randn(2, H, L, D, device=DEVICE) for _ in range(4))
        out, lse, _ = attention.attention_fwd(q, k, v, D**-0.5, True)
        attention.attention_bwd(do, q, k, v, out, lse, D**-0.5, True)
        rows = [(0, L, lse[b], (do[b] * out[b]).sum(-1)) for b in range(2)]
    (lse2, delta), = made
    for b, (start, n, want_lse, want_delta) in enumerate(rows):
        stats = (lse2, delta) if varlen else (lse2[b], delta[b])
        end = start + math.ceil(n / pad) * pad
        got_lse, got_delta = (t[..., start:start + n] for t in stats)
        torch.testing.assert_close(got_lse, want_lse * math.log2(math.e), rtol=1e-6, atol=0)
        torch.testing.assert_close(got_delta, want_delta, rtol=1e-5, atol=1e-6)
        for t, fill in zip(stats, (float("inf"), 0.0)):
            assert (t[..., start + n:end] == fill).all(), f"sequence {b}: padding is not {fill}"


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_no_row_read_past_the_sequence(is_causal, poisoned_empty):
    """q, dO (rows past L) and k, v (keys past S) as views into taller tensors whose extra rows are
    NaN: the backward reads none of them (the dQ loop's unmasked phase loads key blocks without a
    row mask, so they must be whole), and computes exactly what it computes on contiguous copies.
    torch.empty gives NaN: the dK/dV loop's unmasked reads of the row statistics' padding find
    what the preprocess kernel wrote there. L and S leave ragged last blocks for the interpreter's
    tiles and the GPU tables' alike."""
    B, H, L, S, D, pad = 2, 2, 45, 77, 32, 64
    torch.manual_seed(12)

    def padded(n):  # (B, H, n, D) view of a (B, H, n + pad, D) tensor, NaN past row n
        t = torch.full((B, H, n + pad, D), float("nan"), device=DEVICE, dtype=torch.float16)
        t[:, :, :n] = torch.randn(B, H, n, D, device=DEVICE).to(torch.float16)
        return t[:, :, :n]

    q, k, v, do = padded(L), padded(S), padded(S), padded(L)
    out, lse, _ = attention.attention_fwd(q, k, v, D**-0.5, is_causal)
    got = attention.attention_bwd(do, q, k, v, out, lse, D**-0.5, is_causal)[:3]
    for name, t in zip(("dq", "dk", "dv"), got):
        assert not t.isnan().any(), f"{name}: a row past the sequence (or unwritten padding) was read"
    qc, kc, vc, doc = (t.contiguous() for t in (q, k, v, do))
    out_c, lse_c, _ = attention.attention_fwd(qc, kc, vc, D**-0.5, is_causal)
    want = attention.attention_bwd(doc, qc, kc, vc, out_c, lse_c, D**-0.5, is_causal)[:3]
    assert torch.equal(out, out_c)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), f"{name} differs from the contiguous inputs'"


# --------------------------------------------------------------------------------------------------
# Edge cases and determinism
# --------------------------------------------------------------------------------------------------


class _MustNotLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched for an empty problem")


def test_empty_problem_mask_gradient():
    """No queries: the gradient of a float mask is 0, shaped as the mask."""
    q, k, v, do = make_inputs(1, 2, 2, 0, 5, 16, 16, torch.float32)
    mask = torch.randn(1, 1, 0, 5, device=DEVICE)
    out, lse, _ = attention.attention_fwd(q, k, v, 0.25, False, mask)
    dmask = attention.attention_bwd(do, q, k, v, out, lse, 0.25, False, mask, mask_grad=True)[3]
    assert dmask.shape == mask.shape and dmask.dtype == mask.dtype
    mask = torch.randn(3, 5, device=DEVICE)
    q, k, v, do = make_inputs(1, 2, 2, 3, 0, 16, 16, torch.float32)  # no keys
    out, lse, _ = attention.attention_fwd(q, k, v, 0.25, False, mask[:, :0])
    dmask = attention.attention_bwd(do, q, k, v, out, lse, 0.25, False, mask[:, :0],
                                    mask_grad=True)[3]
    assert dmask.shape == (3, 0)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_no_queries(is_causal, monkeypatch):
    """L == 0: empty outputs, no kernel launched, zero dk and dv."""
    kernels = ("_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
    for name in kernels:
        monkeypatch.setattr(attention, name, _MustNotLaunch())
    q, k, v, do = make_inputs(2, 4, 2, 0, 5, 32, 24, torch.float16)
    out, lse, _ = attention.attention_fwd(q, k, v, 0.2, is_causal)
    assert out.shape == (2, 4, 0, 24) and out.dtype == torch.float16
    assert lse.shape == (2, 4, 0) and lse.dtype == torch.float32
    dq, dk, dv, _, _ = attention.attention_bwd(do, q, k, v, out, lse, 0.2, is_causal)
    assert dq.shape == (2, 4, 0, 32)
    assert dk.shape == (2, 2, 5, 32) and dv.shape == (2, 2, 5, 24)
    assert not dk.any() and not dv.any()


# --------------------------------------------------------------------------------------------------
# K and V through tensor descriptors (TMA on Hopper) or pointer tiles
# --------------------------------------------------------------------------------------------------


class _RecordLaunches:
    """Stands in for a jit kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def _recorded(monkeypatch, descriptors: bool, flags: dict, fn, *args, **kwargs):
    """fn(*args, **kwargs) (a launcher) with configs.py's descriptor choice (forward and
    backward) forced to `descriptors`; returns (its outputs, the descriptor flags its kernels
    were launched with, in the order of `flags`: kernel name -> the names of its flags; one
    launch of each kernel)."""
    with monkeypatch.context() as m:
        m.setattr(attention, "attention_descriptors",
                  lambda dtype, device, backward=False: descriptors)
        recorders = {name: _RecordLaunches(getattr(attention, name)) for name in flags}
        for name, recorder in recorders.items():
            m.setattr(attention, name, recorder)
        result = fn(*args, **kwargs)
    used = []
    for name, names in flags.items():
        (launch,) = recorders[name].launches
        used += [launch[flag] for flag in names]
    return result, tuple(used)


def _forward(monkeypatch, descriptors: bool, fn, *args, **kwargs):
    """A forward launcher's outputs with the descriptor choice forced, and the (KV_TMA, O_TMA)
    its kernel was launched with."""
    return _recorded(monkeypatch, descriptors, {"_attn_fwd_kernel": ("KV_TMA", "O_TMA")}, fn,
                     *args, **kwargs)


def _backward(monkeypatch, descriptors: bool, fn, *args, **kwargs):
    """A backward launcher's outputs with the descriptor choice forced, and the flags its kernels
    were launched with: (QDO_TMA of the dK/dV kernel, KV_TMA of the dQ kernel)."""
    return _recorded(monkeypatch, descriptors, {"_attn_bwd_dkdv_kernel": ("QDO_TMA",),
                                                "_attn_bwd_dq_kernel": ("KV_TMA",)},
                     fn, *args, **kwargs)


def _descriptor_cases():
    """(name, B, Hq, Hkv, L, S, D, Dv, causal, mask kind, dropout_p, strided, dtype)."""
    f16, bf16 = torch.float16, torch.bfloat16
    return [
        ("plain odd sizes", 2, 3, 3, 97, 131, 64, 64, False, None, 0.0, False, bf16),
        ("causal L < S, D 80", 1, 2, 2, 33, 200, 80, 80, True, None, 0.0, False, f16),
        ("causal L > S, gqa", 2, 4, 2, 70, 45, 32, 32, True, None, 0.0, False, bf16),
        ("bool mask, Dv != D", 1, 2, 1, 40, 77, 48, 16, False, "bool", 0.0, False, f16),
        ("float mask + causal", 1, 2, 2, 50, 50, 32, 32, True, "float", 0.0, False, bf16),
        ("key padding + dropout", 2, 2, 2, 24, 150, 64, 64, False, "padding", 0.2, False, f16),
        ("HF strided, D 128", 2, 2, 1, 19, 65, 128, 128, False, None, 0.0, True, bf16),
    ]


def _skip_without_backward_descriptors() -> None:
    """On a GPU, the backward takes descriptors only from configs.BACKWARD_DESCRIPTORS_FROM on:
    an older Triton's ptxas crashes compiling them (3.6: SIGSEGV, seen on an H200), so forcing
    them there tests nothing fastattn runs."""
    if DEVICE == "cuda" and configs._triton_version() < configs.BACKWARD_DESCRIPTORS_FROM:
        pytest.skip(f"the backward takes no descriptors before Triton "
                    f"{'.'.join(map(str, configs.BACKWARD_DESCRIPTORS_FROM))}")


def _descriptor_inputs(case, seed: int) -> tuple:
    """(q, k, v, do, mask, dropout seed) of a _descriptor_cases() case, drawn under `seed`; skips
    on a GPU that takes no descriptors."""
    if DEVICE == "cuda" and configs.arch_major(torch.device(DEVICE)) < 9:
        pytest.skip("tensor descriptors are chosen on Hopper and newer only")
    _, B, Hq, Hkv, L, S, D, Dv, causal, mask_kind, dropout_p, strided, dtype = case
    torch.manual_seed(seed)
    q, k, v, do = make_inputs(B, Hq, Hkv, L, S, D, Dv, dtype, strided)
    mask = {None: None,
            "bool": torch.rand(L, S, device=DEVICE) < 0.7,
            "float": torch.randn(B, 1, L, S, device=DEVICE).to(dtype),
            "padding": (torch.arange(S, device=DEVICE) < torch.tensor([[90], [S]], device=DEVICE)
                        )[:, None, None, :]}[mask_kind]
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE) if dropout_p else None
    return q, k, v, do, mask, seed


@pytest.mark.parametrize("case", _descriptor_cases(), ids=lambda c: c[0])
def test_kv_descriptor_path_equals_pointer_path(case, monkeypatch):
    """The forward reading K and V and writing out through tensor descriptors gives bitwise the
    pointer path's out, lse and out's rounding residual (the same values reach the same math;
    TMA's zero fill past S and D matches the masked loads, its clipped store at L the masked
    store), and each path really ran: the kernel's KV_TMA and O_TMA flags, as launched."""
    _, B, Hq, Hkv, L, S, D, Dv, causal, mask_kind, dropout_p, strided, dtype = case
    q, k, v, _, mask, seed = _descriptor_inputs(case, 11)
    args = (q, k, v, D**-0.5, causal, mask, dropout_p, seed, True)  # residual: out_lo too
    (out_tma, lse_tma, lo_tma), used_tma = _forward(monkeypatch, True, attention.attention_fwd,
                                                    *args)
    (out_ptr, lse_ptr, lo_ptr), used_ptr = _forward(monkeypatch, False, attention.attention_fwd,
                                                    *args)
    assert used_tma == (True, True) and used_ptr == (False, False)
    assert torch.equal(out_tma, out_ptr) and torch.equal(lse_tma, lse_ptr)
    assert lo_tma.shape == out_tma.shape and lo_tma.any() and torch.equal(lo_tma, lo_ptr)
    if mask_kind is None and dropout_p == 0.0:  # and right (the pointer path is tested at length)
        ref, _ = reference.scaled_dot_product_attention(*leaves(q, k, v, dtype=torch.float64),
                                                        causal, D**-0.5, None)
        torch_out = torch_sdpa(q, k, v, None, causal, Hq != Hkv, scale=D**-0.5)
        assert_within_torch_error("out", out_tma, torch_out, ref, dtype)


@pytest.mark.parametrize("case", _descriptor_cases(), ids=lambda c: c[0])
def test_backward_descriptor_path_equals_pointer_path(case, monkeypatch):
    """The backward reading q and dO (dK/dV kernel) and K and V (dQ kernel) through tensor
    descriptors gives bitwise the pointer path's dq, dk, dv (and a float mask's gradient): TMA's
    zero fill past L, S and D matches the masked loads; each path really ran (the flags the two
    kernels were launched with). dO is a (B, N, H, D).transpose(1, 2) view where q is."""
    _, B, Hq, Hkv, L, S, D, Dv, causal, mask_kind, dropout_p, strided, dtype = case
    _skip_without_backward_descriptors()
    q, k, v, do, mask, seed = _descriptor_inputs(case, 16)
    out, lse, lo = attention.attention_fwd(q, k, v, D**-0.5, causal, mask, dropout_p, seed, True)
    mask_grad = mask_kind == "float"
    args = (do, q, k, v, out, lse, D**-0.5, causal, mask, dropout_p, seed, mask_grad, lo)
    grads_tma, used_tma = _backward(monkeypatch, True, attention.attention_bwd, *args)
    grads_ptr, used_ptr = _backward(monkeypatch, False, attention.attention_bwd, *args)
    assert used_tma == (True, True) and used_ptr == (False, False)
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), grads_tma, grads_ptr):
        assert torch.equal(a, b), f"{name}: the descriptor path differs from the pointer path"
    assert grads_tma[0].any() and grads_tma[1].any() and grads_tma[2].any()
    if mask_kind is None and dropout_p == 0.0:  # and right (the pointer path is tested at length)
        check = leaves(q, k, v, dtype=torch.float64)
        ref, _ = reference.scaled_dot_product_attention(*check, causal, D**-0.5, None)
        ref_grads = torch.autograd.grad(ref, check, do.to(torch.float64))
        torch_leaves = leaves(q, k, v)
        torch_grads = torch.autograd.grad(
            torch_sdpa(*torch_leaves, None, causal, Hq != Hkv, scale=D**-0.5), torch_leaves, do)
        for name, ours, theirs, want in zip(("dq", "dk", "dv"), grads_tma, torch_grads, ref_grads):
            assert_within_torch_error(name, ours, theirs, want, dtype)


def test_backward_descriptors_split_columns(monkeypatch):
    """The Hopper d256 dK/dV row splits each key block's dK, dV columns over two programs, each
    reading its part of q's and dO's columns through a descriptor of its own (block
    BLOCK_M x 128, at column 128 for the second): bitwise the pointer path's gradients."""
    if DEVICE == "cuda" and configs.arch_major(torch.device(DEVICE)) < 9:
        pytest.skip("tensor descriptors are chosen on Hopper and newer only")
    _skip_without_backward_descriptors()
    use_gpu_tiles(9, 256, torch.bfloat16, False, monkeypatch)
    (dkdv,) = attention.attention_bwd_candidates(256, torch.bfloat16, torch.device(DEVICE))["dkdv"]
    assert dkdv["SPLIT"] == 2
    torch.manual_seed(17)
    q, k, v, do = make_inputs(1, 2, 1, 37, 150, 256, 256, torch.bfloat16)
    out, lse, lo = attention.attention_fwd(q, k, v, 0.0625, True, None, 0.0, None, True)
    args = (do, q, k, v, out, lse, 0.0625, True, None, 0.0, None, False, lo)
    grads_tma, used_tma = _backward(monkeypatch, True, attention.attention_bwd, *args)
    grads_ptr, used_ptr = _backward(monkeypatch, False, attention.attention_bwd, *args)
    assert used_tma == (True, True) and used_ptr == (False, False)
    for name, a, b in zip(("dq", "dk", "dv"), grads_tma, grads_ptr):
        assert a.any() and torch.equal(a, b), name


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kv_descriptor_path_varlen(causal, monkeypatch):
    """Packed sequences through descriptors: each program's descriptor spans its own sequence's
    keys, so a neighbour's rows never reach its products (sequence 1's keys and values are NaN
    here, right past sequence 0's last key and inside its last key block: any read of them would
    turn sequence 0's output into NaN); bitwise the pointer path's result."""
    if DEVICE == "cuda" and configs.arch_major(torch.device(DEVICE)) < 9:
        pytest.skip("tensor descriptors are chosen on Hopper and newer only")
    torch.manual_seed(12)
    lengths_q, lengths_k = [37, 1, 70], [50, 3, 66]
    cu_q = torch.tensor([0, 37, 38, 108], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 50, 53, 119], dtype=torch.int32, device=DEVICE)
    Hq, Hkv, D = 4, 2, 64
    q = torch.randn(sum(lengths_q), Hq, D, device=DEVICE).to(torch.bfloat16)
    k = torch.randn(sum(lengths_k), Hkv, D, device=DEVICE).to(torch.bfloat16)
    v = torch.randn(sum(lengths_k), Hkv, D, device=DEVICE).to(torch.bfloat16)
    k[50:53], v[50:53] = float("nan"), float("nan")  # sequence 1
    args = (q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), D**-0.5, causal)
    (out_tma, lse_tma, _), used_tma = _forward(monkeypatch, True, attention.varlen_attention_fwd,
                                               *args)
    (out_ptr, lse_ptr, _), used_ptr = _forward(monkeypatch, False, attention.varlen_attention_fwd,
                                               *args)
    assert used_tma == (True, True) and used_ptr == (False, False)
    torch.testing.assert_close(out_tma, out_ptr, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(lse_tma, lse_ptr, atol=0, rtol=0, equal_nan=True)
    assert out_tma[37:38].isnan().all()  # sequence 1 reads its own (NaN) keys
    for b in (0, 2):  # the others: finite, and as a padded call of their own
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        one, _, _ = attention.attention_fwd(*(t[rows].transpose(0, 1)[None] for t, rows in
                                              ((q, rows_q), (k, rows_k), (v, rows_k))),
                                            D**-0.5, causal)
        assert torch.isfinite(out_tma[rows_q]).all()
        torch.testing.assert_close(out_tma[rows_q], one[0].transpose(0, 1), atol=0, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_descriptor_path_varlen(causal, monkeypatch):
    """Packed sequences in the backward: each program's descriptors span its own sequence's rows
    (q and dO in the dK/dV kernel, K and V in the dQ kernel), so a neighbour's rows never reach
    its gradients. Sequence 1's q, k, v and dO are NaN here, right past sequence 0's last rows and
    inside its last blocks: sequences 0 and 2 get finite gradients, bitwise those of padded calls
    of their own, and bitwise the pointer path's."""
    if DEVICE == "cuda" and configs.arch_major(torch.device(DEVICE)) < 9:
        pytest.skip("tensor descriptors are chosen on Hopper and newer only")
    torch.manual_seed(18)
    cu_q = torch.tensor([0, 37, 39, 109], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 50, 53, 119], dtype=torch.int32, device=DEVICE)
    Hq, Hkv, D = 4, 2, 64

    def rand(rows, heads):
        return torch.randn(rows, heads, D, device=DEVICE).to(torch.bfloat16)
    q, do, k, v = rand(109, Hq), rand(109, Hq), rand(119, Hkv), rand(119, Hkv)
    for t, cu in ((q, cu_q), (do, cu_q), (k, cu_k), (v, cu_k)):
        t[cu[1]:cu[2]] = float("nan")  # sequence 1
    scale, lengths = D**-0.5, (70, 66)
    out, lse, lo = attention.varlen_attention_fwd(q, k, v, cu_q, cu_k, *lengths, scale, causal,
                                                  0.0, None, True)
    args = (do, q, k, v, out, lse, cu_q, cu_k, *lengths, scale, causal, 0.0, None, lo)
    grads_tma, used_tma = _backward(monkeypatch, True, attention.varlen_attention_bwd, *args)
    grads_ptr, used_ptr = _backward(monkeypatch, False, attention.varlen_attention_bwd, *args)
    assert used_tma == (True, True) and used_ptr == (False, False)
    for a, b in zip(grads_tma[:3], grads_ptr[:3]):
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
    for b in (0, 2):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        one = [t[rows].transpose(0, 1)[None] for t, rows in
               ((q, rows_q), (k, rows_k), (v, rows_k), (do, rows_q), (out, rows_q))]
        one_lse = lse[:, rows_q][None].contiguous()
        want = attention.attention_bwd(one[3], *one[:3], one[4], one_lse, scale, causal,
                                       out_lo=lo[rows_q].transpose(0, 1)[None])
        for got, rows, exp in zip(grads_tma[:3], (rows_q, rows_k, rows_k), want[:3]):
            assert torch.isfinite(got[rows]).all()
            torch.testing.assert_close(got[rows], exp[0].transpose(0, 1), atol=0, rtol=0)


def test_backward_descriptors_from_triton_3_9(monkeypatch):
    """On a Hopper GPU the backward takes descriptors with Triton 3.9 on, not with 3.6 (whose
    ptxas crashes on the dK/dV kernel's); never for fp32 or before Hopper; always under the
    interpreter, which runs no ptxas. The forward takes them with either version."""
    assert configs._triton_version() == tuple(int(p) for p in triton.__version__.split(".")[:2])
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "arch_major", lambda device: 9)
    gpu = torch.device("cuda")
    for version, backward in (((3, 6), False), ((3, 9), True), ((3, 10), True), ((4, 0), True)):
        monkeypatch.setattr(configs, "_triton_version", lambda: version)
        for dtype in (torch.bfloat16, torch.float16):
            assert configs.attention_descriptors(dtype, gpu, backward=True) is backward, version
            assert configs.attention_descriptors(dtype, gpu) is True
        assert configs.attention_descriptors(torch.float32, gpu, backward=True) is False
    monkeypatch.setattr(configs, "arch_major", lambda device: 8)
    assert configs.attention_descriptors(torch.bfloat16, gpu, backward=True) is False
    monkeypatch.setattr(configs, "interpreting", lambda: True)
    monkeypatch.setattr(configs, "_triton_version", lambda: (3, 6))
    assert configs.attention_descriptors(torch.bfloat16, torch.device("cpu"), backward=True)


def test_kv_descriptors_only_where_strides_allow(monkeypatch):
    """The descriptor path is taken for contiguous and Hugging Face (B, N, H, D).transpose(1, 2)
    k, v whose rows are 16-byte aligned; not for a head dim whose rows are not (bf16 D = 100:
    200-byte rows), a base that is not 16-byte aligned, or fp32 (whose kernels do not use the
    tensor cores). The output (contiguous, Dv wide) goes through one when its rows are aligned,
    whatever k's. All of them still give the right answer."""
    if DEVICE == "cuda" and configs.arch_major(torch.device(DEVICE)) < 9:
        pytest.skip("tensor descriptors are chosen on Hopper and newer only")
    torch.manual_seed(13)

    def flags(q, k, v):
        """(KV_TMA, O_TMA) of the forward kernel's launch."""
        recorder = _RecordLaunches(attention._attn_fwd_kernel)
        with monkeypatch.context() as m:
            m.setattr(attention, "_attn_fwd_kernel", recorder)
            attention.attention_fwd(q, k, v, 0.125, False)
        return recorder.launches[0]["KV_TMA"], recorder.launches[0]["O_TMA"]

    bf16 = torch.bfloat16
    assert flags(*make_inputs(1, 2, 2, 8, 40, 64, 64, bf16)[:3]) == (True, True)
    assert flags(*make_inputs(1, 2, 2, 8, 40, 64, 64, bf16, strided=True)[:3]) == (True, True)
    assert flags(*make_inputs(1, 2, 2, 8, 40, 100, 100, bf16)[:3]) == (False, False)
    assert flags(*make_inputs(1, 2, 2, 8, 40, 100, 64, bf16)[:3]) == (False, True)
    assert flags(*make_inputs(1, 2, 2, 8, 40, 64, 100, bf16)[:3]) == (False, False)
    assert flags(*make_inputs(1, 2, 2, 8, 40, 64, 64, torch.float32)[:3]) == (False, False)
    q, k, v, _ = make_inputs(1, 2, 2, 8, 40, 64, 64, bf16)
    shifted = torch.empty(k.numel() + 1, dtype=bf16, device=DEVICE)[1:].view(k.shape)  # 2-byte offset
    shifted.copy_(k)
    assert shifted.data_ptr() % 16 != 0
    assert flags(q, shifted, v) == (False, True)
    ref, _ = reference.scaled_dot_product_attention(*leaves(q, k, v, dtype=torch.float64), False,
                                                    0.125, None)
    out, _, _ = attention.attention_fwd(q, shifted, v, 0.125, False)
    assert_within_torch_error("out", out, torch_sdpa(q, k, v, None, False, False, scale=0.125),
                              ref, bf16)


# --------------------------------------------------------------------------------------------------
# Autotuned launches (kernels/autotune.py): the launchers time every candidate, then launch the winner
# --------------------------------------------------------------------------------------------------


def test_launchers_tune_every_pass(monkeypatch, tmp_path):
    """With two candidates per pass and the tuner allowed to time on this device (a stand-in timer
    whose scripted times make the second candidate the faster), the first forward + backward times
    both candidates of the forward, dK/dV and dQ kernels, then launches the second; a second call of
    the same problem launches the second at once. The results are right with either tile."""
    from fastattn.kernels import autotune

    slow, fast = (dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
                  dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1))
    cands = [slow, fast]
    monkeypatch.setenv(autotune.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(autotune, "_tunable", lambda device: True)
    autotune.clear_cache()
    timed = []

    def stand_in_timer(fn):
        fn()  # the launch runs (its outputs are overwritten by the final one)
        timed.append(fn.args[0])
        return 1.0 if fn.args[0]["BLOCK_M"] == slow["BLOCK_M"] else 0.5

    monkeypatch.setattr(autotune, "_time_ms", stand_in_timer)
    monkeypatch.setattr(attention, "attention_fwd_candidates", lambda *args: list(cands))
    monkeypatch.setattr(attention, "attention_bwd_candidates", lambda *args: dict(
        preprocess=dict(BLOCK_M=64, num_warps=4), dkdv=[dict(c, SPLIT=1) for c in cands],
        dq=list(cands)))
    recorders = {name: _RecordLaunches(getattr(attention, name)) for name in
                 ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(attention, name, recorder)

    def tiles(name):
        return [(kw["BLOCK_M"], kw["BLOCK_N"]) for kw in recorders[name].launches]

    torch.manual_seed(14)
    for call in range(2):
        for recorder in recorders.values():
            recorder.launches.clear()
        out, lse, dq, dk, dv = check_against_reference(1, 2, 1, 70, 45, 32, 32, True, torch.bfloat16)
        want = [(64, 32), (32, 16), (32, 16)] if call == 0 else [(32, 16)]
        for name in recorders:
            assert tiles(name) == want, f"call {call}: {name} launched {tiles(name)}"
    # forward, dK/dV, dQ: each tuned once
    assert [(c["BLOCK_M"], c["BLOCK_N"]) for c in timed] == [(64, 32), (32, 16)] * 3
    assert json.loads(autotune.cache_path().read_text()), "the winners were not written to disk"
    autotune.clear_cache()


def _tuning_cases():
    """(head dim, candidate number) of every Hopper autotuning alternate (fp16 / bf16 rows): the
    passes with fewer candidates keep their last one."""
    for head_dim in (64, 128, 256):
        fwd, bwd = gpu_candidates(9, head_dim, torch.bfloat16, False)
        for i in range(1, max(len(fwd), len(bwd["dkdv"]), len(bwd["dq"]))):
            yield head_dim, i


@pytest.mark.parametrize("head_dim,candidate", list(_tuning_cases()))
def test_gpu_tuning_candidates(head_dim, candidate, monkeypatch):
    """Every tile the Hopper autotuner may pick is right too, with a bool mask and causal (sizes no
    multiple of any tile)."""
    use_gpu_tiles(9, head_dim, torch.bfloat16, False, monkeypatch, candidate)
    torch.manual_seed(15)
    mask = torch.rand(150, 133, device=DEVICE) < 0.8
    mask[:, 0] = True
    check_against_reference(1, 2, 1, 150, 133, head_dim, head_dim, True, torch.bfloat16,
                            attn_mask=mask)


@pytest.mark.parametrize("L,S", [(70, 3 * 32), (70, 4 * 32 + 5), (4 * 32 + 2, 3 * 32)])
def test_tile_lists_taken_from_enough_blocks(monkeypatch, L, S):
    """The forward and dQ kernels take tile lists (TILE_LISTS) for a bool (B, Hq, L, S) mask whose
    keys span configs.ATTN_TILE_LISTS_MIN_BLOCKS key blocks of the launch (the interpreter's: 32
    keys), the dK/dV kernel when its queries span as many query blocks (32 queries), never for a
    key-padding or a float mask; with and without lists the outputs match (the lists only reorder
    whole blocks before partial ones) within fp32 rounding."""
    B, H, D = 1, 2, 16
    q, k, v, do = make_inputs(B, H, H, L, S, D, D, torch.float32)
    mask = torch.rand(B, H, L, S, device=DEVICE) > 0.3
    mask[..., :40] = True  # whole blocks beside partial ones
    mask[:, :, :40] = True
    by_keys = -(-S // 32) >= configs.ATTN_TILE_LISTS_MIN_BLOCKS
    by_queries = -(-L // 32) >= configs.ATTN_TILE_LISTS_MIN_BLOCKS
    flags = {name: ("TILE_LISTS",) for name in
             ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")}

    def run(m):
        out, lse, _ = attention.attention_fwd(q, k, v, D**-0.5, False, m)
        return (out, *attention.attention_bwd(do, q, k, v, out, lse, D**-0.5, False, m)[:3])

    got, used = _recorded(monkeypatch, True, flags, run, mask)
    assert used == (by_keys, by_queries, by_keys)
    float_mask = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, float("-inf"))
    want, used_f = _recorded(monkeypatch, True, flags, run, float_mask)
    assert used_f == (False, False, False)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)
    padding = mask[:, :1, :1, :]
    _, used_p = _recorded(monkeypatch, True, flags, run, padding)
    assert used_p == (False, False, False)  # key padding has its own lists (KEY_PADDING)
