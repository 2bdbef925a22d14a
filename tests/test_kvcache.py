"""KV-cache decoding (fastattn.kvcache_attention, fastattn.flash_attn.flash_attn_with_kvcache)
against float64 references.

First a port of flash-attn's tests/test_flash_attn.py test_flash_attn_kvcache at Triton-interpreter
sizes: a few chosen cases of its product (MHA / MQA / GQA, new keys appended or not, rotary
interleaved or not at fractions 0, 0.5, 1, paged caches, left padding, cache_batch_idx, causal,
local windows, ALiBi, num_splits 0 and 1), generated as it generates them, with its rules: the
output's error against the float64 reference is at most 3x (5x with ALiBi) the error of the same
reference computed in the inputs' low precision, plus 1e-5; the cache holds the new (rotated)
keys within 1e-3 and exactly the new values. Its reference attention_ref becomes
fastattn.reference.kvcache_attention. Then: num_splits > 1 against 1 (fp32 merge rounding) and
bitwise run to run, every argument (sinks, softcap, key_padding_mask, small pages, fp32, ...),
the split heuristic, the kernels' clamping of bad indices, the torch path, and every error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import fastattn
from fastattn import reference, torch_path
from fastattn.flash_attn import flash_attn_with_kvcache
from helpers import assert_kernels_ran

OPS = ["kvcache_attention_fwd"]


@dataclass(frozen=True)
class Case:
    """One parametrisation of flash-attn's test_flash_attn_kvcache (its argument names)."""

    seqlen_q: int
    seqlen_k: int
    d: int
    mha_type: str = "mha"  # "mha" (6 kv heads), "mqa" (1), "gqa" (3), for 6 query heads
    new_kv: bool = False
    seqlen_new_eq_seqlen_q: bool = True
    rotary_fraction: float = 0.0
    rotary_interleaved: bool = False
    paged_kv_block_size: Optional[int] = None
    has_leftpad: bool = False
    has_batch_idx: bool = False
    causal: bool = False
    local: bool = False
    alibi: bool = False
    num_splits: int = 1
    dtype: torch.dtype = torch.float16


PORT_CASES = [
    Case(1, 128, 64),
    Case(1, 339, 64, "gqa", new_kv=True, causal=True, num_splits=0),
    Case(3, 99, 32, "mqa", new_kv=True, rotary_fraction=1.0, causal=True),
    Case(3, 97, 59, "gqa", new_kv=True, rotary_fraction=0.5, rotary_interleaved=True,
         has_leftpad=True),
    Case(16, 200, 80, "mha", new_kv=True, seqlen_new_eq_seqlen_q=False, rotary_fraction=1.0,
         rotary_interleaved=True, causal=True, num_splits=0),
    Case(1, 300, 128, "gqa", new_kv=True, paged_kv_block_size=256, causal=True),
    Case(3, 339, 64, "mha", new_kv=True, rotary_fraction=1.0, paged_kv_block_size=256,
         num_splits=0),
    Case(3, 260, 64, "mqa", new_kv=True, rotary_fraction=0.5, paged_kv_block_size=64,
         local=True, num_splits=0),
    Case(16, 128, 64, "gqa", new_kv=False, local=True, alibi=True),
    Case(1, 257, 32, "gqa", new_kv=True, rotary_fraction=1.0, causal=True, alibi=True,
         has_leftpad=True, num_splits=0),
    Case(3, 150, 64, "mha", new_kv=True, has_batch_idx=True, causal=True, local=True),
    Case(64, 64, 32, "gqa", new_kv=False, causal=True),
    Case(1, 339, 256, "mqa", new_kv=True, rotary_fraction=0.5, causal=True,
         dtype=torch.bfloat16),
    Case(3, 120, 128, "gqa", new_kv=True, seqlen_new_eq_seqlen_q=False, alibi=True, local=True,
         num_splits=0, dtype=torch.bfloat16),
]


