"""GPT-2 on fastattn ops, readable top to bottom (after nanoGPT).

Pre-LN blocks carry the residual stream beside the block output, so each LayerNorm is fused with
the residual add before it (fastattn.add_layer_norm). Parameter names are those of Hugging Face's
GPT2LMHeadModel (and nanoGPT), so GPT.from_hf loads its weights directly.

GPT.generate decodes against a preallocated KV cache (KVCache: static shapes, so a decode step can be
compiled or captured in a CUDA graph): one forward over the prompt writes its keys and values into
the cache, then one token per step, all on fastattn.kvcache_attention. Training goes through
scaled_dot_product_attention (kvcache_attention has no backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .. import nn as fnn
from .._validate import read_device_values
from ..attention import scaled_dot_product_attention
from ..decode import kvcache_attention
from ..embedding import gpt_embeddings
from ..layer_norm import add_layer_norm, layer_norm


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence (n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5


@dataclass
class KVCache:
    """Keys and values of every layer for generation, preallocated: k, v (n_layer, B, S, H, D) in
    the model's dtype; seqlens (B,) int32, the rows already written (the same for every layer;
    GPT.forward advances it); leftpad (B,) int32 or None, the left-padding rows of each sequence
    (written, never attended to). layer(i) is layer i's view: k, v (B, S, H, D)."""

    k: Tensor
    v: Tensor
    seqlens: Tensor
    leftpad: Optional[Tensor] = None

    @classmethod
    def empty(cls, config: GPTConfig, batch: int, length: int, dtype: torch.dtype,
              device: torch.device, leftpad: Optional[Tensor] = None) -> "KVCache":
        H = config.n_head
        shape = (config.n_layer, batch, length, H, config.n_embd // H)  # (n_layer, B, S, H, D)
        return cls(torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(batch, dtype=torch.int32, device=device), leftpad)

    def layer(self, i: int) -> "KVCache":
        return KVCache(self.k[i], self.v[i], self.seqlens, self.leftpad)

    def positions(self, n: int) -> Tensor:
        """(B, n) int64 position ids of the next n tokens: their row minus the left padding (as
        Hugging Face's attention_mask.cumsum(-1) - 1; padding rows get 0)."""
        pos = self.seqlens[:, None] + torch.arange(n, device=self.seqlens.device)  # (B, n)
        if self.leftpad is not None:
            pos = (pos - self.leftpad[:, None]).clamp_(min=0)
        return pos.long()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:  # x (B, N, C)
        if cache is not None:  # inference: append to the KV cache, attend to it
            y = self._attend_cached(x, cache)  # (B, N, C)
        else:
            q, k, v = rearrange(self.c_attn(x), "b n (three h d) -> three b h n d", three=3,
                                h=self.n_head)  # each (B, H, N, D), strided views
            y = scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
            y = rearrange(y, "b h n d -> b n (h d)")  # (B, H, N, D) -> (B, N, C)
        return self.resid_dropout(self.c_proj(y))

    def _attend_cached(self, x: Tensor, cache: KVCache) -> Tensor:  # (B, N, C) -> (B, N, C)
        """The N new tokens' keys and values appended to this layer's cache at cache.seqlens, then
        their queries attend causally (bottom-right: to the cache and to each other)."""
        q, k, v = rearrange(self.c_attn(x), "b n (three h d) -> three b n h d", three=3,
                            h=self.n_head)  # each (B, N, H, D), strided views
        y = kvcache_attention(q, cache.k, cache.v, k, v, cache_seqlens=cache.seqlens,
                              cache_leftpad=cache.leftpad, causal=True)  # (B, N, H, D)
        return rearrange(y, "b n h d -> b n (h d)")  # (B, N, H, D) -> (B, N, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, C)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GPTBlock(nn.Module):
    """Pre-LN block: h = x + attn(ln_1(x)); out = h + mlp(ln_2(h)), with the residual adds fused
    into the norms: takes and returns (block output, residual stream before that output)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = fnn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = fnn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, residual: Optional[Tensor],
                cache: Optional[KVCache] = None) -> tuple[Tensor, Tensor]:
        if residual is None:  # first block: the stream starts at the embeddings
            h, residual = layer_norm(x, x.shape[-1:], self.ln_1.weight, self.ln_1.bias,
                                     self.ln_1.eps), x
        else:
            h, residual = add_layer_norm(x, residual, x.shape[-1:], self.ln_1.weight,
                                         self.ln_1.bias, self.ln_1.eps)
        a = self.attn(h, cache)
        h, residual = add_layer_norm(a, residual, a.shape[-1:], self.ln_2.weight, self.ln_2.bias,
                                     self.ln_2.eps)
        return self.mlp(h), residual


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=fnn.Embedding(config.vocab_size, config.n_embd),
            wpe=fnn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([GPTBlock(config) for _ in range(config.n_layer)]),
            ln_f=fnn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None,
                cache: Optional[KVCache] = None):
        """idx (B, N) token ids -> logits (B, N, V); with targets (B, N) (the next token of each
        position; -1 = ignore), also the mean cross-entropy loss. With a cache (inference only),
        idx are the next N tokens of each sequence: their keys and values are written into it,
        they attend to everything before them there, and cache.seqlens advances by N."""
        logits = self.lm_head(self.hidden_states(idx, cache))  # (B, N, V)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)

    def hidden_states(self, idx: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """idx (B, N) -> the final LayerNorm's output (B, N, C) (forward before the head)."""
        t = self.transformer
        pos = None if cache is None else cache.positions(idx.shape[1])  # (B, N) or 0 .. N-1
        x = t.drop(gpt_embeddings(idx, t.wte.weight, t.wpe.weight, pos))  # (B, N, C)
        residual = None
        for i, block in enumerate(t.h):
            x, residual = block(x, residual, None if cache is None else cache.layer(i))
        if cache is not None:
            cache.seqlens += idx.shape[1]
        x, _ = add_layer_norm(x, residual, x.shape[-1:], t.ln_f.weight, t.ln_f.bias, t.ln_f.eps)
        return x

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, attention_mask: Optional[Tensor] = None,
                 eos_token_id: Optional[Union[int, Sequence[int]]] = None,
                 pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """Continue each prompt by up to max_new_tokens tokens, as Hugging Face's
        GPT2LMHeadModel.generate does: greedy, or with do_sample=True drawn (torch.multinomial,
        from `generator`) from the softmax of the last logits / temperature, filtered to the top_k
        most likely tokens, then to the smallest set whose probability reaches top_p.

        input_ids (B, N) int64 on the model's device; attention_mask (B, N) (1 = token, 0 = padding),
        left padding only, as tokenizers pad for generation: each row's tokens at their own
        positions 0, 1, ..., the padding never attended to. eos_token_id (an int or several):
        a row that produced one is finished, its later tokens are pad_token_id (default: the
        first eos), and generation stops once every row has finished.

        Returns (B, N + T) int64, the prompts followed by the T <= max_new_tokens new tokens.
        The prompt runs in one forward that fills a preallocated KVCache (B, N + max_new_tokens
        rows per layer); each new token then runs one decode step against it.
        """
        B, N = _check_generate_args(self.config, input_ids, max_new_tokens, temperature, top_k,
                                    top_p, generator)
        wte = self.transformer.wte.weight
        if input_ids.device != wte.device:
            raise ValueError(f"input_ids must be on the model's device {wte.device}, got "
                             f"{input_ids.device}")
        leftpad = None if attention_mask is None else _left_padding(attention_mask, input_ids)
        eos = _token_ids("eos_token_id", eos_token_id, self.config.vocab_size, wte.device)
        if pad_token_id is None and eos is not None:
            pad_token_id = int(eos[0])
        if pad_token_id is not None:
            _token_ids("pad_token_id", pad_token_id, self.config.vocab_size, wte.device)

        out = torch.empty(B, N + max_new_tokens, dtype=torch.long, device=input_ids.device)
        out[:, :N] = input_ids
        if max_new_tokens == 0:
            return out
        cache = KVCache.empty(self.config, B, N + max_new_tokens, wte.dtype, wte.device, leftpad)
        unfinished = torch.ones(B, dtype=torch.bool, device=wte.device)
        logits = self.lm_head(self.hidden_states(input_ids, cache)[:, -1])  # prefill: (B, V)
        for step in range(max_new_tokens):
            if do_sample:
                probs = _filtered_logits(logits.float(), temperature, top_k, top_p).softmax(-1)
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)
            else:
                token = logits.float().argmax(-1)  # (B,)
            if eos is not None:
                token = torch.where(unfinished, token, pad_token_id)
                unfinished &= ~torch.isin(token, eos)
            out[:, N + step] = token
            if eos is not None and not unfinished.any():  # every row finished
                return out[:, :N + step + 1]
            if step + 1 < max_new_tokens:  # decode step: (B, 1) -> (B, V)
                logits = self.lm_head(self.hidden_states(token[:, None], cache)[:, -1])
        return out

    @classmethod
    def from_hf(cls, model_or_state_dict, config: Optional[GPTConfig] = None) -> "GPT":
        """A GPT with the weights of a Hugging Face GPT2LMHeadModel (or GPT2Model), given the model
        itself or its state_dict (then `config` says the sizes). Nothing is downloaded.

        HF's Conv1D layers store weights as (in, out): they are transposed into nn.Linear's (out, in).
        """
        if isinstance(model_or_state_dict, nn.Module):
            hf = model_or_state_dict.config
            config = config or GPTConfig(vocab_size=hf.vocab_size, block_size=hf.n_positions,
                                         n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd,
                                         layer_norm_epsilon=hf.layer_norm_epsilon)
            state = model_or_state_dict.state_dict()
        else:
            if config is None:
                raise ValueError("config is required with a state_dict (the head count is not in it)")
            state = dict(model_or_state_dict)
        state = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v
                 for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
                  ".mlp.c_proj.weight")
        state = {k: v.t() if k.endswith(conv1d) else v for k, v in state.items()}
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])
        model = cls(config)
        model.load_state_dict(state)
        return model.to(next(iter(state.values())).dtype)


