"""LayerNorm, RMSNorm and fused residual-add + LayerNorm/RMSNorm as differentiable ops.

Layers (see DESIGN.md): public functions (validate, flatten to rows) -> _NormFn (autograd) ->
custom ops fastattn::norm_fwd / fastattn::norm_bwd (dispatch) -> kernels/layer_norm.py launchers.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _dispatch
from ._validate import check_same_device, check_same_dtype, check_tensor

# ---- custom ops: one per launcher, with fake (meta) implementations ----


@torch.library.custom_op("fastattn::norm_fwd", mutates_args=())
def norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             residual: Optional[Tensor], eps: float, is_rms: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual (M, N); weight, bias (N,) -> y (M, N), h = x + residual (M, N) or empty,
    mean (M,) fp32 or empty (RMSNorm), rstd (M,) fp32."""
    return _dispatch.launcher("norm_fwd", "layer_norm", x)(x, weight, bias, residual, eps, is_rms)


@norm_fwd.register_fake
def _norm_fwd_fake(x, weight, bias, residual, eps, is_rms):
    M, N = x.shape
    stat = x.new_empty((M,), dtype=torch.float32)
    return (x.new_empty((M, N)), x.new_empty((M, N) if residual is not None else (0,)),
            x.new_empty((0,), dtype=torch.float32) if is_rms else stat, stat.new_empty((M,)))


@torch.library.custom_op("fastattn::norm_bwd", mutates_args=())
def norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             mean: Tensor, rstd: Tensor, dh: Optional[Tensor], is_rms: bool,
             compute_dweight: bool, compute_dbias: bool, dropout_p: float = 0.0,
             dropout_seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """dy, x, dh (M, N); mean, rstd (M,) -> dx (M, N), dweight (N,) or empty, dbias (N,) or empty.
    dropout_p > 0: the normalized output went through dropout drawn with dropout_seed, a (1,)
    int64 tensor on x's device."""
    return _dispatch.launcher("norm_bwd", "layer_norm", x)(dy, x, weight, bias, mean, rstd, dh, is_rms, compute_dweight,
                         compute_dbias, dropout_p, dropout_seed)


@norm_bwd.register_fake
def _norm_bwd_fake(dy, x, weight, bias, mean, rstd, dh, is_rms, compute_dweight, compute_dbias, dropout_p=0.0,
      dropout_seed=None):
    N = x.shape[1]
    return (x.new_empty(x.shape),
            weight.new_empty((N,)) if compute_dweight else x.new_empty((0,)),
            bias.new_empty((N,)) if compute_dbias else x.new_empty((0,)))


# ---- autograd ----


def _rows(t: Optional[Tensor], n: int) -> Optional[Tensor]:
    """t (*, *normalized_shape) as rows (M, N) (a view when the strides allow); None stays None."""
    return t if t is None or (t.dim() == 2 and t.shape[1] == n) else t.reshape(-1, n)


def _flat(t: Optional[Tensor], n: int) -> Optional[Tensor]:
    """A parameter of shape normalized_shape as (N,); None stays None."""
    return t if t is None or t.dim() == 1 else t.reshape(n)


def _shaped(t: Tensor, shape: torch.Size) -> Tensor:
    return t if t.shape == shape else t.view(shape)


def _norm_fwd(x, weight, bias, residual, eps, is_rms, n):
    """fastattn::norm_fwd (see _dispatch.run) on x, residual (*, *normalized_shape) as rows
    (M, N = n) -> y, h shaped as x (h empty without a residual), mean, rstd (M,)."""
    y, h, mean, rstd = _dispatch.run("norm_fwd", "layer_norm", x, _rows(x, n), _flat(weight, n),
                                     _flat(bias, n), _rows(residual, n), eps, is_rms)
    return _shaped(y, x.shape), _shaped(h, x.shape) if residual is not None else h, mean, rstd