def _generate_block_kvcache(seqlen_k, page, batch, nheads_k, d, device, dtype):
    """flash-attn's _generate_block_kvcache: a shuffled page pool and the dense view of it."""
    num_blocks = math.ceil(seqlen_k / page) * batch * 3
    k_paged = torch.randn(num_blocks, page, nheads_k, d, device=device, dtype=dtype)
    v_paged = torch.randn(num_blocks, page, nheads_k, d, device=device, dtype=dtype)
    table = torch.randperm(num_blocks, dtype=torch.int32, device=device).view(batch, -1)
    dense = [p[table.long().flatten()].view(batch, -1, nheads_k, d)[:, :seqlen_k]
             for p in (k_paged, v_paged)]
    return (*dense, table, k_paged, v_paged, num_blocks)


def _port_inputs(c: Case, device: str):
    """The inputs test_flash_attn_kvcache makes, in its order of random draws."""
    torch.manual_seed(0)
    batch, nheads = 2, 6
    batch_cache = batch * 2 if c.has_batch_idx else batch
    rotary_dim = math.floor(int(c.rotary_fraction * c.d) / 16) * 16
    nheads_k = {"mha": nheads, "mqa": 1, "gqa": 3}[c.mha_type]
    window = (-1, -1) if not c.local else tuple(torch.randint(0, c.seqlen_k, (2,)).tolist())
    q = torch.randn(batch, c.seqlen_q, nheads, c.d, device=device, dtype=c.dtype)
    seqlen_new = (c.seqlen_q if c.seqlen_new_eq_seqlen_q
                  else torch.randint(1, c.seqlen_q + 1, (1,)).item())
    k = v = None
    if c.new_kv:
        k = torch.randn(batch, seqlen_new, nheads_k, c.d, device=device, dtype=c.dtype)
        v = torch.randn(batch, seqlen_new, nheads_k, c.d, device=device, dtype=c.dtype)
    table = None
    if c.paged_kv_block_size is None:
        k_cache = torch.randn(batch_cache, c.seqlen_k, nheads_k, c.d, device=device, dtype=c.dtype)
        v_cache = torch.randn(batch_cache, c.seqlen_k, nheads_k, c.d, device=device, dtype=c.dtype)
        rotary_rows = c.seqlen_k
    else:
        _, _, table, k_cache, v_cache, num_blocks = _generate_block_kvcache(
            c.seqlen_k, c.paged_kv_block_size, batch, nheads_k, c.d, device, c.dtype)
        rotary_rows = num_blocks * c.paged_kv_block_size
    hi = ((c.seqlen_k - (c.seqlen_q if (c.causal or c.local) and rotary_dim > 1 else seqlen_new)
           + 1) if c.new_kv else c.seqlen_k + 1)
    cache_seqlens = torch.randint(0 if c.new_kv else 1, hi, (batch,), dtype=torch.int32,
                                  device=device)
    leftpad = None
    if c.has_leftpad:
        leftpad = torch.tensor([torch.randint(0, int(n), (1,)).item() if n > 0 else 0
                                for n in cache_seqlens], dtype=torch.int32, device=device)
    batch_idx = None
    if c.has_batch_idx:
        batch_idx = torch.randperm(batch_cache, dtype=torch.int32, device=device)[:batch]
    alibi = (torch.rand(batch, nheads, device=device, dtype=torch.float32) * 0.3
             if c.alibi else None)
    cos = sin = None
    if rotary_dim > 0:
        angle = torch.rand(rotary_rows, rotary_dim // 2, device=device) * 2 * math.pi
        cos, sin = torch.cos(angle).to(c.dtype), torch.sin(angle).to(c.dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, rotary_cos=cos,
                rotary_sin=sin, cache_seqlens=cache_seqlens, cache_batch_idx=batch_idx,
                cache_leftpad=leftpad, block_table=table, causal=c.causal, window_size=window,
                rotary_interleaved=c.rotary_interleaved, alibi_slopes=alibi,
                num_splits=c.num_splits)


def _reference(args: dict, dtype: torch.dtype):
    """reference.kvcache_attention on copies of the inputs in `dtype` (float64: the oracle; the
    inputs' dtype: flash-attn's "PyTorch" reference, whose error sets the bound). Returns
    (out, lse, k_cache, v_cache)."""
    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    k_cache, v_cache = args["k_cache"].clone().to(dtype), args["v_cache"].clone().to(dtype)
    alibi = args["alibi_slopes"]
    out, lse = reference.kvcache_attention(
        cast(args["q"]), k_cache, v_cache, cast(args["k"]), cast(args["v"]),
        cache_seqlens=args["cache_seqlens"], cache_batch_idx=args["cache_batch_idx"],
        cache_leftpad=args["cache_leftpad"], block_table=args["block_table"],
        rotary_cos=cast(args["rotary_cos"]), rotary_sin=cast(args["rotary_sin"]),
        rotary_interleaved=args["rotary_interleaved"], causal=args["causal"],
        window=args["window_size"], alibi=None if alibi is None else alibi.to(
            torch.float64 if dtype == torch.float64 else torch.float32))
    return out, lse, k_cache, v_cache


@pytest.mark.parametrize("case", PORT_CASES, ids=str)
def test_flash_attn_kvcache(case, device):
    args = _port_inputs(case, device)
    out_ref, lse_ref, k_ref, v_ref = _reference(args, torch.float64)
    out_pt, _, k_pt, v_pt = _reference(args, case.dtype)
    with fastattn.record_backends() as ran:
        out, lse = flash_attn_with_kvcache(**args, return_softmax_lse=True)
    assert_kernels_ran(ran, OPS, device)
    assert out.shape == args["q"].shape and out.dtype == case.dtype and out.is_contiguous()
    err = (out.double() - out_ref).abs().max().item()
    pt_err = (out_pt.double() - out_ref).abs().max().item()
    mult = 5 if case.alibi else 3
    assert err <= mult * pt_err + 1e-5, f"out error {err:.3e} > {mult} x torch's {pt_err:.3e}"
    seen = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), seen)
    assert (lse - lse_ref)[seen].abs().max().item() <= 1e-3 * max(1.0, lse_ref.abs().max().item())
    if case.new_kv:  # the cache holds the new keys (rotated, rounded once) and values, in place
        assert torch.allclose(args["k_cache"], k_pt, rtol=1e-3, atol=1e-3)
        assert torch.equal(args["v_cache"], v_pt)


