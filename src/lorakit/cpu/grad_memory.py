"""Adapter gradients written into the same memory every step (the weight gradients of the fused LoRA node).

Note: gradient memory reuse
    ``optimizer.zero_grad()`` drops every ``.grad`` (``set_to_none=True``, torch's default), so each backward
    allocates hundreds of small adapter gradients while the heap is at its fullest, and they land in the holes
    left by the large activation blocks freed early in backward (the logits gradient first). The next forward
    then finds no hole for its largest tensors and grows the heap with fresh pages, which the kernel zero-fills
    on first touch. Measured on SmolLM2 LoRA r16 all-linear, batch 4 x 256, 2 cores: 10 000 - 50 000 page faults a
    step and a 200 MB logits fill taking ~280 ms instead of ~10 ms; the frozen-model limit, with no gradients,
    has none. A gradient written into memory that the parameter keeps from step to step never moves.

    This matters once freed memory stays in the heap (``keep_freed_memory``): with glibc's defaults the largest
    blocks are fresh ``mmap`` pages every step anyway, and kept gradients only add faults (measured: ~255 000 vs
    ~225 000 a step). So it follows the settings, not what ran earlier in the process: :func:`lorakit.accelerate`
    gives each trainable adapter parameter its gradient memory (:func:`keep_grad_memory`) when its settings have
    both ``keep_freed_memory`` and ``reuse_grad_memory``, and :func:`lorakit.restore` takes it away
    (:func:`drop_grad_memory`). There, measured with transformers' loss: 7 faults a step instead of 7 000 - 49 000.

    ``grad_buffer(p)`` returns a fresh tensor object over ``p``'s own gradient memory while ``p.grad`` is None;
    autograd adopts it as ``p.grad`` without a copy (it is the only reference to that tensor object). When
    ``p.grad`` is set (gradient accumulation, DDP buckets), it returns None: the caller allocates and autograd adds
    in place, as usual. The one visible difference: a reference to an old ``.grad`` kept past ``zero_grad`` sees
    the next step's values.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["grad_buffer", "keep_grad_memory", "drop_grad_memory"]

_ATTR = "_lorakit_grad_memory"


def keep_grad_memory(param: torch.Tensor) -> None:
    """Give ``param`` memory for its gradient (used by :func:`grad_buffer` from now on)."""
    if type(param) is nn.Parameter and getattr(param, _ATTR, None) is None:
        setattr(param, _ATTR, torch.empty_like(param, memory_format=torch.contiguous_format).detach())


def drop_grad_memory(param: torch.Tensor) -> None:
    """Take it away again (gradients are then allocated as torch does)."""
    if getattr(param, _ATTR, None) is not None:
        delattr(param, _ATTR)


def grad_buffer(param: torch.Tensor) -> torch.Tensor | None:
    """Where to write ``param``'s gradient this step, or None to allocate as usual. See Note: gradient memory
    reuse."""
    if type(param) is not nn.Parameter or torch.compiler.is_compiling():
        return None  # (a compiled graph allocates its own outputs)
    memory = getattr(param, _ATTR, None)
    if memory is None or param.grad is not None or not param.requires_grad:
        return None
    if memory.shape != param.shape or memory.dtype != param.dtype or memory.device != param.device:
        memory = torch.empty_like(param, memory_format=torch.contiguous_format).detach()
        setattr(param, _ATTR, memory)
    return memory.view(memory.shape)  # a new tensor object: autograd may take it as .grad without copying
