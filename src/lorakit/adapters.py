"""Adapter state on a model: which adapter is active, disabling it, deleting it, what trains.

Every function here is explicit and idempotent: calling it twice does what calling it once did. Nothing changes
weights as a side effect of ``.train()``/``.eval()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from . import registry
from .layer import LoraLinear
from .modules_to_save import ModulesToSave

__all__ = [
    "set_adapter",
    "active_adapters",
    "disable_adapter",
    "delete_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "mark_only_adapters_trainable",
    "trainable_parameters",
    "print_trainable_parameters",
    "TrainableReport",
]


def _configs(model: nn.Module) -> dict:
    return registry.configs(model)


def _adapter_modules(model: nn.Module) -> list[LoraLinear | ModulesToSave]:
    return [m for m in model.modules() if isinstance(m, (LoraLinear, ModulesToSave))]


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters (in the order they are applied)."""
    return list(registry.active_names(model))


def set_adapter(model: nn.Module, adapter_name: str | list[str], trainable: bool = True) -> None:
    """Make ``adapter_name`` (or several names, summed) the active adapter(s), and the only trainable ones.

    Merged adapters that are not in the new set are unmerged first, so outputs always follow the active set.
    With ``trainable=False`` which parameters train is left as it was (e.g. to run a frozen reference adapter
    for a moment inside a training step).

    Raises:
        ValueError: naming an unknown adapter and the ones the model has, or a name given twice (it would be
            applied twice).
    """
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    known = _configs(model)
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise ValueError(f"unknown adapter {name!r}; this model has {sorted(known)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"adapter(s) {twice} named more than once in {names}; each active adapter is applied once "
                         "per name, so list each name once")
    error = 0.0
    for module in _adapter_modules(model):
        if isinstance(module, LoraLinear):
            error = max(error, module.unmerge([n for n in module.merged_adapters if n not in names]))
        module.active_adapters = [n for n in names if _has(module, n)]
    _warn_unmerge(error)
    registry.set_active_names(model, names)
    if trainable:
        mark_only_adapters_trainable(model)


def _has(module: LoraLinear | ModulesToSave, name: str) -> bool:
    return name in (module.lora_A if isinstance(module, LoraLinear) else module.modules_to_save)


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base outputs (e.g. DPO's reference model); adapters come back after.

    Merged adapters are unmerged on entry (so the base really is the base) and stay unmerged.

    Example:
        >>> with disable_adapter(model):
        ...     ref_logits = model(input_ids).logits
    """
    modules = _adapter_modules(model)
    before = [m.disabled for m in modules]
    error = 0.0
    for module in modules:
        if isinstance(module, LoraLinear):
            error = max(error, module.unmerge())
        module.disabled = True
    _warn_unmerge(error)
    try:
        yield model
    finally:
        for module, was in zip(modules, before):
            module.disabled = was


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name`` from every layer; LoRA layers left with no adapter stay as empty wrappers.

    Raises:
        ValueError: for an unknown name.
    """
    configs = _configs(model)
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(configs)}")
    error = 0.0
    for module in _adapter_modules(model):
        if _has(module, adapter_name):
            if isinstance(module, LoraLinear):
                error = max(error, module.unmerge(adapter_name))
            module.delete(adapter_name)
    _warn_unmerge(error)
    del configs[adapter_name]
    active = [n for n in active_adapters(model) if n != adapter_name]
    if not active and configs:
        active = [next(iter(configs))]
    registry.set_active_names(model, active)
    if configs:
        set_adapter(model, active)


def merge_adapter(model: nn.Module, safe_merge: bool = False) -> None:
    """Merge the active adapters into the base weights, keeping the LoRA layers (undo with :func:`unmerge_adapter`).

    On a quantized base the merge re-quantizes the weight (lossy; a warning gives the largest change), and
    :func:`unmerge_adapter` restores the stored original exactly. Every layer is checked before the first one
    changes: adapters with NaN/Inf values (or, with ``safe_merge``, non-finite merged weights) are refused and the
    model is left as it was. While merged, a backward pass that would train a merged adapter raises.

    Raises:
        ValueError: naming the first layer that cannot be merged.
    """
    error = 0.0
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, LoraLinear)]
    for path, module in layers:
        try:
            module.check_merge(active_adapters(model), whole_weight=safe_merge)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    for _, module in layers:
        error = max(error, module.merge(active_adapters(model)))
    if error:
        warnings.warn(f"merged into a quantized base: re-quantization moved merged weights by up to {error:.3e}",
                      stacklevel=2)


def unmerge_adapter(model: nn.Module) -> None:
    """Undo :func:`merge_adapter`.

    A quantized base gets its stored original back bit for bit; a 16-bit base (bfloat16 / float16) cannot, since
    the merged weight was rounded: a warning gives the largest difference left from the original weights (reload
    the base, or merge in float32, when it matters).
    """
    error = 0.0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            error = max(error, module.unmerge())
    _warn_unmerge(error)


def _warn_unmerge(error: float) -> None:
    if error:
        warnings.warn(f"unmerge could not restore the exact base weights: they now differ from the originals by up "
                      f"to {error:.3e} (rounding of the merged 16-bit or quantized weight); reload the base model for "
                      "exact weights", stacklevel=3)


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze everything but the active adapters' LoRA weights, ``modules_to_save`` copies and the biases the
    config's ``bias`` asks for (``"all"``: every bias; ``"lora_only"``: biases of adapted layers)."""
    active = active_adapters(model)
    bias_modes = {_configs(model)[n].bias for n in active}
    for param in model.parameters():
        param.requires_grad_(False)
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear):
            for name in module.active_adapters:
                module.lora_A[name].weight.requires_grad_(True)
                module.lora_B[name].weight.requires_grad_(True)
            bias = getattr(module.base_layer, "bias", None)
            if "lora_only" in bias_modes and isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
        elif isinstance(module, ModulesToSave):
            for name in module.active_adapters:
                module.modules_to_save[name].requires_grad_(True)
    if "all" in bias_modes:
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                param.requires_grad_(True)


@dataclass(frozen=True)
class TrainableReport:
    """Trainable and total parameter counts (total counts each packed 4-bit weight at its logical size)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableReport:
    """Count trainable and total parameters; a quantized base counts its logical ``in × out`` weight."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue  # tied weights count once
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    for module in model.modules():
        if hasattr(module, "dequantize") and hasattr(module, "in_features"):
            total += module.in_features * module.out_features  # packed buffers are not parameters
    return TrainableReport(trainable, total)


def print_trainable_parameters(model: nn.Module) -> TrainableReport:
    """Print (and return) ``trainable params: … || all params: … || trainable%: …`` as PEFT does."""
    report = trainable_parameters(model)
    print(report)
    return report
