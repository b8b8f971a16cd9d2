"""Float32 matrix products on CPUs: torch's own (MKL) or oneDNN's, the library PyTorch already ships for its
bfloat16 matmuls. Which one runs is the CPU backend's choice (``choice.py``), made per machine by measurement.

Note: why not ``torch.mm`` for float32 on CPU
    PyTorch's CPU build sends float32 ``mm``/``linear`` to MKL's ``sgemm``, which on AMD processors reaches only
    what AVX2 code can (MKL's dispatch favours Intel cores): measured on a 2-core AMD EPYC (Zen 5),
    ``(1024 x 576) @ (576 x 1536)`` runs at ~215 GFLOP/s through ``torch.mm`` and ~450 GFLOP/s through oneDNN's
    AVX-512 ``brgemm`` (``torch.ops.mkldnn._linear_pointwise``), with the same float32 arithmetic (no
    reduced-precision mode; results differ from MKL's only by the order of the sums). On an Intel Xeon with
    AVX-512 MKL takes its own AVX-512 code and oneDNN gains nothing (12% slower on SmolLM2's frozen layers), so
    the backend times both on the model's shapes once per machine and keeps the faster (``choice.py``).

:class:`Kernels` is one such choice: :data:`TORCH`, or :func:`onednn` (checked against ``F.linear`` on first
use; a missing or broken op warns and falls back to torch). Used only for float32 CPU tensors, never while
``torch.compile`` traces (Inductor cannot lower the oneDNN op's strides), never for operands that need gradients.
"""

from __future__ import annotations

import functools
import platform
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Kernels", "TORCH", "onednn", "onednn_op"]


def onednn_op() -> Callable | None:
    """``torch.ops.mkldnn._linear_pointwise`` on x86-64 builds with oneDNN, else None."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


class Kernels:
    """Float32 CPU products through ``op`` (oneDNN's ``_linear_pointwise`` signature) or, with ``op=None`` and
    for anything ``op`` does not take, through ``F.linear``.

    Args:
        op: the oneDNN linear op (or a stand-in with its signature, for tests); checked once against
            ``F.linear`` on first use, and dropped with a warning when it fails.
    """

    def __init__(self, op: Callable | None = None) -> None:
        self._op = op
        self._checked = op is None

    @property
    def name(self) -> str:
        return "onednn" if self._op is not None else "torch"

    def usable(self, *tensors: torch.Tensor | None) -> bool:
        """Whether products of these tensors go through ``op``: all float32 on the CPU, not compiling."""
        if self._op is None or torch.compiler.is_compiling() or not self._works():
            return False
        return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors)

    def _works(self) -> bool:
        if not self._checked:
            self._checked = True
            g = torch.Generator().manual_seed(0)
            x, w, b = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g), torch.randn(3, generator=g)
            try:
                with torch.no_grad():
                    got = self._op(x, w.t().contiguous().t(), b, "none", [], "")
                ok = torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
                why = "its result differs from torch's"
            except (RuntimeError, TypeError) as e:
                ok, why = False, str(e).splitlines()[0] if str(e) else type(e).__name__
            if not ok:
                warnings.warn(f"lorakit: oneDNN float32 matmul unusable in this PyTorch build ({why}); using "
                              "torch's matmul.", stacklevel=4)
                self._op = None
        return self._op is not None

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T + bias`` for 2-D ``x`` ``(n, in)`` and ``weight`` ``(out, in)`` (any strides).

        Not differentiable through oneDNN: when an operand requires gradients under grad mode, ``F.linear`` runs,
        so autograd still sees the product.
        """
        if (x.dim() != 2 or weight.dim() != 2 or 0 in x.shape or 0 in weight.shape
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
                or not self.usable(x, weight, bias)):
            return F.linear(x, weight, bias)
        return self._op(x, weight, bias, "none", [], "")

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` for 2-D ``a`` ``(n, k)`` and ``b`` ``(k, m)``; see :meth:`linear`."""
        return self.linear(a, b.t())

    def frozen_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` for ``x`` ``(..., in)``, through ``op`` (forward and input gradient) when
        the weight and bias need no gradient; otherwise ``F.linear``."""
        if x.dim() < 2 or weight.dim() != 2 or not self.usable(x, weight, bias):
            return F.linear(x, weight, bias)
        grad = torch.is_grad_enabled()
        if grad and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            return F.linear(x, weight, bias)
        x2 = x.reshape(-1, x.shape[-1])
        y = _FrozenLinear.apply(x2, weight, bias, self) if grad and x.requires_grad else self.linear(x2, weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])


TORCH = Kernels(None)


@functools.cache
def onednn() -> Kernels:
    """The oneDNN kernels (torch's where this build has no oneDNN op); one object per process."""
    return Kernels(onednn_op())


class _FrozenLinear(torch.autograd.Function):
    """``x Wᵀ + b`` with a frozen weight and bias: only the input gradient, ``g W``."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernels):
        ctx.save_for_backward(weight)
        ctx.kernels = kernels
        return kernels.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return ctx.kernels.matmul(grad, weight), None, None, None
