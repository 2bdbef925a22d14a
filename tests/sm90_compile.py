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

    python tests/sm90_compile.py 90 --static [--jobs N] [--head-dims 64,128]

--static: the static Hopper check (tests/test_hopper_static.py, python -m bench --static). Every
attention kernel the public launchers run, at the STATIC_CELLS (head dim, feature), bf16, is compiled
through Triton's own launch binder (a stand-in driver reports an sm_90 GPU and launches nothing: the
binder specialises the arguments of contiguous CPU tensors as a GPU launch does, configs.py answers
as on Hopper), then read from ptxas's log, the TTGIR and the SASS (nvdisasm). One JSON line per
kernel: resources, occupancy, MMA kind and shapes, loads and wgmma waits of the main loop,
instructions per score, issue:TC, and "gate": the static Hopper rules it breaks (see hopper_gate).
"""

import collections
import contextlib
import inspect
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

if __name__ == "__main__":  # the kernels must be defined with TRITON_INTERPRET unset
    os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastattn.kernels import attention as AT  # noqa: E402
from fastattn.kernels import configs  # noqa: E402
from fastattn.kernels import decode as DC  # noqa: E402
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
    are i32 scalars, or fp32 for the names in FLOATS. options: num_warps (and num_stages), beside
    configs.COMPILE_OPTIONS (every launch passes them).
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
                              target=GPUTarget("cuda", arch, 32),
                              options={**configs.COMPILE_OPTIONS, **options})
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
    "causal": dict(WINDOW_RIGHT=True),
    "key padding + dropout": dict(HAS_MASK=True, MASK_IS_BOOL=True, KEY_PADDING=True,
                                  HAS_DROPOUT=True),
    "float mask + grad + causal": dict(HAS_MASK=True, MASK_GRAD=True, WINDOW_RIGHT=True),
    "varlen + causal": dict(IS_VARLEN=True, WINDOW_RIGHT=True),
}
ALL_FEATURES = {
    "plain": {}, **FEATURES,
    "bool mask + causal": dict(HAS_MASK=True, MASK_IS_BOOL=True, TILE_LISTS=True,
                               WINDOW_RIGHT=True),
    "key padding + dropout + causal": dict(HAS_MASK=True, MASK_IS_BOOL=True, KEY_PADDING=True,
                                           HAS_DROPOUT=True, WINDOW_RIGHT=True),
}


def attention_variants(arch: int, head_dims=(128,), features=FEATURES):
    """The four attention kernels in bf16, with the tiles configs.py picks for `arch`, for each
    head dim and feature combination."""
    import torch

    configs.interpreting = lambda: False  # ask for the GPU's settings
    configs.arch_major = lambda device: arch // 10
    ptrs = {n: "*bf16" for n in ("Q", "K", "V", "Out", "OutLo", "dO", "dK", "dV", "dQ")}
    ptrs.update({n: "*fp32" for n in ("Lse", "Lse2", "Delta", "dMask", "Alibi", "Sinks", "dSinksPart")})
    ptrs.update({n: "*i32" for n in ("KeyBlocks", "KeyBlockCounts", "QueryBlocks", "QueryBlockCounts",
                                     "CuSeqlensQ", "CuSeqlensK")})
    ptrs["Seed"] = "*i64"
    for d, (feature, flags) in itertools.product(head_dims, features.items()):
        name = f"d{d} {feature}"
        dropout = bool(flags.get("HAS_DROPOUT"))
        gpu = torch.device("cuda")  # the defaults: each pass's first candidate
        fwd = configs.attention_fwd_candidates(d, torch.bfloat16, gpu, dropout)[0]
        bwd = {name: c if name == "preprocess" else c[0] for name, c in
               configs.attention_bwd_candidates(d, torch.bfloat16, gpu, dropout).items()}
        base = dict(WINDOW_LEFT=False, WINDOW_RIGHT=False, SOFTCAP=False, HAS_ALIBI=False,
                    HAS_SINKS=False, HAS_MASK=False, MASK_IS_BOOL=False, KEY_PADDING=False,
                    TILE_LISTS=False, HAS_DROPOUT=False, IS_VARLEN=False, DOT_FP32=False, DOT_PRECISION="tf32",
                    STORE_LO=True,  # training: the forward keeps out's rounding residual
                    KV_TMA=arch >= 90,  # K / V by tensor descriptors, as the launcher picks
                    O_TMA=arch >= 90,  # and out
                    BLOCK_D=d, BLOCK_DV=d)
        base.update({k: v for k, v in flags.items() if k != "MASK_GRAD"})
        mask_ptr = {"Mask": "*u8" if base["MASK_IS_BOOL"] else "*bf16"}
        # the backward's descriptors (q, dO; K, V), as configs.py takes them with this Triton
        bwd_tma = configs.attention_descriptors(torch.bfloat16, gpu, backward=True)
        for fn, cfg, extra in ((AT._attn_fwd_kernel, fwd, {}),
                               (AT._attn_bwd_dkdv_kernel, bwd["dkdv"], dict(QDO_TMA=bwd_tma)),
                               (AT._attn_bwd_dq_kernel, bwd["dq"],
                                dict(MASK_GRAD=flags.get("MASK_GRAD", False), KV_TMA=bwd_tma))):
            consts = {k: v for k, v in dict(base, **extra, BLOCK_M=cfg["BLOCK_M"],
                                            BLOCK_N=cfg["BLOCK_N"], SPLIT=cfg.get("SPLIT", 1)
                                            ).items() if k in fn.arg_names}
            yield fn, name, {**ptrs, **mask_ptr}, consts, _options(cfg)
        pre = bwd["preprocess"]
        consts = {k: v for k, v in dict(IS_VARLEN=base["IS_VARLEN"], HAS_LO=True, HAS_SINKS=False,
                                        BLOCK_M=pre["BLOCK_M"], BLOCK_DV=d).items()
                  if k in AT._attn_bwd_preprocess_kernel.arg_names}
        yield AT._attn_bwd_preprocess_kernel, name, ptrs, consts, _options(pre)


# ---- The static Hopper check (--static) ----
#
# Head dims and features of the kernels checked: each feature alone on top of the plain call, at
# every head dim configs.py has a Hopper row for, and a ragged one (80, padded to BLOCK_D 128).
STATIC_HEAD_DIMS = (64, 80, 128, 256)
STATIC_FEATURES = {
    "plain": {},
    "causal": dict(is_causal=True),
    "mask": dict(mask=True),  # a bool (L, S) attn_mask (not the key-padding fast path)
    "key padding": dict(mask="key padding"),  # a bool (B, 1, 1, S) one: BERT's padded batches
    "dropout": dict(dropout_p=0.1),
    "varlen": dict(varlen=True),  # two packed sequences
    "gqa": dict(group=4),  # Hq = 4 * Hkv
    # the score modifiers, as today's models use them (checked at head dims 64 and 128)
    "window + sinks": dict(is_causal=True, window=(511, 0), sinks=True),  # Mistral, GPT-OSS
    "softcap": dict(is_causal=True, softcap=50.0),  # Gemma 2
    "alibi": dict(is_causal=True, alibi=True),  # BLOOM, MPT
    # a decode step (kernels/decode.py, L = 1, GQA 8:1, split over a 32k cache): the cache
    # contiguous, paged (pages of 256), and with the step's key appended and rotated in-kernel
    "decode": dict(decode="contiguous"),
    "decode paged": dict(decode="paged"),
    "decode append": dict(decode="append"),
}
_MODIFIERS = ("window + sinks", "softcap", "alibi")
_DECODE = ("decode paged", "decode append")
# The (head dim, feature) cells of the check: every feature at every head dim, the modifiers at
# the two most used ones, the decode step's paged and append variants at 128.
_CELL_HEAD_DIMS = {**{f: (64, 128) for f in _MODIFIERS},
                   **{f: (128,) for f in _DECODE}}
STATIC_CELLS = [(d, f) for d in STATIC_HEAD_DIMS for f in STATIC_FEATURES
                if d in _CELL_HEAD_DIMS.get(f, STATIC_HEAD_DIMS)]
# The kernels a forward + backward (or a decode step) launches, by their short names in the check's
# records.
STATIC_KERNELS = {"_attn_fwd_kernel": "fwd", "_attn_bwd_preprocess_kernel": "preprocess",
                  "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq",
                  "_decode_fwd_kernel": "decode", "_decode_merge_kernel": "merge",
                  "_kv_append_kernel": "append"}


def cell_kernels(feature: str) -> tuple[str, ...]:
    """The kernels (short names) a cell of `feature` launches: a training step's four, or a decode
    step's attention and merge (and the append with its new key)."""
    if "decode" not in STATIC_FEATURES[feature]:
        return ("fwd", "preprocess", "dkdv", "dq")
    return ("append", "decode", "merge") if feature == "decode append" else ("decode", "merge")


