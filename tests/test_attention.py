"""fastattn.scaled_dot_product_attention against float64 references, with torch's own error in the
same dtype as the yardstick (DESIGN.md). Runs on CUDA, or under Triton's interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from helpers import assert_kernels_ran, assert_within_torch_error

# (B, Hq, Hkv, L, S, D): odd lengths, L != S both ways, head dims that are not powers of two, GQA.
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 3, 3, 17, 17, 64),
    (1, 2, 2, 100, 37, 40),
    (2, 2, 2, 33, 130, 80),
    (1, 1, 1, 257, 257, 128),
    (2, 4, 2, 33, 33, 64),
]


def _qkv(B, Hq, Hkv, L, S, D, dtype, device, *, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, Dv or D, generator=g)
    do = torch.randn(B, Hq, L, Dv or D, generator=g)
    q, k, v = (t.to(dtype).to(device).requires_grad_() for t in (q, k, v))
    return q, k, v, do.to(dtype).to(device)


def _check_against_reference(q, k, v, do, *, is_causal, gqa, dtype, name):
    """out, lse, dq, dk, dv of fastattn vs float64, with torch's error in `dtype` as yardstick."""
    with fastattn.record_backends() as ran:
        out, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                         enable_gqa=gqa, return_lse=True)
        ours = [out, *torch.autograd.grad(out, [q, k, v], do)]
    assert_kernels_ran(ran, ["attention_fwd", "attention_bwd"], str(q.device))

    cpu = [t.detach().cpu().requires_grad_() for t in (q, k, v)]  # torch's own op, same dtype
    t_out = F.scaled_dot_product_attention(*cpu, is_causal=is_causal, enable_gqa=gqa)
    theirs = [t_out, *torch.autograd.grad(t_out, cpu, do.cpu())]
    t_lse = reference.scaled_dot_product_attention(*(t.detach() for t in cpu), is_causal)[1]

    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    r_out, r_lse = reference.scaled_dot_product_attention(q64, k64, v64, is_causal)
    ref = [r_out, *torch.autograd.grad(r_out, [q64, k64, v64], do.cpu().double())]

    for label, a, t, r in zip(["out", "dq", "dk", "dv"], ours, theirs, ref):
        assert_within_torch_error(f"{name} {label}", a, t.to(a.device), r, dtype)
    assert lse.dtype == torch.float32
    assert_within_torch_error(f"{name} lse", lse, t_lse.float().to(lse.device), r_lse, dtype)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_reference(shape, dtype, is_causal, device, poisoned_empty):
    B, Hq, Hkv, L, S, D = shape
    q, k, v, do = _qkv(*shape, dtype, device, seed=sum(shape))
    _check_against_reference(q, k, v, do, is_causal=is_causal, gqa=Hq != Hkv, dtype=dtype,
                             name=f"{shape} {dtype} causal={is_causal}")


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 3, 17, 17, 64), (2, 4, 2, 33, 47, 80)],
                         ids=lambda s: "x".join(map(str, s)))
def test_attention_bfloat16(shape, is_causal, device, poisoned_empty):
    q, k, v, do = _qkv(*shape, torch.bfloat16, device, seed=1)
    _check_against_reference(q, k, v, do, is_causal=is_causal, gqa=shape[1] != shape[2],
                             dtype=torch.bfloat16, name=f"{shape} bf16 causal={is_causal}")


@pytest.mark.parametrize("is_causal", [False, True])
def test_value_head_dim_differs_from_query(is_causal, device, poisoned_empty):
    q, k, v, do = _qkv(2, 2, 2, 29, 41, 64, torch.float16, device, Dv=32, seed=2)
    _check_against_reference(q, k, v, do, is_causal=is_causal, gqa=False, dtype=torch.float16,
                             name="E=64 Ev=32")


def test_strided_hugging_face_layout_is_read_in_place(device, monkeypatch):
    """(B, N, H, D).transpose(1, 2) views reach the kernel as they are: no contiguous copies."""
    B, N, H, D = 2, 37, 3, 40
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(device)  # one fused projection, as GPT-2's
    q, k, v = (qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))  # (B, H, N, D)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    assert not q.is_contiguous()
    do = torch.randn(B, N, H, D, generator=g).to(device).transpose(1, 2)

    kernels = fastattn._dispatch.kernels("attention")
    seen = []
    original = kernels.attention_fwd

    def spy(q_, k_, v_, *args):
        seen.append((q_.data_ptr(), q_.stride()))
        return original(q_, k_, v_, *args)

    monkeypatch.setattr(kernels, "attention_fwd", spy)
    _check_against_reference(q, k, v, do, is_causal=True, gqa=False, dtype=torch.float32,
                             name="strided")
    assert seen[0] == (q.data_ptr(), q.stride())


def test_leading_batch_dims_and_3d_inputs(device):
    g = torch.Generator().manual_seed(4)
    q5 = torch.randn(2, 3, 2, 9, 16, generator=g).to(device)  # (B1, B2, H, L, D)
    k5, v5 = torch.randn(2, 2, 3, 2, 11, 16, generator=g).to(device).unbind(0)
    out = fastattn.scaled_dot_product_attention(q5, k5, v5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q5, k5, v5), atol=1e-5,
                               rtol=1e-5)
    q3, k3, v3 = q5[0, 0], k5[0, 0], v5[0, 0]  # (H, L, D)
    torch.testing.assert_close(fastattn.scaled_dot_product_attention(q3, k3, v3, is_causal=True),
                               F.scaled_dot_product_attention(q3, k3, v3, is_causal=True),
                               atol=1e-5, rtol=1e-5)


