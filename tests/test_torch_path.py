"""The "torch" backend (fastattn.torch_path: torch's own fused CPU ops, used for CPU tensors without
TRITON_INTERPRET) against float64 references, with torch's own error in the same dtype as the
yardstick (DESIGN.md): every launcher, forward and every gradient, fp32 / fp16 / bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from helpers import assert_within_torch_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """CPU tensors take the torch path while TRITON_INTERPRET is off (conftest sets it on)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fastattn.backend(torch.zeros(1)) == "torch"


def _assert_torch_ran(log, ops):
    assert {op for op, _ in log} == set(ops), log
    assert all(path == "torch" for _, path in log), log


def _leaves(tensors, dtype=None):
    """Detached copies as leaves (floating ones in dtype, default their own)."""
    return [t.detach().to(dtype or t.dtype).requires_grad_() if t.is_floating_point() else t
            for t in tensors]


# ---- attention ----


def _qkv(B, Hq, Hkv, L, S, E, dtype, *, Ev=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, Hq, L, E, generator=g), torch.randn(B, Hkv, S, E, generator=g)
    v, do = torch.randn(B, Hkv, S, Ev or E, generator=g), torch.randn(B, Hq, L, Ev or E, generator=g)
    return (*(t.to(dtype).requires_grad_() for t in (q, k, v)), do.to(dtype))


def _mask(shape, kind, dtype, *, seed=0, hidden_rows=()):
    """About 30% of the pairs hidden, key 0 visible (so every row sees a key) except in the rows
    `hidden_rows` ((index into the mask's dims but the last), fully hidden). bool: True = takes
    part; float: N(0, 1) biases, -inf where hidden, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.rand(shape, generator=g) < 0.3
    hidden[..., 0] = False
    for row in hidden_rows:
        hidden[row] = True
    if kind == "bool":
        return ~hidden
    bias = torch.randn(shape, generator=g).masked_fill(hidden, NEG_INF)
    return bias.to(dtype).requires_grad_()


def _torch_sdpa(q, k, v, mask, is_causal):
    """torch's own op, the causal tril folded into a mask (torch refuses both at once)."""
    if mask is not None and is_causal:
        tril = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        mask = mask & tril if mask.dtype == torch.bool else mask.masked_fill(~tril, NEG_INF)
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _check_attention(name, q, k, v, do, dtype, *, is_causal=False, mask=None):
    """out, lse, dq, dk, dv (and d(mask) for a float mask) of fastattn vs float64, by the rule."""
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    n_grads = 4 if mask is not None and mask.requires_grad else 3
    with fastattn.record_backends() as ran:
        out, lse = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                         is_causal=is_causal, enable_gqa=True,
                                                         return_lse=True)
        ours = [out, *torch.autograd.grad(out, inputs[:n_grads], do)]
    _assert_torch_ran(ran, ["attention_fwd", "attention_bwd"])
    t = _leaves(inputs)
    t_out = _torch_sdpa(*t[:3], t[3] if mask is not None else None, is_causal)
    theirs = [t_out, *torch.autograd.grad(t_out, t[:n_grads], do)]
    r = _leaves(inputs, torch.float64)
    r_out, r_lse = reference.scaled_dot_product_attention(
        *r[:3], is_causal, None, r[3] if mask is not None else None)
    ref = [r_out, *torch.autograd.grad(r_out, r[:n_grads], do.double())]
    for label, a, b, c in zip(["out", "dq", "dk", "dv", "dmask"], ours, theirs, ref):
        assert_within_torch_error(f"{name} {label}", a, b, c, dtype)
    assert lse.dtype == torch.float32 and lse.shape == r_lse.shape
    seen = r_lse > NEG_INF
    assert torch.equal(lse > NEG_INF, seen), f"{name} lse: the -inf rows differ"
    t_lse = reference.scaled_dot_product_attention(
        *(x.detach() for x in t[:3]), is_causal, None, t[3].detach() if mask is not None else None)[1]
    assert_within_torch_error(f"{name} lse", lse[seen], t_lse.float()[seen], r_lse[seen], dtype)
    return ours, lse


