"""The host path above the launchers: the eager fast path (launchers called directly) against the
torch.library path (what torch.compile, export and opcheck see), the grad-free forward, the cached
dispatch decision, and checking mode (no host sync on CUDA unless asked; bad indices and
cu_seqlens never read or written out of bounds)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import _dispatch, _validate
from conftest import HAS_CUDA
from helpers import assert_kernels_ran

attention_module = importlib.import_module("fastattn.attention")
embedding_module = importlib.import_module("fastattn.embedding")


def _leaves(*shapes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).to(device).requires_grad_() for s in shapes]


def _cu(lengths, device):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


def _cases(device):
    """(name, leaves, fn(*leaves) -> output): every public op, with the options that change the
    launch (masks, causal, GQA, dropout, residual, fused embeddings)."""
    q, k, v = _leaves((2, 4, 9, 8), (2, 2, 11, 8), (2, 2, 11, 8), device=device, seed=1)
    mask = torch.rand(9, 11, generator=torch.Generator().manual_seed(2)).to(device) > 0.3
    x, w, b, r = _leaves((5, 24), (24,), (24,), (5, 24), device=device, seed=3)
    table, pos, types = _leaves((13, 8), (7, 8), (2, 8), device=device, seed=4)
    lnw, lnb = _leaves((8,), (8,), device=device, seed=5)
    ids = torch.tensor([[0, 3, 12, 3], [5, 5, 1, 0]], device=device)
    pq, pk, pv = _leaves((7, 4, 8), (9, 2, 8), (9, 2, 8), device=device, seed=6)
    cu_q, cu_k = _cu([3, 4], device), _cu([4, 5], device)
    sdpa = fastattn.scaled_dot_product_attention
    return [
        ("sdpa mask gqa", [q, k, v], lambda q, k, v: sdpa(q, k, v, attn_mask=mask,
                                                          enable_gqa=True)),
        ("sdpa causal dropout", [q, k, v],
         lambda q, k, v: sdpa(q, k, v, is_causal=True, dropout_p=0.3, enable_gqa=True)),
        ("varlen causal", [pq, pk, pv],
         lambda q, k, v: fastattn.varlen_attention(q, k, v, cu_q, cu_k, 4, 5, causal=True)),
        ("layer_norm", [x, w, b], lambda x, w, b: fastattn.layer_norm(x, (24,), w, b)),
        ("rms_norm", [x, w], lambda x, w: fastattn.rms_norm(x, (24,), w)),
        ("add_layer_norm", [x, r, w, b],
         lambda x, r, w, b: torch.cat(fastattn.add_layer_norm(x, r, 24, w, b))),
        ("embedding", [table], lambda t: fastattn.embedding(ids, t, padding_idx=0)),
        ("gpt_embeddings", [table, pos], lambda t, p: fastattn.gpt_embeddings(ids, t, p)),
        ("bert_embeddings", [table, pos, types, lnw, lnb],
         lambda t, p, y, w_, b_: fastattn.bert_embeddings(ids, t, p, y, w_, b_, dropout_p=0.2)),
    ]


def _run(fn, leaves):
    """fn's output and the gradients of every leaf (under a fixed seed: dropout redraws alike)."""
    torch.manual_seed(0)
    out = fn(*leaves)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
    return [out, *torch.autograd.grad(out, leaves, cotangent)]


