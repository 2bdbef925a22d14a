"""Which implementation runs an op, and a record of what ran.

    CUDA tensor                          -> "triton": the compiled Triton kernel
    CPU tensor with TRITON_INTERPRET=1   -> "triton-interpreter": the same kernel, run by Triton's
                                            interpreter (how the kernels are tested without a GPU)
    any other tensor                     -> "reference": the eager PyTorch code in fastattn.reference

TRITON_INTERPRET must be set before Triton is first imported (torch may import it too): Triton
decides whether a kernel, and its own library functions, are compiled or interpreted when they are
defined. fastattn imports its kernel modules lazily, on first use, so `import fastattn` itself
neither needs a GPU nor imports Triton.

    >>> fastattn.backend(x)                  # the path ops on x take
    'triton-interpreter'
    >>> with fastattn.record_backends() as ran:
    ...     y = fastattn.layer_norm(x, (768,))
    >>> ran
    [('norm_fwd', 'triton-interpreter')]
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from types import ModuleType
from typing import Iterator

import torch

TRITON = "triton"
INTERPRETER = "triton-interpreter"
REFERENCE = "reference"

_lock = threading.Lock()
_records: list[list[tuple[str, str]]] = []


def _interpreting() -> bool:
    from fastattn.kernels.configs import interpreting  # configs imports no Triton

    return interpreting()


def backend(tensor_or_device: torch.Tensor | torch.device | str) -> str:
    """The implementation fastattn ops use for tensors on this device: "triton",
    "triton-interpreter" or "reference". Raises RuntimeError when a Triton path is chosen but
    Triton was imported under the other TRITON_INTERPRET setting (see _check_triton_mode)."""
    device = getattr(tensor_or_device, "device", tensor_or_device)
    device = torch.device(device)
    if device.type == "cuda":
        path = TRITON
    elif device.type == "cpu" and _interpreting():
        path = INTERPRETER
    else:
        return REFERENCE
    _check_triton_mode(path == INTERPRETER)
    return path


_triton_mode: list[bool] = []  # [whether Triton's library is interpreted], once Triton is imported


def _triton_imported_interpreted() -> bool | None:
    """Whether Triton was imported with TRITON_INTERPRET set (its own @triton.jit library functions
    are then interpreted), or None when Triton is not imported yet. Fixed once known."""
    if not _triton_mode:
        standard = sys.modules.get("triton.language.standard")
        if standard is None or not hasattr(standard, "cdiv"):
            return None
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:  # another Triton layout: no check
            return None
        _triton_mode.append(isinstance(standard.cdiv, InterpretedFunction))
    return _triton_mode[0]


def _check_triton_mode(interpret: bool) -> None:
    """Triton decides when it is imported whether @triton.jit functions, its own library's among
    them, are compiled or interpreted: a TRITON_INTERPRET set or cleared after that import would
    mix the two and fail inside Triton ("Cannot call @triton.jit'd outside of the scope of a
    kernel"). Say so plainly instead."""
    imported = _triton_imported_interpreted()
    if imported is None or imported == interpret:
        return
    now, then = ("set", "unset") if interpret else ("unset", "set")
    raise RuntimeError(
        f"TRITON_INTERPRET is {now} now, but Triton was imported while it was {then}: Triton fixes "
        "at import whether kernels are compiled or interpreted, so fastattn's Triton kernels "
        "cannot run in this process. Set TRITON_INTERPRET before Triton is first imported (at the "
        "top of the script or in the shell: `TRITON_INTERPRET=1 python ...`), before importing or "
        "building torch / Hugging Face models or calling F.scaled_dot_product_attention, which "
        "import Triton.")


def kernels(name: str) -> ModuleType:
    """The launcher module fastattn.kernels.<name>, imported (and its kernels defined) on first use."""
    return importlib.import_module(f"fastattn.kernels.{name}")


def implementation(op: str, kernel_module: str, tensor: torch.Tensor) -> ModuleType:
    """The module that runs custom op `op` for `tensor`: fastattn.kernels.<kernel_module> (Triton,
    compiled or interpreted) or fastattn.reference; the choice is recorded. Both modules define a
    function named `op` with the same signature."""
    path = backend(tensor)
    record(op, path)
    if path == REFERENCE:
        from fastattn import reference

        return reference
    return kernels(kernel_module)


def record(op: str, path: str) -> None:
    """Note that `op` ran on `path` in every open record_backends() block (all threads: autograd
    may run backward passes on its own threads)."""
    with _lock:
        for log in _records:
            log.append((op, path))


@contextlib.contextmanager
def record_backends() -> Iterator[list[tuple[str, str]]]:
    """Collect (op name, backend) for every fastattn kernel launch or fallback inside the block."""
    log: list[tuple[str, str]] = []
    with _lock:
        _records.append(log)
    try:
        yield log
    finally:
        with _lock:
            _records.remove(log)
