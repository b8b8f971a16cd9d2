"""NF4Linear: forward/backward against the dequantized float layer, memory of backward, bitsandbytes state dicts."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from lorakit.cpu import kernels as cpu_kernels
from lorakit.quant.nf4 import dequantize_4bit, double_dequantize, quantize_4bit
from lorakit.quant.nf4_linear import NF4Linear


def _bnb():
    return pytest.importorskip("bitsandbytes")


def _bnb_linear4bit(linear, quant_type, double_quant):
    bnb = _bnb()
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=double_quant, quant_type=quant_type)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on the first .to(device)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_matches_functional(quant_type, double_quant):
    linear = nn.Linear(96, 40)
    layer = NF4Linear.from_linear(linear, quant_type, 64, double_quant, compute_dtype=torch.float32)
    packed, absmax = quantize_4bit(linear.weight.detach(), 64, quant_type)
    expected = dequantize_4bit(packed, absmax, (40, 96), 64, quant_type)
    if double_quant:
        expected = dequantize_4bit(packed, double_dequantize(layer.weight_absmax, layer.weight_nested_absmax,
                                                             layer.nested_offset), (40, 96), 64, quant_type)
    assert torch.equal(layer.weight, packed)
    assert torch.equal(layer.dequantize(), expected)
    assert torch.equal(layer.bias, linear.bias) and not layer.bias.requires_grad


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_linear_with_dequantized_weight(compute_dtype):
    linear = nn.Linear(64, 24)
    layer = NF4Linear.from_linear(linear, compute_dtype=compute_dtype)
    x = torch.randn(3, 5, 64)
    y = layer(x)
    assert y.shape == (3, 5, 24) and y.dtype == torch.float32  # back in the input dtype
    w = layer.dequantize()
    assert w.dtype == compute_dtype and w.shape == (24, 64)
    if compute_dtype == torch.bfloat16 and cpu_kernels.available():  # fused kernel: float32 sums, no bf16 rounding
        expected = F.linear(x.to(compute_dtype).float(), w.float()) + linear.bias  # bias added in float32 too
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    else:
        expected = F.linear(x.to(compute_dtype), w).float() + linear.bias  # the product in compute_dtype
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
    full = F.linear(x, linear.weight, linear.bias)
    assert (y - full).abs().max() < 0.15 * full.abs().max()  # 4-bit weights stay close to the original


def test_input_grad_equals_float_layer_and_no_weight_grad():
    linear = nn.Linear(64, 24)
    layer = NF4Linear.from_linear(linear, compute_dtype=torch.float32)
    reference = nn.Linear(64, 24)
    reference.weight.data, reference.bias.data = layer.dequantize().clone(), linear.bias.detach().clone()
    x1 = torch.randn(4, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(4, 24)
    layer(x1).backward(g)
    reference(x2).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert [p for p in layer.parameters() if p.requires_grad] == []
    assert all(b.grad is None for b in layer.buffers())


def test_backward_saves_only_the_4bit_weight():
    layer = NF4Linear.from_linear(nn.Linear(128, 96), compute_dtype=torch.float32)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(torch.randn(2, 128, requires_grad=True))
    assert saved, "nothing saved: the hook did not see the matmul"
    big_floats = [t for t in saved if t.is_floating_point() and t.numel() >= 128 * 96]
    assert big_floats == [], [(t.dtype, tuple(t.shape)) for t in big_floats]
    assert any(t.dtype == torch.uint8 and t.numel() == 128 * 96 // 2 for t in saved)
    y.sum().backward()


def test_set_weight_requantizes_and_keeps_pending_backward_valid():
    layer = NF4Linear.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
    old_w = layer.dequantize()
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    new = torch.randn(32, 64)
    layer.set_weight_(new)
    packed, absmax = quantize_4bit(new, 64)
    assert torch.equal(layer.weight, packed)
    assert torch.allclose(layer.dequantize(), dequantize_4bit(packed, absmax, (32, 64)), rtol=0.02, atol=0.02)
    y.sum().backward()  # uses the tensors saved before set_weight_
    torch.testing.assert_close(x.grad, old_w.sum(0).expand(3, 64))
    with pytest.raises(ValueError, match="shape"):
        layer.set_weight_(torch.randn(64, 32))


def test_to_dtype_keeps_scales_float32():
    layer = NF4Linear.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
    w = layer.dequantize()
    nn.Sequential(layer).to(torch.bfloat16)
    assert layer.weight_nested_absmax.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(), w)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_equals_bitsandbytes_linear4bit(quant_type, double_quant):
    linear = nn.Linear(128, 48)
    ours = NF4Linear.from_linear(linear, quant_type, 64, double_quant, compute_dtype=torch.float32).state_dict()
    theirs = _bnb_linear4bit(linear, quant_type, double_quant).state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    info = json.loads(bytes(ours[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert info["shape"] == [48, 128] and info["blocksize"] == 64 and info["dtype"] == "float32"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_loads_bitsandbytes_state_dict_and_adopts_its_settings(quant_type):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    linear = nn.Linear(128, 48)
    theirs = _bnb_linear4bit(linear, quant_type, True)
    layer = NF4Linear(128, 48, quant_type="fp4" if quant_type == "nf4" else "nf4", blocksize=128,
                      double_quant=False, compute_dtype=torch.float32)
    layer.load_state_dict(theirs.state_dict())
    assert (layer.quant_type, layer.blocksize, layer.double_quant) == (quant_type, 64, True)
    assert torch.equal(layer.dequantize(), bnbF.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state))
    assert torch.equal(layer.bias, linear.bias)


def test_bitsandbytes_loads_our_state_dict():
    bnb = _bnb()
    bnbF = pytest.importorskip("bitsandbytes.functional")
    layer = NF4Linear.from_linear(nn.Linear(128, 48), compute_dtype=torch.float32)
    sd = layer.state_dict()
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert param.quant_state.quant_type == "nf4" and param.quant_state.nested
    assert torch.equal(bnbF.dequantize_4bit(param.data, param.quant_state), layer.dequantize())


def test_load_state_dict_roundtrip_and_float_checkpoint():
    linear = nn.Linear(64, 32, bias=False)
    layer = NF4Linear.from_linear(linear, compute_dtype=torch.float32)
    fresh = NF4Linear(64, 32, bias=False, compute_dtype=torch.float32, device="meta")
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantize(), layer.dequantize())
    from_float = NF4Linear(64, 32, bias=False, compute_dtype=torch.float32)
    from_float.load_state_dict(linear.state_dict())  # a full-precision weight is quantized on load
    assert torch.equal(from_float.weight, layer.weight)
    with pytest.raises(RuntimeError, match="shape"):
        NF4Linear(32, 64, bias=False).load_state_dict(layer.state_dict())
    with pytest.raises(RuntimeError, match="Unexpected"):
        NF4Linear(64, 32, bias=False).load_state_dict({**layer.state_dict(), "weight.extra": torch.zeros(1)})
    missing = NF4Linear(64, 32).load_state_dict({}, strict=False).missing_keys
    assert set(missing) == {"weight", "bias"}


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="quant_type"):
        NF4Linear(8, 8, quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        NF4Linear(8, 8, blocksize=100)
    with pytest.raises(ValueError, match="compute_dtype"):
        NF4Linear(8, 8, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype"):
        NF4Linear(8, 8).set_weight_(torch.zeros(8, 8, dtype=torch.float64))
