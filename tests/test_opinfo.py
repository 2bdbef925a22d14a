"""PyTorch's own OpInfo cases for the four drop-ins: every sample input of
F.scaled_dot_product_attention, F.layer_norm, F.rms_norm and F.embedding (the inputs torch tests
itself with, torch.testing._internal.common_methods_invocations.op_db) gives torch's result (the
error rule of DESIGN.md against float64, forward and every gradient, and embedding's in-place
max_norm renorm), and every error input raises.

Exceptions, each checked for what can be checked: samples with dropout_p > 0 draw other random
numbers than torch's (shape, dtype, finite values and gradients, reproducibility under
torch.manual_seed), and F.embedding(sparse=True) raises NotImplementedError naming it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn

from helpers import assert_kernels_ran, assert_within_torch_error

pytest.importorskip("expecttest")  # torch.testing._internal needs it
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# OpInfo name -> (fastattn's function, torch's function, the kernels that must have run). The
# embedding OpInfo calls its op as op(weight, indices, **kwargs).
OPS = {
    "nn.functional.scaled_dot_product_attention": (
        fastattn.scaled_dot_product_attention, F.scaled_dot_product_attention, ["attention_fwd"]),
    "nn.functional.layer_norm": (fastattn.layer_norm, F.layer_norm, ["norm_fwd"]),
    "nn.functional.rms_norm": (fastattn.rms_norm, F.rms_norm, ["norm_fwd"]),
    "nn.functional.embedding": (lambda w, idx, **kw: fastattn.embedding(idx, w, **kw),
                                lambda w, idx, **kw: F.embedding(idx, w, **kw), ["embedding_fwd"]),
}
# native_layer_norm's error inputs are F.layer_norm's (same positional arguments).
ERROR_OPS = {"nn.functional.rms_norm": fastattn.rms_norm,
             "nn.functional.embedding": OPS["nn.functional.embedding"][0],
             "native_layer_norm": fastattn.layer_norm}
_OPINFO = {op.name: op for op in op_db if not op.variant_test_name}


def _samples():
    for name in OPS:
        for dtype in DTYPES:
            samples = _OPINFO[name].sample_inputs("cpu", dtype, requires_grad=True)
            for i, _ in enumerate(samples):
                yield pytest.param(name, dtype, i, id=f"{name.split('.')[-1]}-{dtype}-{i}"[6:])


def _sample(name, dtype, index, device):
    """The index-th OpInfo sample (a fresh draw: make_tensor under a fixed seed) on `device`."""
    torch.manual_seed(index)
    samples = list(_OPINFO[name].sample_inputs("cpu", dtype, requires_grad=True))
    s = samples[index].transform(lambda t: t.detach().to(device).requires_grad_(t.requires_grad)
                                 if isinstance(t, torch.Tensor) else t)
    return s.input, list(s.args), dict(s.kwargs)


def _cast(x, dtype):
    """A floating tensor as a fresh copy in `dtype` (a leaf keeping requires_grad), anything else
    as is."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(dtype, copy=True).requires_grad_(x.requires_grad)
    return x


def _run(fn, inp, args, kwargs, dtype, cotangent=None):
    """fn on copies of the sample's floating tensors in `dtype` -> (output, the gradients of the
    copies that require grad for `cotangent`, the copies after the call: max_norm renormalises
    the embedding weight in place)."""
    tensors = [_cast(t, dtype) for t in (inp, *args, *kwargs.values())]
    out = fn(tensors[0], *tensors[1:1 + len(args)], **dict(zip(kwargs, tensors[1 + len(args):])))
    leaves = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = []
    if cotangent is not None and leaves:
        grads = list(torch.autograd.grad(out, leaves, cotangent.to(out.dtype), allow_unused=True))
    return out, grads, [t.detach() if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("name,dtype,index", list(_samples()))
def test_opinfo_sample_matches_torch(name, dtype, index, device):
    ours_fn, torch_fn, kernels = OPS[name]
    inp, args, kwargs = _sample(name, dtype, index, device)
    if kwargs.get("sparse"):
        with pytest.raises(NotImplementedError, match="sparse"):
            ours_fn(inp, *args, **kwargs)
    elif kwargs.get("dropout_p", 0.0) > 0.0:
        _check_dropout_sample(ours_fn, torch_fn, inp, args, kwargs, dtype)
    else:
        _check_values(name, ours_fn, torch_fn, kernels, inp, args, kwargs, dtype, device)


def _check_values(name, ours_fn, torch_fn, kernels, inp, args, kwargs, dtype, device):
    """Output, every gradient and the arguments after the call (in-place effects) against
    float64, torch's own op in `dtype` as the yardstick; the kernels ran."""
    ref, _, _ = _run(torch_fn, inp, args, kwargs, torch.float64)
    cotangent = torch.randn(ref.shape, dtype=torch.float64, device=device)
    ref, ref_grads, ref_after = _run(torch_fn, inp, args, kwargs, torch.float64, cotangent)
    theirs, their_grads, their_after = _run(torch_fn, inp, args, kwargs, dtype, cotangent)
    with fastattn.record_backends() as ran:
        ours, our_grads, our_after = _run(ours_fn, inp, args, kwargs, dtype, cotangent)
    assert_kernels_ran(ran, kernels, device)
    assert_within_torch_error(f"{name} out", ours, theirs, ref, dtype)
    assert len(our_grads) == len(ref_grads)
    for i, (g, t, r) in enumerate(zip(our_grads, their_grads, ref_grads)):
        if r is None:
            assert g is None or not g.any(), f"gradient {i}: torch gives none, ours is nonzero"
            continue
        assert g is not None, f"gradient {i}: torch computes it, ours is None"
        assert_within_torch_error(f"{name} grad {i}", g, t, r, dtype)
    for i, (o, t, r) in enumerate(zip(our_after, their_after, ref_after)):  # in-place effects
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            assert_within_torch_error(f"{name} argument {i} after the call", o, t, r, dtype)


def _check_dropout_sample(ours_fn, torch_fn, inp, args, kwargs, dtype):
    """Other random numbers than torch's: the shape and dtype torch gives, finite values and
    gradients, and the same result again under the same torch.manual_seed."""
    theirs = torch_fn(inp, *args, **kwargs)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        out, grads, _ = _run(ours_fn, inp, args, kwargs, dtype, torch.ones(theirs.shape))
        runs.append((out, grads))
    (out, grads), (again, grads_again) = runs
    assert out.shape == theirs.shape and out.dtype == theirs.dtype
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(out, again) and all(map(torch.equal, grads, grads_again))


def _error_inputs():
    for name in ERROR_OPS:
        for i, _ in enumerate(_OPINFO[name].error_inputs("cpu")):
            yield pytest.param(name, i, id=f"{name.split('.')[-1]}-{i}")


@pytest.mark.parametrize("name,index", list(_error_inputs()))
def test_opinfo_error_input_raises(name, index, device):
    """Every OpInfo error input raises a clear error (ValueError / TypeError / IndexError where
    torch raises RuntimeError), never a crash inside Triton or an answer."""
    error = list(_OPINFO[name].error_inputs("cpu"))[index]
    s = error.sample_input.transform(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
    with pytest.raises((ValueError, TypeError, IndexError)):
        ERROR_OPS[name](s.input, *s.args, **s.kwargs)