# (B, Hq, Hkv, L, S, E, Ev): sizes 1, 3, 97; L != S both ways; GQA; Ev != E both ways; E 256.
ATTENTION_SHAPES = [(1, 1, 1, 1, 1, 16, 16), (2, 3, 3, 97, 3, 8, 8), (1, 4, 2, 3, 97, 32, 32),
                    (2, 6, 2, 37, 45, 40, 24), (1, 2, 1, 19, 23, 16, 48), (1, 2, 2, 9, 7, 256, 256)]


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention(shape, dtype, is_causal):
    B, Hq, Hkv, L, S, E, Ev = shape
    q, k, v, do = _qkv(B, Hq, Hkv, L, S, E, dtype, Ev=Ev, seed=sum(shape))
    _check_attention(f"{shape} {dtype} causal={is_causal}", q, k, v, do, dtype,
                     is_causal=is_causal)


def test_attention_strided_inputs():
    """Hugging Face's (B, N, H, D).transpose(1, 2) views, read as they are."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 37, 3, 3, 40, generator=g)  # (B, N, 3, H, D): one fused projection
    q, k, v = (qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))
    do = torch.randn(2, 37, 3, 40, generator=g).transpose(1, 2)
    _check_attention("strided", q, k, v, do, torch.float32, is_causal=True)


# every broadcast shape of a (B, Hq, L, S) = (2, 4, 37, 45) mask, key padding (B, 1, 1, S) among them
MASK_SHAPES = [(37, 45), (2, 1, 1, 45), (2, 1, 37, 45), (1, 4, 37, 45), (2, 4, 37, 45),
               (2, 4, 37, 1)]


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_masks(mask_shape, kind, is_causal):
    """Bool and float masks (a float one gets its gradient, summed to its shape), with GQA,
    alone and with is_causal."""
    q, k, v, do = _qkv(2, 4, 2, 37, 45, 32, torch.float32, seed=len(mask_shape))
    mask = _mask(mask_shape, kind, torch.float32, seed=sum(mask_shape))
    if mask_shape[-1] == 1 and kind == "float":
        mask = mask.detach().clamp(min=-3.0).requires_grad_()  # a single key column: no -inf
    _check_attention(f"mask {mask_shape} {kind} causal={is_causal}", q, k, v, do, torch.float32,
                     is_causal=is_causal, mask=mask)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_masks_half(dtype, kind):
    q, k, v, do = _qkv(2, 4, 2, 37, 45, 32, dtype, Ev=24, seed=5)
    _check_attention(f"{dtype} {kind} mask", q, k, v, do, dtype, is_causal=True,
                     mask=_mask((2, 1, 37, 45), kind, dtype, seed=6))


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_give_zero(dtype, kind):
    """Rows that see no key (by the mask, or the mask and is_causal together): out 0, lse -inf,
    zero gradients, never NaN."""
    q, k, v, do = _qkv(2, 4, 2, 40, 50, 16, dtype, seed=13)
    mask = _mask((2, 1, 40, 50), kind, dtype, seed=12,
                 hidden_rows=[(0, 0, 0), (0, 0, 39), (1, 0, 5), (1, 0, 2, slice(0, 3))])
    (out, dq, *grads), lse = _check_attention(f"empty rows {kind}", q, k, v, do, dtype,
                                              is_causal=True, mask=mask)
    for b, i in [(0, 0), (0, 39), (1, 5), (1, 2)]:
        assert not out[b, :, i].any() and not dq[b, :, i].any(), f"row {i} of batch {b}"
        assert (lse[b, :, i] == NEG_INF).all()
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_attention_negative_scale(is_causal):
    """A negative scale (torch's fused CPU op gives NaN for one with is_causal): out and every
    gradient as the float64 reference's."""
    q, k, v, do = _qkv(2, 4, 2, 33, 33, 16, torch.float32, seed=3)
    with fastattn.record_backends() as ran:
        out = fastattn.scaled_dot_product_attention(q, k, v, scale=-0.6, is_causal=is_causal,
                                                    enable_gqa=True)
        ours = [out, *torch.autograd.grad(out, [q, k, v], do)]
    _assert_torch_ran(ran, ["attention_fwd", "attention_bwd"])
    r = _leaves([q, k, v], torch.float64)
    r_out = reference.scaled_dot_product_attention(*r, is_causal, -0.6)[0]
    ref = [r_out, *torch.autograd.grad(r_out, r, do.double())]
    for a, want in zip(ours, ref):
        torch.testing.assert_close(a, want.float(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("L,S", [(0, 5), (7, 0)])
def test_attention_empty_lengths(L, S):
    q, k, v, do = _qkv(2, 2, 1, L, S, 16, torch.float16, seed=1)
    with fastattn.record_backends() as ran:
        out, lse = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True,
                                                         return_lse=True)
        grads = torch.autograd.grad(out, [q, k, v], do)
    _assert_torch_ran(ran, ["attention_fwd", "attention_bwd"])
    assert out.shape == (2, 2, L, 16) and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, torch.full((2, 2, L), NEG_INF))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def _seeded_keep(torch_seed, shape, p):
    """The keep-mask fastattn draws after torch.manual_seed(torch_seed): from the seed that
    _validate.dropout_seed draws, through reference.dropout_keep."""
    torch.manual_seed(torch_seed)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    return reference.dropout_keep(seed, shape, p, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_dropout(dtype):
    """With v = I (Ev = S != E) an output row is its dropped, rescaled probabilities: the kept
    pairs are exactly those of the mask drawn from the seed, and out and every gradient match the
    float64 math with that mask (the backward redraws the forward's)."""
    B, Hq, Hkv, L, S, E, p = 2, 4, 2, 19, 23, 16, 0.3
    q, k, _, do = _qkv(B, Hq, Hkv, L, S, E, dtype, Ev=S, seed=7)
    v = torch.eye(S).expand(B, Hkv, S, S).to(dtype).requires_grad_()
    keep = _seeded_keep(4, (B, Hq, L, S), p)
    visible = torch.ones(L, S, dtype=torch.bool).tril()
    torch.manual_seed(4)
    with fastattn.record_backends() as ran:
        out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                    enable_gqa=True)
        ours = [out, *torch.autograd.grad(out, [q, k, v], do)]
    _assert_torch_ran(ran, ["attention_fwd", "attention_bwd"])
    assert torch.equal(out != 0, keep & visible), "the kept pairs are the seed's"
    t = _leaves([q, k, v])
    t_out = reference.scaled_dot_product_attention(*t, True, None, None, keep, p)[0]
    theirs = [t_out, *torch.autograd.grad(t_out, t, do)]
    r = _leaves([q, k, v], torch.float64)
    r_out = reference.scaled_dot_product_attention(*r, True, None, None, keep, p)[0]
    ref = [r_out, *torch.autograd.grad(r_out, r, do.double())]
    for label, a, b, c in zip(["out", "dq", "dk", "dv"], ours, theirs, ref):
        assert_within_torch_error(f"dropout {label}", a, b, c, dtype)


def test_attention_dropout_with_a_float_mask_gradient():
    """Dropout and a float mask that requires grad together (the composed path)."""
    q, k, v, do = _qkv(2, 2, 2, 13, 21, 16, torch.float32, seed=9)
    mask = _mask((2, 1, 1, 21), "float", torch.float32, seed=9)
    keep = _seeded_keep(5, (2, 2, 13, 21), 0.2)
    torch.manual_seed(5)
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.2)
    ours = torch.autograd.grad(out, [q, k, v, mask], do)
    r = _leaves([q, k, v, mask], torch.float64)
    r_out = reference.scaled_dot_product_attention(*r[:3], False, None, r[3], keep, 0.2)[0]
    torch.testing.assert_close(out.double(), r_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, torch.autograd.grad(r_out, r, do.double())):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


