"""Native 4-bit CPU kernels: bit-identical dequantization, the fused bf16 matmul against dequantize-then-multiply,
their use by NF4Linear and the fused LoRA node, and the PyTorch fallback when they cannot be built."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.cpu import CpuSettings
from lorakit.cpu import kernels as cpu_kernels
from lorakit.cpu.fused import lora_linear
from lorakit.quant.nf4 import code_4bit, dequantize_4bit, double_dequantize, double_quantize, quantize_4bit
from lorakit.quant.nf4_linear import NF4Linear

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="needs an x86-64 CPU with AVX512-BF16 and g++")


def _quantized(shape, blocksize, quant_type, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    packed, absmax = quantize_4bit(w, blocksize, quant_type)
    q, nested, offset = double_quantize(absmax)
    return packed, absmax, q, nested, offset


@needs_kernels
@pytest.mark.parametrize("shape,blocksize,quant_type", [
    ((40, 96), 64, "nf4"), ((33, 64), 32, "fp4"), ((7, 9), 64, "nf4"), ((100, 3000), 128, "nf4"),
    ((5, 4096), 4096, "fp4"), ((3, 5, 7), 256, "nf4"),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_is_bit_identical(shape, blocksize, quant_type, dtype, double_quant):
    packed, absmax, q, nested, offset = _quantized(shape, blocksize, quant_type)
    scales = double_dequantize(q, nested, offset) if double_quant else absmax
    expected = dequantize_4bit(packed, scales, shape, blocksize, quant_type, dtype)
    got = cpu_kernels.dequantize(packed, q if double_quant else absmax, nested if double_quant else None,
                                 offset if double_quant else None, torch.Size(shape), blocksize,
                                 code_4bit(quant_type), dtype)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    assert torch.equal(got.view(torch.int16) if dtype == torch.bfloat16 else got,
                       expected.view(torch.int16) if dtype == torch.bfloat16 else expected)


@needs_kernels
@pytest.mark.parametrize("m", [1, 5, 8, 9, 12, 13, 64])  # 1-8: the row-at-a-time path; more: tiles
@pytest.mark.parametrize("n,k,blocksize", [(40, 96, 32), (7, 128, 64), (64, 576, 64), (33, 256, 256)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_matmul_equals_dequantize_then_multiply(m, n, k, blocksize, double_quant):
    packed, absmax, q, nested, offset = _quantized((n, k), blocksize, "nf4", seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    w16 = dequantize_4bit(packed, double_dequantize(q, nested, offset) if double_quant else absmax, (n, k),
                          blocksize, "nf4", torch.bfloat16)
    expected = x.double() @ w16.double().t()  # exact products of the bfloat16 operands
    args = (q, nested, offset) if double_quant else (absmax, None, None)
    got = cpu_kernels.matmul_bf16(x, packed, *args, (n, k), blocksize, code_4bit("nf4"))
    assert got.dtype == torch.float32 and got.shape == (m, n)
    scale = (x.double().abs() @ w16.double().abs().t()).max()  # float32 sums: error within a few ulps of this
    assert ((got.double() - expected).abs().max() / scale) < 1e-6
    got16 = cpu_kernels.matmul_bf16(x, packed, *args, (n, k), blocksize, code_4bit("nf4"), torch.bfloat16)
    assert torch.equal(got16, got.bfloat16())  # the same sums, rounded to nearest even


@needs_kernels
@pytest.mark.parametrize("m", [6, 20])  # both paths
def test_matmul_rows_with_a_stride(m):
    packed, _, q, nested, offset = _quantized((48, 64), 64, "nf4")
    wide = torch.randn(m, 100).bfloat16()
    x = wide[:, 10:74]  # rows 100 apart
    got = cpu_kernels.matmul_bf16(x, packed, q, nested, offset, (48, 64), 64, code_4bit("nf4"))
    expected = cpu_kernels.matmul_bf16(x.contiguous(), packed, q, nested, offset, (48, 64), 64, code_4bit("nf4"))
    assert torch.equal(got, expected)


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
def test_nf4_linear_bf16_forward_and_backward_use_the_kernels(bias):
    layer = NF4Linear.from_linear(nn.Linear(128, 80, bias=bias), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 7, 128, requires_grad=True)
    w16 = dequantize_4bit(layer.weight, double_dequantize(layer.weight_absmax, layer.weight_nested_absmax,
                                                          layer.nested_offset), (80, 128), 64, "nf4", torch.bfloat16)
    expected = x.bfloat16().double() @ w16.double().t()  # float32 input: float32 sums, no bf16 rounding after
    if bias:
        expected = expected + layer.bias.double()  # added in float32 too
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(layer(x), y)  # inference takes no autograd node and gives the same values
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, (g.bfloat16() @ w16).float(), rtol=0, atol=0)


@needs_kernels
def test_lora_linear_on_a_bf16_quantized_base_matches_the_unfused_expression():
    base = NF4Linear.from_linear(nn.Linear(64, 96), compute_dtype=torch.bfloat16)
    A = (torch.randn(8, 64) * 0.1).bfloat16().requires_grad_()
    B = (torch.randn(96, 8) * 0.1).bfloat16().requires_grad_()
    x = torch.randn(2, 5, 64).bfloat16().requires_grad_()
    bias = base.bias.bfloat16()
    out = lora_linear(x, None, bias, A, B, 2.0, dequantize=base.dequantizer(), matmul=base.multiplier())
    w = base.dequantize()
    ref = F.linear(x, w, bias) + 2.0 * F.linear(F.linear(x, A), B)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    g = torch.randn_like(out)
    out.backward(g)
    grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    ref.backward(g)
    for got, t in zip(grads, (x, A, B)):
        torch.testing.assert_close(got.float(), t.grad.float(), rtol=2e-2, atol=2e-2)


def test_settings_turn_the_kernels_off():
    layer = NF4Linear.from_linear(nn.Linear(64, 32), compute_dtype=torch.bfloat16)
    lorakit.accelerate(layer, CpuSettings(native_kernels=False, keep_freed_memory=False, onednn="off"))
    x = torch.randn(4, 64)
    expected = F.linear(x.bfloat16(), layer.dequantize()).float() + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)  # exactly the PyTorch path


def test_a_failed_build_warns_and_falls_back(tmp_path):
    if not cpu_kernels._cpu_supported():
        pytest.skip("the kernels are never built on this CPU")
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    with pytest.warns(UserWarning, match="native 4-bit CPU kernels unavailable"):
        assert cpu_kernels.load(bad, tmp_path / "kernels") is None
    assert list((tmp_path / "kernels").iterdir()) == []  # nothing half-written left behind


@needs_kernels
def test_matmul_refuses_an_output_dtype_it_cannot_write():
    packed, _, q, nested, offset = _quantized((32, 64), 64, "nf4")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_kernels.matmul_bf16(torch.zeros(2, 64).bfloat16(), packed, q, nested, offset, (32, 64), 64,
                                code_4bit("nf4"), torch.float16)