def test_custom_scale(device):
    q, k, v, do = _qkv(1, 2, 2, 19, 23, 32, torch.float32, device, seed=5)
    out = fastattn.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3),
                               atol=1e-5, rtol=1e-5)


def test_empty_query_length(device):
    q, k, v, do = _qkv(2, 2, 2, 0, 5, 16, torch.float16, device)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True)
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], do)
    assert dq.shape == q.shape and torch.equal(dk, torch.zeros_like(k))
    assert torch.equal(dv, torch.zeros_like(v))


def test_empty_key_length_gives_zero_output(device):
    """No key to attend to: output 0 and lse -inf (torch returns NaN here), gradients 0."""
    q, k, v, do = _qkv(1, 2, 2, 7, 0, 16, torch.float32, device)
    out, lse = fastattn.scaled_dot_product_attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))
    dq, = torch.autograd.grad(out, [q], do)
    assert torch.equal(dq, torch.zeros_like(q))


def test_backward_is_bitwise_deterministic(device):
    q, k, v, do = _qkv(1, 4, 2, 70, 70, 32, torch.float16, device, seed=6)

    def grads():
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(out, [q, k, v], do)

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_reference_fallback_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, do = _qkv(1, 4, 2, 13, 21, 16, torch.float32, "cpu", seed=7)
    with fastattn.record_backends() as ran:
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        grads = torch.autograd.grad(out, [q, k, v], do)
    assert ran == [("attention_fwd", "reference"), ("attention_bwd", "reference")]
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(expected, [q, k, v], do)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_custom_ops_pass_opcheck(device):
    q, k, v, do = _qkv(1, 2, 1, 5, 7, 16, torch.float32, device)
    q, k, v = (t.detach() for t in (q, k, v))
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, (q, k, v, 0.25, True))
    out, lse = torch.ops.fastattn.attention_fwd(q, k, v, 0.25, True)
    torch.library.opcheck(torch.ops.fastattn.attention_bwd.default,
                          (do, q, k, v, out, lse, 0.25, True))


# ---- bad input: a clear error naming the argument, never a crash in Triton ----


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype).to(device)


@pytest.mark.parametrize("make,error,match", [
    (lambda d: (_t(1, 2, 4, 300, device=d), _t(1, 2, 4, 300, device=d), _t(1, 2, 4, 300, device=d)),
     ValueError, "head dim 300 is not supported"),
    (lambda d: (_t(1, 2, 4, 16, device=d), _t(1, 2, 4, 16, device=d), _t(1, 2, 4, 257, device=d)),
     ValueError, "value head dim 257"),
    (lambda d: (_t(1, 4, 4, 16, device=d), _t(1, 2, 4, 16, device=d), _t(1, 2, 4, 16, device=d)),
     ValueError, "enable_gqa=True"),
    (lambda d: (_t(1, 4, 4, 16, device=d), _t(1, 3, 4, 16, device=d), _t(1, 3, 4, 16, device=d),
                {"enable_gqa": True}), ValueError, "multiple"),
    (lambda d: (_t(1, 2, 4, 16, device=d), _t(1, 2, 4, 16, dtype=torch.float16, device=d),
                _t(1, 2, 4, 16, device=d)), TypeError, "one dtype"),
    (lambda d: (_t(1, 2, 4, 16, device=d), _t(1, 2, 4, 32, device=d), _t(1, 2, 4, 16, device=d)),
     ValueError, "key head dim 32"),
    (lambda d: (_t(1, 2, 4, 16, device=d), _t(1, 2, 5, 16, device=d), _t(1, 2, 6, 16, device=d)),
     ValueError, "same sequence length"),
    (lambda d: (_t(1, 2, 4, 16, device=d), _t(1, 2, 5, 16, device="meta"),
                _t(1, 2, 5, 16, device=d)), ValueError, "one device"),
    (lambda d: (_t(1, 2, 4, 16, device=d).long(), _t(1, 2, 4, 16, device=d),
                _t(1, 2, 4, 16, device=d)), TypeError, "query has dtype int64"),
    (lambda d: (_t(4, 16, device=d), _t(4, 16, device=d), _t(4, 16, device=d)),
     ValueError, "at least 3 dims"),
    (lambda d: (_t(2, 2, 4, 16, device=d), _t(1, 2, 4, 16, device=d), _t(1, 2, 4, 16, device=d)),
     ValueError, "batch dims"),
    (lambda d: (_t(1, 2, 4, 16, device=d), _t(1, 2, 4, 16, device=d), _t(1, 2, 4, 16, device=d),
                {"attn_mask": torch.ones(4, 4, dtype=torch.bool)}), NotImplementedError,
     "attn_mask"),
    (lambda d: (_t(1, 2, 4, 16, device=d), _t(1, 2, 4, 16, device=d), _t(1, 2, 4, 16, device=d),
                {"dropout_p": 0.1}), NotImplementedError, "dropout_p"),
])
def test_bad_input_raises_clear_error(make, error, match, device):
    args = make(device)
    kwargs = args[3] if len(args) == 4 else {}
    with pytest.raises(error, match=match):
        fastattn.scaled_dot_product_attention(*args[:3], **kwargs)