# ---- varlen attention ----


def _cu(lengths):
    return torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)


def _per_sequence(lens_q, lens_k, q, k, v, do, is_causal, dtype):
    """out (Tq, Hq, Ev), lse (Hq, Tq), dq, dk, dv one sequence at a time: torch's F.sdpa in dtype
    (lse: the reference math in dtype) or the float64 reference; no keys: out 0, lse -inf."""
    leaves = _leaves([q, k, v], dtype)
    outs, lses = [], []
    cq, ck = _cu(lens_q).tolist(), _cu(lens_k).tolist()
    for b in range(len(lens_q)):
        qb, kb, vb = (t[r0:r1].transpose(0, 1)[None] for t, r0, r1 in
                      zip(leaves, (cq[b], ck[b], ck[b]), (cq[b + 1], ck[b + 1], ck[b + 1])))
        o, lse = reference.scaled_dot_product_attention(qb, kb, vb, is_causal)
        if dtype != torch.float64 and lens_k[b] > 0:
            o = _torch_sdpa(qb, kb, vb, None, is_causal)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs)
    return [out, torch.cat(lses, dim=1), *torch.autograd.grad(out, leaves, do.to(dtype))]


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_attention(dtype, is_causal):
    """Packed sequences with L != S, one without queries and one without keys, GQA, Ev != E,
    strided q."""
    lens_q, lens_k, Hq, Hkv, E, Ev = [3, 0, 97, 9, 1], [10, 4, 33, 0, 1], 4, 2, 16, 24
    g = torch.Generator().manual_seed(2)
    q = torch.randn(sum(lens_q), Hq, 2 * E, generator=g)[..., :E].to(dtype).requires_grad_()
    k = torch.randn(sum(lens_k), Hkv, E, generator=g).to(dtype).requires_grad_()
    v = torch.randn(sum(lens_k), Hkv, Ev, generator=g).to(dtype).requires_grad_()
    do = torch.randn(sum(lens_q), Hq, Ev, generator=g).to(dtype)
    with fastattn.record_backends() as ran:
        out, lse = fastattn.varlen_attention(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q),
                                             max(lens_k), causal=is_causal, return_lse=True)
        ours = [out, lse, *torch.autograd.grad(out, [q, k, v], do)]
    _assert_torch_ran(ran, ["varlen_attention_fwd", "varlen_attention_bwd"])
    theirs = _per_sequence(lens_q, lens_k, q, k, v, do, is_causal, dtype)
    ref = _per_sequence(lens_q, lens_k, q, k, v, do, is_causal, torch.float64)
    seen = ref[1] > NEG_INF
    assert torch.equal(lse > NEG_INF, seen)
    ours[1], theirs[1], ref[1] = ours[1][seen], theirs[1][seen].float(), ref[1][seen]
    for label, a, b, c in zip(["out", "lse", "dq", "dk", "dv"], ours, theirs, ref):
        assert_within_torch_error(f"varlen {label}", a, b.to(a.dtype), c, dtype)