def _library_calls(fn) -> list[str]:
    """The fastattn custom ops that went through torch.library while fn ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name.startswith("fastattn::")})


@pytest.mark.parametrize("case", range(9), ids=lambda i: _cases("cpu")[i][0])
def test_eager_path_is_bitwise_the_library_path(case, device, monkeypatch):
    """Each op, forward and every gradient: the eager path (no torch.library dispatch) gives
    bitwise what the custom ops give, and the Triton kernels ran on both."""
    name, leaves, fn = _cases(device)[case]
    with fastattn.record_backends() as ran:
        assert _library_calls(lambda: _run(fn, leaves)) == []
        eager = _run(fn, leaves)
    assert_kernels_ran(ran, [], device)
    monkeypatch.setattr(_dispatch, "_traced", lambda tensor: True)
    with fastattn.record_backends() as ran_library:
        calls = _library_calls(lambda: _run(fn, leaves))
        library = _run(fn, leaves)
    assert calls, f"{name}: the patched switch did not reach the custom ops"
    assert ran_library == ran, f"{name}: the paths ran different launchers"
    for i, (a, b) in enumerate(zip(eager, library)):
        assert torch.equal(a, b), f"{name}: output {i} differs between the two paths"


def test_traced_under_fake_tensors_and_dispatch_modes():
    """Fake tensors, and any TorchDispatchMode, take the torch.library path (a launcher cannot
    run on them); plain tensors and parameters do not."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 8)
    assert not _dispatch._traced(x)
    assert not _dispatch._traced(torch.nn.Parameter(x))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert _dispatch._traced(fake)
        y = fastattn.layer_norm(fake, (8,))  # runs the op's fake implementation
    assert y.shape == x.shape


def test_no_autograd_node_without_grad(device):
    """Without a gradient to compute the forward runs without the autograd.Function, with the
    same values; with one, the output has the Function's backward node."""
    x, w, b = _leaves((6, 16), (16,), (16,), device=device, seed=7)
    with_grad = fastattn.layer_norm(x, (16,), w, b)
    assert type(with_grad.grad_fn).__name__ == "_NormFnBackward"
    with torch.no_grad():
        no_grad = fastattn.layer_norm(x, (16,), w, b)
    plain = fastattn.layer_norm(x.detach(), (16,), w.detach(), b.detach())
    assert no_grad.grad_fn is None and plain.grad_fn is None
    assert torch.equal(no_grad, with_grad.detach()) and torch.equal(plain, no_grad)
    q = _leaves((1, 2, 5, 8), device=device, seed=8)[0]
    with torch.no_grad():
        out, lse = fastattn.scaled_dot_product_attention(q, q, q, return_lse=True)
    ref_out, ref_lse = fastattn.scaled_dot_product_attention(q, q, q, return_lse=True)
    assert out.grad_fn is None and torch.equal(out, ref_out.detach()) and torch.equal(lse, ref_lse)


