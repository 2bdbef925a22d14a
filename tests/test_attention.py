"""fastattn.scaled_dot_product_attention against float64 references, with torch's own error in the
same dtype as the yardstick (DESIGN.md): plain, with attn_mask (every broadcast shape, bool and
float, with its gradient), and with dropout (checked against the mask it realised). Runs on CUDA,
or under Triton's interpreter on the CPU."""

from __future__ import annotations

import math

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


def torch_sdpa(q, k, v, attn_mask, is_causal, gqa, **kwargs):
    """torch's own op; with a mask, the causal tril is folded into it (torch refuses both at once
    on some backends, fastattn applies both)."""
    if attn_mask is not None and is_causal:
        L, S = q.shape[-2], k.shape[-2]
        tril = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        attn_mask = (attn_mask & tril if attn_mask.dtype == torch.bool
                     else attn_mask.masked_fill(~tril, float("-inf")))
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          enable_gqa=gqa, **kwargs)


def _check_against_reference(q, k, v, do, *, is_causal, gqa, dtype, name, attn_mask=None):
    """out, lse, dq, dk, dv (and the gradient of a float attn_mask that requires grad) of fastattn
    vs float64, with torch's error in `dtype` as yardstick."""
    mask_grad = attn_mask is not None and attn_mask.requires_grad
    leaves = [q, k, v] + ([attn_mask] if mask_grad else [])
    with fastattn.record_backends() as ran:
        out, lse = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                         is_causal=is_causal, enable_gqa=gqa,
                                                         return_lse=True)
        ours = [out, *torch.autograd.grad(out, leaves, do)]
    assert_kernels_ran(ran, ["attention_fwd", "attention_bwd"], str(q.device))

    def copies(dtype=None):
        """Detached CPU copies of q, k, v (and the mask) as leaves, floating ones in `dtype`."""
        out = []
        for t in (q, k, v, *([] if attn_mask is None else [attn_mask])):
            t = t.detach().cpu()
            out.append(t.to(dtype or t.dtype).requires_grad_() if t.is_floating_point() else t)
        return out

    cpu = copies()  # torch's own op, same dtype
    mask = cpu[3] if attn_mask is not None else None
    t_out = torch_sdpa(*cpu[:3], mask, is_causal, gqa)
    theirs = [t_out, *torch.autograd.grad(t_out, cpu[:len(leaves)], do.cpu())]
    t_lse = reference.scaled_dot_product_attention(
        *(t.detach() for t in cpu[:3]), is_causal, None, None if mask is None else mask.detach())[1]

    r = copies(torch.float64)
    r_out, r_lse = reference.scaled_dot_product_attention(*r[:3], is_causal, None,
                                                          r[3] if attn_mask is not None else None)
    ref = [r_out, *torch.autograd.grad(r_out, r[:len(leaves)], do.cpu().double())]

    for label, a, t, want in zip(["out", "dq", "dk", "dv", "dmask"], ours, theirs, ref):
        assert_within_torch_error(f"{name} {label}", a, t.to(a.device), want, dtype)
    assert lse.dtype == torch.float32
    seen = r_lse > float("-inf")  # rows that see no key: lse exactly -inf
    assert torch.equal(lse.cpu() > float("-inf"), seen), f"{name} lse: -inf rows differ"
    assert_within_torch_error(f"{name} lse", lse[seen.to(lse.device)],
                              t_lse.float()[seen].to(lse.device), r_lse[seen], dtype)
    return ours


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


