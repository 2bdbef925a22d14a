"""Small models built on fastattn ops: GPT-2 and BERT, loadable from Hugging Face weights."""

from .bert import BertConfig, BertLayer, BertModel
from .gpt import GPT, GPTBlock, GPTConfig, KVCache

__all__ = ["BertConfig", "BertLayer", "BertModel", "GPT", "GPTBlock", "GPTConfig", "KVCache"]
