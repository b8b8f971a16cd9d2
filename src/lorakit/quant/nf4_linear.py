"""``NF4Linear``: a frozen linear layer whose weight lives in 4 bits, with a bitsandbytes-compatible state dict.

``y = x · dequant(W_4bit)^T + b`` (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314). The weight
is dequantized on the fly in every forward and backward; only the packed bytes and block scales are kept and
saved for backward (the trick of torchao's ``linear_nf4``), so activations memory never holds a float weight.

Note: bitsandbytes state-dict keys
    bitsandbytes' ``Linear4bit`` (and transformers' 4-bit models) write, per layer with prefix ``p``:
    ``p.weight`` (uint8 ``((n + 1) // 2, 1)``), ``p.bias``, ``p.weight.absmax``, ``p.weight.quant_map`` (16 codes),
    with double quantization ``p.weight.nested_absmax`` and ``p.weight.nested_quant_map`` (256 codes), and
    ``p.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): UTF-8 JSON as a uint8 tensor, e.g.
    ``{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [out, in], "nested_blocksize": 256,
    "nested_dtype": "float32", "nested_offset": 0.0123}``. A buffer name cannot contain ".", so the module keeps
    ``weight``, ``weight_absmax`` and ``weight_nested_absmax`` as non-persistent buffers and writes / reads the
    bitsandbytes keys itself in ``_save_to_state_dict`` / ``_load_from_state_dict``. The code maps are constants
    and are emitted on save, checked on load.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lorakit import backend
from lorakit.base import frozen_product, quantized_product
from lorakit.quant.dynamic8 import dynamic_map
from lorakit.quant.nf4 import BLOCKSIZES, code_4bit, dequantize_4bit, double_dequantize, double_quantize, quantize_4bit

__all__ = ["NF4Linear"]

_QS_KEY = "weight.quant_state.bitsandbytes__"
_NESTED_BLOCKSIZE = 256


@dataclass(frozen=True)
class _Spec:
    """Everything besides tensors that dequantization needs."""

    shape: tuple[int, int]
    blocksize: int
    quant_type: str
    offset: float | None  # None: scales are not double-quantized
    dtype: torch.dtype


@functools.lru_cache(maxsize=4)
def _code(quant_type: str) -> torch.Tensor:
    return code_4bit(quant_type)  # read-only: shared by every call of the native kernels


def _dequant(packed: torch.Tensor, absmax: torch.Tensor, nested: torch.Tensor | None, spec: _Spec) -> torch.Tensor:
    fast = backend.dequantize_4bit(packed, absmax, nested, spec.offset, torch.Size(spec.shape), spec.blocksize,
                                   _code(spec.quant_type), spec.dtype)  # a native kernel: the same bits, one pass
    if fast is not None:
        return fast
    if spec.offset is not None:
        absmax = double_dequantize(absmax, nested, spec.offset)
    return dequantize_4bit(packed, absmax, spec.shape, spec.blocksize, spec.quant_type, spec.dtype)


def _matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested: torch.Tensor | None,
            spec: _Spec, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ dequant(W)ᵀ`` for ``x`` ``(..., in)`` in ``spec.dtype``, returned in ``out_dtype`` (default
    ``spec.dtype``). The device's backend may take it with a fused kernel (the CPU one: bfloat16 with AVX512-BF16,
    no dequantized weight written, and a float32 ``out_dtype`` gets the float32 sums without a bfloat16 rounding
    between). Otherwise it dequantizes, multiplies and casts."""
    out_dtype = out_dtype or spec.dtype
    x2 = x.reshape(-1, x.shape[-1])
    if spec.dtype == torch.bfloat16:
        y = backend.matmul_4bit(x2, packed, absmax, nested, spec.offset, spec.shape, spec.blocksize,
                                _code(spec.quant_type), out_dtype)
        if y is not None:
            return y.view(*x.shape[:-1], spec.shape[0])
    return frozen_product(x, _dequant(packed, absmax, nested, spec)).to(out_dtype)