def test_varlen_dropout_is_seeded_and_consistent():
    lens = [5, 40, 1]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(sum(lens), 2, 16, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(sum(lens), 2, 16, generator=g)

    def run():
        torch.manual_seed(4)
        out = fastattn.varlen_attention(q, k, v, _cu(lens), _cu(lens), 40, 40, causal=True,
                                        dropout_p=0.3)
        return [out, *torch.autograd.grad(out, [q, k, v], do)]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.isfinite(t).all() for t in first)


# The score modifiers: window, bottom-right causal, softcap, ALiBi, sinks (_Composed applies them).
MODS = [
    dict(window_size=(4, 2)),
    dict(bottom_right=True, is_causal=True, window_size=(6, -1)),
    dict(softcap=1.5, alibi_slopes=torch.tensor([0.3, 0.1, 0.5, 0.2])),
    dict(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]), is_causal=True, bottom_right=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mods", MODS, ids=["window", "bottom-right", "softcap+alibi", "sinks"])
def test_attention_score_modifiers(mods, dtype):
    """Every output and gradient (sinks' too) against float64, with the reference in `dtype` as the
    yardstick; L > S so that bottom-right rows see no key; return_probs' rows normalise to the
    softmax."""
    mods = dict(mods)
    is_causal = mods.pop("is_causal", False)
    q, k, v, do = _qkv(2, 4, 2, 13, 9, 16, dtype)
    sinks = mods.pop("sinks", None)
    leaves = [q, k, v] + ([sinks.to(dtype).requires_grad_()] if sinks is not None else [])
    with fastattn.record_backends() as ran:
        out, lse, probs = fastattn.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, enable_gqa=True, return_lse=True, return_probs=True,
            sinks=leaves[3] if sinks is not None else None, **mods)
        ours = [out, *torch.autograd.grad(out, leaves, do)]
    _assert_torch_ran(ran, ["attention_fwd", "attention_probs", "attention_bwd"])
    ref_mods = {dict(window_size="window", alibi_slopes="alibi").get(n, n): m
                for n, m in mods.items()}

    def reference_run(dt):
        r = _leaves(leaves, dt)
        o, l = reference.scaled_dot_product_attention(
            *r[:3], is_causal, sinks=r[3] if sinks is not None else None, **ref_mods)
        return [o, *torch.autograd.grad(o, r, do.to(dt))], l

    theirs, _ = reference_run(dtype)
    ref, ref_lse = reference_run(torch.float64)
    for name, a, b, c in zip(["out", "dq", "dk", "dv", "dsinks"], ours, theirs, ref):
        assert_within_torch_error(name, a, b, c, dtype)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=1e-2)
    # probs: nonzero exactly on the visible pairs, 1 at each row's max
    visible = reference._visible_pairs(13, 9, is_causal, None, "cpu", mods.get("window_size",
                                       (-1, -1)), mods.get("bottom_right", False))
    assert torch.equal(probs != 0, visible.expand(probs.shape))
    rows = visible.any(-1)
    assert probs.amax(-1)[..., rows].eq(1).all()


