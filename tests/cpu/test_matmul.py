"""lorakit.cpu.matmul: oneDNN float32 products equal float64 references, and the fallbacks are exactly torch's."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.cpu.matmul import TORCH, Kernels, onednn, onednn_op

ONEDNN = onednn().usable(torch.zeros(1))
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="oneDNN float32 path needs x86-64 and a oneDNN build")


def _spy():
    """oneDNN kernels whose op records the input shape of each call."""
    calls, real = [], onednn_op()
    k = Kernels(lambda *a: calls.append(tuple(a[0].shape)) or real(*a))
    k.usable(torch.zeros(1))  # the first-use check
    calls.clear()
    return k, calls


def _layouts(g):
    """(name, x, weight) with the strides the fused LoRA node passes: plain, transposed views, a row slice."""
    x = torch.randn(37, 24, generator=g)
    w = torch.randn(11, 24, generator=g)
    wide = torch.randn(37, 50, generator=g)
    return [("plain", x, w),
            ("weight transposed view", x, torch.randn(24, 11, generator=g).t()),
            ("x transposed view", torch.randn(24, 37, generator=g).t(), w),
            ("x strided rows", wide[:, 3:27], w),
            ("thin output", x, torch.randn(3, 24, generator=g))]


@pytest.mark.parametrize("kernels", ["torch", "onednn"])
@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_float64(kernels, case, with_bias):
    k = TORCH if kernels == "torch" else onednn()
    g = torch.Generator().manual_seed(case)
    name, x, w = _layouts(g)[case]
    bias = torch.randn(w.shape[0], generator=g) if with_bias else None
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    got = k.linear(x, w, bias)
    assert got.dtype == torch.float32 and got.shape == ref.shape, name
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_matmul_is_a_times_b():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(40, 16, generator=g), torch.randn(16, 33, generator=g)
    for k in (TORCH, onednn()):
        torch.testing.assert_close(k.matmul(a, b).double(), a.double() @ b.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k.matmul(a.t().contiguous().t(), b).double(), a.double() @ b.double(),
                                   rtol=1e-5, atol=1e-5)


@needs_onednn
def test_float32_cpu_goes_through_onednn():
    k, calls = _spy()
    k.linear(torch.randn(8, 4), torch.randn(5, 4))
    assert calls == [(8, 4)]


def test_torch_kernels_never_call_an_op():
    assert TORCH.name == "torch" and not TORCH.usable(torch.zeros(1))
    x, w = torch.randn(6, 4), torch.randn(3, 4)
    assert torch.equal(TORCH.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("why", ["bfloat16", "grad needed", "empty"])
def test_fallback_is_torch_exactly(why):
    calls = []
    k = Kernels(lambda *a: calls.append(1) or F.linear(a[0], a[1], a[2]))  # passes the first-use check
    k.usable(torch.zeros(1))
    calls.clear()
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    if why == "bfloat16":
        x, w = x.bfloat16(), w.bfloat16()
    elif why == "grad needed":
        x.requires_grad_()
    else:
        x = x[:0]
    got = k.linear(x, w)
    assert calls == []
    assert torch.equal(got, F.linear(x, w))
    if why == "grad needed":
        assert got.grad_fn is not None


def test_usable_only_for_float32_cpu():
    if not ONEDNN:
        assert not onednn().usable(torch.zeros(1))
        return
    assert onednn().usable(torch.zeros(1), torch.zeros(2))
    assert not onednn().usable(torch.zeros(1), torch.zeros(2, dtype=torch.float64))
    assert not onednn().usable(torch.zeros(1, dtype=torch.bfloat16))


@needs_onednn
def test_frozen_linear_forward_and_input_gradient_through_onednn():
    k, calls = _spy()
    layer = torch.nn.Linear(12, 5).requires_grad_(False)
    x = torch.randn(2, 3, 12, requires_grad=True)
    y = k.frozen_linear(x, layer.weight, layer.bias)
    y.backward(torch.ones_like(y))
    assert calls == [(6, 12), (6, 5)] and y.shape == (2, 3, 5)
    xd = x.detach().double().requires_grad_()
    ref = F.linear(xd, layer.weight.double(), layer.bias.double())
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("failure", ["raises", "wrong values"])
def test_a_broken_onednn_op_falls_back_with_a_warning(failure):
    def broken(x, w, b, *rest):
        if failure == "raises":
            raise RuntimeError("mkldnn::_linear_pointwise: no such overload")
        return torch.zeros(x.shape[0], w.shape[0])

    k = Kernels(broken)
    x, w = torch.randn(4, 6), torch.randn(2, 6)
    with pytest.warns(UserWarning, match="oneDNN float32 matmul unusable"):
        assert not k.usable(x, w)
    assert k.name == "torch"
    assert torch.equal(k.linear(x, w), torch.nn.functional.linear(x, w))
