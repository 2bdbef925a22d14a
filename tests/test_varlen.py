"""fastattn.varlen_attention (packed variable-length batches) and unpad / pad, against float64
per-sequence references with torch's own per-sequence error as yardstick. Runs on CUDA, or under
Triton's interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from helpers import assert_kernels_ran, assert_within_torch_error

OPS = ["varlen_attention_fwd", "varlen_attention_bwd"]


def _cu_seqlens(lengths, device):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


def _packed(lens_q, lens_k, Hq, Hkv, D, Dv, dtype, device, seed):
    """q (Tq, Hq, D), k (Tk, Hkv, D), v (Tk, Hkv, Dv) leaves, do (Tq, Hq, Dv); q is a strided view
    (every other row of a wider buffer), as a slice of a fused projection would be."""
    g = torch.Generator().manual_seed(seed)
    Tq, Tk = sum(lens_q), sum(lens_k)
    q = torch.randn(Tq, Hq, 2 * D, generator=g)[..., :D]
    k, v = torch.randn(Tk, Hkv, D, generator=g), torch.randn(Tk, Hkv, Dv, generator=g)
    do = torch.randn(Tq, Hq, Dv, generator=g).to(dtype).to(device)
    q, k, v = (t.to(dtype).to(device).requires_grad_() for t in (q, k, v))
    return q, k, v, do


def _per_sequence(lens_q, lens_k, q, k, v, do, is_causal, dtype, *, keep=None, dropout_p=0.0):
    """out (Tq, Hq, Dv), lse (Hq, Tq), dq, dk, dv computed one sequence at a time in `dtype`:
    torch's F.sdpa (dtype != float64; lse from the reference math in that dtype) or the float64
    reference. A sequence without keys gives 0 (torch itself returns NaN there). keep: the
    realised (Hq, Tq, max_k) dropout keep-mask, applied by the reference math."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v)]
    outs, lses = [], []
    cq, ck = ([0, *torch.tensor(lens).cumsum(0).tolist()] for lens in (lens_q, lens_k))
    for b in range(len(lens_q)):
        qb, kb, vb = (t[r0:r1].transpose(0, 1)[None] for t, r0, r1 in
                      zip(leaves, (cq[b], ck[b], ck[b]), (cq[b + 1], ck[b + 1], ck[b + 1])))
        drop = None if keep is None else keep[None, :, cq[b]:cq[b + 1], :lens_k[b]]
        o, lse = reference.scaled_dot_product_attention(qb, kb, vb, is_causal, None, None, drop,
                                                        dropout_p)
        if dtype != torch.float64 and keep is None and lens_k[b] > 0:
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=is_causal,
                                               enable_gqa=qb.shape[1] != kb.shape[1])
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs)
    return [out, torch.cat(lses, dim=1), *torch.autograd.grad(out, leaves, do.cpu().to(dtype))]


def _check(lens_q, lens_k, Hq, Hkv, D, Dv, is_causal, dtype, device, seed):
    q, k, v, do = _packed(lens_q, lens_k, Hq, Hkv, D, Dv, dtype, device, seed)
    cu_q, cu_k = _cu_seqlens(lens_q, device), _cu_seqlens(lens_k, device)
    with fastattn.record_backends() as ran:
        out, lse = fastattn.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                             causal=is_causal, return_lse=True)
        ours = [out, lse, *torch.autograd.grad(out, [q, k, v], do)]
    assert_kernels_ran(ran, OPS, device)
    assert out.shape == (sum(lens_q), Hq, Dv) and lse.shape == (Hq, sum(lens_q))
    theirs = _per_sequence(lens_q, lens_k, q, k, v, do, is_causal, dtype)
    ref = _per_sequence(lens_q, lens_k, q, k, v, do, is_causal, torch.float64)
    seen = ref[1] > float("-inf")  # queries of a sequence without keys: lse -inf, out 0
    assert torch.equal(lse.cpu() > float("-inf"), seen)
    ours[1], theirs[1], ref[1] = ours[1][seen.to(device)], theirs[1][seen], ref[1][seen]
    for name, a, t, r in zip(["out", "lse", "dq", "dk", "dv"], ours, theirs, ref):
        assert_within_torch_error(f"varlen {name}", a, t.to(a.dtype).to(a.device), r, dtype)
    return ours


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_varlen_matches_per_sequence_reference(dtype, is_causal, device, poisoned_empty):
    """Lengths 5, 64, 1, 37 (self-attention), GQA, E != Ev, strided q: out, lse, every gradient."""
    lengths = [5, 64, 1, 37]
    _check(lengths, lengths, 4, 2, 32, 24, is_causal, dtype, device, seed=1)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_varlen_query_and_key_lengths_differ(is_causal, device, poisoned_empty):
    """Cross attention with L != S per sequence, a sequence without queries (its keys get zero
    gradients) and one without keys (its queries get output 0, lse -inf)."""
    _check([3, 0, 70, 9], [10, 4, 33, 0], 2, 2, 16, 16, is_causal, torch.float32, device, seed=2)


