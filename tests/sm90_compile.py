"""Compile fastattn's kernels for a GPU target on a machine without one (Triton's front end plus
the ptxas that ships with Triton), and print one JSON line per kernel variant:
{"kernel", "variant", "ok", "error", "registers", "spill_bytes"}.

Run by tests/test_gpu_compile.py in a subprocess (kernels must be defined with TRITON_INTERPRET
unset). This catches what the interpreter cannot: code that does not compile for the GPU.

The attention kernels are compiled as a launch on contiguous (B, H, N, D) tensors and a contiguous
mask specialises them (Triton turns the unit innermost strides into constants and knows that the
pointers and the q/k/v/o batch, head and row strides are 16-divisible, for D a multiple of 16), with
the num_warps and num_stages of kernels/configs.py: their register and spill counts are what a GPU
launch gets from this Triton version. The norm and embedding kernels keep generic strides, so their
counts are pessimistic.
    python tests/sm90_compile.py [arch=90] [--all-rows]
--all-rows: only the attention kernels, at every head dim of configs.py's tables (64, 128, 256) and
in more feature combinations (the check behind the tables' "no spills" note).
"""

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastattn.kernels import attention as AT  # noqa: E402
from fastattn.kernels import configs  # noqa: E402
from fastattn.kernels import embedding as EM  # noqa: E402
from fastattn.kernels import layer_norm as LN  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# The newest ptxas Triton ships (it emits PTX versions the older one may not read).
PTXAS = next((os.path.join(_BIN, n) for n in ("ptxas-blackwell", "ptxas")
              if os.path.exists(os.path.join(_BIN, n))), "ptxas")
FLOATS = {"eps", "dropout_p", "dropout_scale", "scale"}
# Attention strides a launch on contiguous tensors specialises: innermost (== 1) and 16-divisible.
UNIT_STRIDE = re.compile(r"stride_((q|k|v|o|do|dk|dv|dq)d|ms|dms)$")
DIV16_STRIDE = re.compile(r"stride_(q|k|v|o|do|dk|dv|dq)[bhls]$")


