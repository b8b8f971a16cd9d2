"""Put adapters into a model and take them out again: `add_adapter`, `unload`, `merge_and_unload`.

The model stays the object the user passed in (a transformers model keeps ``generate``, ``config`` and
``save_pretrained``); each targeted linear is swapped for a :class:`~lorakit.layer.LoraLinear` that holds the
original module as ``base_layer``. The adapters' configs live in the model's registry (:mod:`lorakit.registry`).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .adapters import _warn_unmerge, set_adapter
from .base import QuantizedBase, is_quantized
from .config import LoraConfig
from .layer import LoraLinear
from .modules_to_save import ModulesToSave
from . import registry
from .targets import matches, output_head_paths, select_targets

__all__ = ["add_adapter", "unload", "merge_and_unload", "lora_layers", "adapter_configs", "check_adapter_name"]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The adapters a model holds, name → config (empty for a model without adapters)."""
    return registry.configs(model)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Path → LoRA layer, in module order."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLinear)}


def _wrapped_modules(model: nn.Module) -> dict[str, ModulesToSave]:
    return {path: m for path, m in model.named_modules() if isinstance(m, ModulesToSave)}


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def check_adapter_name(name: str) -> str:
    """``name`` if it can name an adapter: one path segment of letters, digits, ``_`` and ``-`` (at most 64).

    An adapter other than ``default`` is saved in the subdirectory of its name, so ``"/abs"`` or ``"a/b"`` would
    write outside the adapter directory, and ``"."`` would overwrite it.

    Raises:
        ValueError: naming the value and the rule.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"adapter_name={name!r} must be one path segment of letters, digits, '_' and '-' (no '.', "
                         "'/' or spaces, at most 64 characters), such as 'dates' or 'style_v2'")
    return name


def _check_name(model: nn.Module, name: str) -> None:
    check_adapter_name(name)
    if name in adapter_configs(model):
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick another name")


def _default_dtype(module: nn.Module) -> torch.dtype:
    # Adapters train in float32 on float bases (PEFT's autocast); on a quantized base, in its compute dtype (QLoRA).
    if isinstance(module, QuantizedBase):
        return getattr(module, "compute_dtype", torch.bfloat16)
    return torch.float32


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                dtype: torch.dtype | None = None) -> nn.Module:
    """Inject adapter ``adapter_name`` into every module ``config`` targets; freeze everything else.

    The first adapter of a model becomes active (and trainable); later ones are added inactive, as in PEFT; use
    :func:`lorakit.set_adapter` to switch.

    Args:
        model: any ``nn.Module``; modified in place and returned.
        config: the adapter's :class:`LoraConfig`.
        adapter_name: a name without ``.``; ``"default"`` is saved at the top of an adapter directory.
        dtype: adapter weight dtype; default float32, or the compute dtype of a quantized base.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: for a duplicate or malformed name, or a config that matches no layer.

    Example:
        >>> cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        >>> add_adapter(model, cfg)
        >>> print_trainable_parameters(model)
    """
    from .mixed_batch import install_mixed_batch

    _check_name(model, adapter_name)
    config._check_fields()  # again: fields may have been assigned since the config was built
    with rollback_on_error(model, adapter_name):
        _inject(model, config, adapter_name, dtype)
    install_mixed_batch(model)  # model(..., adapter_names=[one per row]); see lorakit.mixed_batch
    return model


@contextlib.contextmanager
def rollback_on_error(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """If the block raises, take adapter ``adapter_name`` out again and put back the module tree, the active
    adapters and which parameters train, as they were before the block (a failed add/load registers nothing)."""
    lora_before, wrapped_before = set(lora_layers(model)), set(_wrapped_modules(model))
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    active = list(_active_names(model))
    try:
        yield
    except BaseException:
        for path, layer in lora_layers(model).items():
            if adapter_name in layer.lora_A:
                layer.delete(adapter_name)
            if path not in lora_before and not layer.lora_A:
                _replace(model, path, layer.base_layer)
        for path, wrapper in _wrapped_modules(model).items():
            if adapter_name in wrapper.modules_to_save:
                wrapper.delete(adapter_name)
            if path not in wrapped_before and not wrapper.modules_to_save:
                _replace(model, path, wrapper.original_module)
        adapter_configs(model).pop(adapter_name, None)
        if active:
            set_adapter(model, active, trainable=False)
        else:
            registry.clear_active(model)
            if not adapter_configs(model):
                registry.forget(model)
        for p in model.parameters():
            if id(p) in trainable:
                p.requires_grad_(trainable[id(p)])
        raise


def _inject(model: nn.Module, config: LoraConfig, adapter_name: str, dtype: torch.dtype | None) -> None:
    from .init import init_from_base  # OLoRA / PiSSA

    existing = lora_layers(model)
    targets = select_targets(_target_view(model, existing), config, output_head_paths(model), type(model).__name__)
    for path in targets:
        layer = existing.get(path)
        if layer is None:
            layer = LoraLinear(model.get_submodule(path))
            _replace(model, path, layer)
        layer.add(adapter_name, r=config.rank_for(path), lora_alpha=config.alpha_for(path),
                  scaling=config.scaling_for(path), lora_dropout=config.lora_dropout,
                  init=config.init_lora_weights if config.init_lora_weights in (True, False, "gaussian") else True,
                  dtype=dtype or _default_dtype(layer.base_layer))
        if config.init_lora_weights in ("olora", "pissa"):
            init_from_base(layer, adapter_name, config.init_lora_weights)
    for path in _modules_to_save_paths(model, config):
        wrapper = model.get_submodule(path)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper)
            _replace(model, path, wrapper)
        wrapper.add(adapter_name)
    adapter_configs(model)[adapter_name] = config
    if len(adapter_configs(model)) == 1:
        set_adapter(model, adapter_name)
    else:
        set_adapter(model, _active_names(model) or adapter_name)


def _active_names(model: nn.Module) -> list[str]:
    return registry.active_names(model)


def _modules_to_save_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    paths = []
    for path, module in model.named_modules():
        inside = any(path.startswith(p + ".") for p in paths)
        if path and not inside and matches(config.modules_to_save, path) and not isinstance(module, LoraLinear):
            paths.append(path)
    if not paths:
        raise ValueError(f"modules_to_save={config.modules_to_save!r} matches no module of {type(model).__name__}")
    return paths


def _target_view(model: nn.Module, existing: dict[str, LoraLinear]) -> list[tuple[str, nn.Module]]:
    """The model as target matching sees it: a LoRA layer counts as its base, its inner modules are hidden."""
    hidden = tuple(p + "." for p in [*existing, *_wrapped_modules(model)])
    view = []
    for path, module in model.named_modules():
        if path.startswith(hidden) or isinstance(module, ModulesToSave):
            continue
        view.append((path, module.base_layer if isinstance(module, LoraLinear) else module))
    return view


# --- taking adapters out


def unload(model: nn.Module) -> nn.Module:
    """Remove every LoRA layer and ``modules_to_save`` copy without merging; returns the base model.

    Merged adapters are unmerged first, so the base weights are the ones before injection.
    """
    error = 0.0
    for path, layer in lora_layers(model).items():
        error = max(error, layer.unmerge())
        _replace(model, path, layer.base_layer)
    _warn_unmerge(error)
    for path, wrapper in _wrapped_modules(model).items():
        _replace(model, path, wrapper.original_module)
    _forget_adapters(model)
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge adapters into the base weights (``W += scaling · B A``) and remove every LoRA module.

    The merged model has the base's dtype and architecture, so it runs with no added latency and saves like the
    original (``save_pretrained`` writes the same keys and size).

    On a quantized (NF4/int8) base the merged weight is re-quantized, which is lossy: a warning gives the largest
    weight change; dequantize first (``lorakit.quant.dequantize_model_``) to deploy an exact merge.

    Args:
        model: a model with adapters; modified in place and returned.
        safe_merge: also check every merged weight for NaN/Inf (in the base's dtype) before any layer is
            changed (ValueError names the layer). Adapters with NaN/Inf values are refused either way.
        adapter_names: adapters to merge (default: the active ones).

    Raises:
        ValueError: naming the first layer whose adapter (or, with ``safe_merge``, merged weight) is not finite;
            the model is left unchanged.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge; add or load an adapter first")
    names = adapter_names or _active_names(model)
    for path, layer in layers.items():  # every layer is checked before the first one changes
        try:
            layer.check_merge(names, whole_weight=safe_merge)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    requant_error = 0.0
    for path, layer in layers.items():
        requant_error = max(requant_error, layer.merge(names))
        _replace(model, path, layer.base_layer)
    if any(is_quantized(layer.base_layer) for layer in layers.values()):
        warnings.warn(
            f"merged into a quantized base: re-quantization moved merged weights by up to {requant_error:.3e}, so "
            "outputs differ from the adapter model (measure it with lorakit.verify_merge); to deploy, dequantize "
            "first with lorakit.quant.dequantize_model_(model, torch.bfloat16) and merge in 16-bit", stacklevel=2)
    for path, wrapper in _wrapped_modules(model).items():
        keep = next((wrapper.modules_to_save[n] for n in names if n in wrapper.modules_to_save), None)
        kept = keep if keep is not None else wrapper.original_module
        for p in kept.parameters():
            p.requires_grad_(False)
        _replace(model, path, kept)
    _forget_adapters(model)
    return model


def _forget_adapters(model: nn.Module) -> None:
    registry.forget(model)