@pytest.mark.parametrize("append_knew", [False, True])
def test_flash_attn_kvcache_paged_block_table_bounds(append_knew, device):
    """flash-attn's regression test of issue #2709: sequences longer than the block table holds
    are refused (a ValueError here, flash-attn's is a RuntimeError) naming block_table; exactly at
    capacity passes."""
    page, d = 256, 64
    k_cache = torch.randn(4, page, 1, d, device=device, dtype=torch.float16)
    v_cache = torch.randn(4, page, 1, d, device=device, dtype=torch.float16)
    table = torch.zeros(1, 1, dtype=torch.int32, device=device)
    q = torch.randn(1, 1, 1, d, device=device, dtype=torch.float16)
    if append_knew:
        k_new = torch.randn(1, 1, 1, d, device=device, dtype=torch.float16)
        seqlens = torch.full((1,), page, dtype=torch.int32, device=device)
    else:
        k_new, seqlens = None, torch.full((1,), page + 1, dtype=torch.int32, device=device)
    with fastattn.checking(), pytest.raises(ValueError, match="block_table"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=k_new, cache_seqlens=seqlens,
                                block_table=table)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, block_table=table,
                                  cache_seqlens=torch.full((1,), page, dtype=torch.int32,
                                                           device=device))
    assert out.shape == (1, 1, 1, d) and not out.isnan().any()


# ---- num_splits ----


def _decode_inputs(device, dtype=torch.bfloat16, B=3, L=1, Hq=8, Hkv=2, D=64, S=200, **kw):
    torch.manual_seed(1)
    q = torch.randn(B, L, Hq, D, device=device, dtype=dtype)
    k_cache = torch.randn(B, S, Hkv, D, device=device, dtype=dtype)
    v_cache = torch.randn(B, S, Hkv, D, device=device, dtype=dtype)
    seqlens = torch.tensor([S, 1, 97][:B] + [S // 2] * max(0, B - 3), dtype=torch.int32,
                           device=device)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens, **kw)


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_num_splits_match_one_split(device, dtype, sinks):
    args = _decode_inputs(device, dtype, causal=True)
    if sinks:
        args["sinks"] = torch.randn(8, device=device)
    one, lse_one = fastattn.kvcache_attention(**args, num_splits=1, return_lse=True)
    with fastattn.record_backends() as ran:
        many, lse_many = fastattn.kvcache_attention(**args, num_splits=5, return_lse=True)
    again, lse_again = fastattn.kvcache_attention(**args, num_splits=5, return_lse=True)
    assert_kernels_ran(ran, OPS, device)
    # the same attention, merged in fp32: equal to rounding (a last-bit flip of bf16 outputs)
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(many.float(), one.float(), rtol=tol, atol=tol)
    assert torch.allclose(lse_many, lse_one, rtol=1e-6, atol=1e-6)
    assert torch.equal(many, again) and torch.equal(lse_many, lse_again)  # bitwise run to run
    ref, lse_ref, _, _ = _reference_of(args)
    for ours in (one, many):
        assert (ours.double() - ref).abs().max().item() <= (2e-6 if dtype == torch.float32
                                                            else 2e-2)