def test_varlen_dropout_gradients_are_those_of_the_realised_mask(device, poisoned_empty):
    """With v = I per sequence (Ev = max_seqlen_k) the output row of a query is its dropped,
    rescaled probabilities; out and every gradient match the float64 math with that keep-mask.
    torch.manual_seed reproduces the draw."""
    lens, Hq, Hkv, p = [5, 40, 1, 23], 2, 1, 0.3
    q, k, _, do = _packed(lens, lens, Hq, Hkv, 16, max(lens), torch.float32, device, seed=3)
    cu = _cu_seqlens(lens, device)
    eye = torch.eye(max(lens))
    v = torch.cat([eye[:n] for n in lens])[:, None, :].expand(-1, Hkv, -1)  # (Tk, Hkv, max_k)
    v = v.contiguous().to(device).requires_grad_()
    torch.manual_seed(4)
    with fastattn.record_backends() as ran:
        out = fastattn.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                        dropout_p=p)
        ours = [out, *torch.autograd.grad(out, [q, k, v], do)]
    assert_kernels_ran(ran, OPS, device)
    torch.manual_seed(4)
    with torch.no_grad():
        again = fastattn.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                          dropout_p=p)
    assert torch.equal(out, again)
    keep = (out != 0).transpose(0, 1).cpu()  # (Hq, Tq, max_k)
    position = torch.cat([torch.arange(n) for n in lens])  # of each query in its sequence
    visible = (torch.arange(max(lens)) <= position[:, None]).expand_as(keep)  # causal pairs
    assert not keep[~visible].any()
    dropped, n = 1 - keep[visible].float().mean().item(), visible.sum().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5, f"dropped {dropped:.4f}, expected {p}"
    theirs = _per_sequence(lens, lens, q, k, v, do, True, torch.float32, keep=keep, dropout_p=p)
    ref = _per_sequence(lens, lens, q, k, v, do, True, torch.float64, keep=keep, dropout_p=p)
    for name, a, t, r in zip(["out", "dq", "dk", "dv"], ours, theirs[:1] + theirs[2:],
                             ref[:1] + ref[2:]):
        assert_within_torch_error(f"varlen dropout {name}", a, t.to(a.device), r, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_unpad_varlen_pad_runs_a_padded_bert_batch(dtype, device):
    """unpad -> varlen_attention -> pad on a padded (B, N, H, D) batch equals attention with the
    (B, 1, 1, N) key padding mask on the real tokens, and zeros on the padding, in value and
    gradient."""
    B, N, H, D = 3, 50, 2, 32
    lengths = torch.tensor([50, 17, 1])
    real = (torch.arange(N) < lengths[:, None]).to(device)  # (B, N)
    g = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(B, N, H, D, generator=g).to(dtype).to(device) for _ in range(4))
    do = do * real[:, :, None, None]  # padding rows carry no gradient
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    with fastattn.record_backends() as ran:
        packed = [fastattn.unpad(t, real) for t in (q, k, v)]
        (pq, indices, cu, max_len), (pk, *_), (pv, *_) = packed
        out = fastattn.pad(fastattn.varlen_attention(pq, pk, pv, cu, cu, max_len, max_len),
                           indices, B, N)
        ours = [out, *torch.autograd.grad(out, [q, k, v], do)]
    assert_kernels_ran(ran, OPS, device)
    assert max_len == 50 and cu.tolist() == [0, 50, 67, 68] and indices.shape == (68,)
    assert not out[~real].any()

    def padded(dt):  # (B, N, H, D) -> (B, H, N, D) attention with the key padding mask
        leaves = [t.detach().cpu().to(dt).requires_grad_() for t in (q, k, v)]
        o = reference.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in leaves), False, None, real.cpu()[:, None, None, :])[0]
        o = o.transpose(1, 2) * real.cpu()[:, :, None, None]
        return [o, *torch.autograd.grad(o, leaves, do.cpu().to(dt))]

    for name, a, t, r in zip(["out", "dq", "dk", "dv"], ours, padded(dtype), padded(torch.float64)):
        assert_within_torch_error(f"unpad/pad {name}", a, t.to(a.device), r, dtype)


