"""fastattn.testing, the public precision rule: the bound it computes, and what assert_parity
refuses (an error over the bound, a shape or dtype mismatch, non-finite values)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.testing import ATOL, Parity, assert_parity, parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bound_is_twice_torchs_error_plus_scaled_atol(dtype):
    ref = torch.tensor([0.0, -4.0, 2.0], dtype=torch.float64)  # max |ref| = 4
    theirs = (ref + torch.tensor([0.0, 0.25, 0.0], dtype=torch.float64)).to(dtype)
    ours = (ref + torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)).to(dtype)
    p = parity(ours, theirs, ref, dtype)
    assert (p.err, p.torch_err) == (0.5, 0.25)  # exact in every dtype
    assert p.bound == pytest.approx(2 * 0.25 + ATOL[dtype] * 4)
    assert p.ok == (0.5 <= p.bound)


def test_empty_outputs_pass():
    empty = torch.empty(0, 3)
    assert parity(empty, empty.clone(), empty.double(), torch.float32) == Parity(0.0, 0.0, 0.0)


def test_parity_refuses_a_dtype_without_atol():
    x = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="torch.float64 has no atol"):
        parity(x, x.clone(), x.clone(), torch.float64)


def _layer_norm_case(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 33, generator=gen).to(dtype)  # (M, N)
    ref = F.layer_norm(x.double(), (33,))
    return fastattn.layer_norm(x, (33,)), F.layer_norm(x, (33,)), ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_assert_parity_passes_fastattn_and_returns_the_numbers(dtype):
    ours, theirs, ref = _layer_norm_case(dtype)
    p = assert_parity(ours, theirs, ref, name="out")
    assert p.ok and p.err > 0 and p.bound > p.err


def test_assert_parity_names_the_output_and_its_numbers_when_over_the_bound():
    ours, theirs, ref = _layer_norm_case(torch.float32)
    with pytest.raises(AssertionError, match=r"^dx: error 1\.0\d*e-01 > 2 x torch's .* \(.*\)$"):
        assert_parity(ours + 0.1, theirs, ref, name="dx")


@pytest.mark.parametrize("change, message", [
    (lambda t: t[:, :-1], "shape"),
    (lambda t: t.double(), "dtype"),
    (lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), "non-finite"),
])
def test_assert_parity_refuses(change, message):
    ours, theirs, ref = _layer_norm_case(torch.float32)
    with pytest.raises(AssertionError, match=message):
        assert_parity(change(ours), theirs, ref)
