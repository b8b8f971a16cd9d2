"""`lora_linear`: a dense linear layer and its LoRA update in one autograd node (the fast path for ``nn.Linear``).

Note: fused dense LoRA
    Autograd on ``F.linear(x, W) + s·(x Aᵀ) Bᵀ`` builds five nodes and, in the backward pass, writes the input
    gradient twice (``g W`` from the base, ``g_xa A`` from the adapter) and adds them: an extra (tokens × in) tensor
    and an extra pass over it in every wrapped layer. Here the forward writes the output once (``addmm`` then an
    in-place ``addmm_`` of the low-rank term) and the backward accumulates the adapter's input gradient into the
    base's in place (``gx.addmm_(g_xa, A)``). Only ``x`` (already kept by any linear layer) and the (tokens × r)
    bottleneck are saved. Each weight gradient is one thin matmul: ``dB = s·gᵀ xa``, ``dA = g_xaᵀ x``.

    Gradients equal the unfused expression's (tested against it); this is just fewer passes over memory. On x86
    CPUs the float32 products run through oneDNN (See Note: why not torch.mm for float32 on CPU, in
    ``lorakit.cpu_matmul``); the two rank-r updates of the outputs stay ``addmm_`` in place.
    Quantized bases (QLoRA) take the same node: the weight is dequantized for the forward matmul and again for
    the backward one, and never kept.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lorakit.cpu_matmul import linear, matmul
from lorakit.grad_memory import grad_buffer

__all__ = ["lora_linear", "down_projection"]


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, mask, dequantize, matmul):
        # x: (N, in); weight: (out, in), or None and dequantize() gives it (matmul(x), if given, gives x Wᵀ);
        # lora_A: (r, in); lora_B: (out, r); mask: (N, r) scaled keep-mask or None
        if matmul is not None:
            out = matmul(x)
            if bias is not None:
                out.add_(bias)
        else:
            w = weight if dequantize is None else dequantize()
            out = linear(x, w, bias)
            del w  # a dequantized weight lives for this matmul only
        xa = linear(x, lora_A)  # (N, r)
        if mask is not None:
            xa = xa * mask
        out.addmm_(xa, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, mask)
        ctx.scaling, ctx.dequantize = scaling, dequantize
        ctx.params = (lora_A, lora_B)  # the Parameters themselves for grad_buffer (saved-tensor hooks may copy)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_A, lora_B, xa, mask = ctx.saved_tensors
        s = ctx.scaling
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
        return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout: float = 0.0, training: bool = False,
                dequantize: Callable[[], torch.Tensor] | None = None,
                matmul: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``x Wᵀ + b + scaling · B (m ⊙ A x)`` with ``m`` a dropout keep-mask on the rank-r bottleneck.

    Args:
        x: ``(..., in)``; weight ``(out, in)``; bias ``(out,)`` or None; lora_A ``(r, in)``; lora_B ``(out, r)``.
        dropout: probability of zeroing a bottleneck unit in training (kept units scaled by ``1 / (1 - p)``).
        dequantize: for a quantized base (``weight=None``): returns the ``(out, in)`` weight in ``x``'s dtype; it
            is called once in forward and once in backward, and its result is never kept (QLoRA keeps only the
            packed weight, as ``NF4Linear`` alone does).
        matmul: for a quantized base, optionally ``x -> x Wᵀ`` for the forward product (a fused 4-bit kernel);
            the backward still uses ``dequantize``.

    Returns:
        ``(..., out)`` in ``x``'s dtype (all tensors must share it).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    mask = None
    if dropout and training:
        mask = torch.empty(x2.shape[0], lora_A.shape[0], dtype=x.dtype, device=x.device)
        mask.bernoulli_(1 - dropout).div_(1 - dropout)
    out = _LoraLinear.apply(x2, weight, bias, lora_A, lora_B, scaling, mask, dequantize, matmul)
    return out.view(*shape[:-1], out.shape[-1])


class _DownProjection(torch.autograd.Function):
    """``x.to(A.dtype) @ Aᵀ`` keeping ``x`` in its own dtype for backward (the cast is redone there)."""

    @staticmethod
    def forward(ctx, x, lora_A):
        ctx.save_for_backward(x, lora_A)
        return F.linear(x.to(lora_A.dtype), lora_A)

    @staticmethod
    def backward(ctx, grad):
        x, lora_A = ctx.saved_tensors
        grad_x = (grad @ lora_A).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_A = None
        if ctx.needs_input_grad[1]:
            grad_A = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(lora_A.dtype)
        return grad_x, grad_A


def down_projection(x: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """``A x`` in ``lora_A``'s dtype, as ``F.linear(x.to(A.dtype), A)`` gives it.

    Note: float32 adapters on a low-precision base
        Autograd would keep the float32 copy of ``x`` that the cast makes (twice the bytes of a bfloat16 ``x``, in
        every adapted layer); this node keeps ``x`` itself and casts again in backward. Same values, same
        gradients; with ``recompute_cheap_activations`` the kept ``x`` is often a rebuilt norm output, so nothing
        of its size is kept at all.
    """
    if x.dtype == lora_A.dtype or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return F.linear(x.to(lora_A.dtype), lora_A)  # (autocast picks its own dtypes)
    return _DownProjection.apply(x, lora_A)