@pytest.mark.parametrize("scale", [0.3, -0.7, -8.0, 0.0])
@pytest.mark.parametrize("is_causal", [False, True])
def test_custom_scale(scale, is_causal, device):
    """Any finite scale, negative and zero too (the forward kernel folds a non-negative scale into
    exp2's argument; the launcher flips a negative one onto q), through the unmasked key blocks
    (S > BLOCK_N) and the masked ones: out and gradients as the float64 reference's. (torch's own
    CPU op returns NaN for a negative scale with is_causal, so it is no yardstick here.)"""
    q, k, v, do = _qkv(1, 2, 2, 70, 70, 32, torch.float32, device, seed=5)
    with fastattn.record_backends() as ran:
        out = fastattn.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal)
        ours = [out, *torch.autograd.grad(out, [q, k, v], do)]
    assert_kernels_ran(ran, ["attention_fwd", "attention_bwd"], device)
    r = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    r_out = reference.scaled_dot_product_attention(*r, is_causal, scale)[0]
    ref = [r_out, *torch.autograd.grad(r_out, r, do.cpu().double())]
    for label, a, want in zip(["out", "dq", "dk", "dv"], ours, ref):
        torch.testing.assert_close(a.cpu(), want.float(), atol=2e-5 * max(1.0, abs(scale)),
                                   rtol=1e-4, msg=lambda m: f"{label}: {m}")  # dq scales with it


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
    assert ran == [("attention_fwd", "torch"), ("attention_bwd", "torch")]
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(expected, [q, k, v], do)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_reference_fallback_with_mask_and_dropout(monkeypatch):
    """The CPU fallback (no interpreter) applies masks with is_causal, gives the mask gradient,
    and draws a dropout mask that its backward reproduces."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, do = _qkv(2, 4, 2, 13, 21, 16, torch.float32, "cpu", seed=17)
    mask = _random_mask((2, 1, 13, 21), "float", torch.float32, "cpu")
    with fastattn.record_backends() as ran:
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True,
                                                    enable_gqa=True)
        grads = torch.autograd.grad(out, [q, k, v, mask], do)
    assert ran == [("attention_fwd", "torch"), ("attention_bwd", "torch")]
    expected = torch_sdpa(q, k, v, mask, True, True)
    for a, b in zip([out, *grads], [expected, *torch.autograd.grad(expected, [q, k, v, mask], do)]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    v = _identity_values(2, 2, 21, torch.float32, "cpu")
    do = torch.randn(2, 4, 13, 21)
    out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.4, enable_gqa=True)
    grads = torch.autograd.grad(out, [q, k, v], do)
    o = reference.scaled_dot_product_attention(q, k, v, False, None, None, out != 0, 0.4)[0]
    for a, b in zip([out, *grads], [o, *torch.autograd.grad(o, [q, k, v], do)]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_custom_ops_pass_opcheck(mask_kind, device):
    """Schemas, fake (meta) implementations and dispatch of the padded ops, with and without a
    mask (a float one with its gradient) and dropout."""
    q, k, v, do = _qkv(1, 2, 1, 5, 7, 16, torch.float32, device)
    q, k, v = (t.detach() for t in (q, k, v))
    mask = None if mask_kind is None else _random_mask((1, 1, 5, 7), mask_kind, torch.float32,
                                                       device, requires_grad=False)
    extra = (mask, 0.0, None) if mask is None else (mask, 0.2, torch.tensor([7], device=device))
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, (q, k, v, 0.25, True, *extra))
    out, lse, _ = torch.ops.fastattn.attention_fwd(q, k, v, 0.25, True, *extra)
    torch.library.opcheck(torch.ops.fastattn.attention_bwd.default,
                          (do, q, k, v, out, lse, 0.25, True, *extra, mask_kind == "float"))


def test_custom_ops_pass_opcheck_with_the_output_residual(device):
    """fp16 with residual=True: the forward's third output (out's rounding residual) and the
    backward that reads it."""
    q, k, v, do = (t.detach() for t in _qkv(1, 2, 1, 5, 7, 16, torch.float16, device))
    args = (q, k, v, 0.25, True, None, 0.0, None, True)
    torch.library.opcheck(torch.ops.fastattn.attention_fwd.default, args)
    out, lse, out_lo = torch.ops.fastattn.attention_fwd(*args)
    assert out_lo.shape == out.shape and out_lo.abs().max() <= out.abs().max() * 2**-10
    torch.library.opcheck(torch.ops.fastattn.attention_bwd.default,
                          (do, q, k, v, out, lse, 0.25, True, None, 0.0, None, False, out_lo))


# ---- attn_mask ----

# Every mask shape torch broadcasts to (B, Hq, L, S) = (2, 4, 37, 45), including one key-padding
# shape, (B, 1, 1, S), that takes the kernels' fast path when boolean.
MASK_SHAPES = [(37, 45), (2, 1, 1, 45), (2, 1, 37, 45), (1, 4, 37, 45), (2, 4, 37, 45)]


def _random_mask(shape, kind, dtype, device, *, seed=0, requires_grad=True):
    """About 30% of the pairs hidden; key 0 always visible, so that every row (causal or not)
    sees a key. bool: True = takes part; float: N(0, 1) biases with -inf on hidden pairs."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.rand(shape, generator=g) < 0.3
    hidden[..., 0] = False
    if kind == "bool":
        return (~hidden).to(device)
    bias = torch.randn(shape, generator=g).masked_fill(hidden, float("-inf"))
    return bias.to(dtype).to(device).requires_grad_(requires_grad)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attn_mask_matches_reference(mask_shape, dtype, kind, is_causal, device, poisoned_empty):
    """Bool and float masks of every broadcast shape, with GQA, alone and with is_causal (both
    apply); a float mask that requires grad gets its gradient, summed over its broadcast dims."""
    q, k, v, do = _qkv(2, 4, 2, 37, 45, 32, dtype, device, seed=len(mask_shape) + 10 * is_causal)
    mask = _random_mask(mask_shape, kind, dtype, device, seed=sum(mask_shape))
    _check_against_reference(q, k, v, do, is_causal=is_causal, gqa=True, dtype=dtype,
                             name=f"mask {mask_shape} {kind} causal={is_causal}", attn_mask=mask)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_bfloat16(kind, device, poisoned_empty):
    """bf16 masks are read as bf16 and widened to fp32 before use (the interpreter's bf16
    arithmetic is wrong otherwise)."""
    q, k, v, do = _qkv(2, 4, 2, 37, 45, 32, torch.bfloat16, device, seed=18)
    mask = _random_mask((2, 1, 37, 45), kind, torch.bfloat16, device, seed=19)
    _check_against_reference(q, k, v, do, is_causal=True, gqa=True, dtype=torch.bfloat16,
                             name=f"bf16 {kind} mask", attn_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bert_key_padding(dtype, device, poisoned_empty):
    """A padded BERT batch: (B, 1, 1, N) boolean key mask from the sequence lengths (whole key
    blocks of padding are skipped by the kernels); padding query rows still attend real keys."""
    B, H, N, D = 3, 2, 100, 64
    lengths = torch.tensor([100, 33, 1])
    key_mask = (torch.arange(N) < lengths[:, None])[:, None, None, :].to(device)  # (B, 1, 1, N)
    q, k, v, do = _qkv(B, H, H, N, N, D, dtype, device, seed=11)
    _check_against_reference(q, k, v, do, is_causal=False, gqa=False, dtype=dtype,
                             name="BERT padding", attn_mask=key_mask)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zero(kind, device, poisoned_empty):
    """Rows that see no key get output 0, lse -inf and zero gradients, never NaN (also for rows
    emptied by the mask and is_causal together)."""
    B, Hq, Hkv, L, S, D = 2, 4, 2, 40, 50, 16
    mask = _random_mask((B, 1, L, S), kind, torch.float32, device, seed=12)
    empty_rows = [(0, 0), (0, 7), (0, 39), (1, 5)]
    for b, i in empty_rows:
        mask.data[b, 0, i] = False if kind == "bool" else float("-inf")
    # Causal row 2 sees keys 0..2 at most: hiding just those empties it.
    mask.data[1, 0, 2, :3] = False if kind == "bool" else float("-inf")
    empty_rows.append((1, 2))
    q, k, v, do = _qkv(B, Hq, Hkv, L, S, D, torch.float32, device, seed=13)
    out, dq, *_ = _check_against_reference(q, k, v, do, is_causal=True, gqa=True,
                                           dtype=torch.float32, name=f"empty rows {kind}",
                                           attn_mask=mask)
    for b, i in empty_rows:
        assert not out[b, :, i].any() and not dq[b, :, i].any(), f"row {i} of batch {b} is not 0"


def test_mask_is_read_in_place(device, monkeypatch):
    """A broadcast mask reaches the kernel as a view of the caller's tensor: never expanded or
    copied to (B, Hq, L, S)."""
    q, k, v, do = _qkv(2, 4, 2, 19, 23, 16, torch.float32, device, seed=14)
    mask = _random_mask((19, 23), "float", torch.float32, device, requires_grad=False)
    kernels = fastattn._dispatch.kernels("attention")
    seen = []
    original = kernels.attention_fwd

    def spy(q_, k_, v_, scale, is_causal, attn_mask, *args):
        seen.append((attn_mask.data_ptr(), attn_mask.shape, attn_mask.stride()))
        return original(q_, k_, v_, scale, is_causal, attn_mask, *args)

    monkeypatch.setattr(kernels, "attention_fwd", spy)
    fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    # the caller's (19, 23) storage, viewed as (B, 1, L, S) with stride 0 on the batch
    assert seen == [(mask.data_ptr(), (2, 1, 19, 23), (0, 19 * 23, 23, 1))]


# ---- dropout ----


def _identity_values(B, Hkv, S, dtype, device):
    """v = I (S x S) per (batch, kv head): attention's output is then the dropped, rescaled
    probability matrix itself, which shows the mask the kernel drew."""
    return torch.eye(S, dtype=dtype).expand(B, Hkv, S, S).contiguous().to(device).requires_grad_()


def test_dropout_is_reproducible_with_the_right_rate(device):
    """torch.manual_seed reproduces the mask, the next draw differs; a fraction p of the
    probabilities is dropped, the rest scaled by 1 / (1 - p); p = 0 is the plain kernel, p = 1
    drops everything."""
    B, Hq, Hkv, L, S, p = 2, 4, 2, 64, 48, 0.25
    q, k, _, _ = _qkv(B, Hq, Hkv, L, S, 32, torch.float32, device, seed=15)
    v = _identity_values(B, Hkv, S, torch.float32, device)

    def attend(dropout_p):
        with torch.no_grad():
            return fastattn.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                         enable_gqa=True)

    torch.manual_seed(0)
    with fastattn.record_backends() as ran:
        first = attend(p)
    assert_kernels_ran(ran, ["attention_fwd"], device)
    torch.manual_seed(0)
    assert torch.equal(attend(p), first)
    assert not torch.equal(attend(p), first)

    probs = reference.scaled_dot_product_attention(q.detach().double(), k.detach().double(),
                                                   v.detach().double())[0]  # (B, Hq, L, S)
    kept = first != 0
    n = kept.numel()
    dropped = 1 - kept.sum().item() / n
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5, f"dropped {dropped:.4f}, expected {p}"
    torch.testing.assert_close(first[kept].double(), probs[kept] / (1 - p), rtol=1e-5, atol=1e-7)
    assert torch.equal(attend(0.0), fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    assert not attend(1.0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dropout_gradients_are_those_of_the_realised_mask(dtype, device, poisoned_empty):
    """With v = I the output shows the kept pairs; out and every gradient then match the float64
    math with exactly that keep-mask (the backward redraws the forward's mask), together with a
    key padding mask, is_causal and GQA."""
    B, Hq, Hkv, L, S, p = 2, 4, 2, 37, 48, 0.3
    q, k, _, do = _qkv(B, Hq, Hkv, L, S, 32, dtype, device, Dv=S, seed=16)
    v = _identity_values(B, Hkv, S, dtype, device)
    key_mask = (torch.arange(S) < torch.tensor([48, 30])[:, None])[:, None, None, :].to(device)
    torch.manual_seed(1)
    with fastattn.record_backends() as ran:
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p,
                                                    is_causal=True, enable_gqa=True)
        ours = [out, *torch.autograd.grad(out, [q, k, v], do)]
    assert_kernels_ran(ran, ["attention_fwd", "attention_bwd"], device)
    keep = (out != 0).cpu()  # hidden pairs read as dropped: their probability is 0 either way

    def realised(dt):
        leaves = [t.detach().cpu().to(dt).requires_grad_() for t in (q, k, v)]
        o = reference.scaled_dot_product_attention(*leaves, True, None, key_mask.cpu(), keep, p)[0]
        return [o, *torch.autograd.grad(o, leaves, do.cpu().to(dt))]

    for label, a, t, r in zip(["out", "dq", "dk", "dv"], ours, realised(dtype),
                              realised(torch.float64)):
        assert_within_torch_error(f"dropout {label}", a, t.to(a.device), r, dtype)


# ---- bad input: a clear error naming the argument, never a crash in Triton ----


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype).to(device)


