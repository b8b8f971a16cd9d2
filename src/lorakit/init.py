"""OLoRA and PiSSA: initialisations that take the adapter from the base weight and rewrite the base.

Both split the base weight ``W`` (out, in) into a rank-r part that becomes the adapter and a residual that becomes
the new base, so that at step 0 ``W_res + scaling · B A == W`` and the model's outputs are unchanged:

- OLoRA (https://arxiv.org/abs/2406.01775): ``Q, R = qr(W)``; ``B = Q[:, :r]``, ``A = R[:r]``.
- PiSSA (https://arxiv.org/abs/2404.02948): ``U, S, Vh = svd(W)``; with ``S' = S[:r] / scaling``,
  ``B = U[:, :r] · diag(√S')`` and ``A = diag(√S') · Vh[:r]``.

Because the base changed, an adapter trained this way only applies to the rewritten base. :func:`to_plain_lora`
turns it into one for the original base: ``ΔW = s(B A − B₀ A₀)`` is exactly a LoRA of rank 2r with
``A' = [A; A₀]``, ``B' = [B, −B₀]`` and alpha doubled (so the scaling ``2α / 2r`` is unchanged).
"""

from __future__ import annotations

import math

import torch

from .base import dense_weight, set_dense_weight
from .layer import LoraLinear

__all__ = ["init_from_base", "to_plain_lora", "decompose"]


@torch.no_grad()
def init_from_base(layer: LoraLinear, name: str, method: str) -> None:
    """Initialise adapter ``name`` of ``layer`` by OLoRA (``"olora"``) or PiSSA (``"pissa"``) and rewrite the base.

    The decomposition runs in float32; a quantized base is dequantized first and re-quantized after (so its
    outputs change by the re-quantization error, as in PEFT).

    Raises:
        ValueError: for an unknown method, or a rank larger than ``min(in, out)``.
    """
    r, scaling = layer.r[name], layer.scaling[name]
    weight = dense_weight(layer.base_layer).to(torch.float32)  # (out, in)
    A, B = decompose(weight, r, scaling, method)
    lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    lora_A.copy_(A.to(lora_A.dtype))
    lora_B.copy_(B.to(lora_B.dtype))
    layer.initial_weights[name] = (lora_A.detach().clone(), lora_B.detach().clone())
    # Subtract what the adapter contributes (in its stored dtype) so base + adapter reproduces W.
    set_dense_weight(layer.base_layer, weight - scaling * (lora_B.float() @ lora_A.float()))


def decompose(weight: torch.Tensor, r: int, scaling: float, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial ``(A, B)`` of OLoRA (``"olora"``) or PiSSA (``"pissa"``) for a float32 (out, in) ``weight``.

    Raises:
        ValueError: for an unknown method, or a rank larger than ``min(in, out)``.
    """
    if r > min(weight.shape):
        raise ValueError(f"r={r} exceeds min(out, in)={min(weight.shape)} for {method}; lower the rank")
    if method == "olora":
        q, rr = torch.linalg.qr(weight)  # q (out, k), rr (k, in)
        return rr[:r], q[:, :r]
    if method == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(s[:r] / scaling)
        return root[:, None] * vh[:r], u[:, :r] * root
    raise ValueError(f"init method {method!r} is not 'olora' or 'pissa'")


def to_plain_lora(lora_A: torch.Tensor, lora_B: torch.Tensor, init_A: torch.Tensor, init_B: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-2r pair ``([A; A₀], [B, −B₀])`` whose product is ``B A − B₀ A₀``.

    Args:
        lora_A, lora_B: trained weights, (r, in) and (out, r).
        init_A, init_B: the same adapter's weights right after OLoRA/PiSSA initialisation.

    Returns:
        ``(A', B')`` of shapes (2r, in) and (out, 2r).
    """
    return torch.cat([lora_A, init_A], dim=0), torch.cat([lora_B, -init_B], dim=1)


def doubled_alpha(alpha: float, use_rslora: bool) -> float:
    """The alpha that keeps the scaling unchanged when r doubles (``2α``, or ``√2·α`` for rsLoRA)."""
    return alpha * math.sqrt(2) if use_rslora else alpha * 2