def _reference_of(args: dict):
    f64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in args.items()}
    kc, vc = f64.pop("k_cache").clone(), f64.pop("v_cache").clone()
    q = f64.pop("q")
    window = f64.pop("window_size", (-1, -1))
    alibi = f64.pop("alibi_slopes", None)
    f64.pop("scale", None)
    out, lse = reference.kvcache_attention(q, kc, vc, f64.pop("k", None), f64.pop("v", None),
                                           window=window, alibi=alibi, scale=args.get("scale"),
                                           **f64)
    return out, lse, kc, vc


def test_split_heuristic():
    from fastattn.kernels.configs import decode_num_splits, decode_split_count

    assert decode_split_count(132, 256, 132) == 1  # the programs fill the GPU
    assert decode_split_count(4, 1, 132) == 1  # one key block: nothing to split
    n = decode_split_count(4, 256, 132)  # batch 1, 4 kv heads, 32k keys: split to fill the SMs
    assert 8 <= n <= 33 and 4 * n <= 132
    fill = 4 * n / 132
    assert fill / math.ceil(fill) >= 0.85 * max(4 * m / 132 / math.ceil(4 * m / 132)
                                                for m in range(1, 129))
    assert decode_num_splits(7, 4, 3, torch.device("cpu")) == 3  # capped at the key blocks
    assert decode_num_splits(500, 4, 300, torch.device("cpu")) == 128


# ---- every argument ----


ARG_CASES = {
    "sinks": dict(sinks=True),
    "softcap": dict(softcap=4.0, causal=True),
    "window+alibi": dict(window_size=(20, 0), alibi=True),
    "key_padding_mask": dict(mask=True, causal=True),
    "mask+window": dict(mask=True, causal=True, window_size=(7, 0), L=3),
    "scale<0": dict(scale=-0.3),
    "int_seqlens": dict(int_seqlens=True),
    "full_cache": dict(full=True),
    "small_pages": dict(page=16, new=True, causal=True),
    "pages_not_pow2": dict(page=24, new=True),
    "rotary_noncausal": dict(new=True, rotary=16, L=3),
    "fp32_gqa_L3": dict(L=3, causal=True, new=True, dtype=torch.float32),
    "fp16_mha": dict(Hq=4, Hkv=4, dtype=torch.float16, new=True),
    "d_ragged": dict(D=40, new=True, rotary=32, causal=True),
}


