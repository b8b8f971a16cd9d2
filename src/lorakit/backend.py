"""The one seam between lorakit's core and its per-device speed code (``lorakit/cpu/``, later ``lorakit/cuda/``).

Note: backends under the core
    The core (layers, quantized bases, losses) computes with plain PyTorch and asks, by the *tensor's* device, the
    backend registered for that device type whether it has something faster: a fused LoRA node, a product kernel,
    a native 4-bit kernel. A backend answers ``None`` where it has nothing, and the core's generic code runs. The
    core never imports a backend (``tests/test_import_graph.py`` checks it); a backend package registers itself
    when imported (``lorakit/__init__.py`` imports ``lorakit.cpu``, which only creates the object: nothing of the
    process changes before ``lorakit.accelerate(model)``). One process can hold models on several devices: each
    call goes where its tensors are.

    A backend is any object with the methods of :class:`Backend`; a device type with no backend registered gets
    the generic path everywhere.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Backend", "register", "backend_for", "lora_forward", "linear", "matmul", "dequantize_4bit",
           "matmul_4bit"]


class Backend(Protocol):
    """What the core asks a device's backend. Every method may decline (``None``) except the products."""

    def lora_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's output through a fused path, or None (the layer then runs its generic forward)."""

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` for 2-D ``x`` with frozen operands (inside autograd Functions or no-grad)."""

    def dequantize_4bit(self, packed, absmax, nested, offset, shape, blocksize, code,
                        dtype) -> torch.Tensor | None:
        """A 4-bit weight dequantized by a native kernel (bit-identical to ``lorakit.quant.dequantize_4bit``)."""

    def matmul_4bit(self, x, packed, absmax, nested, offset, shape, blocksize, code,
                    out_dtype) -> torch.Tensor | None:
        """``x @ dequant(W)ᵀ`` for a 2-D ``x`` in bfloat16 by a fused native kernel."""


_BACKENDS: dict[str, Backend] = {}


def register(device_type: str, backend: Backend | None) -> None:
    """Make ``backend`` answer for tensors on ``device_type`` ("cpu", "cuda", ...); None removes it."""
    if backend is None:
        _BACKENDS.pop(device_type, None)
    else:
        _BACKENDS[device_type] = backend


def backend_for(t: torch.Tensor) -> Backend | None:
    """The backend registered for ``t``'s device type, or None."""
    return _BACKENDS.get(t.device.type)


def lora_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Ask ``x``'s backend for a fused forward of ``layer`` (None: use the generic path)."""
    backend = _BACKENDS.get(x.device.type)
    return None if backend is None else backend.lora_forward(layer, x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x`` through the backend's chosen product kernel (frozen operands:
    call it inside an autograd Function or without gradients)."""
    backend = _BACKENDS.get(x.device.type)
    return F.linear(x, weight, bias) if backend is None else backend.linear(x, weight, bias)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D tensors through :func:`linear`."""
    return linear(a, b.t())


def dequantize_4bit(packed, absmax, nested, offset, shape, blocksize, code, dtype) -> torch.Tensor | None:
    """Native dequantization from ``packed``'s backend, or None (then the caller's PyTorch code runs)."""
    backend = _BACKENDS.get(packed.device.type)
    return None if backend is None else backend.dequantize_4bit(packed, absmax, nested, offset, shape, blocksize,
                                                                 code, dtype)


def matmul_4bit(x, packed, absmax, nested, offset, shape, blocksize, code, out_dtype) -> torch.Tensor | None:
    """A fused native 4-bit product from ``x``'s backend, or None."""
    backend = _BACKENDS.get(x.device.type)
    return None if backend is None else backend.matmul_4bit(x, packed, absmax, nested, offset, shape, blocksize,
                                                             code, out_dtype)
