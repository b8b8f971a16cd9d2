"""The CPU backend: what is CPU-specific in lorakit, under the core (See Note: backends under the core, in
``lorakit/backend.py``).

==================== ==========================================================================================
``settings.py``      :class:`CpuSettings`: every switch, read from the environment once
``accelerate.py``    :func:`accelerate` / :func:`restore`: threads, malloc, kernel choice, routing, gradient memory
``backend.py``       :class:`CpuBackend`: the fused LoRA path, products and 4-bit kernels the core asks for
``choice.py``        torch's or oneDNN's float32 kernels, chosen by measurement per machine (cached)
``matmul.py``        :class:`Kernels`: float32 products through torch or oneDNN
``fused.py``         one autograd node for a base layer and its LoRA update
``frozen.py``        frozen ``nn.Linear`` layers (and the head) through oneDNN
``grad_memory.py``   adapter gradients written into memory kept per parameter
``allocator.py``     glibc keeps freed memory mapped between steps
``kernels.py``       native AVX512-BF16 4-bit dequantization and fused 4-bit matmul (``csrc/nf4_cpu.cpp``)
==================== ==========================================================================================

Importing this package registers :data:`~lorakit.cpu.backend.CPU` for CPU tensors and changes nothing else.
"""

from lorakit import backend as _dispatch

from .accelerate import Acceleration, accelerate, bf16_compute_supported, restore
from .backend import CPU, CpuBackend
from .frozen import fast_frozen_linears, stop_fast_frozen_linears
from .settings import CpuSettings, current

_dispatch.register("cpu", CPU)

__all__ = ["Acceleration", "CPU", "CpuBackend", "CpuSettings", "accelerate", "bf16_compute_supported", "current",
           "fast_frozen_linears", "restore", "stop_fast_frozen_linears"]
