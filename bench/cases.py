"""The cases the runner checks and times: for each op, how to make its inputs, fastattn's call,
torch's own call (the parity yardstick and the sweep's agreement reference), the float64 oracle, the
work it does, its peers in the sweep, and the sizes swept on each kind of machine.

Work counted per case (the same figure for every implementation, so the ratios are time ratios):

    attention        FLOPs  fwd 4·B·H·D·P, P the (query, key) pairs: L·S, L·S/2 causal (the
                            softcap and ALiBi cases are causal); bwd 2.5 x fwd; fwd+bwd 3.5 x fwd.
                            The padding-mask case counts the dense L x S work: skipping padded
                            keys shows up as speed. The sliding-window case (each query i sees
                            keys i - W + 1 .. i) counts the visible pairs alone,
                            P = Σ_i |[i - W + 1, i] ∩ [0, S)| = N·W - W(W - 1)/2 for L = S = N >= W,
                            however many an implementation computes: skipping the blocks outside
                            the window shows up as speed over peers that compute them (SDPA with
                            the dense mask).
    layer_norm,      bytes  fwd 2·M·N·e (read x, write y); bwd 3·M·N·e (read x, dy; write dx)
      rms_norm
    add_layer_norm   bytes  fwd 4·M·N·e (read x, residual; write y, h); bwd 3·M·N·e
    embedding        bytes  fwd 2·T·D·e (read T rows, write out); bwd T·D·e + V·D·e (read
                            dout, write the table gradient)
    gpt_embeddings   bytes  fwd 2·T·D·e + N·D·e (+ the N position rows);
                            bwd T·D·e + (V + N)·D·e
    bert_embeddings  bytes  fwd 2·T·D·e + N·D·e; bwd 2·T·D·e + (V + N)·D·e (dout, saved sum)
    decode,          bytes  one decode step (q length 1, inference: no bwd):
      decode_paged          2·B·S·Hkv·D·e (the K and V caches read once) + 2·B·Hq·D·e (q read,
                            out written); the sweep's caches are full (cache_seqlens = S)

with T = B·N tokens and e bytes per element; parameters and statistics (O(N) or O(M)) left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

import fastattn
from fastattn import reference

Tensors = dict[str, Tensor]
Fn = Callable[[Tensors], Tensor]
MODES = ("fwd", "bwd", "fwd+bwd")
UNITS = {"attention": "TFLOP/s", "norm": "GB/s", "embedding": "GB/s", "decode": "GB/s"}
# What % of ceiling is of (decode's: a reference rate, not a bound; see measure.beaten_ceilings).
CEILINGS = {"attention": "matmul", "norm": "copy", "embedding": "copy", "decode": "copy"}


@dataclass
class Inputs:
    t: Tensors  # the named arguments; those named in `grads` require grad
    grads: tuple[str, ...]
    dout: Tensor  # the gradient fed to the output

    @property
    def leaves(self) -> list[Tensor]:
        return [self.t[name] for name in self.grads]

    def to_float64(self) -> "Inputs":
        """Fresh float64 leaves with the same values (integer and bool tensors as they are)."""
        t = {name: x.detach().double().requires_grad_(name in self.grads)
             if x.is_floating_point() else x for name, x in self.t.items()}
        return Inputs(t, self.grads, self.dout.double())


@dataclass
class Op:
    name: str  # as in the JSON records; contains "attention", "norm", "embedding" or "decode"
    family: str  # "attention" | "norm" | "embedding" | "decode": its unit and ceiling
    make: Callable[[dict, torch.dtype, str, int], Inputs]  # (size, dtype, device, seed)
    ours: Fn
    torch: Fn  # torch's own op in the input dtype
    reference: Fn  # the oracle, run on float64 inputs
    work: Callable[[dict, torch.dtype], tuple[float, float]]  # (fwd, bwd) FLOPs or bytes
    peers: Callable[["Case", Tensors, str, Union[str, None]], dict[str, Union[Fn, str]]]
    label: Callable[[dict], str]  # the shape as printed
    modes: tuple[str, ...] = MODES  # those it has (decode: "fwd" alone, no backward)
    # CUDA: time each mode as a CUDA graph replaying the call over rotated copies of the inputs
    # (measure.graph_time_ms): for calls of a few µs, whose eager time is the host's
    cuda_graph: bool = False


@dataclass
class Case:
    op: Op
    size: dict
    dtype: torch.dtype
    flex: bool = False  # attention: also time FlexAttention (a compile per case, so a few only)
    skip: Union[str, None] = None  # why the sweep does not run it ("n/a: ..."), or None

    @property
    def shape(self) -> str:
        return self.op.label(self.size)

    @property
    def title(self) -> str:
        """op, shape and dtype, as progress bars name the case: "layer_norm M19 N768 float32"."""
        return f"{self.op.name} {self.shape} {str(self.dtype).removeprefix('torch.')}"


def step(fn: Fn, inputs: Inputs, mode: str, out: Tensor | None = None) -> Callable[[], object]:
    """What is timed for `mode`: fwd calls fn (inputs requiring grad, as in training); bwd
    differentiates one forward output (`out`, or a new one) again and again; fwd+bwd does both."""
    t, leaves, dout = inputs.t, inputs.leaves, inputs.dout
    if mode == "fwd":
        return lambda: fn(t)
    if mode == "bwd":
        out = fn(t) if out is None else out
        return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(t), leaves, dout)
    raise ValueError(f"mode {mode!r} is not one of {MODES}")


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _randn(gen: torch.Generator, device: str, dtype: torch.dtype, *shape: int,
           grad: bool = False) -> Tensor:
    return torch.randn(*shape, generator=gen, device=device).to(dtype).requires_grad_(grad)


def _generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def compiled(fn: Fn) -> Fn:
    """torch.compile'd fn for this case's shapes. Dynamo is reset first: every case compiles afresh,
    so the recompiles of a sweep never reach Dynamo's limit (past it, it silently runs eager)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# ---- attention ----