def _qkv_t(device):
    return tuple(_t(1, 2, 4, 16, device=device) for _ in range(3))


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
    (lambda d: (_t(16, device=d), _t(16, device=d), _t(16, device=d)),
     ValueError, "at least 2 dims"),
    (lambda d: (_t(2, 2, 4, 16, device=d), _t(3, 2, 4, 16, device=d), _t(3, 2, 4, 16, device=d)),
     ValueError, r"must broadcast together, got query \[2, 2\], key \[3, 2\]"),
    (lambda d: (*_qkv_t(d), {"attn_mask": torch.ones(3, 4, dtype=torch.bool, device=d)}),
     ValueError, r"attn_mask of shape \[3, 4\] does not broadcast"),
    (lambda d: (*_qkv_t(d), {"attn_mask": torch.ones(2, 1, 2, 4, 4, dtype=torch.bool, device=d)}),
     ValueError, "does not broadcast"),
    (lambda d: (*_qkv_t(d), {"attn_mask": torch.ones(4, 4, dtype=torch.int64, device=d)}),
     TypeError, "attn_mask has dtype int64; it must be bool"),
    (lambda d: (*_qkv_t(d), {"attn_mask": torch.zeros(4, 4, dtype=torch.float16, device=d)}),
     TypeError, "attn_mask has dtype float16"),
    (lambda d: (*_qkv_t(d), {"attn_mask": torch.ones(4, 4, dtype=torch.bool, device="meta")}),
     ValueError, "one device"),
    (lambda d: (*_qkv_t(d), {"dropout_p": 1.5}), ValueError, r"dropout_p must be in \[0, 1\]"),
    (lambda d: (*_qkv_t(d), {"dropout_p": -0.1}), ValueError, r"dropout_p must be in \[0, 1\]"),
])
def test_bad_input_raises_clear_error(make, error, match, device):
    args = make(device)
    kwargs = args[3] if len(args) == 4 else {}
    with pytest.raises(error, match=match):
        fastattn.scaled_dot_product_attention(*args[:3], **kwargs)


