"""Embedding, GPT and BERT input embeddings against float64 references, with torch's own error in
the same dtype as the yardstick (DESIGN.md). Runs on CUDA, or under Triton's interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from helpers import assert_kernels_ran, assert_within_torch_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _table(v, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, d, generator=g).to(dtype).to(device).requires_grad_()


def _ids(shape, v, index_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, v, shape, generator=g).to(index_dtype).to(device)


def _grad_out(shape, dtype, device, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 2)).to(dtype).to(device)


def _check_embedding(ids, w, dout, dtype, **kwargs):
    """fastattn.embedding vs F.embedding in `dtype` and in float64: output exact, gradient by
    the rule."""
    with fastattn.record_backends() as ran:
        out = fastattn.embedding(ids, w, **kwargs)
        dw, = torch.autograd.grad(out, [w], dout)
    assert_kernels_ran(ran, ["embedding_fwd", "embedding_bwd"], str(w.device))
    w_cpu = w.detach().cpu().requires_grad_()
    t_out = F.embedding(ids.cpu(), w_cpu, **kwargs)
    assert torch.equal(out.cpu(), t_out), "a gather must be exact"
    t_dw, = torch.autograd.grad(t_out, [w_cpu], dout.cpu())
    w64 = w.detach().cpu().double().requires_grad_()
    r_dw, = torch.autograd.grad(F.embedding(ids.cpu(), w64, **kwargs), [w64], dout.cpu().double())
    assert dw.dtype == w.dtype
    assert_within_torch_error("dweight", dw, t_dw.to(dw.device), r_dw, dtype)
    return out, dw


# (vocab, dim, index shape): vocab 1 (every index equal) to GPT-2's 50257, dims 1 .. 1000.
CASES = [(1, 1, (5,)), (1, 768, (2, 17)), (97, 3, (3, 4, 5)), (97, 1000, (5,)),
         (50257, 3, (2, 17)), (50257, 768, (3, 4, 5))]


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab,dim,shape", CASES)
def test_embedding_matches_torch(vocab, dim, shape, dtype, index_dtype, device):
    w = _table(vocab, dim, dtype, device)
    ids = _ids(shape, vocab, index_dtype, device)
    out, _ = _check_embedding(ids, w, _grad_out((*shape, dim), dtype, device), dtype)
    assert out.shape == (*shape, dim)


@pytest.mark.parametrize("padding_idx", [0, 5, -1])
def test_padding_row_gets_no_gradient(padding_idx, device):
    w = _table(11, 40, torch.float32, device, seed=3)
    ids = _ids((4, 9), 11, torch.int64, device, seed=3)
    ids[0, :3] = padding_idx % 11  # make sure the padding index occurs
    _, dw = _check_embedding(ids, w, _grad_out((4, 9, 40), torch.float32, device), torch.float32,
                             padding_idx=padding_idx)
    assert torch.equal(dw[padding_idx], torch.zeros(40, device=device))


def test_scale_grad_by_freq(device):
    w = _table(7, 24, torch.float32, device, seed=4)
    ids = _ids((3, 11), 7, torch.int64, device, seed=4)
    _check_embedding(ids, w, _grad_out((3, 11, 24), torch.float32, device), torch.float32,
                     scale_grad_by_freq=True, padding_idx=2)


def test_max_norm_renormalizes_rows_in_place_as_torch(device):
    ours = (_table(13, 16, torch.float32, device, seed=5).detach() * 3)
    theirs = ours.clone()
    ids = _ids((2, 6), 13, torch.int64, device, seed=5)
    out = fastattn.embedding(ids, ours, max_norm=1.5, norm_type=2.0)
    expected = F.embedding(ids, theirs, max_norm=1.5, norm_type=2.0)
    torch.testing.assert_close(ours, theirs)  # the same rows renormalized in place
    torch.testing.assert_close(out, expected)
    assert out.norm(dim=-1).max() <= 1.5 + 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_heavy_collisions_accumulate_in_fp32(dtype, device):
    """4096 lookups of one row: the gradient is one sum of 4096 rows, accumulated in fp32 (torch's
    CPU kernel accumulates half precision in half precision and is far off)."""
    w = _table(3, 64, dtype, device, seed=6)
    ids = torch.full((4096,), 1, dtype=torch.int64, device=device)
    dout = _grad_out((4096, 64), dtype, device, seed=6)
    dw, = torch.autograd.grad(fastattn.embedding(ids, w), [w], dout)
    ref = dout.double().sum(dim=0)
    rel = ((dw[1].double() - ref).abs().max() / ref.abs().max()).item()
    assert rel < (1e-3 if dtype == torch.float16 else 8e-3), rel
    assert torch.equal(dw[0], torch.zeros_like(dw[0])) and torch.equal(dw[2], dw[0])


def test_backward_is_bitwise_deterministic(device):
    w = _table(50, 96, torch.float16, device, seed=7)
    ids = _ids((600,), 50, torch.int64, device, seed=7)
    dout = _grad_out((600, 96), torch.float16, device, seed=7)
    first = torch.autograd.grad(fastattn.embedding(ids, w), [w], dout)[0]
    second = torch.autograd.grad(fastattn.embedding(ids, w), [w], dout)[0]
    assert torch.equal(first, second)


def test_empty_input(device):
    w = _table(10, 8, torch.float32, device)
    ids = torch.zeros(2, 0, dtype=torch.int64, device=device)
    out = fastattn.embedding(ids, w)
    assert out.shape == (2, 0, 8)
    dw, = torch.autograd.grad(out.sum(), [w])
    assert torch.equal(dw, torch.zeros_like(w))


# ---- fused GPT / BERT embeddings ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_gpt_embeddings(dtype, explicit_positions, device):
    wte, wpe = _table(50257, 72, dtype, device, seed=8), _table(40, 72, dtype, device, seed=9)
    ids = _ids((3, 17), 50257, torch.int64, device, seed=8)
    pos = (torch.arange(5, 22, device=device)[None] if explicit_positions else None)  # (1, N)
    dout = _grad_out((3, 17, 72), dtype, device, seed=8)
    with fastattn.record_backends() as ran:
        out = fastattn.gpt_embeddings(ids, wte, wpe, position_ids=pos)
        ours = [out, *torch.autograd.grad(out, [wte, wpe], dout)]
    assert_kernels_ran(ran, ["embedding_fwd", "embedding_bwd"], device)
    positions = pos if pos is not None else torch.arange(17, device=device)

    def compose(wte, wpe):
        return F.embedding(ids.cpu(), wte) + F.embedding(positions.cpu(), wpe)

    t = [x.detach().cpu().requires_grad_() for x in (wte, wpe)]
    t_out = compose(*t)
    theirs = [t_out, *torch.autograd.grad(t_out, t, dout.cpu())]
    r = [x.detach().cpu().double().requires_grad_() for x in (wte, wpe)]
    r_out = compose(*r)
    ref = [r_out, *torch.autograd.grad(r_out, r, dout.cpu().double())]
    for label, a, b, c in zip(["out", "dwte", "dwpe"], ours, theirs, ref):
        assert_within_torch_error(f"gpt_embeddings {label}", a, b.to(a.device), c, dtype)


def _bert_params(dtype, device, vocab=120, d=96, seed=10):
    return [_table(vocab, d, dtype, device, seed), _table(64, d, dtype, device, seed + 1),
            _table(2, d, dtype, device, seed + 2),
            (torch.rand(d, generator=torch.Generator().manual_seed(seed)) + 0.5).to(dtype).to(
                device).requires_grad_(),
            torch.randn(d, generator=torch.Generator().manual_seed(seed + 3)).to(dtype).to(
                device).requires_grad_()]


def _bert_compose(ids, types, params, eps, keep=None, p=0.0):
    word, pos, typ, lw, lb = params
    n = ids.shape[-1]
    h = F.embedding(ids, word) + F.embedding(torch.arange(n, device=ids.device), pos) \
        + F.embedding(types, typ)
    y = F.layer_norm(h, (word.shape[1],), lw, lb, eps)
    return y if keep is None else y * keep / (1 - p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_types", [False, True])
def test_bert_embeddings(dtype, with_types, device):
    params = _bert_params(dtype, device)
    ids = _ids((2, 23), 120, torch.int64, device, seed=11)
    types = _ids((2, 23), 2, torch.int64, device, seed=12) if with_types else None
    dout = _grad_out((2, 23, 96), dtype, device, seed=11)
    with fastattn.record_backends() as ran:
        out = fastattn.bert_embeddings(ids, *params, token_type_ids=types, eps=1e-12)
        ours = [out, *torch.autograd.grad(out, params, dout)]
    assert_kernels_ran(ran, ["embedding_fwd", "norm_bwd", "embedding_bwd"], device)
    tt = (types if with_types else torch.zeros_like(ids)).cpu()
    t = [x.detach().cpu().requires_grad_() for x in params]
    t_out = _bert_compose(ids.cpu(), tt, t, 1e-12)
    theirs = [t_out, *torch.autograd.grad(t_out, t, dout.cpu())]
    r = [x.detach().cpu().double().requires_grad_() for x in params]
    r_out = _bert_compose(ids.cpu(), tt, r, 1e-12)
    ref = [r_out, *torch.autograd.grad(r_out, r, dout.cpu().double())]
    for label, a, b, c in zip(["out", "dword", "dpos", "dtype", "dln_w", "dln_b"], ours, theirs,
                              ref):
        assert_within_torch_error(f"bert_embeddings {label}", a, b.to(a.device), c, dtype)


def test_bert_dropout_is_seeded_and_its_gradient_is_that_of_the_realised_mask(device):
    params = _bert_params(torch.float32, device, seed=20)
    ids = _ids((4, 50), 120, torch.int64, device, seed=20)
    p = 0.3

    def run(seed):
        torch.manual_seed(seed)
        return fastattn.bert_embeddings(ids, *params, dropout_p=p)

    out = run(0)
    assert torch.equal(out, run(0)), "same seed, same mask"
    assert not torch.equal(out, run(1)), "another draw, another mask"
    keep = out != 0  # LayerNorm outputs are never exactly 0, so zeros are the dropped ones
    dropped = 1 - keep.double().mean().item()
    n = keep.numel()
    assert abs(dropped - p) < 4 * (p * (1 - p) / n) ** 0.5, dropped  # 4 sigma

    dout = _grad_out(out.shape, torch.float32, device, seed=21)
    ours = torch.autograd.grad(out, params, dout)
    r = [x.detach().double().requires_grad_() for x in params]
    r_out = _bert_compose(ids, torch.zeros_like(ids), r, 1e-12, keep.double(), p)
    torch.testing.assert_close(out.double(), r_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, torch.autograd.grad(r_out, r, dout.double())):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_bert_dropout_one_drops_everything(device):
    params = _bert_params(torch.float32, device, seed=22)
    ids = _ids((2, 5), 120, torch.int64, device, seed=22)
    out = fastattn.bert_embeddings(ids, *params, dropout_p=1.0)
    grads = torch.autograd.grad(out, params, torch.ones_like(out))
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# ---- modules ----


def test_embedding_module_matches_torch(device):
    ours = fastattn.nn.Embedding(20, 12, padding_idx=3, device=device)
    theirs = torch.nn.Embedding(20, 12, padding_idx=3, device=device)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    ids = _ids((2, 7), 20, torch.int64, device)
    torch.testing.assert_close(ours(ids), theirs(ids))
    assert isinstance(ours, torch.nn.Embedding)


def test_bert_embeddings_module_has_hugging_face_names(device):
    m = fastattn.nn.BertEmbeddings(vocab_size=120, hidden_size=96, max_position_embeddings=64,
                                   device=device)
    # The state_dict keys of transformers' BertEmbeddings (its buffers are not persistent).
    assert set(m.state_dict()) == {
        "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
        "LayerNorm.weight", "LayerNorm.bias"}
    assert m.word_embeddings.padding_idx == 0 and m.LayerNorm.eps == 1e-12
    m.eval()
    ids = _ids((2, 9), 120, torch.int64, device, seed=23)
    params = [m.word_embeddings.weight, m.position_embeddings.weight,
              m.token_type_embeddings.weight, m.LayerNorm.weight, m.LayerNorm.bias]
    expected = _bert_compose(ids, torch.zeros_like(ids), params, 1e-12)
    torch.testing.assert_close(m(ids), expected, atol=1e-5, rtol=1e-5)
    m.train()
    ids[0, 0] = 0  # the padding token: its row gets no gradient, as in Hugging Face
    m(ids).sum().backward()
    assert torch.equal(m.word_embeddings.weight.grad[0], torch.zeros(96, device=device))


# ---- plumbing ----


def test_reference_fallback_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    params = _bert_params(torch.float32, "cpu", seed=24)
    ids = _ids((2, 7), 120, torch.int64, "cpu", seed=24)
    with fastattn.record_backends() as ran:
        out = fastattn.bert_embeddings(ids, *params)
        grads = torch.autograd.grad(out, params, torch.ones_like(out))
    assert {path for _, path in ran} == {"torch"}
    expected = _bert_compose(ids, torch.zeros_like(ids), params, 1e-12)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(expected, params, torch.ones_like(out))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_custom_ops_pass_opcheck(device):
    w = _table(9, 16, torch.float32, device).detach()
    ids = _ids((7,), 9, torch.int64, device)
    torch.library.opcheck(torch.ops.fastattn.embedding_fwd.default,
                          (ids, w, None, None, None, None, None, None, 0.0, 0.0, None))
    # The fused BERT path with dropout: the seed is a device tensor the kernel reads.
    ln_w, ln_b = torch.randn(16, device=device), torch.randn(16, device=device)
    seed = torch.tensor([3], device=device)
    bert = (ids, w, ids, w, ids, w, ln_w, ln_b, 1e-12, 0.3, seed)
    torch.library.opcheck(torch.ops.fastattn.embedding_fwd.default, bert)
    out, h, mean, rstd = torch.ops.fastattn.embedding_fwd(*bert)
    torch.library.opcheck(torch.ops.fastattn.norm_bwd.default,
                          (torch.randn_like(out), h, ln_w, ln_b, mean, rstd, None, False, True,
                           True, 0.3, seed))
    torch.library.opcheck(torch.ops.fastattn.embedding_bwd.default,
                          (ids, torch.randn(7, 16, device=device), 9, torch.float32, 2, True))


@pytest.mark.parametrize("call,error,match", [
    (lambda w, i: fastattn.embedding(torch.tensor([1, 10]).to(i.device), w), IndexError,
     "index 10, out of range"),
    (lambda w, i: fastattn.embedding(torch.tensor([-1, 2]).to(i.device), w), IndexError,
     "index -1, out of range"),
    (lambda w, i: fastattn.embedding(i.float(), w), TypeError, "int32 or int64"),
    (lambda w, i: fastattn.embedding(i, w.long()), TypeError, "weight has dtype int64"),
    (lambda w, i: fastattn.embedding(i, w[0]), ValueError, "2-D"),
    (lambda w, i: fastattn.embedding(i, w, sparse=True), ValueError, "sparse"),
    (lambda w, i: fastattn.embedding(i, w, padding_idx=10), ValueError, "padding_idx 10"),
    (lambda w, i: fastattn.embedding(i.to("meta"), w), ValueError, "one device"),
    (lambda w, i: fastattn.gpt_embeddings(i, w, w[:2]), IndexError, "position_ids holds index 2"),
    (lambda w, i: fastattn.gpt_embeddings(i, w, w.half()), TypeError, "one dtype"),
    (lambda w, i: fastattn.bert_embeddings(i, w, w, w, w[0], w[0], token_type_ids=i + 9),
     IndexError, "token_type_ids holds index"),
    (lambda w, i: fastattn.bert_embeddings(i, w, w, w, w[0], w[0], dropout_p=1.5), ValueError,
     "dropout_p"),
    (lambda w, i: fastattn.bert_embeddings(i, w, w, w, w[0, :3], w[0]), ValueError,
     "ln_weight must have shape"),
])
def test_bad_input_raises_clear_error(call, error, match, device):
    w = _table(10, 8, torch.float32, device).detach()
    ids = _ids((2, 3), 10, torch.int64, device)
    # index ranges are read back from a GPU (a sync) in checking mode only; the CPU always checks
    with fastattn.checking(), pytest.raises(error, match=match):
        call(w, ids)