class _NormFn(torch.autograd.Function):
    """y, h = norm(x + residual) over the trailing normalized_shape (n elements) of x. The
    reshapes to rows happen inside, outside autograd's graph (a view node in the graph costs as
    much as this op's backward on small inputs). Saves h (or x), weight, bias, mean, rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, is_rms, n):
        y, h, mean, rstd = _norm_fwd(x, weight, bias, residual, eps, is_rms, n)
        ctx.set_materialize_grads(False)
        ctx.is_rms, ctx.n = is_rms, n
        ctx.has_residual = residual is not None
        if any(ctx.needs_input_grad[:4]):
            ctx.save_for_backward(h if residual is not None else x, weight, bias, mean, rstd)
        return y, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:  # only h was used downstream
            dy = torch.zeros_like(x)
        if not ctx.has_residual:  # h is an empty placeholder (torch.compile may still pass a grad)
            dh = None
        n, need = ctx.n, ctx.needs_input_grad
        x2d = _rows(x, n)
        dx, dweight, dbias = _dispatch.run(
            "norm_bwd", "layer_norm", x2d, _rows(dy, n), x2d, _flat(weight, n), _flat(bias, n),
            mean, rstd, _rows(dh, n), ctx.is_rms, need[1], need[2])
        dx = _shaped(dx, x.shape)
        return (dx,
                _shaped(dweight, weight.shape) if need[1] else None,
                _shaped(dbias, bias.shape) if need[2] else None,
                dx if ctx.has_residual and need[3] else None,
                None, None, None)


# ---- public functions ----

_Shape = Union[int, Sequence[int], torch.Size]


def _normalized_shape(normalized_shape: _Shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    try:
        shape = tuple(normalized_shape)
    except TypeError:
        raise TypeError("normalized_shape must be an int or a sequence of ints, got "
                        f"{type(normalized_shape).__name__}") from None
    if not all(isinstance(d, int) for d in shape):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {shape}")
    if len(shape) == 0:
        raise ValueError("normalized_shape must have at least one dimension, got ()")
    return shape


def _norm(x: Tensor, normalized_shape: _Shape, weight: Optional[Tensor], bias: Optional[Tensor],
          residual: Optional[Tensor], eps: float, is_rms: bool) -> tuple[Tensor, Tensor]:
    """Validate, then norm over the trailing normalized_shape of x: (y, h) shaped as x."""
    shape = _normalized_shape(normalized_shape)
    check_tensor("input", x)
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t)
    check_same_device(input=x, residual=residual, weight=weight, bias=bias)
    check_same_dtype(weight=weight, bias=bias)
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"normalized_shape {list(shape)} must match the trailing dims of input, "
                         f"got input of shape {list(x.shape)}")
    if any(d <= 0 for d in shape):
        raise ValueError(f"normalized_shape {list(shape)} must have only positive sizes")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape normalized_shape {list(shape)}, "
                             f"got {list(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):  # fp32 parameters with a half input: as torch
            raise TypeError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')}; it must be "
                            f"the input's dtype ({str(x.dtype).removeprefix('torch.')}) or float32")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {list(x.shape)}, "
                             f"got {list(residual.shape)}")
        check_same_dtype(x=x, residual=residual)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):  # any float, as torch
        raise TypeError(f"eps must be a float, got {type(eps).__name__} {eps!r}")

    n = shape[0] if len(shape) == 1 else math.prod(shape)
    if _dispatch.needs_grad(x, weight, bias, residual):
        return _NormFn.apply(x, weight, bias, residual, float(eps), is_rms, n)
    return _norm_fwd(x, weight, bias, residual, float(eps), is_rms, n)[:2]


def layer_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Drop-in for torch.nn.functional.layer_norm.

    input (*, *normalized_shape) in fp32 / fp16 / bf16; weight, bias: normalized_shape (optional,
    independently). Returns (*, *normalized_shape) in input's dtype; statistics in fp32.
    """
    return _norm(input, normalized_shape, weight, bias, None, eps, False)[0]


def rms_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """Drop-in for torch.nn.functional.rms_norm: y = input / sqrt(mean(input^2) + eps) * weight.

    input (*, *normalized_shape); weight: normalized_shape. eps None -> torch.finfo(input.dtype).eps,
    as torch does.
    """
    if eps is None and isinstance(input, Tensor) and input.is_floating_point():
        eps = torch.finfo(input.dtype).eps
    return _norm(input, normalized_shape, weight, None, None, eps, True)[0]


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape: _Shape,
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, *, rms: bool = False) -> tuple[Tensor, Tensor]:
    """Fused residual add + norm for pre-LN blocks, in one pass over memory.

    x, residual (*, *normalized_shape), same dtype. Returns (out, h) with h = x + residual (in x's
    dtype) and out = layer_norm(h, normalized_shape, weight, bias, eps), or rms_norm(h, ...) when
    rms=True. Gradients flow through both outputs.
    """
    if residual is None:
        raise TypeError("residual must be a torch.Tensor, got None (use layer_norm)")
    return _norm(x, normalized_shape, weight, bias, residual, eps, rms)