@pytest.mark.parametrize("name", list(ARG_CASES))
def test_arguments(name, device):
    spec = dict(ARG_CASES[name])
    dtype = spec.pop("dtype", torch.bfloat16)
    B, L, Hq, Hkv, D, S = 3, spec.pop("L", 1), spec.pop("Hq", 8), spec.pop("Hkv", 2), \
        spec.pop("D", 64), 120
    torch.manual_seed(2)
    q = torch.randn(B, L, Hq, D, device=device, dtype=dtype)
    page = spec.pop("page", None)
    args = dict(q=q, causal=spec.pop("causal", False))
    if page:
        n_pages = 4 * math.ceil(S / page) * B
        args["k_cache"] = torch.randn(n_pages, page, Hkv, D, device=device, dtype=dtype)
        args["v_cache"] = torch.randn(n_pages, page, Hkv, D, device=device, dtype=dtype)
        args["block_table"] = torch.randperm(n_pages, dtype=torch.int32, device=device)[
            :B * math.ceil(S / page)].view(B, -1)
        capacity = page * args["block_table"].shape[1]
    else:
        args["k_cache"] = torch.randn(B, S, Hkv, D, device=device, dtype=dtype)
        args["v_cache"] = torch.randn(B, S, Hkv, D, device=device, dtype=dtype)
        capacity = S
    L_new = L if spec.pop("new", False) else 0
    if L_new:
        args["k"] = torch.randn(B, L_new, Hkv, D, device=device, dtype=dtype)
        args["v"] = torch.randn(B, L_new, Hkv, D, device=device, dtype=dtype)
    if spec.pop("int_seqlens", False):
        args["cache_seqlens"] = 77
    elif not spec.pop("full", False):
        args["cache_seqlens"] = torch.tensor([0, 50, capacity - L_new], dtype=torch.int32,
                                             device=device)
    rotary = spec.pop("rotary", 0)
    if rotary:
        angle = torch.rand(capacity, rotary // 2, device=device) * 6.0
        args["rotary_cos"], args["rotary_sin"] = angle.cos(), angle.sin()
    if spec.pop("sinks", False):
        args["sinks"] = torch.randn(Hq, device=device)
    if spec.pop("alibi", False):
        args["alibi_slopes"] = torch.rand(Hq, device=device) * 0.2
    if spec.pop("mask", False):
        args["key_padding_mask"] = torch.rand(B, capacity, device=device) > 0.4
    args.update(spec)  # softcap, window_size, scale
    ref_args = dict(args, q=q.clone())
    ref, lse_ref, k_ref, v_ref = _reference_of(ref_args)
    with fastattn.record_backends() as ran:
        out, lse = fastattn.kvcache_attention(**args, num_splits=2, return_lse=True)
    assert_kernels_ran(ran, OPS, device)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert (out.double() - ref).abs().max().item() <= tol
    seen = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), seen)
    assert torch.allclose(lse[seen].double(), lse_ref[seen], atol=tol * 10)
    if L_new:
        assert torch.allclose(args["k_cache"].double(), k_ref, atol=tol * 4)
        assert torch.equal(args["v_cache"].double(), v_ref)
    # the torch path (fastattn's CPU fallback) agrees with the kernel
    # (on CPU copies: it is the CPU's path, and on a GPU torch's CPU-only ops refuse CUDA tensors)
    fresh = {k: (v.cpu().clone() if isinstance(v, torch.Tensor) else v)
             for k, v in ref_args.items()}
    tp = torch_path.kvcache_attention_fwd(*_op_args(fresh))
    assert torch.allclose(tp[0].float(), out.float().cpu(), atol=tol * 2)


def _op_args(a: dict) -> tuple:
    """The custom op's positional arguments for public-function keywords a (validated inputs)."""
    B = a["q"].shape[0]
    seqlens = a.get("cache_seqlens")
    if isinstance(seqlens, int):
        seqlens = torch.full((B,), seqlens, dtype=torch.int32, device=a["q"].device)
    alibi = a.get("alibi_slopes")
    window = a.get("window_size", (-1, -1))
    scale = a.get("scale", a["q"].shape[-1] ** -0.5)
    return (a["q"], a["k_cache"], a["v_cache"], a.get("k"), a.get("v"), seqlens,
            a.get("cache_batch_idx"), a.get("cache_leftpad"), a.get("block_table"),
            a.get("rotary_cos"), a.get("rotary_sin"), a.get("rotary_interleaved", True),
            a.get("key_padding_mask"), scale, a.get("causal", False), window[0], window[1],
            a.get("softcap", 0.0), None if alibi is None else alibi.expand(B, -1),
            a.get("sinks"), 2)


def test_empty_query_still_appends(device):
    args = _decode_inputs(device, torch.float32, B=2)
    args["k"] = torch.randn(2, 2, 2, 64, device=device)
    args["v"] = torch.randn(2, 2, 2, 64, device=device)
    args["cache_seqlens"] = torch.tensor([3, 9], dtype=torch.int32, device=device)
    args["q"] = args["q"][:, :0]
    out = fastattn.kvcache_attention(**args)
    assert out.shape == (2, 0, 8, 64)
    assert torch.equal(args["k_cache"][0, 3:5], args["k"][0])
    assert torch.equal(args["v_cache"][1, 9:11], args["v"][1])


