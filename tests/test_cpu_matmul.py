"""cpu_matmul: oneDNN float32 products equal float64 references, and the fallbacks are exactly torch's."""

import pytest
import torch
import torch.nn.functional as F

from lorakit import cpu_matmul

ONEDNN = cpu_matmul.enabled(torch.zeros(1))
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="oneDNN float32 path needs x86-64 and a oneDNN build")


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


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_float64(case, with_bias):
    g = torch.Generator().manual_seed(case)
    name, x, w = _layouts(g)[case]
    bias = torch.randn(w.shape[0], generator=g) if with_bias else None
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    got = cpu_matmul.linear(x, w, bias)
    assert got.dtype == torch.float32 and got.shape == ref.shape, name
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_matmul_is_a_times_b():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(40, 16, generator=g), torch.randn(16, 33, generator=g)
    torch.testing.assert_close(cpu_matmul.matmul(a, b).double(), a.double() @ b.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_matmul.matmul(a.t().contiguous().t(), b).double(), a.double() @ b.double(),
                               rtol=1e-5, atol=1e-5)


@needs_onednn
def test_float32_cpu_goes_through_onednn(monkeypatch):
    calls = []
    real = cpu_matmul._LINEAR
    monkeypatch.setattr(cpu_matmul, "_LINEAR", lambda *a: calls.append(a[0].shape) or real(*a))
    cpu_matmul.linear(torch.randn(8, 4), torch.randn(5, 4))
    assert calls == [torch.Size([8, 4])]


@pytest.mark.parametrize("why", ["bfloat16", "env off", "grad needed", "empty"])
def test_fallback_is_torch_exactly(monkeypatch, why):
    calls = []
    monkeypatch.setattr(cpu_matmul, "_LINEAR", lambda *a: calls.append(1))  # would return None if reached
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    if why == "bfloat16":
        x, w = x.bfloat16(), w.bfloat16()
    elif why == "env off":
        monkeypatch.setenv("LORAKIT_ONEDNN", "0")
    elif why == "grad needed":
        x.requires_grad_()
    else:
        x = x[:0]
    got = cpu_matmul.linear(x, w)
    assert calls == []
    assert torch.equal(got, F.linear(x, w))
    if why == "grad needed":
        assert got.grad_fn is not None


def test_enabled_only_for_float32_cpu():
    if not ONEDNN:
        assert not cpu_matmul.enabled(torch.zeros(1))
        return
    assert cpu_matmul.enabled(torch.zeros(1), torch.zeros(2))
    assert not cpu_matmul.enabled(torch.zeros(1), torch.zeros(2, dtype=torch.float64))
    assert not cpu_matmul.enabled(torch.zeros(1, dtype=torch.bfloat16))


def _spy(monkeypatch):
    calls = []
    real = cpu_matmul._LINEAR
    monkeypatch.setattr(cpu_matmul, "_LINEAR", lambda *a: calls.append(tuple(a[0].shape)) or real(*a))
    return calls


@needs_onednn
def test_no_grad_linears_routes_module_linears_without_grad(monkeypatch):
    calls = _spy(monkeypatch)
    layer = torch.nn.Linear(12, 5)
    x = torch.randn(2, 3, 12)
    ref = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    with torch.no_grad(), cpu_matmul.no_grad_linears():
        y = layer(x)
        y1 = F.linear(x[0, 0], layer.weight)  # 1-D input: left to torch
    assert calls == [(6, 12)] and y.shape == (2, 3, 5)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y1, F.linear(x[0, 0], layer.weight))


def test_no_grad_linears_leaves_gradient_calls_to_torch(monkeypatch):
    calls = _spy(monkeypatch)
    layer = torch.nn.Linear(12, 5)
    x = torch.randn(4, 12, requires_grad=True)
    with cpu_matmul.no_grad_linears():
        y = layer(x)
    assert calls == [] and y.grad_fn is not None
    assert torch.equal(y, layer(x))


@pytest.mark.parametrize("failure", ["raises", "wrong values"])
def test_a_broken_onednn_op_falls_back_with_a_warning(monkeypatch, failure):
    def broken(x, w, b, *rest):
        if failure == "raises":
            raise RuntimeError("mkldnn::_linear_pointwise: no such overload")
        return torch.zeros(x.shape[0], w.shape[0])

    monkeypatch.setattr(cpu_matmul, "_LINEAR", broken)
    monkeypatch.setattr(cpu_matmul, "_CHECKED", False)
    x, w = torch.randn(4, 6), torch.randn(2, 6)
    with pytest.warns(UserWarning, match="oneDNN float32 matmul unusable"):
        assert not cpu_matmul.enabled(x, w)
    assert cpu_matmul._LINEAR is None
    assert torch.equal(cpu_matmul.linear(x, w), torch.nn.functional.linear(x, w))
