"""fastattn.flash_attn, flash-attn 2.8's interface, against float64 references.

A port of flash-attn's tests/test_flash_attn.py for the six functions (test_flash_attn_output,
_varlen_output, _causal, _deterministic, the qkv-packed tests) at Triton-interpreter sizes: a few
chosen cases, not its cartesian product. Its reference attention_ref becomes
fastattn.reference.scaled_dot_product_attention with bottom-right alignment, run one sequence at a
time, and its rule stays: the error of ours against the float64 reference is at most twice the
error of the same reference computed in the inputs' low precision (plus a small atol,
fastattn.testing), for out, softmax_lse, the probabilities S_dmask and every gradient. With
dropout, S_dmask's sign bits give the mask the kernel drew and the reference applies it. Then:
dropout replayed from torch.manual_seed without S_dmask, every error path, and bert_padding's
pad_input / unpad_input against fastattn.pad / unpad.
"""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.flash_attn import (flash_attn_func, flash_attn_kvpacked_func,
                                 flash_attn_qkvpacked_func, flash_attn_varlen_func,
                                 flash_attn_varlen_kvpacked_func,
                                 flash_attn_varlen_qkvpacked_func)
from fastattn.flash_attn.bert_padding import (index_first_axis, index_put_first_axis, pad_input,
                                              unpad_input)
from helpers import assert_kernels_ran, assert_within_torch_error

DENSE_OPS = ["attention_fwd", "attention_bwd"]
VARLEN_OPS = ["varlen_attention_fwd", "varlen_attention_bwd"]
BATCH = 2


# ---- the reference: flash-attn's attention_ref, one sequence at a time ----


@dataclass(frozen=True)
class Case:
    """One parametrisation of the port. lens_q / lens_k: one length per sequence (dense: BATCH
    equal ones). alibi: None, "h" (nheads,) or "bh" (batch, nheads) slopes. packed: None, "kv" or
    "qkv". probs: return_attn_probs (flash-attn's tests always set it; here some cases test the
    plain return value)."""

    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    H: int
    Hk: int
    D: int
    dtype: torch.dtype
    causal: bool = False
    local: bool = False
    softcap: float = 0.0
    alibi: Optional[str] = None
    dropout_p: float = 0.0
    packed: Optional[str] = None
    probs: bool = True
    scale: Optional[float] = None

    def __str__(self):
        dt = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[self.dtype]
        heads = "mha" if self.H == self.Hk else ("mqa" if self.Hk == 1 else "gqa")
        flags = [f for f, on in (("causal", self.causal), ("local", self.local),
                                 (f"softcap{self.softcap:g}", self.softcap),
                                 (f"alibi-{self.alibi}", self.alibi),
                                 (f"dropout{self.dropout_p}", self.dropout_p),
                                 (f"{self.packed}packed", self.packed), ("probs", self.probs),
                                 (f"scale{self.scale}", self.scale is not None)) if on]
        lens = (f"{max(self.lens_q)}x{max(self.lens_k)}")
        return "-".join([lens, f"d{self.D}", heads, dt, *flags])


def _sequences(t: torch.Tensor, cu: Optional[list[int]]) -> list[torch.Tensor]:
    """(B, N, ...) -> B x (N, ...), or packed (T, ...) -> the (N_b, ...) rows of each sequence."""
    return list(t.unbind(0)) if cu is None else [t[a:b] for a, b in zip(cu, cu[1:])]


def _modifiers(c: Case, window: tuple[int, int]) -> dict:
    return dict(window=window, bottom_right=True, softcap=c.softcap)


def attention_ref(q, k, v, c: Case, window, alibi, cu_q=None, cu_k=None, keep=None):
    """flash-attn's attention_ref per sequence, in the inputs' dtype: q (B, L, H, D) or packed
    (Tq, H, D) (then cu_q, cu_k: the cu_seqlens as lists), k, v likewise; alibi (H,) / (B, H) or
    None; keep: None or the (B, H, L, S) keep-mask (the realised dropout). Returns out and lse in
    flash-attn's layouts ((B, L, H, D), (B, H, L); packed (Tq, H, D), (H, Tq))."""
    outs, lses = [], []
    for b, (qb, kb, vb) in enumerate(zip(_sequences(q, cu_q), *(_sequences(t, cu_k) for t in (k, v)))):
        L, S = qb.shape[0], kb.shape[0]
        slopes = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b])
        drop = None if keep is None else keep[b:b + 1, :, :L, :S]
        # (N, H, D) -> (1, H, N, D)
        o, lse = reference.scaled_dot_product_attention(
            *(t.transpose(0, 1)[None] for t in (qb, kb, vb)), c.causal, c.scale, None, drop,
            c.dropout_p, alibi=slopes, **_modifiers(c, window))
        outs.append(o[0].transpose(0, 1))  # (1, H, L, D) -> (L, H, D)
        lses.append(lse[0])
    if cu_q is None:
        return torch.stack(outs), torch.stack(lses)
    return torch.cat(outs), torch.cat(lses, dim=1)


