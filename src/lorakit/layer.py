"""`LoraLinear`: one LoRA layer that wraps any linear base (``nn.Linear``, ``Conv1D``, NF4/int8 linears).

Note: one layer for every base
    The LoRA branch never asks what the base is: it calls ``self.base_layer(x)`` and adds the low-rank update.
    Quantization lives in the base layer; merging goes through :mod:`lorakit.base` (``dense_weight`` /
    ``set_dense_weight``), so a quantized base is dequantized, updated and re-quantized by its own code. Before
    that, ``forward`` makes one call: it asks the backend of ``x``'s device for a fused path
    (:func:`lorakit.backend.lora_forward`; the CPU one fuses base and adapter into one autograd node), and runs
    the generic path when the answer is None. See Note: backends under the core.

Note: cheap dropout
    PEFT applies ``nn.Dropout`` to the layer input, drawing an (tokens, in_features) mask in every wrapped layer;
    on SmolLM2 that is 7 masks of up to 1536 features per block and costs more than the LoRA matmuls themselves.
    lorakit draws the mask on the rank-r bottleneck instead: ``B · (m ⊙ A x) / (1 - p)`` with ``m`` of shape
    (tokens, r). Its expectation is the same as PEFT's (``E[update] = B A x``), every LoRA parameter still sees
    dropped-out gradients, and the mask is ``in_features / r`` times smaller (36× for hidden 576 at r 16). In eval
    mode both are the identity, so saved adapters and inference are unaffected.

Note: exact unmerge
    Re-quantizing ``W + ΔW`` and then ``W + ΔW - ΔW`` moves a 4-bit weight twice, so an unmerge alone cannot give
    the base back. A quantized base's ``set_weight_`` swaps in new buffers instead of writing into the old ones, so
    the first merge keeps references to the packed weight it replaced (no copy) and the unmerge of every merged
    adapter puts them back bit for bit. A 16-bit dense base would need a full copy; there the merge records how far
    a later unmerge will leave the weights off, and the unmerge warns with that figure.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import backend
from .base import QuantizedBase, base_shape, dense_weight, is_quantized, set_dense_weight

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
        fused = backend.lora_forward(self, x)  # the device's fused path, or None
        if fused is not None:
            return fused
        result = self.base_layer(x)
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            xa = down_projection(x, self.lora_A[name].weight)  # See Note: float32 adapters on a low-precision base
            p = self.lora_dropout[name]
            if p and self.training:
                xa = F.dropout(xa, p, training=True)  # See Note: cheap dropout
            result = _add_low_rank(result, xa, self.lora_B[name].weight, self.scaling[name])
        return result

    def fusable_adapter(self, x: torch.Tensor) -> str | None:
        """The adapter a backend may fuse with the base for input ``x``: the one active adapter when it is unmerged,
        its weights have ``x``'s dtype, the layer is enabled and autocast is off; else None. Backends check the
        base themselves."""
        if self.disabled or len(self.active_adapters) != 1:
            return None
        if torch.is_autocast_enabled(x.device.type):  # autocast picks per-op dtypes; the generic path follows them
            return None
        name = self.active_adapters[0]
        if name in self.merged_adapters or self.lora_A[name].weight.dtype != x.dtype:
            return None
        return name

    # --- merge

    def _unmerged_active(self, names: list[str] | None) -> list[str]:
        names = self.active_adapters if names is None else names
        return [n for n in names if n in self.lora_A and n not in self.merged_adapters]

    def check_merge(self, adapter_names: list[str] | None = None, whole_weight: bool = False) -> None:
        """Refuse a merge that would write non-finite weights, before anything is changed.

        Always checks the named (default: active, unmerged) adapters' A, B and scaling (cheap); with
        ``whole_weight`` also the merged weight itself, in the range of the dtype it is stored in (a float16 base
        overflows at 65504).

        Raises:
            ValueError: naming the adapter and what is not finite.
        """
        names = self._unmerged_active(adapter_names)
        for name in names:
            for part, tensor in (("lora_A", self.lora_A[name].weight), ("lora_B", self.lora_B[name].weight)):
                if not torch.isfinite(tensor).all():
                    raise ValueError(f"adapter {name!r} has non-finite (NaN/inf) values in {part}; merging it would "
                                     "destroy the base weights, which were left unchanged (load an earlier checkpoint)")
            if not math.isfinite(self.scaling[name]):
                raise ValueError(f"adapter {name!r} has scaling {self.scaling[name]!r}; the base was left unchanged")
        if whole_weight and names:
            merged = self._merged_weight(names)
            stored = torch.float32 if is_quantized(self.base_layer) else dense_weight(self.base_layer).dtype
            limit = torch.finfo(stored).max if stored.is_floating_point else float("inf")
            if not torch.isfinite(merged).all() or merged.abs().max().item() > limit:
                raise ValueError(f"merging adapters {names} gives non-finite {str(stored).removeprefix('torch.')} "
                                 "weights; the base was left unchanged")

    def _merged_weight(self, names: list[str]) -> torch.Tensor:
        """The base weight plus the named adapters' updates, as a new float32 tensor."""
        weight = dense_weight(self.base_layer)
        merged = weight.to(torch.float32) if weight.dtype != torch.float32 else weight.clone()
        for name in names:
            merged.addmm_(self.lora_B[name].weight.float(), self.lora_A[name].weight.float(), alpha=self.scaling[name])
        return merged

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> float:
        """Add ``scaling · B A`` of each named (default: active) adapter into the base weight. Idempotent.

        Adapters with NaN/inf values are always refused (see :meth:`check_merge`). While an adapter is merged,
        a backward pass that would train it raises (its A and B are not used). A quantized base keeps its
        packed weight from before the first merge, so unmerging every adapter restores it bit for bit.

        Returns:
            For a quantized base, the largest change re-quantization made to the merged weight (the merge is lossy
            there: see :func:`lorakit.merge_and_unload`); 0.0 for float bases.

        Raises:
            ValueError: for non-finite adapters, or with ``safe_merge`` a merged weight that is not finite in the
                base's dtype (the base is left unchanged).
        """
        names = self._unmerged_active(adapter_names)
        if not names:
            return 0.0
        self.check_merge(names)
        weight = dense_weight(self.base_layer)
        if weight.dtype == torch.float32 and not safe_merge and type(self.base_layer) is nn.Linear:
            for name in names:  # in place, one pass over the weight per adapter
                weight.addmm_(self.lora_B[name].weight.float(), self.lora_A[name].weight.float(),
                              alpha=self.scaling[name])
            self._merged(names)
            return 0.0
        merged = self._merged_weight(names)
        if safe_merge:
            self.check_merge(names, whole_weight=True)
        quantized = isinstance(self.base_layer, QuantizedBase)
        if quantized and not self.merged_adapters:  # See Note: exact unmerge
            attributes = {k: v for k, v in vars(self.base_layer).items() if not k.startswith("_") and k != "training"}
            self._original = (dict(self.base_layer._buffers), attributes)
        elif weight.dtype in (torch.float16, torch.bfloat16) and not is_quantized(self.base_layer):
            # what an unmerge will leave of the original
            back = (merged.to(weight.dtype).float() - (merged - weight.float())).to(weight.dtype)
            self._unmerge_drift = max(getattr(self, "_unmerge_drift", 0.0),
                                      (back.float() - weight.float()).abs().max().item())
        set_dense_weight(self.base_layer, merged)
        self._merged(names)
        if is_quantized(self.base_layer):
            return (dense_weight(self.base_layer).float() - merged).abs().max().item()
        return 0.0

    def _merged(self, names: list[str]) -> None:
        self.merged_adapters.extend(names)
        if _refuse_backward_when_merged not in self._forward_hooks.values():
            self.register_forward_hook(_refuse_backward_when_merged)

    @torch.no_grad()
    def unmerge(self, adapter_names: list[str] | str | None = None) -> float:
        """Subtract merged adapters from the base weight, newest first. Idempotent.

        Unmerging every merged adapter of a quantized base restores its packed weight exactly (See Note: exact
        unmerge); otherwise a 16-bit or quantized base cannot get its exact original weights back.

        Returns:
            The largest difference left between the base weights and their originals (0.0 when exact).
        """
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        names = [n for n in reversed(self.merged_adapters) if adapter_names is None or n in adapter_names]
        if not names:
            return 0.0
        original = getattr(self, "_original", None)
        if original is not None and len(names) == len(self.merged_adapters):
            buffers, attributes = original
            self.base_layer.__dict__.update(attributes)
            for key, saved in buffers.items():  # follow a .to(device) made while merged
                now = self.base_layer._buffers.get(key)
                moved = saved is not None and now is not None and saved.device != now.device
                self.base_layer._buffers[key] = saved.to(now.device) if moved else saved
            self._original = None
            self._all_unmerged()
            return 0.0
        weight = dense_weight(self.base_layer)
        in_place = weight.dtype == torch.float32 and type(self.base_layer) is nn.Linear
        weight = weight if in_place else weight.to(torch.float32)
        for name in names:
            weight.addmm_(self.lora_B[name].weight.float(), self.lora_A[name].weight.float(), alpha=-self.scaling[name])
            self.merged_adapters.remove(name)
        error = 0.0
        if not in_place:
            set_dense_weight(self.base_layer, weight)
            if is_quantized(self.base_layer):  # bitsandbytes layers keep no original: re-quantization error
                error = (dense_weight(self.base_layer).float() - weight).abs().max().item()
            else:
                error = getattr(self, "_unmerge_drift", 0.0)
        if not self.merged_adapters:
            self._all_unmerged()
        return error

    def _all_unmerged(self) -> None:
        self.merged_adapters.clear()
        self._unmerge_drift = 0.0
        for key in [k for k, hook in self._forward_hooks.items() if hook is _refuse_backward_when_merged]:
            del self._forward_hooks[key]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.lora_A)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=({ranks})"


