"""The CPU backend: what the core gets when it asks for a fast path on CPU tensors (see Note: backends under the
core, in ``lorakit/backend.py``).

* :meth:`CpuBackend.lora_forward`: the fused LoRA node (``fused.py``) for one unmerged active adapter on a plain
  ``nn.Linear`` of the input's dtype or on a :class:`~lorakit.base.QuantizedBase` computing in it, else None.
* :meth:`CpuBackend.linear`: float32 products through the kernels :func:`lorakit.accelerate` chose for this
  machine (torch's until then).
* :meth:`CpuBackend.dequantize_4bit` / :meth:`CpuBackend.matmul_4bit`: the native AVX512-BF16 kernels
  (``kernels.py``) where the CPU has them and the settings allow them.

Creating it changes nothing in the process; its settings are read (once) when first needed.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.base import QuantizedBase

from . import kernels as native
from .fused import lora_linear
from .matmul import TORCH, Kernels
from .settings import CpuSettings, current

__all__ = ["CpuBackend", "CPU"]


class CpuBackend:
    """See the module docstring. ``kernels`` is the float32 product choice (a machine property, one per
    process); ``settings`` the :class:`CpuSettings` in force (``current()`` until ``accelerate`` passes its own)."""

    def __init__(self) -> None:
        self.kernels: Kernels = TORCH
        self._settings: CpuSettings | None = None

    @property
    def settings(self) -> CpuSettings:
        if self._settings is None:
            self._settings = current()
        return self._settings

    def use(self, settings: CpuSettings | None, kernels: Kernels) -> None:
        """Adopt ``settings`` (None: the environment's, read when first needed) and ``kernels`` (called by
        :func:`lorakit.accelerate`)."""
        self._settings, self.kernels = settings, kernels

    def snapshot(self) -> tuple[CpuSettings | None, Kernels]:
        """What :meth:`use` takes, to put the backend back as it was (tests)."""
        return self._settings, self.kernels

    def lora_forward(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        if not self.settings.fused_lora:
            return None
        name = layer.fusable_adapter(x)
        if name is None:
            return None
        base = layer.base_layer
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        scaling, dropout = layer.scaling[name], layer.lora_dropout[name]
        if type(base) is nn.Linear:
            if base.weight.dtype != x.dtype:
                return None
            return lora_linear(x, base.weight, base.bias, A, B, scaling, dropout, layer.training,
                               kernels=self.kernels)
        if isinstance(base, QuantizedBase) and base.compute_dtype == x.dtype:
            bias = None if base.bias is None else base.bias.to(x.dtype)
            return lora_linear(x, None, bias, A, B, scaling, dropout, layer.training,
                               dequantize=base.dequantizer(), matmul=base.multiplier(), kernels=self.kernels)
        return None

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernels.linear(x, weight, bias)

    def dequantize_4bit(self, packed, absmax, nested, offset, shape, blocksize, code, dtype):
        if (dtype not in (torch.float32, torch.bfloat16) or not self.settings.native_kernels
                or not native.supports(packed, absmax, nested)):
            return None
        return native.dequantize(packed, absmax, nested, offset, shape, blocksize, code, dtype)

    def matmul_4bit(self, x, packed, absmax, nested, offset, shape, blocksize, code, out_dtype):
        if not self.settings.native_kernels or not native.matmul_fits(x, shape, blocksize, packed, absmax, nested):
            return None
        return native.matmul_bf16(x, packed, absmax, nested, offset, shape, blocksize, code, out_dtype)


CPU = CpuBackend()