def probs_ref(q, k, c: Case, window, alibi, cu_q=None, cu_k=None) -> list[torch.Tensor]:
    """Per sequence, (H, L_b, S_b): exp(score - row max), what S_dmask holds without its signs (the
    softmax, found as attention with v = I, divided by its row max; 0 for a row that sees no
    key)."""
    probs = []
    for b, (qb, kb) in enumerate(zip(_sequences(q, cu_q), _sequences(k, cu_k))):
        S, Hk = kb.shape[:2]
        eye = torch.eye(S, dtype=q.dtype).expand(1, Hk, S, S)
        slopes = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b])
        p = reference.scaled_dot_product_attention(
            qb.transpose(0, 1)[None], kb.transpose(0, 1)[None], eye, c.causal, c.scale,
            alibi=slopes, **_modifiers(c, window))[0][0]  # (H, L, S)
        top = p.amax(dim=-1, keepdim=True) if S else p.new_zeros(p.shape[:-1] + (1,))
        probs.append(torch.where(top > 0, p / top, 0.0))
    return probs


# ---- running one case ----


def _inputs(c: Case, device, seed, varlen: bool):
    """Leaves as the function takes them (packed per c.packed; varlen: unpadded by unpad_input
    from a padded batch) and do; window_size as flash-attn's tests draw it (a (2,) tensor);
    alibi_slopes; the cu_seqlens (as lists) for varlen."""
    g = torch.Generator().manual_seed(seed)
    B, L, S = len(c.lens_q), max(c.lens_q), max(c.lens_k)
    q = torch.randn(B, L, c.H, c.D, generator=g) * (c.softcap or 1.0)  # scores in softcap's range
    k, v = (torch.randn(B, S, c.Hk, c.D, generator=g) for _ in range(2))
    window = torch.randint(0, max(S, 1), (2,), generator=g) if c.local else (-1, -1)
    alibi = {None: None, "h": (c.H,), "bh": (B, c.H)}[c.alibi]
    alibi = None if alibi is None else (torch.rand(alibi, generator=g) * 0.3).to(device)
    q, k, v = (t.to(c.dtype).to(device) for t in (q, k, v))
    cu = None
    if varlen:
        masks = [(torch.arange(n) < torch.tensor(lens)[:, None]).to(device)
                 for n, lens in ((L, c.lens_q), (S, c.lens_k))]
        q, _, cu_q, max_q, used = unpad_input(q, masks[0])
        (k, _, cu_k, max_k, _), (v, *_) = (unpad_input(t, masks[1]) for t in (k, v))
        assert (max_q, max_k) == (L, S) and used.tolist() == list(c.lens_q)
        cu = (cu_q, cu_k)
    dim = 1 if varlen else 2  # the stacking dim of qkv / kv
    if c.packed == "qkv":
        leaves = [torch.stack([q, k, v], dim)]
    elif c.packed == "kv":
        leaves = [q, torch.stack([k, v], dim)]
    else:
        leaves = [q, k, v]
    leaves = [t.detach().requires_grad_() for t in leaves]
    do = torch.randn(q.shape, generator=g).to(c.dtype).to(device)
    return leaves, do, window, alibi, cu


def _unpack(c: Case, leaves, dim: int):
    """The leaves as (q, k, v) views."""
    if c.packed == "qkv":
        return leaves[0].unbind(dim)
    if c.packed == "kv":
        return (leaves[0], *leaves[1].unbind(dim))
    return tuple(leaves)


def _call(c: Case, leaves, options: dict, cu, varlen: bool):
    """The function under test for the case, on its leaves."""
    if not varlen:
        fn = {None: flash_attn_func, "kv": flash_attn_kvpacked_func,
              "qkv": flash_attn_qkvpacked_func}[c.packed]
        return fn(*leaves, **options)
    (cu_q, cu_k), max_q, max_k = cu, max(c.lens_q), max(c.lens_k)
    if c.packed == "qkv":
        return flash_attn_varlen_qkvpacked_func(*leaves, cu_q, max_q, **options)
    fn = {None: flash_attn_varlen_func, "kv": flash_attn_varlen_kvpacked_func}[c.packed]
    return fn(*leaves, cu_q, cu_k, max_q, max_k, **options)


