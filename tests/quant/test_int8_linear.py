"""Int8Linear: row-wise absmax int8 weights, bitsandbytes Linear8bitLt state dicts, forward/backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from lorakit.quant.int8_linear import Int8Linear, dequantize_int8_rowwise, quantize_int8_rowwise


def _bnb_linear8bit(linear):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


def test_quantize_by_hand():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]])
    cb, scb = quantize_int8_rowwise(w)
    assert scb.tolist() == [1.0, 0.0, 3.0]
    assert cb.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, -32]]  # 63.5 -> 64 and 31.75 -> 32
    torch.testing.assert_close(dequantize_int8_rowwise(cb, scb), w, rtol=0, atol=3.0 / 127)


def test_state_dict_equals_bitsandbytes():
    linear = nn.Linear(48, 20)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row
    ours = Int8Linear.from_linear(linear, compute_dtype=torch.float32).state_dict()
    theirs = _bnb_linear8bit(linear).state_dict()
    assert list(ours) == list(theirs) == ["weight", "bias", "SCB", "weight_format"]
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def test_dequantize_equals_bitsandbytes():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    layer = Int8Linear.from_linear(nn.Linear(48, 20), compute_dtype=torch.float32)
    assert torch.equal(layer.dequantize(), bnbF.int8_vectorwise_dequant(layer.weight, layer.SCB))


def test_state_dict_loads_both_ways():
    linear = nn.Linear(48, 20)
    theirs = _bnb_linear8bit(linear)
    ours = Int8Linear(48, 20, compute_dtype=torch.float32, device="meta")
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.weight, theirs.weight.data) and torch.equal(ours.SCB, theirs.weight.SCB)
    other = _bnb_linear8bit(nn.Linear(48, 20))
    other.load_state_dict(Int8Linear.from_linear(linear).state_dict())
    assert torch.equal(other.weight.data, theirs.weight.data) and torch.equal(other.weight.SCB, theirs.weight.SCB)
    with pytest.raises(RuntimeError, match="weight_format"):
        ours.load_state_dict({**ours.state_dict(), "weight_format": torch.tensor(1, dtype=torch.uint8)})


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_grad(compute_dtype):
    linear = nn.Linear(48, 20)
    layer = Int8Linear.from_linear(linear, compute_dtype=compute_dtype)
    x = torch.randn(2, 3, 48, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 20)
    w = layer.dequantize()
    # float32 products go through the CPU backend's chosen kernel: same arithmetic, another summation order
    tol = dict(rtol=1e-5, atol=1e-6) if compute_dtype == torch.float32 else dict(rtol=0, atol=0)
    torch.testing.assert_close(y, (F.linear(x.detach().to(compute_dtype), w) + linear.bias.to(compute_dtype)).float(),
                               **tol)
    g = torch.randn(2, 3, 20)
    y.backward(g)
    torch.testing.assert_close(x.grad, (g.to(compute_dtype) @ w).float(), **tol)
    assert [p for p in layer.parameters() if p.requires_grad] == []


def test_backward_saves_only_int8_weight():
    layer = Int8Linear.from_linear(nn.Linear(64, 48), compute_dtype=torch.float32)
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(2, 64, requires_grad=True)).sum().backward()
    assert any(t.dtype == torch.int8 for t in saved)
    assert [t for t in saved if t.is_floating_point() and t.numel() >= 64 * 48] == []


def test_set_weight_and_errors():
    layer = Int8Linear(16, 8)
    w = torch.randn(8, 16)
    layer.set_weight_(w)
    cb, scb = quantize_int8_rowwise(w)
    assert torch.equal(layer.weight, cb) and torch.equal(layer.SCB, scb)
    with pytest.raises(ValueError, match="shape"):
        layer.set_weight_(torch.randn(16, 8))
    with pytest.raises(ValueError, match="float16"):
        layer.set_weight_(torch.full((8, 16), 1e6))
    with pytest.raises(ValueError, match="compute_dtype"):
        Int8Linear(4, 4, compute_dtype=torch.int32)
