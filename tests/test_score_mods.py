"""The score modifiers (window, bottom-right causal, softcap, ALiBi, sinks) through
fastattn.scaled_dot_product_attention and varlen_attention, forward and every gradient, against the
float64 reference; the yardstick is the same reference computed in the inputs' dtype (torch has no
fused op with these modifiers). Also: key blocks outside the window are never read, the varlen
path aligns each sequence on its own, the backward stays deterministic, return_probs gives the
forward's dropout mask, and bad arguments get clear errors. Runs on CUDA, or under Triton's
interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.attention import scaled_dot_product_attention as sdpa
from fastattn.attention import varlen_attention
from helpers import assert_kernels_ran, assert_within_torch_error

NAN = float("nan")


def _inputs(B, Hq, Hkv, L, S, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, L), (Hkv, S), (Hkv, S)))
    do = torch.randn(B, Hq, L, D, generator=g)
    return [t.to(dtype).to(device) for t in (q, k, v, do)]


def _reference_mods(mods: dict) -> dict:
    """fastattn's keywords as fastattn.reference's."""
    names = dict(window_size="window", alibi_slopes="alibi")
    return {names.get(key, key): value for key, value in mods.items()}


def _run(q, k, v, do, sinks, *, causal, dropout_p=0.0, attn_mask=None, probs=True, **mods):
    """out, lse, probs (None unless `probs`) and the gradients of q, k, v (and sinks) of one
    fastattn call."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    sink_leaf = None if sinks is None else sinks.detach().requires_grad_()
    with fastattn.record_backends() as ran:
        out, lse, *probs = sdpa(*leaves, attn_mask=attn_mask, dropout_p=dropout_p,
                                is_causal=causal, enable_gqa=True, return_lse=True,
                                return_probs=probs, sinks=sink_leaf, **mods)
        grads = torch.autograd.grad(out, leaves + ([] if sinks is None else [sink_leaf]), do)
    ops = ["attention_fwd", "attention_bwd"] + (["attention_probs"] if probs else [])
    assert_kernels_ran(ran, ops, str(q.device))
    return out, lse, probs[0] if probs else None, grads