def test_custom_op_schema_and_fake(device):
    """The op declares its in-place cache writes, and its fake gives the real shapes (torch.compile
    traces through it)."""
    args = _decode_inputs(device, torch.float32, B=2, S=40)
    args["k"] = torch.randn(2, 1, 2, 64, device=device)
    args["v"] = torch.randn(2, 1, 2, 64, device=device)
    args["cache_seqlens"] = torch.tensor([3, 9], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.fastattn.kvcache_attention_fwd, _op_args(args),
                          test_utils=("test_schema", "test_faketensor"))


# ---- the kernels clamp bad indices (what runs on CUDA outside checking mode) ----


def test_kernels_clamp_bad_indices(device):
    """Values fastattn.decode would refuse, handed to the launcher directly: the kernels neither
    read nor write outside the caches. An out-of-range page reads as the last page, cache_seqlens
    past the end reads the whole cache, rows past it are not written."""
    from fastattn.kernels.decode import kvcache_attention_fwd

    torch.manual_seed(3)
    page, B, H, D = 16, 2, 2, 32
    k_cache = torch.randn(6, page, H, D, device=device)
    v_cache = torch.randn(6, page, H, D, device=device)
    good = torch.tensor([[0, 1], [2, 5]], dtype=torch.int32, device=device)
    bad = torch.tensor([[0, 1], [2, 10**6]], dtype=torch.int32, device=device)
    q = torch.randn(B, 1, H, D, device=device)
    k = torch.randn(B, 2, H, D, device=device)
    seqlens = torch.tensor([5, 31], dtype=torch.int32, device=device)  # 31 + 2 > 32 rows
    kc, vc = k_cache.clone(), v_cache.clone()
    out, _ = kvcache_attention_fwd(q, kc, vc, k, k, seqlens, None, None, bad, None, None, True,
                                   None, 0.2, False, -1, -1, 0.0, None, None, 1)
    kc2, vc2 = k_cache.clone(), v_cache.clone()
    want, _ = kvcache_attention_fwd(q, kc2, vc2, k, k, seqlens, None, None, good, None, None,
                                    True, None, 0.2, False, -1, -1, 0.0, None, None, 1)
    assert torch.equal(out, want) and torch.equal(kc, kc2)
    assert torch.equal(kc[5, 15], k[1, 0])  # row 31 written, row 32 (past the table) not
    untouched = torch.ones(6, dtype=torch.bool)
    untouched[[0, 5]] = False
    assert torch.equal(kc[untouched], k_cache[untouched])
    huge = torch.tensor([10**6, -5], dtype=torch.int32, device=device)
    out, lse = kvcache_attention_fwd(q, k_cache.clone(), v_cache.clone(), None, None, huge, None,
                                     None, good, None, None, True, None, 0.2, False, -1, -1, 0.0,
                                     None, None, 1)
    assert torch.isfinite(out).all() and torch.isinf(lse[1]).all() and torch.isfinite(lse[0]).all()


# ---- errors ----


def _ok(device, **kw):
    args = _decode_inputs(device, torch.float32, B=2, S=32)
    args.update(kw)
    return args