def _check_case(c: Case, device, varlen: bool):
    leaves, do, window, alibi, cu = _inputs(c, device, zlib.crc32(str(c).encode()), varlen)
    options = dict(dropout_p=c.dropout_p, softmax_scale=c.scale, causal=c.causal,
                   window_size=window, softcap=c.softcap, alibi_slopes=alibi,
                   deterministic=False, return_attn_probs=c.probs)
    with fastattn.record_backends() as ran:
        result = _call(c, leaves, options, cu, varlen)
        out = result[0] if c.probs else result
        grads = torch.autograd.grad(out, leaves, do)
    assert_kernels_ran(ran, VARLEN_OPS if varlen else DENSE_OPS, device)
    assert isinstance(result, tuple if c.probs else torch.Tensor), type(result)
    q, k, _ = _unpack(c, leaves, 1 if varlen else 2)
    assert out.shape == q.shape and out.dtype == c.dtype and out.is_contiguous()
    window = tuple(int(w) for w in window)
    cu_q, cu_k = (None, None) if cu is None else (t.tolist() for t in cu)
    keep = None
    if c.probs:
        _, lse, s_dmask = result
        B, H, L, S = len(c.lens_q), c.H, max(c.lens_q), max(c.lens_k)
        assert s_dmask.shape == (B, H, L, S) and s_dmask.dtype == c.dtype, s_dmask.shape
        if c.dropout_p > 0:
            keep = ~torch.signbit(s_dmask).cpu()  # the sign bit marks a dropped probability

    def run(dtype):
        copies = [t.detach().cpu().to(dtype).requires_grad_() for t in leaves]
        r_alibi = None if alibi is None else alibi.cpu()
        r_out, r_lse = attention_ref(*_unpack(c, copies, 1 if varlen else 2), c, window, r_alibi,
                                     cu_q, cu_k, keep)
        grads = torch.autograd.grad(r_out, copies, do.cpu().to(dtype))
        r_q, r_k, _ = _unpack(c, [t.detach() for t in copies], 1 if varlen else 2)
        return [r_out, *grads], r_lse, probs_ref(r_q, r_k, c, window, r_alibi, cu_q, cu_k)

    (theirs, t_lse, t_probs), (ref, r_lse, r_probs) = run(c.dtype), run(torch.float64)
    names = ["out", *{None: ["dq", "dk", "dv"], "kv": ["dq", "dkv"], "qkv": ["dqkv"]}[c.packed]]
    for name, a, t, r in zip(names, [out, *grads], theirs, ref, strict=True):
        assert_within_torch_error(f"{c} {name}", a, t.to(a.device), r, c.dtype)
    if c.probs:  # softmax_lse and S_dmask, asked for with return_attn_probs
        assert lse.dtype == torch.float32 and lse.shape == r_lse.shape, lse.shape
        seen = r_lse > float("-inf")  # rows that see no key: lse -inf, out 0
        assert torch.equal(lse.cpu() > float("-inf"), seen), f"{c} lse: the -inf rows differ"
        assert_within_torch_error(f"{c} lse", lse[seen.to(device)], t_lse.float()[seen].to(device),
                                  r_lse[seen], c.dtype)
        visible, dropped = 0, 0
        for b, (t_p, r_p) in enumerate(zip(t_probs, r_probs)):
            L, S = r_p.shape[1:]
            ours = s_dmask[b, :, :L, :S]
            assert_within_torch_error(f"{c} S_dmask[{b}]", ours.abs(),
                                      t_p.to(ours.dtype).to(device), r_p, c.dtype)
            if keep is not None:
                pairs = r_p > 0  # (H, L, S): the pairs that take part
                visible += pairs.sum().item()
                dropped += (~keep[b, :, :L, :S] & pairs).sum().item()
        if keep is not None:  # flash-attn's dropout fraction, within 5 sigma
            p = c.dropout_p
            bound = 5 * (p * (1 - p) / visible) ** 0.5
            assert abs(dropped / visible - p) < bound, (dropped, visible)


F16, BF16 = torch.float16, torch.bfloat16
DENSE_CASES = [
    Case((113,) * BATCH, (203,) * BATCH, 2, 2, 64, F16, causal=True),
    Case((97,) * BATCH, (33,) * BATCH, 4, 2, 40, BF16, local=True, packed="kv", probs=False),
    Case((1,) * BATCH, (3,) * BATCH, 3, 1, 32, F16, causal=True, alibi="bh"),
    Case((33,) * BATCH, (97,) * BATCH, 2, 2, 32, BF16, causal=True, local=True, softcap=50.0),
    Case((97,) * BATCH, (33,) * BATCH, 2, 2, 64, F16, causal=True, alibi="h", dropout_p=0.17),
    Case((33,) * BATCH, (97,) * BATCH, 2, 1, 40, BF16, local=True, dropout_p=0.17, packed="kv"),
    Case((61,) * BATCH, (61,) * BATCH, 2, 2, 64, F16, causal=True, alibi="bh", dropout_p=0.17,
         packed="qkv"),
    Case((33,) * BATCH, (97,) * BATCH, 2, 2, 64, F16, scale=0.3, probs=False),
]
VARLEN_CASES = [
    Case((113, 97), (203, 180), 2, 2, 64, F16, causal=True),
    Case((97, 80), (33, 20), 4, 2, 40, BF16, local=True, alibi="bh", packed="kv"),
    Case((1, 1), (33, 0), 3, 1, 32, F16, causal=True, softcap=50.0, probs=False),
    Case((61, 40), (97, 50), 2, 2, 64, F16, causal=True, alibi="h", dropout_p=0.17),
    Case((61, 33), (61, 33), 2, 2, 32, BF16, causal=True, dropout_p=0.17, packed="qkv"),
]


