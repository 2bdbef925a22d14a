"""GPT-2 on fastattn ops, readable top to bottom (after nanoGPT).

Pre-LN blocks carry the residual stream beside the block output, so each LayerNorm is fused with
the residual add before it (fastattn.add_layer_norm). Parameter names are those of Hugging Face's
GPT2LMHeadModel (and nanoGPT), so GPT.from_hf loads its weights directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .. import nn as fnn
from ..attention import scaled_dot_product_attention
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:  # x (B, N, C)
        q, k, v = rearrange(self.c_attn(x), "b n (three h d) -> three b h n d", three=3,
                            h=self.n_head)  # each (B, H, N, D), strided views
        y = scaled_dot_product_attention(q, k, v, is_causal=True,
                                         dropout_p=self.attn_dropout if self.training else 0.0)
        y = rearrange(y, "b h n d -> b n (h d)")  # (B, H, N, D) -> (B, N, C)
        return self.resid_dropout(self.c_proj(y))


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

    def forward(self, x: Tensor, residual: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if residual is None:  # first block: the stream starts at the embeddings
            h, residual = layer_norm(x, x.shape[-1:], self.ln_1.weight, self.ln_1.bias,
                                     self.ln_1.eps), x
        else:
            h, residual = add_layer_norm(x, residual, x.shape[-1:], self.ln_1.weight,
                                         self.ln_1.bias, self.ln_1.eps)
        a = self.attn(h)
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

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None):
        """idx (B, N) token ids -> logits (B, N, V); with targets (B, N) (the next token of each
        position; -1 = ignore), also the mean cross-entropy loss."""
        t = self.transformer
        x = t.drop(gpt_embeddings(idx, t.wte.weight, t.wpe.weight))  # (B, N, C)
        residual = None
        for block in t.h:
            x, residual = block(x, residual)
        x, _ = add_layer_norm(x, residual, x.shape[-1:], t.ln_f.weight, t.ln_f.bias, t.ln_f.eps)
        logits = self.lm_head(x)  # (B, N, V)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)

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
