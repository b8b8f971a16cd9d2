"""``fast_frozen_linears(model)``: the model's frozen ``nn.Linear`` layers compute through oneDNN (CPU, float32).

:func:`lorakit.accelerate` applies it where oneDNN is the faster kernel on this machine (``choice.py``).
lorakit's LoRA layers already multiply through the chosen kernels (See Note: why not ``torch.mm`` for float32
on CPU); the layers they do not wrap still take ``F.linear``, MKL's slower path on AMD cores: the output head when
the loss comes from the model itself (transformers' ``labels=``, as TRL's trainers compute it) and every layer
outside ``target_modules`` (PEFT's default for Llama wraps only ``q_proj`` and ``v_proj``). This gives each of
them an instance ``forward`` calling oneDNN's :meth:`~lorakit.cpu.matmul.Kernels.frozen_linear`: the same product and input
gradient, no weight gradient, ``F.linear`` whenever the weight or bias requires grad or the input is not float32
on an x86 CPU. The module tree, state dict, ``generate`` and saving are unchanged (the class's own ``forward`` is
untouched); gradient checkpointing recomputes through the same forward. :func:`stop_fast_frozen_linears` removes it.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .matmul import onednn

__all__ = ["fast_frozen_linears", "stop_fast_frozen_linears"]


class _FrozenForward:
    """The instance ``forward``. It holds its module weakly, so that the module is freed as soon as the model is
    dropped (no reference cycle waiting for the garbage collector), and pickles and deep-copies as a reference to
    the module (the copy is bound to the copied module)."""

    def __init__(self, module: nn.Linear):
        self._module = weakref.ref(module)

    @property
    def module(self) -> nn.Linear:
        return self._module()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self._module()
        return onednn().frozen_linear(x, module.weight, module.bias)

    def __reduce__(self):
        return _FrozenForward, (self._module(),)


def fast_frozen_linears(model: nn.Module) -> nn.Module:
    """Give every plain ``nn.Linear`` in ``model`` (LoRA-wrapped base layers included) the oneDNN forward; see the
    module docstring. Layers whose weight requires grad keep computing through ``F.linear``, checked at each call.
    Calling it twice is a no-op.

    Returns:
        ``model`` (the same object).
    """
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in module.__dict__:
            module.forward = _FrozenForward(module)
    return model


def stop_fast_frozen_linears(model: nn.Module) -> nn.Module:
    """Remove what :func:`fast_frozen_linears` set (no-op where it was not applied)."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _FrozenForward):
            del module.__dict__["forward"]
    return model