class NF4Linear(nn.Module):
    """Frozen linear layer with a blockwise 4-bit (NF4 or FP4) weight: ``y = x · dequant(W)^T + b``.

    The input is cast to ``compute_dtype``, the weight is dequantized to ``compute_dtype``, and the output is cast
    back to the input dtype. Gradients flow to the input only (the weight is frozen; a bias with
    ``requires_grad=True`` is trained as usual). ``state_dict()`` uses bitsandbytes' keys, so checkpoints load
    both ways with ``bitsandbytes.nn.Linear4bit`` and transformers 4-bit models
    (see Note: bitsandbytes state-dict keys). Loading a float ``weight`` of shape ``(out, in)`` quantizes it.

    Args:
        in_features (int): input size.
        out_features (int): output size.
        bias (bool): whether to keep a (frozen) bias. Default True.
        quant_type (str): ``"nf4"`` or ``"fp4"``. Default ``"nf4"``.
        blocksize (int): elements per scale, one of ``nf4.BLOCKSIZES``. Default 64.
        double_quant (bool): 8-bit quantize the block scales (QLoRA double quantization). Default True.
        compute_dtype (torch.dtype): dtype of the dequantized weight and the matmul. Default ``torch.bfloat16``.
        device (torch.device | str | None): where the (zero) buffers are created; "meta" for a placeholder.

    Raises:
        ValueError: for an unsupported quant_type, blocksize or compute_dtype.

    Example:
        >>> layer = NF4Linear.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
        >>> layer(torch.randn(4, 64)).shape
        torch.Size([4, 32])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}; QLoRA uses 64.")
        if not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
            raise ValueError(
                f"compute_dtype must be a floating torch.dtype, got {compute_dtype!r}; try torch.bfloat16."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = torch.float32  # dtype of the tensor that was quantized ("dtype" in bnb's JSON)
        self.nested_offset = 0.0  # mean of the block scales, subtracted before 8-bit quantization
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device), persistent=False)
        absmax_dtype = torch.uint8 if double_quant else torch.float32
        absmax = torch.zeros(n_blocks, dtype=absmax_dtype, device=device)
        self.register_buffer("weight_absmax", absmax, persistent=False)
        nested = torch.zeros(-(-n_blocks // _NESTED_BLOCKSIZE), device=device) if double_quant else None
        self.register_buffer("weight_nested_absmax", nested, persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> "NF4Linear":
        """Quantize ``linear.weight`` (any float dtype) into a new ``NF4Linear`` on the same device.

        The bias is copied and frozen; ``linear`` is left untouched (drop it to free its weight).
        """
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            quant_type, blocksize, double_quant, compute_dtype, device="meta",
        )  # fmt: skip
        layer.set_weight_(linear.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    # --- weight access (used by LoRA merge / PiSSA / OLoRA)

    def _spec(self, dtype: torch.dtype) -> _Spec:
        offset = self.nested_offset if self.double_quant else None
        return _Spec((self.out_features, self.in_features), self.blocksize, self.quant_type, offset, dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight as an ``(out_features, in_features)`` tensor in ``compute_dtype`` (a fresh tensor)."""
        return self.dequantizer()()

    def dequantizer(self) -> Callable[[], torch.Tensor]:
        """A function returning what :meth:`dequantize` returns now: it holds today's packed weight and scales,
        so a later ``set_weight_`` (which swaps in new buffers) does not change it (the fused LoRA node calls it
        again in backward)."""
        return functools.partial(_dequant, self.weight, self.weight_absmax, self.weight_nested_absmax,
                                 self._spec(self.compute_dtype))

    def multiplier(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function ``x -> x @ W^T`` (no bias) for ``x`` in ``compute_dtype``, over today's buffers like
        :meth:`dequantizer`; on a CPU with AVX512-BF16 and bfloat16 compute it never writes the whole weight."""
        return functools.partial(_matmul, packed=self.weight, absmax=self.weight_absmax,
                                 nested=self.weight_nested_absmax, spec=self._spec(self.compute_dtype))

    @torch.no_grad()
    def set_weight_(self, w: torch.Tensor) -> None:
        """Re-quantize ``w`` ``(out_features, in_features)`` into this layer (new scales, same settings).

        New buffers replace the old ones, so tensors saved by an earlier forward stay valid.

        Raises:
            ValueError: if ``w`` has the wrong shape or is not 16/32-bit float.
        """
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(w.shape)} does not match ({self.out_features}, {self.in_features}); "
                "pass the full (out_features, in_features) weight."
            )
        if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"weight dtype must be float32/bfloat16/float16, got {w.dtype}; cast it first.")
        if self.weight.device.type != "meta":
            w = w.to(self.weight.device)
        packed, absmax = quantize_4bit(w.detach(), self.blocksize, self.quant_type)
        nested = None
        if self.double_quant:
            absmax, nested, self.nested_offset = double_quantize(absmax)
        self.weight, self.weight_absmax, self.weight_nested_absmax = packed, absmax, nested
        self.weight_dtype = w.dtype

    # --- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features)`` -> ``(..., out_features)`` in ``x.dtype``."""
        spec = self._spec(self.compute_dtype)
        xc = x.to(self.compute_dtype)
        out_dtype = torch.float32 if x.dtype == torch.float32 else self.compute_dtype  # See _matmul: no extra rounding
        multiply = functools.partial(_matmul, packed=self.weight, absmax=self.weight_absmax,
                                     nested=self.weight_nested_absmax, spec=spec, out_dtype=out_dtype)
        y = quantized_product(xc, multiply, functools.partial(_dequant, spec=spec), self.weight, self.weight_absmax,
                              self.weight_nested_absmax)  # keeps only the 4-bit buffers for backward
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Keep the float32 scales float32 under model.to(dtype) / .half(): only their device may change.
        # (bitsandbytes keeps them in a QuantState that .to(dtype) never sees.)
        names = ("weight_absmax", "weight_nested_absmax")
        scales = {k: self._buffers[k] for k in names if self._buffers[k] is not None}
        super()._apply(fn, recurse)
        for name, old in scales.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # --- state dict (see Note: bitsandbytes state-dict keys)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        def out(t):
            return t if keep_vars else t.detach()

        device = self.weight.device
        destination[prefix + "weight"] = out(self.weight)
        if self.bias is not None:
            destination[prefix + "bias"] = out(self.bias)
        destination[prefix + "weight.absmax"] = out(self.weight_absmax)
        destination[prefix + "weight.quant_map"] = code_4bit(self.quant_type).to(device)
        info = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.weight_dtype).removeprefix("torch."),
            "shape": [self.out_features, self.in_features],
        }
        if self.double_quant:
            destination[prefix + "weight.nested_absmax"] = out(self.weight_nested_absmax)
            destination[prefix + "weight.nested_quant_map"] = dynamic_map(signed=True).to(device)
            info.update(nested_blocksize=_NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.nested_offset)
        blob = json.dumps(info).encode("utf-8")
        destination[prefix + _QS_KEY + self.quant_type] = torch.tensor(list(blob), dtype=torch.uint8)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        known = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                 "weight.nested_quant_map"}
        qs_names = [k for k in ours if k.startswith(_QS_KEY)]
        if strict:
            unexpected_keys.extend(prefix + k for k in ours if k not in known and k not in qs_names)
        if self.bias is not None and "bias" in ours:
            self._load_bias(ours["bias"], prefix, error_msgs)
        elif self.bias is not None:
            missing_keys.append(prefix + "bias")
        elif "bias" in ours and strict:
            unexpected_keys.append(prefix + "bias")
        weight = ours.get("weight")
        if weight is None:
            missing_keys.append(prefix + "weight")
        elif qs_names or not weight.is_floating_point():  # packed bytes (any quant_storage dtype)
            try:
                self._load_packed(ours, qs_names)
            except (KeyError, ValueError) as e:
                error_msgs.append(f"{prefix}weight: cannot load a bitsandbytes 4-bit state: {e}")
        else:  # a full-precision (out, in) weight: quantize it with our settings
            try:
                self.set_weight_(weight)
            except ValueError as e:
                error_msgs.append(f"{prefix}weight: {e}")

    def _load_bias(self, bias: torch.Tensor, prefix: str, error_msgs: list) -> None:
        if tuple(bias.shape) != (self.out_features,):
            error_msgs.append(f"{prefix}bias: shape {tuple(bias.shape)} != ({self.out_features},)")
            return
        device = self.bias.device if self.bias.device.type != "meta" else bias.device
        self.bias = nn.Parameter(bias.detach().to(device, copy=True), requires_grad=self.bias.requires_grad)

    def _load_packed(self, ours: dict, qs_names: list) -> None:
        """Adopt a bitsandbytes 4-bit state (its quant_type / blocksize / double quant win over ours)."""
        if len(qs_names) != 1:
            raise ValueError(f"expected one '{_QS_KEY}nf4|fp4' entry, found {qs_names}")
        info = json.loads(bytes(ours[qs_names[0]].tolist()).decode("utf-8"))
        quant_type, blocksize, shape = info["quant_type"], int(info["blocksize"]), tuple(info["shape"])
        if shape != (self.out_features, self.in_features):
            raise ValueError(f"checkpoint shape {shape} != ({self.out_features}, {self.in_features})")
        if quant_type not in ("nf4", "fp4") or blocksize not in BLOCKSIZES:
            raise ValueError(f"unsupported quant_type={quant_type!r} / blocksize={blocksize}")
        if not torch.equal(ours["weight.quant_map"].cpu().float(), code_4bit(quant_type)):
            raise ValueError(f"weight.quant_map is not the standard {quant_type} code; custom codes are unsupported")
        nested = "nested_offset" in info
        if nested:
            if int(info["nested_blocksize"]) != _NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize {info['nested_blocksize']} unsupported; bitsandbytes uses 256")
            if not torch.equal(ours["weight.nested_quant_map"].cpu().float(), dynamic_map(signed=True)):
                raise ValueError("weight.nested_quant_map is not the signed dynamic map")
        device = self.weight.device if self.weight.device.type != "meta" else ours["weight"].device
        n = self.out_features * self.in_features
        packed = ours["weight"].detach().reshape(-1).view(torch.uint8).reshape(-1, 1).to(device, copy=True)
        absmax = ours["weight.absmax"].detach().to(device, copy=True)
        if packed.numel() != (n + 1) // 2 or absmax.numel() != -(-n // blocksize):
            raise ValueError(f"weight has {packed.numel()} bytes / absmax {absmax.numel()} entries for shape {shape}")
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, nested
        self.weight_dtype = getattr(torch, info["dtype"])
        self.weight, self.weight_absmax = packed, absmax if nested else absmax.float()
        nested_absmax = ours["weight.nested_absmax"].detach().to(device, torch.float32, copy=True) if nested else None
        self.weight_nested_absmax = nested_absmax
        self.nested_offset = float(info["nested_offset"]) if nested else 0.0
