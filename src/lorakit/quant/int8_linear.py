"""``Int8Linear``: a frozen linear layer with a row-wise absmax int8 weight, bitsandbytes ``Linear8bitLt`` keys.

Quantization (LLM.int8 weight format without outlier decomposition, i.e. ``threshold=0``; Dettmers et al. 2022,
https://arxiv.org/abs/2208.07339): per output row ``r``

    ``SCB_r = max_j |W_rj|``,   ``CB_rj = round(W_rj · 127 / SCB_r)`` (int8, round half to even),
    ``W_hat_rj = CB_rj · SCB_r · (1/127)``.

As in bitsandbytes, ``W`` is rounded to float16 first, so ``SCB`` holds float16 values and the bytes match
``Linear8bitLt(has_fp16_weights=False, threshold=0.0)``. Unlike bitsandbytes' int8 matmul, the forward does not
quantize activations: it dequantizes the weight to ``compute_dtype`` and multiplies (through the device
backend's chosen kernel), so outputs equal ``x · W_hat^T`` up to floating-point rounding. Backward saves only the
int8 weight and ``SCB``.

State dict (bitsandbytes order): ``weight`` int8 ``(out, in)``, ``bias``, ``SCB`` float32 ``(out,)`` and
``weight_format`` (uint8 scalar 0 = row-major; accepted and checked on load).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from lorakit.base import frozen_product, quantized_product

__all__ = ["Int8Linear", "quantize_int8_rowwise", "dequantize_int8_rowwise"]

_INV_127 = 7.874015718698502e-3  # 1/127, the constant bitsandbytes multiplies by


def quantize_int8_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization: ``w`` ``(out, in)`` -> ``CB`` int8 ``(out, in)``, ``SCB`` float32 ``(out,)``.

    All-zero rows get ``SCB = 0`` and zero codes.

    Raises:
        ValueError: if ``w`` is not 2-D floating point, or overflows float16 (bitsandbytes' intermediate format).
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D float weight (out, in), got {w.dtype} {tuple(w.shape)}.")
    w16 = w.detach().to(torch.float16)
    if not bool(torch.isfinite(w16).all()):
        raise ValueError("weight has values beyond float16 range (|w| > 65504) or non-finite; int8 needs |w| <= 65504.")
    scb = w16.abs().amax(dim=1).float()
    scale = 127.0 / scb
    scale = scale.masked_fill(scb == 0, 0.0)  # 0 · inf would be NaN for all-zero rows
    return torch.round(w16 * scale[:, None]).to(torch.int8), scb


def dequantize_int8_rowwise(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W_hat = CB · SCB[:, None] · (1/127)`` in float32 (bitsandbytes' operation order), cast to ``dtype``."""
    return (cb * scb.view(-1, 1) * _INV_127).to(dtype)


