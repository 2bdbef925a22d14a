"""LayerNorm / RMSNorm / add_layer_norm against float64 references, with torch's own error in the
same dtype as the yardstick (DESIGN.md). Runs on CUDA, or under Triton's interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import reference
from helpers import assert_kernels_ran, assert_within_torch_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, hidden): odd hidden sizes, none a multiple of a block; 4099 and 65536 take the wide-row
# (chunked) path under the interpreter, 65536 on the GPU too.
SIZES = [(37, 1), (37, 3), (37, 97), (19, 768), (13, 1000), (5, 4099), (3, 65536)]


def _inputs(rows, n, dtype, device, *, weight=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 2 + 0.5).to(dtype).to(device).requires_grad_()
    w = (torch.randn(n, generator=g) + 1).to(dtype).to(device).requires_grad_() if weight else None
    b = torch.randn(n, generator=g).to(dtype).to(device).requires_grad_() if bias else None
    dy = torch.randn(rows, n, generator=g).to(dtype).to(device)
    return x, w, b, dy


def _run(fn, tensors, dy):
    """Output and the gradients of every tensor in `tensors` for upstream gradient dy."""
    out = fn(*tensors)
    grads = torch.autograd.grad(out, [t for t in tensors if t is not None], dy)
    return [out, *grads]


def _f64(tensors):
    return [t.detach().double().requires_grad_() if t is not None else None for t in tensors]


def _check(name, ours, theirs, ref, dtype):
    labels = ["out", "dx", "dweight", "dbias", "dresidual"]
    for label, a, b, r in zip(labels, ours, theirs, ref):
        assert_within_torch_error(f"{name} {label}", a, b.to(a.device), r.to(a.device), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SIZES)
def test_layer_norm(rows, n, dtype, device):
    x, w, b, dy = _inputs(rows, n, dtype, device)
    with fastattn.record_backends() as ran:
        ours = _run(lambda x, w, b: fastattn.layer_norm(x, (n,), w, b), [x, w, b], dy)
    assert_kernels_ran(ran, ["norm_fwd", "norm_bwd"], device)
    theirs = _run(lambda x, w, b: F.layer_norm(x, (n,), w, b), [x, w, b], dy)
    ref = _run(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), _f64([x, w, b]), dy.double())
    _check(f"layer_norm {rows}x{n}", ours, theirs, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight,bias", [(True, False), (False, True), (False, False)])
def test_layer_norm_affine_combinations(weight, bias, dtype, device):
    x, w, b, dy = _inputs(29, 97, dtype, device, weight=weight, bias=bias, seed=1)
    tensors = [t for t in (x, w, b)]
    with fastattn.record_backends() as ran:
        ours = _run(lambda x, w, b: fastattn.layer_norm(x, (97,), w, b), tensors, dy)
    assert_kernels_ran(ran, ["norm_fwd", "norm_bwd"], device)
    theirs = _run(lambda x, w, b: F.layer_norm(x, (97,), w, b), tensors, dy)
    ref = _run(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), _f64(tensors), dy.double())
    _check("layer_norm affine", ours, theirs, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SIZES)
def test_rms_norm(rows, n, dtype, device):
    x, w, _, dy = _inputs(rows, n, dtype, device, bias=False, seed=2)
    with fastattn.record_backends() as ran:
        ours = _run(lambda x, w: fastattn.rms_norm(x, (n,), w), [x, w], dy)
    assert_kernels_ran(ran, ["norm_fwd", "norm_bwd"], device)
    theirs = _run(lambda x, w: F.rms_norm(x, (n,), w), [x, w], dy)
    eps = torch.finfo(dtype).eps  # F.rms_norm's default
    ref = _run(lambda x, w: reference.rms_norm(x, w, eps), _f64([x, w]), dy.double())
    _check(f"rms_norm {rows}x{n}", ours, theirs, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_without_weight(dtype, device):
    x, _, _, dy = _inputs(31, 1000, dtype, device, weight=False, bias=False, seed=3)
    with fastattn.record_backends() as ran:
        ours = _run(lambda x: fastattn.rms_norm(x, [1000], eps=1e-6), [x], dy)
    assert_kernels_ran(ran, ["norm_fwd", "norm_bwd"], device)
    theirs = _run(lambda x: F.rms_norm(x, [1000], eps=1e-6), [x], dy)
    ref = _run(lambda x: reference.rms_norm(x, None, 1e-6), _f64([x]), dy.double())
    _check("rms_norm no weight", ours, theirs, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("rows,n", [(37, 1), (19, 768), (5, 4099)])
def test_add_layer_norm(rows, n, rms, dtype, device):
    """(out, h) = (norm(x + residual), x + residual); the gradient reaches x and residual through
    both outputs."""
    x, w, b, dy = _inputs(rows, n, dtype, device, seed=4)
    r = torch.randn(rows, n, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)
    r.requires_grad_()
    dh = torch.randn(rows, n, generator=torch.Generator().manual_seed(6)).to(dtype).to(device)
    b = None if rms else b

    def run(norm, x, r, w, b):
        h = x + r
        return norm(h, w, b), h

    def grads(outs, tensors):
        return list(outs) + list(torch.autograd.grad(
            outs, [t for t in tensors if t is not None], [dy.to(outs[0].dtype), dh.to(outs[0].dtype)]))

    with fastattn.record_backends() as ran:
        outs = fastattn.add_layer_norm(x, r, (n,), w, b, rms=rms)
        ours = grads(outs, [x, w, b, r])
    assert_kernels_ran(ran, ["norm_fwd", "norm_bwd"], device)
    if rms:
        torch_norm = lambda h, w, b: F.rms_norm(h, (n,), w, eps=1e-5)  # noqa: E731
        ref_norm = lambda h, w, b: reference.rms_norm(h, w, 1e-5)  # noqa: E731
    else:
        torch_norm = lambda h, w, b: F.layer_norm(h, (n,), w, b)  # noqa: E731
        ref_norm = lambda h, w, b: reference.layer_norm(h, w, b, 1e-5)  # noqa: E731
    theirs = grads(run(torch_norm, x, r, w, b), [x, w, b, r])
    x64, r64, w64, b64 = _f64([x, r, w, b])
    ref = grads(run(ref_norm, x64, r64, w64, b64), [x64, w64, b64, r64])
    labels = ["out", "h", "dx", "dweight"] + (["dbias"] if b is not None else []) + ["dresidual"]
    for label, a, t, rf in zip(labels, ours, theirs, ref):
        assert_within_torch_error(f"add_layer_norm {label}", a, t, rf, dtype)


@pytest.mark.parametrize("layout", ["column_stride_2", "transposed", "broadcast_rows"])
def test_strided_and_broadcast_inputs(layout, device):
    """Non-contiguous inputs (and a non-contiguous upstream gradient) give the contiguous answer."""
    g = torch.Generator().manual_seed(7)
    if layout == "column_stride_2":  # (4, 9, 194)[..., ::2]: column stride 2, read in place
        x = torch.randn(4, 9, 194, generator=g).to(device)[..., ::2]
    elif layout == "transposed":  # (9, 4, 97) viewed as (4, 9, 97)
        x = torch.randn(9, 4, 97, generator=g).to(device).transpose(0, 1)
    else:  # one row broadcast to (4, 9, 97): row stride 0
        x = torch.randn(97, generator=g).to(device).expand(4, 9, 97)
    x = x.requires_grad_() if x.is_leaf else x.detach().requires_grad_()
    w = torch.randn(97, generator=g).to(device).requires_grad_()
    b = torch.randn(97, generator=g).to(device).requires_grad_()
    dy = torch.randn(97, 9, 4, generator=g).to(device).permute(2, 1, 0)  # non-contiguous
    with fastattn.record_backends() as ran:
        ours = _run(lambda x, w, b: fastattn.layer_norm(x, 97, w, b), [x, w, b], dy)
    assert_kernels_ran(ran, ["norm_fwd", "norm_bwd"], device)
    theirs = _run(lambda x, w, b: F.layer_norm(x, (97,), w, b), [x, w, b], dy)
    ref = _run(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), _f64([x, w, b]), dy.double())
    _check(f"layer_norm {layout}", ours, theirs, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_with_float32_parameters(dtype, device):
    """Mixed precision as torch allows it: half input, fp32 weight and bias, output in the input's
    dtype, parameter gradients in fp32."""
    x, w, b, dy = _inputs(23, 768, dtype, device, seed=12)
    w, b = (t.detach().float().requires_grad_() for t in (w, b))
    with fastattn.record_backends() as ran:
        ours = _run(lambda x, w, b: fastattn.layer_norm(x, (768,), w, b), [x, w, b], dy)
    assert_kernels_ran(ran, ["norm_fwd", "norm_bwd"], device)
    assert ours[0].dtype == dtype and ours[2].dtype == ours[3].dtype == torch.float32
    # torch's own error from its CPU op: its CUDA layer_norm refuses fp32 parameters with half
    # input ("expected scalar type Half but found Float", torch 2.11)
    on_cpu = [t.detach().cpu().requires_grad_() for t in (x, w, b)]
    theirs = _run(lambda x, w, b: F.layer_norm(x, (768,), w, b), on_cpu, dy.cpu())
    ref = _run(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), _f64([x, w, b]), dy.double())
    _check("layer_norm mixed", ours, theirs, ref, dtype)


@pytest.mark.parametrize("eps,x_scale", [(0.01, 0.05), (-0.5, 1.0)], ids=["small-var", "negative"])
@pytest.mark.parametrize("rms", [False, True])
def test_eps_is_used(rms, eps, x_scale, device):
    """Rows with a variance near |eps|, so a dropped or altered eps shows in the output; a
    negative eps (torch takes any float) gives torch's result too."""
    x, w, b, dy = _inputs(11, 97, torch.float32, device, seed=13)
    x = (x.detach() * x_scale).requires_grad_()
    if rms:
        ours = _run(lambda x, w: fastattn.rms_norm(x, (97,), w, eps=eps), [x, w], dy)
        theirs = _run(lambda x, w: F.rms_norm(x, (97,), w, eps=eps), [x, w], dy)
        ref = _run(lambda x, w: reference.rms_norm(x, w, eps), _f64([x, w]), dy.double())
    else:
        ours = _run(lambda x, w, b: fastattn.layer_norm(x, (97,), w, b, eps), [x, w, b], dy)
        theirs = _run(lambda x, w, b: F.layer_norm(x, (97,), w, b, eps), [x, w, b], dy)
        ref = _run(lambda x, w, b: reference.layer_norm(x, w, b, eps), _f64([x, w, b]), dy.double())
    _check(f"eps={eps}", ours, theirs, ref, torch.float32)


def test_multi_dim_normalized_shape(device):
    """normalized_shape over two trailing dims, as F.layer_norm allows."""
    x, _, _, dy = _inputs(6, 5 * 7, torch.float32, device, seed=8)
    x = x.detach().view(6, 5, 7).requires_grad_()
    w = torch.randn(5, 7).to(device).requires_grad_()
    b = torch.randn(5, 7).to(device).requires_grad_()
    dy = dy.view(6, 5, 7)
    ours = _run(lambda x, w, b: fastattn.layer_norm(x, (5, 7), w, b), [x, w, b], dy)
    theirs = _run(lambda x, w, b: F.layer_norm(x, (5, 7), w, b), [x, w, b], dy)
    ref = _run(lambda x, w, b: F.layer_norm(x, (5, 7), w, b), _f64([x, w, b]), dy.double())
    _check("layer_norm (5, 7)", ours, theirs, ref, torch.float32)


def test_empty_rows(device):
    x = torch.randn(0, 768, device=device, requires_grad=True)
    w = torch.randn(768, device=device, requires_grad=True)
    y = fastattn.layer_norm(x, (768,), w)
    assert y.shape == (0, 768)
    y.sum().backward()
    assert x.grad.shape == (0, 768)
    assert torch.equal(w.grad, torch.zeros(768, device=device))