# ---- layer norm / rms norm ----


def _norm_inputs(rows, n, dtype, *, weight=True, bias=True, param_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 2 + 0.5).to(dtype).requires_grad_()
    pd = param_dtype or dtype
    w = (torch.randn(n, generator=g) + 1).to(pd).requires_grad_() if weight else None
    b = torch.randn(n, generator=g).to(pd).requires_grad_() if bias else None
    r = torch.randn(rows, n, generator=g).to(dtype).requires_grad_()
    return x, w, b, r, torch.randn(rows, n, generator=g).to(dtype)


def _check_norm(name, fn, theirs_fn, ref_fn, tensors, dy, dtype, ops=("norm_fwd", "norm_bwd")):
    """fn (fastattn), theirs_fn (torch's, same dtypes) and ref_fn (float64 math) on the same
    tensors (None allowed): output and the gradient of every tensor."""
    present = [t for t in tensors if t is not None]
    with fastattn.record_backends() as ran:
        out = fn(*tensors)
        ours = [out, *torch.autograd.grad(out, present, dy)]
    _assert_torch_ran(ran, ops)
    t = [x if x is None else _leaves([x])[0] for x in tensors]
    t_out = theirs_fn(*t)
    theirs = [t_out, *torch.autograd.grad(t_out, [x for x in t if x is not None], dy)]
    r = [x if x is None else _leaves([x], torch.float64)[0] for x in tensors]
    r_out = ref_fn(*r)
    ref = [r_out, *torch.autograd.grad(r_out, [x for x in r if x is not None], dy.double())]
    for i, (a, b, c) in enumerate(zip(ours, theirs, ref)):
        assert a.dtype == b.dtype, f"{name} output {i}: dtype {a.dtype} != torch's {b.dtype}"
        assert_within_torch_error(f"{name} output {i}", a, b, c, dtype)