def _refuse_backward_when_merged(module: LoraLinear, args, output):
    """Forward hook while adapters are merged: a backward pass through this output would leave trainable merged
    adapters without gradients (their A and B are not used), so it raises instead of training nothing."""
    if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
        return None
    trainable = [n for n in module.merged_adapters
                 if module.lora_A[n].weight.requires_grad or module.lora_B[n].weight.requires_grad]
    if not trainable:
        return None
    return _MergedGuard.apply(output, module.lora_A[trainable[0]].weight, tuple(trainable))


class _MergedGuard(torch.autograd.Function):
    """Identity in forward, tied to a merged adapter's weight so that backward reaches it and raises."""

    @staticmethod
    def forward(ctx, output, weight, names):  # noqa: D102
        ctx.names = names
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        raise RuntimeError(f"adapter(s) {list(ctx.names)} are merged into the base weights, so backward cannot train "
                           "them; call lorakit.unmerge_adapter(model) before training")


def _add_low_rank(result: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``result + scaling · xa @ Bᵀ`` in one fused ``addmm`` when dtypes agree (no separate scale or add pass)."""
    if result.dtype != B.dtype:
        if not torch.is_grad_enabled():  # inference: add into the base output, no temporaries of its size
            return result.add_(F.linear(xa, B), alpha=scaling)
        return result + (F.linear(xa, B) * scaling).to(result.dtype)
    shape = result.shape
    out = torch.addmm(result.reshape(-1, shape[-1]), xa.reshape(-1, xa.shape[-1]), B.t(), alpha=scaling)
    return out.view(shape)  # (..., out)


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