def test_many_rows(device):
    """70000 rows: more programs than any one tile, and a long backward row loop."""
    x, w, b, dy = _inputs(70000, 8, torch.float32, device, seed=9)
    ours = _run(lambda x, w, b: fastattn.layer_norm(x, 8, w, b), [x, w, b], dy)
    theirs = _run(lambda x, w, b: F.layer_norm(x, (8,), w, b), [x, w, b], dy)
    ref = _run(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), _f64([x, w, b]), dy.double())
    _check("layer_norm 70000 rows", ours, theirs, ref, torch.float32)


@pytest.mark.parametrize("n", [768, 4099])
def test_backward_is_bitwise_deterministic(n, device):
    x, w, b, dy = _inputs(300 if n < 4096 else 40, n, torch.float32, device, seed=10)
    first = _run(lambda x, w, b: fastattn.layer_norm(x, n, w, b), [x, w, b], dy)
    second = _run(lambda x, w, b: fastattn.layer_norm(x, n, w, b), [x, w, b], dy)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


def test_reference_fallback_on_cpu_without_interpreter(monkeypatch):
    """CPU tensors without TRITON_INTERPRET run the eager reference, with the same results."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fastattn.backend(torch.zeros(1)) == "torch"
    x, w, b, dy = _inputs(17, 97, torch.float16, "cpu", seed=11)
    r = torch.randn(17, 97, dtype=torch.float16)
    with fastattn.record_backends() as ran:
        ours = _run(lambda x, w, b: fastattn.add_layer_norm(x, r, 97, w, b)[0], [x, w, b], dy)
    assert ran == [("norm_fwd", "torch"), ("norm_bwd", "torch")]
    h = (x + r).detach()
    theirs = _run(lambda x, w, b: F.layer_norm(x + r, (97,), w, b), [x, w, b], dy)
    ref = _run(lambda x, w, b: reference.layer_norm(x + r.double(), w, b, 1e-5), _f64([x, w, b]),
               dy.double())
    assert h.shape == ours[0].shape
    _check("reference add_layer_norm", ours, theirs, ref, torch.float16)


def test_custom_ops_pass_opcheck(device):
    """Schemas, fake (meta) implementations and autograd registration: what torch.compile needs."""
    x = torch.randn(5, 33, device=device)
    w, b = torch.randn(33, device=device), torch.randn(33, device=device)
    r = torch.randn(5, 33, device=device)
    torch.library.opcheck(torch.ops.fastattn.norm_fwd.default, (x, w, b, r, 1e-5, False))
    y, h, mean, rstd = torch.ops.fastattn.norm_fwd(x, w, b, r, 1e-5, False)
    torch.library.opcheck(torch.ops.fastattn.norm_bwd.default,
                          (torch.randn_like(y), h, w, b, mean, rstd, None, False, True, True))


# ---- bad input: a clear error naming the argument, never a crash in Triton ----


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w: fastattn.layer_norm(x, (96,), w), ValueError, "normalized_shape"),
    (lambda x, w: fastattn.layer_norm(x, (3, 97), None), ValueError, "normalized_shape"),
    (lambda x, w: fastattn.layer_norm(x, (), None), ValueError, "normalized_shape"),
    (lambda x, w: fastattn.layer_norm(x, "97", None), TypeError, "normalized_shape"),
    (lambda x, w: fastattn.layer_norm(x, (97,), w[:50]), ValueError, "weight must have shape"),
    (lambda x, w: fastattn.layer_norm(x, (97,), None, w.view(1, 97)), ValueError, "bias"),
    (lambda x, w: fastattn.layer_norm(x.long(), (97,), w), TypeError, "input has dtype int64"),
    (lambda x, w: fastattn.layer_norm(x.double(), (97,)), TypeError, "input has dtype float64"),
    (lambda x, w: fastattn.layer_norm(x, (97,), w.half()), TypeError, "weight has dtype float16"),
    (lambda x, w: fastattn.layer_norm(x, (97,), w, w.half()), TypeError, "one dtype"),
    (lambda x, w: fastattn.layer_norm(x, (97,), w.to("meta")), ValueError, "one device"),
    (lambda x, w: fastattn.layer_norm(x, (97,), w, eps="1e-5"), TypeError, "eps must be a float"),
    (lambda x, w: fastattn.rms_norm(x, (97,), w, eps=torch.tensor(1e-5)), TypeError, "eps"),
    (lambda x, w: fastattn.rms_norm(x, (97,), w.long()), TypeError, "weight has dtype int64"),
    (lambda x, w: fastattn.add_layer_norm(x, x[:2], (97,)), ValueError, "residual"),
    (lambda x, w: fastattn.add_layer_norm(x, x.half(), (97,)), TypeError, "one dtype"),
])
def test_bad_input_raises_clear_error(call, error, match, device):
    x = torch.randn(4, 97, device=device)
    w = torch.randn(97, device=device)
    with pytest.raises(error, match=match):
        call(x, w)


def test_torch_compile_fullgraph_matches_eager(device):
    """The ops trace into one graph (custom ops with fake impls) and give the eager results."""
    torch._dynamo.reset()
    x, w, b, dy = _inputs(8, 64, torch.float32, device, seed=14)
    r = torch.randn(8, 64, device=device, requires_grad=True)

    def f(x, r, w, b):
        out, h = fastattn.add_layer_norm(x, r, 64, w, b)
        return fastattn.layer_norm(out, (64,), w, b) * 2 + h

    eager = _run(f, [x, r, w, b], dy)
    with fastattn.record_backends() as ran:
        compiled = _run(torch.compile(f, fullgraph=True), [x, r, w, b], dy)
    assert_kernels_ran(ran, ["norm_fwd", "norm_bwd"], device)
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_rows_on_gpu(dtype):
    """Sizes the interpreter cannot afford: 8192 rows x 8192 on the compiled kernel."""
    x, w, b, dy = _inputs(8192, 8192, dtype, "cuda", seed=15)
    with fastattn.record_backends() as ran:
        ours = _run(lambda x, w, b: fastattn.layer_norm(x, (8192,), w, b), [x, w, b], dy)
    assert_kernels_ran(ran, ["norm_fwd", "norm_bwd"], "cuda")
    theirs = _run(lambda x, w, b: F.layer_norm(x, (8192,), w, b), [x, w, b], dy)
    ref = _run(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), _f64([x, w, b]), dy.double())
    _check("layer_norm 8192x8192", ours, theirs, ref, dtype)


@pytest.mark.gpu
def test_launches_on_the_tensors_gpu():
    """A tensor on the second GPU runs there while another GPU is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    x, w, b, dy = _inputs(64, 768, torch.float16, "cuda:1", seed=16)
    with torch.cuda.device(0):
        ours = _run(lambda x, w, b: fastattn.layer_norm(x, (768,), w, b), [x, w, b], dy)
    theirs = _run(lambda x, w, b: F.layer_norm(x, (768,), w, b), [x, w, b], dy)
    ref = _run(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), _f64([x, w, b]), dy.double())
    _check("layer_norm cuda:1", ours, theirs, ref, torch.float16)