def _reference(q, k, v, do, sinks, dtype, *, causal, keep=None, dropout_p=0.0, attn_mask=None,
               **mods):
    """out, lse and gradients of fastattn.reference on CPU copies in `dtype`."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v)]
    sink_leaf = None if sinks is None else sinks.detach().cpu().to(dtype).requires_grad_()
    ref_mods = _reference_mods(mods)
    if "alibi" in ref_mods:
        ref_mods["alibi"] = ref_mods["alibi"].cpu()
    out, lse = reference.scaled_dot_product_attention(
        *leaves, causal, None, None if attn_mask is None else attn_mask.cpu(),
        None if keep is None else keep.cpu(), dropout_p, sinks=sink_leaf, **ref_mods)
    grads = torch.autograd.grad(out, leaves + ([] if sinks is None else [sink_leaf]),
                                do.cpu().to(dtype))
    return out, lse, grads


# (name, (B, Hq, Hkv, L, S, D), causal, modifiers, extras): odd lengths, L > S and L < S, GQA,
# rows that see no key (bottom-right with L > S), and every modifier together with dropout and a
# key padding mask.
CASES = [
    ("window", (2, 4, 2, 37, 53, 32), False, dict(window_size=(5, 3)), {}),
    ("window left, causal bottom-right, L > S", (1, 2, 2, 53, 37, 40), True,
     dict(window_size=(7, -1), bottom_right=True), {}),
    ("window right only", (1, 2, 1, 45, 45, 32), False, dict(window_size=(-1, 2)), {}),
    ("causal bottom-right, L < S", (2, 2, 2, 37, 97, 32), True, dict(bottom_right=True), {}),
    ("softcap", (2, 2, 2, 33, 47, 64), False, dict(softcap=1.5), {}),
    ("alibi (Hq,)", (2, 4, 4, 29, 41, 32), False, dict(alibi_slopes="heads"), {}),
    ("alibi (B, Hq), causal bottom-right", (2, 4, 2, 29, 41, 32), True,
     dict(alibi_slopes="batch", bottom_right=True), {}),
    # causal ALiBi takes the one-sided form (kernels/attention.py, HAS_ALIBI 2): several query and
    # key blocks (the per-program reference points), top-left with L > S, steep slopes (up to 4:
    # the softmax all but on the diagonal), a window and sinks
    ("alibi steep, causal top-left, L > S", (1, 2, 2, 150, 97, 32), True,
     dict(alibi_slopes="steep"), {}),
    ("alibi, causal window + sinks", (2, 2, 1, 140, 160, 32), True,
     dict(window_size=(70, -1), bottom_right=True, alibi_slopes="batch"), dict(sinks=True)),
    ("sinks", (2, 4, 2, 37, 37, 32), True, {}, dict(sinks=True)),
    ("sinks, rows without keys", (1, 2, 2, 50, 20, 32), True,
     dict(window_size=(3, -1), bottom_right=True), dict(sinks=True)),
    # a bool (B, Hq, L, S) mask with a window: the tile lists (kernels/attention.py, TILE_LISTS;
    # L and S over 4 blocks of the interpreter's tiles) meet both edges of the window; whole
    # blocks (the first 64 queries see every key), partial ones, and keys a head never sees
    ("bool mask, causal window", (1, 2, 1, 140, 160, 32), True,
     dict(window_size=(40, -1), bottom_right=True), dict(bool_mask=True)),
    ("everything", (2, 4, 2, 45, 61, 40), True,
     dict(window_size=(19, -1), bottom_right=True, softcap=2.0, alibi_slopes="batch"),
     dict(sinks=True, dropout_p=0.25, key_padding=True)),
]


def _case_inputs(shape, dtype, device, mods, extras):
    B, Hq, Hkv, L, S, D = shape
    q, k, v, do = _inputs(B, Hq, Hkv, L, S, D, dtype, device)
    g = torch.Generator().manual_seed(1)
    mods = dict(mods)
    if mods.get("alibi_slopes") == "heads":
        mods["alibi_slopes"] = (torch.rand(Hq, generator=g) * 0.5).to(device)
    elif mods.get("alibi_slopes") == "steep":
        mods["alibi_slopes"] = (1.0 + torch.rand(Hq, generator=g) * 3.0).to(device)
    elif mods.get("alibi_slopes") == "batch":
        mods["alibi_slopes"] = (torch.rand(B, Hq, generator=g) * 0.5).to(device)
    sinks = torch.randn(Hq, generator=g).to(device) if extras.get("sinks") else None
    attn_mask = None
    if extras.get("key_padding"):  # (B, 1, 1, S): batch 1 pads its last 20 keys
        attn_mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        attn_mask[1:, ..., S - 20:] = False
        attn_mask = attn_mask.to(device)
    if extras.get("bool_mask"):
        attn_mask = torch.rand(B, Hq, L, S, generator=g) > 0.3
        attn_mask[:, :, :64] = True
        attn_mask[:, 0, :, 96:128] = False
        attn_mask = attn_mask.to(device)
    return q, k, v, do, sinks, attn_mask, mods


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, shape, causal, mods, extras", CASES, ids=[c[0] for c in CASES])
def test_modifiers_match_float64(name, shape, causal, mods, extras, dtype, device):
    """out, lse and every gradient (q, k, v, sinks) within 2x the low-precision reference's error
    against float64; with dropout, against the mask the call realised (return_probs' sign bit)."""
    q, k, v, do, sinks, attn_mask, mods = _case_inputs(shape, dtype, device, mods, extras)
    p = extras.get("dropout_p", 0.0)
    out, lse, probs, grads = _run(q, k, v, do, sinks, causal=causal, dropout_p=p,
                                  attn_mask=attn_mask, **mods)
    keep = ~torch.signbit(probs) if p else None
    if p:  # the realised drop rate is p's, so the mask is a real one
        visible = probs != 0
        rate = (torch.signbit(probs) & visible).sum() / visible.sum()
        assert abs(rate.item() - p) < 0.03, rate
    kw = dict(causal=causal, keep=keep, dropout_p=p, attn_mask=attn_mask, **mods)
    theirs_out, theirs_lse, theirs = _reference(q, k, v, do, sinks, dtype, **kw)
    ref_out, ref_lse, ref = _reference(q, k, v, do, sinks, torch.float64, **kw)
    assert_within_torch_error("out", out.cpu(), theirs_out, ref_out, dtype)
    # lse: fp32 statistics; rows that see no key are -inf in both (or the sink with sinks)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=2e-3, rtol=1e-3)
    for g_name, ours, t, r in zip(("dq", "dk", "dv", "dsinks"), grads, theirs, ref):
        assert_within_torch_error(g_name, ours.cpu(), t.to(ours.dtype), r, dtype)


@pytest.mark.parametrize("mods", [dict(softcap=0.7), dict(alibi_slopes=True, sinks=True,
                                                          window_size=(6, 6))],
                         ids=["softcap", "alibi+sinks+window"])
def test_modifiers_in_fp32(mods, device):
    """fp32 inputs (the softcap's accurate tanh, exact fp32 products): close to float64."""
    q, k, v, do = _inputs(2, 2, 2, 41, 35, 32, torch.float32, device)
    mods = dict(mods)
    if mods.pop("alibi_slopes", None):
        mods["alibi_slopes"] = torch.tensor([0.3, 0.05], device=device)
    sinks = torch.tensor([0.5, -1.0], device=device) if mods.pop("sinks", None) else None
    out, lse, _, grads = _run(q, k, v, do, sinks, causal=False, **mods)
    ref_out, ref_lse, ref = _reference(q, k, v, do, sinks, torch.float64, causal=False, **mods)
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=2e-6, rtol=1e-6)
    for ours, r in zip(grads, ref):
        torch.testing.assert_close(ours.cpu().double(), r, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("bottom_right", [False, True])
def test_key_blocks_outside_the_window_are_never_read(bottom_right, device):
    """Keys no query's window reaches (whole 128-key blocks, the widest key block of any table)
    are NaN: reading one would turn out or a gradient into NaN. Their dK, dV are 0."""
    B, H, L, S, D = 1, 2, 64, 512, 32
    q, k, v, do = _inputs(B, H, H, L, S, D, torch.float16, device)
    keys = torch.arange(S, device=device)
    # top-left: queries 0..63 see keys up to 63 + 8; bottom-right: keys from 448 - 8 on
    unread = keys >= 256 if not bottom_right else keys < 256
    k, v = (t.masked_fill(unread[:, None], NAN) for t in (k, v))
    mods = dict(window_size=(8, 8), bottom_right=bottom_right)
    out, _, _, (dq, dk, dv) = _run(q, k, v, do, None, causal=False, probs=False, **mods)
    for name, t in (("out", out), ("dq", dq), ("dk", dk[..., ~unread, :]),
                    ("dv", dv[..., ~unread, :])):
        assert not t.isnan().any(), f"{name}: a key block outside the window was read"
    assert not dk[..., unread, :].any() and not dv[..., unread, :].any()
    with torch.no_grad():  # the same call without the window reads them all
        assert sdpa(q, k, v).isnan().all()


def test_varlen_aligns_each_sequence_on_its_own(device):
    """varlen_attention with a window, bottom-right causal, softcap, per-sequence ALiBi and
    sinks: each packed sequence as the reference has it alone (lengths L != S per sequence, one
    empty query sequence), sinks' gradient summed over the sequences."""
    lq, lk = [5, 0, 19, 33], [9, 4, 19, 21]
    Hq, Hkv, D, dtype = 4, 2, 32, torch.bfloat16
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32,
                               device=device) for n in (lq, lk))
    g = torch.Generator().manual_seed(3)
    q, do = (torch.randn(sum(lq), Hq, D, generator=g).to(dtype).to(device) for _ in range(2))
    k, v = (torch.randn(sum(lk), Hkv, D, generator=g).to(dtype).to(device) for _ in range(2))
    slopes = (torch.rand(len(lq), Hq, generator=g) * 0.3).to(device)
    sinks = torch.randn(Hq, generator=g).to(device).requires_grad_()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mods = dict(window_size=(6, -1), bottom_right=True, softcap=3.0)
    with fastattn.record_backends() as ran:
        out = varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True,
                               alibi_slopes=slopes, sinks=sinks, **mods)
        grads = torch.autograd.grad(out, (q, k, v, sinks), do)
    assert_kernels_ran(ran, ["varlen_attention_fwd", "varlen_attention_bwd"], device)
    want = [torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v, sinks)]
    want_out = torch.zeros(out.shape, dtype=torch.float64)
    for b in range(len(lq)):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        # (N, H, D) -> (1, H, N, D)
        leaves = [t.detach()[r].cpu().double().transpose(0, 1)[None].requires_grad_()
                  for t, r in ((q, rq), (k, rk), (v, rk))]
        sink_leaf = sinks.detach().cpu().double().requires_grad_()
        o, _ = reference.scaled_dot_product_attention(
            *leaves, True, None, window=(6, -1), bottom_right=True, softcap=3.0,
            alibi=slopes[b].cpu().double(), sinks=sink_leaf)
        dob = do[rq].cpu().double().transpose(0, 1)[None]
        gs = torch.autograd.grad(o, leaves + [sink_leaf], dob)
        want_out[rq] = o[0].transpose(0, 1)
        for w, gr, r in zip(want, gs, (rq, rk, rk)):
            w[r] = gr[0].transpose(0, 1)
        want[3] += gs[3]
    torch.testing.assert_close(out.cpu().double(), want_out, atol=2e-2, rtol=2e-2)
    for name, ours, w in zip(("dq", "dk", "dv", "dsinks"), grads, want):
        torch.testing.assert_close(ours.cpu().double(), w, atol=3e-2, rtol=3e-2, msg=name)