@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_flash_attn_output(case, device, poisoned_empty):
    """flash_attn_func / _kvpacked_func / _qkvpacked_func: out, softmax_lse, S_dmask, the dropout
    mask it encodes and every gradient (flash-attn's test_flash_attn_output, _qkvpacked,
    _causal: L != S both ways, MQA / GQA, local windows, ALiBi, softcap, dropout)."""
    _check_case(case, device, varlen=False)


@pytest.mark.parametrize("case", VARLEN_CASES, ids=str)
def test_flash_attn_varlen_output(case, device, poisoned_empty):
    """flash_attn_varlen_func / _kvpacked_func / _qkvpacked_func on batches unpadded by
    unpad_input: as test_flash_attn_output, with causal masks, windows and ALiBi aligned per
    sequence (a sequence without keys included)."""
    _check_case(case, device, varlen=True)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_flash_attn_deterministic(varlen, device):
    """deterministic=True (flash-attn's test_flash_attn_deterministic): two backward passes give
    bitwise the same gradients (fastattn's backward is deterministic either way)."""
    c = Case((97, 97) if varlen else (97,) * BATCH, (33, 20) if varlen else (33,) * BATCH, 2, 1,
             40, F16, causal=True, local=True)
    leaves, do, window, _, cu = _inputs(c, device, 11, varlen)
    options = dict(causal=True, window_size=window, deterministic=True)
    with fastattn.record_backends() as ran:
        out = _call(c, leaves, options, cu, varlen)
        first = torch.autograd.grad(out, leaves, do, retain_graph=True)
        second = torch.autograd.grad(out, leaves, do)
    assert_kernels_ran(ran, VARLEN_OPS if varlen else DENSE_OPS, device)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ---- dropout without S_dmask: the mask replayed from torch.manual_seed ----


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_dropout_replayed_from_the_seed(varlen, device, poisoned_empty):
    """With v = I (Dv = S) the output shows the probabilities dropout kept; the same
    torch.manual_seed gives the same mask for any v, and out and every gradient then match the
    float64 math with that mask; a fraction dropout_p of the pairs is dropped (causal, GQA)."""
    p = 0.25
    c = Case((61, 40) if varlen else (61,) * BATCH, (33, 50) if varlen else (33,) * BATCH, 2, 1,
             32, F16, causal=True, dropout_p=p, probs=False)
    leaves, do, _, _, cu = _inputs(c, device, 12, varlen)
    q, k, _ = leaves
    S = max(c.lens_k)
    # v[token of key position j] = e_j: (B, S, Hk, S), packed (Tk, Hk, S)
    eye = torch.eye(S, dtype=c.dtype, device=device)
    if varlen:
        eye = torch.cat([eye[:n] for n in c.lens_k])[:, None, :].expand(-1, c.Hk, -1)
    else:
        eye = eye[None, :, None, :].expand(BATCH, S, c.Hk, S)
    options = dict(dropout_p=p, causal=True)
    torch.manual_seed(5)
    with torch.no_grad():
        shown = _call(c, [q, k, eye], options, cu, varlen)  # (B, L, H, S) / (Tq, H, S)
    torch.manual_seed(5)
    with fastattn.record_backends() as ran:
        out = _call(c, leaves, options, cu, varlen)
        grads = torch.autograd.grad(out, leaves, do)
    assert_kernels_ran(ran, VARLEN_OPS if varlen else DENSE_OPS, device)
    with torch.no_grad():
        assert not torch.equal(_call(c, [q, k, eye], options, cu, varlen), shown)  # a new draw
    cu_q, cu_k = (None, None) if cu is None else (t.tolist() for t in cu)
    # (L_b, H, S) per sequence -> keep (B, H, max L, S)
    keep = torch.zeros(len(c.lens_q), c.H, max(c.lens_q), S, dtype=torch.bool)
    for b, rows in enumerate(_sequences(shown.cpu(), cu_q)):
        keep[b, :, :rows.shape[0]] = (rows != 0).transpose(0, 1)
    probs = probs_ref(*(t.detach().cpu().double() for t in (q, k)), c, (-1, -1), None, cu_q, cu_k)
    visible = sum((pb > 0).sum().item() for pb in probs)
    kept = sum(keep[b, :, :pb.shape[1], :pb.shape[2]][pb > 0].sum().item()
               for b, pb in enumerate(probs))
    assert abs(1 - kept / visible - p) < 5 * (p * (1 - p) / visible) ** 0.5, (kept, visible)

    def run(dtype):
        copies = [t.detach().cpu().to(dtype).requires_grad_() for t in leaves]
        r_out, _ = attention_ref(*copies, c, (-1, -1), None, cu_q, cu_k, keep)
        return [r_out, *torch.autograd.grad(r_out, copies, do.cpu().to(dtype))]

    for name, a, t, r in zip(["out", "dq", "dk", "dv"], [out, *grads], run(c.dtype),
                             run(torch.float64), strict=True):
        assert_within_torch_error(f"dropout {name}", a, t.to(a.device), r, c.dtype)


