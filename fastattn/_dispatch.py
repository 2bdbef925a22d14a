"""Which implementation runs an op, how it is called, and a record of what ran.

    CUDA tensor                          -> "triton": the compiled Triton kernel
    CPU tensor with TRITON_INTERPRET=1   -> "triton-interpreter": the same kernel, run by Triton's
                                            interpreter (how the kernels are tested without a GPU)
    any other tensor                     -> "torch": torch's own ops (fastattn.torch_path), with
                                            the launchers' contract

TRITON_INTERPRET must be set before Triton is first imported (torch may import it too): Triton
decides whether a kernel, and its own library functions, are compiled or interpreted when they are
defined. fastattn imports its kernel modules lazily, on first use, so `import fastattn` itself
neither needs a GPU nor imports Triton.

Every launch goes through run(): in eager mode it calls the launcher directly (torch.library's
dispatch would cost tens of µs per call); while torch.compile / export trace, or under fake tensors
or a TorchDispatchMode, it calls the custom op torch.ops.fastattn.<op>, whose body calls the same
launcher. The two paths run the same code on the same arguments.

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
from typing import Callable, Iterator

import torch
from torch import Tensor

from .kernels.configs import env_value, interpret_value

TRITON = "triton"
INTERPRETER = "triton-interpreter"
TORCH = "torch"

_lock = threading.Lock()
_records: list[list[tuple[str, str]]] = []
_replacements: list[object] = []  # see replaced_launchers
# (device type, TRITON_INTERPRET) -> path, kept once it cannot change (see _path)
_paths: dict[tuple[str, str | bytes | None], str] = {}
_modules: dict[tuple[str, str], ModuleType] = {}  # (path, kernel module name) -> module


def _env() -> str | bytes | None:
    """TRITON_INTERPRET's raw value (read on every call, without os.environ.get's decode)."""
    return env_value("TRITON_INTERPRET")


def _path(device_type: str) -> str:
    """The path for a device type under the current TRITON_INTERPRET. Cached once final: for the
    torch path, or once Triton is imported (its mode is then fixed; a changed TRITON_INTERPRET is a
    new key, checked again, and refused by _check_triton_mode)."""
    env = _env()
    path = _paths.get((device_type, env))
    if path is not None:
        return path
    if device_type == "cuda":
        path = TRITON
    elif device_type == "cpu" and interpret_value(env):
        path = INTERPRETER
    else:
        path = TORCH
    if path != TORCH:
        _check_triton_mode(path == INTERPRETER)
    if path == TORCH or _triton_imported_interpreted() is not None:
        _paths[(device_type, env)] = path
    return path


def backend(tensor_or_device: torch.Tensor | torch.device | str) -> str:
    """The implementation fastattn ops use for tensors on this device: "triton",
    "triton-interpreter" or "torch". Raises RuntimeError when a Triton path is chosen but
    Triton was imported under the other TRITON_INTERPRET setting (see _check_triton_mode)."""
    device = getattr(tensor_or_device, "device", tensor_or_device)
    return _path(torch.device(device).type)


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


def _module(path: str, kernel_module: str) -> ModuleType:
    module = _modules.get((path, kernel_module))
    if module is None:
        module = (importlib.import_module("fastattn.torch_path") if path == TORCH
                  else kernels(kernel_module))
        _modules[(path, kernel_module)] = module
    return module


def launcher(op: str, kernel_module: str, tensor: Tensor) -> Callable:
    """The function that runs op `op` for `tensor`: fastattn.kernels.<kernel_module>.<op> (Triton,
    compiled or interpreted) or fastattn.torch_path.<op>, which share one contract; the choice is
    recorded. Looked up on each call, so a test may monkeypatch a launcher."""
    path = _path(tensor.device.type)
    if _records:
        record(op, path)
    if _replacements:
        return getattr(_replacements[-1], op)
    return getattr(_module(path, kernel_module), op)


def _traced(tensor: Tensor) -> bool:
    """True while torch.compile / export trace, or when the tensor is not a plain one (fake,
    functional or another subclass) or a TorchDispatchMode is active: then ops go through
    torch.library, as those machineries expect."""
    return (torch.compiler.is_compiling() or type(tensor) not in _PLAIN_TYPES
            or torch._C._len_torch_dispatch_stack() > 0)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def run(op: str, kernel_module: str, tensor: Tensor, *args):
    """Run fastattn::<op> on args (positional, as the custom op declares them); `tensor` is the
    argument whose device picks the path. The one switch between the eager path (the launcher,
    called directly) and the traced one (torch.ops.fastattn.<op>); see the module docstring."""
    if _traced(tensor):
        return getattr(torch.ops.fastattn, op)(*args)
    return launcher(op, kernel_module, tensor)(*args)


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd would record an op on these tensors (None entries ignored). When it would
    not, the public functions call the forward launcher without their autograd.Function (its
    apply costs tens of µs), as torch's own ops build no graph then."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@contextlib.contextmanager
def replaced_launchers(namespace: object) -> Iterator[None]:
    """Every op runs namespace.<op> instead of its launcher inside the block (the benchmark uses
    the ops' fake implementations to time the layers above the launchers)."""
    _replacements.append(namespace)
    try:
        yield
    finally:
        _replacements.remove(namespace)


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