def test_backward_with_modifiers_is_deterministic(device):
    """Two backward passes with every modifier and dropout: bitwise equal gradients."""
    q, k, v, do = _inputs(2, 4, 2, 45, 51, 32, torch.float16, device)
    sinks = torch.randn(4).to(device)
    mods = dict(window_size=(11, 4), softcap=2.5, alibi_slopes=torch.rand(4).to(device))
    torch.manual_seed(0)
    first = _run(q, k, v, do, sinks, causal=False, dropout_p=0.1, **mods)[3]
    torch.manual_seed(0)
    second = _run(q, k, v, do, sinks, causal=False, dropout_p=0.1, **mods)[3]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_return_probs_is_the_softmax_numerator(device):
    """probs = exp(score - rowmax) of the capped, biased, windowed scores: each row normalised is
    the reference's softmax; a call with every modifier off equals the plain call bitwise."""
    q, k, v, _ = _inputs(1, 2, 2, 23, 29, 32, torch.float32, device)
    mods = dict(window_size=(4, 9), softcap=2.0, alibi_slopes=torch.tensor([0.2, 0.7]).to(device))
    out, probs = sdpa(q, k, v, return_probs=True, **mods)
    assert probs.amax(dim=-1).eq(1).all()  # every row sees a key; its max entry is exp(0)
    r = [t.double().cpu() for t in (q, k, v)]
    ref_mods = _reference_mods(mods)
    ref_mods["alibi"] = ref_mods["alibi"].cpu()
    s = reference._scores(*r[:2], 32 ** -0.5, None, 2.0, ref_mods["alibi"])
    visible = reference._visible_pairs(23, 29, False, None, "cpu", (4, 9))
    want = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    torch.testing.assert_close((probs / probs.sum(-1, keepdim=True)).cpu().double(), want,
                               atol=1e-6, rtol=1e-5)
    plain = sdpa(q, k, v, window_size=(-1, -1), bottom_right=False, softcap=0.0)
    assert torch.equal(plain, sdpa(q, k, v))