# ---- generate's helpers ----


def _check_generate_args(config: GPTConfig, input_ids, max_new_tokens, temperature, top_k, top_p,
                         generator) -> tuple[int, int]:
    """generate's arguments checked (errors name the argument and the rule); returns (B, N)."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype != torch.long:
        raise TypeError(f"input_ids must have dtype int64, got "
                        f"{str(input_ids.dtype).removeprefix('torch.')}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be 2-D (batch, seqlen) with seqlen >= 1, got shape "
                         f"{list(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, N = input_ids.shape
    if N + max_new_tokens > config.block_size:
        raise ValueError(f"input_ids' length {N} + max_new_tokens {max_new_tokens} = "
                         f"{N + max_new_tokens} exceeds the model's block_size "
                         f"{config.block_size}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {temperature!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int or None, got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise TypeError(f"top_p must be a float or None, got {top_p!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    return B, N


def _left_padding(attention_mask, input_ids: Tensor) -> Tensor:
    """The (B,) int32 count of padding tokens at the start of each row of a left-padded
    attention_mask (B, N). Other masks raise ValueError where the mask's values may be read (the
    CPU always, CUDA in checking mode: fastattn.checking)."""
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got "
                        f"{type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {list(input_ids.shape)}, "
                         f"got {list(attention_mask.shape)}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask must be on input_ids' device {input_ids.device}, got "
                         f"{attention_mask.device}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask must hold integers or bools (1 = token, 0 = padding), "
                        f"got dtype {str(attention_mask.dtype).removeprefix('torch.')}")
    keep = attention_mask != 0  # (B, N)
    leftpad = (~keep).sum(-1, dtype=torch.int32)  # (B,)
    if read_device_values(attention_mask):
        N = input_ids.shape[1]
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold 0s and 1s")
        left_padded = torch.arange(N, device=keep.device)[None, :] >= leftpad[:, None]
        if not torch.equal(keep, left_padded):
            raise ValueError("attention_mask must be left-padded (each row: 0s, then 1s), as "
                             "tokenizers pad for generation (padding_side='left'); right or "
                             "inner padding is not supported")
        if (leftpad == N).any():
            raise ValueError("attention_mask has a row of padding only: each prompt needs at "
                             "least one token")
    return leftpad


def _token_ids(name: str, ids, vocab_size: int, device: torch.device) -> Optional[Tensor]:
    """An int or a sequence of ints in [0, vocab_size) as a 1-D int64 tensor, or None."""
    if ids is None:
        return None
    values = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    if not values or any(isinstance(i, bool) or not isinstance(i, int) for i in values):
        raise TypeError(f"{name} must be an int or a list of ints, got {ids!r}")
    for i in values:
        if not 0 <= i < vocab_size:
            raise ValueError(f"{name} {i} is out of range: 0 <= token id < vocab_size "
                             f"{vocab_size}")
    return torch.tensor(values, dtype=torch.long, device=device)


def _filtered_logits(scores: Tensor, temperature: float, top_k: Optional[int],
                     top_p: Optional[float]) -> Tensor:
    """scores (B, V) fp32 / temperature, then the tokens outside the top_k and outside the top_p
    nucleus set to -inf, as Hugging Face's Temperature, TopK and TopP logits warpers do in that
    order (ties at the k-th score kept; the most likely token always kept)."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)  # (B, V) ascending
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False  # the most likely token stays
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores
