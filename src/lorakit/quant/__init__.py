"""Quantized frozen base layers for QLoRA: NF4/FP4 (4-bit) and row-wise int8, bitsandbytes-compatible."""

from lorakit.quant.convert import QUANTIZATIONS, dequantize_model_, load_quantized, quantize_model_
from lorakit.quant.dynamic8 import dequantize_blockwise, dynamic_map, quantize_blockwise
from lorakit.quant.int8_linear import Int8Linear, dequantize_int8_rowwise, quantize_int8_rowwise
from lorakit.quant.nf4 import (
    BLOCKSIZES,
    FP4_CODE,
    NF4_CODE,
    code_4bit,
    dequantize_4bit,
    double_dequantize,
    double_quantize,
    quantize_4bit,
)
from lorakit.quant.nf4_linear import NF4Linear

__all__ = [
    "BLOCKSIZES",
    "FP4_CODE",
    "NF4_CODE",
    "QUANTIZATIONS",
    "Int8Linear",
    "NF4Linear",
    "code_4bit",
    "dequantize_model_",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_int8_rowwise",
    "double_dequantize",
    "double_quantize",
    "dynamic_map",
    "load_quantized",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_int8_rowwise",
    "quantize_model_",
]
