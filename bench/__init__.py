"""fastattn's benchmark and parity runner (`python -m bench`, see __main__.py; the parity part alone:
`python -m bench.check`) and its pytest-benchmark tests (`pytest bench/`).

The wheel installs this folder as fastattn.bench (pyproject.toml maps it, as kernels/ is mapped to
fastattn.kernels), with the console scripts `fastattn-bench` (__main__.main) and `fastattn-check`
(check.main); so every module here imports its siblings relatively.

Importing this package picks the device: CUDA when there is one; otherwise the kernels run under
Triton's interpreter on the CPU, which needs TRITON_INTERPRET set before Triton is first imported
(hence here, before any other bench module imports torch's or fastattn's Triton parts; `import
fastattn`, which runs first for fastattn.bench, imports neither Triton nor a kernel).
"""

import importlib.util
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Triton decides at import whether its own library functions are interpreted: import it now.
    import triton  # noqa: F401

DEVICE = "cuda" if HAS_CUDA else "cpu"


def cannot_run_kernels() -> str | None:
    """Why the kernels cannot run here, or None. Without CUDA they run under Triton's interpreter,
    which imports numpy: a dependency of the bench extra, not of fastattn."""
    if HAS_CUDA or importlib.util.find_spec("numpy") is not None:
        return None
    return ("no CUDA device, and Triton's interpreter, which runs the kernels on the CPU, needs "
            "numpy: pip install numpy (or 'fastattn[bench]')")
