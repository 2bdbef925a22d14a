"""BERT on fastattn ops, readable top to bottom.

Post-LN layers: each sublayer's output is added to its input and normalized in one fused op
(fastattn.add_layer_norm). Padding is a key mask of shape (B, 1, 1, S), the form fastattn's
attention skips fully padded key blocks on. Parameter names are those of Hugging Face's BertModel,
so BertModel.from_hf loads its state_dict as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .. import nn as fnn
from ..attention import scaled_dot_product_attention
from ..layer_norm import add_layer_norm


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    add_pooling_layer: bool = True


class _AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): HF's BertSelfOutput / BertOutput."""

    def __init__(self, d_in: int, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, config.hidden_size)
        self.LayerNorm = fnn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        y = self.dropout(self.dense(x))
        return add_layer_norm(y, residual, y.shape[-1:], self.LayerNorm.weight, self.LayerNorm.bias,
                              self.LayerNorm.eps)[0]


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        # x (B, N, C) -> q, k, v (B, H, N, D); key_mask (B, 1, 1, N) bool, True = attend
        q, k, v = (rearrange(proj(x), "b n (h d) -> b h n d", h=self.num_heads)
                   for proj in (self.query, self.key, self.value))
        y = scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                         dropout_p=self.dropout_p if self.training else 0.0)
        return rearrange(y, "b h n d -> b n (h d)")


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = _AddNorm(config.hidden_size, config)

    def forward(self, x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        return self.output(self.self(x, key_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """Post-LN: h = LN(x + attn(x)); out = LN(h + mlp(h))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = _AddNorm(config.intermediate_size, config)

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:  # (B, N, C)
        h = self.attention(x, key_mask)
        return self.output(self.intermediate(h), h)


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, C): the first token
        return torch.tanh(self.dense(x[:, 0]))


class BertModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = fnn.BertEmbeddings(
            config.vocab_size, config.hidden_size, config.max_position_embeddings,
            config.type_vocab_size, config.pad_token_id, config.layer_norm_eps,
            config.hidden_dropout_prob)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(config)
                                           for _ in range(config.num_hidden_layers))
        self.pooler = BertPooler(config) if config.add_pooling_layer else None

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """input_ids (B, N); attention_mask (B, N), 1 = token, 0 = padding. Returns the last
        hidden state (B, N, C) and the pooled first token (B, C) (None without a pooler)."""
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, N, C)
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.bool()[:, None, None, :]  # (B, N) -> (B, 1, 1, N)
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x, (self.pooler(x) if self.pooler is not None else None)

    @classmethod
    def from_hf(cls, model_or_state_dict, config: Optional[BertConfig] = None) -> "BertModel":
        """A BertModel with the weights of a Hugging Face BertModel, given the model itself or its
        state_dict (then `config` says the sizes). Nothing is downloaded."""
        if isinstance(model_or_state_dict, nn.Module):
            hf = model_or_state_dict.config
            state = model_or_state_dict.state_dict()
            config = config or BertConfig(**{f: getattr(hf, f) for f in (
                "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size",
                "pad_token_id", "layer_norm_eps", "hidden_dropout_prob",
                "attention_probs_dropout_prob")},
                add_pooling_layer=any(k.startswith("pooler.") for k in state))
        else:
            if config is None:
                raise ValueError("config is required with a state_dict (the head count is not in it)")
            state = dict(model_or_state_dict)
        state = {k.removeprefix("bert."): v for k, v in state.items()
                 if not k.endswith(("position_ids", "token_type_ids"))}  # HF's buffers
        model = cls(config)
        model.load_state_dict(state)
        return model.to(next(iter(state.values())).dtype)
