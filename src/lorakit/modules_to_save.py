"""`ModulesToSave`: a fully trainable copy of a module per adapter (PEFT's ``modules_to_save``).

In memory the layout is PEFT's (``<path>.original_module`` and ``<path>.modules_to_save.<adapter>``), so the file
key of a parameter is ``<path>.<param>``: the ``modules_to_save.<adapter>`` segment is dropped structurally.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModulesToSave"]


class ModulesToSave(nn.Module):
    """Runs the active adapter's trainable copy of ``original_module``, or the original when none is active.

    Args:
        original_module: the module to copy; kept frozen and untouched as ``self.original_module``.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def add(self, name: str) -> None:
        """Make a trainable deep copy of the original module for adapter ``name``."""
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delete(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def _current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self._current()(*args, **kwargs)

    def __getattr__(self, name: str):
        # Callers that read attributes of the wrapped module (``lm_head.weight``, ``embed.num_embeddings``) keep working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._current(), name)