def compile_variant(fn, pointers: dict, constexprs: dict, options: dict, arch: int,
                    launch_like: bool = False) -> dict:
    """pointers: argument name -> Triton pointer type ("*bf16"); other non-constexpr arguments
    are i32 scalars, or fp32 for the names in FLOATS. options: num_warps (and num_stages).
    launch_like: specialise the attention strides as a launch on contiguous tensors does."""
    signature, constexprs, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif launch_like and UNIT_STRIDE.match(name):
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = pointers.get(name, "fp32" if name in FLOATS else "i32")
            if launch_like and (name in pointers or DIV16_STRIDE.match(name)):
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    suffix = "a" if arch == 90 else ""
    out = subprocess.run([PTXAS, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True)
    os.unlink(f.name)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", out.stderr)]
    spill = [int(s) for s in re.findall(r"(\d+) bytes spill stores", out.stderr)]
    return {"ok": out.returncode == 0, "error": out.stderr[-400:] if out.returncode else "",
            "registers": max(regs, default=0), "spill_bytes": max(spill, default=0)}


def variants():
    """(kernel, variant name, pointers, constexprs, options): each kernel's constexpr branches,
    at the tile sizes kernels/configs.py picks on the GPU."""
    bf16 = "*bf16"
    norm_ptrs = {"X": bf16, "RES": bf16, "W": bf16, "B": bf16, "Y": bf16, "H": bf16,
                 "MEAN": "*fp32", "RSTD": "*fp32"}
    for single, block_m, block_n, warps in [(True, 2, 1024, 4), (True, 1, 16384, 16),
                                            (False, 1, 4096, 8)]:
        for rms, residual in [(False, True), (True, False)]:
            yield (LN._norm_fwd_kernel, f"rms={rms} residual={residual} tile={block_m}x{block_n}",
                   norm_ptrs, dict(IS_RMS=rms, HAS_WEIGHT=True, HAS_BIAS=not rms,
                                   HAS_RESIDUAL=residual, BLOCK_M=block_m, BLOCK_N=block_n,
                                   SINGLE_TILE=single), dict(num_warps=warps))
    bwd_ptrs = {"X": bf16, "W": bf16, "MEAN": "*fp32", "RSTD": "*fp32", "DY": bf16, "DH": bf16,
                "DX": bf16, "DW_PART": "*fp32", "DB_PART": "*fp32", "SEED": "*i64"}
    for single, block_m, block_n, warps in [(True, 2, 1024, 4), (True, 1, 4096, 8),
                                            (False, 1, 4096, 8)]:
        yield (LN._norm_bwd_kernel, f"tile={block_m}x{block_n} single={single}", bwd_ptrs,
               dict(IS_RMS=False, HAS_WEIGHT=True, HAS_DH=True, COMPUTE_DW=True, COMPUTE_DB=True,
                    HAS_DROPOUT=True, BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_TILE=single),
               dict(num_warps=warps))
    yield (LN._column_sum_kernel, "256", {"PART": "*fp32", "OUT": "*fp32"},
           dict(BLOCK_G=16, BLOCK_N=256), dict(num_warps=4))
    emb_ptrs = {"IDS": "*i64", "POS_IDS": "*i64", "TYPE_IDS": "*i64", "WORD": bf16, "POS": bf16,
                "TYPE": bf16, "LN_W": bf16, "LN_B": bf16, "OUT": bf16, "H": bf16,
                "MEAN": "*fp32", "RSTD": "*fp32", "SEED": "*i64"}
    for norm in (False, True):
        yield (EM._embedding_fwd_kernel, f"bert={norm}", emb_ptrs,
               dict(HAS_POS=norm, HAS_TYPE=norm, HAS_NORM=norm, HAS_DROPOUT=norm, BLOCK_T=2,
                    BLOCK_D=1024), dict(num_warps=4))
    yield (EM._embedding_bwd_kernel, "segment reduction",
           {"SORTED": "*i64", "PERM": "*i64", "DOUT": bf16, "DW": bf16},
           dict(HAS_PADDING=True, SCALE_BY_FREQ=True, BLOCK_T=16, BLOCK_D=512),
           dict(num_warps=4))


def _options(cfg: dict) -> dict:
    """The compile options of a configs.py launch setting."""
    return {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}


# Feature combinations of the attention kernels: the default run compiles FEATURES at head dim 128;
# --all-rows compiles ALL_FEATURES at every head dim of the tables (what configs.py's claims rest on).
FEATURES = {
    "causal": dict(IS_CAUSAL=True),
    "key padding + dropout": dict(HAS_MASK=True, MASK_IS_BOOL=True, KEY_PADDING=True,
                                  HAS_DROPOUT=True),
    "float mask + grad + causal": dict(HAS_MASK=True, MASK_GRAD=True, IS_CAUSAL=True),
    "varlen + causal": dict(IS_VARLEN=True, IS_CAUSAL=True),
}
ALL_FEATURES = {
    "plain": {}, **FEATURES,
    "bool mask + causal": dict(HAS_MASK=True, MASK_IS_BOOL=True, IS_CAUSAL=True),
    "key padding + dropout + causal": dict(HAS_MASK=True, MASK_IS_BOOL=True, KEY_PADDING=True,
                                           HAS_DROPOUT=True, IS_CAUSAL=True),
}


def attention_variants(arch: int, head_dims=(128,), features=FEATURES):
    """The four attention kernels in bf16, with the tiles configs.py picks for `arch`, for each
    head dim and feature combination."""
    import torch

    configs.interpreting = lambda: False  # ask for the GPU's settings
    configs.arch_major = lambda device: arch // 10
    ptrs = {n: "*bf16" for n in ("Q", "K", "V", "Out", "OutLo", "dO", "dK", "dV", "dQ")}
    ptrs.update({n: "*fp32" for n in ("Lse", "Delta", "dMask")})
    ptrs.update({n: "*i32" for n in ("KeyBlocks", "KeyBlockCounts", "CuSeqlensQ", "CuSeqlensK")})
    ptrs["Seed"] = "*i64"
    for d, (feature, flags) in itertools.product(head_dims, features.items()):
        name = f"d{d} {feature}"
        extras = bool(flags.get("HAS_MASK") or flags.get("HAS_DROPOUT"))
        fwd = configs.attention_fwd_config(d, torch.bfloat16, torch.device("cuda"), extras)
        bwd = configs.attention_bwd_config(d, torch.bfloat16, torch.device("cuda"), extras)
        base = dict(IS_CAUSAL=False, HAS_MASK=False, MASK_IS_BOOL=False, KEY_PADDING=False,
                    HAS_DROPOUT=False, IS_VARLEN=False, DOT_FP32=False, DOT_PRECISION="tf32",
                    STORE_LO=True,  # training: the forward keeps out's rounding residual
                    BLOCK_D=d, BLOCK_DV=d)
        base.update({k: v for k, v in flags.items() if k != "MASK_GRAD"})
        mask_ptr = {"Mask": "*u8" if base["MASK_IS_BOOL"] else "*bf16"}
        for fn, cfg, extra in ((AT._attn_fwd_kernel, fwd, {}),
                               (AT._attn_bwd_dkdv_kernel, bwd["dkdv"], {}),
                               (AT._attn_bwd_dq_kernel, bwd["dq"],
                                dict(MASK_GRAD=flags.get("MASK_GRAD", False)))):
            consts = {k: v for k, v in dict(base, **extra, BLOCK_M=cfg["BLOCK_M"],
                                            BLOCK_N=cfg["BLOCK_N"]).items() if k in fn.arg_names}
            yield fn, name, {**ptrs, **mask_ptr}, consts, _options(cfg)
        pre = bwd["preprocess"]
        consts = {k: v for k, v in dict(IS_VARLEN=base["IS_VARLEN"], HAS_LO=True,
                                        BLOCK_M=pre["BLOCK_M"], BLOCK_DV=d).items()
                  if k in AT._attn_bwd_preprocess_kernel.arg_names}
        yield AT._attn_bwd_preprocess_kernel, name, ptrs, consts, _options(pre)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--all-rows"]
    arch = int(args[0]) if args else 90
    if "--all-rows" in sys.argv:  # every attention table row, for tuning kernels/configs.py
        jobs = [(True, v) for v in attention_variants(arch, (64, 128, 256), ALL_FEATURES)]
    else:
        jobs = [(False, v) for v in variants()] + [(True, v) for v in attention_variants(arch)]
    for launch_like, (fn, name, pointers, constexprs, options) in jobs:
        try:
            result = compile_variant(fn, pointers, constexprs, options, arch, launch_like)
        except Exception as e:  # a front-end error: the kernel does not compile
            result = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-400:]}",
                      "registers": 0, "spill_bytes": 0}
        print(json.dumps({"kernel": fn.__name__, "variant": name, **result}), flush=True)
