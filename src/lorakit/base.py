"""The base layers a LoRA layer can wrap, the :class:`QuantizedBase` protocol, and the one autograd node of
every quantized product.

Every base is called as ``base_layer(x)``; merging (and the OLoRA/PiSSA inits, which rewrite the base) needs its
weight as a dense (out, in) matrix. Plain ``nn.Linear`` holds it directly, GPT-2's ``Conv1D`` holds it transposed,
and quantized bases (lorakit's ``NF4Linear``/``Int8Linear``) implement :class:`QuantizedBase`, which is also all a
backend needs to fuse a LoRA update with them (``lorakit.cpu.fused``). See Note: one layer for every base.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

from . import backend

__all__ = ["QuantizedBase", "is_supported_base", "is_quantized", "dense_weight", "set_dense_weight", "base_shape",
           "frozen_product", "quantized_product"]


@runtime_checkable
class QuantizedBase(Protocol):
    """A frozen linear that stores its weight in a compressed form: everything lorakit asks of one.

    ``in_features`` / ``out_features`` give the logical shape, ``bias`` is a (frozen) Parameter or None and
    ``compute_dtype`` the dtype its products run in. ``dequantize()`` returns the (out, in) weight in
    ``compute_dtype``; ``dequantizer()`` a function returning it later from today's buffers (a later
    ``set_weight_`` does not change it); ``multiplier()`` a function ``x -> x Wᵀ`` (no bias) for ``x`` in
    ``compute_dtype`` (it may never write the whole weight); ``set_weight_(w)`` replaces the stored weight by the
    quantized form of ``w``.
    """

    in_features: int
    out_features: int
    compute_dtype: torch.dtype
    bias: nn.Parameter | None

    def dequantize(self) -> torch.Tensor: ...

    def dequantizer(self) -> Callable[[], torch.Tensor]: ...

    def multiplier(self) -> Callable[[torch.Tensor], torch.Tensor]: ...

    def set_weight_(self, weight: torch.Tensor) -> None: ...


def frozen_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weightᵀ`` for ``x`` ``(..., in)`` through the device backend's chosen kernel (no autograd of its
    own: called inside :func:`quantized_product` or without gradients)."""
    y = backend.linear(x.reshape(-1, x.shape[-1]), weight)
    return y.view(*x.shape[:-1], weight.shape[0])


class _QuantizedProduct(torch.autograd.Function):
    """``multiply(x)`` = ``x Wᵀ`` with the input gradient ``g · dequantize(*tensors)``: only the compressed
    ``tensors`` are saved for backward (the trick of torchao's ``linear_nf4``), no weight gradient."""

    @staticmethod
    def forward(ctx, x, multiply, dequantize, *tensors):  # noqa: D102
        ctx.dequantize = dequantize
        ctx.save_for_backward(*tensors)
        return multiply(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = ctx.dequantize(*ctx.saved_tensors)  # (out, in) in the compute dtype, for this product only
            grad_x = frozen_product(grad.to(w.dtype), w.t())
        return (grad_x, None, None) + (None,) * len(ctx.saved_tensors)


def quantized_product(x: torch.Tensor, multiply: Callable[[torch.Tensor], torch.Tensor],
                      dequantize: Callable[..., torch.Tensor], *tensors: torch.Tensor | None) -> torch.Tensor:
    """``multiply(x)`` (``x Wᵀ``), differentiable in ``x`` through ``W = dequantize(*tensors)``, the one autograd
    node of every quantized base's product (NF4/FP4, int8); no node when ``x`` needs no gradient."""
    if x.requires_grad and torch.is_grad_enabled():
        return _QuantizedProduct.apply(x, multiply, dequantize, *tensors)
    return multiply(x)


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