NORM_SIZES = [(37, 1), (37, 3), (19, 97), (5, 768)]
AFFINE = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("weight,bias", AFFINE, ids=["wb", "w", "b", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", NORM_SIZES)
def test_layer_norm(rows, n, dtype, weight, bias):
    x, w, b, _, dy = _norm_inputs(rows, n, dtype, weight=weight, bias=bias, seed=rows + n)
    _check_norm(f"layer_norm {rows}x{n}", lambda x, w, b: fastattn.layer_norm(x, (n,), w, b),
                lambda x, w, b: F.layer_norm(x, (n,), w, b),
                lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), [x, w, b], dy, dtype)


@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,n", NORM_SIZES)
def test_rms_norm(rows, n, dtype, weight):
    x, w, _, _, dy = _norm_inputs(rows, n, dtype, weight=weight, seed=rows * n)
    _check_norm(f"rms_norm {rows}x{n}", lambda x, w: fastattn.rms_norm(x, (n,), w, 1e-6),
                lambda x, w: F.rms_norm(x, (n,), w, 1e-6),
                lambda x, w: reference.rms_norm(x, w, 1e-6), [x, w], dy, dtype)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_layer_norm(dtype, rms):
    """Both outputs, out and h = x + residual, carry gradients."""
    x, w, b, r, dy = _norm_inputs(19, 97, dtype, bias=not rms, seed=3)
    dh = torch.randn(19, 97, generator=torch.Generator().manual_seed(4)).to(dtype)

    def ours(x, r, w, b):
        out, h = fastattn.add_layer_norm(x, r, 97, w, b, rms=rms)
        return torch.cat([out, h])

    def theirs(x, r, w, b, norm=F.rms_norm if rms else F.layer_norm):
        h = x + r
        return torch.cat([norm(h, (97,), w, eps=1e-5) if rms else norm(h, (97,), w, b), h])

    def ref(x, r, w, b):
        h = x + r
        return torch.cat([reference.rms_norm(h, w, 1e-5) if rms
                          else reference.layer_norm(h, w, b, 1e-5), h])

    _check_norm(f"add_layer_norm rms={rms}", ours, theirs, ref, [x, r, w, b],
                torch.cat([dy, dh]), dtype)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_norm_fp32_parameters_on_half_input(dtype, rms):
    """fp32 weight / bias on fp16 / bf16 input, as torch allows: output in the input's dtype,
    parameter gradients in fp32."""
    x, w, b, _, dy = _norm_inputs(37, 97, dtype, bias=not rms, param_dtype=torch.float32, seed=8)
    if rms:  # torch's own: in fp32, rounded

        _check_norm("rms_norm fp32 params", lambda x, w: fastattn.rms_norm(x, 97, w, 1e-6),
                    lambda x, w: F.rms_norm(x.float(), (97,), w, 1e-6).to(dtype),
                    lambda x, w: reference.rms_norm(x, w, 1e-6), [x, w], dy, dtype)
    else:
        _check_norm("layer_norm fp32 params", lambda x, w, b: fastattn.layer_norm(x, 97, w, b),
                    lambda x, w, b: F.layer_norm(x, (97,), w, b),
                    lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), [x, w, b], dy, dtype)
    y = (fastattn.rms_norm(x, 97, w) if rms else fastattn.layer_norm(x, 97, w, b))
    assert y.dtype == dtype
    assert torch.autograd.grad(y, [w], dy)[0].dtype == torch.float32


def test_norm_statistics_are_fp32():
    x = torch.randn(7, 33, dtype=torch.bfloat16)
    from fastattn import torch_path
    for is_rms in (False, True):
        y, h, mean, rstd = torch_path.norm_fwd(x, None, None, None, 1e-5, is_rms)
        assert rstd.dtype == torch.float32 and rstd.shape == (7,)
        assert mean.dtype == torch.float32 and mean.shape == ((0,) if is_rms else (7,))
        assert h.numel() == 0 and y.dtype == torch.bfloat16


# ---- embeddings ----


def _table(rows, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g).to(dtype).requires_grad_()


