"""`save_with_adapters`: a model carrying adapters saved as its base checkpoint plus the adapters beside it.

``model.save_pretrained`` on a model with adapters writes what the module tree holds: the wrapped layers'
``….base_layer.weight`` and the ``lora_A``/``lora_B`` tensors, keys that transformers (with or without
bitsandbytes) does not know. Here the LoRA layers and ``modules_to_save`` wrappers are swapped back for the modules
they wrap for the duration of ``save_pretrained`` (no copy of the model is made), so the directory holds exactly
the base checkpoint (for a quantized base: bitsandbytes' layout and ``quantization_config``), and the adapters go
to ``<directory>/adapter`` in PEFT's format. The model is unchanged afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .inject import adapter_configs, lora_layers
from .modules_to_save import ModulesToSave
from .peft_format import save_adapter

__all__ = ["save_with_adapters", "ADAPTER_SUBDIR"]

#: Where :func:`save_with_adapters` puts the adapters, inside the model directory.
ADAPTER_SUBDIR = "adapter"


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def save_with_adapters(model: nn.Module, directory: str | os.PathLike, tokenizer=None,
                       max_shard_size: str = "5GB") -> Path:
    """Save the base model (its own keys only) to ``directory`` and every adapter to ``directory/adapter``.

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads the base (with bitsandbytes for a
    quantized one), and ``lorakit.load_adapter(model, directory / "adapter")`` or PEFT load the adapter.

    Args:
        model: a transformers model with adapters (unmerged).
        directory: output directory.
        tokenizer: saved into ``directory`` too when given.
        max_shard_size: passed to ``save_pretrained``.

    Raises:
        ValueError: if the model has no adapters, or an adapter is merged into the base (the base weights would
            not be the base's: ``lorakit.unmerge_adapter(model)`` first, or save a merged model with
            ``merge_and_unload`` + ``save_merged``).
    """
    if not adapter_configs(model):
        raise ValueError(f"{type(model).__name__} has no adapters; call model.save_pretrained(directory) directly")
    layers = lora_layers(model)
    merged = sorted(p for p, layer in layers.items() if layer.merged_adapters)
    if merged:
        raise ValueError(f"adapters are merged into {merged[0]} (and {len(merged) - 1} more layers); call "
                         "lorakit.unmerge_adapter(model) first, or save a merged model with merge_and_unload")
    wrappers = {p: m for p, m in model.named_modules() if isinstance(m, ModulesToSave)}
    directory = Path(directory)
    swapped = []
    try:
        for path, layer in layers.items():
            _swap(model, path, layer.base_layer)
            swapped.append((path, layer))
        for path, wrapper in wrappers.items():
            _swap(model, path, wrapper.original_module)
            swapped.append((path, wrapper))
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    finally:
        for path, module in reversed(swapped):
            _swap(model, path, module)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    save_adapter(model, directory / ADAPTER_SUBDIR)
    return directory
