"""nn.Module drop-ins. Each subclasses its torch counterpart, so constructors, defaults, parameter
names, state_dicts and isinstance checks are torch's own; only forward runs fastattn's kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from .embedding import bert_embeddings, embedding
from .layer_norm import layer_norm, rms_norm


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
    device=None, dtype=None), computed by fastattn.layer_norm."""

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True, device=None,
    dtype=None), computed by fastattn.rms_norm."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


class Embedding(torch.nn.Embedding):
    """torch.nn.Embedding(num_embeddings, embedding_dim, padding_idx=None, max_norm=None,
    norm_type=2.0, scale_grad_by_freq=False, sparse=False, _weight=None, _freeze=False,
    device=None, dtype=None), computed by fastattn.embedding (sparse=True is refused there)."""

    def forward(self, input: Tensor) -> Tensor:
        return embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                         self.scale_grad_by_freq, self.sparse)


class BertEmbeddings(torch.nn.Module):
    """BERT's input embeddings with the parameter names of Hugging Face's BertEmbeddings, so its
    state_dict loads as is: word_embeddings, position_embeddings, token_type_embeddings (each an
    nn.Embedding), LayerNorm, dropout. forward runs fastattn.bert_embeddings (one fused kernel).

    The arguments are the BertConfig fields of the same names; from_config takes the config.
    """

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int = 512,
                 type_vocab_size: int = 2, pad_token_id: int = 0, layer_norm_eps: float = 1e-12,
                 hidden_dropout_prob: float = 0.1, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.word_embeddings = Embedding(vocab_size, hidden_size, padding_idx=pad_token_id,
                                         **factory)
        self.position_embeddings = Embedding(max_position_embeddings, hidden_size, **factory)
        self.token_type_embeddings = Embedding(type_vocab_size, hidden_size, **factory)
        self.LayerNorm = LayerNorm(hidden_size, eps=layer_norm_eps, **factory)
        self.dropout = torch.nn.Dropout(hidden_dropout_prob)

    @classmethod
    def from_config(cls, config, device=None, dtype=None) -> "BertEmbeddings":
        """From a Hugging Face BertConfig (or anything with its field names)."""
        return cls(config.vocab_size, config.hidden_size, config.max_position_embeddings,
                   config.type_vocab_size, config.pad_token_id, config.layer_norm_eps,
                   config.hidden_dropout_prob, device=device, dtype=dtype)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """input_ids (B, N) -> (B, N, hidden_size)."""
        return bert_embeddings(
            input_ids, self.word_embeddings.weight, self.position_embeddings.weight,
            self.token_type_embeddings.weight, self.LayerNorm.weight, self.LayerNorm.bias,
            token_type_ids=token_type_ids, position_ids=position_ids, eps=self.LayerNorm.eps,
            dropout_p=self.dropout.p if self.training else 0.0,
            padding_idx=self.word_embeddings.padding_idx)