# Memory-bound kernels (a decode step reads the cache once: its tiles have 16 rows, below wgmma's
# 64): their gate asks for no spills and vector (or TMA) loads of K / V, not for wgmma or issue:TC.
MEMORY_BOUND = ("decode", "merge", "append")
# The launch: (B, Hq, L = S); sizes a model uses (16-divisible, so the binder marks them so).
STATIC_SHAPE = (2, 16, 2048)
# The decode step: (B, Hq, Hkv, cache length).
DECODE_SHAPE = (1, 32, 4, 32768)

# Hopper (H200) per SM: 64K registers in 4 sub-partitions, 228 KB shared memory (1 KB of it kept
# per CTA), 64 warps, 32 CTAs; 4 warp schedulers; dense bf16 tensor-core rate 2048 FMA per clock.
_REGS_PER_SUBPARTITION, _SMEM_PER_SM, _SMEM_PER_CTA_RESERVED = 16384, 233472, 1024
_WARPS_PER_SM, _CTAS_PER_SM, _SCHEDULERS, _TC_FMA_PER_CLOCK = 64, 32, 4, 2048
_SASS_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_SERIALISED = re.compile(r"warning[^\n]*\((C7515|C7512)\)[^\n]*")


class _StandInDriver:
    """Triton's active driver as an sm_90 GPU that launches nothing: `kernel[grid](...)` binds and
    specialises its arguments (ints == 1 constant, 16-divisible ints and 16-byte aligned pointers
    marked) and compiles, as on the GPU; the arguments are CPU tensors that are never read."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def get_device_interface(self):
        import torch
        return torch.cuda

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("the stand-in driver launches nothing")


def _stand_in_launches(arch: int) -> list:
    """Make every `kernel[grid](...)` of this process compile for `arch` without launching, and
    configs.py answer as on that GPU; returns the list that receives (kernel name, launch keyword
    arguments, CompiledKernel, ptxas log) per launch."""
    import torch
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # never Triton's disk cache: ptxas's log is wanted
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v (registers, spills, warnings) printed: captured
    driver.set_active(_StandInDriver(arch))
    launches, logs, run = [], {}, JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()) as log:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        logs.setdefault(id(kernel), log.getvalue())  # a kernel met again is not recompiled
        launches.append((self.fn.__name__, kwargs, kernel, logs[id(kernel)]))
        return kernel

    JITFunction.run = compile_only
    configs.arch_major = lambda device: arch // 10
    configs.sm_count = lambda device: 132
    gpu = torch.device("cuda", 0)
    for module in (AT, DC):  # the launchers' copies of configs.py's functions
        for name, fn in list(vars(module).items()):
            if name in ("arch_major", "sm_count"):
                setattr(module, name, getattr(configs, name))
            elif (inspect.isfunction(fn) and fn.__module__ == configs.__name__
                  and "device" in inspect.signature(fn).parameters):
                setattr(module, name, _on_device(fn, gpu))
    return launches


def _on_device(fn, device):
    """fn with its `device` argument replaced by `device` (configs.py then picks that GPU's row)."""
    signature = inspect.signature(fn)

    def wrapped(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["device"] = device
        return fn(*bound.args, **bound.kwargs)
    return wrapped


def _launch_attention(head_dim: int, is_causal=False, mask=False, dropout_p=0.0, varlen=False,
                      group=1, window=(-1, -1), softcap=0.0, alibi=False, sinks=False) -> None:
    """A training step's launches, forward (keeping out's residual) then backward, through the
    public launchers on contiguous bf16 CPU tensors (B, H, N, D), or packed (B * N, H, D)."""
    import torch

    B, Hq, N = STATIC_SHAPE
    Hkv, scale = Hq // group, head_dim ** -0.5
    seed = torch.zeros(1, dtype=torch.int64) if dropout_p else None
    attn_mask = None
    if mask == "key padding":
        attn_mask = torch.ones(B, 1, 1, N, dtype=torch.bool)  # (B, 1, 1, S)
    elif mask:
        attn_mask = torch.ones(N, N, dtype=torch.bool)  # (L, S)
    mods = (*window, False, softcap, torch.ones(B, Hq) if alibi else None,
            torch.zeros(Hq) if sinks else None)  # the launchers' score modifiers
    if varlen:
        q, k, v = (torch.empty(B * N, h, head_dim, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
        cu = torch.arange(0, B * N + 1, N, dtype=torch.int32)  # (B + 1,)
        out, lse, lo = AT.varlen_attention_fwd(q, k, v, cu, cu, N, N, scale, is_causal, dropout_p,
                                               seed, True, *mods)
        AT.varlen_attention_bwd(torch.empty_like(out), q, k, v, out, lse, cu, cu, N, N, scale,
                                is_causal, dropout_p, seed, lo, *mods)
    else:
        q, k, v = (torch.empty(B, h, N, head_dim, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
        out, lse, lo = AT.attention_fwd(q, k, v, scale, is_causal, attn_mask, dropout_p, seed,
                                        True, *mods)
        AT.attention_bwd(torch.empty_like(out), q, k, v, out, lse, scale, is_causal, attn_mask,
                         dropout_p, seed, False, lo, *mods)


def _launch_decode(head_dim: int, decode: str) -> None:
    """A decode step through kernels/decode.py's launcher on contiguous bf16 CPU tensors: q
    (B, 1, Hq, D) against a (B, S, Hkv, D) cache, or a paged one (pages of 256, block table
    (B, S / 256)), or (append) with the step's key and value appended and rotated (rotary_dim =
    head_dim), causal; cache_seqlens on the device, the split count chosen for an H200 (132 SMs)."""
    import torch

    B, Hq, Hkv, S = DECODE_SHAPE
    bf16 = torch.bfloat16
    q = torch.empty(B, 1, Hq, head_dim, dtype=bf16)
    seqlens = torch.full((B,), S - 1, dtype=torch.int32)
    table, k = None, None
    if decode == "paged":
        cache = [torch.empty(B * S // 256, 256, Hkv, head_dim, dtype=bf16) for _ in range(2)]
        table = torch.arange(B * S // 256, dtype=torch.int32).view(B, -1)
    else:
        cache = [torch.empty(B, S, Hkv, head_dim, dtype=bf16) for _ in range(2)]
    cos = sin = None
    if decode == "append":
        k = torch.empty(B, 1, Hkv, head_dim, dtype=bf16)
        cos, sin = (torch.empty(S, head_dim // 2, dtype=bf16) for _ in range(2))
    DC.kvcache_attention_fwd(q, *cache, k, k, seqlens, None, None, table, cos, sin, False, None,
                             head_dim ** -0.5, decode == "append", -1, -1, 0.0, None, None, 0)


def _sass_loops(sass: str) -> list[list[str]]:
    """The innermost loops of a kernel's SASS (nvdisasm), each as its instructions, in address
    order: the bodies of backward branches that hold no other loop. The out-of-line wait stubs
    ptxas puts after the last EXIT are not loops of the kernel."""
    insns, labels = [], {}
    for line in sass.splitlines():
        if m := _SASS_LABEL.match(line):
            labels[m.group(1)] = len(insns)
        elif m := _SASS_INSN.search(line):
            insns.append(m.group(1).strip())
    exits = [i for i, ins in enumerate(insns) if _opcode(ins) == "EXIT"]
    code = insns[:max(exits, default=0) + 1]
    spans = sorted({(labels[m.group(1)], i) for i, ins in enumerate(code)
                    if _opcode(ins).startswith("BRA") and (m := _SASS_TARGET.search(ins))
                    and labels.get(m.group(1), i + 1) <= i})
    inner = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b)
                                                 for c, d in spans)]
    return [insns[a:b + 1] for a, b in inner]


def _opcode(ins: str) -> str:
    """The opcode of a SASS instruction, without its predicate: "HGMMA.64x64x16.F32.BF16"."""
    ins = re.sub(r"^@!?U?P[T0-9]+\s+", "", ins)
    return ins.split()[0] if ins else ""


def _mma_fma(op: str, warps: int) -> int:
    """FMAs one SASS MMA instruction does across the CTA: a wgmma (HGMMA.MxNxK) is issued by the
    four warps of each warpgroup together, an mma.sync (HMMA.MNK: 16816 = m16n8k16) by each warp."""
    if m := re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op):
        return int(m[1]) * int(m[2]) * int(m[3]) * (warps // 4)
    if m := re.match(r"HMMA\.(16)(8)(8|16)", op):
        return int(m[1]) * int(m[2]) * int(m[3]) * warps
    return 0


def _loop_summary(body: list[str], warps: int, tile_scores: int) -> dict:
    """Counts of one SASS loop (one iteration): MMAs and their shapes, loads by kind, wgmma waits,
    exp2s; instr/score = SASS instructions x warps / scores in the tile (BLOCK_M x BLOCK_N);
    issue:TC = issue clocks (instructions x warps / 4 schedulers) / tensor-core clocks (the
    loop's MMA FMAs / 2048 per clock)."""
    ops = [_opcode(ins) for ins in body]
    shapes = collections.Counter(re.sub(r"\.(F32|F16|BF16).*", "", o).split(".", 1)[1]
                                 for o in ops if o.startswith(("HGMMA", "HMMA")))
    loads = collections.Counter(
        "TMA" if o.startswith("UTMALDG") else "cp.async" if o.startswith("LDGSTS") else "LDG"
        for o in ops if o.startswith(("UTMALDG", "LDGSTS"))
        or (o.startswith("LDG") and not o.startswith("LDGDEPBAR")))
    wide = sum(o.startswith(("LDG", "LDGSTS")) and ".128" in o for o in ops)
    fma = sum(_mma_fma(o, warps) for o in ops)
    issue_clocks = len(ops) * warps / _SCHEDULERS
    return {"insns": len(ops), "hgmma": sum(o.startswith("HGMMA") for o in ops),
            "hmma": sum(o.startswith("HMMA") for o in ops), "mma_shapes": dict(shapes),
            "loads": dict(loads), "wide_loads": wide, "depbar": sum(o.startswith("WARPGROUP.DEPBAR") for o in ops),
            "ex2": sum(o == "MUFU.EX2" for o in ops),
            "spill_insns": sum(o.startswith(("LDL", "STL")) for o in ops),
            "instr_per_score": round(len(ops) * warps / tile_scores, 3),
            "issue_tc": round(issue_clocks / (fma / _TC_FMA_PER_CLOCK), 3) if fma else None}


def _ttgir_dots(ttgir: str) -> list[dict]:
    """Every dot of the TTGIR: its M x N x K, the MMA layout of its result (version, warpsPerCTA,
    instrShape) and how many times its warps compute each output element (`dup`: above 1 when the
    layout's warps cover more rows or columns than the tile has, e.g. a 64-row tile on
    warpsPerCTA [8, 1]: both warpgroups compute the same m64 rows)."""
    layouts = {m[1]: (int(m[2]), [int(x) for x in m[3].split(",")],
                      [int(x) for x in m[4].split(",")])
               for m in re.finditer(r"^(#\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+),.*?"
                                    r"warpsPerCTA = \[([\d, ]+)\].*?instrShape = \[([\d, ]+)\]",
                                    ttgir, re.M)}
    dots = []
    for m in re.finditer(r"= (ttng\.warp_group_dot|tt\.dot) (.*?) : (.*?) -> tensor<(\d+)x(\d+)x"
                         r"\w+, (#\w+)>", ttgir):
        M, N, layout = int(m[4]), int(m[5]), m[6]
        K = int(re.search(r"<\d+x(\d+)x", m[3])[1])
        version, warps, instr = layouts.get(layout, (0, [1, 1], [16, 8]))
        rows, cols = warps[0] * 16, warps[1] * instr[1]  # 16 rows per warp, instrShape[1] columns
        dots.append({"shape": f"{M}x{N}x{K}", "mma": f"v{version}", "warps": warps,
                     "dup": max(1, rows // M) * max(1, cols // N)})
    return dots


# Main-loop issue:TC limits (the Triton tutorial's levels): the d128 forward (also serving head dims
# 65..128) at most 0.6, every other kernel at most 1.0. Above 1 the instruction stream, not the
# tensor cores, sets the loop's pace.
ISSUE_TC_LIMIT = {("fwd", 128): 0.6}
ISSUE_TC_DEFAULT_LIMIT = 1.0


def hopper_gate(r: dict) -> list[str]:
    """The static Hopper rules a kernel record breaks (none: it passes): it compiles; every MMA is
    a wgmma (HGMMA), none an mma.sync (HMMA); ptxas serialises no wgmma (warnings C7515 / C7512);
    no MMA work is duplicated across warps (a dot's layout covers its tile once); no spills; one
    CTA fits on an SM; the forward's main loop loads K and V by TMA; the main loop's issue:TC
    within ISSUE_TC_LIMIT."""
    if r.get("error"):
        return [f"compile error: {r['error']}"]
    if not r["regs"]:
        return ["no ptxas report: registers and spills unknown"]
    why = []
    memory_bound = r.get("kernel") in MEMORY_BOUND
    if memory_bound:
        main = r.get("main_loop") or {}
        if (r.get("kernel") == "decode" and main.get("loads", {}).get("TMA", 0) < 2
                and main.get("wide_loads", 0) < 2):
            why.append(f"narrow loads: the decode loop loads K / V as {main.get('loads')}, "
                       f"{main.get('wide_loads', 0)} of them 16-byte vectors")
    elif r["hmma"] or (r["dots"] and not r["hgmma"]):
        why.append(f"mma.sync: {r['hmma']} HMMA, {r['hgmma']} HGMMA in the SASS")
    if r["serialised"]:
        why.append("serialised wgmma: ptxas " + "; ".join(r["serialised"]))
    for dot in r["dots"]:
        if dot["dup"] > 1:
            why.append(f"duplicated MMA: {dot['shape']} dot on warpsPerCTA {dot['warps']} "
                       f"computed {dot['dup']}x")
    if r["spill_store"] or r["spill_load"]:
        why.append(f"spills: {r['spill_store']} B stored, {r['spill_load']} B loaded")
    if r["ctas_per_sm"] < 1:
        why.append(f"does not fit: {r['smem']} B of shared memory, {r['regs']} registers, "
                   f"{r.get('warps')} warps (CTAs per SM by each: {r['ctas_by']})")
    main = r.get("main_loop") or {}
    if r.get("kernel") == "fwd" and main.get("loads", {}).get("TMA", 0) < 2:
        why.append(f"no TMA: the forward's main loop loads K / V as {main.get('loads')}")
    limit = ISSUE_TC_LIMIT.get((r.get("kernel"), r.get("block_d")), ISSUE_TC_DEFAULT_LIMIT)
    if main.get("issue_tc") is not None and main["issue_tc"] > limit and not memory_bound:
        why.append(f"issue:TC: {main['issue_tc']} > {limit} in the main loop")
    return list(dict.fromkeys(why))


def analyse_compiled(kernel, log: str, warps: int, tile_scores: int) -> dict:
    """A compiled kernel's static figures: from ptxas's log (registers, spills, wgmma warnings),
    its metadata (shared memory), TTGIR (dots) and SASS (loops; the main loop is the leanest loop
    with MMAs: the unmasked one where a kernel splits its loop)."""
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", log)), default=0)
    smem = kernel.metadata.shared
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([os.path.join(_BIN, "nvdisasm"), "-c", cubin], capture_output=True,
                              text=True, check=True).stdout
    if os.environ.get("SM90_SASS_DIR"):  # a debugging aid: keep each kernel's SASS to read
        name = f"{kernel.name}-{abs(hash(kernel.asm['ttgir'])) % 10**8}.sass"
        with open(os.path.join(os.environ["SM90_SASS_DIR"], name), "w") as f:
            f.write(sass)
    loops = [_loop_summary(body, warps, tile_scores) for body in _sass_loops(sass)]
    mma_loops = [lp for lp in loops if lp["hgmma"] or lp["hmma"]]
    main = min(mma_loops, key=lambda lp: lp["insns"]) if mma_loops else None
    ops = [_opcode(line) for line in _SASS_INSN.findall(sass)]
    hgmma, hmma = sum(o.startswith("HGMMA") for o in ops), sum(o.startswith("HMMA") for o in ops)
    per_warp_regs = -(-max(regs, 1) * 32 // 256) * 256  # allocated per warp in 256s
    by = {"regs": 4 * (_REGS_PER_SUBPARTITION // per_warp_regs) // warps,
          "smem": _SMEM_PER_SM // (smem + _SMEM_PER_CTA_RESERVED),
          "warps": _WARPS_PER_SM // warps}
    spills = {kind: max((int(x) for x in re.findall(rf"(\d+) bytes spill {kind}s", log)), default=0)
              for kind in ("store", "load")}
    return {"regs": regs, "spill_store": spills["store"], "spill_load": spills["load"],
            "smem": smem, "ctas_per_sm": min(*by.values(), _CTAS_PER_SM), "ctas_by": by,
            "serialised": sorted(set(m[0].strip() for m in _SERIALISED.finditer(log))),
            "hgmma": hgmma, "hmma": hmma,
            "mma_kind": ("wgmma" if hgmma and not hmma else "mma.sync" if hmma and not hgmma
                         else "wgmma+mma.sync" if hmma else "-"),
            "dots": _ttgir_dots(kernel.asm["ttgir"]), "loops": loops, "main_loop": main}


def candidate_counts(head_dim: int, dropout: bool) -> dict:
    """How many launch candidates configs.py lists on Hopper for bf16 at `head_dim` (with dropout
    or not), per pass: {"fwd": n, "dkdv": n, "dq": n}. Leaves configs.py as it was."""
    import torch

    interpreting, arch = configs.interpreting, configs.arch_major
    configs.interpreting, configs.arch_major = (lambda: False), (lambda device: 9)
    try:
        gpu = torch.device("cuda")
        bwd = configs.attention_bwd_candidates(head_dim, torch.bfloat16, gpu, dropout)
        fwd = configs.attention_fwd_candidates(head_dim, torch.bfloat16, gpu, dropout)
    finally:
        configs.interpreting, configs.arch_major = interpreting, arch
    return {"fwd": len(fwd), "dkdv": len(bwd["dkdv"]), "dq": len(bwd["dq"])}


@contextlib.contextmanager
def _candidate(i: int):
    """Launch with autotuning candidate number i of every pass that has one (configs.py's lists
    rotated so that it comes first: the stand-in device tunes nothing, it takes the first); yields
    the set of passes ("fwd", "dkdv", "dq") that have an i-th candidate."""
    fwd, bwd, passes = AT.attention_fwd_candidates, AT.attention_bwd_candidates, set()

    def first(name, cands):
        if i < len(cands):
            passes.add(name)
            return cands[i:] + cands[:i]
        return cands

    AT.attention_fwd_candidates = lambda *a, **k: first("fwd", fwd(*a, **k))
    AT.attention_bwd_candidates = lambda *a, **k: {
        name: first(name, c) if name != "preprocess" else c for name, c in bwd(*a, **k).items()}
    try:
        yield passes
    finally:
        AT.attention_fwd_candidates, AT.attention_bwd_candidates = fwd, bwd


def static_records(arch: int, cells=None, candidates: bool = True):
    """The static check's records (dicts), one per kernel each (head dim, feature) of `cells`
    (default: all) launches; with `candidates`, also one per autotuning alternate of configs.py
    (record "candidate" 1, 2, ...; the default is 0). Installs the stand-in driver: call it once
    per process."""
    import triton as _triton

    launches = _stand_in_launches(arch)
    for d, feature in cells or STATIC_CELLS:
        for i in itertools.count():
            launches.clear()
            base = {"head_dim": d, "feature": feature, "arch": arch, "triton": _triton.__version__,
                    "candidate": i}
            with _candidate(i) as passes:
                try:
                    spec = STATIC_FEATURES[feature]
                    if "decode" in spec:
                        _launch_decode(d, **spec)
                    else:
                        _launch_attention(d, **spec)
                    error = None
                except Exception as e:  # a front-end or ptxas error: the next kernel does not compile
                    error = f"{type(e).__name__}: {str(e)[-300:]}"
            if i and not passes:
                break
            for name, kwargs, kernel, log in launches:
                kind = STATIC_KERNELS.get(name, name)
                if i and kind not in passes:  # this pass has no i-th candidate: its default ran
                    continue
                block_m, block_n = kwargs.get("BLOCK_M"), kwargs.get("BLOCK_N")
                warps, stages = kernel.metadata.num_warps, kernel.metadata.num_stages
                r = {**base, "kernel": kind, "fn": name,
                     "block_m": block_m, "block_n": block_n, "block_d": kwargs.get("BLOCK_D"),
                     "tile": f"{block_m}x{block_n}" if block_m and block_n else f"{block_m or block_n or '-'}",
                     "warps": warps, "stages": stages,
                     **analyse_compiled(kernel, log, warps, (block_m or 1) * (block_n or 1))}
                r["gate"] = hopper_gate(r)
                r["ok"] = not r["gate"]
                yield r
            if error:  # the kernels launched after the failing one are not reported
                yield {**base, "kernel": "?", "error": error, "gate": [f"compile error: {error}"],
                       "ok": False}
            if not candidates:
                break


def _static_main(arch: int, argv: list[str]) -> None:
    """--static [--jobs N] [--head-dims 64,128]: the records as JSON lines, in (head dim, feature)
    order; with N > 1 jobs, split over N child processes of this script."""
    opts = dict(zip(argv[::2], argv[1::2]))
    head_dims = (tuple(int(d) for d in opts.get("--head-dims", "").split(",") if d)
                 or STATIC_HEAD_DIMS)
    jobs = int(opts.get("--jobs", "1"))
    cells = [(d, f) for d, f in STATIC_CELLS if d in head_dims]
    if jobs <= 1:
        records = static_records(arch, cells)  # printed as they come
    else:
        procs = [subprocess.Popen([sys.executable, __file__, str(arch), "--static", "--cells",
                                   ";".join(f"{d}:{f}" for d, f in cells[i::jobs])],
                                  stdout=subprocess.PIPE, text=True) for i in range(jobs)]
        outs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"a --static job failed: exit codes {[p.returncode for p in procs]}")
        records = [json.loads(line) for out in outs for line in out.splitlines()
                   if line.startswith("{")]
        order = {cell: i for i, cell in enumerate(cells)}
        records = sorted(records, key=lambda r: order[(r["head_dim"], r["feature"])])  # stable
    for r in records:
        print(json.dumps(r), flush=True)


def _static_cells_main(arch: int, cells: str) -> None:
    """--static --cells "128:plain;64:causal": one job of _static_main."""
    todo = [(int(d), feature) for d, feature in (cell.split(":") for cell in cells.split(";"))]
    for r in static_records(arch, todo):
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--all-rows"]
    arch = int(args[0]) if args and args[0].isdigit() else 90
    if "--static" in args:  # the static Hopper check (tests/test_hopper_static.py)
        rest = args[args.index("--static") + 1:]
        if rest[:1] == ["--cells"]:
            _static_cells_main(arch, rest[1])
        else:
            _static_main(arch, rest)
        sys.exit(0)
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
