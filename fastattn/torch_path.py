"""The launchers' contract (fastattn.kernels' *_fwd / *_bwd functions) on torch's own ops, for
tensors Triton does not run on (CPU without TRITON_INTERPRET, meta, ...)."""

from fastattn.reference import (attention_bwd, attention_fwd, embedding_bwd,  # noqa: F401
                                embedding_fwd, norm_bwd, norm_fwd, varlen_attention_bwd,
                                varlen_attention_fwd)