def _ids(shape, rows, index_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, rows, shape, generator=g).to(index_dtype)


@pytest.mark.parametrize("options", [{}, {"padding_idx": 3}, {"padding_idx": -1},
                                     {"scale_grad_by_freq": True},
                                     {"padding_idx": 0, "scale_grad_by_freq": True}],
                         ids=["plain", "pad3", "pad-1", "freq", "pad0-freq"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding(dtype, index_dtype, options):
    """Heavy collisions (97 tokens, 5 rows): the gradient accumulates in fp32."""
    w = _table(5, 97, dtype, seed=1)
    ids = _ids((97,), 5, index_dtype, seed=2).view(1, 97)
    dout = torch.randn(1, 97, 97, generator=torch.Generator().manual_seed(3)).to(dtype)
    with fastattn.record_backends() as ran:
        out = fastattn.embedding(ids, w, **options)
        dw, = torch.autograd.grad(out, [w], dout)
    _assert_torch_ran(ran, ["embedding_fwd", "embedding_bwd"])
    t = _leaves([w])[0]
    t_out = F.embedding(ids, t, **options)
    assert torch.equal(out, t_out), "a gather is exact"
    r = _leaves([w], torch.float64)[0]
    r_dw, = torch.autograd.grad(F.embedding(ids, r, **options), [r], dout.double())
    assert dw.dtype == dtype
    assert_within_torch_error("dweight", dw, torch.autograd.grad(t_out, [t], dout)[0], r_dw, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpt_embeddings(dtype):
    wte, wpe = _table(97, 40, dtype, seed=1), _table(64, 40, dtype, seed=2)
    ids = _ids((3, 37), 97, seed=3)
    dout = torch.randn(3, 37, 40, generator=torch.Generator().manual_seed(4)).to(dtype)
    pos = torch.arange(37)
    _check_norm("gpt_embeddings", lambda a, b: fastattn.gpt_embeddings(ids, a, b),
                lambda a, b: F.embedding(ids, a) + F.embedding(pos, b),
                lambda a, b: F.embedding(ids, a) + F.embedding(pos, b), [wte, wpe], dout, dtype,
                ops=("embedding_fwd", "embedding_bwd"))


def _bert_params(dtype, d=96, seed=10):
    g = torch.Generator().manual_seed(seed)
    return [_table(120, d, dtype, seed), _table(64, d, dtype, seed + 1),
            _table(2, d, dtype, seed + 2),
            (torch.rand(d, generator=g) + 0.5).to(dtype).requires_grad_(),
            torch.randn(d, generator=g).to(dtype).requires_grad_()]


def _bert_compose(ids, types, keep, p, word, pos, typ, lw, lb):
    h = (F.embedding(ids, word) + F.embedding(torch.arange(ids.shape[-1]), pos)
         + F.embedding(types, typ))
    y = F.layer_norm(h, (word.shape[1],), lw, lb, 1e-12)
    return y if keep is None else y * keep / (1 - p)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bert_embeddings(dtype, dropout_p):
    """With dropout: the mask is the seed's (reference.dropout_keep), and the LayerNorm backward
    redraws it."""
    params = _bert_params(dtype)
    ids, types = _ids((2, 23), 120, seed=11), _ids((2, 23), 2, seed=12)
    dout = torch.randn(2, 23, 96, generator=torch.Generator().manual_seed(13)).to(dtype)
    keep = _seeded_keep(6, (46, 96), dropout_p).view(2, 23, 96) if dropout_p else None
    torch.manual_seed(6)
    _check_norm(f"bert_embeddings p={dropout_p}",
                lambda *ps: fastattn.bert_embeddings(ids, *ps, token_type_ids=types,
                                                     dropout_p=dropout_p),
                lambda *ps: _bert_compose(ids, types, keep, dropout_p, *ps),
                lambda *ps: _bert_compose(ids, types, keep, dropout_p, *ps), params, dout, dtype,
                ops=("embedding_fwd", "norm_bwd", "embedding_bwd"))