def test_unpad_pad_round_trip(device):
    x = torch.randn(2, 5, 3, device=device)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], device=device)  # integer, any pattern
    packed, indices, cu, max_len = fastattn.unpad(x, mask)
    assert packed.shape == (3, 3) and indices.tolist() == [0, 1, 3]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3] and max_len == 3
    assert torch.equal(fastattn.pad(packed, indices, 2, 5), x * mask[..., None])


def test_custom_ops_pass_opcheck(device):
    lens = [3, 0, 9]
    q, k, v, do = _packed(lens, lens, 2, 1, 16, 16, torch.float32, device, seed=6)
    q, k, v = (t.detach() for t in (q, k, v))
    cu = _cu_seqlens(lens, device)
    seed = torch.tensor([5], device=device)
    args = (q, k, v, cu, cu, 9, 9, 0.25, True, 0.1, seed)
    torch.library.opcheck(torch.ops.fastattn.varlen_attention_fwd.default, args)
    out, lse, _ = torch.ops.fastattn.varlen_attention_fwd(*args)
    torch.library.opcheck(torch.ops.fastattn.varlen_attention_bwd.default,
                          (do, q, k, v, out, lse, cu, cu, 9, 9, 0.25, True, 0.1, seed))


def test_reference_fallback_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lens = [5, 64, 1, 37]
    q, k, v, do = _packed(lens, lens, 4, 2, 16, 16, torch.float32, "cpu", seed=7)
    cu = _cu_seqlens(lens, "cpu")
    with fastattn.record_backends() as ran:
        out = fastattn.varlen_attention(q, k, v, cu, cu, 64, 64, causal=True)
        grads = torch.autograd.grad(out, [q, k, v], do)
    assert ran == [(op, "torch") for op in OPS]
    want = _per_sequence(lens, lens, q, k, v, do, True, torch.float32)
    for a, b in zip([out, *grads], want[:1] + want[2:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- bad input: a clear error naming the argument ----


def _args(device, lens=(3, 4), **change):
    q, k, v, _ = _packed(list(lens), list(lens), 2, 2, 16, 16, torch.float32, device, seed=8)
    cu = _cu_seqlens(list(lens), device)
    args = dict(q=q.detach(), k=k.detach(), v=v.detach(), cu_seqlens_q=cu, cu_seqlens_k=cu,
                max_seqlen_q=max(lens), max_seqlen_k=max(lens))
    args.update(change)
    return args


def _cu(values, device, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=device)


@pytest.mark.parametrize("change,error,match", [
    (lambda d: dict(cu_seqlens_q=_cu([0, 3, 7], d, torch.int64)), TypeError,
     "cu_seqlens_q must hold int32 offsets, got dtype int64"),
    (lambda d: dict(cu_seqlens_k=_cu([[0, 3, 7]], d)), ValueError, "cu_seqlens_k must be 1-D"),
    (lambda d: dict(cu_seqlens_q=_cu([1, 3, 7], d)), ValueError, "cu_seqlens_q must start at 0"),
    (lambda d: dict(cu_seqlens_q=_cu([0, 5, 3, 7], d)), ValueError, "non-decreasing"),
    (lambda d: dict(cu_seqlens_k=_cu([0, 3, 6], d)), ValueError,
     "cu_seqlens_k must end at the number of packed tokens 7, got 6"),
    (lambda d: dict(max_seqlen_q=3), ValueError, "max_seqlen_q=3 is shorter than the longest"),
    (lambda d: dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be a non-negative int"),
    (lambda d: dict(cu_seqlens_k=_cu([0, 7], d), max_seqlen_k=7), ValueError,
     "same number of sequences"),
    (lambda d: dict(cu_seqlens_q=_cu([0, 3, 7], "meta")), ValueError, "one device"),
    (lambda d: dict(q=torch.randn(7, 2, 2, 16, device=d)), ValueError, "query must have 3 dims"),
    (lambda d: dict(v=torch.randn(6, 2, 16, device=d)), ValueError, "same number of tokens"),
    (lambda d: dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
])
def test_bad_input_raises_clear_error(change, error, match, device):
    # cu_seqlens values are read back from a GPU (a sync) in checking mode only
    with fastattn.checking(), pytest.raises(error, match=match):
        fastattn.varlen_attention(**_args(device, **change(device)))


def test_unpad_bad_input(device):
    x = torch.randn(2, 5, 3, device=device)
    with pytest.raises(TypeError, match="padding_mask must be bool or integer"):
        fastattn.unpad(x, torch.ones(2, 5, device=device))
    with pytest.raises(ValueError, match="x's first two dims"):
        fastattn.unpad(x, torch.ones(2, 4, dtype=torch.bool, device=device))
