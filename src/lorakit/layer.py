"""`LoraLinear`: one LoRA layer that wraps any linear base (``nn.Linear``, ``Conv1D``, NF4/int8 linears).

Note: one layer for every base
    The LoRA branch never asks what the base is: it calls ``self.base_layer(x)`` and adds the low-rank update.
    Quantization lives in the base layer; merging goes through :mod:`lorakit.base` (``dense_weight`` /
    ``set_dense_weight``), so a quantized base is dequantized, updated and re-quantized by its own code.

Note: cheap dropout
    PEFT applies ``nn.Dropout`` to the layer input, drawing an (tokens, in_features) mask in every wrapped layer;
    on SmolLM2 that is 7 masks of up to 1536 features per block and costs more than the LoRA matmuls themselves.
    lorakit draws the mask on the rank-r bottleneck instead: ``B · (m ⊙ A x) / (1 - p)`` with ``m`` of shape
    (tokens, r). Its expectation is the same as PEFT's (``E[update] = B A x``), every LoRA parameter still sees
    dropped-out gradients, and the mask is ``in_features / r`` times smaller (36× for hidden 576 at r 16). In eval
    mode both are the identity, so saved adapters and inference are unaffected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantizedBase, base_shape, dense_weight, set_dense_weight
from .fused import down_projection, lora_linear

__all__ = ["LoraLinear"]


class LoraLinear(nn.Module):
    """A frozen base layer plus named low-rank updates: ``h = base(x) + Σ_active scaling · B A dropout(x)``.

    Paper: https://arxiv.org/abs/2106.09685. ``lora_A[name]`` is an ``nn.Linear(in, r)`` (weight (r, in)),
    ``lora_B[name]`` an ``nn.Linear(r, out)`` (weight (out, r)), as PEFT names them, so parameter paths are the
    on-disk keys with the adapter name inserted.

    Args:
        base_layer: the module being adapted; it is kept untouched as ``self.base_layer``.

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # OLoRA/PiSSA adapters remember their initial (A, B) so saving can convert them for the original base.
        self.initial_weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- adapters

    def add(self, name: str, r: int, lora_alpha: float, scaling: float, lora_dropout: float = 0.0,
            init: bool | str = True, dtype: torch.dtype | None = None) -> None:
        """Create adapter ``name`` with rank ``r`` (A Kaiming-uniform or Gaussian, B zero).

        Raises:
            ValueError: for a duplicate name, a non-positive rank or a dropout outside [0, 1).
        """
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists in this layer; delete it first or pick another name")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r={r!r} must be a positive integer")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={lora_dropout!r} must be in [0, 1)")
        device = next((t.device for t in self.base_layer.parameters()), None)
        if device is None or device.type == "meta":
            device = next((t.device for t in self.base_layer.buffers()), torch.device("cpu"))
        dtype = dtype or torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, lora_alpha, scaling
        self.lora_dropout[name] = float(lora_dropout)
        self.reset_parameters(name, init)

    @torch.no_grad()
    def reset_parameters(self, name: str, init: bool | str = True) -> None:
        """Initialise adapter ``name``: ``True`` Kaiming-uniform(a=√5) A, ``"gaussian"`` A ~ N(0, 1/r); B = 0.

        ``False`` also draws B at random (an adapter that changes outputs from step 0; for tests).
        OLoRA/PiSSA initialise from the base weight and live in :mod:`lorakit.init`.
        """
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if init == "gaussian":
            nn.init.normal_(A, std=1 / self.r[name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init is False:
            nn.init.normal_(B, std=0.02)
        else:
            nn.init.zeros_(B)

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging it first if it is merged)."""
        if name in self.merged_adapters:
            self.unmerge(name)
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout, self.initial_weights):
            table.pop(name, None)
        del self.lora_A[name], self.lora_B[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # --- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fused_adapter(x)
        if fast is not None:  # See Note: fused dense LoRA (lorakit.fused)
            A, B = self.lora_A[fast].weight, self.lora_B[fast].weight
            base = self.base_layer
            if type(base) is nn.Linear:
                return lora_linear(x, base.weight, base.bias, A, B, self.scaling[fast], self.lora_dropout[fast],
                                   self.training)
            bias = None if base.bias is None else base.bias.to(x.dtype)
            matmul = base.multiplier() if callable(getattr(base, "multiplier", None)) else None
            return lora_linear(x, None, bias, A, B, self.scaling[fast], self.lora_dropout[fast], self.training,
                               dequantize=base.dequantizer(), matmul=matmul)
        result = self.base_layer(x)
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            A = self.lora_A[name].weight
            B = self.lora_B[name].weight
            xa = down_projection(x, A)  # (..., r) in A's dtype; See Note: float32 adapters on a low-precision base
            p = self.lora_dropout[name]
            if p and self.training:
                xa = F.dropout(xa, p, training=True)  # See Note: cheap dropout
            result = _add_low_rank(result, xa, B, self.scaling[name])
        return result

    def _fused_adapter(self, x: torch.Tensor) -> str | None:
        """The one unmerged active adapter when the base is a plain ``nn.Linear`` of ``x``'s dtype, or a quantized
        base computing in ``x``'s dtype, else None."""
        if self.disabled or len(self.active_adapters) != 1:
            return None
        if torch.is_autocast_enabled(x.device.type):  # autocast picks per-op dtypes; the generic path follows them
            return None
        name = self.active_adapters[0]
        if name in self.merged_adapters or self.lora_A[name].weight.dtype != x.dtype:
            return None
        base = self.base_layer
        if type(base) is nn.Linear:
            return name if base.weight.dtype == x.dtype else None
        if callable(getattr(base, "dequantizer", None)) and getattr(base, "compute_dtype", None) == x.dtype:
            return name
        return None

    # --- merge

    def _unmerged_active(self, names: list[str] | None) -> list[str]:
        names = self.active_adapters if names is None else names
        return [n for n in names if n in self.lora_A and n not in self.merged_adapters]

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> float:
        """Add ``scaling · B A`` of each named (default: active) adapter into the base weight. Idempotent.

        Returns:
            For a quantized base, the largest change re-quantization made to the merged weight (the merge is lossy
            there: see :func:`lorakit.merge_and_unload`); 0.0 for float bases.

        Raises:
            ValueError: with ``safe_merge``, if the merged weight has NaN/Inf (the base is left unchanged).
        """
        names = self._unmerged_active(adapter_names)
        if not names:
            return 0.0
        weight = dense_weight(self.base_layer)
        if weight.dtype == torch.float32 and not safe_merge and type(self.base_layer) is nn.Linear:
            for name in names:  # in place, one pass over the weight per adapter
                weight.addmm_(self.lora_B[name].weight.float(), self.lora_A[name].weight.float(),
                              alpha=self.scaling[name])
            self.merged_adapters.extend(names)
            return 0.0
        merged = weight.to(torch.float32) if weight.dtype != torch.float32 else weight.clone()
        for name in names:
            merged.addmm_(self.lora_B[name].weight.float(), self.lora_A[name].weight.float(), alpha=self.scaling[name])
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"merging adapters {names} gives non-finite weights; the base was left unchanged")
        set_dense_weight(self.base_layer, merged)
        self.merged_adapters.extend(names)
        if isinstance(self.base_layer, QuantizedBase):
            return (dense_weight(self.base_layer).float() - merged).abs().max().item()
        return 0.0

    @torch.no_grad()
    def unmerge(self, adapter_names: list[str] | str | None = None) -> None:
        """Subtract merged adapters from the base weight, newest first. Idempotent."""
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        names = [n for n in reversed(self.merged_adapters) if adapter_names is None or n in adapter_names]
        if not names:
            return
        weight = dense_weight(self.base_layer)
        in_place = weight.dtype == torch.float32 and type(self.base_layer) is nn.Linear
        weight = weight if in_place else weight.to(torch.float32)
        for name in names:
            weight.addmm_(self.lora_B[name].weight.float(), self.lora_A[name].weight.float(), alpha=-self.scaling[name])
            self.merged_adapters.remove(name)
        if in_place:
            return
        set_dense_weight(self.base_layer, weight)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.lora_A)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=({ranks})"


def _add_low_rank(result: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``result + scaling · xa @ Bᵀ`` in one fused ``addmm`` when dtypes agree (no separate scale or add pass)."""
    if result.dtype != B.dtype:
        if not torch.is_grad_enabled():  # inference: add into the base output, no temporaries of its size
            return result.add_(F.linear(xa, B), alpha=scaling)
        return result + (F.linear(xa, B) * scaling).to(result.dtype)
    shape = result.shape
    out = torch.addmm(result.reshape(-1, shape[-1]), xa.reshape(-1, xa.shape[-1]), B.t(), alpha=scaling)
    return out.view(shape)  # (..., out)
