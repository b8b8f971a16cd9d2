"""The base layers a LoRA layer can wrap, and the two operations merging needs from them.

Every base is called as ``base_layer(x)``; only merging (and the OLoRA/PiSSA inits, which rewrite the base) need
its weight as a dense (out, in) matrix. Plain ``nn.Linear`` holds it directly, GPT-2's ``Conv1D`` holds it
transposed, and quantized bases (lorakit's ``NF4Linear``/``Int8Linear``) implement the :class:`QuantizedBase`
protocol: ``dequantize()`` and ``set_weight_(w)`` (which re-quantizes). See Note: one layer for every base.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["QuantizedBase", "is_supported_base", "is_quantized", "dense_weight", "set_dense_weight", "base_shape"]


@runtime_checkable
class QuantizedBase(Protocol):
    """A frozen linear that stores its weight in a compressed form.

    Attributes ``in_features`` and ``out_features`` give the logical shape; ``dequantize()`` returns the (out, in)
    weight in the compute dtype; ``set_weight_(w)`` replaces the stored weight by the quantized form of ``w``.
    """

    in_features: int
    out_features: int

    def dequantize(self) -> torch.Tensor: ...

    def set_weight_(self, weight: torch.Tensor) -> None: ...


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain-PyTorch users
        return False
    return isinstance(module, Conv1D)


def is_supported_base(module: nn.Module) -> bool:
    """True for modules a LoRA layer can wrap: ``nn.Linear``, ``Conv1D`` and :class:`QuantizedBase` layers."""
    return isinstance(module, nn.Linear) or _is_conv1d(module) or isinstance(module, QuantizedBase)


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer."""
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def is_quantized(module: nn.Module) -> bool:
    """True for bases whose weight is stored compressed: :class:`QuantizedBase` layers and bitsandbytes'
    ``Linear4bit`` / int8 ``Linear8bitLt`` (what transformers' ``BitsAndBytesConfig`` gives)."""
    from .quant.bnb_layers import bnb_kind

    return isinstance(module, QuantizedBase) or bnb_kind(module) is not None


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base's weight as a dense (out, in) tensor (a view for ``nn.Linear``, a new tensor otherwise)."""
    from .quant.bnb_layers import bnb_dequantize, bnb_kind

    if isinstance(module, QuantizedBase):
        return module.dequantize()
    if bnb_kind(module):
        return bnb_dequantize(module)
    if _is_conv1d(module):
        return module.weight.data.T  # Conv1D stores (in, out)
    return module.weight.data


def set_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the base's weight by ``weight`` (out, in), keeping the base's own dtype and storage format."""
    from .quant.bnb_layers import bnb_kind, bnb_set_weight_

    if isinstance(module, QuantizedBase):
        module.set_weight_(weight)
    elif bnb_kind(module):
        bnb_set_weight_(module, weight)
    elif _is_conv1d(module):
        module.weight.data.copy_(weight.T.to(module.weight.dtype))
    else:
        module.weight.data.copy_(weight.to(module.weight.dtype))
