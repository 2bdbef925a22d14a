"""The functions under flash-attn's module path flash_attn.flash_attn_interface, for code that
imports them from there (`from fastattn.flash_attn.flash_attn_interface import flash_attn_func`)."""

from . import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
               flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
               flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]