@pytest.mark.parametrize("seed", [None, 7, "int32", "two values"])
def test_kernel_launch_with_dropout_needs_a_device_seed_tensor(seed, device):
    """The launchers refuse dropout without a (1,) int64 seed tensor on the inputs' device, rather
    than read a seed from whatever memory the pointer argument names."""
    q, k, v = _qkv_t(device)
    seed = {"int32": torch.tensor([7], dtype=torch.int32, device=device),
            "two values": torch.tensor([7, 8], device=device)}.get(seed, seed)
    from fastattn.kernels import attention as kernels

    with pytest.raises(ValueError, match=r"dropout_p=0.2 needs seed: a \(1,\) int64 tensor"):
        kernels.attention_fwd(q, k, v, 0.25, False, None, 0.2, seed)


# ---- batch dims that broadcast (as torch's function) ----

# (query, key, value, attn_mask or None, enable_gqa, is_causal): the leading dims broadcast.
BROADCAST = {
    "2d": ((3, 8), (6, 8), (6, 8), None, False, True),
    "q-3d-kv-4d": ((4, 3, 8), (2, 4, 6, 8), (2, 4, 6, 8), None, False, False),
    "q-1-head": ((2, 1, 5, 16), (2, 4, 7, 16), (2, 4, 7, 16), None, False, True),
    "kv-1-head": ((2, 4, 5, 16), (2, 1, 7, 16), (2, 1, 7, 16), (5, 7), False, False),
    "kv-batch-1": ((3, 2, 5, 16), (1, 2, 7, 16), (3, 2, 7, 24), None, False, False),
    "gqa-q-no-batch": ((4, 5, 16), (3, 2, 7, 16), (3, 2, 7, 16), (3, 1, 1, 7), True, False),
    "5d-crossed": ((2, 1, 2, 5, 16), (1, 3, 2, 7, 16), (1, 3, 2, 7, 16), (2, 1, 1, 5, 7), False,
                   False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(BROADCAST))
def test_batch_dims_broadcast_as_torch(case, dtype, device, monkeypatch):
    """q, k, v (and a float mask) whose leading dims broadcast: torch's output shape, values and
    gradients (summed over the broadcast dims) within the rule, from the kernels; the launcher is
    handed views of the caller's tensors (stride 0 on broadcast dims), never copies."""
    q_shape, k_shape, v_shape, mask_shape, gqa, is_causal = BROADCAST[case]
    g = torch.Generator().manual_seed(len(case))
    tensors = [torch.randn(s, generator=g) for s in (q_shape, k_shape, v_shape)]
    if mask_shape is not None:
        tensors.append(torch.randn(mask_shape, generator=g))

    def run(fn, dtype, cotangent=None):
        leaves = [t.to(dtype).to(device).requires_grad_() for t in tensors]
        q, k, v, *mask = leaves
        kwargs = dict(attn_mask=mask[0] if mask else None, is_causal=is_causal, enable_gqa=gqa)
        out = fn(q, k, v, **kwargs)
        if cotangent is None:
            return out, leaves
        return [out, *torch.autograd.grad(out, leaves, cotangent.to(dtype).to(device))], leaves

    ref_out, _ = run(F.scaled_dot_product_attention, torch.float64)
    do = torch.randn(ref_out.shape, generator=g)
    ref, _ = run(F.scaled_dot_product_attention, torch.float64, do)
    theirs, _ = run(F.scaled_dot_product_attention, dtype, do)

    kernels = fastattn._dispatch.kernels("attention")
    handed = []
    original = kernels.attention_fwd

    def spy(q_, k_, v_, *args):
        handed.append((q_.untyped_storage().data_ptr(), q_.stride()))
        return original(q_, k_, v_, *args)

    monkeypatch.setattr(kernels, "attention_fwd", spy)
    with fastattn.record_backends() as ran:
        ours, leaves = run(fastattn.scaled_dot_product_attention, dtype, do)
    assert_kernels_ran(ran, ["attention_fwd", "attention_bwd"], device)
    for label, a, t, r in zip(["out", "dq", "dk", "dv", "dmask"], ours, theirs, ref):
        assert_within_torch_error(f"{case} {label}", a, t, r, dtype)
    assert handed and all(ptr == leaves[0].untyped_storage().data_ptr() for ptr, _ in handed)
    if math.prod(q_shape[:-2]) < math.prod(ref_out.shape[:-2]):  # q is broadcast: a stride-0 view
        assert all(0 in strides for _, strides in handed), handed
