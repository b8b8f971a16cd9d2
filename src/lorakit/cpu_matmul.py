"""Float32 matrix products on x86-64 CPUs through oneDNN, the library PyTorch already ships for its bfloat16
matmuls.

Note: why not ``torch.mm`` for float32 on CPU
    PyTorch's CPU build sends float32 ``mm``/``linear`` to MKL's ``sgemm``, which on AMD processors reaches only
    what AVX2 code can (MKL's dispatch favours Intel cores): measured on this project's 2-core AMD EPYC (Zen 5)
    machine, ``(1024 x 576) @ (576 x 1536)`` runs at ~215 GFLOP/s through ``torch.mm`` and ~450 GFLOP/s through
    oneDNN's AVX-512 ``brgemm`` (``torch.ops.mkldnn._linear_pointwise``), with the same float32 arithmetic (no
    reduced-precision mode; results differ from MKL's only by the order of the sums). LoRA's thin (tokens x r)
    products gain 1.2-2x. On Intel cores MKL takes its own AVX-512 code, so expect less there (not measured: no
    Intel machine here).

    The fused LoRA node (``lorakit.fused``) computes its frozen base product, the adapter's products and their
    gradients here; its autograd formulas are its own, so oneDNN's missing derivatives do not matter. Used only
    for float32 CPU tensors on x86-64 when PyTorch was built with oneDNN; ``LORAKIT_ONEDNN=0`` turns it off
    (every product then goes through ``torch``).
"""

from __future__ import annotations

import os
import platform
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["enabled", "frozen_linear", "linear", "matmul", "no_grad_linears"]

_X86 = platform.machine().lower() in ("x86_64", "amd64")


def _op():
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return ops._linear_pointwise.default if ops is not None else None
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _op() if _X86 and torch.backends.mkldnn.is_available() else None
_CHECKED = False


def _works() -> bool:
    """One small product against ``F.linear`` the first time, so that a PyTorch build whose oneDNN op is missing,
    renamed or broken falls back to torch (with a warning) instead of failing or miscomputing later."""
    global _LINEAR, _CHECKED
    if not _CHECKED:
        _CHECKED = True
        if _LINEAR is not None:
            g = torch.Generator().manual_seed(0)
            x, w, b = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g), torch.randn(3, generator=g)
            try:
                with torch.no_grad():
                    ok = torch.allclose(_LINEAR(x, w.t().contiguous().t(), b, "none", [], ""), F.linear(x, w, b),
                                        rtol=1e-5, atol=1e-5)
            except (RuntimeError, TypeError) as e:
                ok, why = False, str(e).splitlines()[0] if str(e) else type(e).__name__
            else:
                why = "its result differs from torch's"
            if not ok:
                warnings.warn(f"lorakit: oneDNN float32 matmul unusable in this PyTorch build ({why}); using torch's "
                              "matmul (slower on AMD CPUs).", stacklevel=3)
                _LINEAR = None
    return _LINEAR is not None


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether products of these tensors go through oneDNN: all float32 on the CPU, x86-64, PyTorch built with
    a working oneDNN (checked once), ``LORAKIT_ONEDNN`` not ``0``, and not inside ``torch.compile`` tracing."""
    if _LINEAR is None or os.environ.get("LORAKIT_ONEDNN", "1") == "0" or torch.compiler.is_compiling():
        return False  # (under torch.compile the compiler picks its own kernels; it cannot lower this op's strides)
    if not _works():
        return False
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for 2-D ``x`` ``(n, in)`` and ``weight`` ``(out, in)`` (any strides), as ``F.linear``.

    Not differentiable through oneDNN: call it inside an autograd Function or without gradients (when an input
    requires gradients under grad mode, ``F.linear`` runs instead, so autograd still sees the product).
    """
    if (not enabled(x, weight) or x.dim() != 2 or weight.dim() != 2 or 0 in x.shape or 0 in weight.shape
            or (bias is not None and not enabled(bias))
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad)))):
        return F.linear(x, weight, bias)
    return _LINEAR(x, weight, bias, "none", [], "")


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` ``(n, k)`` and ``b`` ``(k, m)`` (any strides); see :func:`linear`."""
    return linear(a, b.t())


class _FrozenLinear(torch.autograd.Function):
    """``x Wᵀ + b`` with a frozen weight and bias: only the input gradient, ``g W``."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return matmul(grad, weight), None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` ``(..., in)``, through oneDNN (forward and input gradient) when
    :func:`enabled` holds and, under grad mode, the weight and bias need no gradient; otherwise ``F.linear``."""
    if x.dim() < 2 or weight.dim() != 2 or not enabled(x, weight) or (bias is not None and not enabled(bias)):
        return F.linear(x, weight, bias)
    grad = torch.is_grad_enabled()
    if grad and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    y = _FrozenLinear.apply(x2, weight, bias) if grad and x.requires_grad else linear(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class _NoGradLinears(TorchFunctionMode):
    """Sends ``F.linear`` calls made without gradients (float32, CPU) through :func:`linear`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_grad_enabled() and len(args) >= 2:
            return frozen_linear(*args, **kwargs)  # (F.linear itself wherever oneDNN does not apply)
        return func(*args, **kwargs)


@contextmanager
def no_grad_linears() -> Iterator[None]:
    """Inside, every float32 CPU ``F.linear`` made without gradients (``nn.Linear`` layers, the output head) runs
    through oneDNN: for generation and evaluation, where the model's own layers would take MKL's slower path (See
    Note: why not ``torch.mm`` for float32 on CPU). Calls with gradients, other dtypes and devices are untouched."""
    with _NoGradLinears():
        yield