ERRORS = [
    ("q", lambda a: a.update(q=a["q"][0]), ValueError, "q must be 4-D"),
    ("dtype", lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "one dtype"),
    ("heads", lambda a: a.update(q=a["q"][:, :, :3]), ValueError, "multiple of"),
    ("headdim", lambda a: a.update(q=a["q"][..., :32]), ValueError, "headdim"),
    ("seqlens_dtype", lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError,
     "cache_seqlens must have dtype int32"),
    ("seqlens_shape", lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), ValueError,
     "cache_seqlens must have shape"),
    ("seqlens_range", lambda a: a.update(cache_seqlens=a["cache_seqlens"] + 100), ValueError,
     "cache_seqlens.* out of range"),
    ("seqlens_type", lambda a: a.update(cache_seqlens=2.5), TypeError, "cache_seqlens must be"),
    ("k_without_seqlens", lambda a: a.update(cache_seqlens=None, k=a["k_cache"][:, :1],
                                             v=a["v_cache"][:, :1]), ValueError,
     "cache_seqlens is needed"),
    ("k_without_v", lambda a: a.update(k=a["k_cache"][:, :1]), ValueError, "together"),
    ("k_overflow", lambda a: a.update(k=a["k_cache"][:, :2], v=a["v_cache"][:, :2],
                                      cache_seqlens=torch.full((2,), 31, dtype=torch.int32)),
     ValueError, "cache_seqlens.* out of range"),
    ("batch_idx_range", lambda a: a.update(cache_batch_idx=torch.tensor([0, 2],
                                                                        dtype=torch.int32)),
     ValueError, "cache_batch_idx.* out of range"),
    ("leftpad_range", lambda a: a.update(cache_leftpad=torch.tensor([0, 40], dtype=torch.int32)),
     ValueError, "cache_leftpad.* out of range"),
    ("block_table_dtype", lambda a: a.update(block_table=torch.zeros(2, 2, dtype=torch.int64)),
     TypeError, "block_table must have dtype int32"),
    ("block_table_range", lambda a: a.update(block_table=torch.tensor([[0, 1], [2, 9]],
                                                                      dtype=torch.int32)),
     ValueError, "block_table.* out of range"),
    ("block_table_shape", lambda a: a.update(block_table=torch.zeros(3, 2, dtype=torch.int32)),
     ValueError, "block_table must have shape"),
    ("paged_leftpad", lambda a: a.update(block_table=torch.zeros(2, 1, dtype=torch.int32),
                                         cache_leftpad=torch.zeros(2, dtype=torch.int32)),
     ValueError, "not supported with a paged cache"),
    ("rotary_without_k", lambda a: a.update(rotary_cos=torch.ones(32, 8),
                                            rotary_sin=torch.ones(32, 8)), ValueError,
     "need the new keys"),
    ("rotary_dim", lambda a: a.update(rotary_cos=torch.ones(32, 40), rotary_sin=torch.ones(32, 40),
                                      k=a["k_cache"][:, :1], v=a["v_cache"][:, :1],
                                      cache_seqlens=torch.ones(2, dtype=torch.int32)),
     ValueError, "rotary_dim 80"),
    ("rotary_short", lambda a: a.update(rotary_cos=torch.ones(8, 8), rotary_sin=torch.ones(8, 8),
                                        k=a["k_cache"][:, :1], v=a["v_cache"][:, :1],
                                        cache_seqlens=torch.ones(2, dtype=torch.int32)),
     ValueError, "seqlen_ro 8"),
    ("num_splits", lambda a: a.update(num_splits=-1), ValueError, "num_splits"),
    ("window", lambda a: a.update(window_size=(1,)), ValueError, "window_size"),
    ("softcap", lambda a: a.update(softcap=-1.0), ValueError, "softcap"),
    ("alibi", lambda a: a.update(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    ("mask_dtype", lambda a: a.update(key_padding_mask=torch.ones(2, 32)), TypeError,
     "key_padding_mask must be a bool"),
    ("mask_shape", lambda a: a.update(key_padding_mask=torch.ones(2, 31, dtype=torch.bool)),
     ValueError, "key_padding_mask must be"),
    ("grad", lambda a: a.update(q=a["q"].requires_grad_()), ValueError, "no backward"),
]


@pytest.mark.parametrize("name,change,error,match", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name, change, error, match, device):
    args = _ok(device)
    change(args)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    # index ranges are read back from a GPU (a sync) in checking mode only
    with fastattn.checking(), pytest.raises(error, match=match):
        fastattn.kvcache_attention(**args)


def test_flash_attn_signature_matches():
    """flash_attn_with_kvcache takes flash-attn 2.8's parameters in its order (sinks extra)."""
    import inspect

    from fastattn.flash_attn import flash_attn_interface

    assert flash_attn_interface.flash_attn_with_kvcache is flash_attn_with_kvcache
    assert "flash_attn_with_kvcache" in fastattn.flash_attn.__all__
    names = list(inspect.signature(flash_attn_with_kvcache).parameters)
    assert names == ["q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin",
                     "cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table",
                     "softmax_scale", "causal", "window_size", "softcap", "rotary_interleaved",
                     "alibi_slopes", "num_splits", "return_softmax_lse", "sinks"]