#
# size: B, H (query heads), Hkv, L (queries), S (keys), D (head dim); the score-modifier ops also W
# (attention_window: each query sees its W latest keys, itself included: window_size (W - 1, 0)
# with is_causal) or softcap (attention_softcap: the cap c, s -> c·tanh(s / c)). Sweeps keep
# B·N = 16384 tokens and H·D = 2048 (flash-attention's benchmark convention), so every sequence
# length fills the GPU the same way.

# The peers' names, "torch <name>", and torch.nn.attention.SDPBackend's names for them.
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
MATH_MAX_SCORES = 2**30  # math backend and eager skipped above this many B·H·L·S scores
GEMMA2_SOFTCAP = 50.0  # Gemma 2's attention logit cap


def _attention_size(n: int, d: int, gqa: bool = False, tokens: int = 16384,
                    width: int = 2048, **mod) -> dict:
    h = width // d
    return dict(B=max(1, tokens // n), H=h, Hkv=h // 4 if gqa else h, L=n, S=n, D=d, **mod)


def _attention_label(s: dict) -> str:
    seq = f"N{s['L']}" if s["L"] == s["S"] else f"L{s['L']} S{s['S']}"
    heads = f"H{s['H']}" + (f"/{s['Hkv']}" if s["Hkv"] != s["H"] else "")
    mod = (f" W{s['W']}" if "W" in s else "") + (f" cap{s['softcap']:g}" if "softcap" in s else "")
    return f"B{s['B']} {heads} {seq} D{s['D']}{mod}"


def alibi_slopes(h: int, device: str) -> Tensor:
    """ALiBi's head slopes 2^(-8(i+1)/h), i = 0 .. h-1 (Press et al.): (h,) fp32."""
    return torch.exp2(-8 * torch.arange(1, h + 1, device=device, dtype=torch.float32) / h)


def _band(L: int, S: int, left: int, device: str) -> Tensor:
    """(L, S) bool, True = attend: query i sees keys i - left .. i (top-left aligned; left = -1:
    every key up to i, the causal mask). Built in place: no (L, S) index tensor."""
    m = torch.ones(L, S, dtype=torch.bool, device=device).tril_()
    return m.triu_(-left) if left >= 0 else m


def _alibi_bias(slopes: Tensor, L: int, S: int, dtype: torch.dtype) -> Tensor:
    """The dense float mask of causal ALiBi: -slope[h]·|j - i|, -inf where j > i: (1, H, L, S) in
    dtype, computed in fp32 a head at a time."""
    device = slopes.device
    dist = (torch.arange(S, device=device, dtype=torch.float32)[None, :]
            - torch.arange(L, device=device, dtype=torch.float32)[:, None]).abs_()  # (L, S)
    hidden = ~_band(L, S, -1, device)
    bias = torch.empty(1, slopes.numel(), L, S, dtype=dtype, device=device)
    for h, slope in enumerate(slopes.tolist()):
        bias[0, h] = (dist * -slope).masked_fill_(hidden, float("-inf"))
    return bias


def visible_pairs(L: int, S: int, left: int) -> int:
    """The (query, key) pairs a causal window of keys i - left .. i sees: Σ_i |[i - left, i] ∩
    [0, S)| (top-left aligned)."""
    i = torch.arange(L, dtype=torch.int64)
    return int((i.clamp(max=S - 1) - (i - left).clamp(min=0) + 1).clamp(min=0).sum())


def _eager_softcap(t: Tensors) -> Tensor:
    """Softcapped causal attention as eager PyTorch writes it (Hugging Face's Gemma 2): scores in
    the input dtype, capped, masked, softmax in fp32."""
    q, k, v, cap = t["q"], t["k"], t["v"], float(t["softcap"])
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, L, S)
    s = torch.tanh(s / cap) * cap
    s = s.masked_fill(~t["dense"], float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def _attention_op(name: str, causal: bool = False, mask: bool = False, gqa: bool = False,
                  mod: str | None = None) -> Op:
    """One attention variant: plain, causal, a BERT key-padding mask, grouped-query heads, or a
    causal one with a score modifier (mod): "window", "softcap" or "alibi". The modifier ops'
    torch is SDPA with the equivalent dense mask (window: the (L, S) band; alibi: the (1, H, L, S)
    bias), or for softcap, which no mask expresses, the eager composition."""
    extra = {"enable_gqa": True} if gqa else {}

    def make(size, dtype, device, seed):
        gen = _generator(device, seed)
        B, H, Hkv, L, S, D = (size[k] for k in ("B", "H", "Hkv", "L", "S", "D"))
        t = dict(q=_randn(gen, device, dtype, B, H, L, D, grad=True),  # (B, H, L, D)
                 k=_randn(gen, device, dtype, B, Hkv, S, D, grad=True),  # (B, Hkv, S, D)
                 v=_randn(gen, device, dtype, B, Hkv, S, D, grad=True))
        if mask:  # each sequence keeps its first `lengths[b]` keys, a quarter to all of them
            t["lengths"] = torch.randint(max(1, S // 4), S + 1, (B,), generator=gen, device=device)
            keep = torch.arange(S, device=device) < t["lengths"][:, None]  # (B, S)
            t["mask"] = keep[:, None, None, :]  # (B, 1, 1, S) bool, True = attend
        # A modifier's scalar rides along as a CPU tensor, read as a number in each call.
        if mod == "window":
            t["window"] = torch.tensor([size["W"] - 1, 0])  # (2,) int64: window_size (left, right)
            t["dense"] = _band(L, S, size["W"] - 1, device)  # (L, S) bool, True = attend
        elif mod == "softcap":
            t["softcap"] = torch.tensor(float(size["softcap"]), dtype=torch.float64)  # ()
            t["dense"] = _band(L, S, -1, device)  # (L, S) bool causal, for the eager composition
        elif mod == "alibi":
            t["slopes"] = alibi_slopes(H, device)  # (H,) fp32, no gradient
            t["dense"] = _alibi_bias(t["slopes"], L, S, dtype)  # (1, H, L, S) float mask
        return Inputs(t, ("q", "k", "v"), _randn(gen, device, dtype, B, H, L, D))

    def ours(t):
        return fastattn.scaled_dot_product_attention(t["q"], t["k"], t["v"],
                                                     attn_mask=t.get("mask"), is_causal=causal,
                                                     enable_gqa=gqa)

    def ours_modded(t):
        return fastattn.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=causal,
                                                     **_fastattn_mods(t))

    def torch_sdpa(t):
        if mod is not None:  # the dense mask holds the causal part too (SDPA takes one or other)
            return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t["dense"])
        return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t.get("mask"),
                                              is_causal=causal, **extra)

    theirs = _eager_softcap if mod == "softcap" else torch_sdpa

    def oracle(t):
        if mask:  # torch's math SDPA in float64 (fastattn.reference takes no mask)
            return torch_sdpa(t)
        return reference.scaled_dot_product_attention(t["q"], t["k"], t["v"], causal,
                                                      **_reference_mods(t))[0]

    def work(size, dtype):
        L, S = size["L"], size["S"]
        pairs = (visible_pairs(L, S, size["W"] - 1) if mod == "window"
                 else L * S * (0.5 if causal else 1))
        fwd = 4 * size["B"] * size["H"] * size["D"] * pairs
        return fwd, 2.5 * fwd

    def peers(case, t, device, heavy_note):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def in_backend(backend):
            def run(t):
                with sdpa_kernel(backend):
                    return torch_sdpa(t)
            return run

        s = case.size
        too_many = s["B"] * s["H"] * s["L"] * s["S"] > MATH_MAX_SCORES
        out = {}
        if mod == "softcap":  # no SDPA call computes it: the eager composition stands in
            out["torch sdpa"] = "n/a: SDPA has no softcap, and no attn_mask is equivalent"
            out["torch eager"] = ("n/a: skipped above 2^30 scores (eager materialises them)"
                                  if too_many else _eager_softcap)
            names = {}
        else:
            names = SDPA_BACKENDS
        for name, enum_name in names.items():
            backend = getattr(SDPBackend, enum_name, None)
            if backend is None:
                out[f"torch {name}"] = f"n/a: torch {torch.__version__} has no {name} backend"
            elif name == "math" and too_many:
                out[f"torch {name}"] = "n/a: skipped above 2^30 scores (math materialises them)"
            else:
                out[f"torch {name}"] = in_backend(backend)
        if case.flex:
            out["torch flex"] = heavy_note or _flex(t, causal, gqa, device)
        return out

    return Op(name, "attention", make, ours if mod is None else ours_modded, theirs, oracle, work,
              peers, _attention_label)


def _fastattn_mods(t: Tensors) -> dict:
    """The score modifiers in t as fastattn's keyword arguments."""
    mods = {}
    if "window" in t:
        mods["window_size"] = tuple(t["window"].tolist())
    if "softcap" in t:
        mods["softcap"] = float(t["softcap"])
    if "slopes" in t:
        mods["alibi_slopes"] = t["slopes"]
    return mods


def _reference_mods(t: Tensors) -> dict:
    """The score modifiers in t as fastattn.reference's keyword arguments."""
    names = {"window_size": "window", "softcap": "softcap", "alibi_slopes": "alibi"}
    return {names[k]: v for k, v in _fastattn_mods(t).items()}


def flex_mods(t: Tensors, causal: bool) -> tuple[Callable | None, Callable | None]:
    """FlexAttention's (score_mod, mask_mod) for the case in t: the padding mask, the causal
    window or the causal mask as mask_mod; softcap or ALiBi as score_mod (on the scaled score,
    as fastattn applies them)."""
    mask_mod = score_mod = None
    if "lengths" in t:
        lengths = t["lengths"]

        def mask_mod(b, h, q, kv):
            return kv < lengths[b]
    elif "window" in t:
        left = int(t["window"][0])

        def mask_mod(b, h, q, kv):
            return (q >= kv) & (q - kv <= left)
    elif causal:
        def mask_mod(b, h, q, kv):
            return q >= kv
    if "softcap" in t:
        cap = float(t["softcap"])

        def score_mod(s, b, h, q, kv):
            return torch.tanh(s / cap) * cap
    elif "slopes" in t:
        slopes = t["slopes"]

        def score_mod(s, b, h, q, kv):
            return s - slopes[h] * (q - kv).abs()
    return score_mod, mask_mod


def _flex(t: Tensors, causal: bool, gqa: bool, device: str) -> Fn | str:
    """FlexAttention (compiled) with the case's mask as a block mask and its modifier as
    score_mod (flex_mods)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return f"n/a: torch {torch.__version__} has no FlexAttention"
    B, _, L, _ = t["q"].shape
    S = t["k"].shape[2]
    score_mod, mask_mod = flex_mods(t, causal)
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, B if "lengths" in t else None, None, L, S,
                                       device=device)
    flex = compiled(flex_attention)
    return lambda t: flex(t["q"], t["k"], t["v"], score_mod=score_mod, block_mask=block_mask,
                          enable_gqa=gqa)


ATTENTION = _attention_op("attention")
ATTENTION_CAUSAL = _attention_op("attention_causal", causal=True)
ATTENTION_MASK = _attention_op("attention_padding_mask", mask=True)
ATTENTION_GQA = _attention_op("attention_gqa", causal=True, gqa=True)
ATTENTION_WINDOW = _attention_op("attention_window", causal=True, mod="window")
ATTENTION_SOFTCAP = _attention_op("attention_softcap", causal=True, mod="softcap")
ATTENTION_ALIBI = _attention_op("attention_alibi", causal=True, mod="alibi")
SCORE_MOD_OPS = (ATTENTION_WINDOW, ATTENTION_SOFTCAP, ATTENTION_ALIBI)

# ---- layer_norm / rms_norm / add_layer_norm ----
#
# size: M rows, N hidden. Sweeps keep M·N = 2^27 elements (256 MiB per bf16 tensor): every size
# moves enough bytes for its time to be bandwidth, not launch latency.

NORM_ELEMENTS = 2**27


def _norm_op(name: str, ours: Fn, theirs: Fn, oracle: Fn, names: tuple[str, ...],
             fwd_tensors: int, bwd_tensors: int) -> Op:
    """names: the inputs, all differentiable: x (M, N), then r (M, N), w (N,), b (N,) as used."""

    def make(size, dtype, device, seed):
        gen = _generator(device, seed)
        M, N = size["M"], size["N"]
        t = {n: _randn(gen, device, dtype, *((M, N) if n in ("x", "r") else (N,)), grad=True)
             for n in names}
        return Inputs(t, names, _randn(gen, device, dtype, M, N))

    def work(size, dtype):
        mne = size["M"] * size["N"] * _bytes(dtype)
        return fwd_tensors * mne, bwd_tensors * mne

    def peers(case, t, device, heavy_note):
        return {"torch": theirs, "torch compile": heavy_note or compiled(theirs)}

    return Op(name, "norm", make, ours, theirs, oracle, work, peers,
              lambda s: f"M{s['M']} N{s['N']}")


def _n(t: Tensors) -> tuple[int]:
    return (t["x"].shape[-1],)


LAYER_NORM = _norm_op(
    "layer_norm",
    lambda t: fastattn.layer_norm(t["x"], _n(t), t["w"], t["b"], 1e-5),
    lambda t: F.layer_norm(t["x"], _n(t), t["w"], t["b"], 1e-5),
    lambda t: reference.layer_norm(t["x"], t["w"], t["b"], 1e-5),
    ("x", "w", "b"), 2, 3)
RMS_NORM = _norm_op(
    "rms_norm",
    lambda t: fastattn.rms_norm(t["x"], _n(t), t["w"], 1e-6),
    lambda t: F.rms_norm(t["x"], _n(t), t["w"], 1e-6),
    lambda t: reference.rms_norm(t["x"], t["w"], 1e-6),
    ("x", "w"), 2, 3)
ADD_LAYER_NORM = _norm_op(
    "add_layer_norm",
    lambda t: fastattn.add_layer_norm(t["x"], t["r"], _n(t), t["w"], t["b"], 1e-5)[0],
    lambda t: F.layer_norm(t["x"] + t["r"], _n(t), t["w"], t["b"], 1e-5),
    lambda t: reference.layer_norm(t["x"] + t["r"], t["w"], t["b"], 1e-5),
    ("x", "r", "w", "b"), 4, 3)

# ---- embedding / gpt_embeddings / bert_embeddings ----
#
# size: B sequences of N tokens, V rows in the word table, D columns; position tables have N rows.


def _embedding_op(name: str, ours: Fn, theirs: Fn, tables: tuple[str, ...],
                  fwd: Callable[[int, int, int], int], bwd: Callable[[int, int, int], int]) -> Op:
    """tables: the differentiable inputs among word (V, D), pos (N, D), type (2, D), ln_w,
    ln_b (D,); fwd, bwd: elements moved, from (T, N, V) per column."""

    def make(size, dtype, device, seed):
        gen = _generator(device, seed)
        B, N, V, D = size["B"], size["N"], size["V"], size["D"]
        rows = {"word": V, "pos": N, "type": 2}
        t = dict(ids=torch.randint(0, V, (B, N), generator=gen, device=device),  # (B, N)
                 types=torch.randint(0, 2, (B, N), generator=gen, device=device))
        for n in tables:
            if n in rows:
                t[n] = _randn(gen, device, dtype, rows[n], D, grad=True)  # (rows, D)
        if "ln_w" in tables:
            ln_w = torch.rand(D, generator=gen, device=device) + 0.5  # (D,) in [0.5, 1.5)
            t["ln_w"] = ln_w.to(dtype).requires_grad_()
            t["ln_b"] = _randn(gen, device, dtype, D, grad=True)
        return Inputs(t, tables, _randn(gen, device, dtype, B, N, D))

    def work(size, dtype):
        B, N, V, D = size["B"], size["N"], size["V"], size["D"]
        per_column = D * _bytes(dtype)
        return fwd(B * N, N, V) * per_column, bwd(B * N, N, V) * per_column

    def peers(case, t, device, heavy_note):
        return {"torch": theirs}

    return Op(name, "embedding", make, ours, theirs, theirs, work, peers,
              lambda s: f"B{s['B']} N{s['N']} V{s['V']} D{s['D']}")


def _positions(t: Tensors) -> Tensor:
    return torch.arange(t["ids"].shape[-1], device=t["ids"].device)  # (N,)


def _gpt_compose(t: Tensors) -> Tensor:
    return F.embedding(t["ids"], t["word"]) + F.embedding(_positions(t), t["pos"])


def _bert_compose(t: Tensors) -> Tensor:
    h = _gpt_compose(t) + F.embedding(t["types"], t["type"])
    return F.layer_norm(h, (h.shape[-1],), t["ln_w"], t["ln_b"], 1e-12)


EMBEDDING = _embedding_op(
    "embedding",
    lambda t: fastattn.embedding(t["ids"], t["word"]),
    lambda t: F.embedding(t["ids"], t["word"]),
    ("word",), lambda T, N, V: 2 * T, lambda T, N, V: T + V)
GPT_EMBEDDINGS = _embedding_op(
    "gpt_embeddings",
    lambda t: fastattn.gpt_embeddings(t["ids"], t["word"], t["pos"]),
    _gpt_compose,
    ("word", "pos"), lambda T, N, V: 2 * T + N, lambda T, N, V: T + V + N)
BERT_EMBEDDINGS = _embedding_op(
    "bert_embeddings",
    lambda t: fastattn.bert_embeddings(t["ids"], t["word"], t["pos"], t["type"], t["ln_w"],
                                       t["ln_b"], token_type_ids=t["types"], eps=1e-12),
    _bert_compose,
    ("word", "pos", "type", "ln_w", "ln_b"), lambda T, N, V: 2 * T + N,
    lambda T, N, V: 2 * T + V + N)

# ---- decode / decode_paged: one decoding step against a KV cache ----
#
# size: B sequences, H query heads (q length 1), Hkv kv heads, S cache rows per sequence, D head
# dim; decode_paged also page (rows per page); ragged (parity): each sequence's cache_seqlens drawn
# from [S // 2, S] (the first is S) instead of S for every sequence, the rows past it masked for
# the peers. fastattn is fastattn.kvcache_attention on the cache (B, S, Hkv, D), or on the paged
# cache (B·ceil(S / page), page, Hkv, D) through a block table that scatters each sequence's pages
# over the whole cache (a random permutation). The peers read the same rows as (B, Hkv, S, D): a
# transposed view of the contiguous cache, a gathered copy of the paged one (made before timing).

DECODE_PAGE = 256  # rows per page of the paged sweep
DECODE_MEMORY_GIB = 16  # the sweep skips a case whose K + V caches would take more


def decode_cache_bytes(size: dict, dtype: torch.dtype) -> int:
    """The K + V caches' bytes (the rows the step reads; the paged cache's last page may add a
    few): 2·B·S·Hkv·D·e."""
    return 2 * size["B"] * size["S"] * size["Hkv"] * size["D"] * _bytes(dtype)


def _decode_label(s: dict) -> str:
    heads = f"H{s['H']}" + (f"/{s['Hkv']}" if s["Hkv"] != s["H"] else "")
    return (f"B{s['B']} {heads} S{s['S']} D{s['D']}" + (f" page{s['page']}" if "page" in s else "")
            + (" ragged" if s.get("ragged") else ""))


def _gqa(t: Tensors) -> dict:
    """enable_gqa=True where the query heads outnumber the kv heads (with equal heads every SDPA
    backend may run)."""
    return {"enable_gqa": True} if t["q"].shape[2] != t["k"].shape[1] else {}


def _decode_op(name: str, paged: bool) -> Op:
    def make(size, dtype, device, seed):
        gen = _generator(device, seed)
        B, H, Hkv, S, D = (size[k] for k in ("B", "H", "Hkv", "S", "D"))
        t = dict(q=_randn(gen, device, dtype, B, 1, H, D))  # (B, 1, Hq, D)
        if paged:
            page = size["page"]
            per_seq = -(-S // page)
            for n in ("k_cache", "v_cache"):  # (B·per_seq, page, Hkv, D)
                t[n] = _randn(gen, device, dtype, B * per_seq, page, Hkv, D)
            order = torch.randperm(B * per_seq, generator=gen, device=device)
            t["block_table"] = order.view(B, per_seq).to(torch.int32)  # (B, per_seq)
            rows = t["block_table"].long()
            # (B, per_seq, page, Hkv, D) -> (B, S, Hkv, D) -> (B, Hkv, S, D): the peers' copy
            t["k"], t["v"] = (t[n][rows].flatten(1, 2)[:, :S].transpose(1, 2)
                              for n in ("k_cache", "v_cache"))
        else:
            for n in ("k_cache", "v_cache"):  # (B, S, Hkv, D)
                t[n] = _randn(gen, device, dtype, B, S, Hkv, D)
            t["k"], t["v"] = t["k_cache"].transpose(1, 2), t["v_cache"].transpose(1, 2)
        lens = torch.full((B,), S, dtype=torch.int32, device=device)
        if size.get("ragged"):
            lens = torch.randint(S // 2, S + 1, (B,), generator=gen, device=device,
                                 dtype=torch.int32)
            lens[0] = S
            keep = torch.arange(S, device=device) < lens[:, None]  # (B, S)
            t["mask"] = keep[:, None, None, :]  # (B, 1, 1, S) bool, True = attend
        t["cache_seqlens"] = lens  # (B,) int32
        return Inputs(t, (), t["q"].new_empty(0))  # inference only: nothing to differentiate

    def ours(t):
        return fastattn.kvcache_attention(t["q"], t["k_cache"], t["v_cache"],
                                          cache_seqlens=t["cache_seqlens"],
                                          block_table=t.get("block_table"))

    def torch_sdpa(t):  # (B, 1, Hq, D) -> (B, Hq, 1, D) against (B, Hkv, S, D), and back
        return F.scaled_dot_product_attention(t["q"].transpose(1, 2), t["k"], t["v"],
                                              attn_mask=t.get("mask"), **_gqa(t)).transpose(1, 2)

    def prefill(t):  # fastattn's prefill kernel on the same step
        return fastattn.scaled_dot_product_attention(t["q"].transpose(1, 2), t["k"], t["v"],
                                                     attn_mask=t.get("mask"),
                                                     **_gqa(t)).transpose(1, 2)

    def oracle(t):
        return reference.kvcache_attention(t["q"], t["k_cache"], t["v_cache"],
                                           cache_seqlens=t["cache_seqlens"],
                                           block_table=t.get("block_table"))[0]

    def work(size, dtype):
        q_out = 2 * size["B"] * size["H"] * size["D"] * _bytes(dtype)
        return decode_cache_bytes(size, dtype) + q_out, 0

    def peers(case, t, device, heavy_note):
        out = {"torch sdpa": torch_sdpa, "fastattn prefill": prefill}
        if case.flex:
            out["torch flex"] = heavy_note or _flex_decode(t)
        return out

    return Op(name, "decode", make, ours, torch_sdpa, oracle, work, peers, _decode_label,
              modes=("fwd",), cuda_graph=True)


def _flex_decode(t: Tensors) -> Fn | str:
    """FlexAttention (compiled; a single query row takes its decoding kernel) on the peers'
    (B, Hkv, S, D) rows, no mask (the sweep's caches are full)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return f"n/a: torch {torch.__version__} has no FlexAttention"
    if "mask" in t:
        return "n/a: FlexAttention is timed on full caches only"
    flex = compiled(flex_attention)
    return lambda t: flex(t["q"].transpose(1, 2), t["k"], t["v"], **_gqa(t)).transpose(1, 2)


DECODE = _decode_op("decode", paged=False)
DECODE_PAGED = _decode_op("decode_paged", paged=True)
DECODE_OPS = (DECODE, DECODE_PAGED)

OPS = (ATTENTION, ATTENTION_CAUSAL, ATTENTION_MASK, ATTENTION_GQA, *SCORE_MOD_OPS, LAYER_NORM,
       RMS_NORM, ADD_LAYER_NORM, EMBEDDING, GPT_EMBEDDINGS, BERT_EMBEDDINGS, *DECODE_OPS)
FAMILIES = ("attention", "norm", "embedding", "decode")

# ---- what is checked and swept ----

PARITY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd sizes, not multiples of any block; the first of each is the --quick set.
PARITY_SIZES = {
    "attention": [dict(B=2, H=3, Hkv=3, L=17, S=17, D=64),
                  dict(B=1, H=2, Hkv=2, L=100, S=37, D=40)],
    "attention_causal": [dict(B=2, H=3, Hkv=3, L=17, S=17, D=64),
                         dict(B=1, H=2, Hkv=2, L=100, S=37, D=40)],
    "attention_padding_mask": [dict(B=2, H=3, Hkv=3, L=17, S=29, D=64)],
    "attention_gqa": [dict(B=2, H=4, Hkv=2, L=33, S=33, D=64)],
    # Small enough for the CPU's quick check; big enough that the window skips key and query
    # blocks of the interpreter's tiles, and that a cap of 2 bends the unit-variance scores.
    "attention_window": [dict(B=1, H=2, Hkv=2, L=100, S=100, D=32, W=24),
                         dict(B=2, H=3, Hkv=3, L=45, S=77, D=40, W=7)],
    "attention_softcap": [dict(B=1, H=2, Hkv=2, L=50, S=50, D=64, softcap=2.0),
                          dict(B=1, H=2, Hkv=2, L=100, S=37, D=40, softcap=GEMMA2_SOFTCAP)],
    "attention_alibi": [dict(B=1, H=4, Hkv=4, L=50, S=50, D=32),
                        dict(B=1, H=2, Hkv=2, L=100, S=37, D=40)],
    "layer_norm": [dict(M=19, N=768), dict(M=37, N=97), dict(M=5, N=4099)],
    "rms_norm": [dict(M=19, N=768), dict(M=37, N=97), dict(M=5, N=4099)],
    "add_layer_norm": [dict(M=19, N=768), dict(M=5, N=4099)],
    "embedding": [dict(B=3, N=17, V=97, D=1000), dict(B=3, N=20, V=50257, D=768)],
    "gpt_embeddings": [dict(B=3, N=17, V=50257, D=72)],
    "bert_embeddings": [dict(B=2, N=23, V=120, D=96)],
    # Ragged caches (cache_seqlens from S // 2 to S); pages of 16 and of 7 rows, the last page
    # of each sequence partly used.
    "decode": [dict(B=3, H=8, Hkv=2, S=77, D=64, ragged=True),
               dict(B=2, H=5, Hkv=5, S=300, D=40, ragged=True)],
    "decode_paged": [dict(B=3, H=8, Hkv=2, S=77, D=64, page=16, ragged=True),
                     dict(B=2, H=4, Hkv=1, S=300, D=128, page=7, ragged=True)],
}


def parity_cases(quick: bool, dtypes: tuple[torch.dtype, ...] = PARITY_DTYPES) -> list[Case]:
    """Every op at each of its parity sizes (quick: the first alone) in each of dtypes."""
    return [Case(op, size, dtype) for op in OPS
            for size in PARITY_SIZES[op.name][:1 if quick else None] for dtype in dtypes]


SEQS = (512, 1024, 2048, 4096, 8192, 16384)
HIDDEN = (768, 1024, 2048, 4096, 8192, 16384)


def _norm_size(n: int) -> dict:
    return dict(M=NORM_ELEMENTS // n, N=n)


CPU_SIZES = {  # per op family, three sizes along the plots' x axis (interpreter-sized)
    "attention": [dict(B=1, H=2, Hkv=2, L=n, S=n, D=32) for n in (32, 64, 128)],
    "norm": [dict(M=16, N=n) for n in (256, 1024, 4096)],
    "embedding": [dict(B=2, N=16, V=256, D=d) for d in (32, 128, 512)],
    "decode": [dict(B=2, H=4, Hkv=2, S=n, D=32) for n in (32, 64, 128)],
}
PROFILES = ("full", "quick", "cpu", "cpu-quick")


def _cpu_size(op: Op, size: dict) -> dict:
    """A CPU_SIZES size for op: grouped-query heads (4 over 2), a window of a quarter of the
    keys, Gemma 2's softcap, pages of 16 rows."""
    extra = {"attention_gqa": dict(H=4), "attention_window": dict(W=size.get("S", 0) // 4),
             "attention_softcap": dict(softcap=GEMMA2_SOFTCAP), "decode_paged": dict(page=16)}
    return {**size, **extra.get(op.name, {})}


SWEEP_MODS = {"attention_window": dict(W=4096), "attention_softcap": dict(softcap=GEMMA2_SOFTCAP),
              "attention_alibi": {}}  # the GPU sweeps' settings: a 4096-key window, Gemma 2's cap


def _score_mod_cases(seqs: tuple[tuple[int, ...], ...],
                     flex_at: tuple[int | None, ...] = (None, None, None)) -> list[Case]:
    """SCORE_MOD_OPS, d128 bf16 with SWEEP_MODS: each op (in order) at its lengths in seqs,
    FlexAttention timed at its length in flex_at (None: at none)."""
    return [Case(op, _attention_size(n, 128, **SWEEP_MODS[op.name]), torch.bfloat16,
                 flex=n == at) for op, ns, at in zip(SCORE_MOD_OPS, seqs, flex_at) for n in ns]


# The decode sweep (d128 bf16, q length 1): batches x cache lengths x (query heads, kv heads), MHA
# and GQA 8:1; the paged rows at fewer lengths.
DECODE_BATCHES = (1, 4, 16, 64)
DECODE_CACHES = (1024, 4096, 16384, 32768, 131072)
DECODE_PAGED_CACHES = (4096, 32768, 131072)
DECODE_HEADS = ((32, 4), (32, 32))
DECODE_TARGET = dict(B=1, H=32, Hkv=4, S=32768, D=128)  # the target point (targets.py)


def _decode_case(op: Op, B: int, S: int, heads: tuple[int, int], flex: bool = False) -> Case:
    """A decode sweep case, d128 bf16, skipped (with the reason) when its caches would take more
    than DECODE_MEMORY_GIB."""
    size = dict(B=B, H=heads[0], Hkv=heads[1], S=S, D=128)
    if op is DECODE_PAGED:
        size["page"] = DECODE_PAGE
    gib = decode_cache_bytes(size, torch.bfloat16) / 2**30
    skip = (f"n/a: K + V caches {gib:.0f} GiB > the {DECODE_MEMORY_GIB} GiB budget"
            if gib > DECODE_MEMORY_GIB else None)
    return Case(op, size, torch.bfloat16, flex=flex and skip is None, skip=skip)


def _decode_cases(points: list[tuple[Op, int, int, tuple[int, int]]]) -> list[Case]:
    """The decode points, the target first (FlexAttention timed there, a compile per case), then
    the longest caches first, so that a time budget cuts the short ones: by cache length
    (longest first), batch, GQA before MHA, contiguous before paged."""
    target = (DECODE, DECODE_TARGET["B"], DECODE_TARGET["S"],
              (DECODE_TARGET["H"], DECODE_TARGET["Hkv"]))
    rest = sorted((p for p in points if p != target),
                  key=lambda p: (-p[2], p[1], p[3][1], DECODE_OPS.index(p[0])))
    return ([_decode_case(*target, flex=True)] if target in points else []) + \
        [_decode_case(*p) for p in rest]


def decode_sweep(profile: str) -> list[Case]:
    """The GPU's decode cases: "full": every batch x DECODE_CACHES x DECODE_HEADS contiguous, and
    x DECODE_PAGED_CACHES paged; "quick": the long caches at batch 1 and 16."""
    if profile == "full":
        points = ([(DECODE, B, S, h) for B in DECODE_BATCHES for S in DECODE_CACHES
                   for h in DECODE_HEADS]
                  + [(DECODE_PAGED, B, S, h) for B in DECODE_BATCHES for S in DECODE_PAGED_CACHES
                     for h in DECODE_HEADS])
    else:
        gqa, mha = DECODE_HEADS
        points = ([(DECODE, 1, S, gqa) for S in (4096, 32768, 131072)]
                  + [(DECODE, 16, 32768, gqa), (DECODE, 1, 32768, mha),
                     (DECODE_PAGED, 1, 32768, gqa), (DECODE_PAGED, 16, 32768, gqa)])
    cases = _decode_cases(points)
    if profile == "quick":
        cases = [Case(c.op, c.size, c.dtype, skip=c.skip) for c in cases]  # no compiled peer
    return cases


def sweep_cases(profile: str) -> list[Case]:
    """The sweep, family by family, each family's headline cases (the README targets) first, the
    attention score modifiers (sliding window, softcap, ALiBi) next.
    profile: "full" (GPU: 38 attention, 13 norm, 7 embedding and 64 decode cases (6 of them over
    the decode memory budget), FlexAttention compiled in 6 of them), "quick" (GPU: 2 or 3 sizes of
    fewer ops, 7 decode cases, without compiled peers), "cpu" (every op at three
    interpreter-sized shapes) or "cpu-quick" (one op per family at those shapes). Every plotted
    series has several sizes (decode: several cache lengths)."""
    bf16, fp16 = torch.bfloat16, torch.float16
    if profile in ("cpu", "cpu-quick"):
        ops = (OPS if profile == "cpu"
               else (ATTENTION, LAYER_NORM, EMBEDDING, DECODE))
        return [Case(op, _cpu_size(op, size), bf16) for op in ops for size in CPU_SIZES[op.family]]
    if profile == "quick":
        return ([Case(op, _attention_size(n, 128), bf16)
                 for op in (ATTENTION, ATTENTION_CAUSAL) for n in (1024, 2048, 4096)]
                + [Case(ATTENTION_MASK, _attention_size(n, 128), bf16) for n in (1024, 2048)]
                + [Case(ATTENTION_GQA, _attention_size(n, 128, gqa=True), bf16)
                   for n in (2048, 4096)]
                + _score_mod_cases(((8192, 16384), (2048, 4096), (2048, 4096)))
                + [Case(op, _norm_size(n), bf16) for op in (LAYER_NORM, RMS_NORM, ADD_LAYER_NORM)
                   for n in (1024, 4096, 16384)]
                + [Case(EMBEDDING, dict(B=64, N=1024, V=50257, D=d), bf16)
                   for d in (768, 2048, 4096)]
                + [Case(GPT_EMBEDDINGS, dict(B=64, N=1024, V=50257, D=d), bf16)
                   for d in (768, 1600)]
                + [Case(BERT_EMBEDDINGS, dict(B=128, N=512, V=30522, D=d), bf16)
                   for d in (768, 1024)]
                + decode_sweep("quick"))
    if profile != "full":
        raise ValueError(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
    attention = (
        [Case(op, _attention_size(n, 128), bf16, flex=op is ATTENTION and n == 4096)
         for op in (ATTENTION, ATTENTION_CAUSAL) for n in SEQS]
        + [Case(ATTENTION_MASK, _attention_size(n, 128), bf16, flex=n == 2048)
           for n in (512, 2048, 8192)]
        + _score_mod_cases(((8192, 16384, 32768), (2048, 4096, 8192), (2048, 4096, 8192)),
                           flex_at=(32768, 4096, 4096))
        + [Case(ATTENTION_MASK, _attention_size(n, 64), bf16) for n in (512, 2048)]
        + [Case(op, _attention_size(n, 64), bf16) for op in (ATTENTION, ATTENTION_CAUSAL)
           for n in (512, 2048, 8192)]
        + [Case(op, _attention_size(n, 128), fp16) for op in (ATTENTION, ATTENTION_CAUSAL)
           for n in (2048, 8192)]
        + [Case(ATTENTION_GQA, _attention_size(n, 128, gqa=True), bf16) for n in (2048, 8192)])
    norms = ([Case(LAYER_NORM, _norm_size(n), bf16) for n in HIDDEN]
             + [Case(op, _norm_size(n), bf16) for op in (RMS_NORM, ADD_LAYER_NORM)
                for n in (1024, 4096, 16384)]
             + [Case(LAYER_NORM, _norm_size(4096), fp16)])
    embeddings = ([Case(EMBEDDING, dict(B=64, N=1024, V=50257, D=d), bf16)
                   for d in (768, 2048, 4096)]
                  + [Case(GPT_EMBEDDINGS, dict(B=64, N=1024, V=50257, D=d), bf16)
                     for d in (768, 1600)]
                  + [Case(BERT_EMBEDDINGS, dict(B=128, N=512, V=30522, D=d), bf16)
                     for d in (768, 1024)])
    return attention + norms + embeddings + decode_sweep("full")