# ---- bad arguments ----

BAD = [
    (dict(window_size=(3, 4, 5)), ValueError, "window_size must be a pair"),
    (dict(window_size=(-2, 0)), ValueError, r"ints >= -1"),
    (dict(window_size=(1.5, 0)), ValueError, "window_size"),
    (dict(window_size=4), ValueError, "window_size"),
    (dict(bottom_right=1), TypeError, "bottom_right must be a bool"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(softcap=True), ValueError, "softcap"),
    (dict(alibi_slopes=[0.1, 0.2]), TypeError, "alibi_slopes must be a torch.Tensor"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(Hq,\)"),
    (dict(alibi_slopes=torch.ones(3, 2)), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(alibi_slopes=torch.ones(2, requires_grad=True)), ValueError, "no gradient"),
    (dict(sinks=torch.ones(3)), ValueError, r"sinks must have shape \(Hq,\)"),
    (dict(sinks=torch.ones(1, 2)), ValueError, "sinks must have shape"),
    (dict(sinks=torch.ones(2, dtype=torch.int32)), TypeError, "sinks must be a floating-point"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD, ids=[m for _, _, m in BAD])
def test_bad_modifiers_are_refused(kwargs, error, match, device):
    q, k, v, _ = _inputs(1, 2, 2, 5, 7, 16, torch.float32, device)
    kwargs = {n: a.to(device) if isinstance(a, torch.Tensor) else a for n, a in kwargs.items()}
    with pytest.raises(error, match=match):
        sdpa(q, k, v, **kwargs)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]  # (1, H, N, D) -> (N, H, D)
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32, device=device) for n in (5, 7))
    with pytest.raises(error, match=match):
        varlen_attention(*packed, cu_q, cu_k, 5, 7, **kwargs)


def test_modifier_tensors_on_another_device_are_refused(device):
    q, k, v, _ = _inputs(1, 2, 2, 5, 7, 16, torch.float32, device)
    other = "meta"
    with pytest.raises(ValueError, match="alibi_slopes"):
        sdpa(q, k, v, alibi_slopes=torch.ones(2, device=other))
    with pytest.raises(ValueError, match="sinks"):
        sdpa(q, k, v, sinks=torch.ones(2, device=other))
