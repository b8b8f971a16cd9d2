"""bitsandbytes' own layers as LoRA bases: the dense weight of a ``Linear4bit`` / ``Linear8bitLt``, and writing one back.

A model quantized by transformers + bitsandbytes (``BitsAndBytesConfig(load_in_4bit=True)`` or ``load_in_8bit``)
holds ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` layers. Both subclass ``nn.Linear``, but their ``weight`` is packed
(4-bit: a ``(n, 1)`` uint8 column; 8-bit: int8 rows with a separate per-row scale), so merging must go through
bitsandbytes' dequantize / quantize functions, as for lorakit's own NF4/int8 layers. On CPUs with AVX512-BF16,
``Linear4bit`` repacks its weight for its CPU kernel at the first inference call; the weight is unpacked back
(bitsandbytes' own inverse, as its ``state_dict`` does) before it is read or replaced.

Nothing here imports bitsandbytes: a module can only be a bitsandbytes layer if bitsandbytes is already imported.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["bnb_kind", "bnb_dequantize", "bnb_set_weight_"]


def bnb_kind(module: nn.Module) -> str | None:
    """``"4bit"`` or ``"8bit"`` for a bitsandbytes layer holding a quantized weight, else None."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt) and module.weight.dtype == torch.int8:
        return "8bit"
    return None


def _unpack_cpu_layout(module: nn.Module) -> None:
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        module.quant_state = weight.quant_state


def _row_scales(module: nn.Module) -> torch.Tensor:
    scales = getattr(module.weight, "SCB", None)
    return scales if scales is not None else module.state.SCB  # moved into the layer state by its first forward


def bnb_dequantize(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a bitsandbytes ``Linear4bit`` (in its original dtype) or ``Linear8bitLt`` (float32)."""
    import bitsandbytes.functional as F

    if bnb_kind(module) == "4bit":
        _unpack_cpu_layout(module)
        return F.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return F.int8_vectorwise_dequant(module.weight.data, _row_scales(module))


@torch.no_grad()
def bnb_set_weight_(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize the (out, in) ``weight`` into the layer, with its own settings (4-bit type, block size, double
    quantization, storage dtype; 8-bit row-wise scales)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    old = module.weight
    if bnb_kind(module) == "4bit":
        _unpack_cpu_layout(module)
        state = old.quant_state
        packed, new_state = F.quantize_4bit(weight.to(device=old.device, dtype=state.dtype).contiguous(),
                                            blocksize=state.blocksize, compress_statistics=old.compress_statistics,
                                            quant_type=state.quant_type, quant_storage=old.quant_storage)
        module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=new_state,
                                          blocksize=state.blocksize, compress_statistics=old.compress_statistics,
                                          quant_type=state.quant_type, quant_storage=old.quant_storage,
                                          module=module, bnb_quantized=True)
        module.quant_state = new_state
        return
    rows, scales, _ = F.int8_vectorwise_quant(weight.to(device=old.device, dtype=torch.float16).contiguous())
    old.data = rows
    old.CB, old.SCB = rows, scales
    module.state.CB, module.state.SCB = None, None
    module.init_8bit_state()  # as the layer's first forward would: the state holds the new rows and scales
