"""`lora_linear`: a linear layer and its LoRA update in one autograd node (the CPU backend's fused path).

Note: fused dense LoRA
    Autograd on ``F.linear(x, W) + s·(x Aᵀ) Bᵀ`` builds five nodes and, in the backward pass, writes the input
    gradient twice (``g W`` from the base, ``g_xa A`` from the adapter) and adds them: an extra (tokens × in) tensor
    and an extra pass over it in every wrapped layer. Here the forward writes the output once (``addmm`` then an
    in-place ``addmm_`` of the low-rank term) and the backward accumulates the adapter's input gradient into the
    base's in place (``gx.addmm_(g_xa, A)``). Only ``x`` (already kept by any linear layer) and the (tokens × r)
    bottleneck are saved. Each weight gradient is one thin matmul: ``dB = s·gᵀ xa``, ``dA = g_xaᵀ x``.

    Gradients equal the unfused expression's (tested against it); this is just fewer passes over memory. The
    products run through the backend's chosen :class:`~lorakit.cpu.matmul.Kernels` (See Note: why not torch.mm
    for float32 on CPU, in ``lorakit.cpu.matmul``); the two rank-r updates of the outputs stay ``addmm_`` in place.
    Quantized bases (QLoRA) take the same node through their :class:`~lorakit.base.QuantizedBase` methods: the
    forward product is the base's own ``multiplier()``, the input gradient multiplies by ``dequantizer()()``,
    and the dequantized weight is never kept.
"""

from __future__ import annotations

from typing import Callable

import torch

from .grad_memory import grad_buffer
from .matmul import TORCH, Kernels

__all__ = ["lora_linear"]


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, mask, dequantize, matmul, kernels):
        # x: (N, in); weight: (out, in), or None and dequantize() gives it (matmul(x), if given, gives x Wᵀ);
        # lora_A: (r, in); lora_B: (out, r); mask: (N, r) scaled keep-mask or None
        if matmul is not None:
            out = matmul(x)
            if bias is not None:
                out.add_(bias)
        else:
            w = weight if dequantize is None else dequantize()
            out = kernels.linear(x, w, bias)
            del w  # a dequantized weight lives for this matmul only
        xa = kernels.linear(x, lora_A)  # (N, r)
        if mask is not None:
            xa = xa * mask
        out.addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, mask)
        ctx.scaling, ctx.dequantize, ctx.kernels = scaling, dequantize, kernels
        ctx.params = (lora_A, lora_B)  # the Parameters themselves for grad_buffer (saved-tensor hooks may copy)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_A, lora_B, xa, mask = ctx.saved_tensors
        s, matmul = ctx.scaling, ctx.kernels.matmul
        grad_xa = matmul(grad, lora_B).mul_(s)  # (N, r)
        param_A, param_B = ctx.params
        grad_B = None
        if ctx.needs_input_grad[4]:  # s·gᵀ xa, computed as (xaᵀ g)ᵀ: the orientation oneDNN runs fast
            grad_B = grad_buffer(param_B)
            if grad_B is None:
                grad_B = torch.empty_like(lora_B, memory_format=torch.contiguous_format)
            torch.mul(matmul(xa.t(), grad).t(), s, out=grad_B)
        if mask is not None:
            grad_xa = grad_xa * mask
        grad_A = None
        if ctx.needs_input_grad[3]:
            grad_A = matmul(grad_xa.t(), x)  # (r, in)
            buffer = grad_buffer(param_A)
            grad_A = grad_A if buffer is None else buffer.copy_(grad_A)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul(grad, weight if ctx.dequantize is None else ctx.dequantize())  # (N, in)
            grad_x.addmm_(grad_xa, lora_A)
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        grad_weight = grad.t() @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, None, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout: float = 0.0, training: bool = False,
                dequantize: Callable[[], torch.Tensor] | None = None,
                matmul: Callable[[torch.Tensor], torch.Tensor] | None = None, kernels: Kernels | None = None
                ) -> torch.Tensor:
    """``x Wᵀ + b + scaling · B (m ⊙ A x)`` with ``m`` a dropout keep-mask on the rank-r bottleneck.

    Args:
        x: ``(..., in)``; weight ``(out, in)``; bias ``(out,)`` or None; lora_A ``(r, in)``; lora_B ``(out, r)``.
        dropout: probability of zeroing a bottleneck unit in training (kept units scaled by ``1 / (1 - p)``).
        dequantize: for a quantized base (``weight=None``): returns the ``(out, in)`` weight in ``x``'s dtype; it
            is called once in forward and once in backward, and its result is never kept (QLoRA keeps only the
            packed weight, as ``NF4Linear`` alone does).
        matmul: for a quantized base, optionally ``x -> x Wᵀ`` for the forward product (a fused 4-bit kernel);
            the backward still uses ``dequantize``.
        kernels: the float32 product kernels (default: torch's).

    Returns:
        ``(..., out)`` in ``x``'s dtype (all tensors must share it).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    mask = None
    if dropout and training:
        mask = torch.empty(x2.shape[0], lora_A.shape[0], dtype=x.dtype, device=x.device)
        mask.bernoulli_(1 - dropout).div_(1 - dropout)
    out = _LoraLinear.apply(x2, weight, bias, lora_A, lora_B, scaling, mask, dequantize, matmul, kernels or TORCH)
    return out.view(*shape[:-1], out.shape[-1])
