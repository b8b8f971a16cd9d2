"""The adapter registry of a model: which adapters it holds (name → config) and which are active.

Kept in the model's ``__dict__`` (not as module attributes, so ``state_dict`` and the module tree are untouched):
``lorakit_configs`` (name → :class:`~lorakit.config.LoraConfig`) and ``lorakit_active`` (list of names). Only this
module reads or writes those two entries; :mod:`lorakit.inject` and :mod:`lorakit.adapters` go through it.
"""

from __future__ import annotations

from torch import nn

__all__ = ["configs", "active_names", "set_active_names", "clear_active", "forget"]

_CONFIGS = "lorakit_configs"
_ACTIVE = "lorakit_active"


def configs(model: nn.Module) -> dict:
    """The adapters ``model`` holds, name → config; the live dict (created empty on first use)."""
    return model.__dict__.setdefault(_CONFIGS, {})


def active_names(model: nn.Module) -> list[str]:
    """The active adapter names (the live list; copy it before changing it)."""
    return model.__dict__.get(_ACTIVE, [])


def set_active_names(model: nn.Module, names: list[str]) -> None:
    """Record ``names`` as the active adapters (the layers are set by :func:`lorakit.set_adapter`)."""
    model.__dict__[_ACTIVE] = names


def clear_active(model: nn.Module) -> None:
    """No active adapter recorded (the state of a model before its first adapter)."""
    model.__dict__.pop(_ACTIVE, None)


def forget(model: nn.Module) -> None:
    """Drop the registry (after unloading every adapter)."""
    model.__dict__.pop(_CONFIGS, None)
    model.__dict__.pop(_ACTIVE, None)