def _int8_matmul(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """``x @ dequant(CB, SCB)ᵀ`` in ``x``'s dtype."""
    return frozen_product(x, dequantize_int8_rowwise(cb, scb, x.dtype))


class Int8Linear(nn.Module):
    """Frozen linear layer with a row-wise int8 weight: ``y = x · (CB · SCB / 127)^T + b``.

    Input is cast to ``compute_dtype`` and the output back to the input dtype; gradients flow to the input only.

    Args:
        in_features (int): input size.
        out_features (int): output size.
        bias (bool): keep a (frozen) bias. Default True.
        compute_dtype (torch.dtype): dtype of the dequantized weight and the matmul. Default ``torch.bfloat16``.
        device (torch.device | str | None): where the (zero) buffers are created; "meta" for a placeholder.

    Raises:
        ValueError: for a non-floating compute_dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
            raise ValueError(
                f"compute_dtype must be a floating torch.dtype, got {compute_dtype!r}; try torch.bfloat16."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        cb = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("weight", cb, persistent=False)
        self.register_buffer("SCB", torch.zeros(out_features, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> "Int8Linear":
        """Quantize ``linear.weight`` into a new ``Int8Linear`` on the same device; the bias is copied and frozen."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, device="meta")
        layer.set_weight_(linear.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def dequantize(self) -> torch.Tensor:
        """The weight as an ``(out_features, in_features)`` tensor in ``compute_dtype``."""
        return dequantize_int8_rowwise(self.weight, self.SCB, self.compute_dtype)

    def dequantizer(self) -> Callable[[], torch.Tensor]:
        """A function returning what :meth:`dequantize` returns now (it holds today's buffers)."""
        return functools.partial(dequantize_int8_rowwise, self.weight, self.SCB, self.compute_dtype)

    def multiplier(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function ``x -> x @ W^T`` (no bias) for ``x`` in ``compute_dtype``, over today's buffers."""
        return functools.partial(_int8_matmul, cb=self.weight, scb=self.SCB)

    @torch.no_grad()
    def set_weight_(self, w: torch.Tensor) -> None:
        """Re-quantize ``w`` ``(out_features, in_features)`` into new ``weight`` / ``SCB`` buffers.

        Raises:
            ValueError: for a wrong shape or a weight outside float16 range.
        """
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(w.shape)} does not match ({self.out_features}, {self.in_features}); "
                "pass the full (out_features, in_features) weight."
            )
        if self.weight.device.type != "meta":
            w = w.to(self.weight.device)
        self.weight, self.SCB = quantize_int8_rowwise(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features)`` -> ``(..., out_features)`` in ``x.dtype``."""
        y = quantized_product(x.to(self.compute_dtype), self.multiplier(),
                              functools.partial(dequantize_int8_rowwise, dtype=self.compute_dtype), self.weight, self.SCB)
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # SCB stays float32 under model.to(dtype) / .half(); only its device may change.
        old = self.SCB
        super()._apply(fn, recurse)
        if self.SCB.dtype != old.dtype:
            self.SCB = old.to(self.SCB.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        def out(t):
            return t if keep_vars else t.detach()

        destination[prefix + "weight"] = out(self.weight)
        if self.bias is not None:
            destination[prefix + "bias"] = out(self.bias)
        destination[prefix + "SCB"] = out(self.SCB)
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if strict:
            unexpected_keys.extend(prefix + k for k in ours if k not in ("weight", "bias", "SCB", "weight_format"))
        if self.bias is not None:
            if "bias" not in ours:
                missing_keys.append(prefix + "bias")
            elif tuple(ours["bias"].shape) != (self.out_features,):
                error_msgs.append(f"{prefix}bias: shape {tuple(ours['bias'].shape)} != ({self.out_features},)")
            else:
                device = self.bias.device if self.bias.device.type != "meta" else ours["bias"].device
                bias = ours["bias"].detach().to(device, copy=True)
                self.bias = nn.Parameter(bias, requires_grad=self.bias.requires_grad)
        elif "bias" in ours and strict:
            unexpected_keys.append(prefix + "bias")
        weight = ours.get("weight")
        if weight is None:
            missing_keys.append(prefix + "weight")
            return
        if weight.is_floating_point():  # full-precision checkpoint: quantize it
            try:
                self.set_weight_(weight)
            except ValueError as e:
                error_msgs.append(f"{prefix}weight: {e}")
            return
        fmt = ours.get("weight_format", 0)
        fmt = int(fmt.item()) if isinstance(fmt, torch.Tensor) else fmt
        if fmt not in (0, "row"):
            error_msgs.append(f"{prefix}weight_format: only row-major (0) int8 weights are supported, got {fmt!r}")
        elif "SCB" not in ours:
            missing_keys.append(prefix + "SCB")
        elif weight.dtype != torch.int8 or tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(
                f"{prefix}weight: expected int8 {(self.out_features, self.in_features)}, "
                f"got {weight.dtype} {tuple(weight.shape)}"
            )
        else:
            device = self.weight.device if self.weight.device.type != "meta" else weight.device
            self.weight = weight.detach().to(device, copy=True)
            self.SCB = ours["SCB"].detach().to(device, torch.float32, copy=True)