# ---- the interface itself ----

FLASH_ATTN_2_8 = {  # flash-attn 2.8's flash_attn/flash_attn_interface.py
    flash_attn_func: "(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, "
                     "window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, "
                     "return_attn_probs=False)",
    flash_attn_kvpacked_func: "(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, "
                              "window_size=(-1, -1), softcap=0.0, alibi_slopes=None, "
                              "deterministic=False, return_attn_probs=False)",
    flash_attn_qkvpacked_func: "(qkv, dropout_p=0.0, softmax_scale=None, causal=False, "
                               "window_size=(-1, -1), softcap=0.0, alibi_slopes=None, "
                               "deterministic=False, return_attn_probs=False)",
    flash_attn_varlen_func: "(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "
                            "dropout_p=0.0, softmax_scale=None, causal=False, "
                            "window_size=(-1, -1), softcap=0.0, alibi_slopes=None, "
                            "deterministic=False, return_attn_probs=False, block_table=None)",
    flash_attn_varlen_kvpacked_func: "(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, "
                                     "max_seqlen_k, dropout_p=0.0, softmax_scale=None, "
                                     "causal=False, window_size=(-1, -1), softcap=0.0, "
                                     "alibi_slopes=None, deterministic=False, "
                                     "return_attn_probs=False)",
    flash_attn_varlen_qkvpacked_func: "(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, "
                                      "softmax_scale=None, causal=False, window_size=(-1, -1), "
                                      "softcap=0.0, alibi_slopes=None, deterministic=False, "
                                      "return_attn_probs=False)",
}


@pytest.mark.parametrize("fn", FLASH_ATTN_2_8, ids=lambda f: f.__name__)
def test_signature_is_flash_attn_2_8(fn):
    """Names, order and defaults as flash-attn 2.8's, importable from both of its module paths,
    with a docstring giving the shapes."""
    from fastattn.flash_attn import flash_attn_interface

    assert str(inspect.signature(fn)) == FLASH_ATTN_2_8[fn]
    assert getattr(flash_attn_interface, fn.__name__) is fn
    assert fn.__name__ in fastattn.flash_attn.__all__
    assert "nheads" in fn.__doc__ or "H, D)" in fn.__doc__


