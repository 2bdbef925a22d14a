"""fastattn's benchmark and parity runner (`python -m bench`, see __main__.py) and its
pytest-benchmark tests (`pytest bench/`).

Importing this package picks the device: CUDA when there is one; otherwise the kernels run under
Triton's interpreter on the CPU, which needs TRITON_INTERPRET set before Triton is first imported
(hence here, before any other bench module imports torch's or fastattn's Triton parts).
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Triton decides at import whether its own library functions are interpreted: import it now.
    import triton  # noqa: F401

DEVICE = "cuda" if HAS_CUDA else "cpu"
