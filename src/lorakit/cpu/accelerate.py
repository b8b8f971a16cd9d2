"""``accelerate(model)`` / ``restore(model)``: everything the CPU backend does to a model and to the process, in
one call each.

``accelerate`` (on the CPU part of ``model``; a model with nothing on the CPU is left alone):

1. ``torch.set_num_threads(settings.threads)`` when the settings name a count;
2. glibc keeps freed memory mapped (``allocator.py``) unless ``keep_freed_memory=False``: process-wide, and not
   undone by ``restore``;
3. the float32 product kernels: torch's or oneDNN's, per ``settings.onednn`` ("auto": measured once per machine
   on the model's shapes, ``choice.py``); a property of the machine, so it serves every CPU model of the
   process from then on;
4. where oneDNN was chosen, the model's frozen ``nn.Linear`` layers and output head compute through it too
   (``frozen.py``), in training, evaluation and generation alike;
5. with ``keep_freed_memory`` and ``reuse_grad_memory``, each adapter weight gets memory its gradient is written
   into every step (``grad_memory.py``).

``restore`` undoes 4 and 5 on the model. Before ``accelerate`` nothing of the process has changed: importing
lorakit only registers the CPU backend, which fuses LoRA layers with torch's own kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.layer import LoraLinear

from .allocator import keep_freed_memory
from .backend import CPU
from .choice import Choice, choose, cpu_name, model_shapes
from .frozen import fast_frozen_linears, stop_fast_frozen_linears
from .grad_memory import drop_grad_memory, keep_grad_memory
from .kernels import cpu_flags
from .matmul import TORCH, onednn
from .settings import CpuSettings, current

__all__ = ["Acceleration", "accelerate", "restore", "bf16_compute_supported"]


@dataclass(frozen=True)
class Acceleration:
    """What :func:`accelerate` did. ``bf16_compute`` says whether this CPU multiplies bfloat16 natively
    (AVX512-BF16 or AMX): there, ``dtype: bfloat16`` (LoRA) or bfloat16 compute (QLoRA) is worth offering."""

    applied: bool
    cpu: str
    kernels: str
    choice: Choice | None
    threads: int
    freed_memory_kept: bool
    frozen_linears_routed: int
    grad_memory_params: int
    bf16_compute: bool


def bf16_compute_supported() -> bool:
    """Whether the CPU has native bfloat16 products (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _on_cpu(model: nn.Module) -> bool:
    return any(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))


def _adapter_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for m in model.modules() if isinstance(m, LoraLinear)
            for p in list(m.lora_A.parameters()) + list(m.lora_B.parameters())]


def accelerate(model: nn.Module, settings: CpuSettings | None = None) -> Acceleration:
    """Apply the CPU backend to ``model`` (see the module docstring); ``settings`` default to the environment's
    (:func:`lorakit.cpu.settings.current`). Call it after adding adapters; calling it again is harmless.

    Returns:
        An :class:`Acceleration` report.
    """
    settings = settings or current()
    bf16 = bf16_compute_supported()
    if not _on_cpu(model):
        return Acceleration(False, cpu_name(), CPU.kernels.name, None, torch.get_num_threads(), False, 0, 0, bf16)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    kept = keep_freed_memory() if settings.keep_freed_memory else False
    if settings.onednn == "auto":
        choice = choose(model_shapes(model))
    else:
        choice = Choice("onednn" if settings.onednn == "on" else "torch", None, None, cpu_name(), "settings")
    kernels = onednn() if choice.kernels == "onednn" else TORCH
    CPU.use(settings, kernels)
    routed = 0
    if kernels.name == "onednn":
        before = sum(1 for m in model.modules() if "forward" in m.__dict__)
        fast_frozen_linears(model)
        routed = sum(1 for m in model.modules() if "forward" in m.__dict__) - before
    else:
        stop_fast_frozen_linears(model)
    weights = _adapter_weights(model)
    reuse = kept and settings.reuse_grad_memory
    for p in weights:
        keep_grad_memory(p) if reuse else drop_grad_memory(p)
    return Acceleration(True, choice.cpu, kernels.name, choice, torch.get_num_threads(), kept, routed,
                        len(weights) if reuse else 0, bf16)


def restore(model: nn.Module) -> nn.Module:
    """Undo what :func:`accelerate` did to ``model`` (frozen-linear routing, gradient memory); the process-wide
    malloc setting and kernel choice stay. Returns ``model``."""
    stop_fast_frozen_linears(model)
    for p in model.parameters():
        drop_grad_memory(p)
    return model