def test_flash_attn_is_a_lazy_submodule():
    """`import fastattn` imports neither fastattn.flash_attn nor Triton; fastattn.flash_attn
    and its submodules load on first use, still without Triton."""
    code = ("import sys, fastattn; "
            "assert 'fastattn.flash_attn' not in sys.modules; "
            "assert callable(fastattn.flash_attn.flash_attn_varlen_func); "
            "import fastattn.flash_attn.bert_padding, fastattn.flash_attn.flash_attn_interface; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_packed_inputs_are_read_in_place(varlen, device, monkeypatch):
    """qkv's slices reach the kernel as views of the caller's storage (dense: transposed to
    (B, H, L, D) by strides); the gradient comes back in qkv's packed shape."""
    g = torch.Generator().manual_seed(13)
    shape = (2 * 23, 3, 2, 32) if varlen else (2, 23, 3, 2, 32)
    qkv = torch.randn(shape, generator=g).to(device).requires_grad_()
    kernels = fastattn._dispatch.kernels("attention")
    op = "varlen_attention_fwd" if varlen else "attention_fwd"
    seen, original = [], getattr(kernels, op)

    def spy(q, k, v, *args, **kwargs):
        seen.append([(t.data_ptr(), t.stride()) for t in (q, k, v)])
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(kernels, op, spy)
    if varlen:
        cu = torch.tensor([0, 23, 46], dtype=torch.int32, device=device)
        out = flash_attn_varlen_qkvpacked_func(qkv, cu, 23, causal=True)
        views = qkv.unbind(1)
    else:
        out = flash_attn_qkvpacked_func(qkv, causal=True)
        views = [t.transpose(1, 2) for t in qkv.unbind(2)]  # (B, L, H, D) -> (B, H, L, D)
    assert seen == [[(t.data_ptr(), t.stride()) for t in views]]
    (dqkv,) = torch.autograd.grad(out.sum(), qkv)
    assert dqkv.shape == qkv.shape


def test_wheel_ships_the_package():
    """pyproject.toml lists its packages one by one: fastattn.flash_attn among them."""
    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib")
    config = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert "fastattn.flash_attn" in config["tool"]["setuptools"]["packages"]


# ---- bad input: a clear error naming the argument, before any kernel runs ----


def _dense_args(device, **change):
    g = torch.Generator().manual_seed(14)
    q = torch.randn(2, 5, 4, 16, generator=g).to(device)
    k, v = (torch.randn(2, 7, 2, 16, generator=g).to(device) for _ in range(2))
    return {"q": q, "k": k, "v": v, **_on(device, change)}


def _varlen_args(device, **change):
    g = torch.Generator().manual_seed(15)
    q = torch.randn(8, 4, 16, generator=g).to(device)
    k, v = (torch.randn(9, 2, 16, generator=g).to(device) for _ in range(2))
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    return {"q": q, "k": k, "v": v, "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
            "max_seqlen_q": 5, "max_seqlen_k": 5, **_on(device, change)}


def _on(device, change: dict) -> dict:
    """The changed arguments, tensors moved to the device under test."""
    return {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in change.items()}


def _dense(**change):
    return lambda d: flash_attn_func(**_dense_args(d, **change))


def _varlen(**change):
    return lambda d: flash_attn_varlen_func(**_varlen_args(d, **change))


def _kvpacked(kv_shape, q_shape=(2, 5, 4, 16), dtype=torch.float32):
    return lambda d: flash_attn_kvpacked_func(torch.randn(q_shape, device=d),
                                              torch.randn(kv_shape, device=d).to(dtype))


def _varlen_kvpacked(kv_shape, dtype=torch.float32):
    def call(d):
        a = _varlen_args(d)
        kv = torch.randn(kv_shape, device=d).to(dtype)
        return flash_attn_varlen_kvpacked_func(a["q"], kv, a["cu_seqlens_q"], a["cu_seqlens_k"],
                                               5, 5)
    return call


def _t(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


BAD_INPUT = [
    ("q not a tensor", _dense(q=[[1.0]]), TypeError, "q must be a torch.Tensor, got list"),
    ("int q", _dense(q=torch.ones(2, 5, 4, 16, dtype=torch.int64)), TypeError,
     "q has dtype int64; supported: float32, float16, bfloat16"),
    ("3-D q", _dense(q=_t(5, 4, 16)), ValueError,
     r"q must be 4-D \(batch, seqlen, nheads, headdim\), got shape \[5, 4, 16\]"),
    ("k, v seqlen differ", _dense(v=_t(2, 6, 2, 16)), ValueError,
     r"k and v must share \(batch, seqlen, nheads\), got k \[2, 7, 2, 16\] and v \[2, 6, 2, 16\]"),
    ("batch differs", _dense(k=_t(1, 7, 2, 16), v=_t(1, 7, 2, 16)), ValueError,
     "q and k must have the same batch size"),
    ("dtypes differ", _dense(k=_t(2, 7, 2, 16, dtype=torch.float16)), TypeError,
     "expected one dtype, got q float32, k float16, v float32"),
    ("heads not a multiple", _dense(q=_t(2, 5, 3, 16)), ValueError,
     "query heads 3 must be a multiple of key/value heads 2"),
    ("head dim 300", _dense(q=_t(2, 5, 4, 300), k=_t(2, 7, 2, 300), v=_t(2, 7, 2, 300)),
     ValueError, "head dim 300 is not supported"),
    ("window -2", _dense(window_size=(-2, 0)), ValueError,
     r"window_size entries must be >= -1 \(-1: unbounded\), got \(-2, 0\)"),
    ("window of 3", _dense(window_size=(1, 2, 3)), TypeError,
     r"window_size must be a pair of ints \(left, right\), got \(1, 2, 3\)"),
    ("window of floats", _dense(window_size=(1.5, 0)), TypeError, "window_size must be a pair"),
    ("window an int", _dense(window_size=4), TypeError, "window_size must be a pair of ints"),
    ("window of bools", _dense(window_size=(True, False)), TypeError, "window_size must be a pair"),
    ("softcap < 0", _dense(softcap=-1.0), ValueError,
     r"softcap must be a finite number >= 0 \(0: no capping\), got -1.0"),
    ("softcap inf", _dense(softcap=float("inf")), ValueError, "softcap must be a finite number"),
    ("softcap a string", _dense(softcap="50"), ValueError, "softcap must be a finite number"),
    ("alibi fp16", _dense(alibi_slopes=_t(4, dtype=torch.float16)), TypeError,
     "alibi_slopes has dtype float16; supported: float32"),
    ("alibi not a tensor", _dense(alibi_slopes=[0.1] * 4), TypeError,
     "alibi_slopes must be a torch.Tensor, got list"),
    ("alibi heads", _dense(alibi_slopes=_t(5)), ValueError,
     r"alibi_slopes must be \(nheads,\) = \(4,\) or \(batch, nheads\) = \(2, 4\), got shape \[5\]"),
    ("alibi batch", _dense(alibi_slopes=_t(3, 4)), ValueError,
     r"alibi_slopes must be .* got shape \[3, 4\]"),
    ("dropout_p 1.5", _dense(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
    ("softmax_scale nan", _dense(softmax_scale=float("nan")), ValueError,
     "softmax_scale must be a finite number or None"),
    ("qkv 4-D", lambda d: flash_attn_qkvpacked_func(torch.randn(2, 5, 3, 16, device=d)),
     ValueError, r"qkv must be 5-D \(batch, seqlen, 3, nheads, headdim\)"),
    ("qkv stacks 2", lambda d: flash_attn_qkvpacked_func(torch.randn(2, 5, 2, 4, 16, device=d)),
     ValueError, r"dim 2 stacks 2 tensors, not 3"),
    ("kv stacks 3", _kvpacked((2, 7, 3, 2, 16)), ValueError, r"dim 2 stacks 3 tensors, not 2"),
    ("kv batch", _kvpacked((1, 7, 2, 2, 16)), ValueError, "q and kv must have the same batch size"),
    ("kv dtype", _kvpacked((2, 7, 2, 2, 16), dtype=torch.float16), TypeError,
     "expected one dtype, got q float32, kv float16"),
    ("kv 4-D", _kvpacked((2, 7, 2, 16)), ValueError, "kv must be 5-D"),
    ("block_table", _varlen(block_table=torch.zeros(2, 1, dtype=torch.int32)), ValueError,
     "block_table .* is not supported: pass block_table=None"),
    ("varlen 4-D q", _varlen(q=_t(2, 4, 4, 16)), ValueError,
     r"q must be 3-D \(total, nheads, headdim\)"),
    ("varlen int64 cu", _varlen(cu_seqlens_q=torch.tensor([0, 3, 8])), TypeError,
     "cu_seqlens_q must hold int32 offsets, got dtype int64"),
    ("varlen short max", _varlen(max_seqlen_q=4), ValueError,
     "max_seqlen_q=4 is shorter than the longest sequence"),
    ("varlen alibi batch", _varlen(alibi_slopes=_t(3, 4)), ValueError,
     r"alibi_slopes must be \(nheads,\) = \(4,\) or \(batch, nheads\) = \(2, 4\)"),
    ("varlen window", _varlen(window_size=(0, -3)), ValueError, "window_size entries must be"),
    ("varlen kv stacks 3", _varlen_kvpacked((9, 3, 2, 16)), ValueError,
     r"dim 1 stacks 3 tensors, not 2"),
    ("varlen kv dtype", _varlen_kvpacked((9, 2, 2, 16), torch.bfloat16), TypeError,
     "expected one dtype, got q float32, kv bfloat16"),
    ("varlen qkv stacks 2", lambda d: flash_attn_varlen_qkvpacked_func(
        torch.randn(8, 2, 4, 16, device=d), _varlen_args(d)["cu_seqlens_q"], 5), ValueError,
     r"qkv must be \(total, 3, nheads, headdim\), got shape \[8, 2, 4, 16\]: dim 1 stacks 2"),
]


@pytest.mark.parametrize("call,error,match", [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_raises_clear_error(call, error, match, device):
    # cu_seqlens values are read back from a GPU (a sync) in checking mode only
    with fastattn.record_backends() as ran, fastattn.checking():
        with pytest.raises(error, match=match):
            call(device)
    assert ran == [], f"a kernel ran before the error: {ran}"


# ---- bert_padding ----


def _padded_batch(device, dtype=torch.float32, seed=16):
    """x (B, N, H, D) and an attention_mask (B, N) with lengths N, 1, 0 and 5 (right padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 7, 2, 3, generator=g).to(dtype).to(device)
    mask = (torch.arange(7) < torch.tensor([7, 1, 0, 5])[:, None]).to(device)
    return x, mask


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32], ids=["bool", "int32"])
def test_unpad_input_pad_input_round_trip(mask_dtype, device):
    """unpad_input returns flash-attn 2.8's five values, fastattn.unpad's four and the used
    lengths; pad_input inverts it (zeros at the padding), equals fastattn.pad, and both are
    differentiable."""
    x, mask = _padded_batch(device)
    x.requires_grad_()
    mask = mask.to(mask_dtype)
    packed, indices, cu_seqlens, max_seqlen, used = unpad_input(x, mask)
    want = fastattn.unpad(x, mask)
    assert torch.equal(packed, want[0]) and torch.equal(indices, want[1])
    assert torch.equal(cu_seqlens, want[2]) and max_seqlen == want[3] == 7
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 7, 8, 8, 13]
    assert used.dtype == torch.int32 and used.tolist() == [7, 1, 0, 5]
    assert isinstance(max_seqlen, int) and indices.dtype == torch.int64
    out = pad_input(packed, indices, 4, 7)
    assert torch.equal(out, fastattn.pad(packed, indices, 4, 7))
    assert torch.equal(out, x * mask[:, :, None, None])
    (dx,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(dx, mask[:, :, None, None].expand_as(x).to(dx.dtype))


def test_unpad_input_with_unused_mask(device):
    """unused_mask: slots allocated but unused are packed and counted in cu_seqlens (and
    max_seqlen), not in used_seqlens_in_batch, as flash-attn's."""
    x, mask = _padded_batch(device)
    unused = torch.zeros_like(mask)
    unused[1, 1:3] = True  # two allocated slots after sequence 1's token
    unused[2, 0] = True
    packed, indices, cu_seqlens, max_seqlen, used = unpad_input(x, mask, unused)
    selected = mask | unused
    assert indices.tolist() == selected.flatten().nonzero().flatten().tolist()
    assert torch.equal(packed, x.flatten(0, 1)[indices])
    assert cu_seqlens.tolist() == [0, 7, 10, 11, 16] and max_seqlen == 7
    assert used.tolist() == [7, 1, 0, 5]


def test_index_first_axis_and_index_put_first_axis(device):
    """index_first_axis gathers rows, index_put_first_axis scatters them into zeros; values and
    gradients as plain indexing's."""
    x, mask = _padded_batch(device)
    flat = x.flatten(0, 1).requires_grad_()  # (B * N, H, D)
    _, indices, *_ = unpad_input(x, mask)
    rows = index_first_axis(flat, indices)
    assert torch.equal(rows, flat[indices])
    (d_flat,) = torch.autograd.grad(rows.sum(), flat)
    assert torch.equal(d_flat.flatten(1).any(-1), mask.flatten())
    values = rows.detach().requires_grad_()
    put = index_put_first_axis(values, indices, flat.shape[0])
    assert put.shape == flat.shape
    assert torch.equal(put, pad_input(values, indices, 4, 7).flatten(0, 1))
    assert torch.equal(put[indices], values) and not put[~mask.flatten()].any()
    (d_values,) = torch.autograd.grad((put * 2).sum(), values)
    assert torch.equal(d_values, torch.full_like(values, 2.0))


BAD_PADDING = [
    ("float mask", lambda x, m: unpad_input(x, m.float()), TypeError,
     "attention_mask must be a bool or integer tensor .* got float32"),
    ("mask shape", lambda x, m: unpad_input(x, m[:, :5]), ValueError,
     r"attention_mask of shape \[4, 5\] must be hidden_states' first two dims"),
    ("unused_mask shape", lambda x, m: unpad_input(x, m, m[:1]), ValueError,
     r"unused_mask of shape \[1, 7\] must be"),
    ("mask not a tensor", lambda x, m: unpad_input(x, m.tolist()), TypeError,
     "attention_mask must be a bool or integer tensor .* got list"),
    ("indices out of range", lambda x, m: pad_input(x[0, :3], torch.tensor([0, 1, 28]), 4, 7),
     ValueError, r"indices must lie in \[0, 28\)"),
    ("indices count", lambda x, m: pad_input(x[0, :3], torch.tensor([0, 1]), 4, 7), ValueError,
     r"indices \(2,\) must name one position per row"),
    ("indices 2-D", lambda x, m: index_first_axis(x, torch.zeros(2, 2, dtype=torch.int64)),
     ValueError, "indices must be 1-D"),
    ("float indices", lambda x, m: index_first_axis(x, torch.zeros(2)), TypeError,
     "indices must be a 1-D int64 tensor"),
    ("negative first_axis_dim", lambda x, m: index_put_first_axis(x[0], torch.arange(7), -1),
     ValueError, "first_axis_dim must be a non-negative int, got -1"),
    ("seqlen not an int", lambda x, m: pad_input(x[0], torch.arange(7), 1, 7.0), ValueError,
     "seqlen must be a non-negative int, got 7.0"),
]


@pytest.mark.parametrize("call,error,match", [case[1:] for case in BAD_PADDING],
                         ids=[case[0] for case in BAD_PADDING])
def test_bert_padding_bad_input(call, error, match):
    x, mask = _padded_batch("cpu")
    with pytest.raises(error, match=match):
        call(x, mask)