def test_dispatch_decision_follows_triton_interpret(monkeypatch):
    """The cached path still follows TRITON_INTERPRET: unset, CPU tensors take torch's ops; set,
    the interpreter where Triton was imported interpreted (a CPU session), and a clear error
    where it was imported compiled (a CUDA session)."""
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fastattn.backend(cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if HAS_CUDA:
        with pytest.raises(RuntimeError, match="Triton was imported while it was unset"):
            fastattn.backend(cpu)
    else:
        assert fastattn.backend(cpu) == "triton-interpreter"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert fastattn.backend(cpu) == "torch"
    assert fastattn.backend(torch.device("meta")) == "torch"


def test_checking_mode():
    """Device reads run on the CPU always; elsewhere (a sync on a GPU) only in checking mode,
    set by fastattn.checking() or FASTATTN_CHECKS=1."""
    cpu, other = torch.zeros(2), torch.zeros(2, device="meta")
    assert _validate.read_device_values(cpu)
    assert not _validate.read_device_values(other)
    with fastattn.checking():
        assert _validate.read_device_values(other)
        with fastattn.checking(False):
            assert not _validate.read_device_values(other)
        assert _validate.read_device_values(other)
    assert not _validate.read_device_values(other)
    code = ("import torch, fastattn._validate as v; "
            "print(v.read_device_values(torch.zeros(1, device='meta')))")
    env = {**os.environ, "FASTATTN_CHECKS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "True"


@pytest.fixture
def unchecked(monkeypatch):
    """What CUDA does outside checking mode: no value is read back, the kernels get bad input."""
    for module in (attention_module, embedding_module):
        monkeypatch.setattr(module, "read_device_values", lambda t: False)


def test_unchecked_out_of_range_indices_read_nothing_outside(unchecked, device):
    """An index out of range, unchecked, gives a zero row and no gradient; the other rows and
    their gradients are exact."""
    table = torch.randn(10, 4, device=device, requires_grad=True)
    ids = torch.tensor([3, -1, 10, 7, 3, 1000], device=device)
    with fastattn.record_backends() as ran:
        out = fastattn.embedding(ids, table)
        out.backward(torch.ones_like(out))
    assert_kernels_ran(ran, ["embedding_fwd", "embedding_bwd"], device)
    good = torch.tensor([True, False, False, True, True, False])
    assert torch.equal(out[good], table.detach()[ids[good]])
    assert torch.equal(out[~good], torch.zeros(3, 4, device=device))
    expected = torch.zeros(10, 4)
    expected[3], expected[7] = 2.0, 1.0
    assert torch.equal(table.grad.cpu(), expected)


@pytest.mark.parametrize("bad,clamped", [([0, 5, 100], [0, 5, 8]), ([0, -3, 8], [0, 0, 8]),
                                         ([0, 6, 2], [0, 6, 6]), ([-5, 4, 8], [0, 4, 8])])
def test_unchecked_bad_cu_seqlens_stay_inside_the_packed_rows(bad, clamped, unchecked, device):
    """A bad cu_seqlens, unchecked, is clamped to the packed rows by the kernels: the result is
    that of the clamped offsets, and rows past the tensors (NaN guards in the same buffer) are
    never read."""
    T, H, D = 8, 2, 16

    def packed(seed):  # (T, H, D) views of a (T + 8, H, D) buffer whose tail is NaN
        buf = torch.full((T + 8, H, D), float("nan"))
        buf[:T] = torch.randn(T, H, D, generator=torch.Generator().manual_seed(seed))
        return buf.to(device)[:T].requires_grad_()

    q, k, v = packed(1), packed(2), packed(3)
    results = []
    for offsets in (bad, clamped):
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        for t in (q, k, v):
            t.grad = None
        out = fastattn.varlen_attention(q, k, v, cu, cu, T, T)
        out.backward(torch.ones_like(out))
        results.append([out, q.grad, k.grad, v.grad])
    rows = torch.zeros(T, dtype=torch.bool)
    rows[min(clamped):max(clamped)] = True  # the rows the clamped sequences cover
    for name, a, b in zip(["out", "dq", "dk", "dv"], *results):
        assert torch.isfinite(a[rows]).all(), f"{name}: a NaN guard row was read"
        assert torch.equal(a[rows], b[rows]), f"{name}: differs from the clamped cu_seqlens"


def test_launchers_use_plain_integer_helpers():
    """Host code in kernels/ computes grids and block sizes with configs.cdiv / next_power_of_2,
    never triton.cdiv / triton.next_power_of_2: those are ConstexprFunction objects in Triton 3.6
    and 3.9, about 5 µs a call from Python (a backward computed five grids with them). The
    helpers agree with exact arithmetic."""
    import ast
    import math
    import pathlib

    from fastattn.kernels import configs

    kernels = pathlib.Path(__file__).parents[1] / "kernels"
    sources = sorted(kernels.glob("*.py"))
    assert len(sources) >= 6
    slow = [f"{p.name}:{node.lineno} triton.{node.attr}" for p in sources
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.Attribute) and node.attr in ("cdiv", "next_power_of_2")
            and isinstance(node.value, ast.Name) and node.value.id == "triton"]
    assert not slow, slow
    for a in range(0, 300):
        for b in (1, 3, 16, 64, 128):
            assert configs.cdiv(a, b) == math.ceil(a / b), (a, b)
        assert configs.next_power_of_2(a) == (1 if a <= 1 else 2 ** math.ceil(math.log2(a)))
