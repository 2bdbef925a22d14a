"""Kernel-level tests of kernels/attention.py: the launchers attention_fwd / attention_bwd called
directly, for what the public-API tests in test_attention.py cannot see: strided inputs computed
bitwise like contiguous ones, fp16 scores far beyond exp's range, the GPU tables' tile shapes (also
those for calls with a mask or dropout), the key-padding fast path never reading padded key blocks,
and empty problems that must launch nothing. Same pass rule (fastattn.testing); lse within a small
absolute bound.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE
from fastattn import reference
from fastattn.kernels import attention, configs
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
    dq, dk, dv, dmask = attention.attention_bwd(do, q, k, v, out, lse, scale, is_causal, attn_mask,
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


def use_gpu_tiles(arch_major, head_dim, dtype, extras, monkeypatch):
    """Make the launchers use the tiles configs.py picks on a GPU of compute capability
    arch_major.x (for calls with a mask or dropout if extras); skip on a smaller real GPU."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < arch_major:
        pytest.skip(f"tiles for compute capability {arch_major}.x need more shared memory than "
                    "this GPU has")
    with monkeypatch.context() as m:  # ask configs.py what it would pick on that GPU
        m.setattr(configs, "interpreting", lambda: False)
        m.setattr(configs, "arch_major", lambda device: arch_major)
        fwd_cfg = configs.attention_fwd_config(head_dim, dtype, torch.device("cuda"), extras)
        bwd_cfg = configs.attention_bwd_config(head_dim, dtype, torch.device("cuda"), extras)
    monkeypatch.setattr(attention, "attention_fwd_config", lambda *args: fwd_cfg)
    monkeypatch.setattr(attention, "attention_bwd_config", lambda *args: bwd_cfg)


@pytest.mark.parametrize("arch_major,head_dim,dtype", GPU_TABLE_ROWS,
                         ids=lambda x: {9: "hopper", 8: "ampere"}.get(x, str(x)).replace("torch.", ""))
def test_gpu_tile_shapes(arch_major, head_dim, dtype, monkeypatch):
    """The block sizes the GPU tables pick (e.g. forward 128 x 64, dK/dV 32 x 128) give right results
    too: the interpreter's own tiles are only one such choice. Warps and stages do not matter here."""
    use_gpu_tiles(arch_major, head_dim, dtype, False, monkeypatch)
    torch.manual_seed(7)
    # Sizes no multiple of any tile, above the largest (128), L > S so some causal rows see every key.
    check_against_reference(1, 2, 1, 150, 133, head_dim, head_dim, True, dtype)


# GPU table rows where calls with a mask or dropout take other tiles (configs.py's *_EXTRAS tables).
GPU_EXTRAS_ROWS = [(9, 64), (9, 128), (8, 128)]


@pytest.mark.parametrize("arch_major,head_dim", GPU_EXTRAS_ROWS,
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
    mask spelled (B, 1, L, S) takes the general path, which reads every block: NaN."""
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
    dq, dk, dv, _ = attention.attention_bwd(do, q, k_nan, v_nan, out, lse, D**-0.5, False, key_mask)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not t.isnan().any(), f"{name}: a fully padded key block was read"
    assert not dk[whole_blocks.expand_as(dk)].any() and not dv[whole_blocks.expand_as(dv)].any()

    want, _, _ = attention.attention_fwd(q, k, v, D**-0.5, False, key_mask)  # finite padding values
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    general_mask = key_mask.expand(B, 1, L, S)
    general, _, _ = attention.attention_fwd(q, k_nan, v_nan, D**-0.5, False, general_mask)
    assert general.isnan().any(), "the general mask path should have read the NaN blocks"


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
    dq, dk, dv, _ = attention.attention_bwd(do, q, k, v, out, lse, 0.2, is_causal)
    assert dq.shape == (2, 4, 0, 32)
    assert dk.shape == (2, 2, 5, 32) and dv.shape == (2, 2, 5, 24)
    assert not dk.any() and not dv.any()
