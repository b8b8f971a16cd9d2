"""lorakit: LoRA and QLoRA fine-tuning of causal language models, in the PEFT on-disk format."""

from .adapters import (
    TrainableReport,
    active_adapters,
    delete_adapter,
    disable_adapter,
    mark_only_adapters_trainable,
    merge_adapter,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unmerge_adapter,
)
from .config import LoraConfig
from .cpu import accelerate, restore
from .inject import adapter_configs, add_adapter, lora_layers, merge_and_unload, unload
from .layer import LoraLinear
from .merge import MergeReport, save_merged, verify_merge
from .gguf_export import export_gguf, export_gguf_adapter
from .models import EMBEDDED_NAME, load_model
from .peft_format import adapter_state_dict, from_pretrained, load_adapter, save_adapter
from .recompute import recompute_cheap_activations, stop_recomputing
from .save_base import save_with_adapters
from .streamed_merge import merge_to_disk
from .weighted import add_weighted_adapter
from . import cpu, optim, quant  # noqa: E402  (subpackages used as lorakit.cpu / lorakit.optim / lorakit.quant)

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_NAME",
    "LoraConfig",
    "LoraLinear",
    "MergeReport",
    "TrainableReport",
    "accelerate",
    "active_adapters",
    "adapter_configs",
    "adapter_state_dict",
    "cpu",
    "add_adapter",
    "add_weighted_adapter",
    "delete_adapter",
    "export_gguf",
    "export_gguf_adapter",
    "disable_adapter",
    "from_pretrained",
    "load_adapter",
    "load_model",
    "lora_layers",
    "mark_only_adapters_trainable",
    "merge_adapter",
    "merge_and_unload",
    "merge_to_disk",
    "optim",
    "quant",
    "print_trainable_parameters",
    "recompute_cheap_activations",
    "restore",
    "save_adapter",
    "save_merged",
    "save_with_adapters",
    "set_adapter",
    "stop_recomputing",
    "trainable_parameters",
    "unload",
    "unmerge_adapter",
    "verify_merge",
]
